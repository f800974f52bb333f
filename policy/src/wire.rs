//! The model on the wire (`weft.v1`): what the control plane pushes, and
//! what a sidecar accepts. A sidecar converts each pushed resource with
//! `TryFrom`, under the same rules as `weftctl validate` ([`crate::check`]),
//! and NACKs the resource that fails, naming it and its fields.

use std::collections::BTreeMap;

use xds_proto::v1 as pb;

use crate::InvalidPolicy;
use crate::check::{
    self, Problems, RawAuthorization, RawAuthorizationRule, RawDuration, RawFallback, RawFault, RawHedge,
    RawResilience, RawRetry, RawRoute, RawRule, RawTenantPolicy, strs,
};
use crate::model::*;

fn millis(ms: u64) -> Option<RawDuration<'static>> {
    (ms > 0).then_some(RawDuration::Millis(ms))
}

fn nonempty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

fn route_name(r: &pb::Route) -> String {
    match r.tenant.as_str() {
        "" => format!("route/{}", r.service),
        t => format!("route/{}/{t}", r.service),
    }
}

impl TryFrom<&pb::Route> for Route {
    type Error = InvalidPolicy;

    fn try_from(r: &pb::Route) -> Result<Route, InvalidPolicy> {
        let rules = r
            .rules
            .iter()
            .map(|rule| {
                let m = rule.r#match.as_ref();
                let mut headers: Vec<(&str, &str)> =
                    m.map(|m| m.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()).unwrap_or_default();
                headers.sort();
                RawRule {
                    path_prefix: m.and_then(|m| nonempty(&m.path_prefix)),
                    method: m.and_then(|m| nonempty(&m.method)),
                    headers,
                    backends: rule
                        .backends
                        .iter()
                        .map(|b| {
                            (
                                b.subset.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect::<BTreeMap<_, _>>(),
                                b.weight,
                            )
                        })
                        .collect(),
                    timeout: millis(rule.timeout_ms),
                    retry: rule.retry.as_ref().map(|rt| RawRetry {
                        attempts: rt.attempts,
                        per_try_timeout: millis(rt.per_try_timeout_ms),
                        on: rt.on.iter().map(String::as_str).collect(),
                    }),
                    fallback: rule.fallback.as_ref().map(|f| RawFallback {
                        service: nonempty(&f.service),
                        status: (f.status > 0).then_some(f.status),
                        body: nonempty(&f.body),
                    }),
                    fault: rule.fault.as_ref().map(|f| RawFault {
                        header: nonempty(&f.header),
                        delay: millis(f.delay_ms).map(|d| (f.delay_percent, d)),
                        abort: (f.abort_status > 0 || f.abort_grpc_status > 0).then_some((
                            f.abort_percent,
                            (f.abort_status > 0).then_some(f.abort_status),
                            (f.abort_grpc_status > 0).then_some(f.abort_grpc_status),
                        )),
                    }),
                    first_byte_timeout: millis(rule.first_byte_timeout_ms),
                    idle_timeout: millis(rule.idle_timeout_ms),
                    hedge: rule.hedge.as_ref().map(|h| {
                        if h.after_p95 { RawHedge::P95 } else { RawHedge::After(RawDuration::Millis(h.after_ms)) }
                    }),
                    hash_on: rule.hash_on.as_ref().map(|h| (nonempty(&h.header), nonempty(&h.cookie))),
                }
            })
            .collect();
        let raw = RawRoute { service: &r.service, tenant: nonempty(&r.tenant), rules };
        let mut p = Problems::default();
        let route = check::route(&raw, &mut p);
        p.finish(route).map_err(|errors| InvalidPolicy { resource: route_name(r), errors })
    }
}

impl TryFrom<&pb::Resilience> for Resilience {
    type Error = InvalidPolicy;

