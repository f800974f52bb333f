//! Wiring of `weft-proxy`: listeners, discovery client, probe, admin, drain.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::inbound::Inbound;
use crate::outbound::Outbound;
pub use crate::state::Identity;
use crate::state::Shared;
use crate::transport::body::BoxResponse;
use crate::transport::listener::{self, Tracker};
use crate::transport::pool::Upstream;
pub use crate::transport::tls::InboundMtls;
use crate::transport::tls::{Accepted, ClientTls, ServerTls};
use crate::{admin, control_client, probe};

pub struct Options {
    pub controls: Vec<String>,
    pub identity: Identity,
    pub app: SocketAddr,
    pub metrics: PrometheusHandle,
    pub replay_limit: u64,
    pub tenant_header: http::HeaderName,
    pub token: Option<String>,
    /// The trust bundle (`--ca-bundle`): the control plane is checked
    /// against it, and the sidecar gets a workload certificate.
    pub workload: Option<Arc<crate::workload::Workload>>,
    /// With a workload: plaintext callers refused, or served and counted.
    pub inbound_mtls: InboundMtls,
    /// Bounds of each listener's connections.
    pub limits: listener::Limits,
    /// Longest wait for the app's response head (inbound).
    pub app_timeout: Duration,
    /// On drain, how long the listeners keep accepting after the sidecar
    /// deregistered, for callers that have not heard yet.
    pub drain_grace: Duration,
    /// Where mesh service names get their virtual addresses (`--vip-cidr`).
    pub vip_cidr: (std::net::Ipv4Addr, u8),
    /// With a DNS listener: the resolver other names are forwarded to.
    pub dns_upstream: Option<SocketAddr>,
    /// The app's ports besides `app`'s that mesh TCP may open.
    pub tcp_ports: Vec<u16>,
}

pub struct Listeners {
    pub inbound: TcpListener,
    pub outbound: TcpListener,
    pub admin: TcpListener,
    /// DNS for mesh names (`--dns`).
    pub dns: Option<tokio::net::UdpSocket>,
}

/// Runs the sidecar until `shutdown` resolves or `POST /drain` is called;
/// then stops accepting, deregisters and lets in-flight requests finish.
pub async fn run(opts: Options, listeners: Listeners, shutdown: impl Future<Output = ()>) {
    let (ready_tx, ready_rx) = watch::channel(false);
    let (shared, queues) = Shared::new(
        opts.identity.clone(),
        opts.tenant_header.clone(),
        opts.token.clone(),
        ready_rx,
        opts.workload.clone(),
    );
    let (drain_tx, mut drain_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);

    let probe = tokio::spawn(probe::run(opts.app, ready_tx));
    let discovery = tokio::spawn(control_client::run(
        shared.clone(),
        opts.controls.clone(),
        queues.subscriptions,
        queues.reports,
        stop_rx.clone(),
    ));
    let housekeeping = spawn_housekeeping(&shared, &opts.metrics);
    let admin = tokio::spawn(admin::serve(listeners.admin, shared.clone(), opts.metrics.clone(), drain_tx));

    // The bundle was checked when the workload was made.
    let client_tls = opts.workload.as_ref().map(|w| Arc::new(ClientTls::new(w).expect("a checked bundle")));
    let server_tls =
        opts.workload.as_ref().map(|w| Arc::new(ServerTls::new(w, opts.inbound_mtls).expect("a checked bundle")));
    let deadlines = Arc::new(crate::http::deadline::Linked::default());
    let outbound = Arc::new(Outbound {
        shared: shared.clone(),
        sender: Upstream::new(client_tls),
        replay_limit: opts.replay_limit,
        deadlines: deadlines.clone(),
    });
    let vips = Arc::new(crate::dns::Vips::new(opts.vip_cidr));
    let dns = match (listeners.dns, opts.dns_upstream) {
        (Some(socket), Some(upstream)) => {
            let dns = crate::dns::Dns { outbound: outbound.clone(), vips: vips.clone(), upstream };
            Some(tokio::spawn(Arc::new(dns).serve(socket)))
        }
        _ => None,
    };
    let deadline_sweep = {
        let deadlines = deadlines.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                deadlines.sweep();
            }
        })
    };
    let mesh = Arc::new(Mesh { outbound: outbound.clone(), vips });
    let inbound = Arc::new(Inbound {
        shared: shared.clone(),
        app: opts.app,
        upstream: Upstream::new(None),
        app_timeout: opts.app_timeout,
        tcp_ports: opts.tcp_ports.clone(),
        deadlines: deadlines.clone(),
        body_limit: opts.replay_limit,
    });
    let (accept_tx, accept_rx) = watch::channel(false);
    let out_conns = Tracker::new("outbound", listener::Limits { call_timeout: None, ..opts.limits });
    let in_conns = Tracker::new("inbound", listener::Limits { call_timeout: Some(opts.app_timeout), ..opts.limits });
    let draining = Arc::new(AtomicBool::new(false));
    // The outbound listener also takes the app's captured connections
    // (`weft-proxy init`), told apart by their original destination.
    let out_task = tokio::spawn(serve(
        listeners.outbound,
        Accept::Captured(Opaque::ToOriginal(mesh)),
        out_conns.clone(),
        accept_rx.clone(),
        draining.clone(),
        move |req, conn| outbound.clone().handle(req, conn.original_dst()),
    ));
    let in_task = tokio::spawn(serve(
        listeners.inbound,
        // Captured connections for the app's ports that are not HTTP go to
        // the app's port they were for (with mTLS: in permissive mode only).
        server_tls.map_or(Accept::Captured(Opaque::ToApp(opts.app.ip())), |tls| Accept::Tls(tls, opts.app.ip())),
        in_conns.clone(),
        accept_rx,
        draining.clone(),
        move |req, conn| inbound.clone().handle(req, conn.clone()),
    ));

    tokio::select! {
        _ = shutdown => tracing::info!("shutting down"),
        _ = crate::state::stopped(&mut drain_rx) => tracing::info!("draining"),
    }
    // Deregister first so callers stop picking this instance; keep
    // accepting for the grace period (callers that have not heard yet), with
    // `Connection: close` on HTTP/1.1 answers so clients move on; then stop
    // accepting and let in-flight requests finish.
    draining.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let grace = tokio::time::sleep(opts.drain_grace);
    let _ = tokio::join!(tokio::time::timeout(Duration::from_secs(3), discovery), grace);
    let _ = accept_tx.send(true);
    let _ = tokio::join!(out_task, in_task);
    let finish = async { tokio::join!(out_conns.drain(), in_conns.drain()) };
    if tokio::time::timeout(Duration::from_secs(30), finish).await.is_err() {
        tracing::warn!(
            outbound = out_conns.open(),
            inbound = in_conns.open(),
            "connections still open after 30s; exiting anyway"
        );
    }
    probe.abort();
    housekeeping.iter().for_each(|t| t.abort());
    deadline_sweep.abort();
    admin.abort();
    if let Some(dns) = dns {
        dns.abort();
    }
    tracing::info!("stopped");
}

