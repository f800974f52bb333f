//! `weft-sim`: many simulated sidecars on the discovery stream, to measure
//! the control plane at scale.
//!
//! Opens `--proxies` streams (each a sidecar of its own small service,
//! subscribed to `target`) plus one instance of `target`, then measures:
//! registration (all streams have `target`'s config), control plane RSS per
//! connected proxy, the time from an apply of a `target` route to each
//! stream's update (p50/p99/max), and endpoint churn (the `target` instance
//! goes away → every stream sees it gone). Prints one JSON object.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use xds_proto::v1 as pb;
use xds_proto::v1::admin_client::AdminClient;
use xds_proto::v1::discovery_client::DiscoveryClient;

#[derive(Parser)]
#[command(about = "Simulated sidecars for control plane scale measurements")]
struct Args {
    #[arg(long)]
    control: String,
    #[arg(long)]
    proxies: usize,
    /// Streams per HTTP/2 connection.
    #[arg(long, default_value_t = 100)]
    per_connection: usize,
    /// weft-control's pid, for its RSS.
    #[arg(long)]
    control_pid: Option<u32>,
    /// How long each phase may take.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
}

/// What each simulated sidecar last saw of `target`.
#[derive(Clone, Copy, Default)]
struct Seen {
    route_rev: u64,
    endpoints: usize,
    at: Option<Instant>,
    configured: bool,
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(|l| l.to_string()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn percentiles(mut v: Vec<Duration>) -> serde_json::Value {
    if v.is_empty() {
        return serde_json::json!(null);
    }
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1].as_secs_f64() * 1000.0;
    serde_json::json!({"count": v.len(), "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": at(1.0)})
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let rss_before = a.control_pid.map(rss_kb).unwrap_or(0);
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::new(Mutex::new(vec![Seen::default(); a.proxies]));
    let (changed_tx, changed_rx) = watch::channel(0u64);
    let changed_tx = Arc::new(changed_tx);
    let endpoint = tonic::transport::Endpoint::from_shared(a.control.clone())?;
    let started = Instant::now();

    // The target instance, whose endpoint every simulated sidecar will see.
    let target_channel = endpoint.connect().await?;
    let (target_tx, target_rx) = mpsc::channel::<pb::ProxyMessage>(8);
    target_tx
        .send(msg(pb::proxy_message::Msg::Hello(pb::Hello {
            proxy_id: "sim-target".into(),
            service: "target".into(),
            address: "127.0.0.1:9".into(),
            ready: true,
            ..Default::default()
        })))
        .await?;
    let mut target_updates =
        DiscoveryClient::new(target_channel).stream(ReceiverStream::new(target_rx)).await?.into_inner();
    let target_task = tokio::spawn(async move { while let Ok(Some(_)) = target_updates.message().await {} });

    let mut channel = endpoint.connect().await?;
    for i in 0..a.proxies {
        if i > 0 && i % a.per_connection == 0 {
            channel = endpoint.connect().await?;
        }
        let (seen, changed_tx) = (seen.clone(), changed_tx.clone());
        let mut client = DiscoveryClient::new(channel.clone());
        tokio::spawn(async move {
            let (tx, rx) = mpsc::channel::<pb::ProxyMessage>(8);
            let hello = pb::Hello {
                proxy_id: format!("sim-{i}"),
                service: format!("sim-{}", i / 10),
                address: format!("127.0.0.{}:{}", 2 + (i / 60000) % 200, 1024 + i % 60000),
                ready: true,
                ..Default::default()
            };
            let _ = tx.send(msg(pb::proxy_message::Msg::Hello(hello))).await;
            let _ = tx
                .send(msg(pb::proxy_message::Msg::Subscribe(pb::Subscribe { services: vec!["target".into()] })))
                .await;
            let Ok(resp) = client.stream(ReceiverStream::new(rx)).await else { return };
            let mut updates = resp.into_inner();
            while let Ok(Some(m)) = updates.message().await {
                let Some(pb::control_message::Msg::Update(u)) = m.msg else { continue };
                if let Some(t) = u.services.iter().find(|s| s.name == "target") {
                    let now = Instant::now();
                    let mut all = seen.lock().expect("lock");
                    all[i] = Seen {
                        route_rev: t.routes.iter().map(|r| r.revision).max().unwrap_or(0),
                        endpoints: t.endpoints.len(),
                        at: Some(now),
                        configured: true,
                    };
                    drop(all);
                    changed_tx.send_modify(|v| *v += 1);
                }
                let _ = tx.send(msg(pb::proxy_message::Msg::Ack(pb::Ack { version: u.version }))).await;
            }
        });
    }
    let timeout = Duration::from_secs(a.timeout_secs);
    let connected = wait_all(&seen, changed_rx.clone(), timeout, |s| s.configured && s.endpoints == 1).await;
    let connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await; // let ACK writes settle before RSS
    let rss_after = a.control_pid.map(rss_kb).unwrap_or(0);

    // Apply → every stream has the new route.
    let mut admin = AdminClient::new(endpoint.connect().await?);
    // A timeout no earlier run used, so the apply always changes something.
    let ms = 1000 + std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() % 100_000;
    let route = format!(
        r#"{{"kind":"Route","service":"target","rules":[{{"backends":[{{"subset":{{}},"weight":1}}],"timeout":"{ms}ms"}}]}}"#
    );
    let t0 = Instant::now();
    let rev = admin
        .apply(pb::ApplyRequest {
            resources: vec![pb::ResourceDoc { json: route, origin: "weft-sim".into() }],
            dry_run: false,
        })
        .await?
        .into_inner()
        .revision;
    let apply_call = t0.elapsed();
    wait_all(&seen, changed_rx.clone(), timeout, |s| s.route_rev >= rev).await;
    let apply_lat: Vec<Duration> = seen
        .lock()
        .expect("lock")
        .iter()
        .filter(|s| s.route_rev >= rev)
        .filter_map(|s| s.at.map(|at| at.saturating_duration_since(t0)))
        .collect();

    // Churn: the target instance goes away.
    let t1 = Instant::now();
    let _ = target_tx.send(msg(pb::proxy_message::Msg::Deregister(pb::Deregister {}))).await;
    drop(target_tx);
    target_task.abort();
    wait_all(&seen, changed_rx.clone(), timeout, |s| s.endpoints == 0).await;
    let churn_lat: Vec<Duration> = seen
        .lock()
        .expect("lock")
        .iter()
        .filter(|s| s.endpoints == 0)
        .filter_map(|s| s.at.map(|at| at.saturating_duration_since(t1)))
        .collect();

    let per_proxy_kb =
        if a.proxies > 0 && rss_after > rss_before { (rss_after - rss_before) as f64 / a.proxies as f64 } else { 0.0 };
    println!(
        "{}",
        serde_json::json!({
            "proxies": a.proxies,
            "connected": connected,
            "connect_secs": connect_secs,
            "control_rss_kb_before": rss_before,
            "control_rss_kb_after": rss_after,
            "control_kb_per_proxy": per_proxy_kb,
            "apply_rpc_ms": apply_call.as_secs_f64() * 1000.0,
            "apply_to_ack": percentiles(apply_lat),
            "churn": percentiles(churn_lat),
        })
    );
    std::process::exit(0);
}

fn msg(m: pb::proxy_message::Msg) -> pb::ProxyMessage {
    pb::ProxyMessage { msg: Some(m) }
}

/// Waits until every stream satisfies `done` (or the timeout); returns how
/// many do.
async fn wait_all(
    seen: &Mutex<Vec<Seen>>,
    mut changed: watch::Receiver<u64>,
    timeout: Duration,
    done: impl Fn(&Seen) -> bool,
) -> usize {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let count = seen.lock().expect("lock").iter().filter(|s| done(s)).count();
        if count == seen.lock().expect("lock").len() {
            return count;
        }
        if tokio::time::timeout_at(deadline, changed.changed()).await.is_err() {
            return count;
        }
    }
}
