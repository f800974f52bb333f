//! weft's workload identity.
//!
//! - [`spiffe`]: `spiffe://<trust-domain>/svc/<service>`, and reading it
//!   from a certificate;
//! - [`ca`]: the control plane's certificate authority: a root for a quick
//!   start, loading the operator's (a root or an intermediate with its
//!   chain), and issuing short-lived workload and server certificates;
//! - [`workload`]: what a sidecar does for itself: its key (made locally,
//!   never sent) and the signing request for its identity;
//! - [`pem`]: certificates and keys from PEM.
//!
//! Certificates are made and read with rcgen and x509-parser; nothing here
//! writes ASN.1 by hand.
#![forbid(unsafe_code)]

pub mod ca;
pub mod pem;
pub mod spiffe;
pub mod tls;
pub mod workload;

pub use ca::Ca;
pub use spiffe::SpiffeId;

/// What went wrong with a certificate, a key or a request for one.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

impl Error {
    pub(crate) fn invalid(what: impl Into<String>, reason: impl ToString) -> Error {
        Error::Invalid { what: what.into(), reason: reason.to_string() }
    }
}
