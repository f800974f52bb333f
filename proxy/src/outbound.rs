//! The outbound path: the app calls `http://<service>/...` through the
//! sidecar; the service is the request's authority. Route, pick a backend and
//! an endpoint, forward to that endpoint's inbound sidecar.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Request};
use hyper::body::Incoming;
use rand::Rng;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::BodyExt;

use crate::balance::{self, InFlight};
use crate::body::{BoxResponse, ProxyBody, full};
use crate::breaker::Admission;
use crate::config::{Rule, Service};
use crate::errors::{GRPC_UNAVAILABLE, ProxyError, is_grpc};
use crate::resilience;
use crate::state::Shared;
use crate::telemetry;
use crate::upstream::{PooledBody, Upstream};
use weft_policy::model::{Fallback, RetryCondition, RetryOn};

/// How long a request for a service never seen before waits for discovery.
const DISCOVERY_WAIT: Duration = Duration::from_secs(3);

pub struct Outbound {
    pub shared: Arc<Shared>,
    pub upstream: Upstream,
    /// Request bodies with a declared length up to this are buffered so they
    /// can be retried or sent to a fallback; larger ones stream through.
    pub replay_limit: u64,
}

/// The default of `--retry-body-limit`.
pub const DEFAULT_REPLAY_LIMIT: u64 = 1024 * 1024;

/// Why a call that got an answer is degraded rather than clean.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Degraded {
    pub retries: u32,
    pub breaker: bool,
    pub fallback: Option<String>,
    pub timeout: bool,
    pub shed: bool,
    /// Served while the control plane is unreachable, on the last config.
    pub stale_config: bool,
}

impl Degraded {
    pub fn any(&self) -> bool {
        self.retries > 0 || self.breaker || self.fallback.is_some() || self.timeout || self.shed || self.stale_config
    }

    /// `retry=2,breaker,fallback=inference-lite` (the `x-weft-degraded` value).
    pub fn header_value(&self) -> String {
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
        if self.stale_config {
            parts.push("stale-config".to_string());
        }
        parts.join(",")
    }
}

/// A request body that can be sent more than once, or not.
enum ReqBody {
    Buffered(Bytes),
    Stream(Option<Incoming>, Option<crate::body::ClientBodyWatch>),
}

impl ReqBody {
    fn take(&mut self) -> Option<ProxyBody> {
        match self {
            ReqBody::Buffered(b) => Some(full(b.clone())),
            ReqBody::Stream(s, watch) => s.take().map(|b| {
                let w = watch.insert(crate::body::ClientBodyWatch::new(&b));
                crate::body::stream(b, w)
            }),
        }
    }

    /// True when the client's streamed body broke off while it was sent.
    fn client_failed(&self) -> bool {
        matches!(self, ReqBody::Stream(_, Some(w)) if w.failed())
    }
}

/// What one try produced.
type Outcome = Result<http::Response<PooledBody>, ProxyError>;

impl Outbound {
    pub async fn handle(self: Arc<Self>, mut req: Request<Incoming>) -> BoxResponse {
        let started = Instant::now();
        let grpc = is_grpc(&req);
        let mut degraded = Degraded::default();
        // Malformed requests get a 400 under the labels "-": what they name
        // must not grow the metrics.
        let (service, tenant) =
            match service_of(&req).and_then(|s| Ok((s, crate::tenant_of(&req, &self.shared.tenant_header)?))) {
                Ok(st) => st,
                Err(e) => return finish(Err(e), &degraded, grpc, "outbound", "-", "-", started),
            };
        ensure_traceparent(&mut req);
        // A cheap clone (shared bytes); parsed only if the call is degraded.
        let traceparent = req.headers().get(&TRACEPARENT).cloned();
        let result = self.route_and_forward(&service, &tenant, grpc, req, &mut degraded).await;
        // Only services the control plane knows get a label of their own.
        let label = match &result {
            Err(ProxyError::UnknownService(_) | ProxyError::NoDiscovery(_) | ProxyError::TooManyServices(_)) => "-",
            _ => service.as_str(),
        };
        let resp = finish(result, &degraded, grpc, "outbound", label, &tenant, started);
        if degraded.any() {
            let trace_id =
                traceparent.as_ref().and_then(|v| v.to_str().ok()).and_then(|v| v.get(3..35)).unwrap_or("").to_string();
            tracing::info!(trace_id, service, tenant, reasons = %degraded.header_value(), status = resp.status().as_u16(), "degraded call");
            self.shared.report_degraded(xds_proto::v1::DegradedCall {
                trace_id,
                service,
                reasons: degraded.header_value(),
                unix_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
                tenant,
                status: u32::from(resp.status().as_u16()),
            });
        }
        resp
    }

