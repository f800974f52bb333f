//! The replica's etcd lease, under which every record of its sidecars is
//! written.
//!
//! One lease per replica, granted at start and kept alive by one stream.
//! The holder publishes the lease it holds (`Some(id)`) or that it holds
//! none (`None`) on a watch channel: sessions register their sidecars again
//! whenever a new lease is published, and `/ready` is false while there is
//! none.
//!
//! A lease is given up, and a new one granted, when
//! - etcd says it is gone (a keep-alive answered with TTL 0, or "lease not
//!   found" when the keep-alive stream is opened), or
//! - no keep-alive has been answered for a whole TTL, counted from when the
//!   last answered one was sent: etcd has expired it by then, or will as soon
//!   as it can (a partition, a frozen or leaderless etcd). Granting a new one
//!   early is harmless: the records move to it as the sessions register
//!   again, and the old lease, if it survived, expires holding nothing.
//!
//! Before this rule a lease lost during a partition was kept alive in vain
//! forever and the replica's sidecars stayed unregistered.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::store::Store;

/// How long to wait between keep-alive stream openings, and at most
/// between failed grants: the replica's sidecars are unregistered until a
/// grant succeeds, so it is tried again soon.
const RETRY: Duration = Duration::from_millis(500);

/// Between failed grants: 50 ms doubling to half of [`RETRY`], each plus up
/// to as much again in jitter (so the replicas of a mesh do not retry in
/// step when etcd comes back).
fn grant_delays() -> backon::ExponentialBackoff {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(RETRY / 2)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Why a held lease was given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lost {
    /// etcd said the lease does not exist any more.
    Gone,
    /// No keep-alive answered within the TTL.
    Unconfirmed,
}

/// Grants the replica's lease and keeps it alive; publishes it on `lease`
/// (`None` while there is none). Returns when every receiver is gone.
pub async fn hold(store: Store, ttl_secs: i64, lease: watch::Sender<Option<i64>>) {
    let ttl = Duration::from_secs(ttl_secs.max(1) as u64);
    loop {
        let mut delays = grant_delays();
        let id = loop {
            match store.grant_lease(ttl_secs).await {
                Ok(id) => break id,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot grant the replica lease; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delays.next().unwrap_or(RETRY)) => {}
                        _ = lease.closed() => return,
                    }
                }
            }
        };
        // The grant itself is the first renewal: etcd counts the TTL from it.
        let granted = Instant::now();
        metrics::counter!("weft_control_lease_grants_total").increment(1);
        tracing::info!(lease = id, ttl_secs, "replica lease granted");
        lease.send_replace(Some(id));
        let lost = tokio::select! {
            lost = keep(&store, id, ttl, granted) => lost,
            _ = lease.closed() => return,
        };
        metrics::counter!("weft_control_lease_losses_total", "reason" => match lost {
            Lost::Gone => "gone",
            Lost::Unconfirmed => "unconfirmed",
        })
        .increment(1);
        tracing::warn!(lease = id, ?lost, "replica lease lost; granting a new one and registering every sidecar again");
        lease.send_replace(None);
    }
}

/// Keeps lease `id` alive until it is lost. `renewed` is when the last
/// renewal that etcd answered was sent.
async fn keep(store: &Store, id: i64, ttl: Duration, mut renewed: Instant) -> Lost {
    let period = (ttl / 3).max(Duration::from_millis(200));
    let mut failed = false;
    loop {
        let deadline = renewed + ttl;
        let sent = Instant::now();
        // After a failure, the next etcd member.
        let mut client = if failed { store.next_client() } else { store.client() };
        failed = true;
        let opened = match tokio::time::timeout_at(deadline, client.lease_keep_alive(id)).await {
            Err(_) => return Lost::Unconfirmed,
            Ok(r) => r,
        };
        let (mut keeper, mut answers) = match opened {
            Ok(pair) => pair,
            Err(e) if lease_not_found(&e) => return Lost::Gone,
            Err(e) => {
                tracing::warn!(error = %e, lease = id, "replica lease keep-alive stream did not open; retrying");
                if tokio::time::timeout_at(deadline, tokio::time::sleep(RETRY)).await.is_err() {
                    return Lost::Unconfirmed;
                }
                continue;
            }
        };
        // Opening the stream sent a keep-alive and checked its answer.
        renewed = sent;
        loop {
            tokio::time::sleep(period).await;
            let deadline = renewed + ttl;
            let sent = Instant::now();
            let answer = tokio::time::timeout_at(deadline, async {
                keeper.keep_alive().await?;
                answers.message().await
            })
            .await;
            match answer {
                Err(_) => return Lost::Unconfirmed,
                Ok(Ok(Some(r))) if r.ttl() > 0 => renewed = sent,
                Ok(Ok(Some(_))) => return Lost::Gone,
                Ok(Ok(None)) | Ok(Err(_)) => {
                    tracing::warn!(lease = id, "replica lease keep-alive stream broke; opening a new one");
                    failed = true;
                    break;
                }
            }
        }
    }
}

/// etcd-client reports a keep-alive stream opened on a lease etcd does not
/// have as this error.
fn lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("not found"),
        etcd_client::Error::GRpcStatus(s) => s.code() == tonic::Code::NotFound,
        _ => false,
    }
}
