//! The body of a streamed answer (an LLM's tokens over SSE, a gRPC
//! stream), watched chunk by chunk: time to the first body byte and the
//! gaps between chunks are measured per service and endpoint, and the
//! route's `first_byte_timeout` and `idle_timeout` cut a stream that stalls.
//! A stream that keeps producing is never cut, however long it runs.
//!
//! A cut comes after the answer's head went out, so it cannot be marked in
//! the head: it is counted (`weft_stream_cuts_total`), counts against the
//! endpoint like a timeout, and ends the stream the way its protocol can
//! tell the client: gRPC gets trailers with `DEADLINE_EXCEEDED` and
//! `x-weft-degraded`; any other stream is aborted (HTTP/1.1 without its last
//! chunk, HTTP/2 with a reset), so the client never takes a cut answer for a
//! whole one.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Context;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::Frame;
use tokio::time::{Instant, Sleep};

use crate::config::{Endpoint, Rule, Service};
use crate::health::breaker::Admission;

/// Why a stream was cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cut {
    FirstByte,
    Idle,
}

impl Cut {
    /// The metric label.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Cut::FirstByte => "first-byte-timeout",
            Cut::Idle => "idle-timeout",
        }
    }

    /// The degraded mark: a late first byte is a timeout like a late head.
    pub(crate) fn degraded(self) -> &'static str {
        match self {
            Cut::FirstByte => "timeout",
            Cut::Idle => "idle-timeout",
        }
    }
}

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cut::FirstByte => f.write_str("no first body byte within the route's first_byte_timeout"),
            Cut::Idle => f.write_str("no body chunk within the route's idle_timeout"),
        }
    }
}

impl std::error::Error for Cut {}

/// Whether an answer streams: its length is not known (an SSE or gRPC
/// stream, a chunked body) and it has not ended.
pub(crate) fn is_streamed(body: &impl http_body::Body) -> bool {
    !body.is_end_stream() && body.size_hint().exact().is_none()
}

/// Who a cut is reported for: a stream cut after its head went out is a
/// degraded call like any other (log, `weftctl traces --degraded`).
pub(crate) struct Reported {
    pub(crate) shared: Arc<crate::state::Shared>,
    pub(crate) traceparent: Option<HeaderValue>,
    pub(crate) tenant: String,
    pub(crate) status: u16,
}

/// Watches one streamed answer.
pub(crate) struct Watch {
    svc: Arc<Service>,
    endpoint: Arc<Endpoint>,
    grpc: bool,
    /// When the try was sent: the time to first byte counts from here.
    sent: Instant,
    /// The last body chunk (`None` before the first).
    last: Option<Instant>,
    idle: Option<Duration>,
    /// The next cut, when a timeout applies.
    timer: Option<Pin<Box<Sleep>>>,
    ttfb: metrics::Histogram,
    gap: metrics::Histogram,
    /// Given when the rule bounds the stream (so it may be cut).
    reported: Option<Reported>,
}

impl Watch {
    /// A watch for an answer of `svc`'s `endpoint` to a try sent at `sent`,
    /// when the answer streams (its length is not known: an SSE or gRPC
    /// stream, a chunked body) or the rule bounds its body; `None` for an
    /// answer of known length under a rule without stream timeouts, which
    /// costs nothing.
    pub(crate) fn for_answer(
        svc: &Arc<Service>,
        endpoint: &Arc<Endpoint>,
        rule: Option<&Rule>,
        grpc: bool,
        sent: Instant,
        body: &impl http_body::Body,
        reported: impl FnOnce() -> Reported,
    ) -> Option<Box<Watch>> {
        let first_byte = rule.and_then(|r| r.first_byte_timeout);
        let idle = rule.and_then(|r| r.idle_timeout);
        let bounded = first_byte.is_some() || idle.is_some();
        if body.is_end_stream() || !(bounded || body.size_hint().exact().is_none()) {
            return None;
        }
        let (ttfb, gap) = endpoint
            .health
            .stream_metrics
            .get_or_init(|| {
                let labels = [("service", svc.name.clone()), ("endpoint", endpoint.addr.to_string())];
                (
                    metrics::histogram!("weft_first_byte_seconds", &labels),
                    metrics::histogram!("weft_stream_gap_seconds", &labels),
                )
            })
            .clone();
        let mut w = Box::new(Watch {
            svc: svc.clone(),
            endpoint: endpoint.clone(),
            grpc,
            sent,
            last: None,
            idle,
            timer: None,
            ttfb,
            gap,
            reported: bounded.then(reported),
        });
        w.arm(first_byte.map(|t| sent + t));
        Some(w)
    }

    fn arm(&mut self, at: Option<Instant>) {
        match (at, &mut self.timer) {
            (None, _) => self.timer = None,
            (Some(at), Some(t)) => t.as_mut().reset(at),
            (Some(at), None) => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }

    /// Notes a frame of the answer.
    pub(crate) fn frame(&mut self, frame: &Frame<Bytes>) {
        if frame.data_ref().is_none_or(|d| d.is_empty()) {
            return;
        }
        let now = Instant::now();
        match self.last {
            None => {
                let ttfb = now - self.sent;
                self.ttfb.record(ttfb.as_secs_f64());
                // Balancing and outlier ejection weigh a streamed answer by
                // its first byte.
                let now_ms = crate::clock::now_ms();
                self.endpoint.health.observe_rtt_at(ttfb, now_ms);
                self.svc.first_byte(&self.endpoint, ttfb, Admission::Normal, now_ms);
            }
            Some(last) => self.gap.record((now - last).as_secs_f64()),
        }
        self.last = Some(now);
        if let Some(idle) = self.idle {
            self.arm(Some(now + idle));
        } else if self.timer.is_some() {
            self.timer = None;
        }
    }

    /// Polled when the answer has nothing yet: `Some` when a timeout cut
    /// the stream.
    pub(crate) fn poll_cut(&mut self, cx: &mut Context<'_>) -> Option<Cut> {
        let timer = self.timer.as_mut()?;
        if timer.as_mut().poll(cx).is_pending() {
            return None;
        }
        self.timer = None;
        let cut = if self.last.is_none() { Cut::FirstByte } else { Cut::Idle };
        let endpoint = self.endpoint.addr.to_string();
        tracing::info!(service = self.svc.name, endpoint, reason = cut.reason(), "stream cut: {cut}");
        metrics::counter!("weft_stream_cuts_total", "service" => self.svc.name.clone(), "endpoint" => endpoint, "reason" => cut.reason())
            .increment(1);
        self.svc.endpoint_failed(&self.endpoint, Admission::Normal, crate::clock::now_ms());
        if let Some(r) = self.reported.take() {
            let reasons = cut.degraded().to_string();
            r.shared.degraded_call(r.traceparent.as_ref(), self.svc.name.clone(), r.tenant, reasons, r.status);
        }
        Some(cut)
    }

    /// How the stream ends after `cut`: gRPC trailers, or an error that
    /// aborts it.
    pub(crate) fn ending(&self, cut: Cut) -> Result<Frame<Bytes>, Cut> {
        if !self.grpc {
            return Err(cut);
        }
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("4"));
        t.insert("grpc-message", HeaderValue::from_static(cut.reason()));
        t.insert("x-weft-degraded", HeaderValue::from_static(cut.degraded()));
        Ok(Frame::trailers(t))
    }
}
