//! An in-process control plane that pushes what a test tells it to, so a
//! sidecar's behaviour can be tested without etcd: a scripted `weft.v1`
//! discovery server on `127.0.0.1:0` that records everything sidecars say.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::broadcast;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};
use xds_proto::v1 as pb;
use xds_proto::v1::discovery_server::{Discovery, DiscoveryServer};

#[derive(Default)]
struct State {
    /// The latest config of each service, sent to a stream that subscribes.
    services: BTreeMap<String, pb::ServiceConfig>,
    version: u64,
    /// Everything the sidecars said, in order.
    heard: Vec<pb::proxy_message::Msg>,
}

#[derive(Clone)]
struct Server {
    state: Arc<Mutex<State>>,
    updates: broadcast::Sender<pb::Update>,
}

type Out = Pin<Box<dyn Stream<Item = Result<pb::ControlMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for Server {
    type StreamStream = Out;

    async fn stream(&self, request: Request<Streaming<pb::ProxyMessage>>) -> Result<Response<Out>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::ControlMessage, Status>>(64);
        let (state, mut updates) = (self.state.clone(), self.updates.subscribe());
        tokio::spawn(async move {
            let mut subscribed: Vec<String> = Vec::new();
            loop {
                tokio::select! {
                    msg = inbound.message() => {
                        let Ok(Some(pb::ProxyMessage { msg: Some(m) })) = msg else { return };
                        let mut new = Vec::new();
                        match &m {
                            pb::proxy_message::Msg::Hello(h) => new.push(h.service.clone()),
                            pb::proxy_message::Msg::Subscribe(s) => new.extend(s.services.iter().cloned()),
                            _ => {}
                        }
                        let update = {
                            let mut st = state.lock().unwrap();
                            st.heard.push(m);
                            let services: Vec<pb::ServiceConfig> = new
                                .iter()
                                .filter(|s| !subscribed.contains(s))
                                .map(|s| st.services.get(s).cloned().unwrap_or_else(|| pb::ServiceConfig { name: s.clone(), ..Default::default() }))
                                .collect();
                            (!services.is_empty()).then(|| pb::Update { version: st.version, services, endpoint_hold_ms: 10_000 })
                        };
                        subscribed.extend(new);
                        if let Some(u) = update {
                            let _ = tx.send(Ok(pb::ControlMessage { msg: Some(pb::control_message::Msg::Update(u)) })).await;
                        }
                    }
                    u = updates.recv() => {
                        let Ok(mut u) = u else { return };
                        u.services.retain(|s| subscribed.contains(&s.name));
                        if !u.services.is_empty()
                            && tx.send(Ok(pb::ControlMessage { msg: Some(pb::control_message::Msg::Update(u)) })).await.is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

/// A scripted control plane.
pub struct FakeControl {
    pub addr: SocketAddr,
    server: Server,
    task: tokio::task::JoinHandle<()>,
}

impl FakeControl {
    pub async fn start() -> FakeControl {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (updates, _) = broadcast::channel(64);
        let server = Server { state: Default::default(), updates };
        let svc = DiscoveryServer::new(server.clone());
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        FakeControl { addr, server, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Pushes `services` at `version` to every stream subscribed to them
    /// (and keeps them for streams that subscribe later).
    pub fn push(&self, version: u64, services: Vec<pb::ServiceConfig>) {
        {
            let mut st = self.server.state.lock().unwrap();
            st.version = version;
            for s in &services {
                st.services.insert(s.name.clone(), s.clone());
            }
        }
        let _ = self.server.updates.send(pb::Update { version, services, endpoint_hold_ms: 10_000 });
    }

    /// Waits until a sidecar ACKed (`Ok`) or NACKed (`Err`) `version`.
    pub async fn answer(&self, version: u64) -> Result<(), pb::Nack> {
        let state = self.server.state.clone();
        let found = crate::poll(std::time::Instant::now() + Duration::from_secs(20), || {
            let state = state.clone();
            async move {
                state.lock().unwrap().heard.iter().find_map(|m| match m {
                    pb::proxy_message::Msg::Ack(a) if a.version == version => Some(Ok(())),
                    pb::proxy_message::Msg::Nack(n) if n.version == version => Some(Err(n.clone())),
                    _ => None,
                })
            }
        })
        .await;
        found.unwrap_or_else(|| panic!("no ACK or NACK of version {version} within 20s"))
    }
}

impl Drop for FakeControl {
    fn drop(&mut self) {
        self.task.abort();
    }
}
