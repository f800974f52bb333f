//! The typed policy model: what a valid resource means. Durations are
//! `Duration`, methods `http::Method`, statuses `StatusCode`, counts that
//! cannot be zero `NonZero*`, retry conditions an enum. A value of these
//! types is valid by construction: the only ways in are the conversions in
//! [`crate::check`], from a document or from the wire.

use std::collections::BTreeMap;
use std::num::{NonZeroU32, NonZeroU64};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, StatusCode};

/// One valid policy resource.
#[derive(Debug, Clone, PartialEq)]
pub enum Policy {
    Route(Route),
    Resilience(Resilience),
    TenantPolicy(TenantPolicy),
    AuthorizationPolicy(AuthorizationPolicy),
}

/// How calls to a service are routed (for one tenant, or by default).
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub service: String,
    pub tenant: Option<String>,
    /// At least one; the first that matches a request applies.
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub matches: Match,
    /// At least one, with weights summing to more than zero.
    pub backends: Vec<Backend>,
    /// To the response head, over all tries.
    pub timeout: Option<Duration>,
    pub retry: Option<Retry>,
    pub fallback: Option<Fallback>,
    pub fault: Option<Fault>,
    /// To the first body byte of the answer (an LLM's first token).
    pub first_byte_timeout: Option<Duration>,
    /// The longest gap between two body chunks of the answer.
    pub idle_timeout: Option<Duration>,
    /// Only with `retry`: a hedge is a try, and counts as one.
    pub hedge: Option<Hedge>,
    pub hash_on: Option<HashOn>,
}

/// A second try to another endpoint when the first has not answered in
/// time; the first answer head wins and the other try is cancelled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Hedge {
    /// After a fixed delay.
    After(Duration),
    /// After the service's observed p95 time to first byte.
    P95,
}

/// What keeps a session's calls on one endpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum HashOn {
    Header(HeaderName),
    /// A cookie of the request, by name.
    Cookie(String),
}

/// What a request must look like for its rule to apply; empty matches all.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Match {
    /// Starts with `/`.
    pub path_prefix: Option<String>,
    pub method: Option<Method>,
    /// Exact values; names lowercase.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Match {
    pub fn matches<B>(&self, req: &http::Request<B>) -> bool {
        if let Some(p) = &self.path_prefix
            && !req.uri().path().starts_with(p.as_str())
        {
            return false;
        }
        if let Some(m) = &self.method
            && req.method() != m
        {
            return false;
        }
        self.headers.iter().all(|(k, v)| req.headers().get(k) == Some(v))
    }

    pub fn is_empty(&self) -> bool {
        self.path_prefix.is_none() && self.method.is_none() && self.headers.is_empty()
    }
}

/// A subset of a service's endpoints (by label) and its share of traffic.
#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    /// Keys and values non-empty.
    pub subset: BTreeMap<String, String>,
    /// At most [`crate::check::MAX_WEIGHT`].
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    /// Retries after the first try, 1 to [`crate::check::MAX_ATTEMPTS`].
    pub attempts: NonZeroU32,
    /// Never longer than the rule's timeout.
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
}

/// An outcome a try may be retried on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RetryCondition {
    /// `5xx`: any 5xx answer, and a per-try timeout.
    ServerError,
    /// `gateway-error`: 502, 503, 504, and a per-try timeout.
    GatewayError,
    /// `connect-failure`: the endpoint refused or did not answer the connect.
    ConnectFailure,
    /// `reset`: the endpoint reset or broke the connection or stream.
    Reset,
    /// `unavailable`: gRPC UNAVAILABLE (14).
    Unavailable,
    /// `cancelled`: gRPC CANCELLED (1).
    Cancelled,
    /// `deadline-exceeded`: gRPC DEADLINE_EXCEEDED (4).
    DeadlineExceeded,
    /// `resource-exhausted`: gRPC RESOURCE_EXHAUSTED (8).
    ResourceExhausted,
}

