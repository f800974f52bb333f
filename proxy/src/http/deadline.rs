//! Deadlines across an agent chain.
//!
//! The first sidecar on a chain fixes a call's deadline: the route's
//! `timeout`, or what the caller asks for (`grpc-timeout`, or an
//! `x-weft-deadline-ms` it passes on), whichever is sooner. Each try carries
//! the time left to the next hop, `grpc-timeout` for gRPC and
//! `x-weft-deadline-ms` (milliseconds) for HTTP. The callee's sidecar bounds
//! its wait for the app by it, refuses at once a call whose time is up, and
//! remembers the deadline under the call's trace id ([`Linked`]): when its
//! app calls on within the same trace (it passes `traceparent` on, as every
//! app in a mesh does), the sidecar's outbound side holds that call to the
//! same deadline, without the app having to know of it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::time::Instant;

use super::errors::ProxyError;
use super::headers::TRACEPARENT;

/// The time left, in milliseconds, on HTTP calls between sidecars.
pub(crate) static DEADLINE_MS: HeaderName = HeaderName::from_static("x-weft-deadline-ms");
/// gRPC's own.
pub(crate) static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// Trace ids remembered at most (entries go when their deadline has passed
/// by [`LINGER`]).
const MAX_LINKED: usize = 10_000;
/// How long after its deadline a trace's entry is kept: a call the app
/// makes just after is refused, not given a fresh deadline.
const LINGER: Duration = Duration::from_secs(5);

/// The time left that `headers` carry (the sooner of the two headers);
/// `Err` for a value that is not one.
pub(crate) fn carried(headers: &HeaderMap) -> Result<Option<Duration>, ProxyError> {
    // One pass over the names: almost no call has either header, and this
    // is cheaper than two hashed lookups.
    if !headers.keys().any(|k| k == DEADLINE_MS || k == GRPC_TIMEOUT) {
        return Ok(None);
    }
    let bad = |name: &HeaderName, v: &HeaderValue| {
        ProxyError::BadDeadline(format!("{name}: {}", super::errors::clip(&String::from_utf8_lossy(v.as_bytes()))))
    };
    let mut left: Option<Duration> = None;
    if let Some(v) = headers.get(&DEADLINE_MS) {
        let ms = v.to_str().ok().and_then(|s| s.parse::<u64>().ok()).ok_or_else(|| bad(&DEADLINE_MS, v))?;
        left = Some(Duration::from_millis(ms));
    }
    if let Some(v) = headers.get(&GRPC_TIMEOUT) {
        let d = v.to_str().ok().and_then(parse_grpc_timeout).ok_or_else(|| bad(&GRPC_TIMEOUT, v))?;
        left = Some(left.map_or(d, |l| l.min(d)));
    }
    Ok(left)
}

