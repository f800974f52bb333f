//! The inbound path: peers' sidecars call this instance; forward to `--app`.

pub(crate) mod tcp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::Request;
use hyper::body::Incoming;

use http_body_util::Either;

use crate::grpc::is_grpc;
use crate::http::errors::ProxyError;
use weft_policy::model::AuthorizationPolicy;

use crate::http::errors::clip;
use crate::http::headers::{CLIENT_ID, single_host, take_internal, tenant_of};
use crate::http::response::{Degraded, finish};
use crate::outbound::replay::{declared_within, read_whole};
use crate::state::Shared;
use crate::tenancy;
use crate::transport;
use crate::transport::body::{BoxResponse, ClientBodyWatch, Tapped, full, stream};
use crate::transport::listener::{Caller, ConnState};
use crate::transport::pool::{Peer, Upstream};

pub(crate) struct Inbound {
    pub(crate) shared: Arc<Shared>,
    pub(crate) app: SocketAddr,
    pub(crate) upstream: Upstream,
    /// Longest wait for the app's response head: a hung app must not hold
    /// a tenant's slots (or the caller) forever.
    pub(crate) app_timeout: std::time::Duration,
    /// The app's ports besides `app`'s that mesh TCP may open
    /// (`--app-ports`).
    pub(crate) tcp_ports: Vec<u16>,
    /// Deadlines of the calls the app serves, by trace id, for the outbound
    /// side ([`crate::http::deadline`]).
    pub(crate) deadlines: Arc<crate::http::deadline::Linked>,
    /// The largest JSON body read for a token reservation.
    pub(crate) body_limit: u64,
}

impl Inbound {
    /// `conn` is the connection the call came on: it keeps the time limit
    /// of an HTTP/1.1 call's wait for the app (see `listener::Deadline`).
    pub(crate) async fn handle(self: Arc<Self>, mut req: Request<Incoming>, conn: Arc<ConnState>) -> BoxResponse {
        let started = Instant::now();
        let grpc = is_grpc(&req);
        let service = &self.shared.identity.service;
        let mut degraded = Degraded::default();
        let own = self.shared.table.load().services.get(service).cloned();
        let caller = conn.peer();
        let authz = own.as_ref().and_then(|s| s.authorization.as_deref());
        let vouched = take_internal(&mut req);
        // The time the caller left this call: none left, refused at once.
        let left = match crate::http::deadline::carried(req.headers()) {
            Ok(Some(left)) if left.is_zero() => {
                degraded.timeout = true;
                let e = ProxyError::DeadlineExceeded("it had passed when the call arrived");
                return finish(Err(e), &degraded, grpc, "inbound", service, "-", started);
            }
            Ok(left) => left,
            Err(e) => return finish(Err(e), &degraded, grpc, "inbound", service, "-", started),
        };
        if let Some(left) = left {
            self.deadlines.record_for(req.headers(), tokio::time::Instant::now() + left);
        }
        let tenant = match single_host(&req).and_then(|()| self.tenant(&mut req, caller, authz, vouched)) {
            Ok(t) => t,
            Err(e) => return finish(Err(e), &degraded, grpc, "inbound", service, "-", started),
        };
        if let Some(a) = authz {
            let who = caller.map(|c| c.id.service.as_str());
            if !a.allows(who, req.method(), req.uri().path(), &tenant) {
                let who = who.unwrap_or("-");
                metrics::counter!("weft_authz_denied_total", "service" => service.clone(), "caller" => who.to_string())
                    .increment(1);
                let err = ProxyError::Forbidden {
                    caller: caller.map_or_else(|| "a caller without an identity".into(), |c| c.id.to_string()),
                    method: req.method().to_string(),
                    path: clip(req.uri().path()),
                    service: service.clone(),
                };
                return finish(Err(err), &degraded, grpc, "inbound", service, &tenant, started);
            }
        }
        // The tenant's limits on this service, if it has any; a policy for
        // tenant `*` covers every tenant without one of its own, together.
        let limits = own.as_ref().filter(|s| !s.tenants.is_empty()).and_then(|s| {
            let policy = s.tenants.get_key_value(&tenant).or_else(|| s.tenants.get_key_value(tenancy::ANY_TENANT));
            policy.map(|(name, t)| (s.all_ready.len(), name, t))
        });
        let (mut guard, mut usage, mut buffered) = (None, None, None);
        if let Some((instances, policy, (limits, state))) = limits {
            let mut admitted = state.admit(limits, instances).map(|g| guard = g);
            if admitted.is_ok() && limits.has_tokens() {
                // Reserve what the call declares before it costs anything.
                let declared = match self.declared_tokens(&mut req).await {
                    Ok(d) => d,
                    Err(e) => return finish(Err(e), &degraded, grpc, "inbound", service, &tenant, started),
                };
                buffered = declared.1;
                let spender = tenancy::Spender::of(limits, caller.map(|c| c.id.service.as_str()), req.headers());
                admitted = state.reserve(limits, instances, spender, declared.0).map(|r| usage = Some(Box::new(r)));
            }
            if let Err(reason) = admitted {
                // Under the policy's tenant: `*` for the tenants it covers
                // (invented names must not grow the metrics).
                metrics::counter!("weft_tenant_shed_total", "service" => service.clone(), "tenant" => policy.clone(), "reason" => reason.reason())
                    .increment(1);
                degraded.shed = true;
                let err = ProxyError::Shed { reason, tenant: tenant.clone(), service: service.clone() };
                return finish(Err(err), &degraded, grpc, "inbound", service, &tenant, started);
            }
        }
        if let Some(c) = caller {
            req.headers_mut().insert(&CLIENT_ID, c.header.clone());
        }
        let upgrade = match transport::upgrade::requested(&req) {
            None => None,
            // A mesh TCP stream for one of the app's ports.
            Some(u) if u == crate::outbound::tcp::UPGRADE => {
                // Boxed: rare, and it would otherwise enlarge every call.
                let r = Box::pin(tcp::open(&self, &mut req)).await;
                return finish(r, &degraded, false, "inbound", service, &tenant, started);
            }
            Some(_) => Some(hyper::upgrade::on(&mut req)),
        };
        let client = ClientBodyWatch::new(req.body());
        let req = match buffered {
            Some(b) => req.map(|_| full(b)),
            None => req.map(|b| stream(b, &client)),
        };
        let mut sent = if let Some(left) = left.filter(|l| *l < self.app_timeout) {
            // The caller's deadline is sooner than the app timeout.
            self.upstream.send(Peer::plain(self.app), req, Some(left)).await
        } else if req.version() < http::Version::HTTP_2 {
            // The connection's sweeper keeps the time: no timer per call.
            conn.deadline(self.upstream.send(Peer::plain(self.app), req, None)).await.unwrap_or_else(|()| {
                Err(transport::Error::Timeout { addr: self.app.to_string(), ms: self.app_timeout.as_millis() as u64 })
            })
        } else {
            self.upstream.send(Peer::plain(self.app), req, Some(self.app_timeout)).await
        }
        .map_err(ProxyError::from);
        degraded.timeout |= matches!(sent, Err(ProxyError::Timeout { .. }));
        if let Err(e) = &mut sent
            && client.failed()
        {
            *e = ProxyError::ClientBody(e.to_string());
        }
        if let (Some(client), Ok(resp)) = (upgrade, &mut sent) {
            transport::upgrade::splice(client, resp, "inbound");
        }
        if let Some(r) = &mut usage {
            // Settled by the usage the app reports, here or in the trailers;
            // a call the app failed gives its reservation back.
            match &sent {
                Ok(resp) => match resp.headers().get(tenancy::USAGE_HEADER).and_then(tenancy::parse_usage) {
                    Some(n) => r.settle(n),
                    None if resp.status().is_server_error() => r.release(),
                    None => {}
                },
                Err(_) => r.release(),
            }
        }
        let result = sent.map(|resp| resp.map(|b| Either::Left(Tapped::new(b, guard, usage))));
        finish(result, &degraded, grpc, "inbound", service, &tenant, started)
    }

