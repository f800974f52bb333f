//! Tenant-scoped access with bearer tokens (`weft-control --tokens FILE`).

use harness::{Backend, Control, Etcd, Sidecar, weftctl};

const ADMIN: &str = "admin-token-0123456789";
const PROXY: &str = "proxy-token-0123456789";
const ACME: &str = "acme-token-0123456789";

fn route(tenant: Option<&str>) -> String {
    let t = tenant.map(|t| format!("tenant: {t}\n")).unwrap_or_default();
    format!("kind: Route\nservice: inference\n{t}rules:\n  - backends: [ {{ subset: {{}}, weight: 1 }} ]\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_tokens_read_and_change_only_their_own_tenant() {
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.yaml");
    std::fs::write(
        &tokens,
        format!("{ADMIN}: admin\n{PROXY}: proxy\n{ACME}: tenant:acme\nglobex-token-0123456789: tenant:globex\n"),
    )
    .unwrap();
    let control = Control::start_with(&etcd, 5, &["--tokens", tokens.to_str().unwrap()]).await;
    let url = control.url();
    let as_ = |token: &'static str, args: &[&str]| {
        let mut all = vec!["--token", token];
        all.extend_from_slice(args);
        all.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>, stdin: Option<String>| {
        let url = url.clone();
        async move {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            weftctl(&url, &refs, stdin.as_deref()).await
        }
    };

    let none = weftctl(&url, &["get", "route"], None).await;
    assert_eq!(none.code, 1, "{none:?}");
    assert!(none.stderr.contains("401"), "{none:?}");
    let wrong = run(as_("not-a-real-token-000000", &["get", "route"]), None).await;
    assert!(wrong.stderr.contains("401: unknown token"), "{wrong:?}");

    let own = run(as_(ACME, &["apply", "-f", "-"]), Some(route(Some("acme")))).await;
    assert_eq!(own.code, 0, "{own:?}");
    let other = run(as_(ACME, &["apply", "-f", "-"]), Some(route(Some("globex")))).await;
    assert_eq!(other.code, 1, "{other:?}");
    assert!(other.stderr.contains("403: token for tenant acme cannot modify tenant globex"), "{other:?}");
    let shared = run(as_(ACME, &["apply", "-f", "-"]), Some(route(None))).await;
    assert_eq!(shared.code, 1);
    assert!(
        shared.stderr.contains("403: token for tenant acme cannot modify route/inference, which every tenant shares"),
        "{shared:?}"
    );
    let admin =
        run(as_(ADMIN, &["apply", "-f", "-"]), Some(format!("{}---\n{}", route(None), route(Some("globex"))))).await;
    assert_eq!(admin.code, 0, "{admin:?}");

    // acme sees only its own resources; the admin sees all.
    let seen = run(as_(ACME, &["get", "route"]), None).await;
    assert!(seen.stdout.contains("route/inference/acme") && !seen.stdout.contains("globex"), "{seen:?}");
    assert_eq!(seen.stdout.lines().count(), 2, "{seen:?}");
    let all = run(as_(ADMIN, &["get", "route"]), None).await;
    assert_eq!(all.stdout.lines().count(), 4, "{all:?}");
    let del = run(as_(ACME, &["delete", "route", "inference/globex"]), None).await;
    assert!(del.stderr.contains("403: token for tenant acme cannot modify tenant globex"), "{del:?}");
    let status = run(as_(ACME, &["status"]), None).await;
    assert!(status.stderr.contains("403: token for tenant acme cannot see the status of every sidecar"), "{status:?}");

    // Sidecars need a proxy (or admin) token.
    let app = Backend::http("inference", "v1").await;
    let sidecar =
        Sidecar::start_with(std::slice::from_ref(&url), "inference", "", app.addr, "tok-inf", &["--token", PROXY])
            .await;
    assert!(sidecar.config().await["services"]["inference"]["routes"].as_array().is_some_and(|r| r.len() == 3));

    // A tenant waits for its own change to reach the sidecars it affects.
    let waited = run(
        as_(ACME, &["apply", "-f", "-", "--wait", "--timeout", "20s"]),
        Some(route(Some("acme")).replace("weight: 1", "weight: 2")),
    )
    .await;
    assert_eq!(waited.code, 0, "{waited:?}");
    assert!(waited.stdout.contains("1 sidecar(s) ACKed rev"), "{waited:?}");
    let ch = tonic::transport::Endpoint::from_shared(url.clone()).unwrap().connect().await.unwrap();
    let mut raw = xds_proto::v1::discovery_client::DiscoveryClient::new(ch);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    drop(tx);
    let err = raw.stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    let proxy_admin = run(as_(PROXY, &["apply", "-f", "-"]), Some(route(Some("acme")))).await;
    assert!(proxy_admin.stderr.contains("403: a proxy token cannot change policy"), "{proxy_admin:?}");
}
