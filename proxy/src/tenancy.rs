//! Per-tenant limits enforced by the inbound sidecar: a rate limit, a cap on
//! concurrent requests and an inference-token quota per minute. Each is a
//! global figure for the whole service; every instance enforces its share
//! (the figure divided by the service's ready instances, so the shares follow
//! instances as they come and go).
//!
//! The rate limit is `governor`'s GCRA limiter (one per tenant and service
//! at this instance), rebuilt when the tenant's share changes.
//!
//! Token quotas are token buckets (a minute's quota, refilled continuously)
//! that nest: the tenant's, then the calling service's (`callers`), then
//! the session's (a header's value). A call that declares its maximum
//! tokens (`x-weft-max-tokens`, or `max_tokens` / `max_completion_tokens`
//! in a JSON body) reserves them from every bucket that applies before it
//! reaches the app, all or nothing, so concurrent calls can never together
//! take more than a bucket holds; the call settles with the usage it
//! reports (`x-weft-usage-tokens`, header or trailer) and what it did not
//! use goes back. A call that declares nothing is admitted while every
//! bucket has tokens left and charged what it reports afterwards (it may
//! overshoot; declaring is what makes a quota exact).

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Response header (or gRPC trailer) in which a service reports the
/// inference tokens a call used.
pub(crate) const USAGE_HEADER: &str = "x-weft-usage-tokens";

/// Request header in which a call declares the most tokens it may use.
pub(crate) const MAX_TOKENS_HEADER: &str = "x-weft-max-tokens";

/// Session buckets kept per tenant at one instance.
pub(crate) const MAX_SESSIONS: usize = 10_000;

/// The tenant of a policy for every tenant without one of its own.
pub(crate) const ANY_TENANT: &str = "*";

/// One tenant's limits on this service, as global figures.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Limits {
    pub(crate) requests_per_second: f64,
    pub(crate) burst: f64,
    pub(crate) max_concurrent: usize,
    pub(crate) tokens_per_minute: u64,
    /// Per calling service.
    pub(crate) callers: BTreeMap<String, u64>,
    /// Per value of this header.
    pub(crate) session: Option<(http::HeaderName, u64)>,
}

impl Limits {
    /// Whether any token quota applies.
    pub(crate) fn has_tokens(&self) -> bool {
        self.tokens_per_minute > 0 || !self.callers.is_empty() || self.session.is_some()
    }
}

impl From<&weft_policy::model::TenantPolicy> for Limits {
    fn from(p: &weft_policy::model::TenantPolicy) -> Self {
        Limits {
            requests_per_second: p.rate_limit.as_ref().map(|r| r.requests_per_second).unwrap_or(0.0),
            burst: p.rate_limit.as_ref().map(|r| f64::from(r.burst)).unwrap_or(0.0),
            max_concurrent: p.max_concurrent_requests.map(|n| n.get() as usize).unwrap_or(0),
            tokens_per_minute: p.tokens_per_minute.map(|n| n.get()).unwrap_or(0),
            callers: p.callers.iter().map(|(k, v)| (k.clone(), v.get())).collect(),
            session: p.session.as_ref().map(|s| (s.header.clone(), s.tokens_per_minute.get())),
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
    tokens: Mutex<Tokens>,
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

/// A token bucket holding a minute's share of a quota, refilled
/// continuously; it may go below zero when a call reports more than it
/// reserved (the debt is paid from the refill).
#[derive(Debug, Clone)]
struct Bucket {
    level: f64,
    capacity: f64,
    at: Instant,
}

impl Bucket {
    fn new(capacity: u64, now: Instant) -> Bucket {
        Bucket { level: capacity as f64, capacity: capacity as f64, at: now }
    }

    /// Refilled to `now`, for a share of `capacity` per minute (a new
    /// share keeps what is taken, within it).
    fn at(&mut self, capacity: u64, now: Instant) -> &mut Bucket {
        let capacity = capacity as f64;
        if capacity != self.capacity {
            self.level = self.level.min(capacity);
            self.capacity = capacity;
        }
        self.refill(now)
    }

    /// Refilled to `now` at its own share.
    fn refill(&mut self, now: Instant) -> &mut Bucket {
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + secs * self.capacity / 60.0).min(self.capacity);
        self.at = now;
        self
    }

    fn full(&self) -> bool {
        self.level >= self.capacity
    }
}

/// A tenant's token buckets at this instance.
#[derive(Debug, Default)]
struct Tokens {
    tenant: Option<Bucket>,
    callers: HashMap<String, Bucket>,
    /// By a hash of the session header's value; at most [`MAX_SESSIONS`].
    sessions: HashMap<u64, Bucket>,
}

/// Whose tokens a call spends: the tenant's, and within them its calling
/// service's and its session's, where the policy gives them quotas.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Spender {
    pub(crate) caller: Option<String>,
    pub(crate) session: Option<u64>,
}

impl Spender {
    /// The spender of a call from `caller` (its verified service) carrying
    /// `headers`, under `limits`.
    pub(crate) fn of(limits: &Limits, caller: Option<&str>, headers: &http::HeaderMap) -> Spender {
        Spender {
            caller: caller.filter(|c| limits.callers.contains_key(*c)).map(str::to_string),
            session: limits
                .session
                .as_ref()
                .and_then(|(h, _)| headers.get(h))
                .map(|v| crate::hash::fnv1a(v.as_bytes())),
        }
    }
}

/// Tokens held for a call until it settles; dropped unsettled, they stay
/// spent (the call may have used them all).
#[derive(Debug)]
pub(crate) struct Reservation {
    state: Arc<State>,
    spender: Spender,
    reserved: u64,
    settled: bool,
}

impl Reservation {
    /// The call used `used` tokens: what it did not use goes back, what it
    /// used beyond the reservation is charged.
    pub(crate) fn settle(&mut self, used: u64) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let delta = self.reserved as f64 - used as f64;
        self.state.adjust(&self.spender, delta);
    }

