//! Per-tenant limits enforced by the inbound sidecar: a rate limit, a cap on
//! concurrent requests and an inference-token quota per minute. Each is a
//! global figure for the whole service; every instance enforces its share
//! (the figure divided by the service's ready instances, so the shares follow
//! instances as they come and go).
//!
//! The rate limit is `governor`'s GCRA limiter (one per tenant and service
//! at this instance), rebuilt when the tenant's share changes.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Response header (or gRPC trailer) in which a service reports the
/// inference tokens a call used.
pub(crate) const USAGE_HEADER: &str = "x-weft-usage-tokens";

/// The tenant of a policy for every tenant without one of its own.
pub(crate) const ANY_TENANT: &str = "*";

/// One tenant's limits on this service, as global figures.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Limits {
    pub(crate) requests_per_second: f64,
    pub(crate) burst: f64,
    pub(crate) max_concurrent: usize,
    pub(crate) tokens_per_minute: u64,
}

impl From<&weft_policy::model::TenantPolicy> for Limits {
    fn from(p: &weft_policy::model::TenantPolicy) -> Self {
        Limits {
            requests_per_second: p.rate_limit.as_ref().map(|r| r.requests_per_second).unwrap_or(0.0),
            burst: p.rate_limit.as_ref().map(|r| f64::from(r.burst)).unwrap_or(0.0),
            max_concurrent: p.max_concurrent_requests.map(|n| n.get() as usize).unwrap_or(0),
            tokens_per_minute: p.tokens_per_minute.map(|n| n.get()).unwrap_or(0),
        }
    }
}

/// Why a request was shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shed {
    RateLimited,
    Concurrency,
    TokenQuota,
}

impl Shed {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Shed::RateLimited => "rate-limited",
            Shed::Concurrency => "tenant-concurrency",
            Shed::TokenQuota => "token-quota",
        }
    }
}

/// One tenant's counters at this instance, kept across config versions.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) in_flight: AtomicUsize,
    rate: Mutex<Option<Rate>>,
    window: Mutex<Window>,
}

/// The rate limiter for one share of a tenant's rate limit.
#[derive(Debug)]
struct Rate {
    /// The share it was built for: requests per second, and burst.
    share: (f64, u32),
    limiter: governor::DefaultDirectRateLimiter,
}

impl Rate {
    /// A limiter admitting `per_second` requests a second, `burst` at once
    /// (at least one, so small shares still pass).
    fn new(per_second: f64, burst: u32) -> Rate {
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        // One request's worth of the rate, kept within what `Duration` and
        // governor take (a share of 1e-9/s would be 30 years).
        let period = Duration::from_secs_f64((1.0 / per_second).clamp(1e-9, 1e9));
        let quota = governor::Quota::with_period(period).expect("a non-zero period").allow_burst(burst);
        Rate { share: (per_second, burst.get()), limiter: governor::RateLimiter::direct(quota) }
    }
}

#[derive(Debug)]
struct Window {
    start: Instant,
    used: u64,
}

const WINDOW: Duration = Duration::from_secs(60);

impl Default for State {
    fn default() -> Self {
        let now = Instant::now();
        State {
            in_flight: AtomicUsize::new(0),
            rate: Mutex::new(None),
            window: Mutex::new(Window { start: now, used: 0 }),
        }
    }
}

impl State {
    /// Admits a request or says why not. `instances` is the number of ready
    /// instances the figures are shared across. On success the returned guard
    /// counts the request in flight until dropped.
    pub(crate) fn admit(self: &Arc<Self>, limits: &Limits, instances: usize) -> Result<Option<TenantGuard>, Shed> {
        let n = instances.max(1) as f64;
        if limits.tokens_per_minute > 0 {
            let share = (limits.tokens_per_minute as f64 / n).ceil() as u64;
            let mut w = self.window.lock().expect("lock");
            if w.start.elapsed() >= WINDOW {
                w.start = Instant::now();
                w.used = 0;
            }
            if w.used >= share {
                return Err(Shed::TokenQuota);
            }
        }
        let mut guard = None;
        if limits.max_concurrent > 0 {
            let share = (limits.max_concurrent as f64 / n).ceil() as usize;
            let now = self.in_flight.fetch_add(1, Ordering::Relaxed);
            guard = Some(TenantGuard(self.clone()));
            if now >= share {
                return Err(Shed::Concurrency);
            }
        }
        if limits.requests_per_second > 0.0 {
            let share = (limits.requests_per_second / n, (limits.burst / n).floor() as u32);
            let mut rate = self.rate.lock().expect("lock");
            if rate.as_ref().is_none_or(|r| r.share != share) {
                *rate = Some(Rate::new(share.0, share.1));
            }
            if rate.as_ref().is_some_and(|r| r.limiter.check().is_err()) {
                return Err(Shed::RateLimited);
            }
        }
        Ok(guard)
    }

    /// Adds the tokens a call reported.
    pub(crate) fn add_usage(&self, tokens: u64) {
        let mut w = self.window.lock().expect("lock");
        if w.start.elapsed() >= WINDOW {
            w.start = Instant::now();
            w.used = 0;
        }
        w.used = w.used.saturating_add(tokens);
    }
}

/// Counts a request in flight for a tenant until dropped (the response body
/// holds it, so a streamed answer counts until it ends).
#[derive(Debug)]
pub(crate) struct TenantGuard(Arc<State>);

impl Drop for TenantGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Parses a usage header value.
pub(crate) fn parse_usage(v: &http::HeaderValue) -> Option<u64> {
    v.to_str().ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rps: f64, burst: f64, conc: usize, tpm: u64) -> Limits {
        Limits { requests_per_second: rps, burst, max_concurrent: conc, tokens_per_minute: tpm }
    }

    #[test]
    fn rate_share_is_divided_by_instances() {
        let s = Arc::new(State::default());
        // 100 rps, burst 20 over 4 instances: a bucket of 5.
        let admitted = (0..50).filter(|_| s.admit(&limits(100.0, 20.0, 0, 0), 4).is_ok()).count();
        assert!((5..=6).contains(&admitted), "{admitted}");
    }

    #[test]
    fn concurrency_share_and_release() {
        let s = Arc::new(State::default());
        let l = limits(0.0, 0.0, 4, 0);
        let a = s.admit(&l, 2).unwrap();
        let b = s.admit(&l, 2).unwrap();
        assert_eq!(s.admit(&l, 2).unwrap_err(), Shed::Concurrency);
        drop(a);
        assert!(s.admit(&l, 2).is_ok());
        drop(b);
        assert_eq!(s.in_flight.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn token_quota() {
        let s = Arc::new(State::default());
        let l = limits(0.0, 0.0, 0, 100);
        assert!(s.admit(&l, 1).is_ok());
        s.add_usage(60);
        assert!(s.admit(&l, 1).is_ok());
        s.add_usage(60);
        assert_eq!(s.admit(&l, 1).unwrap_err(), Shed::TokenQuota);
    }
}
