//! Resilience in the sidecar, on real sockets: retries (and when not to),
//! the retry budget, circuit breaking, the concurrency cap, fallback, and the
//! degraded marks a call that succeeded that way carries.

use std::time::Duration;

use harness::{Backend, Control, Etcd, Sidecar, apply, eventually, pooled_client, send, served_by};

/// etcd, a control plane, `inference` v1 (healthy) and v2 (answers 503),
/// `inference-lite`, and a caller sidecar.
struct Bed {
    _etcd: Etcd,
    control: Control,
    _apps: Vec<Backend>,
    _sidecars: Vec<Sidecar>,
    caller: Sidecar,
}

impl Bed {
    async fn start() -> Bed {
        let etcd = Etcd::start().await;
        let control = Control::start(&etcd, 5).await;
        let urls = [control.url()];
        let v1 = Backend::http("inference", "v1").await;
        let v2 = Backend::failing("inference", "v2", 503).await;
        let lite = Backend::http("inference-lite", "v1").await;
        let app = Backend::http("agent", "v1").await;
        let (s1, s2, s3, caller) = tokio::join!(
            Sidecar::start(&urls, "inference", "version=v1", v1.addr, "res-v1"),
            Sidecar::start(&urls, "inference", "version=v2", v2.addr, "res-v2"),
            Sidecar::start(&urls, "inference-lite", "version=v1", lite.addr, "res-lite"),
            Sidecar::start(&urls, "agent", "", app.addr, "res-agent"),
        );
        let _ = send(&pooled_client(), caller.outbound, "inference", "/", &[]).await;
        let _ = send(&pooled_client(), caller.outbound, "inference-lite", "/", &[]).await;
        let c = &caller;
        eventually("caller sees inference v1 and v2", Duration::from_secs(20), || async move {
            c.endpoint_addrs("inference").await.len() == 2 && c.endpoint_addrs("inference-lite").await.len() == 1
        })
        .await;
        Bed { _etcd: etcd, control, _apps: vec![v1, v2, lite, app], _sidecars: vec![s1, s2, s3], caller }
    }