    async fn route_and_forward(
        &self,
        service: &str,
        tenant: &str,
        grpc: bool,
        req: Request<Incoming>,
        degraded: &mut Degraded,
    ) -> Result<http::Response<ProxyBody>, ProxyError> {
        let svc = self.resolve(service).await?;
        degraded.stale_config = !self.shared.control_connected.load(Ordering::Relaxed);
        if !svc.known {
            return Err(ProxyError::UnknownService(service.to_string()));
        }
        let rule = svc.route_for(tenant).and_then(|r| r.rules.iter().find(|rule| rule.matches(&req)));
        let fallback = rule.and_then(|r| r.fallback.clone());
        let retry = rule.and_then(|r| r.retry.clone());
        let timeout = rule.and_then(|r| r.timeout);
        let deadline = timeout.map(|t| Instant::now() + t);

        let (parts, body) = req.into_parts();
        // Buffer only what is known to be small and complete: no body at all,
        // or a declared length within the limit.
        let replayable = http_body::Body::is_end_stream(&body)
            || http_body::Body::size_hint(&body).upper().is_some_and(|n| n <= self.replay_limit);
        // A request without a body is always kept: a call shed by the callee's
        // sidecar can then go to another instance even without a retry policy.
        let empty = http_body::Body::is_end_stream(&body);
        let mut body = if replayable && (retry.is_some() || fallback.is_some() || empty) {
            match body.collect().await {
                Ok(b) => ReqBody::Buffered(b.to_bytes()),
                Err(e) => return Err(ProxyError::BadRequestBody(e.to_string())),
            }
        } else {
            ReqBody::Stream(Some(body), None)
        };
        let may_retry = matches!(body, ReqBody::Buffered(_))
            && (parts.method.is_idempotent() || grpc || parts.headers.contains_key("idempotency-key"));

        let max_tries = 1 + if may_retry { retry.as_ref().map(|r| r.attempts.get()).unwrap_or(0) } else { 0 };
        let settings = &svc.settings;
        svc.stats.deposit(settings);
        let _svc_guard = if settings.max_concurrent > 0 {
            if svc.stats.in_flight.load(Ordering::Relaxed) >= settings.max_concurrent {
                degraded.shed = true;
                return Box::pin(self.fallback_or(
                    fallback.as_ref(),
                    &parts,
                    &mut body,
                    degraded,
                    ProxyError::Overloaded(service.to_string()),
                ))
                .await;
            }
            Some(InFlight::new(&svc.stats.in_flight))
        } else {
            None
        };

        // The request head is cloned per try only when another try or a
        // fallback may need it: a retry policy, a fallback, or tenant limits
        // at the callee (which may shed).
        let may_shed = !svc.tenants.is_empty();
        let reuse = max_tries > 1 || fallback.is_some() || may_shed || svc.holds;
        let mut head = Some(parts);
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut last: Option<Outcome> = None;
        // One extra try for a call the callee's sidecar shed: it never reached
        // the app, so it is safe to send elsewhere whatever its method.
        let mut shed_retried = false;
        let mut extra_try = false;
        let mut verdict: Option<Verdict> = None;
        for attempt in 0..=max_tries {
            if attempt == max_tries && !extra_try {
                break;
            }
            let now = resilience::now_ms();
            let picked = pick_in(&svc, rule, &tried, now, self.region());
            degraded.breaker |= picked.skipped_ejected;
            let Some(endpoint) = picked.endpoint else {
                if last.is_none() {
                    last = Some(Err(ProxyError::NoEndpoints(service.to_string())));
                }
                break;
            };
            // A half-open endpoint takes one probe. Refused only when another
            // thread claimed the probe between the pick and here: the call
            // goes on, and its outcome decides nothing.
            let admission = match endpoint.health.breaker.admit(now, settings) {
                Admission::Refused => Admission::Normal,
                a => a,
            };
            let Some(b) = body.take() else { break };
            let attempt_head = match &head {
                Some(p) if reuse => clone_parts(p),
                _ => match head.take() {
                    Some(p) => p,
                    None => break,
                },
            };
            let mut attempt_req = Request::from_parts(attempt_head, b);
            *attempt_req.extensions_mut() = http::Extensions::new();
            let fault = rule.and_then(|r| r.fault.as_ref()).filter(|f| f.applies(&attempt_req));
            let delay = fault
                .and_then(|f| f.delay.as_ref())
                .filter(|d| rand::rng().random_bool(d.percent / 100.0))
                .map(|d| d.duration);
            let injected = fault.and_then(|f| f.abort.as_ref()).filter(|a| rand::rng().random_bool(a.percent / 100.0));
            // An injected delay counts against the timeouts like a slow upstream.
            let per_try = retry.as_ref().and_then(|r| r.per_try_timeout).filter(|_| may_retry);
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let mut try_timeout = match (per_try, remaining) {
                (Some(p), Some(r)) => Some(p.min(r)),
                (p, r) => p.or(r),
            };
            let mut timed_out = false;
            if let Some(d) = delay {
                match try_timeout {
                    Some(t) if d >= t => {
                        tokio::time::sleep(t).await;
                        timed_out = true;
                    }
                    t => {
                        tokio::time::sleep(d).await;
                        try_timeout = t.map(|t| t - d);
                    }
                }
            }
            let outcome = match injected {
                _ if timed_out => Err(ProxyError::Timeout {
                    addr: endpoint.addr.to_string(),
                    ms: try_timeout.map(|t| t.as_millis() as u64).unwrap_or(0),
                }),
                Some(a) => Err(ProxyError::FaultAbort { status: a.status, grpc_status: a.grpc_status }),
                None => {
                    let _guard = InFlight::endpoint(&endpoint.health);
                    let sent = Instant::now();
                    let r = self.upstream.send(endpoint.addr, attempt_req, try_timeout).await;
                    let done = Instant::now();
                    match r {
                        // The client's fault: a 400, and nothing against the endpoint.
                        Err(e) if body.client_failed() => Err(ProxyError::ClientBody(e.to_string())),
                        r => {
                            endpoint.health.observe_rtt_at(done - sent, resilience::ms_at(done));
                            r
                        }
                    }
                }
            };
            tried.push(endpoint.addr);
            let failed = is_failure(&outcome);
            if injected.is_some() || timed_out || matches!(outcome, Err(ProxyError::ClientBody(_))) {
                // Not the endpoint's doing: its health is left alone.
            } else if failed {
                endpoint_failed(&svc, &endpoint, admission, now);
            } else if grpc && matches!(&outcome, Ok(r) if status_in_trailers(r)) {
                // A gRPC call's status is still to come, in the trailers:
                // the response body gives the verdict when they arrive.
                verdict = Some(Verdict { svc: svc.clone(), endpoint: endpoint.clone(), admission });
            } else {
                endpoint.health.breaker.record_success(admission);
            }
            // An endpoint held after its record vanished may be gone after
            // all: a refused connection never reached anyone, so the call
            // gets one more try elsewhere whatever its method and policy.
            let held_gone = endpoint.is_held() && matches!(outcome, Err(ProxyError::Connect { .. }));
            let shed = matches!(&outcome, Ok(r) if is_callee_shed(r));
            if shed {
                // Steer later picks away from an instance that is shedding.
                endpoint.health.observe_rtt(SHED_PENALTY);
            }
            let in_time = deadline.is_none_or(|d| Instant::now() < d);
            // Retried on what the rule's conditions name, a failure for the
            // breaker or not (gRPC CANCELLED, RESOURCE_EXHAUSTED ...).
            let retryable =
                retry.as_ref().is_some_and(|r| should_retry(r.on, &outcome)) && attempt + 1 < max_tries && in_time;
            let shed_retry = (shed || held_gone)
                && reuse
                && !shed_retried
                && in_time
                && matches!(body, ReqBody::Buffered(_))
                && head.is_some()
                && svc.all_ready.iter().any(|e| !tried.contains(&e.addr));
            if failed && !retryable {
                tracing::debug!(service, attempt, max_tries, may_retry, "not retrying");
            }
            last = Some(outcome);
            if !retryable && !shed_retry {
                break;
            }
            if shed_retry {
                shed_retried = true;
                extra_try = attempt + 1 >= max_tries;
            }
            if !svc.stats.withdraw(settings) {
                tracing::debug!(service, "retry budget spent; not retrying");
                break;
            }
            degraded.retries += 1;
            metrics::counter!("weft_retries_total", "service" => service.to_string()).increment(1);
            // Exponential backoff with full jitter: up to 25 ms, 50 ms, 100 ms ...
            let cap = 25u64 << attempt.min(6);
            let backoff = Duration::from_millis(rand::rng().random_range(0..=cap));
            tokio::time::sleep(backoff).await;
        }
        let last = last.unwrap_or_else(|| Err(ProxyError::NoEndpoints(service.to_string())));
        // The callee's sidecar shed the call for the tenant's limits.
        if let Ok(resp) = &last
            && is_callee_shed(resp)
        {
            degraded.shed = true;
            if fallback.is_some() {
                let err = ProxyError::Upstream { addr: service.to_string(), reason: "shed by the callee".into() };
                if let Some(parts) = &head {
                    return Box::pin(self.fallback_or(fallback.as_ref(), parts, &mut body, degraded, err)).await;
                }
            }
        }
        if is_failure(&last) || matches!(last, Err(ProxyError::NoEndpoints(_))) {
            if matches!(last, Err(ProxyError::Timeout { .. })) {
                degraded.timeout = true;
            }
            if fallback.is_some() {
                let err = match last {
                    Err(e) => e,
                    Ok(resp) => ProxyError::Upstream {
                        addr: service.to_string(),
                        reason: format!("answered {}", resp.status()),
                    },
                };
                if let Some(parts) = &head {
                    return Box::pin(self.fallback_or(fallback.as_ref(), parts, &mut body, degraded, err)).await;
                }
                return Err(err);
            }
        }
        last.map(|r| r.map(|b| crate::body::reply_judged(b, verdict)))
    }

