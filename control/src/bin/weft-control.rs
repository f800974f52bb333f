//! `weft-control`: the control plane server.

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;
use weft_control::server::{self, Config};
use weft_control::store::Store;

#[derive(Parser, Debug)]
#[command(name = "weft-control", version, about = "weft control plane: etcd-backed policy, pushed to sidecars")]
struct Args {
    /// etcd endpoints, comma-separated.
    #[arg(long, env = "WEFT_ETCD", default_value = "http://127.0.0.1:2379", value_delimiter = ',')]
    etcd: Vec<String>,
    /// gRPC address for sidecars and weftctl (default: 0.0.0.0:7070 with
    /// --tokens, else 127.0.0.1:7070, since the API is then open).
    #[arg(long, env = "WEFT_LISTEN")]
    listen: Option<String>,
    /// Bearer tokens file: a YAML map of token to role (admin, proxy or
    /// tenant:<name>).
    #[arg(long, env = "WEFT_TOKENS")]
    tokens: Option<String>,
    /// HTTP admin address (/live, /ready, /metrics).
    #[arg(long, env = "WEFT_ADMIN", default_value = "0.0.0.0:7071")]
    admin: String,
    /// etcd key prefix.
    #[arg(long, env = "WEFT_PREFIX", default_value = "/weft")]
    prefix: String,
    /// TTL in seconds of the lease that holds each sidecar's endpoint.
    #[arg(long, env = "WEFT_LEASE_TTL", default_value_t = 10)]
    lease_ttl: i64,
    /// Name of this replica (default: hostname-pid).
    #[arg(long, env = "WEFT_REPLICA")]
    replica: Option<String>,
    /// Sidecar streams this replica takes at most; more are refused
    /// (RESOURCE_EXHAUSTED) and try another replica.
    #[arg(long, env = "WEFT_MAX_SIDECARS", default_value_t = 50_000)]
    max_sidecars: usize,
    /// The CA certificate (PEM: a root, or an intermediate then its chain)
    /// that signs workload certificates; with it, gRPC is served over TLS.
    /// `weftctl ca init` makes one for a quick start.
    #[arg(long, env = "WEFT_CA_CERT", requires = "ca_key")]
    ca_cert: Option<String>,
    /// The CA's private key (PEM).
    #[arg(long, env = "WEFT_CA_KEY", requires = "ca_cert")]
    ca_key: Option<String>,
    /// The trust domain of workload identities (spiffe://<it>/svc/<service>).
    #[arg(long, env = "WEFT_TRUST_DOMAIN", default_value = "weft.local")]
    trust_domain: String,
    /// Lifetime of the certificates the CA issues (sidecars renew at 2/3).
    #[arg(long, env = "WEFT_CERT_TTL", default_value = "24h")]
    cert_ttl: String,
    /// Names (DNS or IP) in this replica's server certificate, comma-separated
    /// (default: localhost, 127.0.0.1, the hostname).
    #[arg(long, env = "WEFT_SERVER_NAMES", value_delimiter = ',')]
    server_names: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    anyhow::ensure!(args.lease_ttl >= 1, "--lease-ttl must be at least 1 second");
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("weft_control_push_seconds".into()),
            weft_control::push::PUSH_SECONDS_BUCKETS,
        )
        .context("setting the push duration buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    let tokens = match &args.tokens {
        Some(path) => {
            Some(std::sync::Arc::new(weft_control::admin::auth::Tokens::load(path).map_err(anyhow::Error::msg)?))
        }
        None => None,
    };
    let listen = args
        .listen
        .clone()
        .unwrap_or_else(|| if tokens.is_some() { "0.0.0.0:7070".into() } else { "127.0.0.1:7070".into() });
    if tokens.is_some() && args.ca_cert.is_none() {
        tracing::warn!(
            "no CA: bearer tokens are accepted only from loopback (they would cross the network in the clear)"
        );
    }
    if tokens.is_none()
        && !listen.starts_with("127.")
        && !listen.starts_with("[::1]")
        && !listen.starts_with("localhost")
    {
        tracing::warn!(%listen, "the API is open to anyone who can reach it: no --tokens file");
    }
    let identity = match (&args.ca_cert, &args.ca_key) {
        (Some(cert), Some(key)) => {
            let read = |flag: &str, path: &str| {
                std::fs::read_to_string(path).with_context(|| format!("{flag} {path}: cannot read it"))
            };
            let ca = weft_identity::Ca::load(&read("--ca-cert", cert)?, &read("--ca-key", key)?, &args.trust_domain)
                .with_context(|| format!("--ca-cert {cert} / --ca-key {key}"))?;
            let cert_ttl = humantime::parse_duration(&args.cert_ttl)
                .map_err(|e| anyhow::anyhow!("--cert-ttl {}: {e}", args.cert_ttl))?;
            anyhow::ensure!(cert_ttl >= std::time::Duration::from_secs(3), "--cert-ttl must be at least 3s");
            let server_names = if args.server_names.is_empty() {
                vec!["localhost".into(), "127.0.0.1".into(), hostname()]
            } else {
                args.server_names.clone()
            };
            Some(server::Identity { ca: std::sync::Arc::new(ca), cert_ttl, server_names })
        }
        _ => None,
    };
    let grpc = TcpListener::bind(&listen).await.with_context(|| format!("binding --listen {listen}"))?;
    let admin = TcpListener::bind(&args.admin).await.with_context(|| format!("binding --admin {}", args.admin))?;
    let store = Store::connect(&args.etcd, &args.prefix).await?;
    let replica = args.replica.unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id()));
    let scheme = if identity.is_some() { "https" } else { "http" };
    println!("weft-control listening grpc={} admin={} scheme={scheme}", grpc.local_addr()?, admin.local_addr()?);
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    let config = Config {
        store,
        replica,
        lease_ttl_secs: args.lease_ttl,
        metrics,
        tokens,
        max_sidecars: args.max_sidecars,
        identity,
    };
    server::run(config, grpc, admin, shutdown).await
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "weft".into())
}
