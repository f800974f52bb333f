//! Policy resources — `Route`, `Resilience`, `TenantPolicy` — as domain types,
//! with their parsing from YAML/JSON and their validation.
//!
//! Nothing here knows about etcd or gRPC: the store and the discovery server
//! convert at their edges. The same checks run offline in `weftctl validate`,
//! in `weftctl apply` before sending, and in the control plane before anything
//! reaches etcd.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The JSON schema version stored with every resource in etcd.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum Resource {
    Route(Route),
    Resilience(Resilience),
    TenantPolicy(TenantPolicy),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matches: Option<Match>,
    pub backends: Vec<Backend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
}

/// Faults the caller's sidecar injects, to exercise resilience.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// Only requests carrying this header are affected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultDelay {
    pub percent: f64,
    pub duration: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultAbort {
    pub percent: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    #[serde(default)]
    pub subset: BTreeMap<String, String>,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fallback {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resilience {
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudget>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreaker {
    pub consecutive_failures: u32,
    pub base_ejection: String,
    #[serde(default = "default_max_ejection")]
    pub max_ejection_percent: u32,
}

fn default_max_ejection() -> u32 {
    50
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBudget {
    pub ratio: f64,
    #[serde(default)]
    pub min_per_second: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantPolicy {
    pub tenant: String,
    /// A service name, or `*` for every service.
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_requests: Option<u32>,
    /// Inference tokens per minute, counted from `x-weft-usage-tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub requests_per_second: f64,
    #[serde(default)]
    pub burst: u32,
}

/// Identifies a resource: its kind and the parts of its name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceId {
    Route { service: String, tenant: Option<String> },
    Resilience { service: String },
    TenantPolicy { tenant: String, service: String },
}

impl ResourceId {
    /// The etcd key below the prefix, e.g. `routes/inference/acme`.
    pub fn key_suffix(&self) -> String {
        match self {
            ResourceId::Route { service, tenant: None } => format!("routes/{service}"),
            ResourceId::Route { service, tenant: Some(t) } => format!("routes/{service}/{t}"),
            ResourceId::Resilience { service } => format!("resilience/{service}"),
            ResourceId::TenantPolicy { tenant, service } => format!("tenants/{tenant}/{service}"),
        }
    }

    /// Parses a key suffix back (the inverse of [`ResourceId::key_suffix`]).
    pub fn from_key_suffix(suffix: &str) -> Option<ResourceId> {
        let parts: Vec<&str> = suffix.split('/').collect();
        match parts.as_slice() {
            ["routes", s] => Some(ResourceId::Route { service: s.to_string(), tenant: None }),
            ["routes", s, t] => Some(ResourceId::Route { service: s.to_string(), tenant: Some(t.to_string()) }),
            ["resilience", s] => Some(ResourceId::Resilience { service: s.to_string() }),
            ["tenants", t, s] => Some(ResourceId::TenantPolicy { tenant: t.to_string(), service: s.to_string() }),
            _ => None,
        }
    }

    /// The service whose sidecars must hear about a change to this resource;
    /// `None` for tenant policies that apply to every service.
    pub fn service(&self) -> Option<&str> {
        match self {
            ResourceId::Route { service, .. } | ResourceId::Resilience { service } => Some(service),
            ResourceId::TenantPolicy { service, .. } if service == "*" => None,
            ResourceId::TenantPolicy { service, .. } => Some(service),
        }
    }

    /// Parses the `KIND NAME` form used by `weftctl get/delete/history`:
    /// `route inference`, `route inference/acme`, `resilience inference`,
    /// `tenantpolicy acme/inference`.
    pub fn parse(kind: &str, name: &str) -> Result<ResourceId, String> {
        let (first, second) = match name.split_once('/') {
            Some((a, b)) => (a.to_string(), Some(b.to_string())),
            None => (name.to_string(), None),
        };
        match normalize_kind(kind)? {
            Kind::Route => Ok(ResourceId::Route { service: first, tenant: second }),
            Kind::Resilience if second.is_none() => Ok(ResourceId::Resilience { service: first }),
            Kind::TenantPolicy => match second {
                Some(service) => Ok(ResourceId::TenantPolicy { tenant: first, service }),
                None => Err(format!("tenantpolicy name must be TENANT/SERVICE, got '{name}'")),
            },
            Kind::Resilience => Err(format!("resilience name is a service, got '{name}'")),
        }
    }
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResourceId::Route { service, tenant: None } => write!(f, "route/{service}"),
            ResourceId::Route { service, tenant: Some(t) } => write!(f, "route/{service}/{t}"),
            ResourceId::Resilience { service } => write!(f, "resilience/{service}"),
            ResourceId::TenantPolicy { tenant, service } => {
                write!(f, "tenantpolicy/{tenant}/{service}")
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Route,
    Resilience,
    TenantPolicy,
}

impl Kind {
    /// The etcd key segment under the prefix where resources of this kind live.
    pub fn key_dir(self) -> &'static str {
        match self {
            Kind::Route => "routes",
            Kind::Resilience => "resilience",
            Kind::TenantPolicy => "tenants",
        }
    }
}

/// Accepts the kind as written in YAML or on the command line, any case,
/// singular or plural.
pub fn normalize_kind(kind: &str) -> Result<Kind, String> {
    match kind.to_ascii_lowercase().trim_end_matches('s') {
        "route" => Ok(Kind::Route),
        "resilience" => Ok(Kind::Resilience),
        "tenantpolicy" | "tenantpolicie" | "tenant" => Ok(Kind::TenantPolicy),
        _ => Err(format!("unknown kind '{kind}' (expected Route, Resilience or TenantPolicy)")),
    }
}

impl Resource {
    pub fn id(&self) -> ResourceId {
        match self {
            Resource::Route(r) => ResourceId::Route { service: r.service.clone(), tenant: r.tenant.clone() },
            Resource::Resilience(r) => ResourceId::Resilience { service: r.service.clone() },
            Resource::TenantPolicy(p) => {
                ResourceId::TenantPolicy { tenant: p.tenant.clone(), service: p.service.clone() }
            }
        }
    }

    pub fn kind_name(&self) -> &'static str {
        match self {
            Resource::Route(_) => "Route",
            Resource::Resilience(_) => "Resilience",
            Resource::TenantPolicy(_) => "TenantPolicy",
        }
    }
}

/// One problem found in one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path of the offending field, e.g. `rules[0].backends`.
    pub field: String,
    pub message: String,
}

impl Problem {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem { field: field.into(), message: message.into() }
    }
}

/// Parses a duration such as `250ms`, `2s`, `1m`, `1.5s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("'{s}' has no unit (use ms, s, m or h)"))?;
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("'{s}' is not a duration (e.g. 500ms, 2s)"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("'{s}' has unknown unit '{unit}' (use ms, s, m or h)")),
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("'{s}' must be greater than zero"));
    }
    if secs > 86400.0 {
        return Err(format!("'{s}' is longer than a day"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A DNS-label-like name: lowercase letters, digits and `-`, 1..=63 chars.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    if name.len() > 63 {
        return Err(format!("{what} '{name}' is longer than 63 characters"));
    }
    let ok = name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with(['-', '.']);
    if !ok {
        return Err(format!("{what} '{name}' may only hold lowercase letters, digits, '-', '_' and '.'"));
    }
    Ok(())
}

const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "connect-failure",
    "reset",
    "unavailable",
    "cancelled",
    "deadline-exceeded",
    "resource-exhausted",
];

const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"];

/// Checks everything that can be checked of one resource on its own.
pub fn validate(resource: &Resource) -> Vec<Problem> {
    let mut p = Vec::new();
    match resource {
        Resource::Route(r) => validate_route(r, &mut p),
        Resource::Resilience(r) => validate_resilience(r, &mut p),
        Resource::TenantPolicy(t) => validate_tenant_policy(t, &mut p),
    }
    p
}

fn validate_route(r: &Route, p: &mut Vec<Problem>) {
    if let Err(e) = check_name("service", &r.service) {
        p.push(Problem::new("service", e));
    }
    if let Some(t) = &r.tenant
        && let Err(e) = check_name("tenant", t)
    {
        p.push(Problem::new("tenant", e));
    }
    if r.rules.is_empty() {
        p.push(Problem::new("rules", "a route needs at least one rule"));
    }
    for (i, rule) in r.rules.iter().enumerate() {
        let at = |f: &str| format!("rules[{i}].{f}");
        if let Some(m) = &rule.matches {
            if let Some(prefix) = &m.path_prefix
                && !prefix.starts_with('/')
            {
                p.push(Problem::new(at("match.path_prefix"), format!("'{prefix}' must start with '/'")));
            }
            if let Some(method) = &m.method
                && !METHODS.contains(&method.as_str())
            {
                p.push(Problem::new(
                    at("match.method"),
                    format!("'{method}' is not an HTTP method (use upper case, e.g. POST)"),
                ));
            }
            for name in m.headers.keys() {
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() || name.to_ascii_lowercase() != *name {
                    p.push(Problem::new(
                        at(&format!("match.headers.{name}")),
                        format!("'{name}' is not a valid lowercase header name"),
                    ));
                }
            }
        }
        if rule.backends.is_empty() {
            p.push(Problem::new(at("backends"), "a rule needs at least one backend"));
        } else if rule.backends.iter().map(|b| u64::from(b.weight)).sum::<u64>() == 0 {
            p.push(Problem::new(at("backends"), "weights sum to 0: no backend would get traffic"));
        }
        let mut seen: Vec<&BTreeMap<String, String>> = Vec::new();
        for (j, b) in rule.backends.iter().enumerate() {
            for (k, v) in &b.subset {
                if k.is_empty() || v.is_empty() {
                    p.push(Problem::new(
                        at(&format!("backends[{j}].subset")),
                        "label keys and values must not be empty, so the subset could never match",
                    ));
                }
            }
            if b.weight > 10_000 {
                p.push(Problem::new(at(&format!("backends[{j}].weight")), "weight must be at most 10000"));
            }
            if seen.contains(&&b.subset) {
                p.push(Problem::new(
                    at(&format!("backends[{j}].subset")),
                    "the same subset is listed twice in this rule",
                ));
            }
            seen.push(&b.subset);
        }
        let timeout = match &rule.timeout {
            Some(t) => match parse_duration(t) {
                Ok(d) => Some(d),
                Err(e) => {
                    p.push(Problem::new(at("timeout"), e));
                    None
                }
            },
            None => None,
        };
        if let Some(retry) = &rule.retry {
            if retry.attempts == 0 || retry.attempts > 10 {
                p.push(Problem::new(at("retry.attempts"), "attempts must be between 1 and 10"));
            }
            if let Some(ptt) = &retry.per_try_timeout {
                match parse_duration(ptt) {
                    Ok(d) => {
                        if let Some(t) = timeout
                            && d > t
                        {
                            p.push(Problem::new(
                                at("retry.per_try_timeout"),
                                format!(
                                    "{ptt} is longer than the rule's timeout {}",
                                    rule.timeout.as_deref().unwrap_or("")
                                ),
                            ));
                        }
                    }
                    Err(e) => p.push(Problem::new(at("retry.per_try_timeout"), e)),
                }
            }
            for cond in &retry.on {
                if !RETRY_ON.contains(&cond.as_str()) {
                    p.push(Problem::new(
                        at("retry.on"),
                        format!("unknown condition '{cond}' (one of: {})", RETRY_ON.join(", ")),
                    ));
                }
            }
        }
        if let Some(f) = &rule.fault {
            validate_fault(f, &at, p);
        }
        if let Some(fb) = &rule.fallback {
            match (&fb.service, fb.status) {
                (Some(_), Some(_)) => p.push(Problem::new(at("fallback"), "set either service or status, not both")),
                (None, None) => p.push(Problem::new(at("fallback"), "set service or status")),
                (Some(s), None) => {
                    if let Err(e) = check_name("fallback service", s) {
                        p.push(Problem::new(at("fallback.service"), e));
                    } else if *s == r.service {
                        p.push(Problem::new(at("fallback.service"), "a service cannot fall back to itself"));
                    }
                    if fb.body.is_some() {
                        p.push(Problem::new(at("fallback.body"), "body goes with status, not service"));
                    }
                }
                (None, Some(status)) => {
                    if !(100..=599).contains(&status) {
                        p.push(Problem::new(at("fallback.status"), format!("{status} is not an HTTP status")));
                    }
                }
            }
        }
    }
}

fn validate_fault(f: &Fault, at: &dyn Fn(&str) -> String, p: &mut Vec<Problem>) {
    if f.delay.is_none() && f.abort.is_none() {
        p.push(Problem::new(at("fault"), "set delay, abort or both"));
    }
    if let Some(h) = &f.header
        && (http::HeaderName::from_bytes(h.as_bytes()).is_err() || h.to_ascii_lowercase() != *h)
    {
        p.push(Problem::new(at("fault.header"), format!("'{h}' is not a valid lowercase header name")));
    }
    let percent_ok = |v: f64| (0.0..=100.0).contains(&v);
    if let Some(d) = &f.delay {
        if !percent_ok(d.percent) {
            p.push(Problem::new(at("fault.delay.percent"), "must be between 0 and 100"));
        }
        if let Err(e) = parse_duration(&d.duration) {
            p.push(Problem::new(at("fault.delay.duration"), e));
        }
    }
    if let Some(a) = &f.abort {
        if !percent_ok(a.percent) {
            p.push(Problem::new(at("fault.abort.percent"), "must be between 0 and 100"));
        }
        match (a.status, a.grpc_status) {
            (None, None) => p.push(Problem::new(at("fault.abort"), "set status (HTTP) and/or grpc_status")),
            (Some(s), _) if !(200..=599).contains(&s) => {
                p.push(Problem::new(at("fault.abort.status"), format!("{s} is not an HTTP status")))
            }
            (_, Some(g)) if !(1..=16).contains(&g) => {
                p.push(Problem::new(at("fault.abort.grpc_status"), format!("{g} is not a gRPC error code (1-16)")))
            }
            _ => {}
        }
    }
}

fn validate_resilience(r: &Resilience, p: &mut Vec<Problem>) {
    if let Err(e) = check_name("service", &r.service) {
        p.push(Problem::new("service", e));
    }
    if let Some(cb) = &r.circuit_breaker {
        if cb.consecutive_failures == 0 {
            p.push(Problem::new("circuit_breaker.consecutive_failures", "must be at least 1"));
        }
        if let Err(e) = parse_duration(&cb.base_ejection) {
            p.push(Problem::new("circuit_breaker.base_ejection", e));
        }
        if cb.max_ejection_percent > 100 {
            p.push(Problem::new("circuit_breaker.max_ejection_percent", "must be between 0 and 100"));
        }
    }
    if r.max_concurrent_requests == Some(0) {
        p.push(Problem::new("max_concurrent_requests", "must be at least 1"));
    }
    if let Some(b) = &r.retry_budget
        && !(b.ratio >= 0.0 && b.ratio <= 10.0)
    {
        p.push(Problem::new("retry_budget.ratio", "must be between 0 and 10"));
    }
}

fn validate_tenant_policy(t: &TenantPolicy, p: &mut Vec<Problem>) {
    if let Err(e) = check_name("tenant", &t.tenant) {
        p.push(Problem::new("tenant", e));
    }
    if t.service != "*"
        && let Err(e) = check_name("service", &t.service)
    {
        p.push(Problem::new("service", e));
    }
    if let Some(rl) = &t.rate_limit
        && !(rl.requests_per_second > 0.0 && rl.requests_per_second.is_finite())
    {
        p.push(Problem::new("rate_limit.requests_per_second", "must be greater than 0"));
    }
    if t.max_concurrent_requests == Some(0) {
        p.push(Problem::new("max_concurrent_requests", "must be at least 1"));
    }
    if t.tokens_per_minute == Some(0) {
        p.push(Problem::new("tokens_per_minute", "must be at least 1"));
    }
    if t.rate_limit.is_none() && t.max_concurrent_requests.is_none() && t.tokens_per_minute.is_none() {
        p.push(Problem::new(
            "rate_limit",
            "a tenant policy needs rate_limit, max_concurrent_requests or tokens_per_minute",
        ));
    }
}

/// Decodes one resource from a JSON value (as read from YAML, from the admin
/// API, or from etcd), naming the offending field when it fails.
pub fn from_value(value: serde_json::Value) -> Result<Resource, Problem> {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .ok_or_else(|| Problem::new("kind", "missing 'kind' (Route, Resilience or TenantPolicy)"))?
        .to_string();
    let mut body = value;
    if let Some(obj) = body.as_object_mut() {
        obj.remove("kind");
    }
    fn typed<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, Problem> {
        serde_path_to_error::deserialize(v).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { String::new() } else { path };
            Problem::new(field, e.into_inner().to_string())
        })
    }
    match kind.as_str() {
        "Route" => typed(body).map(Resource::Route),
        "Resilience" => typed(body).map(Resource::Resilience),
        "TenantPolicy" => typed(body).map(Resource::TenantPolicy),
        other => {
            Err(Problem::new("kind", format!("unknown kind '{other}' (expected Route, Resilience or TenantPolicy)")))
        }
    }
}

