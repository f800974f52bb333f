//! What the sidecar reads of gRPC: whether a request is one, and the
//! status of an answer (in its head for a trailers-only answer, or in its
//! trailers).

/// The `grpc-status` in a header or trailer block.
pub(crate) fn status(h: &http::HeaderMap) -> Option<u32> {
    // A typed name: looking up by `&str` parses the name on every call.
    static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
    h.get(&GRPC_STATUS).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}

/// gRPC UNAVAILABLE: the status that counts against an endpoint.
pub(crate) const UNAVAILABLE: u32 = 14;

pub(crate) fn is_grpc<B>(req: &http::Request<B>) -> bool {
    req.headers().get(http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}
