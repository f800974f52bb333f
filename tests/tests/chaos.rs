//! The chaos suite: a steady 200 GETs a second through a caller's sidecar to
//! a three-instance service with retries, while the control plane, etcd and
//! the sidecars themselves fail. Nothing the control plane or etcd does may
//! fail a call; after every fault a policy change still reaches every
//! sidecar. Each phase's requests and failures go to
//! `target/chaos-report.md` and the test output.

use std::time::Duration;

use harness::load::{Tally, table};
use harness::{Backend, Control, Etcd, EtcdCluster, Load, Sidecar, apply, eventually, get, weftctl};

/// The lease TTL of these tests; each fault lasts until a lease is lost.
const TTL: u32 = 2;
/// Calls a quiet phase runs for (two seconds of load).
const SETTLE: u64 = 2 * RATE as u64;
const RATE: u32 = 200;

/// The route and resilience policy; `n` makes each apply a new revision.
fn policy(n: u32) -> String {
    format!(
        "kind: Route\nservice: inference\nrules:\n  - backends: [ {{ subset: {{}}, weight: 1 }} ]\n    timeout: {}s\n    retry: {{ attempts: 2, on: [5xx, connect-failure, reset] }}\n---\nkind: Resilience\nservice: inference\ncircuit_breaker: {{ consecutive_failures: 3, base_ejection: 2s, max_ejection_percent: 50 }}\nretry_budget: {{ ratio: 0.5, min_per_second: 50 }}\n",
        10 + n
    )
}

/// Three `inference` instances and a caller, behind sidecars of one control
/// plane.
struct Bed {
    control: Control,
    _apps: Vec<Backend>,
    instances: Vec<Sidecar>,
    caller_app: Backend,
    caller: Sidecar,
    applied: u32,
}

impl Bed {
    async fn start(control: Control) -> Bed {
        let urls = [control.url()];
        let mut apps = Vec::new();
        let mut instances = Vec::new();
        for i in 0..3 {
            let app = Backend::http("inference", &format!("i{i}")).await;
            instances.push(Sidecar::start(&urls, "inference", "", app.addr, &format!("inference-{i}")).await);
            apps.push(app);
        }
        let caller_app = Backend::http("agent", "v1").await;
        let caller = Sidecar::start_with(&urls, "agent", "", caller_app.addr, "agent-a", &["--reuse-port"]).await;
        let mut bed = Bed { control, _apps: apps, instances, caller_app, caller, applied: 0 };
        // The caller subscribes to inference on its first call.
        let _ = get(bed.caller.outbound, "inference", "/").await;
        bed.wait_caller_sees(3).await;
        let m = bed.caller.metrics().await;
        assert!(m.contains("weft_endpoints{service=\"inference\",state=\"ready\"} 3"), "{m}");
        assert!(m.contains("weft_endpoints{service=\"inference\",state=\"held\"} 0"), "{m}");
        bed.change_policy().await;
        bed
    }

    fn sidecars(&self) -> impl Iterator<Item = &Sidecar> {
        self.instances.iter().chain(std::iter::once(&self.caller))
    }

    async fn wait_caller_sees(&self, n: usize) {
        let caller = &self.caller;
        eventually(&format!("the caller sees {n} inference endpoints"), Duration::from_secs(30), || async move {
            caller.endpoint_addrs("inference").await.len() == n
        })
        .await;
    }

    /// Applies a new revision of the policy and checks that every sidecar
    /// has it in force.
    async fn change_policy(&mut self) {
        self.applied += 1;
        let out = apply(&self.control.url(), &policy(self.applied)).await;
        let rev: u64 = out
            .stdout
            .lines()
            .find(|l| l.starts_with("route/inference"))
            .and_then(|l| l.rsplit("(rev ").next())
            .and_then(|r| r.trim_end_matches(')').parse().ok())
            .unwrap_or_else(|| panic!("no revision in {out:?}"));
        for s in self.sidecars() {
            eventually(&format!("{} has route revision {rev}", s.id), Duration::from_secs(20), || async move {
                s.route_revision("inference", "").await == Some(rev)
            })
            .await;
        }
    }

