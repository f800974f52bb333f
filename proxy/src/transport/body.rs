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
use crate::http::stream::Watch;
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
    Either::Left(Tapped { inner: PooledBody::plain(b), client: watch.clone(), extras: None })
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
    reply_judged(b, None, None)
}

/// The same, giving the breaker `verdict` from the call's trailers, and
/// under `watch` when the answer streams (see [`crate::http::stream`]).
pub(crate) fn reply_judged(b: PooledBody, verdict: Option<Verdict>, watch: Option<Box<Watch>>) -> ProxyBody {
    Either::Left(Tapped::with(b, Extras { verdict, watch, ..Extras::default() }))
}

/// A body passed through as is, with what some calls need done as it
/// passes: a streamed answer that keeps its tenant's request counted in
/// flight until the body ends, settles the call's token reservation with
/// the usage reported in a `x-weft-usage-tokens` trailer, gives the breaker
/// its verdict on a gRPC call from the call's trailers, or is timed and cut
/// when it stalls. Those are boxed together, and only when there is one:
/// most bodies have none, and every body is moved several times per call.
pub(crate) struct Tapped {
    inner: PooledBody,
    /// Set when this is a client's request body and it fails.
    client: ClientBodyWatch,
    extras: Option<Box<Extras>>,
}

#[derive(Default)]
struct Extras {
    guard: Option<TenantGuard>,
    usage: Option<Box<tenancy::Reservation>>,
    verdict: Option<Verdict>,
    /// Times a streamed answer and cuts it when it stalls.
    watch: Option<Box<Watch>>,
    /// A timeout cut the stream: it has ended (the upstream body goes with
    /// this one, closing its connection or resetting its stream).
    cut: bool,
}

impl Tapped {
    fn with(inner: PooledBody, x: Extras) -> Tapped {
        let any = x.guard.is_some() || x.usage.is_some() || x.verdict.is_some() || x.watch.is_some();
        Tapped { inner, client: ClientBodyWatch(None), extras: any.then(|| Box::new(x)) }
    }

    pub(crate) fn new(
        inner: PooledBody,
        guard: Option<TenantGuard>,
        usage: Option<Box<tenancy::Reservation>>,
    ) -> Tapped {
        Tapped::with(inner, Extras { guard, usage, ..Extras::default() })
    }
}

impl Extras {
    /// Notes what passed: a frame, the end, or an error.
    fn on(&mut self, r: &Poll<Option<Result<Frame<Bytes>, hyper::Error>>>) {
        match r {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(w) = &mut self.watch {
                    w.frame(frame);
                }
                if let Some(t) = frame.trailers_ref() {
                    if let Some(r) = &mut self.usage
                        && let Some(n) = t.get(tenancy::USAGE_HEADER).and_then(tenancy::parse_usage)
                    {
                        r.settle(n);
                    }
                    if let Some(v) = self.verdict.take() {
                        v.give(crate::grpc::status(t) == Some(crate::grpc::UNAVAILABLE));
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(v) = self.verdict.take() {
                    v.give(true);
                }
                self.guard = None;
                self.usage = None;
            }
            Poll::Ready(None) => {
                self.guard = None;
                self.usage = None;
                self.verdict = None;
                self.watch = None;
            }
            Poll::Pending => {}
        }
    }

    /// Ends a stream a timeout cut: the upstream body is dropped (its
    /// connection closed or stream reset) with this one.
    #[cold]
    fn cut(&mut self, cut: crate::http::stream::Cut) -> Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>> {
        let ending = self.watch.take().map(|w| w.ending(cut)).unwrap_or(Err(cut));
        self.cut = true;
        // The watch counted the failure against the endpoint already.
        self.verdict = None;
        self.guard = None;
        self.usage = None;
        ending.map_err(Into::into)
    }
}

impl Body for Tapped {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.extras.as_ref().is_some_and(|x| x.cut) {
            return Poll::Ready(None);
        }
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if let (Poll::Ready(Some(Err(_))), Some(c)) = (&r, &this.client.0) {
            c.store(true, Ordering::Relaxed);
        }
        if let Some(x) = &mut this.extras {
            x.on(&r);
            if r.is_pending()
                && let Some(cut) = x.watch.as_mut().and_then(|w| w.poll_cut(cx))
            {
                return Poll::Ready(Some(x.cut(cut)));
            }
        }
        r.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.extras.as_ref().is_some_and(|x| x.cut) || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
