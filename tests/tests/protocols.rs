//! Protocols an existing service speaks, carried end to end through two
//! sidecars: WebSocket (an HTTP/1.1 upgrade), streamed answers (SSE-style
//! HTTP/1.1 and h2c, gRPC bidirectional streaming), all kept open past the
//! route's timeout, its per-try timeout and the callee's app timeout, which
//! bound the wait for the answer's head only; and `CONNECT` tunnels through
//! the caller's sidecar to a destination outside the mesh.

use futures_util::{SinkExt, StreamExt};
use harness::{Backend, Control, Etcd, Sidecar, apply, metric};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_passes_through_two_sidecars_and_outlives_the_route_timeout() {
    let etcd = Etcd::start().await;
    let control = Control::start(&etcd, 5).await;
    let urls = [control.url()];
    let app = harness::ws_echo().await;
    let caller_app = Backend::http("agent", "v1").await;
    let (echo, agent) = tokio::join!(
        Sidecar::start(&urls, "echo", "", app, "echo-1"),
        Sidecar::start(&urls, "agent", "", caller_app.addr, "agent-1"),
    );
    apply(
        &control.url(),
        "kind: Route\nservice: echo\nrules:\n  - backends: [ { subset: {}, weight: 1 } ]\n    timeout: 500ms\n",
    )
    .await;
    let stream = tokio::net::TcpStream::connect(agent.outbound).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://echo/chat", stream).await.expect("the upgrade");
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
    // An answer 1.2 s later, past the route's 500 ms timeout: the socket
    // stays.
    ws.send(Message::text("slow")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("slow"));
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(vec![1u8, 2, 3]));
    ws.close(None).await.unwrap();
    for (s, direction) in [(&agent, "outbound"), (&echo, "inbound")] {
        let m = s.metrics().await;
        assert_eq!(metric(&m, "weft_upgrades_total", &[&format!("direction=\"{direction}\"")]), 1.0, "{m}");
    }
    // Nothing of the first socket was pooled: a second one works the same.
    let stream = tokio::net::TcpStream::connect(agent.outbound).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async("ws://echo/chat", stream).await.expect("a second upgrade");
    ws.send(Message::text("again")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("again"));
}

/// Sends `CONNECT target` on a new connection to `proxy`; the answer's
/// head and the connection.
async fn connect(proxy: std::net::SocketAddr, target: &str) -> (String, tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.unwrap() == 0 {
            break;
        }
        head.push(byte[0]);
    }
    (String::from_utf8_lossy(&head).into_owned(), s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnels_to_a_destination_outside_the_mesh() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let etcd = Etcd::start().await;
    let control = Control::start(&etcd, 5).await;
    let app = Backend::http("agent", "v1").await;
    let agent = Sidecar::start(&[control.url()], "agent", "", app.addr, "agent-1").await;
    // A TCP echo server outside the mesh.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = echo.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 256];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let (head, mut tunnel) = connect(agent.outbound, &target).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    tunnel.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tunnel.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");
    // Nothing listens: 502, and a target without a port: 400.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let (head, _) = connect(agent.outbound, &closed.to_string()).await;
    assert!(head.starts_with("HTTP/1.1 502") && head.contains("connect-failure"), "{head}");
    let (head, _) = connect(agent.outbound, "example").await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert_eq!(metric(&agent.metrics().await, "weft_tunnels_total", &[]), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_streams_outlive_the_timeouts_meant_for_the_answers_head() {
    use http_body_util::BodyExt;
    let etcd = Etcd::start().await;
    let control = Control::start(&etcd, 5).await;
    let urls = [control.url()];
    let (http_app, grpc_app, caller_app) = (
        Backend::http("inference", "v1").await,
        Backend::grpc("model", "v1").await,
        Backend::http("agent", "v1").await,
    );
    let short = ["--app-timeout", "300ms"];
    let (_inf, _model, agent) = tokio::join!(
        Sidecar::start_with(&urls, "inference", "", http_app.addr, "inf-1", &short),
        Sidecar::start_with(&urls, "model", "", grpc_app.addr, "model-1", &short),
        Sidecar::start(&urls, "agent", "", caller_app.addr, "agent-1"),
    );
    let route = |svc: &str| {
        format!(
            "kind: Route\nservice: {svc}\nrules:\n  - backends: [ {{ subset: {{}}, weight: 1 }} ]\n    timeout: 300ms\n    retry: {{ attempts: 2, per_try_timeout: 200ms, on: [5xx] }}\n"
        )
    };
    apply(&control.url(), &format!("{}---\n{}", route("inference"), route("model"))).await;

    // Six chunks 250 ms apart: 1.25 s, four times the route's timeout.
    let path = "/stream?chunks=6&gap_ms=250";
    let resp = harness::Req::get(agent.outbound, "inference", path).open().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("the whole stream").to_bytes();
    assert_eq!(String::from_utf8_lossy(&body).lines().count(), 6, "{body:?}");
    let (status, _, body) = harness::h2_send(agent.outbound, "inference", path, &[]).await.unwrap();
    assert_eq!((status, body.lines().count()), (200, 6), "h2c: {body}");

    // gRPC: a chat whose every answer takes the app 250 ms, 1.25 s in all.
    let mut client = harness::inference_client(agent.outbound, "http://model").await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = client.chat(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    for i in 0..5 {
        let m = harness::example_pb::InferRequest { prompt: format!("m{i}"), delay_ms: 250, ..Default::default() };
        tx.send(m).await.unwrap();
        let reply = replies.message().await.expect("the stream is open").expect("a reply");
        assert_eq!(reply.text, format!("re: m{i}"));
    }
    drop(tx);
    assert!(replies.message().await.unwrap().is_none(), "the stream ends cleanly");
    let m = agent.metrics().await;
    assert_eq!(metric(&m, "weft_requests_total", &["code=\"504\""]), 0.0, "nothing timed out: {m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spliced_stream_is_counted_while_open_and_closed_after_its_idle_timeout() {
    let etcd = Etcd::start().await;
    let control = Control::start(&etcd, 5).await;
    let urls = [control.url()];
    let app = harness::ws_echo().await;
    let caller_app = Backend::http("agent", "v1").await;
    let (_echo, agent) = tokio::join!(
        Sidecar::start(&urls, "echo", "", app, "echo-1"),
        Sidecar::start_with(&urls, "agent", "", caller_app.addr, "agent-1", &["--stream-idle-timeout", "2s"]),
    );
    let stream = tokio::net::TcpStream::connect(agent.outbound).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async("ws://echo/chat", stream).await.expect("the upgrade");
    // An answer 1.2 s late is within the idle timeout.
    ws.send(Message::text("slow")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("slow"));
    let m = agent.metrics().await;
    assert_eq!(metric(&m, "weft_tcp_streams", &["kind=\"upgrade\""]), 1.0, "{m}");
    // Then nothing either way: the sidecar closes it after 2 s.
    let end = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next()).await.expect("closed in time");
    assert!(!matches!(end, Some(Ok(Message::Text(_)))), "{end:?}");
    let m = agent.metrics().await;
    assert_eq!(metric(&m, "weft_tcp_streams_idle_closed_total", &[]), 1.0, "{m}");
    assert_eq!(metric(&m, "weft_tcp_streams", &["kind=\"upgrade\""]), 0.0, "{m}");
}
