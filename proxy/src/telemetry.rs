//! Request metrics. Names follow the product contract:
//! `weft_requests_total{direction,service,tenant,code,degraded}` and
//! `weft_request_duration_seconds`.

use std::time::Duration;

pub fn record_request(
    direction: &'static str,
    service: &str,
    tenant: &str,
    code: u16,
    degraded: bool,
    elapsed: Duration,
) {
    let labels = [
        ("direction", direction.to_string()),
        ("service", service.to_string()),
        ("tenant", tenant.to_string()),
        ("code", code.to_string()),
        ("degraded", degraded.to_string()),
    ];
    metrics::counter!("weft_requests_total", &labels).increment(1);
    metrics::histogram!("weft_request_duration_seconds", "direction" => direction, "service" => service.to_string())
        .record(elapsed.as_secs_f64());
}
