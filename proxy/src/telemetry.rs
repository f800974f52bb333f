//! Request metrics. Names follow the product contract:
//! `weft_requests_total{direction,service,tenant,code,degraded}` and
//! `weft_request_duration_seconds`.

use std::cell::RefCell;
use std::sync::Mutex;
use std::time::Duration;

use hashbrown::{Equivalent, HashMap, HashSet};
use metrics::{Counter, Histogram, Label};

/// The metric handles of one label set, resolved once per thread (labels are
/// built only then): a request costs a hash lookup and two atomic updates,
/// not label allocations and a registry lookup.
struct Handles {
    requests: Counter,
    duration: Histogram,
}

impl Handles {
    fn record(&self, elapsed: Duration) {
        self.requests.increment(1);
        self.duration.record(elapsed.as_secs_f64());
    }
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
            return h.record(elapsed);
        }
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        let handles = register(direction, service, tenant_label(tenant), code, degraded);
        handles.record(elapsed);
        let set = LabelSet { direction, service: service.into(), tenant: tenant.into(), code, degraded };
        cache.insert(set, handles);
    });
}

/// How many tenant names get a `tenant` label of their own. The name comes
/// from a request header, so past this many the rest are counted under
/// `tenant="other"`: callers inventing tenant names cannot grow the metrics
/// registry (and every scrape) without bound.
const TENANT_LABELS: usize = 1000;
const OTHER_TENANTS: &str = "other";

static TENANTS: Mutex<Option<HashSet<Box<str>>>> = Mutex::new(None);

/// The `tenant` label for `tenant`: its own name while there is room, else
/// `other`. Looked up only when a label set is first seen on a thread.
fn tenant_label(tenant: &str) -> &str {
    let mut seen = TENANTS.lock().unwrap_or_else(|e| e.into_inner());
    let seen = seen.get_or_insert_with(HashSet::new);
    if seen.contains(tenant) {
        return tenant;
    }
    if seen.len() < TENANT_LABELS {
        seen.insert(tenant.into());
        return tenant;
    }
    OTHER_TENANTS
}

fn register(direction: &'static str, service: &str, tenant: &str, code: u16, degraded: bool) -> Handles {
    let labels = vec![
        Label::from_static_parts("direction", direction),
        Label::new("service", service.to_owned()),
        Label::new("tenant", tenant.to_owned()),
        Label::new("code", code.to_string()),
        Label::from_static_parts("degraded", if degraded { "true" } else { "false" }),
    ];
    let requests = metrics::counter!("weft_requests_total", labels);
    let labels = vec![Label::from_static_parts("direction", direction), Label::new("service", service.to_owned())];
    let duration = metrics::histogram!("weft_request_duration_seconds", labels);
    Handles { requests, duration }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_labels_are_bounded() {
        // Other tests in this process may have used a few names already.
        let mut own = 0;
        let mut i = 0;
        while tenant_label(&format!("t{i}")) != OTHER_TENANTS {
            own += 1;
            i += 1;
            assert!(own <= TENANT_LABELS, "more than {TENANT_LABELS} tenant labels");
        }
        assert!(own > 0);
        // A name seen before keeps its label; a new one is "other".
        assert_eq!(tenant_label("t0"), "t0");
        assert_eq!(tenant_label("never-seen-before"), OTHER_TENANTS);
    }
}
