//! Agent traffic through real sidecars:
//!
//! - streamed answers (an LLM's tokens over SSE or gRPC) under the route's
//!   `first_byte_timeout` and `idle_timeout`: a stream that keeps producing
//!   runs as long as it produces; one slow to its first token, or stalling
//!   mid-answer, is cut, counted, and ended so the client cannot take it
//!   for a whole answer; time to first byte and the gaps between chunks are
//!   measured per service and endpoint;
//! - session affinity (`hash_on`): a session's calls stay on one instance,
//!   move once when it dies, and stay where they moved;
//! - hedging: a stalled instance's calls answered by another, within the
//!   retry budget;
//! - balancing by the first byte of a streamed answer, and latency
//!   outliers: an instance slow to its first byte ejected like a failing
//!   one;
//! - token reservations: a burst of large calls never reserves more than
//!   the quota, and quotas nest (tenant, calling service, session).

use std::time::Duration;

use harness::topology::wait_policy;
use harness::{App, Req, Topology, apply, h2_send, metric};
use http_body_util::BodyExt;

const ROUTES: &str = "kind: Route
service: inference
rules:
  - backends: [ { subset: {}, weight: 1 } ]
    timeout: 2s
    first_byte_timeout: 600ms
    idle_timeout: 600ms
---
kind: Route
service: model
rules:
  - backends: [ { subset: {}, weight: 1 } ]
    idle_timeout: 600ms
";