/// Field-by-field differences between two JSON values, as
/// `path: old → new` lines (`path: + new` for added, `path: - old` for
/// removed), in a stable order.
pub fn diff_values(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    diff_at("", old, new, &mut out);
    out
}

fn diff_at(path: &str, old: &serde_json::Value, new: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    let join = |k: &str| if path.is_empty() { k.to_string() } else { format!("{path}.{k}") };
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => diff_at(&join(k), x, y, out),
                    (Some(x), None) => out.push(format!("{}: - {x}", join(k))),
                    (None, Some(y)) => out.push(format!("{}: + {y}", join(k))),
                    (None, None) => {}
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for i in 0..a.len().max(b.len()) {
                let p = format!("{path}[{i}]");
                match (a.get(i), b.get(i)) {
                    (Some(x), Some(y)) => diff_at(&p, x, y, out),
                    (Some(x), None) => out.push(format!("{p}: - {x}")),
                    (None, Some(y)) => out.push(format!("{p}: + {y}")),
                    (None, None) => {}
                }
            }
        }
        (a, b) if a != b => out.push(format!("{path}: {a} → {b}")),
        _ => {}
    }
}

/// The JSON form of a resource, with its kind.
pub fn to_value(resource: &Resource) -> serde_json::Value {
    serde_json::to_value(resource).expect("policy types always serialize")
}

