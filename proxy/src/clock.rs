//! The sidecar's millisecond clock: ejection deadlines, latency decay, held
//! endpoints, connection timeouts. Read through tokio's clock, so tests can
//! pause and advance it. And [`EPOCH`], the coarse clock of subscription use.

use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;

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

/// A coarse clock for subscription use: bumped by each subscription sweep
/// (`state::SWEEP_PERIOD`), stored by each call into its service's stats
/// (one relaxed load, and a store only when it moved).
pub(crate) static EPOCH: AtomicU64 = AtomicU64::new(1);
