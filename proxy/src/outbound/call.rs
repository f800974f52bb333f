//! One outbound call, phase by phase:
//!
//! 1. [`run`]: the rule that applies and the call's deadline (the route's
//!    timeout, or the caller's, whichever is sooner: see
//!    [`crate::http::deadline`]), each try stamped with the time left; the
//!    session under the rule's `hash_on` ([`super::affinity`]);
//! 2. [`Call::prepare`]: its body (kept for another try, or streamed once)
//!    and how many tries it may have;
//! 3. [`Call::admit`]: the service's concurrency cap;
//! 4. [`Call::next_try`]: an endpoint, its breaker admission, the request
//!    for it and the fault drawn for it;
//! 5. [`Call::timeout`], [`inject`] and [`Call::observe`] around the try
//!    itself, which is sent within the per-try and call timeouts (and the
//!    first-byte timeout); with a `hedge`, [`Call::hedged`] races a second
//!    try against it after the hedge's delay;
//! 6. [`Call::judge`]: the endpoint's breaker bookkeeping;
//! 7. [`Call::again`]: whether another try goes (the rule's conditions, or a
//!    free one when the callee shed the call or a held endpoint is gone),
//!    within the retry budget;
//! 8. [`Call::conclude`]: the answer (watched while it streams: see
//!    [`crate::http::stream`]), or the fallback.
//!
//! The decisions (what is a failure, what is retried, how long to back
//! off) are [`super::retry`]'s; this is the loop that applies them. Only
//! the body, the try, the backoff and a fallback are awaited; every other
//! phase is a plain function, so a call's future holds its state once and
//! moves nothing large between phases (each nested future would copy its
//! arguments and result). For the same reason a try that is not hedged is
//! sent inline, not through [`send_try`], and the hedged race is boxed.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::request::Parts;
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::balance::InFlight;
use super::fault::{self, Injected};
use super::replay::{ReqBody, clone_parts};
use super::retry::{self, Outcome};
use super::{Outbound, Sender, affinity, fallback, route};
use crate::clock::{ms_at, now_ms};
use crate::config::{Endpoint, Rule, Service, Verdict};
use crate::health::breaker::Admission;
use crate::http::errors::ProxyError;
use crate::http::headers::TRACEPARENT;
use crate::http::response::Degraded;
use crate::http::stream::{self, Reported, Watch};
use crate::transport;
use crate::transport::body::{ProxyBody, reply_judged};
use crate::transport::pool::PooledBody;
use weft_policy::model::Hedge;

/// One try: where it goes, and what it carries.
struct Try<'r> {
    endpoint: Arc<Endpoint>,
    admission: Admission,
    req: Request<ProxyBody>,
    injected: Injected<'r>,
}

/// A try on its way or done: it owns what it needs, so that a hedge can be
/// in flight beside it.
struct Sent {
    endpoint: Arc<Endpoint>,
    admission: Admission,
    /// When the request went (after any injected delay).
    sent: Instant,
    /// The wire's answer, or the outcome an injected fault decided.
    result: Result<Result<Response<PooledBody>, transport::Error>, Outcome>,
}

impl Sent {
    fn decided(endpoint: Arc<Endpoint>, admission: Admission, outcome: Outcome) -> Sent {
        Sent { endpoint, admission, sent: Instant::now(), result: Err(outcome) }
    }

    /// What would count against the endpoint ([`retry::is_failure`]).
    fn failed(&self) -> bool {
        match &self.result {
            Err(decided) => retry::is_failure(decided),
            Ok(Err(_)) => true,
            Ok(Ok(r)) => retry::answer_failed(r),
        }
    }
}

/// Sends one try, within `timeout` (to the answer head), under its drawn
/// fault, as a future of its own (a hedge races two). A call that is not
/// hedged does the same inline in [`run`].
async fn send_try<S: Sender>(out: &Outbound<S>, service: &str, t: Try<'_>, mut timeout: Option<Duration>) -> Sent {
    if let Some(decided) = inject(&t.endpoint, &t.injected, &mut timeout).await {
        return Sent::decided(t.endpoint, t.admission, decided);
    }
    let in_flight = InFlight::endpoint(&t.endpoint.health);
    let sent = Instant::now();
    let r = out.sender.send(t.endpoint.peer(service), t.req, timeout).await;
    drop(in_flight);
    Sent { endpoint: t.endpoint, admission: t.admission, sent, result: Ok(r) }
}

