//! Endpoint choice: power of two choices over in-flight requests.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use rand::Rng;

use crate::config::{Endpoint, EndpointStats};

/// Picks two endpoints at random and takes the less loaded one.
pub fn p2c(endpoints: &[Arc<Endpoint>]) -> Option<Arc<Endpoint>> {
    match endpoints.len() {
        0 => None,
        1 => Some(endpoints[0].clone()),
        n => {
            let mut rng = rand::rng();
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let (ea, eb) = (&endpoints[a], &endpoints[b]);
            let la = ea.stats.in_flight.load(Ordering::Relaxed);
            let lb = eb.stats.in_flight.load(Ordering::Relaxed);
            Some(if lb < la { eb.clone() } else { ea.clone() })
        }
    }
}

/// Counts a request as in flight to an endpoint until dropped.
pub struct InFlight<'a>(&'a EndpointStats);

impl<'a> InFlight<'a> {
    pub fn new(stats: &'a EndpointStats) -> Self {
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(stats)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
