//! The rules: how a resource, as a document or as it arrives on the wire,
//! becomes the typed model, or which of its fields are wrong and why.
//!
//! Both forms are first seen as a borrowed *raw* view (durations as text or
//! as milliseconds, maps in any order), and one function per resource kind
//! checks that view. So `weftctl validate`, the control plane (before
//! anything reaches etcd, and again for what etcd holds) and every sidecar
//! (before an update is ACKed) apply the same rules, field by field, with the
//! same field paths in their messages. Nothing is clamped: a value is valid
//! or rejected.

use std::collections::BTreeMap;
use std::num::{NonZeroU32, NonZeroU64};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, StatusCode};

use crate::FieldError;
use crate::model::*;
use crate::names::{check_service, check_tenant};

/// The largest weight of a backend.
pub const MAX_WEIGHT: u32 = 10_000;
/// The most retries a rule may ask for.
pub const MAX_ATTEMPTS: u32 = 10;
/// The largest retry budget ratio.
pub const MAX_BUDGET_RATIO: f64 = 10.0;
/// The most rules an authorization policy may hold.
pub const MAX_AUTHZ_RULES: usize = 256;
/// The most entries of one list of an authorization policy.
pub const MAX_AUTHZ_LIST: usize = 256;
/// The largest `latency_outlier.multiple`.
pub const MAX_OUTLIER_MULTIPLE: f64 = 100.0;
/// The most caller quotas a tenant policy may hold.
pub const MAX_CALLER_QUOTAS: usize = 256;
/// The methods a rule may match.
pub const METHODS: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"];

/// A duration as a document writes it, or as the wire carries it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RawDuration<'a> {
    Text(&'a str),
    Millis(u64),
}

impl RawDuration<'_> {
    fn get(self) -> Result<Duration, String> {
        match self {
            RawDuration::Text(s) => crate::duration::parse(s),
            RawDuration::Millis(ms) => {
                crate::duration::check(Duration::from_millis(ms)).map_err(|e| format!("{ms} ms {e}"))
            }
        }
    }

    fn shown(self) -> String {
        match self {
            RawDuration::Text(s) => s.to_string(),
            RawDuration::Millis(ms) => format!("{ms}ms"),
        }
    }
}

pub(crate) struct RawRoute<'a> {
    pub service: &'a str,
    pub tenant: Option<&'a str>,
    pub rules: Vec<RawRule<'a>>,
}

pub(crate) struct RawRule<'a> {
    pub path_prefix: Option<&'a str>,
    pub method: Option<&'a str>,
    pub headers: Vec<(&'a str, &'a str)>,
    pub backends: Vec<(BTreeMap<&'a str, &'a str>, u32)>,
    pub timeout: Option<RawDuration<'a>>,
    pub retry: Option<RawRetry<'a>>,
    pub fallback: Option<RawFallback<'a>>,
    pub fault: Option<RawFault<'a>>,
    pub first_byte_timeout: Option<RawDuration<'a>>,
    pub idle_timeout: Option<RawDuration<'a>>,
    pub hedge: Option<RawHedge<'a>>,
    /// (header, cookie)
    pub hash_on: Option<(Option<&'a str>, Option<&'a str>)>,
}

#[derive(Clone, Copy)]
pub(crate) enum RawHedge<'a> {
    After(RawDuration<'a>),
    P95,
}

pub(crate) struct RawRetry<'a> {
    pub attempts: u32,
    pub per_try_timeout: Option<RawDuration<'a>>,
    pub on: Vec<&'a str>,
}

pub(crate) struct RawFallback<'a> {
    pub service: Option<&'a str>,
    pub status: Option<u32>,
    pub body: Option<&'a str>,
}

pub(crate) struct RawFault<'a> {
    pub header: Option<&'a str>,
    /// (percent, duration)
    pub delay: Option<(f64, RawDuration<'a>)>,
    /// (percent, HTTP status, gRPC status)
    pub abort: Option<(f64, Option<u32>, Option<u32>)>,
}