/// The periodic tasks: the subscription sweep, and the metrics upkeep.
fn spawn_housekeeping(
    shared: &Arc<Shared>,
    metrics: &metrics_exporter_prometheus::PrometheusHandle,
) -> [tokio::task::JoinHandle<()>; 2] {
    let sweeper = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(crate::state::SWEEP_PERIOD);
            tick.tick().await;
            loop {
                tick.tick().await;
                shared.sweep_subscriptions();
            }
        })
    };
    // Histogram samples are held until upkeep folds them into the
    // buckets: at 80k requests/s every second of delay is ~0.6 MB.
    let metrics = metrics.clone();
    let upkeep = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            metrics.run_upkeep();
        }
    });
    [sweeper, upkeep]
}

/// What a listener's connections may be.
enum Accept {
    /// mTLS (and plaintext in permissive mode). Captured connections, for
    /// one of the app's ports (at the app's address), come from outside the
    /// mesh: sidecars dial the listener itself.
    Tls(Arc<ServerTls>, std::net::IpAddr),
    /// HTTP/1.1 and h2c made to the listener, and captured connections:
    /// HTTP, or opaque TCP.
    Captured(Opaque),
}

/// Where a captured connection that is not HTTP goes.
#[derive(Clone)]
enum Opaque {
    /// The app's own outbound connection: where it was going, or for a
    /// mesh service's virtual address, to an instance of the service.
    ToOriginal(Arc<Mesh>),
    /// A peer's connection to one of the app's ports: that port of the app.
    ToApp(std::net::IpAddr),
}

/// What the outbound listener needs for captured TCP to mesh services.
struct Mesh {
    outbound: Arc<Outbound>,
    vips: Arc<crate::dns::Vips>,
}

/// A captured connection that is not HTTP, for `dst`: the app's own to a
/// mesh service's address as mesh TCP, else where it was going; a peer's to
/// that port of the app.
async fn forward_opaque(
    stream: tokio::net::TcpStream,
    dst: SocketAddr,
    opaque: Opaque,
    detected: crate::transport::detect::Protocol,
) {
    use crate::transport::opaque::forward;
    match opaque {
        Opaque::ToOriginal(mesh) => match mesh.outbound.service_at(&mesh.vips, dst.ip()) {
            Some(target) => crate::outbound::tcp::forward(&mesh.outbound, stream, target, dst.port()).await,
            None => forward(stream, dst, "outbound", detected.label()).await,
        },
        Opaque::ToApp(ip) => forward(stream, SocketAddr::new(ip, dst.port()), "inbound", detected.label()).await,
    }
}