    /// The call did no work (the app failed or never answered): all goes back.
    pub(crate) fn release(&mut self) {
        self.settle(0);
    }
}

impl Default for State {
    fn default() -> Self {
        State { in_flight: AtomicUsize::new(0), rate: Mutex::new(None), tokens: Mutex::new(Tokens::default()) }
    }
}

impl State {
    /// Admits a request or says why not. `instances` is the number of ready
    /// instances the figures are shared across. On success the returned guard
    /// counts the request in flight until dropped.
    pub(crate) fn admit(self: &Arc<Self>, limits: &Limits, instances: usize) -> Result<Option<TenantGuard>, Shed> {
        let n = instances.max(1) as f64;
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

    /// Reserves `max` tokens (or, for a call that declares none, checks that
    /// some are left) from every bucket of `spender` under `limits`, all or
    /// none. `instances` share the figures.
    pub(crate) fn reserve(
        self: &Arc<Self>,
        limits: &Limits,
        instances: usize,
        spender: Spender,
        max: Option<u64>,
    ) -> Result<Reservation, Shed> {
        let want = max.unwrap_or(0) as f64;
        let mut t = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        let mut buckets = t.buckets(limits, instances, &spender, Instant::now());
        // A declared reservation must fit; an undeclared call needs a token.
        let need = if max.is_some() { want } else { 1.0 };
        if buckets.iter().flatten().any(|b| b.level < need) {
            return Err(Shed::TokenQuota);
        }
        for b in buckets.iter_mut().flatten() {
            b.level -= want;
        }
        Ok(Reservation { state: self.clone(), spender, reserved: max.unwrap_or(0), settled: false })
    }

    /// Gives `delta` tokens back to (or, negative, takes them from) the
    /// buckets `spender` drew on.
    fn adjust(&self, spender: &Spender, delta: f64) {
        let mut t = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        for b in t.drawn(spender, Instant::now()).into_iter().flatten() {
            b.level = (b.level + delta).min(b.capacity);
        }
    }
}

impl Tokens {
    /// The buckets a spender's call draws on under `limits` (the tenant's,
    /// its caller's, its session's), made when missing and refilled to `now`.
    fn buckets(
        &mut self,
        limits: &Limits,
        instances: usize,
        spender: &Spender,
        now: Instant,
    ) -> [Option<&mut Bucket>; 3] {
        let share = |per_minute: u64| (per_minute as f64 / instances.max(1) as f64).ceil() as u64;
        let tenant = (limits.tokens_per_minute > 0).then(|| {
            let cap = share(limits.tokens_per_minute);
            self.tenant.get_or_insert_with(|| Bucket::new(cap, now)).at(cap, now)
        });
        let caller = spender.caller.as_ref().and_then(|c| Some((c, limits.callers.get(c)?))).map(|(c, q)| {
            let cap = share(*q);
            if !self.callers.contains_key(c.as_str()) {
                self.callers.insert(c.clone(), Bucket::new(cap, now));
            }
            self.callers.get_mut(c.as_str()).expect("just inserted").at(cap, now)
        });
        let mut session = None;
        if let (Some(key), Some((_, q))) = (spender.session, &limits.session) {
            let cap = share(*q);
            if self.sessions.len() >= MAX_SESSIONS && !self.sessions.contains_key(&key) {
                // Sessions whose buckets are full again owe nothing: forget
                // them; if that is not enough, forget all (the tenant's and
                // callers' quotas still hold).
                self.sessions.retain(|_, b| !b.at(cap, now).full());
                if self.sessions.len() >= MAX_SESSIONS {
                    self.sessions.clear();
                }
            }
            session = Some(self.sessions.entry(key).or_insert_with(|| Bucket::new(cap, now)).at(cap, now));
        }
        [tenant, caller, session]
    }

