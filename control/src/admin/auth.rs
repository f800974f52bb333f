//! Bearer tokens for the control plane's gRPC API (`--tokens FILE`).
//!
//! The file is a YAML map from token to role: `admin` (everything),
//! `proxy:<service>` (the discovery stream, registering and getting a
//! certificate for that service only), `proxy` (the discovery stream for any
//! service, only while the control plane has no CA) or `tenant:<name>` (read
//! and change only that tenant's resources). Without a tokens file the API is open and every
//! caller is an admin; `weft-control` then listens on loopback by default.

use std::collections::HashMap;
use std::sync::Arc;

use tonic::{Request, Status};

use weft_policy::ResourceId;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Admin,
    /// A sidecar's credential: for one service, or (bare `proxy`) any.
    Proxy(Option<String>),
    Tenant(String),
}

impl Role {
    fn parse(s: &str) -> Result<Role, String> {
        match s.trim() {
            "admin" => Ok(Role::Admin),
            "proxy" => Ok(Role::Proxy(None)),
            other => {
                if let Some(s) = other.strip_prefix("proxy:") {
                    weft_policy::names::check_service("service", s)?;
                    return Ok(Role::Proxy(Some(s.to_string())));
                }
                match other.strip_prefix("tenant:") {
                    Some(t) if !t.is_empty() => {
                        weft_policy::names::check_tenant("tenant", t)?;
                        Ok(Role::Tenant(t.to_string()))
                    }
                    _ => Err(format!("role '{other}' is not admin, proxy:<service>, proxy or tenant:<name>")),
                }
            }
        }
    }
}

#[derive(Debug, Default)]
pub struct Tokens {
    roles: HashMap<String, Role>,
}

impl Tokens {
    /// Reads a tokens file, naming the file and entry on error.
    pub fn load(path: &str) -> Result<Tokens, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
        let map: HashMap<String, String> =
            serde_saphyr::from_str(&text).map_err(|e| format!("{path}: not a YAML map of token: role ({e})"))?;
        let mut roles = HashMap::new();
        for (token, role) in map {
            if token.len() < 16 {
                return Err(format!("{path}: a token must be at least 16 characters (one for role '{role}' is not)"));
            }
            roles.insert(token, Role::parse(&role).map_err(|e| format!("{path}: {e}"))?);
        }
        if roles.is_empty() {
            return Err(format!("{path}: no tokens"));
        }
        Ok(Tokens { roles })
    }
}

/// A tonic interceptor: puts the caller's [`Role`] in the request's
/// extensions, or refuses the call.
pub fn interceptor(tokens: Option<Arc<Tokens>>) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut req: Request<()>| {
        let role = match &tokens {
            None => Role::Admin,
            Some(t) => {
                let token = req
                    .metadata()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .ok_or_else(|| Status::unauthenticated("401: a bearer token is required (weftctl --token)"))?;
                if !over_tls_or_loopback(&req) {
                    return Err(Status::unauthenticated(
                        "401: bearer tokens are accepted over TLS only, or from loopback (give weft-control a CA)",
                    ));
                }
                t.roles.get(token.trim()).cloned().ok_or_else(|| Status::unauthenticated("401: unknown token"))?
            }
        };
        req.extensions_mut().insert(role);
        Ok(req)
    }
}

/// A token may come over TLS, or in the clear from this host only.
fn over_tls_or_loopback(req: &Request<()>) -> bool {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    if req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>().is_some() {
        return true;
    }
    match req.extensions().get::<TcpConnectInfo>().and_then(|i| i.remote_addr()) {
        Some(addr) => addr.ip().to_canonical().is_loopback(),
        // Not a TCP connection (an in-process transport in tests).
        None => true,
    }
}

/// The caller's role (admin when the request did not pass the interceptor,
/// as in unit tests of the handlers).
pub fn role<T>(req: &Request<T>) -> Role {
    req.extensions().get::<Role>().cloned().unwrap_or(Role::Admin)
}

/// The tenant a resource belongs to; `None` for resources every tenant
/// shares (default routes, resilience, authorization).
pub fn owner(id: &ResourceId) -> Option<&str> {
    id.owner()
}

/// May `role` change `id`?
pub fn may_modify(role: &Role, id: &ResourceId) -> Result<(), Status> {
    match role {
        Role::Admin => Ok(()),
        Role::Proxy(_) => Err(Status::permission_denied("403: a proxy token cannot change policy")),
        // A tenant's limits are the platform operator's to set.
        Role::Tenant(t) if matches!(id, ResourceId::TenantPolicy { .. }) => Err(Status::permission_denied(format!(
            "403: token for tenant {t} cannot change {id}: tenant limits are set by an admin"
        ))),
        Role::Tenant(t) => match owner(id) {
            Some(o) if o == t => Ok(()),
            Some(o) => Err(Status::permission_denied(format!("403: token for tenant {t} cannot modify tenant {o}"))),
            None => Err(Status::permission_denied(format!(
                "403: token for tenant {t} cannot modify {id}, which every tenant shares"
            ))),
        },
    }
}

/// May `role` read `id`?
pub fn may_read(role: &Role, id: &ResourceId) -> bool {
    match role {
        Role::Admin => true,
        Role::Proxy(_) => false,
        Role::Tenant(t) => owner(id) == Some(t.as_str()),
    }
}

