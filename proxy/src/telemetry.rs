//! Request metrics. Names follow the product contract:
//! `weft_requests_total{direction,service,tenant,code,degraded}` and
//! `weft_request_duration_seconds`.

use std::time::Duration;

use std::cell::RefCell;

use hashbrown::{Equivalent, HashMap};
use metrics::{Counter, Histogram, Label};

/// Status codes common enough to label without allocating.
fn code_label(code: u16) -> Label {
    let s: &'static str = match code {
        200 => "200",
        201 => "201",
        204 => "204",
        400 => "400",
        404 => "404",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        other => return Label::new("code", other.to_string()),
    };
    Label::from_static_parts("code", s)
}

/// The metric handles of one label set, resolved once per thread: a request
/// then costs a hash lookup and two atomic updates, not label allocations
/// and a registry lookup.
struct Handles {
    requests: Counter,
    duration: Histogram,
}

#[derive(Hash, PartialEq, Eq)]
struct LabelSet {
    direction: &'static str,
    service: Box<str>,
    tenant: Box<str>,
    code: u16,
    degraded: bool,
}

#[derive(Hash)]
struct LabelRef<'a> {
    direction: &'static str,
    service: &'a str,
    tenant: &'a str,
    code: u16,
    degraded: bool,
}

impl Equivalent<LabelSet> for LabelRef<'_> {
    fn equivalent(&self, k: &LabelSet) -> bool {
        self.direction == k.direction
            && self.code == k.code
            && self.degraded == k.degraded
            && self.service == &*k.service
            && self.tenant == &*k.tenant
    }
}

/// Label sets cached per thread; past this the cache starts over, so a flood
/// of distinct tenant names cannot grow it without bound.
const CACHE_LIMIT: usize = 4096;

thread_local! {
    static HANDLES: RefCell<HashMap<LabelSet, Handles>> = RefCell::new(HashMap::new());
}

pub fn record_request(
    direction: &'static str,
    service: &str,
    tenant: &str,
    code: u16,
    degraded: bool,
    elapsed: Duration,
) {
    let key = LabelRef { direction, service, tenant, code, degraded };
    HANDLES.with_borrow_mut(|cache| {
        if let Some(h) = cache.get(&key) {
            h.requests.increment(1);
            h.duration.record(elapsed.as_secs_f64());
            return;
        }
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        let handles = register(direction, service, tenant, code, degraded);
        handles.requests.increment(1);
        handles.duration.record(elapsed.as_secs_f64());
        let set = LabelSet { direction, service: service.into(), tenant: tenant.into(), code, degraded };
        cache.insert(set, handles);
    });
}

fn register(direction: &'static str, service: &str, tenant: &str, code: u16, degraded: bool) -> Handles {
    let labels = vec![
        Label::from_static_parts("direction", direction),
        Label::new("service", service.to_owned()),
        Label::new("tenant", tenant.to_owned()),
        code_label(code),
        Label::from_static_parts("degraded", if degraded { "true" } else { "false" }),
    ];
    let requests = metrics::counter!("weft_requests_total", labels);
    let labels = vec![Label::from_static_parts("direction", direction), Label::new("service", service.to_owned())];
    let duration = metrics::histogram!("weft_request_duration_seconds", labels);
    Handles { requests, duration }
}
