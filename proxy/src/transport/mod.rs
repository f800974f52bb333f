//! Connections: accepting them within bounds ([`listener`]), the bodies that
//! flow over them ([`body`]), and pooled HTTP/1.1 and h2c clients to
//! upstreams ([`pool`], [`connect`]), over mTLS between sidecars
//! ([`tls`]); byte streams spliced once a connection stops being calls
//! ([`splice`]).

pub(crate) mod body;
pub(crate) mod connect;
pub(crate) mod detect;
pub(crate) mod hop;
pub mod listener;
pub(crate) mod opaque;
pub(crate) mod pool;
pub mod splice;
pub(crate) mod tls;
pub(crate) mod tunnel;
pub(crate) mod upgrade;

/// Why a call to an upstream failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Error {
    #[error("cannot reach upstream {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("upstream {addr} reset the stream: {reason}")]
    Reset { addr: String, reason: String },
    #[error("upstream {addr} failed: {reason}")]
    Upstream { addr: String, reason: String },
    #[error("upstream {addr} timed out after {ms} ms")]
    Timeout { addr: String, ms: u64 },
}
