//! `weftctl apply`, `rollback` and `delete`: changes, and waiting until
//! every sidecar they reach has ACKed them.

use std::time::{Duration, Instant};

use weft_policy as policy;
use xds_proto::v1 as pb;

use crate::client::{Client, Fail, connect};
use crate::input::parse;
use crate::out;

pub(crate) async fn apply(control: &str, file: &str, wait: Option<Duration>) -> Result<(), Fail> {
    let resources = parse(file)?;
    let mut client = connect(control).await?;
    let req = pb::ApplyRequest {
        resources: resources
            .iter()
            .map(|l| pb::ResourceDoc { json: policy::doc::to_value(&l.resource).to_string(), origin: l.origin.clone() })
            .collect(),
        dry_run: false,
    };
    let resp = client.apply(req).await?.into_inner();
    for r in &resp.results {
        out!("{} {} (rev {})", r.resource, r.action, resp.revision);
    }
    settle(&mut client, &resp, wait).await
}

pub(crate) async fn rollback(
    control: &str,
    kind: String,
    name: String,
    to: u64,
    wait: Option<Duration>,
) -> Result<(), Fail> {
    let mut client = connect(control).await?;
    let resp = client.rollback(pb::RollbackRequest { kind, name, to_revision: to }).await?.into_inner();
    for r in &resp.results {
        let action = if r.action == "unchanged" { "unchanged" } else { "rolled back" };
        out!("{} {action} to rev {to} (rev {})", r.resource, resp.revision);
    }
    settle(&mut client, &resp, wait).await
}

pub(crate) async fn delete(control: &str, kind: String, name: String) -> Result<(), Fail> {
    let id = policy::ResourceId::parse(&kind, &name).map_err(|e| Fail(1, e))?;
    let mut client = connect(control).await?;
    let resp = client.delete(pb::DeleteRequest { kind, name }).await?.into_inner();
    out!("{id} deleted (rev {})", resp.revision);
    Ok(())
}

/// With `--wait`, waits for the sidecars the change reaches.
async fn settle(client: &mut Client, resp: &pb::ApplyResponse, wait: Option<Duration>) -> Result<(), Fail> {
    match wait {
        Some(timeout) if !resp.services.is_empty() => wait_acked(client, &resp.services, resp.revision, timeout).await,
        _ => Ok(()),
    }
}

/// Polls status until every sidecar subscribed to one of `services` has
/// ACKed `revision` or later; reports the ones that did not, and NACKs.
async fn wait_acked(client: &mut Client, services: &[String], revision: u64, timeout: Duration) -> Result<(), Fail> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = client.status(pb::StatusRequest { services: services.to_vec() }).await?.into_inner();
        match judge(&status.proxies, services, revision, Instant::now() >= deadline) {
            Progress::Pending => tokio::time::sleep(Duration::from_millis(50)).await,
            Progress::Done(n) => {
                out!("{n} sidecar(s) ACKed rev {revision}");
                return Ok(());
            }
            Progress::Failed(lines) => return Err(Fail(1, lines.join("\n"))),
        }
    }
}

#[derive(Debug, PartialEq)]
enum Progress {
    /// This many sidecars ACKed.
    Done(usize),
    Pending,
    /// What went wrong: each NACK with its reasons, each straggler.
    Failed(Vec<String>),
}

/// Where a change stands: done when every affected sidecar ACKed it; failed
/// when one NACKed it (and nothing is left to wait for), or at the deadline.
fn judge(proxies: &[pb::ProxyStatus], services: &[String], revision: u64, late: bool) -> Progress {
    let affected: Vec<&pb::ProxyStatus> =
        proxies.iter().filter(|p| services.iter().any(|s| s == "*" || p.subscriptions.contains(s))).collect();
    let nacked: Vec<&&pb::ProxyStatus> =
        affected.iter().filter(|p| p.nacked_version >= revision && p.acked_version < revision).collect();
    let pending: Vec<&&pb::ProxyStatus> =
        affected.iter().filter(|p| p.acked_version < revision && p.nacked_version < revision).collect();
    if pending.is_empty() && nacked.is_empty() {
        return Progress::Done(affected.len());
    }
    if !pending.is_empty() && !late {
        return Progress::Pending;
    }
    let mut lines = Vec::new();
    for p in nacked {
        lines.push(format!("{} ({}) NACKed rev {}: {}", p.proxy_id, p.service, p.nacked_version, p.last_nack));
    }
    for p in pending {
        lines.push(format!("{} ({}) has not ACKed rev {revision} (at {})", p.proxy_id, p.service, p.acked_version));
    }
    Progress::Failed(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(id: &str, subs: &[&str], acked: u64, nacked: u64, nack: &str) -> pb::ProxyStatus {
        pb::ProxyStatus {
            proxy_id: id.into(),
            service: "agent".into(),
            acked_version: acked,
            nacked_version: nacked,
            last_nack: nack.into(),
            subscriptions: subs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_change_is_done_when_every_affected_sidecar_acked_it() {
        let svc = ["inference".to_string()];
        let ps = [proxy("a", &["inference"], 7, 0, ""), proxy("b", &["billing"], 3, 0, "")];
        assert_eq!(judge(&ps, &svc, 7, false), Progress::Done(1), "b is not affected");
        let ps = [proxy("a", &["inference"], 7, 0, ""), proxy("b", &["inference"], 6, 0, "")];
        assert_eq!(judge(&ps, &svc, 7, false), Progress::Pending);
        assert_eq!(
            judge(&ps, &svc, 7, true),
            Progress::Failed(vec!["b (agent) has not ACKed rev 7 (at 6)".into()]),
            "stragglers are named at the deadline"
        );
    }

    #[test]
    fn a_nack_fails_the_wait_with_its_reasons_once_nothing_is_pending() {
        let svc = ["*".to_string()];
        let nack = "route/inference: rules[0].retry.on: unknown condition";
        let ps = [proxy("a", &["inference"], 6, 7, nack), proxy("b", &["inference"], 7, 0, "")];
        assert_eq!(judge(&ps, &svc, 7, false), Progress::Failed(vec![format!("a (agent) NACKed rev 7: {nack}")]));
        // A later ACK supersedes an older NACK.
        let ps = [proxy("a", &["inference"], 8, 7, nack)];
        assert_eq!(judge(&ps, &svc, 7, false), Progress::Done(1));
    }
}
