//! The connection to the control plane's admin API, with the bearer token,
//! and the failures that end a command (with their exit code).

use std::time::Duration;

use tonic::Code;
use xds_proto::v1::admin_client::AdminClient;

/// A failure with its exit code.
pub(crate) struct Fail(pub(crate) u8, pub(crate) String);

impl From<tonic::Status> for Fail {
    fn from(s: tonic::Status) -> Self {
        match s.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Unknown => {
                Fail(2, format!("control plane: {}", s.message()))
            }
            _ => Fail(1, s.message().to_string()),
        }
    }
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub(crate) struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub(crate) type Client =
    AdminClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>>;

pub(crate) static TOKEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
/// The trust bundle's path (`--ca-bundle`).
pub(crate) static CA_BUNDLE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

pub(crate) async fn connect(url: &str) -> Result<Client, Fail> {
    let bearer = match TOKEN.get().cloned().flatten() {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .map_err(|_| Fail(1, "--token holds characters a header cannot carry".into()))?,
        ),
        None => None,
    };
    let mut ep = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| Fail(1, format!("--control {url}: {e}")))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(15));
    match (CA_BUNDLE.get().cloned().flatten(), url.starts_with("https://")) {
        (Some(path), true) => {
            let pem = std::fs::read_to_string(&path).map_err(|e| Fail(1, format!("--ca-bundle {path}: {e}")))?;
            weft_identity::pem::certificates(&format!("--ca-bundle {path}"), &pem)
                .map_err(|e| Fail(1, e.to_string()))?;
            let tls =
                tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(pem));
            ep = ep.tls_config(tls).map_err(|e| Fail(1, format!("--control {url}: {e}")))?;
        }
        (None, true) => return Err(Fail(1, format!("--control {url}: an https:// control plane needs --ca-bundle"))),
        (Some(_), false) => {
            return Err(Fail(1, format!("--control {url}: with --ca-bundle the control plane is https://")));
        }
        (None, false) => {}
    }
    let ch = ep
        .connect()
        .await
        .map_err(|e| Fail(2, format!("cannot reach the control plane at {url}: {e} (hint: is weft-control running? set --control or WEFT_CONTROL)")))?;
    Ok(AdminClient::with_interceptor(ch, Bearer(bearer)))
}
