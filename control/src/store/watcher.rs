//! Follows etcd: a full load, then a watch that resumes from the last
//! revision seen after any disconnect. A compacted revision means events were
//! lost, so the index is rebuilt from a fresh full load — never a crash.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use etcd_client::{EventType, WatchOptions};
use tokio::sync::watch;

use crate::push::index::{Index, Snapshot};
use crate::store::Store;

/// Why the index was rebuilt from a full load.
fn count_resync(reason: &'static str) {
    metrics::counter!("weft_control_resyncs_total", "reason" => reason).increment(1);
}

/// Runs until `shutdown` resolves. `synced` is true while the watch is live.
pub async fn run(
    store: Store,
    snapshots: watch::Sender<Arc<Snapshot>>,
    synced: Arc<AtomicBool>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    tokio::select! {
        _ = follow(store, snapshots, synced) => {}
        _ = &mut shutdown => {}
    }
}

async fn follow(store: Store, snapshots: watch::Sender<Arc<Snapshot>>, synced: Arc<AtomicBool>) {
    let mut backoff = Backoff::new();
    let mut index = Index::new(store.prefix());
    // None: a full load is needed before watching.
    let mut resume_from: Option<u64> = None;
    let mut first = true;
    let mut failed = false;
    loop {
        let start = match resume_from {
            Some(rev) => rev + 1,
            None => match full_load(&store).await {
                Ok((loaded, rev)) => {
                    index = loaded;
                    snapshots.send_replace(Arc::new(index.snapshot(rev)));
                    if !first {
                        tracing::info!(revision = rev, "resynced from a full load");
                    }
                    first = false;
                    resume_from = Some(rev);
                    rev + 1
                }
                Err(e) => {
                    synced.store(false, Ordering::Relaxed);
                    tracing::warn!(error = %e, "full load from etcd failed; retrying");
                    backoff.wait().await;
                    continue;
                }
            },
        };
        // After a failure, the next etcd member.
        let mut client = if failed { store.next_client() } else { store.client() };
        failed = false;
        let opts = WatchOptions::new().with_prefix().with_start_revision(start as i64).with_progress_notify();
        let mut stream = match client.watch(format!("{}/", store.prefix()), Some(opts)).await {
            Ok(s) => s,
            Err(e) => {
                synced.store(false, Ordering::Relaxed);
                failed = true;
                tracing::warn!(error = %e, from = start, "cannot start the etcd watch; retrying");
                backoff.wait().await;
                continue;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(resp)) => {
                    if resp.canceled() {
                        if resp.compact_revision() > 0 {
                            tracing::warn!(
                                from = start,
                                compacted = resp.compact_revision(),
                                "watch start revision was compacted; doing a full resync"
                            );
                            count_resync("compacted");
                            resume_from = None;
                        } else {
                            tracing::warn!(reason = resp.cancel_reason(), "etcd cancelled the watch; resuming");
                        }
                        break;
                    }
                    synced.store(true, Ordering::Relaxed);
                    backoff.reset();
                    let last = apply_events(&mut index, &resp, resume_from.unwrap_or(0));
                    resume_from = Some(last);
                    if index.is_dirty() {
                        snapshots.send_replace(Arc::new(index.snapshot(last)));
                    }
                }
                Ok(None) | Err(_) => {
                    synced.store(false, Ordering::Relaxed);
                    failed = true;
                    tracing::warn!(resume_from = ?resume_from, "etcd watch broke; reconnecting");
                    backoff.wait().await;
                    break;
                }
            }
        }
    }
}

/// Every key under the prefix, indexed, and the revision it was read at.
async fn full_load(store: &Store) -> Result<(Index, u64), crate::store::StoreError> {
    let (rev, kvs) = store.load_all().await?;
    let mut index = Index::new(store.prefix());
    for kv in &kvs {
        if let Ok(key) = kv.key_str() {
            index.put(key, kv.value(), kv.mod_revision() as u64);
        }
    }
    Ok((index, rev))
}

/// Applies one watch response's events to the index; the revision the
/// index is now at (`last` before).
fn apply_events(index: &mut Index, resp: &etcd_client::WatchResponse, mut last: u64) -> u64 {
    for ev in resp.events() {
        let Some(kv) = ev.kv() else { continue };
        let Ok(key) = kv.key_str() else { continue };
        match ev.event_type() {
            EventType::Put => index.put(key, kv.value(), kv.mod_revision() as u64),
            EventType::Delete => index.delete(key),
        }
        last = last.max(kv.mod_revision() as u64);
    }
    // Progress notifications move the revision without events.
    if let Some(h) = resp.header()
        && resp.events().is_empty()
    {
        last = last.max(h.revision() as u64);
    }
    last
}

/// Exponential backoff (`backon`): 100 ms doubling to 2.5 s, each delay
/// plus up to as much again in jitter, so at most 5 s.
pub struct Backoff {
    delays: backon::ExponentialBackoff,
}

impl Backoff {
    pub fn new() -> Backoff {
        Backoff { delays: reconnect_delays() }
    }
    pub fn reset(&mut self) {
        self.delays = reconnect_delays();
    }
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.delays.next().unwrap_or(MAX_DELAY)).await;
    }
}

const MAX_DELAY: Duration = Duration::from_secs(5);

fn reconnect_delays() -> backon::ExponentialBackoff {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(MAX_DELAY / 2)
        .with_jitter()
        .without_max_times()
        .build()
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delays_start_at_100ms_and_never_pass_5s() {
        let d: Vec<Duration> = reconnect_delays().take(30).collect();
        assert_eq!(d.len(), 30, "the delays never run out");
        assert!(d[0] >= Duration::from_millis(100) && d[0] < Duration::from_millis(200), "{d:?}");
        assert!(d.iter().all(|d| *d <= MAX_DELAY), "{d:?}");
        assert!(d[29] >= MAX_DELAY / 2, "{d:?}");
    }
}
