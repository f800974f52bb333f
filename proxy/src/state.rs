//! State shared by the listeners, the discovery client and the admin server.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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

pub(crate) struct Shared {
    pub(crate) identity: Identity,
    /// The request header that names the tenant.
    pub(crate) tenant_header: http::HeaderName,
    /// Bearer token for the control plane.
    pub(crate) token: Option<String>,
    /// The live config; requests load it without locking.
    pub(crate) table: ArcSwap<Table>,
    /// Bumped (to the table version) whenever a new table is stored.
    pub(crate) table_changed: watch::Sender<u64>,
    /// Services this sidecar has subscribed to (touched only on a table
    /// miss and by the subscription sweep).
    pub(crate) subscriptions: Mutex<HashSet<String>>,
    /// Subscription changes for the discovery client (bounded: a change that
    /// does not fit is refused, see [`Shared::subscribe`]).
    pub(crate) subscription_tx: mpsc::Sender<SubscriptionChange>,
    pub(crate) app_ready: watch::Receiver<bool>,
    pub(crate) config_received: AtomicBool,
    pub(crate) control_connected: AtomicBool,
    pub(crate) last_nack: Mutex<Option<String>>,
    /// Degraded calls waiting to be reported to the control plane.
    pub(crate) reports: mpsc::Sender<xds_proto::v1::DegradedCall>,
    pub(crate) reports_dropped: AtomicU64,
    /// How long vanished endpoints are held (`Update.endpoint_hold_ms`).
    pub(crate) endpoint_hold_ms: AtomicU64,
    /// The trust bundle and workload certificate, with a CA.
    pub(crate) workload: Option<Arc<crate::workload::Workload>>,
    /// This instance's own tenant (its `tenant` label), which its sidecar
    /// vouches for on mTLS calls ([`crate::http::headers::CALLER_TENANT`]).
    pub(crate) own_tenant: Option<http::HeaderValue>,
}

/// The `tenant` label as a header value, when it is a tenant name.
fn identity_tenant(label: &Option<String>) -> Option<http::HeaderValue> {
    label
        .as_deref()
        .filter(|t| weft_policy::names::is_tenant(t.as_bytes()))
        .and_then(|t| http::HeaderValue::from_str(t).ok())
}

/// The receiving ends of [`Shared`]'s queues, for the discovery client.
pub(crate) struct Queues {
    pub(crate) subscriptions: mpsc::Receiver<SubscriptionChange>,
    pub(crate) reports: mpsc::Receiver<xds_proto::v1::DegradedCall>,
}

impl Shared {
    /// State for a sidecar of `identity`, with an empty table, subscribed
    /// to its own service.
    pub(crate) fn new(
        identity: Identity,
        tenant_header: http::HeaderName,
        token: Option<String>,
        app_ready: watch::Receiver<bool>,
        workload: Option<Arc<crate::workload::Workload>>,
    ) -> (Arc<Shared>, Queues) {
        let (subscription_tx, subscriptions) = mpsc::channel(SUBSCRIPTION_QUEUE);
        let identity_labels_tenant = identity.labels.get("tenant").cloned();
        let (reports, reports_rx) = mpsc::channel(REPORT_QUEUE);
        let shared = Arc::new(Shared {
            subscriptions: Mutex::new(HashSet::from([identity.service.clone()])),
            identity,
            tenant_header,
            token,
            table: ArcSwap::from_pointee(Table::default()),
            table_changed: watch::channel(0).0,
            subscription_tx,
            app_ready,
            config_received: AtomicBool::new(false),
            control_connected: AtomicBool::new(false),
            last_nack: Mutex::new(None),
            reports,
            reports_dropped: AtomicU64::new(0),
            endpoint_hold_ms: AtomicU64::new(crate::config::DEFAULT_ENDPOINT_HOLD_MS),
            own_tenant: identity_tenant(&identity_labels_tenant),
            workload,
        });
        (shared, Queues { subscriptions, reports: reports_rx })
    }
}

