//! The outbound path: the app calls `http://<service>/...` through the
//! sidecar; the service is the request's authority. Route, pick a backend and
//! an endpoint, forward to that endpoint's inbound sidecar.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Request};
use hyper::body::Incoming;
use rand::Rng;

use crate::balance;
use crate::body::{BoxResponse, ProxyBody};
use crate::config::{Endpoint, Service};
use crate::errors::{ProxyError, is_grpc};
use crate::state::Shared;
use crate::upstream::Upstream;
use crate::{TENANT_HEADER, telemetry};

/// How long a request for a service never seen before waits for discovery.
const DISCOVERY_WAIT: Duration = Duration::from_secs(3);

pub struct Outbound {
    pub shared: Arc<Shared>,
    pub upstream: Upstream,
}

impl Outbound {
    pub async fn handle(&self, mut req: Request<Incoming>) -> BoxResponse {
        let started = Instant::now();
        let grpc = is_grpc(&req);
        let tenant = req
            .headers()
            .get(TENANT_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .unwrap_or("default")
            .to_string();
        ensure_traceparent(&mut req);
        let service = match service_of(&req) {
            Ok(s) => s,
            Err(e) => return finish(Err(e), grpc, "outbound", "-", &tenant, started),
        };
        let result = self.route_and_forward(&service, &tenant, req).await;
        finish(result, grpc, "outbound", &service, &tenant, started)
    }

    async fn route_and_forward(
        &self,
        service: &str,
        tenant: &str,
        req: Request<Incoming>,
    ) -> Result<http::Response<Incoming>, ProxyError> {
        let svc = self.resolve(service).await?;
        if !svc.known {
            return Err(ProxyError::UnknownService(service.to_string()));
        }
        let (endpoint, timeout) =
            pick(&svc, tenant, &req).ok_or_else(|| ProxyError::NoEndpoints(service.to_string()))?;
        let _guard = balance::InFlight::new(&endpoint.stats);
        self.upstream.send(endpoint.addr, req, timeout).await
    }

    /// Finds the service in the table, subscribing and waiting on a miss.
    async fn resolve(&self, service: &str) -> Result<Arc<Service>, ProxyError> {
        if let Some(s) = self.shared.table.load().services.get(service) {
            return Ok(s.clone());
        }
        let mut changed = self.shared.table_changed.subscribe();
        if !self.shared.subscribe(service) {
            return Err(ProxyError::TooManyServices(service.to_string()));
        }
        let wait = async {
            loop {
                if let Some(s) = self.shared.table.load().services.get(service) {
                    return Some(s.clone());
                }
                if changed.changed().await.is_err() {
                    return None;
                }
            }
        };
        match tokio::time::timeout(DISCOVERY_WAIT, wait).await {
            Ok(Some(s)) => Ok(s),
            _ => Err(ProxyError::NoDiscovery(service.to_string())),
        }
    }
}

/// Chooses the endpoint for a request: the tenant's route (else the default
/// route), its first matching rule, a backend by weight among those with
/// ready endpoints, then an endpoint. Without a route or a matching rule,
/// any ready endpoint of the service.
pub fn pick<B>(svc: &Service, tenant: &str, req: &Request<B>) -> Option<(Arc<Endpoint>, Option<Duration>)> {
    let rule = svc
        .route_for(tenant)
        .and_then(|r| r.rules.iter().find(|rule| rule.matches(req)));
    let Some(rule) = rule else {
        return balance::p2c(&svc.all_ready).map(|e| (e, None));
    };
    let total: u64 = rule
        .backends
        .iter()
        .filter(|b| !b.endpoints.is_empty())
        .map(|b| u64::from(b.weight))
        .sum();
    if total == 0 {
        return None;
    }
    let mut n = rand::rng().random_range(0..total);
    for b in rule.backends.iter().filter(|b| !b.endpoints.is_empty()) {
        let w = u64::from(b.weight);
        if n < w {
            return balance::p2c(&b.endpoints).map(|e| (e, rule.timeout));
        }
        n -= w;
    }
    None
}

/// The service a request is for: the authority of an absolute-form URI or
/// `:authority`, else the Host header; the port is ignored.
pub fn service_of<B>(req: &Request<B>) -> Result<String, ProxyError> {
    let authority = match req.uri().authority() {
        Some(a) => a.host().to_string(),
        None => {
            let host = req.headers().get(http::header::HOST).ok_or(ProxyError::NoAuthority)?;
            let host = host
                .to_str()
                .map_err(|_| ProxyError::BadAuthority(String::from_utf8_lossy(host.as_bytes()).into()))?;
            host.rsplit_once(':')
                .map(|(h, p)| if p.chars().all(|c| c.is_ascii_digit()) { h } else { host })
                .unwrap_or(host)
                .to_string()
        }
    };
    let name = authority.to_ascii_lowercase();
    let valid = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !valid {
        return Err(ProxyError::BadAuthority(authority));
    }
    // `inference.default.svc` style names route to `inference`.
    Ok(name.split('.').next().unwrap_or(&name).to_string())
}

/// Starts a W3C trace when the caller did not.
fn ensure_traceparent<B>(req: &mut Request<B>) {
    if req.headers().contains_key("traceparent") {
        return;
    }
    let mut rng = rand::rng();
    let trace: u128 = rng.random::<u128>() | 1;
    let span: u64 = rng.random::<u64>() | 1;
    let v = format!("00-{trace:032x}-{span:016x}-01");
    req.headers_mut()
        .insert("traceparent", HeaderValue::from_str(&v).expect("hex is a valid header"));
}

/// Records the outcome and turns it into the response.
pub fn finish(
    result: Result<http::Response<Incoming>, ProxyError>,
    grpc: bool,
    direction: &'static str,
    service: &str,
    tenant: &str,
    started: Instant,
) -> BoxResponse {
    let resp = match result {
        Ok(r) => r.map(ProxyBody::Left),
        Err(e) => {
            tracing::debug!(direction, service, error = %e, "request failed in the sidecar");
            e.into_response(grpc)
        }
    };
    telemetry::record_request(direction, service, tenant, resp.status().as_u16(), started.elapsed());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, host: Option<&str>) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header("host", h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn service_from_host_or_absolute_uri() {
        assert_eq!(service_of(&req("/x", Some("inference:8080"))).unwrap(), "inference");
        assert_eq!(service_of(&req("/x", Some("Inference"))).unwrap(), "inference");
        assert_eq!(
            service_of(&req("http://state.default.svc:80/x", None)).unwrap(),
            "state"
        );
        assert!(matches!(service_of(&req("/x", None)), Err(ProxyError::NoAuthority)));
        assert!(matches!(
            service_of(&req("/x", Some("bad host"))),
            Err(ProxyError::BadAuthority(_))
        ));
    }
}
