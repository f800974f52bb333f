//! Endpoint choice: power of two choices over peak-EWMA latency × load,
//! preferring endpoints in the caller's region, skipping ejected endpoints
//! and, for a retry, the endpoints already tried.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use rand::Rng;

use crate::config::Endpoint;
use crate::health::Health;

/// The outcome of a pick.
pub(crate) struct Picked {
    pub(crate) endpoint: Option<Arc<Endpoint>>,
    /// True when an ejected endpoint was passed over.
    pub(crate) skipped_ejected: bool,
}

/// A local endpoint is kept unless it has more than this many times the
/// requests in flight of the best remote one (plus one).
const SPILLOVER_FACTOR: usize = 2;

/// Load, not latency, decides spill-over: remote endpoints are seldom used,
/// so their latency estimates are stale.
fn overloaded(local: &Endpoint, remote: &Endpoint) -> bool {
    let l = local.health.in_flight.load(Ordering::Relaxed);
    let r = remote.health.in_flight.load(Ordering::Relaxed);
    l > SPILLOVER_FACTOR * (r + 1)
}

/// Picks among the eligible endpoints. `region` is the caller's region:
/// endpoints there are preferred while they are healthy and not overloaded.
pub(crate) fn p2c(endpoints: &[Arc<Endpoint>], tried: &[SocketAddr], now_ms: u64, region: Option<&str>) -> Picked {
    // The common case, a first try with no region preference, draws two
    // endpoints straight from the list: constant work per call whatever the
    // number of instances. The list is filtered only when a draw lands on an
    // ejected endpoint.
    let mut first_draw_ejected = None;
    if tried.is_empty() && region.is_none() && !endpoints.is_empty() {
        let (a, b) = if endpoints.len() == 1 { (0, 0) } else { two_indices(endpoints.len()) };
        let (ea, eb) = (&endpoints[a], &endpoints[b]);
        let a_out = ea.health.is_ejected(now_ms);
        if !a_out && (a == b || !eb.health.is_ejected(now_ms)) {
            let e = if a == b { ea } else { cheaper(ea, eb, now_ms) };
            return Picked { endpoint: Some(e.clone()), skipped_ejected: false };
        }
        first_draw_ejected = Some(a_out);
    }
    let mut ejected = 0;
    let mut fresh: Vec<&Arc<Endpoint>> = Vec::with_capacity(endpoints.len());
    let mut retried: Vec<&Arc<Endpoint>> = Vec::new();
    for e in endpoints {
        if e.health.is_ejected(now_ms) {
            ejected += 1;
        } else if tried.contains(&e.addr) {
            retried.push(e);
        } else {
            fresh.push(e);
        }
    }
    // The breaker changed this call's course when a draw over all endpoints
    // would have hit an ejected one (and this is not already a retry).
    let skipped_ejected = first_draw_ejected
        .unwrap_or_else(|| ejected > 0 && tried.is_empty() && rand::rng().random_range(0..endpoints.len()) < ejected);
    let pool = if fresh.is_empty() { retried } else { fresh };
    let endpoint = match region {
        Some(r) if pool.iter().any(|e| e.labels.get("region").is_some_and(|l| l == r)) => {
            let (local, remote): (Vec<&Arc<Endpoint>>, Vec<&Arc<Endpoint>>) =
                pool.into_iter().partition(|e| e.labels.get("region").is_some_and(|l| l == r));
            let l = best_of_two(&local, now_ms);
            match (l, best_of_two(&remote, now_ms)) {
                (Some(l), Some(rm)) if overloaded(&l, &rm) => Some(rm),
                (l, _) => l,
            }
        }
        _ => best_of_two(&pool, now_ms),
    };
    Picked { endpoint, skipped_ejected }
}

fn best_of_two(pool: &[&Arc<Endpoint>], now_ms: u64) -> Option<Arc<Endpoint>> {
    match pool.len() {
        0 => None,
        1 => Some(pool[0].clone()),
        n => {
            let (a, b) = two_indices(n);
            Some(cheaper(pool[a], pool[b], now_ms).clone())
        }
    }
}

/// Two distinct random indices below `n` (at least 2).
fn two_indices(n: usize) -> (usize, usize) {
    let mut rng = rand::rng();
    let a = rng.random_range(0..n);
    let mut b = rng.random_range(0..n - 1);
    if b >= a {
        b += 1;
    }
    (a, b)
}

