//! A policy change is safe to make and to undo: diff before, history after,
//! rollback to any kept revision, and one tenant's bad resource never blocks
//! or alters another tenant's.

use std::time::Duration;

use harness::{Mesh, apply, eventually, weftctl};

fn split(v1: u32, v2: u32) -> String {
    format!(
        "kind: Route\nservice: inference\nrules:\n  - backends:\n      - {{ subset: {{ version: v1 }}, weight: {v1} }}\n      - {{ subset: {{ version: v2 }}, weight: {v2} }}\n"
    )
}

fn rev(out: &harness::CtlOutput) -> u64 {
    let line = out.stdout.lines().next().unwrap_or_default();
    line.rsplit("(rev ").next().and_then(|s| s.trim_end_matches(')').parse().ok()).unwrap_or_else(|| panic!("{out:?}"))
}

/// The weights of the caller's default inference route, as it has them.
async fn weights(mesh: &Mesh) -> Vec<u64> {
    let cfg = mesh.caller.config().await;
    cfg["services"]["inference"]["routes"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["tenant"] == ""))
        .map(|r| r["rules"][0]["backends"].as_array().unwrap().iter().map(|b| b["weight"].as_u64().unwrap()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_history_and_rollback() {
    let mesh = Mesh::start(5).await;
    let url = mesh.control_url();
    let r1 = rev(&apply(&url, &split(90, 10)).await);
    let r2 = rev(&apply(&url, &split(80, 20)).await);
    let r3 = rev(&apply(&url, &format!("{}    timeout: 2s\n", split(80, 20))).await);

    // diff: what apply would change; nothing is written.
    let mut etcd = mesh.etcd.client().await;
    let before = etcd.get("/weft/", Some(etcd_client::GetOptions::new().with_prefix())).await.unwrap();
    let d = weftctl(
        &url,
        &["diff", "-f", "-"],
        Some(&format!(
            "{}    first_byte_timeout: 5s\n    retry: {{ attempts: 1 }}\n    hedge: {{ after: p95 }}\n---\nkind: Resilience\nservice: inference\nmax_concurrent_requests: 10\n",
            split(70, 30)
        )),
    )
    .await;
    assert_eq!(d.code, 0, "{d:?}");
    // The agent-traffic fields show like any other.
    assert!(d.stdout.contains("rules[0].first_byte_timeout: + \"5s\""), "{d:?}");
    assert!(d.stdout.contains("rules[0].hedge: + {\"after\":\"p95\"}"), "{d:?}");
    assert!(d.stdout.contains("route/inference would be configured:"), "{d:?}");
    assert!(d.stdout.contains("rules[0].backends[0].weight: 80 → 70"), "{d:?}");
    assert!(d.stdout.contains("rules[0].timeout: - \"2s\""), "{d:?}");
    assert!(d.stdout.contains("resilience/inference would be created"), "{d:?}");
    let after = etcd.get("/weft/", Some(etcd_client::GetOptions::new().with_prefix())).await.unwrap();
    assert_eq!(after.header().unwrap().revision(), before.header().unwrap().revision(), "diff wrote to etcd");

    // history: newest first, with time and a one-line diff.
    let h = weftctl(&url, &["history", "route", "inference"], None).await;
    assert_eq!(h.code, 0, "{h:?}");
    let lines: Vec<&str> = h.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{h:?}");
    assert!(
        lines[1].trim_start().starts_with(&r3.to_string()) && lines[1].contains("rules[0].timeout: + \"2s\""),
        "{h:?}"
    );
    assert!(lines[2].trim_start().starts_with(&r2.to_string()) && lines[2].contains("weight: 90 → 80"), "{h:?}");
    assert!(lines[3].trim_start().starts_with(&r1.to_string()) && lines[3].ends_with("created"), "{h:?}");
    assert!(lines[3].contains("20"), "applied time shown: {h:?}");

    // rollback: r1's content as a new revision, pushed to the sidecars.
    let rb = weftctl(&url, &["rollback", "route", "inference", "--to", &r1.to_string(), "--wait"], None).await;
    assert_eq!(rb.code, 0, "{rb:?}");
    assert!(rb.stdout.contains(&format!("route/inference rolled back to rev {r1}")), "{rb:?}");
    assert!(rb.stdout.contains("ACKed"), "{rb:?}");
    assert_eq!(weights(&mesh).await, vec![90, 10]);
    let h = weftctl(&url, &["history", "route", "inference"], None).await;
    assert!(h.stdout.lines().nth(1).unwrap().contains("weight: 80 → 90"), "{h:?}");

    // A revision where the resource did not exist yet.
    let bad = weftctl(&url, &["rollback", "route", "inference", "--to", "1"], None).await;
    assert_eq!(bad.code, 1, "{bad:?}");
    assert!(bad.stderr.contains("did not exist at revision 1"), "{bad:?}");
    let missing = weftctl(&url, &["history", "route", "nosuch"], None).await;
    assert_eq!(missing.code, 1);
    assert!(missing.stderr.contains("route/nosuch not found"), "{missing:?}");

    // etcd compacts: history stops at what is left and says so; a rollback
    // to a compacted revision is refused, naming it.
    let now = etcd.get("/weft/", None).await.unwrap().header().unwrap().revision();
    etcd.compact(now, None).await.unwrap();
    let h = weftctl(&url, &["history", "route", "inference"], None).await;
    assert_eq!(h.code, 0, "{h:?}");
    let lines: Vec<&str> = h.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "only the revision in force is left: {h:?}");
    assert!(lines[1].ends_with("(older revisions compacted)"), "{h:?}");
    let gone = weftctl(&url, &["rollback", "route", "inference", "--to", &r2.to_string()], None).await;
    assert_eq!(gone.code, 1, "{gone:?}");
    assert!(gone.stderr.contains(&format!("revision {r2} of route/inference was compacted away")), "{gone:?}");
    assert_eq!(weights(&mesh).await, vec![90, 10], "nothing changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_bad_resource_never_blocks_or_alters_another_tenants() {
    let mesh = Mesh::start(5).await;
    let url = mesh.control_url();
    let tenant_route = |t: &str, v: &str| {
        format!(
            "kind: Route\nservice: inference\ntenant: {t}\nrules:\n  - backends: [ {{ subset: {{ version: {v} }}, weight: 1 }} ]\n"
        )
    };
    let acme_rev = rev(&apply(&url, &tenant_route("acme", "v1")).await);
    apply(&url, &tenant_route("globex", "v1")).await;

    // globex's bad file is rejected; acme's route is untouched.
    let out =
        weftctl(&url, &["apply", "-f", "-"], Some(&tenant_route("globex", "v1").replace("weight: 1", "weight: 0")))
            .await;
    assert_eq!(out.code, 1, "{out:?}");
    let acme = weftctl(&url, &["get", "route", "inference/acme"], None).await;
    assert!(acme.stdout.contains(&acme_rev.to_string()), "{acme:?}");

    // One etcd transaction with a bad globex route (written around weftctl)
    // and a good acme change: acme's applies everywhere; the control plane
    // refuses globex's, which keeps its last good route, and names globex
    // only.
    let mut etcd = mesh.etcd.client().await;
    let good = r#"{"schema":1,"resource":{"kind":"Route","service":"inference","tenant":"acme","rules":[{"backends":[{"subset":{"version":"v2"},"weight":1}]}]}}"#;
    let bad = r#"{"schema":1,"resource":{"kind":"Route","service":"inference","tenant":"globex","rules":[{"backends":[{"subset":{"version":"v2"},"weight":0}]}]}}"#;
    let txn = etcd_client::Txn::new().and_then(vec![
        etcd_client::TxnOp::put("/weft/routes/inference/acme", good, None),
        etcd_client::TxnOp::put("/weft/routes/inference/globex", bad, None),
    ]);
    let new_rev = etcd.txn(txn).await.unwrap().header().unwrap().revision() as u64;
    let caller = &mesh.caller;
    eventually("acme's change applies at the caller", Duration::from_secs(20), || async move {
        caller.route_revision("inference", "acme").await == Some(new_rev)
    })
    .await;
    let status = weftctl(&url, &["status"], None).await;
    assert!(status.stdout.contains(&format!("REJECTED route/inference/globex (rev {new_rev})")), "{status:?}");
    assert!(!status.stdout.contains("REJECTED route/inference/acme"), "{status:?}");
    assert!(caller.route_revision("inference", "globex").await.unwrap() < new_rev);
    for _ in 0..10 {
        let a = harness::request(caller.outbound, "inference", "/", &[("x-tenant-id", "acme")]).await.unwrap();
        assert_eq!(harness::served_by(&a), "inference/v2");
        let g = harness::request(caller.outbound, "inference", "/", &[("x-tenant-id", "globex")]).await.unwrap();
        assert_eq!(harness::served_by(&g), "inference/v1");
    }
}
