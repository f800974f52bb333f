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

    /// Keeps `calls`, each field cut to a sane length (sidecars send them,
    /// and a bad one must not grow this replica's memory).
    pub fn record(&self, calls: Vec<pb::DegradedCall>) {
        let mut q = self.calls.lock().expect("lock");
        // Only the newest `capacity` of a batch could stay anyway.
        let skip = calls.len().saturating_sub(self.capacity);
        for mut c in calls.into_iter().skip(skip) {
            cut(&mut c.trace_id, 64);
            cut(&mut c.service, 253);
            cut(&mut c.tenant, 63);
            cut(&mut c.reasons, 512);
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

fn cut(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
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

    #[test]
    fn oversized_fields_are_cut() {
        let log = TraceLog::new(3);
        let mut c = call(&"s".repeat(10_000), 1);
        c.tenant = "é".repeat(1000);
        c.reasons = "r".repeat(1 << 20);
        log.record(vec![c]);
        let got = &log.query("", 0, 1)[0];
        assert_eq!(got.service.len(), 253);
        assert!(got.tenant.len() <= 63 && got.tenant.chars().all(|ch| ch == 'é'));
        assert_eq!(got.reasons.len(), 512);
    }
}
