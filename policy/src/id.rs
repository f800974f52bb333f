//! Which resource: its kind and name, its etcd key, and the `KIND NAME`
//! form weftctl takes.

use std::fmt;

use crate::doc::Resource;

/// Identifies a resource: its kind and the parts of its name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceId {
    Route { service: String, tenant: Option<String> },
    Resilience { service: String },
    TenantPolicy { tenant: String, service: String },
    AuthorizationPolicy { service: String },
}

/// The kinds, as error messages list them.
pub const KINDS: &str = "Route, Resilience, TenantPolicy or AuthorizationPolicy";

impl ResourceId {
    /// The etcd key below the prefix, e.g. `routes/inference/acme`.
    pub fn key_suffix(&self) -> String {
        match self {
            ResourceId::Route { service, tenant: None } => format!("routes/{service}"),
            ResourceId::Route { service, tenant: Some(t) } => format!("routes/{service}/{t}"),
            ResourceId::Resilience { service } => format!("resilience/{service}"),
            ResourceId::TenantPolicy { tenant, service } => format!("tenants/{tenant}/{service}"),
            ResourceId::AuthorizationPolicy { service } => format!("authz/{service}"),
        }
    }

    /// Parses a key suffix back (the inverse of [`ResourceId::key_suffix`]).
    pub fn from_key_suffix(suffix: &str) -> Option<ResourceId> {
        let parts: Vec<&str> = suffix.split('/').collect();
        match parts.as_slice() {
            ["routes", s] => Some(ResourceId::Route { service: s.to_string(), tenant: None }),
            ["routes", s, t] => Some(ResourceId::Route { service: s.to_string(), tenant: Some(t.to_string()) }),
            ["resilience", s] => Some(ResourceId::Resilience { service: s.to_string() }),
            ["tenants", t, s] => Some(ResourceId::TenantPolicy { tenant: t.to_string(), service: s.to_string() }),
            ["authz", s] => Some(ResourceId::AuthorizationPolicy { service: s.to_string() }),
            _ => None,
        }
    }

    /// The service whose sidecars must hear about a change to this resource;
    /// `None` for tenant policies that apply to every service.
    pub fn service(&self) -> Option<&str> {
        match self {
            ResourceId::Route { service, .. }
            | ResourceId::Resilience { service }
            | ResourceId::AuthorizationPolicy { service } => Some(service),
            ResourceId::TenantPolicy { service, .. } if service == "*" => None,
            ResourceId::TenantPolicy { service, .. } => Some(service),
        }
    }

    /// Parses the `KIND NAME` form used by `weftctl get/delete/history`:
    /// `route inference`, `route inference/acme`, `resilience inference`,
    /// `tenantpolicy acme/inference`, `authorizationpolicy inference`.
    pub fn parse(kind: &str, name: &str) -> Result<ResourceId, String> {
        let (first, second) = match name.split_once('/') {
            Some((a, b)) => (a.to_string(), Some(b.to_string())),
            None => (name.to_string(), None),
        };
        match normalize_kind(kind)? {
            Kind::Route => Ok(ResourceId::Route { service: first, tenant: second }),
            Kind::Resilience if second.is_none() => Ok(ResourceId::Resilience { service: first }),
            Kind::AuthorizationPolicy if second.is_none() => Ok(ResourceId::AuthorizationPolicy { service: first }),
            Kind::AuthorizationPolicy => Err(format!("authorizationpolicy name is a service, got '{name}'")),
            Kind::TenantPolicy => match second {
                Some(service) => Ok(ResourceId::TenantPolicy { tenant: first, service }),
                None => Err(format!("tenantpolicy name must be TENANT/SERVICE, got '{name}'")),
            },
            Kind::Resilience => Err(format!("resilience name is a service, got '{name}'")),
        }
    }
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResourceId::Route { service, tenant: None } => write!(f, "route/{service}"),
            ResourceId::Route { service, tenant: Some(t) } => write!(f, "route/{service}/{t}"),
            ResourceId::Resilience { service } => write!(f, "resilience/{service}"),
            ResourceId::TenantPolicy { tenant, service } => {
                write!(f, "tenantpolicy/{tenant}/{service}")
            }
            ResourceId::AuthorizationPolicy { service } => write!(f, "authorizationpolicy/{service}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Route,
    Resilience,
    TenantPolicy,
    AuthorizationPolicy,
}

impl Kind {
    /// The etcd key segment under the prefix where resources of this kind live.
    pub fn key_dir(self) -> &'static str {
        match self {
            Kind::Route => "routes",
            Kind::Resilience => "resilience",
            Kind::TenantPolicy => "tenants",
            Kind::AuthorizationPolicy => "authz",
        }
    }
}

/// Accepts the kind as written in YAML or on the command line, any case,
/// singular or plural.
pub fn normalize_kind(kind: &str) -> Result<Kind, String> {
    match kind.to_ascii_lowercase().trim_end_matches('s') {
        "route" => Ok(Kind::Route),
        "resilience" => Ok(Kind::Resilience),
        "tenantpolicy" | "tenantpolicie" | "tenant" => Ok(Kind::TenantPolicy),
        "authorizationpolicy" | "authorizationpolicie" | "authorization" | "authz" => Ok(Kind::AuthorizationPolicy),
        _ => Err(format!("unknown kind '{kind}' (expected {KINDS})")),
    }
}

impl Resource {
    pub fn id(&self) -> ResourceId {
        match self {
            Resource::Route(r) => ResourceId::Route { service: r.service.clone(), tenant: r.tenant.clone() },
            Resource::Resilience(r) => ResourceId::Resilience { service: r.service.clone() },
            Resource::TenantPolicy(p) => {
                ResourceId::TenantPolicy { tenant: p.tenant.clone(), service: p.service.clone() }
            }
            Resource::AuthorizationPolicy(a) => ResourceId::AuthorizationPolicy { service: a.service.clone() },
        }
    }
}

impl ResourceId {
    /// The `KIND NAME` form of a resource id, as weftctl and the admin API
    /// take it.
    pub fn kind_and_name(&self) -> (String, String) {
        match self {
            ResourceId::Route { service, tenant: None } => ("route".into(), service.clone()),
            ResourceId::Route { service, tenant: Some(t) } => ("route".into(), format!("{service}/{t}")),
            ResourceId::Resilience { service } => ("resilience".into(), service.clone()),
            ResourceId::TenantPolicy { tenant, service } => ("tenantpolicy".into(), format!("{tenant}/{service}")),
            ResourceId::AuthorizationPolicy { service } => ("authorizationpolicy".into(), service.clone()),
        }
    }

    /// The tenant a resource belongs to; `None` for resources every tenant
    /// shares (default routes, resilience, authorization).
    pub fn owner(&self) -> Option<&str> {
        match self {
            ResourceId::Route { tenant, .. } => tenant.as_deref(),
            ResourceId::TenantPolicy { tenant, .. } => Some(tenant),
            ResourceId::Resilience { .. } | ResourceId::AuthorizationPolicy { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_roundtrip() {
        for id in [
            ResourceId::Route { service: "a".into(), tenant: None },
            ResourceId::Route { service: "a".into(), tenant: Some("t".into()) },
            ResourceId::Resilience { service: "a".into() },
            ResourceId::TenantPolicy { tenant: "t".into(), service: "*".into() },
            ResourceId::AuthorizationPolicy { service: "a".into() },
        ] {
            assert_eq!(ResourceId::from_key_suffix(&id.key_suffix()), Some(id.clone()));
            let (kind, name) = id.kind_and_name();
            assert_eq!(ResourceId::parse(&kind, &name), Ok(id));
        }
    }
}