    /// Waits until the control plane is ready and every instance is
    /// registered with it again.
    async fn wait_registered(&self) {
        self.control.wait_ready().await;
        let url = self.control.url();
        let ids: Vec<String> = self.instances.iter().map(|s| s.id.clone()).collect();
        eventually("every instance is registered again", Duration::from_secs(30), || {
            let (url, ids) = (url.clone(), ids.clone());
            async move {
                let out = weftctl(&url, &["endpoints", "inference"], None).await;
                ids.iter().all(|id| out.stdout.contains(id.as_str()))
            }
        })
        .await;
        for s in self.sidecars() {
            eventually(&format!("{} is connected", s.id), Duration::from_secs(30), || async move {
                s.config().await["control_connected"] == true
            })
            .await;
        }
    }

    /// A rolling restart: each instance gets a new sidecar, then the old one
    /// drains; the caller's new sidecar takes over its port (SO_REUSEPORT)
    /// before the old one drains.
    async fn rolling_restart(&mut self) {
        let urls = [self.control.url()];
        for i in 0..self.instances.len() {
            let app = self._apps[i].addr;
            let id = format!("{}-r", self.instances[i].id);
            let new = Sidecar::start(&urls, "inference", "", app, &id).await;
            self.wait_caller_sees(self.instances.len() + 1).await;
            let mut old = std::mem::replace(&mut self.instances[i], new);
            drain(&mut old).await;
            self.wait_caller_sees(self.instances.len()).await;
        }
        let outbound = self.caller.outbound.to_string();
        let extra = ["--reuse-port", "--outbound", outbound.as_str()];
        let new = Sidecar::start_with(&urls, "agent", "", self.caller_app.addr, "agent-b", &extra).await;
        let caller = &new;
        eventually("the new caller sidecar sees every instance", Duration::from_secs(30), || async move {
            let _ = get(caller.outbound, "inference", "/").await;
            caller.endpoint_addrs("inference").await.len() == 3
        })
        .await;
        let mut old = std::mem::replace(&mut self.caller, new);
        drain(&mut old).await;
    }
}

async fn drain(s: &mut Sidecar) {
    let client = harness::pooled_client();
    let req = http::Request::post(format!("http://{}/drain", s.admin))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.expect("POST /drain");
    assert_eq!(resp.status(), 202);
    assert!(s.wait_exit(Duration::from_secs(40)).await, "{} did not exit after its drain", s.id);
}

fn report(test: &str, rows: &[(String, Tally)]) {
    let text = table(rows);
    println!("{test}:\n{text}");
    for (name, t) in rows {
        if !t.examples.is_empty() {
            println!("  {name}: first failures: {:?}", t.examples);
        }
    }
    // One file per test, replaced by each run (appending grew without end).
    let slug: String = test.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    if let Some(path) = harness::bin_dir().parent().map(|p| p.join(format!("chaos-report-{slug}.md"))) {
        let _ = std::fs::write(path, format!("## {test}\n\n{text}\n"));
    }
}

fn assert_no_failures(rows: &[(String, Tally)]) {
    for (name, t) in rows {
        assert!(t.requests > 0, "no requests were sent in phase '{name}'");
        assert_eq!(t.failed, 0, "{} of {} calls failed in phase '{name}': {:?}", t.failed, t.requests, t.examples);
    }
}

/// Waits until etcd has dropped the instances' endpoint records: the
/// replica's lease ran out while it was away.
async fn wait_records_expired(etcd: &Etcd) {
    eventually("the replica's lease expired with its records", Duration::from_secs(30), || async move {
        let opts = etcd_client::GetOptions::new().with_prefix().with_count_only();
        let mut c = etcd.client().await;
        c.get("/weft/endpoints/inference/", Some(opts)).await.is_ok_and(|r| r.count() == 0)
    })
    .await;
}

