//! `weftctl inject -f FILE`: weft added to Kubernetes workloads.
//!
//! Each Deployment, StatefulSet, DaemonSet and Pod is read into the
//! Kubernetes API types (k8s-openapi), so a document that is not one is
//! refused with what is wrong and where, and what is written is one. Its
//! pod gets:
//!
//! - `weft-init`, an init container that runs `weft-proxy init` (capture
//!   rules for the pod's network namespace; `NET_ADMIN` and `NET_RAW`, as
//!   root, nothing else), the app's container ports captured inbound;
//! - `weft-proxy`, the sidecar, as a native sidecar (an init container that
//!   keeps running: it is up before the app starts and does not keep a Job
//!   from finishing), as user `--proxy-uid`, probed on `/live` and `/ready`,
//!   with its token from the Secret `weft-proxy-<service>` and the trust
//!   bundle from the ConfigMap `weft-ca`;
//! - the annotation `weft.io/injected`.
//!
//! The service is the pod's annotation `weft.io/service`, else its label
//! `app.kubernetes.io/name`, else `app`, else the workload's name; the
//! instance label `version` comes from the label `version` or
//! `app.kubernetes.io/version`. The app's port is the annotation
//! `weft.io/app-port`, else the first container port. Injecting twice gives
//! what injecting once gave.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, Pod, PodSpec, Probe, ResourceRequirements, SecretKeySelector, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::client::Fail;

/// The sidecar's listeners inside the pod.
const INBOUND_PORT: i32 = 4143;
const OUTBOUND_PORT: i32 = 4140;
const ADMIN_PORT: i32 = 4191;
const INIT: &str = "weft-init";
const PROXY: &str = "weft-proxy";
const CA_VOLUME: &str = "weft-ca";
const CA_DIR: &str = "/var/run/weft";
const INJECTED: &str = "weft.io/injected";

/// What every injected sidecar shares.
pub(crate) struct Sidecar {
    pub(crate) image: String,
    pub(crate) control_url: String,
    pub(crate) proxy_uid: i64,
}

pub(crate) fn run(file: &str, sidecar: &Sidecar) -> Result<(), Fail> {
    let (name, text) = crate::input::read_input(file)?;
    let out = inject_all(&name, &text, sidecar).map_err(|e| Fail(1, e))?;
    print!("{out}");
    Ok(())
}

/// Every document of `text`, workloads injected, as YAML.
pub(crate) fn inject_all(name: &str, text: &str, sidecar: &Sidecar) -> Result<String, String> {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(text).map_err(|e| format!("{name}: not YAML: {e}"))?;
    let mut out = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        let at = |e: String| {
            let kind = doc["kind"].as_str().unwrap_or("?");
            let obj = doc["metadata"]["name"].as_str().unwrap_or("?");
            format!("{name}: document {} ({kind}/{obj}): {e}", i + 1)
        };
        let api = (doc["apiVersion"].as_str().unwrap_or(""), doc["kind"].as_str().unwrap_or(""));
        let injected = match api {
            ("apps/v1", "Deployment") => workload::<Deployment>(&doc, sidecar, |d| {
                let t = &mut d.spec.as_mut()?.template;
                Some((t.metadata.get_or_insert_with(ObjectMeta::default), t.spec.as_mut()?, d.metadata.name.clone()))
            }),
            ("apps/v1", "StatefulSet") => workload::<StatefulSet>(&doc, sidecar, |d| {
                let t = &mut d.spec.as_mut()?.template;
                Some((t.metadata.get_or_insert_with(ObjectMeta::default), t.spec.as_mut()?, d.metadata.name.clone()))
            }),
            ("apps/v1", "DaemonSet") => workload::<DaemonSet>(&doc, sidecar, |d| {
                let t = &mut d.spec.as_mut()?.template;
                Some((t.metadata.get_or_insert_with(ObjectMeta::default), t.spec.as_mut()?, d.metadata.name.clone()))
            }),
            ("v1", "Pod") => workload::<Pod>(&doc, sidecar, |p| {
                let name = p.metadata.name.clone();
                Some((&mut p.metadata, p.spec.as_mut()?, name))
            }),
            // Anything else (Services, ConfigMaps...) passes through.
            _ => Ok(doc.clone()),
        }
        .map_err(at)?;
        out.push(serde_saphyr::to_string(&injected).map_err(|e| at(e.to_string()))?);
    }
    if out.is_empty() {
        return Err(format!("{name}: no documents"));
    }
    Ok(out.iter().map(|d| format!("---\n{}", d.trim_end())).collect::<Vec<_>>().join("\n") + "\n")
}