    /// The most tokens a call declares it may use: `x-weft-max-tokens`, or
    /// the `max_completion_tokens` / `max_tokens` of a JSON body no larger
    /// than the replay limit (then read here, and returned to be sent on).
    async fn declared_tokens(&self, req: &mut Request<Incoming>) -> Result<(Option<u64>, Option<Bytes>), ProxyError> {
        use http_body::Body;
        if let Some(v) = req.headers().get(tenancy::MAX_TOKENS_HEADER) {
            let n = v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok());
            return match n {
                Some(n) => Ok((Some(n), None)),
                None => Err(ProxyError::BadTokens(format!(
                    "{}: {}",
                    tenancy::MAX_TOKENS_HEADER,
                    clip(&String::from_utf8_lossy(v.as_bytes()))
                ))),
            };
        }
        let json = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|c| c.as_bytes().starts_with(b"application/json"));
        if !json || !declared_within(req.body(), self.body_limit) || req.body().is_end_stream() {
            return Ok((None, None));
        }
        let bytes = read_whole(req.body_mut()).await?;
        #[derive(serde::Deserialize)]
        struct Declared {
            max_tokens: Option<u64>,
            max_completion_tokens: Option<u64>,
        }
        // A body that is not such JSON declares nothing; the app judges it.
        let declared =
            serde_json::from_slice::<Declared>(&bytes).ok().and_then(|d| d.max_completion_tokens.or(d.max_tokens));
        Ok((declared, Some(bytes)))
    }

    /// The tenant the call counts under. Over mTLS: the tenant header when
    /// the caller is trusted to name tenants (`tenant_header_from`), else the
    /// caller's own tenant as its sidecar vouches for it, else `default`;
    /// the app is given that tenant in the header. Over plaintext there is
    /// no identity to check: the header is taken as it is.
    fn tenant<B>(
        &self,
        req: &mut Request<B>,
        caller: Option<&Caller>,
        authz: Option<&AuthorizationPolicy>,
        vouched: Option<http::HeaderValue>,
    ) -> Result<String, ProxyError> {
        let header = &self.shared.tenant_header;
        let Some(caller) = caller else { return tenant_of(req, header) };
        if authz.is_some_and(|a| a.trusts_tenant_header(&caller.id.service)) {
            return tenant_of(req, header);
        }
        let own = vouched.filter(|v| weft_policy::names::is_tenant(v.as_bytes()));
        let tenant =
            own.as_ref().map_or_else(|| "default".to_string(), |v| String::from_utf8_lossy(v.as_bytes()).into());
        match own {
            Some(v) => {
                req.headers_mut().insert(header, v);
            }
            None => {
                req.headers_mut().remove(header);
            }
        }
        Ok(tenant)
    }
}
