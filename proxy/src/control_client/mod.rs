//! The discovery client: one stream to a control plane replica at a time.
//!
//! It says Hello, subscribes to its own service and to every service the app
//! has called, applies each update into a new [`Table`] and ACKs or NACKs it.
//! When the stream breaks, the last table stays in force (static stability)
//! and the client reconnects with backoff, trying each `--control` URL in turn.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use xds_proto::v1 as pb;
use xds_proto::v1::discovery_client::DiscoveryClient;

use crate::clock::now_ms;
use crate::config::{BuildContext, Table, build_service};
use crate::state::{Shared, SubscriptionChange};

/// Applies one update to the current table. Returns the new table and the
/// problems (one per rejected resource).
pub(crate) fn apply_update(current: &Table, update: &pb::Update, ctx: BuildContext) -> (Table, Vec<pb::ResourceError>) {
    let mut services = current.services.clone();
    let mut errors = Vec::new();
    for cfg in &update.services {
        let previous = current.services.get(&cfg.name).map(|s| s.as_ref());
        let (service, problems) = build_service(cfg, previous, ctx);
        errors.extend(problems.into_iter().map(|p| pb::ResourceError { resource: p.resource, message: p.message }));
        services.insert(cfg.name.clone(), Arc::new(service));
    }
    (Table { version: update.version, services }, errors)
}

/// Drops held endpoints whose hold ran out by `ctx.now_ms`: the services
/// holding them are rebuilt from the config they were built from. `None`
/// when nothing ran out.
pub(crate) fn expire_holds(current: &Table, ctx: BuildContext) -> Option<Table> {
    let mut services = current.services.clone();
    let mut changed = false;
    for (name, svc) in &current.services {
        if svc.next_hold_expiry().is_some_and(|t| t <= ctx.now_ms) {
            let (rebuilt, _) = build_service(&svc.source, Some(svc), ctx);
            services.insert(name.clone(), Arc::new(rebuilt));
            changed = true;
        }
    }
    changed.then(|| Table { version: current.version, services })
}

/// The earliest hold that runs out in `table`.
fn next_expiry(table: &Table) -> Option<u64> {
    table.services.values().filter_map(|s| s.next_hold_expiry()).min()
}

/// Runs until `stop` turns true; then deregisters if connected.
pub(crate) async fn run(
    shared: Arc<Shared>,
    controls: Vec<String>,
    mut subscription_rx: mpsc::Receiver<SubscriptionChange>,
    mut reports_rx: mpsc::Receiver<pb::DegradedCall>,
    mut stop: watch::Receiver<bool>,
) {
    // 100 ms doubling to 2.5 s, each plus up to as much again in jitter
    // (at most 5 s); back to 100 ms after a stream that worked.
    let delays = || {
        use backon::BackoffBuilder;
        backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_millis(2500))
            .with_jitter()
            .without_max_times()
            .build()
    };
    let mut backoff = delays();
    let mut attempt = 0usize;
    loop {
        if *stop.borrow() {
            return;
        }
        let url = &controls[attempt % controls.len()];
        attempt += 1;
        match session(&shared, url, &mut subscription_rx, &mut reports_rx, &mut stop).await {
            Ok(Ended::Stopped) => return,
            Ok(Ended::Lost) => {
                backoff = delays();
                tracing::warn!(control = %url, "discovery stream ended; keeping the last config and reconnecting");
            }
            Err(e) => tracing::warn!(control = %url, error = %e, "discovery stream failed; keeping the last config"),
        }
        shared.control_connected.store(false, Ordering::Relaxed);
        let delay = backoff.next().unwrap_or(Duration::from_secs(5));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = crate::state::stopped(&mut stop) => return,
        }
    }
}

enum Ended {
    Stopped,
    Lost,
}

fn message(msg: pb::proxy_message::Msg) -> pb::ProxyMessage {
    pb::ProxyMessage { msg: Some(msg) }
}

/// An open discovery stream: what to send on, what comes back.
struct Stream {
    tx: mpsc::Sender<pb::ProxyMessage>,
    inbound: tonic::Streaming<pb::ControlMessage>,
}