    fn try_from(r: &pb::Resilience) -> Result<Resilience, InvalidPolicy> {
        let raw = RawResilience {
            service: &r.service,
            circuit_breaker: r.consecutive_failures.map(|n| {
                (n, RawDuration::Millis(r.base_ejection_ms.unwrap_or(0)), r.max_ejection_percent.unwrap_or(0))
            }),
            max_concurrent_requests: r.max_concurrent_requests,
            retry_budget: r.retry_budget_ratio.map(|ratio| (ratio, r.retry_budget_min_per_second.unwrap_or(0))),
            latency_outlier: r
                .latency_outlier_multiple
                .map(|m| (m, RawDuration::Millis(r.latency_outlier_window_ms.unwrap_or(0)))),
        };
        let mut p = Problems::default();
        let res = check::resilience(&raw, &mut p);
        p.finish(res).map_err(|errors| InvalidPolicy { resource: format!("resilience/{}", r.service), errors })
    }
}

impl TryFrom<&pb::TenantPolicy> for TenantPolicy {
    type Error = InvalidPolicy;

    fn try_from(t: &pb::TenantPolicy) -> Result<TenantPolicy, InvalidPolicy> {
        let raw = RawTenantPolicy {
            tenant: &t.tenant,
            service: &t.service,
            rate_limit: (t.requests_per_second != 0.0).then_some((t.requests_per_second, t.burst)),
            max_concurrent_requests: (t.max_concurrent_requests > 0).then_some(t.max_concurrent_requests),
            tokens_per_minute: (t.tokens_per_minute > 0).then_some(t.tokens_per_minute),
            callers: t.caller_tokens_per_minute.iter().map(|(k, v)| (k.as_str(), *v)).collect(),
            session: nonempty(&t.session_header).map(|h| (h, t.session_tokens_per_minute)),
        };
        let mut p = Problems::default();
        let tp = check::tenant_policy(&raw, &mut p);
        p.finish(tp)
            .map_err(|errors| InvalidPolicy { resource: format!("tenantpolicy/{}/{}", t.tenant, t.service), errors })
    }
}

impl TryFrom<&pb::AuthorizationPolicy> for AuthorizationPolicy {
    type Error = InvalidPolicy;

    fn try_from(a: &pb::AuthorizationPolicy) -> Result<AuthorizationPolicy, InvalidPolicy> {
        let raw = RawAuthorization {
            service: &a.service,
            // The wire always says which.
            default: Some(&a.default_action),
            rules: a
                .rules
                .iter()
                .map(|r| RawAuthorizationRule::of(&r.from, &r.paths, &r.methods, &r.tenants))
                .collect(),
            tenant_header_from: strs(&a.tenant_header_from),
        };
        let mut p = Problems::default();
        let az = check::authorization(&raw, &mut p);
        p.finish(az).map_err(|errors| InvalidPolicy { resource: format!("authorizationpolicy/{}", a.service), errors })
    }
}

fn ms(d: std::time::Duration) -> u64 {
    d.as_millis() as u64
}

/// A route as the control plane pushes it; `revision` is its etcd mod
/// revision.
pub fn route(r: &Route, revision: u64) -> pb::Route {
    pb::Route {
        service: r.service.clone(),
        tenant: r.tenant.clone().unwrap_or_default(),
        rules: r.rules.iter().map(rule).collect(),
        revision,
    }
}

