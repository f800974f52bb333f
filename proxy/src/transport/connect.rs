//! Connections to upstreams: dialling (no Nagle delay, TCP keep-alive),
//! mTLS to sidecars that speak it, the HTTP/1.1 and HTTP/2 handshakes, the task that drives each connection, and
//! what their errors mean.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::Error;
use super::pool::{H2Sender, Sender};
use super::tls::ClientTls;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);
const H2_PING: Duration = Duration::from_secs(20);

/// mTLS to an instance of a service: the client side and the service.
pub(super) type Tls<'a> = Option<(&'a ClientTls, &'a str)>;

pub(super) async fn connect_h1(addr: SocketAddr, tls: Tls<'_>) -> Result<Sender, Error> {
    let tcp = dial(addr).await?;
    match tls {
        None => handshake_h1(addr, tcp).await,
        Some((client, service)) => handshake_h1(addr, secure(addr, tcp, client, service, false).await?).await,
    }
}

pub(super) async fn connect_h2(addr: SocketAddr, tls: Tls<'_>) -> Result<H2Sender, Error> {
    let tcp = dial(addr).await?;
    match tls {
        None => handshake_h2(addr, tcp).await,
        Some((client, service)) => handshake_h2(addr, secure(addr, tcp, client, service, true).await?).await,
    }
}

async fn secure(
    addr: SocketAddr,
    tcp: TcpStream,
    client: &ClientTls,
    service: &str,
    h2: bool,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, Error> {
    client.connect(tcp, service, h2).await.map_err(|reason| Error::Connect { addr: addr.to_string(), reason })
}

async fn handshake_h1<T>(addr: SocketAddr, io: T) -> Result<Sender, Error>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (tx, conn) =
        http1::Builder::new().writev(false).handshake(TokioIo::new(io)).await.map_err(|e| handshake_error(addr, &e))?;
    drive(addr, conn.with_upgrades());
    Ok(tx)
}

async fn handshake_h2<T>(addr: SocketAddr, io: T) -> Result<H2Sender, Error>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (tx, conn) = http2::Builder::new(BoxedExec)
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_PING)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| handshake_error(addr, &e))?;
    drive(addr, conn);
    Ok(tx)
}

/// Spawns hyper's HTTP/2 tasks (one per stream on each side of a call)
/// boxed. A task's future is moved several times on its way into the
/// runtime and written over when it ends, and a call's future is kilobytes;
/// boxed, each of those moves is a pointer. HTTP/1.1 spawns nothing.
#[derive(Clone, Copy)]
pub(crate) struct BoxedExec;

impl<F> hyper::rt::Executor<F> for BoxedExec
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(Box::pin(fut));
    }
}

/// Runs a connection until it closes.
fn drive(addr: SocketAddr, conn: impl Future<Output = hyper::Result<()>> + Send + 'static) {
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%addr, error = %e, "upstream connection ended with an error");
        }
    });
}

/// A TCP connection to an upstream: no Nagle delay, TCP keep-alive on.
pub(crate) async fn dial(addr: SocketAddr) -> Result<TcpStream, Error> {
    let connect_err = |reason: String| Error::Connect { addr: addr.to_string(), reason };
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(connect_err(e.to_string())),
        Err(_) => return Err(connect_err(format!("no connection within {CONNECT_TIMEOUT:?}"))),
    };
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE));
    Ok(stream)
}

fn handshake_error(addr: SocketAddr, e: &hyper::Error) -> Error {
    Error::Connect { addr: addr.to_string(), reason: error_chain(e) }
}

pub(super) fn upstream_error(addr: SocketAddr, e: &hyper::Error) -> Error {
    match h2_reset(e) {
        Some(reason) => Error::Reset { addr: addr.to_string(), reason: format!("{reason:?}") },
        None => Error::Upstream { addr: addr.to_string(), reason: error_chain(e) },
    }
}

/// The HTTP/2 reset code, when the upstream reset the stream or connection.
fn h2_reset(e: &(dyn std::error::Error + 'static)) -> Option<h2::Reason> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.reason();
        }
        cur = err.source();
    }
    None
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
