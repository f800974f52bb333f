//! Deadlines across an agent chain: the first sidecar fixes the call's
//! deadline (the route's timeout, or the caller's own, whichever is
//! sooner) and every later sidecar keeps to the time left — its own
//! timeouts, retries and fallbacks included — though the apps between pass
//! on only the trace context; a call whose time is up is refused at once.

use std::time::Duration;

use harness::{App, Req, Topology, apply, eventually, h2_send, header, metric};

const ROUTES: &str = "kind: Route
service: tool
rules:
  - backends: [ { subset: {}, weight: 1 } ]
    timeout: 800ms
---
kind: Route
service: model
rules:
  - backends: [ { subset: {}, weight: 1 } ]
    timeout: 20s
    retry: { attempts: 3, per_try_timeout: 10s, on: [5xx] }
    fallback: { service: backup }
    match: { path_prefix: /slow }
    fault: { delay: { duration: 3s, percent: 100 } }
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_fixed_by_the_first_sidecar_holds_across_three_services() {
    let bed = Topology::new()
        .instance("tool", "version=v1")
        .instance("model", "version=v1")
        .instance("backup", "version=v1")
        .instance("fast", "version=v1")
        .app(App::Grpc)
        .start()
        .await;
    let applied = apply(&bed.control_url(), ROUTES).await;
    assert_eq!(applied.code, 0, "{applied:?}");
    let tool = &bed.instance("tool", "v1").sidecar;
    let caller = bed.caller.sidecar.outbound;

    // agent → tool → model, where model's own route would wait 3 s (an
    // injected delay at tool's sidecar) within a 20 s timeout, with retries
    // and a fallback: the 800 ms fixed at the first sidecar is what counts.
    let (status, headers, _) = Req::get(caller, "tool", "/call/model/slow").send().await.unwrap();
    assert_eq!(status, 504, "{headers:?}");
    assert_eq!(header(&(status, headers.clone(), String::new()), "x-weft-error"), "timeout");
    eventually("tool's sidecar ended its call to model at the deadline", Duration::from_secs(10), || async move {
        let m = tool.metrics().await;
        metric(&m, "weft_requests_total", &["direction=\"outbound\"", "service=\"model\"", "code=\"504\""]) == 1.0
    })
    .await;
    let m = tool.metrics().await;
    assert_eq!(
        metric(&m, "weft_requests_total", &["direction=\"outbound\"", "service=\"model\"", "code=\"200\""]),
        0.0,
        "it did not wait the 3 s out (nor fall back after): {m}"
    );
    assert_eq!(metric(&m, "weft_requests_total", &["service=\"backup\""]), 0.0, "no fallback past the deadline");

    // The next hop is told the time left: model's app sees it, below 800.
    let r = Req::get(caller, "tool", "/call/model/quick").send().await.unwrap();
    assert_eq!(r.0, 200, "{r:?}");
    let left: u64 = header(&r, "echo-x-weft-deadline-ms").parse().expect("model's app was told the time left");
    assert!(left > 0 && left < 800, "{left}");

    // The caller's own deadline, when sooner than the route's.
    let r = Req::get(caller, "tool", "/call/model/quick").header("x-weft-deadline-ms", "300").send().await.unwrap();
    let left: u64 = header(&r, "echo-x-weft-deadline-ms").parse().unwrap();
    assert!(left > 0 && left <= 300, "{left}");

    // A call whose time is up is refused at once, by the first sidecar or
    // by the callee's: it reaches no app.
    let hits = bed.hits("tool");
    let r = Req::get(caller, "tool", "/").header("x-weft-deadline-ms", "0").send().await.unwrap();
    assert_eq!((r.0, header(&r, "x-weft-error").as_str()), (504, "timeout"));
    assert!(header(&r, "x-weft-degraded").contains("timeout"), "{r:?}");
    let r = Req::get(tool.inbound, "tool", "/").header("x-weft-deadline-ms", "0").send().await.unwrap();
    assert_eq!((r.0, header(&r, "x-weft-error").as_str()), (504, "timeout"));
    assert_eq!(bed.hits("tool"), hits, "no app saw them");
    let r = Req::get(caller, "tool", "/").header("x-weft-deadline-ms", "soon").send().await.unwrap();
    assert_eq!(r.0, 400, "not a deadline: {r:?}");

    // gRPC: the caller's grpc-timeout, and DEADLINE_EXCEEDED when none is left.
    let grpc = [("content-type", "application/grpc"), ("te", "trailers"), ("grpc-timeout", "0m")];
    let r = h2_send(caller, "fast", "/weft.example.v1.Inference/Infer", &grpc).await.unwrap();
    assert_eq!(header(&r, "grpc-status"), "4", "{r:?}");
}