    /// The buckets a spender drew on that are still kept, refilled to `now`.
    fn drawn(&mut self, spender: &Spender, now: Instant) -> [Option<&mut Bucket>; 3] {
        let caller = spender.caller.as_ref().and_then(|c| self.callers.get_mut(c.as_str()));
        let session = spender.session.and_then(|k| self.sessions.get_mut(&k));
        [self.tenant.as_mut(), caller, session].map(|b| b.map(|b| b.refill(now)))
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
        Limits {
            requests_per_second: rps,
            burst,
            max_concurrent: conc,
            tokens_per_minute: tpm,
            callers: BTreeMap::new(),
            session: None,
        }
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

    #[tokio::test(start_paused = true)]
    async fn undeclared_calls_are_charged_what_they_report() {
        let s = Arc::new(State::default());
        let l = limits(0.0, 0.0, 0, 100);
        s.reserve(&l, 1, Spender::default(), None).unwrap().settle(60);
        s.reserve(&l, 1, Spender::default(), None).unwrap().settle(60);
        // 120 of 100 used: nothing left until the debt is refilled.
        assert_eq!(s.reserve(&l, 1, Spender::default(), None).unwrap_err(), Shed::TokenQuota);
        tokio::time::advance(Duration::from_secs(15)).await;
        assert!(s.reserve(&l, 1, Spender::default(), None).is_ok(), "25 refilled in 15 s");
    }

    #[tokio::test(start_paused = true)]
    async fn reservations_never_admit_more_than_the_quota_and_return_what_is_unused() {
        let s = Arc::new(State::default());
        let l = limits(0.0, 0.0, 0, 1000);
        // 30 concurrent calls of up to 100 tokens: 10 fit, the rest are refused.
        let held: Vec<_> = (0..30).filter_map(|_| s.reserve(&l, 1, Spender::default(), Some(100)).ok()).collect();
        assert_eq!(held.len(), 10);
        // Each used 40: 600 come back, six more calls fit.
        for mut r in held {
            r.settle(40);
        }
        let more = (0..30).filter_map(|_| s.reserve(&l, 1, Spender::default(), Some(100)).ok()).count();
        assert_eq!(more, 6);
        // A failed call gives all back; an unsettled one keeps it spent.
        tokio::time::advance(Duration::from_secs(60)).await;
        s.reserve(&l, 1, Spender::default(), Some(1000)).unwrap().release();
        drop(s.reserve(&l, 1, Spender::default(), Some(1000)).unwrap());
        assert_eq!(s.reserve(&l, 1, Spender::default(), Some(1)).unwrap_err(), Shed::TokenQuota);
    }

    #[tokio::test(start_paused = true)]
    async fn quotas_nest_tenant_caller_session() {
        let s = Arc::new(State::default());
        let session = http::HeaderName::from_static("x-session-id");
        let l = Limits {
            callers: BTreeMap::from([("router".to_string(), 400)]),
            session: Some((session.clone(), 150)),
            ..limits(0.0, 0.0, 0, 1000)
        };
        let headers = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(session.clone(), v.parse().unwrap());
            h
        };
        let spend = |caller: Option<&str>, session: &str, n: u64| {
            s.reserve(&l, 1, Spender::of(&l, caller, &headers(session)), Some(n)).map(|mut r| r.settle(n))
        };
        // One session: 150.
        assert!(spend(Some("router"), "a", 100).is_ok());
        assert_eq!(spend(Some("router"), "a", 100).unwrap_err(), Shed::TokenQuota);
        // The router over sessions: 400.
        for sess in ["b", "c"] {
            assert!(spend(Some("router"), sess, 150).is_ok());
        }
        assert_eq!(spend(Some("router"), "d", 100).unwrap_err(), Shed::TokenQuota, "router: 400 spent");
        // Another caller, no quota of its own: the tenant's 1000 (600 left).
        assert!(spend(Some("batch"), "e", 150).is_ok());
        assert!(spend(None, "f", 150).is_ok());
        assert!(spend(None, "g", 150).is_ok());
        assert_eq!(spend(None, "h", 151).unwrap_err(), Shed::TokenQuota, "tenant: 1000 - 850 < 151");
        assert!(spend(None, "h", 150).is_ok(), "exactly the quota");
        assert_eq!(spend(None, "i", 1).unwrap_err(), Shed::TokenQuota);
        // The share is divided by instances.
        let t = Arc::new(State::default());
        assert!(t.reserve(&l, 4, Spender::default(), Some(251)).is_err(), "1000 / 4 instances");
    }

    #[test]
    fn session_buckets_are_bounded() {
        let s = Arc::new(State::default());
        let session = http::HeaderName::from_static("x-session-id");
        let l = Limits { session: Some((session, 10)), ..limits(0.0, 0.0, 0, 0) };
        for k in 0..(MAX_SESSIONS as u64 * 2) {
            let sp = Spender { caller: None, session: Some(k) };
            drop(s.reserve(&l, 1, sp, Some(1)).unwrap());
        }
        assert!(s.tokens.lock().unwrap().sessions.len() <= MAX_SESSIONS);
    }
}
