//! `weftctl traces`: recent degraded calls.

use std::time::Duration;

use xds_proto::v1 as pb;

use crate::cli::Output;
use crate::client::{Fail, connect};
use crate::out;
use crate::output::emit;

pub(crate) async fn run(
    control: &str,
    service: Option<String>,
    since: Option<Duration>,
    limit: u32,
    output: Output,
) -> Result<(), Fail> {
    let since_secs = since.map(|s| s.as_secs().max(1)).unwrap_or(0);
    let mut client = connect(control).await?;
    let resp = client
        .traces(pb::TracesRequest { service: service.unwrap_or_default(), since_secs, limit })
        .await?
        .into_inner();
    let rows: Vec<serde_json::Value> = resp
        .calls
        .iter()
        .map(|c| {
            serde_json::json!({
                "trace_id": c.trace_id, "service": c.service, "tenant": c.tenant,
                "status": c.status, "reasons": c.reasons, "unix_ms": c.unix_ms,
            })
        })
        .collect();
    emit(output, &rows, || {
        out!("{:<34} {:<16} {:<10} {:>6} {:>8} REASONS", "TRACE", "SERVICE", "TENANT", "STATUS", "AGE");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        for c in &resp.calls {
            let age = format!("{:.1}s", now.saturating_sub(c.unix_ms) as f64 / 1000.0);
            out!("{:<34} {:<16} {:<10} {:>6} {:>8} {}", c.trace_id, c.service, c.tenant, c.status, age, c.reasons);
        }
    });
    Ok(())
}
