//! Pooled HTTP clients to upstreams: HTTP/1.1 for HTTP/1.1 callers and
//! HTTP/2 (h2c by prior knowledge, or over mTLS with ALPN `h2`) for HTTP/2
//! callers, so gRPC, streaming and trailers pass through end to end.
//!
//! A connection over mTLS is tagged with the service its peer proved to be,
//! and is reused only for calls to that service.
//!
//! HTTP/1.1 has its own pool, kept lean for the hot path: idle connections
//! per address in a LIFO stack, checked out without hashing a URI, and put
//! back by the response body itself when it ends (no task per request).
//! h2c has one multiplexed connection per address.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hashbrown::HashMap;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri, Version, header};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};

use super::Error;
use super::body::ProxyBody;
use super::connect::{Tls, connect_h1, connect_h2, upstream_error};
use super::hop::strip_hop_by_hop;
use super::tls::ClientTls;

const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_IDLE_PER_ADDR: usize = 256;

pub(crate) struct Upstream {
    pools: Arc<Pools>,
    /// mTLS to the endpoints that speak it; `None`: plaintext to all.
    tls: Option<Arc<ClientTls>>,
}

impl Default for Upstream {
    fn default() -> Self {
        Self::new(None)
    }
}

/// Where a try goes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer<'a> {
    pub(crate) addr: SocketAddr,
    /// The service the endpoint must prove to be, when it speaks mTLS.
    pub(crate) mtls: Option<&'a str>,
}

impl Peer<'static> {
    pub(crate) fn plain(addr: SocketAddr) -> Peer<'static> {
        Peer { addr, mtls: None }
    }
}

/// The service an mTLS connection's peer proved to be; `None`: plaintext.
type Verified = Option<Arc<str>>;

impl Upstream {
    /// Must be called within a tokio runtime (it starts the idle sweeper).
    pub(crate) fn new(tls: Option<Arc<ClientTls>>) -> Upstream {
        let pools = Arc::new(Pools::default());
        tokio::spawn(sweep(Arc::downgrade(&pools)));
        Upstream { pools, tls }
    }

    /// Sends `req` to `peer`, keeping the caller's HTTP version. The timeout,
    /// when set, covers the time to the response head; when it fires, the
    /// upstream request is dropped, which cancels it.
    pub(crate) async fn send(
        &self,
        peer: Peer<'_>,
        mut req: Request<ProxyBody>,
        timeout: Option<Duration>,
    ) -> Result<Response<PooledBody>, Error> {
        let addr = peer.addr;
        let tls = match (&self.tls, peer.mtls) {
            (Some(client), Some(service)) => Some((&**client, service)),
            _ => None,
        };
        let h2 = req.version() == Version::HTTP_2;
        let upgrade = if h2 { None } else { super::upgrade::requested(&req) };
        strip_hop_by_hop(req.headers_mut());
        if let Some(u) = upgrade.clone() {
            super::upgrade::keep(req.headers_mut(), u);
        }
        let fut = async {
            if h2 {
                let mut parts = std::mem::take(req.uri_mut()).into_parts();
                parts.scheme = Some(Scheme::HTTP);
                // The caller's :authority (the service name) goes through
                // unchanged, as Host does on HTTP/1.1; the dialled address
                // stands in when there is none.
                parts.authority.get_or_insert_with(|| authority(addr));
                parts.path_and_query.get_or_insert_with(|| PathAndQuery::from_static("/"));
                *req.uri_mut() = Uri::from_parts(parts).expect("valid uri");
                self.pools.send_h2(addr, tls, req).await
            } else {
                if !req.headers().contains_key(header::HOST)
                    && let Some(a) = req.uri().authority()
                    && let Ok(v) = HeaderValue::from_str(a.as_str())
                {
                    req.headers_mut().insert(header::HOST, v);
                }
                // HTTP/1.1 to the next hop in origin form.
                if req.uri().scheme().is_some() || req.uri().path_and_query().is_none() {
                    let pq = req.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
                    *req.uri_mut() = Uri::from(pq);
                }
                *req.version_mut() = Version::HTTP_11;
                self.pools.send_h1(addr, tls, req).await
            }
        };
        // Pinned where it is rather than moved into a `Timeout`, which would
        // double the size of every call's future.
        tokio::pin!(fut);
        let mut resp = match timeout {
            Some(t) => tokio::select! {
                biased;
                r = &mut fut => r?,
                _ = tokio::time::sleep(t) => {
                    return Err(Error::Timeout { addr: addr.to_string(), ms: t.as_millis() as u64 });
                }
            },
            None => fut.await?,
        };
        let switched = upgrade.is_some() && resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
        let upgraded = if switched { resp.headers().get(header::UPGRADE).cloned() } else { None };
        strip_hop_by_hop(resp.headers_mut());
        if let Some(u) = upgraded {
            super::upgrade::keep(resp.headers_mut(), u);
        }
        Ok(resp)
    }
}