/// Is the resource named `resource` (as `ResourceId` prints it, e.g.
/// `route/inference/acme`) the tenant's own?
pub fn owned_by(resource: &str, tenant: &str) -> bool {
    let mut parts = resource.split('/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("route"), Some(_), Some(t)) => t == tenant,
        (Some("tenantpolicy"), Some(t), Some(_)) => t == tenant,
        _ => false,
    }
}

/// A sidecar's last NACK (`resource: reason; ...`) as a tenant may see it:
/// the reasons about its own resources, and how many others there were.
pub fn redact_nack(nack: &str, tenant: &str) -> String {
    if nack.is_empty() {
        return String::new();
    }
    let (own, others): (Vec<&str>, Vec<&str>) =
        nack.split("; ").partition(|part| part.split_once(": ").is_some_and(|(r, _)| owned_by(r, tenant)));
    let mut out = own.join("; ");
    if !others.is_empty() {
        if !out.is_empty() {
            out.push_str("; ");
        }
        out.push_str(&format!("{} problem(s) in resources not yours", others.len()));
    }
    out
}

/// May `role` open a discovery stream for `service` (register it, and get
/// its certificate)? `with_ca`: the control plane issues identities, so a
/// credential must name the one service it is for.
pub fn may_register(role: &Role, service: &str, with_ca: bool) -> Result<(), Status> {
    match role {
        Role::Admin => Ok(()),
        Role::Proxy(Some(s)) if s == service => Ok(()),
        Role::Proxy(Some(s)) => {
            Err(Status::permission_denied(format!("403: a token for service {s} cannot register service {service}")))
        }
        Role::Proxy(None) if !with_ca => Ok(()),
        Role::Proxy(None) => Err(Status::permission_denied(
            "403: with a CA, a sidecar's token must name its service (role proxy:<service>)",
        )),
        Role::Tenant(t) => {
            Err(Status::permission_denied(format!("403: token for tenant {t} cannot open a discovery stream")))
        }
    }
}

/// Only admins see the whole mesh (status).
pub fn require_admin(role: &Role, what: &str) -> Result<(), Status> {
    match role {
        Role::Admin => Ok(()),
        Role::Proxy(_) => Err(Status::permission_denied(format!("403: a proxy token cannot {what}"))),
        Role::Tenant(t) => Err(Status::permission_denied(format!("403: token for tenant {t} cannot {what}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_change_only_their_own() {
        let acme = Role::Tenant("acme".into());
        let own = ResourceId::Route { service: "inference".into(), tenant: Some("acme".into()) };
        let other = ResourceId::Route { service: "inference".into(), tenant: Some("globex".into()) };
        let shared = ResourceId::Route { service: "inference".into(), tenant: None };
        assert!(may_modify(&acme, &own).is_ok());
        assert_eq!(
            may_modify(&acme, &other).unwrap_err().message(),
            "403: token for tenant acme cannot modify tenant globex"
        );
        // Its own limits: read, not written.
        let limits = ResourceId::TenantPolicy { tenant: "acme".into(), service: "inference".into() };
        assert!(may_modify(&acme, &limits).unwrap_err().message().contains("tenant limits are set by an admin"));
        assert!(may_read(&acme, &limits));
        let authz = ResourceId::AuthorizationPolicy { service: "inference".into() };
        assert!(may_modify(&acme, &authz).unwrap_err().message().contains("every tenant shares"));
        assert!(may_modify(&acme, &shared).unwrap_err().message().contains("every tenant shares"));
        assert!(may_modify(&Role::Admin, &shared).is_ok());
        assert!(!may_read(&acme, &shared) && may_read(&acme, &own));
    }

    #[test]
    fn a_sidecar_token_registers_only_its_service() {
        assert_eq!(Role::parse("proxy:inference").unwrap(), Role::Proxy(Some("inference".into())));
        assert_eq!(Role::parse("proxy").unwrap(), Role::Proxy(None));
        assert!(Role::parse("proxy:api.v2").unwrap_err().contains("service"));
        let inference = Role::Proxy(Some("inference".into()));
        assert!(may_register(&inference, "inference", true).is_ok());
        let e = may_register(&inference, "billing", false).unwrap_err();
        assert_eq!(e.message(), "403: a token for service inference cannot register service billing");
        assert!(may_register(&Role::Proxy(None), "billing", false).is_ok(), "a bare proxy token without a CA");
        assert!(may_register(&Role::Proxy(None), "billing", true).unwrap_err().message().contains("proxy:<service>"));
        assert!(may_register(&Role::Tenant("acme".into()), "billing", false).is_err());
        assert!(may_register(&Role::Admin, "billing", true).is_ok());
    }

    #[test]
    fn tenants_see_only_their_own_resources_problems() {
        assert!(owned_by("route/inference/acme", "acme"));
        assert!(owned_by("tenantpolicy/acme/inference", "acme"));
        assert!(!owned_by("route/inference", "acme"));
        assert!(!owned_by("route/inference/globex", "acme"));
        assert!(!owned_by("resilience/inference", "acme"));
        let nack = "route/inference/acme: rules[0].backends: weights sum to 0; tenantpolicy/globex/inference: bad; resilience/inference: bad";
        assert_eq!(
            redact_nack(nack, "acme"),
            "route/inference/acme: rules[0].backends: weights sum to 0; 2 problem(s) in resources not yours"
        );
        assert_eq!(redact_nack(nack, "initech"), "3 problem(s) in resources not yours");
        assert_eq!(redact_nack("", "acme"), "");
    }
}
