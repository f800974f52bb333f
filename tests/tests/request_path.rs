//! The request path through real sidecars: HTTP/1.1, gRPC (unary, server
//! streaming, bidi streaming, error status in trailers), weighted splits,
//! route matching, and the sidecar's own error answers.

use std::time::Duration;

use harness::{Mesh, Req, apply, example_pb, get, metric, pooled_client, request, send, served_by};
use http_body_util::BodyExt;
use tokio_stream::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_through_two_sidecars() {
    let mesh = Mesh::start(5).await;
    let r = request(mesh.caller.outbound, "inference:80", "/v1/run?x=1", &[("x-tenant-id", "acme")]).await.unwrap();
    assert_eq!(r.0, 200, "{r:?}");
    assert!(served_by(&r).starts_with("inference/"), "{r:?}");
    assert!(r.2.contains("\"path\":\"/v1/run\""), "{}", r.2);
    // The caller's Host and tenant reach the app; a trace was started.
    assert_eq!(r.1["echo-host"], "inference:80");
    assert_eq!(r.1["echo-x-tenant-id"], "acme");
    let tp = r.1["echo-traceparent"].to_str().unwrap().to_string();
    assert!(tp.starts_with("00-") && tp.len() == 55, "{tp}");
    // A caller's traceparent is kept.
    let mine = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = request(mesh.caller.outbound, "inference", "/", &[("traceparent", mine)]).await.unwrap();
    assert_eq!(r.1["echo-traceparent"], mine);

    // Absolute-form (HTTP_PROXY style): the URI's authority names the service.
    let client = pooled_client();
    let raw = absolute_form_get(mesh.caller.outbound, "http://inference/abs").await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(raw.contains("\"path\":\"/abs\""), "{raw}");

    // Unknown service: 503 naming it.
    let r = send(&client, mesh.caller.outbound, "nosuch", "/", &[]).await.unwrap();
    assert_eq!(r.0, 503);
    assert_eq!(r.1["x-weft-error"], "unknown-service");
    assert!(r.2.contains("'nosuch'"), "{}", r.2);

    // Malformed authority: 400, and the sidecar keeps serving.
    let r = send(&client, mesh.caller.outbound, "bad!host", "/", &[]).await.unwrap();
    assert_eq!(r.0, 400, "{r:?}");
    let r = send(&client, mesh.caller.outbound, "inference", "/", &[]).await.unwrap();
    assert_eq!(r.0, 200);

    // Streaming bodies pass through chunk by chunk: the first chunk arrives
    // alone, 300 ms before the next is even written (a proxy that buffered
    // the body would hand over all four at once).
    let resp =
        Req::get(mesh.caller.outbound, "inference", "/stream?chunks=4&gap_ms=300").open_on(&client).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = loop {
        match body.frame().await.expect("a first frame").unwrap().into_data() {
            Ok(d) if !d.is_empty() => break d,
            _ => continue,
        }
    };
    assert_eq!(String::from_utf8_lossy(&first).lines().count(), 1, "{first:?}");
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&rest).lines().count(), 3, "{rest:?}");

    // The request shows in the sidecars' metrics; latencies are histograms
    // (buckets can be summed across instances, quantiles cannot), with
    // buckets below a millisecond.
    let m = mesh.caller.metrics().await;
    assert!(m.contains("weft_requests_total{direction=\"outbound\",service=\"inference\""), "{m}");
    let bucket = "weft_request_duration_seconds_bucket{direction=\"outbound\",service=\"inference\",le=\"0.00025\"}";
    assert!(m.contains(bucket), "{m}");
    assert!(metric(&m, "weft_request_duration_seconds_count", &["direction=\"outbound\""]) >= 5.0, "{m}");
    assert!(!m.contains("quantile="), "{m}");
    let m = mesh.control.metrics().await;
    assert!(m.contains("weft_control_push_seconds_bucket{le=\"0.0001\"}"), "{m}");
    assert!(metric(&m, "weft_control_push_seconds_count", &[]) >= 1.0, "{m}");
}

