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

use hashbrown::HashMap;
use weft_policy::model;
use xds_proto::v1 as pb;

use crate::health::breaker::{self, Admission};
use crate::health::{Health, ServiceStats, Settings};
use crate::transport::pool::Peer;

#[derive(Debug, thiserror::Error)]
#[error("{resource}: {message}")]
pub(crate) struct InvalidPolicy {
    pub(crate) resource: String,
    pub(crate) message: String,
}

impl From<weft_policy::InvalidPolicy> for InvalidPolicy {
    fn from(e: weft_policy::InvalidPolicy) -> InvalidPolicy {
        let message = e.errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
        InvalidPolicy { resource: e.resource, message }
    }
}

/// Everything the sidecar knows, at one version.
#[derive(Debug, Default)]
pub(crate) struct Table {
    /// The version (etcd revision) of the last update applied.
    pub(crate) version: u64,
    pub(crate) services: HashMap<String, Arc<Service>>,
}

#[derive(Debug)]
pub(crate) struct Service {
    pub(crate) name: String,
    /// False when the control plane knows nothing of this service.
    pub(crate) known: bool,
    /// The route for every tenant without a route of its own.
    pub(crate) default_route: Option<Arc<Route>>,
    pub(crate) tenant_routes: HashMap<String, Arc<Route>>,
    pub(crate) endpoints: Vec<Arc<Endpoint>>,
    /// All ready endpoints, for requests no route rule covers.
    pub(crate) all_ready: Arc<Vec<Arc<Endpoint>>>,
    /// Some endpoint is held (see [`Endpoint::held_until_ms`]): calls keep
    /// their request head for a second try.
    pub(crate) holds: bool,
    pub(crate) settings: Settings,
    /// Per-tenant limits (global figures) and this instance's counters,
    /// enforced by the inbound sidecar of this service.
    pub(crate) tenants: HashMap<String, (crate::tenancy::Limits, Arc<crate::tenancy::State>)>,
    /// Who may call this service (enforced inbound, by its own sidecars).
    pub(crate) authorization: Option<Arc<model::AuthorizationPolicy>>,
    /// Counters shared across config versions of this service.
    pub(crate) stats: Arc<ServiceStats>,
    /// The wire form this was built from, for `/config` and to rebuild.
    pub(crate) source: pb::ServiceConfig,
}

#[derive(Debug)]
pub(crate) struct Route {
    pub(crate) rules: Vec<Rule>,
}

/// A route rule as the sidecar uses it: the policy's rule, with each
/// backend's endpoints resolved.
#[derive(Debug)]
pub(crate) struct Rule {
    pub(crate) matches: model::Match,
    pub(crate) backends: Vec<Backend>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) retry: Option<model::Retry>,
    pub(crate) fallback: Option<model::Fallback>,
    pub(crate) fault: Option<model::Fault>,
    pub(crate) first_byte_timeout: Option<Duration>,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) hedge: Option<model::Hedge>,
    pub(crate) hash_on: Option<model::HashOn>,
}

#[derive(Debug)]
pub(crate) struct Backend {
    pub(crate) weight: u32,
    /// Ready endpoints whose labels match the subset, resolved at build time.
    pub(crate) endpoints: Vec<Arc<Endpoint>>,
}

#[derive(Debug)]
pub(crate) struct Endpoint {
    pub(crate) proxy_id: String,
    pub(crate) addr: SocketAddr,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) ready: bool,
    /// Its sidecar speaks mTLS: dialled over it, as the service.
    pub(crate) mtls: bool,
    /// Shared across config versions for the same address.
    pub(crate) health: Arc<Health>,
    /// Non-zero for an endpoint the control plane stopped listing without
    /// saying it departed: it is kept (and used) until this time
    /// ([`crate::clock::now_ms`] clock) unless it comes back first.
    pub(crate) held_until_ms: u64,
}

impl Endpoint {
    pub(crate) fn is_held(&self) -> bool {
        self.held_until_ms != 0
    }

    /// Where a try to this endpoint of `service` goes.
    pub(crate) fn peer<'a>(&self, service: &'a str) -> Peer<'a> {
        Peer { addr: self.addr, mtls: self.mtls.then_some(service) }
    }
}

/// The breaker's verdict on a gRPC call whose status comes in trailers,
/// given by the response body when they pass. Not given when the caller
/// goes away first or the body ends without trailers.
pub(crate) struct Verdict {
    pub(crate) svc: Arc<Service>,
    pub(crate) endpoint: Arc<Endpoint>,
    pub(crate) admission: Admission,
}

