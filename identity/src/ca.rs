//! The certificate authority every control-plane replica shares.
//!
//! It signs two kinds of certificates, both short-lived:
//! - a workload's, for the public key of a sidecar's signing request, with
//!   the sidecar's SPIFFE ID as its one URI SAN, whatever the request asked
//!   for (the service comes from the sidecar's credential, never from the
//!   request);
//! - the control plane's own server certificate, for the names sidecars and
//!   weftctl dial.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use x509_parser::prelude::FromDer;

use crate::spiffe::{SpiffeId, is_trust_domain};
use crate::{Error, pem};

/// Certificates are valid from a little before they are made, so a peer
/// whose clock is slightly behind accepts them.
const BACKDATE: Duration = Duration::from_secs(300);

/// A certificate and its chain, as PEM, and when it expires.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate, then the CA's chain (the CA file's certificates).
    pub chain_pem: String,
    /// Unix milliseconds.
    pub not_after_unix_ms: u64,
}

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA file's certificates: the issuing one first.
    chain: Vec<CertificateDer<'static>>,
    trust_domain: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("trust_domain", &self.trust_domain).finish_non_exhaustive()
    }
}

impl Ca {
    /// A new self-signed root for a quick start: (certificate PEM, key PEM).
    pub fn generate_root(name: &str, valid_for: Duration) -> Result<(String, String), Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.distinguished_name.push(DnType::OrganizationName, "weft");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + valid_for).into();
        let cert = params.self_signed(&key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Loads the CA from its certificate file (the issuing certificate, then
    /// its chain, if an intermediate) and its key. Checks that the issuing
    /// certificate is a CA, unexpired, and the key's.
    pub fn load(cert_pem: &str, key_pem: &str, trust_domain: &str) -> Result<Ca, Error> {
        if !is_trust_domain(trust_domain) {
            return Err(Error::invalid(
                format!("trust domain '{trust_domain}'"),
                "use lowercase letters, digits, '.', '-' or '_'",
            ));
        }
        let chain = pem::certificates("the CA certificate", cert_pem)?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| Error::invalid("the CA key", e))?;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&chain[0])
            .map_err(|e| Error::invalid("the CA certificate", e))?;
        if !cert.is_ca() {
            return Err(Error::invalid("the CA certificate", "is not a CA (basicConstraints cA is not set)"));
        }
        if !cert.validity().is_valid() {
            return Err(Error::invalid(
                "the CA certificate",
                format!("is not valid now (valid {} to {})", cert.validity().not_before, cert.validity().not_after),
            ));
        }
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(Error::invalid("the CA key", "does not belong to the CA certificate"));
        }
        let issuer = Issuer::from_ca_cert_der(&chain[0], key).map_err(|e| Error::invalid("the CA certificate", e))?;
        Ok(Ca { issuer, chain, trust_domain: trust_domain.into() })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The CA's certificates as PEM (the issuing one first).
    pub fn chain_pem(&self) -> String {
        self.chain.iter().map(|c| pem::certificate_pem(c)).collect()
    }

    /// Signs a workload certificate for `service` with the public key of
    /// `csr` (DER; its signature is checked, what it asks for is not used).
    pub fn issue_workload(&self, csr: &[u8], service: &str, ttl: Duration) -> Result<Issued, Error> {
        let csr = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr))
            .map_err(|e| Error::invalid("the certificate signing request", e))?;
        let id = SpiffeId::new(&self.trust_domain, service);
        let uri = id.to_string().try_into().map_err(|e| Error::invalid(format!("identity {id}"), e))?;
        let mut params = leaf(ttl);
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.distinguished_name.push(DnType::CommonName, service);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(self.issued(cert.der(), ttl))
    }

    /// A server certificate for `names` (DNS names or IP addresses) with a
    /// new key: (the issued chain, the key as PEM).
    pub fn issue_server(&self, names: &[String], ttl: Duration) -> Result<(Issued, String), Error> {
        let key = KeyPair::generate()?;
        let mut params = leaf(ttl);
        for n in names {
            let san = match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => {
                    SanType::DnsName(n.clone().try_into().map_err(|e| Error::invalid(format!("server name '{n}'"), e))?)
                }
            };
            params.subject_alt_names.push(san);
        }
        params.distinguished_name.push(DnType::CommonName, "weft-control");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((self.issued(cert.der(), ttl), key.serialize_pem()))
    }

    fn issued(&self, leaf: &[u8], ttl: Duration) -> Issued {
        let not_after = SystemTime::now() + ttl;
        Issued {
            chain_pem: pem::certificate_pem(leaf) + &self.chain_pem(),
            not_after_unix_ms: not_after
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        }
    }
}

