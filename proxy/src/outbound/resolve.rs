//! Which service: the table holds every service this sidecar subscribed to;
//! a miss subscribes and waits for the control plane's answer.

use std::sync::Arc;
use std::time::Duration;

use super::{Outbound, Sender};
use crate::config::Service;
use crate::http::errors::ProxyError;

/// How long a request for a service never seen before waits for discovery.
const DISCOVERY_WAIT: Duration = Duration::from_secs(3);

impl<S: Sender> Outbound<S> {
    /// Finds the service in the table, subscribing and waiting on a miss.
    pub(crate) async fn resolve(&self, service: &str) -> Result<Arc<Service>, ProxyError> {
        if let Some(s) = self.shared.table.load().services.get(service) {
            s.stats.touch();
            return Ok(s.clone());
        }
        // Boxed: the wait is rare and would otherwise enlarge every call's
        // future.
        Box::pin(self.discover(service)).await
    }

    /// The service, when the control plane knows it.
    pub(crate) async fn known(&self, service: &str) -> Option<Arc<Service>> {
        self.resolve(service).await.ok().filter(|s| s.known)
    }

    /// Subscribes to a service not in the table yet and waits for it.
    async fn discover(&self, service: &str) -> Result<Arc<Service>, ProxyError> {
        let mut changed = self.shared.table_changed.subscribe();
        if !self.shared.subscribe(service) {
            return Err(ProxyError::TooManyServices(service.to_string()));
        }
        let wait = async {
            loop {
                if let Some(s) = self.shared.table.load().services.get(service) {
                    s.stats.touch();
                    return Some(s.clone());
                }
                if changed.changed().await.is_err() {
                    return None;
                }
            }
        };
        match tokio::time::timeout(DISCOVERY_WAIT, wait).await {
            Ok(Some(s)) => Ok(s),
            _ => Err(ProxyError::NoDiscovery(service.to_string())),
        }
    }
}
