//! The rules, one by one: each bad document is refused with the field and a
//! message, and the same resource on the wire is refused the same way.

use std::time::Duration;

use weft_policy::documents::{self, LocatedProblem};
use weft_policy::model::{self, Policy, RetryCondition, RetryOn};
use weft_policy::{doc, wire};

fn problems(yaml: &str) -> Vec<LocatedProblem> {
    match documents::parse("t.yaml", yaml) {
        Ok(r) => panic!("accepted: {:?}", r.iter().map(|l| l.resource.id().to_string()).collect::<Vec<_>>()),
        Err(p) => p,
    }
}

fn route(rule: &str) -> String {
    format!(
        "kind: Route\nservice: inference\nrules:\n  - backends: [ {{ subset: {{ version: v1 }}, weight: 1 }} ]\n{rule}"
    )
}

/// (what, document, field, words in the message)
fn cases() -> Vec<(&'static str, String, &'static str, &'static str)> {
    let r = route;
    vec![
        ("service name", "kind: Route\nservice: Inference\nrules:\n  - backends: [ { weight: 1 } ]\n".into(), "service", "lowercase"),
        ("dotted service", "kind: Route\nservice: api.v2\nrules:\n  - backends: [ { weight: 1 } ]\n".into(), "service", "first label"),
        ("empty service", "kind: Route\nservice: ''\nrules:\n  - backends: [ { weight: 1 } ]\n".into(), "service", "must not be empty"),
        ("long service", format!("kind: Route\nservice: {}\nrules:\n  - backends: [ {{ weight: 1 }} ]\n", "a".repeat(64)), "service", "longer than 63"),
        ("tenant name", "kind: Route\nservice: a\ntenant: ACME\nrules:\n  - backends: [ { weight: 1 } ]\n".into(), "tenant", "lowercase"),
        ("no rules", "kind: Route\nservice: a\nrules: []\n".into(), "rules", "at least one rule"),
        ("path prefix", r("    match: { path_prefix: v1 }\n"), "rules[0].match.path_prefix", "start with '/'"),
        ("method", r("    match: { method: post }\n"), "rules[0].match.method", "not an HTTP method"),
        ("method token", r("    match: { method: BREW }\n"), "rules[0].match.method", "not an HTTP method"),
        ("header name", r("    match: { headers: { X-Model: large } }\n"), "rules[0].match.headers.X-Model", "lowercase header name"),
        ("header value", r("    match: { headers: { x-model: \"a\\nb\" } }\n"), "rules[0].match.headers.x-model", "not a header value"),
        ("no backends", "kind: Route\nservice: a\nrules:\n  - backends: []\n".into(), "rules[0].backends", "at least one backend"),
        ("zero weights", "kind: Route\nservice: a\nrules:\n  - backends: [ { weight: 0 } ]\n".into(), "rules[0].backends", "sum to 0"),
        ("big weight", "kind: Route\nservice: a\nrules:\n  - backends: [ { weight: 10001 } ]\n".into(), "rules[0].backends[0].weight", "at most 10000"),
        ("empty label", "kind: Route\nservice: a\nrules:\n  - backends: [ { subset: { version: '' }, weight: 1 } ]\n".into(), "rules[0].backends[0].subset", "never match"),
        ("same subset", "kind: Route\nservice: a\nrules:\n  - backends: [ { subset: { v: a } }, { subset: { v: a } } ]\n".into(), "rules[0].backends[1].subset", "twice"),
        ("timeout", r("    timeout: 2 parsecs\n"), "rules[0].timeout", "not a duration"),
        ("zero timeout", r("    timeout: 0s\n"), "rules[0].timeout", "greater than zero"),
        ("long timeout", r("    timeout: 25h\n"), "rules[0].timeout", "longer than a day"),
        ("attempts 0", r("    retry: { attempts: 0 }\n"), "rules[0].retry.attempts", "between 1 and 10"),
        ("attempts 11", r("    retry: { attempts: 11 }\n"), "rules[0].retry.attempts", "between 1 and 10"),
        ("per try", r("    retry: { attempts: 1, per_try_timeout: soon }\n"), "rules[0].retry.per_try_timeout", "not a duration"),
        ("per try > timeout", r("    timeout: 1s\n    retry: { attempts: 1, per_try_timeout: 2s }\n"), "rules[0].retry.per_try_timeout", "longer than the rule's timeout 1s"),
        ("retry on", r("    retry: { attempts: 1, on: [5xx, teapot] }\n"), "rules[0].retry.on", "unknown condition 'teapot'"),
        ("fallback both", r("    fallback: { service: lite, status: 200 }\n"), "rules[0].fallback", "not both"),
        ("fallback none", r("    fallback: { body: x }\n"), "rules[0].fallback", "set service or status"),
        ("fallback self", r("    fallback: { service: inference }\n"), "rules[0].fallback.service", "itself"),
        ("fallback name", r("    fallback: { service: Lite }\n"), "rules[0].fallback.service", "lowercase"),
        ("fallback body", r("    fallback: { service: lite, body: x }\n"), "rules[0].fallback.body", "goes with status"),
        ("fallback status", r("    fallback: { status: 700 }\n"), "rules[0].fallback.status", "200-599"),
        ("fallback 1xx", r("    fallback: { status: 101 }\n"), "rules[0].fallback.status", "200-599"),
        ("fault empty", r("    fault: { header: x-chaos }\n"), "rules[0].fault", "delay, abort or both"),
        ("fault header", r("    fault: { header: X-Chaos, delay: { percent: 1, duration: 1s } }\n"), "rules[0].fault.header", "lowercase header name"),
        ("delay percent", r("    fault: { delay: { percent: 101, duration: 1s } }\n"), "rules[0].fault.delay.percent", "percentage"),
        ("delay duration", r("    fault: { delay: { percent: 1, duration: 0ms } }\n"), "rules[0].fault.delay.duration", "greater than zero"),
        ("abort percent", r("    fault: { abort: { percent: -1, status: 503 } }\n"), "rules[0].fault.abort.percent", "percentage"),
        ("abort status", r("    fault: { abort: { percent: 1 } }\n"), "rules[0].fault.abort", "set status"),
        ("abort http", r("    fault: { abort: { percent: 1, status: 99 } }\n"), "rules[0].fault.abort.status", "200-599"),
        ("abort grpc", r("    fault: { abort: { percent: 1, grpc_status: 17 } }\n"), "rules[0].fault.abort.grpc_status", "1-16"),
        ("breaker failures", "kind: Resilience\nservice: a\ncircuit_breaker: { consecutive_failures: 0, base_ejection: 1s }\n".into(), "circuit_breaker.consecutive_failures", "at least 1"),
        ("breaker ejection", "kind: Resilience\nservice: a\ncircuit_breaker: { consecutive_failures: 1, base_ejection: '1' }\n".into(), "circuit_breaker.base_ejection", "no unit"),
        ("breaker percent", "kind: Resilience\nservice: a\ncircuit_breaker: { consecutive_failures: 1, base_ejection: 1s, max_ejection_percent: 101 }\n".into(), "circuit_breaker.max_ejection_percent", "between 0 and 100"),
        ("service cap", "kind: Resilience\nservice: a\nmax_concurrent_requests: 0\n".into(), "max_concurrent_requests", "at least 1"),
        ("budget ratio", "kind: Resilience\nservice: a\nretry_budget: { ratio: 11 }\n".into(), "retry_budget.ratio", "between 0 and 10"),
        ("budget negative", "kind: Resilience\nservice: a\nretry_budget: { ratio: -0.1 }\n".into(), "retry_budget.ratio", "between 0 and 10"),
        ("tenant rps", "kind: TenantPolicy\ntenant: acme\nservice: a\nrate_limit: { requests_per_second: 0 }\n".into(), "rate_limit.requests_per_second", "greater than 0"),
        ("tenant cap", "kind: TenantPolicy\ntenant: acme\nservice: a\nmax_concurrent_requests: 0\n".into(), "max_concurrent_requests", "at least 1"),
        ("tenant tokens", "kind: TenantPolicy\ntenant: acme\nservice: a\ntokens_per_minute: 0\n".into(), "tokens_per_minute", "at least 1"),
        ("tenant empty", "kind: TenantPolicy\ntenant: acme\nservice: a\n".into(), "rate_limit", "needs rate_limit"),
        ("tenant service", "kind: TenantPolicy\ntenant: acme\nservice: 'a b'\nmax_concurrent_requests: 1\n".into(), "service", "lowercase"),
        ("authz default", "kind: AuthorizationPolicy\nservice: a\ndefault: maybe\n".into(), "default", "allow or deny"),
        ("authz service", "kind: AuthorizationPolicy\nservice: A\n".into(), "service", "lowercase"),
        ("authz from", "kind: AuthorizationPolicy\nservice: a\nrules:\n  - from: []\n".into(), "rules[0].from", "names no caller"),
        ("authz caller", "kind: AuthorizationPolicy\nservice: a\nrules:\n  - from: [Agent]\n".into(), "rules[0].from[0]", "lowercase"),
        ("authz star", "kind: AuthorizationPolicy\nservice: a\nrules:\n  - from: ['*', agent]\n".into(), "rules[0].from", "alone"),
        ("authz path", "kind: AuthorizationPolicy\nservice: a\nrules:\n  - { from: [b], paths: [v1] }\n".into(), "rules[0].paths[0]", "start with '/'"),
        ("authz method", "kind: AuthorizationPolicy\nservice: a\nrules:\n  - { from: [b], methods: [post] }\n".into(), "rules[0].methods[0]", "not an HTTP method"),
        ("authz tenant", "kind: AuthorizationPolicy\nservice: a\nrules:\n  - { from: [b], tenants: [ACME] }\n".into(), "rules[0].tenants[0]", "lowercase"),
        ("authz header from", "kind: AuthorizationPolicy\nservice: a\ntenant_header_from: [api.gw]\n".into(), "tenant_header_from[0]", "first label"),
        ("authz too many", format!("kind: AuthorizationPolicy\nservice: a\nrules:\n  - from: [{}]\n", vec!["b"; 257].join(", ")), "rules[0].from", "at most 256"),
        ("unknown field", r("    retries: 3\n"), "rules[0].retries", "unknown field `retries`"),
        ("negative timeout", r("    timeout: -1s\n"), "rules[0].timeout", "is negative"),
        ("first byte", r("    first_byte_timeout: -500ms\n"), "rules[0].first_byte_timeout", "is negative"),
        ("first byte zero", r("    first_byte_timeout: 0s\n"), "rules[0].first_byte_timeout", "greater than zero"),
        ("idle", r("    idle_timeout: forever\n"), "rules[0].idle_timeout", "not a duration"),
        ("hedge without retries", r("    hedge: { after: 200ms }\n"), "rules[0].hedge", "needs a retry policy"),
        ("hedge after", r("    retry: { attempts: 1 }\n    hedge: { after: p99 }\n"), "rules[0].hedge.after", "or 'p95'"),
        ("hedge negative", r("    retry: { attempts: 1 }\n    hedge: { after: -1s }\n"), "rules[0].hedge.after", "is negative"),
        ("hedge late", r("    timeout: 1s\n    retry: { attempts: 1 }\n    hedge: { after: 1s }\n"), "rules[0].hedge.after", "never go"),
        ("hedge field", r("    retry: { attempts: 1 }\n    hedge: { delay: 1s }\n"), "rules[0].hedge.delay", "unknown field `delay`"),
        ("hash on none", r("    hash_on: {}\n"), "rules[0].hash_on", "header or cookie"),
        ("hash on both", r("    hash_on: { header: a, cookie: b }\n"), "rules[0].hash_on", "header or cookie"),
        ("hash on header", r("    hash_on: { header: Mcp-Session-Id }\n"), "rules[0].hash_on.header", "lowercase header name"),
        ("hash on cookie", r("    hash_on: { cookie: 'a b' }\n"), "rules[0].hash_on.cookie", "not a cookie name"),
        ("hash on field", r("    hash_on: { query: s }\n"), "rules[0].hash_on.query", "unknown field `query`"),
        ("outlier multiple", "kind: Resilience\nservice: a\nlatency_outlier: { multiple: 1, window: 30s }\n".into(), "latency_outlier.multiple", "more than 1"),
        ("outlier window", "kind: Resilience\nservice: a\nlatency_outlier: { multiple: 3, window: -30s }\n".into(), "latency_outlier.window", "is negative"),
        ("outlier field", "kind: Resilience\nservice: a\nlatency_outlier: { multiple: 3, window: 30s, min: 5 }\n".into(), "latency_outlier.min", "unknown field `min`"),
        ("caller quota", "kind: TenantPolicy\ntenant: acme\nservice: a\ncallers: { agent: { tokens_per_minute: 0 } }\n".into(), "callers.agent.tokens_per_minute", "at least 1"),
        ("caller name", "kind: TenantPolicy\ntenant: acme\nservice: a\ncallers: { Agent: { tokens_per_minute: 5 } }\n".into(), "callers.Agent", "lowercase"),
        ("caller above tenant", "kind: TenantPolicy\ntenant: acme\nservice: a\ntokens_per_minute: 10\ncallers: { agent: { tokens_per_minute: 11 } }\n".into(), "callers.agent.tokens_per_minute", "more than the tenant's 10"),
        ("session header", "kind: TenantPolicy\ntenant: acme\nservice: a\nsession: { header: X-Session, tokens_per_minute: 5 }\n".into(), "session.header", "lowercase header name"),
        ("session quota", "kind: TenantPolicy\ntenant: acme\nservice: a\nsession: { header: x-session, tokens_per_minute: 0 }\n".into(), "session.tokens_per_minute", "at least 1"),
        ("session above tenant", "kind: TenantPolicy\ntenant: acme\nservice: a\ntokens_per_minute: 10\nsession: { header: x-session, tokens_per_minute: 20 }\n".into(), "session.tokens_per_minute", "could never be reached"),
        ("session field", "kind: TenantPolicy\ntenant: acme\nservice: a\nsession: { cookie: s, tokens_per_minute: 20 }\n".into(), "session.cookie", "unknown field `cookie`"),
        ("unknown kind", "kind: Gateway\nservice: a\n".into(), "kind", "unknown kind"),
        ("wrong type", "kind: Resilience\nservice: a\nmax_concurrent_requests: lots\n".into(), "max_concurrent_requests", "invalid type"),
    ]
}

