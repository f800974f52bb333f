//! `weft-proxy`: the sidecar.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;
use weft_proxy::app::Identity;
use weft_proxy::app::{self, Listeners, Options, parse_labels};

#[derive(Parser, Debug)]
#[command(name = "weft-proxy", version, about = "weft sidecar proxy")]
struct Args {
    /// Control plane URL(s), comma-separated; tried in turn.
    #[arg(long, env = "WEFT_CONTROL", default_value = "http://127.0.0.1:7070", value_delimiter = ',')]
    control: Vec<String>,
    /// The name of the local service.
    #[arg(long, env = "WEFT_SERVICE")]
    service: String,
    /// Instance labels, k=v,... (e.g. region=cn-east,version=v2).
    #[arg(long, env = "WEFT_LABELS", default_value = "")]
    labels: String,
    /// The local app's address.
    #[arg(long, env = "WEFT_APP")]
    app: String,
    #[arg(long, env = "WEFT_INBOUND", default_value = "0.0.0.0:4143")]
    inbound: String,
    #[arg(long, env = "WEFT_OUTBOUND", default_value = "127.0.0.1:4140")]
    outbound: String,
    #[arg(long, env = "WEFT_ADMIN", default_value = "127.0.0.1:4191")]
    admin: String,
    /// The address peers dial (default: the inbound address, or the host's
    /// primary address when inbound is unspecified).
    #[arg(long, env = "WEFT_ADVERTISE")]
    advertise: Option<SocketAddr>,
    /// Proxy id (default: hostname-pid).
    #[arg(long, env = "WEFT_ID")]
    id: Option<String>,
    /// Largest request body (bytes) buffered for retries and fallback;
    /// larger bodies stream through and are not retried.
    #[arg(long, env = "WEFT_RETRY_BODY_LIMIT", default_value_t = weft_proxy::DEFAULT_REPLAY_LIMIT)]
    retry_body_limit: u64,
    /// The request header that names the tenant (absent = `default`).
    #[arg(long, env = "WEFT_TENANT_HEADER", default_value = weft_proxy::TENANT_HEADER)]
    tenant_header: String,
    /// Bearer token for a control plane started with --tokens (role
    /// proxy:<service>).
    #[arg(long, env = "WEFT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM roots (one, or two during a CA rotation): the control plane is
    /// verified against them (its URLs are then https://), and the sidecar
    /// gets a workload certificate from it.
    #[arg(long, env = "WEFT_CA_BUNDLE")]
    ca_bundle: Option<String>,
    /// With --ca-bundle: `strict` (default) refuses callers that do not
    /// present a workload certificate; `permissive` also serves plaintext
    /// callers, counted in weft_inbound_plaintext_total (for a migration).
    #[arg(long, env = "WEFT_INBOUND_MTLS", value_enum)]
    inbound_mtls: Option<weft_proxy::app::InboundMtls>,
    /// Runtime worker threads.
    #[arg(long, env = "WEFT_WORKERS", default_value_t = 1)]
    workers: usize,
    /// Open connections per listener (inbound, outbound) at most; more are
    /// closed at once.
    #[arg(long, env = "WEFT_MAX_CONNECTIONS", default_value_t = 10_000)]
    max_connections: usize,
    /// Longest time from a request head's first byte to its end.
    #[arg(long, env = "WEFT_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    header_timeout: Duration,
    /// A connection with no request in flight and no traffic for this long
    /// is closed.
    #[arg(long, env = "WEFT_IDLE_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// A spliced stream (WebSocket, tunnel, opaque or mesh TCP) with no
    /// byte either way for this long is closed. At most --max-connections
    /// of them are open at once.
    #[arg(long, env = "WEFT_STREAM_IDLE_TIMEOUT", default_value = "1h", value_parser = humantime::parse_duration)]
    stream_idle_timeout: Duration,
    /// Longest wait for the local app's response head.
    #[arg(long, env = "WEFT_APP_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    app_timeout: Duration,
    /// On drain, how long the listeners keep accepting after deregistering.
    #[arg(long, env = "WEFT_DRAIN_GRACE", default_value = "2s", value_parser = humantime::parse_duration)]
    drain_grace: Duration,
    /// Bind the listeners with SO_REUSEPORT, so a new sidecar (same user)
    /// can take over their ports before this one drains.
    #[arg(long, env = "WEFT_REUSE_PORT")]
    reuse_port: bool,
    /// Answer DNS on this UDP address (e.g. 127.0.0.1:4153, where
    /// `weft-proxy init --dns-port` sends the app's queries): mesh service
    /// names get a virtual address from --vip-cidr; other names are
    /// forwarded to --dns-upstream.
    #[arg(long, env = "WEFT_DNS")]
    dns: Option<SocketAddr>,
    /// The resolver names outside the mesh are forwarded to (default: the
    /// first nameserver of /etc/resolv.conf).
    #[arg(long, env = "WEFT_DNS_UPSTREAM")]
    dns_upstream: Option<SocketAddr>,
    /// The range the virtual addresses of mesh services come from; the app
    /// needs a route to it (any default route).
    #[arg(long, env = "WEFT_VIP_CIDR", default_value = weft_proxy::dns::DEFAULT_VIP_CIDR)]
    vip_cidr: String,
    /// The app's ports, besides --app's, that callers in the mesh may open
    /// TCP streams to (captured TCP for a service's virtual address, or
    /// `CONNECT service:port`).
    #[arg(long, env = "WEFT_APP_PORTS", value_delimiter = ',')]
    app_ports: Vec<u16>,
}

