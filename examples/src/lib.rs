//! Example agent-platform services to put behind weft sidecars: an HTTP
//! service that says who answered (and can be slow, fail, stream, or call
//! another service through its sidecar), and a gRPC inference service.
#![forbid(unsafe_code)]

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};

pub mod pb {
    tonic::include_proto!("weft.example");
}

/// Who an instance is.
#[derive(Clone, Debug)]
pub struct Info {
    pub service: String,
    pub version: String,
    /// The caller's sidecar outbound address, for `/call/<service>/...`.
    pub outbound: Option<String>,
    /// How the instance misbehaves; changeable while it runs.
    pub mode: Arc<Mode>,
}

/// Failures on command, for demos and tests.
#[derive(Debug, Default)]
pub struct Mode {
    /// Share of requests (0-100) answered with `fail_status`.
    pub fail_percent: AtomicU32,
    /// The failure status (default 503).
    pub fail_status: AtomicU32,
    /// Added before answering.
    pub latency_ms: AtomicU64,
    /// Before the first chunk of every `/stream` answer (a model slow to its
    /// first token, whose answer head comes at once).
    pub stream_first_ms: AtomicU64,
    /// Share of requests (0-100) that stall `stall_ms` more (a model stuck
    /// now and then), drawn from the request count.
    pub stall_percent: AtomicU32,
    pub stall_ms: AtomicU64,
    /// Never answer.
    pub hang: AtomicBool,
    /// Drop the connection instead of answering.
    pub reset: AtomicBool,
    /// Requests received (every try counts).
    pub hits: AtomicU64,
    /// Requests whose handling was dropped before an answer was made: the
    /// caller went away (e.g. its sidecar timed out and cancelled).
    pub cancelled: AtomicU64,
    /// Inference tokens reported per answer in `x-weft-usage-tokens`
    /// (a header, or a trailer on `/stream`); 0 = none.
    pub usage_tokens: AtomicU64,
    /// Requests that found every slot of the capacity taken and waited.
    pub queued: AtomicU64,
    /// How many requests are served at once (like a GPU); unset = no limit.
    gate: std::sync::OnceLock<Arc<tokio::sync::Semaphore>>,
}

impl Mode {
    /// Healthy again.
    pub fn heal(&self) {
        self.fail_percent.store(0, Ordering::Relaxed);
        self.latency_ms.store(0, Ordering::Relaxed);
        self.hang.store(false, Ordering::Relaxed);
        self.reset.store(false, Ordering::Relaxed);
    }

    pub fn fail(&self, percent: u32, status: u16) {
        self.fail_status.store(u32::from(status), Ordering::Relaxed);
        self.fail_percent.store(percent.min(100), Ordering::Relaxed);
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Serves at most `n` requests at once; the rest queue. Set once.
    /// A capacity of 0 holds every request until [`Mode::add_capacity`].
    pub fn set_capacity(&self, n: usize) {
        let _ = self.gate.set(Arc::new(tokio::sync::Semaphore::new(n)));
    }

    /// Lets `n` more requests be served at once.
    pub fn add_capacity(&self, n: usize) {
        if let Some(g) = self.gate.get() {
            g.add_permits(n);
        }
    }
}

/// FNV-1a, so a test can tell a body arrived byte-identical.
pub fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100000001b3))
}

/// Counts a request whose handling is dropped before it answers.
struct CancelWatch {
    mode: Arc<Mode>,
    answered: bool,
}

impl Drop for CancelWatch {
    fn drop(&mut self) {
        if !self.answered {
            self.mode.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The error that makes the server drop the connection (a "reset").
#[derive(Debug)]
struct Reset;

impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("reset on command")
    }
}

impl std::error::Error for Reset {}

impl Info {
    fn served_by(&self) -> String {
        format!("{}/{}", self.service, self.version)
    }
}

type Body = BoxBody<Bytes, hyper::Error>;

fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).map_err(|never| match never {}).boxed()
}

