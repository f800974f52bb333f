//! What the sidecar knows of the health of the services it calls: per
//! endpoint, latency and load (for P2C) and its [`breaker::Breaker`]; per
//! service, the resilience settings, the calls in flight (for the
//! concurrency cap) and the [`budget::Budget`] that keeps retries from
//! multiplying an outage. Kept across config versions; nothing here knows of
//! routes or requests.

pub(crate) mod breaker;
pub(crate) mod budget;

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::clock::now_ms;

/// A service's resilience settings; zero values switch a feature off.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Settings {
    pub(crate) consecutive_failures: u32,
    pub(crate) base_ejection: Duration,
    pub(crate) max_ejection_percent: u32,
    pub(crate) max_concurrent: usize,
    pub(crate) budget_ratio: f64,
    pub(crate) budget_min_per_second: f64,
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
pub(crate) struct Health {
    pub(crate) in_flight: AtomicUsize,
    pub(crate) breaker: breaker::Breaker,
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
    pub(crate) fn born_at(born_ms: u64) -> Self {
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
pub(crate) const WARMUP_MS: u64 = 10_000;

impl Health {
    /// Records the time to response head of one request (peak-EWMA: a
    /// slower answer is taken at once, a faster one blends in over time).
    pub(crate) fn observe_rtt(&self, rtt: Duration) {
        self.observe_rtt_at(rtt, now_ms());
    }

    /// [`Health::observe_rtt`] with the clock already read (`now` from
    /// [`ms_at`]).
    pub(crate) fn observe_rtt_at(&self, rtt: Duration, now: u64) {
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
    pub(crate) fn cost(&self, now: u64) -> f64 {
        let load = (self.in_flight.load(Ordering::Relaxed) + 1) as f64;
        let age = now.saturating_sub(self.born_ms) as f64;
        let warm = (age / WARMUP_MS as f64).clamp(0.25, 1.0);
        self.decayed_rtt(now) * load / warm
    }

    #[inline]
    pub(crate) fn is_ejected(&self, now: u64) -> bool {
        self.breaker.is_ejected(now)
    }
}

/// Per-service counters, kept across config versions.
#[derive(Debug)]
pub(crate) struct ServiceStats {
    pub(crate) in_flight: AtomicUsize,
    budget: Mutex<budget::Budget>,
    /// Held while deciding an ejection against the service's cap.
    pub(crate) ejection_lock: Mutex<()>,
    /// The subscription sweep's epoch of the last call ([`crate::clock::EPOCH`]).
    last_used: AtomicU64,
    /// Where sessions were last served, for routes with `hash_on`.
    pub(crate) sessions: crate::outbound::affinity::Sessions,
}

impl Default for ServiceStats {
    fn default() -> Self {
        ServiceStats {
            in_flight: AtomicUsize::new(0),
            budget: Mutex::new(budget::Budget::default()),
            ejection_lock: Mutex::new(()),
            last_used: AtomicU64::new(crate::clock::EPOCH.load(Ordering::Relaxed)),
            sessions: Default::default(),
        }
    }
}

impl ServiceStats {
    /// Notes a call (for the subscription sweep).
    #[inline]
    pub(crate) fn touch(&self) {
        let epoch = crate::clock::EPOCH.load(Ordering::Relaxed);
        if self.last_used.load(Ordering::Relaxed) != epoch {
            self.last_used.store(epoch, Ordering::Relaxed);
        }
    }

    pub(crate) fn last_used(&self) -> u64 {
        self.last_used.load(Ordering::Relaxed)
    }

    /// A call deposits its share of a retry (see [`budget::Budget`]).
    pub(crate) fn deposit(&self, s: &Settings) {
        self.budget.lock().unwrap_or_else(|e| e.into_inner()).deposit(s, tokio::time::Instant::now());
    }

    /// Takes one retry from the budget, if there is one.
    pub(crate) fn withdraw(&self, s: &Settings) -> bool {
        self.budget.lock().unwrap_or_else(|e| e.into_inner()).withdraw(s, tokio::time::Instant::now())
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
}