pub(crate) struct RawResilience<'a> {
    pub service: &'a str,
    /// (consecutive failures, base ejection, max ejection percent)
    pub circuit_breaker: Option<(u32, RawDuration<'a>, u32)>,
    pub max_concurrent_requests: Option<u32>,
    /// (ratio, min per second)
    pub retry_budget: Option<(f64, u32)>,
    /// (multiple, window)
    pub latency_outlier: Option<(f64, RawDuration<'a>)>,
}

pub(crate) struct RawTenantPolicy<'a> {
    pub tenant: &'a str,
    pub service: &'a str,
    /// (requests per second, burst)
    pub rate_limit: Option<(f64, u32)>,
    pub max_concurrent_requests: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub callers: Vec<(&'a str, u64)>,
    /// (header, tokens per minute)
    pub session: Option<(&'a str, u64)>,
}

pub(crate) struct RawAuthorization<'a> {
    pub service: &'a str,
    pub default: Option<&'a str>,
    pub rules: Vec<RawAuthorizationRule<'a>>,
    pub tenant_header_from: Vec<&'a str>,
}

pub(crate) struct RawAuthorizationRule<'a> {
    pub from: Vec<&'a str>,
    pub paths: Vec<&'a str>,
    pub methods: Vec<&'a str>,
    pub tenants: Vec<&'a str>,
}

impl<'a> RawAuthorizationRule<'a> {
    /// A rule's lists as a document or the wire hold them.
    pub(crate) fn of(from: &'a [String], paths: &'a [String], methods: &'a [String], tenants: &'a [String]) -> Self {
        RawAuthorizationRule { from: strs(from), paths: strs(paths), methods: strs(methods), tenants: strs(tenants) }
    }
}

/// Collects the problems of one resource.
#[derive(Default)]
pub(crate) struct Problems(pub Vec<FieldError>);

impl Problems {
    fn fail(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError::new(field, message));
    }

    fn ok<T>(&mut self, field: impl Into<String>, r: Result<T, String>) -> Option<T> {
        r.map_err(|e| self.fail(field, e)).ok()
    }

    pub fn finish<T>(self, value: Option<T>) -> Result<T, Vec<FieldError>> {
        match value {
            Some(v) if self.0.is_empty() => Ok(v),
            _ => Err(self.0),
        }
    }
}

pub(crate) fn route(r: &RawRoute<'_>, p: &mut Problems) -> Option<Route> {
    p.ok("service", check_service("service", r.service));
    if let Some(t) = r.tenant {
        p.ok("tenant", check_tenant("tenant", t));
    }
    if r.rules.is_empty() {
        p.fail("rules", "a route needs at least one rule");
    }
    let before = p.0.len();
    let rules: Vec<Rule> =
        r.rules.iter().enumerate().filter_map(|(i, rule)| self::rule(r.service, i, rule, p)).collect();
    (p.0.len() == before && !rules.is_empty()).then(|| Route {
        service: r.service.to_string(),
        tenant: r.tenant.map(str::to_string),
        rules,
    })
}

fn rule(service: &str, i: usize, r: &RawRule<'_>, p: &mut Problems) -> Option<Rule> {
    let at = |f: &str| format!("rules[{i}].{f}");
    let before = p.0.len();
    let path_prefix = match r.path_prefix {
        Some(prefix) if !prefix.starts_with('/') => {
            p.fail(at("match.path_prefix"), format!("'{prefix}' must start with '/'"));
            None
        }
        other => other.map(str::to_string),
    };
    let method = match r.method {
        None => None,
        Some(m) if METHODS.contains(&m) => Some(Method::from_bytes(m.as_bytes()).expect("a standard method")),
        Some(m) => {
            p.fail(
                at("match.method"),
                format!("'{m}' is not an HTTP method (one of {}, upper case)", METHODS.join(", ")),
            );
            None
        }
    };
    let mut headers = Vec::with_capacity(r.headers.len());
    for (name, value) in &r.headers {
        let field = at(&format!("match.headers.{name}"));
        let n = header_name(name).map_err(|e| p.fail(field.clone(), e)).ok();
        let v =
            HeaderValue::from_str(value).map_err(|_| p.fail(field, format!("'{value}' is not a header value"))).ok();
        if let (Some(n), Some(v)) = (n, v) {
            headers.push((n, v));
        }
    }
    headers.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    let backends = self::backends(i, &r.backends, p);
    let timeout = r.timeout.and_then(|t| p.ok(at("timeout"), t.get()));
    let retry = r.retry.as_ref().and_then(|rt| self::retry(i, rt, r.timeout, timeout, p));
    let fallback = r.fallback.as_ref().and_then(|f| self::fallback(service, i, f, p));
    let fault = r.fault.as_ref().and_then(|f| self::fault(i, f, p));
    let first_byte_timeout = r.first_byte_timeout.and_then(|t| p.ok(at("first_byte_timeout"), t.get()));
    let idle_timeout = r.idle_timeout.and_then(|t| p.ok(at("idle_timeout"), t.get()));
    let hedge = r.hedge.and_then(|h| self::hedge(i, h, r, timeout, p));
    let hash_on = r.hash_on.and_then(|h| self::hash_on(i, h, p));
    (p.0.len() == before).then(|| Rule {
        matches: Match { path_prefix, method, headers },
        backends,
        timeout,
        retry,
        fallback,
        fault,
        first_byte_timeout,
        idle_timeout,
        hedge,
        hash_on,
    })
}

