//! Entry points for the fuzz targets (`fuzz/`) and for the property tests
//! that run the same inputs on stable in `make test`. None may panic,
//! whatever the bytes; the assertions in them are the properties.

use std::sync::Arc;

use http::{HeaderName, HeaderValue, Method, Request, Uri};
use prost::Message;
use xds_proto::v1 as pb;

use crate::config::{BuildContext, build_service};
use crate::http::headers::{TRACEPARENT, ensure_traceparent, merge_tracestate, service_of, tenant_of};
use crate::http::response::Degraded;

/// The request head as a caller's app or a peer sends it, in a line format
/// a fuzzer can grow: `METHOD URI` on the first line, then `name: value`
/// lines. Parts that `http` refuses are skipped, as hyper would refuse the
/// request before the sidecar sees it.
pub fn request_head(data: &[u8]) {
    let mut lines = data.split(|b| *b == b'\n');
    let first = lines.next().unwrap_or_default();
    let mut words = first.splitn(2, |b| *b == b' ');
    let method = Method::from_bytes(words.next().unwrap_or_default()).unwrap_or(Method::GET);
    let uri = words.next().and_then(|u| Uri::try_from(u).ok()).unwrap_or_else(|| Uri::from_static("/"));
    let mut req = Request::builder().method(method).uri(uri).body(()).expect("valid parts");
    let mut hosts = 0;
    for line in lines {
        let Some(colon) = line.iter().position(|b| *b == b':') else { continue };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let value = value.strip_prefix(b" ").unwrap_or(value);
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) else { continue };
        hosts += usize::from(name == http::header::HOST);
        req.headers_mut().append(name, value);
    }

    match service_of(&req) {
        Ok(service) => {
            assert!(hosts <= 1, "two Host headers accepted");
            assert!(!service.is_empty() && service.len() <= 253, "service '{service}'");
            assert!(!service.contains('.'), "a dotted name is cut to its first label: '{service}'");
            assert!(
                service.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'),
                "service '{service}'"
            );
        }
        Err(e) => assert_eq!(e.status(), http::StatusCode::BAD_REQUEST, "{e}"),
    }
    let tenant_header = HeaderName::from_static(crate::TENANT_HEADER);
    match tenant_of(&req, &tenant_header) {
        Ok(t) => assert!(weft_policy::names::is_tenant(t.as_bytes()), "tenant '{t}'"),
        Err(e) => assert_eq!(e.status(), http::StatusCode::BAD_REQUEST, "{e}"),
    }

    let had = req.headers().get(&TRACEPARENT).cloned();
    ensure_traceparent(&mut req);
    let now = req.headers().get(&TRACEPARENT).expect("a traceparent is always there");
    match had {
        Some(v) => assert_eq!(now, &v, "a caller's traceparent is kept"),
        None => {
            let v = now.to_str().expect("ascii");
            assert_eq!(v.len(), 55, "{v}");
            assert!(v.starts_with("00-") && v.ends_with("-01"), "{v}");
        }
    }

    // What a degraded answer's tracestate becomes.
    let degraded = Degraded {
        retries: data.len() as u32 % 4,
        breaker: data.len().is_multiple_of(3),
        fallback: data.len().is_multiple_of(5).then(|| "inference-lite".to_string()),
        timeout: data.len().is_multiple_of(7),
        shed: data.first().is_some_and(|b| b.is_multiple_of(2)),
        hedged: data.len().is_multiple_of(11),
        stale_config: data.last().is_some_and(|b| b.is_multiple_of(2)),
    };
    let member = format!("weft={}", degraded.header_value().replace(',', ";").replace('=', ":"));
    if let Some(merged) = merge_tracestate(req.headers().get("tracestate"), &member) {
        let text = merged.to_str().expect("a tracestate is ascii");
        let members: Vec<&str> = text.split(',').collect();
        assert_eq!(members[0], member, "{text}");
        assert_eq!(members.iter().filter(|m| m.starts_with("weft=")).count(), 1, "one weft member: {text}");
        assert!(members.len() <= 32, "{} members", members.len());
    }
}

/// A service's config as pushed by the control plane (any bytes: a broken or
/// hostile control plane), built on its own and then over a second one (the
/// second half of the input), as an update replaces a service.
pub fn service_config(data: &[u8]) {
    let (a, b) = data.split_at(data.len() / 2);
    let ctx = BuildContext::at(1_000);
    let Ok(first) = pb::ServiceConfig::decode(a) else { return };
    let (built, _) = build_service(&first, None, ctx);
    check_service(&built, ctx);
    let Ok(second) = pb::ServiceConfig::decode(b) else { return };
    let later = BuildContext { now_ms: 2_000, hold_ms: 5_000, hold_floor_ms: 0 };
    let (rebuilt, _) = build_service(&second, Some(&built), later);
    check_service(&rebuilt, later);
}

/// A whole update, applied to an empty table.
pub fn update(data: &[u8]) {
    let Ok(update) = pb::Update::decode(data) else { return };
    let ctx = BuildContext::at(1_000);
    let (table, errors) = crate::control_client::apply_update(&crate::config::Table::default(), &update, ctx);
    assert_eq!(table.version, update.version);
    for e in &errors {
        assert!(!e.resource.is_empty() && !e.message.is_empty(), "{e:?}");
    }
    for svc in table.services.values() {
        check_service(svc, ctx);
    }
}

fn check_service(s: &crate::config::Service, ctx: BuildContext) {
    assert!(s.all_ready.iter().all(|e| e.ready));
    for e in &s.endpoints {
        assert!(!e.is_held() || e.held_until_ms > ctx.now_ms, "a held endpoint past its hold");
    }
    let routes = s.default_route.iter().chain(s.tenant_routes.values());
    for route in routes {
        assert!(!route.rules.is_empty());
        for rule in &route.rules {
            assert!(rule.backends.iter().map(|b| u64::from(b.weight)).sum::<u64>() > 0);
            for b in &rule.backends {
                assert!(b.endpoints.iter().all(|e| e.ready && s.all_ready.iter().any(|r| Arc::ptr_eq(r, e))));
            }
        }
    }
}

/// Whether a sidecar takes `cfg` without a NACK (the problems otherwise).
pub fn accepts(cfg: &pb::ServiceConfig) -> Result<(), String> {
    let (_, problems) = build_service(cfg, None, BuildContext::at(1));
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
    }
}
