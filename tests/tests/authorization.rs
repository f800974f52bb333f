//! Authorization between services, and a tenant that cannot be forged:
//! AuthorizationPolicy enforced by the callee's sidecar on the identity
//! the caller proved over mTLS, the tenant header believed only from the
//! callers the policy names, `tenant: "*"` limits for every other tenant,
//! and the API roles around them.

use std::time::Duration;

use harness::pki::{ACME, AGENT, BILLING, GATEWAY, INFERENCE, MODEL, Pki, SCHEDULER, secured};
use harness::{Backend, Etcd, Req, eventually, example_pb, metric, weftctl};

const POLICY: &str = "kind: AuthorizationPolicy
service: inference
default: deny
rules:
  - from: [agent]
    paths: [/v1/]
    methods: [GET]
  - from: [scheduler]
---
kind: AuthorizationPolicy
service: model
rules:
  - from: [agent]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callee_allows_only_the_callers_its_policy_names_over_http_and_grpc() {
    let pki = Pki::init().await;
    let etcd = Etcd::start().await;
    let control = pki.control(&etcd, "1h").await;
    let applied = pki.weftctl_in(&control, &["apply", "-f", "-"], POLICY).await;
    assert_eq!(applied.code, 0, "{applied:?}");
    let apps = [
        Backend::http("inference", "v1").await,
        Backend::grpc("model", "v1").await,
        Backend::http("agent", "v1").await,
        Backend::http("scheduler", "v1").await,
        Backend::http("billing", "v1").await,
    ];
    let (inf, _model, agent, scheduler, billing) = tokio::join!(
        secured(&pki, &control, "inference", INFERENCE, apps[0].addr, &[]),
        secured(&pki, &control, "model", MODEL, apps[1].addr, &[]),
        secured(&pki, &control, "agent", AGENT, apps[2].addr, &[]),
        secured(&pki, &control, "scheduler", SCHEDULER, apps[3].addr, &[]),
        secured(&pki, &control, "billing", BILLING, apps[4].addr, &[]),
    );
    let call = |from: std::net::SocketAddr, method: &'static str, path: &'static str| async move {
        let r = match method {
            "GET" => Req::get(from, "inference", path),
            _ => Req::post(from, "inference", path, "{}"),
        };
        let (status, headers, _) = r.send().await.unwrap();
        (status, headers.get("x-weft-error").map(|v| v.to_str().unwrap().to_string()))
    };
    let forbidden = (403, Some("forbidden".to_string()));
    let a = agent.outbound;
    eventually("the callee has its policy", Duration::from_secs(10), || async move {
        call(a, "POST", "/v1/run").await.0 == 403
    })
    .await;
    assert_eq!(call(agent.outbound, "GET", "/v1/run").await, (200, None), "agent: GET under /v1/");
    assert_eq!(call(agent.outbound, "POST", "/v1/run").await, forbidden, "agent: not POST");
    assert_eq!(call(agent.outbound, "GET", "/v2/run").await, forbidden, "agent: not under /v2/");
    assert_eq!(call(scheduler.outbound, "POST", "/v2/anything").await, (200, None), "scheduler: anything");
    assert_eq!(call(billing.outbound, "GET", "/v1/run").await, forbidden, "billing: not named");
    let m = inf.metrics().await;
    assert_eq!(metric(&m, "weft_authz_denied_total", &["service=\"inference\"", "caller=\"billing\""]), 1.0, "{m}");
    assert_eq!(metric(&m, "weft_authz_denied_total", &["caller=\"agent\""]), 3.0, "{m}");
    // A denied call is the caller's doing: no endpoint is blamed.
    let b = billing.metrics().await;
    assert_eq!(metric(&b, "weft_breaker_ejections_total", &[]), 0.0, "{b}");

    // gRPC: PERMISSION_DENIED.
    let mut client = harness::inference_client(agent.outbound, "http://model:50051").await;
    let reply = client
        .infer(example_pb::InferRequest { prompt: "hi".into(), tokens: 1, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.text, "echo: hi");
    let mut client = harness::inference_client(billing.outbound, "http://model:50051").await;
    let err = client
        .infer(example_pb::InferRequest { prompt: "hi".into(), tokens: 1, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("spiffe://weft.local/svc/billing may not call POST"), "{}", err.message());

    // Who may call inference?
    let who = pki.weftctl(&control, &["callers", "inference"]).await;
    assert_eq!(who.code, 0, "{who:?}");
    assert!(who.stdout.contains("inference: deny unless a rule allows"), "{}", who.stdout);
    let agent_row = who.stdout.lines().find(|l| l.starts_with("agent ")).unwrap_or_else(|| panic!("{}", who.stdout));
    assert!(agent_row.contains("/v1/") && agent_row.contains("GET"), "{agent_row}");
    let open = pki.weftctl(&control, &["callers", "agent"]).await;
    assert!(open.stdout.contains("agent: no AuthorizationPolicy: every caller with an identity may call"), "{open:?}");

    // A bad policy never reaches etcd, and the one in force stays.
    let bad = pki
        .weftctl_in(
            &control,
            &["apply", "-f", "-"],
            "kind: AuthorizationPolicy\nservice: inference\nrules:\n  - from: [Agent]\n",
        )
        .await;
    assert_eq!(bad.code, 1, "{bad:?}");
    assert!(bad.stderr.contains("rules[0].from[0]"), "{bad:?}");
    assert_eq!(call(billing.outbound, "GET", "/v1/run").await, forbidden);
    // The same life as every resource: get, history.
    let got = pki.weftctl(&control, &["get", "authz", "inference", "-o", "yaml"]).await;
    assert!(got.code == 0 && got.stdout.contains("kind: AuthorizationPolicy"), "{got:?}");
    let history = pki.weftctl(&control, &["history", "authorizationpolicy", "inference"]).await;
    assert!(history.code == 0 && history.stdout.contains("created"), "{history:?}");
}

const TENANTS: &str = "kind: AuthorizationPolicy
service: inference
default: allow
tenant_header_from: [gateway]
---
kind: TenantPolicy
tenant: acme
service: inference
rate_limit: { requests_per_second: 1000, burst: 1000 }
---
kind: TenantPolicy
tenant: globex
service: inference
rate_limit: { requests_per_second: 0.01, burst: 1 }
---
kind: TenantPolicy
tenant: '*'
service: inference
rate_limit: { requests_per_second: 0.01, burst: 2 }
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_tenant_header_gains_nothing_and_invented_tenants_share_the_star_limit() {
    let pki = Pki::init().await;
    let etcd = Etcd::start().await;
    let control = pki.control(&etcd, "1h").await;
    let applied = pki.weftctl_in(&control, &["apply", "-f", "-"], TENANTS).await;
    assert_eq!(applied.code, 0, "{applied:?}");
    let apps = [
        Backend::http("inference", "v1").await,
        Backend::http("agent", "v1").await,
        Backend::http("gateway", "v1").await,
    ];
    let (inf, agent, gateway) = tokio::join!(
        secured(&pki, &control, "inference", INFERENCE, apps[0].addr, &[]),
        // The agent works for tenant globex.
        secured(&pki, &control, "agent", AGENT, apps[1].addr, &["--labels", "tenant=globex"]),
        secured(&pki, &control, "gateway", GATEWAY, apps[2].addr, &[]),
    );
    let i = &inf;
    eventually("the callee has the tenant policies", Duration::from_secs(10), || async move {
        i.config().await["services"]["inference"]["tenants"].as_array().is_some_and(|t| t.len() == 3)
    })
    .await;
    // (status, the tenant the app was told)
    let call = |from: std::net::SocketAddr, tenant: &str| {
        let req = Req::get(from, "inference", "/").header("x-tenant-id", tenant);
        async move {
            let (status, headers, _) = req.send().await.unwrap();
            (status, headers.get("echo-x-tenant-id").map(|v| v.to_str().unwrap().to_string()))
        }
    };
    // The agent claims acme's generous limit: it is counted as its own
    // tenant, globex (one call), and the app is told globex.
    let globex = Some("globex".to_string());
    assert_eq!(call(agent.outbound, "acme").await, (200, globex.clone()));
    assert_eq!(call(agent.outbound, "acme").await, (429, None), "the forged header gained nothing");
    // The gateway is trusted to name tenants.
    for _ in 0..5 {
        assert_eq!(call(gateway.outbound, "acme").await, (200, Some("acme".to_string())));
    }
    // Invented tenant names all fall under `*`, together.
    assert_eq!(call(gateway.outbound, "made-up-1").await.0, 200);
    assert_eq!(call(gateway.outbound, "made-up-2").await.0, 200);
    assert_eq!(call(gateway.outbound, "made-up-3").await.0, 429, "inventing a tenant escapes nothing");
    let m = inf.metrics().await;
    assert_eq!(metric(&m, "weft_tenant_shed_total", &["tenant=\"*\""]), 1.0, "{m}");
    assert_eq!(metric(&m, "weft_tenant_shed_total", &["tenant=\"globex\""]), 1.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_manage_their_routes_but_not_their_limits_and_cannot_list_endpoints() {
    let pki = Pki::init().await;
    let etcd = Etcd::start().await;
    let control = pki.control(&etcd, "1h").await;
    let bundle = pki.path("ca.crt");
    let as_acme = |args: &'static [&'static str], stdin: Option<&'static str>| {
        let (bundle, url) = (bundle.clone(), control.url());
        async move {
            let mut all = vec!["--ca-bundle", bundle.as_str(), "--token", ACME];
            all.extend_from_slice(args);
            weftctl(&url, &all, stdin).await
        }
    };
    let route = "kind: Route\nservice: inference\ntenant: acme\nrules:\n  - backends: [ { subset: {}, weight: 1 } ]\n";
    assert_eq!(as_acme(&["apply", "-f", "-"], Some(route)).await.code, 0, "its own route");
    let limits = "kind: TenantPolicy\ntenant: acme\nservice: inference\nrate_limit: { requests_per_second: 100000 }\n";
    let raised = as_acme(&["apply", "-f", "-"], Some(limits)).await;
    assert_eq!(raised.code, 1, "{raised:?}");
    assert!(raised.stderr.contains("tenant limits are set by an admin"), "{raised:?}");
    let authz = "kind: AuthorizationPolicy\nservice: inference\ndefault: allow\n";
    let opened = as_acme(&["apply", "-f", "-"], Some(authz)).await;
    assert!(opened.code == 1 && opened.stderr.contains("every tenant shares"), "{opened:?}");
    let listed = as_acme(&["endpoints", "inference"], None).await;
    assert!(listed.code == 1 && listed.stderr.contains("cannot list endpoints"), "{listed:?}");
    // The admin sets the limits; the tenant reads them.
    assert_eq!(pki.weftctl_in(&control, &["apply", "-f", "-"], limits).await.code, 0);
    let got = as_acme(&["get", "tenantpolicy", "acme/inference"], None).await;
    assert!(got.code == 0 && got.stdout.contains("tenantpolicy/acme/inference"), "{got:?}");
}

/// A `CONNECT host:port` through `sidecar`'s outbound listener: the status
/// and `x-weft-error` of the answer, and the open stream on a 200.
async fn connect(sidecar: std::net::SocketAddr, target: &str) -> (u16, Option<String>, Option<tokio::net::TcpStream>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(sidecar).await.unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes()).await.unwrap();
    // The head, byte by byte: nothing after it may be taken from the stream.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).await.unwrap(), 1, "the answer broke off: {}", String::from_utf8_lossy(&head));
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let status: u16 = head[9..12].parse().unwrap();
    let error = head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("x-weft-error: ").map(str::to_string));
    if status != 200 {
        return (status, error, None);
    }
    (status, error, Some(s))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_to_a_mesh_service_is_a_tcp_stream_over_mtls_to_a_port_the_callee_serves_for_callers_it_allows() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::init().await;
    let etcd = Etcd::start().await;
    let control = pki.control(&etcd, "1h").await;
    let policy = "kind: AuthorizationPolicy\nservice: inference\ndefault: deny\nrules:\n  - from: [agent]\n";
    let applied = pki.weftctl_in(&control, &["apply", "-f", "-"], policy).await;
    assert_eq!(applied.code, 0, "{applied:?}");
    // The app's second port: a TCP echo server.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = echo.local_addr().unwrap().port().to_string();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = echo.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let apps = [
        Backend::http("inference", "v1").await,
        Backend::http("agent", "v1").await,
        Backend::http("billing", "v1").await,
    ];
    let inf_flags = ["--app-ports", port.as_str()];
    let (inf, agent, billing) = tokio::join!(
        secured(&pki, &control, "inference", INFERENCE, apps[0].addr, &inf_flags),
        secured(&pki, &control, "agent", AGENT, apps[1].addr, &[]),
        secured(&pki, &control, "billing", BILLING, apps[2].addr, &[]),
    );
    let target = format!("inference:{port}");
    let a = agent.outbound;
    let t = &target;
    eventually("the stream opens", Duration::from_secs(10), || async move { connect(a, t).await.0 == 200 }).await;
    let (status, _, stream) = connect(agent.outbound, &target).await;
    assert_eq!(status, 200);
    let mut stream = stream.unwrap();
    stream.write_all(b"ping over the mesh").await.unwrap();
    let mut back = [0u8; 18];
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping over the mesh");
    drop(stream);

    // A port the callee does not serve, and a caller its policy refuses.
    let (status, error, _) = connect(agent.outbound, "inference:1").await;
    assert_eq!((status, error.as_deref()), (404, Some("tcp-port")));
    let (status, error, _) = connect(billing.outbound, &target).await;
    assert_eq!((status, error.as_deref()), (403, Some("forbidden")));

    let m = inf.metrics().await;
    assert!(metric(&m, "weft_tcp_connections_total", &["direction=\"inbound\"", "detected=\"mesh\""]) >= 2.0, "{m}");
    assert_eq!(metric(&m, "weft_inbound_plaintext_total", &[]), 0.0, "every stream came over mTLS: {m}");
    let m = agent.metrics().await;
    assert!(metric(&m, "weft_tunnels_total", &["to=\"mesh\""]) >= 2.0, "{m}");
}
