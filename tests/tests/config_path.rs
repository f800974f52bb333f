//! The config path: weftctl → etcd → control plane → sidecars, and what
//! happens when parts of it fail.

use std::time::{Duration, Instant};

use harness::{Control, Etcd, Mesh, Sidecar, apply, eventually, get, pooled_client, send, served_by, signal, weftctl};

const ALL_V1: &str =
    "kind: Route\nservice: inference\nrules:\n  - backends: [ { subset: { version: v1 }, weight: 1 } ]\n";
const ALL_V2: &str =
    "kind: Route\nservice: inference\nrules:\n  - backends: [ { subset: { version: v2 }, weight: 1 } ]\n";

/// The revision printed by `weftctl apply`.
fn applied_rev(out: &harness::CtlOutput) -> u64 {
    let line = out.stdout.lines().next().unwrap_or_default();
    line.rsplit("(rev ")
        .next()
        .and_then(|s| s.trim_end_matches(')').parse().ok())
        .unwrap_or_else(|| panic!("no revision in {out:?}"))
}

/// Waits until `weftctl endpoints inference` lists v1 and no longer v2.
async fn v2_leaves_endpoints(url: &str, how: &str, within: Duration) {
    eventually(&format!("weftctl endpoints drops the {how} sidecar"), within, || async move {
        let out = weftctl(url, &["endpoints", "inference"], None).await;
        out.code == 0 && !out.stdout.contains("inference-v2") && out.stdout.contains("inference-v1")
    })
    .await;
}

