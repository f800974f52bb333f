//! Example agent-platform services to put behind weft sidecars: an HTTP
//! service that says who answered (and can be slow, fail, stream, or call
//! another service through its sidecar), and a gRPC inference service.
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Answer every request with this status (a broken instance).
    pub fail_status: Option<u16>,
}

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
/// - `/stream?chunks=N&gap_ms=M`: N chunks, M ms apart
/// - `/call/<service>/<rest>`: calls `http://<service>/<rest>` through the
///   sidecar's outbound address and returns its answer
pub async fn serve_http(listener: TcpListener, info: Info) {
    let info = Arc::new(info);
    let hits = Arc::new(AtomicU64::new(0));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (info, hits) = (info.clone(), hits.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let (info, hits) = (info.clone(), hits.clone());
                async move { Ok::<_, Infallible>(handle(req, &info, &hits).await) }
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

async fn handle(req: Request<Incoming>, info: &Info, hits: &AtomicU64) -> Response<Body> {
    let n = hits.fetch_add(1, Ordering::Relaxed) + 1;
    if let Some(ms) = query(&req, "sleep_ms") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let path = req.uri().path().to_string();
    if let Some(rest) = path.strip_prefix("/call/") {
        return call(info, rest, req).await;
    }
    let mut status = info.fail_status.and_then(|c| StatusCode::from_u16(c).ok()).unwrap_or(StatusCode::OK);
    if let Some(code) = path.strip_prefix("/status/") {
        status = code.parse::<u16>().ok().and_then(|c| StatusCode::from_u16(c).ok()).unwrap_or(StatusCode::BAD_REQUEST);
    }
    let mut builder =
        Response::builder().status(status).header("x-served-by", info.served_by()).header("x-hits", n.to_string());
    for (k, v) in req.headers() {
        let name = k.as_str();
        if name.starts_with("x-") || matches!(name, "traceparent" | "tracestate" | "host" | "idempotency-key") {
            builder = builder.header(format!("echo-{name}"), v.clone());
        }
    }
    if path == "/stream" {
        let chunks = query(&req, "chunks").unwrap_or(5);
        let gap = Duration::from_millis(query(&req, "gap_ms").unwrap_or(20));
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(4);
        let served = info.served_by();
        tokio::spawn(async move {
            for i in 0..chunks {
                if tx.send(Ok(Frame::data(Bytes::from(format!("chunk {i} from {served}\n"))))).await.is_err() {
                    return;
                }
                tokio::time::sleep(gap).await;
            }
        });
        return builder.body(BodyExt::boxed(StreamBody::new(ReceiverStream::new(rx)))).expect("valid response");
    }
    // Drain the request body so the connection can be reused.
    let body_len = req.into_body().collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
    let body =
        format!("{{\"served_by\":\"{}\",\"path\":\"{}\",\"request_bytes\":{body_len}}}\n", info.served_by(), path);
    builder.header("content-type", "application/json").body(full(body)).expect("valid response")
}

async fn call(info: &Info, rest: &str, req: Request<Incoming>) -> Response<Body> {
    let Some(outbound) = &info.outbound else {
        return Response::builder().status(500).body(full("no --outbound configured\n")).expect("valid");
    };
    let (service, path) = rest.split_once('/').unwrap_or((rest, ""));
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut upstream = Request::builder().uri(format!("http://{outbound}/{path}")).header("host", service);
    for (k, v) in req.headers() {
        if k.as_str().starts_with("x-") || k.as_str() == "traceparent" {
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
        let items = (0..r.tokens.max(1))
            .map(move |i| Ok(pb::InferReply { text: format!("{} #{i}", r.prompt), served_by: served_by.clone() }));
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
