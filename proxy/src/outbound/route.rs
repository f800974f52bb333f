//! Where a call goes: the rule that applies (the tenant's route, else the
//! default; its first matching rule), a backend by weight among those with
//! an eligible endpoint, and an endpoint by [`super::balance`].

use std::net::SocketAddr;

use rand::Rng;

use super::{affinity, balance};
use crate::config::{Backend, Rule, Service};

/// The rule of `service`'s route for `tenant` that `req` matches, if any.
#[inline]
pub(crate) fn rule_for<'a, B>(svc: &'a Service, tenant: &str, req: &http::Request<B>) -> Option<&'a Rule> {
    svc.route_for(tenant).and_then(|r| r.rules.iter().find(|rule| rule.matches(req)))
}

/// Chooses the endpoint for a request under `rule`: a backend by weight
/// among those with an eligible endpoint, then an endpoint. Without a rule,
/// any ready endpoint of the service. `tried` are the endpoints this call
/// has tried already; `session`, the call's session under the rule's
/// `hash_on` and where it was last served.
pub(crate) fn pick(
    svc: &Service,
    rule: Option<&Rule>,
    tried: &[SocketAddr],
    now: u64,
    region: Option<&str>,
    session: Option<(u64, Option<SocketAddr>)>,
) -> balance::Picked {
    let Some(rule) = rule else {
        return balance::p2c(&svc.all_ready, tried, now, region);
    };
    if let Some((key, pinned)) = session {
        return sticky(rule, key, pinned, tried, now);
    }
    // "breaker" marks a call only when the breaker changed its course: the
    // weighted draw, as if nothing were ejected, landed on an ejected backend.
    let with_ejected = |b: &&Backend| !b.endpoints.is_empty();
    let skipped = tried.is_empty()
        && choose_weighted(&rule.backends, with_ejected).is_some_and(|b| !balance::any_eligible(&b.endpoints, now));
    // A retry prefers backends with an endpoint not tried yet.
    let untried = |b: &&Backend| b.endpoints.iter().any(|e| !e.health.is_ejected(now) && !tried.contains(&e.addr));
    let any = |b: &&Backend| balance::any_eligible(&b.endpoints, now);
    let backend = choose_weighted(&rule.backends, untried).or_else(|| choose_weighted(&rule.backends, any));
    match backend {
        Some(b) => {
            let mut p = balance::p2c(&b.endpoints, tried, now, region);
            p.skipped_ejected |= skipped;
            p
        }
        None => balance::Picked { endpoint: None, skipped_ejected: skipped },
    }
}

/// A session's endpoint: its backend by weight, drawn by the session's own
/// hash (so every sidecar draws the same), then [`affinity::pick`].
fn sticky(rule: &Rule, key: u64, pinned: Option<SocketAddr>, tried: &[SocketAddr], now: u64) -> balance::Picked {
    let home = pinned.and_then(|p| rule.backends.iter().find(|b| b.endpoints.iter().any(|e| e.addr == p)));
    let any = |b: &&Backend| balance::any_eligible(&b.endpoints, now);
    let backend = home.filter(any).or_else(|| weighted(&rule.backends, any, |total| key % total));
    match backend {
        Some(b) => {
            let (endpoint, skipped_ejected) = affinity::pick(&b.endpoints, key, pinned, tried, now);
            balance::Picked { endpoint, skipped_ejected }
        }
        None => balance::Picked { endpoint: None, skipped_ejected: true },
    }
}

/// A backend by weight among those `eligible`.
fn choose_weighted<'a>(backends: &'a [Backend], eligible: impl Fn(&&'a Backend) -> bool) -> Option<&'a Backend> {
    weighted(backends, eligible, |total| rand::rng().random_range(0..total))
}

/// The backend among those `eligible` where `draw(total weight)` (below the
/// total) falls.
fn weighted<'a>(
    backends: &'a [Backend],
    eligible: impl Fn(&&'a Backend) -> bool,
    draw: impl FnOnce(u64) -> u64,
) -> Option<&'a Backend> {
    let total: u64 = backends.iter().filter(&eligible).map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut n = draw(total);
    for b in backends.iter().filter(&eligible) {
        let w = u64::from(b.weight);
        if n < w {
            return Some(b);
        }
        n -= w;
    }
    None
}
