//! `weftctl get KIND [NAME]`: stored resources.

use weft_policy as policy;
use xds_proto::v1 as pb;

use crate::cli::Output;
use crate::client::{Fail, connect};
use crate::out;

pub(crate) async fn run(
    control: &str,
    kind: String,
    name: Option<String>,
    tenant: Option<String>,
    output: Output,
) -> Result<(), Fail> {
    policy::normalize_kind(&kind).map_err(|e| Fail(1, e))?;
    let mut client = connect(control).await?;
    let resp = client
        .get(pb::GetRequest { kind, name: name.unwrap_or_default(), tenant: tenant.unwrap_or_default() })
        .await?
        .into_inner();
    let values: Vec<serde_json::Value> =
        resp.resources.iter().map(|r| serde_json::from_str(&r.json).unwrap_or(serde_json::Value::Null)).collect();
    match output {
        Output::Table => {
            out!("{:<40} {:>10}", "RESOURCE", "REVISION");
            for r in &resp.resources {
                out!("{:<40} {:>10}", r.resource, r.revision);
            }
        }
        Output::Json => out!("{}", serde_json::to_string_pretty(&values).unwrap_or_default()),
        // One YAML document per resource, as `apply -f` reads them.
        Output::Yaml => {
            let docs: Vec<String> = values.iter().map(|v| serde_saphyr::to_string(v).unwrap_or_default()).collect();
            out!("{}", docs.join("---\n").trim_end());
        }
    }
    Ok(())
}
