//! `weftctl callers SERVICE`: who may call a service, as its
//! AuthorizationPolicy says.

use weft_policy::model::{AuthorizationPolicy, Callers};
use weft_policy::{Policy, doc};
use xds_proto::v1 as pb;

use crate::cli::Output;
use crate::client::{Fail, connect};
use crate::out;
use crate::output::emit;

pub(crate) async fn run(control: &str, service: String, output: Output) -> Result<(), Fail> {
    weft_policy::names::check_service("service", &service).map_err(|e| Fail(1, e))?;
    let mut client = connect(control).await?;
    let req = pb::GetRequest { kind: "authorizationpolicy".into(), name: service.clone(), tenant: String::new() };
    let stored = match client.get(req).await {
        Ok(resp) => resp.into_inner().resources.into_iter().next(),
        Err(s) if s.code() == tonic::Code::NotFound => None,
        Err(s) => return Err(s.into()),
    };
    let Some(stored) = stored else {
        let row = serde_json::json!({"service": service, "policy": null, "default": "allow"});
        emit(output, &row, || {
            out!("{service}: no AuthorizationPolicy: every caller with an identity may call");
            out!("(and plaintext callers too, where the service's sidecars run --inbound-mtls permissive)");
        });
        return Ok(());
    };
    let value: serde_json::Value = serde_json::from_str(&stored.json).map_err(|e| Fail(1, e.to_string()))?;
    let resource = doc::from_value(value.clone()).map_err(|e| Fail(1, format!("{}: {e}", stored.resource)))?;
    let Ok(Policy::AuthorizationPolicy(policy)) = weft_policy::check(&resource) else {
        return Err(Fail(1, format!("{} breaks the rules; `weftctl status` shows why", stored.resource)));
    };
    emit(output, &value, || table(&policy, stored.revision));
    Ok(())
}

fn table(p: &AuthorizationPolicy, revision: u64) {
    let any = |v: Vec<String>| if v.is_empty() { "*".to_string() } else { v.join(",") };
    out!("{}: {} unless a rule allows (revision {revision})", p.service, p.default.as_str());
    out!("{:<32} {:<24} {:<12} TENANTS", "CALLERS", "PATHS", "METHODS");
    for r in &p.rules {
        let callers = match &r.from {
            Callers::Any => "* (any identity)".to_string(),
            Callers::Services(s) => s.join(","),
        };
        out!(
            "{:<32} {:<24} {:<12} {}",
            callers,
            any(r.paths.clone()),
            any(r.methods.iter().map(|m| m.to_string()).collect()),
            any(r.tenants.clone())
        );
    }
    if !p.tenant_header_from.is_empty() {
        out!("the tenant header is believed from: {}", p.tenant_header_from.join(", "));
    }
}
