//! The rustls pieces of mTLS between sidecars.
//!
//! A caller verifies the callee's chain against the trust bundle and that
//! its SPIFFE ID names the service it meant to reach (passed as the TLS
//! server name, which is a service name: one DNS label); rustls's WebPKI
//! verifier would look for a DNS name instead. A callee verifies the
//! caller's chain (client-auth usage) and reads its identity after the
//! handshake.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::{ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::{Error, SpiffeId, pem};

/// The crypto provider of every weft TLS config.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The trust bundle's roots.
pub fn roots(what: &str, bundle_pem: &str) -> Result<Arc<RootCertStore>, Error> {
    let mut roots = RootCertStore::empty();
    for cert in pem::certificates(what, bundle_pem)? {
        roots.add(cert).map_err(|e| Error::invalid(what, e))?;
    }
    Ok(Arc::new(roots))
}

/// The server-name a caller dials a service by: the service's name.
pub fn server_name(service: &str) -> Result<ServerName<'static>, Error> {
    ServerName::try_from(service.to_string()).map_err(|e| Error::invalid(format!("service '{service}'"), e))
}

/// Verifies a callee: its chain, and that it is the service dialled.
#[derive(Debug)]
pub struct ServiceVerifier {
    roots: Arc<RootCertStore>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServiceVerifier {
    pub fn new(roots: Arc<RootCertStore>) -> ServiceVerifier {
        ServiceVerifier { roots, algs: provider().signature_verification_algorithms }
    }
}

/// The identity a callee presented is not the service dialled (Debug reads
/// as the message: rustls prints its errors' causes with it).
struct WrongService {
    expected: String,
    presented: String,
}

impl std::fmt::Display for WrongService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the peer is {}, not service {}", self.presented, self.expected)
    }
}

impl std::fmt::Debug for WrongService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for WrongService {}

fn other(e: impl std::error::Error + Send + Sync + 'static) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
}

impl ServerCertVerifier for ServiceVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(&cert, &self.roots, intermediates, now, self.algs.all)?;
        let expected = match server_name {
            ServerName::DnsName(n) => n.as_ref().to_string(),
            other_name => {
                return Err(other(WrongService { expected: format!("{other_name:?}"), presented: "-".into() }));
            }
        };
        let id = SpiffeId::from_certificate(end_entity).map_err(other)?;
        if id.service != expected {
            return Err(other(WrongService { expected, presented: id.to_string() }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// A caller's config: TLS 1.3, its certificate from `cert`, callees
/// verified by [`ServiceVerifier`], offering `alpn`.
pub fn client_config(
    roots: Arc<RootCertStore>,
    cert: Arc<dyn ResolvesClientCert>,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, Error> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::invalid("TLS client", e))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServiceVerifier::new(roots)))
        .with_client_cert_resolver(cert);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A callee's config: TLS 1.3, its certificate from `cert`, a client
/// certificate required and verified against the bundle, `alpn` accepted.
pub fn server_config(
    roots: Arc<RootCertStore>,
    cert: Arc<dyn ResolvesServerCert>,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, Error> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| Error::invalid("TLS client verifier", e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::invalid("TLS server", e))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::Ca;
    use crate::workload::Key;

    fn leaf(ca: &Ca, service: &str) -> Vec<CertificateDer<'static>> {
        let key = Key::generate().unwrap();
        let csr = key.signing_request(&SpiffeId::new("weft.local", service)).unwrap();
        pem::certificates("leaf", &ca.issue_workload(&csr, service, Duration::from_secs(60)).unwrap().chain_pem)
            .unwrap()
    }

    #[test]
    fn a_callee_must_be_the_service_dialled_and_chain_to_the_bundle() {
        let (cert, key) = Ca::generate_root("root", Duration::from_secs(3600)).unwrap();
        let ca = Ca::load(&cert, &key, "weft.local").unwrap();
        let verifier = ServiceVerifier::new(roots("bundle", &cert).unwrap());
        let chain = leaf(&ca, "inference");
        let now = UnixTime::now();
        let verify =
            |name: &str| verifier.verify_server_cert(&chain[0], &chain[1..], &server_name(name).unwrap(), &[], now);
        assert!(verify("inference").is_ok());
        let e = verify("billing").unwrap_err().to_string();
        assert!(e.contains("the peer is spiffe://weft.local/svc/inference, not service billing"), "{e}");
        // Another CA's certificate for the right service: refused.
        let (other_cert, other_key) = Ca::generate_root("other", Duration::from_secs(3600)).unwrap();
        let stranger = leaf(&Ca::load(&other_cert, &other_key, "weft.local").unwrap(), "inference");
        assert!(verifier.verify_server_cert(&stranger[0], &[], &server_name("inference").unwrap(), &[], now).is_err());
        // A bundle of two roots (a CA rotation) trusts both.
        let both = ServiceVerifier::new(roots("bundle", &format!("{cert}{other_cert}")).unwrap());
        assert!(both.verify_server_cert(&stranger[0], &[], &server_name("inference").unwrap(), &[], now).is_ok());
        assert!(both.verify_server_cert(&chain[0], &[], &server_name("inference").unwrap(), &[], now).is_ok());
    }
}
