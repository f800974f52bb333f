//! The inbound path: peers' sidecars call this instance; forward to `--app`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::Request;
use hyper::body::Incoming;

use crate::TENANT_HEADER;
use crate::body::{BoxResponse, ProxyBody};
use crate::errors::is_grpc;
use crate::outbound::{Degraded, finish};
use crate::state::Shared;
use crate::upstream::Upstream;

pub struct Inbound {
    pub shared: Arc<Shared>,
    pub app: SocketAddr,
    pub upstream: Upstream,
}

impl Inbound {
    pub async fn handle(&self, req: Request<Incoming>) -> BoxResponse {
        let started = Instant::now();
        let grpc = is_grpc(&req);
        let tenant = req
            .headers()
            .get(TENANT_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .unwrap_or("default")
            .to_string();
        let result = self.upstream.send(self.app, req.map(ProxyBody::Left), None).await;
        finish(
            result.map(|r| r.map(ProxyBody::Left)),
            &Degraded::default(),
            grpc,
            "inbound",
            &self.shared.identity.service,
            &tenant,
            started,
        )
    }
}
