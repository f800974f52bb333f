//! mTLS between sidecars (TLS 1.3), with the workload certificate in force.
//!
//! - A caller dials an endpoint the control plane lists as speaking mTLS
//!   with the service's name as the TLS server name, and checks that the
//!   callee's SPIFFE ID is that service ([`weft_identity::tls`]). It offers
//!   the protocol of the call in ALPN (`http/1.1` or `h2`), so gRPC and
//!   HTTP/1.1 keep theirs.
//! - A callee tells a TLS connection from a plaintext one by its first byte
//!   (a handshake record is `0x16`; no HTTP request starts so), requires and
//!   verifies the caller's certificate, and keeps the caller's identity on
//!   the connection. Plaintext is refused (`strict`) or served and counted
//!   (`permissive`).
//!
//! Both sides read the certificate through [`Workload::current`] at each
//! handshake, so a renewal applies to the next connection and leaves open
//! ones alone.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{SignatureScheme, pki_types::CertificateDer};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};
use weft_identity::SpiffeId;

use crate::workload::Workload;

/// Longest TLS handshake, and longest wait for an inbound connection's
/// first byte.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the inbound listener does with a plaintext connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InboundMtls {
    /// Refused: every caller must present a workload certificate.
    Strict,
    /// Served, and counted in `weft_inbound_plaintext_total` (migration).
    Permissive,
}

/// The workload certificate in force, for rustls.
struct Current(Arc<Workload>);

impl std::fmt::Debug for Current {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the workload certificate in force")
    }
}

impl Current {
    fn key(&self) -> Option<Arc<CertifiedKey>> {
        self.0.current.load().as_ref().map(|c| c.key.clone())
    }
}

impl ResolvesClientCert for Current {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.key()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.key()
    }
}

/// The caller's side: one connector per protocol offered.
pub(crate) struct ClientTls {
    h1: TlsConnector,
    h2: TlsConnector,
}

impl ClientTls {
    pub(crate) fn new(workload: &Arc<Workload>) -> Result<ClientTls, weft_identity::Error> {
        let roots = weft_identity::tls::roots("--ca-bundle", &workload.bundle_pem)?;
        let cert: Arc<dyn ResolvesClientCert> = Arc::new(Current(workload.clone()));
        let config = |alpn: &[u8]| -> Result<TlsConnector, weft_identity::Error> {
            let c = weft_identity::tls::client_config(roots.clone(), cert.clone(), &[alpn])?;
            Ok(TlsConnector::from(Arc::new(c)))
        };
        Ok(ClientTls { h1: config(b"http/1.1")?, h2: config(b"h2")? })
    }

    /// The handshake on `tcp` with an instance of `service`.
    pub(crate) async fn connect(
        &self,
        tcp: TcpStream,
        service: &str,
        h2: bool,
    ) -> Result<client::TlsStream<TcpStream>, String> {
        let name = weft_identity::tls::server_name(service).map_err(|e| e.to_string())?;
        let connector = if h2 { &self.h2 } else { &self.h1 };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp)).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(format!("TLS: {}", tls_error(&e))),
            Err(_) => Err(format!("TLS: no handshake within {HANDSHAKE_TIMEOUT:?}")),
        }
    }
}

/// rustls's error inside an I/O error, whose own text is only its kind.
fn tls_error(e: &std::io::Error) -> String {
    match e.get_ref() {
        Some(inner) => inner.to_string(),
        None => e.to_string(),
    }
}

/// The callee's side.
pub(crate) struct ServerTls {
    acceptor: TlsAcceptor,
    mode: InboundMtls,
}

/// An inbound connection after its first byte.
pub(crate) enum Accepted {
    /// mTLS, with the caller's identity.
    Tls(Box<server::TlsStream<TcpStream>>, SpiffeId),
    /// Plaintext (permissive mode).
    Plain(TcpStream),
}

impl ServerTls {
    pub(crate) fn new(workload: &Arc<Workload>, mode: InboundMtls) -> Result<ServerTls, weft_identity::Error> {
        let roots = weft_identity::tls::roots("--ca-bundle", &workload.bundle_pem)?;
        let cert: Arc<dyn ResolvesServerCert> = Arc::new(Current(workload.clone()));
        let config = weft_identity::tls::server_config(roots, cert, &[b"h2", b"http/1.1"])?;
        Ok(ServerTls { acceptor: TlsAcceptor::from(Arc::new(config)), mode })
    }

    /// Plaintext callers are served (and counted).
    pub(crate) fn permissive(&self) -> bool {
        matches!(self.mode, InboundMtls::Permissive)
    }

    /// Tells TLS from plaintext and completes the handshake; `Err` names why
    /// the connection is dropped.
    pub(crate) async fn accept(&self, tcp: TcpStream) -> Result<Accepted, String> {
        let mut first = [0u8; 1];
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await {
            Ok(Ok(1)) => first[0] == 0x16,
            Ok(Ok(_)) => return Err("closed before its first byte".into()),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err(format!("no byte within {HANDSHAKE_TIMEOUT:?}")),
        };
        if !tls {
            let mode = match self.mode {
                InboundMtls::Strict => "strict",
                InboundMtls::Permissive => "permissive",
            };
            metrics::counter!("weft_inbound_plaintext_total", "mode" => mode).increment(1);
            return match self.mode {
                InboundMtls::Strict => Err("plaintext refused (--inbound-mtls strict)".into()),
                InboundMtls::Permissive => Ok(Accepted::Plain(tcp)),
            };
        }
        let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(tcp)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                metrics::counter!("weft_inbound_tls_failed_total").increment(1);
                return Err(format!("TLS: {}", tls_error(&e)));
            }
            Err(_) => return Err(format!("TLS: no handshake within {HANDSHAKE_TIMEOUT:?}")),
        };
        let peer = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).map(CertificateDer::as_ref);
        let Some(peer) = peer else { return Err("TLS: the caller presented no certificate".into()) };
        let id = SpiffeId::from_certificate(peer).map_err(|e| format!("TLS: the caller's certificate: {e}"))?;
        Ok(Accepted::Tls(Box::new(stream), id))
    }
}