fn hedge(i: usize, h: RawHedge<'_>, r: &RawRule<'_>, timeout: Option<Duration>, p: &mut Problems) -> Option<Hedge> {
    let at = format!("rules[{i}].hedge");
    if r.retry.is_none() {
        p.fail(
            &at,
            "hedging needs a retry policy: a hedge is another try of the call, so only calls that may be retried \
             are hedged, and it counts against retry.attempts",
        );
    }
    match h {
        RawHedge::P95 => Some(Hedge::P95),
        RawHedge::After(raw) => {
            let d = p.ok(format!("{at}.after"), raw.get().map_err(|e| format!("{e} (or 'p95')")))?;
            if let Some(t) = timeout
                && d >= t
            {
                p.fail(
                    format!("{at}.after"),
                    format!("{} is not shorter than the rule's timeout: the hedge would never go", raw.shown()),
                );
            }
            Some(Hedge::After(d))
        }
    }
}

fn hash_on(i: usize, h: (Option<&str>, Option<&str>), p: &mut Problems) -> Option<HashOn> {
    let at = |f: &str| format!("rules[{i}].hash_on{f}");
    match h {
        (Some(name), None) => p.ok(at(".header"), header_name(name)).map(HashOn::Header),
        (None, Some(name)) => {
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)) {
                p.fail(at(".cookie"), format!("'{name}' is not a cookie name"));
                return None;
            }
            Some(HashOn::Cookie(name.to_string()))
        }
        _ => {
            p.fail(at(""), "set header or cookie (one of them)");
            None
        }
    }
}

fn header_name(name: &str) -> Result<HeaderName, String> {
    match HeaderName::from_bytes(name.as_bytes()) {
        Ok(n) if n.as_str() == name => Ok(n),
        _ => Err(format!("'{name}' is not a valid lowercase header name")),
    }
}

fn backends(i: usize, raw: &[(BTreeMap<&str, &str>, u32)], p: &mut Problems) -> Vec<Backend> {
    let at = |f: &str| format!("rules[{i}].{f}");
    if raw.is_empty() {
        p.fail(at("backends"), "a rule needs at least one backend");
    } else if raw.iter().map(|(_, w)| u64::from(*w)).sum::<u64>() == 0 {
        p.fail(at("backends"), "weights sum to 0: no backend would get traffic");
    }
    let mut out: Vec<Backend> = Vec::with_capacity(raw.len());
    for (j, (subset, weight)) in raw.iter().enumerate() {
        if subset.iter().any(|(k, v)| k.is_empty() || v.is_empty()) {
            p.fail(
                at(&format!("backends[{j}].subset")),
                "label keys and values must not be empty, so the subset could never match",
            );
        }
        if *weight > MAX_WEIGHT {
            p.fail(at(&format!("backends[{j}].weight")), format!("weight must be at most {MAX_WEIGHT}"));
        }
        let subset: BTreeMap<String, String> = subset.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        if out.iter().any(|b| b.subset == subset) {
            p.fail(at(&format!("backends[{j}].subset")), "the same subset is listed twice in this rule");
        }
        out.push(Backend { subset, weight: *weight });
    }
    out
}