/// A resource parsed from a document in a file, with where it came from.
#[derive(Debug, Clone)]
pub struct Located {
    pub resource: Resource,
    pub origin: String,
}

/// One problem, located: `FILE:LINE: kind/name: field: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocatedProblem {
    pub file: String,
    pub line: usize,
    pub resource: String,
    pub field: String,
    pub message: String,
}

impl fmt::Display for LocatedProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}: ", self.file, self.line, self.resource)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        write!(f, "{}", self.message)
    }
}

/// The most one file (`weftctl apply -f`) may hold.
pub const MAX_FILE_BYTES: usize = 4 * 1024 * 1024;
/// The most one resource may take, as stored (JSON). etcd refuses requests
/// over 1.5 MiB by default, and a route this large is a mistake.
pub const MAX_RESOURCE_BYTES: usize = 256 * 1024;
/// The most one apply may write: every resource goes in one etcd
/// transaction.
pub const MAX_APPLY_BYTES: usize = 1024 * 1024;
/// The most resources one apply may hold (etcd allows 128 operations in a
/// transaction by default).
pub const MAX_APPLY_RESOURCES: usize = 100;
/// The deepest nesting a YAML document may have (a policy needs 6).
pub const MAX_DEPTH: usize = 32;

/// Parses one YAML document into a JSON value, within [`MAX_DEPTH`].
/// The error carries the 1-based line within `doc`.
pub fn yaml_value(doc: &str) -> Result<serde_json::Value, (usize, String)> {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_depth = MAX_DEPTH;
    let mut opts = serde_saphyr::Options::default();
    opts.budget = Some(budget);
    serde_saphyr::from_str_with_options::<serde_json::Value>(doc, opts).map_err(|e| {
        let line = e.location().map(|l| l.line() as usize).unwrap_or(1).max(1);
        let text = e.without_snippet().to_string();
        let first = text.lines().next().unwrap_or("not YAML").trim();
        // "error: line 2 column 10: unclosed bracket" -> "unclosed bracket"
        let msg = first.trim_start_matches("error: ");
        let msg = match msg.strip_prefix("line ").and_then(|r| r.split_once(": ")) {
            Some((_, rest)) => rest,
            None => msg,
        };
        let msg = if msg.contains("Depth") || msg.contains("recursion limit") {
            format!("nested deeper than the limit of {MAX_DEPTH} levels")
        } else {
            msg.to_string()
        };
        (line, msg)
    })
}