/// Connects to `url`, says Hello (with the app's readiness as of now) and
/// subscribes again to every service subscribed so far.
async fn open(shared: &Shared, url: &str, ready: bool) -> anyhow::Result<Stream> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    if let Some(w) = &shared.workload {
        let roots = tonic::transport::Certificate::from_pem(&w.bundle_pem);
        endpoint = endpoint.tls_config(tonic::transport::ClientTlsConfig::new().ca_certificate(roots))?;
    }
    let channel = endpoint.connect().await?;
    let bearer: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> = match &shared.token {
        Some(t) => Some(format!("Bearer {t}").parse()?),
        None => None,
    };
    let mut client = DiscoveryClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        if let Some(v) = &bearer {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    });
    let (tx, rx) = mpsc::channel::<pb::ProxyMessage>(64);
    tx.send(message(pb::proxy_message::Msg::Hello(pb::Hello {
        proxy_id: shared.identity.id.clone(),
        service: shared.identity.service.clone(),
        labels: shared.identity.labels.clone().into_iter().collect(),
        address: shared.identity.advertise.to_string(),
        ready,
        mtls: shared.workload.is_some(),
    })))
    .await?;
    let subs: Vec<String> = shared.subscriptions.lock().expect("lock").iter().cloned().collect();
    if !subs.is_empty() {
        tx.send(message(pb::proxy_message::Msg::Subscribe(pb::Subscribe { services: subs }))).await?;
    }
    let inbound = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    Ok(Stream { tx, inbound })
}