pub(crate) type Sender = http1::SendRequest<ProxyBody>;
pub(crate) type H2Sender = http2::SendRequest<ProxyBody>;

struct Idle {
    tx: Sender,
    /// The sweep tick it went idle at.
    since: u64,
    verified: Verified,
}

/// The upstream connections of one listener:
/// - HTTP/1.1: idle connections by address, most recently used last;
/// - h2c: one multiplexed connection per address, shared by all calls to it.
///
/// Idle time is counted in sweep ticks, so the hot path never reads the clock.
#[derive(Default)]
struct Pools {
    h1: Mutex<HashMap<SocketAddr, VecDeque<Idle>>>,
    h2: Mutex<HashMap<SocketAddr, (H2Sender, u64, Verified)>>,
    tick: AtomicU64,
}

/// How often idle connections are swept; one idles for at most
/// `IDLE_TIMEOUT` plus one tick.
const SWEEP: Duration = Duration::from_secs(5);
const IDLE_TICKS: u64 = IDLE_TIMEOUT.as_secs() / SWEEP.as_secs();

impl Pools {
    /// An idle connection to `addr`, over mTLS to `service` or plaintext.
    fn take_h1(&self, addr: SocketAddr, service: Option<&str>) -> Option<(Sender, Verified)> {
        let mut idle = self.h1.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(&addr)?;
        while let Some(i) = list.pop_back() {
            // Another kind (plaintext, another service at the address): closed.
            if !i.tx.is_closed() && i.verified.as_deref() == service {
                return Some((i.tx, i.verified));
            }
        }
        None
    }

    fn put_h1(&self, addr: SocketAddr, tx: Sender, verified: Verified) {
        if tx.is_closed() {
            return;
        }
        let mut idle = self.h1.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(addr).or_default();
        if list.len() >= MAX_IDLE_PER_ADDR {
            list.pop_front();
        }
        list.push_back(Idle { tx, since: self.tick.load(Ordering::Relaxed), verified });
    }

    async fn send_h1(
        self: &Arc<Self>,
        addr: SocketAddr,
        tls: Tls<'_>,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<PooledBody>, Error> {
        // A pooled connection the app has just closed hands the request back
        // unsent; it then goes on a fresh connection.
        while let Some((mut tx, verified)) = self.take_h1(addr, tls.map(|t| t.1)) {
            if tx.ready().await.is_err() {
                continue;
            }
            match tx.try_send_request(req).await {
                Ok(resp) => return Ok(self.wrap(addr, tx, verified, resp)),
                Err(mut e) => match e.take_message() {
                    Some(r) => req = r,
                    None => return Err(upstream_error(addr, e.error())),
                },
            }
        }
        // Boxed: dialling is rare, and its state would otherwise make every
        // request's future (moved on each call) larger.
        let mut tx = Box::pin(connect_h1(addr, tls)).await?;
        let verified = tls.map(|t| Arc::from(t.1));
        match tx.send_request(req).await {
            Ok(resp) => Ok(self.wrap(addr, tx, verified, resp)),
            Err(e) => Err(upstream_error(addr, &e)),
        }
    }

