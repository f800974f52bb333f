//! A rule's fallback: a fixed answer, or the request sent once to another
//! service (its own route and endpoints), when the call failed, found no
//! endpoint, timed out, stayed shed, or the service is over its
//! concurrency cap.

use http::request::Parts;
use http::{Request, Response};
use weft_policy::model::Fallback;

use super::balance::InFlight;
use super::replay::{ReqBody, clone_parts};
use super::{Outbound, Sender, retry, route};
use crate::clock::now_ms;
use crate::health::breaker::Admission;
use crate::http::errors::ProxyError;
use crate::http::response::Degraded;
use crate::transport::body::{ProxyBody, full, reply};

/// Answers from `fallback`, or with `err` when it cannot (the request was
/// streamed and is gone, or the fallback service has no endpoint).
pub(crate) async fn answer<S: Sender>(
    out: &Outbound<S>,
    fallback: &Fallback,
    parts: &Parts,
    body: &mut ReqBody,
    degraded: &mut Degraded,
    err: ProxyError,
) -> Result<Response<ProxyBody>, ProxyError> {
    match fallback {
        Fallback::Static { status, body: text } => {
            degraded.fallback = Some("static".into());
            let mut resp = Response::new(full(text.clone()));
            *resp.status_mut() = *status;
            Ok(resp)
        }
        Fallback::Service(name) => {
            let Some(b) = body.take() else { return Err(err) };
            let svc = match out.resolve(name).await {
                Ok(s) if s.known => s,
                _ => return Err(err),
            };
            let tenant = parts
                .headers
                .get(&out.shared.tenant_header)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .unwrap_or("default");
            let req = Request::from_parts(clone_parts(parts), b);
            let rule = route::rule_for(&svc, tenant, &req);
            let now = now_ms();
            let Some(endpoint) = route::pick(&svc, rule, &[], now, out.region(), None).endpoint else {
                return Err(err);
            };
            degraded.fallback = Some(name.clone());
            let admission = match endpoint.health.breaker.admit(now, &svc.settings) {
                Admission::Refused => Admission::Normal,
                a => a,
            };
            let _in_flight = InFlight::endpoint(&endpoint.health);
            let outcome = out
                .sender
                .send(endpoint.peer(&svc.name), req, rule.and_then(|r| r.timeout))
                .await
                .map_err(ProxyError::from);
            if retry::is_failure(&outcome) {
                svc.endpoint_failed(&endpoint, admission, now);
            } else {
                endpoint.health.breaker.record_success(admission);
            }
            Ok(outcome?.map(reply))
        }
    }
}
