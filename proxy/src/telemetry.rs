//! Request metrics. Names follow the product contract:
//! `weft_requests_total{direction,service,tenant,code,degraded}` and
//! `weft_request_duration_seconds`.

use std::time::Duration;

use metrics::Label;

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

pub fn record_request(
    direction: &'static str,
    service: &str,
    tenant: &str,
    code: u16,
    degraded: bool,
    elapsed: Duration,
) {
    let labels = vec![
        Label::from_static_parts("direction", direction),
        Label::new("service", service.to_owned()),
        Label::new("tenant", tenant.to_owned()),
        code_label(code),
        Label::from_static_parts("degraded", if degraded { "true" } else { "false" }),
    ];
    metrics::counter!("weft_requests_total", labels).increment(1);
    let labels = vec![Label::from_static_parts("direction", direction), Label::new("service", service.to_owned())];
    metrics::histogram!("weft_request_duration_seconds", labels).record(elapsed.as_secs_f64());
}