/// Reads `doc` as `T`, injects the pod that `pod` finds in it, and gives
/// it back as a document.
fn workload<T: DeserializeOwned + Serialize>(
    doc: &serde_json::Value,
    sidecar: &Sidecar,
    pod: impl FnOnce(&mut T) -> Option<(&mut ObjectMeta, &mut PodSpec, Option<String>)>,
) -> Result<serde_json::Value, String> {
    // The path of a field of the wrong type, as in `spec.replicas`.
    let mut obj: T = serde_path_to_error::deserialize(doc.clone()).map_err(|e| match e.path().to_string() {
        p if p == "." => e.inner().to_string(),
        p => format!("{p}: {}", e.inner()),
    })?;
    // Fields the API type does not have would be dropped on the way out:
    // a misspelt field is refused, not silently lost.
    let back = serde_json::to_value(&obj).map_err(|e| e.to_string())?;
    let mut lost = Vec::new();
    unknown_fields(doc, &back, "", &mut lost);
    if !lost.is_empty() {
        return Err(format!("{}: not a field of the Kubernetes API", lost.join(", ")));
    }
    let (meta, spec, name) = pod(&mut obj).ok_or("no pod template spec")?;
    inject_pod(meta, spec, name.as_deref(), sidecar)?;
    serde_json::to_value(&obj).map_err(|e| e.to_string())
}

