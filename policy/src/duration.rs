//! Durations in policy documents: `500ms`, `2s`, `1m`, `1h`, `1h30m`,
//! `1.5s` (humantime, plus a decimal number with one unit). More than zero,
//! at most a day.

use std::time::Duration;

/// The longest duration a policy may name.
pub const MAX: Duration = Duration::from_secs(86_400);

/// Parses a duration as written in a policy document.
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.starts_with('-') {
        return Err(format!("'{s}' is negative: a duration must be greater than zero"));
    }
    let d = match humantime::parse_duration(s) {
        Ok(d) => d,
        Err(_) => decimal(s)?,
    };
    check(d).map_err(|e| format!("'{s}' {e}"))
}

/// The bounds every duration of a policy keeps, however it was written.
pub fn check(d: Duration) -> Result<Duration, String> {
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    if d > MAX {
        return Err("is longer than a day".into());
    }
    Ok(d)
}

/// `1.5s`, `0.25h`: a decimal number and one unit.
fn decimal(s: &str) -> Result<Duration, String> {
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("'{s}' has no unit (use ms, s, m or h, e.g. 500ms, 2s)"))?;
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("'{s}' is not a duration (e.g. 500ms, 2s, 1m30s)"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("'{s}' is not a duration (e.g. 500ms, 2s, 1m30s; units ms, s, m, h)")),
    };
    if !secs.is_finite() || secs > MAX.as_secs_f64() {
        return Err(format!("'{s}' is longer than a day"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The shortest form of `d` as written in documents (`1500ms`, `2s`, `1m`).
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse(" 1h ").unwrap(), Duration::from_secs(3600));
        for bad in ["0s", "0ms", "5", "5y", "", "-1s", "25h", "2 parsecs", "1e309s"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(format(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format(Duration::from_secs(120)), "2m");
    }
}