impl RetryCondition {
    pub const ALL: [RetryCondition; 8] = [
        RetryCondition::ServerError,
        RetryCondition::GatewayError,
        RetryCondition::ConnectFailure,
        RetryCondition::Reset,
        RetryCondition::Unavailable,
        RetryCondition::Cancelled,
        RetryCondition::DeadlineExceeded,
        RetryCondition::ResourceExhausted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RetryCondition::ServerError => "5xx",
            RetryCondition::GatewayError => "gateway-error",
            RetryCondition::ConnectFailure => "connect-failure",
            RetryCondition::Reset => "reset",
            RetryCondition::Unavailable => "unavailable",
            RetryCondition::Cancelled => "cancelled",
            RetryCondition::DeadlineExceeded => "deadline-exceeded",
            RetryCondition::ResourceExhausted => "resource-exhausted",
        }
    }

    pub fn parse(s: &str) -> Result<RetryCondition, String> {
        RetryCondition::ALL.into_iter().find(|c| c.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = RetryCondition::ALL.iter().map(|c| c.as_str()).collect();
            format!("unknown condition '{s}' (one of: {})", names.join(", "))
        })
    }

    /// The gRPC status this condition retries, for the gRPC ones.
    pub fn grpc_status(self) -> Option<u32> {
        match self {
            RetryCondition::Unavailable => Some(14),
            RetryCondition::Cancelled => Some(1),
            RetryCondition::DeadlineExceeded => Some(4),
            RetryCondition::ResourceExhausted => Some(8),
            _ => None,
        }
    }
}

/// A set of retry conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryOn(u16);

impl RetryOn {
    /// What a retry policy without `on` retries: `gateway-error`,
    /// `connect-failure`, `reset`, `unavailable`.
    pub const DEFAULT: RetryOn = RetryOn(
        1 << RetryCondition::GatewayError as u16
            | 1 << RetryCondition::ConnectFailure as u16
            | 1 << RetryCondition::Reset as u16
            | 1 << RetryCondition::Unavailable as u16,
    );

    pub const fn empty() -> RetryOn {
        RetryOn(0)
    }

    pub fn with(self, c: RetryCondition) -> RetryOn {
        RetryOn(self.0 | 1 << c as u16)
    }

    #[inline]
    pub fn contains(self, c: RetryCondition) -> bool {
        self.0 & (1 << c as u16) != 0
    }

    pub fn iter(self) -> impl Iterator<Item = RetryCondition> {
        RetryCondition::ALL.into_iter().filter(move |c| self.contains(*c))
    }

    /// True when a gRPC status `code` (in a trailers-only answer) is retried.
    #[inline]
    pub fn retries_grpc(self, code: u32) -> bool {
        self.iter().any(|c| c.grpc_status() == Some(code))
    }
}

