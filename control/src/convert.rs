//! Domain policy → `weft.v1` wire types, at the edge of the discovery server.

use xds_proto::v1 as pb;

use crate::policy::{self, parse_duration};
use crate::store::EndpointRecord;

fn millis(field: &str, d: &Option<String>) -> Result<u64, String> {
    match d {
        None => Ok(0),
        Some(s) => parse_duration(s).map(|d| d.as_millis() as u64).map_err(|e| format!("{field}: {e}")),
    }
}

pub fn route(r: &policy::Route, revision: u64) -> Result<pb::Route, String> {
    let mut rules = Vec::with_capacity(r.rules.len());
    for (i, rule) in r.rules.iter().enumerate() {
        let m = rule.matches.clone().unwrap_or_default();
        rules.push(pb::RouteRule {
            r#match: Some(pb::RouteMatch {
                path_prefix: m.path_prefix.unwrap_or_default(),
                method: m.method.unwrap_or_default(),
                headers: m.headers.into_iter().collect(),
            }),
            backends: rule
                .backends
                .iter()
                .map(|b| pb::WeightedBackend { subset: b.subset.clone().into_iter().collect(), weight: b.weight })
                .collect(),
            timeout_ms: millis(&format!("rules[{i}].timeout"), &rule.timeout)?,
            retry: match &rule.retry {
                Some(rt) => Some(pb::RetryPolicy {
                    attempts: rt.attempts,
                    per_try_timeout_ms: millis(&format!("rules[{i}].retry.per_try_timeout"), &rt.per_try_timeout)?,
                    on: rt.on.clone(),
                }),
                None => None,
            },
            fault: match &rule.fault {
                Some(f) => Some(pb::Fault {
                    header: f.header.clone().unwrap_or_default(),
                    delay_percent: f.delay.as_ref().map(|d| d.percent).unwrap_or(0.0),
                    delay_ms: millis(
                        &format!("rules[{i}].fault.delay.duration"),
                        &f.delay.as_ref().map(|d| d.duration.clone()),
                    )?,
                    abort_percent: f.abort.as_ref().map(|a| a.percent).unwrap_or(0.0),
                    abort_status: f.abort.as_ref().and_then(|a| a.status).map(u32::from).unwrap_or(0),
                    abort_grpc_status: f.abort.as_ref().and_then(|a| a.grpc_status).map(u32::from).unwrap_or(0),
                }),
                None => None,
            },
            fallback: rule.fallback.as_ref().map(|f| pb::Fallback {
                service: f.service.clone().unwrap_or_default(),
                status: f.status.map(u32::from).unwrap_or(0),
                body: f.body.clone().unwrap_or_default(),
            }),
        });
    }
    Ok(pb::Route { service: r.service.clone(), tenant: r.tenant.clone().unwrap_or_default(), rules, revision })
}

pub fn resilience(r: &policy::Resilience, revision: u64) -> Result<pb::Resilience, String> {
    let cb = r.circuit_breaker.as_ref();
    Ok(pb::Resilience {
        service: r.service.clone(),
        consecutive_failures: cb.map(|c| c.consecutive_failures).unwrap_or(0),
        base_ejection_ms: millis("circuit_breaker.base_ejection", &cb.map(|c| c.base_ejection.clone()))?,
        max_ejection_percent: cb.map(|c| c.max_ejection_percent).unwrap_or(0),
        max_concurrent_requests: r.max_concurrent_requests.unwrap_or(0),
        retry_budget_ratio: r.retry_budget.as_ref().map(|b| b.ratio).unwrap_or(0.0),
        retry_budget_min_per_second: r.retry_budget.as_ref().map(|b| b.min_per_second).unwrap_or(0),
        revision,
    })
}

pub fn tenant_policy(t: &policy::TenantPolicy, revision: u64) -> pb::TenantPolicy {
    pb::TenantPolicy {
        tenant: t.tenant.clone(),
        service: t.service.clone(),
        requests_per_second: t.rate_limit.as_ref().map(|r| r.requests_per_second).unwrap_or(0.0),
        burst: t.rate_limit.as_ref().map(|r| r.burst).unwrap_or(0),
        max_concurrent_requests: t.max_concurrent_requests.unwrap_or(0),
        revision,
        tokens_per_minute: t.tokens_per_minute.unwrap_or(0),
    }
}

pub fn endpoint(e: &EndpointRecord) -> pb::Endpoint {
    pb::Endpoint {
        proxy_id: e.proxy_id.clone(),
        address: e.address.clone(),
        labels: e.labels.clone().into_iter().collect(),
        ready: e.ready,
    }
}
