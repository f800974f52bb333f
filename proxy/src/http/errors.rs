//! Errors the sidecar itself answers with, and the one place that maps them
//! to HTTP and gRPC responses: `x-weft-error: <reason>`, a short body, and
//! for gRPC callers a trailers-only response with a real `grpc-status`.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

use crate::transport;
use crate::transport::body::{BoxResponse, full};

#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    #[error("unknown service '{0}': no route and no endpoint is registered for it")]
    UnknownService(String),
    #[error("service '{0}' has no ready endpoints")]
    NoEndpoints(String),
    #[error("no discovery answer for service '{0}' yet (is the control plane reachable?)")]
    NoDiscovery(String),
    #[error("request has no authority: send a Host header or an absolute URI")]
    NoAuthority,
    #[error("'{0}' is not a valid service name")]
    BadAuthority(String),
    #[error("the request has more than one Host header")]
    DuplicateHost,
    #[error("tenant header value '{0}' is not a tenant name (1-63 of: lowercase letters, digits, '-', '_', '.')")]
    BadTenant(String),
    #[error("the client's request body broke off: {0}")]
    ClientBody(String),
    #[error("upstream {addr} timed out after {ms} ms")]
    Timeout { addr: String, ms: u64 },
    #[error("cannot reach upstream {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("upstream {addr} reset the stream: {reason}")]
    Reset { addr: String, reason: String },
    #[error("upstream {addr} failed: {reason}")]
    Upstream { addr: String, reason: String },
    #[error("subscription limit reached; cannot route to '{0}'")]
    TooManyServices(String),
    #[error("service '{0}' is over its max_concurrent_requests")]
    Overloaded(String),
    #[error("cannot read the request body: {0}")]
    BadRequestBody(String),
    #[error("tenant '{tenant}' is over its {} share at this instance of '{service}'", shed_what(.reason))]
    Shed { reason: crate::tenancy::Shed, tenant: String, service: String },
    #[error("{caller} may not call {method} {path} of service '{service}' (its authorization policy)")]
    Forbidden { caller: String, method: String, path: String, service: String },
    #[error("TCP to port {port} of '{service}' is not served: {why}")]
    TcpPort { port: String, service: String, why: &'static str },
    #[error("not a deadline: {0}")]
    BadDeadline(String),
    #[error("not a token count: {0}")]
    BadTokens(String),
    #[error("the call's deadline has passed ({0})")]
    DeadlineExceeded(&'static str),
    #[error("too many open streams (tunnels, upgrades, TCP) at this sidecar")]
    TooManyStreams,
    #[error("fault injected by route policy")]
    FaultAbort { status: StatusCode, grpc_status: Option<u16> },
}

impl ProxyError {
    /// The `x-weft-error` reason.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            ProxyError::UnknownService(_) => "unknown-service",
            ProxyError::NoEndpoints(_) => "no-endpoints",
            ProxyError::NoDiscovery(_) => "no-discovery",
            ProxyError::NoAuthority
            | ProxyError::BadAuthority(_)
            | ProxyError::DuplicateHost
            | ProxyError::BadTenant(_)
            | ProxyError::ClientBody(_)
            | ProxyError::BadDeadline(_)
            | ProxyError::BadTokens(_) => "bad-request",
            ProxyError::Timeout { .. } | ProxyError::DeadlineExceeded(_) => "timeout",
            ProxyError::Connect { .. } => "connect-failure",
            ProxyError::Upstream { .. } => "upstream-failure",
            ProxyError::Reset { .. } => "reset",
            ProxyError::TooManyServices(_) => "too-many-services",
            ProxyError::Overloaded(_) | ProxyError::TooManyStreams => "overloaded",
            ProxyError::FaultAbort { .. } => "fault-injected",
            ProxyError::Shed { reason, .. } => reason.reason(),
            ProxyError::BadRequestBody(_) => "bad-request",
            ProxyError::Forbidden { .. } => "forbidden",
            ProxyError::TcpPort { .. } => "tcp-port",
        }
    }

    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ProxyError::FaultAbort { status, .. } => *status,
            ProxyError::Shed { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ProxyError::TcpPort { .. } => StatusCode::NOT_FOUND,
            ProxyError::NoAuthority
            | ProxyError::BadAuthority(_)
            | ProxyError::BadRequestBody(_)
            | ProxyError::DuplicateHost
            | ProxyError::BadTenant(_)
            | ProxyError::ClientBody(_)
            | ProxyError::BadDeadline(_)
            | ProxyError::BadTokens(_) => StatusCode::BAD_REQUEST,
            ProxyError::Timeout { .. } | ProxyError::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Connect { .. } | ProxyError::Upstream { .. } | ProxyError::Reset { .. } => {
                StatusCode::BAD_GATEWAY
            }
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The gRPC status code for gRPC callers.
    pub(crate) fn grpc_status(&self) -> u16 {
        match self {
            ProxyError::FaultAbort { grpc_status: Some(g), .. } => *g,
            ProxyError::Shed { .. } => 8,      // RESOURCE_EXHAUSTED
            ProxyError::Forbidden { .. } => 7, // PERMISSION_DENIED
            ProxyError::NoAuthority
            | ProxyError::BadAuthority(_)
            | ProxyError::DuplicateHost
            | ProxyError::BadTenant(_)
            | ProxyError::BadRequestBody(_)
            | ProxyError::ClientBody(_)
            | ProxyError::BadDeadline(_)
            | ProxyError::BadTokens(_) => 3, // INVALID_ARGUMENT
            ProxyError::Timeout { .. } | ProxyError::DeadlineExceeded(_) => 4, // DEADLINE_EXCEEDED
            ProxyError::UnknownService(_) => 5, // NOT_FOUND
            _ => 14,                           // UNAVAILABLE
        }
    }

    pub(crate) fn into_response(self, grpc: bool) -> BoxResponse {
        let message = self.to_string();
        let mut resp = if grpc {
            let mut r = Response::new(full(Bytes::new()));
            let h = r.headers_mut();
            h.insert("content-type", HeaderValue::from_static("application/grpc"));
            h.insert("grpc-status", HeaderValue::from(self.grpc_status()));
            if let Ok(v) = HeaderValue::from_str(&percent_encode(&message)) {
                h.insert("grpc-message", v);
            }
            r
        } else {
            let mut r = Response::new(full(Bytes::from(format!("weft: {message}\n"))));
            *r.status_mut() = self.status();
            r.headers_mut().insert("content-type", HeaderValue::from_static("text/plain; charset=utf-8"));
            r
        };
        resp.headers_mut().insert("x-weft-error", HeaderValue::from_static(self.reason()));
        resp
    }
}

