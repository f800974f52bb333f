//! weft control plane: keeps routing and per-tenant policy in etcd and pushes
//! it to sidecars over the `weft.v1` discovery stream.
//!
//! - policy resources, their rules and wire form: the `weft-policy` crate
//! - [`store`]: etcd — the key layout and records, the replica's lease
//!   ([`store::lease`]) and the watch that turns etcd into snapshots
//!   ([`store::watcher`])
//! - [`push`]: the snapshots' index ([`push::index`]) and one session per
//!   sidecar (registration, push, ACK/NACK)
//! - [`admin`]: the gRPC API for weftctl, bearer tokens and tenant-scoped
//!   access ([`admin::auth`]), recent degraded calls ([`admin::traces`])
//! - [`tls`]: gRPC over TLS with a server certificate from the CA
//! - [`server`]: wiring for the `weft-control` binary
#![forbid(unsafe_code)]

pub mod admin;
#[doc(hidden)]
pub mod fuzzing;
pub mod push;
pub mod server;
pub mod store;
pub mod tls;
