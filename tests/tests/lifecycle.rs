//! A sidecar's life: readiness of its app decides whether it gets traffic,
//! and `POST /drain` deregisters it while in-flight requests finish.

use std::sync::atomic::Ordering;
use std::time::Duration;

use harness::{Mesh, Req, eventually, get, pooled_client, send, served_by, weftctl};

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

    // Drain v2 with four requests held in its app.
    let v2 = &mesh.v2;
    v2.mode.set_capacity(0);
    let outbound = mesh.caller.outbound;
    let in_flight: Vec<_> = (0..4).map(|_| tokio::spawn(get(outbound, "inference", "/held"))).collect();
    eventually("the four requests are in v2's app", Duration::from_secs(10), || async move {
        v2.mode.queued.load(Ordering::Relaxed) == 4
    })
    .await;
    let drain = harness::request(mesh.inf_v2.admin, "localhost", "/drain", &[]).await.unwrap();
    assert_eq!(drain.0, 405, "GET /drain is refused: {drain:?}");
    let resp = Req::post(mesh.inf_v2.admin, "localhost", "/drain", "").send().await.unwrap();
    assert_eq!(resp.0, 202);
    eventually("v2 is deregistered", Duration::from_secs(10), || {
        let url = url.clone();
        async move {
            let out = weftctl(&url, &["endpoints", "inference"], None).await;
            out.code == 0 && !out.stdout.contains("inference-v2")
        }
    })
    .await;
    // After the grace period the sidecar stops accepting, while the four
    // requests are still held.
    let inbound = mesh.inf_v2.inbound;
    eventually("v2's sidecar stops accepting", Duration::from_secs(10), || async move {
        tokio::net::TcpStream::connect(inbound).await.is_err()
    })
    .await;
    assert!(in_flight.iter().all(|t| !t.is_finished()), "the held requests are still in flight");
    assert!(!mesh.inf_v2.wait_exit(Duration::ZERO).await, "the sidecar waits for them");
    // Released, they finish with the app's answer, and then the sidecar exits.
    v2.mode.add_capacity(4);
    for t in in_flight {
        let r = t.await.unwrap().expect("in-flight request finished during drain");
        assert_eq!((r.0, served_by(&r).as_str()), (200, "inference/v2"), "{r:?}");
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