fn shed_what(reason: &crate::tenancy::Shed) -> &'static str {
    match reason {
        crate::tenancy::Shed::RateLimited => "rate limit",
        crate::tenancy::Shed::Concurrency => "concurrency",
        crate::tenancy::Shed::TokenQuota => "token quota",
    }
}

/// A client-supplied value cut to a length fit for an error message.
pub(crate) fn clip(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// What gRPC percent-encodes in `grpc-message`: everything outside
/// printable ASCII, and `%` itself.
const GRPC_MESSAGE: &AsciiSet = &CONTROLS.add(b'%');

fn percent_encode(s: &str) -> String {
    utf8_percent_encode(s, GRPC_MESSAGE).to_string()
}

impl From<transport::Error> for ProxyError {
    fn from(e: transport::Error) -> ProxyError {
        match e {
            transport::Error::Connect { addr, reason } => ProxyError::Connect { addr, reason },
            transport::Error::Reset { addr, reason } => ProxyError::Reset { addr, reason },
            transport::Error::Upstream { addr, reason } => ProxyError::Upstream { addr, reason },
            transport::Error::Timeout { addr, ms } => ProxyError::Timeout { addr, ms },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(percent_encode("no ready endpoints: 100% é"), "no ready endpoints: 100%25 %C3%A9");
    }
}
