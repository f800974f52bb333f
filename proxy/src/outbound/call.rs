//! One outbound call, phase by phase:
//!
//! 1. [`Call::new`]: the rule that applies and the call's deadline;
//! 2. [`Call::prepare`]: its body (kept for another try, or streamed once)
//!    and how many tries it may have;
//! 3. [`Call::admit`]: the service's concurrency cap;
//! 4. [`Call::try_once`] and [`Call::send`]: an endpoint, its breaker
//!    admission, the fault drawn for the try, the try itself within the
//!    per-try and call timeouts;
//! 5. [`Call::judge`]: the endpoint's breaker bookkeeping;
//! 6. [`Call::again`]: whether another try goes (the rule's conditions, or a
//!    free one when the callee shed the call or a held endpoint is gone),
//!    within the retry budget;
//! 7. [`Call::conclude`]: the answer, or the fallback.
//!
//! The decisions (what is a failure, what is retried, how long to back
//! off) are [`super::retry`]'s; this is the loop that applies them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::request::Parts;
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::balance::InFlight;
use super::fault::{self, Injected};
use super::replay::{ReqBody, clone_parts};
use super::retry::{self, Outcome};
use super::{Outbound, Sender, fallback, route};
use crate::clock::{ms_at, now_ms};
use crate::config::{Endpoint, Rule, Service, Verdict};
use crate::health::breaker::Admission;
use crate::http::errors::ProxyError;
use crate::http::response::Degraded;
use crate::transport::body::{ProxyBody, reply_judged};

/// One try and what came of it.
struct Tried {
    endpoint: Arc<Endpoint>,
    admission: Admission,
    outcome: Outcome,
    /// An injected fault, or the client's own body, decided the outcome: the
    /// endpoint's health is left alone.
    neutral: bool,
}

pub(crate) struct Call<'a, S> {
    out: &'a Outbound<S>,
    svc: &'a Arc<Service>,
    rule: Option<&'a Rule>,
    grpc: bool,
    deadline: Option<Instant>,
    /// The request head; cloned for each try when another may follow.
    head: Option<Parts>,
    reuse: bool,
    may_retry: bool,
    max_tries: u32,
    tried: Vec<SocketAddr>,
    /// A try outside the rule's attempts was used (the callee shed the call,
    /// or a held endpoint refused the connection).
    free_try_used: bool,
    last: Option<Outcome>,
    verdict: Option<Verdict>,
    degraded: &'a mut Degraded,
}

