//! `weftctl history KIND NAME`: a resource's revisions, newest first, when
//! each was applied and what each changed.

use weft_policy as policy;
use xds_proto::v1 as pb;

use crate::cli::Output;
use crate::client::{Fail, connect};
use crate::out;
use crate::output::{clip, emit, format_time};

pub(crate) async fn run(control: &str, kind: String, name: String, limit: u32, output: Output) -> Result<(), Fail> {
    let mut client = connect(control).await?;
    let resp = client.history(pb::HistoryRequest { kind, name, limit }).await?.into_inner();
    let values: Vec<serde_json::Value> =
        resp.entries.iter().map(|e| serde_json::from_str(&e.json).unwrap_or_default()).collect();
    let rows: Vec<serde_json::Value> = resp
        .entries
        .iter()
        .zip(&values)
        .map(|(e, v)| serde_json::json!({"revision": e.revision, "applied_unix_ms": e.applied_unix_ms, "resource": v}))
        .collect();
    emit(output, &rows, || {
        out!("{:>9}  {:<20}  CHANGE", "REVISION", "APPLIED (UTC)");
        for (i, e) in resp.entries.iter().enumerate() {
            let change = match values.get(i + 1) {
                Some(older) => {
                    let d = policy::diff::diff_values(older, &values[i]);
                    if d.is_empty() { "no change".to_string() } else { d.join("; ") }
                }
                None if resp.truncated => "(older revisions compacted)".to_string(),
                None => "created".to_string(),
            };
            out!("{:>9}  {:<20}  {}", e.revision, format_time(e.applied_unix_ms), clip(change, 120));
        }
    });
    Ok(())
}
