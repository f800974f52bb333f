//! Accepting connections, and what bounds them: a connection limit per
//! listener, a header-read timeout, an idle timeout, and a graceful close of
//! every connection on drain.
//!
//! hyper's own HTTP/1.1 `header_read_timeout` also closes keep-alive
//! connections that are idle for that long (it starts when hyper waits for
//! the next head) and allocates a timer per request; and HTTP/2 has none. So
//! the bounds are kept here, protocol-agnostic and off the per-request timer
//! wheel: each connection has a small shared [`ConnState`] that its I/O and
//! its requests update with relaxed atomic stores of a coarse clock
//! ([`TICK`], seconds), and one sweeper per listener looks at every
//! connection once a second:
//!
//! - **header timeout** (HTTP/1.1): bytes arrived while no request was in
//!   flight, and no complete request head followed within the timeout (a
//!   slowloris client). An HTTP/2 connection (its preface) is not timed so:
//!   its frames with no request in flight are settings and pings, and a
//!   gRPC client may open a connection well before its first call. It is
//!   bounded by the idle timeout, the connection limit and h2's own limits.
//! - **idle timeout**: no request in flight and no byte read or written for
//!   that long; the connection is closed gracefully (HTTP/2 GOAWAY).
//!
//! A connection over the limit is accepted and closed at once (counted in
//! `weft_connections_rejected_total{listener}`), so a client fails fast
//! instead of waiting in the kernel's backlog.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Seconds since the process started, advanced by the sweepers: the clock
/// of the connection bounds (one relaxed load to read).
pub static TICK: AtomicU32 = AtomicU32::new(1);

/// The bounds of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections at most.
    pub max_connections: usize,
    /// From the first byte of a request head to its end.
    pub header_timeout: Duration,
    /// No request in flight and nothing read or written.
    pub idle_timeout: Duration,
    /// Longest wait of an HTTP/1.1 call for its answer's head, when the
    /// handler asks for it ([`ConnState::deadline`]); `None`: no such bound.
    pub call_timeout: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            call_timeout: None,
        }
    }
}

const NONE: u8 = 0;
const GRACEFUL: u8 = 1;
const ABORT: u8 = 2;

/// The identity a caller proved on an mTLS connection.
#[derive(Debug)]
pub(crate) struct Caller {
    pub(crate) id: weft_identity::SpiffeId,
    /// The ID as the app gets it ([`crate::http::headers::CLIENT_ID`]).
    pub(crate) header: http::HeaderValue,
}

/// What a connection's I/O, its requests and the sweeper share.
#[derive(Debug)]
pub struct ConnState {
    /// Requests between their head being read and their response head.
    active: AtomicU32,
    /// [`TICK`] of the last read, write, request or response.
    progress: AtomicU32,
    /// [`TICK`] when bytes arrived with no request in flight; 0 = none.
    head_since: AtomicU32,
    /// A request has been seen (HTTP/2 stops counting heads after it).
    served: AtomicBool,
    /// The first bytes were the HTTP/2 preface.
    h2: AtomicBool,
    signal: AtomicU8,
    waker: AtomicWaker,
    /// [`TICK`] when the connection's call started waiting under a
    /// [`Deadline`]; 0 = none.
    call_since: AtomicU32,
    call_expired: AtomicBool,
    call_waker: AtomicWaker,
    /// The caller's identity, on an mTLS connection.
    peer: std::sync::OnceLock<Caller>,
    /// Where the app meant to go, on a captured connection.
    original_dst: std::sync::OnceLock<std::net::SocketAddr>,
}

impl ConnState {
    fn new() -> ConnState {
        let now = TICK.load(Ordering::Relaxed);
        ConnState {
            active: AtomicU32::new(0),
            progress: AtomicU32::new(now),
            head_since: AtomicU32::new(0),
            served: AtomicBool::new(false),
            h2: AtomicBool::new(false),
            signal: AtomicU8::new(NONE),
            waker: AtomicWaker::new(),
            call_since: AtomicU32::new(0),
            call_expired: AtomicBool::new(false),
            call_waker: AtomicWaker::new(),
            peer: std::sync::OnceLock::new(),
            original_dst: std::sync::OnceLock::new(),
        }
    }

    /// Notes where a captured connection was going.
    pub(crate) fn set_original_dst(&self, dst: std::net::SocketAddr) {
        let _ = self.original_dst.set(dst);
    }

    /// Where a captured connection was going; `None` when the app dialled
    /// the listener itself.
    pub(crate) fn original_dst(&self) -> Option<std::net::SocketAddr> {
        self.original_dst.get().copied()
    }

