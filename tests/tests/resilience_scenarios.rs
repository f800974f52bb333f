//! The resilience scenarios an operator cares about, with backends that fail
//! on command: one bad endpoint of three, a full outage, hanging and slow
//! endpoints, byte-identical replays, and gRPC status mapping.

use std::sync::atomic::Ordering;
use std::time::Duration;

use harness::{Bed, Topology, apply, degraded, eventually, example_pb, metric, pooled_client, send, served_by};

/// `inference` instances of the given versions behind sidecars, a caller.
async fn bed(versions: &[&str]) -> Bed {
    Topology::new().instances("inference", versions).start().await
}

fn counter(metrics: &str, name: &str, needle: &str) -> f64 {
    metric(metrics, name, &[needle])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_endpoint_of_three_is_ejected_callers_still_succeed_and_it_is_probed_back_when_healed() {
    let bed = bed(&["a", "b", "c"]).await;
    bed.instances[2].app.mode.fail(100, 503);
    apply(
        &bed.control.url(),
        r#"
kind: Route
service: inference
rules:
  - backends:
      - { subset: { version: a }, weight: 1 }
      - { subset: { version: b }, weight: 1 }
      - { subset: { version: c }, weight: 1 }
    retry: { attempts: 2, on: [5xx, connect-failure, reset] }
---
kind: Resilience
service: inference
circuit_breaker: { consecutive_failures: 3, base_ejection: 1s, max_ejection_percent: 50 }
retry_budget: { ratio: 0.2, min_per_second: 10 }
"#,
    )
    .await;
    let client = pooled_client();
    let (mut ok, total) = (0, 1000);
    let mut failures = Vec::new();
    for _ in 0..total {
        let r = send(&client, bed.caller.sidecar.outbound, "inference", "/", &[]).await.unwrap();
        if r.0 == 200 {
            ok += 1;
        } else {
            failures.push(r);
        }
    }
    println!("one bad endpoint of three: {ok}/{total} succeeded; failures: {failures:?}");
    assert!(ok * 1000 >= total * 999, "{ok}/{total} succeeded; want at least 99.9%");
    let m = bed.caller.sidecar.metrics().await;
    assert!(counter(&m, "weft_breaker_ejections_total", "inference") >= 1.0, "{m}");

    // Healed: after its ejection ends it gets a probe, and then traffic again.
    bed.instances[2].app.mode.heal();
    let before = bed.instances[2].app.mode.hits();
    eventually("the healed endpoint serves again", Duration::from_secs(20), || {
        let client = client.clone();
        let outbound = bed.caller.sidecar.outbound;
        async move {
            for _ in 0..20 {
                let r = send(&client, outbound, "inference", "/", &[]).await.unwrap();
                if served_by(&r) == "inference/c" {
                    return true;
                }
            }
            false
        }
    })
    .await;
    assert!(bed.instances[2].app.mode.hits() > before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_full_outage_upstream_attempts_stay_within_the_retry_budget() {
    let bed = bed(&["a", "b", "c"]).await;
    for a in bed.instances.iter().map(|i| &i.app) {
        a.mode.fail(100, 503);
    }
    apply(
        &bed.control.url(),
        "kind: Route\nservice: inference\nrules:\n  - backends: [ { subset: {}, weight: 1 } ]\n    retry: { attempts: 3, on: [5xx] }\n---\nkind: Resilience\nservice: inference\nretry_budget: { ratio: 0.2, min_per_second: 0 }\n",
    )
    .await;
    let start = bed.hits("inference");
    let client = pooled_client();
    let calls = 200;
    for _ in 0..calls {
        let r = send(&client, bed.caller.sidecar.outbound, "inference", "/", &[]).await.unwrap();
        assert_eq!(r.0, 503);
    }
    let attempts = bed.hits("inference") - start;
    println!("full outage: {attempts} upstream attempts for {calls} calls");
    // Without a budget: 800 (4 tries each). With it: the calls plus their
    // 20 % in retries (every one of them spent: the outage is total), plus
    // at most what was banked before the outage.
    assert!(attempts >= calls + calls / 5, "{attempts} attempts for {calls} calls: the budget was not spent");
    assert!(attempts <= calls + calls / 5 + 10, "{attempts} attempts for {calls} calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_are_retried_only_with_an_idempotency_key_and_arrive_byte_identical() {
    let bed = bed(&["good", "bad"]).await;
    bed.instances[1].app.mode.fail(100, 503);
    apply(
        &bed.control.url(),
        "kind: Route\nservice: inference\nrules:\n  - backends:\n      - { subset: { version: good }, weight: 1 }\n      - { subset: { version: bad }, weight: 1 }\n    retry: { attempts: 2, on: [5xx] }\n---\nkind: Resilience\nservice: inference\nretry_budget: { ratio: 1.0, min_per_second: 100 }\n",
    )
    .await;
    let client = pooled_client();
    let body: Vec<u8> = (0..64 * 1024u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let want = format!("{:016x}", weft_examples::fnv1a(&body));
    let post = |key: Option<&'static str>| {
        let mut b =
            http::Request::post(format!("http://{}/run", bed.caller.sidecar.outbound)).header("host", "inference");
        if let Some(k) = key {
            b = b.header("idempotency-key", k);
        }
        b.body(http_body_util::Full::new(bytes::Bytes::from(body.clone()))).unwrap()
    };

    let start = bed.hits("inference");
    let mut failed = 0;
    for _ in 0..30 {
        let r = client.request(post(None)).await.unwrap();
        if r.status() == 503 {
            failed += 1;
        }
        assert!(r.headers().get("x-weft-degraded").is_none(), "a POST without a key was retried");
    }
    assert_eq!(bed.hits("inference") - start, 30, "each POST without a key reached exactly one upstream");
    assert!(failed > 0, "the bad instance got none of 30 POSTs");

    let mut retried = 0;
    let mut seen = Vec::new();
    for _ in 0..30 {
        let r = client.request(post(Some("order-42"))).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-body-fnv"], want.as_str(), "body changed on the way");
        assert_eq!(r.headers()["echo-idempotency-key"], "order-42");
        if r.headers().get("x-weft-degraded").is_some_and(|v| v == "retry=1") {
            retried += 1;
        }
        seen.push((r.headers().get("x-served-by").cloned(), r.headers().get("x-weft-degraded").cloned()));
    }
    assert!(retried > 0, "no keyed POST needed a retry: {seen:?}");

    // Over the 1 MiB replay limit: streamed through whole, never retried.
    let big: Vec<u8> = (0..2 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let big_fnv = format!("{:016x}", weft_examples::fnv1a(&big));
    let start = bed.hits("inference");
    let (mut ok, n) = (0, 10);
    for _ in 0..n {
        let req = http::Request::post(format!("http://{}/run", bed.caller.sidecar.outbound))
            .header("host", "inference")
            .header("idempotency-key", "big-1")
            .body(http_body_util::Full::new(bytes::Bytes::from(big.clone())))
            .unwrap();
        let r = client.request(req).await.unwrap();
        assert!(r.headers().get("x-weft-degraded").is_none(), "a 2 MiB body was retried");
        if r.status() == 200 {
            assert_eq!(r.headers()["x-body-fnv"], big_fnv.as_str());
            ok += 1;
        }
    }
    assert_eq!(bed.hits("inference") - start, n, "one upstream try per large POST");
    assert!(ok > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_moves_a_call_off_a_hanging_endpoint() {
    let bed = bed(&["good", "hung"]).await;
    bed.instances[1].app.mode.hang.store(true, Ordering::Relaxed);
    apply(
        &bed.control.url(),
        "kind: Route\nservice: inference\nrules:\n  - backends:\n      - { subset: { version: good }, weight: 1 }\n      - { subset: { version: hung }, weight: 1 }\n    timeout: 5s\n    retry: { attempts: 2, per_try_timeout: 200ms, on: [5xx] }\n---\nkind: Resilience\nservice: inference\nretry_budget: { ratio: 1.0, min_per_second: 100 }\n",
    )
    .await;
    let client = pooled_client();
    let mut moved = 0;
    for _ in 0..20 {
        let r = send(&client, bed.caller.sidecar.outbound, "inference", "/", &[]).await.unwrap();
        assert_eq!(r.0, 200, "{r:?}");
        assert_eq!(served_by(&r), "inference/good");
        if degraded(&r).starts_with("retry=") {
            moved += 1;
        }
    }
    assert!(moved > 0, "no call hit the hanging endpoint first");
    assert!(bed.instances[1].app.mode.hits() >= moved, "the hung endpoint was tried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_sends_most_traffic_away_from_a_slow_endpoint() {
    let bed = bed(&["fast", "slow"]).await;
    bed.instances[1].app.mode.latency_ms.store(40, Ordering::Relaxed);
    let client = pooled_client();
    let mut slow = 0;
    let n = 200;
    for _ in 0..n {
        let r = send(&client, bed.caller.sidecar.outbound, "inference", "/", &[]).await.unwrap();
        if served_by(&r) == "inference/slow" {
            slow += 1;
        }
    }
    println!("slow endpoint got {slow} of {n}");
    assert!(slow * 10 < n, "the slow endpoint got {slow} of {n} calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_callers_get_grpc_statuses_for_the_sidecars_own_errors() {
    let bed = Topology::new().instances("inference", &["v1"]).app(harness::App::Grpc).start().await;
    let (control, caller) = (&bed.control, &bed.caller.sidecar);
    apply(
        &control.url(),
        r#"
kind: Route
service: inference
rules:
  - match: { headers: { x-case: slow } }
    backends: [ { subset: { version: v1 }, weight: 1 } ]
    timeout: 200ms
    fault: { delay: { percent: 100, duration: 2s } }
  - match: { headers: { x-case: abort } }
    backends: [ { subset: { version: v1 }, weight: 1 } ]
    fault: { abort: { percent: 100, grpc_status: 8 } }
  - match: { headers: { x-case: none } }
    backends: [ { subset: { version: v9 }, weight: 1 } ]
  - backends: [ { subset: { version: v1 }, weight: 1 } ]
"#,
    )
    .await;
    let mut client = harness::inference_client(caller.outbound, "http://inference").await;
    let call = |case: &'static str| {
        let mut req =
            tonic::Request::new(example_pb::InferRequest { prompt: "hi".into(), tokens: 1, ..Default::default() });
        req.metadata_mut().insert("x-case", case.parse().unwrap());
        req
    };
    assert_eq!(client.infer(call("ok")).await.unwrap().into_inner().text, "echo: hi");
    let e = client.infer(call("slow")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e:?}");
    let e = client.infer(call("abort")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    let e = client.infer(call("none")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("no ready endpoints"), "{e:?}");
    // The app's own error status passes through untouched.
    let e = client
        .infer(example_pb::InferRequest { prompt: "fail".into(), tokens: 1, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!((e.code(), e.message()), (tonic::Code::Unavailable, "asked to fail"));
}

/// Sends 20 calls; how many failed, and the statuses they failed with.
async fn failures(bed: &Bed, n: usize) -> Vec<u16> {
    let client = pooled_client();
    let mut failed = Vec::new();
    for _ in 0..n {
        let r = send(&client, bed.caller.sidecar.outbound, "inference", "/", &[]).await.unwrap();
        if r.0 != 200 {
            failed.push(r.0);
        }
    }
    failed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_retry_condition_retries_what_it_names_and_the_defaults_are_gateway_errors_and_resets() {
    let bed = bed(&["good", "bad"]).await;
    let bad = &bed.instance("inference", "bad").app.mode;
    let url = bed.control_url();
    // Half the first tries go to the bad instance; a retry goes to the good.
    let policy = |on: &str| {
        let on = if on.is_empty() { String::new() } else { format!(", on: [{on}]") };
        format!(
            "kind: Route\nservice: inference\nrules:\n  - backends:\n      - {{ subset: {{ version: good }}, weight: 1 }}\n      - {{ subset: {{ version: bad }}, weight: 1 }}\n    retry: {{ attempts: 1{on} }}\n---\nkind: Resilience\nservice: inference\nretry_budget: {{ ratio: 1.0, min_per_second: 100 }}\n"
        )
    };
    // (what the bad instance does, retry.on, whether its failures are
    // retried). The caller sees the bad app's reset as a 502 from that
    // app's sidecar, marked `x-weft-error: reset`: a 5xx and a gateway
    // error too.
    let cases: [(&str, &str, bool); 9] = [
        ("reset", "reset", true),
        ("reset", "5xx", true),
        ("reset", "connect-failure", false),
        ("reset", "", true),
        ("504", "gateway-error", true),
        ("504", "reset", false),
        ("504", "", true),
        ("500", "", false),
        ("500", "5xx", true),
    ];
    for (fault, on, retried) in cases {
        bad.heal();
        match fault {
            "reset" => bad.reset.store(true, Ordering::Relaxed),
            status => bad.fail(100, status.parse().unwrap()),
        }
        apply(&url, &policy(on)).await;
        let failed = failures(&bed, 20).await;
        if retried {
            assert!(failed.is_empty(), "{fault} under on: [{on}] was not retried: {failed:?}");
        } else {
            let want = if fault == "reset" { 502 } else { fault.parse().unwrap() };
            assert!(!failed.is_empty(), "{fault} under on: [{on}] was retried");
            assert!(failed.iter().all(|s| *s == want), "{fault} under on: [{on}]: {failed:?}");
        }
    }
}
