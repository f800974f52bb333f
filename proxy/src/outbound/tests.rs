//! The outbound call against a scripted sender, under tokio's paused
//! clock: retries and their conditions, the budget, backoff, the breaker,
//! timeouts, fallbacks, the concurrency cap, callee sheds and held
//! endpoints. No sockets but the one in-memory connection that makes a real
//! `Incoming` request body.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use weft_policy::model::Policy;
use weft_policy::{documents, wire};
use xds_proto::v1 as pb;

use super::{Outbound, Sender};
use crate::config::{BuildContext, Service, Table, build_service};
use crate::http::response::Degraded;
use crate::state::{Identity, Shared};
use crate::transport;
use crate::transport::body::ProxyBody;
use crate::transport::pool::Peer;
use crate::transport::pool::PooledBody;

/// What the scripted endpoint does with a try.
#[derive(Debug, Clone)]
enum Reply {
    Status(u16),
    Grpc(u32),
    Shed,
    Refused,
    Reset,
    /// Answers with the status after the delay (ms).
    Slow(u64, u16),
    /// Never answers (the try's timeout, if any, fires).
    Hang,
}

#[derive(Default)]
struct Script {
    /// Per endpoint port, the replies in order (the last repeats).
    replies: Vec<(u16, VecDeque<Reply>)>,
    /// Every try: the port, and when it was sent.
    log: Vec<(u16, Instant)>,
}

#[derive(Clone, Default)]
struct Mock(Arc<Mutex<Script>>);

impl Mock {
    fn on(self, port: u16, replies: &[Reply]) -> Mock {
        self.0.lock().unwrap().replies.push((port, replies.iter().cloned().collect()));
        self
    }

    fn tries(&self) -> Vec<u16> {
        self.0.lock().unwrap().log.iter().map(|(p, _)| *p).collect()
    }

    fn times(&self) -> Vec<Instant> {
        self.0.lock().unwrap().log.iter().map(|(_, t)| *t).collect()
    }
}

impl Sender for Mock {
    async fn send(
        &self,
        peer: Peer<'_>,
        _req: Request<ProxyBody>,
        timeout: Option<Duration>,
    ) -> Result<Response<PooledBody>, transport::Error> {
        let addr = peer.addr;
        let reply = {
            let mut s = self.0.lock().unwrap();
            s.log.push((addr.port(), Instant::now()));
            let q = &mut s.replies.iter_mut().find(|(p, _)| *p == addr.port()).expect("a scripted port").1;
            if q.len() > 1 { q.pop_front().unwrap() } else { q.front().cloned().unwrap() }
        };
        let a = addr.to_string();
        let resp = |status: u16| Response::builder().status(status);
        match reply {
            Reply::Status(s) => Ok(resp(s).body(PooledBody::full("answer")).unwrap()),
            Reply::Slow(ms, s) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(resp(s).body(PooledBody::full("answer")).unwrap())
            }
            Reply::Grpc(g) => Ok(resp(200)
                .header("content-type", "application/grpc")
                .header("grpc-status", g)
                .body(PooledBody::full(""))
                .unwrap()),
            Reply::Shed => Ok(resp(429).header("x-weft-error", "rate-limited").body(PooledBody::full("")).unwrap()),
            Reply::Refused => Err(transport::Error::Connect { addr: a, reason: "refused".into() }),
            Reply::Reset => Err(transport::Error::Reset { addr: a, reason: "CANCEL".into() }),
            Reply::Hang => match timeout {
                Some(t) => {
                    tokio::time::sleep(t).await;
                    Err(transport::Error::Timeout { addr: a, ms: t.as_millis() as u64 })
                }
                None => std::future::pending().await,
            },
        }
    }
}

