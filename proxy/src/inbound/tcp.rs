//! The callee's side of mesh TCP ([`crate::outbound::tcp`]): a caller's
//! sidecar asks, by an upgrade to `weft-tcp`, for a byte stream to one of
//! the app's ports. Only the ports the sidecar serves are opened (`--app`'s
//! and `--app-ports`), after the call has passed the same identity,
//! authorization and tenant checks as any other.

use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;

use super::Inbound;
use crate::http::errors::{ProxyError, clip};
use crate::outbound::tcp::{PORT_HEADER, UPGRADE};
use crate::transport::body::{BoxResponse, full};

/// Dials the app's port the call names, answers `101` and splices the two.
#[cold]
pub(crate) async fn open(inbound: &Inbound, req: &mut Request<Incoming>) -> Result<BoxResponse, ProxyError> {
    let service = &inbound.shared.identity.service;
    let refuse = |port: String, why| ProxyError::TcpPort { port, service: service.clone(), why };
    let port = match req.headers().get(&PORT_HEADER) {
        None => return Err(refuse("-".into(), "the call names no port (x-weft-tcp-port)")),
        Some(v) => {
            let text = String::from_utf8_lossy(v.as_bytes());
            text.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| refuse(clip(&text), "not a port number"))?
        }
    };
    if port != inbound.app.port() && !inbound.tcp_ports.contains(&port) {
        return Err(refuse(port.to_string(), "not the app's port nor one of --app-ports"));
    }
    let slot = crate::transport::splice::slot("mesh", "inbound").ok_or(ProxyError::TooManyStreams)?;
    let to = std::net::SocketAddr::new(inbound.app.ip(), port);
    let app = crate::transport::connect::dial(to)
        .await
        .map_err(|e| ProxyError::Connect { addr: to.to_string(), reason: e.to_string() })?;
    metrics::counter!("weft_tcp_connections_total", "direction" => "inbound", "detected" => "mesh").increment(1);
    crate::transport::splice::after_upgrade(slot, hyper::upgrade::on(req), app);
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, UPGRADE)
        .header(header::CONNECTION, "upgrade")
        .body(full(""))
        .expect("valid response"))
}
