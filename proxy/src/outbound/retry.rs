//! What a try's outcome means: a failure of the endpoint (for the breaker),
//! something the rule's retry conditions retry, a call the callee's sidecar
//! shed; and how long to wait before the next try.

use std::time::Duration;

use rand::Rng;
use weft_policy::model::{RetryCondition, RetryOn};

use crate::http::errors::ProxyError;
use crate::transport::pool::PooledBody;

/// What one try produced.
pub(crate) type Outcome = Result<http::Response<PooledBody>, ProxyError>;

/// What an instance that sheds a call counts as, latency-wise.
pub(crate) const SHED_PENALTY: Duration = Duration::from_millis(50);

/// gRPC status of a trailers-only answer, if any.
fn grpc_status(resp: &http::Response<PooledBody>) -> Option<u32> {
    crate::grpc::status(resp.headers())
}

/// What counts against an endpoint: 5xx, connect failure, reset, timeout,
/// gRPC UNAVAILABLE (and an injected abort, which the breaker is then told
/// to ignore).
pub(crate) fn is_failure(o: &Outcome) -> bool {
    match o {
        Ok(resp) => answer_failed(resp),
        Err(
            ProxyError::Connect { .. }
            | ProxyError::Reset { .. }
            | ProxyError::Timeout { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::FaultAbort { .. },
        ) => true,
        Err(_) => false,
    }
}

/// An answer that counts against its endpoint: 5xx, or gRPC UNAVAILABLE.
pub(crate) fn answer_failed(resp: &http::Response<PooledBody>) -> bool {
    resp.status().is_server_error() || grpc_status(resp) == Some(crate::grpc::UNAVAILABLE)
}

/// Whether a try's outcome is retried under `on`.
pub(crate) fn should_retry(on: RetryOn, o: &Outcome) -> bool {
    use RetryCondition::*;
    let status = |s: http::StatusCode| {
        (on.contains(ServerError) && s.is_server_error())
            || (on.contains(GatewayError) && matches!(s.as_u16(), 502..=504))
    };
    match o {
        Ok(resp) => {
            status(resp.status())
                || grpc_status(resp).is_some_and(|g| on.retries_grpc(g))
                || callee_error(resp).is_some_and(|c| on.contains(c))
        }
        Err(ProxyError::FaultAbort { status: s, grpc_status }) => {
            status(*s) || grpc_status.is_some_and(|g| on.retries_grpc(u32::from(g)))
        }
        Err(ProxyError::Connect { .. }) => on.contains(ConnectFailure),
        Err(ProxyError::Reset { .. }) => on.contains(Reset),
        Err(ProxyError::Timeout { .. }) => on.contains(ServerError) || on.contains(GatewayError),
        Err(ProxyError::Upstream { .. }) => on.contains(Reset) || on.contains(ServerError),
        Err(_) => false,
    }
}

/// What a 502 from the callee's sidecar says happened between it and its
/// app: in a mesh a caller sees its callee's resets and refused connections
/// this way, not on its own socket, and `reset` and `connect-failure` mean
/// them too.
fn callee_error(resp: &http::Response<PooledBody>) -> Option<RetryCondition> {
    if resp.status() != http::StatusCode::BAD_GATEWAY {
        return None;
    }
    match resp.headers().get("x-weft-error")?.as_bytes() {
        b"reset" | b"upstream-failure" => Some(RetryCondition::Reset),
        b"connect-failure" => Some(RetryCondition::ConnectFailure),
        _ => None,
    }
}

/// A 429 from the callee's sidecar for a tenant limit (the app never saw
/// it, so the call may go elsewhere whatever its method).
pub(crate) fn is_callee_shed(resp: &http::Response<PooledBody>) -> bool {
    resp.status() == http::StatusCode::TOO_MANY_REQUESTS
        && resp
            .headers()
            .get("x-weft-error")
            .is_some_and(|v| matches!(v.as_bytes(), b"rate-limited" | b"tenant-concurrency" | b"token-quota"))
}

/// A gRPC response whose status is not in its head (not trailers-only), so
/// it will come in trailers at the end of the body.
pub(crate) fn status_in_trailers(resp: &http::Response<PooledBody>) -> bool {
    resp.status() == http::StatusCode::OK && grpc_status(resp).is_none() && !http_body::Body::is_end_stream(resp.body())
}

/// Exponential backoff with full jitter before retry number `n` (1-based):
/// up to 25 ms, 50 ms, 100 ms ... 1.6 s.
pub(crate) fn backoff(n: u32) -> Duration {
    let cap = 25u64 << n.saturating_sub(1).min(6);
    Duration::from_millis(rand::rng().random_range(0..=cap))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, grpc: Option<u32>) -> Outcome {
        answer_with(status, grpc, None)
    }

    fn answer_with(status: u16, grpc: Option<u32>, weft_error: Option<&str>) -> Outcome {
        let mut b = http::Response::builder().status(status);
        if let Some(e) = weft_error {
            b = b.header("x-weft-error", e);
        }
        if let Some(g) = grpc {
            b = b.header("grpc-status", g);
        }
        Ok(b.body(PooledBody::full("")).unwrap())
    }

    fn err(e: ProxyError) -> Outcome {
        Err(e)
    }

    fn addr() -> String {
        "127.0.0.1:1".into()
    }

    /// (outcome, is a failure, the conditions that retry it)
    fn table() -> Vec<(&'static str, Outcome, bool, Vec<RetryCondition>)> {
        use RetryCondition::*;
        let abort = |status: u16, grpc: Option<u16>| {
            err(ProxyError::FaultAbort { status: http::StatusCode::from_u16(status).unwrap(), grpc_status: grpc })
        };
        vec![
            ("200", answer(200, None), false, vec![]),
            ("404", answer(404, None), false, vec![]),
            ("500", answer(500, None), true, vec![ServerError]),
            ("502", answer(502, None), true, vec![ServerError, GatewayError]),
            ("503", answer(503, None), true, vec![ServerError, GatewayError]),
            ("504", answer(504, None), true, vec![ServerError, GatewayError]),
            ("callee's app reset", answer_with(502, None, Some("reset")), true, vec![ServerError, GatewayError, Reset]),
            (
                "callee's app broke off",
                answer_with(502, None, Some("upstream-failure")),
                true,
                vec![ServerError, GatewayError, Reset],
            ),
            (
                "callee's app refused",
                answer_with(502, None, Some("connect-failure")),
                true,
                vec![ServerError, GatewayError, ConnectFailure],
            ),
            ("callee timed out", answer_with(504, None, Some("timeout")), true, vec![ServerError, GatewayError]),
            ("grpc unavailable", answer(200, Some(14)), true, vec![Unavailable]),
            ("grpc cancelled", answer(200, Some(1)), false, vec![Cancelled]),
            ("grpc deadline", answer(200, Some(4)), false, vec![DeadlineExceeded]),
            ("grpc exhausted", answer(200, Some(8)), false, vec![ResourceExhausted]),
            ("grpc not found", answer(200, Some(5)), false, vec![]),
            (
                "connect",
                err(ProxyError::Connect { addr: addr(), reason: "refused".into() }),
                true,
                vec![ConnectFailure],
            ),
            ("reset", err(ProxyError::Reset { addr: addr(), reason: "CANCEL".into() }), true, vec![Reset]),
            ("timeout", err(ProxyError::Timeout { addr: addr(), ms: 1 }), true, vec![ServerError, GatewayError]),
            (
                "broken",
                err(ProxyError::Upstream { addr: addr(), reason: "eof".into() }),
                true,
                vec![ServerError, Reset],
            ),
            ("abort 503", abort(503, None), true, vec![ServerError, GatewayError]),
            ("abort 500 grpc 8", abort(500, Some(8)), true, vec![ServerError, ResourceExhausted]),
            ("abort 429", abort(429, None), true, vec![]),
            ("client body", err(ProxyError::ClientBody("eof".into())), false, vec![]),
            ("no endpoints", err(ProxyError::NoEndpoints("x".into())), false, vec![]),
        ]
    }

    #[test]
    fn every_outcome_under_every_condition() {
        for (what, outcome, failure, retried_by) in table() {
            assert_eq!(is_failure(&outcome), failure, "{what}: failure");
            for c in RetryCondition::ALL {
                let on = RetryOn::empty().with(c);
                assert_eq!(should_retry(on, &outcome), retried_by.contains(&c), "{what} under {}", c.as_str());
            }
            let default = RetryOn::DEFAULT;
            let by_default = retried_by.iter().any(|c| default.contains(*c));
            assert_eq!(should_retry(default, &outcome), by_default, "{what} under the default conditions");
        }
    }

    #[test]
    fn backoff_grows_with_full_jitter() {
        for (n, cap) in [(1, 25), (2, 50), (3, 100), (7, 1600), (20, 1600)] {
            let draws: Vec<Duration> = (0..200).map(|_| backoff(n)).collect();
            assert!(draws.iter().all(|d| *d <= Duration::from_millis(cap)), "retry {n}");
            assert!(draws.iter().any(|d| *d > Duration::from_millis(cap / 2)), "retry {n} spreads up to its cap");
        }
    }

    #[test]
    fn only_the_callees_own_sheds_count_as_shed() {
        let shed = |reason: &str| {
            http::Response::builder().status(429).header("x-weft-error", reason).body(PooledBody::full("")).unwrap()
        };
        assert!(is_callee_shed(&shed("rate-limited")));
        assert!(is_callee_shed(&shed("token-quota")));
        assert!(!is_callee_shed(&shed("bad-request")));
        assert!(!is_callee_shed(&http::Response::builder().status(429).body(PooledBody::full("")).unwrap()));
    }
}
