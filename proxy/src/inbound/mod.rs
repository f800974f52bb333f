//! The inbound path: peers' sidecars call this instance; forward to `--app`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::Request;
use hyper::body::Incoming;

use http_body_util::Either;

use crate::grpc::is_grpc;
use crate::http::errors::ProxyError;
use crate::http::headers::{set_client_id, single_host, tenant_of};
use crate::http::response::{Degraded, finish};
use crate::state::Shared;
use crate::tenancy;
use crate::transport;
use crate::transport::body::{BoxResponse, ClientBodyWatch, Tapped, stream};
use crate::transport::listener::ConnState;
use crate::transport::pool::{Peer, Upstream};

pub(crate) struct Inbound {
    pub(crate) shared: Arc<Shared>,
    pub(crate) app: SocketAddr,
    pub(crate) upstream: Upstream,
    /// Longest wait for the app's response head: a hung app must not hold
    /// a tenant's slots (or the caller) forever.
    pub(crate) app_timeout: std::time::Duration,
}

impl Inbound {
    /// `conn` is the connection the call came on: it keeps the time limit
    /// of an HTTP/1.1 call's wait for the app (see `listener::Deadline`).
    pub(crate) async fn handle(self: Arc<Self>, mut req: Request<Incoming>, conn: Arc<ConnState>) -> BoxResponse {
        let started = Instant::now();
        let grpc = is_grpc(&req);
        let service = &self.shared.identity.service;
        let mut degraded = Degraded::default();
        let tenant = match single_host(&req).and_then(|()| tenant_of(&req, &self.shared.tenant_header)) {
            Ok(t) => t,
            Err(e) => return finish(Err(e), &degraded, grpc, "inbound", service, "-", started),
        };
        // The tenant's limits on this service, if it has any.
        let own = self.shared.table.load().services.get(service).cloned();
        let limits = own.as_ref().and_then(|s| s.tenants.get(&tenant).map(|t| (s.all_ready.len(), t)));
        let (mut guard, mut usage) = (None, None);
        if let Some((instances, (limits, state))) = limits {
            match state.admit(limits, instances) {
                Ok(g) => {
                    guard = g;
                    if limits.tokens_per_minute > 0 {
                        usage = Some(state.clone());
                    }
                }
                Err(reason) => {
                    metrics::counter!("weft_tenant_shed_total", "service" => service.clone(), "tenant" => tenant.clone(), "reason" => reason.reason())
                        .increment(1);
                    degraded.shed = true;
                    let err = ProxyError::Shed { reason, tenant: tenant.clone(), service: service.clone() };
                    return finish(Err(err), &degraded, grpc, "inbound", service, &tenant, started);
                }
            }
        }
        set_client_id(&mut req, conn.peer().map(|c| &c.header));
        let client = ClientBodyWatch::new(req.body());
        let req = req.map(|b| stream(b, &client));
        let mut sent = if req.version() < http::Version::HTTP_2 {
            // The connection's sweeper keeps the time: no timer per call.
            conn.deadline(self.upstream.send(Peer::plain(self.app), req, None)).await.unwrap_or_else(|()| {
                Err(transport::Error::Timeout { addr: self.app.to_string(), ms: self.app_timeout.as_millis() as u64 })
            })
        } else {
            self.upstream.send(Peer::plain(self.app), req, Some(self.app_timeout)).await
        }
        .map_err(ProxyError::from);
        if let Err(e) = &mut sent
            && client.failed()
        {
            *e = ProxyError::ClientBody(e.to_string());
        }
        let result = sent.map(|resp| {
            if let Some(state) = &usage
                && let Some(n) = resp.headers().get(tenancy::USAGE_HEADER).and_then(tenancy::parse_usage)
            {
                state.add_usage(n);
            }
            resp.map(|b| Either::Left(Tapped::new(b, guard, usage)))
        });
        finish(result, &degraded, grpc, "inbound", service, &tenant, started)
    }
}
