//! The control plane's gRPC over TLS, with a server certificate it issues
//! itself from its CA and renews at two thirds of its lifetime (new
//! connections get the new one; open streams are not touched).

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use weft_identity::{Ca, pem};

/// TLS handshakes in progress at most; more connections wait to be accepted.
const HANDSHAKES: usize = 256;
/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The current server certificate, swapped on renewal.
#[derive(Debug)]
struct Current(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

fn certified(ca: &Ca, names: &[String], ttl: Duration) -> anyhow::Result<CertifiedKey> {
    let (issued, key_pem) = ca.issue_server(names, ttl)?;
    let chain = pem::certificates("the server certificate", &issued.chain_pem)?;
    let key = pem::private_key("the server key", &key_pem)?;
    let provider = rustls::crypto::ring::default_provider();
    Ok(CertifiedKey::from_der(chain, key, &provider)?)
}

/// Accepts TLS connections on `listener` for tonic, with a certificate for
/// `names` from `ca`, renewed every `ttl` × 2/3.
pub fn incoming(
    listener: TcpListener,
    ca: Arc<Ca>,
    names: Vec<String>,
    ttl: Duration,
) -> anyhow::Result<ReceiverStream<std::io::Result<TlsStream<TcpStream>>>> {
    let current = Arc::new(Current(ArcSwap::from_pointee(certified(&ca, &names, ttl)?)));
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(current.clone());
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(ttl * 2 / 3);
        tick.tick().await;
        loop {
            tick.tick().await;
            match certified(&ca, &names, ttl) {
                Ok(c) => {
                    current.0.store(Arc::new(c));
                    tracing::info!("renewed the control plane's server certificate");
                }
                Err(e) => tracing::error!(error = %e, "cannot renew the control plane's server certificate"),
            }
        }
    });
    let (tx, rx) = mpsc::channel(HANDSHAKES);
    let slots = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else { return };
            let (tcp, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    continue;
                }
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            // Each handshake on its own: a slow client never holds up the others.
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                }
            });
        }
    });
    Ok(ReceiverStream::new(rx))
}
