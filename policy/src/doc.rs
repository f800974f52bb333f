//! Policy documents as operators write them (YAML, or JSON through the
//! admin API) and as etcd stores them: durations as strings, every field as
//! written. [`crate::check`] turns them into the typed model, or says what
//! is wrong and where.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The JSON schema version stored with every resource in etcd.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum Resource {
    Route(Route),
    Resilience(Resilience),
    TenantPolicy(TenantPolicy),
    AuthorizationPolicy(AuthorizationPolicy),
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_byte_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hedge: Option<Hedge>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<HashOn>,
}

/// `{ after: 200ms }` or `{ after: p95 }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hedge {
    pub after: String,
}

/// `{ header: NAME }` or `{ cookie: NAME }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HashOn {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_outlier: Option<LatencyOutlier>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencyOutlier {
    pub multiple: f64,
    pub window: String,
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
    /// Token quotas per caller service, within the tenant's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub callers: BTreeMap<String, CallerQuota>,
    /// A token quota per value of a session header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionQuota>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallerQuota {
    pub tokens_per_minute: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionQuota {
    pub header: String,
    pub tokens_per_minute: u64,
}

/// Who may call a service (see [`crate::model::AuthorizationPolicy`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationPolicy {
    pub service: String,
    /// `allow` or `deny` (the default): the action when no rule matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    #[serde(default)]
    pub rules: Vec<AuthorizationRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tenant_header_from: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationRule {
    /// Caller services, or `*` for any caller with an identity.
    pub from: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tenants: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub requests_per_second: f64,
    #[serde(default)]
    pub burst: u32,
}

impl Resource {
    pub fn kind_name(&self) -> &'static str {
        match self {
            Resource::Route(_) => "Route",
            Resource::Resilience(_) => "Resilience",
            Resource::TenantPolicy(_) => "TenantPolicy",
            Resource::AuthorizationPolicy(_) => "AuthorizationPolicy",
        }
    }
}

/// Decodes one resource from a JSON value (as read from YAML, from the admin
/// API, or from etcd), naming the offending field when it fails.
pub fn from_value(value: serde_json::Value) -> Result<Resource, crate::FieldError> {
    use crate::FieldError;
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .ok_or_else(|| FieldError::new("kind", format!("missing 'kind' ({})", crate::id::KINDS)))?
        .to_string();
    let mut body = value;
    if let Some(obj) = body.as_object_mut() {
        obj.remove("kind");
    }
    fn typed<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, FieldError> {
        serde_path_to_error::deserialize(v).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { String::new() } else { path };
            FieldError::new(field, e.into_inner().to_string())
        })
    }
    match kind.as_str() {
        "Route" => typed(body).map(Resource::Route),
        "Resilience" => typed(body).map(Resource::Resilience),
        "TenantPolicy" => typed(body).map(Resource::TenantPolicy),
        "AuthorizationPolicy" => typed(body).map(Resource::AuthorizationPolicy),
        other => Err(FieldError::new("kind", format!("unknown kind '{other}' (expected {})", crate::id::KINDS))),
    }
}

/// The JSON form of a resource, with its kind.
pub fn to_value(resource: &Resource) -> serde_json::Value {
    serde_json::to_value(resource).expect("policy types always serialize")
}

/// Converts a document to the model under the rules of [`crate::check`].
pub(crate) fn check(resource: &Resource) -> Result<crate::Policy, Vec<crate::FieldError>> {
    use crate::check::*;
    use crate::model::Policy;
    fn text(s: &Option<String>) -> Option<RawDuration<'_>> {
        s.as_deref().map(RawDuration::Text)
    }
    let mut p = Problems::default();
    match resource {
        Resource::Route(r) => {
            let rules = r
                .rules
                .iter()
                .map(|rule| {
                    let m = rule.matches.as_ref();
                    RawRule {
                        path_prefix: m.and_then(|m| m.path_prefix.as_deref()),
                        method: m.and_then(|m| m.method.as_deref()),
                        headers: m
                            .map(|m| m.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect())
                            .unwrap_or_default(),
                        backends: rule
                            .backends
                            .iter()
                            .map(|b| (b.subset.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(), b.weight))
                            .collect(),
                        timeout: text(&rule.timeout),
                        retry: rule.retry.as_ref().map(|rt| RawRetry {
                            attempts: rt.attempts,
                            per_try_timeout: text(&rt.per_try_timeout),
                            on: rt.on.iter().map(String::as_str).collect(),
                        }),
                        fallback: rule.fallback.as_ref().map(|f| RawFallback {
                            service: f.service.as_deref(),
                            status: f.status.map(u32::from),
                            body: f.body.as_deref(),
                        }),
                        fault: rule.fault.as_ref().map(|f| RawFault {
                            header: f.header.as_deref(),
                            delay: f.delay.as_ref().map(|d| (d.percent, RawDuration::Text(&d.duration))),
                            abort: f
                                .abort
                                .as_ref()
                                .map(|a| (a.percent, a.status.map(u32::from), a.grpc_status.map(u32::from))),
                        }),
                        first_byte_timeout: text(&rule.first_byte_timeout),
                        idle_timeout: text(&rule.idle_timeout),
                        hedge: rule.hedge.as_ref().map(|h| match h.after.as_str() {
                            "p95" => RawHedge::P95,
                            t => RawHedge::After(RawDuration::Text(t)),
                        }),
                        hash_on: rule.hash_on.as_ref().map(|h| (h.header.as_deref(), h.cookie.as_deref())),
                    }
                })
                .collect();
            let raw = RawRoute { service: &r.service, tenant: r.tenant.as_deref(), rules };
            let route = route(&raw, &mut p);
            p.finish(route.map(Policy::Route))
        }
        Resource::Resilience(r) => {
            let raw = RawResilience {
                service: &r.service,
                circuit_breaker: r
                    .circuit_breaker
                    .as_ref()
                    .map(|c| (c.consecutive_failures, RawDuration::Text(&c.base_ejection), c.max_ejection_percent)),
                max_concurrent_requests: r.max_concurrent_requests,
                retry_budget: r.retry_budget.as_ref().map(|b| (b.ratio, b.min_per_second)),
                latency_outlier: r.latency_outlier.as_ref().map(|o| (o.multiple, RawDuration::Text(&o.window))),
            };
            let res = resilience(&raw, &mut p);
            p.finish(res.map(Policy::Resilience))
        }
        Resource::TenantPolicy(t) => {
            let raw = RawTenantPolicy {
                tenant: &t.tenant,
                service: &t.service,
                rate_limit: t.rate_limit.as_ref().map(|r| (r.requests_per_second, r.burst)),
                max_concurrent_requests: t.max_concurrent_requests,
                tokens_per_minute: t.tokens_per_minute,
                callers: t.callers.iter().map(|(k, v)| (k.as_str(), v.tokens_per_minute)).collect(),
                session: t.session.as_ref().map(|s| (s.header.as_str(), s.tokens_per_minute)),
            };
            let tp = tenant_policy(&raw, &mut p);
            p.finish(tp.map(Policy::TenantPolicy))
        }
        Resource::AuthorizationPolicy(a) => {
            let raw = RawAuthorization {
                service: &a.service,
                default: a.default.as_deref(),
                rules: a
                    .rules
                    .iter()
                    .map(|r| RawAuthorizationRule::of(&r.from, &r.paths, &r.methods, &r.tenants))
                    .collect(),
                tenant_header_from: strs(&a.tenant_header_from),
            };
            let az = authorization(&raw, &mut p);
            p.finish(az.map(Policy::AuthorizationPolicy))
        }
    }
}
