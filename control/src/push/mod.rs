//! The discovery stream: one session per connected sidecar.
//!
//! A session registers the sidecar's instance in etcd, sends it the state of
//! the services it subscribed to (and only those), and records its ACKs and
//! NACKs in etcd.
//!
//! The records are written under one lease per control-plane replica, kept
//! alive by one stream to etcd: thousands of sidecars cost no lease grants
//! and no keep-alive streams of their own. When a sidecar's stream ends
//! (closed, or its HTTP/2 keep-alive pings go unanswered) the session deletes
//! its records; when the replica dies, its lease expires and takes the
//! records of all its sidecars with it, which reconnect to another replica.

pub mod index;

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::Stream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use xds_proto::v1 as pb;
use xds_proto::v1::discovery_server::Discovery;

use crate::admin::traces::TraceLog;
use crate::push::index::Snapshot;
use crate::store::{EndpointRecord, ProxyRecord, REGISTRATIONS_PER_TXN, Removal, Store};
use weft_policy::names::check_service;

/// Buckets of `weft_control_push_seconds` (from a change to the update
/// handed to a sidecar's stream): tens of microseconds for one service, up
/// to seconds for a full snapshot to a slow stream. A histogram so that
/// control-plane instances can be summed.
pub const PUSH_SECONDS_BUCKETS: &[f64] =
    &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// How many services one sidecar may subscribe to.
pub const MAX_SUBSCRIPTIONS: usize = 1024;

#[derive(Clone)]
pub struct DiscoveryService {
    inner: Arc<Shared>,
}

struct Shared {
    store: Store,
    /// Coalesces ACK/NACK records into batched etcd writes; removals go
    /// through it too, so no record queued earlier outlives its removal.
    /// Bounded: sessions wait when etcd falls behind.
    records: mpsc::Sender<RecordOp>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    replica: String,
    /// This replica's lease; `None` while it is being granted again.
    lease: watch::Receiver<Option<i64>>,
    traces: Arc<TraceLog>,
    /// Sent with every update (`Update.endpoint_hold_ms`).
    endpoint_hold_ms: u64,
    /// Open sessions, and the most this replica takes.
    sessions: std::sync::atomic::AtomicUsize,
    max_sessions: usize,
    /// The CA that issues workload certificates, if any.
    identity: Option<Issuing>,
}

/// How this replica issues workload certificates.
#[derive(Clone)]
pub struct Issuing {
    pub ca: Arc<weft_identity::Ca>,
    /// Their lifetime.
    pub ttl: Duration,
}

/// A sidecar gets at most one certificate per this long (a renewal is due
/// after two thirds of the lifetime): signing costs CPU, and a sidecar that
/// asks in a loop must not take it from the others.
const MIN_ISSUE_GAP: Duration = Duration::from_secs(1);

/// Work for the batched record writer.
enum RecordOp {
    /// Write both records of a newly connected sidecar; the reply is the
    /// revision of the endpoint's write.
    Register(EndpointRecord, ProxyRecord, i64, oneshot::Sender<crate::store::Result<u64>>),
    Save(ProxyRecord, i64),
    /// Delete a sidecar's records unless its endpoint was written after
    /// `endpoint_rev`, and mark it departed.
    Remove(Removal),
}

/// Record operations queued for the writer at most; a session whose
/// operation does not fit waits.
pub const RECORD_QUEUE: usize = 8192;

/// How long a departure marker stays in etcd: long enough for every
/// replica's watch to see it with the removal.
const DEPARTED_TTL: Duration = Duration::from_secs(60);

impl DiscoveryService {
    pub fn new(
        store: Store,
        snapshots: watch::Receiver<Arc<Snapshot>>,
        replica: String,
        lease_ttl: i64,
        traces: Arc<TraceLog>,
        max_sessions: usize,
        identity: Option<Issuing>,
    ) -> Self {
        let (records, rx) = mpsc::channel(RECORD_QUEUE);
        tokio::spawn(write_records(store.clone(), rx));
        let (lease_tx, lease) = watch::channel(None);
        tokio::spawn(crate::store::lease::hold(store.clone(), lease_ttl, lease_tx));
        // Long enough for a replica's sidecars to reach another replica (their
        // backoff tops out at 5 s) or for the replica to take a new lease,
        // and register again.
        let endpoint_hold_ms = (3 * lease_ttl.max(1) as u64 * 1000).max(10_000);
        DiscoveryService {
            inner: Arc::new(Shared {
                store,
                records,
                snapshots,
                replica,
                lease,
                traces,
                endpoint_hold_ms,
                sessions: Default::default(),
                max_sessions,
                identity,
            }),
        }
    }

