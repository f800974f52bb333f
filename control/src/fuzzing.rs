//! Entry points for the fuzz targets (`fuzz/`) and for the property tests
//! that run the same inputs on stable in `make test`. None may panic,
//! whatever the bytes; the assertions in them are the properties.

use xds_proto::v1 as pb;

use crate::policy::{self, Resource};
use crate::{convert, store};

/// A policy file as `weftctl validate` and `apply` read it. Every resource
/// that passes validation must survive the trips it takes: to the JSON the
/// admin API carries and back, into etcd's stored form and back, and into
/// the wire form the control plane pushes. Returns that wire form, one
/// service config per resource, so the caller can check the sidecar accepts
/// what the control plane accepted.
pub fn policy_documents(data: &[u8]) -> Vec<pb::ServiceConfig> {
    let Ok(text) = std::str::from_utf8(data) else { return Vec::new() };
    let Ok(resources) = policy::parse_documents("fuzz.yaml", text) else { return Vec::new() };
    let mut out = Vec::new();
    for located in resources {
        let r = located.resource;
        assert!(policy::validate(&r).is_empty(), "parse_documents returned an invalid {}", r.id());
        let value = policy::to_value(&r);
        let again = policy::from_value(value.clone()).unwrap_or_else(|e| panic!("{}: {e:?} in {value}", r.id()));
        assert_eq!(again, r, "JSON round trip of {}", r.id());
        let stored = store::decode_resource(store::encode_resource(&r).as_bytes())
            .unwrap_or_else(|e| panic!("stored form of {}: {e}", r.id()));
        assert_eq!(stored, r, "etcd round trip of {}", r.id());
        assert_eq!(policy::ResourceId::from_key_suffix(&r.id().key_suffix()), Some(r.id()));
        let mut cfg = pb::ServiceConfig { known: true, ..Default::default() };
        match &r {
            Resource::Route(route) => {
                cfg.name = route.service.clone();
                let wire = convert::route(route, 1).unwrap_or_else(|e| panic!("{} validated but: {e}", r.id()));
                cfg.routes.push(wire);
            }
            Resource::Resilience(res) => {
                cfg.name = res.service.clone();
                let wire = convert::resilience(res, 1).unwrap_or_else(|e| panic!("{} validated but: {e}", r.id()));
                cfg.resilience = Some(wire);
            }
            Resource::TenantPolicy(t) => {
                cfg.name = if t.service == "*" { "any".to_string() } else { t.service.clone() };
                cfg.tenant_policies.push(convert::tenant_policy(t, 1));
            }
        }
        out.push(cfg);
    }
    out
}
