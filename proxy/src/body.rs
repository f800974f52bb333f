//! Body types: upstream bodies stream through untouched; the sidecar's own
//! answers are small full bodies. `Either` avoids boxing on the hot path.

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;

pub type ProxyBody = Either<Incoming, Full<Bytes>>;
pub type BoxResponse = http::Response<ProxyBody>;

pub fn full(b: impl Into<Bytes>) -> ProxyBody {
    Either::Right(Full::new(b.into()))
}
