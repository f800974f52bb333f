//! Workload identities: `spiffe://<trust-domain>/svc/<service>`.

use std::fmt;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::Error;

/// A service's identity in a trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub service: String,
}

impl SpiffeId {
    pub fn new(trust_domain: &str, service: &str) -> SpiffeId {
        SpiffeId { trust_domain: trust_domain.into(), service: service.into() }
    }

    /// Parses `spiffe://<trust-domain>/svc/<service>`.
    pub fn parse(uri: &str) -> Result<SpiffeId, Error> {
        let bad = |reason: &str| Error::invalid(format!("identity '{uri}'"), reason);
        let rest = uri.strip_prefix("spiffe://").ok_or_else(|| bad("not a spiffe:// URI"))?;
        let (domain, path) = rest.split_once('/').ok_or_else(|| bad("no path"))?;
        if !is_trust_domain(domain) {
            return Err(bad("the trust domain must be lowercase letters, digits, '.', '-' or '_'"));
        }
        let service = path.strip_prefix("svc/").ok_or_else(|| bad("the path is not /svc/<service>"))?;
        if service.is_empty() || service.contains('/') {
            return Err(bad("the path is not /svc/<service>"));
        }
        Ok(SpiffeId::new(domain, service))
    }

    /// The identity in a certificate's URI SANs (DER), if it has exactly
    /// one `spiffe://` URI.
    pub fn from_certificate(der: &[u8]) -> Result<SpiffeId, Error> {
        let (_, cert) =
            x509_parser::certificate::X509Certificate::from_der(der).map_err(|e| Error::invalid("certificate", e))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| Error::invalid("certificate", e))?
            .ok_or_else(|| Error::invalid("certificate", "no subject alternative name"))?;
        let mut uris = san.value.general_names.iter().filter_map(|n| match n {
            GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
            _ => None,
        });
        match (uris.next(), uris.next()) {
            (Some(u), None) => SpiffeId::parse(u),
            (None, _) => Err(Error::invalid("certificate", "no spiffe:// URI")),
            (Some(_), Some(_)) => Err(Error::invalid("certificate", "more than one spiffe:// URI")),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/svc/{}", self.trust_domain, self.service)
    }
}

/// A trust domain: 1-255 of lowercase letters, digits, '.', '-', '_'.
pub fn is_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_and_bad_ones_are_named() {
        let id = SpiffeId::parse("spiffe://weft.local/svc/inference").unwrap();
        assert_eq!(id, SpiffeId::new("weft.local", "inference"));
        assert_eq!(id.to_string(), "spiffe://weft.local/svc/inference");
        for bad in [
            "https://weft.local/svc/inference",
            "spiffe://weft.local",
            "spiffe://Weft/svc/a",
            "spiffe://weft.local/ns/a",
            "spiffe://weft.local/svc/",
            "spiffe://weft.local/svc/a/b",
        ] {
            let e = SpiffeId::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("identity '{bad}'")), "{e}");
        }
    }
}
