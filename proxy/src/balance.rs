//! Endpoint choice: power of two choices over in-flight requests, skipping
//! ejected endpoints and, for a retry, the endpoints already tried.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use rand::Rng;

use crate::config::Endpoint;
use crate::resilience::Health;

/// The outcome of a pick.
pub struct Picked {
    pub endpoint: Option<Arc<Endpoint>>,
    /// True when an ejected endpoint was passed over.
    pub skipped_ejected: bool,
}

/// Picks two eligible endpoints at random and takes the less loaded one.
/// Endpoints in `tried` are used only when nothing else is eligible.
pub fn p2c(endpoints: &[Arc<Endpoint>], tried: &[SocketAddr], now_ms: u64) -> Picked {
    let mut skipped_ejected = false;
    let mut fresh: Vec<&Arc<Endpoint>> = Vec::with_capacity(endpoints.len());
    let mut retried: Vec<&Arc<Endpoint>> = Vec::new();
    for e in endpoints {
        if e.health.is_ejected(now_ms) {
            skipped_ejected = true;
        } else if tried.contains(&e.addr) {
            retried.push(e);
        } else {
            fresh.push(e);
        }
    }
    let pool = if fresh.is_empty() { retried } else { fresh };
    let endpoint = match pool.len() {
        0 => None,
        1 => Some(pool[0].clone()),
        n => {
            let mut rng = rand::rng();
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let (ea, eb) = (pool[a], pool[b]);
            let la = ea.health.in_flight.load(Ordering::Relaxed);
            let lb = eb.health.in_flight.load(Ordering::Relaxed);
            Some(if lb < la { eb.clone() } else { ea.clone() })
        }
    };
    Picked { endpoint, skipped_ejected }
}

/// True when at least one endpoint is not ejected.
pub fn any_eligible(endpoints: &[Arc<Endpoint>], now_ms: u64) -> bool {
    endpoints.iter().any(|e| !e.health.is_ejected(now_ms))
}

/// Counts a request as in flight until dropped.
pub struct InFlight<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> InFlight<'a> {
    pub fn new(counter: &'a std::sync::atomic::AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        InFlight(counter)
    }

    pub fn endpoint(health: &'a Health) -> Self {
        Self::new(&health.in_flight)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
