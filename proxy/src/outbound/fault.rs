//! Faults a rule injects on each try of matching requests (for testing
//! resilience): a delay, counted against the timeouts like a slow upstream,
//! and/or an abort, retried and falling back like a real failure but never
//! counted against the endpoint's health.

use std::time::Duration;

use rand::Rng;
use weft_policy::model::{Fault, FaultAbort};

/// What one try gets of a rule's fault.
#[derive(Debug, Default)]
pub(crate) struct Injected<'a> {
    pub(crate) delay: Option<Duration>,
    pub(crate) abort: Option<&'a FaultAbort>,
}

/// Draws the fault for one try of `req`.
pub(crate) fn draw<'a, B>(fault: Option<&'a Fault>, req: &http::Request<B>) -> Injected<'a> {
    let Some(f) = fault.filter(|f| f.applies(req)) else { return Injected::default() };
    let mut rng = rand::rng();
    Injected {
        delay: f.delay.as_ref().filter(|d| rng.random_bool(d.percent / 100.0)).map(|d| d.duration),
        abort: f.abort.as_ref().filter(|a| rng.random_bool(a.percent / 100.0)),
    }
}
