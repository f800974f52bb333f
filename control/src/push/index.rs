//! The control plane's in-memory view of etcd, and the immutable snapshots
//! it publishes to proxy sessions.
//!
//! The index keeps policy as the typed model (`weft_policy::model`): a
//! stored resource is checked by the same rules `weftctl` and the sidecars
//! apply, and one that breaks them (written around `weftctl`) is refused
//! here: the last good version of that key stays in force, and the refusal is
//! listed in `weftctl status`. It is fed key by key from the watcher; after
//! each batch it rebuilds only the services the batch touched, into their
//! wire form. Every service's wire config is an `Arc`, so sessions find what
//! changed by pointer comparison.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use weft_policy::model::{self, Policy};
use weft_policy::{ResourceId, wire};
use xds_proto::v1 as pb;

use crate::store::{self, EndpointRecord};

/// One published state of the mesh.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The etcd revision this snapshot reflects.
    pub revision: u64,
    pub services: HashMap<String, Arc<pb::ServiceConfig>>,
    /// Stored resources that break the rules, by key: (their revision, why).
    pub rejected: Arc<BTreeMap<String, (u64, String)>>,
}

impl Snapshot {
    /// The config to send for `service`; an unknown service gets a config
    /// that says so (`known: false`), so the sidecar can answer 503.
    pub fn service(&self, service: &str) -> Option<&Arc<pb::ServiceConfig>> {
        self.services.get(service)
    }
}

/// A resource in force, with the etcd revision it was written at.
#[derive(Debug, Clone)]
struct Versioned<T> {
    value: T,
    revision: u64,
}

#[derive(Default)]
pub struct Index {
    prefix: String,
    /// By service, then tenant ("" for the default route).
    routes: HashMap<String, BTreeMap<String, Versioned<model::Route>>>,
    resilience: HashMap<String, Versioned<model::Resilience>>,
    authorization: HashMap<String, Versioned<model::AuthorizationPolicy>>,
    /// By service (or `*`), then tenant.
    tenant_policies: HashMap<String, BTreeMap<String, Versioned<model::TenantPolicy>>>,
    endpoints: HashMap<String, BTreeMap<String, EndpointRecord>>,
    /// Per service, the proxy ids with a departure marker (they left on
    /// purpose; see `store::Removal`).
    departed: HashMap<String, BTreeSet<String>>,
    rejected: BTreeMap<String, (u64, String)>,
    rejected_changed: bool,
    published_rejected: Arc<BTreeMap<String, (u64, String)>>,
    built: HashMap<String, Arc<pb::ServiceConfig>>,
    dirty: HashSet<String>,
    all_dirty: bool,
}

impl Index {
    pub fn new(prefix: &str) -> Index {
        Index { prefix: format!("{}/", prefix.trim_end_matches('/')), ..Default::default() }
    }

