//! `weft-load`: an open-loop HTTP load generator.
//!
//! Requests are dispatched at a fixed rate, whatever the server does; each
//! request's latency is measured from its dispatch, including any wait behind
//! earlier requests on its connection, so a slow server cannot hide queueing
//! by slowing the generator down (no coordinated omission). (Dispatch rather
//! than the ideal schedule: tokio's timer has millisecond granularity, and its
//! lag is the generator's, not the server's.) HTTP/1.1
//! keeps `--connections` keep-alive connections, each sending one request at
//! a time; `--h2` multiplexes on `--connections` h2c connections.
//! `--tls-*` speaks mTLS (TLS 1.3, a client certificate, the server checked
//! to be `--server-name` as weft's sidecars check one another).
//! `--fresh` measures new connections instead: `--connections` workers
//! each connect (and handshake), send one request and close, as fast as
//! they can, for `--duration`.
//! Prints one JSON object with the counts and the latency percentiles.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::{Mutex, mpsc};

#[derive(Parser)]
#[command(about = "Open-loop HTTP/1.1 and h2c load generator (latency from the intended send time)")]
struct Args {
    /// host:port to connect to.
    #[arg(long)]
    addr: String,
    /// The Host / :authority to send.
    #[arg(long, default_value = "backend")]
    host: String,
    #[arg(long, default_value = "/")]
    path: String,
    /// Requests per second (not with --fresh).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Seconds of measured load (after --warmup).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// h2c (prior knowledge) instead of HTTP/1.1.
    #[arg(long)]
    h2: bool,
    /// mTLS: the client's certificate chain (PEM), with --tls-key and
    /// --tls-ca.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<String>,
    #[arg(long)]
    tls_key: Option<String>,
    /// The roots the server's certificate must chain to.
    #[arg(long)]
    tls_ca: Option<String>,
    /// The service the server must prove to be (default: --host).
    #[arg(long)]
    server_name: Option<String>,
    /// New connections, closed loop: each request on a connection of its
    /// own (handshakes per second).
    #[arg(long)]
    fresh: bool,
}

/// The client side of mTLS.
#[derive(Clone)]
struct Tls {
    connector: tokio_rustls::TlsConnector,
    name: rustls::pki_types::ServerName<'static>,
}

impl Tls {
    fn new(a: &Args) -> anyhow::Result<Option<Tls>> {
        let (Some(cert), Some(key), Some(ca)) = (&a.tls_cert, &a.tls_key, &a.tls_ca) else { return Ok(None) };
        let read = |p: &str| std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{p}: {e}"));
        let chain = weft_identity::pem::certificates(cert, &read(cert)?)?;
        let key = weft_identity::pem::private_key(key, &read(key)?)?;
        let certified = rustls::sign::CertifiedKey::from_der(chain, key, &weft_identity::tls::provider())?;
        let resolver = Arc::new(rustls::sign::SingleCertAndKey::from(certified));
        let roots = weft_identity::tls::roots(ca, &read(ca)?)?;
        let alpn: &[u8] = if a.h2 { b"h2" } else { b"http/1.1" };
        let config = weft_identity::tls::client_config(roots, resolver, &[alpn])?;
        let name = weft_identity::tls::server_name(a.server_name.as_deref().unwrap_or(&a.host))?;
        Ok(Some(Tls { connector: tokio_rustls::TlsConnector::from(Arc::new(config)), name }))
    }
}

/// A connection to `addr`, over mTLS when `tls` is given.
async fn connect(addr: &str, tls: Option<&Tls>) -> anyhow::Result<Box<dyn Io>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(match tls {
        None => Box::new(stream),
        Some(t) => Box::new(t.connector.connect(t.name.clone(), stream).await?),
    })
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Io for T {}

struct Shot {
    intended: Instant,
    measured: bool,
}

#[derive(Default)]
struct Tally {
    hist: Option<Histogram<u64>>,
    ok: u64,
    errors: u64,
}

impl Tally {
    fn shared() -> anyhow::Result<Arc<Mutex<Tally>>> {
        Ok(Arc::new(Mutex::new(Tally {
            hist: Some(Histogram::new_with_bounds(1, 60_000_000, 3)?),
            ..Default::default()
        })))
    }

