//! The sidecar's admin endpoint: `/live`, `/ready`, `/metrics`, `/config`,
//! `POST /drain`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::state::Shared;

pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    metrics: PrometheusHandle,
    drain: watch::Sender<bool>,
) {
    let drain = Arc::new(drain);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (shared, metrics, drain) = (shared.clone(), metrics.clone(), drain.clone());
        let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let resp = respond(&req, &shared, &metrics, &drain);
            async move { Ok::<_, Infallible>(resp) }
        });
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
        });
    }
}

fn respond<B>(
    req: &Request<B>,
    shared: &Shared,
    metrics: &PrometheusHandle,
    drain: &watch::Sender<bool>,
) -> Response<Full<Bytes>> {
    let reply = |code: StatusCode, ctype: &str, body: String| {
        Response::builder()
            .status(code)
            .header("content-type", ctype)
            .body(Full::new(Bytes::from(body)))
            .expect("valid response")
    };
    let text = |code, body: &str| reply(code, "text/plain; charset=utf-8", format!("{body}\n"));
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/live") => text(StatusCode::OK, "live"),
        (&Method::GET, "/ready") => {
            let config = shared.config_received.load(Ordering::Relaxed);
            let app = *shared.app_ready.borrow();
            match (config, app, *drain.borrow()) {
                (_, _, true) => text(StatusCode::SERVICE_UNAVAILABLE, "draining"),
                (true, true, false) if !shared.has_certificate() => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: no workload certificate from the control plane yet",
                ),
                (true, true, false) => text(StatusCode::OK, "ready"),
                (false, _, _) => {
                    text(StatusCode::SERVICE_UNAVAILABLE, "not ready: no config received from the control plane yet")
                }
                (true, false, _) => {
                    text(StatusCode::SERVICE_UNAVAILABLE, "not ready: the local app does not accept connections")
                }
            }
        }
        (&Method::GET, "/metrics") => {
            endpoint_gauges(shared);
            reply(StatusCode::OK, "text/plain; version=0.0.4", metrics.render())
        }
        (&Method::GET, "/config") => reply(StatusCode::OK, "application/json", config_json(shared).to_string()),
        (&Method::POST, "/drain") => {
            drain.send_replace(true);
            text(StatusCode::ACCEPTED, "draining: no new connections; in-flight requests finish; deregistering")
        }
        (_, "/drain") => text(StatusCode::METHOD_NOT_ALLOWED, "use POST /drain"),
        (_, path) => text(
            StatusCode::NOT_FOUND,
            &format!("no such admin path {path} (try /live, /ready, /metrics, /config, POST /drain)"),
        ),
    }
}

/// `weft_endpoints{service,state}`, set at scrape time from the table:
/// `ready`, `not-ready`, `ejected` (by the breaker), `held` (vanished from
/// the control plane without departing; see `config::held_endpoints`). A
/// service that left the table reads 0.
fn endpoint_gauges(shared: &Shared) {
    use std::sync::Mutex;
    static SEEN: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let table = shared.table.load();
    let now = crate::clock::now_ms();
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    for name in seen.iter().filter(|n| !table.services.contains_key(*n)) {
        for state in ["ready", "not-ready", "ejected", "held"] {
            metrics::gauge!("weft_endpoints", "service" => name.clone(), "state" => state).set(0.0);
        }
    }
    seen.clear();
    for (name, svc) in table.services.iter().filter(|(_, s)| s.known) {
        let (mut ready, mut not_ready, mut ejected, mut held) = (0, 0, 0, 0);
        for e in &svc.endpoints {
            match () {
                _ if !e.ready => not_ready += 1,
                _ if e.health.is_ejected(now) => ejected += 1,
                _ if e.is_held() => held += 1,
                _ => ready += 1,
            }
        }
        for (state, n) in [("ready", ready), ("not-ready", not_ready), ("ejected", ejected), ("held", held)] {
            metrics::gauge!("weft_endpoints", "service" => name.clone(), "state" => state).set(f64::from(n));
        }
        seen.push(name.clone());
    }
}