    fn wrap(
        self: &Arc<Self>,
        addr: SocketAddr,
        tx: Sender,
        verified: Verified,
        resp: Response<Incoming>,
    ) -> Response<PooledBody> {
        // An upgraded connection is the caller's now, never pooled.
        if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            return resp.map(PooledBody::plain);
        }
        if resp.body().is_end_stream() {
            self.put_h1(addr, tx, verified);
            return resp.map(PooledBody::plain);
        }
        let home = Home { pools: Arc::downgrade(self), addr, tx, verified };
        resp.map(|inner| PooledBody { inner: Inner::Wire(inner), home: Some(home), ended: false })
    }

    async fn send_h2(
        &self,
        addr: SocketAddr,
        tls: Tls<'_>,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<PooledBody>, Error> {
        let service = tls.map(|t| t.1);
        let shared = {
            let mut conns = self.h2.lock().unwrap_or_else(|e| e.into_inner());
            match conns.get_mut(&addr) {
                Some((tx, used, verified)) if !tx.is_closed() && verified.as_deref() == service => {
                    *used = self.tick.load(Ordering::Relaxed);
                    Some(tx.clone())
                }
                _ => None,
            }
        };
        // A connection going away (GOAWAY) hands back the requests it did
        // not take; they go on a new one.
        if let Some(mut tx) = shared {
            match tx.try_send_request(req).await {
                Ok(resp) => return Ok(resp.map(PooledBody::plain)),
                Err(mut e) => match e.take_message() {
                    Some(r) => req = r,
                    None => return Err(upstream_error(addr, e.error())),
                },
            }
        }
        let mut tx = Box::pin(connect_h2(addr, tls)).await?;
        // Calls racing to dial the same address each get a connection; the
        // last one stays shared, the others close once their call ends.
        let used = self.tick.load(Ordering::Relaxed);
        self.h2.lock().unwrap_or_else(|e| e.into_inner()).insert(addr, (tx.clone(), used, service.map(Arc::from)));
        match tx.send_request(req).await {
            Ok(resp) => Ok(resp.map(PooledBody::plain)),
            Err(e) => Err(upstream_error(addr, &e)),
        }
    }
}

/// Every tick, closes idle connections that outlived the idle timeout or
/// that the app has closed; ends with the pools.
async fn sweep(pools: Weak<Pools>) {
    let mut tick = tokio::time::interval(SWEEP);
    loop {
        tick.tick().await;
        let Some(pools) = pools.upgrade() else { return };
        let now = pools.tick.fetch_add(1, Ordering::Relaxed) + 1;
        pools.h1.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, list| {
            list.retain(|i| now - i.since <= IDLE_TICKS && !i.tx.is_closed());
            !list.is_empty()
        });
        pools
            .h2
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, (tx, used, _)| now - *used <= IDLE_TICKS && !tx.is_closed());
    }
}

/// Where an HTTP/1.1 connection goes back to once its response has been read.
struct Home {
    pools: Weak<Pools>,
    addr: SocketAddr,
    tx: Sender,
    verified: Verified,
}

/// A response body from an upstream. For HTTP/1.1 it carries its
/// connection, which goes back to the pool when the body has been read to
/// the end; a body dropped before its end closes the connection instead.
pub(crate) struct PooledBody {
    inner: Inner,
    home: Option<Home>,
    ended: bool,
}

/// What a pooled body reads from: the wire, or (in unit tests of the layers
/// above) a body made up by the test.
enum Inner {
    Wire(Incoming),
    #[cfg(test)]
    Made(http_body_util::Full<Bytes>),
}

impl PooledBody {
    /// A body with no pooled connection behind it (h2, or a request body).
    pub(crate) fn plain(inner: Incoming) -> PooledBody {
        PooledBody { inner: Inner::Wire(inner), home: None, ended: false }
    }

    /// A body made up by a unit test.
    #[cfg(test)]
    pub(crate) fn full(b: impl Into<Bytes>) -> PooledBody {
        PooledBody { inner: Inner::Made(http_body_util::Full::new(b.into())), home: None, ended: false }
    }