impl Verdict {
    /// `failed`: UNAVAILABLE, or the stream broke.
    pub(crate) fn give(self, failed: bool) {
        if failed {
            self.svc.endpoint_failed(&self.endpoint, self.admission, crate::clock::now_ms());
        } else {
            self.endpoint.health.breaker.record_success(self.admission);
        }
    }
}

/// What building a service needs beyond its config: the clock and how long
/// to hold endpoints that vanish without departing.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BuildContext {
    /// Now ([`crate::clock::now_ms`] clock).
    pub(crate) now_ms: u64,
    /// How long a vanished endpoint is held.
    pub(crate) hold_ms: u64,
    /// Held endpoints are kept at least until this time: the start of the
    /// current discovery stream plus the hold, since a control plane that was
    /// just reached (restarted, or another replica) may not have every
    /// instance registered yet.
    pub(crate) hold_floor_ms: u64,
}

/// The hold used until the control plane says otherwise.
pub(crate) const DEFAULT_ENDPOINT_HOLD_MS: u64 = 30_000;

impl BuildContext {
    /// A context for tests and for a first build: nothing to hold yet.
    pub(crate) fn at(now_ms: u64) -> BuildContext {
        BuildContext { now_ms, hold_ms: DEFAULT_ENDPOINT_HOLD_MS, hold_floor_ms: 0 }
    }
}

impl Rule {
    #[inline]
    pub(crate) fn matches<B>(&self, req: &http::Request<B>) -> bool {
        self.matches.matches(req)
    }
}

/// What a failed try counts as, latency-wise (peak-EWMA takes it at once
/// and lets it fade over seconds), so an endpoint that fails fast does not
/// look cheap.
pub(crate) const FAILURE_PENALTY: Duration = Duration::from_millis(50);

impl Service {
    /// Breaker bookkeeping for a failed try of `endpoint`: it may be
    /// ejected, within the service's cap.
    pub(crate) fn endpoint_failed(&self, endpoint: &Endpoint, admission: Admission, now: u64) {
        endpoint.health.observe_rtt(FAILURE_PENALTY);
        let failure = endpoint.health.breaker.record_failure(admission, &self.settings, now);
        if self.eject(endpoint, failure, now) {
            tracing::info!(service = self.name, endpoint = %endpoint.addr, ejections = endpoint.health.breaker.ejections(), "endpoint ejected");
        }
    }

    /// A try's time to first byte (the answer head, or for a streamed
    /// answer its first body byte) of `endpoint`, when the service ejects
    /// latency outliers: above `multiple` × the service's median on most of
    /// a window's samples ejects it like a failing endpoint. True when the
    /// try was the endpoint's probe and was slow again: it was ejected
    /// again, and the try must not close its breaker.
    pub(crate) fn first_byte(&self, endpoint: &Endpoint, d: Duration, admission: Admission, now: u64) -> bool {
        let Some((multiple, window)) = self.settings.latency_outlier else { return false };
        self.stats.latency.record(d);
        let Some(median) = self.stats.latency.p50() else { return false };
        let above = d.as_secs_f64() > multiple * median.as_secs_f64();
        let probe = admission == Admission::Probe;
        // A probe is judged alone; any other try within its window.
        let outlier = if probe { above } else { endpoint.health.outlier.sample(above, window, now) };
        if !outlier {
            return false;
        }
        let failure = endpoint.health.breaker.record_outlier(admission, &self.settings, now);
        if self.eject(endpoint, failure, now) {
            metrics::counter!("weft_latency_outlier_ejections_total", "service" => self.name.clone()).increment(1);
            let (first_byte_ms, median_ms) = (d.as_millis() as u64, median.as_millis() as u64);
            tracing::info!(service = self.name, endpoint = %endpoint.addr, first_byte_ms, median_ms, "endpoint ejected: latency outlier");
        }
        probe
    }

    /// Ejects `endpoint` as `failure` says, within the service's cap;
    /// counted in `weft_breaker_ejections_total`.
    fn eject(&self, endpoint: &Endpoint, failure: breaker::Failure, now: u64) -> bool {
        let ready = self.all_ready.iter().map(|e| &*e.health);
        let lock = &self.stats.ejection_lock;
        let ejected = breaker::on_failure(&endpoint.health, failure, ready, &self.settings, lock, now);
        if ejected {
            metrics::counter!("weft_breaker_ejections_total", "service" => self.name.clone()).increment(1);
        }
        ejected
    }

    /// The route that applies to `tenant`.
    pub(crate) fn route_for(&self, tenant: &str) -> Option<&Arc<Route>> {
        self.tenant_routes.get(tenant).or(self.default_route.as_ref())
    }
}

