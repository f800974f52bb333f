//! Body types: upstream bodies stream through untouched; the sidecar's own
//! answers are small full bodies. `Either` avoids boxing on the hot path.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use super::pool::PooledBody;
use crate::config::Verdict;
use crate::tenancy::{self, TenantGuard};

pub(crate) type ProxyBody = Either<Tapped, Full<Bytes>>;
pub(crate) type BoxResponse = http::Response<ProxyBody>;

pub(crate) fn full(b: impl Into<Bytes>) -> ProxyBody {
    Either::Right(Full::new(b.into()))
}

/// A streamed request body passed through as is. The watch tells, when
/// the upstream call fails, whether it was the client's body that broke
/// (a malformed chunked body, a client gone mid-upload): then the client is
/// answered 400 and the endpoint is not blamed.
pub(crate) fn stream(b: Incoming, watch: &ClientBodyWatch) -> ProxyBody {
    Either::Left(Tapped { inner: PooledBody::plain(b), guard: None, usage: None, verdict: None, client: watch.clone() })
}

/// See [`stream`].
#[derive(Clone, Debug)]
pub(crate) struct ClientBodyWatch(Option<Arc<AtomicBool>>);

impl ClientBodyWatch {
    /// A watch for `body`. A body that has already ended (no body, or
    /// `content-length: 0`) cannot break: nothing to allocate.
    pub(crate) fn new(body: &Incoming) -> ClientBodyWatch {
        ClientBodyWatch((!body.is_end_stream()).then(|| Arc::new(AtomicBool::new(false))))
    }

    pub(crate) fn failed(&self) -> bool {
        self.0.as_ref().is_some_and(|f| f.load(Ordering::Relaxed))
    }
}

/// A streamed upstream response body passed through as is.
pub(crate) fn reply(b: PooledBody) -> ProxyBody {
    reply_judged(b, None)
}

/// The same, giving the breaker `verdict` from the call's trailers.
pub(crate) fn reply_judged(b: PooledBody, verdict: Option<Verdict>) -> ProxyBody {
    Either::Left(Tapped { inner: b, guard: None, usage: None, verdict, client: ClientBodyWatch(None) })
}

/// A streamed response body that keeps its tenant's request counted in
/// flight until the body ends, adds the inference tokens reported in a
/// `x-weft-usage-tokens` trailer to the tenant's quota, and gives the
/// breaker its verdict on a gRPC call from the call's trailers.
pub(crate) struct Tapped {
    inner: PooledBody,
    guard: Option<TenantGuard>,
    usage: Option<Arc<tenancy::State>>,
    verdict: Option<Verdict>,
    /// Set when this is a client's request body and it fails.
    client: ClientBodyWatch,
}

impl Tapped {
    pub(crate) fn new(inner: PooledBody, guard: Option<TenantGuard>, usage: Option<Arc<tenancy::State>>) -> Tapped {
        Tapped { inner, guard, usage, verdict: None, client: ClientBodyWatch(None) }
    }
}

impl Body for Tapped {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = frame.trailers_ref() {
                    if let Some(state) = &this.usage
                        && let Some(n) = t.get(tenancy::USAGE_HEADER).and_then(tenancy::parse_usage)
                    {
                        state.add_usage(n);
                    }
                    if let Some(v) = this.verdict.take() {
                        v.give(crate::grpc::status(t) == Some(crate::grpc::UNAVAILABLE));
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(c) = &this.client.0 {
                    c.store(true, Ordering::Relaxed);
                }
                if let Some(v) = this.verdict.take() {
                    v.give(true);
                }
                this.guard = None;
                this.usage = None;
            }
            Poll::Ready(None) => {
                this.guard = None;
                this.usage = None;
                this.verdict = None;
            }
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
