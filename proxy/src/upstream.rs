//! Pooled HTTP clients to upstreams: HTTP/1.1 for HTTP/1.1 callers and h2c
//! (prior knowledge) for HTTP/2 callers, so gRPC, streaming and trailers pass
//! through end to end.

use std::net::SocketAddr;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderMap, HeaderValue, Request, Response, Uri, Version, header};
use hyper::body::Incoming;

use crate::body::ProxyBody;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::errors::ProxyError;

pub struct Upstream {
    h1: Client<HttpConnector, ProxyBody>,
    h2: Client<HttpConnector, ProxyBody>,
}

impl Default for Upstream {
    fn default() -> Self {
        Self::new()
    }
}

impl Upstream {
    pub fn new() -> Upstream {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        connector.set_keepalive(Some(Duration::from_secs(30)));
        let h1 = Client::builder(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(connector.clone());
        let h2 = Client::builder(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .http2_only(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Upstream { h1, h2 }
    }

    /// Sends `req` to `addr`, keeping the caller's HTTP version. The timeout,
    /// when set, covers the time to the response head; when it fires, the
    /// upstream request is dropped, which cancels it.
    pub async fn send(
        &self,
        addr: SocketAddr,
        authority: &Authority,
        mut req: Request<ProxyBody>,
        timeout: Option<Duration>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let h2 = req.version() == Version::HTTP_2;
        strip_hop_by_hop(req.headers_mut());
        if !h2
            && !req.headers().contains_key(header::HOST)
            && let Some(a) = req.uri().authority()
            && let Ok(v) = HeaderValue::from_str(a.as_str())
        {
            req.headers_mut().insert(header::HOST, v);
        }
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(authority.clone());
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        *req.uri_mut() = Uri::from_parts(parts).expect("valid uri");
        let fut = if h2 {
            self.h2.request(req)
        } else {
            *req.version_mut() = Version::HTTP_11;
            self.h1.request(req)
        };
        let result = match timeout {
            Some(t) => match tokio::time::timeout(t, fut).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(ProxyError::Timeout { addr: addr.to_string(), ms: t.as_millis() as u64 });
                }
            },
            None => fut.await,
        };
        match result {
            Ok(mut resp) => {
                strip_hop_by_hop(resp.headers_mut());
                Ok(resp)
            }
            Err(e) if e.is_connect() => Err(ProxyError::Connect { addr: addr.to_string(), reason: error_chain(&e) }),
            Err(e) if let Some(reason) = h2_reset(&e) => {
                Err(ProxyError::Reset { addr: addr.to_string(), reason: format!("{reason:?}") })
            }
            Err(e) => Err(ProxyError::Upstream { addr: addr.to_string(), reason: error_chain(&e) }),
        }
    }
}

/// A socket address as a URI authority.
pub fn authority(addr: SocketAddr) -> Authority {
    Authority::try_from(addr.to_string()).expect("a socket address is an authority")
}

/// The HTTP/2 reset code, when the upstream reset the stream or connection.
fn h2_reset(e: &(dyn std::error::Error + 'static)) -> Option<h2::Reason> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.reason();
        }
        cur = err.source();
    }
    None
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Removes connection-level headers, which must not be forwarded.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    if let Some(conn) = h.get(header::CONNECTION).cloned()
        && let Ok(list) = conn.to_str()
    {
        for name in list.split(',') {
            let name = name.trim();
            if !name.is_empty() && !name.eq_ignore_ascii_case("close") && !name.eq_ignore_ascii_case("keep-alive") {
                h.remove(name);
            }
        }
    }
    for name in [header::CONNECTION, header::TRANSFER_ENCODING, header::UPGRADE, header::PROXY_AUTHENTICATE] {
        h.remove(name);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
    if h.get(header::TE).is_some_and(|v| v != "trailers") {
        h.remove(header::TE);
    }
}