    fn inner_ended(&self) -> bool {
        match &self.inner {
            Inner::Wire(b) => b.is_end_stream(),
            #[cfg(test)]
            Inner::Made(b) => b.is_end_stream(),
        }
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        if let Some(home) = self.home.take()
            && (self.ended || self.inner_ended())
            && let Some(pools) = home.pools.upgrade()
        {
            pools.put_h1(home.addr, home.tx, home.verified);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let r = match &mut this.inner {
            Inner::Wire(b) => Pin::new(b).poll_frame(cx),
            #[cfg(test)]
            Inner::Made(b) => Pin::new(b).poll_frame(cx).map(|f| f.map(|f| f.map_err(|never| match never {}))),
        };
        if let Poll::Ready(None) = r {
            this.ended = true;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner_ended()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Wire(b) => b.size_hint(),
            #[cfg(test)]
            Inner::Made(b) => b.size_hint(),
        }
    }
}

/// A socket address as a URI authority.
fn authority(addr: SocketAddr) -> Authority {
    Authority::try_from(addr.to_string()).expect("a socket address is an authority")
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::transport::connect::BoxedExec;
    use tokio::net::TcpListener;

    use super::*;

    /// How the test app answers on each connection.
    #[derive(Clone, Copy)]
    enum App {
        /// Keep-alive, `ok` per request.
        KeepAlive,
        /// `Connection: close`, then closes.
        Close,
        /// Answers one request, then closes the idle connection unannounced.
        DropIdle,
        /// A 64 KiB body in chunks.
        Large,
    }

    /// A minimal HTTP/1.1 app on a real socket; counts the connections it
    /// accepted and signals each connection it closed.
    async fn app(mode: App) -> (SocketAddr, Arc<AtomicUsize>, tokio::sync::mpsc::UnboundedReceiver<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (closed_tx, closed_rx) = tokio::sync::mpsc::unbounded_channel();
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let closed = closed_tx.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => {
                                    let _ = closed.send(());
                                    return;
                                }
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.clear();
                        let reply: Vec<u8> = match mode {
                            App::KeepAlive | App::DropIdle => {
                                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec()
                            }
                            App::Close => {
                                b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok".to_vec()
                            }
                            App::Large => {
                                let mut r = b"HTTP/1.1 200 OK\r\ncontent-length: 65536\r\n\r\n".to_vec();
                                r.extend(std::iter::repeat_n(b'x', 65536));
                                r
                            }
                        };
                        if s.write_all(&reply).await.is_err() {
                            let _ = closed.send(());
                            return;
                        }
                        if matches!(mode, App::Close | App::DropIdle) {
                            drop(s);
                            let _ = closed.send(());
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted, closed_rx)
    }

    async fn get(up: &Upstream, addr: SocketAddr) -> Response<PooledBody> {
        let req = Request::builder().uri("/").header("host", "app").body(crate::transport::body::full("")).unwrap();
        up.send(Peer::plain(addr), req, Some(Duration::from_secs(5))).await.expect("upstream answers")
    }

    async fn get_ok(up: &Upstream, addr: SocketAddr) {
        let resp = get(up, addr).await;
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
    }

    #[tokio::test]
    async fn keep_alive_connections_are_reused_and_closed_ones_are_not() {
        for (mode, dialled) in [(App::KeepAlive, 1), (App::Close, 20)] {
            let (addr, accepted, _) = app(mode).await;
            let up = Upstream::new(None);
            for _ in 0..20 {
                get_ok(&up, addr).await;
            }
            assert_eq!(accepted.load(Ordering::SeqCst), dialled);
        }
    }

    #[tokio::test]
    async fn an_idle_connection_closed_by_the_app_is_replaced() {
        let (addr, accepted, mut closed) = app(App::DropIdle).await;
        let up = Upstream::new(None);
        for i in 1..=5 {
            get_ok(&up, addr).await;
            // The app has closed the pooled connection before the next call.
            tokio::time::timeout(Duration::from_secs(5), closed.recv()).await.unwrap();
            assert_eq!(accepted.load(Ordering::SeqCst), i);
        }
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_the_connection() {
        let (addr, accepted, _) = app(App::Large).await;
        let up = Upstream::new(None);
        // Read to the end: the connection goes back to the pool.
        let body = get(&up, addr).await.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), 65536);
        let _ = get(&up, addr).await.into_body().collect().await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // Dropped unread: the next call dials again.
        drop(get(&up, addr).await);
        let _ = get(&up, addr).await.into_body().collect().await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// An h2c app on a real socket; counts its connections. With
    /// `one_call`, each connection serves one call and then goes away
    /// (GOAWAY).
    async fn h2_app(one_call: bool) -> (SocketAddr, Arc<AtomicUsize>, tokio::sync::mpsc::UnboundedReceiver<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let (closed_tx, closed_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let closed = closed_tx.clone();
                let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let _ = done_tx.send(());
                    let seen = req.uri().authority().map(|a| a.to_string()).unwrap_or_default();
                    async move {
                        let mut resp = Response::new(http_body_util::Full::new(Bytes::from("ok")));
                        resp.headers_mut().insert("x-authority", HeaderValue::from_str(&seen).unwrap());
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                tokio::spawn(async move {
                    let conn =
                        hyper::server::conn::http2::Builder::new(BoxedExec).serve_connection(TokioIo::new(s), svc);
                    tokio::pin!(conn);
                    if one_call {
                        tokio::select! {
                            _ = conn.as_mut() => {}
                            _ = done_rx.recv() => {
                                conn.as_mut().graceful_shutdown();
                                let _ = conn.as_mut().await;
                            }
                        }
                        let _ = closed.send(());
                        return;
                    }
                    let _ = conn.await;
                });
            }
        });
        (addr, accepted, closed_rx)
    }