/// gRPC's `TimeoutValue TimeoutUnit`: at most 8 digits, then one of
/// `H M S m u n`.
pub(crate) fn parse_grpc_timeout(s: &str) -> Option<Duration> {
    let (digits, unit) = s.split_at(s.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `left` as a `grpc-timeout` value, in the finest unit that fits 8 digits.
pub(crate) fn format_grpc_timeout(left: Duration) -> HeaderValue {
    let ms = left.as_millis();
    let v = if ms < 100_000_000 {
        format!("{ms}m")
    } else if left.as_secs() < 100_000_000 {
        format!("{}S", left.as_secs())
    } else {
        format!("{}M", (left.as_secs() / 60).min(99_999_999))
    };
    HeaderValue::from_str(&v).expect("digits and a unit")
}

/// Puts the time left until `deadline` on a try's headers.
pub(crate) fn stamp(headers: &mut HeaderMap, deadline: Instant, grpc: bool) {
    let left = deadline.saturating_duration_since(Instant::now());
    if grpc {
        headers.insert(&GRPC_TIMEOUT, format_grpc_timeout(left));
        headers.remove(&DEADLINE_MS);
    } else {
        headers.insert(&DEADLINE_MS, HeaderValue::from(left.as_millis() as u64));
    }
}

/// The sooner of two deadlines, either of which may be absent.
pub(crate) fn sooner(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The trace id of a `traceparent` value.
pub(crate) fn trace_id(traceparent: &HeaderValue) -> Option<u128> {
    let s = traceparent.to_str().ok()?;
    let id = s.get(3..35).filter(|_| s.as_bytes().get(2) == Some(&b'-'))?;
    u128::from_str_radix(id, 16).ok().filter(|id| *id != 0)
}

/// Deadlines of the calls this sidecar's app is serving, by trace id.
#[derive(Default)]
pub(crate) struct Linked {
    map: Mutex<HashMap<u128, Instant>>,
    len: AtomicUsize,
}

impl Linked {
    /// Remembers `deadline` for `trace` (the sooner, if it has one).
    pub(crate) fn record(&self, trace: u128, deadline: Instant) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_LINKED {
            let now = Instant::now();
            map.retain(|_, d| *d + LINGER > now);
        }
        if map.len() < MAX_LINKED {
            let d = map.entry(trace).or_insert(deadline);
            *d = (*d).min(deadline);
        }
        self.len.store(map.len(), Ordering::Relaxed);
    }

    /// Remembers `deadline` for the trace of the call with `headers`, if it
    /// has one.
    pub(crate) fn record_for(&self, headers: &HeaderMap, deadline: Instant) {
        if let Some(trace) = headers.get(&TRACEPARENT).and_then(trace_id) {
            self.record(trace, deadline);
        }
    }

    /// The deadline the call with `headers` is held to by its trace; the
    /// trace id is read only when something is remembered.
    pub(crate) fn of(&self, headers: &HeaderMap) -> Option<Instant> {
        if self.len.load(Ordering::Relaxed) == 0 {
            return None;
        }
        self.get(headers.get(&TRACEPARENT).and_then(trace_id)?)
    }

    /// The deadline of the call the app serves within `trace`, if any.
    fn get(&self, trace: u128) -> Option<Instant> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&trace).copied().filter(|d| *d + LINGER > Instant::now())
    }

    /// Drops the entries whose deadline passed more than [`LINGER`] ago.
    pub(crate) fn sweep(&self) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        map.retain(|_, d| *d + LINGER > now);
        self.len.store(map.len(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_and_format_both_ways() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("5000u"), Some(Duration::from_millis(5)));
        for bad in ["", "m", "12", "123456789m", "1x", "-1m", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
        assert_eq!(format_grpc_timeout(Duration::from_secs(1 << 40)), "99999999M", "the longest gRPC can say");
        for d in
            [Duration::ZERO, Duration::from_millis(1234), Duration::from_secs(200_000), Duration::from_secs(1 << 28)]
        {
            let v = format_grpc_timeout(d);
            let back = parse_grpc_timeout(v.to_str().unwrap()).unwrap();
            assert!(back <= d && d - back < Duration::from_secs(60), "{d:?} → {v:?} → {back:?}");
        }
    }

    #[test]
    fn the_sooner_of_the_two_headers_counts_and_a_bad_value_is_an_error() {
        let mut h = HeaderMap::new();
        assert_eq!(carried(&h).unwrap(), None);
        h.insert(&DEADLINE_MS, HeaderValue::from_static("800"));
        assert_eq!(carried(&h).unwrap(), Some(Duration::from_millis(800)));
        h.insert(&GRPC_TIMEOUT, HeaderValue::from_static("300m"));
        assert_eq!(carried(&h).unwrap(), Some(Duration::from_millis(300)));
        h.insert(&DEADLINE_MS, HeaderValue::from_static("soon"));
        assert!(matches!(carried(&h), Err(ProxyError::BadDeadline(m)) if m.contains("x-weft-deadline-ms: soon")));
    }

    #[test]
    fn trace_ids_are_read_from_traceparent() {
        let tp = HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert_eq!(trace_id(&tp), Some(0x4bf92f3577b34da6a3ce929d0e0e4736));
        assert_eq!(
            trace_id(&HeaderValue::from_static("00-00000000000000000000000000000000-00f067aa0ba902b7-01")),
            None
        );
        assert_eq!(trace_id(&HeaderValue::from_static("garbage")), None);
    }

    #[tokio::test(start_paused = true)]
    async fn linked_deadlines_keep_the_sooner_and_go_after_they_pass() {
        let linked = Linked::default();
        let now = Instant::now();
        assert_eq!(linked.get(7), None);
        linked.record(7, now + Duration::from_secs(2));
        linked.record(7, now + Duration::from_secs(1));
        linked.record(7, now + Duration::from_secs(3));
        assert_eq!(linked.get(7), Some(now + Duration::from_secs(1)));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(linked.get(7), Some(now + Duration::from_secs(1)), "kept a while past its deadline");
        tokio::time::advance(LINGER).await;
        assert_eq!(linked.get(7), None);
        linked.sweep();
        assert_eq!(linked.len.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_bound_passed_deadlines_make_room_and_live_ones_are_kept() {
        let linked = Linked::default();
        let now = Instant::now();
        for i in 0..MAX_LINKED as u128 {
            linked.record(i + 1, now + if i % 2 == 0 { Duration::ZERO } else { Duration::from_secs(60) });
        }
        linked.record(u128::MAX, now + Duration::from_secs(60));
        assert_eq!(linked.get(u128::MAX), None, "full of live entries: not remembered");
        tokio::time::advance(LINGER + Duration::from_secs(1)).await;
        linked.record(u128::MAX, now + Duration::from_secs(60));
        assert!(linked.get(u128::MAX).is_some(), "the passed half made room");
        assert!(linked.get(2).is_some(), "a live one stays");
    }
}
