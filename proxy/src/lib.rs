//! weft sidecar proxy.
//!
//! - [`outbound`]: app → service (routing by authority, weighted subsets, timeouts)
//! - [`inbound`]: peer → local app
//! - [`balance`]: endpoint choice
//! - [`resilience`]: circuit breaking, concurrency caps, retry budgets
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
pub mod config;
pub mod discovery;
pub mod errors;
pub mod inbound;
pub mod outbound;
pub mod probe;
pub mod resilience;
pub mod state;
pub mod telemetry;
pub mod tenancy;
pub mod upstream;

/// The default request header that names the tenant (absent = `default`).
pub const TENANT_HEADER: &str = "x-tenant-id";

/// The tenant a request is for: the value of `header`, else `default`.
pub fn tenant_of<B>(req: &http::Request<B>, header: &http::HeaderName) -> String {
    req.headers().get(header).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty()).unwrap_or("default").to_string()
}

/// How many services one sidecar subscribes to at most.
pub const MAX_SUBSCRIPTIONS: usize = 1024;
