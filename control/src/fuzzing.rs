//! Entry points for the fuzz targets (`fuzz/`) and for the property tests
//! that run the same inputs on stable in `make test`. None may panic,
//! whatever the bytes; the assertions in them are the properties.

use weft_policy::model::Policy;
use weft_policy::{ResourceId, doc, documents, wire};
use xds_proto::v1 as pb;

use crate::store;

/// A policy file as `weftctl validate` and `apply` read it. Every resource
/// that passes the rules must survive the trips it takes: to the JSON the
/// admin API carries and back, into etcd's stored form and back, and into
/// the wire form the control plane pushes. Returns that wire form, one
/// service config per resource, so the caller can check that a sidecar
/// accepts what the control plane accepted.
pub fn policy_documents(data: &[u8]) -> Vec<pb::ServiceConfig> {
    let Ok(text) = std::str::from_utf8(data) else { return Vec::new() };
    let Ok(resources) = documents::parse("fuzz.yaml", text) else { return Vec::new() };
    let mut out = Vec::new();
    for located in resources {
        let r = located.resource;
        let policy = weft_policy::check(&r).unwrap_or_else(|e| panic!("parse returned an invalid {}: {e:?}", r.id()));
        let value = doc::to_value(&r);
        let again = doc::from_value(value.clone()).unwrap_or_else(|e| panic!("{}: {e:?} in {value}", r.id()));
        assert_eq!(again, r, "JSON round trip of {}", r.id());
        let stored = store::decode_resource(store::encode_resource(&r).as_bytes())
            .unwrap_or_else(|e| panic!("stored form of {}: {e}", r.id()));
        assert_eq!(stored, r, "etcd round trip of {}", r.id());
        assert_eq!(ResourceId::from_key_suffix(&r.id().key_suffix()), Some(r.id()));
        let mut cfg = pb::ServiceConfig { known: true, ..Default::default() };
        match &policy {
            Policy::Route(route) => {
                cfg.name = route.service.clone();
                cfg.routes.push(wire::route(route, 1));
            }
            Policy::Resilience(res) => {
                cfg.name = res.service.clone();
                cfg.resilience = Some(wire::resilience(res, 1));
            }
            Policy::TenantPolicy(t) => {
                cfg.name = if t.service.as_str() == "*" { "any".to_string() } else { t.service.as_str().to_string() };
                cfg.tenant_policies.push(wire::tenant_policy(t, 1));
            }
            Policy::AuthorizationPolicy(a) => {
                cfg.name = a.service.clone();
                cfg.authorization = Some(wire::authorization(a, 1));
            }
        }
        out.push(cfg);
    }
    out
}