/// Accepts connections until `stop`, within the listener's bounds
/// ([`Tracker`]).
async fn serve<F, Fut>(
    listener: TcpListener,
    accept: Accept,
    tracker: Arc<Tracker>,
    mut stop: watch::Receiver<bool>,
    draining: Arc<AtomicBool>,
    handler: F,
) where
    F: Fn(http::Request<hyper::body::Incoming>, &Arc<listener::ConnState>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = BoxResponse> + Send + 'static,
{
    let mut builder = auto::Builder::new(crate::transport::connect::BoxedExec);
    builder.http2().max_concurrent_streams(1024);
    builder.http1().writev(false);
    let builder = Arc::new(builder);
    let local = listener.local_addr().ok();
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = crate::state::stopped(&mut stop) => break,
        };
        let Some(state) = tracker.admit() else {
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let h = handler.clone();
        let (conn_state, draining) = (state.clone(), draining.clone());
        let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let in_flight = Some(conn_state.request());
            // While draining, HTTP/1.1 clients are told to move on.
            let close = req.version() < http::Version::HTTP_2 && draining.load(Ordering::Relaxed);
            Served { call: h(req, &conn_state), in_flight, close }
        });
        let closed = tracker.on_close();
        let captured = local.and_then(|local| crate::transport::detect::original_dst(&stream, local));
        let tls = match (&accept, captured) {
            (Accept::Tls(tls, _), None) => tls,
            (Accept::Captured(_), None) => {
                let io = TokioIo::new(listener::TrackedIo::new(stream, state.clone()));
                let conn = builder.serve_connection_with_upgrades(io, svc).into_owned();
                tokio::spawn(listener::watched(conn, state, closed));
                continue;
            }
            (Accept::Tls(tls, _), Some(_)) if !tls.permissive() => {
                // Strict: a caller outside the mesh is refused, whatever it
                // speaks.
                metrics::counter!("weft_inbound_plaintext_total", "mode" => "strict").increment(1);
                continue;
            }
            (Accept::Tls(_, _) | Accept::Captured(_), Some(dst)) => {
                let opaque = match &accept {
                    Accept::Tls(_, app) => {
                        metrics::counter!("weft_inbound_plaintext_total", "mode" => "permissive").increment(1);
                        Opaque::ToApp(*app)
                    }
                    Accept::Captured(opaque) => opaque.clone(),
                };
                // A captured connection: HTTP gets the mesh, anything else
                // goes where it was going.
                state.set_original_dst(dst);
                let builder = builder.clone();
                tokio::spawn(async move {
                    match crate::transport::detect::detect(&stream).await {
                        Ok(crate::transport::detect::Protocol::Http) => {
                            let io = TokioIo::new(listener::TrackedIo::new(stream, state.clone()));
                            listener::watched(
                                builder.serve_connection_with_upgrades(io, svc).into_owned(),
                                state,
                                closed,
                            )
                            .await;
                        }
                        Ok(detected) => {
                            forward_opaque(stream, dst, opaque, detected).await;
                            drop(closed);
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "captured connection closed before its protocol was told")
                        }
                    }
                });
                continue;
            }
        };
        // The handshake runs on the connection's own task, bounded in time.
        let (tls, builder) = (tls.clone(), builder.clone());
        tokio::spawn(async move {
            match tls.accept(stream).await {
                Ok(Accepted::Tls(stream, peer)) => {
                    state.set_peer(peer);
                    let io = TokioIo::new(listener::TrackedIo::new(stream, state.clone()));
                    listener::watched(builder.serve_connection_with_upgrades(io, svc).into_owned(), state, closed)
                        .await;
                }
                Ok(Accepted::Plain(stream)) => {
                    let io = TokioIo::new(listener::TrackedIo::new(stream, state.clone()));
                    listener::watched(builder.serve_connection_with_upgrades(io, svc).into_owned(), state, closed)
                        .await;
                }
                Err(reason) => tracing::debug!(%reason, "inbound connection refused"),
            }
        });
    }
}

pin_project_lite::pin_project! {
    /// A call on an accepted connection: counted in flight on it until its
    /// response head is ready. A plain future rather than an `async` block,
    /// which would store the call's (large) future twice.
    struct Served<F> {
        #[pin]
        call: F,
        in_flight: Option<listener::RequestGuard>,
        close: bool,
    }
}

impl<F: Future<Output = BoxResponse>> Future for Served<F> {
    type Output = Result<BoxResponse, Infallible>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let this = self.project();
        let mut resp = std::task::ready!(this.call.poll(cx));
        this.in_flight.take();
        if *this.close {
            resp.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
        }
        std::task::Poll::Ready(Ok(resp))
    }
}

/// Parses `k=v,k2=v2`.
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(|| format!("label '{part}' is not key=value"))?;
        if k.is_empty() || v.is_empty() {
            return Err(format!("label '{part}' has an empty key or value"));
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}