/// A service `inference` with endpoints on the given ports (labelled
/// `version: v<port>`), under the given policy documents.
fn service(policy: &str, ports: &[u16]) -> pb::ServiceConfig {
    let mut cfg = pb::ServiceConfig { name: "inference".into(), known: true, ..Default::default() };
    if !policy.is_empty() {
        for d in documents::parse("t.yaml", policy).unwrap_or_else(|e| panic!("{e:?}")) {
            match weft_policy::check(&d.resource).unwrap() {
                Policy::Route(r) => cfg.routes.push(wire::route(&r, 1)),
                Policy::Resilience(r) => cfg.resilience = Some(wire::resilience(&r, 1)),
                Policy::TenantPolicy(t) => cfg.tenant_policies.push(wire::tenant_policy(&t, 1)),
                Policy::AuthorizationPolicy(a) => cfg.authorization = Some(wire::authorization(&a, 1)),
            }
        }
    }
    cfg.endpoints = ports
        .iter()
        .map(|p| pb::Endpoint {
            proxy_id: format!("e{p}"),
            address: format!("127.0.0.1:{p}"),
            labels: [("version".to_string(), format!("v{p}"))].into_iter().collect(),
            ready: true,
            mtls: false,
        })
        .collect();
    cfg
}

fn outbound(mock: Mock, cfgs: Vec<pb::ServiceConfig>) -> Arc<Outbound<Mock>> {
    let identity = Identity {
        id: "caller".into(),
        service: "caller".into(),
        labels: Default::default(),
        advertise: ([127, 0, 0, 1], 1).into(),
    };
    let (shared, queues) = Shared::new(
        identity,
        http::HeaderName::from_static("x-tenant-id"),
        None,
        tokio::sync::watch::channel(true).1,
        None,
    );
    // No discovery client reads them; they stay open so subscribing works.
    std::mem::forget(queues);
    let mut table = Table::default();
    for cfg in cfgs {
        let (svc, problems) = build_service(&cfg, None, BuildContext::at(crate::clock::now_ms()));
        assert!(problems.is_empty(), "{problems:?}");
        table.services.insert(cfg.name.clone(), Arc::new(svc));
    }
    shared.table.store(Arc::new(table));
    shared.control_connected.store(true, std::sync::atomic::Ordering::Relaxed);
    Arc::new(Outbound { shared, sender: mock, replay_limit: 1024 * 1024, deadlines: Default::default() })
}

/// A request with a real `Incoming` body, off an in-memory connection.
async fn incoming(method: &str, body: &'static str) -> Request<Incoming> {
    incoming_to("inference", method, body).await
}

async fn incoming_to(host: &'static str, method: &str, body: &'static str) -> Request<Incoming> {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = Arc::new(Mutex::new(Some(tx)));
    tokio::spawn(async move {
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let tx = tx.lock().unwrap().take();
            async move {
                if let Some(tx) = tx {
                    let _ = tx.send(req);
                }
                std::future::pending::<Result<Response<Full<Bytes>>, std::convert::Infallible>>().await
            }
        });
        let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(server), svc).await;
    });
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri("/v1/run")
        .header("host", host)
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    tokio::spawn(async move {
        let _ = sender.send_request(req).await;
    });
    rx.await.unwrap()
}

/// One call through `out`: the answer's status (or the error's), and the
/// degraded marks.
async fn call(out: &Arc<Outbound<Mock>>, method: &str) -> (u16, Degraded) {
    call_within(out, method, None).await
}

/// [`call`], held to a deadline the caller set.
async fn call_within(out: &Arc<Outbound<Mock>>, method: &str, outer: Option<Instant>) -> (u16, Degraded) {
    let req = incoming(method, if method == "POST" { "payload" } else { "" }).await;
    let mut degraded = Degraded::default();
    let svc: Arc<Service> = out.resolve("inference").await.unwrap();
    let result = super::call::run(out, &svc, "default", false, req, &mut degraded, outer).await;
    let status = match result {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let _ = resp.into_body().collect().await;
            status
        }
        Err(e) => e.status().as_u16(),
    };
    (status, degraded)
}

const RETRY: &str = "kind: Route\nservice: inference\nrules:\n  - backends: [ { subset: {}, weight: 1 } ]\n    retry: { attempts: 2, on: [5xx, connect-failure, reset] }\n";
const GENEROUS: &str = "---\nkind: Resilience\nservice: inference\nretry_budget: { ratio: 1, min_per_second: 100 }\n";

