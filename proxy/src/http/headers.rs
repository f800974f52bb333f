//! The request head as the sidecar reads it: which service (the authority),
//! which tenant, the trace context, gRPC or not; and what must not be
//! forwarded (hop-by-hop headers).

use http::{HeaderValue, Request};
use rand::Rng;

use super::errors::{ProxyError, clip};

/// The tenant a request is for: the value of `header`, else `default`. A
/// value that is not a tenant name (as policies name tenants: 1-63 lowercase
/// letters, digits, `-`, `_`, `.`) is refused: it would become a metric label
/// and a key of limits.
pub(crate) fn tenant_of<B>(req: &Request<B>, header: &http::HeaderName) -> Result<String, ProxyError> {
    match req.headers().get(header) {
        None => Ok("default".to_string()),
        Some(v) if weft_policy::names::is_tenant(v.as_bytes()) => {
            Ok(String::from_utf8_lossy(v.as_bytes()).into_owned())
        }
        Some(v) if v.is_empty() => Ok("default".to_string()),
        Some(v) => Err(ProxyError::BadTenant(clip(&String::from_utf8_lossy(v.as_bytes())))),
    }
}

/// Fails when a request has more than one `Host` header: the two could
/// name different services for different hops.
pub(crate) fn single_host<B>(req: &Request<B>) -> Result<(), ProxyError> {
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Err(ProxyError::DuplicateHost),
        _ => Ok(()),
    }
}

/// The service a request is for: the authority of an absolute-form URI or
/// `:authority`, else the Host header; the port is ignored.
pub(crate) fn service_of<B>(req: &Request<B>) -> Result<String, ProxyError> {
    single_host(req)?;
    let authority = match req.uri().authority() {
        Some(a) => a.host().to_string(),
        None => {
            let host = req.headers().get(http::header::HOST).ok_or(ProxyError::NoAuthority)?;
            let host =
                host.to_str().map_err(|_| ProxyError::BadAuthority(clip(&String::from_utf8_lossy(host.as_bytes()))))?;
            host.rsplit_once(':')
                .map(|(h, p)| if p.chars().all(|c| c.is_ascii_digit()) { h } else { host })
                .unwrap_or(host)
                .to_string()
        }
    };
    let name = authority.to_ascii_lowercase();
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !valid {
        return Err(ProxyError::BadAuthority(clip(&authority)));
    }
    // `inference.default.svc` style names route to `inference`.
    let first = name.split('.').next().unwrap_or(&name);
    if !weft_policy::names::is_service(first.as_bytes()) {
        return Err(ProxyError::BadAuthority(clip(&authority)));
    }
    Ok(first.to_string())
}

/// The most members a `tracestate` may hold (W3C Trace Context).
const TRACESTATE_MEMBERS: usize = 32;

/// `member` (`weft=...`) first, then the members of `old` other than an
/// older `weft` one (a callee's sidecar may have added its own), at most
/// [`TRACESTATE_MEMBERS`] in all. `None` when the result is not a valid
/// header value.
pub(crate) fn merge_tracestate(old: Option<&HeaderValue>, member: &str) -> Option<HeaderValue> {
    let mut out = member.to_string();
    if let Some(old) = old.and_then(|v| v.to_str().ok()) {
        let others = old
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty() && !m.starts_with("weft="))
            .take(TRACESTATE_MEMBERS - 1);
        for m in others {
            out.push(',');
            out.push_str(m);
        }
    }
    HeaderValue::from_str(&out).ok()
}

/// Starts a W3C trace when the caller did not.
pub(crate) fn ensure_traceparent<B>(req: &mut Request<B>) {
    if req.headers().contains_key(&TRACEPARENT) {
        return;
    }
    let mut rng = rand::rng();
    let trace: u128 = rng.random::<u128>() | 1;
    let span: u64 = rng.random::<u64>() | 1;
    // `00-<32 hex>-<16 hex>-01`, written in place.
    let mut v = *b"00-00000000000000000000000000000000-0000000000000000-01";
    hex_into(&mut v[3..35], trace);
    hex_into(&mut v[36..52], u128::from(span));
    req.headers_mut().insert(&TRACEPARENT, HeaderValue::from_bytes(&v).expect("hex is a valid header"));
}

pub(crate) static TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

/// The caller's identity as the callee's sidecar gives it to its app
/// (`spiffe://…/svc/<service>`), set only from an mTLS handshake: a caller's
/// own value is removed.
pub(crate) static CLIENT_ID: http::HeaderName = http::HeaderName::from_static("x-weft-client-id");

/// The caller's own tenant (its `tenant` label), vouched for by the
/// caller's sidecar on mTLS calls; believed only on an mTLS connection, and
/// never passed to an app.
pub(crate) static CALLER_TENANT: http::HeaderName = http::HeaderName::from_static("x-weft-caller-tenant");

/// Vouches for this instance's own tenant on a call it makes (mTLS only
/// carries it to a callee that believes it), replacing whatever the app
/// sent.
pub(crate) fn vouch_tenant<B>(req: &mut Request<B>, own: Option<&HeaderValue>) {
    match own {
        Some(v) => {
            req.headers_mut().insert(&CALLER_TENANT, v.clone());
        }
        None => {
            if req.headers().contains_key(&CALLER_TENANT) {
                req.headers_mut().remove(&CALLER_TENANT);
            }
        }
    }
}

