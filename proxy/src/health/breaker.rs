//! Circuit breaking per endpoint: `consecutive_failures` failed tries in a
//! row eject an endpoint for `base_ejection` × the number of times it was
//! ejected (at most 5 minutes). When that runs out the endpoint is
//! half-open: exactly one call, the probe, goes to it while the others keep
//! avoiding it; the probe's success closes the breaker, its failure ejects
//! the endpoint again for a longer period. Never more than
//! `max_ejection_percent` of a service's ready endpoints are ejected,
//! counting the one about to be.
//!
//! Every function takes the time (`now`, [`crate::clock::now_ms`]
//! clock), so the whole life of a breaker is unit-tested without waiting.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use super::{Health, Settings};

/// The longest ejection.
pub(crate) const MAX_EJECTION: Duration = Duration::from_secs(300);

/// One endpoint's breaker, kept across config versions (in its health).
#[derive(Debug, Default)]
pub(crate) struct Breaker {
    failures: AtomicU32,
    /// Ejected until then; during a probe, until the probe's window ends.
    ejected_until_ms: AtomicU64,
    ejections: AtomicU32,
    /// Ejected at least once and not yet closed by a successful probe.
    half_open: AtomicBool,
}

/// How a picked endpoint may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// The breaker is closed.
    Normal,
    /// This call is the one probe of a half-open endpoint; its outcome
    /// decides.
    Probe,
    /// Another call is probing it, or it is ejected.
    Refused,
}

/// What a failure did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Counted (or ignored: a late answer from before an ejection).
    Counted,
    /// The threshold is reached: eject, if the service's cap allows
    /// ([`on_failure`] decides).
    Threshold,
    /// A failed probe: ejected again, for longer.
    Reejected,
}

impl Breaker {
    #[inline]
    pub(crate) fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now
    }

    /// Called for the endpoint a call is about to use. A half-open endpoint
    /// admits one probe: the first caller claims it by moving the ejection
    /// deadline to the end of the probe window, which turns every other
    /// caller away until the probe answers (or its window runs out, if the
    /// probe is abandoned).
    #[inline]
    pub(crate) fn admit(&self, now: u64, s: &Settings) -> Admission {
        if !self.half_open.load(Ordering::Relaxed) {
            return Admission::Normal;
        }
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        if until > now {
            return Admission::Refused;
        }
        let window = s.base_ejection.clamp(Duration::from_secs(1), Duration::from_secs(30)).as_millis() as u64;
        match self.ejected_until_ms.compare_exchange(until, now + window, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => Admission::Probe,
            Err(_) => Admission::Refused,
        }
    }

    pub(crate) fn record_success(&self, admission: Admission) {
        self.failures.store(0, Ordering::Relaxed);
        if admission == Admission::Probe {
            self.ejected_until_ms.store(0, Ordering::Relaxed);
            self.ejections.store(0, Ordering::Relaxed);
            self.half_open.store(false, Ordering::Relaxed);
        }
    }

    /// Counts a failed try. A probe's failure ejects again at once; other
    /// failures while half-open (calls that started before the ejection) do
    /// not count.
    pub(crate) fn record_failure(&self, admission: Admission, s: &Settings, now: u64) -> Failure {
        if s.consecutive_failures == 0 {
            return Failure::Counted;
        }
        if admission == Admission::Probe {
            self.eject(now, s);
            return Failure::Reejected;
        }
        if self.half_open.load(Ordering::Relaxed) || self.is_ejected(now) {
            return Failure::Counted;
        }
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= s.consecutive_failures { Failure::Threshold } else { Failure::Counted }
    }

    /// Counts a try that was a latency outlier: the probe's ejects again at
    /// once; any other makes an ejection due, as a failure at the threshold
    /// does.
    pub(crate) fn record_outlier(&self, admission: Admission, s: &Settings, now: u64) -> Failure {
        if admission == Admission::Probe {
            self.eject(now, s);
            return Failure::Reejected;
        }
        Failure::Threshold
    }

    /// Ejects for base × (ejections so far + 1), at most [`MAX_EJECTION`].
    pub(crate) fn eject(&self, now: u64, s: &Settings) {
        let n = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let period = (s.base_ejection * n).min(MAX_EJECTION);
        self.ejected_until_ms.store(now + period.as_millis() as u64, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        self.half_open.store(true, Ordering::Relaxed);
    }

    /// How many times in a row it has been ejected.
    pub(crate) fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }
}