fn retry(
    i: usize,
    r: &RawRetry<'_>,
    raw_timeout: Option<RawDuration<'_>>,
    timeout: Option<Duration>,
    p: &mut Problems,
) -> Option<Retry> {
    let at = |f: &str| format!("rules[{i}].retry.{f}");
    let attempts = NonZeroU32::new(r.attempts).filter(|a| a.get() <= MAX_ATTEMPTS);
    if attempts.is_none() {
        p.fail(at("attempts"), format!("attempts must be between 1 and {MAX_ATTEMPTS}"));
    }
    let per_try_timeout = r.per_try_timeout.and_then(|raw| {
        let d = p.ok(at("per_try_timeout"), raw.get())?;
        if let (Some(t), Some(rt)) = (timeout, raw_timeout)
            && d > t
        {
            p.fail(at("per_try_timeout"), format!("{} is longer than the rule's timeout {}", raw.shown(), rt.shown()));
        }
        Some(d)
    });
    let mut on = if r.on.is_empty() { RetryOn::DEFAULT } else { RetryOn::empty() };
    for cond in &r.on {
        if let Some(c) = p.ok(at("on"), RetryCondition::parse(cond)) {
            on = on.with(c);
        }
    }
    Some(Retry { attempts: attempts?, per_try_timeout, on })
}

fn fallback(service: &str, i: usize, f: &RawFallback<'_>, p: &mut Problems) -> Option<Fallback> {
    let at = |x: &str| format!("rules[{i}].{x}");
    match (f.service, f.status) {
        (Some(_), Some(_)) => {
            p.fail(at("fallback"), "set either service or status, not both");
            None
        }
        (None, None) => {
            p.fail(at("fallback"), "set service or status");
            None
        }
        (Some(s), None) => {
            let ok = p.ok(at("fallback.service"), check_service("fallback service", s)).is_some();
            if ok && s == service {
                p.fail(at("fallback.service"), "a service cannot fall back to itself");
            }
            if f.body.is_some() {
                p.fail(at("fallback.body"), "body goes with status, not service");
            }
            ok.then(|| Fallback::Service(s.to_string()))
        }
        (None, Some(status)) => {
            let status = p.ok(at("fallback.status"), answer_status(status))?;
            Some(Fallback::Static { status, body: Bytes::from(f.body.unwrap_or_default().to_string()) })
        }
    }
}

/// A status the sidecar can answer with itself: 200-599.
fn answer_status(status: u32) -> Result<StatusCode, String> {
    u16::try_from(status)
        .ok()
        .filter(|s| (200..=599).contains(s))
        .and_then(|s| StatusCode::from_u16(s).ok())
        .ok_or_else(|| format!("{status} is not an HTTP status a proxy can answer with (200-599)"))
}

fn percent(v: f64) -> Result<f64, String> {
    if (0.0..=100.0).contains(&v) { Ok(v) } else { Err(format!("{v} is not a percentage (0-100)")) }
}

fn fault(i: usize, f: &RawFault<'_>, p: &mut Problems) -> Option<Fault> {
    let at = |x: &str| format!("rules[{i}].fault{x}");
    let before = p.0.len();
    if f.delay.is_none() && f.abort.is_none() {
        p.fail(at(""), "set delay, abort or both");
    }
    let header = f.header.and_then(|h| p.ok(at(".header"), header_name(h)));
    let delay = f.delay.and_then(|(pct, d)| {
        let percent = p.ok(at(".delay.percent"), percent(pct));
        let duration = p.ok(at(".delay.duration"), d.get());
        Some(FaultDelay { percent: percent?, duration: duration? })
    });
    let abort = f.abort.and_then(|(pct, status, grpc)| {
        let percent = p.ok(at(".abort.percent"), percent(pct));
        let status = match (status, grpc) {
            (None, None) => {
                p.fail(at(".abort"), "set status (HTTP) and/or grpc_status");
                None
            }
            (Some(s), _) => p.ok(at(".abort.status"), answer_status(s)),
            (None, Some(_)) => Some(StatusCode::SERVICE_UNAVAILABLE),
        };
        let grpc_status = match grpc {
            Some(g) if !(1..=16).contains(&g) => {
                p.fail(at(".abort.grpc_status"), format!("{g} is not a gRPC error code (1-16)"));
                None
            }
            g => g.map(|g| g as u16),
        };
        Some(FaultAbort { percent: percent?, status: status?, grpc_status })
    });
    (p.0.len() == before).then_some(Fault { header, delay, abort })
}