#[tokio::test(start_paused = true)]
async fn a_failed_try_is_retried_on_another_endpoint() {
    let mock = Mock::default().on(1, &[Reply::Status(503)]).on(2, &[Reply::Status(503)]).on(3, &[Reply::Status(200)]);
    let out = outbound(mock.clone(), vec![service(&format!("{RETRY}{GENEROUS}"), &[1, 2, 3])]);
    for _ in 0..20 {
        let (status, degraded) = call(&out, "GET").await;
        assert_eq!(status, 200);
        let tries = mock.tries();
        let last = &tries[tries.len() - 1 - degraded.retries as usize..];
        assert_eq!(last.last(), Some(&3));
        let mut distinct = last.to_vec();
        distinct.dedup();
        assert_eq!(distinct.len(), last.len(), "a retry goes to an endpoint not tried yet: {last:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn attempts_bound_the_tries_and_the_last_answer_stands() {
    let mock = Mock::default().on(1, &[Reply::Status(503)]).on(2, &[Reply::Status(502)]).on(3, &[Reply::Status(500)]);
    let out = outbound(mock.clone(), vec![service(&format!("{RETRY}{GENEROUS}"), &[1, 2, 3])]);
    let (status, degraded) = call(&out, "GET").await;
    assert!((500..=503).contains(&status), "{status}");
    assert_eq!(mock.tries().len(), 3, "1 + attempts 2");
    assert_eq!(degraded.retries, 2);
}

#[tokio::test(start_paused = true)]
async fn a_post_is_retried_only_with_an_idempotency_key_and_never_without_a_policy() {
    let mock = Mock::default().on(1, &[Reply::Status(503)]).on(2, &[Reply::Status(503)]);
    let out = outbound(mock.clone(), vec![service(&format!("{RETRY}{GENEROUS}"), &[1, 2])]);
    let (status, degraded) = call(&out, "POST").await;
    assert_eq!((status, degraded.retries, mock.tries().len()), (503, 0, 1));
    // No route at all: one try.
    let mock = Mock::default().on(1, &[Reply::Status(503)]).on(2, &[Reply::Status(503)]);
    let out = outbound(mock.clone(), vec![service("", &[1, 2])]);
    let (status, _) = call(&out, "GET").await;
    assert_eq!((status, mock.tries().len()), (503, 1));
}

#[tokio::test(start_paused = true)]
async fn backoff_waits_between_tries_with_full_jitter() {
    let mock = Mock::default().on(1, &[Reply::Status(503)]).on(2, &[Reply::Status(503)]).on(3, &[Reply::Status(503)]);
    let out = outbound(mock.clone(), vec![service(&format!("{RETRY}{GENEROUS}"), &[1, 2, 3])]);
    let mut gaps = Vec::new();
    for _ in 0..30 {
        let before = mock.times().len();
        call(&out, "GET").await;
        let t = mock.times();
        gaps.push((t[before + 1] - t[before], t[before + 2] - t[before + 1]));
    }
    assert!(gaps.iter().all(|(a, b)| *a <= Duration::from_millis(25) && *b <= Duration::from_millis(50)), "{gaps:?}");
    assert!(
        gaps.iter().any(|(_, b)| *b > Duration::from_millis(25)),
        "the second backoff reaches past the first's cap"
    );
    assert!(gaps.iter().any(|(a, _)| *a > Duration::ZERO), "the clock moved: the waits are real");
}

#[tokio::test(start_paused = true)]
async fn the_budget_stops_retries_in_an_outage() {
    let budget = "---\nkind: Resilience\nservice: inference\nretry_budget: { ratio: 0.2, min_per_second: 0 }\n";
    let mock = Mock::default().on(1, &[Reply::Status(503)]).on(2, &[Reply::Status(503)]).on(3, &[Reply::Status(503)]);
    let out = outbound(mock.clone(), vec![service(&format!("{RETRY}{budget}"), &[1, 2, 3])]);
    for _ in 0..100 {
        call(&out, "GET").await;
    }
    // 100 calls at 20 %: 20 retries, not 200.
    assert_eq!(mock.tries().len(), 120);
    // Without a budget ratio and floor: no retry at all.
    let none = "---\nkind: Resilience\nservice: inference\nretry_budget: { ratio: 0, min_per_second: 0 }\n";
    let mock = Mock::default().on(1, &[Reply::Status(503)]).on(2, &[Reply::Status(503)]);
    let out = outbound(mock.clone(), vec![service(&format!("{RETRY}{none}"), &[1, 2])]);
    for _ in 0..10 {
        call(&out, "GET").await;
    }
    assert_eq!(mock.tries().len(), 10);
}

#[tokio::test(start_paused = true)]
async fn the_breaker_ejects_a_failing_endpoint_probes_it_once_and_takes_it_back() {
    let breaker = "---\nkind: Resilience\nservice: inference\ncircuit_breaker: { consecutive_failures: 2, base_ejection: 5s, max_ejection_percent: 50 }\nretry_budget: { ratio: 1, min_per_second: 100 }\n";
    let mock = Mock::default()
        .on(1, &[Reply::Status(503), Reply::Status(503), Reply::Status(503), Reply::Status(200)])
        .on(2, &[Reply::Slow(200, 200)]);
    // Endpoint 2 is slow, so the balancer keeps choosing 1 (its failures
    // cost it less than 2's latency) until the breaker ejects it.
    let out = outbound(mock.clone(), vec![service(&format!("{RETRY}{breaker}"), &[1, 2])]);
    let mut calls = 0;
    while mock.tries().iter().filter(|p| **p == 1).count() < 2 {
        let (status, _) = call(&out, "GET").await;
        assert_eq!(status, 200, "every call succeeds by retry");
        calls += 1;
        assert!(calls < 100);
    }
    // Ejected for 5 s: 10 calls (2 s at 200 ms each), none to it.
    let before = mock.tries().iter().filter(|p| **p == 1).count();
    let mut breaker_marked = 0;
    for _ in 0..10 {
        let (status, degraded) = call(&out, "GET").await;
        assert_eq!(status, 200);
        breaker_marked += usize::from(degraded.breaker);
    }
    assert_eq!(mock.tries().iter().filter(|p| **p == 1).count(), before, "no try reached the ejected endpoint");
    assert!(breaker_marked > 0, "calls steered away are marked 'breaker'");
    // After the ejection: one probe; it fails again, and the second
    // ejection is longer (10 s).
    tokio::time::advance(Duration::from_secs(4)).await;
    for _ in 0..5 {
        call(&out, "GET").await;
    }
    assert_eq!(mock.tries().iter().filter(|p| **p == 1).count(), before + 1, "exactly one probe");
    tokio::time::advance(Duration::from_secs(6)).await;
    for _ in 0..5 {
        call(&out, "GET").await;
    }
    assert_eq!(mock.tries().iter().filter(|p| **p == 1).count(), before + 1, "the second ejection is longer");
    // Then the probe succeeds (its next reply) and it takes traffic again.
    tokio::time::advance(Duration::from_secs(3)).await;
    assert_eq!(call(&out, "GET").await.0, 200);
    let after = mock.tries().iter().filter(|p| **p == 1).count();
    assert_eq!(after, before + 2, "the second probe");
    for _ in 0..40 {
        call(&out, "GET").await;
    }
    assert!(mock.tries().iter().filter(|p| **p == 1).count() > after + 5, "back in rotation");
}

#[tokio::test(start_paused = true)]
async fn a_hanging_endpoint_costs_a_per_try_timeout_and_the_route_timeout_ends_the_call() {
    let route = "kind: Route\nservice: inference\nrules:\n  - backends: [ { subset: {}, weight: 1 } ]\n    timeout: 1s\n    retry: { attempts: 2, per_try_timeout: 200ms, on: [5xx] }\n";
    let mock = Mock::default().on(1, &[Reply::Hang]).on(2, &[Reply::Status(200)]);
    let out = outbound(mock.clone(), vec![service(&format!("{route}{GENEROUS}"), &[1, 2])]);
    for _ in 0..10 {
        let started = Instant::now();
        let (status, degraded) = call(&out, "GET").await;
        assert_eq!(status, 200);
        assert!(started.elapsed() < Duration::from_millis(260), "{:?}", started.elapsed());
        assert!(degraded.retries <= 1);
    }
    // Every endpoint hangs: 504 at the route's timeout, marked.
    let mock = Mock::default().on(1, &[Reply::Hang]).on(2, &[Reply::Hang]);
    let route =
        "kind: Route\nservice: inference\nrules:\n  - backends: [ { subset: {}, weight: 1 } ]\n    timeout: 300ms\n";
    let out = outbound(mock.clone(), vec![service(route, &[1, 2])]);
    let started = Instant::now();
    let (status, degraded) = call(&out, "GET").await;
    assert_eq!(status, 504);
    assert!(degraded.timeout);
    assert_eq!(started.elapsed(), Duration::from_millis(300));
}

#[tokio::test(start_paused = true)]
async fn fallbacks_answer_when_the_service_cannot() {
    let fixed = "kind: Route\nservice: inference\nrules:\n  - backends: [ { subset: {}, weight: 1 } ]\n    fallback: { status: 200, body: busy }\n";
    let mock = Mock::default().on(1, &[Reply::Status(503)]);
    let out = outbound(mock.clone(), vec![service(fixed, &[1])]);
    let (status, degraded) = call(&out, "GET").await;
    assert_eq!((status, degraded.fallback.as_deref()), (200, Some("static")));
    // Another service: its endpoint answers.
    let other = "kind: Route\nservice: inference\nrules:\n  - backends: [ { subset: {}, weight: 1 } ]\n    fallback: { service: lite }\n";
    let mock = Mock::default().on(1, &[Reply::Refused]).on(9, &[Reply::Status(200)]);
    let mut lite = service("", &[9]);
    lite.name = "lite".into();
    let out = outbound(mock.clone(), vec![service(other, &[1]), lite]);
    let (status, degraded) = call(&out, "GET").await;
    assert_eq!((status, degraded.fallback.as_deref()), (200, Some("lite")));
    assert_eq!(mock.tries(), [1, 9]);
    // No endpoint at all: the fallback too.
    let out = outbound(Mock::default(), vec![service(fixed, &[])]);
    assert_eq!(call(&out, "GET").await.0, 200);
}

#[tokio::test(start_paused = true)]
async fn over_the_concurrency_cap_a_call_fails_at_once_as_shed() {
    let cap = "kind: Resilience\nservice: inference\nmax_concurrent_requests: 1\n";
    let mock = Mock::default().on(1, &[Reply::Hang]);
    let out = outbound(mock.clone(), vec![service(cap, &[1])]);
    let first = tokio::spawn({
        let out = out.clone();
        async move { call(&out, "GET").await }
    });
    while mock.tries().is_empty() {
        tokio::task::yield_now().await;
    }
    let started = Instant::now();
    let (status, degraded) = call(&out, "GET").await;
    assert_eq!((status, degraded.shed), (503, true));
    assert_eq!(started.elapsed(), Duration::ZERO, "fails fast");
    assert_eq!(mock.tries().len(), 1, "the second call never reached an endpoint");
    first.abort();
}

#[tokio::test(start_paused = true)]
async fn a_call_the_callee_shed_goes_once_to_another_instance_without_a_retry_policy() {
    let tenants = "kind: TenantPolicy\ntenant: acme\nservice: inference\nmax_concurrent_requests: 5\n";
    let mock = Mock::default().on(1, &[Reply::Shed]).on(2, &[Reply::Shed]);
    let out = outbound(mock.clone(), vec![service(tenants, &[1, 2])]);
    let (status, degraded) = call(&out, "POST").await;
    assert_eq!((status, degraded.shed, degraded.retries), (429, true, 1));
    assert_eq!(mock.tries().len(), 2, "one more try, not more");
}

#[tokio::test(start_paused = true)]
async fn grpc_statuses_are_retried_as_the_conditions_say() {
    let route = |on: &str| {
        format!(
            "kind: Route\nservice: inference\nrules:\n  - backends: [ {{ subset: {{}}, weight: 1 }} ]\n    retry: {{ attempts: 1, on: [{on}] }}\n{GENEROUS}"
        )
    };
    for (on, code, retried) in [
        ("resource-exhausted", 8, true),
        ("cancelled", 1, true),
        ("deadline-exceeded", 4, true),
        ("unavailable", 14, true),
        ("unavailable", 8, false),
        ("5xx", 14, false),
    ] {
        let mock = Mock::default().on(1, &[Reply::Grpc(code)]).on(2, &[Reply::Grpc(code)]);
        let out = outbound(mock.clone(), vec![service(&route(on), &[1, 2])]);
        let (_, degraded) = call(&out, "GET").await;
        assert_eq!(mock.tries().len(), 1 + usize::from(retried), "grpc-status {code} under on: [{on}]");
        assert_eq!(degraded.retries, u32::from(retried));
    }
    // connect-failure and reset retry those errors.
    let mock = Mock::default().on(1, &[Reply::Reset]).on(2, &[Reply::Reset]);
    let out = outbound(mock.clone(), vec![service(&format!("{RETRY}{GENEROUS}"), &[1, 2])]);
    assert_eq!(call(&out, "GET").await.0, 502);
    let tries = mock.tries();
    assert_eq!(tries.len(), 3, "1 + attempts 2, the third on an endpoint tried already");
    assert!(tries[..2].contains(&1) && tries[..2].contains(&2), "a retry goes to the endpoint not tried yet first");
}

#[tokio::test(start_paused = true)]
async fn a_held_endpoint_that_refuses_the_connection_costs_one_free_try() {
    let mock = Mock::default().on(1, &[Reply::Refused]).on(2, &[Reply::Status(200)]);
    let out = outbound(mock.clone(), vec![service("", &[1, 2])]);
    // Endpoint 1's record vanishes: held.
    let svc = out.shared.table.load().services["inference"].clone();
    let mut gone = svc.source.clone();
    gone.endpoints.retain(|e| e.proxy_id != "e1");
    let (held, _) = build_service(&gone, Some(&svc), BuildContext::at(crate::clock::now_ms()));
    assert!(held.holds);
    let mut table = Table::default();
    table.services.insert("inference".into(), Arc::new(held));
    out.shared.table.store(Arc::new(table));
    for _ in 0..20 {
        let (status, _) = call(&out, "POST").await;
        assert_eq!(status, 200, "never a refused connection for the caller, whatever its method");
    }
    assert!(mock.tries().contains(&1), "the held endpoint was still tried");
}

#[tokio::test(start_paused = true)]
async fn a_service_discovery_never_answers_for_is_a_503_no_discovery_after_three_seconds() {
    let out = outbound(Mock::default(), vec![]);
    let started = Instant::now();
    let resp = out.clone().handle(incoming_to("billing", "GET", "").await, None).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-weft-error"], "no-discovery");
    assert_eq!(started.elapsed(), Duration::from_secs(3), "the wait for discovery is bounded");
    assert!(out.shared.subscriptions.lock().unwrap().contains("billing"), "the sidecar asked for it");
}

#[tokio::test(start_paused = true)]
async fn injected_aborts_are_retried_and_never_count_against_the_endpoint() {
    let route = "kind: Route\nservice: inference\nrules:\n  - backends: [ { subset: {}, weight: 1 } ]\n    retry: { attempts: 5, on: [5xx] }\n    fault: { abort: { percent: 100, status: 503 } }\n---\nkind: Resilience\nservice: inference\ncircuit_breaker: { consecutive_failures: 1, base_ejection: 30s, max_ejection_percent: 100 }\nretry_budget: { ratio: 1, min_per_second: 100 }\n";
    let mock = Mock::default().on(1, &[Reply::Status(200)]);
    let out = outbound(mock.clone(), vec![service(route, &[1])]);
    for _ in 0..10 {
        let (status, degraded) = call(&out, "GET").await;
        assert_eq!((status, degraded.retries), (503, 5), "every try aborted, and was retried");
    }
    assert!(mock.tries().is_empty(), "an aborted try never reaches the endpoint");
    let svc = out.shared.table.load().services["inference"].clone();
    let e = &svc.all_ready[0];
    assert!(!e.health.is_ejected(crate::clock::now_ms()), "one failure ejects, yet the endpoint is not ejected");
}

#[tokio::test(start_paused = true)]
async fn the_callers_deadline_cuts_the_routes_timeouts_backoff_and_fallback() {
    // The route would allow 10 s, tries of 5 s, three attempts and a
    // fallback; the caller has 400 ms.
    let route = "kind: Route\nservice: inference\nrules:\n  - backends: [ { subset: {}, weight: 1 } ]\n    timeout: 10s\n    retry: { attempts: 3, per_try_timeout: 5s, on: [5xx] }\n    fallback: { status: 200, body: late }\n";
    let mock = Mock::default().on(1, &[Reply::Hang]).on(2, &[Reply::Hang]);
    let out = outbound(mock.clone(), vec![service(&format!("{route}{GENEROUS}"), &[1, 2])]);
    let started = Instant::now();
    let (status, degraded) = call_within(&out, "GET", Some(started + Duration::from_millis(400))).await;
    assert_eq!(status, 504, "no fallback after the deadline");
    assert!(degraded.timeout);
    assert_eq!(started.elapsed(), Duration::from_millis(400), "ended at the caller's deadline");
    assert_eq!(mock.tries().len(), 1, "the one try took all the time left");

    // Already past: nothing is sent.
    let mock = Mock::default().on(1, &[Reply::Status(200)]);
    let out = outbound(mock.clone(), vec![service(route, &[1])]);
    let (status, degraded) = call_within(&out, "GET", Some(Instant::now())).await;
    assert_eq!(status, 504);
    assert!(degraded.timeout);
    assert!(mock.tries().is_empty());

    // A sooner route timeout still counts.
    let short = route.replace("timeout: 10s", "timeout: 100ms").replace("per_try_timeout: 5s", "per_try_timeout: 50ms");
    let mock = Mock::default().on(1, &[Reply::Hang]);
    let out = outbound(mock.clone(), vec![service(&format!("{short}{GENEROUS}"), &[1])]);
    let started = Instant::now();
    let (status, _) = call_within(&out, "GET", Some(started + Duration::from_secs(5))).await;
    assert_eq!(status, 200, "the route's own fallback, within the caller's time");
    assert_eq!(started.elapsed(), Duration::from_millis(100));
}

const HEDGE: &str = "kind: Route\nservice: inference\nrules:\n  - backends: [ { subset: {}, weight: 1 } ]\n    timeout: 10s\n    retry: { attempts: 1, on: [5xx] }\n    hedge: { after: 100ms }\n";

#[tokio::test(start_paused = true)]
async fn a_hedge_after_its_delay_takes_the_first_answer_and_cancels_the_stalled_try() {
    // Endpoint 1 stalls 5 s, endpoint 2 answers in 10 ms.
    let mock = Mock::default().on(1, &[Reply::Slow(5000, 200)]).on(2, &[Reply::Slow(10, 200)]);
    let out = outbound(mock.clone(), vec![service(&format!("{HEDGE}{GENEROUS}"), &[1, 2])]);
    let mut hedged = 0;
    for _ in 0..20 {
        let start = Instant::now();
        let (status, degraded) = call(&out, "GET").await;
        assert_eq!(status, 200);
        let took = start.elapsed();
        if degraded.hedged {
            hedged += 1;
            // The stalled try, then the hedge 100 ms later, which answered.
            assert_eq!(took, Duration::from_millis(110), "{:?}", mock.tries());
        } else {
            assert_eq!(took, Duration::from_millis(10), "no hedge when the first answers in time");
        }
        assert!(!degraded.hedged || degraded.retries == 0, "a hedge is not a retry");
    }
    assert!(hedged >= 1, "endpoint 1 was drawn at least once");
    // The stalled try's 100 ms told balancing to keep away from it.
    let tries = mock.tries();
    assert!(tries.iter().filter(|p| **p == 1).count() <= 3, "{tries:?}");
    // A hedge waits no longer than it must: a call answered at once.
    let quick = Mock::default().on(1, &[Reply::Status(200)]).on(2, &[Reply::Status(200)]);
    let out = outbound(quick.clone(), vec![service(&format!("{HEDGE}{GENEROUS}"), &[1, 2])]);
    assert!(!call(&out, "GET").await.1.hedged);
    assert_eq!(quick.tries().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_failed_first_answer_waits_for_the_hedge_and_the_budget_bounds_hedges() {
    let mock = Mock::default().on(1, &[Reply::Slow(300, 503)]).on(2, &[Reply::Slow(300, 200)]);
    let out = outbound(mock.clone(), vec![service(&format!("{HEDGE}{GENEROUS}"), &[1, 2])]);
    for _ in 0..10 {
        let (status, degraded) = call(&out, "GET").await;
        assert_eq!(status, 200, "the hedge's answer stands when the first fails");
        assert!(degraded.hedged || mock.tries().last() == Some(&2));
    }
    // All slow, a budget of 10 % and no floor: 50 calls at once send at
    // most 5 hedges.
    let budget = "---\nkind: Resilience\nservice: inference\nretry_budget: { ratio: 0.1, min_per_second: 0 }\n";
    let slow = Mock::default().on(1, &[Reply::Slow(300, 200)]).on(2, &[Reply::Slow(300, 200)]);
    let out = outbound(slow.clone(), vec![service(&format!("{HEDGE}{budget}"), &[1, 2])]);
    let calls: Vec<_> = (0..50).map(|_| call(&out, "GET")).collect();
    let results = futures_util::future::join_all(calls).await;
    let hedges = results.iter().filter(|(_, d)| d.hedged).count();
    assert!(results.iter().all(|(s, _)| *s == 200));
    assert_eq!(hedges, 5, "10 % of 50 calls");
    assert_eq!(slow.tries().len(), 55);
    // Without retries left (a POST without an idempotency key): no hedge.
    let post = Mock::default().on(1, &[Reply::Slow(300, 200)]).on(2, &[Reply::Slow(300, 200)]);
    let out = outbound(post.clone(), vec![service(&format!("{HEDGE}{GENEROUS}"), &[1, 2])]);
    assert!(!call(&out, "POST").await.1.hedged);
    assert_eq!(post.tries().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_p95_hedge_waits_for_the_services_own_95th_percentile() {
    let p95 = HEDGE.replace("after: 100ms", "after: p95");
    // Both answer in 10 ms; endpoint 2 stalls 5 s from its 30th call on.
    let mut two = vec![Reply::Slow(10, 200); 29];
    two.push(Reply::Slow(5000, 200));
    let mock = Mock::default().on(1, &[Reply::Slow(10, 200)]).on(2, &two);
    let out = outbound(mock.clone(), vec![service(&format!("{p95}{GENEROUS}"), &[1, 2])]);
    let mut hedged = 0;
    for _ in 0..80 {
        let start = Instant::now();
        let (status, degraded) = call(&out, "GET").await;
        assert_eq!(status, 200);
        if degraded.hedged {
            hedged += 1;
            // The service's p95 is 10 ms: the hedge went then (not for the
            // answers that came in those 10 ms), and endpoint 1 answered
            // 10 ms later.
            assert_eq!(start.elapsed(), Duration::from_millis(20), "{:?}", mock.tries());
        }
    }
    assert!(hedged >= 1, "the stalled endpoint was drawn and hedged: {:?}", mock.tries());
}
