//! A CA for tests: `weftctl ca init` in a temporary folder, a tokens file
//! with one `proxy:<service>` token per service the tests use, a control
//! plane with that CA, sidecars with the trust bundle, and registrations
//! made by hand.

use xds_proto::v1 as pb;

use crate::{Control, CtlOutput, Etcd, Sidecar, weftctl};

pub const ADMIN: &str = "admin-token-0123456789";
pub const INFERENCE: &str = "inference-token-0123456789";
pub const BARE: &str = "bare-proxy-token-0123456789";
pub const AGENT: &str = "agent-token-0123456789";
pub const BILLING: &str = "billing-token-0123456789";
pub const LEDGER: &str = "ledger-token-0123456789";
pub const MODEL: &str = "model-token-0123456789";
pub const GATEWAY: &str = "gateway-token-0123456789";
pub const SCHEDULER: &str = "scheduler-token-0123456789";
/// Role `tenant:acme`.
pub const ACME: &str = "acme-tenant-token-0123456789";

pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub async fn init() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().to_str().unwrap().to_string();
        let init = weftctl("http://127.0.0.1:1", &["ca", "init", "--out", &out], None).await;
        assert_eq!(init.code, 0, "{init:?}");
        std::fs::write(
            dir.path().join("tokens.yaml"),
            format!(
                "{ADMIN}: admin\n{INFERENCE}: proxy:inference\n{BARE}: proxy\n{AGENT}: proxy:agent\n\
                 {BILLING}: proxy:billing\n{LEDGER}: proxy:ledger\n{MODEL}: proxy:model\n\
                 {GATEWAY}: proxy:gateway\n{SCHEDULER}: proxy:scheduler\n{ACME}: tenant:acme\n"
            ),
        )
        .unwrap();
        Pki { dir }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }

    pub async fn control(&self, etcd: &Etcd, cert_ttl: &str) -> Control {
        let (cert, key, tokens) = (self.path("ca.crt"), self.path("ca.key"), self.path("tokens.yaml"));
        Control::start_with(
            etcd,
            5,
            &["--ca-cert", &cert, "--ca-key", &key, "--tokens", &tokens, "--cert-ttl", cert_ttl],
        )
        .await
    }

    /// weftctl as the admin, over TLS, reading `stdin`.
    pub async fn weftctl_in(&self, control: &Control, args: &[&str], stdin: &str) -> CtlOutput {
        let bundle = self.path("ca.crt");
        let mut all = vec!["--ca-bundle", &bundle, "--token", ADMIN];
        all.extend_from_slice(args);
        weftctl(&control.url(), &all, Some(stdin)).await
    }

    /// weftctl as the admin, over TLS.
    pub async fn weftctl(&self, control: &Control, args: &[&str]) -> CtlOutput {
        let bundle = self.path("ca.crt");
        let mut all = vec!["--ca-bundle", &bundle, "--token", ADMIN];
        all.extend_from_slice(args);
        weftctl(&control.url(), &all, None).await
    }
}

/// A discovery stream over TLS with `token`, saying Hello as `service`.
pub async fn hello(control: &Control, bundle: &str, token: &str, service: &str) -> Result<(), tonic::Status> {
    register(control, bundle, token, service, "127.0.0.1:9", false).await.map(drop)
}

/// A registration of `service` at `address` by hand (as sidecar
/// `forger-<service>`), in force while the returned stream is held.
pub async fn register(
    control: &Control,
    bundle: &str,
    token: &str,
    service: &str,
    address: &str,
    mtls: bool,
) -> Result<Held, tonic::Status> {
    register_as(control, bundle, token, &format!("forger-{service}"), service, address, mtls).await
}

/// [`register`] with the sidecar id `proxy_id`.
pub async fn register_as(
    control: &Control,
    bundle: &str,
    token: &str,
    proxy_id: &str,
    service: &str,
    address: &str,
    mtls: bool,
) -> Result<Held, tonic::Status> {
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
            proxy_id: proxy_id.into(),
            service: service.into(),
            address: address.into(),
            ready: true,
            mtls,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut stream = client.stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    // Accepted: the control plane pushes the service's state.
    stream.message().await?;
    Ok((tx, stream))
}

/// A hand-made registration's stream: dropped, the sidecar is gone.
pub type Held = (tokio::sync::mpsc::Sender<pb::ProxyMessage>, tonic::Streaming<pb::ControlMessage>);

/// A sidecar of `service` with its own token and the trust bundle.
pub async fn secured(
    pki: &Pki,
    control: &Control,
    service: &str,
    token: &str,
    app: std::net::SocketAddr,
    extra: &[&str],
) -> Sidecar {
    let bundle = pki.path("ca.crt");
    let mut args = vec!["--token", token, "--ca-bundle", &bundle];
    args.extend_from_slice(extra);
    Sidecar::start_with(&[control.url()], service, "", app, &format!("{service}-1"), &args).await
}