/// `weft-proxy init`: installs the redirect rules of transparent capture in
/// the current network namespace, and exits.
#[derive(Parser, Debug)]
#[command(name = "weft-proxy init", version, about = "Install (or --uninstall) weft's traffic capture rules")]
struct InitArgs {
    /// The sidecar's user id: its own traffic is not captured.
    #[arg(long)]
    proxy_uid: Option<u32>,
    #[arg(long, default_value_t = 4140)]
    outbound_port: u16,
    #[arg(long, default_value_t = 4143)]
    inbound_port: u16,
    /// The app's ports whose inbound TCP is captured (default: all).
    #[arg(long, value_delimiter = ',')]
    inbound_ports: Vec<u16>,
    /// Inbound ports never captured (the sidecar's admin port, say).
    #[arg(long, value_delimiter = ',', default_value = "4191")]
    skip_inbound_ports: Vec<u16>,
    /// Destination ports the app reaches directly.
    #[arg(long, value_delimiter = ',')]
    skip_outbound_ports: Vec<u16>,
    /// Destination networks (IPv4 CIDRs) the app reaches directly.
    #[arg(long, value_delimiter = ',')]
    skip_cidrs: Vec<String>,
    /// Also send the app's DNS queries (UDP port 53) to this port of the
    /// sidecar (its --dns listener on 127.0.0.1).
    #[arg(long)]
    dns_port: Option<u16>,
    /// Removes weft's rules (and only those).
    #[arg(long)]
    uninstall: bool,
}

