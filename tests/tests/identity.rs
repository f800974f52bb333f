//! Workload identity: the control plane's CA, gRPC over TLS, certificates
//! issued to sidecars for the service their credential names, renewed
//! before they expire, and shown by `weftctl status`.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use harness::pki::{ADMIN, AGENT, BARE, BILLING, INFERENCE, LEDGER, MODEL, Pki, hello, register, register_as, secured};
use harness::{Backend, Etcd, Sidecar, eventually, example_pb, weftctl};
use xds_proto::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_get_short_lived_certificates_for_their_own_service_over_tls_and_renew_them() {
    let pki = Pki::init().await;
    let key_mode = std::fs::metadata(pki.path("ca.key")).unwrap().permissions().mode() & 0o777;
    assert_eq!(key_mode, 0o600, "the CA key is its owner's only");
    let again = weftctl("http://127.0.0.1:1", &["ca", "init", "--out", &pki.path("")], None).await;
    assert!(again.code == 1 && again.stderr.contains("exists; not overwriting a CA"), "{again:?}");

    let etcd = Etcd::start().await;
    let control = pki.control(&etcd, "6s").await;
    assert!(control.url().starts_with("https://"), "{}", control.url());
    let bundle = pki.path("ca.crt");

    let app = Backend::http("inference", "v1").await;
    let urls = [control.url()];
    let sidecar =
        Sidecar::start_with(&urls, "inference", "", app.addr, "inf-1", &["--token", INFERENCE, "--ca-bundle", &bundle])
            .await;
    let identity = |cfg: serde_json::Value| cfg["identity"].clone();
    let s = &sidecar;
    eventually("the sidecar has its certificate", Duration::from_secs(20), || async move {
        identity(s.config().await)["id"] == "spiffe://weft.local/svc/inference"
    })
    .await;
    let first = identity(sidecar.config().await)["not_after_unix_ms"].as_u64().unwrap();

    // weftctl over TLS shows who it is and when its certificate expires
    // (the record is written just after the certificate is sent).
    let (p, c) = (&pki, &control);
    eventually("status shows the identity", Duration::from_secs(10), || async move {
        p.weftctl(c, &["status"]).await.stdout.contains("spiffe://weft.local/svc/inference")
    })
    .await;
    let status = pki.weftctl(&control, &["status"]).await;
    assert_eq!(status.code, 0, "{status:?}");
    let row = status.stdout.lines().find(|l| l.starts_with("inf-1")).unwrap_or_else(|| panic!("{status:?}"));
    assert!(row.contains("spiffe://weft.local/svc/inference"), "{row}");
    assert!(row.contains("Z"), "an expiry time: {row}");
    let json: serde_json::Value =
        serde_json::from_str(&pki.weftctl(&control, &["status", "-o", "json"]).await.stdout).unwrap();
    assert!(json[0]["cert_not_after_unix_ms"].as_u64().unwrap() >= first);

    // Renewed at two thirds of its 6 s lifetime, before it expires.
    eventually("the certificate is renewed", Duration::from_secs(20), || async move {
        identity(s.config().await)["not_after_unix_ms"].as_u64().unwrap_or(0) > first
    })
    .await;
    let second = identity(sidecar.config().await)["not_after_unix_ms"].as_u64().unwrap();
    assert!(second < first + 6_000, "renewed before the first one ran out ({first} → {second})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_registers_and_gets_a_certificate_only_for_its_own_service() {
    let pki = Pki::init().await;
    let etcd = Etcd::start().await;
    let control = pki.control(&etcd, "1h").await;
    let bundle = pki.path("ca.crt");
    hello(&control, &bundle, INFERENCE, "inference").await.expect("its own service");
    let e = hello(&control, &bundle, INFERENCE, "billing").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert_eq!(e.message(), "403: a token for service inference cannot register service billing");
    // With a CA, a bare `proxy` token names no service: it gets nothing.
    let e = hello(&control, &bundle, BARE, "inference").await.unwrap_err();
    assert!(e.message().contains("proxy:<service>"), "{e:?}");
    let endpoints = pki.weftctl(&control, &["endpoints", "billing"]).await;
    assert!(!endpoints.stdout.contains("forger"), "nothing was registered for billing: {endpoints:?}");

    // A sidecar id is one service's: billing's credential cannot take over
    // inference's sidecar record.
    let (tx, _stream) =
        register_as(&control, &bundle, INFERENCE, "inf-7", "inference", "127.0.0.1:9", false).await.unwrap();
    let p = &pki;
    let c = &control;
    eventually("inf-7 is registered", Duration::from_secs(10), || async move {
        p.weftctl(c, &["status"]).await.stdout.contains("inf-7")
    })
    .await;
    let e = register_as(&control, &bundle, BILLING, "inf-7", "billing", "127.0.0.1:9", false).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert_eq!(e.message(), "403: sidecar id inf-7 is registered for service inference, not billing");

    // Degraded-call reports: one sidecar sends at most a burst of 1000.
    let call = |i: u64| pb::DegradedCall {
        service: "inference".into(),
        reasons: "retry=1".into(),
        unix_ms: i,
        ..Default::default()
    };
    let calls = (0..1500).map(call).collect();
    tx.send(pb::ProxyMessage {
        msg: Some(pb::proxy_message::Msg::Degraded(pb::DegradedReports { calls, dropped: 0 })),
    })
    .await
    .unwrap();
    eventually("the excess reports are dropped", Duration::from_secs(10), || async move {
        let m = c.metrics().await;
        harness::metric(&m, "weft_control_degraded_dropped_total", &[]) >= 499.0
            && harness::metric(&m, "weft_control_degraded_reports_total", &[]) <= 1001.0
    })
    .await;
    drop(tx);

    // The API speaks TLS only; weftctl needs the bundle for it.
    let plain = weftctl(&control.url().replace("https://", "http://"), &["--token", ADMIN, "status"], None).await;
    assert_ne!(plain.code, 0, "{plain:?}");
    let no_bundle = weftctl(&control.url(), &["--token", ADMIN, "status"], None).await;
    assert!(no_bundle.stderr.contains("needs --ca-bundle"), "{no_bundle:?}");
    // A bundle that does not hold the control plane's CA: the handshake fails.
    let other = Pki::init().await;
    let wrong =
        weftctl(&control.url(), &["--ca-bundle", &other.path("ca.crt"), "--token", ADMIN, "status"], None).await;
    assert_eq!(wrong.code, 2, "{wrong:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_speak_mtls_the_callee_learns_who_called_and_plaintext_is_refused() {
    let pki = Pki::init().await;
    let etcd = Etcd::start().await;
    let control = pki.control(&etcd, "1h").await;
    let (inf_app, agent_app, model_app) = (
        Backend::http("inference", "v1").await,
        Backend::http("agent", "v1").await,
        Backend::grpc("model", "v1").await,
    );
    let (inf, agent, _model) = tokio::join!(
        secured(&pki, &control, "inference", INFERENCE, inf_app.addr, &[]),
        secured(&pki, &control, "agent", AGENT, agent_app.addr, &[]),
        secured(&pki, &control, "model", MODEL, model_app.addr, &[]),
    );
    let a = &agent;
    eventually("the caller lists inference as speaking mTLS", Duration::from_secs(10), || async move {
        let _ = harness::get(a.outbound, "inference", "/").await;
        a.config().await["services"]["inference"]["endpoints"][0]["mtls"] == true
    })
    .await;

    // HTTP/1.1: the app learns the caller's identity; a caller's own value
    // of the header is not believed.
    let forged = [("x-weft-client-id", "spiffe://weft.local/svc/admin")];
    let (status, headers, body) = harness::request(agent.outbound, "inference", "/", &forged).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["echo-x-weft-client-id"], "spiffe://weft.local/svc/agent");
    // HTTP/2 keeps its protocol over mTLS (ALPN h2).
    let (status, headers, body) = harness::h2_send(agent.outbound, "inference", "/", &forged).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["echo-x-weft-client-id"], "spiffe://weft.local/svc/agent");
    // gRPC, unary and streaming.
    let mut client = harness::inference_client(agent.outbound, "http://model:50051").await;
    let reply = client
        .infer(example_pb::InferRequest { prompt: "hi".into(), tokens: 1, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.text, "echo: hi");
    let mut stream = client
        .generate(example_pb::InferRequest { prompt: "t".into(), tokens: 3, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(m) = tokio_stream::StreamExt::next(&mut stream).await {
        m.unwrap();
        n += 1;
    }
    assert_eq!(n, 3);

    // Strict: a process that skips the caller's sidecar gets nothing.
    let hits = inf_app.mode.hits.load(std::sync::atomic::Ordering::SeqCst);
    let direct = harness::request(inf.inbound, "inference", "/", &forged).await;
    assert!(direct.is_err(), "plaintext to a strict inbound listener: {direct:?}");
    assert_eq!(inf_app.mode.hits.load(std::sync::atomic::Ordering::SeqCst), hits, "the app saw nothing");
    assert!(inf.metrics().await.contains("weft_inbound_plaintext_total{mode=\"strict\"} 1"), "{}", inf.metrics().await);

    // Permissive: plaintext served and counted, with no identity.
    let billing_app = Backend::http("billing", "v1").await;
    let billing =
        secured(&pki, &control, "billing", BILLING, billing_app.addr, &["--inbound-mtls", "permissive"]).await;
    let (status, headers, _) = harness::request(billing.inbound, "billing", "/", &forged).await.unwrap();
    assert_eq!(status, 200);
    assert!(headers.get("echo-x-weft-client-id").is_none(), "no identity over plaintext: {headers:?}");
    assert!(billing.metrics().await.contains("weft_inbound_plaintext_total{mode=\"permissive\"} 1"));
    let (_, headers, _) = harness::request(agent.outbound, "billing", "/", &[]).await.unwrap();
    assert_eq!(headers["echo-x-weft-client-id"], "spiffe://weft.local/svc/agent", "callers still use mTLS");

    // An endpoint of `ledger` that is really billing's sidecar: the caller
    // checks who answers, refuses it, and billing's app sees nothing.
    let bundle = pki.path("ca.crt");
    let _forged = register(&control, &bundle, LEDGER, "ledger", &billing.inbound.to_string(), true).await.unwrap();
    let billing_hits = billing_app.mode.hits.load(std::sync::atomic::Ordering::SeqCst);
    let (status, headers, body) = harness::request(agent.outbound, "ledger", "/", &[]).await.unwrap();
    assert_eq!(status, 502, "{headers:?} {body}");
    assert!(body.contains("the peer is spiffe://weft.local/svc/billing, not service ledger"), "{body}");
    assert_eq!(billing_app.mode.hits.load(std::sync::atomic::Ordering::SeqCst), billing_hits);
}

/// Runs `count` HTTP/1.1 calls, one after another, from `caller` to
/// `service`; returns the statuses that were not 200.
async fn steady(caller: std::net::SocketAddr, service: &str, count: usize, every: Duration) -> Vec<String> {
    let mut failed = Vec::new();
    let mut tick = tokio::time::interval(every);
    for _ in 0..count {
        tick.tick().await;
        match harness::get(caller, service, "/").await {
            Ok((200, _, _)) => {}
            Ok((s, h, b)) => failed.push(format!("{s} {:?} {b}", h.get("x-weft-error"))),
            Err(e) => failed.push(e),
        }
    }
    failed
}

/// `n` calls at once: each needs a connection of its own, so most are new
/// mTLS handshakes.
async fn burst(caller: std::net::SocketAddr, service: &str, n: usize) -> Vec<u16> {
    let calls = (0..n).map(|_| async move { harness::get(caller, service, "/").await.map(|r| r.0).unwrap_or(0) });
    futures_util::future::join_all(calls).await
}

fn not_after(cfg: &serde_json::Value) -> u64 {
    cfg["identity"]["not_after_unix_ms"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_renewed_under_steady_load_lose_no_request() {
    let pki = Pki::init().await;
    let etcd = Etcd::start().await;
    // Renewed every ~4 s.
    let control = pki.control(&etcd, "6s").await;
    let (inf_app, agent_app) = (Backend::http("inference", "v1").await, Backend::http("agent", "v1").await);
    let (inf, agent) = tokio::join!(
        secured(&pki, &control, "inference", INFERENCE, inf_app.addr, &[]),
        secured(&pki, &control, "agent", AGENT, agent_app.addr, &[]),
    );
    let firsts = (not_after(&inf.config().await), not_after(&agent.config().await));
    // 10 s of calls at 40/s: each side renews at least twice meanwhile.
    let failed = steady(agent.outbound, "inference", 400, Duration::from_millis(25)).await;
    assert!(failed.is_empty(), "{} of 400 calls failed across renewals: {failed:?}", failed.len());
    let (inf_now, agent_now) = (not_after(&inf.config().await), not_after(&agent.config().await));
    assert!(
        inf_now > firsts.0 + 3_000 && agent_now > firsts.1 + 3_000,
        "both renewed: {firsts:?} → {inf_now}, {agent_now}"
    );
    // The connection opened with the first certificates is still in use,
    // and new ones are made with the renewed ones.
    let statuses = burst(agent.outbound, "inference", 8).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(!inf.metrics().await.contains("weft_inbound_tls_failed_total"), "{}", inf.metrics().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_rotation_with_an_overlapping_bundle_loses_no_request() {
    // The old CA and the new one; every sidecar trusts both.
    let (old, new) = (Pki::init().await, Pki::init().await);
    let both = old.path("both.crt");
    let pem = |p: &Pki| std::fs::read_to_string(p.path("ca.crt")).unwrap();
    std::fs::write(&both, format!("{}{}", pem(&old), pem(&new))).unwrap();
    let etcd = Etcd::start().await;
    // Replicas move to the new CA one at a time: for a while one signs with
    // the old CA and one with the new.
    let (mut old_control, new_control) = tokio::join!(old.control(&etcd, "6s"), new.control(&etcd, "6s"));
    let (inf_app, agent_app) = (Backend::http("inference", "v1").await, Backend::http("agent", "v1").await);
    let start = |service: &'static str, token: &'static str, app, urls: Vec<String>| {
        let both = both.clone();
        async move {
            let args = ["--token", token, "--ca-bundle", &both];
            Sidecar::start_with(&urls, service, "", app, &format!("{service}-1"), &args).await
        }
    };
    let (inf, agent) = tokio::join!(
        start("inference", INFERENCE, inf_app.addr, vec![old_control.url(), new_control.url()]),
        start("agent", AGENT, agent_app.addr, vec![new_control.url()]),
    );
    // One certificate from each CA: calls both ways.
    assert!(steady(agent.outbound, "inference", 20, Duration::from_millis(10)).await.is_empty());
    assert!(steady(inf.outbound, "agent", 20, Duration::from_millis(10)).await.is_empty());

    // The last replica with the old CA goes; its sidecars move to the new
    // one and renew under load.
    let before = not_after(&inf.config().await);
    let load = tokio::spawn(steady(agent.outbound, "inference", 320, Duration::from_millis(25)));
    old_control.kill().await;
    let failed = load.await.unwrap();
    assert!(failed.is_empty(), "{} of 320 calls failed during the CA rotation: {failed:?}", failed.len());
    let after = not_after(&inf.config().await);
    assert!(after > before + 3_000, "inference renewed from the new CA: {before} → {after}");
    assert_eq!(burst(inf.outbound, "agent", 4).await, vec![200; 4]);
    assert_eq!(burst(agent.outbound, "inference", 4).await, vec![200; 4]);
}