async fn all_served_by(mesh: &Mesh, n: usize, want: &str) {
    let client = pooled_client();
    for _ in 0..n {
        let r = send(&client, mesh.caller.outbound, "inference", "/", &[]).await.unwrap();
        assert_eq!(served_by(&r), want, "{r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_change_reaches_every_subscribed_proxy_and_in_flight_requests_complete() {
    let mesh = Mesh::start(5).await;
    apply(&mesh.control_url(), ALL_V1).await;
    all_served_by(&mesh, 10, "inference/v1").await;

    // Slow requests in flight on v1 while the route moves to v2.
    let outbound = mesh.caller.outbound;
    let in_flight: Vec<_> =
        (0..8).map(|_| tokio::spawn(async move { get(outbound, "inference", "/?sleep_ms=1500").await })).collect();
    let out = apply(&mesh.control_url(), ALL_V2).await;
    let rev = applied_rev(&out);
    assert!(out.stdout.contains("3 sidecar(s) ACKed"), "{out:?}");
    for s in [&mesh.caller, &mesh.inf_v1, &mesh.inf_v2] {
        assert_eq!(s.route_revision("inference", "").await, Some(rev), "sidecar {}", s.id);
    }
    all_served_by(&mesh, 10, "inference/v2").await;
    for t in in_flight {
        let r = t.await.unwrap().expect("in-flight request survived the config change");
        assert_eq!(r.0, 200);
        assert_eq!(served_by(&r), "inference/v1");
    }

    // A sidecar that never called inference did not receive it.
    let other_app = harness::Backend::http("billing", "v1").await;
    let billing = Sidecar::start(&[mesh.control_url()], "billing", "", other_app.addr, "billing-1").await;
    let cfg = billing.config().await;
    assert!(cfg["services"].get("inference").is_none(), "billing got inference's config: {cfg}");
    assert!(cfg["services"].get("billing").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_sidecar_leaves_endpoints_and_pools_within_lease_ttl() {
    let ttl = 2;
    let mut mesh = Mesh::start(ttl).await;
    let url = mesh.control_url();
    let listed = weftctl(&url, &["endpoints", "inference"], None).await;
    assert!(listed.stdout.contains("inference-v2") && listed.stdout.contains("inference-v1"), "{listed:?}");

    let killed_at = Instant::now();
    mesh.inf_v2.kill().await;
    v2_leaves_endpoints(&url, "killed", Duration::from_secs(ttl as u64 + 3)).await;
    let caller = &mesh.caller;
    eventually("the caller's pool drops it", Duration::from_secs(ttl as u64 + 3), || async move {
        caller.endpoint_addrs("inference").await.len() == 1
    })
    .await;
    println!("endpoint gone from callers {:?} after SIGKILL", killed_at.elapsed());
    all_served_by(&mesh, 20, "inference/v1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_lease_per_replica_and_a_frozen_sidecar_leaves_endpoints_until_it_wakes() {
    let ttl = 2;
    let mesh = Mesh::start(ttl).await;
    let url = mesh.control_url();
    // All three sidecars' records hang on the replica's one lease.
    let mut etcd = mesh.etcd.client().await;
    let opts = etcd_client::GetOptions::new().with_prefix();
    let kvs = etcd.get("/weft/endpoints/", Some(opts)).await.unwrap();
    let leases: std::collections::BTreeSet<i64> = kvs.kvs().iter().map(|kv| kv.lease()).collect();
    assert_eq!(kvs.kvs().len(), 3, "{kvs:?}");
    assert_eq!(leases.len(), 1, "one lease for all endpoints: {leases:?}");
    assert_ne!(leases.first(), Some(&0), "the endpoints are leased");
    assert_eq!(etcd.leases().await.unwrap().leases().len(), 1);

    // A frozen sidecar keeps its TCP connection open; its stream is caught
    // by unanswered HTTP/2 pings and its records deleted.
    let pid = mesh.inf_v2.pid();
    let frozen_at = Instant::now();
    signal(pid, "STOP");
    v2_leaves_endpoints(&url, "frozen", Duration::from_secs(ttl as u64 + 6)).await;
    let caller = &mesh.caller;
    eventually("the caller's pool drops it", Duration::from_secs(5), || async move {
        caller.endpoint_addrs("inference").await.len() == 1
    })
    .await;
    println!("frozen sidecar's endpoint gone after {:?}", frozen_at.elapsed());
    all_served_by(&mesh, 10, "inference/v1").await;

    signal(pid, "CONT");
    eventually("the woken sidecar registers again", Duration::from_secs(20), || async move {
        caller.endpoint_addrs("inference").await.len() == 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_sidecars_are_registered_and_a_replica_lease_etcd_dropped_is_replaced() {
    let mut etcd = Etcd::start().await;
    etcd.kill().await;
    let control = Control::start_unready(&etcd, 3).await;
    let (code, body) = get(control.admin, "localhost", "/ready").await.map(|r| (r.0, r.2)).unwrap();
    assert_eq!(code, 503, "{body}");
    etcd.restart().await;
    control.wait_ready().await;
    let app = harness::Backend::http("inference", "v1").await;
    let sidecar = Sidecar::start(&[control.url()], "inference", "version=v1", app.addr, "early-v1").await;
    let admin = sidecar.admin;
    eventually("the sidecar is ready", Duration::from_secs(10), || async move {
        matches!(get(admin, "localhost", "/ready").await, Ok((200, _, _)))
    })
    .await;
    // A sidecar that has its config is registered: no waiting here.
    let url = control.url();
    let out = weftctl(&url, &["endpoints", "inference"], None).await;
    assert!(out.stdout.contains("early-v1"), "{out:?}");

    // etcd loses the replica's lease (as after an outage longer than the
    // TTL): the records go with it; the replica takes a new lease and its
    // sidecars register again.
    let mut client = etcd.client().await;
    let leases = client.leases().await.unwrap();
    assert_eq!(leases.leases().len(), 1);
    let old = leases.leases()[0].id();
    client.lease_revoke(old).await.unwrap();
    let out = weftctl(&url, &["endpoints", "inference"], None).await;
    assert!(!out.stdout.contains("early-v1"), "the records went with the lease: {out:?}");
    eventually("the sidecar is registered under a new lease", Duration::from_secs(10), || {
        let url = url.clone();
        async move { weftctl(&url, &["endpoints", "inference"], None).await.stdout.contains("early-v1") }
    })
    .await;
    let leases = client.leases().await.unwrap();
    assert!(leases.leases().iter().all(|l| l.id() != old), "{leases:?}");
    let control = &control;
    eventually("the new grant is counted", Duration::from_secs(5), || async move {
        control.metrics().await.contains("weft_control_lease_grants_total 2")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_sidecar_spares_a_newer_registration_of_it() {
    use weft_control::store::{EndpointRecord, ProxyRecord, Removal, Store};
    let etcd = Etcd::start().await;
    let store = Store::connect(&[etcd.url()], "/weft").await.unwrap();
    let lease = store.grant_lease(30).await.unwrap();
    let ep = EndpointRecord {
        schema: 1,
        proxy_id: "p1".into(),
        service: "inference".into(),
        address: "127.0.0.1:1".into(),
        labels: Default::default(),
        ready: true,
        mtls: false,
    };
    let proxy = ProxyRecord { schema: 1, proxy_id: "p1".into(), service: "inference".into(), ..Default::default() };
    let old = store.put_endpoint(&ep, lease).await.unwrap();
    store.put_proxy(&proxy, lease).await.unwrap();
    // The sidecar registered again (a new session) before the old one's
    // removal ran: the removal leaves both records alone.
    let new = store.put_endpoint(&ep, lease).await.unwrap();
    assert!(new > old);
    let removal = |endpoint_rev| Removal { service: "inference".into(), proxy_id: "p1".into(), endpoint_rev, lease };
    assert!(!store.remove_instance(&removal(old)).await.unwrap());
    let mut etcd_client = etcd.client().await;
    let count = |c: etcd_client::GetResponse| c.kvs().len();
    assert_eq!(count(etcd_client.get("/weft/endpoints/inference/p1", None).await.unwrap()), 1);
    assert_eq!(count(etcd_client.get("/weft/proxies/p1", None).await.unwrap()), 1);
    assert_eq!(count(etcd_client.get("/weft/departed/inference/p1", None).await.unwrap()), 0);
    // The current session's removal deletes both and marks the sidecar
    // departed; registering again clears the mark.
    assert!(store.remove_instance(&removal(new)).await.unwrap());
    assert_eq!(count(etcd_client.get("/weft/endpoints/inference/p1", None).await.unwrap()), 0);
    assert_eq!(count(etcd_client.get("/weft/proxies/p1", None).await.unwrap()), 0);
    assert_eq!(count(etcd_client.get("/weft/departed/inference/p1", None).await.unwrap()), 1);
    let regs = store.register_many(&[(ep.clone(), proxy.clone(), lease)]).await;
    assert!(regs[0].is_ok(), "{regs:?}");
    assert_eq!(count(etcd_client.get("/weft/departed/inference/p1", None).await.unwrap()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_control_plane_down_traffic_flows_and_proxies_resync_after_restart() {
    let mut mesh = Mesh::start(10).await;
    apply(&mesh.control_url(), ALL_V1).await;
    mesh.control.kill().await;
    let caller = &mesh.caller;
    eventually("caller notices the control plane is gone", Duration::from_secs(20), || async move {
        caller.config().await["control_connected"] == false
    })
    .await;
    all_served_by(&mesh, 20, "inference/v1").await;
    let ready = get(mesh.caller.admin, "localhost", "/ready").await.unwrap();
    assert_eq!(ready.0, 200, "a sidecar with a last good config stays ready: {ready:?}");

    // A change made while the control plane is down (straight into etcd).
    let mut etcd = mesh.etcd.client().await;
    let value = r#"{"schema":1,"resource":{"kind":"Route","service":"inference","rules":[{"backends":[{"subset":{"version":"v2"},"weight":1}]}]}}"#;
    let put = etcd.put("/weft/routes/inference", value, None).await.unwrap();
    let rev = put.header().unwrap().revision() as u64;

    mesh.control.restart().await;
    for s in [&mesh.caller, &mesh.inf_v1, &mesh.inf_v2] {
        eventually(&format!("{} resyncs to rev {rev}", s.id), Duration::from_secs(20), || async move {
            s.route_revision("inference", "").await == Some(rev)
        })
        .await;
    }
    all_served_by(&mesh, 10, "inference/v2").await;
    // Sidecars registered again with the new process.
    let out = weftctl(&mesh.control_url(), &["endpoints", "inference"], None).await;
    assert_eq!(out.stdout.lines().count(), 3, "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_serve_one_mesh_and_sidecars_fail_over() {
    let etcd = Etcd::start().await;
    let mut a = Control::start_named(&etcd, 5, "replica-a").await;
    let b = Control::start_named(&etcd, 5, "replica-b").await;
    let urls = [a.url(), b.url()];
    let v1 = harness::Backend::http("inference", "v1").await;
    let v2 = harness::Backend::http("inference", "v2").await;
    let app = harness::Backend::http("caller", "v1").await;
    let (s1, s2, caller) = tokio::join!(
        Sidecar::start(&urls, "inference", "version=v1", v1.addr, "r-inf-v1"),
        Sidecar::start(&urls, "inference", "version=v2", v2.addr, "r-inf-v2"),
        Sidecar::start(&urls, "caller", "", app.addr, "r-caller"),
    );
    let _ = get(caller.outbound, "inference", "/").await;
    // Applied through B, seen by sidecars connected to A.
    let out = apply(&b.url(), ALL_V2).await;
    assert!(out.stdout.contains("3 sidecar(s) ACKed"), "{out:?}");
    let status = weftctl(&b.url(), &["status", "-o", "json"], None).await;
    assert!(status.stdout.contains("replica-a"), "{status:?}");
    for _ in 0..10 {
        assert_eq!(served_by(&get(caller.outbound, "inference", "/").await.unwrap()), "inference/v2");
    }

    a.kill().await;
    let burl = b.url();
    eventually("all sidecars move to replica B", Duration::from_secs(20), || {
        let burl = burl.clone();
        async move {
            let out = weftctl(&burl, &["status", "-o", "json"], None).await;
            let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
            v.as_array().is_some_and(|a| a.len() == 3 && a.iter().all(|p| p["control"] == "replica-b"))
        }
    })
    .await;
    let out = apply(&b.url(), ALL_V1).await;
    assert!(out.stdout.contains("3 sidecar(s) ACKed"), "{out:?}");
    for _ in 0..10 {
        assert_eq!(served_by(&get(caller.outbound, "inference", "/").await.unwrap()), "inference/v1");
    }
    drop((s1, s2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_policy_is_rejected_by_validate_and_apply_and_etcd_is_untouched() {
    let etcd = Etcd::start().await;
    let control = Control::start(&etcd, 5).await;
    let bad = "kind: Route\nservice: inference\nrules:\n  - backends:\n      - { subset: { version: v1 }, weight: 0 }\n---\nkind: Resilience\nservice: inference\ncircuit_breaker: { consecutive_failures: 5, base_ejection: 10 }\nbogus: 1\n";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, bad).unwrap();
    let file = file.to_str().unwrap();

    let v = weftctl("http://127.0.0.1:1", &["validate", "-f", file], None).await;
    assert_eq!(v.code, 1, "{v:?}");
    assert!(v.stderr.contains(&format!("{file}:4: route/inference: rules[0].backends: weights sum to 0")), "{v:?}");
    assert!(v.stderr.contains(&format!("{file}:10: resilience/inference: bogus: unknown field `bogus`")), "{v:?}");

    let mut client = etcd.client().await;
    let before = client.get("/weft/", Some(etcd_client::GetOptions::new().with_prefix())).await.unwrap();
    let before_rev = before.header().unwrap().revision();

    let a = weftctl(&control.url(), &["apply", "-f", file], None).await;
    assert_eq!(a.code, 1, "{a:?}");
    assert!(a.stderr.contains("weights sum to 0"), "{a:?}");
    // A good document next to a bad one is not applied either: all or nothing.
    let mixed = format!("{ALL_V1}---\nkind: Route\nservice: other\nrules: []\n");
    let a = weftctl(&control.url(), &["apply", "-f", "-"], Some(&mixed)).await;
    assert_eq!(a.code, 1, "{a:?}");
    assert!(a.stderr.contains("<stdin>:8: route/other: rules: a route needs at least one rule"), "{a:?}");

    // The control plane checks too, whatever the client sent.
    let ch = tonic::transport::Endpoint::from_shared(control.url()).unwrap().connect().await.unwrap();
    let mut admin = xds_proto::v1::admin_client::AdminClient::new(ch);
    let err = admin
        .apply(xds_proto::v1::ApplyRequest {
            resources: vec![xds_proto::v1::ResourceDoc {
                json: r#"{"kind":"Route","service":"inference","rules":[{"backends":[{"weight":0}]}]}"#.into(),
                origin: "raw:1".into(),
            }],
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("raw:1: route/inference: rules[0].backends: weights sum to 0"), "{err:?}");

    let after = client.get("/weft/", Some(etcd_client::GetOptions::new().with_prefix())).await.unwrap();
    assert_eq!(after.header().unwrap().revision(), before_rev, "etcd was written to");
    assert_eq!(after.kvs().len(), before.kvs().len());

    // No control plane: exit 2.
    let down = weftctl("http://127.0.0.1:1", &["apply", "-f", "-"], Some(ALL_V1)).await;
    assert_eq!(down.code, 2, "{down:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_resource_that_breaks_the_rules_is_refused_and_the_last_good_one_stays() {
    let mesh = Mesh::start(5).await;
    let out = apply(&mesh.control_url(), ALL_V2).await;
    let good_rev = applied_rev(&out);
    // Written around weftctl: weights that sum to 0.
    let mut etcd = mesh.etcd.client().await;
    let bad = r#"{"schema":1,"resource":{"kind":"Route","service":"inference","rules":[{"backends":[{"subset":{"version":"v1"},"weight":0}]}]}}"#;
    let bad_rev = etcd.put("/weft/routes/inference", bad, None).await.unwrap().header().unwrap().revision();

    let url = mesh.control_url();
    let want = format!("REJECTED route/inference (rev {bad_rev}): rules[0].backends: weights sum to 0");
    eventually("status lists the refused route", Duration::from_secs(20), || {
        let (url, want) = (url.clone(), want.clone());
        async move { weftctl(&url, &["status"], None).await.stdout.contains(&want) }
    })
    .await;
    for s in [&mesh.caller, &mesh.inf_v1, &mesh.inf_v2] {
        assert_eq!(s.route_revision("inference", "").await, Some(good_rev), "{} left its last good route", s.id);
        assert_eq!(s.config().await["last_nack"], serde_json::Value::Null, "{}: nothing reached it to NACK", s.id);
    }
    all_served_by(&mesh, 20, "inference/v2").await;
    let m = mesh.control.metrics().await;
    assert!(m.contains("weft_control_rejected_resources_total 1"), "{m}");

    // A good update after the bad one applies, is ACKed, and clears the refusal.
    let out = apply(&mesh.control_url(), ALL_V1).await;
    assert!(out.stdout.contains("3 sidecar(s) ACKed"), "{out:?}");
    all_served_by(&mesh, 10, "inference/v1").await;
    let status = weftctl(&url, &["status"], None).await;
    assert!(!status.stdout.contains("REJECTED"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_compaction_does_not_break_the_watch() {
    let mut mesh = Mesh::start(10).await;
    apply(&mesh.control_url(), ALL_V1).await;
    // Live compaction with the watch caught up.
    let mut etcd = mesh.etcd.client().await;
    let rev = etcd.get("/weft/", None).await.unwrap().header().unwrap().revision();
    etcd.compact(rev, None).await.unwrap();
    apply(&mesh.control_url(), ALL_V2).await;
    all_served_by(&mesh, 5, "inference/v2").await;

    // The hard case: the control plane resumes from a revision that has been
    // compacted away. Freeze it, restart etcd, change and compact, thaw it.
    let pid = mesh.control.pid();
    signal(pid, "STOP");
    mesh.etcd.restart().await;
    let mut etcd = mesh.etcd.client().await;
    let value = r#"{"schema":1,"resource":{"kind":"Route","service":"inference","rules":[{"backends":[{"subset":{"version":"v1"},"weight":1}]}]}}"#;
    let put = etcd.put("/weft/routes/inference", value, None).await.unwrap();
    let rev = put.header().unwrap().revision();
    etcd.put("/weft/unrelated", "x", None).await.unwrap();
    etcd.compact(rev + 1, None).await.unwrap();
    signal(pid, "CONT");

    let caller = &mesh.caller;
    eventually("the caller gets the change made during the freeze", Duration::from_secs(30), || async move {
        caller.route_revision("inference", "").await == Some(rev as u64)
    })
    .await;
    let control = &mesh.control;
    eventually("the control plane counted a compaction resync", Duration::from_secs(10), || async move {
        control.metrics().await.contains("weft_control_resyncs_total{reason=\"compacted\"} 1")
    })
    .await;
    all_served_by(&mesh, 5, "inference/v1").await;
    // And the watch keeps working after the resync.
    let out = apply(&mesh.control_url(), ALL_V2).await;
    assert!(out.stdout.contains("ACKed"), "{out:?}");
    all_served_by(&mesh, 5, "inference/v2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_delete_resources() {
    let etcd = Etcd::start().await;
    let control = Control::start(&etcd, 5).await;
    let url = control.url();
    let policy = format!(
        "{ALL_V1}---\nkind: Route\nservice: inference\ntenant: acme\nrules:\n  - backends: [ {{ subset: {{ version: v2 }}, weight: 1 }} ]\n---\nkind: TenantPolicy\ntenant: acme\nservice: '*'\nmax_concurrent_requests: 10\n"
    );
    let out = weftctl(&url, &["apply", "-f", "-"], Some(&policy)).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout.lines().filter(|l| l.contains(" created (rev ")).count(), 3, "{out:?}");

    let table = weftctl(&url, &["get", "route"], None).await;
    assert!(table.stdout.contains("route/inference ") && table.stdout.contains("route/inference/acme"), "{table:?}");
    let acme = weftctl(&url, &["get", "route", "--tenant", "acme", "-o", "json"], None).await;
    let v: serde_json::Value = serde_json::from_str(&acme.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1, "{acme:?}");
    assert_eq!(v[0]["tenant"], "acme");
    let yaml = weftctl(&url, &["get", "route", "inference", "-o", "yaml"], None).await;
    assert!(yaml.stdout.starts_with("kind: Route"), "{yaml:?}");
    // What `get -o yaml` prints can be applied again unchanged.
    let again = weftctl(&url, &["apply", "-f", "-"], Some(&yaml.stdout)).await;
    assert!(again.stdout.contains("route/inference unchanged"), "{again:?}");
    let tp = weftctl(&url, &["get", "tenantpolicy", "acme/*"], None).await;
    assert!(tp.stdout.contains("tenantpolicy/acme/*"), "{tp:?}");

    let del = weftctl(&url, &["delete", "route", "inference/acme"], None).await;
    assert_eq!(del.code, 0, "{del:?}");
    assert!(del.stdout.starts_with("route/inference/acme deleted (rev "), "{del:?}");
    let gone = weftctl(&url, &["get", "route", "inference/acme"], None).await;
    assert_eq!(gone.code, 1, "{gone:?}");
    assert!(gone.stderr.contains("route/inference/acme not found"), "{gone:?}");
    let bad = weftctl(&url, &["get", "widget"], None).await;
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("unknown kind 'widget'"), "{bad:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_wait_names_the_sidecars_that_have_not_acked() {
    // A lease TTL of 10 s: the control plane notices a frozen sidecar's
    // stream only after 3.3 s of unanswered pings, long after the wait below.
    let mesh = Mesh::start(10).await;
    let url = mesh.control_url();
    let pid = mesh.inf_v2.pid();
    signal(pid, "STOP");
    let out = weftctl(&url, &["apply", "-f", "-", "--wait", "--timeout", "1s"], Some(ALL_V2)).await;
    signal(pid, "CONT");
    assert_eq!(out.code, 1, "{out:?}");
    let rev = applied_rev(&out);
    let want = format!("inference-v2 (inference) has not ACKed rev {rev}");
    assert!(out.stderr.contains(&want), "{out:?}");
    assert!(!out.stderr.contains("inference-v1"), "the sidecars that ACKed are not named: {out:?}");
    // Awake, it catches up; the next wait succeeds.
    let out = apply(&url, ALL_V1).await;
    assert!(out.stdout.contains("3 sidecar(s) ACKed"), "{out:?}");
}
