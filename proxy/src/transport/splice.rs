//! Byte streams the sidecar splices, once a connection stops being HTTP
//! calls: WebSocket and other upgrades, `CONNECT` tunnels, opaque TCP and
//! mesh TCP. Each is bounded — at most `--max-connections` of them at once
//! (more are refused before they start), and closed after
//! `--stream-idle-timeout` with no byte either way — counted in
//! `weft_tcp_streams{kind}` while open, and its bytes in
//! `weft_tcp_bytes_total{direction,way}` (`sent`: from the side that opened
//! it, `received`: back) when it ends.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The default of `--stream-idle-timeout`.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(3600);

struct Limits {
    idle: Duration,
    slots: Arc<Semaphore>,
}

impl Limits {
    fn new(max_streams: usize, idle: Duration) -> Limits {
        Limits { idle, slots: Arc::new(Semaphore::new(max_streams.max(1))) }
    }

    fn slot(&self, kind: &'static str, direction: &'static str) -> Option<Slot> {
        match self.slots.clone().try_acquire_owned() {
            Ok(permit) => {
                metrics::gauge!("weft_tcp_streams", "kind" => kind).increment(1.0);
                Some(Slot { _permit: permit, kind, direction, idle: self.idle })
            }
            Err(_) => {
                metrics::counter!("weft_tcp_streams_refused_total", "kind" => kind).increment(1);
                None
            }
        }
    }
}

static LIMITS: OnceLock<Limits> = OnceLock::new();

/// Sets the bounds, once, at start (the defaults otherwise: an hour idle,
/// 10000 streams).
pub fn configure(max_streams: usize, idle: Duration) {
    let _ = LIMITS.set(Limits::new(max_streams, idle));
}

/// A place among the open streams, held from before the stream starts
/// until it ends.
pub(crate) struct Slot {
    _permit: OwnedSemaphorePermit,
    kind: &'static str,
    /// `inbound` or `outbound`, for the byte counts.
    direction: &'static str,
    idle: Duration,
}

/// A place for a stream of `kind`, or `None` when as many are open as are
/// allowed (counted in `weft_tcp_streams_refused_total`).
pub(crate) fn slot(kind: &'static str, direction: &'static str) -> Option<Slot> {
    LIMITS.get_or_init(|| Limits::new(10_000, DEFAULT_IDLE)).slot(kind, direction)
}

impl Drop for Slot {
    fn drop(&mut self) {
        metrics::gauge!("weft_tcp_streams", "kind" => self.kind).decrement(1.0);
    }
}

/// Copies both ways between `from` (the side that opened the stream) and
/// `to` until both sides are done, either fails, or no byte has passed for
/// the idle timeout; then counts the bytes.
pub(crate) async fn run<A, B>(slot: Slot, from: A, to: B)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    match splice_with_idle(from, to, slot.idle).await {
        Ok((sent, received)) => {
            let direction = slot.direction;
            metrics::counter!("weft_tcp_bytes_total", "direction" => direction, "way" => "sent").increment(sent);
            metrics::counter!("weft_tcp_bytes_total", "direction" => direction, "way" => "received")
                .increment(received);
        }
        Err(e) => tracing::debug!(kind = slot.kind, error = %e, "a spliced stream ended with an error"),
    }
}

/// [`run`] on a task of its own, once the client's side of an upgrade or
/// `CONNECT` is handed over (after the answer that switches it is sent).
pub(crate) fn after_upgrade<B>(slot: Slot, client: hyper::upgrade::OnUpgrade, to: B)
where
    B: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        match client.await {
            Ok(upgraded) => run(slot, hyper_util::rt::TokioIo::new(upgraded), to).await,
            Err(e) => tracing::debug!(kind = slot.kind, error = %e, "the client left before its stream opened"),
        }
    });
}

async fn splice_with_idle<A, B>(a: A, b: B, idle: Duration) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = tokio::time::Instant::now();
    let since_start = move || start.elapsed().as_millis() as u64;
    let last = Arc::new(AtomicU64::new(0));
    let mut a = Active { io: a, last: last.clone(), clock: since_start };
    let mut b = Active { io: b, last: last.clone(), clock: since_start };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    let idle_ms = idle.as_millis() as u64;
    loop {
        // Sleeps until the idle time since the last byte would be up.
        let quiet_for = since_start().saturating_sub(last.load(Ordering::Relaxed));
        let wait = Duration::from_millis(idle_ms.saturating_sub(quiet_for));
        tokio::select! {
            r = &mut copy => return r,
            _ = tokio::time::sleep(wait) => {
                if since_start().saturating_sub(last.load(Ordering::Relaxed)) >= idle_ms {
                    metrics::counter!("weft_tcp_streams_idle_closed_total").increment(1);
                    return Err(io::Error::new(io::ErrorKind::TimedOut, format!("no byte for {idle:?}")));
                }
            }
        }
    }
}

/// One side of a splice: notes when a byte last passed.
struct Active<T, C> {
    io: T,
    last: Arc<AtomicU64>,
    clock: C,
}

impl<T: Unpin, C: Fn() -> u64 + Unpin> Active<T, C> {
    fn touch(&self) {
        self.last.store((self.clock)(), Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin, C: Fn() -> u64 + Unpin> AsyncRead for Active<T, C> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin, C: Fn() -> u64 + Unpin> AsyncWrite for Active<T, C> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_keeps_talking_stays_and_a_quiet_one_is_closed() {
        let (client, a) = tokio::io::duplex(64);
        let (b, server) = tokio::io::duplex(64);
        let splice = tokio::spawn(splice_with_idle(a, b, Duration::from_secs(10)));
        let (mut client, mut server) = (client, server);
        // A byte every 6 s for a minute: never 10 s of silence.
        for i in 0..10u8 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            client.write_all(&[i]).await.unwrap();
            let mut got = [0u8; 1];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got[0], i);
        }
        assert!(!splice.is_finished(), "a talking stream stays open");
        // Then silence: closed 10 s after the last byte.
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(!splice.is_finished());
        tokio::time::sleep(Duration::from_secs(2)).await;
        let err = splice.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn streams_beyond_the_bound_are_refused_until_one_ends() {
        let limits = Limits::new(2, DEFAULT_IDLE);
        let (one, two) = (limits.slot("opaque", "outbound"), limits.slot("mesh", "inbound"));
        assert!(one.is_some() && two.is_some());
        assert!(limits.slot("tunnel", "outbound").is_none(), "a third is refused");
        drop(one);
        assert!(limits.slot("tunnel", "outbound").is_some(), "a place freed is taken again");
    }
}
