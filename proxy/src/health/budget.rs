//! The retry budget of one service, at one caller's sidecar: every call
//! deposits `ratio` of a retry, the floor adds `min_per_second` a second, at
//! most ten seconds of the floor (never less than ten retries) are banked,
//! and the floor's first second is there from the start, so a service that
//! fails on its first call can still be retried. No budget, no retry: retries
//! never multiply an outage. The time is a parameter.

use tokio::time::Instant;

use super::Settings;

/// Retries are counted in millionths, so that shares add up exactly (ten
/// calls at 10 % buy one retry, not 0.9999999).
const UNIT: f64 = 1_000_000.0;
const ONE: u64 = 1_000_000;

#[derive(Debug, Default)]
pub(crate) struct Budget {
    /// Millionths of a retry.
    tokens: u64,
    refilled: Option<Instant>,
    /// The (ratio, floor) the tokens were banked under.
    under: (f64, f64),
}

impl Budget {
    pub(crate) fn deposit(&mut self, s: &Settings, now: Instant) {
        self.refill(s, now);
        self.tokens = (self.tokens + (s.budget_ratio * UNIT).round() as u64).min(cap(s));
    }

    /// Takes one retry, if there is one.
    pub(crate) fn withdraw(&mut self, s: &Settings, now: Instant) -> bool {
        self.refill(s, now);
        if self.tokens >= ONE {
            self.tokens -= ONE;
            true
        } else {
            false
        }
    }

    fn refill(&mut self, s: &Settings, now: Instant) {
        if self.refilled.is_some() && self.under != (s.budget_ratio, s.budget_min_per_second) {
            // A new budget (e.g. a service's Resilience arriving after its
            // first calls) starts afresh: what the old one banked beyond the
            // new floor's first second is not the new budget's to spend.
            self.tokens = self.tokens.min(((s.budget_min_per_second * UNIT) as u64).min(cap(s)));
        }
        self.under = (s.budget_ratio, s.budget_min_per_second);
        let secs = match self.refilled {
            // The floor is there from the start.
            None => {
                self.tokens = ((s.budget_min_per_second * UNIT) as u64).min(cap(s));
                0.0
            }
            Some(t) => now.saturating_duration_since(t).as_secs_f64(),
        };
        self.refilled = Some(now);
        self.tokens = (self.tokens + (secs * s.budget_min_per_second * UNIT) as u64).min(cap(s));
    }
}

/// At most ten seconds of the floor, and never less than ten retries'
/// worth, so a long healthy spell cannot bank a burst of retries.
fn cap(s: &Settings) -> u64 {
    ((s.budget_min_per_second * 10.0).max(10.0) * UNIT) as u64
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn settings(ratio: f64, floor: f64) -> Settings {
        Settings { budget_ratio: ratio, budget_min_per_second: floor, ..Settings::default() }
    }

    fn drain(b: &mut Budget, s: &Settings, now: Instant) -> usize {
        std::iter::from_fn(|| b.withdraw(s, now).then_some(())).count()
    }

    #[test]
    fn the_ratio_caps_retries_to_a_share_of_calls() {
        let (s, now) = (settings(0.1, 0.0), Instant::now());
        let mut b = Budget::default();
        for _ in 0..100 {
            b.deposit(&s, now);
        }
        assert_eq!(drain(&mut b, &s, now), 10, "100 calls at 10 % buy 10 retries");
        // A ratio of 0: no retries beyond the floor.
        let zero = settings(0.0, 0.0);
        let mut b = Budget::default();
        for _ in 0..1000 {
            b.deposit(&zero, now);
        }
        assert_eq!(drain(&mut b, &zero, now), 0);
    }

    #[test]
    fn the_floor_is_there_at_once_refills_over_time_and_is_capped() {
        let (s, t0) = (settings(0.0, 5.0), Instant::now());
        let mut b = Budget::default();
        // The first second's floor from the start, not ten seconds' worth.
        assert_eq!(drain(&mut b, &s, t0), 5);
        assert_eq!(drain(&mut b, &s, t0 + Duration::from_millis(200)), 1);
        // A long quiet spell banks at most the cap (10 s of the floor here).
        assert_eq!(drain(&mut b, &s, t0 + Duration::from_secs(3600)), 50);
        // A floor below 1/s still banks at least ten retries.
        let slow = settings(0.0, 0.5);
        let mut b = Budget::default();
        let _ = drain(&mut b, &slow, t0);
        assert_eq!(drain(&mut b, &slow, t0 + Duration::from_secs(3600)), 10);
    }

    #[test]
    fn a_new_budget_does_not_inherit_what_the_old_one_banked() {
        let (default, t0) = (Settings::default(), Instant::now());
        let mut b = Budget::default();
        b.deposit(&default, t0);
        // The service's own budget arrives: 10 %, no floor. The default
        // floor's 10 retries are not spent under it.
        let strict = settings(0.1, 0.0);
        for _ in 0..20 {
            b.deposit(&strict, t0);
        }
        assert_eq!(drain(&mut b, &strict, t0), 2, "20 calls at 10 %");
    }
}
