//! One sidecar against a scripted control plane (`FakeControl`, no etcd):
//! what it ACKs, what it NACKs, and that a rejected resource never replaces
//! the last good one.

use std::time::Duration;

use harness::{Backend, FakeControl, Sidecar, eventually, get, served_by};
use weft_policy::model::Policy;
use weft_policy::{documents, wire};
use xds_proto::v1 as pb;

/// The wire form of one policy document, at `revision`.
fn policy(yaml: &str, revision: u64) -> Policy {
    let docs = documents::parse("test.yaml", yaml).unwrap_or_else(|e| panic!("{e:?}"));
    let _ = revision;
    weft_policy::check(&docs[0].resource).unwrap()
}

fn inference(app: std::net::SocketAddr, route_rev: u64, route: &str) -> pb::ServiceConfig {
    let Policy::Route(r) = policy(route, route_rev) else { panic!("not a route") };
    pb::ServiceConfig {
        name: "inference".into(),
        known: true,
        routes: vec![wire::route(&r, route_rev)],
        endpoints: vec![pb::Endpoint {
            proxy_id: "inference-1".into(),
            address: app.to_string(),
            labels: [("version".to_string(), "v1".to_string())].into_iter().collect(),
            ready: true,
            mtls: false,
        }],
        ..Default::default()
    }
}

const ROUTE: &str = "kind: Route\nservice: inference\nrules:\n  - backends: [ { subset: { version: v1 }, weight: 1 } ]\n    retry: { attempts: 2, on: [5xx] }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_nacks_what_breaks_the_rules_and_keeps_its_last_good_config() {
    let fake = FakeControl::start().await;
    let app = Backend::http("inference", "v1").await;
    let caller_app = Backend::http("agent", "v1").await;
    fake.push(1, vec![inference(app.addr, 5, ROUTE)]);
    let sc = Sidecar::start(&[fake.url()], "agent", "", caller_app.addr, "agent-1").await;
    let out = sc.outbound;
    eventually("the caller routes to inference", Duration::from_secs(20), || async move {
        get(out, "inference", "/").await.is_ok_and(|r| r.0 == 200 && served_by(&r) == "inference/v1")
    })
    .await;
    assert_eq!(fake.answer(1).await, Ok(()));

    // A route that breaks a rule (on the wire, as a broken or foreign
    // control plane might send it): NACKed, naming the resource and field.
    let mut bad = inference(app.addr, 6, ROUTE);
    bad.routes[0].rules[0].retry.as_mut().unwrap().attempts = 0;
    bad.routes[0].rules[0].r#match.as_mut().unwrap().method = "BREW".into();
    fake.push(2, vec![bad]);
    let nack = fake.answer(2).await.unwrap_err();
    assert_eq!(nack.errors.len(), 1, "{nack:?}");
    assert_eq!(nack.errors[0].resource, "route/inference");
    assert!(nack.errors[0].message.contains("rules[0].retry.attempts: attempts must be between 1 and 10"), "{nack:?}");
    assert!(nack.errors[0].message.contains("rules[0].match.method: 'BREW' is not an HTTP method"), "{nack:?}");
    assert_eq!(sc.route_revision("inference", "").await, Some(5), "the last good route stays");
    let cfg = sc.config().await;
    assert!(cfg["last_nack"].as_str().unwrap_or("").contains("route/inference"), "{cfg}");
    assert_eq!(get(out, "inference", "/").await.unwrap().0, 200);

    // A bad resilience and a bad tenant policy are refused one by one; the
    // good route in the same update applies.
    let mut cfg3 = inference(app.addr, 7, ROUTE);
    cfg3.resilience = Some(pb::Resilience {
        service: "inference".into(),
        consecutive_failures: Some(0),
        base_ejection_ms: Some(1000),
        max_ejection_percent: Some(50),
        ..Default::default()
    });
    cfg3.tenant_policies = vec![pb::TenantPolicy {
        tenant: "acme".into(),
        service: "inference".into(),
        requests_per_second: f64::NAN,
        ..Default::default()
    }];
    fake.push(3, vec![cfg3]);
    let nack = fake.answer(3).await.unwrap_err();
    let resources: Vec<&str> = nack.errors.iter().map(|e| e.resource.as_str()).collect();
    assert_eq!(resources, ["resilience/inference", "tenantpolicy/acme/inference"], "{nack:?}");
    assert_eq!(sc.route_revision("inference", "").await, Some(7), "the good route of the same update applies");

    // Fixed: ACKed.
    fake.push(4, vec![inference(app.addr, 8, ROUTE)]);
    assert_eq!(fake.answer(4).await, Ok(()));
    assert_eq!(sc.route_revision("inference", "").await, Some(8));
}