/// Removes what only sidecars may set on an inbound call ([`CLIENT_ID`],
/// [`CALLER_TENANT`]) and returns the caller-tenant value. Both names start
/// `x-weft-c`: one pass over the names finds whether either is there, which
/// costs less than looking each up (a custom name is hashed byte by byte).
pub(crate) fn take_internal<B>(req: &mut Request<B>) -> Option<HeaderValue> {
    if !req.headers().keys().any(|k| k.as_str().starts_with("x-weft-c")) {
        return None;
    }
    req.headers_mut().remove(&CLIENT_ID);
    req.headers_mut().remove(&CALLER_TENANT)
}

/// Writes the low `out.len()` hex digits of `n` into `out`.
fn hex_into(out: &mut [u8], mut n: u128) {
    for b in out.iter_mut().rev() {
        *b = b"0123456789abcdef"[(n & 0xf) as usize];
        n >>= 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_only_sidecars_set_is_taken_off_an_inbound_call() {
        let mut forged = Request::builder()
            .header("x-weft-client-id", "spiffe://weft.local/svc/admin")
            .header("x-weft-caller-tenant", "acme")
            .header("x-weft-c", "not ours")
            .header("x-tenant-id", "globex")
            .body(())
            .unwrap();
        assert_eq!(take_internal(&mut forged).unwrap(), "acme");
        assert!(!forged.headers().contains_key(&CLIENT_ID) && !forged.headers().contains_key(&CALLER_TENANT));
        assert_eq!(forged.headers().len(), 2, "other headers stay");
        let mut plain = Request::builder().header("x-tenant-id", "globex").body(()).unwrap();
        assert_eq!(take_internal(&mut plain), None);
        assert_eq!(plain.headers().len(), 1);
        // The caller's sidecar replaces what its app says about its tenant.
        let mut out = Request::builder().header("x-weft-caller-tenant", "acme").body(()).unwrap();
        vouch_tenant(&mut out, Some(&HeaderValue::from_static("globex")));
        assert_eq!(out.headers()[&CALLER_TENANT], "globex");
        vouch_tenant(&mut out, None);
        assert!(!out.headers().contains_key(&CALLER_TENANT));
    }

    fn req(uri: &str, host: Option<&str>) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header("host", h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn a_missing_traceparent_is_generated_and_a_present_one_kept() {
        let mut r = req("/x", Some("a"));
        ensure_traceparent(&mut r);
        let v = r.headers()["traceparent"].to_str().unwrap().to_string();
        let parts: Vec<&str> = v.split('-').collect();
        assert_eq!(parts.len(), 4, "{v}");
        assert_eq!((parts[0], parts[3]), ("00", "01"));
        assert_eq!((parts[1].len(), parts[2].len()), (32, 16), "{v}");
        assert!(parts[1..3].iter().all(|p| p.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())));
        assert!(parts[1].ends_with(['1', '3', '5', '7', '9', 'b', 'd', 'f']), "trace id is never zero: {v}");
        let mut again = req("/x", Some("a"));
        ensure_traceparent(&mut again);
        assert_ne!(again.headers()["traceparent"], v.as_str());
        ensure_traceparent(&mut r);
        assert_eq!(r.headers()["traceparent"], v.as_str());
        let mut buf = [0u8; 4];
        hex_into(&mut buf, 0xbeef);
        assert_eq!(&buf, b"beef");
    }

    #[test]
    fn service_from_host_or_absolute_uri() {
        assert_eq!(service_of(&req("/x", Some("inference:8080"))).unwrap(), "inference");
        assert_eq!(service_of(&req("/x", Some("Inference"))).unwrap(), "inference");
        assert_eq!(service_of(&req("http://state.default.svc:80/x", None)).unwrap(), "state");
        assert!(matches!(service_of(&req("/x", None)), Err(ProxyError::NoAuthority)));
        assert!(matches!(service_of(&req("/x", Some("bad host"))), Err(ProxyError::BadAuthority(_))));
        // Found by fuzzing: a name whose first label is empty routed to "".
        for bad in [".", ".inference", "..x"] {
            assert!(matches!(service_of(&req("/x", Some(bad))), Err(ProxyError::BadAuthority(_))), "{bad}");
        }
        assert!(matches!(service_of(&req("http://./x", None)), Err(ProxyError::BadAuthority(_))));
    }

    #[test]
    fn a_callees_weft_member_is_replaced_not_duplicated() {
        let old = HeaderValue::from_static("weft=shed, congo=t61rcWkgMzE,weft=retry:1");
        let merged = merge_tracestate(Some(&old), "weft=shed;retry:1").unwrap();
        assert_eq!(merged, "weft=shed;retry:1,congo=t61rcWkgMzE");
        let many: String = (0..40).map(|i| format!("k{i}=v")).collect::<Vec<_>>().join(",");
        let merged = merge_tracestate(Some(&HeaderValue::from_str(&many).unwrap()), "weft=timeout").unwrap();
        assert_eq!(merged.to_str().unwrap().split(',').count(), 32);
        assert_eq!(merge_tracestate(None, "weft=breaker").unwrap(), "weft=breaker");
    }
}