fn leaf(ttl: Duration) -> CertificateParams {
    let mut params = CertificateParams::default();
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + ttl).into();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload;

    fn ca() -> Ca {
        let (cert, key) = Ca::generate_root("test root", Duration::from_secs(3600)).unwrap();
        Ca::load(&cert, &key, "weft.local").unwrap()
    }

    #[test]
    fn a_workload_certificate_carries_the_credentials_service_not_the_requests() {
        let ca = ca();
        let key = workload::Key::generate().unwrap();
        // The request asks for another service's identity; the CA does not care.
        let csr = key.signing_request(&SpiffeId::new("weft.local", "billing")).unwrap();
        let issued = ca.issue_workload(&csr, "inference", Duration::from_secs(60)).unwrap();
        let certs = pem::certificates("issued", &issued.chain_pem).unwrap();
        assert_eq!(certs.len(), 2, "the leaf and the CA");
        assert_eq!(SpiffeId::from_certificate(&certs[0]).unwrap().to_string(), "spiffe://weft.local/svc/inference");
        let (_, leaf) = x509_parser::certificate::X509Certificate::from_der(&certs[0]).unwrap();
        assert!(!leaf.is_ca());
        assert_eq!(leaf.public_key().subject_public_key.data.as_ref(), key.public_key_raw(), "the sidecar's own key");
        let ttl = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
        assert_eq!(ttl, 60 + BACKDATE.as_secs() as i64);
    }

    #[test]
    fn a_forged_signing_request_is_refused() {
        let ca = ca();
        let key = workload::Key::generate().unwrap();
        let mut csr = key.signing_request(&SpiffeId::new("weft.local", "a")).unwrap();
        let n = csr.len();
        csr[n - 5] ^= 0xff;
        let e = ca.issue_workload(&csr, "a", Duration::from_secs(60)).unwrap_err().to_string();
        assert!(e.starts_with("the certificate signing request:"), "{e}");
    }

    #[test]
    fn loading_checks_the_ca_and_its_key() {
        let (cert, key) = Ca::generate_root("a", Duration::from_secs(3600)).unwrap();
        let (_, other_key) = Ca::generate_root("b", Duration::from_secs(3600)).unwrap();
        let e = Ca::load(&cert, &other_key, "weft.local").unwrap_err().to_string();
        assert_eq!(e, "the CA key: does not belong to the CA certificate");
        let e = Ca::load(&cert, &key, "Weft").unwrap_err().to_string();
        assert!(e.starts_with("trust domain 'Weft'"), "{e}");
        let e = Ca::load("not pem", &key, "weft.local").unwrap_err().to_string();
        assert!(e.starts_with("the CA certificate"), "{e}");
        // A leaf is not a CA.
        let ca = Ca::load(&cert, &key, "weft.local").unwrap();
        let (server, server_key) = ca.issue_server(&["localhost".into()], Duration::from_secs(60)).unwrap();
        let e = Ca::load(&server.chain_pem, &server_key, "weft.local").unwrap_err().to_string();
        assert!(e.contains("is not a CA"), "{e}");
    }
}
