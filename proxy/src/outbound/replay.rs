//! Request bodies that may be sent more than once (a retry, the callee
//! shedding the call, a fallback) are buffered when they are known to be
//! small and complete; others stream through, once.

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::http::errors::ProxyError;
use crate::transport::body::{ClientBodyWatch, ProxyBody, full, stream};

/// A request body that can be sent more than once, or not.
pub(crate) enum ReqBody {
    Buffered(Bytes),
    Stream(Option<Incoming>, Option<ClientBodyWatch>),
}

impl ReqBody {
    /// Buffers `body` when it is empty, or when it may be sent again
    /// (`reusable`) and declares a length up to `limit`; else keeps it to
    /// stream.
    pub(crate) async fn new(body: Incoming, reusable: bool, limit: u64) -> Result<ReqBody, ProxyError> {
        use http_body::Body;
        // A request without a body is always kept: a call shed by the callee's
        // sidecar can then go to another instance even without a retry policy.
        if body.is_end_stream() || (reusable && declared_within(&body, limit)) {
            read_whole(body).await.map(ReqBody::Buffered)
        } else {
            Ok(ReqBody::Stream(Some(body), None))
        }
    }

    pub(crate) fn is_buffered(&self) -> bool {
        matches!(self, ReqBody::Buffered(_))
    }

    /// The body for one try; `None` once a streamed body was sent.
    pub(crate) fn take(&mut self) -> Option<ProxyBody> {
        match self {
            ReqBody::Buffered(b) => Some(full(b.clone())),
            ReqBody::Stream(s, watch) => s.take().map(|b| {
                let w = watch.insert(ClientBodyWatch::new(&b));
                stream(b, w)
            }),
        }
    }

    /// True when the client's streamed body broke off while it was sent.
    pub(crate) fn client_failed(&self) -> bool {
        matches!(self, ReqBody::Stream(_, Some(w)) if w.failed())
    }
}

/// Whether `body` declares a length of at most `limit` (what may be read
/// whole into memory).
pub(crate) fn declared_within(body: &impl http_body::Body, limit: u64) -> bool {
    body.size_hint().upper().is_some_and(|n| n <= limit)
}

/// Reads a body whole; one that breaks off is the client's doing (400).
pub(crate) async fn read_whole<B>(body: B) -> Result<Bytes, ProxyError>
where
    B: http_body::Body<Data = Bytes, Error = hyper::Error>,
{
    body.collect().await.map(|b| b.to_bytes()).map_err(|e| ProxyError::BadRequestBody(e.to_string()))
}

/// A copy of a request head, for another try.
pub(crate) fn clone_parts(p: &http::request::Parts) -> http::request::Parts {
    let mut req = http::Request::new(());
    *req.method_mut() = p.method.clone();
    *req.uri_mut() = p.uri.clone();
    *req.version_mut() = p.version;
    *req.headers_mut() = p.headers.clone();
    req.into_parts().0
}