/// How many degraded-call reports wait for the control plane at most.
pub(crate) const REPORT_QUEUE: usize = 4096;

/// What the discovery client is asked to tell the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SubscriptionChange {
    Subscribe(String),
    /// Also removes the services from the table.
    Unsubscribe(Vec<String>),
}

/// Subscription changes queued for the discovery client at most.
pub(crate) const SUBSCRIPTION_QUEUE: usize = 4096;

/// How often the subscription sweep runs; [`EPOCH`] counts its runs.
pub(crate) const SWEEP_PERIOD: std::time::Duration = std::time::Duration::from_secs(10);
/// A known service the app has not called for this many sweeps is
/// unsubscribed (10 minutes).
pub(crate) const IDLE_KNOWN_SWEEPS: u64 = 60;
/// An unknown service (the control plane knows nothing of it: a typo, a
/// bogus `Host`) is unsubscribed after this many sweeps without calls.
pub(crate) const IDLE_UNKNOWN_SWEEPS: u64 = 3;

pub(crate) use crate::clock::EPOCH;

impl Shared {
    /// Whether this instance can take calls, its app being `app_ready`: with
    /// a trust bundle it also needs its workload certificate (callers reach
    /// it over mTLS).
    pub(crate) fn ready_to_serve(&self, app_ready: bool) -> bool {
        app_ready && self.has_certificate()
    }

    /// A workload certificate is in force, or none is needed.
    pub(crate) fn has_certificate(&self) -> bool {
        self.workload.as_ref().is_none_or(|w| w.current.load().is_some())
    }

    /// Logs a degraded call (`trace` its `traceparent`) and queues its
    /// report for the control plane.
    #[cold]
    pub(crate) fn degraded_call(
        &self,
        trace: Option<&http::HeaderValue>,
        service: String,
        tenant: String,
        reasons: String,
        status: u16,
    ) {
        let trace_id = trace.and_then(|v| v.to_str().ok()).and_then(|v| v.get(3..35)).unwrap_or("").to_string();
        tracing::info!(trace_id, service, tenant, reasons, status, "degraded call");
        self.report_degraded(xds_proto::v1::DegradedCall {
            trace_id,
            service,
            reasons,
            unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            tenant,
            status: u32::from(status),
        });
    }

    /// Queues a report without waiting; when the queue is full the report is
    /// dropped and counted.
    pub(crate) fn report_degraded(&self, call: xds_proto::v1::DegradedCall) {
        if self.reports.try_send(call).is_err() {
            self.reports_dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("weft_degraded_reports_dropped_total").increment(1);
        }
    }

    /// Subscribes to `service` unless already subscribed. At the cap
    /// ([`crate::MAX_SUBSCRIPTIONS`]) the least recently called unknown
    /// service (one the control plane knows nothing of) makes room: bogus
    /// names cannot lock the app out of real services. Returns false when
    /// there is no room (every subscription is a known service) or the
    /// discovery client is that far behind.
    pub(crate) fn subscribe(&self, service: &str) -> bool {
        let mut subs = self.subscriptions.lock().expect("lock");
        if subs.contains(service) {
            return true;
        }
        if subs.len() >= crate::MAX_SUBSCRIPTIONS {
            let table = self.table.load();
            let victim = subs
                .iter()
                .filter(|s| **s != self.identity.service)
                .filter_map(|s| table.services.get(s).map(|svc| (s, svc)))
                .filter(|(_, svc)| !svc.known)
                .map(|(s, svc)| (svc.stats.last_used(), s))
                .min()
                .map(|(_, s)| s.clone());
            let Some(victim) = victim else { return false };
            if self.subscription_tx.try_send(SubscriptionChange::Unsubscribe(vec![victim.clone()])).is_err() {
                return false;
            }
            subs.remove(&victim);
        }
        if self.subscription_tx.try_send(SubscriptionChange::Subscribe(service.to_string())).is_err() {
            return false;
        }
        subs.insert(service.to_string());
        true
    }