/// An injected delay (counted against the timeout like a slow upstream,
/// which it shortens) or abort; `Some` when the fault decided the try,
/// which is then not the endpoint's doing.
async fn inject(e: &Endpoint, injected: &Injected<'_>, timeout: &mut Option<Duration>) -> Option<Outcome> {
    if let Some(d) = injected.delay {
        match *timeout {
            Some(limit) if d >= limit => {
                tokio::time::sleep(limit).await;
                let ms = limit.as_millis() as u64;
                return Some(Err(ProxyError::Timeout { addr: e.addr.to_string(), ms }));
            }
            limit => {
                tokio::time::sleep(d).await;
                *timeout = limit.map(|l| l - d);
            }
        }
    }
    let a = injected.abort?;
    Some(Err(ProxyError::FaultAbort { status: a.status, grpc_status: a.grpc_status }))
}

/// What a try came to, besides its outcome.
struct Tried {
    endpoint: Arc<Endpoint>,
    admission: Admission,
    /// When its request went.
    sent: Instant,
    /// An injected fault, or the client's own body, decided the outcome: the
    /// endpoint's health is left alone.
    neutral: bool,
}

/// How a call ends: an answer, or the rule's fallback for an error.
/// Returned in place once per call, never stored: boxing the answer would
/// cost an allocation per call to save nothing.
#[allow(clippy::large_enum_variant)]
enum Concluded {
    Answer(Result<Response<ProxyBody>, ProxyError>),
    FallBack(ProxyError),
}

/// Runs one call of `req` to `svc`.
pub(crate) async fn run<'a, S: Sender>(
    out: &'a Outbound<S>,
    svc: &'a Arc<Service>,
    tenant: &'a str,
    grpc: bool,
    req: Request<Incoming>,
    degraded: &mut Degraded,
    outer: Option<Instant>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let mut call = Call::new(out, svc, tenant, grpc, &req, degraded, outer);
    if call.deadline.is_some_and(|d| d <= Instant::now()) {
        // Its time was up before it started: nothing is sent.
        call.degraded.timeout = true;
        return Err(ProxyError::DeadlineExceeded("it passed before the call was sent"));
    }
    let (parts, body) = req.into_parts();
    let mut body = call.prepare(&parts, body).await?;
    call.head = Some(parts);
    let _cap = match call.admit() {
        Ok(cap) => cap,
        Err(e) => return Box::pin(call.fall_back(&mut body, e)).await,
    };
    let mut attempt = 0;
    while let Some(t) = call.next_try(&mut body) {
        call.tried.push(t.endpoint.addr);
        let timeout = call.timeout();
        let sent = match call.hedge_after(attempt) {
            // `send_try`, inline: as a future of its own it would be copied
            // whole (several KiB) into the await, on every call.
            None => {
                let mut timeout = timeout;
                match inject(&t.endpoint, &t.injected, &mut timeout).await {
                    Some(decided) => Sent::decided(t.endpoint, t.admission, decided),
                    None => {
                        let in_flight = InFlight::endpoint(&t.endpoint.health);
                        let sent = Instant::now();
                        let r = out.sender.send(t.endpoint.peer(&svc.name), t.req, timeout).await;
                        drop(in_flight);
                        Sent { endpoint: t.endpoint, admission: t.admission, sent, result: Ok(r) }
                    }
                }
            }
            // Boxed: two tries in flight make a large future, which would
            // otherwise enlarge every call's.
            Some(after) => {
                let first_endpoint = t.endpoint.clone();
                let first = send_try(out, &svc.name, t, timeout);
                Box::pin(call.hedged(first, first_endpoint, after, &mut body, &mut attempt)).await
            }
        };
        let (tried, outcome) = call.observe(sent, &body);
        let go = call.again(attempt, &tried, &outcome, &body);
        call.last = Some(outcome);
        call.last_try = Some((tried.endpoint, tried.sent));
        if !go {
            break;
        }
        attempt += 1;
        // The backoff never outlives the deadline.
        let backoff = retry::backoff(attempt);
        match call.deadline {
            Some(d) => tokio::time::sleep_until(d.min(Instant::now() + backoff)).await,
            None => tokio::time::sleep(backoff).await,
        }
    }
    match call.conclude() {
        Concluded::Answer(r) => r,
        // Nor does the fallback (the route's own timeout leads to its
        // fallback; the caller's deadline ends the call).
        Concluded::FallBack(e) => match call.outer {
            Some(d) if d <= Instant::now() => {
                call.degraded.timeout = true;
                Err(e)
            }
            Some(d) => match tokio::time::timeout_at(d, Box::pin(call.fall_back(&mut body, e))).await {
                Ok(r) => r,
                Err(_) => {
                    call.degraded.timeout = true;
                    Err(ProxyError::DeadlineExceeded("it passed during the fallback"))
                }
            },
            None => Box::pin(call.fall_back(&mut body, e)).await,
        },
    }
}

