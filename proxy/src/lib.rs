//! weft sidecar proxy. The modules, from the bottom up (each uses only
//! those above it in this list):
//!
//! - [`clock`], [`grpc`], [`telemetry`]: the clocks, reading gRPC statuses,
//!   request metrics;
//! - [`health`]: per endpoint latency, load and circuit breaker, per
//!   service the concurrency count and the retry budget;
//! - [`tenancy`]: per-tenant limits at the callee (rate, concurrency, tokens);
//! - [`config`]: the immutable table of services built from control-plane
//!   updates (routes as the `weft-policy` model, endpoints, holds);
//! - [`state`]: what the listeners, the discovery client and the admin
//!   endpoint share (the table, subscriptions, queues);
//! - [`transport`]: accepting connections within bounds (`listener`), pooled
//!   HTTP/1.1 and h2c clients to upstreams (`pool`, `connect`), bodies,
//!   hop-by-hop headers;
//! - [`http`]: the sidecar's own error answers, request-head handling
//!   (authority, tenant, trace context), the degraded marks;
//! - [`outbound`]: app → service: resolve, route, balance, the call with its
//!   tries, retries, breaker bookkeeping, faults and fallback;
//! - [`inbound`]: peer → local app, within the tenant's limits;
//! - [`dns`]: mesh names answered with virtual addresses, others forwarded;
//! - [`control_client`]: the discovery stream (ACK/NACK, reconnects, holds);
//! - [`admin`], [`probe`], [`app`]: the admin endpoint, app readiness, and
//!   the wiring.
#![forbid(unsafe_code)]

pub(crate) mod admin;
pub mod app;
pub mod capture;
pub(crate) mod clock;
pub(crate) mod config;
pub(crate) mod control_client;
pub mod dns;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod grpc;
pub(crate) mod hash;
pub(crate) mod health;
pub(crate) mod http;
pub(crate) mod inbound;
pub(crate) mod outbound;
pub(crate) mod probe;
pub(crate) mod state;
pub mod telemetry;
pub(crate) mod tenancy;
pub mod transport;
pub mod workload;

pub use outbound::DEFAULT_REPLAY_LIMIT;

/// The default request header that names the tenant (absent = `default`).
pub const TENANT_HEADER: &str = "x-tenant-id";

/// How many services one sidecar subscribes to at most.
pub const MAX_SUBSCRIPTIONS: usize = 1024;