    async fn h2_get_ok(up: &Upstream, addr: SocketAddr) {
        let req = Request::builder().version(Version::HTTP_2).uri("/").body(crate::transport::body::full("")).unwrap();
        let resp = up.send(Peer::plain(addr), req, Some(Duration::from_secs(5))).await.expect("h2 answer");
        assert_eq!(resp.status(), 200);
        assert_eq!(&resp.into_body().collect().await.unwrap().to_bytes()[..], b"ok");
    }

    #[tokio::test]
    async fn h2_calls_share_one_connection() {
        let (addr, accepted, _) = h2_app(false).await;
        let up = Arc::new(Upstream::new(None));
        h2_get_ok(&up, addr).await;
        for _ in 0..10 {
            h2_get_ok(&up, addr).await;
        }
        let calls: Vec<_> = (0..20)
            .map(|_| {
                let up = up.clone();
                tokio::spawn(async move { h2_get_ok(&up, addr).await })
            })
            .collect();
        for c in calls {
            c.await.unwrap();
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn h2_keeps_the_callers_authority() {
        let (addr, _, _) = h2_app(false).await;
        let up = Upstream::new(None);
        let call = |uri: &'static str| {
            Request::builder().version(Version::HTTP_2).uri(uri).body(crate::transport::body::full("")).unwrap()
        };
        let resp = up.send(Peer::plain(addr), call("http://inference:8080/x"), None).await.unwrap();
        assert_eq!(resp.headers()["x-authority"], "inference:8080");
        // Without one, the dialled address stands in.
        let resp = up.send(Peer::plain(addr), call("/x"), None).await.unwrap();
        assert_eq!(resp.headers()["x-authority"], addr.to_string().as_str());
    }

    #[tokio::test]
    async fn an_h2_connection_that_goes_away_is_replaced() {
        let (addr, accepted, mut closed) = h2_app(true).await;
        let up = Upstream::new(None);
        for i in 1..=5 {
            h2_get_ok(&up, addr).await;
            assert_eq!(accepted.load(Ordering::SeqCst), i);
            // The app has closed that connection before the next call.
            tokio::time::timeout(Duration::from_secs(5), closed.recv()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let up = Upstream::new(None);
        let req = Request::builder().uri("/").body(crate::transport::body::full("")).unwrap();
        let err = up.send(Peer::plain(addr), req, None).await.err().expect("nothing listens");
        assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    }
}
