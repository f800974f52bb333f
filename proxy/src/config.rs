//! The sidecar's live configuration: an immutable [`Table`] of services,
//! built from `weft.v1` updates off the request path and swapped in whole.
//!
//! Conversion from the wire is per resource: a route that fails to convert is
//! reported (NACK) and the previous version of that route stays in force,
//! while the rest of the update applies.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hashbrown::HashMap;
use http::{HeaderName, HeaderValue, Method, StatusCode};
use xds_proto::v1 as pb;

use crate::resilience::{Health, ServiceStats, Settings};

#[derive(Debug, thiserror::Error)]
#[error("{resource}: {message}")]
pub struct InvalidPolicy {
    pub resource: String,
    pub message: String,
}

/// Everything the sidecar knows, at one version.
#[derive(Debug, Default)]
pub struct Table {
    /// The version (etcd revision) of the last update applied.
    pub version: u64,
    pub services: HashMap<String, Arc<Service>>,
}

#[derive(Debug)]
pub struct Service {
    pub name: String,
    /// False when the control plane knows nothing of this service.
    pub known: bool,
    /// The route for every tenant without a route of its own.
    pub default_route: Option<Arc<Route>>,
    pub tenant_routes: HashMap<String, Arc<Route>>,
    pub endpoints: Vec<Arc<Endpoint>>,
    /// All ready endpoints, for requests no route rule covers.
    pub all_ready: Arc<Vec<Arc<Endpoint>>>,
    pub settings: Settings,
    /// Per-tenant limits (global figures) and this instance's counters,
    /// enforced by the inbound sidecar of this service.
    pub tenants: HashMap<String, (crate::tenancy::Limits, Arc<crate::tenancy::State>)>,
    /// Counters shared across config versions of this service.
    pub stats: Arc<ServiceStats>,
    /// The wire form this was built from, for `/config` and to rebuild.
    pub source: pb::ServiceConfig,
}

#[derive(Debug)]
pub struct Route {
    pub tenant: Option<String>,
    pub revision: u64,
    pub rules: Vec<Rule>,
}

#[derive(Debug)]
pub struct Rule {
    pub path_prefix: Option<String>,
    pub method: Option<Method>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub backends: Vec<Backend>,
    pub timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    pub fallback: Option<Fallback>,
    pub fault: Option<Fault>,
}

/// Faults injected on each try of matching requests.
#[derive(Debug, Clone)]
pub struct Fault {
    /// Only requests carrying this header are affected.
    pub header: Option<HeaderName>,
    /// (probability 0..=1, delay)
    pub delay: Option<(f64, Duration)>,
    /// (probability 0..=1, HTTP status, gRPC status for gRPC callers)
    pub abort: Option<(f64, StatusCode, Option<u16>)>,
}

impl Fault {
    pub fn applies<B>(&self, req: &http::Request<B>) -> bool {
        self.header.as_ref().is_none_or(|h| req.headers().contains_key(h))
    }
}

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
}

/// Which outcomes are retried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// Any 5xx, and a per-try timeout.
    pub server_error: bool,
    /// 502, 503, 504.
    pub gateway_error: bool,
    pub connect_failure: bool,
    pub reset: bool,
    /// gRPC UNAVAILABLE.
    pub unavailable: bool,
}

impl RetryOn {
    fn parse(conds: &[String]) -> Result<RetryOn, String> {
        let mut on = RetryOn::default();
        if conds.is_empty() {
            return Ok(RetryOn { gateway_error: true, connect_failure: true, reset: true, unavailable: true, ..on });
        }
        for c in conds {
            match c.as_str() {
                "5xx" => on.server_error = true,
                "gateway-error" => on.gateway_error = true,
                "connect-failure" => on.connect_failure = true,
                "reset" => on.reset = true,
                "unavailable" => on.unavailable = true,
                // Known to the control plane, not retried by this sidecar.
                "cancelled" | "deadline-exceeded" | "resource-exhausted" => {}
                other => return Err(format!("unknown retry condition '{other}'")),
            }
        }
        Ok(on)
    }
}