    /// One run of the subscription sweep: advances [`EPOCH`] and
    /// unsubscribes services the app stopped calling, so that a caller's
    /// table (and the `service` labels of its metrics) only holds what it
    /// uses. The sidecar's own service stays.
    pub(crate) fn sweep_subscriptions(&self) {
        let epoch = EPOCH.fetch_add(1, Ordering::Relaxed) + 1;
        let table = self.table.load();
        let mut subs = self.subscriptions.lock().expect("lock");
        let idle: Vec<String> = subs
            .iter()
            .filter(|s| **s != self.identity.service)
            .filter(|s| {
                table.services.get(*s).is_some_and(|svc| {
                    let limit = if svc.known { IDLE_KNOWN_SWEEPS } else { IDLE_UNKNOWN_SWEEPS };
                    epoch.saturating_sub(svc.stats.last_used()) > limit
                })
            })
            .cloned()
            .collect();
        if idle.is_empty() {
            return;
        }
        if self.subscription_tx.try_send(SubscriptionChange::Unsubscribe(idle.clone())).is_ok() {
            tracing::debug!(services = ?idle, "unsubscribing services the app no longer calls");
            for s in &idle {
                subs.remove(s);
            }
        }
    }
}

/// Resolves once the flag turns true (or its sender is gone).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::{BuildContext, Table, build_service};

    fn shared() -> (Arc<Shared>, Queues) {
        let identity = Identity {
            id: "a".into(),
            service: "agent".into(),
            labels: Default::default(),
            advertise: ([127, 0, 0, 1], 1).into(),
        };
        Shared::new(identity, http::HeaderName::from_static("x-tenant-id"), None, watch::channel(true).1, None)
    }

    /// A table where every subscribed service is known to the control
    /// plane, but those named in `unknown`.
    fn table_of(subs: &HashSet<String>, unknown: &[&str]) -> Table {
        let mut t = Table::default();
        for name in subs {
            let cfg = xds_proto::v1::ServiceConfig {
                name: name.clone(),
                known: !unknown.contains(&name.as_str()),
                ..Default::default()
            };
            t.services.insert(name.clone(), Arc::new(build_service(&cfg, None, BuildContext::at(0)).0));
        }
        t
    }

    #[test]
    fn at_the_cap_an_unknown_service_makes_room_and_known_ones_never_do() {
        let (shared, mut queues) = shared();
        for i in 0.. {
            if shared.subscriptions.lock().unwrap().len() == crate::MAX_SUBSCRIPTIONS {
                break;
            }
            assert!(shared.subscribe(&format!("s{i}")), "room for {i}");
        }
        while queues.subscriptions.try_recv().is_ok() {}
        let subs = shared.subscriptions.lock().unwrap().clone();
        shared.table.store(Arc::new(table_of(&subs, &["s7"])));
        // The one unknown service (a bogus name) makes room for a new one.
        assert!(shared.subscribe("billing"));
        assert!(matches!(queues.subscriptions.try_recv(), Ok(SubscriptionChange::Unsubscribe(v)) if v == ["s7"]));
        assert!(matches!(queues.subscriptions.try_recv(), Ok(SubscriptionChange::Subscribe(s)) if s == "billing"));
        // Every subscription is a service the control plane knows: no room,
        // and nothing is unsubscribed for it.
        let subs = shared.subscriptions.lock().unwrap().clone();
        shared.table.store(Arc::new(table_of(&subs, &[])));
        assert!(!shared.subscribe("ledger"));
        assert!(queues.subscriptions.try_recv().is_err());
        assert_eq!(shared.subscriptions.lock().unwrap().len(), crate::MAX_SUBSCRIPTIONS);
        // Already subscribed: fine at the cap.
        assert!(shared.subscribe("billing"));
    }
}