fn route_name(service: &str, tenant: &str) -> String {
    if tenant.is_empty() { format!("route/{service}") } else { format!("route/{service}/{tenant}") }
}

/// Converts one wire route under the policy rules (`weft_policy`), and
/// resolves each backend's subset to the service's ready `endpoints`.
fn convert_route(service: &str, r: &pb::Route, endpoints: &[Arc<Endpoint>]) -> Result<Route, InvalidPolicy> {
    let route = model::Route::try_from(r).map_err(InvalidPolicy::from)?;
    if route.service != service {
        return Err(InvalidPolicy {
            resource: route_name(service, &r.tenant),
            message: format!("route names service '{}' inside service '{service}'", route.service),
        });
    }
    let rules = route
        .rules
        .into_iter()
        .map(|rule| Rule {
            backends: rule
                .backends
                .into_iter()
                .map(|b| {
                    let endpoints = endpoints
                        .iter()
                        .filter(|e| b.subset.iter().all(|(k, v)| e.labels.get(k) == Some(v)))
                        .cloned()
                        .collect();
                    Backend { weight: b.weight, endpoints }
                })
                .collect(),
            matches: rule.matches,
            timeout: rule.timeout,
            retry: rule.retry,
            fallback: rule.fallback,
            fault: rule.fault,
            first_byte_timeout: rule.first_byte_timeout,
            idle_timeout: rule.idle_timeout,
            hedge: rule.hedge,
            hash_on: rule.hash_on,
        })
        .collect();
    Ok(Route { rules })
}

/// Builds a service from its wire config. `previous` supplies last good
/// routes, settings and limits (kept when the new ones are invalid),
/// endpoint and tenant state (kept across versions) and the endpoints to
/// hold (see [`held_endpoints`]). Returns the service and the problems
/// found.
pub(crate) fn build_service(
    cfg: &pb::ServiceConfig,
    previous: Option<&Service>,
    ctx: BuildContext,
) -> (Service, Vec<InvalidPolicy>) {
    let mut problems = Vec::new();
    let endpoints = endpoints_of(cfg, previous, ctx, &mut problems);
    let ready: Vec<Arc<Endpoint>> = endpoints.iter().filter(|e| e.ready).cloned().collect();
    let (default_route, tenant_routes) = routes_of(cfg, previous, &ready, &mut problems);
    let source = source_in_force(cfg, previous, &problems);
    let settings = match cfg.resilience.as_ref().map(model::Resilience::try_from) {
        None => Settings::default(),
        Some(Ok(r)) => Settings::from(&r),
        Some(Err(e)) => {
            problems.push(e.into());
            previous.map(|p| p.settings.clone()).unwrap_or_default()
        }
    };
    let tenants = tenants_of(cfg, previous, &mut problems);
    let authorization = match cfg.authorization.as_ref().map(model::AuthorizationPolicy::try_from) {
        None => None,
        Some(Ok(a)) => Some(Arc::new(a)),
        Some(Err(e)) => {
            problems.push(e.into());
            previous.and_then(|p| p.authorization.clone())
        }
    };
    let holds = endpoints.iter().any(|e| e.is_held());
    let service = Service {
        name: cfg.name.clone(),
        // Records lost with a lease make a service look unknown; while its
        // instances are held it is not.
        known: cfg.known || holds,
        default_route,
        tenant_routes,
        endpoints,
        holds,
        all_ready: Arc::new(ready),
        settings,
        tenants,
        authorization,
        stats: previous.map(|p| p.stats.clone()).unwrap_or_default(),
        source,
    };
    (service, problems)
}

/// The service's endpoints: those listed (each keeping its health across
/// versions, by address), and those held.
fn endpoints_of(
    cfg: &pb::ServiceConfig,
    previous: Option<&Service>,
    ctx: BuildContext,
    problems: &mut Vec<InvalidPolicy>,
) -> Vec<Arc<Endpoint>> {
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
                mtls: e.mtls,
                health: old_health.get(&addr).cloned().unwrap_or_default(),
                held_until_ms: 0,
            })),
            Err(_) => problems.push(InvalidPolicy {
                resource: format!("endpoint/{}/{}", cfg.name, e.proxy_id),
                message: format!("address '{}' is not host:port", e.address),
            }),
        }
    }
    if let Some(prev) = previous {
        let held = held_endpoints(cfg, prev, &endpoints, ctx);
        endpoints.extend(held);
    }
    endpoints
}

type Routes = (Option<Arc<Route>>, HashMap<String, Arc<Route>>);