/// Serves plain HTTP/1.1 and h2c until the listener task is dropped.
///
/// - any path: `200 {"served_by":"svc/v1","path":...}`, with the request's
///   `x-*`, `traceparent` and `host` echoed as `echo-*` response headers
/// - `?sleep_ms=N`: answers after N ms
/// - `/status/N`: answers with status N
/// - `/stream?chunks=N&gap_ms=M`: N chunks, M ms apart (`first_ms`: before
///   the first; `stall_at=I&stall_ms=S`: S ms more before chunk I)
/// - `/call/<service>/<rest>`: calls `http://<service>/<rest>` through the
///   sidecar's outbound address and returns its answer
pub async fn serve_http(listener: TcpListener, info: Info) {
    let info = Arc::new(info);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let info = info.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let info = info.clone();
                async move {
                    let mode = &info.mode;
                    let n = mode.hits.fetch_add(1, Ordering::Relaxed);
                    let mut watch = CancelWatch { mode: mode.clone(), answered: false };
                    let _permit = match mode.gate.get() {
                        Some(g) => Some(match g.clone().try_acquire_owned() {
                            Ok(p) => p,
                            Err(_) => {
                                mode.queued.fetch_add(1, Ordering::Relaxed);
                                g.clone().acquire_owned().await.expect("never closed")
                            }
                        }),
                        None => None,
                    };
                    if mode.hang.load(Ordering::Relaxed) {
                        std::future::pending::<()>().await;
                    }
                    let mut latency = mode.latency_ms.load(Ordering::Relaxed);
                    let stall = u64::from(mode.stall_percent.load(Ordering::Relaxed));
                    if stall > 0 && fnv1a(&(n ^ 0x5bd1_e995).to_le_bytes()) % 100 < stall {
                        latency += mode.stall_ms.load(Ordering::Relaxed);
                    }
                    if latency > 0 {
                        tokio::time::sleep(Duration::from_millis(latency)).await;
                    }
                    if mode.reset.load(Ordering::Relaxed) {
                        watch.answered = true;
                        return Err(Reset);
                    }
                    let resp = handle(req, &info).await;
                    watch.answered = true;
                    Ok(resp)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

async fn handle(req: Request<Incoming>, info: &Info) -> Response<Body> {
    let n = info.mode.hits();
    if let Some(ms) = query(&req, "sleep_ms") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let path = req.uri().path().to_string();
    if let Some(rest) = path.strip_prefix("/call/") {
        return call(info, rest, req).await;
    }
    let failing = info.mode.fail_percent.load(Ordering::Relaxed);
    let mut status = StatusCode::OK;
    if failing > 0 && (failing >= 100 || u64::from(failing) > (fnv1a(&n.to_le_bytes()) % 100)) {
        let code = info.mode.fail_status.load(Ordering::Relaxed);
        status = u16::try_from(code)
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    }
    if let Some(code) = path.strip_prefix("/status/") {
        status = code.parse::<u16>().ok().and_then(|c| StatusCode::from_u16(c).ok()).unwrap_or(StatusCode::BAD_REQUEST);
    }
    let mut builder =
        Response::builder().status(status).header("x-served-by", info.served_by()).header("x-hits", n.to_string());
    let usage = info.mode.usage_tokens.load(Ordering::Relaxed);
    if usage > 0 && path != "/stream" {
        builder = builder.header("x-weft-usage-tokens", usage.to_string());
    }
    for (k, v) in req.headers() {
        let name = k.as_str();
        if name.starts_with("x-") || matches!(name, "traceparent" | "tracestate" | "host" | "idempotency-key") {
            builder = builder.header(format!("echo-{name}"), v.clone());
        }
    }
    if path == "/stream" {
        if usage > 0 {
            // HTTP/1.1 sends only the trailers the head announces.
            builder = builder.header("trailer", "x-weft-usage-tokens");
        }
        let chunks = query(&req, "chunks").unwrap_or(5);
        let gap = Duration::from_millis(query(&req, "gap_ms").unwrap_or(20));
        // A model slow to its first token, or stalling mid-answer.
        let first = query(&req, "first_ms").unwrap_or(0).max(info.mode.stream_first_ms.load(Ordering::Relaxed));
        let first = Duration::from_millis(first);
        let (stall_at, stall) = (query(&req, "stall_at"), Duration::from_millis(query(&req, "stall_ms").unwrap_or(0)));
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(4);
        let served = info.served_by();
        builder = builder.header("content-type", "text/event-stream");
        tokio::spawn(async move {
            for i in 0..chunks {
                if i == 0 {
                    tokio::time::sleep(first).await;
                }
                if Some(i) == stall_at {
                    tokio::time::sleep(stall).await;
                }
                if tx.send(Ok(Frame::data(Bytes::from(format!("chunk {i} from {served}\n"))))).await.is_err() {
                    return;
                }
                tokio::time::sleep(gap).await;
            }
            if usage > 0 {
                let mut trailers = http::HeaderMap::new();
                trailers.insert("x-weft-usage-tokens", usage.into());
                let _ = tx.send(Ok(Frame::trailers(trailers))).await;
            }
        });
        return builder.body(BodyExt::boxed(StreamBody::new(ReceiverStream::new(rx)))).expect("valid response");
    }
    // Read the whole request body: its length and hash go back to the caller.
    let bytes = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let body_len = bytes.len();
    let body =
        format!("{{\"served_by\":\"{}\",\"path\":\"{}\",\"request_bytes\":{body_len}}}\n", info.served_by(), path);
    builder
        .header("content-type", "application/json")
        .header("x-body-fnv", format!("{:016x}", fnv1a(&bytes)))
        .body(full(body))
        .expect("valid response")
}

async fn call(info: &Info, rest: &str, req: Request<Incoming>) -> Response<Body> {
    let Some(outbound) = &info.outbound else {
        return Response::builder().status(500).body(full("no --outbound configured\n")).expect("valid");
    };
    let (service, path) = rest.split_once('/').unwrap_or((rest, ""));
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut upstream = Request::builder().uri(format!("http://{outbound}/{path}")).header("host", service);
    // Like an app that knows nothing of deadlines: the trace context and
    // its own x- headers go on, the time left does not (its sidecar holds
    // the onward call to the deadline by the trace).
    for (k, v) in req.headers() {
        if (k.as_str().starts_with("x-") && k.as_str() != "x-weft-deadline-ms") || k.as_str() == "traceparent" {
            upstream = upstream.header(k, v);
        }
    }
    match client.request(upstream.body(Full::new(Bytes::new())).expect("valid")).await {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            Response::from_parts(parts, body.boxed())
        }
        Err(e) => {
            Response::builder().status(502).body(full(format!("call to {service} failed: {e}\n"))).expect("valid")
        }
    }
}

/// The gRPC inference service.
#[derive(Clone)]
pub struct InferenceService {
    info: Arc<Info>,
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<pb::InferReply, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl pb::inference_server::Inference for InferenceService {
    async fn infer(
        &self,
        req: tonic::Request<pb::InferRequest>,
    ) -> Result<tonic::Response<pb::InferReply>, tonic::Status> {
        let r = req.into_inner();
        if r.prompt == "fail" {
            return Err(tonic::Status::unavailable("asked to fail"));
        }
        Ok(tonic::Response::new(pb::InferReply {
            text: format!("echo: {}", r.prompt),
            served_by: self.info.served_by(),
        }))
    }

    type GenerateStream = ReplyStream;

    async fn generate(
        &self,
        req: tonic::Request<pb::InferRequest>,
    ) -> Result<tonic::Response<ReplyStream>, tonic::Status> {
        let r = req.into_inner();
        let served_by = self.info.served_by();
        // "fail" streams its tokens, then ends UNAVAILABLE (in the trailers).
        let fail = (r.prompt == "fail").then(|| Err(tonic::Status::unavailable("asked to fail")));
        let items = (0..r.tokens.max(1))
            .map(move |i| Ok(pb::InferReply { text: format!("{} #{i}", r.prompt), served_by: served_by.clone() }))
            .chain(fail);
        Ok(tonic::Response::new(Box::pin(tokio_stream::iter(items))))
    }

    type ChatStream = ReplyStream;

    async fn chat(
        &self,
        req: tonic::Request<tonic::Streaming<pb::InferRequest>>,
    ) -> Result<tonic::Response<ReplyStream>, tonic::Status> {
        let mut inbound = req.into_inner();
        let served_by = self.info.served_by();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                if m.delay_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(m.delay_ms.into())).await;
                }
                let reply = pb::InferReply { text: format!("re: {}", m.prompt), served_by: served_by.clone() };
                if tx.send(Ok(reply)).await.is_err() {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Serves the gRPC inference API (h2c).
pub async fn serve_grpc(listener: TcpListener, info: Info) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(pb::inference_server::InferenceServer::new(InferenceService { info: Arc::new(info) }))
        .serve_with_incoming(TcpListenerStream::new(listener))
        .await
}