/// Waits until the control plane has given up its lease (no keep-alive
/// answered within the TTL): etcd is unreachable for longer than the TTL.
async fn wait_lease_lost(control: &Control, before: f64) {
    eventually("the replica lost its lease", Duration::from_secs(30), || async move {
        metric(&control.metrics().await, "weft_control_lease_losses_total") > before
    })
    .await;
}

fn metric(metrics: &str, name: &str) -> f64 {
    metrics.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_and_etcd_outages_restarts_and_a_killed_instance_fail_no_call() {
    let mut etcd = Etcd::start().await;
    let control = Control::start(&etcd, TTL).await;
    let mut bed = Bed::start(control).await;
    let load = Load::start(bed.caller.outbound, "inference", RATE, "steady", Duration::from_secs(240));
    load.wait_answered(SETTLE).await;

    // Each fault lasts until it has done its worst (a lease gone), and for
    // a couple of seconds of calls after that.
    load.phase("control plane killed until its lease expired");
    bed.control.kill().await;
    wait_records_expired(&etcd).await;
    load.wait_answered(SETTLE).await;
    bed.control.restart().await;
    bed.wait_registered().await;
    bed.change_policy().await;

    load.phase("etcd frozen until the lease was lost");
    let m = bed.control.metrics().await;
    let (grants, losses) =
        (metric(&m, "weft_control_lease_grants_total"), metric(&m, "weft_control_lease_losses_total"));
    harness::signal(etcd.pid(), "STOP");
    wait_lease_lost(&bed.control, losses).await;
    load.wait_answered(SETTLE).await;
    harness::signal(etcd.pid(), "CONT");
    let control = &bed.control;
    eventually("the replica took a new lease", Duration::from_secs(30), || async move {
        metric(&control.metrics().await, "weft_control_lease_grants_total") > grants
    })
    .await;
    bed.wait_registered().await;
    bed.change_policy().await;

    load.phase("rolling restart of every sidecar");
    bed.rolling_restart().await;
    bed.change_policy().await;

    load.phase("one instance SIGKILLed");
    let mut killed = bed.instances.remove(0);
    killed.kill().await;
    bed.wait_caller_sees(2).await;
    load.wait_answered(SETTLE).await;
    bed.change_policy().await;

    load.phase("after");
    load.wait_answered(SETTLE).await;
    let rows = load.finish().await;
    report("single etcd, one control plane", &rows);
    assert_no_failures(&rows);
    etcd.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_cluster_losing_its_leader_then_quorum_fails_no_call() {
    let mut cluster = EtcdCluster::start().await;
    let control = Control::start_on(&cluster.urls(), TTL, "control").await;
    let mut bed = Bed::start(control).await;
    let load = Load::start(bed.caller.outbound, "inference", RATE, "steady", Duration::from_secs(180));
    load.wait_answered(SETTLE).await;

    load.phase("etcd leader killed");
    let leader = cluster.leader().await.expect("a leader");
    cluster.kill(leader).await;
    let next = cluster.wait_leader(Duration::from_secs(30)).await.expect("a new leader");
    assert_ne!(next, leader);
    bed.wait_registered().await;
    bed.change_policy().await;

    load.phase("etcd without quorum until the lease was lost");
    let losses = metric(&bed.control.metrics().await, "weft_control_lease_losses_total");
    cluster.kill(next).await;
    wait_lease_lost(&bed.control, losses).await;
    load.wait_answered(SETTLE).await;
    for i in 0..3 {
        if !cluster.is_running(i) {
            cluster.restart(i);
        }
    }
    cluster.wait_leader(Duration::from_secs(30)).await.expect("quorum is back");
    bed.wait_registered().await;
    bed.change_policy().await;

    load.phase("after");
    load.wait_answered(SETTLE).await;
    let rows = load.finish().await;
    report("three-member etcd cluster", &rows);
    assert_no_failures(&rows);
}