/// What a counted failure (or latency outlier) of the endpoint of `health`
/// comes to, for a service whose ready endpoints' healths are `ready`:
/// true when the endpoint was ejected (first time or again). The cap check
/// and the ejection happen under `lock` (the service's), so two at once
/// cannot both pass the cap.
pub(crate) fn on_failure<'a>(
    health: &Health,
    failure: Failure,
    ready: impl Iterator<Item = &'a Health>,
    s: &Settings,
    lock: &std::sync::Mutex<()>,
    now: u64,
) -> bool {
    match failure {
        Failure::Counted => false,
        Failure::Reejected => true,
        Failure::Threshold => {
            let _held = lock.lock().unwrap_or_else(|e| e.into_inner());
            if health.breaker.is_ejected(now) || !cap_allows(ready, s, now) {
                return false;
            }
            health.breaker.eject(now, s);
            true
        }
    }
}

/// True when one more ejection keeps the ejected share of the ready
/// endpoints within `max_ejection_percent`.
pub(crate) fn cap_allows<'a>(ready: impl Iterator<Item = &'a Health>, s: &Settings, now: u64) -> bool {
    let (mut n, mut ejected) = (0u64, 0u64);
    for h in ready {
        n += 1;
        ejected += u64::from(h.breaker.is_ejected(now));
    }
    (ejected + 1) * 100 <= u64::from(s.max_ejection_percent) * n
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    fn settings(failures: u32, pct: u32) -> Settings {
        Settings {
            consecutive_failures: failures,
            base_ejection: Duration::from_secs(10),
            max_ejection_percent: pct,
            ..Settings::default()
        }
    }

    fn endpoints(n: u16) -> Vec<Arc<Health>> {
        (1..=n).map(|_| Arc::new(Health::born_at(0))).collect()
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_in_between_resets_the_count() {
        let b = Breaker::default();
        let s = settings(3, 100);
        assert_eq!(b.record_failure(Admission::Normal, &s, 0), Failure::Counted);
        assert_eq!(b.record_failure(Admission::Normal, &s, 0), Failure::Counted);
        b.record_success(Admission::Normal);
        assert_eq!(b.record_failure(Admission::Normal, &s, 0), Failure::Counted);
        assert_eq!(b.record_failure(Admission::Normal, &s, 0), Failure::Counted);
        assert_eq!(b.record_failure(Admission::Normal, &s, 0), Failure::Threshold);
        // Without a breaker configured nothing counts.
        let off = Breaker::default();
        for _ in 0..10 {
            assert_eq!(off.record_failure(Admission::Normal, &settings(0, 100), 0), Failure::Counted);
        }
    }

    #[test]
    fn half_open_lets_one_probe_through_and_its_success_closes_the_breaker() {
        let b = Breaker::default();
        let s = settings(1, 100);
        b.eject(1_000, &s);
        assert!(b.is_ejected(1_000) && b.is_ejected(10_999));
        assert_eq!(b.admit(5_000, &s), Admission::Refused);
        // The ejection ran out: one probe, everyone else keeps away.
        assert!(!b.is_ejected(11_000));
        assert_eq!(b.admit(11_000, &s), Admission::Probe);
        assert!(b.is_ejected(11_000), "others avoid it while the probe is out");
        assert_eq!(b.admit(11_001, &s), Admission::Refused);
        // A late success of a call from before the ejection decides nothing.
        b.record_success(Admission::Normal);
        assert_eq!(b.admit(11_002, &s), Admission::Refused);
        b.record_success(Admission::Probe);
        assert!(!b.is_ejected(11_003));
        assert_eq!(b.admit(11_003, &s), Admission::Normal);
        assert_eq!(b.ejections(), 0);
    }

    #[test]
    fn a_failed_probe_ejects_again_for_longer_and_an_abandoned_probe_is_retried() {
        let b = Breaker::default();
        let s = settings(5, 100);
        b.eject(0, &s); // 10 s
        assert_eq!(b.admit(10_000, &s), Admission::Probe);
        assert_eq!(b.record_failure(Admission::Probe, &s, 10_500), Failure::Reejected);
        // Second ejection: 20 s from the failed probe.
        assert!(b.is_ejected(30_499));
        assert!(!b.is_ejected(30_500));
        assert_eq!(b.admit(30_500, &s), Admission::Probe);
        assert_eq!(b.record_failure(Admission::Probe, &s, 31_000), Failure::Reejected);
        // Third: 30 s.
        assert!(b.is_ejected(60_999) && !b.is_ejected(61_000));
        // A probe nobody answers (its caller went away) blocks others only
        // for its window (base_ejection, 10 s); then another probe goes.
        assert_eq!(b.admit(61_000, &s), Admission::Probe);
        assert_eq!(b.admit(70_999, &s), Admission::Refused);
        assert_eq!(b.admit(71_000, &s), Admission::Probe);
        b.record_success(Admission::Probe);
        assert_eq!(b.admit(71_001, &s), Admission::Normal);
        // The growth is capped at 5 minutes.
        let long = Breaker::default();
        for _ in 0..100 {
            long.eject(0, &s);
        }
        assert!(long.is_ejected(299_999) && !long.is_ejected(300_000));
    }

    /// Every endpoint in `bad` fails `rounds` times in a row; returns how
    /// many ended up ejected.
    fn fail(eps: &[Arc<Health>], ready: &[Arc<Health>], bad: usize, s: &Settings) -> usize {
        let lock = Mutex::new(());
        for _ in 0..3 * s.consecutive_failures {
            for e in &eps[..bad] {
                let adm = e.breaker.admit(1_000, s);
                if adm != Admission::Refused {
                    let failure = e.breaker.record_failure(adm, s, 1_000);
                    on_failure(e, failure, ready.iter().map(|h| &**h), s, &lock, 1_000);
                }
            }
        }
        eps.iter().filter(|e| e.breaker.is_ejected(1_000)).count()
    }

    #[test]
    fn the_cap_holds_after_the_ejection_counted_over_ready_endpoints() {
        // (endpoints, bad ones, max_ejection_percent) -> ejected
        let cases = [
            (3, 1, 50, 1),
            (3, 2, 50, 1), // two of three would be 67 %
            (3, 3, 50, 1),
            (4, 2, 50, 2),
            (4, 3, 50, 2),
            (4, 4, 50, 2),
            (3, 2, 100, 2),
            (3, 3, 100, 3),
            (4, 3, 75, 3),
            (3, 1, 0, 0),
            (1, 1, 50, 0), // ejecting the only endpoint would be 100 %
        ];
        for (n, bad, pct, want) in cases {
            let eps = endpoints(n);
            let got = fail(&eps, &eps, bad, &settings(2, pct));
            assert_eq!(got, want, "{bad} bad of {n}, cap {pct} %");
            // Only bad endpoints are ever ejected.
            assert!(eps[bad..].iter().all(|e| !e.breaker.is_ejected(1_000)));
        }
        // Not-ready endpoints do not count: 3 ready of 4, cap 50 % -> 1.
        let eps = endpoints(4);
        let ready: Vec<_> = eps[..3].to_vec();
        assert_eq!(fail(&eps, &ready, 3, &settings(2, 50)), 1);
    }
}
