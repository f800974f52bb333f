//! State shared by the listeners, the discovery client and the admin server.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};

use crate::config::Table;

/// Who this sidecar is, as told to the control plane.
#[derive(Debug, Clone)]
pub struct Identity {
    pub id: String,
    pub service: String,
    pub labels: BTreeMap<String, String>,
    pub advertise: SocketAddr,
}

pub struct Shared {
    pub identity: Identity,
    /// The request header that names the tenant.
    pub tenant_header: http::HeaderName,
    /// Bearer token for the control plane.
    pub token: Option<String>,
    /// The live config; requests load it without locking.
    pub table: ArcSwap<Table>,
    /// Bumped (to the table version) whenever a new table is stored.
    pub table_changed: watch::Sender<u64>,
    /// Services this sidecar has subscribed to (touched only on a table miss).
    pub subscriptions: Mutex<HashSet<String>>,
    pub subscribe_tx: mpsc::UnboundedSender<String>,
    pub app_ready: watch::Receiver<bool>,
    pub config_received: AtomicBool,
    pub control_connected: AtomicBool,
    pub last_nack: Mutex<Option<String>>,
    /// Degraded calls waiting to be reported to the control plane.
    pub reports: mpsc::Sender<xds_proto::v1::DegradedCall>,
    pub reports_dropped: AtomicU64,
    /// How long vanished endpoints are held (`Update.endpoint_hold_ms`).
    pub endpoint_hold_ms: AtomicU64,
}

/// How many degraded-call reports wait for the control plane at most.
pub const REPORT_QUEUE: usize = 4096;

impl Shared {
    /// Queues a report without waiting; when the queue is full the report is
    /// dropped and counted.
    pub fn report_degraded(&self, call: xds_proto::v1::DegradedCall) {
        if self.reports.try_send(call).is_err() {
            self.reports_dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("weft_degraded_reports_dropped_total").increment(1);
        }
    }

    /// Subscribes to `service` unless already subscribed. Returns false when
    /// the subscription cap is reached.
    pub fn subscribe(&self, service: &str) -> bool {
        let mut subs = self.subscriptions.lock().expect("lock");
        if subs.contains(service) {
            return true;
        }
        if subs.len() >= crate::MAX_SUBSCRIPTIONS {
            return false;
        }
        subs.insert(service.to_string());
        let _ = self.subscribe_tx.send(service.to_string());
        true
    }
}

/// Resolves once the flag turns true (or its sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
