//! weft control plane: keeps routing and per-tenant policy in etcd and pushes
//! it to sidecars over the `weft.v1` discovery stream.
//!
//! - policy resources, their rules and wire form: the `weft-policy` crate
//! - [`store`]: the etcd adapter and key layout
//! - [`index`] and [`watcher`]: etcd → immutable snapshots
//! - [`discovery`]: one session per sidecar (registration, push, ACK/NACK)
//! - [`lease`]: the replica's etcd lease, granted again when lost
//! - [`admin`]: the gRPC API for weftctl
//! - [`auth`]: bearer tokens and tenant-scoped access
//! - [`traces`]: recent degraded calls reported by sidecars
//! - [`server`]: wiring for the `weft-control` binary
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod discovery;
#[doc(hidden)]
pub mod fuzzing;
pub mod index;
pub mod lease;
pub mod server;
pub mod store;
pub mod traces;
pub mod watcher;
