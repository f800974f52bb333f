//! weft sidecar proxy.
//!
//! - [`outbound`]: app → service (routing by authority, weighted subsets, timeouts)
//! - [`inbound`]: peer → local app
//! - [`balance`]: endpoint choice
//! - [`resilience`]: circuit breaking, concurrency caps, retry budgets
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
pub mod upstream;

/// The request header that names the tenant (absent = `default`).
pub const TENANT_HEADER: &str = "x-tenant-id";

/// How many services one sidecar subscribes to at most.
pub const MAX_SUBSCRIPTIONS: usize = 1024;
