//! `weftctl status`: connected sidecars, what they ACKed, their last NACK,
//! and stored resources the control plane refuses.

use xds_proto::v1 as pb;

use crate::cli::Output;
use crate::client::{Fail, connect};
use crate::out;
use crate::output::{emit, format_time};

pub(crate) async fn run(control: &str, output: Output) -> Result<(), Fail> {
    let mut client = connect(control).await?;
    let resp = client.status(pb::StatusRequest { services: Vec::new() }).await?.into_inner();
    let rows: Vec<serde_json::Value> = resp
        .proxies
        .iter()
        .map(|p| {
            serde_json::json!({
                "proxy": p.proxy_id, "service": p.service, "address": p.address,
                "acked_version": p.acked_version, "nacked_version": p.nacked_version,
                "last_nack": p.last_nack, "subscriptions": p.subscriptions, "control": p.control_replica,
                "identity": p.identity, "cert_not_after_unix_ms": p.cert_not_after_unix_ms,
            })
        })
        .collect();
    emit(output, &rows, || {
        out!(
            "{:<30} {:<16} {:>8} {:<22} {:<40} {:<20} LAST NACK",
            "PROXY",
            "SERVICE",
            "ACKED",
            "CONTROL",
            "IDENTITY",
            "CERT EXPIRES (UTC)"
        );
        for p in &resp.proxies {
            let nack = if p.last_nack.is_empty() {
                "-".to_string()
            } else {
                format!("v{}: {}", p.nacked_version, p.last_nack)
            };
            let identity = if p.identity.is_empty() { "-" } else { p.identity.as_str() };
            out!(
                "{:<30} {:<16} {:>8} {:<22} {:<40} {:<20} {}",
                p.proxy_id,
                p.service,
                p.acked_version,
                p.control_replica,
                identity,
                format_time(p.cert_not_after_unix_ms),
                nack
            );
        }
        for r in &resp.rejected {
            out!("REJECTED {} (rev {}): {}", r.resource, r.revision, r.reason);
        }
    });
    Ok(())
}