    async fn call(&self, method: &str, headers: &[(&str, &str)]) -> harness::Response {
        let client = pooled_client();
        let mut b = http::Request::builder()
            .method(method)
            .uri(format!("http://{}/run", self.caller.outbound))
            .header("host", "inference");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(http_body_util::Full::new(bytes::Bytes::from_static(b"{\"prompt\":\"hi\"}"))).unwrap();
        let resp = client.request(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let body = http_body_util::BodyExt::collect(body).await.unwrap().to_bytes();
        (parts.status.as_u16(), parts.headers, String::from_utf8_lossy(&body).into())
    }
}

fn degraded(r: &harness::Response) -> String {
    r.1.get("x-weft-degraded").and_then(|v| v.to_str().ok()).unwrap_or("").to_string()
}

/// The value of a Prometheus counter line that contains every `needle`.
fn counter(metrics: &str, name: &str, needles: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

const SPLIT_WITH_RETRY: &str = "kind: Route\nservice: inference\nrules:\n  - backends:\n      - { subset: { version: v1 }, weight: 50 }\n      - { subset: { version: v2 }, weight: 50 }\n    retry: { attempts: 2, on: [5xx] }\n---\nkind: Resilience\nservice: inference\nretry_budget: { ratio: 1.0, min_per_second: 100 }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_turn_failures_into_degraded_successes_only_when_safe() {
    let bed = Bed::start().await;
    apply(&bed.control.url(), SPLIT_WITH_RETRY).await;

    let mut retried = 0;
    for _ in 0..40 {
        let r = bed.call("GET", &[]).await;
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
        let r = bed.call("POST", &[]).await;
        if r.0 == 503 {
            failed += 1;
            assert_eq!(degraded(&r), "", "{r:?}");
        }
    }
    assert!(failed >= 5, "POSTs should not be retried, yet {failed} of 30 failed");
    // With an idempotency-key it is retried, the key and body kept.
    for _ in 0..20 {
        let r = bed.call("POST", &[("idempotency-key", "k-123")]).await;
        assert_eq!(r.0, 200, "{r:?}");
        assert_eq!(r.1["echo-idempotency-key"], "k-123", "the key is kept on every try");
        assert!(r.2.contains("\"request_bytes\":15"), "body replayed whole: {}", r.2);
    }

    let m = bed.caller.metrics().await;
    assert!(counter(&m, "weft_retries_total", &["service=\"inference\""]) >= 8.0, "{m}");
    assert!(counter(&m, "weft_requests_total", &["degraded=\"true\"", "code=\"200\""]) >= 8.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_caps_retries_during_an_outage() {
    let bed = Bed::start().await;
    // Only the failing v2; a budget of 10 % of requests and no floor.
    apply(
        &bed.control.url(),
        "kind: Route\nservice: inference\nrules:\n  - backends: [ { subset: { version: v2 }, weight: 1 } ]\n    retry: { attempts: 3, on: [5xx] }\n---\nkind: Resilience\nservice: inference\nretry_budget: { ratio: 0.1, min_per_second: 0 }\n",
    )
    .await;
    for _ in 0..100 {
        let r = bed.call("GET", &[]).await;
        assert_eq!(r.0, 503);
    }
    let m = bed.caller.metrics().await;
    let retries = counter(&m, "weft_retries_total", &["service=\"inference\""]);
    // Without a budget this would be 300 retries (3 per call). With it: 10 %
    // of the calls, plus at most the budget's cap (10) banked before.
    assert!(retries <= 21.0, "{retries} retries for 100 calls");
    println!("retries during the outage: {retries} for 100 calls");
}

/// A gRPC stream that ends UNAVAILABLE in its trailers, after messages,
/// counts against its endpoint as a trailers-only UNAVAILABLE does; streams
/// that end OK do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_status_in_trailers_counts_for_the_breaker() {
    let etcd = Etcd::start().await;
    let control = Control::start(&etcd, 5).await;
    let urls = [control.url()];
    let (v1, v2, app) = (
        Backend::grpc("inference", "v1").await,
        Backend::grpc("inference", "v2").await,
        Backend::http("agent", "v1").await,
    );
    let (_s1, _s2, caller) = tokio::join!(
        Sidecar::start(&urls, "inference", "version=v1", v1.addr, "gt-v1"),
        Sidecar::start(&urls, "inference", "version=v2", v2.addr, "gt-v2"),
        Sidecar::start(&urls, "agent", "", app.addr, "gt-agent"),
    );
    apply(
        &control.url(),
        "kind: Resilience\nservice: inference\ncircuit_breaker: { consecutive_failures: 3, base_ejection: 30s, max_ejection_percent: 50 }\n",
    )
    .await;
    let _ = send(&pooled_client(), caller.outbound, "inference", "/", &[]).await;
    let c = &caller;
    eventually("caller sees both instances", Duration::from_secs(20), || async move {
        c.endpoint_addrs("inference").await.len() == 2
    })
    .await;
    let client = harness::inference_client(caller.outbound, "http://inference").await;
    let stream = |prompt: &str| {
        let req = harness::example_pb::InferRequest { prompt: prompt.into(), tokens: 2 };
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
    let bed = Bed::start().await;
    apply(
        &bed.control.url(),
        "kind: Route\nservice: inference\nrules:\n  - backends:\n      - { subset: { version: v1 }, weight: 50 }\n      - { subset: { version: v2 }, weight: 50 }\n    retry: { attempts: 1, on: [5xx] }\n---\nkind: Resilience\nservice: inference\ncircuit_breaker: { consecutive_failures: 3, base_ejection: 30s, max_ejection_percent: 50 }\nretry_budget: { ratio: 1.0, min_per_second: 100 }\n",
    )
    .await;
    let b = &bed;
    eventually("v2 is ejected", Duration::from_secs(20), || async move {
        let r = b.call("GET", &[]).await;
        assert_eq!(r.0, 200, "{r:?}");
        counter(&b.caller.metrics().await, "weft_breaker_ejections_total", &["service=\"inference\""]) >= 1.0
    })
    .await;
    // While v2 is out, every call goes straight to v1 with no retry; those the
    // 50/50 split would have sent to v2 are marked "breaker".
    let mut marked = 0;
    for _ in 0..40 {
        let r = bed.call("GET", &[]).await;
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
        let r = bed.call("POST", &[("traceparent", &tp)]).await;
        assert_eq!(r.0, 200, "{r:?}");
        assert_eq!(served_by(&r), "inference-lite/v1");
        assert!(degraded(&r).contains("fallback=inference-lite"), "{r:?}");
        assert!(r.1["tracestate"].to_str().unwrap().contains("fallback:inference-lite"), "{r:?}");
    }
    let r = harness::get(bed.caller.outbound, "inference", "/other").await.unwrap();
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
    let bed = Bed::start().await;
    apply(
        &bed.control.url(),
        "kind: Route\nservice: inference\nrules:\n  - backends: [ { subset: { version: v1 }, weight: 1 } ]\n---\nkind: Resilience\nservice: inference\nmax_concurrent_requests: 2\n",
    )
    .await;
    let outbound = bed.caller.outbound;
    // Four calls of 1.5 s at once against a cap of two.
    let slow: Vec<_> = (0..4)
        .map(|_| tokio::spawn(async move { harness::get(outbound, "inference", "/?sleep_ms=1500").await }))
        .collect();
    let (mut ok, mut shed) = (0, 0);
    for t in slow {
        let r = t.await.unwrap().unwrap();
        match r.0 {
            200 => ok += 1,
            503 => {
                assert_eq!(r.1["x-weft-error"], "overloaded");
                assert_eq!(degraded(&r), "shed");
                shed += 1;
            }
            _ => panic!("unexpected answer {r:?}"),
        }
    }
    assert!(ok >= 1 && shed >= 1, "{ok} admitted, {shed} shed: the cap of 2 was not applied");
    let m = bed.caller.metrics().await;
    assert!(counter(&m, "weft_requests_total", &["code=\"503\"", "degraded=\"true\""]) >= 1.0, "{m}");
    let client = pooled_client();
    let r = send(&client, outbound, "inference", "/", &[]).await.unwrap();
    assert_eq!(r.0, 200, "capacity is back once the slow calls finish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_faults_are_retried_or_time_out_and_degraded_calls_are_listed_by_weftctl_traces() {
    let bed = Bed::start().await;
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
        let r = send(&client, bed.caller.outbound, "inference", "/flaky", &[]).await.unwrap();
        assert_eq!((r.0, degraded(&r).as_str()), (200, ""), "{r:?}");
    }
    // With it, 30 % of tries abort; retries turn them into successes (all ten
    // tries abort for one call in 170000).
    let mut retried_traces = Vec::new();
    for i in 0..60 {
        let trace = format!("{:032x}", 0xabc000 + i);
        let tp = format!("00-{trace}-00f067aa0ba902b7-01");
        let r = send(&client, bed.caller.outbound, "inference", "/flaky", &[("x-chaos", "1"), ("traceparent", &tp)])
            .await
            .unwrap();
        assert_eq!(r.0, 200, "{r:?} {}", bed.caller.config().await);
        if degraded(&r).starts_with("retry=") {
            retried_traces.push(trace);
        }
    }
    assert!(retried_traces.len() >= 5, "only {} of 60 calls needed a retry", retried_traces.len());
    // A delay longer than the route timeout: 504, marked timeout.
    let r = send(&client, bed.caller.outbound, "inference", "/slow", &[]).await.unwrap();
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
    let etcd = Etcd::start().await;
    let control = Control::start(&etcd, 5).await;
    let urls = [control.url()];
    let east = Backend::http("inference", "east").await;
    let west = Backend::http("inference", "west").await;
    let app = Backend::http("agent", "v1").await;
    let (_e, _w, caller) = tokio::join!(
        Sidecar::start(&urls, "inference", "region=east", east.addr, "reg-east"),
        Sidecar::start(&urls, "inference", "region=west", west.addr, "reg-west"),
        Sidecar::start(&urls, "agent", "region=east", app.addr, "reg-agent"),
    );
    let _ = send(&pooled_client(), caller.outbound, "inference", "/", &[]).await;
    let c = &caller;
    eventually("caller sees both regions", Duration::from_secs(20), || async move {
        c.endpoint_addrs("inference").await.len() == 2
    })
    .await;
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
            .is_some_and(|e| e.iter().any(|e| e["proxy_id"] == "reg-east" && e["ready"] == false))
    })
    .await;
    for _ in 0..10 {
        let r = send(&client, caller.outbound, "inference", "/", &[]).await.unwrap();
        assert_eq!(served_by(&r), "inference/west");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_served_while_the_control_plane_is_away_are_marked_stale_config() {
    let mut bed = Bed::start().await;
    apply(
        &bed.control.url(),
        "kind: Route\nservice: inference\nrules:\n  - backends: [ { subset: { version: v1 }, weight: 1 } ]\n",
    )
    .await;
    let r = harness::get(bed.caller.outbound, "inference", "/").await.unwrap();
    assert_eq!(degraded(&r), "");
    bed.control.kill().await;
    let c = &bed.caller;
    eventually(
        "caller notices",
        Duration::from_secs(20),
        || async move { c.config().await["control_connected"] == false },
    )
    .await;
    let r = harness::get(bed.caller.outbound, "inference", "/").await.unwrap();
    assert_eq!(r.0, 200);
    assert_eq!(degraded(&r), "stale-config");
}
