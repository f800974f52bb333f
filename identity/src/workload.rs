//! A sidecar's side of its identity: a key made in the process (it never
//! leaves it) and a signing request to send over the control stream.

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::{Error, SpiffeId};

/// An ECDSA P-256 key.
pub struct Key(KeyPair);

impl Key {
    pub fn generate() -> Result<Key, Error> {
        Ok(Key(KeyPair::generate()?))
    }

    /// A signing request (DER) for `id`.
    pub fn signing_request(&self, id: &SpiffeId) -> Result<Vec<u8>, Error> {
        let mut params = CertificateParams::default();
        let uri = id.to_string().try_into().map_err(|e| Error::invalid(format!("identity {id}"), e))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        Ok(params.serialize_request(&self.0)?.der().to_vec())
    }

    /// The key for rustls.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.0.serialize_der()))
    }

    /// The key as PEM (PKCS#8), for a workload outside weft that must hold
    /// its key in a file (`weftctl ca issue`).
    pub fn private_key_pem(&self) -> String {
        self.0.serialize_pem()
    }

    /// The raw public key (the SubjectPublicKeyInfo's bit string).
    pub fn public_key_raw(&self) -> &[u8] {
        self.0.public_key_raw()
    }
}
