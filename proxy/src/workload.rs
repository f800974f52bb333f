//! The sidecar's workload identity: a key made here (it never leaves the
//! process), a certificate for `spiffe://<trust-domain>/svc/<service>`
//! asked for over the control stream, renewed at about two thirds of its
//! lifetime, and the trust bundle peers and the control plane are checked
//! against.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use rustls::sign::CertifiedKey;
use weft_identity::workload::Key;
use weft_identity::{SpiffeId, pem};
use xds_proto::v1 as pb;

/// The trust bundle and the current certificate.
pub struct Workload {
    /// PEM roots (one, or two while a CA is rotated).
    pub(crate) bundle_pem: String,
    pub(crate) current: ArcSwapOption<Certified>,
}

/// A certificate in force.
pub(crate) struct Certified {
    pub(crate) key: Arc<CertifiedKey>,
    pub(crate) identity: SpiffeId,
    pub(crate) not_before_unix_ms: u64,
    pub(crate) not_after_unix_ms: u64,
}

impl Certified {
    /// When to ask for the next one: two thirds into its lifetime.
    pub(crate) fn renew_at_unix_ms(&self) -> u64 {
        self.not_before_unix_ms + (self.not_after_unix_ms.saturating_sub(self.not_before_unix_ms)) * 2 / 3
    }
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Workload {
    /// Reads and checks the bundle (`what` names it in errors).
    pub fn new(what: &str, bundle_pem: String) -> Result<Workload, weft_identity::Error> {
        weft_identity::tls::roots(what, &bundle_pem)?;
        Ok(Workload { bundle_pem, current: ArcSwapOption::empty() })
    }

    /// How long until a certificate should be asked for: zero when there is
    /// none, or the one in force is due for renewal.
    pub(crate) fn renew_in(&self) -> Duration {
        match self.current.load().as_ref() {
            None => Duration::ZERO,
            Some(c) => Duration::from_millis(c.renew_at_unix_ms().saturating_sub(unix_ms())),
        }
    }

    /// A new key and the request for `service`'s identity (the trust domain
    /// in it does not matter: the control plane sets the identity).
    pub(crate) fn request(service: &str) -> Result<(Key, pb::CertificateRequest), weft_identity::Error> {
        let key = Key::generate()?;
        let csr_der = key.signing_request(&SpiffeId::new("weft.local", service))?;
        Ok((key, pb::CertificateRequest { csr_der }))
    }

    /// Puts the control plane's answer in force with `key`: the chain must
    /// carry this sidecar's service as its identity and hold `key`'s public
    /// key.
    pub(crate) fn install(&self, service: &str, key: Key, answer: &pb::Certificate) -> Result<(), String> {
        if !answer.error.is_empty() {
            return Err(format!("the control plane refused a certificate: {}", answer.error));
        }
        let chain = pem::certificates("the issued certificate", &answer.chain_pem).map_err(|e| e.to_string())?;
        let identity = SpiffeId::from_certificate(&chain[0]).map_err(|e| e.to_string())?;
        if identity.service != service {
            return Err(format!("the issued certificate is for {identity}, not for service {service}"));
        }
        let provider = rustls::crypto::ring::default_provider();
        let certified = CertifiedKey::from_der(chain, key.private_key(), &provider)
            .map_err(|e| format!("the issued certificate does not match this sidecar's key: {e}"))?;
        let now = unix_ms();
        tracing::info!(%identity, expires_in_s = answer.not_after_unix_ms.saturating_sub(now) / 1000, "workload certificate in force");
        self.current.store(Some(Arc::new(Certified {
            key: Arc::new(certified),
            identity,
            not_before_unix_ms: now,
            not_after_unix_ms: answer.not_after_unix_ms,
        })));
        metrics::gauge!("weft_certificate_expiry_seconds").set(answer.not_after_unix_ms as f64 / 1000.0);
        Ok(())
    }
}
