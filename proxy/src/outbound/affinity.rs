//! Session affinity (`hash_on`): the calls of one session (the value of a
//! header such as `mcp-session-id`, or of a cookie) go to one endpoint while
//! it is healthy; when it is ejected or gone they move to another, and stay
//! there, even once the first comes back.
//!
//! A session's first endpoint is chosen by rendezvous hashing over the
//! backend's endpoints, so every caller's sidecar sends a new session to the
//! same place without talking to the others. Where a session was last
//! served is then remembered ([`crate::health::sessions`]: at most 10,000
//! per service, the least recently used forgotten first), which is what keeps a moved
//! session where it moved. Calls without the header or cookie balance by
//! P2C as usual.

use std::net::SocketAddr;
use std::sync::Arc;

use weft_policy::model::HashOn;

use crate::hash::fnv1a;

use crate::config::Endpoint;

/// The session of a request under `hash_on`, as a hash of its value.
pub(crate) fn key<B>(hash_on: &HashOn, req: &http::Request<B>) -> Option<u64> {
    match hash_on {
        HashOn::Header(h) => req.headers().get(h).map(|v| fnv1a(v.as_bytes())),
        HashOn::Cookie(name) => req
            .headers()
            .get_all(http::header::COOKIE)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
            .find_map(|pair| {
                let pair = pair.trim_ascii();
                let (k, v) = pair.split_at(pair.iter().position(|b| *b == b'=')?);
                (k == name.as_bytes()).then(|| fnv1a(&v[1..]))
            }),
    }
}

/// A well-mixed 64-bit hash (splitmix64's finaliser).
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The rendezvous score of `addr` for session `key`.
fn score(key: u64, addr: &SocketAddr) -> u64 {
    let a = match addr {
        SocketAddr::V4(v4) => fnv1a(&v4.ip().octets()),
        SocketAddr::V6(v6) => fnv1a(&v6.ip().octets()),
    };
    mix(key ^ mix(a ^ u64::from(addr.port())))
}

/// The endpoint for session `key`: the one it was last served by (`pinned`)
/// while eligible, else the highest-scoring eligible one, preferring those
/// this call has not tried. The flag is true when the session had to move
/// off an ejected endpoint.
pub(crate) fn pick(
    endpoints: &[Arc<Endpoint>],
    key: u64,
    pinned: Option<SocketAddr>,
    tried: &[SocketAddr],
    now_ms: u64,
) -> (Option<Arc<Endpoint>>, bool) {
    let usable = |e: &Arc<Endpoint>| !e.health.is_ejected(now_ms) && !tried.contains(&e.addr);
    let held = pinned.and_then(|p| endpoints.iter().find(|e| e.addr == p));
    if let Some(e) = held.filter(|e| usable(e)) {
        return (Some(e.clone()), false);
    }
    // One pass: the best of all (a new session's first choice), of those
    // not ejected, and of those this call has not tried either.
    let (mut top, mut eligible, mut fresh) = (None, None, None);
    for e in endpoints {
        let s = score(key, &e.addr);
        let better = |best: &Option<(u64, &Arc<Endpoint>)>| best.is_none_or(|(b, _)| s > b);
        if better(&top) {
            top = Some((s, e));
        }
        if !e.health.is_ejected(now_ms) {
            if better(&eligible) {
                eligible = Some((s, e));
            }
            if !tried.contains(&e.addr) && better(&fresh) {
                fresh = Some((s, e));
            }
        }
    }
    // The session changed course when the endpoint it had (or, new, would
    // have had) is ejected; one that is gone changed nothing of the breaker's.
    let had = if pinned.is_some() { held } else { top.map(|(_, e)| e) };
    let moved_off_ejected = had.is_some_and(|e| e.health.is_ejected(now_ms));
    (fresh.or(eligible).map(|(_, e)| e.clone()), moved_off_ejected)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::health::{Health, Settings};

    fn ep(port: u16) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            proxy_id: format!("p{port}"),
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            labels: BTreeMap::new(),
            ready: true,
            mtls: false,
            health: Arc::new(Health::default()),
            held_until_ms: 0,
        })
    }

    fn req(headers: &[(&str, &str)]) -> http::Request<()> {
        let mut b = http::Request::builder();
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn the_session_is_the_header_or_the_cookie() {
        let h = HashOn::Header(http::HeaderName::from_static("mcp-session-id"));
        assert_eq!(key(&h, &req(&[("mcp-session-id", "a")])), key(&h, &req(&[("mcp-session-id", "a")])));
        assert_ne!(key(&h, &req(&[("mcp-session-id", "a")])), key(&h, &req(&[("mcp-session-id", "b")])));
        assert_eq!(key(&h, &req(&[])), None);
        let c = HashOn::Cookie("sid".into());
        let k = key(&c, &req(&[("cookie", "theme=dark; sid=abc")]));
        assert_eq!(k, Some(fnv1a(b"abc")));
        assert_eq!(key(&c, &req(&[("cookie", "theme=dark"), ("cookie", "sid=abc")])), k, "any cookie header");
        assert_eq!(key(&c, &req(&[("cookie", "xsid=abc")])), None);
    }

    #[test]
    fn sessions_spread_and_stay_where_they_moved() {
        let eps: Vec<_> = (1..=3).map(ep).collect();
        let now = crate::clock::now_ms();
        let first = |k: u64| pick(&eps, k, None, &[], now).0.unwrap().addr.port();
        let mut per = [0; 3];
        for k in 0..3000 {
            per[usize::from(first(k)) - 1] += 1;
            assert_eq!(first(k), first(k), "the same session, the same endpoint");
        }
        assert!(per.iter().all(|n| (800..=1200).contains(n)), "{per:?}");

        // Session on endpoint 1; endpoint 1 is ejected: it moves (marked),
        // is remembered there, and stays once 1 is back.
        let k = (0..).find(|k| first(*k) == 1).unwrap();
        let s = Settings { consecutive_failures: 1, ..Default::default() };
        eps[0].health.breaker.eject(now, &s);
        let (moved, off_ejected) = pick(&eps, k, Some(eps[0].addr), &[], now);
        let moved = moved.unwrap();
        assert!(moved.addr.port() != 1 && off_ejected);
        let sessions = crate::health::sessions::Sessions::default();
        sessions.set(k, moved.addr, now);
        let later = now + 600_000;
        assert!(!eps[0].health.is_ejected(later), "endpoint 1 is back");
        assert_eq!(pick(&eps, k, sessions.get(k, later), &[], later).0.unwrap().addr, moved.addr);
        // Gone: the remembered endpoint is no longer listed.
        let rest: Vec<_> = eps.iter().filter(|e| e.addr != moved.addr).cloned().collect();
        let (again, off_ejected) = pick(&rest, k, Some(moved.addr), &[], later);
        assert!(again.is_some_and(|e| e.addr != moved.addr) && !off_ejected);
        // A retry goes elsewhere than the endpoint it tried.
        let (retry, _) = pick(&eps, k, Some(moved.addr), &[moved.addr], later);
        assert_ne!(retry.unwrap().addr, moved.addr);
    }
}
