//! Readiness of the local app: a TCP connect every second. The discovery
//! client reports changes, so a not-ready instance gets no traffic.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::watch;

pub(crate) async fn run(app: SocketAddr, ready: watch::Sender<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ok = matches!(
            tokio::time::timeout(Duration::from_millis(500), tokio::net::TcpStream::connect(app)).await,
            Ok(Ok(_))
        );
        ready.send_if_modified(|r| {
            let changed = *r != ok;
            if changed {
                tracing::info!(%app, ready = ok, "local app readiness changed");
            }
            *r = ok;
            changed
        });
    }
}
