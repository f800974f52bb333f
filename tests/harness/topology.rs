//! Any mesh in a few lines: etcd, a control plane, instances of any
//! services (each an example app behind its own sidecar) and a caller whose
//! outbound the test uses.
//!
//! ```ignore
//! let bed = Topology::new()
//!     .instances("inference", &["v1", "v2"])
//!     .instance("inference", "version=v3").app(App::Failing(503))
//!     .instance("planner", "version=v1")        // calls others through its sidecar
//!     .start()
//!     .await;
//! bed.wait_endpoints("inference", 3).await;
//! let r = Req::get(bed.caller.outbound, "planner", "/call/inference/run").send().await;
//! ```
//!
//! Every app can call other services through its own sidecar's outbound
//! (`/call/<service>/<path>`), so chains of agents need nothing more.

use std::time::Duration;

use tokio::net::TcpListener;

use crate::{Backend, Control, Etcd, Info, Sidecar, eventually, get};

/// What an instance's app does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum App {
    /// The example HTTP/1.1 + h2c app.
    Http,
    /// The example app answering every request with this status.
    Failing(u16),
    /// The example gRPC inference service.
    Grpc,
}

#[derive(Debug, Clone)]
struct Spec {
    service: String,
    labels: String,
    app: App,
    args: Vec<String>,
}

/// A mesh to build; [`Topology::start`] starts it.
#[derive(Debug, Clone)]
pub struct Topology {
    lease_ttl: u32,
    control_args: Vec<String>,
    instances: Vec<Spec>,
    /// Where the instances added by the last `instance(s)` call start.
    group: usize,
    caller: Spec,
}

impl Default for Topology {
    fn default() -> Self {
        Topology::new()
    }
}

impl Topology {
    /// No instances yet, a lease TTL of 5 s, and a caller named `agent`.
    pub fn new() -> Topology {
        Topology {
            lease_ttl: 5,
            control_args: Vec::new(),
            instances: Vec::new(),
            group: 0,
            caller: Spec { service: "agent".into(), labels: String::new(), app: App::Http, args: Vec::new() },
        }
    }

    pub fn lease_ttl(mut self, secs: u32) -> Topology {
        self.lease_ttl = secs;
        self
    }

    /// Extra flags for the control plane.
    pub fn control_args(mut self, args: &[&str]) -> Topology {
        self.control_args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// One instance of `service` with these sidecar labels (`k=v,k=v`).
    pub fn instance(mut self, service: &str, labels: &str) -> Topology {
        self.group = self.instances.len();
        self.instances.push(Spec { service: service.into(), labels: labels.into(), app: App::Http, args: Vec::new() });
        self
    }

    /// One instance of `service` per version, labelled `version=<v>`.
    pub fn instances(mut self, service: &str, versions: &[&str]) -> Topology {
        let group = self.instances.len();
        for v in versions {
            self = self.instance(service, &format!("version={v}"));
        }
        self.group = group;
        self
    }

    /// The app of the instances added by the last `instance(s)` call.
    pub fn app(mut self, app: App) -> Topology {
        self.last().iter_mut().for_each(|s| s.app = app);
        self
    }

    /// Extra flags for the sidecars of the instances added by the last
    /// `instance(s)` call.
    pub fn args(mut self, args: &[&str]) -> Topology {
        for s in self.last() {
            s.args.extend(args.iter().map(|a| a.to_string()));
        }
        self
    }

    /// The caller: its service name, labels and sidecar flags.
    pub fn caller(mut self, service: &str, labels: &str, args: &[&str]) -> Topology {
        self.caller = Spec {
            service: service.into(),
            labels: labels.into(),
            app: App::Http,
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        self
    }

    fn last(&mut self) -> &mut [Spec] {
        assert!(self.group < self.instances.len(), "add an instance first");
        &mut self.instances[self.group..]
    }

    /// Starts etcd, the control plane and every sidecar (ready), and waits
    /// until the caller sees every instance of every service ready.
    pub async fn start(self) -> Bed {
        let etcd = Etcd::start().await;
        let args: Vec<&str> = self.control_args.iter().map(String::as_str).collect();
        let control = Control::start_with(&etcd, self.lease_ttl, &args).await;
        let urls = vec![control.url()];
        // Ids name the service and version (`inference-v1`); a second
        // instance of the same version gets its index too.
        let ids: Vec<String> = self
            .instances
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let twins =
                    self.instances.iter().filter(|o| o.service == spec.service && o.labels == spec.labels).count();
                match version_of(&spec.labels) {
                    v if !v.is_empty() && twins == 1 => format!("{}-{v}", spec.service),
                    v if !v.is_empty() => format!("{}-{v}-{i}", spec.service),
                    _ => format!("{}-{i}", spec.service),
                }
            })
            .collect();
        let starts = self.instances.iter().zip(ids).map(|(spec, id)| Instance::start(&urls, spec, id));
        let instances = futures_util::future::join_all(starts).await;
        let caller = Instance::start(&urls, &self.caller, format!("{}-1", self.caller.service)).await;
        let bed = Bed { etcd, control, urls, instances, caller };
        let mut services: Vec<&str> = bed.instances.iter().map(|i| i.service.as_str()).collect();
        services.sort();
        services.dedup();
        for s in services {
            let n = bed.instances.iter().filter(|i| i.service == s).count();
            bed.wait_endpoints(s, n).await;
        }
        bed
    }
}

