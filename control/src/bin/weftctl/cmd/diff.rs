//! `weftctl diff -f FILE`: what apply would change, field by field.

use tonic::Code;
use weft_policy as policy;
use xds_proto::v1 as pb;

use crate::client::{Fail, connect};
use crate::input::parse;
use crate::out;

pub(crate) async fn run(control: &str, file: &str) -> Result<(), Fail> {
    let resources = parse(file)?;
    let mut client = connect(control).await?;
    for l in &resources {
        let id = l.resource.id();
        let (kind, name) = id.kind_and_name();
        let new = policy::doc::to_value(&l.resource);
        match client.get(pb::GetRequest { kind, name, tenant: String::new() }).await {
            Ok(resp) => {
                let current = resp.into_inner().resources.into_iter().next();
                let old: serde_json::Value =
                    current.as_ref().and_then(|c| serde_json::from_str(&c.json).ok()).unwrap_or_default();
                let changes = policy::diff::diff_values(&old, &new);
                if changes.is_empty() {
                    out!("{id} unchanged");
                } else {
                    out!("{id} would be configured:");
                    for c in changes {
                        out!("  {c}");
                    }
                }
            }
            Err(s) if s.code() == Code::NotFound => out!("{id} would be created"),
            Err(s) => return Err(s.into()),
        }
    }
    Ok(())
}
