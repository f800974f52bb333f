//! The discovery stream: one session per connected sidecar.
//!
//! A session registers the sidecar's instance under an etcd lease kept alive
//! for as long as the stream lives, sends it the state of the services it
//! subscribed to (and only those), and records its ACKs and NACKs in etcd.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use xds_proto::v1 as pb;
use xds_proto::v1::discovery_server::Discovery;

use crate::index::Snapshot;
use crate::policy::check_name;
use crate::store::{EndpointRecord, ProxyRecord, Store};
use crate::traces::TraceLog;

/// How many services one sidecar may subscribe to.
pub const MAX_SUBSCRIPTIONS: usize = 1024;

#[derive(Clone)]
pub struct DiscoveryService {
    inner: Arc<Shared>,
}

struct Shared {
    store: Store,
    /// Coalesces ACK/NACK records into batched etcd writes.
    records: mpsc::UnboundedSender<(ProxyRecord, i64)>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    replica: String,
    lease_ttl: i64,
    traces: Arc<TraceLog>,
}

impl DiscoveryService {
    pub fn new(
        store: Store,
        snapshots: watch::Receiver<Arc<Snapshot>>,
        replica: String,
        lease_ttl: i64,
        traces: Arc<TraceLog>,
    ) -> Self {
        let (records, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_records(store.clone(), rx));
        DiscoveryService { inner: Arc::new(Shared { store, records, snapshots, replica, lease_ttl, traces }) }
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<pb::ControlMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type StreamStream = UpdateStream;

    async fn stream(&self, request: Request<Streaming<pb::ProxyMessage>>) -> Result<Response<UpdateStream>, Status> {
        if let crate::auth::Role::Tenant(t) = crate::auth::role(&request) {
            return Err(Status::permission_denied(format!("403: token for tenant {t} cannot open a discovery stream")));
        }
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await {
            Ok(Ok(Some(pb::ProxyMessage { msg: Some(pb::proxy_message::Msg::Hello(h)) }))) => h,
            Ok(Ok(_)) => {
                return Err(Status::invalid_argument("the first message on the stream must be Hello"));
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Status::deadline_exceeded("no Hello within 10s")),
        };
        check_name("service", &hello.service).map_err(|e| Status::invalid_argument(format!("Hello: {e}")))?;
        if hello.proxy_id.is_empty() || hello.proxy_id.contains('/') {
            return Err(Status::invalid_argument("Hello: proxy_id must be non-empty and hold no '/'"));
        }
        if hello.address.parse::<std::net::SocketAddr>().is_err() {
            return Err(Status::invalid_argument(format!(
                "Hello: address '{}' is not host:port (an IP address and a port)",
                hello.address
            )));
        }
        let (tx, rx) = mpsc::channel(16);
        let session = Session::new(self.inner.clone(), hello, tx);
        tokio::spawn(session.run(inbound));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Session {
    shared: Arc<Shared>,
    hello: pb::Hello,
    tx: mpsc::Sender<Result<pb::ControlMessage, Status>>,
    ready: bool,
    /// What was last sent per subscribed service; `None` = sent as unknown.
    sent: HashMap<String, Option<Arc<pb::ServiceConfig>>>,
    record: ProxyRecord,
    lease: Option<i64>,
    keepalive: Option<tokio::task::JoinHandle<()>>,
    deregistered: bool,
}

impl Session {
    fn new(shared: Arc<Shared>, hello: pb::Hello, tx: mpsc::Sender<Result<pb::ControlMessage, Status>>) -> Self {
        let record = ProxyRecord {
            schema: 1,
            proxy_id: hello.proxy_id.clone(),
            service: hello.service.clone(),
            address: hello.address.clone(),
            control_replica: shared.replica.clone(),
            ..Default::default()
        };
        let mut sent = HashMap::new();
        sent.insert(hello.service.clone(), None);
        Session {
            ready: hello.ready,
            shared,
            hello,
            tx,
            sent,
            record,
            lease: None,
            keepalive: None,
            deregistered: false,
        }
    }

    async fn run(mut self, mut inbound: Streaming<pb::ProxyMessage>) {
        metrics::gauge!("weft_control_proxies").increment(1.0);
        tracing::info!(proxy = %self.hello.proxy_id, service = %self.hello.service, "sidecar connected");
        let mut snapshots = self.shared.snapshots.clone();
        let mut retry_register = tokio::time::interval(Duration::from_secs(1));
        retry_register.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.register().await;
        // The sidecar's own service is always subscribed; push it at once.
        let mut force: Vec<String> = vec![self.hello.service.clone()];
        let mut changed = true;
        loop {
            if !force.is_empty() || changed {
                changed = false;
                let snap = snapshots.borrow_and_update().clone();
                if self.push(&snap, std::mem::take(&mut force)).await.is_err() {
                    break;
                }
            }
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(pb::ProxyMessage { msg: Some(m) })) => {
                        if let Some(new) = self.handle(m).await {
                            force = new;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                },
                r = snapshots.changed() => match r {
                    Ok(()) => changed = true,
                    Err(_) => break,
                },
                _ = retry_register.tick(), if self.lease.is_none() && !self.deregistered => self.register().await,
                _ = wait_finished(&mut self.keepalive), if self.keepalive.is_some() => {
                    tracing::warn!(proxy = %self.hello.proxy_id, "lease keep-alive stopped; registering again");
                    self.keepalive = None;
                    self.lease = None;
                }
            }
        }
        self.unregister().await;
        metrics::gauge!("weft_control_proxies").decrement(1.0);
        tracing::info!(proxy = %self.hello.proxy_id, "sidecar disconnected");
    }

    /// Handles one message; returns newly subscribed services to push.
    async fn handle(&mut self, m: pb::proxy_message::Msg) -> Option<Vec<String>> {
        use pb::proxy_message::Msg;
        match m {
            Msg::Subscribe(s) => {
                let mut new = Vec::new();
                for service in s.services {
                    if self.sent.contains_key(&service) || check_name("service", &service).is_err() {
                        continue;
                    }
                    if self.sent.len() >= MAX_SUBSCRIPTIONS {
                        tracing::warn!(proxy = %self.hello.proxy_id, "subscription limit reached");
                        break;
                    }
                    self.sent.insert(service.clone(), None);
                    new.push(service);
                }
                self.record.subscriptions = self.sorted_subscriptions();
                return Some(new);
            }
            Msg::Ack(a) => {
                self.record.acked_version = self.record.acked_version.max(a.version);
                self.save_record().await;
            }
            Msg::Nack(n) => {
                metrics::counter!("weft_control_nacks_total").increment(1);
                let reasons: Vec<String> = n.errors.iter().map(|e| format!("{}: {}", e.resource, e.message)).collect();
                tracing::warn!(proxy = %self.hello.proxy_id, version = n.version, reasons = ?reasons, "update NACKed");
                self.record.nacked_version = n.version;
                self.record.last_nack = reasons.join("; ");
                self.save_record().await;
            }
            Msg::Readiness(r) => {
                if r.ready != self.ready {
                    self.ready = r.ready;
                    if let Some(lease) = self.lease
                        && let Err(e) = self.shared.store.put_endpoint(&self.endpoint_record(), lease).await
                    {
                        tracing::warn!(error = %e, "cannot record readiness");
                    }
                }
            }
            Msg::Deregister(_) => {
                self.deregistered = true;
                self.unregister().await;
            }
            Msg::Degraded(d) => {
                if d.dropped > 0 {
                    metrics::counter!("weft_control_degraded_dropped_total").increment(d.dropped);
                }
                metrics::counter!("weft_control_degraded_reports_total").increment(d.calls.len() as u64);
                self.shared.traces.record(d.calls);
            }
            Msg::Hello(_) => {}
        }
        None
    }

    fn sorted_subscriptions(&self) -> Vec<String> {
        let mut s: Vec<String> = self.sent.keys().cloned().collect();
        s.sort();
        s
    }

    /// Sends the services whose config differs from what this sidecar has.
    async fn push(&mut self, snap: &Snapshot, force: Vec<String>) -> Result<(), ()> {
        let started = Instant::now();
        let mut services = Vec::new();
        for (name, sent) in self.sent.iter_mut() {
            let current = snap.service(name);
            let same = match (current, &*sent) {
                (Some(cur), Some(old)) => Arc::ptr_eq(cur, old),
                (None, None) => !force.contains(name),
                _ => false,
            };
            if same {
                continue;
            }
            match current {
                Some(cur) => {
                    services.push((**cur).clone());
                    *sent = Some(cur.clone());
                }
                None => {
                    services.push(pb::ServiceConfig { name: name.clone(), known: false, ..Default::default() });
                    *sent = None;
                }
            }
        }
        if services.is_empty() {
            return Ok(());
        }
        let msg = pb::ControlMessage {
            msg: Some(pb::control_message::Msg::Update(pb::Update { version: snap.revision, services })),
        };
        let r = self.tx.send(Ok(msg)).await.map_err(|_| ());
        metrics::histogram!("weft_control_push_seconds").record(started.elapsed().as_secs_f64());
        r
    }

    fn endpoint_record(&self) -> EndpointRecord {
        EndpointRecord {
            schema: 1,
            proxy_id: self.hello.proxy_id.clone(),
            service: self.hello.service.clone(),
            address: self.hello.address.clone(),
            labels: self.hello.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<BTreeMap<_, _>>(),
            ready: self.ready,
        }
    }

    async fn register(&mut self) {
        if self.deregistered {
            return;
        }
        let store = &self.shared.store;
        let lease = match store.grant_lease(self.shared.lease_ttl).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(proxy = %self.hello.proxy_id, error = %e, "cannot register; will retry");
                return;
            }
        };
        self.record.subscriptions = self.sorted_subscriptions();
        let put = async {
            store.put_endpoint(&self.endpoint_record(), lease).await?;
            store.put_proxy(&self.record, lease).await
        };
        if let Err(e) = put.await {
            tracing::warn!(proxy = %self.hello.proxy_id, error = %e, "cannot register; will retry");
            let _ = store.revoke_lease(lease).await;
            return;
        }
        let ka_store = store.clone();
        let ttl = self.shared.lease_ttl;
        self.keepalive = Some(tokio::spawn(async move {
            if let Err(e) = ka_store.keep_alive(lease, ttl).await {
                tracing::warn!(error = %e, lease, "lease keep-alive failed");
            }
        }));
        self.lease = Some(lease);
    }