pub(crate) fn resilience(r: &RawResilience<'_>, p: &mut Problems) -> Option<Resilience> {
    let before = p.0.len();
    p.ok("service", check_service("service", r.service));
    let circuit_breaker = r.circuit_breaker.and_then(|(failures, base, pct)| {
        let consecutive_failures = NonZeroU32::new(failures);
        if consecutive_failures.is_none() {
            p.fail("circuit_breaker.consecutive_failures", "must be at least 1");
        }
        let base_ejection = p.ok("circuit_breaker.base_ejection", base.get());
        let max = u8::try_from(pct).ok().filter(|p| *p <= 100);
        if max.is_none() {
            p.fail("circuit_breaker.max_ejection_percent", "must be between 0 and 100");
        }
        Some(CircuitBreaker {
            consecutive_failures: consecutive_failures?,
            base_ejection: base_ejection?,
            max_ejection_percent: max?,
        })
    });
    let max_concurrent_requests = r.max_concurrent_requests.and_then(|n| {
        let n = NonZeroU32::new(n);
        if n.is_none() {
            p.fail("max_concurrent_requests", "must be at least 1");
        }
        n
    });
    let retry_budget = r.retry_budget.and_then(|(ratio, min_per_second)| {
        if !(0.0..=MAX_BUDGET_RATIO).contains(&ratio) {
            p.fail("retry_budget.ratio", format!("must be between 0 and {MAX_BUDGET_RATIO}"));
            return None;
        }
        Some(RetryBudget { ratio, min_per_second })
    });
    let latency_outlier = r.latency_outlier.and_then(|(multiple, window)| {
        if !(multiple > 1.0 && multiple <= MAX_OUTLIER_MULTIPLE) {
            p.fail(
                "latency_outlier.multiple",
                format!("{multiple}: must be more than 1 and at most {MAX_OUTLIER_MULTIPLE} (times the median)"),
            );
        }
        let window = p.ok("latency_outlier.window", window.get())?;
        Some(LatencyOutlier { multiple, window })
    });
    (p.0.len() == before).then(|| Resilience {
        service: r.service.to_string(),
        circuit_breaker,
        max_concurrent_requests,
        retry_budget,
        latency_outlier,
    })
}

pub(crate) fn tenant_policy(t: &RawTenantPolicy<'_>, p: &mut Problems) -> Option<TenantPolicy> {
    let before = p.0.len();
    // `*`: every tenant without a policy of its own, together.
    if t.tenant != "*" {
        p.ok("tenant", check_tenant("tenant", t.tenant));
    }
    let service = if t.service == "*" {
        ServiceSelector::All
    } else {
        p.ok("service", check_service("service", t.service));
        ServiceSelector::Named(t.service.to_string())
    };
    let rate_limit = t.rate_limit.and_then(|(rps, burst)| {
        if !(rps > 0.0 && rps.is_finite()) {
            p.fail("rate_limit.requests_per_second", "must be greater than 0");
            return None;
        }
        Some(RateLimit { requests_per_second: rps, burst })
    });
    let max_concurrent_requests = t.max_concurrent_requests.and_then(|n| {
        let n = NonZeroU32::new(n);
        if n.is_none() {
            p.fail("max_concurrent_requests", "must be at least 1");
        }
        n
    });
    let tokens_per_minute = t.tokens_per_minute.and_then(|n| {
        let n = NonZeroU64::new(n);
        if n.is_none() {
            p.fail("tokens_per_minute", "must be at least 1");
        }
        n
    });
    // A nested quota above its parent's could never be reached.
    let within = |p: &mut Problems, field: &str, n: u64, parent: Option<(NonZeroU64, &str)>| {
        if let Some((limit, what)) = parent
            && n > limit.get()
        {
            p.fail(field, format!("{n} is more than {what}'s {limit}: it could never be reached"));
        }
    };
    if t.callers.len() > MAX_CALLER_QUOTAS {
        p.fail("callers", format!("{} callers; at most {MAX_CALLER_QUOTAS}", t.callers.len()));
    }
    let mut callers = BTreeMap::new();
    for (caller, n) in &t.callers {
        let field = format!("callers.{caller}.tokens_per_minute");
        p.ok(format!("callers.{caller}"), check_service("caller", caller));
        match NonZeroU64::new(*n) {
            None => p.fail(field, "must be at least 1"),
            Some(q) => {
                within(p, &field, *n, tokens_per_minute.map(|t| (t, "the tenant")));
                callers.insert(caller.to_string(), q);
            }
        }
    }
    let session = t.session.and_then(|(header, n)| {
        let header = p.ok("session.header", header_name(header));
        let q = NonZeroU64::new(n);
        match q {
            None => p.fail("session.tokens_per_minute", "must be at least 1"),
            Some(_) => within(p, "session.tokens_per_minute", n, tokens_per_minute.map(|t| (t, "the tenant"))),
        }
        Some(SessionQuota { header: header?, tokens_per_minute: q? })
    });
    if t.rate_limit.is_none()
        && t.max_concurrent_requests.is_none()
        && t.tokens_per_minute.is_none()
        && t.callers.is_empty()
        && t.session.is_none()
    {
        p.fail(
            "rate_limit",
            "a tenant policy needs rate_limit, max_concurrent_requests, tokens_per_minute, callers or session",
        );
    }
    (p.0.len() == before).then(|| TenantPolicy {
        tenant: t.tenant.to_string(),
        service,
        rate_limit,
        max_concurrent_requests,
        tokens_per_minute,
        callers,
        session,
    })
}