fn rule(r: &Rule) -> pb::RouteRule {
    pb::RouteRule {
        r#match: Some(pb::RouteMatch {
            path_prefix: r.matches.path_prefix.clone().unwrap_or_default(),
            method: r.matches.method.as_ref().map(|m| m.to_string()).unwrap_or_default(),
            headers: r
                .matches
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
                .collect(),
        }),
        backends: r
            .backends
            .iter()
            .map(|b| pb::WeightedBackend { subset: b.subset.clone().into_iter().collect(), weight: b.weight })
            .collect(),
        timeout_ms: r.timeout.map(ms).unwrap_or(0),
        retry: r.retry.as_ref().map(|rt| pb::RetryPolicy {
            attempts: rt.attempts.get(),
            per_try_timeout_ms: rt.per_try_timeout.map(ms).unwrap_or(0),
            on: rt.on.iter().map(|c| c.as_str().to_string()).collect(),
        }),
        fallback: r.fallback.as_ref().map(|f| match f {
            Fallback::Service(s) => pb::Fallback { service: s.clone(), ..Default::default() },
            Fallback::Static { status, body } => pb::Fallback {
                service: String::new(),
                status: u32::from(status.as_u16()),
                body: String::from_utf8_lossy(body).into_owned(),
            },
        }),
        fault: r.fault.as_ref().map(|f| pb::Fault {
            header: f.header.as_ref().map(|h| h.to_string()).unwrap_or_default(),
            delay_percent: f.delay.as_ref().map(|d| d.percent).unwrap_or(0.0),
            delay_ms: f.delay.as_ref().map(|d| ms(d.duration)).unwrap_or(0),
            abort_percent: f.abort.as_ref().map(|a| a.percent).unwrap_or(0.0),
            abort_status: f.abort.as_ref().map(|a| u32::from(a.status.as_u16())).unwrap_or(0),
            abort_grpc_status: f.abort.as_ref().and_then(|a| a.grpc_status).map(u32::from).unwrap_or(0),
        }),
        first_byte_timeout_ms: r.first_byte_timeout.map(ms).unwrap_or(0),
        idle_timeout_ms: r.idle_timeout.map(ms).unwrap_or(0),
        hedge: r.hedge.map(|h| match h {
            Hedge::After(d) => pb::Hedge { after_ms: ms(d), after_p95: false },
            Hedge::P95 => pb::Hedge { after_ms: 0, after_p95: true },
        }),
        hash_on: r.hash_on.as_ref().map(|h| match h {
            HashOn::Header(n) => pb::HashOn { header: n.to_string(), cookie: String::new() },
            HashOn::Cookie(c) => pb::HashOn { header: String::new(), cookie: c.clone() },
        }),
    }
}

pub fn resilience(r: &Resilience, revision: u64) -> pb::Resilience {
    let cb = r.circuit_breaker.as_ref();
    pb::Resilience {
        service: r.service.clone(),
        consecutive_failures: cb.map(|c| c.consecutive_failures.get()),
        base_ejection_ms: cb.map(|c| ms(c.base_ejection)),
        max_ejection_percent: cb.map(|c| u32::from(c.max_ejection_percent)),
        max_concurrent_requests: r.max_concurrent_requests.map(|n| n.get()),
        retry_budget_ratio: r.retry_budget.as_ref().map(|b| b.ratio),
        retry_budget_min_per_second: r.retry_budget.as_ref().map(|b| b.min_per_second),
        revision,
        latency_outlier_multiple: r.latency_outlier.as_ref().map(|o| o.multiple),
        latency_outlier_window_ms: r.latency_outlier.as_ref().map(|o| ms(o.window)),
    }
}

pub fn tenant_policy(t: &TenantPolicy, revision: u64) -> pb::TenantPolicy {
    pb::TenantPolicy {
        tenant: t.tenant.clone(),
        service: t.service.as_str().to_string(),
        requests_per_second: t.rate_limit.as_ref().map(|r| r.requests_per_second).unwrap_or(0.0),
        burst: t.rate_limit.as_ref().map(|r| r.burst).unwrap_or(0),
        max_concurrent_requests: t.max_concurrent_requests.map(|n| n.get()).unwrap_or(0),
        revision,
        tokens_per_minute: t.tokens_per_minute.map(|n| n.get()).unwrap_or(0),
        caller_tokens_per_minute: t.callers.iter().map(|(k, v)| (k.clone(), v.get())).collect(),
        session_header: t.session.as_ref().map(|s| s.header.to_string()).unwrap_or_default(),
        session_tokens_per_minute: t.session.as_ref().map(|s| s.tokens_per_minute.get()).unwrap_or(0),
    }
}

pub fn authorization(a: &AuthorizationPolicy, revision: u64) -> pb::AuthorizationPolicy {
    pb::AuthorizationPolicy {
        service: a.service.clone(),
        default_action: a.default.as_str().to_string(),
        rules: a
            .rules
            .iter()
            .map(|r| pb::AuthorizationRule {
                from: match &r.from {
                    Callers::Any => vec!["*".to_string()],
                    Callers::Services(s) => s.clone(),
                },
                paths: r.paths.clone(),
                methods: r.methods.iter().map(|m| m.to_string()).collect(),
                tenants: r.tenants.clone(),
            })
            .collect(),
        tenant_header_from: a.tenant_header_from.clone(),
        revision,
    }
}