async fn session(
    shared: &Arc<Shared>,
    url: &str,
    subscription_rx: &mut mpsc::Receiver<SubscriptionChange>,
    reports_rx: &mut mpsc::Receiver<pb::DegradedCall>,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<Ended> {
    let mut ready_rx = shared.app_ready.clone();
    let mut ready = shared.ready_to_serve(*ready_rx.borrow_and_update());
    let Stream { tx, mut inbound } = open(shared, url, ready).await?;
    shared.control_connected.store(true, Ordering::Relaxed);
    tracing::info!(control = %url, "discovery stream open");
    // What this control plane lists may lack instances that have not
    // registered with it yet: endpoints it omits are held at least this long.
    let stream_started = now_ms();
    // The key of the certificate asked for, until the answer comes.
    let mut pending: Option<weft_identity::workload::Key> = None;
    let mut renew_at = shared.workload.as_ref().map(|w| tokio::time::Instant::now() + w.renew_in());
    loop {
        let expiry = next_expiry(&shared.table.load());
        let expiry_at = expiry.map(|t| tokio::time::Instant::now() + Duration::from_millis(t.saturating_sub(now_ms())));
        tokio::select! {
            msg = inbound.message() => match msg? {
                None => return Ok(Ended::Lost),
                Some(pb::ControlMessage { msg: Some(pb::control_message::Msg::Certificate(answer)) }) => {
                    if let (Some(w), Some(key)) = (&shared.workload, pending.take()) {
                        renew_at = Some(tokio::time::Instant::now() + match w.install(&shared.identity.service, key, &answer) {
                            Ok(()) => w.renew_in(),
                            Err(e) => {
                                tracing::warn!(error = %e, "no new workload certificate; asking again in 5s");
                                Duration::from_secs(5)
                            }
                        });
                        // The first certificate may make the instance ready.
                        let now_ready = shared.ready_to_serve(*ready_rx.borrow());
                        if now_ready != ready {
                            ready = now_ready;
                            tx.send(message(pb::proxy_message::Msg::Readiness(pb::Readiness { ready }))).await?;
                        }
                    }
                }
                Some(pb::ControlMessage { msg: Some(pb::control_message::Msg::Update(update)) }) => {
                    if update.endpoint_hold_ms > 0 {
                        shared.endpoint_hold_ms.store(update.endpoint_hold_ms, Ordering::Relaxed);
                    }
                    let reply = apply(shared, &update, build_context(shared, stream_started));
                    tx.send(message(reply)).await?;
                }
                Some(_) => {}
            },
            _ = async { tokio::time::sleep_until(renew_at.expect("guarded")).await }, if renew_at.is_some() && pending.is_none() => {
                match crate::workload::Workload::request(&shared.identity.service) {
                    Ok((key, request)) => {
                        pending = Some(key);
                        tx.send(message(pb::proxy_message::Msg::CertificateRequest(request))).await?;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot make a key and signing request; trying again in 5s");
                        renew_at = Some(tokio::time::Instant::now() + Duration::from_secs(5));
                    }
                }
            }
            // Holds run out only while connected: a sidecar that cannot reach
            // the control plane cannot confirm anything gone.
            _ = async { tokio::time::sleep_until(expiry_at.expect("guarded")).await }, if expiry_at.is_some() => {
                drop_expired_holds(shared, build_context(shared, stream_started));
            }
            Some(change) = subscription_rx.recv() => {
                // In order: a service may be unsubscribed and subscribed again.
                let mut changes = vec![change];
                while let Ok(c) = subscription_rx.try_recv() {
                    changes.push(c);
                }
                for msg in subscription_messages(shared, changes) {
                    tx.send(message(msg)).await?;
                }
            }
            Some(first) = reports_rx.recv() => tx.send(message(reports(shared, first, reports_rx))).await?,
            changed = ready_rx.changed() => {
                if changed.is_ok() {
                    ready = shared.ready_to_serve(*ready_rx.borrow_and_update());
                    tx.send(message(pb::proxy_message::Msg::Readiness(pb::Readiness { ready }))).await?;
                }
            }
            _ = crate::state::stopped(stop) => {
                let _ = tx.send(message(pb::proxy_message::Msg::Deregister(pb::Deregister {}))).await;
                // Give the control plane a moment to act on it before the stream closes.
                let _ = tokio::time::timeout(Duration::from_secs(2), inbound.message()).await;
                return Ok(Ended::Stopped);
            }
        }
    }
}

/// Drops the held endpoints whose hold ran out.
fn drop_expired_holds(shared: &Shared, ctx: BuildContext) {
    if let Some(table) = expire_holds(&shared.table.load(), ctx) {
        tracing::info!("held endpoints that did not come back are dropped");
        shared.table.store(Arc::new(table));
        shared.table_changed.send_replace(shared.table.load().version);
    }
}

/// One batch of degraded-call reports: `first` and what else is queued (at
/// most 256), with the count of reports dropped since the last batch. The
/// request path never waits on this.
fn reports(
    shared: &Shared,
    first: pb::DegradedCall,
    reports_rx: &mut mpsc::Receiver<pb::DegradedCall>,
) -> pb::proxy_message::Msg {
    let mut calls = vec![first];
    while calls.len() < 256 {
        match reports_rx.try_recv() {
            Ok(c) => calls.push(c),
            Err(_) => break,
        }
    }
    let dropped = shared.reports_dropped.swap(0, Ordering::Relaxed);
    pb::proxy_message::Msg::Degraded(pb::DegradedReports { calls, dropped })
}

/// Turns queued subscription changes into stream messages (consecutive
/// changes of one kind in one message); unsubscribed services leave the
/// table.
fn subscription_messages(shared: &Shared, changes: Vec<SubscriptionChange>) -> Vec<pb::proxy_message::Msg> {
    use pb::proxy_message::Msg;
    let mut out: Vec<Msg> = Vec::new();
    let mut gone: HashSet<String> = HashSet::new();
    for change in changes {
        match (change, out.last_mut()) {
            (SubscriptionChange::Subscribe(s), Some(Msg::Subscribe(m))) => m.services.push(s),
            (SubscriptionChange::Subscribe(s), _) => out.push(Msg::Subscribe(pb::Subscribe { services: vec![s] })),
            (SubscriptionChange::Unsubscribe(v), last) => {
                gone.extend(v.iter().cloned());
                match last {
                    Some(Msg::Unsubscribe(m)) => m.services.extend(v),
                    _ => out.push(Msg::Unsubscribe(pb::Unsubscribe { services: v })),
                }
            }
        }
    }
    // A service subscribed again after its unsubscription stays in the table.
    let subs = shared.subscriptions.lock().expect("lock");
    gone.retain(|s| !subs.contains(s));
    drop(subs);
    if !gone.is_empty() {
        let current = shared.table.load();
        let mut table = Table { version: current.version, services: current.services.clone() };
        table.services.retain(|name, _| !gone.contains(name));
        shared.table.store(Arc::new(table));
    }
    out
}

fn build_context(shared: &Shared, stream_started: u64) -> BuildContext {
    let hold_ms = shared.endpoint_hold_ms.load(Ordering::Relaxed);
    BuildContext { now_ms: now_ms(), hold_ms, hold_floor_ms: stream_started + hold_ms }
}

fn apply(shared: &Shared, update: &pb::Update, ctx: BuildContext) -> pb::proxy_message::Msg {
    let current = shared.table.load();
    let (table, errors) = apply_update(&current, update, ctx);
    crate::telemetry::set_configured_tenants(
        table.services.values().flat_map(|s| s.tenants.keys().chain(s.tenant_routes.keys())).map(String::as_str),
    );
    shared.table.store(Arc::new(table));
    shared.config_received.store(true, Ordering::Relaxed);
    metrics::gauge!("weft_config_version").set(update.version as f64);
    shared.table_changed.send_replace(update.version);
    if errors.is_empty() {
        tracing::debug!(version = update.version, services = update.services.len(), "applied update");
        pb::proxy_message::Msg::Ack(pb::Ack { version: update.version })
    } else {
        for e in &errors {
            tracing::warn!(version = update.version, resource = %e.resource, reason = %e.message, "rejected resource; keeping its last good version");
        }
        *shared.last_nack.lock().expect("lock") = Some(format!(
            "version {}: {}",
            update.version,
            errors.iter().map(|e| format!("{}: {}", e.resource, e.message)).collect::<Vec<_>>().join("; ")
        ));
        pb::proxy_message::Msg::Nack(pb::Nack { version: update.version, errors })
    }
}
