//! Opaque TCP to a mesh service: an app's captured connection to a
//! service's virtual address ([`crate::dns`]), or a `CONNECT service:port`.
//!
//! A connection to the address of a known service's instance goes to that
//! instance.
//!
//! The stream goes to an instance's sidecar like any call — balanced by P2C,
//! through each endpoint's breaker, over mTLS where the endpoint speaks it
//! (the callee then knows and authorizes the caller) — as an HTTP/1.1
//! upgrade to `weft-tcp` naming the app port in `x-weft-tcp-port`. The
//! callee's sidecar answers `101` and splices it to that port of its app, if
//! the port is one it serves (`--app`'s, and `--app-ports`). A connection
//! that fails, or an instance answering 5xx, counts against that endpoint
//! and the next one is tried; no byte of the app's has been sent by then.

use std::net::IpAddr;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Request, Response, StatusCode, header};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{Outbound, Sender, balance};
use crate::config::Service;
use crate::health::breaker::Admission;
use crate::http::errors::ProxyError;
use crate::transport::body::full;
use crate::transport::pool::PooledBody;

/// The `Upgrade` protocol of a mesh TCP stream.
pub(crate) const UPGRADE: &str = "weft-tcp";
/// The app port a mesh TCP stream is for.
pub(crate) static PORT_HEADER: HeaderName = HeaderName::from_static("x-weft-tcp-port");
/// Instances tried for one stream at most.
const MAX_TRIES: usize = 3;
/// How long one instance may take to open the stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a stream was not opened.
pub(crate) enum Refused {
    /// No instance could be reached (or none is ready, or the service is
    /// unknown).
    Proxy(ProxyError),
    /// An instance's sidecar said no (a 4xx: the port is not served, the
    /// caller is not authorized): its answer, for a CONNECT to pass on.
    Peer(Response<PooledBody>),
}

impl<S: Sender> Outbound<S> {
    /// Opens a byte stream to `port` of an instance of `svc` (a known
    /// service): any, or the one at `only` (the app dialled that instance's
    /// address).
    pub(crate) async fn open_tcp(&self, svc: &Service, port: u16, only: Option<IpAddr>) -> Result<Upgraded, Refused> {
        let service = svc.name.as_str();
        let pinned: Vec<_>;
        let endpoints = match only {
            Some(ip) => {
                pinned = svc.all_ready.iter().filter(|e| e.addr.ip() == ip).cloned().collect();
                &pinned
            }
            None => &*svc.all_ready,
        };
        let mut tried = Vec::with_capacity(MAX_TRIES);
        let mut last = ProxyError::NoEndpoints(service.to_string());
        for _ in 0..MAX_TRIES.min(endpoints.len()) {
            let now = crate::clock::now_ms();
            let Some(ep) = balance::p2c(endpoints, &tried, now, self.region()).endpoint else { break };
            if tried.contains(&ep.addr) {
                break;
            }
            tried.push(ep.addr);
            let admission = ep.health.breaker.admit(now, &svc.settings);
            if admission == Admission::Refused {
                continue;
            }
            let started = std::time::Instant::now();
            match self.sender.send(ep.peer(service), request(service, port), Some(OPEN_TIMEOUT)).await {
                Ok(mut resp) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                    // The time to open the stream is the endpoint's latency.
                    ep.health.observe_rtt(started.elapsed());
                    ep.health.breaker.record_success(admission);
                    return match hyper::upgrade::on(&mut resp).await {
                        Ok(up) => Ok(up),
                        Err(e) => Err(Refused::Proxy(ProxyError::Upstream {
                            addr: ep.addr.to_string(),
                            reason: format!("the stream did not open: {e}"),
                        })),
                    };
                }
                Ok(resp) if resp.status().is_server_error() => {
                    svc.endpoint_failed(&ep, admission, now);
                    last = ProxyError::Upstream {
                        addr: ep.addr.to_string(),
                        reason: format!("answered {}", resp.status()),
                    };
                }
                Ok(resp) => return Err(Refused::Peer(resp)),
                Err(e) => {
                    svc.endpoint_failed(&ep, admission, now);
                    last = e.into();
                }
            }
        }
        Err(Refused::Proxy(last))
    }
}

impl<S> Outbound<S> {
    /// The mesh service an address belongs to: a service's virtual address
    /// ([`crate::dns`]), or the address of an endpoint of a service this
    /// sidecar knows (then that instance, and only it, is the one to reach).
    pub(crate) fn service_at(&self, vips: &crate::dns::Vips, ip: IpAddr) -> Option<(String, Option<IpAddr>)> {
        if let Some(service) = vips.service(ip) {
            return Some((service, None));
        }
        let table = self.shared.table.load();
        table
            .services
            .values()
            .find(|s| s.known && s.endpoints.iter().any(|e| e.addr.ip() == ip))
            .map(|s| (s.name.clone(), Some(ip)))
    }
}

/// The upgrade request for `port` of an instance of `service`.
fn request(service: &str, port: u16) -> Request<crate::transport::body::ProxyBody> {
    Request::builder()
        .version(http::Version::HTTP_11)
        .uri("/")
        .header(header::HOST, service)
        .header(header::UPGRADE, UPGRADE)
        .header(header::CONNECTION, "upgrade")
        .header(&PORT_HEADER, HeaderValue::from(port))
        .body(full(""))
        .expect("valid request")
}

/// A captured connection for a service's virtual address: spliced with a
/// stream to an instance, or closed when none can be opened.
pub(crate) async fn forward<S: Sender>(
    out: &Outbound<S>,
    client: TcpStream,
    (service, only): (String, Option<IpAddr>),
    port: u16,
) {
    metrics::counter!("weft_tcp_connections_total", "direction" => "outbound", "detected" => "mesh").increment(1);
    let Some(slot) = crate::transport::splice::slot("mesh", "outbound") else { return };
    let Some(svc) = out.known(&service).await else {
        metrics::counter!("weft_tcp_connect_failures_total", "direction" => "outbound").increment(1);
        return tracing::debug!(service, port, "mesh TCP: the service is gone");
    };
    let upstream = match out.open_tcp(&svc, port, only).await {
        Ok(up) => up,
        // An address of the instance's host, and a port its sidecar does
        // not serve: something else on that host, reached as it was.
        Err(Refused::Peer(resp)) if only.is_some() && resp.status() == StatusCode::NOT_FOUND => {
            let to = std::net::SocketAddr::new(only.expect("checked"), port);
            drop(slot);
            return crate::transport::opaque::forward(client, to, "outbound", "opaque").await;
        }
        Err(why) => {
            let reason = match why {
                Refused::Proxy(e) => e.to_string(),
                Refused::Peer(resp) => format!("the instance answered {}", resp.status()),
            };
            metrics::counter!("weft_tcp_connect_failures_total", "direction" => "outbound").increment(1);
            tracing::debug!(service, port, %reason, "mesh TCP: no stream");
            return;
        }
    };
    crate::transport::splice::run(slot, client, TokioIo::new(upstream)).await;
}