/// The current table as JSON: per service, its routes (with the revision of
/// each) and endpoints.
pub(crate) fn config_json(shared: &Shared) -> serde_json::Value {
    let table = shared.table.load();
    let mut services = serde_json::Map::new();
    let mut names: Vec<&String> = table.services.keys().collect();
    names.sort();
    for name in names {
        let s = &table.services[name];
        let routes: Vec<_> = s
            .source
            .routes
            .iter()
            .map(|r| {
                json!({
                    "tenant": r.tenant,
                    "revision": r.revision,
                    "rules": r.rules.iter().map(|rule| {
                        let m = rule.r#match.clone().unwrap_or_default();
                        json!({
                            "match": { "path_prefix": m.path_prefix, "method": m.method, "headers": m.headers },
                            "backends": rule.backends.iter().map(|b| json!({"subset": b.subset, "weight": b.weight})).collect::<Vec<_>>(),
                            "timeout_ms": rule.timeout_ms,
                            "retry": rule.retry.as_ref().map(|r| json!({"attempts": r.attempts, "per_try_timeout_ms": r.per_try_timeout_ms, "on": r.on})),
                            "fault": rule.fault.as_ref().map(|f| json!({"header": f.header, "delay_percent": f.delay_percent, "delay_ms": f.delay_ms, "abort_percent": f.abort_percent, "abort_status": f.abort_status, "abort_grpc_status": f.abort_grpc_status})),
                            "fallback": rule.fallback.as_ref().map(|f| json!({"service": f.service, "status": f.status})),
                            "first_byte_timeout_ms": rule.first_byte_timeout_ms,
                            "idle_timeout_ms": rule.idle_timeout_ms,
                            "hedge": rule.hedge.as_ref().map(|h| json!({"after_ms": h.after_ms, "after_p95": h.after_p95})),
                            "hash_on": rule.hash_on.as_ref().map(|h| json!({"header": h.header, "cookie": h.cookie})),
                        })
                    }).collect::<Vec<_>>(),
                })
            })
            .collect();
        let endpoints: Vec<_> = s
            .endpoints
            .iter()
            .map(|e| json!({"proxy_id": e.proxy_id, "address": e.addr.to_string(), "labels": e.labels, "ready": e.ready, "mtls": e.mtls, "held": e.is_held()}))
            .collect();
        let mut tenants: Vec<&String> = s.tenants.keys().collect();
        tenants.sort();
        let authorization = s.authorization.as_ref().map(|a| {
            json!({"default": a.default.as_str(), "rules": a.rules.len(), "tenant_header_from": a.tenant_header_from})
        });
        let resilience = s.source.resilience.as_ref().map(|r| {
            json!({
                "revision": r.revision,
                "consecutive_failures": r.consecutive_failures,
                "max_concurrent_requests": r.max_concurrent_requests,
                "retry_budget_ratio": r.retry_budget_ratio,
                "retry_budget_min_per_second": r.retry_budget_min_per_second,
                "latency_outlier_multiple": r.latency_outlier_multiple,
                "latency_outlier_window_ms": r.latency_outlier_window_ms,
            })
        });
        services.insert(
            name.clone(),
            json!({"known": s.known, "routes": routes, "endpoints": endpoints, "tenants": tenants, "authorization": authorization, "resilience": resilience}),
        );
    }
    json!({
        "proxy_id": shared.identity.id,
        "service": shared.identity.service,
        "version": table.version,
        "control_connected": shared.control_connected.load(Ordering::Relaxed),
        "last_nack": *shared.last_nack.lock().expect("lock"),
        "identity": shared.workload.as_ref().and_then(|w| w.current.load_full()).map(|c| serde_json::json!({
            "id": c.identity.to_string(),
            "not_after_unix_ms": c.not_after_unix_ms,
        })),
        "services": services,
    })
}
