//! The outbound path: the app calls `http://<service>/...` through the
//! sidecar; the service is the request's authority.
//!
//! - [`resolve`]: the service in the table, or subscribe and wait for it;
//! - [`route`]: the rule that applies, a backend by weight, an endpoint;
//! - [`balance`]: P2C over peak-EWMA latency × load, region-aware;
//! - [`affinity`]: a session's calls to one endpoint (`hash_on`);
//! - [`call`]: one call, phase by phase: its body, the concurrency cap, each
//!   try and its breaker bookkeeping, the decision to try again, and the end;
//! - [`retry`]: what is a failure, what is retried, how long to back off;
//! - [`replay`]: request bodies kept for another try, or streamed once;
//! - [`fault`]: injected delays and aborts;
//! - [`fallback`]: the answer when the service cannot give one.

pub(crate) mod affinity;
pub(crate) mod balance;
pub(crate) mod call;
pub(crate) mod fallback;
pub(crate) mod fault;
pub(crate) mod replay;
pub(crate) mod resolve;
pub(crate) mod retry;
pub(crate) mod route;
pub(crate) mod tcp;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::http::errors::ProxyError;
use crate::http::headers::{TRACEPARENT, ensure_traceparent, service_of, tenant_of, vouch_tenant};
use crate::http::response::{Degraded, finish};
use crate::state::Shared;
use crate::transport;
use crate::transport::body::{BoxResponse, ProxyBody};
use crate::transport::pool::{Peer, PooledBody, Upstream};

/// The default of `--retry-body-limit`.
pub const DEFAULT_REPLAY_LIMIT: u64 = 1024 * 1024;

/// Sends one try to an endpoint: the pooled upstream clients, or a mock in
/// the unit tests of [`call`].
pub(crate) trait Sender: Send + Sync + 'static {
    /// The timeout, when set, covers the time to the response head.
    fn send(
        &self,
        peer: Peer<'_>,
        req: Request<ProxyBody>,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<Response<PooledBody>, transport::Error>> + Send;
}

impl Sender for Upstream {
    fn send(
        &self,
        peer: Peer<'_>,
        req: Request<ProxyBody>,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<Response<PooledBody>, transport::Error>> + Send {
        Upstream::send(self, peer, req, timeout)
    }
}

/// What a call comes with besides its request: where a captured call was
/// going, and the deadline the caller set (or its trace is held to).
struct Given {
    egress: Option<SocketAddr>,
    outer: Option<tokio::time::Instant>,
}

pub(crate) struct Outbound<S = Upstream> {
    pub(crate) shared: Arc<Shared>,
    pub(crate) sender: S,
    /// Request bodies with a declared length up to this are buffered so they
    /// can be retried or sent to a fallback; larger ones stream through.
    pub(crate) replay_limit: u64,
    /// Deadlines of the calls the app serves, by trace id (recorded by the
    /// inbound side): its calls within a trace keep to them.
    pub(crate) deadlines: Arc<crate::http::deadline::Linked>,
}

impl<S: Sender> Outbound<S> {
    /// `egress`: the destination the app dialled, on a captured connection;
    /// a call for no mesh service goes there untouched.
    pub(crate) async fn handle(self: Arc<Self>, mut req: Request<Incoming>, egress: Option<SocketAddr>) -> BoxResponse {
        let started = Instant::now();
        if req.method() == http::Method::CONNECT {
            // Boxed: rare, and it would otherwise enlarge every call.
            let r = Box::pin(self.connect(req)).await;
            return finish(r, &Degraded::default(), false, "outbound", "-", "-", started);
        }
        let grpc = crate::grpc::is_grpc(&req);
        let mut degraded = Degraded::default();
        // Malformed requests get a 400 under the labels "-": what they name
        // must not grow the metrics.
        let (service, tenant) =
            match service_of(&req).and_then(|s| Ok((s, tenant_of(&req, &self.shared.tenant_header)?))) {
                Ok(st) => st,
                Err(e) => return finish(Err(e), &degraded, grpc, "outbound", "-", "-", started),
            };
        // What the caller asked for, and the deadline of the call its app is
        // serving within the same trace.
        let asked = match crate::http::deadline::carried(req.headers()) {
            Ok(d) => d.map(|d| tokio::time::Instant::now() + d),
            Err(e) => return finish(Err(e), &degraded, grpc, "outbound", "-", "-", started),
        };
        let outer = crate::http::deadline::sooner(asked, self.deadlines.of(req.headers()));
        ensure_traceparent(&mut req);
        let upgrade = transport::upgrade::client_side(&mut req);
        if self.shared.workload.is_some() {
            vouch_tenant(&mut req, self.shared.own_tenant.as_ref());
        }
        // A cheap clone (shared bytes); parsed only if the call is degraded.
        let traceparent = req.headers().get(&TRACEPARENT).cloned();
        let mut result = self.forward(&service, &tenant, grpc, req, &mut degraded, Given { egress, outer }).await;
        if let (Some(client), Ok(resp)) = (upgrade, &mut result) {
            transport::upgrade::splice(client, resp, "outbound");
        }
        // Only services the control plane knows get a label of their own.
        let label = match &result {
            Err(ProxyError::UnknownService(_) | ProxyError::NoDiscovery(_) | ProxyError::TooManyServices(_)) => "-",
            _ => service.as_str(),
        };
        let resp = finish(result, &degraded, grpc, "outbound", label, &tenant, started);
        if degraded.any() {
            let status = resp.status().as_u16();
            self.shared.degraded_call(traceparent.as_ref(), service, tenant, degraded.header_value(), status);
        }
        resp
    }

