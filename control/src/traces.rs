//! Recent degraded calls reported by this replica's sidecars, for
//! `weftctl traces --degraded`. A bounded ring: the newest are kept.

use std::collections::VecDeque;
use std::sync::Mutex;

use xds_proto::v1 as pb;

pub struct TraceLog {
    calls: Mutex<VecDeque<pb::DegradedCall>>,
    capacity: usize,
}

impl TraceLog {
    pub fn new(capacity: usize) -> TraceLog {
        TraceLog { calls: Mutex::new(VecDeque::with_capacity(capacity.min(1024))), capacity }
    }

    pub fn record(&self, calls: Vec<pb::DegradedCall>) {
        let mut q = self.calls.lock().expect("lock");
        for c in calls {
            if q.len() == self.capacity {
                q.pop_front();
            }
            q.push_back(c);
        }
    }

    /// Newest first; `since_ms` is a Unix time in milliseconds (0 = all).
    pub fn query(&self, service: &str, since_ms: u64, limit: usize) -> Vec<pb::DegradedCall> {
        let q = self.calls.lock().expect("lock");
        q.iter()
            .rev()
            .filter(|c| service.is_empty() || c.service == service)
            .filter(|c| c.unix_ms >= since_ms)
            .take(limit)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(service: &str, t: u64) -> pb::DegradedCall {
        pb::DegradedCall { service: service.into(), unix_ms: t, ..Default::default() }
    }

    #[test]
    fn keeps_the_newest_and_filters() {
        let log = TraceLog::new(3);
        log.record(vec![call("a", 1), call("b", 2), call("a", 3), call("a", 4)]);
        let all = log.query("", 0, 10);
        assert_eq!(all.iter().map(|c| c.unix_ms).collect::<Vec<_>>(), vec![4, 3, 2]);
        assert_eq!(log.query("a", 0, 10).len(), 2);
        assert_eq!(log.query("a", 4, 10).len(), 1);
    }
}