fn init(a: InitArgs) -> anyhow::Result<()> {
    use weft_proxy::capture::{Capture, parse_cidr};
    if a.uninstall {
        Capture::uninstall().map_err(|e| anyhow::anyhow!(e))?;
        println!("weft capture rules removed");
        return Ok(());
    }
    let Some(proxy_uid) = a.proxy_uid else {
        anyhow::bail!("--proxy-uid: the sidecar's user id is needed, so that its own traffic is not captured");
    };
    let skip_cidrs = a
        .skip_cidrs
        .iter()
        .map(|c| parse_cidr(c).map_err(|e| anyhow::anyhow!("--skip-cidrs: {e}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let capture = Capture {
        proxy_uid,
        outbound_port: a.outbound_port,
        inbound_port: a.inbound_port,
        inbound_ports: a.inbound_ports,
        skip_inbound_ports: a.skip_inbound_ports,
        skip_outbound_ports: a.skip_outbound_ports,
        skip_cidrs,
        dns_port: a.dns_port,
    };
    capture.install().map_err(|e| anyhow::anyhow!(e))?;
    println!("weft capture rules installed: {} rules", capture.rules().len());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("init") {
        return init(InitArgs::parse_from(std::env::args().skip(1)));
    }
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = if args.workers <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(args.workers).enable_all().build()?
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let labels = parse_labels(&args.labels).map_err(|e| anyhow::anyhow!("--labels: {e}"))?;
    let tenant_header = http::HeaderName::from_bytes(args.tenant_header.to_ascii_lowercase().as_bytes())
        .map_err(|_| anyhow::anyhow!("--tenant-header '{}' is not a header name", args.tenant_header))?;
    weft_control_name_check(&args.service)?;
    let app = args
        .app
        .to_socket_addrs()
        .with_context(|| format!("--app {}: not host:port", args.app))?
        .next()
        .with_context(|| format!("--app {}: resolves to no address", args.app))?;
    let mut metrics = metrics_exporter_prometheus::PrometheusBuilder::new();
    for name in weft_proxy::telemetry::HISTOGRAMS {
        metrics = metrics
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(name.to_string()),
                weft_proxy::telemetry::REQUEST_SECONDS_BUCKETS,
            )
            .context("setting the histogram buckets")?;
    }
    let metrics = metrics.install_recorder().context("installing the metrics recorder")?;
    let workload = match &args.ca_bundle {
        Some(path) => {
            let pem = std::fs::read_to_string(path).with_context(|| format!("--ca-bundle {path}: cannot read it"))?;
            let w = weft_proxy::workload::Workload::new(&format!("--ca-bundle {path}"), pem)?;
            if let Some(url) = args.control.iter().find(|u| !u.starts_with("https://")) {
                anyhow::bail!("--control {url}: with --ca-bundle the control plane is https://");
            }
            Some(std::sync::Arc::new(w))
        }
        None => {
            if let Some(url) = args.control.iter().find(|u| u.starts_with("https://")) {
                anyhow::bail!("--control {url}: an https:// control plane needs --ca-bundle");
            }
            if args.inbound_mtls.is_some() {
                anyhow::bail!("--inbound-mtls: mTLS needs --ca-bundle (without it the mesh is plaintext)");
            }
            None
        }
    };
    let bind = |flag: &str, addr: &str| -> anyhow::Result<TcpListener> {
        let sock = addr
            .to_socket_addrs()
            .with_context(|| format!("{flag} {addr}: not host:port"))?
            .next()
            .with_context(|| format!("{flag} {addr}: resolves to no address"))?;
        weft_proxy::transport::listener::bind(sock, args.reuse_port).with_context(|| format!("binding {flag} {addr}"))
    };
    let inbound = bind("--inbound", &args.inbound)?;
    let outbound = bind("--outbound", &args.outbound)?;
    let admin = TcpListener::bind(&args.admin).await.with_context(|| format!("binding --admin {}", args.admin))?;
    weft_proxy::transport::splice::configure(args.max_connections, args.stream_idle_timeout);
    let vip_cidr = weft_proxy::dns::parse_vip_cidr(&args.vip_cidr).map_err(|e| anyhow::anyhow!("--vip-cidr {e}"))?;
    let (dns, dns_upstream) = match args.dns {
        Some(addr) => {
            let socket = tokio::net::UdpSocket::bind(addr).await.with_context(|| format!("binding --dns {addr}"))?;
            let upstream = match args.dns_upstream {
                Some(u) => u,
                None => weft_proxy::dns::system_resolver().map_err(|e| anyhow::anyhow!("--dns-upstream: {e}"))?,
            };
            (Some(socket), Some(upstream))
        }
        None => (None, None),
    };
    let in_addr = inbound.local_addr()?;
    let advertise = args.advertise.unwrap_or_else(|| {
        if in_addr.ip().is_unspecified() { SocketAddr::new(primary_ip(), in_addr.port()) } else { in_addr }
    });
    let id = args.id.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "weft".into());
        format!("{host}-{}", std::process::id())
    });
    println!(
        "weft-proxy listening inbound={} outbound={} admin={} advertise={advertise} id={id}",
        in_addr,
        outbound.local_addr()?,
        admin.local_addr()?
    );
    let identity = Identity { id, service: args.service, labels, advertise };
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    app::run(
        Options {
            controls: args.control,
            identity,
            app,
            metrics,
            replay_limit: args.retry_body_limit,
            tenant_header,
            token: args.token,
            workload,
            inbound_mtls: args.inbound_mtls.unwrap_or(weft_proxy::app::InboundMtls::Strict),
            limits: weft_proxy::transport::listener::Limits {
                max_connections: args.max_connections,
                header_timeout: args.header_timeout,
                idle_timeout: args.idle_timeout,
                call_timeout: None,
            },
            app_timeout: args.app_timeout,
            drain_grace: args.drain_grace,
            vip_cidr,
            dns_upstream,
            tcp_ports: args.app_ports,
        },
        Listeners { inbound, outbound, admin, dns },
        shutdown,
    )
    .await;
    Ok(())
}

/// The control plane refuses a Hello with any other name, forever.
fn weft_control_name_check(service: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        weft_policy::names::is_service(service.as_bytes()),
        "--service '{service}': use 1-63 lowercase letters, digits, '-' or '_', not starting with '-' (no '.': callers name a service by the first label of their Host)"
    );
    Ok(())
}

/// The address of the interface that holds the default route; found with a
/// UDP `connect`, which sends nothing. Loopback when there is none.
fn primary_ip() -> IpAddr {
    std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| {
            s.connect("192.0.2.1:9")?;
            s.local_addr()
        })
        .map(|a| a.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
}