pub(crate) struct Call<'a, S> {
    out: &'a Outbound<S>,
    svc: &'a Arc<Service>,
    rule: Option<&'a Rule>,
    grpc: bool,
    deadline: Option<Instant>,
    /// The caller's deadline (or its trace's), when it has one.
    outer: Option<Instant>,
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
    /// The endpoint of the last try, and when it was sent.
    last_try: Option<(Arc<Endpoint>, Instant)>,
    /// The call's session under the rule's `hash_on`, and where it was last
    /// served.
    session: Option<(u64, Option<SocketAddr>)>,
    tenant: &'a str,
    /// The call's trace, kept when the rule may cut its answer's stream.
    traceparent: Option<http::HeaderValue>,
    verdict: Option<Verdict>,
    degraded: &'a mut Degraded,
}

impl<'a, S: Sender> Call<'a, S> {
    fn new<B>(
        out: &'a Outbound<S>,
        svc: &'a Arc<Service>,
        tenant: &'a str,
        grpc: bool,
        req: &Request<B>,
        degraded: &'a mut Degraded,
        outer: Option<Instant>,
    ) -> Call<'a, S> {
        let rule = route::rule_for(svc, tenant, req);
        let own = rule.and_then(|r| r.timeout).map(|t| Instant::now() + t);
        let session = rule.and_then(|r| r.hash_on.as_ref()).and_then(|h| affinity::key(h, req));
        let session = session.map(|k| (k, svc.stats.sessions.get(k, now_ms())));
        // A stream the rule may cut is reported under its trace.
        let bounded = rule.is_some_and(|r| r.first_byte_timeout.is_some() || r.idle_timeout.is_some());
        let traceparent = if bounded { req.headers().get(&TRACEPARENT).cloned() } else { None };
        Call {
            out,
            svc,
            rule,
            grpc,
            deadline: crate::http::deadline::sooner(own, outer),
            outer,
            head: None,
            reuse: false,
            may_retry: false,
            max_tries: 1,
            tried: Vec::new(),
            free_try_used: false,
            last: None,
            last_try: None,
            session,
            tenant,
            traceparent,
            verdict: None,
            degraded,
        }
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

