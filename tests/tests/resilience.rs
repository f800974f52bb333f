//! Resilience in the sidecar, on real sockets: retries (and when not to),
//! the retry budget, circuit breaking, the concurrency cap, fallback, and the
//! degraded marks a call that succeeded that way carries.

use std::time::Duration;

use harness::{App, Bed, Req, Topology, apply, degraded, eventually, metric, pooled_client, send, served_by};

/// `inference` v1 (healthy) and v2 (answers 503), `inference-lite`, and a
/// caller.
async fn bed() -> Bed {
    Topology::new()
        .instances("inference", &["v1"])
        .instances("inference", &["v2"])
        .app(App::Failing(503))
        .instances("inference-lite", &["v1"])
        .start()
        .await
}

/// A call to `inference` with a small JSON body.
async fn call(bed: &Bed, method: &str, headers: &[(&str, &str)]) -> harness::Response {
    Req::post(bed.caller.sidecar.outbound, "inference", "/run", &b"{\"prompt\":\"hi\"}"[..])
        .method(method)
        .headers(headers)
        .send()
        .await
        .unwrap()
}

fn counter(metrics: &str, name: &str, needles: &[&str]) -> f64 {
    metric(metrics, name, needles)
}

const SPLIT_WITH_RETRY: &str = "kind: Route\nservice: inference\nrules:\n  - backends:\n      - { subset: { version: v1 }, weight: 50 }\n      - { subset: { version: v2 }, weight: 50 }\n    retry: { attempts: 2, on: [5xx] }\n---\nkind: Resilience\nservice: inference\nretry_budget: { ratio: 1.0, min_per_second: 100 }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_turn_failures_into_degraded_successes_only_when_safe() {
    let bed = bed().await;
    apply(&bed.control.url(), SPLIT_WITH_RETRY).await;

    let mut retried = 0;
    for _ in 0..40 {
        let r = call(&bed, "GET", &[]).await;
        assert_eq!(r.0, 200, "a GET is retried onto the healthy instance: {r:?}");
        assert_eq!(served_by(&r), "inference/v1");
        if degraded(&r) == "retry=1" {
            retried += 1;
            let ts = r.1["tracestate"].to_str().unwrap();
            assert!(ts.starts_with("weft=retry:1"), "{ts}");
        }
    }
    // v2 gets half the first tries: Binomial(40, 0.5) is below 8 with p < 1e-4.
    assert!(retried >= 8, "only {retried} of 40 calls were retried");

    // A POST is not idempotent: no retry, the 503 reaches the caller.
    let mut failed = 0;
    for _ in 0..30 {
        let r = call(&bed, "POST", &[]).await;
        if r.0 == 503 {
            failed += 1;
            assert_eq!(degraded(&r), "", "{r:?}");
        }
    }
    assert!(failed >= 5, "POSTs should not be retried, yet {failed} of 30 failed");
    // With an idempotency-key it is retried, the key and body kept.
    for _ in 0..20 {
        let r = call(&bed, "POST", &[("idempotency-key", "k-123")]).await;
        assert_eq!(r.0, 200, "{r:?}");
        assert_eq!(r.1["echo-idempotency-key"], "k-123", "the key is kept on every try");
        assert!(r.2.contains("\"request_bytes\":15"), "body replayed whole: {}", r.2);
    }

    let m = bed.caller.sidecar.metrics().await;
    assert!(counter(&m, "weft_retries_total", &["service=\"inference\""]) >= 8.0, "{m}");
    assert!(counter(&m, "weft_requests_total", &["degraded=\"true\"", "code=\"200\""]) >= 8.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_caps_retries_during_an_outage() {
    let bed = bed().await;
    // Only the failing v2; a budget of 10 % of requests and no floor.
    apply(
        &bed.control.url(),
        "kind: Route\nservice: inference\nrules:\n  - backends: [ { subset: { version: v2 }, weight: 1 } ]\n    retry: { attempts: 3, on: [5xx] }\n---\nkind: Resilience\nservice: inference\nretry_budget: { ratio: 0.1, min_per_second: 0 }\n",
    )
    .await;
    let before = bed.instance("inference", "v2").app.mode.hits();
    for _ in 0..100 {
        let r = call(&bed, "GET", &[]).await;
        assert_eq!(r.0, 503);
    }
    let m = bed.caller.sidecar.metrics().await;
    let retries = counter(&m, "weft_retries_total", &["service=\"inference\""]);
    // Without a budget this would be 300 retries (3 per call). With it: 10 %
    // of the calls, plus at most the budget's cap (10) banked before; and
    // no fewer than the 10 % (a sidecar that never retries fails here).
    assert!((10.0..=21.0).contains(&retries), "{retries} retries for 100 calls");
    let hits = bed.instance("inference", "v2").app.mode.hits() - before;
    assert_eq!(hits as f64, 100.0 + retries, "every retry reached the app");
}

/// A gRPC stream that ends UNAVAILABLE in its trailers, after messages,
/// counts against its endpoint as a trailers-only UNAVAILABLE does; streams
/// that end OK do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_status_in_trailers_counts_for_the_breaker() {
    let bed = Topology::new().instances("inference", &["v1", "v2"]).app(App::Grpc).start().await;
    apply(
        &bed.control_url(),
        "kind: Resilience\nservice: inference\ncircuit_breaker: { consecutive_failures: 3, base_ejection: 30s, max_ejection_percent: 50 }\n",
    )
    .await;
    let caller = &bed.caller.sidecar;
    let client = harness::inference_client(caller.outbound, "http://inference").await;
    let stream = |prompt: &str| {
        let req = harness::example_pb::InferRequest { prompt: prompt.into(), tokens: 2, ..Default::default() };
        let mut client = client.clone();
        async move {
            let mut s = client.generate(req).await.unwrap().into_inner();
            let mut got = Vec::new();
            loop {
                match s.message().await {
                    Ok(Some(m)) => got.push(m.text),
                    Ok(None) => return (got, None),
                    Err(e) => return (got, Some(e)),
                }
            }
        }
    };
    let ejections = |m: &str| counter(m, "weft_breaker_ejections_total", &["service=\"inference\""]);
    for _ in 0..10 {
        let (got, err) = stream("ok").await;
        assert_eq!(got, ["ok #0", "ok #1"]);
        assert!(err.is_none(), "{err:?}");
    }
    assert_eq!(ejections(&caller.metrics().await), 0.0);
    // Twelve failing streams over two instances: one of them fails at least
    // three times in a row. The verdict is given as the trailers pass, before
    // the caller sees them.
    for _ in 0..12 {
        let (got, err) = stream("fail").await;
        assert_eq!(got, ["fail #0", "fail #1"]);
        let err = err.expect("the stream ends in an error");
        assert_eq!((err.code(), err.message()), (tonic::Code::Unavailable, "asked to fail"));
    }
    assert!(ejections(&caller.metrics().await) >= 1.0, "{}", caller.metrics().await);
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_ejects_the_failing_instance_and_fallback_answers_when_nothing_is_left() {
    let bed = bed().await;
    apply(
        &bed.control.url(),
        "kind: Route\nservice: inference\nrules:\n  - backends:\n      - { subset: { version: v1 }, weight: 50 }\n      - { subset: { version: v2 }, weight: 50 }\n    retry: { attempts: 1, on: [5xx] }\n---\nkind: Resilience\nservice: inference\ncircuit_breaker: { consecutive_failures: 3, base_ejection: 30s, max_ejection_percent: 50 }\nretry_budget: { ratio: 1.0, min_per_second: 100 }\n",
    )
    .await;
    let b = &bed;
    eventually("v2 is ejected", Duration::from_secs(20), || async move {
        let r = call(b, "GET", &[]).await;
        assert_eq!(r.0, 200, "{r:?}");
        counter(&b.caller.sidecar.metrics().await, "weft_breaker_ejections_total", &["service=\"inference\""]) >= 1.0
    })
    .await;
    // While v2 is out, every call goes straight to v1 with no retry; those the
    // 50/50 split would have sent to v2 are marked "breaker".
    let mut marked = 0;
    for _ in 0..40 {
        let r = call(&bed, "GET", &[]).await;
        assert_eq!((r.0, served_by(&r).as_str()), (200, "inference/v1"));
        match degraded(&r).as_str() {
            "breaker" => marked += 1,
            "" => {}
            other => panic!("unexpected degraded marks {other}"),
        }
    }
    assert!((5..=35).contains(&marked), "{marked} of 40 calls marked breaker, expected about half");

    // Only v2 (ejected) behind the route now, with a fallback service.
    apply(
        &bed.control.url(),
        "kind: Route\nservice: inference\nrules:\n  - match: { path_prefix: /run }\n    backends: [ { subset: { version: v2 }, weight: 1 } ]\n    fallback: { service: inference-lite }\n  - backends: [ { subset: { version: v2 }, weight: 1 } ]\n    fallback: { status: 200, body: 'cached answer' }\n",
    )
    .await;
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let tp = format!("00-{trace}-b7ad6b7169203331-01");
    for _ in 0..5 {
        let r = call(&bed, "POST", &[("traceparent", &tp)]).await;
        assert_eq!(r.0, 200, "{r:?}");
        assert_eq!(served_by(&r), "inference-lite/v1");
        assert!(degraded(&r).contains("fallback=inference-lite"), "{r:?}");
        assert!(r.1["tracestate"].to_str().unwrap().contains("fallback:inference-lite"), "{r:?}");
    }
    let r = harness::get(bed.caller.sidecar.outbound, "inference", "/other").await.unwrap();
    assert_eq!(r.0, 200);
    assert_eq!(r.2, "cached answer");
    assert!(degraded(&r).contains("fallback=static"), "{r:?}");

    // The fallback calls' trace id is listed with its reasons.
    let url = bed.control.url();
    eventually("weftctl traces lists the fallback trace", Duration::from_secs(10), || {
        let url = url.clone();
        async move {
            let out = harness::weftctl(&url, &["traces", "--degraded", "--service", "inference"], None).await;
            out.stdout.lines().any(|l| l.starts_with(trace) && l.contains("fallback=inference-lite"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_max_concurrent_requests_calls_fail_fast_as_shed() {
    let bed = bed().await;
    apply(
        &bed.control.url(),
        "kind: Route\nservice: inference\nrules:\n  - backends: [ { subset: { version: v1 }, weight: 1 } ]\n---\nkind: Resilience\nservice: inference\nmax_concurrent_requests: 2\n",
    )
    .await;
    let outbound = bed.caller.sidecar.outbound;
    let v1 = &bed.instance("inference", "v1").app;
    // The app holds every call it gets: two calls fill the cap of two...
    let before = v1.mode.hits();
    v1.mode.hang.store(true, std::sync::atomic::Ordering::Relaxed);
    let held: Vec<_> = (0..2).map(|_| tokio::spawn(harness::get(outbound, "inference", "/held"))).collect();
    eventually("both calls reach the app", Duration::from_secs(10), || async move { v1.mode.hits() == before + 2 })
        .await;
    // ...and the next ones fail at once while those two are still held: a
    // call that queued, or was admitted, would wait for the app forever.
    for _ in 0..5 {
        let r = tokio::time::timeout(Duration::from_secs(5), harness::get(outbound, "inference", "/more"))
            .await
            .expect("a call over the cap answers without waiting for the calls in flight")
            .unwrap();
        assert_eq!(r.0, 503, "{r:?}");
        assert_eq!(r.1["x-weft-error"], "overloaded");
        assert_eq!(degraded(&r), "shed");
    }
    assert_eq!(v1.mode.hits(), before + 2, "no call over the cap reached the app");
    assert!(held.iter().all(|t| !t.is_finished()), "the two calls in the cap are still in flight");
    let m = bed.caller.sidecar.metrics().await;
    assert_eq!(counter(&m, "weft_requests_total", &["code=\"503\"", "degraded=\"true\""]), 5.0, "{m}");
    // The callers give up: their calls are cancelled, the capacity is back.
    for t in held {
        t.abort();
    }
    v1.mode.heal();
    let client = pooled_client();
    eventually("capacity is back once the held calls are gone", Duration::from_secs(10), || {
        let client = client.clone();
        async move { send(&client, outbound, "inference", "/", &[]).await.is_ok_and(|r| r.0 == 200) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_faults_are_retried_or_time_out_and_degraded_calls_are_listed_by_weftctl_traces() {
    let bed = bed().await;
    apply(
        &bed.control.url(),
        r#"
kind: Route
service: inference
rules:
  - match: { path_prefix: /flaky }
    backends: [ { subset: { version: v1 }, weight: 1 } ]
    retry: { attempts: 9, on: [5xx] }
    fault: { header: x-chaos, abort: { percent: 30, status: 503 } }
  - match: { path_prefix: /slow }
    backends: [ { subset: { version: v1 }, weight: 1 } ]
    timeout: 200ms
    fault: { delay: { percent: 100, duration: 1s } }
  - backends: [ { subset: { version: v1 }, weight: 1 } ]
---
kind: Resilience
service: inference
retry_budget: { ratio: 1.0, min_per_second: 100 }
"#,
    )
    .await;
    let client = pooled_client();
    // Without the header: no fault.
    for _ in 0..10 {
        let r = send(&client, bed.caller.sidecar.outbound, "inference", "/flaky", &[]).await.unwrap();
        assert_eq!((r.0, degraded(&r).as_str()), (200, ""), "{r:?}");
    }
    // With it, 30 % of tries abort; retries turn them into successes (all ten
    // tries abort for one call in 170000).
    let mut retried_traces = Vec::new();
    for i in 0..60 {
        let trace = format!("{:032x}", 0xabc000 + i);
        let tp = format!("00-{trace}-00f067aa0ba902b7-01");
        let r = send(
            &client,
            bed.caller.sidecar.outbound,
            "inference",
            "/flaky",
            &[("x-chaos", "1"), ("traceparent", &tp)],
        )
        .await
        .unwrap();
        assert_eq!(r.0, 200, "{r:?} {}", bed.caller.sidecar.config().await);
        if degraded(&r).starts_with("retry=") {
            retried_traces.push(trace);
        }
    }
    assert!(retried_traces.len() >= 5, "only {} of 60 calls needed a retry", retried_traces.len());
    // A delay longer than the route timeout: 504, marked timeout.
    let r = send(&client, bed.caller.sidecar.outbound, "inference", "/slow", &[]).await.unwrap();
    assert_eq!(r.0, 504, "{r:?}");
    assert_eq!(degraded(&r), "timeout");

    let url = bed.control.url();
    let first = retried_traces[0].clone();
    eventually("weftctl traces lists the retried calls", Duration::from_secs(10), || {
        let (url, first) = (url.clone(), first.clone());
        async move {
            let out =
                harness::weftctl(&url, &["traces", "--degraded", "--service", "inference", "--since", "5m"], None)
                    .await;
            out.code == 0 && out.stdout.contains(&first) && out.stdout.contains("timeout")
        }
    })
    .await;
    let json = harness::weftctl(&url, &["traces", "--service", "inference", "-o", "json"], None).await;
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    let listed: Vec<&str> = v.as_array().unwrap().iter().filter_map(|c| c["trace_id"].as_str()).collect();
    for t in &retried_traces {
        assert!(listed.contains(&t.as_str()), "{t} missing from {listed:?}");
    }
    let other = harness::weftctl(&url, &["traces", "--service", "billing"], None).await;
    assert_eq!(other.stdout.lines().count(), 1, "only the header line: {other:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_prefer_their_region_and_spill_over_when_it_has_no_ready_endpoint() {
    let bed = Topology::new()
        .instance("inference", "version=east,region=east")
        .instance("inference", "version=west,region=west")
        .caller("agent", "region=east", &[])
        .start()
        .await;
    let (caller, c) = (&bed.caller.sidecar, &bed.caller.sidecar);
    let east = &bed.instance("inference", "east").app;
    let client = pooled_client();
    for _ in 0..30 {
        let r = send(&client, caller.outbound, "inference", "/", &[]).await.unwrap();
        assert_eq!(served_by(&r), "inference/east");
    }
    east.stop();
    eventually("east marked not ready", Duration::from_secs(20), || async move {
        let cfg = c.config().await;
        cfg["services"]["inference"]["endpoints"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["proxy_id"] == "inference-east" && e["ready"] == false))
    })
    .await;
    for _ in 0..10 {
        let r = send(&client, caller.outbound, "inference", "/", &[]).await.unwrap();
        assert_eq!(served_by(&r), "inference/west");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_served_while_the_control_plane_is_away_are_marked_stale_config() {
    let mut bed = bed().await;
    apply(
        &bed.control.url(),
        "kind: Route\nservice: inference\nrules:\n  - backends: [ { subset: { version: v1 }, weight: 1 } ]\n",
    )
    .await;
    let r = harness::get(bed.caller.sidecar.outbound, "inference", "/").await.unwrap();
    assert_eq!(degraded(&r), "");
    bed.control.kill().await;
    let c = &bed.caller.sidecar;
    eventually(
        "caller notices",
        Duration::from_secs(20),
        || async move { c.config().await["control_connected"] == false },
    )
    .await;
    let r = harness::get(bed.caller.sidecar.outbound, "inference", "/").await.unwrap();
    assert_eq!(r.0, 200);
    assert_eq!(degraded(&r), "stale-config");
}
