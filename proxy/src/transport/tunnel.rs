//! `CONNECT host:port` on the outbound listener: a TCP tunnel. For a mesh
//! service's name the stream goes to an instance
//! ([`crate::outbound::tcp`]); for anything else (an app behind
//! `HTTPS_PROXY`, say) the sidecar resolves and dials the destination. Either
//! way it answers 200 and splices the client's connection with the stream,
//! byte for byte.

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::http::errors::ProxyError;
use crate::transport::body::{BoxResponse, full};

/// Opens the tunnel `req` asks for outside the mesh, or answers why not.
#[cold]
pub(crate) async fn connect(mut req: Request<Incoming>) -> Result<BoxResponse, ProxyError> {
    let Some(target) = req.uri().authority().filter(|a| a.port_u16().is_some()).cloned() else {
        return Err(ProxyError::BadAuthority(format!("CONNECT {} (host:port expected)", req.uri())));
    };
    let slot = super::splice::slot("tunnel", "outbound").ok_or(ProxyError::TooManyStreams)?;
    let fail = |reason: String| ProxyError::Connect { addr: target.to_string(), reason };
    let addr = tokio::net::lookup_host(target.as_str())
        .await
        .map_err(|e| fail(format!("cannot resolve: {e}")))?
        .next()
        .ok_or_else(|| fail("resolves to no address".into()))?;
    let upstream = super::connect::dial(addr).await.map_err(|e| fail(e.to_string()))?;
    Ok(splice(&mut req, slot, upstream, "egress"))
}

/// Answers 200 to the CONNECT `req` and, once the client's side is handed
/// over, splices it with `upstream` until either side closes.
pub(crate) fn splice<U>(
    req: &mut Request<Incoming>,
    slot: super::splice::Slot,
    upstream: U,
    to: &'static str,
) -> BoxResponse
where
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    metrics::counter!("weft_tunnels_total", "direction" => "outbound", "to" => to).increment(1);
    super::splice::after_upgrade(slot, hyper::upgrade::on(req), upstream);
    Response::builder().status(StatusCode::OK).body(full("")).expect("valid")
}