    /// The next try: `None` when there is no endpoint (or nothing left to
    /// send).
    fn next_try(&mut self, body: &mut ReqBody) -> Option<Try<'a>> {
        let now = now_ms();
        let picked = route::pick(self.svc, self.rule, &self.tried, now, self.out.region(), self.session);
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
        if let Some(d) = self.deadline {
            // The next hop keeps to the time left.
            crate::http::deadline::stamp(req.headers_mut(), d, self.grpc);
        }
        let injected = fault::draw(self.rule.and_then(|r| r.fault.as_ref()), &req);
        Some(Try { endpoint, admission, req, injected })
    }

    /// A try's timeout to the answer head: the per-try timeout (when the
    /// call may be retried) within what is left of the call's, and never
    /// past the first-byte timeout (no head, no first byte).
    fn timeout(&self) -> Option<Duration> {
        let per_try =
            self.rule.and_then(|r| r.retry.as_ref()).and_then(|r| r.per_try_timeout).filter(|_| self.may_retry);
        let first_byte = self.rule.and_then(|r| r.first_byte_timeout);
        let per_try = match (per_try, first_byte) {
            (Some(p), Some(f)) => Some(p.min(f)),
            (p, f) => p.or(f),
        };
        let remaining = self.deadline.map(|d| d.saturating_duration_since(Instant::now()));
        match (per_try, remaining) {
            (Some(p), Some(r)) => Some(p.min(r)),
            (p, r) => p.or(r),
        }
    }

    /// The try's outcome, and its latency recorded for the endpoint; a
    /// client whose streamed body broke off gets a 400, and the endpoint
    /// nothing against it (`neutral`), as does a try an injected fault
    /// decided.
    fn observe(&mut self, s: Sent, body: &ReqBody) -> (Tried, Outcome) {
        let (neutral, outcome) = match s.result {
            Err(decided) => (true, decided),
            Ok(Err(err)) if body.client_failed() => (true, Err(ProxyError::ClientBody(err.to_string()))),
            Ok(r) => {
                let done = Instant::now();
                let took = done - s.sent;
                s.endpoint.health.observe_rtt_at(took, ms_at(done));
                let mut neutral = false;
                if self.svc.settings.latency_outlier.is_some() {
                    // A streamed answer's first byte is its watch's to report.
                    if r.as_ref().is_ok_and(|resp| !stream::is_streamed(resp.body())) {
                        neutral = self.svc.first_byte(&s.endpoint, took, s.admission, ms_at(done));
                    }
                } else if self.rule.and_then(|r| r.hedge) == Some(Hedge::P95) {
                    // The service's recent latencies are read for the hedge.
                    self.svc.stats.latency.record(took);
                }
                (neutral, r.map_err(ProxyError::from))
            }
        };
        (Tried { endpoint: s.endpoint, admission: s.admission, sent: s.sent, neutral }, outcome)
    }

    /// How long a try waits for its answer head before a hedge goes: when
    /// the rule hedges, the call may be retried with an attempt left, and
    /// the hedge would go before the deadline.
    fn hedge_after(&self, attempt: u32) -> Option<Duration> {
        let hedge = self.rule?.hedge?;
        if !self.may_retry || attempt + 1 >= self.max_tries {
            return None;
        }
        let after = match hedge {
            Hedge::After(d) => d,
            Hedge::P95 => self.svc.stats.latency.p95()?,
        };
        self.deadline.is_none_or(|d| Instant::now() + after < d).then_some(after)
    }

    /// Races `first` against a hedge sent `after` it to another endpoint:
    /// the first answer head that is not a failure wins and the other try
    /// is dropped (cancelled: its connection closed or stream reset). A
    /// try that fails first gets its breaker bookkeeping and the other is
    /// awaited. No hedge goes without another endpoint or a retry from the
    /// budget.
    async fn hedged(
        &mut self,
        first: impl Future<Output = Sent>,
        first_endpoint: Arc<Endpoint>,
        after: Duration,
        body: &mut ReqBody,
        attempt: &mut u32,
    ) -> Sent {
        let mut first = std::pin::pin!(first);
        let started = Instant::now();
        tokio::select! {
            // An answer that came as the delay ran out needs no hedge.
            biased;
            s = &mut first => return s,
            _ = tokio::time::sleep(after) => {}
        }
        let Some(t) = self.hedge_try(body) else { return first.await };
        *attempt += 1;
        let hedge_endpoint = t.endpoint.clone();
        let (out, svc) = (self.out, self.svc);
        let mut second = std::pin::pin!(send_try(out, &svc.name, t, self.timeout()));
        let (s, hedge_came_first) = tokio::select! {
            biased;
            s = &mut first => (s, false),
            s = &mut second => (s, true),
        };
        let won = |by: &'static str| {
            metrics::counter!("weft_hedges_total", "service" => svc.name.clone(), "won" => by).increment(1);
        };
        if !s.failed() {
            won(if hedge_came_first { "hedge" } else { "first" });
            // The loser was at least this slow: balancing hears of it.
            let now = Instant::now();
            let (loser, since) =
                if hedge_came_first { (&first_endpoint, started) } else { (&hedge_endpoint, started + after) };
            loser.health.observe_rtt(now - since);
            return s;
        }
        // The first to answer failed: the other try may still make it.
        let (tried, outcome) = self.observe(s, body);
        self.judge(&tried, &outcome);
        let other = if hedge_came_first { first.await } else { second.await };
        won(if hedge_came_first { "first" } else { "hedge" });
        other
    }

    /// The hedge's try: another endpoint than those tried, and a retry from
    /// the budget.
    fn hedge_try(&mut self, body: &mut ReqBody) -> Option<Try<'a>> {
        let t = self.next_try(body)?;
        if self.tried.contains(&t.endpoint.addr) || !self.svc.stats.withdraw(&self.svc.settings) {
            return None;
        }
        self.tried.push(t.endpoint.addr);
        self.degraded.hedged = true;
        Some(t)
    }

    /// The breaker's bookkeeping for a try.
    fn judge(&mut self, t: &Tried, outcome: &Outcome) {
        if t.neutral {
            return;
        }
        if retry::is_failure(outcome) {
            self.svc.endpoint_failed(&t.endpoint, t.admission, now_ms());
        } else if self.grpc && matches!(outcome, Ok(r) if retry::status_in_trailers(r)) {
            // A gRPC call's status is still to come, in the trailers: the
            // response body gives the verdict when they arrive.
            self.verdict =
                Some(Verdict { svc: self.svc.clone(), endpoint: t.endpoint.clone(), admission: t.admission });
        } else {
            t.endpoint.health.breaker.record_success(t.admission);
        }
    }

    /// Whether the call gets another try after `t`, taking a retry from the
    /// budget for it.
    fn again(&mut self, attempt: u32, t: &Tried, outcome: &Outcome, body: &ReqBody) -> bool {
        self.judge(t, outcome);
        let shed = matches!(outcome, Ok(r) if retry::is_callee_shed(r));
        if shed {
            // Steer later picks away from an instance that is shedding.
            t.endpoint.health.observe_rtt(retry::SHED_PENALTY);
        }
        // A held endpoint (its record vanished) may be gone after all: a
        // refused connection never reached anyone.
        let held_gone = t.endpoint.is_held() && matches!(outcome, Err(ProxyError::Connect { .. }));
        let in_time = self.deadline.is_none_or(|d| Instant::now() < d);
        let retryable = in_time
            && attempt + 1 < self.max_tries
            && self.rule.and_then(|r| r.retry.as_ref()).is_some_and(|r| retry::should_retry(r.on, outcome));
        // The one try a call gets outside its rule's attempts, whatever its
        // method: the request never reached an app.
        let free = (shed || held_gone)
            && in_time
            && self.reuse
            && !self.free_try_used
            && body.is_buffered()
            && self.head.is_some()
            && self.svc.all_ready.iter().any(|e| !self.tried.contains(&e.addr));
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
    fn conclude(&mut self) -> Concluded {
        let last = self.last.take().unwrap_or_else(|| Err(ProxyError::NoEndpoints(self.svc.name.clone())));
        let fallback = self.rule.is_some_and(|r| r.fallback.is_some());
        if let Ok(resp) = &last
            && retry::is_callee_shed(resp)
        {
            // The callee's sidecar shed the call for the tenant's limits.
            self.degraded.shed = true;
            if fallback && self.head.is_some() {
                let err = ProxyError::Upstream { addr: self.svc.name.clone(), reason: "shed by the callee".into() };
                return Concluded::FallBack(err);
            }
        }
        if retry::is_failure(&last) || matches!(last, Err(ProxyError::NoEndpoints(_))) {
            self.degraded.timeout |= matches!(last, Err(ProxyError::Timeout { .. }));
            if fallback {
                return Concluded::FallBack(match last {
                    Err(e) => e,
                    Ok(resp) => ProxyError::Upstream {
                        addr: self.svc.name.clone(),
                        reason: format!("answered {}", resp.status()),
                    },
                });
            }
        }
        let verdict = self.verdict.take();
        let (svc, rule, grpc) = (self.svc, self.rule, self.grpc);
        let last_try = self.last_try.take();
        if let (Some((key, pinned)), Some((e, _))) = (self.session, &last_try)
            && pinned != Some(e.addr)
            && !retry::is_failure(&last)
        {
            // The session stays where it was served.
            svc.stats.sessions.set(key, e.addr, now_ms());
        }
        let (shared, tenant, traceparent) = (&self.out.shared, self.tenant, self.traceparent.take());
        Concluded::Answer(last.map(|r| {
            let status = r.status().as_u16();
            let reported = || Reported { shared: shared.clone(), traceparent, tenant: tenant.to_string(), status };
            let watch = last_try.and_then(|(e, sent)| Watch::for_answer(svc, &e, rule, grpc, sent, r.body(), reported));
            r.map(|b| reply_judged(b, verdict, watch))
        }))
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
