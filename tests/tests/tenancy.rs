//! Tenants as a first-class key: tenant routes, global rate limits shared out
//! across instances, concurrency isolation, and inference-token quotas.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use harness::{Bed, Topology, apply, eventually, pooled_client, send, served_by};
use http_body_util::BodyExt;

/// `inference` instances of the given versions and a caller with these
/// flags; every sidecar sees every instance (limits are shared out by the
/// number of instances).
async fn bed(versions: &[&str], caller_args: &[&str]) -> Bed {
    let bed = Topology::new().instances("inference", versions).caller("agent", "", caller_args).start().await;
    for i in bed.of("inference") {
        harness::topology::wait_ready_endpoints(&i.sidecar, "inference", versions.len()).await;
    }
    bed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_route_pins_the_tenant_to_a_canary_by_a_configurable_header() {
    let bed = bed(&["v1", "v2"], &["--tenant-header", "x-org"]).await;
    apply(
        &bed.control.url(),
        "kind: Route\nservice: inference\nrules:\n  - backends: [ { subset: { version: v1 }, weight: 1 } ]\n---\nkind: Route\nservice: inference\ntenant: acme\nrules:\n  - match: { headers: { x-model: large } }\n    backends: [ { subset: { version: v2 }, weight: 1 } ]\n  - backends: [ { subset: { version: v1 }, weight: 1 } ]\n",
    )
    .await;
    let client = pooled_client();
    for _ in 0..10 {
        let acme =
            send(&client, bed.caller.sidecar.outbound, "inference", "/", &[("x-org", "acme"), ("x-model", "large")])
                .await
                .unwrap();
        assert_eq!(served_by(&acme), "inference/v2");
        let acme_small =
            send(&client, bed.caller.sidecar.outbound, "inference", "/", &[("x-org", "acme")]).await.unwrap();
        assert_eq!(served_by(&acme_small), "inference/v1");
        let globex =
            send(&client, bed.caller.sidecar.outbound, "inference", "/", &[("x-org", "globex"), ("x-model", "large")])
                .await
                .unwrap();
        assert_eq!(served_by(&globex), "inference/v1");
        // x-tenant-id is not the tenant header of this sidecar.
        let other = send(
            &client,
            bed.caller.sidecar.outbound,
            "inference",
            "/",
            &[("x-tenant-id", "acme"), ("x-model", "large")],
        )
        .await
        .unwrap();
        assert_eq!(served_by(&other), "inference/v1");
    }
    let m = bed.caller.sidecar.metrics().await;
    assert!(m.contains("tenant=\"acme\"") && m.contains("tenant=\"globex\""), "{m}");
}

/// Offers `rate` calls per second for `secs` seconds as tenant `tenant`;
/// returns (admitted, shed).
async fn offer(outbound: std::net::SocketAddr, tenant: &'static str, rate: u64, secs: u64) -> (u64, u64) {
    let client = pooled_client();
    let ok = Arc::new(AtomicU64::new(0));
    let shed = Arc::new(AtomicU64::new(0));
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
    let mut tasks = Vec::new();
    for _ in 0..rate * secs {
        tick.tick().await;
        let (client, ok, shed) = (client.clone(), ok.clone(), shed.clone());
        tasks.push(tokio::spawn(async move {
            let r = send(&client, outbound, "inference", "/", &[("x-tenant-id", tenant)]).await.unwrap();
            match r.0 {
                200 => ok.fetch_add(1, Ordering::Relaxed),
                429 => {
                    assert_eq!(r.1["x-weft-error"], "rate-limited");
                    assert!(r.1["x-weft-degraded"].to_str().unwrap().contains("shed"), "{r:?}");
                    shed.fetch_add(1, Ordering::Relaxed)
                }
                other => panic!("unexpected status {other}: {r:?}"),
            };
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (ok.load(Ordering::Relaxed), shed.load(Ordering::Relaxed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_is_a_global_figure_shared_out_across_1_3_and_5_instances() {
    let mut bed = bed(&["v1"], &[]).await;
    apply(
        &bed.control.url(),
        "kind: TenantPolicy\ntenant: acme\nservice: inference\nrate_limit: { requests_per_second: 40, burst: 10 }\n",
    )
    .await;
    let (rate, secs, limit, burst) = (120, 4, 40.0, 10.0);
    let mut report = Vec::new();
    for target in [1usize, 3, 5] {
        while bed.of("inference").count() < target {
            bed.add("inference", "version=v1", &[]).await;
        }
        // Buckets are full again by now: globex's second of load below (and
        // starting instances) gives every acme bucket at least a second at
        // 40/s / n, more than its capacity of 10 / n.
        let started = Instant::now();
        let (ok, shed) = offer(bed.caller.sidecar.outbound, "acme", rate, secs).await;
        let elapsed = started.elapsed().as_secs_f64();
        // What a perfect limiter admits: the rate over the run plus one burst.
        let ideal = limit * elapsed + burst;
        let error = (ok as f64 - ideal) / ideal;
        report.push(format!(
            "{target} instance(s): admitted {ok} (shed {shed}) in {elapsed:.2}s, ideal {ideal:.0}, error {:+.1}%",
            error * 100.0
        ));
        assert!(error.abs() <= 0.25, "{}", report.join("; "));
        // Another tenant is not limited.
        let (other_ok, other_shed) = offer(bed.caller.sidecar.outbound, "globex", 60, 1).await;
        assert_eq!((other_ok, other_shed), (60, 0));
    }
    println!("{}", report.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_flood_does_not_hurt_another_tenant() {
    let bed = bed(&["gpu"], &[]).await;
    // A model server that runs 4 calls at once, 30 ms each.
    bed.instances[0].app.mode.set_capacity(4);
    bed.instances[0].app.mode.latency_ms.store(30, Ordering::Relaxed);
    apply(&bed.control.url(), "kind: TenantPolicy\ntenant: tenant-a\nservice: inference\nmax_concurrent_requests: 2\n")
        .await;
    let outbound = bed.caller.sidecar.outbound;
    let b_calls = |n: usize| async move {
        let client = pooled_client();
        let mut lat = Vec::new();
        let mut ok = 0;
        for _ in 0..n {
            let t = Instant::now();
            let r = send(&client, outbound, "inference", "/", &[("x-tenant-id", "tenant-b")]).await.unwrap();
            lat.push(t.elapsed());
            ok += usize::from(r.0 == 200);
        }
        lat.sort();
        (ok, lat[lat.len() / 2])
    };
    let (alone_ok, alone_p50) = b_calls(60).await;

    // Tenant A floods with 20 callers: 10 × its limit.
    let stop = Arc::new(AtomicBool::new(false));
    let (a_ok, a_shed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let flood: Vec<_> = (0..20)
        .map(|_| {
            let (stop, a_ok, a_shed) = (stop.clone(), a_ok.clone(), a_shed.clone());
            tokio::spawn(async move {
                let client = pooled_client();
                while !stop.load(Ordering::Relaxed) {
                    let r = send(&client, outbound, "inference", "/", &[("x-tenant-id", "tenant-a")]).await.unwrap();
                    match r.0 {
                        200 => a_ok.fetch_add(1, Ordering::Relaxed),
                        429 => a_shed.fetch_add(1, Ordering::Relaxed),
                        other => panic!("tenant-a got {other}"),
                    };
                }
            })
        })
        .collect();
    let a = a_shed.clone();
    eventually("tenant A is being shed", Duration::from_secs(10), || {
        let a = a.clone();
        async move { a.load(Ordering::Relaxed) > 0 }
    })
    .await;
    let app = &bed.instances[0].app;
    let queued = app.mode.queued.load(Ordering::Relaxed);
    let (flood_ok, flood_p50) = b_calls(60).await;
    // Tenant A holds at most its 2 slots and B calls one at a time: the
    // model server's 4 are never all taken, so B never waits for A. Without
    // the limit, A's 20 callers would keep the server's queue full.
    let queued_under_flood = app.mode.queued.load(Ordering::Relaxed) - queued;
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        f.await.unwrap();
    }
    println!(
        "tenant B alone: {alone_ok}/60 ok, median {alone_p50:?}; under A's flood: {flood_ok}/60 ok, median {flood_p50:?}; A admitted {}, shed {}; calls that queued at the app: {queued_under_flood}",
        a_ok.load(Ordering::Relaxed),
        a_shed.load(Ordering::Relaxed)
    );
    assert_eq!((alone_ok, flood_ok), (60, 60), "tenant B's success rate changed");
    assert_eq!(queued_under_flood, 0, "calls waited for the model server: tenant A took more than its share");
    assert!(a_ok.load(Ordering::Relaxed) > 0, "tenant A was admitted within its limit");
    let m = bed.instances[0].sidecar.metrics().await;
    assert!(
        m.contains("weft_tenant_shed_total{service=\"inference\",tenant=\"tenant-a\",reason=\"tenant-concurrency\"}"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_quota_sheds_once_the_tenants_tokens_for_the_minute_are_spent() {
    let bed = bed(&["llm"], &[]).await;
    bed.instances[0].app.mode.usage_tokens.store(30, Ordering::Relaxed);
    apply(&bed.control.url(), "kind: TenantPolicy\ntenant: acme\nservice: inference\ntokens_per_minute: 100\n---\nkind: TenantPolicy\ntenant: initech\nservice: '*'\ntokens_per_minute: 50\n---\nkind: TenantPolicy\ntenant: umbrella\nservice: '*'\ntokens_per_minute: 50\n").await;
    let client = pooled_client();
    // 30 tokens a call: 0, 30, 60, 90 used before calls 1-4; the 5th is shed.
    for i in 0..4 {
        let r = send(&client, bed.caller.sidecar.outbound, "inference", "/", &[("x-tenant-id", "acme")]).await.unwrap();
        assert_eq!(r.0, 200, "call {i}: {r:?}");
    }
    let r = send(&client, bed.caller.sidecar.outbound, "inference", "/", &[("x-tenant-id", "acme")]).await.unwrap();
    assert_eq!(r.0, 429, "{r:?}");
    assert_eq!(r.1["x-weft-error"], "token-quota");
    assert_eq!(r.1["x-weft-degraded"], "shed");
    // Other tenants are unaffected.
    let r = send(&client, bed.caller.sidecar.outbound, "inference", "/", &[("x-tenant-id", "globex")]).await.unwrap();
    assert_eq!(r.0, 200);

    // Usage reported in a trailer (HTTP/2, streamed answer) counts too.
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let r = harness::h2_send(
            bed.caller.sidecar.outbound,
            "inference",
            "/stream?chunks=2&gap_ms=1",
            &[("x-tenant-id", "initech")],
        )
        .await
        .unwrap();
        statuses.push(r.0);
    }
    // initech's '*' policy: 50 tokens; 30 per streamed call via trailer.
    assert_eq!(statuses, vec![200, 200, 429], "usage from trailers was not counted");

    // HTTP/1.1 too: a chunked answer's trailers pass through both sidecars
    // to the caller (who asked for them with `TE: trailers`) and count.
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let resp = harness::Req::get(bed.caller.sidecar.outbound, "inference", "/stream?chunks=2&gap_ms=1")
            .header("te", "trailers")
            .header("x-tenant-id", "umbrella")
            .open()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let collected = resp.into_body().collect().await.unwrap();
        if status == 200 {
            let trailers = collected.trailers().cloned().expect("the trailers reached the caller");
            assert_eq!(trailers["x-weft-usage-tokens"], "30");
            assert_eq!(String::from_utf8_lossy(&collected.to_bytes()).lines().count(), 2);
        }
        statuses.push(status);
    }
    assert_eq!(statuses, vec![200, 200, 429], "usage from HTTP/1.1 trailers was not counted");
}

/// Calls of tenant acme each inference instance shed over its concurrency.
async fn acme_sheds(bed: &Bed) -> Vec<f64> {
    let mut n = Vec::new();
    for i in bed.of("inference") {
        let m = i.sidecar.metrics().await;
        n.push(harness::metric(&m, "weft_tenant_shed_total", &["tenant=\"acme\"", "reason=\"tenant-concurrency\""]));
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_the_callee_sheds_goes_to_another_instance_and_then_to_the_fallback() {
    let bed = bed(&["a", "b"], &[]).await;
    apply(
        &bed.control_url(),
        "kind: Route\nservice: inference\nrules:\n  - backends: [ { subset: {}, weight: 1 } ]\n    fallback: { status: 200, body: busy }\n---\nkind: TenantPolicy\ntenant: acme\nservice: inference\nmax_concurrent_requests: 2\n",
    )
    .await;
    // Two instances, a share of one call each; the apps hold what they get.
    for i in bed.of("inference") {
        i.app.mode.set_capacity(0);
    }
    let outbound = bed.caller.sidecar.outbound;
    let post = move || harness::Req::post(outbound, "inference", "/run", "{}").header("x-tenant-id", "acme");
    let held: Vec<_> = (0..2)
        .map(|_| {
            let req = post();
            tokio::spawn(async move { req.send().await })
        })
        .collect();
    let queued = |b: &Bed| b.of("inference").map(|i| i.app.mode.queued.load(Ordering::Relaxed)).collect::<Vec<_>>();
    let b = &bed;
    eventually("one call held at each instance", Duration::from_secs(10), || async move { queued(b) == [1, 1] }).await;
    // The two calls were sent at once: one may have been shed by the
    // instance the other got to first, and moved on. Count from here.
    let before = acme_sheds(&bed).await;
    // A third POST (no retry policy, not idempotent): the first instance it
    // tries sheds it, it goes once to the other, which sheds it too, and the
    // fallback answers.
    let r = post().send().await.unwrap();
    assert_eq!((r.0, r.2.as_str()), (200, "busy"), "{r:?}");
    let marks = harness::degraded(&r);
    assert!(marks.contains("shed") && marks.contains("fallback=static"), "{marks}");
    let after = acme_sheds(&bed).await;
    assert_eq!(after.iter().zip(&before).map(|(a, b)| a - b).collect::<Vec<_>>(), [1.0, 1.0], "each shed it once");
    assert_eq!(queued(&bed), [1, 1], "the shed call never reached an app");
    for i in bed.of("inference") {
        i.app.mode.add_capacity(1);
    }
    for h in held {
        assert_eq!(h.await.unwrap().unwrap().0, 200);
    }
}