impl<'a, S: Sender> Call<'a, S> {
    pub(crate) fn new<B>(
        out: &'a Outbound<S>,
        svc: &'a Arc<Service>,
        tenant: &str,
        grpc: bool,
        req: &Request<B>,
        degraded: &'a mut Degraded,
    ) -> Call<'a, S> {
        let rule = route::rule_for(svc, tenant, req);
        Call {
            out,
            svc,
            rule,
            grpc,
            deadline: rule.and_then(|r| r.timeout).map(|t| Instant::now() + t),
            head: None,
            reuse: false,
            may_retry: false,
            max_tries: 1,
            tried: Vec::new(),
            free_try_used: false,
            last: None,
            verdict: None,
            degraded,
        }
    }

    pub(crate) async fn run(mut self, req: Request<Incoming>) -> Result<Response<ProxyBody>, ProxyError> {
        let (parts, body) = req.into_parts();
        let mut body = self.prepare(&parts, body).await?;
        self.head = Some(parts);
        let _cap = match self.admit() {
            Ok(cap) => cap,
            Err(e) => return Box::pin(self.fall_back(&mut body, e)).await,
        };
        let mut attempt = 0;
        while let Some(tried) = self.try_once(&mut body).await {
            if !self.again(attempt, tried, &body) {
                break;
            }
            attempt += 1;
            tokio::time::sleep(retry::backoff(attempt)).await;
        }
        self.conclude(&mut body).await
    }

    /// Reads or wraps the body, and settles how many tries the call may have.
    async fn prepare(&mut self, parts: &Parts, body: Incoming) -> Result<ReqBody, ProxyError> {
        let retry = self.rule.and_then(|r| r.retry.as_ref());
        let fallback = self.rule.is_some_and(|r| r.fallback.is_some());
        // The callee may shed the call (tenant limits) or a held endpoint may
        // be gone: either gets one more try, so a small body is kept for it.
        let may_resend = !self.svc.tenants.is_empty() || self.svc.holds;
        let body = ReqBody::new(body, retry.is_some() || fallback || may_resend, self.out.replay_limit).await?;
        self.may_retry = body.is_buffered()
            && (parts.method.is_idempotent() || self.grpc || parts.headers.contains_key("idempotency-key"));
        self.max_tries = 1 + if self.may_retry { retry.map(|r| r.attempts.get()).unwrap_or(0) } else { 0 };
        // The head is cloned per try only when another try or a fallback may
        // need it: a retry policy, a fallback, tenant limits at the callee
        // (which may shed), or held endpoints (which may be gone).
        self.reuse = self.max_tries > 1 || fallback || may_resend;
        Ok(body)
    }

    /// The service's concurrency cap: over it, the call fails at once (shed).
    fn admit(&mut self) -> Result<Option<InFlight<'a>>, ProxyError> {
        let (stats, settings) = (&self.svc.stats, &self.svc.settings);
        stats.deposit(settings);
        if settings.max_concurrent == 0 {
            return Ok(None);
        }
        if stats.in_flight.load(Ordering::Relaxed) >= settings.max_concurrent {
            self.degraded.shed = true;
            return Err(ProxyError::Overloaded(self.svc.name.clone()));
        }
        Ok(Some(InFlight::new(&stats.in_flight)))
    }

    /// One try: `None` when there is no endpoint (or nothing left to send).
    async fn try_once(&mut self, body: &mut ReqBody) -> Option<Tried> {
        let now = now_ms();
        let picked = route::pick(self.svc, self.rule, &self.tried, now, self.out.region());
        self.degraded.breaker |= picked.skipped_ejected;
        let Some(endpoint) = picked.endpoint else {
            self.last.get_or_insert_with(|| Err(ProxyError::NoEndpoints(self.svc.name.clone())));
            return None;
        };
        // A half-open endpoint takes one probe. Refused only when another
        // thread claimed the probe between the pick and here: the call goes
        // on, and its outcome decides nothing.
        let admission = match endpoint.health.breaker.admit(now, &self.svc.settings) {
            Admission::Refused => Admission::Normal,
            a => a,
        };
        let b = body.take()?;
        let head = if self.reuse { clone_parts(self.head.as_ref()?) } else { self.head.take()? };
        let mut req = Request::from_parts(head, b);
        *req.extensions_mut() = http::Extensions::new();
        let injected = fault::draw(self.rule.and_then(|r| r.fault.as_ref()), &req);
        let (outcome, neutral) = self.send(&endpoint, req, injected, body).await;
        self.tried.push(endpoint.addr);
        Some(Tried { endpoint, admission, outcome, neutral })
    }

    /// Sends one try within the per-try and call timeouts, after an injected
    /// delay (counted against them like a slow upstream) or as an injected
    /// abort. The flag is true when the endpoint is not to blame.
    async fn send(&self, e: &Endpoint, req: Request<ProxyBody>, inj: Injected<'_>, body: &ReqBody) -> (Outcome, bool) {
        let per_try =
            self.rule.and_then(|r| r.retry.as_ref()).and_then(|r| r.per_try_timeout).filter(|_| self.may_retry);
        let remaining = self.deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let mut timeout = match (per_try, remaining) {
            (Some(p), Some(r)) => Some(p.min(r)),
            (p, r) => p.or(r),
        };
        if let Some(d) = inj.delay {
            match timeout {
                Some(t) if d >= t => {
                    tokio::time::sleep(t).await;
                    let ms = t.as_millis() as u64;
                    return (Err(ProxyError::Timeout { addr: e.addr.to_string(), ms }), true);
                }
                t => {
                    tokio::time::sleep(d).await;
                    timeout = t.map(|t| t - d);
                }
            }
        }
        if let Some(a) = inj.abort {
            return (Err(ProxyError::FaultAbort { status: a.status, grpc_status: a.grpc_status }), true);
        }
        let _in_flight = InFlight::endpoint(&e.health);
        let sent = Instant::now();
        let r = self.out.sender.send(e.addr, req, timeout).await;
        let done = Instant::now();
        match r {
            // The client's fault: a 400, and nothing against the endpoint.
            Err(err) if body.client_failed() => (Err(ProxyError::ClientBody(err.to_string())), true),
            r => {
                e.health.observe_rtt_at(done - sent, ms_at(done));
                (r.map_err(ProxyError::from), false)
            }
        }
    }

    /// The breaker's bookkeeping for a try.
    fn judge(&mut self, t: &Tried) {
        if t.neutral {
            return;
        }
        if retry::is_failure(&t.outcome) {
            self.svc.endpoint_failed(&t.endpoint, t.admission, now_ms());
        } else if self.grpc && matches!(&t.outcome, Ok(r) if retry::status_in_trailers(r)) {
            // A gRPC call's status is still to come, in the trailers: the
            // response body gives the verdict when they arrive.
            self.verdict =
                Some(Verdict { svc: self.svc.clone(), endpoint: t.endpoint.clone(), admission: t.admission });
        } else {
            t.endpoint.health.breaker.record_success(t.admission);
        }
    }

    /// Whether the call gets another try, taking a retry from the budget
    /// for it; keeps the try's outcome as the call's latest.
    fn again(&mut self, attempt: u32, t: Tried, body: &ReqBody) -> bool {
        self.judge(&t);
        let shed = matches!(&t.outcome, Ok(r) if retry::is_callee_shed(r));
        if shed {
            // Steer later picks away from an instance that is shedding.
            t.endpoint.health.observe_rtt(retry::SHED_PENALTY);
        }
        // A held endpoint (its record vanished) may be gone after all: a
        // refused connection never reached anyone.
        let held_gone = t.endpoint.is_held() && matches!(t.outcome, Err(ProxyError::Connect { .. }));
        let in_time = self.deadline.is_none_or(|d| Instant::now() < d);
        let retryable = in_time
            && attempt + 1 < self.max_tries
            && self.rule.and_then(|r| r.retry.as_ref()).is_some_and(|r| retry::should_retry(r.on, &t.outcome));
        // The one try a call gets outside its rule's attempts, whatever its
        // method: the request never reached an app.
        let free = (shed || held_gone)
            && in_time
            && self.reuse
            && !self.free_try_used
            && body.is_buffered()
            && self.head.is_some()
            && self.svc.all_ready.iter().any(|e| !self.tried.contains(&e.addr));
        self.last = Some(t.outcome);
        if !retryable && !free {
            return false;
        }
        self.free_try_used |= free;
        if !self.svc.stats.withdraw(&self.svc.settings) {
            tracing::debug!(service = self.svc.name, "retry budget spent; not retrying");
            return false;
        }
        self.degraded.retries += 1;
        metrics::counter!("weft_retries_total", "service" => self.svc.name.clone()).increment(1);
        true
    }

    /// The answer: the last try's, or the fallback's when the call failed,
    /// found no endpoint, timed out or stayed shed.
    async fn conclude(mut self, body: &mut ReqBody) -> Result<Response<ProxyBody>, ProxyError> {
        let last = self.last.take().unwrap_or_else(|| Err(ProxyError::NoEndpoints(self.svc.name.clone())));
        let fallback = self.rule.is_some_and(|r| r.fallback.is_some());
        if let Ok(resp) = &last
            && retry::is_callee_shed(resp)
        {
            // The callee's sidecar shed the call for the tenant's limits.
            self.degraded.shed = true;
            if fallback && self.head.is_some() {
                let err = ProxyError::Upstream { addr: self.svc.name.clone(), reason: "shed by the callee".into() };
                return Box::pin(self.fall_back(body, err)).await;
            }
        }
        if retry::is_failure(&last) || matches!(last, Err(ProxyError::NoEndpoints(_))) {
            self.degraded.timeout |= matches!(last, Err(ProxyError::Timeout { .. }));
            if fallback {
                let err = match last {
                    Err(e) => e,
                    Ok(resp) => ProxyError::Upstream {
                        addr: self.svc.name.clone(),
                        reason: format!("answered {}", resp.status()),
                    },
                };
                return Box::pin(self.fall_back(body, err)).await;
            }
        }
        let verdict = self.verdict.take();
        last.map(|r| r.map(|b| reply_judged(b, verdict)))
    }

    /// The rule's fallback answers, when the request can still be sent;
    /// else `err`.
    async fn fall_back(&mut self, body: &mut ReqBody, err: ProxyError) -> Result<Response<ProxyBody>, ProxyError> {
        let (Some(f), Some(parts)) = (self.rule.and_then(|r| r.fallback.as_ref()), self.head.as_ref()) else {
            return Err(err);
        };
        fallback::answer(self.out, f, parts, body, self.degraded, err).await
    }
}