/// The default route and the tenants' routes, against the ready endpoints;
/// a route that breaks the rules is replaced by its last good version.
fn routes_of(
    cfg: &pb::ServiceConfig,
    previous: Option<&Service>,
    ready: &[Arc<Endpoint>],
    problems: &mut Vec<InvalidPolicy>,
) -> Routes {
    let mut default_route = None;
    let mut tenant_routes = HashMap::new();
    for r in &cfg.routes {
        let route = match convert_route(&cfg.name, r, ready) {
            Ok(route) => Some(Arc::new(route)),
            Err(e) => {
                problems.push(e);
                // Keep the last good version of this very route, rebuilt
                // against the new endpoints.
                previous
                    .and_then(|p| p.source.routes.iter().find(|o| o.tenant == r.tenant))
                    .and_then(|old| convert_route(&cfg.name, old, ready).ok())
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
    (default_route, tenant_routes)
}

/// What is actually in force, recorded as the service's source: a later
/// rebuild keeps the last good route rather than the rejected one.
fn source_in_force(
    cfg: &pb::ServiceConfig,
    previous: Option<&Service>,
    problems: &[InvalidPolicy],
) -> pb::ServiceConfig {
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
    source
}

/// Each tenant's limits (the last good ones when new ones break the rules)
/// with its counters, kept across versions.
fn tenants_of(
    cfg: &pb::ServiceConfig,
    previous: Option<&Service>,
    problems: &mut Vec<InvalidPolicy>,
) -> HashMap<String, (crate::tenancy::Limits, Arc<crate::tenancy::State>)> {
    let mut tenants = HashMap::new();
    for p in &cfg.tenant_policies {
        let state = previous.and_then(|s| s.tenants.get(&p.tenant)).map(|(_, st)| st.clone()).unwrap_or_default();
        let limits = match model::TenantPolicy::try_from(p) {
            Ok(t) => crate::tenancy::Limits::from(&t),
            Err(e) => {
                problems.push(e.into());
                match previous.and_then(|s| s.tenants.get(&p.tenant)) {
                    Some((limits, _)) => limits.clone(),
                    None => continue,
                }
            }
        };
        tenants.insert(p.tenant.clone(), (limits, state));
    }
    tenants
}

/// The endpoints of `prev` that `cfg` no longer lists but that are kept:
/// those that did not depart on purpose (`cfg.departed`), were ready, and
/// whose hold has not run out. An endpoint whose record the control plane
/// lost (its lease expired with a replica, or during an etcd outage; a
/// restarted control plane that has not seen it register yet) is most likely
/// alive and registers again within seconds; dropping it would take a
/// healthy endpoint away from callers, or leave them none at all.
fn held_endpoints(
    cfg: &pb::ServiceConfig,
    prev: &Service,
    listed: &[Arc<Endpoint>],
    ctx: BuildContext,
) -> Vec<Arc<Endpoint>> {
    let mut held = Vec::new();
    for e in &prev.endpoints {
        let still_listed = listed.iter().any(|n| n.proxy_id == e.proxy_id || n.addr == e.addr);
        if still_listed || !e.ready || cfg.departed.iter().any(|d| *d == e.proxy_id) {
            continue;
        }
        let until = if e.is_held() { e.held_until_ms.max(ctx.hold_floor_ms) } else { ctx.now_ms + ctx.hold_ms };
        if until <= ctx.now_ms {
            continue;
        }
        held.push(Arc::new(Endpoint {
            proxy_id: e.proxy_id.clone(),
            addr: e.addr,
            labels: e.labels.clone(),
            ready: true,
            mtls: e.mtls,
            health: e.health.clone(),
            held_until_ms: until,
        }));
    }
    held
}

impl Service {
    /// The earliest time a held endpoint's hold runs out, if any.
    pub(crate) fn next_hold_expiry(&self) -> Option<u64> {
        self.endpoints.iter().filter(|e| e.is_held()).map(|e| e.held_until_ms).min()
    }
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
            mtls: false,
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
        let (s, problems) = build_service(&cfg(90, 10), None, BuildContext::at(1));
        assert!(problems.is_empty());
        let rule = &s.default_route.as_ref().unwrap().rules[0];
        assert_eq!(rule.backends[0].endpoints[0].addr.port(), 1);
        assert_eq!(rule.backends[1].endpoints[0].addr.port(), 2);
    }

    #[test]
    fn bad_route_keeps_last_good() {
        let (good, _) = build_service(&cfg(90, 10), None, BuildContext::at(1));
        let mut bad_cfg = cfg(0, 0);
        bad_cfg.routes[0].revision = 8;
        let (s, problems) = build_service(&bad_cfg, Some(&good), BuildContext::at(1));
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].resource, "route/inference");
        assert_eq!(s.source.routes[0].revision, 7);
        // A later rebuild (e.g. an endpoint change) still has the good route.
        let (again, _) = build_service(&s.source, Some(&s), BuildContext::at(1));
        assert_eq!(again.source.routes[0].revision, 7);
    }

    #[test]
    fn endpoint_stats_survive_rebuilds() {
        let (a, _) = build_service(&cfg(1, 1), None, BuildContext::at(1));
        let (b, _) = build_service(&cfg(2, 1), Some(&a), BuildContext::at(1));
        assert!(Arc::ptr_eq(&a.endpoints[0].health, &b.endpoints[0].health));
        assert!(Arc::ptr_eq(&a.stats, &b.stats));
    }

    fn addrs(s: &Service) -> Vec<(u16, bool)> {
        let mut v: Vec<(u16, bool)> = s.endpoints.iter().map(|e| (e.addr.port(), e.is_held())).collect();
        v.sort();
        v
    }

    fn ctx(now_ms: u64) -> BuildContext {
        BuildContext { now_ms, hold_ms: 10_000, hold_floor_ms: 0 }
    }

    #[test]
    fn a_vanished_endpoint_is_held_until_it_returns_or_its_hold_runs_out() {
        let (full, _) = build_service(&cfg(1, 1), None, ctx(1_000));
        // b's record is gone (a lease expired): b is held, still routable.
        let mut without_b = cfg(1, 1);
        without_b.endpoints.retain(|e| e.proxy_id != "b");
        let (held, _) = build_service(&without_b, Some(&full), ctx(2_000));
        assert_eq!(addrs(&held), [(1, false), (2, true)]);
        assert_eq!(held.next_hold_expiry(), Some(12_000));
        let rule = &held.default_route.as_ref().unwrap().rules[0];
        assert_eq!(rule.backends[1].endpoints.len(), 1, "the held endpoint keeps its subset's traffic");
        assert!(Arc::ptr_eq(&held.endpoints[1].health, &full.endpoints[1].health), "and its breaker state");
        // Later updates without it keep the first deadline.
        let (still, _) = build_service(&without_b, Some(&held), ctx(5_000));
        assert_eq!(still.next_hold_expiry(), Some(12_000));
        // It registers again: confirmed.
        let (back, _) = build_service(&cfg(1, 1), Some(&still), ctx(6_000));
        assert_eq!(addrs(&back), [(1, false), (2, false)]);
        // Or its hold runs out.
        let (gone, _) = build_service(&without_b, Some(&still), ctx(12_000));
        assert_eq!(addrs(&gone), [(1, false)]);
        // A new discovery stream (floor) extends the hold of what is held.
        let (again, _) = build_service(
            &without_b,
            Some(&still),
            BuildContext { now_ms: 12_000, hold_ms: 10_000, hold_floor_ms: 20_000 },
        );
        assert_eq!(again.next_hold_expiry(), Some(20_000));
    }

    #[test]
    fn a_departed_or_not_ready_endpoint_is_dropped_at_once() {
        let (full, _) = build_service(&cfg(1, 1), None, ctx(1_000));
        let mut departed = cfg(1, 1);
        departed.endpoints.retain(|e| e.proxy_id != "b");
        departed.departed = vec!["b".into()];
        let (s, _) = build_service(&departed, Some(&full), ctx(2_000));
        assert_eq!(addrs(&s), [(1, false)]);

        let mut not_ready = cfg(1, 1);
        not_ready.endpoints[1].ready = false;
        let (nr, _) = build_service(&not_ready, Some(&full), ctx(2_000));
        let mut gone = cfg(1, 1);
        gone.endpoints.retain(|e| e.proxy_id != "b");
        let (s, _) = build_service(&gone, Some(&nr), ctx(3_000));
        assert_eq!(addrs(&s), [(1, false)], "a not-ready endpoint had no traffic to keep");
    }

    #[test]
    fn a_service_whose_records_all_vanished_stays_known_while_held() {
        let (full, _) = build_service(&cfg(1, 1), None, ctx(1_000));
        let unknown = pb::ServiceConfig { name: "inference".into(), known: false, ..Default::default() };
        let (s, _) = build_service(&unknown, Some(&full), ctx(2_000));
        assert!(s.known);
        assert_eq!(s.all_ready.len(), 2);
        let (later, _) = build_service(&unknown, Some(&s), ctx(20_000));
        assert!(!later.known, "once the hold ran out it is unknown");
        assert!(later.endpoints.is_empty());
    }
}