    /// Resolves the service and runs the call.
    async fn forward(
        &self,
        service: &str,
        tenant: &str,
        grpc: bool,
        req: Request<Incoming>,
        degraded: &mut Degraded,
        Given { egress, outer }: Given,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let svc = match self.resolve(service).await {
            Ok(svc) if svc.known => svc,
            // Captured and not for the mesh: to where the app meant it to go.
            _ if egress.is_some() => return self.egress(egress.expect("checked"), req).await,
            Ok(_) => return Err(ProxyError::UnknownService(service.to_string())),
            Err(e) => return Err(e),
        };
        degraded.stale_config = !self.shared.control_connected.load(std::sync::atomic::Ordering::Relaxed);
        call::run(self, &svc, tenant, grpc, req, degraded, outer).await
    }

    /// Sends a captured call for no mesh service to its original
    /// destination, as it is.
    #[cold]
    async fn egress(&self, dest: SocketAddr, req: Request<Incoming>) -> Result<Response<ProxyBody>, ProxyError> {
        metrics::counter!("weft_egress_requests_total").increment(1);
        let client = transport::body::ClientBodyWatch::new(req.body());
        let req = req.map(|b| transport::body::stream(b, &client));
        let resp = self.sender.send(Peer::plain(dest), req, None).await.map_err(ProxyError::from)?;
        Ok(resp.map(transport::body::reply))
    }

    /// A `CONNECT`: to an instance for a mesh service's `name:port`, else
    /// to the destination outside the mesh.
    #[cold]
    async fn connect(&self, mut req: Request<Incoming>) -> Result<BoxResponse, ProxyError> {
        // Only an exact service name: a CONNECT names a host, and
        // `api.example.com:443` must reach that host, not service `api` (as
        // the first label of an HTTP authority would).
        let mesh = req.uri().authority().and_then(|a| {
            let host = a.host().to_ascii_lowercase();
            let port = a.port_u16()?;
            weft_policy::names::is_service(host.as_bytes()).then_some((host, port))
        });
        if let Some((service, port)) = mesh
            && let Some(svc) = self.known(&service).await
        {
            let slot = transport::splice::slot("tunnel", "outbound").ok_or(ProxyError::TooManyStreams)?;
            return match self.open_tcp(&svc, port, None).await {
                Ok(stream) => Ok(transport::tunnel::splice(&mut req, slot, TokioIo::new(stream), "mesh")),
                Err(tcp::Refused::Peer(resp)) => Ok(resp.map(transport::body::reply)),
                Err(tcp::Refused::Proxy(e)) => Err(e),
            };
        }
        transport::tunnel::connect(req).await
    }

    /// The caller's region label, which endpoints are preferred in.
    pub(crate) fn region(&self) -> Option<&str> {
        self.shared.identity.labels.get("region").map(String::as_str)
    }
}
