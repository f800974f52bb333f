//! A sidecar's life: readiness of its app decides whether it gets traffic,
//! and `POST /drain` deregisters it while in-flight requests finish.

use std::time::Duration;

use harness::{Mesh, eventually, get, pooled_client, send, served_by, weftctl};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_app_gets_no_traffic_and_drain_finishes_in_flight_then_deregisters() {
    let mut mesh = Mesh::start(5).await;
    let url = mesh.control_url();

    // v1's app stops accepting: its instance turns not-ready everywhere.
    mesh.v1.stop();
    eventually("weftctl endpoints shows v1 not ready", Duration::from_secs(20), || {
        let url = url.clone();
        async move {
            let out = weftctl(&url, &["endpoints", "inference", "-o", "json"], None).await;
            let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
            v.as_array().is_some_and(|eps| {
                eps.iter().any(|e| e["proxy"] == "inference-v1" && e["ready"] == false)
                    && eps.iter().any(|e| e["proxy"] == "inference-v2" && e["ready"] == true)
            })
        }
    })
    .await;
    let ready = get(mesh.inf_v1.admin, "localhost", "/ready").await.unwrap();
    assert_eq!(ready.0, 503, "{ready:?}");
    let caller = &mesh.caller;
    eventually("caller sees v1 not ready", Duration::from_secs(20), || async move {
        let cfg = caller.config().await;
        cfg["services"]["inference"]["endpoints"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["proxy_id"] == "inference-v1" && e["ready"] == false))
    })
    .await;
    let client = pooled_client();
    for _ in 0..20 {
        let r = send(&client, mesh.caller.outbound, "inference", "/", &[]).await.unwrap();
        assert_eq!(served_by(&r), "inference/v2", "{r:?}");
    }

    // Drain v2 with requests in flight.
    let outbound = mesh.caller.outbound;
    let in_flight: Vec<_> =
        (0..4).map(|_| tokio::spawn(async move { get(outbound, "inference", "/?sleep_ms=1000").await })).collect();
    let inf_v2 = &mesh.inf_v2;
    eventually("requests reach v2", Duration::from_secs(10), || async move {
        inf_v2.metrics().await.contains("direction=\"inbound\"")
    })
    .await;
    let drain = harness::request(mesh.inf_v2.admin, "localhost", "/drain", &[]).await.unwrap();
    assert_eq!(drain.0, 405, "GET /drain is refused: {drain:?}");
    let resp = post(mesh.inf_v2.admin, "/drain").await;
    assert_eq!(resp, 202);
    eventually("v2 is deregistered", Duration::from_secs(10), || {
        let url = url.clone();
        async move {
            let out = weftctl(&url, &["endpoints", "inference"], None).await;
            out.code == 0 && !out.stdout.contains("inference-v2")
        }
    })
    .await;
    for t in in_flight {
        let r = t.await.unwrap().expect("in-flight request finished during drain");
        assert_eq!(r.0, 200);
    }
    assert!(mesh.inf_v2.wait_exit(Duration::from_secs(20)).await, "drained sidecar exits");
    // No instance of inference is ready now.
    let caller = &mesh.caller;
    eventually("caller has no ready inference endpoint", Duration::from_secs(10), || async move {
        let r = get(caller.outbound, "inference", "/").await.unwrap();
        r.0 == 503 && r.1["x-weft-error"] == "no-endpoints"
    })
    .await;
}

async fn post(addr: std::net::SocketAddr, path: &str) -> u16 {
    let client = pooled_client();
    let req = http::Request::post(format!("http://{addr}{path}"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    client.request(req).await.unwrap().status().as_u16()
}
