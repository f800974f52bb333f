//! The `weft.v1` wire API and its generated tonic/prost bindings — nothing else.
//!
//! Domain types live in `weft-control` (policy) and `weft-proxy` (config table);
//! they convert to and from these types at the edge.
#![forbid(unsafe_code)]
#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("weft.v1");
}