/// The body of an answer as far as it came, and whether it ended cleanly.
async fn read(resp: http::Response<hyper::body::Incoming>) -> (String, bool) {
    let mut body = resp.into_body();
    let mut got = Vec::new();
    loop {
        match body.frame().await {
            None => return (String::from_utf8_lossy(&got).into_owned(), true),
            Some(Err(_)) => return (String::from_utf8_lossy(&got).into_owned(), false),
            Some(Ok(f)) => got.extend_from_slice(f.data_ref().map(|d| d.as_ref()).unwrap_or_default()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_run_while_they_produce_and_are_cut_when_they_stall() {
    let bed = Topology::new()
        .instance("inference", "version=v1")
        .instance("model", "version=v1")
        .app(App::Grpc)
        .start()
        .await;
    let applied = apply(&bed.control_url(), ROUTES).await;
    assert_eq!(applied.code, 0, "{applied:?}");
    let caller = &bed.caller.sidecar;
    let out = caller.outbound;

    // Ten tokens 300 ms apart: 3 s, past the route's 2 s timeout and five
    // times each stream timeout, never cut while it produces.
    let resp = Req::get(out, "inference", "/stream?chunks=10&gap_ms=300").open().await.unwrap();
    assert_eq!(resp.status(), 200);
    let (body, whole) = read(resp).await;
    assert!(whole, "a producing stream ended cleanly: {body}");
    assert_eq!(body.lines().count(), 10, "{body}");

    // A first token 3 s late: the head came, then the stream is cut at the
    // first-byte timeout (aborted, not ended as if whole).
    let resp = Req::get(out, "inference", "/stream?chunks=3&first_ms=3000").open().await.unwrap();
    assert_eq!(resp.status(), 200);
    let started = std::time::Instant::now();
    let (body, whole) = read(resp).await;
    assert!(!whole && body.is_empty(), "cut before any token: {whole} {body:?}");
    assert!(started.elapsed() < Duration::from_millis(2500), "cut at the timeout, not at the first token");

    // Three tokens, then a 3 s stall: cut after the third.
    let resp = Req::get(out, "inference", "/stream?chunks=6&gap_ms=50&stall_at=3&stall_ms=3000").open().await.unwrap();
    let (body, whole) = read(resp).await;
    assert!(!whole, "an idle stream is aborted: {body}");
    assert_eq!(body.lines().count(), 3, "{body}");

    // The same over h2c: the stream is reset.
    let r = h2_send(out, "inference", "/stream?chunks=6&gap_ms=50&stall_at=2&stall_ms=3000", &[]).await;
    assert!(r.is_err(), "h2c: the stream is reset, not ended: {r:?}");

    // gRPC: a chat whose third answer takes the model 3 s ends with
    // DEADLINE_EXCEEDED in the trailers, marked idle-timeout.
    let mut client = harness::inference_client(out, "http://model").await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = client.chat(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    for (i, delay_ms) in [0u32, 200, 3000].into_iter().enumerate() {
        let m = harness::example_pb::InferRequest { prompt: format!("m{i}"), delay_ms, ..Default::default() };
        tx.send(m).await.unwrap();
    }
    let mut got = 0;
    let status = loop {
        match replies.message().await {
            Ok(Some(_)) => got += 1,
            Ok(None) => panic!("the chat ended cleanly after {got}"),
            Err(status) => break status,
        }
    };
    assert_eq!((got, status.code()), (2, tonic::Code::DeadlineExceeded), "{status:?}");
    assert_eq!(status.message(), "idle-timeout");
    assert_eq!(status.metadata().get("x-weft-degraded").unwrap(), "idle-timeout");
    drop(tx);

    // Each cut is a degraded call, under its trace, at the control plane.
    let url = bed.control_url();
    let url = &url;
    harness::eventually("the cuts are reported as degraded calls", Duration::from_secs(10), || async move {
        let t = harness::weftctl(url, &["traces", "--degraded", "--service", "inference"], None).await;
        t.stdout.matches("idle-timeout").count() == 2 && t.stdout.lines().any(|l| l.ends_with(" timeout"))
    })
    .await;
    let m = caller.metrics().await;
    let cuts = |svc: &str, reason: &str| {
        metric(&m, "weft_stream_cuts_total", &[&format!("service=\"{svc}\""), &format!("reason=\"{reason}\"")])
    };
    assert_eq!(cuts("inference", "first-byte-timeout"), 1.0, "{m}");
    assert_eq!(cuts("inference", "idle-timeout"), 2.0, "{m}");
    assert_eq!(cuts("model", "idle-timeout"), 1.0, "{m}");
    // Time to first byte and inter-chunk gaps, per service and endpoint.
    let endpoint = format!("endpoint=\"{}\"", bed.instance("inference", "v1").sidecar.inbound);
    let ttfb = metric(&m, "weft_first_byte_seconds_count", &["service=\"inference\"", &endpoint]);
    assert_eq!(ttfb, 3.0, "three streams got a first byte: {m}");
    let gaps = metric(&m, "weft_stream_gap_seconds_count", &["service=\"inference\"", &endpoint]);
    assert_eq!(gaps, 9.0 + 2.0 + 1.0, "{m}");
    let slow_gaps = metric(&m, "weft_stream_gap_seconds_bucket", &["service=\"inference\"", "le=\"0.25\""]);
    assert_eq!(slow_gaps, 3.0, "only the 50 ms gaps are under 250 ms: {m}");
}

const SESSIONS: &str = "kind: Route
service: mcp
rules:
  - backends: [ { subset: {}, weight: 1 } ]
    hash_on: { header: mcp-session-id }
    retry: { attempts: 2, on: [connect-failure, reset, 5xx] }
---
kind: Resilience
service: mcp
circuit_breaker: { consecutive_failures: 1, base_ejection: 60s }
";

/// Which instance served each of `sessions` calls, `per` calls a session
/// (every call answered, every session on one instance).
async fn where_sessions_go(out: std::net::SocketAddr, sessions: usize, per: usize) -> Vec<String> {
    let mut homes = Vec::new();
    for s in 0..sessions {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..per {
            let r = Req::get(out, "mcp", "/tools/list").header("mcp-session-id", &format!("s-{s}")).send().await;
            let r = r.unwrap();
            assert_eq!(r.0, 200, "session s-{s}: {r:?}");
            seen.insert(harness::served_by(&r));
        }
        assert_eq!(seen.len(), 1, "session s-{s} went to {seen:?}");
        homes.extend(seen);
    }
    homes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_stays_on_its_instance_and_moves_once_when_it_dies() {
    let mut bed = Topology::new().instances("mcp", &["v1", "v2", "v3"]).start().await;
    let applied = apply(&bed.control_url(), SESSIONS).await;
    assert_eq!(applied.code, 0, "{applied:?}");
    bed.wait_endpoints("mcp", 3).await;
    let out = bed.caller.sidecar.outbound;

    // 30 sessions, 4 calls each: each on one instance, together on all.
    let before = where_sessions_go(out, 30, 4).await;
    let used: std::collections::BTreeSet<_> = before.iter().collect();
    assert_eq!(used.len(), 3, "sessions spread over the instances: {before:?}");
    // Calls without a session still balance.
    let mut free = std::collections::BTreeSet::new();
    for _ in 0..30 {
        free.insert(harness::served_by(&Req::get(out, "mcp", "/").send().await.unwrap()));
    }
    assert!(free.len() >= 2, "{free:?}");

    // The instance with the most sessions dies (its sidecar is killed: the
    // caller finds its connections refused before the control plane says
    // so). Its sessions move, each to one other instance, and stay; every
    // other session stays where it was; no call fails.
    let victim = ["mcp/v1", "mcp/v2", "mcp/v3"]
        .into_iter()
        .max_by_key(|v| before.iter().filter(|h| h == v).count())
        .unwrap()
        .to_string();
    let i = bed.instances.iter().position(|i| format!("mcp/{}", i.version) == victim).unwrap();
    bed.instances[i].sidecar.kill().await;
    let after = where_sessions_go(out, 30, 4).await;
    for (s, (b, a)) in before.iter().zip(&after).enumerate() {
        if *b == victim {
            assert_ne!(a, &victim, "session s-{s} moved");
        } else {
            assert_eq!(a, b, "session s-{s} stayed");
        }
    }
    // And once the control plane has dropped the instance, they stay put.
    harness::topology::wait_ready_endpoints(&bed.caller.sidecar, "mcp", 2).await;
    assert_eq!(where_sessions_go(out, 30, 2).await, after);
    let m = bed.caller.sidecar.metrics().await;
    let all = metric(&m, "weft_requests_total", &["service=\"mcp\""]);
    assert_eq!(all, metric(&m, "weft_requests_total", &["service=\"mcp\"", "code=\"200\""]), "none failed: {m}");
}

const HEDGING: &str = "kind: Route
service: chat
rules:
  - backends: [ { subset: {}, weight: 1 } ]
    timeout: 10s
    retry: { attempts: 1, on: [5xx] }
    hedge: { after: 150ms }
---
kind: Resilience
service: chat
retry_budget: { ratio: 0.1, min_per_second: 0 }
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedge_cuts_the_tail_of_a_stalled_instance_within_the_retry_budget() {
    let bed = Topology::new().instances("chat", &["v1", "v2", "v3"]).start().await;
    let applied = apply(&bed.control_url(), HEDGING).await;
    assert_eq!(applied.code, 0, "{applied:?}");
    bed.wait_endpoints("chat", 3).await;
    let caller = &bed.caller.sidecar;
    wait_policy(caller, "chat", "/resilience/retry_budget_ratio").await;
    let out = caller.outbound;
    let hits = bed.hits("chat");
    // v3 stalls 5 s on every call (a model stuck on a long prompt).
    bed.instance("chat", "v3").app.mode.latency_ms.store(5000, std::sync::atomic::Ordering::Relaxed);

    // 40 calls at once: those that drew v3 are hedged to another instance,
    // within the budget (10 % of calls: 4 hedges at most).
    let calls: Vec<_> = (0..40).map(|_| async move { Req::get(out, "chat", "/v1/chat").send().await }).collect();
    let answers = futures_util::future::join_all(calls).await;
    let answers: Vec<_> = answers.into_iter().map(Result::unwrap).collect();
    assert!(answers.iter().all(|r| r.0 == 200), "{answers:?}");
    let hedged = answers.iter().filter(|r| harness::degraded(r).contains("hedge")).count();
    let m = bed.caller.sidecar.metrics().await;
    let sent = metric(&m, "weft_hedges_total", &["service=\"chat\""]);
    assert_eq!(sent as usize, hedged, "{m}");
    assert!((1..=4).contains(&hedged), "the budget bounds hedges: {hedged}; {m}");
    let hedge_won = metric(&m, "weft_hedges_total", &["service=\"chat\"", "won=\"hedge\""]) as usize;
    assert_eq!(hedge_won, hedged, "each hedge beat the stalled try: {m}");
    // Every hedged call was answered by a healthy instance, not by v3.
    for r in answers.iter().filter(|r| harness::degraded(r).contains("hedge")) {
        assert_ne!(harness::served_by(r), "chat/v3", "{r:?}");
    }
    // Each hedge cost one try more, no more.
    assert_eq!(bed.hits("chat"), hits + 40 + hedged as u64, "one extra try per hedge");
}

const OUTLIER: &str = "kind: Route
service: gen
rules:
  - backends: [ { subset: {}, weight: 1 } ]
---
kind: Resilience
service: gen
circuit_breaker: { consecutive_failures: 5, base_ejection: 60s, max_ejection_percent: 50 }
latency_outlier: { multiple: 3, window: 30s }
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_slow_to_its_first_byte_is_ejected_like_a_failing_one() {
    let bed = Topology::new().instances("gen", &["v1", "v2", "v3"]).start().await;
    let applied = apply(&bed.control_url(), OUTLIER).await;
    assert_eq!(applied.code, 0, "{applied:?}");
    bed.wait_endpoints("gen", 3).await;
    let caller = &bed.caller.sidecar;
    wait_policy(caller, "gen", "/resilience/latency_outlier_multiple").await;
    let out = caller.outbound;
    // v3 answers every call, successfully, 400 ms late: no failure a
    // breaker would count.
    let slow = &bed.instance("gen", "v3").app;
    slow.mode.latency_ms.store(400, std::sync::atomic::Ordering::Relaxed);
    let burst = || async move {
        let calls: Vec<_> = (0..30).map(|_| async move { Req::get(out, "gen", "/v1/generate").send().await }).collect();
        let answers: Vec<_> = futures_util::future::join_all(calls).await.into_iter().map(Result::unwrap).collect();
        assert!(answers.iter().all(|r| r.0 == 200), "{answers:?}");
        answers
    };
    // Under a burst, load spreads onto v3 too; its first bytes, all far
    // above 3 × the service's median, eject it.
    burst().await;
    let hits = slow.mode.hits();
    assert!(hits >= 3, "v3 took part of the burst: {hits}");
    let m = caller.metrics().await;
    assert_eq!(metric(&m, "weft_latency_outlier_ejections_total", &["service=\"gen\""]), 1.0, "{m}");
    assert_eq!(metric(&m, "weft_breaker_ejections_total", &["service=\"gen\""]), 1.0, "{m}");
    // Ejected: the next burst goes around it, and the calls it diverts are
    // marked as the breaker's doing.
    let answers = burst().await;
    assert_eq!(slow.mode.hits(), hits, "nothing reached the ejected instance");
    let diverted = answers.iter().filter(|r| harness::degraded(r).contains("breaker")).count();
    assert!(diverted >= 1, "{answers:?}");
}

const QUOTA: &str = "kind: TenantPolicy
tenant: acme
service: llm
tokens_per_minute: 1000
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_large_calls_never_reserves_more_than_the_tenants_quota() {
    let bed = Topology::new().instance("llm", "version=v1").start().await;
    let applied = apply(&bed.control_url(), QUOTA).await;
    assert_eq!(applied.code, 0, "{applied:?}");
    bed.wait_endpoints("llm", 1).await;
    let llm = &bed.instance("llm", "v1");
    wait_policy(&llm.sidecar, "llm", "/tenants").await;
    let out = bed.caller.sidecar.outbound;
    // Each call may use up to 100 tokens and uses 70; the model takes
    // 300 ms, so all 40 calls are in flight together.
    llm.app.mode.usage_tokens.store(70, std::sync::atomic::Ordering::Relaxed);
    llm.app.mode.latency_ms.store(300, std::sync::atomic::Ordering::Relaxed);
    let hits = llm.app.mode.hits();
    let calls: Vec<_> = (0..40)
        .map(|i| async move {
            let r = if i % 2 == 0 {
                Req::get(out, "llm", "/v1/chat").header("x-weft-max-tokens", "100")
            } else {
                // The common LLM APIs' own field, in a JSON body.
                Req::post(out, "llm", "/v1/chat/completions", r#"{"model":"m","max_tokens":100,"messages":[]}"#)
                    .header("content-type", "application/json")
            };
            r.header("x-tenant-id", "acme").send().await.unwrap()
        })
        .collect();
    let answers = futures_util::future::join_all(calls).await;
    let admitted: Vec<_> = answers.iter().filter(|r| r.0 == 200).collect();
    let refused: Vec<_> = answers.iter().filter(|r| r.0 == 429).collect();
    assert_eq!(admitted.len() + refused.len(), 40, "{answers:?}");
    // 1000 tokens hold exactly ten reservations of 100: not one more.
    assert_eq!(admitted.len(), 10, "{answers:?}");
    assert!(refused.iter().all(|r| harness::header(r, "x-weft-error") == "token-quota"), "{refused:?}");
    let used: u64 = admitted.iter().map(|r| harness::header(r, "x-weft-usage-tokens").parse::<u64>().unwrap()).sum();
    assert!(used <= 1000, "overshoot: {used} tokens used of 1000");
    assert_eq!(llm.app.mode.hits() - hits, 10, "refused calls never reached the model");
    // The 300 tokens they did not use came back: three more fit.
    let more: Vec<_> = (0..5)
        .map(|_| async move {
            Req::get(out, "llm", "/v1/chat")
                .headers(&[("x-weft-max-tokens", "100"), ("x-tenant-id", "acme")])
                .send()
                .await
                .unwrap()
                .0
        })
        .collect();
    let more = futures_util::future::join_all(more).await;
    assert_eq!(more.iter().filter(|s| **s == 200).count(), 3, "{more:?}");
    // A declaration that is not a count is the caller's mistake.
    let bad = Req::get(out, "llm", "/").headers(&[("x-weft-max-tokens", "lots"), ("x-tenant-id", "acme")]);
    let bad = bad.send().await.unwrap();
    assert_eq!((bad.0, harness::header(&bad, "x-weft-error").as_str()), (400, "bad-request"), "{bad:?}");
    // gRPC callers are refused RESOURCE_EXHAUSTED.
    let grpc = [
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("x-weft-max-tokens", "5000"),
        ("x-tenant-id", "acme"),
    ];
    let r = h2_send(out, "llm", "/weft.example.v1.Inference/Infer", &grpc).await.unwrap();
    assert_eq!(harness::header(&r, "grpc-status"), "8", "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_quotas_nest_tenant_then_calling_service_then_session() {
    use harness::pki::{AGENT, INFERENCE, Pki, SCHEDULER, secured};
    let pki = Pki::init().await;
    let etcd = harness::Etcd::start().await;
    let control = pki.control(&etcd, "1h").await;
    let policy = "kind: TenantPolicy
tenant: '*'
service: inference
tokens_per_minute: 1000
callers: { agent: { tokens_per_minute: 400 } }
session: { header: x-session-id, tokens_per_minute: 250 }
";
    let applied = pki.weftctl_in(&control, &["apply", "-f", "-"], policy).await;
    assert_eq!(applied.code, 0, "{applied:?}");
    let apps = [
        harness::Backend::http("inference", "v1").await,
        harness::Backend::http("agent", "v1").await,
        harness::Backend::http("scheduler", "v1").await,
    ];
    let (inference, agent, scheduler) = tokio::join!(
        secured(&pki, &control, "inference", INFERENCE, apps[0].addr, &[]),
        secured(&pki, &control, "agent", AGENT, apps[1].addr, &[]),
        secured(&pki, &control, "scheduler", SCHEDULER, apps[2].addr, &[]),
    );
    wait_policy(&inference, "inference", "/tenants").await;
    // The app reports no usage: each call spends what it declared.
    let spend = |from: std::net::SocketAddr, session: &'static str, tokens: &'static str| async move {
        let r = Req::get(from, "inference", "/v1/chat")
            .headers(&[("x-weft-max-tokens", tokens), ("x-session-id", session)])
            .send()
            .await
            .unwrap();
        (r.0, harness::header(&r, "x-weft-error"))
    };
    let ok = (200, String::new());
    let over = (429, "token-quota".to_string());
    let (a, s) = (agent.outbound, scheduler.outbound);
    // A session: 250.
    assert_eq!(spend(a, "s1", "200").await, ok);
    assert_eq!(spend(a, "s1", "100").await, over, "session s1 has 50 left");
    // The agent, over all its sessions: 400.
    assert_eq!(spend(a, "s2", "200").await, ok);
    assert_eq!(spend(a, "s3", "100").await, over, "the agent has spent its 400");
    // Another caller (no quota of its own) within the tenant's 1000.
    assert_eq!(spend(s, "s4", "250").await, ok);
    assert_eq!(spend(s, "s5", "250").await, ok);
    assert_eq!(spend(s, "s6", "150").await, over, "the tenant has 100 left");
    assert_eq!(spend(s, "s6", "100").await, ok, "exactly the quota");
    let m = inference.metrics().await;
    assert_eq!(metric(&m, "weft_tenant_shed_total", &["reason=\"token-quota\""]), 3.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balancing_weighs_a_streamed_answer_by_its_first_byte() {
    let bed = Topology::new().instances("gen", &["v1", "v2"]).start().await;
    bed.wait_endpoints("gen", 2).await;
    let out = bed.caller.sidecar.outbound;
    // Both send their answer's head at once; v1's first token takes 300 ms.
    bed.instance("gen", "v1").app.mode.stream_first_ms.store(300, std::sync::atomic::Ordering::Relaxed);
    let mut by = std::collections::BTreeMap::<String, u32>::new();
    for _ in 0..20 {
        let resp = Req::get(out, "gen", "/stream?chunks=2&gap_ms=1").open().await.unwrap();
        let served = resp.headers()["x-served-by"].to_str().unwrap().to_string();
        let (body, whole) = read(resp).await;
        assert!(whole && body.lines().count() == 2, "{body}");
        *by.entry(served).or_default() += 1;
    }
    // Timed to its head, v1 would look as fast as v2 and get half.
    let slow = by.get("gen/v1").copied().unwrap_or(0);
    assert!(slow <= 3, "{by:?}");
}