    /// Applies a put of `key`. A value that cannot be decoded or breaks the
    /// rules is refused: the last good value of that key (if any) stays in
    /// force.
    pub fn put(&mut self, key: &str, value: &[u8], mod_revision: u64) {
        let Some(suffix) = key.strip_prefix(&self.prefix) else {
            return;
        };
        if let Some(rest) = suffix.strip_prefix("endpoints/") {
            let Some((service, proxy)) = rest.split_once('/') else {
                return;
            };
            match serde_json::from_slice::<EndpointRecord>(value) {
                Ok(rec) => {
                    // Registered again: no longer departed.
                    if let Some(d) = self.departed.get_mut(service) {
                        d.remove(proxy);
                    }
                    self.endpoints.entry(service.to_string()).or_default().insert(proxy.to_string(), rec);
                    self.dirty.insert(service.to_string());
                }
                Err(e) => tracing::warn!(key, error = %e, "skipping undecodable endpoint record"),
            }
            return;
        }
        if suffix.starts_with("proxies/") {
            return;
        }
        if let Some(rest) = suffix.strip_prefix("departed/") {
            if let Some((service, proxy)) = rest.split_once('/') {
                self.departed.entry(service.to_string()).or_default().insert(proxy.to_string());
                self.dirty.insert(service.to_string());
            }
            return;
        }
        let Some(id) = ResourceId::from_key_suffix(suffix) else {
            tracing::debug!(key, "ignoring unknown key");
            return;
        };
        let checked = store::decode_resource(value).and_then(|doc| {
            if doc.id() != id {
                return Err(format!("holds {} under the key of {id}", doc.id()));
            }
            weft_policy::check(&doc)
                .map_err(|errors| errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
        });
        let policy = match checked {
            Ok(p) => p,
            Err(reason) => {
                tracing::warn!(key, revision = mod_revision, %reason, "refusing a stored resource that breaks the rules; its last good version stays in force");
                metrics::counter!("weft_control_rejected_resources_total").increment(1);
                self.rejected.insert(id.to_string(), (mod_revision, reason));
                self.rejected_changed = true;
                return;
            }
        };
        if self.rejected.remove(&id.to_string()).is_some() {
            self.rejected_changed = true;
        }
        match policy {
            Policy::Route(r) => {
                let service = r.service.clone();
                let tenant = r.tenant.clone().unwrap_or_default();
                self.routes
                    .entry(service.clone())
                    .or_default()
                    .insert(tenant, Versioned { value: r, revision: mod_revision });
                self.dirty.insert(service);
            }
            Policy::Resilience(r) => {
                let service = r.service.clone();
                self.resilience.insert(service.clone(), Versioned { value: r, revision: mod_revision });
                self.dirty.insert(service);
            }
            Policy::AuthorizationPolicy(a) => {
                let service = a.service.clone();
                self.authorization.insert(service.clone(), Versioned { value: a, revision: mod_revision });
                self.dirty.insert(service);
            }
            Policy::TenantPolicy(t) => {
                let service = t.service.as_str().to_string();
                self.mark(&service);
                let tenant = t.tenant.clone();
                self.tenant_policies
                    .entry(service)
                    .or_default()
                    .insert(tenant, Versioned { value: t, revision: mod_revision });
            }
        }
    }

    pub fn delete(&mut self, key: &str) {
        let Some(suffix) = key.strip_prefix(&self.prefix) else {
            return;
        };
        if let Some(rest) = suffix.strip_prefix("endpoints/") {
            if let Some((service, proxy)) = rest.split_once('/')
                && let Some(eps) = self.endpoints.get_mut(service)
            {
                eps.remove(proxy);
                if eps.is_empty() {
                    self.endpoints.remove(service);
                }
                self.dirty.insert(service.to_string());
            }
            return;
        }
        if let Some(rest) = suffix.strip_prefix("departed/") {
            // A marker is deleted once every watch has seen it; the list
            // sidecars get shrinks at the service's next rebuild, which
            // saves a push to every subscriber.
            if let Some((service, proxy)) = rest.split_once('/')
                && let Some(d) = self.departed.get_mut(service)
            {
                d.remove(proxy);
                if d.is_empty() {
                    self.departed.remove(service);
                }
            }
            return;
        }
        let Some(id) = ResourceId::from_key_suffix(suffix) else { return };
        if self.rejected.remove(&id.to_string()).is_some() {
            self.rejected_changed = true;
        }
        match id {
            ResourceId::Route { service, tenant } => {
                if let Some(rs) = self.routes.get_mut(&service) {
                    rs.remove(&tenant.unwrap_or_default());
                    if rs.is_empty() {
                        self.routes.remove(&service);
                    }
                }
                self.dirty.insert(service);
            }
            ResourceId::Resilience { service } => {
                self.resilience.remove(&service);
                self.dirty.insert(service);
            }
            ResourceId::AuthorizationPolicy { service } => {
                self.authorization.remove(&service);
                self.dirty.insert(service);
            }
            ResourceId::TenantPolicy { tenant, service } => {
                if let Some(ps) = self.tenant_policies.get_mut(&service) {
                    ps.remove(&tenant);
                }
                self.mark(&service);
            }
        }
    }

    fn mark(&mut self, service: &str) {
        if service == "*" {
            self.all_dirty = true;
        } else {
            self.dirty.insert(service.to_string());
        }
    }

    /// True when something since the last snapshot changes what sidecars
    /// (or `weftctl status`) see.
    pub fn is_dirty(&self) -> bool {
        self.all_dirty || !self.dirty.is_empty() || self.rejected_changed
    }

    /// Rebuilds the touched services and returns the new snapshot.
    pub fn snapshot(&mut self, revision: u64) -> Snapshot {
        let dirty: Vec<String> = if self.all_dirty {
            let mut all: HashSet<String> = self.built.keys().cloned().collect();
            all.extend(self.routes.keys().cloned());
            all.extend(self.endpoints.keys().cloned());
            all.extend(self.resilience.keys().cloned());
            all.extend(self.authorization.keys().cloned());
            all.extend(self.departed.keys().cloned());
            all.extend(self.tenant_policies.keys().filter(|k| *k != "*").cloned());
            all.into_iter().collect()
        } else {
            self.dirty.iter().cloned().collect()
        };
        self.dirty.clear();
        self.all_dirty = false;
        for service in dirty {
            match self.build(&service) {
                Some(cfg) => {
                    let changed = self.built.get(&service).is_none_or(|old| **old != cfg);
                    if changed {
                        self.built.insert(service, Arc::new(cfg));
                    }
                }
                None => {
                    self.built.remove(&service);
                }
            }
        }
        if std::mem::take(&mut self.rejected_changed) {
            self.published_rejected = Arc::new(self.rejected.clone());
        }
        Snapshot { revision, services: self.built.clone(), rejected: self.published_rejected.clone() }
    }

    fn build(&self, service: &str) -> Option<pb::ServiceConfig> {
        let routes: Vec<pb::Route> = self
            .routes
            .get(service)
            .map(|r| r.values().map(|v| wire::route(&v.value, v.revision)).collect())
            .unwrap_or_default();
        let endpoints: Vec<pb::Endpoint> =
            self.endpoints.get(service).map(|e| e.values().map(EndpointRecord::to_wire).collect()).unwrap_or_default();
        let resilience = self.resilience.get(service).map(|v| wire::resilience(&v.value, v.revision));
        let authorization = self.authorization.get(service).map(|v| wire::authorization(&v.value, v.revision));
        let mut tenant_policies: Vec<pb::TenantPolicy> = self
            .tenant_policies
            .get(service)
            .map(|t| t.values().map(|v| wire::tenant_policy(&v.value, v.revision)).collect())
            .unwrap_or_default();
        if let Some(global) = self.tenant_policies.get("*") {
            // A service-specific policy wins over the `*` one for the same tenant.
            for (tenant, v) in global {
                if !tenant_policies.iter().any(|t| &t.tenant == tenant) {
                    tenant_policies.push(wire::tenant_policy(&v.value, v.revision));
                }
            }
        }
        let departed: Vec<String> = self.departed.get(service).map(|d| d.iter().cloned().collect()).unwrap_or_default();
        let known = !(routes.is_empty()
            && endpoints.is_empty()
            && resilience.is_none()
            && authorization.is_none()
            && tenant_policies.is_empty());
        if !known && departed.is_empty() {
            return None;
        }
        // A service whose last instance just departed is unknown now, and
        // its sidecars are told that the instances left on purpose.
        Some(pb::ServiceConfig {
            name: service.to_string(),
            known,
            routes,
            endpoints,
            resilience,
            tenant_policies,
            departed,
            authorization,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route_json(service: &str, weight: u32) -> Vec<u8> {
        let v = serde_json::json!({"kind":"Route","service":service,"rules":[{"backends":[{"subset":{},"weight":weight}]}]});
        store::encode_resource(&weft_policy::doc::from_value(v).unwrap()).into_bytes()
    }

    #[test]
    fn only_touched_services_are_rebuilt() {
        let mut idx = Index::new("/weft");
        idx.put("/weft/routes/a", &route_json("a", 1), 2);
        idx.put("/weft/routes/b", &route_json("b", 1), 3);
        let s1 = idx.snapshot(3);
        idx.put("/weft/routes/b", &route_json("b", 2), 4);
        let s2 = idx.snapshot(4);
        assert!(Arc::ptr_eq(&s1.services["a"], &s2.services["a"]));
        assert!(!Arc::ptr_eq(&s1.services["b"], &s2.services["b"]));
    }

    #[test]
    fn bad_value_keeps_last_good_and_is_listed() {
        let mut idx = Index::new("/weft");
        idx.put("/weft/routes/a", &route_json("a", 1), 2);
        idx.put("/weft/routes/a", b"{not json", 3);
        let s = idx.snapshot(3);
        assert_eq!(s.services["a"].routes[0].revision, 2);
        assert!(s.rejected["route/a"].1.contains("not weft JSON"), "{:?}", s.rejected);
        // Decodes, but breaks the rules (weights sum to 0): refused too.
        idx.put("/weft/routes/a", &route_json("a", 0), 4);
        let s = idx.snapshot(4);
        assert_eq!(s.services["a"].routes[0].revision, 2);
        assert_eq!(
            s.rejected["route/a"],
            (4, "rules[0].backends: weights sum to 0: no backend would get traffic".to_string())
        );
        // A good version clears it.
        idx.put("/weft/routes/a", &route_json("a", 3), 5);
        let s = idx.snapshot(5);
        assert_eq!(s.services["a"].routes[0].revision, 5);
        assert!(s.rejected.is_empty());
    }

    #[test]
    fn endpoints_come_and_go() {
        let mut idx = Index::new("/weft");
        let rec = serde_json::json!({"schema":1,"proxy_id":"p1","service":"a","address":"127.0.0.1:1","labels":{},"ready":true});
        idx.put("/weft/endpoints/a/p1", rec.to_string().as_bytes(), 2);
        assert_eq!(idx.snapshot(2).services["a"].endpoints.len(), 1);
        idx.delete("/weft/endpoints/a/p1");
        assert!(!idx.snapshot(3).services.contains_key("a"));
    }
}
