//! Hostile and broken clients: whatever they send, the sidecar keeps its
//! resources bounded, answers malformed requests with 400, never blames an
//! endpoint for a client's fault, and weftctl and the control plane refuse
//! oversized or too-deep input quickly, naming the limit.

use std::net::SocketAddr;
use std::time::Duration;

use harness::{Backend, Control, Etcd, Mesh, Sidecar, apply, eventually, get, pooled_client, send, served_by, weftctl};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Writes `bytes` on a new connection and reads until the peer closes it or
/// `within` passes; returns what was read and whether it was closed.
async fn raw(addr: SocketAddr, bytes: &[u8], within: Duration) -> (String, bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    read_until_closed(&mut s, within).await
}

async fn read_until_closed(s: &mut TcpStream, within: Duration) -> (String, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

fn metric(metrics: &str, name: &str, needle: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_heads_idle_connections_and_connections_over_the_limit_are_closed() {
    let etcd = Etcd::start().await;
    let control = Control::start(&etcd, 5).await;
    let app = Backend::http("inference", "v1").await;
    let limits = ["--header-timeout", "1s", "--idle-timeout", "2s", "--max-connections", "20"];
    let sc = Sidecar::start_with(&[control.url()], "inference", "", app.addr, "guarded-1", &limits).await;

    // Slowloris: unfinished heads are cut after the header timeout, while
    // complete requests are served all along.
    let slow: Vec<_> = (0..10)
        .map(|_| {
            tokio::spawn(raw(
                sc.inbound,
                b"GET / HTTP/1.1\r\nHost: inference\r\nx-slow: 1\r\n",
                Duration::from_secs(10),
            ))
        })
        .collect();
    let client = pooled_client();
    let r = send(&client, sc.inbound, "inference", "/", &[]).await.unwrap();
    assert_eq!(r.0, 200, "{r:?}");
    for s in slow {
        let (text, closed) = s.await.unwrap();
        assert!(closed, "an unfinished head was still open after 10 s");
        assert!(text.is_empty(), "nothing is answered to half a request: {text:?}");
    }
    let m = sc.metrics().await;
    assert!(metric(&m, "weft_connections_timed_out_total", "reason=\"header\"") >= 10.0, "{m}");

    // An idle keep-alive connection is closed after the idle timeout.
    let mut s = TcpStream::connect(sc.inbound).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: inference\r\n\r\n").await.unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let (_, closed) = read_until_closed(&mut s, Duration::from_secs(10)).await;
    assert!(closed, "an idle connection was still open after 10 s");

    // 20 open connections: the 21st is closed at once, and counted.
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(TcpStream::connect(sc.inbound).await.unwrap());
    }
    let inbound = sc.inbound;
    eventually("a 21st connection is refused", Duration::from_secs(5), || async move {
        let (_, closed) = raw(inbound, b"", Duration::from_millis(500)).await;
        closed
    })
    .await;
    let m = sc.metrics().await;
    assert!(metric(&m, "weft_connections_rejected_total", "listener=\"inbound\"") >= 1.0, "{m}");
    drop(held);
    // Once they are gone, connections are taken again.
    let sc = &sc;
    eventually("connections are accepted again", Duration::from_secs(10), || async move {
        matches!(get(sc.inbound, "inference", "/").await, Ok((200, _, _)))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_and_never_count_against_an_endpoint() {
    let mesh = Mesh::start(5).await;
    apply(
        &mesh.control_url(),
        "kind: Resilience\nservice: inference\ncircuit_breaker: { consecutive_failures: 1, base_ejection: 30s, max_ejection_percent: 100 }\n",
    )
    .await;
    let out = mesh.caller.outbound;
    // A broken chunked body, five times: the client's fault.
    for _ in 0..5 {
        let (text, _) = raw(
            out,
            b"POST / HTTP/1.1\r\nHost: inference\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        assert!(text.starts_with("HTTP/1.1 400"), "{text}");
        assert!(text.contains("x-weft-error: bad-request"), "{text}");
    }
    // Two Host headers, a tenant header that is not a tenant name.
    let (text, _) = raw(out, b"GET / HTTP/1.1\r\nHost: inference\r\nHost: other\r\n\r\n", Duration::from_secs(5)).await;
    assert!(text.starts_with("HTTP/1.1 400") && text.contains("more than one Host"), "{text}");
    let (text, _) =
        raw(mesh.inf_v1.inbound, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", Duration::from_secs(5)).await;
    assert!(text.starts_with("HTTP/1.1 400"), "the inbound side refuses it too: {text}");
    let r = harness::request(out, "inference", "/", &[("x-tenant-id", "ACME Corp; drop")]).await.unwrap();
    assert_eq!((r.0, r.1["x-weft-error"].to_str().unwrap()), (400, "bad-request"), "{r:?}");

    // Nothing was ejected: both instances still serve.
    let m = mesh.caller.metrics().await;
    assert_eq!(metric(&m, "weft_breaker_ejections_total", ""), 0.0, "{m}");
    let client = pooled_client();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let r = send(&client, out, "inference", "/", &[]).await.unwrap();
        assert_eq!(r.0, 200, "{r:?}");
        seen.insert(served_by(&r));
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bogus_service_names_neither_grow_the_metrics_nor_lock_out_real_services() {
    let mesh = Mesh::start(5).await;
    let out = mesh.caller.outbound;
    // More bogus names than the sidecar subscribes to (1024), a few at a time.
    let names: Vec<String> = (0..1100).map(|i| format!("bogus-{i}")).collect();
    for chunk in names.chunks(25) {
        let calls: Vec<_> = chunk.iter().map(|n| get(out, n, "/")).collect();
        for r in futures_util::future::join_all(calls).await {
            let r = r.unwrap();
            assert_eq!(r.0, 503, "{r:?}");
            assert_eq!(r.1["x-weft-error"], "unknown-service", "{r:?}");
        }
    }
    // A real service the app has not called yet still gets a subscription.
    let app = Backend::http("late", "v1").await;
    let _late = Sidecar::start(&[mesh.control_url()], "late", "", app.addr, "late-1").await;
    eventually("the late service is routable", Duration::from_secs(20), || async move {
        matches!(get(out, "late", "/").await, Ok((200, _, _)))
    })
    .await;
    let m = mesh.caller.metrics().await;
    assert!(!m.contains("bogus-"), "bogus names became metric labels");
    assert!(metric(&m, "weft_requests_total", "service=\"-\"") >= 1100.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_app_is_cut_off_by_the_app_timeout() {
    let etcd = Etcd::start().await;
    let control = Control::start(&etcd, 5).await;
    let app = Backend::http("hung", "v1").await;
    app.mode.hang.store(true, std::sync::atomic::Ordering::Relaxed);
    let sc = Sidecar::start_with(&[control.url()], "hung", "", app.addr, "hung-1", &["--app-timeout", "1s"]).await;
    let r = get(sc.inbound, "hung", "/").await.unwrap();
    assert_eq!(r.0, 504, "{r:?}");
    assert_eq!(r.1["x-weft-error"], "timeout");
    eventually("the app saw its call cancelled", Duration::from_secs(5), || {
        let mode = app.mode.clone();
        async move { mode.cancelled.load(std::sync::atomic::Ordering::Relaxed) >= 1 }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_too_deep_policy_is_refused_naming_the_limit() {
    let etcd = Etcd::start().await;
    let control = Control::start(&etcd, 5).await;
    let url = control.url();
    // A 2 MB route: valid, but over the per-resource limit.
    let rule = "  - match: { path_prefix: /a-path-long-enough-to-make-a-big-route-quickly }\n    backends: [ { subset: {}, weight: 1 } ]\n";
    let big = format!("kind: Route\nservice: big\nrules:\n{}", rule.repeat(18_000));
    assert!(big.len() > 2_000_000);
    let out = weftctl(&url, &["apply", "-f", "-"], Some(&big)).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("<stdin>:1: route/big: ") && out.stderr.contains("limit of 256 KiB"), "{out:?}");
    // 100,000 levels of nesting.
    let deep = format!("kind: Route\nservice: deep\nrules: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let out = weftctl(&url, &["validate", "-f", "-"], Some(&deep)).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("<stdin>:3: document: nested deeper than the limit of 32 levels"), "{out:?}");
    // The control plane checks again whatever weftctl did.
    let mut admin = xds_proto::v1::admin_client::AdminClient::connect(url.clone()).await.unwrap();
    let huge = serde_json::json!({"kind": "Route", "service": "raw", "rules": [{"backends": [{"subset": {"pad": "x".repeat(300_000)}, "weight": 1}]}]});
    let err = admin
        .apply(xds_proto::v1::ApplyRequest {
            resources: vec![xds_proto::v1::ResourceDoc { json: huge.to_string(), origin: "raw:1".into() }],
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("limit of 256 KiB per resource"), "{err:?}");
    // Nothing reached etcd.
    let out = weftctl(&url, &["get", "route"], None).await;
    assert_eq!(out.stdout.lines().count(), 1, "only the header line: {out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_refuses_at_start_a_service_name_the_control_plane_would_refuse_forever() {
    for bad in ["api.v2", "Inference", "-x", ""] {
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::process::Command::new(harness::bin("weft-proxy"))
                .args(["--control", "http://127.0.0.1:1", &format!("--service={bad}"), "--app", "127.0.0.1:1"])
                .args(["--inbound", "127.0.0.1:0", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
                .output(),
        )
        .await
        .expect("it exits at once")
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad}: {stderr}");
        assert!(stderr.contains(&format!("--service '{bad}'")), "{bad}: {stderr}");
    }
}