fn cheaper<'a>(a: &'a Arc<Endpoint>, b: &'a Arc<Endpoint>, now_ms: u64) -> &'a Arc<Endpoint> {
    if b.health.cost(now_ms) < a.health.cost(now_ms) { b } else { a }
}

/// True when at least one endpoint is not ejected.
pub(crate) fn any_eligible(endpoints: &[Arc<Endpoint>], now_ms: u64) -> bool {
    endpoints.iter().any(|e| !e.health.is_ejected(now_ms))
}

/// Counts a request as in flight until dropped.
pub(crate) struct InFlight<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> InFlight<'a> {
    pub(crate) fn new(counter: &'a std::sync::atomic::AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        InFlight(counter)
    }

    pub(crate) fn endpoint(health: &'a Health) -> Self {
        Self::new(&health.in_flight)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn ep(port: u16, region: &str) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            proxy_id: format!("p{port}"),
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            labels: BTreeMap::from([("region".to_string(), region.to_string())]),
            ready: true,
            mtls: false,
            health: Arc::new(Health::default()),
            held_until_ms: 0,
        })
    }

    #[test]
    fn prefers_the_callers_region() {
        let eps = vec![ep(1, "east"), ep(2, "west"), ep(3, "west")];
        for _ in 0..50 {
            let p = p2c(&eps, &[], crate::clock::now_ms(), Some("east"));
            assert_eq!(p.endpoint.unwrap().addr.port(), 1);
        }
    }

    #[test]
    fn spills_over_when_the_local_endpoint_is_overloaded() {
        let eps = vec![ep(1, "east"), ep(2, "west")];
        eps[0].health.observe_rtt(Duration::from_millis(1));
        let now = crate::clock::now_ms();
        let _busy: Vec<_> = (0..2).map(|_| InFlight::endpoint(&eps[0].health)).collect();
        assert_eq!(p2c(&eps, &[], now, Some("east")).endpoint.unwrap().addr.port(), 1, "2 in flight is not overloaded");
        let _more = InFlight::endpoint(&eps[0].health);
        assert_eq!(p2c(&eps, &[], now, Some("east")).endpoint.unwrap().addr.port(), 2);
    }

    #[test]
    fn never_picks_an_ejected_endpoint_and_marks_the_calls_it_diverted() {
        let s = crate::health::Settings { consecutive_failures: 1, ..Default::default() };
        // One endpoint, then 8 of which 6 are ejected.
        let one = vec![ep(1, "x")];
        assert_eq!(p2c(&one, &[], crate::clock::now_ms(), None).endpoint.unwrap().addr.port(), 1);
        one[0].health.breaker.eject(crate::clock::now_ms(), &s);
        let p = p2c(&one, &[], crate::clock::now_ms(), None);
        assert!(p.endpoint.is_none() && p.skipped_ejected);

        let eps: Vec<_> = (1..=8).map(|port| ep(port, "x")).collect();
        for e in &eps[2..] {
            e.health.breaker.eject(crate::clock::now_ms(), &s);
        }
        let now = crate::clock::now_ms();
        let mut diverted = 0;
        for _ in 0..4000 {
            let p = p2c(&eps, &[], now, None);
            assert!(p.endpoint.unwrap().addr.port() <= 2, "an ejected endpoint was picked");
            diverted += usize::from(p.skipped_ejected);
        }
        // A draw over all 8 lands on an ejected one 6 times in 8.
        assert!((2700..=3300).contains(&diverted), "{diverted} of 4000 marked");
        // A retry never goes back to what it tried while another is left.
        let tried = [eps[0].addr];
        for _ in 0..50 {
            assert_eq!(p2c(&eps, &tried, now, None).endpoint.unwrap().addr.port(), 2);
        }
    }

    #[test]
    fn avoids_the_slower_of_two() {
        let eps = vec![ep(1, "x"), ep(2, "x")];
        eps[0].health.observe_rtt(Duration::from_millis(50));
        eps[1].health.observe_rtt(Duration::from_millis(1));
        for _ in 0..20 {
            assert_eq!(p2c(&eps, &[], crate::clock::now_ms(), None).endpoint.unwrap().addr.port(), 2);
        }
    }
}
