//! `weftctl endpoints SERVICE`: a service's instances.

use xds_proto::v1 as pb;

use crate::cli::Output;
use crate::client::{Fail, connect};
use crate::out;
use crate::output::emit;

pub(crate) async fn run(control: &str, service: String, output: Output) -> Result<(), Fail> {
    let mut client = connect(control).await?;
    let resp = client.endpoints(pb::EndpointsRequest { service }).await?.into_inner();
    let rows: Vec<serde_json::Value> = resp
        .endpoints
        .iter()
        .map(|e| {
            let labels: std::collections::BTreeMap<_, _> = e.labels.iter().collect();
            serde_json::json!({"address": e.address, "labels": labels, "ready": e.ready, "proxy": e.proxy_id})
        })
        .collect();
    emit(output, &rows, || {
        out!("{:<22} {:<6} {:<30} LABELS", "ADDRESS", "READY", "PROXY");
        for e in &resp.endpoints {
            let mut labels: Vec<String> = e.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            out!("{:<22} {:<6} {:<30} {}", e.address, e.ready, e.proxy_id, labels.join(","));
        }
    });
    Ok(())
}
