//! Where each session of a service was last served (for routes with
//! `hash_on`, see [`crate::outbound::affinity`]), kept with the service's
//! other state across config versions, and bounded.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

/// Sessions remembered per service.
pub(crate) const MAX_SESSIONS: usize = 10_000;

/// Where each session of one service was last served.
#[derive(Debug, Default)]
pub(crate) struct Sessions(Mutex<HashMap<u64, (SocketAddr, u64)>>);

impl Sessions {
    /// The endpoint session `key` was last served by.
    pub(crate) fn get(&self, key: u64, now_ms: u64) -> Option<SocketAddr> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (addr, used) = m.get_mut(&key)?;
        *used = now_ms;
        Some(*addr)
    }

    /// Remembers that `addr` served session `key`.
    pub(crate) fn set(&self, key: u64, addr: SocketAddr, now_ms: u64) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= MAX_SESSIONS && !m.contains_key(&key) {
            // Forget the least recently used half (rarely: once per
            // MAX_SESSIONS / 2 new sessions).
            let mut used: Vec<u64> = m.values().map(|(_, u)| *u).collect();
            let (_, median, _) = used.select_nth_unstable(MAX_SESSIONS / 2);
            let median = *median;
            m.retain(|_, (_, u)| *u > median);
        }
        m.insert(key, (addr, now_ms));
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_remembered_are_bounded() {
        let s = Sessions::default();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        for k in 0..(MAX_SESSIONS as u64 * 3) {
            s.set(k, addr, k);
        }
        assert!(s.len() <= MAX_SESSIONS, "{}", s.len());
        let recent = MAX_SESSIONS as u64 * 3 - 1;
        assert_eq!(s.get(recent, recent + 1), Some(addr), "the most recent is kept");
        assert_eq!(s.get(0, recent + 1), None, "the oldest is forgotten");
    }
}