    /// The counts and latency percentiles, and the fields of `run`.
    fn report(&self, run: serde_json::Value) -> serde_json::Value {
        let h = self.hist.as_ref().expect("histogram");
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        let mut out = serde_json::json!({
            "ok": self.ok, "errors": self.errors,
            "p50_ms": ms(0.5), "p90_ms": ms(0.9), "p99_ms": ms(0.99), "p999_ms": ms(0.999),
            "max_ms": h.max() as f64 / 1000.0,
        });
        if let (Some(o), serde_json::Value::Object(r)) = (out.as_object_mut(), run) {
            o.extend(r);
        }
        out
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let tls = Tls::new(&a)?;
    if a.fresh {
        return fresh(&a, tls).await;
    }
    anyhow::ensure!(a.rate > 0 && a.connections > 0, "--rate and --connections must be positive");
    let tally = Tally::shared()?;
    let uri: http::Uri = format!("http://{}{}", a.host, a.path).parse()?;
    let mut queues = Vec::new();
    let mut workers = Vec::new();
    for _ in 0..a.connections {
        let (tx, rx) = mpsc::unbounded_channel::<Shot>();
        queues.push(tx);
        let stream = connect(&a.addr, tls.as_ref()).await?;
        let tally = tally.clone();
        let uri = uri.clone();
        if a.h2 {
            let (sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            workers.push(tokio::spawn(h2_worker(sender, rx, uri, tally)));
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            workers.push(tokio::spawn(h1_worker(sender, rx, uri, a.host.clone(), tally)));
        }
    }
    let total = ((a.warmup + a.duration) * a.rate as f64) as u64;
    let warm = (a.warmup * a.rate as f64) as u64;
    let period = Duration::from_nanos(1_000_000_000 / a.rate);
    let start = Instant::now();
    for i in 0..total {
        let due = start + Duration::from_nanos(period.as_nanos() as u64 * i);
        tokio::time::sleep_until(due.into()).await;
        let _ = queues[(i as usize) % queues.len()].send(Shot { intended: Instant::now(), measured: i >= warm });
    }
    let sent_for = start.elapsed().as_secs_f64();
    drop(queues);
    for w in workers {
        let _ = w.await;
    }
    let run = serde_json::json!({
        "rate": a.rate, "h2": a.h2, "connections": a.connections, "achieved_rate": (total as f64) / sent_for,
    });
    println!("{}", tally.lock().await.report(run));
    Ok(())
}

/// `--fresh`: connections per second, each with one request.
async fn fresh(a: &Args, tls: Option<Tls>) -> anyhow::Result<()> {
    anyhow::ensure!(a.connections > 0, "--connections must be positive");
    let until = Instant::now() + Duration::from_secs_f64(a.warmup + a.duration);
    let measure_from = Instant::now() + Duration::from_secs_f64(a.warmup);
    let tally = Tally::shared()?;
    let mut workers = Vec::new();
    for _ in 0..a.connections {
        let (addr, host, path, tls, tally) =
            (a.addr.clone(), a.host.clone(), a.path.clone(), tls.clone(), tally.clone());
        workers.push(tokio::spawn(async move {
            while Instant::now() < until {
                let shot = Shot { intended: Instant::now(), measured: Instant::now() >= measure_from };
                let ok = async {
                    let io = connect(&addr, tls.as_ref()).await?;
                    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
                    tokio::spawn(conn);
                    let req = http::Request::get(&path)
                        .header("host", &host)
                        .header("connection", "close")
                        .body(Full::new(Bytes::new()))?;
                    anyhow::Ok(succeeded(sender.send_request(req).await).await)
                }
                .await
                .unwrap_or(false);
                record(&tally, &shot, ok).await;
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let t = tally.lock().await;
    let run = serde_json::json!({
        "fresh": true, "tls": tls.is_some(), "connections": a.connections, "per_second": t.ok as f64 / a.duration,
    });
    println!("{}", t.report(run));
    Ok(())
}

async fn record(tally: &Mutex<Tally>, shot: &Shot, ok: bool) {
    if !shot.measured {
        return;
    }
    let us = shot.intended.elapsed().as_micros() as u64;
    let mut t = tally.lock().await;
    if ok {
        t.ok += 1;
    } else {
        t.errors += 1;
    }
    if let Some(h) = t.hist.as_mut() {
        let _ = h.record(us.max(1));
    }
}

/// A 2xx answer whose body was read to the end.
async fn succeeded(resp: Result<http::Response<hyper::body::Incoming>, hyper::Error>) -> bool {
    match resp {
        Ok(resp) => {
            let status = resp.status();
            resp.into_body().collect().await.is_ok() && status.is_success()
        }
        Err(_) => false,
    }
}

async fn h1_worker(
    mut sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    mut rx: mpsc::UnboundedReceiver<Shot>,
    uri: http::Uri,
    host: String,
    tally: Arc<Mutex<Tally>>,
) {
    let path = uri.path_and_query().map(|p| p.to_string()).unwrap_or_else(|| "/".into());
    while let Some(shot) = rx.recv().await {
        let req = http::Request::get(&path).header("host", &host).body(Full::new(Bytes::new())).expect("request");
        let ok = succeeded(sender.send_request(req).await).await;
        record(&tally, &shot, ok).await;
    }
}

async fn h2_worker(
    sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    mut rx: mpsc::UnboundedReceiver<Shot>,
    uri: http::Uri,
    tally: Arc<Mutex<Tally>>,
) {
    let mut inflight = tokio::task::JoinSet::new();
    while let Some(shot) = rx.recv().await {
        let mut sender = sender.clone();
        let (uri, tally) = (uri.clone(), tally.clone());
        inflight.spawn(async move {
            let req =
                http::Request::get(uri).version(http::Version::HTTP_2).body(Full::new(Bytes::new())).expect("request");
            let ok = succeeded(sender.send_request(req).await).await;
            record(&tally, &shot, ok).await;
        });
        while inflight.try_join_next().is_some() {}
    }
    while inflight.join_next().await.is_some() {}
}
