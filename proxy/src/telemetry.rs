//! Request metrics. Names follow the product contract:
//! `weft_requests_total{direction,service,tenant,code,degraded}` and
//! `weft_request_duration_seconds`.

use std::cell::{Cell, RefCell};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// The tenant-label generation the cache was filled under.
    static GENERATION: Cell<u64> = const { Cell::new(0) };
}

/// Bumped when the configured tenants change, so that every thread drops
/// handles whose `tenant` label may now be wrong.
static TENANT_GENERATION: AtomicU64 = AtomicU64::new(0);

pub(crate) fn record_request(
    direction: &'static str,
    service: &str,
    tenant: &str,
    code: u16,
    degraded: bool,
    elapsed: Duration,
) {
    let key = LabelRef { direction, service, tenant, code, degraded };
    HANDLES.with_borrow_mut(|cache| {
        let generation = TENANT_GENERATION.load(Ordering::Relaxed);
        if GENERATION.get() != generation {
            GENERATION.set(generation);
            cache.clear();
        }
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

/// How many tenant names that no route or limit names get a `tenant` label
/// of their own. The name comes from a request header, so past this many the
/// rest are counted under `tenant="other"`: callers inventing tenant names
/// cannot grow the metrics registry (and every scrape) without bound.
/// Tenants the configuration names always keep their label.
const TENANT_LABELS: usize = 1000;
const OTHER_TENANTS: &str = "other";

#[derive(Default)]
struct TenantLabels {
    configured: HashSet<Box<str>>,
    seen: HashSet<Box<str>>,
}

static TENANTS: Mutex<Option<TenantLabels>> = Mutex::new(None);

/// Sets the tenants the configuration names (tenant routes and limits),
/// which always get a `tenant` label of their own.
pub(crate) fn set_configured_tenants<'a>(names: impl IntoIterator<Item = &'a str>) {
    let configured: HashSet<Box<str>> = names.into_iter().map(Box::from).collect();
    let mut t = TENANTS.lock().unwrap_or_else(|e| e.into_inner());
    let t = t.get_or_insert_with(TenantLabels::default);
    if t.configured != configured {
        t.configured = configured;
        TENANT_GENERATION.fetch_add(1, Ordering::Relaxed);
    }
}

impl TenantLabels {
    /// The `tenant` label for `tenant`: its own name if the configuration
    /// names it or while fewer than `limit` names have one, else `other`.
    fn label<'a>(&mut self, tenant: &'a str, limit: usize) -> &'a str {
        if self.configured.contains(tenant) || self.seen.contains(tenant) {
            return tenant;
        }
        if self.seen.len() < limit {
            self.seen.insert(tenant.into());
            return tenant;
        }
        OTHER_TENANTS
    }
}

/// The sidecar's `tenant` label for `tenant` ([`TenantLabels::label`]).
/// Looked up only when a label set is first seen on a thread.
fn tenant_label(tenant: &str) -> &str {
    let mut t = TENANTS.lock().unwrap_or_else(|e| e.into_inner());
    t.get_or_insert_with(TenantLabels::default).label(tenant, TENANT_LABELS)
}

/// Buckets of `weft_request_duration_seconds`: a hop through the sidecar
/// takes tens of microseconds, a model call tens of seconds, so the buckets
/// run from 100 µs to a minute. A histogram (not a summary) so that
/// instances can be summed.
pub const REQUEST_SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The histograms, all on [`REQUEST_SECONDS_BUCKETS`]: request duration;
/// time to first body byte and gaps between chunks of streamed answers.
pub const HISTOGRAMS: [&str; 3] =
    ["weft_request_duration_seconds", "weft_first_byte_seconds", "weft_stream_gap_seconds"];

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
    fn exactly_the_first_thousand_unnamed_tenants_get_a_label_of_their_own() {
        let mut t = TenantLabels::default();
        let names: Vec<String> = (0..TENANT_LABELS + 5).map(|i| format!("t{i}")).collect();
        let own = names.iter().filter(|n| t.label(n, TENANT_LABELS) != OTHER_TENANTS).count();
        assert_eq!(own, TENANT_LABELS);
        assert_eq!(t.label("t0", TENANT_LABELS), "t0", "a name seen before keeps its label");
        assert_eq!(t.label(&names[TENANT_LABELS], TENANT_LABELS), OTHER_TENANTS);
        // The configuration's tenants always have their own.
        t.configured.insert("acme".into());
        assert_eq!(t.label("acme", TENANT_LABELS), "acme");
    }

    #[test]
    fn configured_tenants_keep_their_label_and_drop_cached_handles() {
        let generation = TENANT_GENERATION.load(Ordering::Relaxed);
        set_configured_tenants(["acme-configured", "never-seen-before"]);
        assert_eq!(tenant_label("never-seen-before"), "never-seen-before");
        assert_eq!(tenant_label("acme-configured"), "acme-configured");
        assert!(TENANT_GENERATION.load(Ordering::Relaxed) > generation, "cached handles are dropped");
    }
}
