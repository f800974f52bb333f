//! Protocols an existing service speaks, carried end to end through two
//! sidecars: WebSocket (an HTTP/1.1 upgrade), kept open past the route's
//! timeout, which bounds the wait for the answer's head only.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use harness::{Backend, Control, Etcd, Sidecar, apply, metric};
use tokio_tungstenite::tungstenite::Message;

/// A WebSocket echo app on a free port.
async fn ws_echo() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
                while let Some(Ok(m)) = ws.next().await {
                    if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_passes_through_two_sidecars_and_outlives_the_route_timeout() {
    let etcd = Etcd::start().await;
    let control = Control::start(&etcd, 5).await;
    let urls = [control.url()];
    let app = ws_echo().await;
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
    // Past the route's 500 ms timeout: the socket stays.
    tokio::time::sleep(Duration::from_millis(1200)).await;
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
