//! `weft-example-service`: one instance of an example agent-platform service.

use clap::Parser;
use tokio::net::TcpListener;
use weft_examples::{Info, serve_grpc, serve_http};

#[derive(Parser)]
#[command(about = "An example service for the weft demo: HTTP (and h2c) or gRPC")]
struct Args {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Service name reported in answers.
    #[arg(long)]
    service: String,
    /// Version reported in answers.
    #[arg(long, default_value = "v1")]
    version: String,
    /// Serve the gRPC inference API instead of plain HTTP.
    #[arg(long)]
    grpc: bool,
    /// The local sidecar's outbound address, for /call/<service>/...
    #[arg(long)]
    outbound: Option<String>,
    /// Answer this share (0-100) of HTTP requests with --fail-status.
    #[arg(long, default_value_t = 0)]
    fail_percent: u32,
    /// The status of failed answers.
    #[arg(long, default_value_t = 503)]
    fail_status: u16,
    /// Added latency per request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Share (0-100) of requests that stall --stall-ms more.
    #[arg(long, default_value_t = 0)]
    stall_percent: u32,
    #[arg(long, default_value_t = 1000)]
    stall_ms: u64,
    /// Inference tokens reported per answer (x-weft-usage-tokens).
    #[arg(long, default_value_t = 0)]
    usage_tokens: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let listener = TcpListener::bind(&a.listen).await?;
    println!("{} {} listening on {}", a.service, a.version, listener.local_addr()?);
    let info = Info { service: a.service, version: a.version, outbound: a.outbound, mode: Default::default() };
    info.mode.fail(a.fail_percent, a.fail_status);
    use std::sync::atomic::Ordering::Relaxed;
    info.mode.latency_ms.store(a.latency_ms, Relaxed);
    info.mode.stall_percent.store(a.stall_percent.min(100), Relaxed);
    info.mode.stall_ms.store(a.stall_ms, Relaxed);
    info.mode.usage_tokens.store(a.usage_tokens, Relaxed);
    if a.grpc {
        serve_grpc(listener, info).await?;
    } else {
        serve_http(listener, info).await;
    }
    Ok(())
}