    /// Notes the identity the caller proved in the mTLS handshake.
    pub(crate) fn set_peer(&self, id: weft_identity::SpiffeId) {
        let header = http::HeaderValue::try_from(id.to_string()).expect("a SPIFFE ID is a header value");
        let _ = self.peer.set(Caller { id, header });
    }

    /// The caller's identity: `None` on a plaintext connection.
    pub(crate) fn peer(&self) -> Option<&Caller> {
        self.peer.get()
    }

    /// Bounds `fut` by the listener's call timeout, kept by the sweeper:
    /// no timer per call. For HTTP/1.1 only, where a connection carries one
    /// call at a time; `Err(())` when the time ran out.
    pub fn deadline<F: Future>(self: &Arc<Self>, fut: F) -> Deadline<F> {
        Deadline { fut, state: self.clone(), started: false }
    }

    #[inline]
    fn on_read(&self, first: &[u8]) {
        let now = TICK.load(Ordering::Relaxed);
        self.progress.store(now, Ordering::Relaxed);
        if self.active.load(Ordering::Relaxed) == 0 && self.head_since.load(Ordering::Relaxed) == 0 {
            if !self.served.load(Ordering::Relaxed) && first.starts_with(b"PRI * HTTP/2") {
                self.h2.store(true, Ordering::Relaxed);
            }
            if !self.h2.load(Ordering::Relaxed) {
                self.head_since.store(now, Ordering::Relaxed);
            }
        }
    }

    /// A request head was read: the call is in flight until its response
    /// head is returned (the returned guard's drop).
    #[inline]
    pub fn request(self: &Arc<Self>) -> RequestGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.head_since.store(0, Ordering::Relaxed);
        if !self.served.load(Ordering::Relaxed) {
            self.served.store(true, Ordering::Relaxed);
        }
        RequestGuard(self.clone())
    }

    fn signal(&self, what: u8) {
        if self.signal.fetch_max(what, Ordering::Relaxed) < what {
            self.waker.wake();
        }
    }

    /// Expires the call waiting under a [`Deadline`] once it has waited
    /// `limits.call_timeout`.
    fn expire_call(&self, now: u32, limits: &Limits) -> bool {
        let Some(timeout) = limits.call_timeout else { return false };
        let since = self.call_since.load(Ordering::Relaxed);
        if since != 0 && now.saturating_sub(since) as u64 >= timeout.as_secs().max(1) {
            self.call_since.store(0, Ordering::Relaxed);
            self.call_expired.store(true, Ordering::Relaxed);
            self.call_waker.wake();
            return true;
        }
        false
    }

    /// What the sweeper decides for this connection at `now`.
    fn verdict(&self, now: u32, limits: &Limits) -> u8 {
        let head = self.head_since.load(Ordering::Relaxed);
        if head != 0 && now.saturating_sub(head) as u64 >= limits.header_timeout.as_secs().max(1) {
            return ABORT;
        }
        let idle = now.saturating_sub(self.progress.load(Ordering::Relaxed)) as u64;
        if self.active.load(Ordering::Relaxed) == 0 && idle >= limits.idle_timeout.as_secs().max(1) {
            return GRACEFUL;
        }
        NONE
    }
}

pin_project_lite::pin_project! {
    /// See [`ConnState::deadline`].
    pub struct Deadline<F> {
        #[pin]
        fut: F,
        state: Arc<ConnState>,
        started: bool,
    }

    impl<F> PinnedDrop for Deadline<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if *this.started {
                this.state.call_since.store(0, Ordering::Relaxed);
            }
        }
    }
}