    /// Answers from the fallback when there is one (and the request can be
    /// sent again), else with `err`.
    async fn fallback_or(
        &self,
        fallback: Option<&Fallback>,
        parts: &http::request::Parts,
        body: &mut ReqBody,
        degraded: &mut Degraded,
        err: ProxyError,
    ) -> Result<http::Response<ProxyBody>, ProxyError> {
        match fallback {
            None => Err(err),
            Some(Fallback::Static { status, body: text }) => {
                degraded.fallback = Some("static".into());
                let mut resp = http::Response::new(full(text.clone()));
                *resp.status_mut() = *status;
                Ok(resp)
            }
            Some(Fallback::Service(name)) => {
                let Some(b) = body.take() else { return Err(err) };
                let svc = match self.resolve(name).await {
                    Ok(s) if s.known => s,
                    _ => return Err(err),
                };
                let tenant = parts
                    .headers
                    .get(&self.shared.tenant_header)
                    .and_then(|v| v.to_str().ok())
                    .filter(|v| !v.is_empty())
                    .unwrap_or("default");
                let req = Request::from_parts(clone_parts(parts), b);
                let rule = svc.route_for(tenant).and_then(|r| r.rules.iter().find(|rule| rule.matches(&req)));
                let Some(endpoint) = pick_in(&svc, rule, &[], resilience::now_ms(), self.region()).endpoint else {
                    return Err(err);
                };
                degraded.fallback = Some(name.clone());
                let now = resilience::now_ms();
                let admission = match endpoint.health.breaker.admit(now, &svc.settings) {
                    Admission::Refused => Admission::Normal,
                    a => a,
                };
                let _guard = InFlight::endpoint(&endpoint.health);
                let timeout = rule.and_then(|r| r.timeout);
                let outcome = self.upstream.send(endpoint.addr, req, timeout).await;
                if is_failure(&outcome) {
                    endpoint_failed(&svc, &endpoint, admission, now);
                } else {
                    endpoint.health.breaker.record_success(admission);
                }
                Ok(outcome?.map(crate::body::reply))
            }
        }
    }

