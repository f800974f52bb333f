//! Opaque TCP: a captured connection that is not HTTP goes on byte for
//! byte, counted: the app's own to the destination it dialled, a peer's to
//! the app's port it was for.

use std::net::SocketAddr;

use tokio::net::TcpStream;

/// Forwards `client` to `dest` until either side closes.
pub(crate) async fn forward(client: TcpStream, dest: SocketAddr, direction: &'static str, why: &'static str) {
    metrics::counter!("weft_tcp_connections_total", "direction" => direction, "detected" => why).increment(1);
    let Some(slot) = super::splice::slot("opaque", direction) else { return };
    let upstream = match super::connect::dial(dest).await {
        Ok(s) => s,
        Err(e) => {
            metrics::counter!("weft_tcp_connect_failures_total", "direction" => direction).increment(1);
            tracing::debug!(%dest, error = %e, "opaque connection: cannot reach its destination");
            return;
        }
    };
    super::splice::run(slot, client, upstream).await;
}