    /// The replica's lease (`None` while it is being granted).
    pub fn lease(&self) -> watch::Receiver<Option<i64>> {
        self.inner.lease.clone()
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<pb::ControlMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type StreamStream = UpdateStream;

    async fn stream(&self, request: Request<Streaming<pb::ProxyMessage>>) -> Result<Response<UpdateStream>, Status> {
        let role = crate::admin::auth::role(&request);
        if let crate::admin::auth::Role::Tenant(t) = &role {
            return Err(Status::permission_denied(format!("403: token for tenant {t} cannot open a discovery stream")));
        }
        use std::sync::atomic::Ordering;
        if self.inner.sessions.load(Ordering::Relaxed) >= self.inner.max_sessions {
            return Err(Status::resource_exhausted(format!(
                "this control plane replica serves {} sidecars, its --max-sidecars; try another replica",
                self.inner.max_sessions
            )));
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
        check_service("service", &hello.service).map_err(|e| Status::invalid_argument(format!("Hello: {e}")))?;
        crate::admin::auth::may_register(&role, &hello.service, self.inner.identity.is_some())?;
        if hello.proxy_id.is_empty() || hello.proxy_id.contains('/') {
            return Err(Status::invalid_argument("Hello: proxy_id must be non-empty and hold no '/'"));
        }
        // A sidecar id is unique across services: one service's credential
        // must not take over another service's sidecar record. When etcd
        // cannot say, the sidecar is let in (a store outage must not keep
        // sidecars out); its writes wait for etcd anyway.
        if !matches!(role, crate::admin::auth::Role::Admin)
            && let Ok(Some(existing)) =
                tokio::time::timeout(Duration::from_secs(2), self.inner.store.proxy(&hello.proxy_id))
                    .await
                    .unwrap_or(Ok(None))
            && existing.service != hello.service
        {
            return Err(Status::permission_denied(format!(
                "403: sidecar id {} is registered for service {}, not {}",
                hello.proxy_id, existing.service, hello.service
            )));
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
    /// The replica lease the records were written under, once registered.
    lease: Option<i64>,
    /// The revision of this session's last endpoint write.
    endpoint_rev: u64,
    deregistered: bool,
    /// When this session last issued a certificate.
    issued_at: Option<Instant>,
    /// Degraded-call reports this sidecar may still send: one sidecar must
    /// not flood out every other's in the trace log.
    reports: governor::DefaultDirectRateLimiter,
}

/// Degraded-call reports a sidecar may send: this many a second, in bursts
/// of [`REPORT_BURST`]; the rest are dropped and counted.
pub const REPORTS_PER_SECOND: u32 = 100;
pub const REPORT_BURST: u32 = 1000;

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
            endpoint_rev: 0,
            deregistered: false,
            issued_at: None,
            reports: governor::RateLimiter::direct(
                governor::Quota::per_second(std::num::NonZeroU32::new(REPORTS_PER_SECOND).expect("non-zero"))
                    .allow_burst(std::num::NonZeroU32::new(REPORT_BURST).expect("non-zero")),
            ),
        }
    }

    async fn run(mut self, mut inbound: Streaming<pb::ProxyMessage>) {
        self.shared.sessions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        metrics::gauge!("weft_control_proxies").increment(1.0);
        tracing::info!(proxy = %self.hello.proxy_id, service = %self.hello.service, "sidecar connected");
        let mut snapshots = self.shared.snapshots.clone();
        let mut lease = self.shared.lease.clone();
        let mut retry_register = tokio::time::interval(Duration::from_secs(1));
        retry_register.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A sidecar that is told its config is registered too: a session
        // opened while the replica's lease is still being granted (just
        // after start) waits for it, but not for long if etcd is away.
        let _ = tokio::time::timeout(Duration::from_secs(2), lease.wait_for(Option::is_some)).await;
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
                r = lease.changed() => {
                    if r.is_err() {
                        break;
                    }
                    // The replica's lease was granted (the session started
                    // before it was), or lost and granted again: the records
                    // went with the old one.
                    // While there is none, nothing is written under the
                    // lost one.
                    let current = *lease.borrow_and_update();
                    if self.lease != current {
                        self.lease = None;
                        if current.is_some() {
                            self.register().await;
                        }
                    }
                }
            }
        }
        self.unregister().await;
        self.shared.sessions.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        metrics::gauge!("weft_control_proxies").decrement(1.0);
        tracing::info!(proxy = %self.hello.proxy_id, "sidecar disconnected");
    }

    /// Signs the sidecar's certificate for the service of its Hello (which
    /// its credential was checked against), or says why not.
    fn issue(&mut self, csr: &[u8]) -> pb::Certificate {
        let refuse = |error: String| pb::Certificate { error, ..Default::default() };
        let Some(issuing) = self.shared.identity.clone() else {
            return refuse("this control plane has no CA (weft-control --ca-cert/--ca-key)".into());
        };
        if self.issued_at.is_some_and(|t| t.elapsed() < MIN_ISSUE_GAP) {
            metrics::counter!("weft_control_certificates_refused_total", "reason" => "too-soon").increment(1);
            return refuse(format!("at most one certificate per {MIN_ISSUE_GAP:?}"));
        }
        match issuing.ca.issue_workload(csr, &self.hello.service, issuing.ttl) {
            Ok(issued) => {
                self.issued_at = Some(Instant::now());
                metrics::counter!("weft_control_certificates_issued_total").increment(1);
                let identity = weft_identity::SpiffeId::new(issuing.ca.trust_domain(), &self.hello.service).to_string();
                tracing::info!(proxy = %self.hello.proxy_id, %identity, "issued a workload certificate");
                pb::Certificate {
                    chain_pem: issued.chain_pem,
                    not_after_unix_ms: issued.not_after_unix_ms,
                    identity,
                    error: String::new(),
                }
            }
            Err(e) => {
                metrics::counter!("weft_control_certificates_refused_total", "reason" => "invalid").increment(1);
                refuse(e.to_string())
            }
        }
    }

    /// Handles one message; returns newly subscribed services to push.
    async fn handle(&mut self, m: pb::proxy_message::Msg) -> Option<Vec<String>> {
        use pb::proxy_message::Msg;
        match m {
            Msg::Subscribe(s) => {
                let mut new = Vec::new();
                for service in s.services {
                    if self.sent.contains_key(&service) || check_service("service", &service).is_err() {
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
            Msg::Unsubscribe(u) => {
                for service in u.services {
                    if service != self.hello.service {
                        self.sent.remove(&service);
                    }
                }
                self.record.subscriptions = self.sorted_subscriptions();
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
                    if let Some(lease) = self.lease {
                        match self.shared.store.put_endpoint(&self.endpoint_record(), lease).await {
                            Ok(rev) => self.endpoint_rev = rev,
                            Err(e) => tracing::warn!(error = %e, "cannot record readiness"),
                        }
                    }
                }
            }
            Msg::CertificateRequest(r) => {
                let answer = self.issue(&r.csr_der);
                if answer.error.is_empty() {
                    self.record.identity = answer.identity.clone();
                    self.record.cert_not_after_unix_ms = answer.not_after_unix_ms;
                    self.save_record().await;
                }
                let msg = pb::ControlMessage { msg: Some(pb::control_message::Msg::Certificate(answer)) };
                let _ = self.tx.send(Ok(msg)).await;
            }
            Msg::Deregister(_) => {
                self.deregistered = true;
                self.unregister().await;
            }
            Msg::Degraded(d) => {
                if d.dropped > 0 {
                    metrics::counter!("weft_control_degraded_dropped_total").increment(d.dropped);
                }
                let mut calls = d.calls;
                let allowed = calls.iter().take_while(|_| self.reports.check().is_ok()).count();
                if allowed < calls.len() {
                    metrics::counter!("weft_control_degraded_dropped_total").increment((calls.len() - allowed) as u64);
                    calls.truncate(allowed);
                }
                metrics::counter!("weft_control_degraded_reports_total").increment(calls.len() as u64);
                self.shared.traces.record(calls);
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
            msg: Some(pb::control_message::Msg::Update(pb::Update {
                version: snap.revision,
                services,
                endpoint_hold_ms: self.shared.endpoint_hold_ms,
            })),
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
            mtls: self.hello.mtls,
        }
    }

    async fn register(&mut self) {
        if self.deregistered {
            return;
        }
        let Some(lease) = *self.shared.lease.borrow() else { return };
        self.record.subscriptions = self.sorted_subscriptions();
        // Through the batched writer: thousands of sidecars connecting at
        // once (a replica restart) become a few hundred transactions.
        let (done, written) = oneshot::channel();
        let op = RecordOp::Register(self.endpoint_record(), self.record.clone(), lease, done);
        if self.shared.records.send(op).await.is_err() {
            return;
        }
        match written.await {
            Ok(Ok(rev)) => {
                self.endpoint_rev = rev;
                self.lease = Some(lease);
            }
            Ok(Err(e)) => tracing::warn!(proxy = %self.hello.proxy_id, error = %e, "cannot register; will retry"),
            Err(_) => tracing::warn!(proxy = %self.hello.proxy_id, "record writer gone; will retry"),
        }
    }

    /// Queues the record for the batched writer: with thousands of sidecars
    /// ACKing one update, one put each would crowd etcd.
    async fn save_record(&self) {
        if let Some(lease) = self.lease {
            let _ = self.shared.records.send(RecordOp::Save(self.record.clone(), lease)).await;
        }
    }

    /// Removes the instance's records (through the writer, after any record
    /// it still has queued).
    async fn unregister(&mut self) {
        if let Some(lease) = self.lease.take() {
            let removal = Removal {
                service: self.hello.service.clone(),
                proxy_id: self.hello.proxy_id.clone(),
                endpoint_rev: self.endpoint_rev,
                lease,
            };
            let _ = self.shared.records.send(RecordOp::Remove(removal)).await;
        }
    }
}

/// Writes what was queued in the last 20 ms (or while the previous batch
/// was written): registrations, [`REGISTRATIONS_PER_TXN`] per transaction;
/// then the latest proxy record of each sidecar, 128 per transaction; then
/// removals, 32 per transaction. Departure markers are deleted once they are
/// [`DEPARTED_TTL`] old.
async fn write_records(store: Store, mut rx: mpsc::Receiver<RecordOp>) {
    let mut markers: std::collections::VecDeque<(Instant, String, String)> = Default::default();
    let mut sweep = tokio::time::interval(Duration::from_secs(10));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            op = rx.recv() => match op {
                Some(op) => op,
                None => return,
            },
            _ = sweep.tick() => {
                forget_old_markers(&store, &mut markers).await;
                continue;
            }
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut registrations = Vec::new();
        let mut replies = Vec::new();
        let mut latest: HashMap<String, (ProxyRecord, i64)> = HashMap::new();
        let mut removals = Vec::new();
        let mut op = Some(first);
        while let Some(o) = op.take().or_else(|| rx.try_recv().ok()) {
            match o {
                RecordOp::Register(ep, proxy, lease, done) => {
                    registrations.push((ep, proxy, lease));
                    replies.push(done);
                }
                RecordOp::Save(rec, lease) => {
                    latest.insert(rec.proxy_id.clone(), (rec, lease));
                }
                RecordOp::Remove(removal) => {
                    latest.remove(&removal.proxy_id);
                    removals.push(removal);
                }
            }
        }
        let mut replies = replies.into_iter();
        for chunk in registrations.chunks(REGISTRATIONS_PER_TXN) {
            for result in store.register_many(chunk).await {
                if let Some(done) = replies.next() {
                    let _ = done.send(result);
                }
            }
        }
        let batch: Vec<(ProxyRecord, i64)> = latest.into_values().collect();
        for chunk in batch.chunks(128) {
            if let Err(e) = store.put_proxies(chunk).await {
                tracing::warn!(error = %e, "cannot record proxy status");
            }
        }
        for chunk in removals.chunks(32) {
            match store.remove_many(chunk).await {
                Ok(()) => {
                    let now = Instant::now();
                    markers.extend(chunk.iter().map(|r| (now, r.service.clone(), r.proxy_id.clone())));
                }
                Err(e) => tracing::warn!(error = %e, "cannot remove sidecar records; they go with the replica lease"),
            }
        }
    }
}

async fn forget_old_markers(store: &Store, markers: &mut std::collections::VecDeque<(Instant, String, String)>) {
    let old: Vec<(String, String)> = std::iter::from_fn(|| {
        if markers.front().is_some_and(|(at, _, _)| at.elapsed() >= DEPARTED_TTL) {
            markers.pop_front().map(|(_, s, p)| (s, p))
        } else {
            None
        }
    })
    .collect();
    if !old.is_empty()
        && let Err(e) = store.forget_departed(&old).await
    {
        tracing::debug!(error = %e, "departure markers not deleted; they go with the replica lease");
    }
}
