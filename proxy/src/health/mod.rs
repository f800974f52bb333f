//! What the sidecar knows of the health of the services it calls: per
//! endpoint, latency and load (for P2C) and its [`breaker::Breaker`]; per
//! service, the resilience settings, the calls in flight (for the
//! concurrency cap) and the [`budget::Budget`] that keeps retries from
//! multiplying an outage. Kept across config versions; nothing here knows of
//! routes or requests.

pub(crate) mod breaker;
pub(crate) mod budget;
pub(crate) mod sessions;

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
    /// (multiple of the service's median, window)
    pub(crate) latency_outlier: Option<(f64, Duration)>,
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
            latency_outlier: None,
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
            latency_outlier: r.latency_outlier.as_ref().map(|o| (o.multiple, o.window)),
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
    /// Its times to first byte against the service's, for outlier ejection.
    pub(crate) outlier: Outlier,
    /// Its streamed answers' histograms (time to first byte, gaps), made at
    /// its first stream: label sets are not built again per stream.
    pub(crate) stream_metrics: std::sync::OnceLock<(metrics::Histogram, metrics::Histogram)>,
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
            outlier: Outlier::default(),
            stream_metrics: std::sync::OnceLock::new(),
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

/// How many of an endpoint's times to first byte in the current window
/// were above the outlier threshold.
#[derive(Debug, Default)]
pub(crate) struct Outlier {
    window_start_ms: AtomicU64,
    samples: AtomicU64,
    above: AtomicU64,
}

/// An endpoint is an outlier only on at least this many samples in a window.
pub(crate) const OUTLIER_MIN_SAMPLES: u64 = 3;

impl Outlier {
    /// Counts one sample; true when most of the window's samples (at least
    /// [`OUTLIER_MIN_SAMPLES`]) were above the threshold: the endpoint's
    /// median over the window is. The counts then start over.
    pub(crate) fn sample(&self, above: bool, window: Duration, now: u64) -> bool {
        let start = self.window_start_ms.load(Ordering::Relaxed);
        if now.saturating_sub(start) >= window.as_millis() as u64 {
            self.window_start_ms.store(now, Ordering::Relaxed);
            self.samples.store(0, Ordering::Relaxed);
            self.above.store(0, Ordering::Relaxed);
        }
        let n = self.samples.fetch_add(1, Ordering::Relaxed) + 1;
        let a = if above { self.above.fetch_add(1, Ordering::Relaxed) + 1 } else { self.above.load(Ordering::Relaxed) };
        let out = n >= OUTLIER_MIN_SAMPLES && a * 2 > n;
        if out {
            self.samples.store(0, Ordering::Relaxed);
            self.above.store(0, Ordering::Relaxed);
        }
        out
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
    pub(crate) sessions: sessions::Sessions,
    /// Recent times to answer, for `hedge: { after: p95 }`.
    pub(crate) latency: Latencies,
}

impl Default for ServiceStats {
    fn default() -> Self {
        ServiceStats {
            in_flight: AtomicUsize::new(0),
            budget: Mutex::new(budget::Budget::default()),
            ejection_lock: Mutex::new(()),
            last_used: AtomicU64::new(crate::clock::EPOCH.load(Ordering::Relaxed)),
            sessions: Default::default(),
            latency: Default::default(),
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

/// The last [`LATENCY_SAMPLES`] times to answer of a service (recorded only
/// where something reads them), with their median and p95 worked out again
/// every 16 samples, so reading them costs two atomic loads.
#[derive(Debug, Default)]
pub(crate) struct Latencies {
    ring: Mutex<Ring>,
    p50_us: AtomicU64,
    p95_us: AtomicU64,
}

pub(crate) const LATENCY_SAMPLES: usize = 128;
/// Fewer samples than this say nothing yet.
const LATENCY_MIN_SAMPLES: usize = 20;

#[derive(Debug)]
struct Ring {
    us: [u32; LATENCY_SAMPLES],
    len: usize,
    next: usize,
    since: usize,
}

impl Default for Ring {
    fn default() -> Self {
        Ring { us: [0; LATENCY_SAMPLES], len: 0, next: 0, since: 0 }
    }
}

impl Latencies {
    pub(crate) fn record(&self, d: Duration) {
        let mut r = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let i = r.next;
        r.us[i] = u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        r.next = (i + 1) % LATENCY_SAMPLES;
        r.len = (r.len + 1).min(LATENCY_SAMPLES);
        r.since += 1;
        if r.since >= 16 && r.len >= LATENCY_MIN_SAMPLES {
            r.since = 0;
            let mut sorted = r.us;
            let sorted = &mut sorted[..r.len];
            sorted.sort_unstable();
            let at = |q: f64| u64::from(sorted[((sorted.len() - 1) as f64 * q).round() as usize]);
            self.p50_us.store(at(0.5), Ordering::Relaxed);
            self.p95_us.store(at(0.95), Ordering::Relaxed);
        }
    }

    /// The median, once there are enough samples.
    pub(crate) fn p50(&self) -> Option<Duration> {
        Some(Duration::from_micros(self.p50_us.load(Ordering::Relaxed))).filter(|d| !d.is_zero())
    }

    /// The 95th percentile, once there are enough samples.
    pub(crate) fn p95(&self) -> Option<Duration> {
        Some(Duration::from_micros(self.p95_us.load(Ordering::Relaxed))).filter(|d| !d.is_zero())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_percentiles_come_from_recent_samples() {
        let l = Latencies::default();
        for ms in 1..=19 {
            l.record(Duration::from_millis(ms));
        }
        assert_eq!(l.p95(), None, "too few samples to say");
        for ms in 20..=100 {
            l.record(Duration::from_millis(ms));
        }
        // Worked out at the 100th: p95 = 95 ms, median 50-51.
        assert_eq!(l.p95().unwrap().as_millis(), 95);
        assert!((50..=51).contains(&l.p50().unwrap().as_millis()));
        // Only the last 128 count: 200 fast ones later, the slow past is gone.
        for _ in 0..200 {
            l.record(Duration::from_millis(2));
        }
        assert_eq!(l.p95().unwrap(), Duration::from_millis(2));
    }

    #[test]
    fn an_outlier_is_most_of_a_windows_samples_above_the_threshold() {
        let o = Outlier::default();
        let w = Duration::from_secs(30);
        // Fast, slow, slow: two of three above.
        assert!(!o.sample(false, w, 1_000));
        assert!(!o.sample(true, w, 1_001));
        assert!(o.sample(true, w, 1_002));
        // Counts start over; one slow in four is not an outlier.
        for (i, above) in [true, false, false, false].into_iter().enumerate() {
            assert!(!o.sample(above, w, 1_003 + i as u64));
        }
        // A new window forgets the old: two slow are not yet three samples.
        assert!(!o.sample(true, w, 40_000));
        assert!(!o.sample(true, w, 40_001));
        assert!(o.sample(true, w, 40_002));
    }

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