#[test]
fn every_rule_names_its_field() {
    for (what, yaml, field, words) in cases() {
        let p = problems(&yaml);
        assert!(
            p.iter().any(|p| p.field == field && p.message.contains(words)),
            "{what}: want {field}: ...{words}...; got {p:#?}"
        );
    }
}

/// The same rules hold for a resource that arrives on the wire: whatever a
/// document may not say, the control plane may not push.
#[test]
fn the_wire_keeps_the_same_rules() {
    let route = |f: &dyn Fn(&mut xds_proto::v1::RouteRule)| {
        let good = documents::parse("t.yaml", &route("    timeout: 2s\n    retry: { attempts: 2 }\n")).unwrap();
        let Ok(Policy::Route(r)) = weft_policy::check(&good[0].resource) else { panic!() };
        let mut pb = wire::route(&r, 3);
        f(&mut pb.rules[0]);
        model::Route::try_from(&pb)
    };
    assert!(route(&|_| {}).is_ok());
    type Change = Box<dyn Fn(&mut xds_proto::v1::RouteRule)>;
    let bad: Vec<(&str, Change, &str)> = vec![
        ("attempts", Box::new(|r| r.retry.as_mut().unwrap().attempts = 11), "rules[0].retry.attempts"),
        ("attempts 0", Box::new(|r| r.retry.as_mut().unwrap().attempts = 0), "rules[0].retry.attempts"),
        ("method", Box::new(|r| r.r#match.as_mut().unwrap().method = "FOO".into()), "rules[0].match.method"),
        ("on", Box::new(|r| r.retry.as_mut().unwrap().on = vec!["sometimes".into()]), "rules[0].retry.on"),
        (
            "per try",
            Box::new(|r| r.retry.as_mut().unwrap().per_try_timeout_ms = 3000),
            "rules[0].retry.per_try_timeout",
        ),
        ("long", Box::new(|r| r.timeout_ms = 90_000_000), "rules[0].timeout"),
        (
            "grpc abort",
            Box::new(|r| r.fault = Some(xds_proto::v1::Fault { abort_grpc_status: 17, ..Default::default() })),
            "rules[0].fault.abort.grpc_status",
        ),
        ("weights", Box::new(|r| r.backends[0].weight = 0), "rules[0].backends"),
        ("fallback", Box::new(|r| r.fallback = Some(Default::default())), "rules[0].fallback"),
        ("hedge", Box::new(|r| r.hedge = Some(Default::default())), "rules[0].hedge.after"),
        (
            "hedge without retries",
            Box::new(|r| {
                r.retry = None;
                r.hedge = Some(xds_proto::v1::Hedge { after_ms: 0, after_p95: true });
            }),
            "rules[0].hedge",
        ),
        ("hash on", Box::new(|r| r.hash_on = Some(Default::default())), "rules[0].hash_on"),
    ];
    for (what, f, field) in bad {
        let e = route(&*f).expect_err(what);
        assert_eq!(e.resource, "route/inference");
        assert!(e.errors.iter().any(|x| x.field == field), "{what}: {e}");
    }
    let res = xds_proto::v1::Resilience {
        service: "a".into(),
        consecutive_failures: Some(0),
        base_ejection_ms: Some(1000),
        max_ejection_percent: Some(50),
        ..Default::default()
    };
    let e = model::Resilience::try_from(&res).unwrap_err();
    assert_eq!(e.to_string(), "resilience/a: circuit_breaker.consecutive_failures: must be at least 1");
}

#[test]
fn a_valid_document_survives_the_wire_both_ways() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/policy/");
    let files = ["tenants-and-faults.yaml", "agent-traffic.yaml"];
    for located in
        files.iter().flat_map(|f| documents::parse(f, &std::fs::read_to_string(format!("{dir}{f}")).unwrap()).unwrap())
    {
        let policy = weft_policy::check(&located.resource).unwrap();
        match &policy {
            Policy::Route(r) => assert_eq!(model::Route::try_from(&wire::route(r, 9)).unwrap(), *r),
            Policy::Resilience(r) => assert_eq!(model::Resilience::try_from(&wire::resilience(r, 9)).unwrap(), *r),
            Policy::TenantPolicy(t) => {
                assert_eq!(model::TenantPolicy::try_from(&wire::tenant_policy(t, 9)).unwrap(), *t)
            }
            Policy::AuthorizationPolicy(a) => {
                assert_eq!(model::AuthorizationPolicy::try_from(&wire::authorization(a, 9)).unwrap(), *a)
            }
        }
    }
}

const AUTHZ: &str = "kind: AuthorizationPolicy
service: inference
default: deny
rules:
  - from: [agent-router, scheduler]
    paths: [/v1/run]
    methods: [POST]
    tenants: [acme]
  - from: ['*']
    paths: [/health]
tenant_header_from: [api-gateway]
";

#[test]
fn an_authorization_policy_allows_what_a_rule_matches_and_defaults_the_rest() {
    let located = documents::parse("a.yaml", AUTHZ).unwrap();
    let Ok(Policy::AuthorizationPolicy(a)) = weft_policy::check(&located[0].resource) else { panic!() };
    assert_eq!(model::AuthorizationPolicy::try_from(&wire::authorization(&a, 4)).unwrap(), a);
    let post = http::Method::POST;
    assert!(a.allows(Some("scheduler"), &post, "/v1/run/7", "acme"));
    assert!(!a.allows(Some("scheduler"), &post, "/v1/run", "globex"), "another tenant");
    assert!(!a.allows(Some("scheduler"), &http::Method::GET, "/v1/run", "acme"), "another method");
    assert!(!a.allows(Some("scheduler"), &post, "/v2/run", "acme"), "another path");
    assert!(!a.allows(Some("billing"), &post, "/v1/run", "acme"), "another caller");
    assert!(a.allows(Some("billing"), &http::Method::GET, "/health", "default"), "'*': any identity");
    assert!(!a.allows(None, &http::Method::GET, "/health", "default"), "'*' needs an identity");
    assert!(a.trusts_tenant_header("api-gateway") && !a.trusts_tenant_header("scheduler"));
    // `default: allow`, or no rule at all.
    let open = documents::parse("a.yaml", "kind: AuthorizationPolicy\nservice: a\ndefault: allow\n").unwrap();
    let Ok(Policy::AuthorizationPolicy(open)) = weft_policy::check(&open[0].resource) else { panic!() };
    assert!(open.allows(None, &post, "/", "default"));
    let shut = documents::parse("a.yaml", "kind: AuthorizationPolicy\nservice: a\n").unwrap();
    let Ok(Policy::AuthorizationPolicy(shut)) = weft_policy::check(&shut[0].resource) else { panic!() };
    assert_eq!(shut.default, model::Action::Deny, "deny unless said otherwise");
    assert!(!shut.allows(Some("agent"), &post, "/", "default"));
    // The wire's rules are the document's.
    let mut pb = wire::authorization(&a, 4);
    pb.rules[0].methods = vec!["BREW".into()];
    pb.default_action = String::new();
    let e = model::AuthorizationPolicy::try_from(&pb).unwrap_err();
    assert_eq!(e.resource, "authorizationpolicy/inference");
    assert!(e.errors.iter().any(|x| x.field == "rules[0].methods[0]"), "{e}");
    assert!(e.errors.iter().any(|x| x.field == "default"), "{e}");
}

#[test]
fn a_tenant_policy_for_every_tenant_is_written_star() {
    let yaml = "kind: TenantPolicy\ntenant: '*'\nservice: inference\nmax_concurrent_requests: 2\n";
    let located = documents::parse("t.yaml", yaml).unwrap();
    let Ok(Policy::TenantPolicy(t)) = weft_policy::check(&located[0].resource) else { panic!() };
    assert_eq!(t.tenant, "*");
    assert_eq!(model::TenantPolicy::try_from(&wire::tenant_policy(&t, 1)).unwrap(), t);
}

#[test]
fn a_zero_retry_budget_ratio_means_zero() {
    let docs =
        documents::parse("b.yaml", "kind: Resilience\nservice: a\nretry_budget: { ratio: 0, min_per_second: 3 }\n")
            .unwrap();
    let Policy::Resilience(r) = weft_policy::check(&docs[0].resource).unwrap() else { panic!() };
    let budget = r.retry_budget.clone().unwrap();
    assert_eq!((budget.ratio, budget.min_per_second), (0.0, 3));
    let back = model::Resilience::try_from(&wire::resilience(&r, 1)).unwrap();
    assert_eq!(back.retry_budget.unwrap().ratio, 0.0, "not the default 0.2");
}

#[test]
fn every_retry_condition_parses_and_the_default_is_documented() {
    for c in RetryCondition::ALL {
        assert_eq!(RetryCondition::parse(c.as_str()), Ok(c));
    }
    let d: Vec<&str> = RetryOn::DEFAULT.iter().map(|c| c.as_str()).collect();
    assert_eq!(d, ["gateway-error", "connect-failure", "reset", "unavailable"]);
    let on: RetryOn = [RetryCondition::Cancelled, RetryCondition::ResourceExhausted].into_iter().collect();
    assert!(on.retries_grpc(1) && on.retries_grpc(8) && !on.retries_grpc(14) && !on.retries_grpc(4));
}

#[test]
fn problems_are_reported_at_the_line_of_their_field() {
    let yaml = "kind: Route\nservice: inference\nrules:\n  - backends: [ { weight: 1 } ]\n    timeout: 2s\n  - backends:\n      - { weight: 1 }\n    retry: { attempts: 0 }\n  - backends: [ { weight: 1 } ]\n    timeout: forever\n";
    let p = problems(yaml);
    let at = |field: &str| p.iter().find(|p| p.field == field).map(|p| p.line);
    assert_eq!(at("rules[1].retry.attempts"), Some(8), "{p:#?}");
    assert_eq!(at("rules[2].timeout"), Some(10), "{p:#?}");
    // A missing field is reported where its parent is.
    let p = problems("kind: Route\nservice: a\nrules:\n  - backends: [ { weight: 1 } ]\n  - match: { method: GET }\n");
    assert_eq!((p[0].field.as_str(), p[0].line), ("rules[1]", 5), "{p:#?}");
    // Documents after the first keep their own lines.
    let p = problems("kind: Resilience\nservice: a\n---\nkind: Resilience\nservice: b\nmax_concurrent_requests: 0\n");
    assert_eq!(p[0].to_string(), "t.yaml:6: resilience/b: max_concurrent_requests: must be at least 1");
}

#[test]
fn rule_matching() {
    let docs = documents::parse(
        "m.yaml",
        &route("  - match: { path_prefix: /v1/run, method: POST, headers: { x-model: large } }\n    backends: [ { weight: 1 } ]\n"),
    )
    .unwrap();
    let Policy::Route(r) = weft_policy::check(&docs[0].resource).unwrap() else { panic!() };
    let m = &r.rules[1].matches;
    let req = |method: &str, path: &str, model: Option<&str>| {
        let mut b = http::Request::builder().method(method).uri(path);
        if let Some(v) = model {
            b = b.header("x-model", v);
        }
        b.body(()).unwrap()
    };
    assert!(m.matches(&req("POST", "/v1/run/x", Some("large"))));
    assert!(!m.matches(&req("GET", "/v1/run", Some("large"))), "method");
    assert!(!m.matches(&req("POST", "/v2/run", Some("large"))), "path");
    assert!(!m.matches(&req("POST", "/v1/run", Some("small"))), "header value");
    assert!(!m.matches(&req("POST", "/v1/run", None)), "header missing");
    assert!(r.rules[0].matches.matches(&req("DELETE", "/anything", None)), "an empty match takes all");
    assert_eq!(r.rules[0].timeout, None);
    assert_eq!(r.rules[1].timeout, None);
}

#[test]
fn durations_become_durations() {
    let docs = documents::parse(
        "d.yaml",
        &route("    timeout: 1m30s\n    retry: { attempts: 3, per_try_timeout: 1.5s, on: [deadline-exceeded] }\n"),
    )
    .unwrap();
    let Policy::Route(r) = weft_policy::check(&docs[0].resource).unwrap() else { panic!() };
    let rule = &r.rules[0];
    assert_eq!(rule.timeout, Some(Duration::from_secs(90)));
    let retry = rule.retry.as_ref().unwrap();
    assert_eq!((retry.attempts.get(), retry.per_try_timeout), (3, Some(Duration::from_millis(1500))));
    assert!(retry.on.contains(RetryCondition::DeadlineExceeded) && !retry.on.contains(RetryCondition::ServerError));
    let _ = doc::to_value(&docs[0].resource);
}