/// Parses and validates a multi-document YAML file. Returns every resource
/// when all are valid, else every problem found.
pub fn parse_documents(file: &str, text: &str) -> Result<Vec<Located>, Vec<LocatedProblem>> {
    let mut resources = Vec::new();
    let mut problems = Vec::new();
    let at_file = |message: String| LocatedProblem {
        file: file.to_string(),
        line: 1,
        resource: "file".into(),
        field: String::new(),
        message,
    };
    if text.len() > MAX_FILE_BYTES {
        return Err(vec![at_file(format!(
            "{} bytes, more than the limit of {} MiB",
            text.len(),
            MAX_FILE_BYTES / (1024 * 1024)
        ))]);
    }
    let mut total = 0usize;
    for (start_line, doc) in split_documents(text) {
        if doc.trim().lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#')) {
            continue;
        }
        let problem = |field: String, message: String, resource: String, line: usize| LocatedProblem {
            file: file.to_string(),
            line,
            resource,
            field,
            message,
        };
        let value = match yaml_value(&doc) {
            Ok(v) => v,
            Err((line, msg)) => {
                problems.push(problem(String::new(), msg, "document".into(), start_line + line - 1));
                continue;
            }
        };
        let label = describe(&value);
        match from_value(value) {
            Err(e) => {
                let line = start_line + field_line(&doc, &e.field);
                problems.push(problem(e.field, e.message, label, line));
            }
            Ok(resource) => {
                let mut found = validate(&resource);
                let size = to_value(&resource).to_string().len();
                total += size;
                if size > MAX_RESOURCE_BYTES {
                    found.push(Problem::new(
                        "",
                        format!(
                            "{} KiB as stored, more than the limit of {} KiB",
                            size / 1024,
                            MAX_RESOURCE_BYTES / 1024
                        ),
                    ));
                }
                if found.is_empty() {
                    resources.push(Located { origin: format!("{file}:{start_line}"), resource });
                } else {
                    let label = resource.id().to_string();
                    for e in found {
                        let line = start_line + field_line(&doc, &e.field);
                        problems.push(problem(e.field, e.message, label.clone(), line));
                    }
                }
            }
        }
    }
    if resources.len() > MAX_APPLY_RESOURCES {
        problems.push(at_file(format!(
            "{} resources, more than the limit of {MAX_APPLY_RESOURCES} in one apply (split the file)",
            resources.len()
        )));
    }
    if total > MAX_APPLY_BYTES {
        problems.push(at_file(format!(
            "{} KiB of resources as stored, more than the limit of {} KiB in one apply (split the file)",
            total / 1024,
            MAX_APPLY_BYTES / 1024
        )));
    }
    // Two documents for the same resource would make "one transaction" ambiguous.
    let mut ids: Vec<(ResourceId, &str)> = Vec::new();
    for r in &resources {
        let id = r.resource.id();
        if let Some((_, first)) = ids.iter().find(|(i, _)| *i == id) {
            let (f, line) = r.origin.rsplit_once(':').unwrap_or((file, "1"));
            problems.push(LocatedProblem {
                file: f.to_string(),
                line: line.parse().unwrap_or(1),
                resource: id.to_string(),
                field: String::new(),
                message: format!("defined twice in one file (first at {first})"),
            });
        } else {
            ids.push((id, &r.origin));
        }
    }
    if problems.is_empty() { Ok(resources) } else { Err(problems) }
}