/// Sends a raw absolute-form request line.
async fn absolute_form_get(addr: std::net::SocketAddr, uri: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {uri} HTTP/1.1\r\nconnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out)).await.unwrap().unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_streaming_through_two_sidecars() {
    let etcd = harness::Etcd::start().await;
    let control = harness::Control::start(&etcd, 5).await;
    let urls = [control.url()];
    let backend = harness::Backend::grpc("inference", "v1").await;
    let caller_app = harness::Backend::http("agent", "v1").await;
    let (inf, caller) = tokio::join!(
        harness::Sidecar::start(&urls, "inference", "version=v1", backend.addr, "grpc-inference"),
        harness::Sidecar::start(&urls, "agent", "", caller_app.addr, "grpc-agent"),
    );
    let mut client = harness::inference_client(caller.outbound, "http://inference:50051").await;

    let reply = client
        .infer(example_pb::InferRequest { prompt: "hi".into(), tokens: 1, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.text, "echo: hi");
    assert_eq!(reply.served_by, "inference/v1");

    // An error status in trailers comes through as the app's status.
    let err = client
        .infer(example_pb::InferRequest { prompt: "fail".into(), tokens: 1, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert_eq!(err.message(), "asked to fail");

    // Server streaming.
    let mut stream = client
        .generate(example_pb::InferRequest { prompt: "tok".into(), tokens: 5, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(m) = stream.next().await {
        got.push(m.unwrap().text);
    }
    assert_eq!(got, vec!["tok #0", "tok #1", "tok #2", "tok #3", "tok #4"]);

    // Bidi streaming: each message answered while the stream stays open.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = client.chat(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    for i in 0..3 {
        tx.send(example_pb::InferRequest { prompt: format!("m{i}"), tokens: 1, ..Default::default() }).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(10), replies.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(r.text, format!("re: m{i}"));
    }
    drop(tx);
    assert!(tokio::time::timeout(Duration::from_secs(10), replies.next()).await.unwrap().is_none());

    // A gRPC call to an unknown service gets a real grpc-status.
    let err = harness::inference_client(caller.outbound, "http://nosuch")
        .await
        .infer(example_pb::InferRequest { prompt: "x".into(), tokens: 1, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    assert!(err.message().contains("nosuch"), "{err:?}");
    drop(inf);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_and_rule_matching() {
    let mesh = Mesh::start(5).await;
    apply(
        &mesh.control_url(),
        r#"
kind: Route
service: inference
rules:
  - match: { path_prefix: /canary, headers: { x-model: large } }
    backends:
      - { subset: { version: v2 }, weight: 1 }
  - match: { method: DELETE }
    backends:
      - { subset: { version: v2 }, weight: 1 }
  - backends:
      - { subset: { version: v1 }, weight: 90 }
      - { subset: { version: v2 }, weight: 10 }
"#,
    )
    .await;
    let client = pooled_client();
    const N: usize = 1000;
    let mut v2 = 0;
    for _ in 0..N {
        let r = send(&client, mesh.caller.outbound, "inference", "/split", &[]).await.unwrap();
        assert_eq!(r.0, 200);
        if served_by(&r) == "inference/v2" {
            v2 += 1;
        }
    }
    // Binomial(1000, 0.1): sd ≈ 9.5; ±4 sd.
    assert!((62..=138).contains(&v2), "v2 got {v2} of {N}, expected about 100");

    for _ in 0..20 {
        let r = send(&client, mesh.caller.outbound, "inference", "/canary/x", &[("x-model", "large")]).await.unwrap();
        assert_eq!(served_by(&r), "inference/v2");
    }
    // A DELETE matches its own rule: v2 every time (the catch-all would
    // send it to v2 one time in ten).
    for _ in 0..20 {
        let r = Req::get(mesh.caller.outbound, "inference", "/split").method("DELETE").send_on(&client).await.unwrap();
        assert_eq!(served_by(&r), "inference/v2", "{r:?}");
    }
    // Header absent: the catch-all rule, so v1 most of the time; never a 404.
    let mut seen_v1 = false;
    for _ in 0..20 {
        let r = send(&client, mesh.caller.outbound, "inference", "/canary/x", &[]).await.unwrap();
        seen_v1 |= served_by(&r) == "inference/v1";
    }
    assert!(seen_v1);

    // A subset with no ready endpoints gets no traffic: its weight goes to the others.
    mesh.v2.stop();
    let caller = &mesh.caller;
    harness::eventually("v2 marked not ready in the caller", Duration::from_secs(20), || async move {
        let cfg = caller.config().await;
        cfg["services"]["inference"]["endpoints"]
            .as_array()
            .is_some_and(|eps| eps.iter().any(|e| e["labels"]["version"] == "v2" && e["ready"] == false))
    })
    .await;
    for _ in 0..30 {
        let r = send(&client, mesh.caller.outbound, "inference", "/split", &[]).await.unwrap();
        assert_eq!(served_by(&r), "inference/v1", "{r:?}");
    }
    // Only v2 matches this rule and it has no ready endpoint: 503 no-endpoints.
    let r = send(&client, mesh.caller.outbound, "inference", "/canary/x", &[("x-model", "large")]).await.unwrap();
    assert_eq!(r.0, 503);
    assert_eq!(r.1["x-weft-error"], "no-endpoints");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_timeout_answers_504() {
    let mesh = Mesh::start(5).await;
    apply(
        &mesh.control_url(),
        "kind: Route\nservice: inference\nrules:\n  - backends: [ { subset: {}, weight: 1 } ]\n    timeout: 300ms\n",
    )
    .await;
    let r = get(mesh.caller.outbound, "inference", "/?sleep_ms=3000").await.unwrap();
    assert_eq!(r.0, 504, "{r:?}");
    assert_eq!(r.1["x-weft-error"], "timeout");
    assert_eq!(r.1["x-weft-degraded"], "timeout");
    // The timed-out request was cancelled all the way to the app.
    let (v1, v2) = (mesh.v1.mode.clone(), mesh.v2.mode.clone());
    harness::eventually("the app saw the request cancelled", Duration::from_secs(10), || {
        let (v1, v2) = (v1.clone(), v2.clone());
        async move {
            v1.cancelled.load(std::sync::atomic::Ordering::Relaxed)
                + v2.cancelled.load(std::sync::atomic::Ordering::Relaxed)
                == 1
        }
    })
    .await;
    let r = get(mesh.caller.outbound, "inference", "/?sleep_ms=10").await.unwrap();
    assert_eq!(r.0, 200);
}

/// Threads of process `pid` whose name starts with `prefix`.
fn threads(pid: u32, prefix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with(prefix))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_with_several_workers_serve_concurrent_calls() {
    let bed = harness::Topology::new()
        .instances("inference", &["v1", "v2"])
        .args(&["--workers", "3"])
        .caller("agent", "", &["--workers", "2"])
        .start()
        .await;
    assert_eq!(threads(bed.caller.sidecar.pid(), "tokio-rt-worker"), 2);
    assert_eq!(threads(bed.instance("inference", "v1").sidecar.pid(), "tokio-rt-worker"), 3);
    let outbound = bed.caller.sidecar.outbound;
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            tokio::spawn(async move {
                let client = pooled_client();
                let mut served = Vec::new();
                for i in 0..50 {
                    let path = format!("/w{t}/{i}");
                    let r = Req::post(outbound, "inference", &path, format!("{t}-{i}")).send_on(&client).await.unwrap();
                    assert_eq!(r.0, 200, "{r:?}");
                    assert!(r.2.contains(&format!("\"path\":\"{path}\"")), "each answer is its own call's: {r:?}");
                    served.push(served_by(&r));
                }
                served
            })
        })
        .collect();
    let mut served = Vec::new();
    for t in tasks {
        served.extend(t.await.unwrap());
    }
    assert_eq!(served.len(), 400);
    assert!(served.iter().any(|s| s == "inference/v1") && served.iter().any(|s| s == "inference/v2"), "both served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_agents_calls_through_each_ones_own_sidecar_in_one_trace() {
    // agent → planner → inference, each app calling the next through its
    // own sidecar's outbound.
    let bed = harness::Topology::new().instances("planner", &["v1"]).instances("inference", &["v1"]).start().await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let tp = format!("00-{trace}-00f067aa0ba902b7-01");
    let r = Req::get(bed.caller.sidecar.outbound, "planner", "/call/inference/step")
        .header("traceparent", &tp)
        .header("x-tenant-id", "acme")
        .send()
        .await
        .unwrap();
    assert_eq!(r.0, 200, "{r:?}");
    assert_eq!(served_by(&r), "inference/v1", "the planner's answer is inference's");
    assert!(r.2.contains("\"path\":\"/step\""), "{r:?}");
    // One trace end to end, and the tenant too.
    let echoed = harness::header(&r, "echo-traceparent");
    assert!(echoed.starts_with(&format!("00-{trace}-")), "{echoed}");
    assert_eq!(harness::header(&r, "echo-x-tenant-id"), "acme");
    // Each hop went through a sidecar: the planner's own outbound called
    // inference, and inference's inbound served it.
    let planner = &bed.instance("planner", "v1").sidecar;
    let m = planner.metrics().await;
    let acme = "tenant=\"acme\"";
    assert_eq!(
        metric(&m, "weft_requests_total", &["direction=\"outbound\"", "service=\"inference\"", acme]),
        1.0,
        "{m}"
    );
    assert_eq!(metric(&m, "weft_requests_total", &["direction=\"inbound\"", "service=\"planner\"", acme]), 1.0, "{m}");
    let m = bed.instance("inference", "v1").sidecar.metrics().await;
    assert!(metric(&m, "weft_requests_total", &["direction=\"inbound\"", "tenant=\"acme\""]) >= 1.0, "{m}");
}
