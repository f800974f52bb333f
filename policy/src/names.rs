//! Names of services and tenants.
//!
//! A service name is what a caller puts in `Host` (its first DNS label:
//! `inference.prod.svc` is service `inference`), so it holds no dot. A
//! tenant name comes from a request header and becomes a metric label and a
//! key of limits. Both: 1-63 characters, lowercase letters, digits, `-` and
//! `_`, not starting with `-`; tenants may also hold `.`.

/// The longest service or tenant name.
pub const MAX_NAME: usize = 63;

/// A service name: the first label of the authority callers use.
pub fn check_service(what: &str, name: &str) -> Result<(), String> {
    check(what, name, false)
}

/// A tenant name.
pub fn check_tenant(what: &str, name: &str) -> Result<(), String> {
    check(what, name, true)
}

/// True for a valid tenant name (as [`check_tenant`]), without building a
/// message: the sidecar checks every request's tenant header with it.
#[inline]
pub fn is_tenant(b: &[u8]) -> bool {
    (1..=MAX_NAME).contains(&b.len())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'_' | b'.'))
        && !matches!(b[0], b'-' | b'.')
}

/// True for a valid service name (as [`check_service`]).
#[inline]
pub fn is_service(b: &[u8]) -> bool {
    (1..=MAX_NAME).contains(&b.len())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'_'))
        && b[0] != b'-'
}

fn check(what: &str, name: &str, dots: bool) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    if name.len() > MAX_NAME {
        return Err(format!("{what} '{name}' is longer than {MAX_NAME} characters"));
    }
    let ok = if dots { is_tenant(name.as_bytes()) } else { is_service(name.as_bytes()) };
    if ok {
        return Ok(());
    }
    if !dots && name.contains('.') {
        return Err(format!(
            "{what} '{name}' holds a '.': callers name a service by the first label of their Host (inference.prod.svc is inference)"
        ));
    }
    let allowed =
        if dots { "lowercase letters, digits, '-', '_' and '.'" } else { "lowercase letters, digits, '-' and '_'" };
    Err(format!("{what} '{name}' may only hold {allowed}, and not start with '-'{}", if dots { " or '.'" } else { "" }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_and_tenant_names() {
        for ok in ["inference", "agent-router", "a", "x_1", &"a".repeat(63)] {
            assert!(check_service("service", ok).is_ok(), "{ok}");
            assert!(check_tenant("tenant", ok).is_ok(), "{ok}");
        }
        for bad in ["", "Inference", "-a", "a b", "a/b", &"a".repeat(64), "é"] {
            assert!(check_service("service", bad).is_err(), "{bad}");
            assert!(check_tenant("tenant", bad).is_err(), "{bad}");
        }
        // A dotted service name could never be called: `api.v2` routes to `api`.
        let e = check_service("service", "api.v2").unwrap_err();
        assert!(e.contains("first label"), "{e}");
        assert!(check_tenant("tenant", "acme.eu").is_ok());
        assert!(check_tenant("tenant", ".acme").is_err());
    }
}