    /// The caller's region label, which endpoints are preferred in.
    fn region(&self) -> Option<&str> {
        self.shared.identity.labels.get("region").map(String::as_str)
    }

    /// Finds the service in the table, subscribing and waiting on a miss.
    async fn resolve(&self, service: &str) -> Result<Arc<Service>, ProxyError> {
        if let Some(s) = self.shared.table.load().services.get(service) {
            s.stats.touch();
            return Ok(s.clone());
        }
        // Boxed: the wait is rare and would otherwise enlarge every call's
        // future.
        Box::pin(self.discover(service)).await
    }

    /// Subscribes to a service not in the table yet and waits for it.
    async fn discover(&self, service: &str) -> Result<Arc<Service>, ProxyError> {
        let mut changed = self.shared.table_changed.subscribe();
        if !self.shared.subscribe(service) {
            return Err(ProxyError::TooManyServices(service.to_string()));
        }
        let wait = async {
            loop {
                if let Some(s) = self.shared.table.load().services.get(service) {
                    s.stats.touch();
                    return Some(s.clone());
                }
                if changed.changed().await.is_err() {
                    return None;
                }
            }
        };
        match tokio::time::timeout(DISCOVERY_WAIT, wait).await {
            Ok(Some(s)) => Ok(s),
            _ => Err(ProxyError::NoDiscovery(service.to_string())),
        }
    }
}