    /// Queues the record for the batched writer: with thousands of sidecars
    /// ACKing one update, one put each would crowd etcd.
    async fn save_record(&mut self) {
        if let Some(lease) = self.lease {
            let _ = self.shared.records.send((self.record.clone(), lease));
        }
    }

    /// Removes the instance now (both its keys go with the lease).
    async fn unregister(&mut self) {
        if let Some(ka) = self.keepalive.take() {
            ka.abort();
        }
        if let Some(lease) = self.lease.take()
            && let Err(e) = self.shared.store.revoke_lease(lease).await
        {
            tracing::warn!(error = %e, lease, "cannot revoke lease; the endpoint goes at lease expiry");
        }
    }
}

/// Writes queued proxy records every 50 ms, the latest per proxy, up to 128
/// per transaction.
async fn write_records(store: Store, mut rx: mpsc::UnboundedReceiver<(ProxyRecord, i64)>) {
    while let Some(first) = rx.recv().await {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut latest: HashMap<String, (ProxyRecord, i64)> = HashMap::new();
        latest.insert(first.0.proxy_id.clone(), first);
        while let Ok(r) = rx.try_recv() {
            latest.insert(r.0.proxy_id.clone(), r);
        }
        let batch: Vec<(ProxyRecord, i64)> = latest.into_values().collect();
        for chunk in batch.chunks(128) {
            if let Err(e) = store.put_proxies(chunk).await {
                tracing::warn!(error = %e, "cannot record proxy status");
            }
        }
    }
}

async fn wait_finished(handle: &mut Option<tokio::task::JoinHandle<()>>) {
    match handle {
        Some(h) => {
            let _ = h.await;
        }
        None => std::future::pending().await,
    }
}
