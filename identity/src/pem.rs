//! Certificates and keys from PEM text.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::Error;

/// Every certificate in `pem` (`what` names it in errors); at least one.
pub fn certificates(what: &str, pem: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| Error::invalid(what, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(Error::invalid(what, "holds no certificate"));
    }
    Ok(certs)
}

/// The one private key in `pem`.
pub fn private_key(what: &str, pem: &str) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| Error::invalid(what, format!("no private key: {e}")))
}

/// `der` as PEM.
pub fn certificate_pem(der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}
