//! What protects callers from a failing service: per-endpoint health
//! (latency, load, and its [`crate::breaker::Breaker`]), the service's
//! concurrency cap, and the retry budget that keeps retries from multiplying
//! an outage.

use std::sync::Mutex;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Milliseconds since the process started: the clock of ejection deadlines.
pub fn now_ms() -> u64 {
    ms_at(Instant::now())
}

/// [`now_ms`] of an instant already read.
pub fn ms_at(t: Instant) -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    t.saturating_duration_since(*START.get_or_init(Instant::now)).as_millis() as u64 + 1
}

/// A service's resilience settings; zero values switch a feature off.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
    pub max_concurrent: usize,
    pub budget_ratio: f64,
    pub budget_min_per_second: f64,
}

impl Default for Settings {
    /// Used when a service has no `Resilience` resource: no breaker, no cap,
    /// and the default retry budget (20 % of requests, at least 10/s).
    fn default() -> Self {
        Settings {
            consecutive_failures: 0,
            base_ejection: Duration::from_secs(10),
            max_ejection_percent: 50,
            max_concurrent: 0,
            budget_ratio: 0.2,
            budget_min_per_second: 10.0,
        }
    }
}

impl From<&weft_policy::model::Resilience> for Settings {
    fn from(r: &weft_policy::model::Resilience) -> Self {
        let d = Settings::default();
        let cb = r.circuit_breaker.as_ref();
        let budget = r.retry_budget.clone().unwrap_or(weft_policy::model::RetryBudget::DEFAULT);
        Settings {
            consecutive_failures: cb.map(|c| c.consecutive_failures.get()).unwrap_or(0),
            base_ejection: cb.map(|c| c.base_ejection).unwrap_or(d.base_ejection),
            max_ejection_percent: cb.map(|c| u32::from(c.max_ejection_percent)).unwrap_or(d.max_ejection_percent),
            max_concurrent: r.max_concurrent_requests.map(|n| n.get() as usize).unwrap_or(0),
            budget_ratio: budget.ratio,
            budget_min_per_second: f64::from(budget.min_per_second),
        }
    }
}

/// Per-endpoint health and load, kept across config versions.
#[derive(Debug)]
pub struct Health {
    pub in_flight: AtomicUsize,
    pub breaker: crate::breaker::Breaker,
    /// Peak-EWMA of the time to response head, in microseconds (f64 bits).
    rtt_us: AtomicU64,
    /// When `rtt_us` was last updated (`now_ms`).
    rtt_at_ms: AtomicU64,
    /// When this endpoint was first seen (`now_ms`), for warm-up.
    born_ms: u64,
}

impl Default for Health {
    fn default() -> Self {
        Health::born_at(now_ms())
    }
}

impl Health {
    /// A new endpoint first seen at `born_ms` (`now_ms` clock).
    pub fn born_at(born_ms: u64) -> Self {
        Health {
            in_flight: AtomicUsize::new(0),
            breaker: Default::default(),
            rtt_us: AtomicU64::new(DEFAULT_RTT_US.to_bits()),
            rtt_at_ms: AtomicU64::new(now_ms()),
            born_ms,
        }
    }
}

/// The latency assumed for an endpoint not measured yet.
const DEFAULT_RTT_US: f64 = 1_000.0;
/// Decay time of the latency estimate.
const RTT_DECAY_MS: f64 = 10_000.0;
/// New endpoints take traffic gradually over this long.
pub const WARMUP_MS: u64 = 10_000;

impl Health {
    /// Records the time to response head of one request (peak-EWMA: a
    /// slower answer is taken at once, a faster one blends in over time).
    pub fn observe_rtt(&self, rtt: Duration) {
        self.observe_rtt_at(rtt, now_ms());
    }

    /// [`Health::observe_rtt`] with the clock already read (`now` from
    /// [`ms_at`]).
    pub fn observe_rtt_at(&self, rtt: Duration, now: u64) {
        let sample = rtt.as_secs_f64() * 1e6;
        let old = self.decayed_rtt(now);
        let elapsed = now.saturating_sub(self.rtt_at_ms.swap(now, Ordering::Relaxed)) as f64;
        let next = if sample > old {
            sample
        } else {
            let w = (-elapsed / RTT_DECAY_MS).exp();
            old * w + sample * (1.0 - w)
        };
        self.rtt_us.store(next.to_bits(), Ordering::Relaxed);
    }

    /// The estimate decays while the endpoint is idle, so an endpoint that
    /// was slow once gets tried again.
    fn decayed_rtt(&self, now: u64) -> f64 {
        let rtt = f64::from_bits(self.rtt_us.load(Ordering::Relaxed));
        let idle = now.saturating_sub(self.rtt_at_ms.load(Ordering::Relaxed)) as f64;
        (rtt * (-idle / RTT_DECAY_MS).exp()).max(1.0)
    }