impl<F: Future> Future for Deadline<F> {
    type Output = Result<F::Output, ()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if !*this.started {
            *this.started = true;
            this.state.call_expired.store(false, Ordering::Relaxed);
            this.state.call_since.store(TICK.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        this.state.call_waker.register(cx.waker());
        if this.state.call_expired.load(Ordering::Relaxed) {
            return Poll::Ready(Err(()));
        }
        match this.fut.poll(cx) {
            Poll::Ready(v) => {
                this.state.call_since.store(0, Ordering::Relaxed);
                *this.started = false;
                Poll::Ready(Ok(v))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Counts a request in flight on its connection until dropped.
pub struct RequestGuard(Arc<ConnState>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.progress.store(TICK.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

/// The connections of one listener.
pub struct Tracker {
    name: &'static str,
    limits: Limits,
    conns: Mutex<Vec<Weak<ConnState>>>,
    open: AtomicUsize,
    /// Woken when the last connection closes.
    idle: tokio::sync::Notify,
}

impl Tracker {
    /// A tracker for the listener `name` (a metric label); starts its
    /// sweeper, which ends with the tracker.
    pub fn new(name: &'static str, limits: Limits) -> Arc<Tracker> {
        let t = Arc::new(Tracker {
            name,
            limits,
            conns: Mutex::new(Vec::new()),
            open: AtomicUsize::new(0),
            idle: tokio::sync::Notify::new(),
        });
        tokio::spawn(sweep(Arc::downgrade(&t)));
        t
    }

    /// Admits a new connection, or `None` over the limit.
    pub fn admit(self: &Arc<Self>) -> Option<Arc<ConnState>> {
        if self.open.load(Ordering::Relaxed) >= self.limits.max_connections {
            metrics::counter!("weft_connections_rejected_total", "listener" => self.name).increment(1);
            return None;
        }
        self.open.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("weft_connections", "listener" => self.name).increment(1.0);
        let state = Arc::new(ConnState::new());
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).push(Arc::downgrade(&state));
        Some(state)
    }

    /// What counts an admitted connection closed, whatever ends it (a
    /// handshake that fails, or the connection served to its end).
    pub fn on_close(self: &Arc<Self>) -> OnClose {
        OnClose(self.clone())
    }

    fn closed(&self) {
        metrics::gauge!("weft_connections", "listener" => self.name).decrement(1.0);
        if self.open.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.idle.notify_waiters();
        }
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Closes every connection gracefully (a response in progress finishes;
    /// HTTP/1.1 closes when idle, HTTP/2 sends GOAWAY) and waits until they
    /// are gone.
    pub async fn drain(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            for c in self.conns.lock().unwrap_or_else(|e| e.into_inner()).iter().filter_map(Weak::upgrade) {
                c.signal(GRACEFUL);
            }
            if self.open() == 0 {
                return;
            }
            // Connections accepted meanwhile are signalled on the next turn.
            let _ = tokio::time::timeout(Duration::from_millis(200), idle).await;
        }
    }
}

/// Once a second: advances [`TICK`], applies the timeouts, forgets closed
/// connections.
async fn sweep(tracker: Weak<Tracker>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(t) = tracker.upgrade() else { return };
        // Several listeners advance the one clock: it moves to the seconds
        // since start, whoever gets there first.
        let now = crate::clock::now_ms().div_ceil(1000) as u32;
        TICK.fetch_max(now, Ordering::Relaxed);
        let now = TICK.load(Ordering::Relaxed);
        let mut conns = t.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|w| match w.upgrade() {
            None => false,
            Some(c) => {
                c.expire_call(now, &t.limits);
                match c.verdict(now, &t.limits) {
                    ABORT => {
                        metrics::counter!("weft_connections_timed_out_total", "listener" => t.name, "reason" => "header")
                            .increment(1);
                        c.signal(ABORT);
                    }
                    GRACEFUL if c.signal.load(Ordering::Relaxed) == NONE => {
                        metrics::counter!("weft_connections_timed_out_total", "listener" => t.name, "reason" => "idle")
                            .increment(1);
                        c.signal(GRACEFUL);
                    }
                    _ => {}
                }
                true
            }
        });
    }
}

/// A connection's I/O, noting reads and writes in its [`ConnState`].
pub struct TrackedIo<T> {
    inner: T,
    state: Arc<ConnState>,
}

impl<T> TrackedIo<T> {
    pub fn new(inner: T, state: Arc<ConnState>) -> Self {
        TrackedIo { inner, state }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TrackedIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r
            && buf.filled().len() > before
        {
            self.state.on_read(&buf.filled()[before..]);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TrackedIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            self.state.progress.store(TICK.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            self.state.progress.store(TICK.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

use hyper_util::server::graceful::GracefulConnection;

/// Serves `conn` until it ends, closing it when its state is signalled;
/// then the connection is counted closed.
pub async fn watched<C>(conn: C, state: Arc<ConnState>, closed: OnClose)
where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    Watched { conn, state, shutting: false }.await;
    drop(closed);
}

/// Counts an admitted connection closed when dropped.
pub struct OnClose(Arc<Tracker>);

impl Drop for OnClose {
    fn drop(&mut self) {
        self.0.closed();
    }
}

pin_project_lite::pin_project! {
    struct Watched<C> {
        #[pin]
        conn: C,
        state: Arc<ConnState>,
        shutting: bool,
    }
}

impl<C: GracefulConnection> Future for Watched<C>
where
    C::Error: std::fmt::Display,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        this.state.waker.register(cx.waker());
        match this.state.signal.load(Ordering::Relaxed) {
            ABORT => return Poll::Ready(()),
            GRACEFUL if !*this.shutting => {
                *this.shutting = true;
                this.conn.as_mut().graceful_shutdown();
            }
            _ => {}
        }
        match this.conn.poll(cx) {
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = %e, "connection ended with an error");
                Poll::Ready(())
            }
            Poll::Ready(Ok(())) => Poll::Ready(()),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Binds a listening TCP socket; with `reuse_port`, several processes of
/// the same user may listen on the address at once, so a new sidecar can
/// take over a port before the old one drains (the kernel shares new
/// connections among them).
pub fn bind(addr: std::net::SocketAddr, reuse_port: bool) -> std::io::Result<tokio::net::TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    tokio::net::TcpListener::from_std(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_connections: 2,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            call_timeout: Some(Duration::from_secs(30)),
        }
    }

    #[test]
    fn a_head_that_does_not_complete_in_time_aborts_the_connection() {
        let c = Arc::new(ConnState::new());
        let start = TICK.load(Ordering::Relaxed);
        c.on_read(b"GET / HTTP/1.1\r\nHost: a");
        assert_eq!(c.verdict(start + 9, &limits()), NONE);
        assert_eq!(c.verdict(start + 10, &limits()), ABORT);
        // The head completed in time: no timeout while the call is in flight.
        let g = c.request();
        assert_eq!(c.verdict(start + 100, &limits()), NONE);
        drop(g);
    }

    #[test]
    fn an_idle_connection_is_closed_gracefully_but_not_while_a_call_is_in_flight() {
        let c = Arc::new(ConnState::new());
        let start = TICK.load(Ordering::Relaxed);
        c.on_read(b"GET / HTTP/1.1\r\n\r\n");
        let g = c.request();
        assert_eq!(c.verdict(start + 1000, &limits()), NONE, "waiting for a slow upstream is not idle");
        drop(g);
        let done = TICK.load(Ordering::Relaxed);
        assert_eq!(c.verdict(done + 59, &limits()), NONE);
        assert_eq!(c.verdict(done + 60, &limits()), GRACEFUL);
    }

    #[test]
    fn http2_connections_are_bounded_by_the_idle_timeout_not_the_header_timeout() {
        let c = Arc::new(ConnState::new());
        let start = TICK.load(Ordering::Relaxed);
        // A gRPC client connects (preface, settings) long before its call.
        c.on_read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        assert_eq!(c.verdict(start + 30, &limits()), NONE);
        drop(c.request());
        c.on_read(b"\x00\x00\x08\x06\x00\x00\x00\x00\x00ping-ping");
        let last = TICK.load(Ordering::Relaxed);
        assert_eq!(c.verdict(last + 30, &limits()), NONE);
        assert_eq!(c.verdict(last + 60, &limits()), GRACEFUL);
        // An HTTP/1.1 connection's next head is timed again.
        let h1 = Arc::new(ConnState::new());
        h1.on_read(b"GET / HTTP/1.1\r\n\r\n");
        drop(h1.request());
        h1.on_read(b"GET /next");
        assert_eq!(h1.verdict(TICK.load(Ordering::Relaxed) + 10, &limits()), ABORT);
    }

    #[tokio::test]
    async fn a_call_waiting_past_the_call_timeout_is_cut_off() {
        let c = Arc::new(ConnState::new());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut call = Box::pin(c.deadline(rx));
        // First poll: the wait starts.
        assert!(call.as_mut().poll(&mut cx).is_pending());
        let since = c.call_since.load(Ordering::Relaxed);
        assert_ne!(since, 0);
        assert!(!c.expire_call(since + 29, &limits()));
        assert!(c.expire_call(since + 30, &limits()));
        assert_eq!(call.as_mut().poll(&mut cx), Poll::Ready(Err(())));
        drop(tx);
        // The next call on the connection starts afresh, and an answer in
        // time passes through.
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        let mut call = Box::pin(c.deadline(rx));
        assert!(call.as_mut().poll(&mut cx).is_pending());
        tx.send(7).unwrap();
        assert_eq!(call.as_mut().poll(&mut cx), Poll::Ready(Ok(Ok(7))));
        assert_eq!(c.call_since.load(Ordering::Relaxed), 0, "no call is waiting");
        assert!(!c.expire_call(since + 1000, &limits()));
    }

    #[tokio::test]
    async fn connections_over_the_limit_are_refused() {
        let t = Tracker::new("test", limits());
        let a = t.admit().expect("first");
        let _b = t.admit().expect("second");
        assert!(t.admit().is_none(), "a third is over the limit");
        drop(a);
        t.closed();
        assert!(t.admit().is_some(), "a slot came free");
    }
}
