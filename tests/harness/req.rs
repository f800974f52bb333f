//! Requests in one line: `Req::post(addr, "inference", "/run", body)
//! .header("idempotency-key", "k1").send().await`, answered as a
//! [`Response`] (status, headers, body), or opened as a stream. And the
//! readings tests make of answers and metrics.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Status, headers and body (as text) of an answer.
pub type Response = (u16, http::HeaderMap, String);

/// How long any one request may take before the test fails it.
const REQUEST_LIMIT: Duration = Duration::from_secs(15);

/// An HTTP/1.1 request to a sidecar (or an app), with the Host naming the
/// service.
#[derive(Debug, Clone)]
pub struct Req {
    method: http::Method,
    addr: SocketAddr,
    host: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Bytes,
}

impl Req {
    pub fn get(addr: SocketAddr, host: &str, path: &str) -> Req {
        Req {
            method: http::Method::GET,
            addr,
            host: host.into(),
            path: path.into(),
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    pub fn post(addr: SocketAddr, host: &str, path: &str, body: impl Into<Bytes>) -> Req {
        Req { method: http::Method::POST, body: body.into(), ..Req::get(addr, host, path) }
    }

    pub fn method(mut self, method: &str) -> Req {
        self.method = method.parse().expect("a method");
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Req {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn headers(mut self, headers: &[(&str, &str)]) -> Req {
        self.headers.extend(headers.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }

    fn build(&self) -> http::Request<Full<Bytes>> {
        let mut b = http::Request::builder()
            .method(self.method.clone())
            .uri(format!("http://{}{}", self.addr, self.path))
            .header("host", &self.host);
        for (k, v) in &self.headers {
            b = b.header(k, v);
        }
        b.body(Full::new(self.body.clone())).expect("a valid request")
    }

    /// Sends on a connection of its own; the whole answer.
    pub async fn send(&self) -> Result<Response, String> {
        self.send_on(&pooled_client()).await
    }

    /// Sends on `client`; the whole answer.
    pub async fn send_on(&self, client: &Client<HttpConnector, Full<Bytes>>) -> Result<Response, String> {
        let resp = self.open_on(client).await?;
        let (parts, body) = resp.into_parts();
        let body = tokio::time::timeout(REQUEST_LIMIT, body.collect())
            .await
            .map_err(|_| "body timed out".to_string())?
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((parts.status.as_u16(), parts.headers, String::from_utf8_lossy(&body).into()))
    }

    /// Sends on `client` and returns as soon as the head is in: the body is
    /// the caller's to read frame by frame.
    pub async fn open_on(
        &self,
        client: &Client<HttpConnector, Full<Bytes>>,
    ) -> Result<http::Response<Incoming>, String> {
        tokio::time::timeout(REQUEST_LIMIT, client.request(self.build()))
            .await
            .map_err(|_| "request timed out".to_string())?
            .map_err(|e| e.to_string())
    }

    /// [`Req::open_on`] on a connection of its own.
    pub async fn open(&self) -> Result<http::Response<Incoming>, String> {
        self.open_on(&pooled_client()).await
    }
}

/// A client with its own pool (tests that need fresh connections make one).
pub fn pooled_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>()
}

/// Which instance answered, from the example backend's `x-served-by`.
pub fn served_by(r: &Response) -> String {
    header(r, "x-served-by")
}

/// The degraded marks of an answer (`x-weft-degraded`), "" when none.
pub fn degraded(r: &Response) -> String {
    header(r, "x-weft-degraded")
}

/// A response header as text, "" when absent.
pub fn header(r: &Response, name: &str) -> String {
    r.1.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string()
}

/// The sum of the Prometheus sample lines of `name` that contain every
/// one of `needles` (label pairs such as `service="inference"`).
pub fn metric(metrics: &str, name: &str, needles: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(['{', ' '])))
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
