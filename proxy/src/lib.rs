//! weft sidecar proxy.
//!
//! - [`outbound`]: app → service (routing by authority, weighted subsets, timeouts)
//! - [`inbound`]: peer → local app
//! - [`balance`]: endpoint choice
//! - [`resilience`]: endpoint health, concurrency caps, retry budgets
//! - [`breaker`]: circuit breaking per endpoint (half-open probes, the ejection cap)
//! - [`listener`]: accepting connections within limits and timeouts; drain
//! - [`tenancy`]: per-tenant rate limits, concurrency and token quotas (inbound)
//! - [`upstream`]: pooled HTTP/1.1 and h2c clients
//! - [`config`]: the immutable config table built from discovery updates
//! - [`discovery`]: the stream to the control plane (ACK/NACK, reconnects)
//! - [`admin`], [`probe`], [`telemetry`], [`errors`]
//! - [`app`]: wiring for the `weft-proxy` binary
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod balance;
pub mod body;
pub mod breaker;
pub mod config;
pub mod discovery;
pub mod errors;
#[doc(hidden)]
pub mod fuzzing;
pub mod inbound;
pub mod listener;
pub mod outbound;
pub mod probe;
pub mod resilience;
pub mod state;
pub mod telemetry;
pub mod tenancy;
pub mod upstream;

/// The default request header that names the tenant (absent = `default`).
pub const TENANT_HEADER: &str = "x-tenant-id";

/// The tenant a request is for: the value of `header`, else `default`. A
/// value that is not a tenant name (as policies name tenants: 1-63 lowercase
/// letters, digits, `-`, `_`, `.`) is refused: it would become a metric label
/// and a key of limits.
pub fn tenant_of<B>(req: &http::Request<B>, header: &http::HeaderName) -> Result<String, errors::ProxyError> {
    match req.headers().get(header) {
        None => Ok("default".to_string()),
        Some(v) if weft_policy::names::is_tenant(v.as_bytes()) => {
            Ok(String::from_utf8_lossy(v.as_bytes()).into_owned())
        }
        Some(v) if v.is_empty() => Ok("default".to_string()),
        Some(v) => Err(errors::ProxyError::BadTenant(errors::clip(&String::from_utf8_lossy(v.as_bytes())))),
    }
}

/// Fails when a request has more than one `Host` header: the two could
/// name different services for different hops.
pub fn single_host<B>(req: &http::Request<B>) -> Result<(), errors::ProxyError> {
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Err(errors::ProxyError::DuplicateHost),
        _ => Ok(()),
    }
}

/// How many services one sidecar subscribes to at most.
pub const MAX_SUBSCRIPTIONS: usize = 1024;
