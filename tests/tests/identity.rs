//! Workload identity: the control plane's CA, gRPC over TLS, certificates
//! issued to sidecars for the service their credential names, renewed
//! before they expire, and shown by `weftctl status`.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use harness::{Backend, Control, Etcd, Sidecar, eventually, weftctl};
use xds_proto::v1 as pb;

const ADMIN: &str = "admin-token-0123456789";
const INFERENCE: &str = "inference-token-0123456789";
const BARE: &str = "bare-proxy-token-0123456789";

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    async fn init() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().to_str().unwrap().to_string();
        let init = weftctl("http://127.0.0.1:1", &["ca", "init", "--out", &out], None).await;
        assert_eq!(init.code, 0, "{init:?}");
        std::fs::write(
            dir.path().join("tokens.yaml"),
            format!("{ADMIN}: admin\n{INFERENCE}: proxy:inference\n{BARE}: proxy\n"),
        )
        .unwrap();
        Pki { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }

    async fn control(&self, etcd: &Etcd, cert_ttl: &str) -> Control {
        let (cert, key, tokens) = (self.path("ca.crt"), self.path("ca.key"), self.path("tokens.yaml"));
        Control::start_with(
            etcd,
            5,
            &["--ca-cert", &cert, "--ca-key", &key, "--tokens", &tokens, "--cert-ttl", cert_ttl],
        )
        .await
    }

    /// weftctl as the admin, over TLS.
    async fn weftctl(&self, control: &Control, args: &[&str]) -> harness::CtlOutput {
        let bundle = self.path("ca.crt");
        let mut all = vec!["--ca-bundle", &bundle, "--token", ADMIN];
        all.extend_from_slice(args);
        weftctl(&control.url(), &all, None).await
    }
}

/// A discovery stream over TLS with `token`, saying Hello as `service`.
async fn hello(control: &Control, bundle: &str, token: &str, service: &str) -> Result<(), tonic::Status> {
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read_to_string(bundle).unwrap()));
    let channel = tonic::transport::Endpoint::from_shared(control.url())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    let mut client =
        pb::discovery_client::DiscoveryClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", bearer.clone());
            Ok(r)
        });
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::ProxyMessage {
        msg: Some(pb::proxy_message::Msg::Hello(pb::Hello {
            proxy_id: format!("forger-{service}"),
            service: service.into(),
            address: "127.0.0.1:9".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut stream = client.stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    // Accepted: the control plane pushes the service's state.
    stream.message().await?;
    Ok(())
}

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