/// Splits on `---` lines; yields (1-based line of the document's first line, text).
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut start = 1;
    let mut cur = String::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_end() == "---" || line.starts_with("--- ") {
            docs.push((start, std::mem::take(&mut cur)));
            start = i + 2;
        } else {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    docs.push((start, cur));
    docs
}

/// Best-effort: the 0-based line within `doc` where the last named segment of
/// a field path appears as a key; 0 when not found.
fn field_line(doc: &str, field: &str) -> usize {
    let mut from = 0;
    let segments: Vec<String> =
        field.split('.').map(|s| s.split('[').next().unwrap_or(s).to_string()).filter(|s| !s.is_empty()).collect();
    let lines: Vec<&str> = doc.lines().collect();
    let mut found = None;
    for seg in &segments {
        let needle = format!("{seg}:");
        if let Some(off) = lines[from..].iter().position(|l| {
            let t = l.trim_start().trim_start_matches("- ").trim_start_matches('{').trim_start();
            t.starts_with(&needle) || l.contains(&format!(" {needle}")) || l.contains(&format!("{{{needle}"))
        }) {
            from += off;
            found = Some(from);
        }
    }
    found.unwrap_or(0)
}

/// `kind/name` of a document, as far as it can be told from a raw value.
fn describe(v: &serde_json::Value) -> String {
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("?").to_string();
    match v.get("kind").and_then(|k| k.as_str()) {
        Some("Route") => match v.get("tenant").and_then(|x| x.as_str()) {
            Some(t) => format!("route/{}/{t}", s("service")),
            None => format!("route/{}", s("service")),
        },
        Some("Resilience") => format!("resilience/{}", s("service")),
        Some("TenantPolicy") => format!("tenantpolicy/{}/{}", s("tenant"), s("service")),
        Some(k) => format!("{}/?", k.to_ascii_lowercase()),
        None => "document".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "kind: Route\nservice: inference\nrules:\n  - backends:\n      - { subset: { version: v1 }, weight: 90 }\n      - { subset: { version: v2 }, weight: 10 }\n    timeout: 2s\n---\nkind: Resilience\nservice: inference\ncircuit_breaker: { consecutive_failures: 5, base_ejection: 10s }\n";

    #[test]
    fn parses_good_documents() {
        let r = parse_documents("p.yaml", GOOD).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].resource.id().to_string(), "route/inference");
        assert_eq!(r[1].origin, "p.yaml:9");
    }

    #[test]
    fn reports_file_line_resource_field() {
        let bad = "kind: Route\nservice: inference\nrules:\n  - backends:\n      - { subset: { version: v1 }, weight: 0 }\n    timeout: 2 seconds\n";
        let errs = parse_documents("bad.yaml", bad).unwrap_err();
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert!(
            text.contains(
                &"bad.yaml:4: route/inference: rules[0].backends: weights sum to 0: no backend would get traffic"
                    .to_string()
            ),
            "{text:?}"
        );
        assert!(
            text.iter().any(|t| t.starts_with("bad.yaml:6: route/inference: rules[0].timeout: '2 seconds'")),
            "{text:?}"
        );
    }

    #[test]
    fn unknown_field_is_named() {
        let bad = "kind: Route\nservice: inference\nrules:\n  - backend: []\n";
        let errs = parse_documents("x.yaml", bad).unwrap_err();
        assert!(errs[0].message.contains("unknown field `backend`"), "{errs:?}");
        assert_eq!(errs[0].line, 4);
    }

    #[test]
    fn diffs_name_the_changed_fields() {
        let a = serde_json::json!({"rules":[{"backends":[{"weight":90},{"weight":10}]}],"service":"x"});
        let b = serde_json::json!({"rules":[{"backends":[{"weight":80},{"weight":20}],"timeout":"2s"}],"service":"x"});
        assert_eq!(
            diff_values(&a, &b),
            vec![
                "rules[0].backends[0].weight: 90 → 80".to_string(),
                "rules[0].backends[1].weight: 10 → 20".to_string(),
                "rules[0].timeout: + \"2s\"".to_string(),
            ]
        );
        assert!(diff_values(&a, &a).is_empty());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5y").is_err());
    }

    #[test]
    fn key_roundtrip() {
        for id in [
            ResourceId::Route { service: "a".into(), tenant: None },
            ResourceId::Route { service: "a".into(), tenant: Some("t".into()) },
            ResourceId::Resilience { service: "a".into() },
            ResourceId::TenantPolicy { tenant: "t".into(), service: "*".into() },
        ] {
            assert_eq!(ResourceId::from_key_suffix(&id.key_suffix()), Some(id));
        }
    }

    #[test]
    fn too_deep_documents_are_refused_quickly_naming_the_limit() {
        for (deep, line) in [
            (format!("kind: Route\nservice: a\nrules: {}{}\n", "[".repeat(100_000), "]".repeat(100_000)), 3),
            (format!("kind: Route\nservice: a\nrules:\n{}x\n", "- ".repeat(100_000)), 4),
        ] {
            let started = std::time::Instant::now();
            let errs = parse_documents("deep.yaml", &deep).unwrap_err();
            assert!(started.elapsed() < std::time::Duration::from_secs(2), "{:?}", started.elapsed());
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert_eq!(errs[0].line, line);
            assert!(errs[0].message.contains(&format!("limit of {MAX_DEPTH} levels")), "{errs:?}");
        }
    }

    #[test]
    fn oversized_resources_files_and_applies_are_refused_naming_the_limit() {
        let rule = "  - match: { path_prefix: /a-path-that-is-quite-long-to-fill-the-route-up }\n    backends: [ { subset: {}, weight: 1 } ]\n";
        let big = format!("kind: Route\nservice: big\nrules:\n{}", rule.repeat(4_000));
        let errs = parse_documents("big.yaml", &big).unwrap_err();
        assert!(errs[0].message.contains("more than the limit of 256 KiB"), "{errs:?}");
        assert_eq!(errs[0].resource, "route/big");

        let many: String =
            (0..101).map(|i| format!("kind: Resilience\nservice: s{i}\nmax_concurrent_requests: 5\n---\n")).collect();
        let errs = parse_documents("many.yaml", &many).unwrap_err();
        assert!(errs[0].message.contains("101 resources, more than the limit of 100"), "{errs:?}");

        let huge = "#".repeat(MAX_FILE_BYTES + 1);
        let errs = parse_documents("huge.yaml", &huge).unwrap_err();
        assert!(errs[0].message.contains("more than the limit of 4 MiB"), "{errs:?}");
    }

    #[test]
    fn yaml_syntax_errors_are_one_line_with_the_documents_line() {
        let bad = "kind: Resilience\nservice: a\n---\nkind: Route\nservice: [b\n";
        let errs = parse_documents("syntax.yaml", bad).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].line, 5, "{errs:?}");
        assert!(!errs[0].message.contains('\n'), "{errs:?}");
        assert!(errs[0].to_string().starts_with("syntax.yaml:5: document: "), "{}", errs[0]);
    }
}
