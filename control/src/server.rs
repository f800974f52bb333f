//! Wiring of `weft-control`: the etcd watcher, the discovery and admin gRPC
//! services, and the HTTP admin endpoint (`/live`, `/ready`, `/metrics`).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use xds_proto::v1::admin_server::AdminServer;
use xds_proto::v1::discovery_server::DiscoveryServer;

use crate::admin::AdminService;
use crate::admin::traces::TraceLog;
use crate::push::DiscoveryService;
use crate::push::index::Snapshot;
use crate::store::Store;
use crate::store::watcher;

pub struct Config {
    pub store: Store,
    /// Names this replica in `weftctl status`.
    pub replica: String,
    pub lease_ttl_secs: i64,
    pub metrics: PrometheusHandle,
    /// Bearer tokens; `None` = open API.
    pub tokens: Option<Arc<crate::admin::auth::Tokens>>,
    /// Discovery streams this replica takes at most.
    pub max_sidecars: usize,
    /// The CA: workload certificates for sidecars, and gRPC over TLS.
    pub identity: Option<Identity>,
}

pub struct Identity {
    pub ca: Arc<weft_identity::Ca>,
    /// The lifetime of the certificates it issues.
    pub cert_ttl: std::time::Duration,
    /// The names sidecars and weftctl dial this replica by.
    pub server_names: Vec<String>,
}

/// Serves until `shutdown` resolves.
pub async fn run(
    config: Config,
    grpc: TcpListener,
    admin: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    let synced = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    tokio::spawn(watcher::run(config.store.clone(), tx, synced.clone(), stopped(stop_rx.clone())));
    let traces = Arc::new(TraceLog::new(10_000));
    let discovery = DiscoveryService::new(
        config.store.clone(),
        rx.clone(),
        config.replica.clone(),
        config.lease_ttl_secs,
        traces.clone(),
        config.max_sidecars,
        config.identity.as_ref().map(|i| crate::push::Issuing { ca: i.ca.clone(), ttl: i.cert_ttl }),
    );
    let ready = Readiness { synced, lease: discovery.lease() };
    tokio::spawn(serve_admin(admin, config.store.clone(), ready, config.metrics.clone(), stopped(stop_rx.clone())));
    let upkeep = config.metrics.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });

    let admin_api = AdminService::new(config.store.clone(), traces, config.replica.clone(), rx.clone());
    let grpc_stop = stopped(stop_rx);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    // A sidecar that vanishes without closing its stream is noticed by
    // unanswered pings within two thirds of the lease TTL; its records are
    // then deleted.
    let ping = std::time::Duration::from_millis((config.lease_ttl_secs as u64 * 1000 / 3).max(1000));
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(ping))
        .http2_keepalive_timeout(Some(ping))
        .add_service(DiscoveryServer::with_interceptor(
            discovery,
            crate::admin::auth::interceptor(config.tokens.clone()),
        ))
        .add_service(AdminServer::with_interceptor(admin_api, crate::admin::auth::interceptor(config.tokens.clone())));
    match &config.identity {
        Some(id) => {
            let incoming = crate::tls::incoming(grpc, id.ca.clone(), id.server_names.clone(), id.cert_ttl)?;
            router.serve_with_incoming_shutdown(incoming, grpc_stop).await?;
        }
        None => router.serve_with_incoming_shutdown(TcpListenerStream::new(grpc), grpc_stop).await?,
    }
    Ok(())
}

/// What `/ready` checks besides etcd answering.
#[derive(Clone)]
struct Readiness {
    /// The watch has loaded the state and follows it.
    synced: Arc<AtomicBool>,
    /// The replica's lease, under which sidecars are registered.
    lease: watch::Receiver<Option<i64>>,
}

async fn serve_admin(
    listener: TcpListener,
    store: Store,
    ready: Readiness,
    metrics: PrometheusHandle,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
            _ = &mut shutdown => return,
        };
        let (store, ready, metrics) = (store.clone(), ready.clone(), metrics.clone());
        let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let (store, ready, metrics) = (store.clone(), ready.clone(), metrics.clone());
            async move { Ok::<_, Infallible>(admin_response(req, &store, &ready, &metrics).await) }
        });
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
        });
    }
}

async fn admin_response(
    req: Request<hyper::body::Incoming>,
    store: &Store,
    ready: &Readiness,
    metrics: &PrometheusHandle,
) -> Response<Full<Bytes>> {
    let text = |code: StatusCode, body: String| {
        Response::builder()
            .status(code)
            .header("content-type", "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from(body)))
            .expect("valid response")
    };
    match req.uri().path() {
        "/live" => text(StatusCode::OK, "live\n".into()),
        "/ready" => {
            let ping = tokio::time::timeout(std::time::Duration::from_secs(1), store.ping()).await;
            match ping {
                Ok(Ok(_)) if !ready.synced.load(Ordering::Relaxed) => {
                    text(StatusCode::SERVICE_UNAVAILABLE, "etcd reachable, watch not yet synced\n".into())
                }
                Ok(Ok(_)) if ready.lease.borrow().is_none() => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "etcd reachable, no lease to register sidecars under yet\n".into(),
                ),
                Ok(Ok(_)) => text(StatusCode::OK, "ready\n".into()),
                Ok(Err(e)) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")),
                Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "not ready: etcd did not answer within 1s\n".into()),
            }
        }
        "/metrics" => text(StatusCode::OK, metrics.render()),
        other => text(StatusCode::NOT_FOUND, format!("no such admin path {other} (try /live, /ready, /metrics)\n")),
    }
}