impl FromIterator<RetryCondition> for RetryOn {
    fn from_iter<I: IntoIterator<Item = RetryCondition>>(iter: I) -> Self {
        iter.into_iter().fold(RetryOn::empty(), RetryOn::with)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Fallback {
    /// Send the request to another service (never the route's own).
    Service(String),
    /// Answer with a fixed response (status 200-599).
    Static { status: StatusCode, body: Bytes },
}

/// Faults injected by the caller's sidecar on each try of matching requests.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    /// Only requests carrying this header (any value) are affected.
    pub header: Option<HeaderName>,
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

impl Fault {
    pub fn applies<B>(&self, req: &http::Request<B>) -> bool {
        self.header.as_ref().is_none_or(|h| req.headers().contains_key(h))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct FaultDelay {
    /// Share of tries delayed, 0 to 100.
    pub percent: f64,
    pub duration: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FaultAbort {
    /// Share of tries aborted, 0 to 100.
    pub percent: f64,
    /// The HTTP answer (503 when only a gRPC status was given).
    pub status: StatusCode,
    /// What gRPC callers get, 1-16.
    pub grpc_status: Option<u16>,
}

/// What protects callers from a service.
#[derive(Debug, Clone, PartialEq)]
pub struct Resilience {
    pub service: String,
    pub circuit_breaker: Option<CircuitBreaker>,
    pub max_concurrent_requests: Option<NonZeroU32>,
    pub retry_budget: Option<RetryBudget>,
    pub latency_outlier: Option<LatencyOutlier>,
}

/// Ejects an endpoint whose time to first byte stays above `multiple` times
/// the service's median over `window`, like a failing one (the breaker's
/// ejection period, cap and probe).
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyOutlier {
    /// More than 1, at most [`crate::check::MAX_OUTLIER_MULTIPLE`].
    pub multiple: f64,
    pub window: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CircuitBreaker {
    pub consecutive_failures: NonZeroU32,
    pub base_ejection: Duration,
    /// 0 to 100.
    pub max_ejection_percent: u8,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryBudget {
    /// Retries per call, 0 to 10 (0: only the floor).
    pub ratio: f64,
    /// Retries per second allowed whatever the traffic.
    pub min_per_second: u32,
}

impl RetryBudget {
    /// Without a `Resilience.retry_budget`: 20 % of calls, at least 10 a
    /// second.
    pub const DEFAULT: RetryBudget = RetryBudget { ratio: 0.2, min_per_second: 10 };
}

/// Which services a tenant policy covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceSelector {
    /// `*`: every service without a policy of its own for the tenant.
    All,
    Named(String),
}

impl ServiceSelector {
    pub fn as_str(&self) -> &str {
        match self {
            ServiceSelector::All => "*",
            ServiceSelector::Named(s) => s,
        }
    }
}

/// A tenant's limits at one service (or every service), as global figures.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantPolicy {
    pub tenant: String,
    pub service: ServiceSelector,
    pub rate_limit: Option<RateLimit>,
    pub max_concurrent_requests: Option<NonZeroU32>,
    pub tokens_per_minute: Option<NonZeroU64>,
    /// Token quotas of the tenant's calls from one caller service (within
    /// the tenant's); at most [`crate::check::MAX_CALLER_QUOTAS`].
    pub callers: BTreeMap<String, NonZeroU64>,
    /// A token quota per value of a session header (within the caller's).
    pub session: Option<SessionQuota>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SessionQuota {
    pub header: HeaderName,
    pub tokens_per_minute: NonZeroU64,
}

impl TenantPolicy {
    /// Whether any token quota applies.
    pub fn has_token_quota(&self) -> bool {
        self.tokens_per_minute.is_some() || !self.callers.is_empty() || self.session.is_some()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    /// More than zero.
    pub requests_per_second: f64,
    pub burst: u32,
}

/// Who may call a service, enforced by the service's own sidecars on each
/// inbound call. A call is allowed when some rule matches it, else the
/// default action applies.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthorizationPolicy {
    pub service: String,
    pub default: Action,
    /// At most [`crate::check::MAX_AUTHZ_RULES`].
    pub rules: Vec<AuthorizationRule>,
    /// Caller services whose tenant header is believed; from any other
    /// caller the tenant is the caller's own.
    pub tenant_header_from: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

/// Matches a call when every list given matches (an empty list matches
/// everything).
#[derive(Debug, Clone, PartialEq)]
pub struct AuthorizationRule {
    pub from: Callers,
    /// Path prefixes, each starting with `/`.
    pub paths: Vec<String>,
    pub methods: Vec<Method>,
    pub tenants: Vec<String>,
}

/// The callers a rule names.
#[derive(Debug, Clone, PartialEq)]
pub enum Callers {
    /// `*`: any caller with an identity.
    Any,
    /// Caller services, by the service in their identity.
    Services(Vec<String>),
}

impl AuthorizationRule {
    /// `caller`: the service of the caller's identity, `None` without one.
    pub fn matches(&self, caller: Option<&str>, method: &Method, path: &str, tenant: &str) -> bool {
        let Some(caller) = caller else { return false };
        let from = match &self.from {
            Callers::Any => true,
            Callers::Services(s) => s.iter().any(|s| s == caller),
        };
        from && (self.paths.is_empty() || self.paths.iter().any(|p| path.starts_with(p.as_str())))
            && (self.methods.is_empty() || self.methods.contains(method))
            && (self.tenants.is_empty() || self.tenants.iter().any(|t| t == tenant))
    }
}

impl AuthorizationPolicy {
    /// Whether the call may go through.
    pub fn allows(&self, caller: Option<&str>, method: &Method, path: &str, tenant: &str) -> bool {
        self.rules.iter().any(|r| r.matches(caller, method, path, tenant)) || self.default == Action::Allow
    }

    /// Whether `caller` may name the tenant of its calls in the tenant header.
    pub fn trusts_tenant_header(&self, caller: &str) -> bool {
        self.tenant_header_from.iter().any(|s| s == caller)
    }
}
