//! The sidecar's millisecond clock: ejection deadlines, latency decay, held
//! endpoints, connection timeouts. Read through tokio's clock, so tests can
//! pause and advance it.

use std::sync::OnceLock;

use tokio::time::Instant;

/// Milliseconds since the process started (at least 1).
#[inline]
pub(crate) fn now_ms() -> u64 {
    ms_at(Instant::now())
}

/// [`now_ms`] of an instant already read.
#[inline]
pub(crate) fn ms_at(t: Instant) -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    t.saturating_duration_since(*START.get_or_init(Instant::now)).as_millis() as u64 + 1
}
