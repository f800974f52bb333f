//! `CONNECT host:port` on the outbound listener: a TCP tunnel to a
//! destination outside the mesh (an app behind `HTTPS_PROXY`, say). The
//! sidecar resolves and dials the destination, answers 200, and splices the
//! client's connection with it byte for byte.

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::http::errors::ProxyError;
use crate::transport::body::{BoxResponse, full};

/// Opens the tunnel `req` asks for, or answers why not.
#[cold]
pub(crate) async fn connect(mut req: Request<Incoming>) -> Result<BoxResponse, ProxyError> {
    let Some(target) = req.uri().authority().filter(|a| a.port_u16().is_some()).cloned() else {
        return Err(ProxyError::BadAuthority(format!("CONNECT {} (host:port expected)", req.uri())));
    };
    let fail = |reason: String| ProxyError::Connect { addr: target.to_string(), reason };
    let addr = tokio::net::lookup_host(target.as_str())
        .await
        .map_err(|e| fail(format!("cannot resolve: {e}")))?
        .next()
        .ok_or_else(|| fail("resolves to no address".into()))?;
    let mut upstream = super::connect::dial(addr).await.map_err(|e| fail(e.to_string()))?;
    let client = hyper::upgrade::on(&mut req);
    metrics::counter!("weft_tunnels_total", "direction" => "outbound").increment(1);
    tokio::spawn(async move {
        match client.await {
            Ok(upgraded) => {
                let mut client = TokioIo::new(upgraded);
                if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                    tracing::debug!(%addr, error = %e, "tunnel ended with an error");
                }
            }
            Err(e) => tracing::debug!(%addr, error = %e, "the client left before its tunnel opened"),
        }
    });
    Ok(Response::builder().status(StatusCode::OK).body(full("")).expect("valid"))
}