#[derive(Debug, Clone)]
pub enum Fallback {
    /// Send the request to another service.
    Service(String),
    /// Answer with a fixed response.
    Static { status: StatusCode, body: Bytes },
}

#[derive(Debug)]
pub struct Backend {
    pub subset: BTreeMap<String, String>,
    pub weight: u32,
    /// Ready endpoints whose labels match the subset, resolved at build time.
    pub endpoints: Vec<Arc<Endpoint>>,
}

#[derive(Debug)]
pub struct Endpoint {
    pub proxy_id: String,
    pub addr: SocketAddr,
    pub labels: BTreeMap<String, String>,
    pub ready: bool,
    /// Shared across config versions for the same address.
    pub health: Arc<Health>,
}

impl Rule {
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
}

impl Service {
    /// The route that applies to `tenant`.
    pub fn route_for(&self, tenant: &str) -> Option<&Arc<Route>> {
        self.tenant_routes.get(tenant).or(self.default_route.as_ref())
    }
}

fn route_name(service: &str, tenant: &str) -> String {
    if tenant.is_empty() { format!("route/{service}") } else { format!("route/{service}/{tenant}") }
}

/// Converts one wire route; `endpoints` are the service's ready endpoints.
fn convert_route(service: &str, r: &pb::Route, endpoints: &[Arc<Endpoint>]) -> Result<Route, InvalidPolicy> {
    let bad = |message: String| InvalidPolicy { resource: route_name(service, &r.tenant), message };
    if r.service != service {
        return Err(bad(format!("route names service '{}' inside service '{service}'", r.service)));
    }
    if r.rules.is_empty() {
        return Err(bad("a route needs at least one rule".into()));
    }
    let mut rules = Vec::with_capacity(r.rules.len());
    for (i, rule) in r.rules.iter().enumerate() {
        let m = rule.r#match.clone().unwrap_or_default();
        let method = if m.method.is_empty() {
            None
        } else {
            Some(
                Method::from_bytes(m.method.as_bytes())
                    .map_err(|_| bad(format!("rules[{i}].match.method: '{}' is not a method", m.method)))?,
            )
        };
        let path_prefix = if m.path_prefix.is_empty() {
            None
        } else if !m.path_prefix.starts_with('/') {
            return Err(bad(format!("rules[{i}].match.path_prefix: '{}' must start with '/'", m.path_prefix)));
        } else {
            Some(m.path_prefix.clone())
        };
        let mut headers = Vec::new();
        for (k, v) in &m.headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| bad(format!("rules[{i}].match.headers: '{k}' is not a header name")))?;
            let value =
                HeaderValue::from_str(v).map_err(|_| bad(format!("rules[{i}].match.headers.{k}: invalid value")))?;
            headers.push((name, value));
        }
        if rule.backends.is_empty() {
            return Err(bad(format!("rules[{i}].backends: a rule needs at least one backend")));
        }
        if rule.backends.iter().map(|b| u64::from(b.weight)).sum::<u64>() == 0 {
            return Err(bad(format!("rules[{i}].backends: weights sum to 0: no backend would get traffic")));
        }
        let backends = rule
            .backends
            .iter()
            .map(|b| {
                let subset: BTreeMap<String, String> = b.subset.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                let endpoints = endpoints
                    .iter()
                    .filter(|e| subset.iter().all(|(k, v)| e.labels.get(k) == Some(v)))
                    .cloned()
                    .collect();
                Backend { subset, weight: b.weight, endpoints }
            })
            .collect();
        let retry = match &rule.retry {
            Some(r) if r.attempts > 0 => Some(RetryPolicy {
                attempts: r.attempts.min(10),
                per_try_timeout: (r.per_try_timeout_ms > 0).then(|| Duration::from_millis(r.per_try_timeout_ms)),
                on: RetryOn::parse(&r.on).map_err(|e| bad(format!("rules[{i}].retry.on: {e}")))?,
            }),
            _ => None,
        };
        let fallback = match &rule.fallback {
            None => None,
            Some(f) if !f.service.is_empty() => {
                if f.service == service {
                    return Err(bad(format!("rules[{i}].fallback.service: a service cannot fall back to itself")));
                }
                Some(Fallback::Service(f.service.clone()))
            }
            Some(f) => {
                let status = u16::try_from(f.status)
                    .ok()
                    .and_then(|s| StatusCode::from_u16(s).ok())
                    .ok_or_else(|| bad(format!("rules[{i}].fallback.status: {} is not an HTTP status", f.status)))?;
                Some(Fallback::Static { status, body: Bytes::from(f.body.clone()) })
            }
        };
        let fault = match &rule.fault {
            None => None,
            Some(f) => {
                let header =
                    if f.header.is_empty() {
                        None
                    } else {
                        Some(HeaderName::from_bytes(f.header.as_bytes()).map_err(|_| {
                            bad(format!("rules[{i}].fault.header: '{}' is not a header name", f.header))
                        })?)
                    };
                let pct = |v: f64, what: &str| {
                    if (0.0..=100.0).contains(&v) {
                        Ok(v / 100.0)
                    } else {
                        Err(bad(format!("rules[{i}].fault.{what}.percent: {v} is not 0-100")))
                    }
                };
                let delay = if f.delay_ms > 0 {
                    Some((pct(f.delay_percent, "delay")?, Duration::from_millis(f.delay_ms)))
                } else {
                    None
                };
                let abort = if f.abort_status > 0 || f.abort_grpc_status > 0 {
                    let status = if f.abort_status > 0 {
                        u16::try_from(f.abort_status).ok().and_then(|s| StatusCode::from_u16(s).ok()).ok_or_else(
                            || bad(format!("rules[{i}].fault.abort.status: {} is not an HTTP status", f.abort_status)),
                        )?
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    let grpc = (f.abort_grpc_status > 0).then_some(f.abort_grpc_status.min(16) as u16);
                    Some((pct(f.abort_percent, "abort")?, status, grpc))
                } else {
                    None
                };
                Some(Fault { header, delay, abort })
            }
        };
        rules.push(Rule {
            fault,
            path_prefix,
            method,
            headers,
            backends,
            timeout: (rule.timeout_ms > 0).then(|| Duration::from_millis(rule.timeout_ms)),
            retry,
            fallback,
        });
    }
    Ok(Route { tenant: (!r.tenant.is_empty()).then(|| r.tenant.clone()), revision: r.revision, rules })
}