/// What an instance that sheds a call counts as, latency-wise.
const SHED_PENALTY: Duration = Duration::from_millis(50);

/// What a failed try counts as, latency-wise (peak-EWMA takes it at once and
/// lets it fade over seconds).
const FAILURE_PENALTY: Duration = Duration::from_millis(50);

/// A 429 from the callee's sidecar for a tenant limit (the app never saw it).
fn is_callee_shed(resp: &http::Response<PooledBody>) -> bool {
    resp.status() == http::StatusCode::TOO_MANY_REQUESTS
        && resp
            .headers()
            .get("x-weft-error")
            .is_some_and(|v| matches!(v.as_bytes(), b"rate-limited" | b"tenant-concurrency" | b"token-quota"))
}

fn clone_parts(p: &http::request::Parts) -> http::request::Parts {
    let mut req = Request::new(());
    *req.method_mut() = p.method.clone();
    *req.uri_mut() = p.uri.clone();
    *req.version_mut() = p.version;
    *req.headers_mut() = p.headers.clone();
    req.into_parts().0
}

/// gRPC status of a trailers-only answer, if any.
fn grpc_status(resp: &http::Response<PooledBody>) -> Option<u32> {
    crate::errors::grpc_status(resp.headers())
}

/// What counts against an endpoint: 5xx, connect failure, reset, timeout,
/// gRPC UNAVAILABLE.
fn is_failure(o: &Outcome) -> bool {
    match o {
        Ok(resp) => resp.status().is_server_error() || grpc_status(resp) == Some(GRPC_UNAVAILABLE),
        Err(
            ProxyError::Connect { .. }
            | ProxyError::Reset { .. }
            | ProxyError::Timeout { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::FaultAbort { .. },
        ) => true,
        Err(_) => false,
    }
}

/// Whether a try's outcome is retried under `on`.
fn should_retry(on: RetryOn, o: &Outcome) -> bool {
    use RetryCondition::*;
    let status = |s: http::StatusCode| {
        (on.contains(ServerError) && s.is_server_error())
            || (on.contains(GatewayError) && matches!(s.as_u16(), 502..=504))
    };
    match o {
        Ok(resp) => status(resp.status()) || grpc_status(resp).is_some_and(|g| on.retries_grpc(g)),
        Err(ProxyError::FaultAbort { status: s, grpc_status }) => {
            status(*s) || grpc_status.is_some_and(|g| on.retries_grpc(u32::from(g)))
        }
        Err(ProxyError::Connect { .. }) => on.contains(ConnectFailure),
        Err(ProxyError::Reset { .. }) => on.contains(Reset),
        Err(ProxyError::Timeout { .. }) => on.contains(ServerError) || on.contains(GatewayError),
        Err(ProxyError::Upstream { .. }) => on.contains(Reset) || on.contains(ServerError),
        Err(_) => false,
    }
}

/// The breaker's verdict on a gRPC call whose status comes in trailers,
/// given by the response body when they pass. Not given when the caller goes
/// away first or the body ends without trailers.
pub struct Verdict {
    svc: Arc<Service>,
    endpoint: Arc<crate::config::Endpoint>,
    admission: Admission,
}

impl Verdict {
    /// `failed`: UNAVAILABLE, or the stream broke.
    pub fn give(self, failed: bool) {
        if failed {
            endpoint_failed(&self.svc, &self.endpoint, self.admission, resilience::now_ms());
        } else {
            self.endpoint.health.breaker.record_success(self.admission);
        }
    }
}

/// Breaker bookkeeping for a failed try: the endpoint may be ejected.
fn endpoint_failed(svc: &Service, endpoint: &crate::config::Endpoint, admission: Admission, now: u64) {
    // A fast failure must not make the endpoint look cheap to P2C.
    endpoint.health.observe_rtt(FAILURE_PENALTY);
    let lock = &svc.stats.ejection_lock;
    if crate::breaker::on_failure(endpoint, admission, &svc.all_ready, &svc.settings, lock, now) {
        metrics::counter!("weft_breaker_ejections_total", "service" => svc.name.clone()).increment(1);
        tracing::info!(service = svc.name, endpoint = %endpoint.addr, ejections = endpoint.health.breaker.ejections(), "endpoint ejected");
    }
}

/// A gRPC response whose status is not in its head (not trailers-only), so
/// it will come in trailers at the end of the body.
fn status_in_trailers(resp: &http::Response<PooledBody>) -> bool {
    resp.status() == http::StatusCode::OK && grpc_status(resp).is_none() && !http_body::Body::is_end_stream(resp.body())
}

/// Chooses the endpoint for a request under `rule`: a backend by weight
/// among those with an eligible endpoint, then an endpoint. Without a rule,
/// any ready endpoint of the service.
fn pick_in(
    svc: &Service,
    rule: Option<&Rule>,
    tried: &[SocketAddr],
    now: u64,
    region: Option<&str>,
) -> balance::Picked {
    let Some(rule) = rule else {
        return balance::p2c(&svc.all_ready, tried, now, region);
    };
    // "breaker" marks a call only when the breaker changed its course: the
    // weighted draw, as if nothing were ejected, landed on an ejected backend.
    let with_ejected = |b: &&crate::config::Backend| !b.endpoints.is_empty();
    let skipped = tried.is_empty()
        && choose_weighted(&rule.backends, with_ejected).is_some_and(|b| !balance::any_eligible(&b.endpoints, now));
    // A retry prefers backends with an endpoint not tried yet.
    let untried =
        |b: &&crate::config::Backend| b.endpoints.iter().any(|e| !e.health.is_ejected(now) && !tried.contains(&e.addr));
    let any = |b: &&crate::config::Backend| balance::any_eligible(&b.endpoints, now);
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

/// A backend by weight among those `eligible`.
fn choose_weighted<'a>(
    backends: &'a [crate::config::Backend],
    eligible: impl Fn(&&'a crate::config::Backend) -> bool,
) -> Option<&'a crate::config::Backend> {
    let total: u64 = backends.iter().filter(&eligible).map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut n = rand::rng().random_range(0..total);
    for b in backends.iter().filter(&eligible) {
        let w = u64::from(b.weight);
        if n < w {
            return Some(b);
        }
        n -= w;
    }
    None
}

/// The service a request is for: the authority of an absolute-form URI or
/// `:authority`, else the Host header; the port is ignored.
pub fn service_of<B>(req: &Request<B>) -> Result<String, ProxyError> {
    crate::single_host(req)?;
    let authority = match req.uri().authority() {
        Some(a) => a.host().to_string(),
        None => {
            let host = req.headers().get(http::header::HOST).ok_or(ProxyError::NoAuthority)?;
            let host = host.to_str().map_err(|_| {
                ProxyError::BadAuthority(crate::errors::clip(&String::from_utf8_lossy(host.as_bytes())))
            })?;
            host.rsplit_once(':')
                .map(|(h, p)| if p.chars().all(|c| c.is_ascii_digit()) { h } else { host })
                .unwrap_or(host)
                .to_string()
        }
    };
    let name = authority.to_ascii_lowercase();
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !valid {
        return Err(ProxyError::BadAuthority(crate::errors::clip(&authority)));
    }
    // `inference.default.svc` style names route to `inference`.
    let first = name.split('.').next().unwrap_or(&name);
    if !weft_policy::names::is_service(first.as_bytes()) {
        return Err(ProxyError::BadAuthority(crate::errors::clip(&authority)));
    }
    Ok(first.to_string())
}

/// The most members a `tracestate` may hold (W3C Trace Context).
const TRACESTATE_MEMBERS: usize = 32;

/// `member` (`weft=...`) first, then the members of `old` other than an
/// older `weft` one (a callee's sidecar may have added its own), at most
/// [`TRACESTATE_MEMBERS`] in all. `None` when the result is not a valid
/// header value.
pub(crate) fn merge_tracestate(old: Option<&HeaderValue>, member: &str) -> Option<HeaderValue> {
    let mut out = member.to_string();
    if let Some(old) = old.and_then(|v| v.to_str().ok()) {
        let others = old
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty() && !m.starts_with("weft="))
            .take(TRACESTATE_MEMBERS - 1);
        for m in others {
            out.push(',');
            out.push_str(m);
        }
    }
    HeaderValue::from_str(&out).ok()
}