/// One instance: its app and its sidecar.
pub struct Instance {
    pub service: String,
    /// The `version` label, "" when none.
    pub version: String,
    pub sidecar: Sidecar,
    pub app: Backend,
}

impl Instance {
    async fn start(urls: &[String], spec: &Spec, id: String) -> Instance {
        let version = version_of(&spec.labels).to_string();
        // The app's port first (the sidecar needs it), the app itself once
        // the sidecar's outbound is known (the app calls out through it).
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port for the app");
        let app_addr = listener.local_addr().expect("bound");
        let args: Vec<&str> = spec.args.iter().map(String::as_str).collect();
        let sidecar = Sidecar::start_with(urls, &spec.service, &spec.labels, app_addr, &id, &args).await;
        let info = |outbound: Option<String>| Info {
            service: spec.service.clone(),
            version: if version.is_empty() { "v1".into() } else { version.clone() },
            outbound,
            mode: Default::default(),
        };
        let app = match spec.app {
            App::Http | App::Failing(_) => Backend::serve_http(listener, info(Some(sidecar.outbound.to_string()))),
            App::Grpc => Backend::serve_grpc(listener, info(None)),
        };
        if let App::Failing(status) = spec.app {
            app.mode.fail(100, status);
        }
        Instance { service: spec.service.clone(), version, sidecar, app }
    }
}

/// A running mesh.
pub struct Bed {
    pub etcd: Etcd,
    pub control: Control,
    /// The control plane URLs sidecars are given.
    pub urls: Vec<String>,
    pub instances: Vec<Instance>,
    pub caller: Instance,
}

impl Bed {
    pub fn control_url(&self) -> String {
        self.control.url()
    }

    /// The instance of `service` labelled `version`.
    pub fn instance(&self, service: &str, version: &str) -> &Instance {
        self.instances
            .iter()
            .find(|i| i.service == service && i.version == version)
            .unwrap_or_else(|| panic!("no instance {service}/{version}"))
    }

    /// The instances of `service`.
    pub fn of(&self, service: &str) -> impl Iterator<Item = &Instance> {
        let service = service.to_string();
        self.instances.iter().filter(move |i| i.service == service)
    }

    /// Requests the apps of `service` have served.
    pub fn hits(&self, service: &str) -> u64 {
        self.of(service).map(|i| i.app.mode.hits()).sum()
    }

    /// Starts one more instance and waits until the caller and every
    /// sidecar of the service see all its instances ready.
    pub async fn add(&mut self, service: &str, labels: &str, args: &[&str]) -> &Instance {
        let spec = Spec {
            service: service.into(),
            labels: labels.into(),
            app: App::Http,
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        let id = format!("{service}-{}", self.instances.len());
        let instance = Instance::start(&self.urls, &spec, id).await;
        self.instances.push(instance);
        let n = self.of(service).count();
        self.wait_endpoints(service, n).await;
        for s in self.of(service).map(|i| &i.sidecar) {
            wait_ready_endpoints(s, service, n).await;
        }
        self.instances.last().expect("just added")
    }

    /// Waits until the caller's sidecar sees `n` ready endpoints of
    /// `service` (subscribing it first with one request).
    pub async fn wait_endpoints(&self, service: &str, n: usize) {
        let _ = get(self.caller.sidecar.outbound, service, "/").await;
        wait_ready_endpoints(&self.caller.sidecar, service, n).await;
    }
}

fn version_of(labels: &str) -> &str {
    labels.split(',').find_map(|kv| kv.strip_prefix("version=")).unwrap_or("")
}

/// Waits until `sidecar` sees exactly `n` ready endpoints of `service`.
pub async fn wait_ready_endpoints(sidecar: &Sidecar, service: &str, n: usize) {
    let what = format!("{} sees {n} ready endpoints of {service}", sidecar.id);
    eventually(&what, Duration::from_secs(20), || async move {
        let cfg = sidecar.config().await;
        cfg["services"][service]["endpoints"]
            .as_array()
            .is_some_and(|e| e.iter().filter(|e| e["ready"] == true).count() == n)
    })
    .await;
}

/// Waits until `sidecar`'s config of `service` holds a value at `pointer`
/// (a JSON pointer under the service, e.g. `/resilience/retry_budget_ratio`;
/// an empty list counts as none): the policy has reached it.
pub async fn wait_policy(sidecar: &Sidecar, service: &str, pointer: &str) {
    let what = format!("{} has {service}{pointer}", sidecar.id);
    eventually(&what, Duration::from_secs(10), || async move {
        let cfg = sidecar.config().await;
        cfg["services"][service]
            .pointer(pointer)
            .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
    })
    .await;
}