/// Builds a service from its wire config. `previous` supplies last good
/// routes (kept when the new one is invalid) and endpoint stats (kept across
/// versions). Returns the service and the problems found.
pub fn build_service(cfg: &pb::ServiceConfig, previous: Option<&Service>) -> (Service, Vec<InvalidPolicy>) {
    let mut problems = Vec::new();
    let old_health: HashMap<SocketAddr, Arc<Health>> =
        previous.map(|p| p.endpoints.iter().map(|e| (e.addr, e.health.clone())).collect()).unwrap_or_default();
    let mut endpoints = Vec::with_capacity(cfg.endpoints.len());
    for e in &cfg.endpoints {
        match e.address.parse::<SocketAddr>() {
            Ok(addr) => endpoints.push(Arc::new(Endpoint {
                proxy_id: e.proxy_id.clone(),
                addr,
                labels: e.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                ready: e.ready,
                health: old_health.get(&addr).cloned().unwrap_or_default(),
            })),
            Err(_) => problems.push(InvalidPolicy {
                resource: format!("endpoint/{}/{}", cfg.name, e.proxy_id),
                message: format!("address '{}' is not host:port", e.address),
            }),
        }
    }
    let ready: Vec<Arc<Endpoint>> = endpoints.iter().filter(|e| e.ready).cloned().collect();
    let mut default_route = None;
    let mut tenant_routes = HashMap::new();
    for r in &cfg.routes {
        let route = match convert_route(&cfg.name, r, &ready) {
            Ok(route) => Some(Arc::new(route)),
            Err(e) => {
                problems.push(e);
                // Keep the last good version of this very route, rebuilt
                // against the new endpoints.
                previous
                    .and_then(|p| p.source.routes.iter().find(|o| o.tenant == r.tenant))
                    .and_then(|old| convert_route(&cfg.name, old, &ready).ok())
                    .map(Arc::new)
            }
        };
        if let Some(route) = route {
            if r.tenant.is_empty() {
                default_route = Some(route);
            } else {
                tenant_routes.insert(r.tenant.clone(), route);
            }
        }
    }
    // Record, as the source, what is actually in force, so a later rebuild
    // keeps the last good route rather than the rejected one.
    let mut source = cfg.clone();
    if !problems.is_empty() {
        source.routes = cfg
            .routes
            .iter()
            .filter_map(|r| {
                let rejected = problems.iter().any(|p| p.resource == route_name(&cfg.name, &r.tenant));
                if rejected {
                    previous.and_then(|p| p.source.routes.iter().find(|o| o.tenant == r.tenant)).cloned()
                } else {
                    Some(r.clone())
                }
            })
            .collect();
    }
    let service = Service {
        name: cfg.name.clone(),
        known: cfg.known,
        default_route,
        tenant_routes,
        endpoints,
        all_ready: Arc::new(ready),
        settings: cfg.resilience.as_ref().map(Settings::from).unwrap_or_default(),
        tenants: cfg
            .tenant_policies
            .iter()
            .map(|p| {
                let state =
                    previous.and_then(|s| s.tenants.get(&p.tenant)).map(|(_, st)| st.clone()).unwrap_or_default();
                (p.tenant.clone(), (crate::tenancy::Limits::from(p), state))
            })
            .collect(),
        stats: previous.map(|p| p.stats.clone()).unwrap_or_default(),
        source,
    };
    (service, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(weight_v1: u32, weight_v2: u32) -> pb::ServiceConfig {
        let ep = |id: &str, port: u16, v: &str| pb::Endpoint {
            proxy_id: id.into(),
            address: format!("127.0.0.1:{port}"),
            labels: [("version".to_string(), v.to_string())].into_iter().collect(),
            ready: true,
        };
        let backend = |v: &str, w: u32| pb::WeightedBackend {
            subset: [("version".to_string(), v.to_string())].into_iter().collect(),
            weight: w,
        };
        pb::ServiceConfig {
            name: "inference".into(),
            known: true,
            routes: vec![pb::Route {
                service: "inference".into(),
                tenant: String::new(),
                rules: vec![pb::RouteRule {
                    backends: vec![backend("v1", weight_v1), backend("v2", weight_v2)],
                    ..Default::default()
                }],
                revision: 7,
            }],
            endpoints: vec![ep("a", 1, "v1"), ep("b", 2, "v2")],
            ..Default::default()
        }
    }

    #[test]
    fn subsets_resolve_to_endpoints() {
        let (s, problems) = build_service(&cfg(90, 10), None);
        assert!(problems.is_empty());
        let rule = &s.default_route.as_ref().unwrap().rules[0];
        assert_eq!(rule.backends[0].endpoints[0].addr.port(), 1);
        assert_eq!(rule.backends[1].endpoints[0].addr.port(), 2);
    }

    #[test]
    fn bad_route_keeps_last_good() {
        let (good, _) = build_service(&cfg(90, 10), None);
        let mut bad_cfg = cfg(0, 0);
        bad_cfg.routes[0].revision = 8;
        let (s, problems) = build_service(&bad_cfg, Some(&good));
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].resource, "route/inference");
        assert_eq!(s.default_route.as_ref().unwrap().revision, 7);
        // A later rebuild (e.g. an endpoint change) still has the good route.
        let (again, _) = build_service(&s.source, Some(&s));
        assert_eq!(again.default_route.as_ref().unwrap().revision, 7);
    }

    #[test]
    fn endpoint_stats_survive_rebuilds() {
        let (a, _) = build_service(&cfg(1, 1), None);
        let (b, _) = build_service(&cfg(2, 1), Some(&a));
        assert!(Arc::ptr_eq(&a.endpoints[0].health, &b.endpoints[0].health));
        assert!(Arc::ptr_eq(&a.stats, &b.stats));
    }
}