/// Starts a W3C trace when the caller did not.
pub(crate) fn ensure_traceparent<B>(req: &mut Request<B>) {
    if req.headers().contains_key(&TRACEPARENT) {
        return;
    }
    let mut rng = rand::rng();
    let trace: u128 = rng.random::<u128>() | 1;
    let span: u64 = rng.random::<u64>() | 1;
    // `00-<32 hex>-<16 hex>-01`, written in place.
    let mut v = *b"00-00000000000000000000000000000000-0000000000000000-01";
    hex_into(&mut v[3..35], trace);
    hex_into(&mut v[36..52], u128::from(span));
    req.headers_mut().insert(&TRACEPARENT, HeaderValue::from_bytes(&v).expect("hex is a valid header"));
}

pub(crate) static TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

/// Writes the low `out.len()` hex digits of `n` into `out`.
fn hex_into(out: &mut [u8], mut n: u128) {
    for b in out.iter_mut().rev() {
        *b = b"0123456789abcdef"[(n & 0xf) as usize];
        n >>= 4;
    }
}

/// Records the outcome and turns it into the response, marking a degraded
/// success (`x-weft-degraded`, a `weft=` member in `tracestate`, and the
/// `degraded` metric label).
pub fn finish(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, host: Option<&str>) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header("host", h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn a_missing_traceparent_is_generated_and_a_present_one_kept() {
        let mut r = req("/x", Some("a"));
        ensure_traceparent(&mut r);
        let v = r.headers()["traceparent"].to_str().unwrap().to_string();
        let parts: Vec<&str> = v.split('-').collect();
        assert_eq!(parts.len(), 4, "{v}");
        assert_eq!((parts[0], parts[3]), ("00", "01"));
        assert_eq!((parts[1].len(), parts[2].len()), (32, 16), "{v}");
        assert!(parts[1..3].iter().all(|p| p.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())));
        assert!(parts[1].ends_with(['1', '3', '5', '7', '9', 'b', 'd', 'f']), "trace id is never zero: {v}");
        let mut again = req("/x", Some("a"));
        ensure_traceparent(&mut again);
        assert_ne!(again.headers()["traceparent"], v.as_str());
        ensure_traceparent(&mut r);
        assert_eq!(r.headers()["traceparent"], v.as_str());
        let mut buf = [0u8; 4];
        hex_into(&mut buf, 0xbeef);
        assert_eq!(&buf, b"beef");
    }

    #[test]
    fn service_from_host_or_absolute_uri() {
        assert_eq!(service_of(&req("/x", Some("inference:8080"))).unwrap(), "inference");
        assert_eq!(service_of(&req("/x", Some("Inference"))).unwrap(), "inference");
        assert_eq!(service_of(&req("http://state.default.svc:80/x", None)).unwrap(), "state");
        assert!(matches!(service_of(&req("/x", None)), Err(ProxyError::NoAuthority)));
        assert!(matches!(service_of(&req("/x", Some("bad host"))), Err(ProxyError::BadAuthority(_))));
        // Found by fuzzing: a name whose first label is empty routed to "".
        for bad in [".", ".inference", "..x"] {
            assert!(matches!(service_of(&req("/x", Some(bad))), Err(ProxyError::BadAuthority(_))), "{bad}");
        }
        assert!(matches!(service_of(&req("http://./x", None)), Err(ProxyError::BadAuthority(_))));
    }

    #[test]
    fn a_callees_weft_member_is_replaced_not_duplicated() {
        let old = HeaderValue::from_static("weft=shed, congo=t61rcWkgMzE,weft=retry:1");
        let merged = merge_tracestate(Some(&old), "weft=shed;retry:1").unwrap();
        assert_eq!(merged, "weft=shed;retry:1,congo=t61rcWkgMzE");
        let many: String = (0..40).map(|i| format!("k{i}=v")).collect::<Vec<_>>().join(",");
        let merged = merge_tracestate(Some(&HeaderValue::from_str(&many).unwrap()), "weft=timeout").unwrap();
        assert_eq!(merged.to_str().unwrap().split(',').count(), 32);
        assert_eq!(merge_tracestate(None, "weft=breaker").unwrap(), "weft=breaker");
    }
}