/// The paths of `given`'s fields (other than nulls) that `typed`, the same
/// document read into its API type and written back, no longer has.
pub(crate) fn unknown_fields(given: &serde_json::Value, typed: &serde_json::Value, at: &str, out: &mut Vec<String>) {
    use serde_json::Value;
    match (given, typed) {
        (Value::Object(g), Value::Object(t)) => {
            for (k, v) in g.iter().filter(|(_, v)| !v.is_null()) {
                let path = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
                match t.get(k) {
                    Some(tv) => unknown_fields(v, tv, &path, out),
                    None => out.push(path),
                }
            }
        }
        (Value::Array(g), Value::Array(t)) => {
            for (i, (gv, tv)) in g.iter().zip(t).enumerate() {
                unknown_fields(gv, tv, &format!("{at}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// The service a pod is an instance of.
fn service_of(meta: &ObjectMeta, workload: Option<&str>) -> Result<String, String> {
    let annotation = meta.annotations.as_ref().and_then(|a| a.get("weft.io/service"));
    let labels = meta.labels.as_ref();
    let label = |k: &str| labels.and_then(|l| l.get(k));
    let service = annotation
        .or_else(|| label("app.kubernetes.io/name"))
        .or_else(|| label("app"))
        .map(String::as_str)
        .or(workload)
        .ok_or("no service name: set the annotation weft.io/service, or the label app.kubernetes.io/name")?;
    if !weft_policy::names::is_service(service.as_bytes()) {
        return Err(format!(
            "service name '{service}': use 1-63 lowercase letters, digits, '-' or '_' (set the annotation weft.io/service)"
        ));
    }
    Ok(service.to_string())
}

/// Adds (or puts back the same) init step, sidecar and volume.
fn inject_pod(
    meta: &mut ObjectMeta,
    spec: &mut PodSpec,
    workload: Option<&str>,
    sidecar: &Sidecar,
) -> Result<(), String> {
    let service = service_of(meta, workload)?;
    // Injected before: weft's parts are taken out and made again.
    let ours = |c: &Container| c.name == INIT || c.name == PROXY;
    spec.containers.retain(|c| !ours(c));
    if let Some(init) = spec.init_containers.as_mut() {
        init.retain(|c| !ours(c));
    }
    if let Some(v) = spec.volumes.as_mut() {
        v.retain(|v| v.name != CA_VOLUME);
    }
    if spec.containers.is_empty() {
        return Err("the pod has no containers".into());
    }
    let ports: Vec<i32> =
        spec.containers.iter().flat_map(|c| c.ports.iter().flatten()).map(|p| p.container_port).collect();
    if let Some(p) = ports.iter().find(|p| [INBOUND_PORT, OUTBOUND_PORT, ADMIN_PORT].contains(p)) {
        return Err(format!("container port {p} is one of the sidecar's (4140, 4143, 4191)"));
    }
    let annotations = meta.annotations.get_or_insert_with(BTreeMap::new);
    let app_port = match annotations.get("weft.io/app-port") {
        Some(p) => p.parse::<u16>().map_err(|_| format!("annotation weft.io/app-port '{p}' is not a port"))?.into(),
        None => *ports
            .first()
            .ok_or("no container port for the app: declare one, or set the annotation weft.io/app-port")?,
    };
    annotations.insert(INJECTED.into(), env!("CARGO_PKG_VERSION").into());
    let labels = meta.labels.as_ref();
    let version = labels.and_then(|l| l.get("version").or_else(|| l.get("app.kubernetes.io/version")));

    let init = init_container(sidecar, &ports);
    let proxy = proxy_container(sidecar, &service, app_port, version.map(String::as_str), &ports);
    // Capture first, then the sidecar, then the pod's own init steps (which
    // may call the mesh).
    let init_containers = spec.init_containers.get_or_insert_with(Vec::new);
    init_containers.insert(0, proxy);
    init_containers.insert(0, init);
    spec.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: CA_VOLUME.into(),
        config_map: Some(ConfigMapVolumeSource { name: "weft-ca".into(), ..Default::default() }),
        ..Default::default()
    });
    Ok(())
}

fn s(v: &str) -> String {
    v.to_string()
}

fn init_container(sidecar: &Sidecar, ports: &[i32]) -> Container {
    let mut args = vec![s("init"), s("--proxy-uid"), sidecar.proxy_uid.to_string()];
    if !ports.is_empty() {
        let list: Vec<String> = ports.iter().map(i32::to_string).collect();
        args.extend([s("--inbound-ports"), list.join(",")]);
    }
    Container {
        name: INIT.into(),
        image: Some(sidecar.image.clone()),
        command: Some(vec![s("weft-proxy")]),
        args: Some(args),
        security_context: Some(SecurityContext {
            capabilities: Some(Capabilities {
                add: Some(vec![s("NET_ADMIN"), s("NET_RAW")]),
                drop: Some(vec![s("ALL")]),
            }),
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: path.into(), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn probe(path: &str) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(ADMIN_PORT),
            ..Default::default()
        }),
        period_seconds: Some(5),
        ..Default::default()
    }
}

fn proxy_container(sidecar: &Sidecar, service: &str, app_port: i32, version: Option<&str>, ports: &[i32]) -> Container {
    let mut args = vec![
        s("--service"),
        service.into(),
        s("--app"),
        format!("127.0.0.1:{app_port}"),
        s("--inbound"),
        format!("0.0.0.0:{INBOUND_PORT}"),
        s("--outbound"),
        format!("127.0.0.1:{OUTBOUND_PORT}"),
        s("--admin"),
        format!("0.0.0.0:{ADMIN_PORT}"),
        s("--advertise"),
        format!("$(POD_IP):{INBOUND_PORT}"),
        s("--id"),
        s("$(POD_NAME)"),
    ];
    if let Some(v) = version {
        args.extend([s("--labels"), format!("version={v}")]);
    }
    let others: Vec<String> = ports.iter().filter(|p| **p != app_port).map(i32::to_string).collect();
    if !others.is_empty() {
        args.extend([s("--app-ports"), others.join(",")]);
    }
    let quantity = |q: &str| Quantity(q.into());
    Container {
        name: PROXY.into(),
        image: Some(sidecar.image.clone()),
        args: Some(args),
        // A native sidecar: started before the app, stopped after it.
        restart_policy: Some(s("Always")),
        env: Some(vec![
            field_env("POD_IP", "status.podIP"),
            field_env("POD_NAME", "metadata.name"),
            EnvVar { name: "WEFT_CONTROL".into(), value: Some(sidecar.control_url.clone()), ..Default::default() },
            EnvVar { name: "WEFT_CA_BUNDLE".into(), value: Some(format!("{CA_DIR}/ca.crt")), ..Default::default() },
            EnvVar {
                name: "WEFT_TOKEN".into(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: format!("weft-proxy-{service}"),
                        key: "token".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ]),
        ports: Some(vec![
            ContainerPort { name: Some(s("weft-inbound")), container_port: INBOUND_PORT, ..Default::default() },
            ContainerPort { name: Some(s("weft-admin")), container_port: ADMIN_PORT, ..Default::default() },
        ]),
        liveness_probe: Some(probe("/live")),
        readiness_probe: Some(probe("/ready")),
        startup_probe: Some(Probe { failure_threshold: Some(60), period_seconds: Some(1), ..probe("/live") }),
        resources: Some(ResourceRequirements {
            requests: Some([(s("cpu"), quantity("50m")), (s("memory"), quantity("32Mi"))].into()),
            limits: Some([(s("memory"), quantity("256Mi"))].into()),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(sidecar.proxy_uid),
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec![s("ALL")]), ..Default::default() }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: CA_VOLUME.into(),
            mount_path: CA_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sidecar() -> Sidecar {
        Sidecar { image: "weft-proxy:test".into(), control_url: "https://weft-control:7070".into(), proxy_uid: 2102 }
    }

    const DEPLOYMENT: &str = "apiVersion: apps/v1
kind: Deployment
metadata: { name: inference-v1 }
spec:
  selector: { matchLabels: { app: inference } }
  template:
    metadata: { labels: { app: inference, version: v1 } }
    spec:
      containers:
        - name: server
          image: example/inference:1
          ports: [ { containerPort: 8080 }, { containerPort: 9000 } ]
---
apiVersion: v1
kind: Service
metadata: { name: inference }
spec: { ports: [ { port: 8080 } ] }
";

    #[test]
    fn a_deployment_gets_the_init_step_and_the_sidecar_once() {
        let once = inject_all("d.yaml", DEPLOYMENT, &sidecar()).unwrap();
        let twice = inject_all("d.yaml", &once, &sidecar()).unwrap();
        assert_eq!(once, twice, "injecting again changes nothing");
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&once).unwrap();
        assert_eq!(docs.len(), 2);
        let d: Deployment = serde_json::from_value(docs[0].clone()).unwrap();
        let pod = d.spec.unwrap().template;
        let spec = pod.spec.unwrap();
        assert_eq!(spec.containers.len(), 1, "the app's containers stay as they were");
        let init = spec.init_containers.unwrap();
        assert_eq!(init.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), [INIT, PROXY]);
        assert_eq!(init[0].args.as_ref().unwrap().join(" "), "init --proxy-uid 2102 --inbound-ports 8080,9000");
        let caps = init[0].security_context.as_ref().unwrap().capabilities.as_ref().unwrap();
        assert_eq!(caps.add.as_deref(), Some(&[s("NET_ADMIN"), s("NET_RAW")][..]));
        let args = init[1].args.as_ref().unwrap().join(" ");
        assert!(args.starts_with("--service inference --app 127.0.0.1:8080"), "{args}");
        assert!(args.contains("--labels version=v1") && args.contains("--app-ports 9000"), "{args}");
        assert_eq!(init[1].restart_policy.as_deref(), Some("Always"));
        assert_eq!(init[1].security_context.as_ref().unwrap().run_as_user, Some(2102));
        let ready = init[1].readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!((ready.path.as_deref(), &ready.port), (Some("/ready"), &IntOrString::Int(4191)));
        assert_eq!(spec.volumes.unwrap().len(), 1);
        assert_eq!(pod.metadata.unwrap().annotations.unwrap()[INJECTED], env!("CARGO_PKG_VERSION"));
        assert_eq!(docs[1]["kind"], "Service", "other documents pass through");
    }

    #[test]
    fn statefulsets_daemonsets_and_pods_are_injected_too() {
        let template = "metadata: { labels: { app.kubernetes.io/name: model } }\n    spec: { containers: [ { name: m, image: x, ports: [ { containerPort: 7000 } ] } ] }";
        for (api, kind) in [("apps/v1", "StatefulSet"), ("apps/v1", "DaemonSet")] {
            let doc = format!(
                "apiVersion: {api}\nkind: {kind}\nmetadata: {{ name: m }}\nspec:\n  selector: {{ matchLabels: {{ a: b }} }}\n  template:\n    {template}\n"
            );
            let out = inject_all("w.yaml", &doc, &sidecar()).unwrap_or_else(|e| panic!("{kind}: {e}"));
            assert!(out.contains("--service") && out.contains("- model"), "{kind}: {out}");
            assert_eq!(inject_all("w.yaml", &out, &sidecar()).unwrap(), out, "{kind}: idempotent");
        }
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: { name: solo-7, annotations: { weft.io/service: solo, weft.io/app-port: '3000' } }\nspec: { containers: [ { name: s, image: x } ] }\n";
        let out = inject_all("p.yaml", pod, &sidecar()).unwrap();
        let p: Pod =
            serde_json::from_value(serde_saphyr::from_multiple::<serde_json::Value>(&out).unwrap()[0].clone()).unwrap();
        let args = p.spec.unwrap().init_containers.unwrap()[1].args.clone().unwrap().join(" ");
        assert!(args.starts_with("--service solo --app 127.0.0.1:3000"), "{args}");
    }

    #[test]
    fn what_is_not_a_workload_of_the_api_or_cannot_be_one_is_refused_naming_the_document() {
        let bad_type = "apiVersion: v1\nkind: ConfigMap\nmetadata: { name: c }\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: { name: d }\nspec: { replicas: many, selector: {}, template: {} }\n";
        let e = inject_all("x.yaml", bad_type, &sidecar()).unwrap_err();
        assert!(e.starts_with("x.yaml: document 2 (Deployment/d): spec.replicas: invalid type"), "{e}");
        let no_port =
            "apiVersion: v1\nkind: Pod\nmetadata: { name: p }\nspec: { containers: [ { name: s, image: x } ] }\n";
        let e = inject_all("x.yaml", no_port, &sidecar()).unwrap_err();
        assert!(e.contains("document 1 (Pod/p)") && e.contains("weft.io/app-port"), "{e}");
        let clash = "apiVersion: v1\nkind: Pod\nmetadata: { name: p }\nspec: { containers: [ { name: s, image: x, ports: [ { containerPort: 4191 } ] } ] }\n";
        assert!(inject_all("x.yaml", clash, &sidecar()).unwrap_err().contains("4191"));
        let typo = "apiVersion: v1\nkind: Pod\nmetadata: { name: p }\nspec: { containers: [ { name: s, image: x, ports: [ { containerPort: 80 } ], readinesProbe: {} } ] }\n";
        let e = inject_all("x.yaml", typo, &sidecar()).unwrap_err();
        assert!(e.contains("spec.containers[0].readinesProbe: not a field of the Kubernetes API"), "{e}");
        let bad_name = "apiVersion: v1\nkind: Pod\nmetadata: { name: p, labels: { app: Bad.Name } }\nspec: { containers: [ { name: s, image: x, ports: [ { containerPort: 80 } ] } ] }\n";
        assert!(inject_all("x.yaml", bad_name, &sidecar()).unwrap_err().contains("'Bad.Name'"));
    }

    /// Every document under deploy/kubernetes is an object of the API, with
    /// no field the API does not have; the control plane has replicas and
    /// probes, etcd three members.
    #[test]
    fn the_kubernetes_manifests_are_objects_of_the_api() {
        use k8s_openapi::api::core::v1::{Namespace, Service};
        use k8s_openapi::api::policy::v1::PodDisruptionBudget;
        fn typed<T: DeserializeOwned + Serialize>(doc: &serde_json::Value, what: &str) -> T {
            let obj: T = serde_path_to_error::deserialize(doc.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
            let mut lost = Vec::new();
            unknown_fields(doc, &serde_json::to_value(&obj).unwrap(), "", &mut lost);
            assert!(lost.is_empty(), "{what}: not fields of the API: {lost:?}");
            obj
        }
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/kubernetes");
        let (mut control, mut etcd) = (None, None);
        let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        assert!(files.len() >= 3, "{files:?}");
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for doc in serde_saphyr::from_multiple::<serde_json::Value>(&text).unwrap() {
                let what = format!("{}: {}/{}", file.display(), doc["kind"], doc["metadata"]["name"]);
                match doc["kind"].as_str().unwrap() {
                    "Namespace" => drop(typed::<Namespace>(&doc, &what)),
                    "Service" => drop(typed::<Service>(&doc, &what)),
                    "PodDisruptionBudget" => drop(typed::<PodDisruptionBudget>(&doc, &what)),
                    "Deployment" => control = Some(typed::<Deployment>(&doc, &what)),
                    "StatefulSet" => etcd = Some(typed::<StatefulSet>(&doc, &what)),
                    other => panic!("{what}: unexpected kind {other}"),
                }
            }
        }
        let control = control.expect("the control plane's Deployment").spec.unwrap();
        assert!(control.replicas.unwrap() >= 2);
        let c = &control.template.spec.unwrap().containers[0];
        let path = |p: &Option<Probe>| p.as_ref().unwrap().http_get.as_ref().unwrap().path.clone().unwrap();
        assert_eq!((path(&c.liveness_probe), path(&c.readiness_probe)), (s("/live"), s("/ready")));
        assert_eq!(etcd.expect("etcd's StatefulSet").spec.unwrap().replicas, Some(3));
    }
}