    /// Expected cost of one more request: latency × (in flight + 1),
    /// up to 4× higher while the endpoint warms up.
    pub fn cost(&self, now: u64) -> f64 {
        let load = (self.in_flight.load(Ordering::Relaxed) + 1) as f64;
        let age = now.saturating_sub(self.born_ms) as f64;
        let warm = (age / WARMUP_MS as f64).clamp(0.25, 1.0);
        self.decayed_rtt(now) * load / warm
    }

    #[inline]
    pub fn is_ejected(&self, now: u64) -> bool {
        self.breaker.is_ejected(now)
    }
}

/// Per-service counters, kept across config versions.
#[derive(Debug)]
pub struct ServiceStats {
    pub in_flight: AtomicUsize,
    budget: Mutex<Budget>,
    /// Held while deciding an ejection against the service's cap.
    pub ejection_lock: Mutex<()>,
    /// The subscription sweep's epoch of the last call ([`crate::state::EPOCH`]).
    last_used: AtomicU64,
}

impl Default for ServiceStats {
    fn default() -> Self {
        ServiceStats {
            in_flight: AtomicUsize::new(0),
            budget: Mutex::new(Budget { tokens: 0.0, refilled: Instant::now(), primed: false }),
            ejection_lock: Mutex::new(()),
            last_used: AtomicU64::new(crate::state::EPOCH.load(Ordering::Relaxed)),
        }
    }
}

#[derive(Debug)]
struct Budget {
    tokens: f64,
    refilled: Instant,
    /// The floor is available from the start: a service that fails on its
    /// first call can still be retried.
    primed: bool,
}

impl ServiceStats {
    /// Notes a call (for the subscription sweep).
    #[inline]
    pub fn touch(&self) {
        let epoch = crate::state::EPOCH.load(Ordering::Relaxed);
        if self.last_used.load(Ordering::Relaxed) != epoch {
            self.last_used.store(epoch, Ordering::Relaxed);
        }
    }

    pub fn last_used(&self) -> u64 {
        self.last_used.load(Ordering::Relaxed)
    }

    /// Every request deposits `ratio` of a retry; the floor adds
    /// `min_per_second` per second. Capped at ten seconds' worth.
    pub fn deposit(&self, s: &Settings) {
        let mut b = self.budget.lock().expect("lock");
        Self::refill(&mut b, s);
        b.tokens = (b.tokens + s.budget_ratio).min(Self::cap(s));
    }

    /// Takes one retry from the budget, if there is one.
    pub fn withdraw(&self, s: &Settings) -> bool {
        let mut b = self.budget.lock().expect("lock");
        Self::refill(&mut b, s);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// At most ten seconds of the floor, and never less than ten retries'
    /// worth, so a long healthy spell cannot bank a burst of retries.
    fn cap(s: &Settings) -> f64 {
        (s.budget_min_per_second * 10.0).max(10.0)
    }

    fn refill(b: &mut Budget, s: &Settings) {
        if !b.primed {
            b.primed = true;
            b.tokens = s.budget_min_per_second.min(Self::cap(s));
        }
        let now = Instant::now();
        let secs = now.duration_since(b.refilled).as_secs_f64();
        b.refilled = now;
        b.tokens = (b.tokens + secs * s.budget_min_per_second).min(Self::cap(s));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_ewma_takes_slow_answers_at_once() {
        let h = Health::default();
        h.observe_rtt(Duration::from_millis(50));
        let slow = h.cost(now_ms());
        assert!(slow >= 40_000.0, "{slow}");
        let g = Health::default();
        g.observe_rtt(Duration::from_micros(200));
        assert!(g.cost(now_ms()) < slow);
    }

    #[test]
    fn new_endpoints_warm_up() {
        let now = now_ms() + 20 * WARMUP_MS;
        let old = Health::born_at(now - 2 * WARMUP_MS);
        let young = Health::born_at(now - WARMUP_MS / 2);
        let newborn = Health::born_at(now);
        let (o, y, n) = (old.cost(now), young.cost(now), newborn.cost(now));
        assert!((n / o - 4.0).abs() < 0.01, "a new endpoint costs 4x: {n} vs {o}");
        assert!(y > o && y < n, "{o} < {y} < {n}");
    }

    #[test]
    fn budget_caps_retries() {
        let stats = ServiceStats::default();
        let s = Settings { budget_ratio: 0.1, budget_min_per_second: 0.0, ..Settings::default() };
        for _ in 0..100 {
            stats.deposit(&s);
        }
        let mut retries = 0;
        while stats.withdraw(&s) {
            retries += 1;
        }
        assert!(retries <= 10, "{retries}");
        assert!(retries >= 9, "{retries}");
    }
}
