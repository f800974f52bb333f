//! HTTP/1.1 upgrades (WebSocket, and any other `Upgrade` protocol): the
//! request keeps its `Upgrade` and `Connection: upgrade` on every hop, and
//! when the next hop answers `101 Switching Protocols` the two upgraded
//! connections are spliced, byte for byte, until either side closes.
//! Call timeouts bound the wait for the 101 only, so a long-lived socket is
//! never cut by them.

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

/// The `Upgrade` value of an HTTP/1.1 request that asks for one.
pub(crate) fn requested<B>(req: &Request<B>) -> Option<HeaderValue> {
    // Asked on every call: a pass over the few names is cheaper than a
    // hashed lookup, and almost no call has the header.
    if req.version() != Version::HTTP_11 || !req.headers().keys().any(|k| k == header::UPGRADE) {
        return None;
    }
    let upgrade = req.headers().get(header::UPGRADE)?;
    let connection = req.headers().get(header::CONNECTION)?.to_str().ok()?;
    connection.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")).then(|| upgrade.clone())
}

/// The client's side of an upgrade it asks for, taken off the request
/// before it is forwarded.
pub(crate) fn client_side<B>(req: &mut Request<B>) -> Option<OnUpgrade> {
    requested(req)?;
    Some(hyper::upgrade::on(req))
}

/// Puts back what [`crate::transport::hop::strip_hop_by_hop`] removed from
/// an upgrade's request or its 101 answer.
pub(crate) fn keep(headers: &mut HeaderMap, upgrade: HeaderValue) {
    headers.insert(header::UPGRADE, upgrade);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
}

/// On a 101, splices the client's upgraded connection with the upstream's.
pub(crate) fn splice<B>(client: OnUpgrade, resp: &mut Response<B>, direction: &'static str) {
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return;
    }
    let upstream = hyper::upgrade::on(resp);
    metrics::counter!("weft_upgrades_total", "direction" => direction).increment(1);
    // At the bound, both sides are closed once switched.
    let slot = super::splice::slot("upgrade", direction);
    tokio::spawn(async move {
        let (client, upstream) = match tokio::join!(client, upstream) {
            (Ok(c), Ok(u)) => (c, u),
            (c, u) => {
                tracing::debug!(client = ?c.err(), upstream = ?u.err(), "an upgrade did not complete");
                return;
            }
        };
        let Some(slot) = slot else { return };
        super::splice::run(slot, TokioIo::new(client), TokioIo::new(upstream)).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upgrade_is_asked_for_with_both_headers_on_http_1_1() {
        let req = |conn: &str, version| {
            Request::builder()
                .version(version)
                .header("upgrade", "websocket")
                .header("connection", conn)
                .body(())
                .unwrap()
        };
        assert_eq!(requested(&req("keep-alive, Upgrade", Version::HTTP_11)).unwrap(), "websocket");
        assert!(requested(&req("keep-alive", Version::HTTP_11)).is_none());
        assert!(requested(&req("upgrade", Version::HTTP_2)).is_none());
        assert!(requested(&Request::builder().header("connection", "upgrade").body(()).unwrap()).is_none());
    }
}
