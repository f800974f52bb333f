//! What the sidecar adds to every answer: the degraded marks (a call that
//! succeeded only by retry, fallback or the breaker's steering, or was cut
//! short) and the request metrics; the sidecar's own failures become their
//! responses here.

use std::time::Instant;

use http::HeaderValue;

use super::errors::ProxyError;
use super::headers::merge_tracestate;
use crate::telemetry;
use crate::transport::body::{BoxResponse, ProxyBody};

/// Why a call that got an answer is degraded rather than clean.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Degraded {
    pub(crate) retries: u32,
    pub(crate) breaker: bool,
    pub(crate) fallback: Option<String>,
    pub(crate) timeout: bool,
    pub(crate) shed: bool,
    /// A hedge (a second try beside the first) was sent.
    pub(crate) hedged: bool,
    /// Served while the control plane is unreachable, on the last config.
    pub(crate) stale_config: bool,
}

impl Degraded {
    pub(crate) fn any(&self) -> bool {
        self.retries > 0
            || self.breaker
            || self.fallback.is_some()
            || self.timeout
            || self.shed
            || self.hedged
            || self.stale_config
    }

    /// `retry=2,breaker,fallback=inference-lite` (the `x-weft-degraded` value).
    pub(crate) fn header_value(&self) -> String {
        let mut parts = Vec::new();
        if self.retries > 0 {
            parts.push(format!("retry={}", self.retries));
        }
        if self.breaker {
            parts.push("breaker".to_string());
        }
        if let Some(f) = &self.fallback {
            parts.push(format!("fallback={f}"));
        }
        if self.timeout {
            parts.push("timeout".to_string());
        }
        if self.shed {
            parts.push("shed".to_string());
        }
        if self.hedged {
            parts.push("hedge".to_string());
        }
        if self.stale_config {
            parts.push("stale-config".to_string());
        }
        parts.join(",")
    }
}

/// Records the outcome and turns it into the response, marking a degraded
/// success (`x-weft-degraded`, a `weft=` member in `tracestate`, and the
/// `degraded` metric label).
pub(crate) fn finish(
    result: Result<http::Response<ProxyBody>, ProxyError>,
    degraded: &Degraded,
    grpc: bool,
    direction: &'static str,
    service: &str,
    tenant: &str,
    started: Instant,
) -> BoxResponse {
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(direction, service, error = %e, "request failed in the sidecar");
            e.into_response(grpc)
        }
    };
    let is_degraded = degraded.any();
    if is_degraded {
        mark_degraded(&mut resp, degraded);
    }
    telemetry::record_request(direction, service, tenant, resp.status().as_u16(), is_degraded, started.elapsed());
    resp
}

/// `x-weft-degraded` and the `weft` member of `tracestate` (out of line:
/// most calls are not degraded).
#[cold]
#[inline(never)]
fn mark_degraded(resp: &mut BoxResponse, degraded: &Degraded) {
    let value = degraded.header_value();
    if let Ok(v) = HeaderValue::from_str(&value) {
        resp.headers_mut().insert("x-weft-degraded", v);
    }
    let member = format!("weft={}", value.replace(',', ";").replace('=', ":"));
    if let Some(v) = merge_tracestate(resp.headers().get("tracestate"), &member) {
        resp.headers_mut().insert("tracestate", v);
    }
}