/// Borrows a list of names.
pub(crate) fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

pub(crate) fn authorization(a: &RawAuthorization<'_>, p: &mut Problems) -> Option<AuthorizationPolicy> {
    let before = p.0.len();
    p.ok("service", check_service("service", a.service));
    let default = match a.default {
        None | Some("deny") => Action::Deny,
        Some("allow") => Action::Allow,
        Some(other) => {
            p.fail("default", format!("'{other}' is not an action (allow or deny)"));
            Action::Deny
        }
    };
    if a.rules.len() > MAX_AUTHZ_RULES {
        p.fail("rules", format!("{} rules; at most {MAX_AUTHZ_RULES}", a.rules.len()));
    }
    let rules: Vec<AuthorizationRule> =
        a.rules.iter().enumerate().filter_map(|(i, r)| authorization_rule(i, r, p)).collect();
    let mut tenant_header_from = Vec::new();
    list_len(p, "tenant_header_from", a.tenant_header_from.len());
    for (i, s) in a.tenant_header_from.iter().enumerate() {
        if p.ok(format!("tenant_header_from[{i}]"), check_service("caller", s)).is_some() {
            tenant_header_from.push(s.to_string());
        }
    }
    (p.0.len() == before).then(|| AuthorizationPolicy {
        service: a.service.to_string(),
        default,
        rules,
        tenant_header_from,
    })
}

fn list_len(p: &mut Problems, field: impl Into<String>, n: usize) {
    if n > MAX_AUTHZ_LIST {
        p.fail(field, format!("{n} entries; at most {MAX_AUTHZ_LIST}"));
    }
}

fn authorization_rule(i: usize, r: &RawAuthorizationRule<'_>, p: &mut Problems) -> Option<AuthorizationRule> {
    let at = |f: &str| format!("rules[{i}].{f}");
    let before = p.0.len();
    for (field, n) in
        [("from", r.from.len()), ("paths", r.paths.len()), ("methods", r.methods.len()), ("tenants", r.tenants.len())]
    {
        list_len(p, at(field), n);
    }
    let from = if r.from.is_empty() {
        p.fail(at("from"), "names no caller (list caller services, or '*' for any caller with an identity)");
        Callers::Any
    } else if r.from.contains(&"*") {
        if r.from.len() > 1 {
            p.fail(at("from"), "'*' already means every caller; list it alone");
        }
        Callers::Any
    } else {
        for (j, s) in r.from.iter().enumerate() {
            p.ok(at(&format!("from[{j}]")), check_service("caller", s));
        }
        Callers::Services(r.from.iter().map(|s| s.to_string()).collect())
    };
    for (j, path) in r.paths.iter().enumerate() {
        if !path.starts_with('/') {
            p.fail(at(&format!("paths[{j}]")), format!("'{path}' must start with '/'"));
        }
    }
    let mut methods = Vec::with_capacity(r.methods.len());
    for (j, m) in r.methods.iter().enumerate() {
        if METHODS.contains(m) {
            methods.push(Method::from_bytes(m.as_bytes()).expect("a standard method"));
        } else {
            p.fail(
                at(&format!("methods[{j}]")),
                format!("'{m}' is not an HTTP method (one of {}, upper case)", METHODS.join(", ")),
            );
        }
    }
    for (j, t) in r.tenants.iter().enumerate() {
        p.ok(at(&format!("tenants[{j}]")), check_tenant("tenant", t));
    }
    (p.0.len() == before).then(|| AuthorizationRule {
        from,
        paths: r.paths.iter().map(|s| s.to_string()).collect(),
        methods,
        tenants: r.tenants.iter().map(|s| s.to_string()).collect(),
    })
}
