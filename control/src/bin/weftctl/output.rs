//! Writing results: tables for people, JSON or YAML for programs.

use crate::cli::Output;

/// Writes to stdout; a closed pipe (`| head`) ends quietly.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut o = std::io::stdout().lock();
        if writeln!(o, $($arg)*).is_err() {
            std::process::exit(0);
        }
    }};
}

/// Prints `rows` as JSON or YAML, or calls `table` for the table form.
pub(crate) fn emit<T: serde::Serialize>(output: Output, rows: &T, table: impl FnOnce()) {
    match output {
        Output::Table => table(),
        Output::Json => out!("{}", serde_json::to_string_pretty(rows).unwrap_or_default()),
        Output::Yaml => out!("{}", serde_saphyr::to_string(rows).unwrap_or_default().trim_end()),
    }
}

/// `2026-11-25T21:14:05Z` from Unix milliseconds; `-` when unknown.
pub(crate) fn format_time(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "-".into();
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Cuts `s` to `max` characters, marking the cut.
pub(crate) fn clip(s: String, max: usize) -> String {
    if s.chars().count() > max { format!("{}…", s.chars().take(max - 1).collect::<String>()) } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_rfc3339() {
        assert_eq!(format_time(0), "-");
        assert_eq!(format_time(1_764_105_245_000), "2025-11-25T21:14:05Z");
    }

    #[test]
    fn long_changes_are_clipped() {
        assert_eq!(clip("abcdef".into(), 4), "abc…");
        assert_eq!(clip("abc".into(), 4), "abc");
    }
}
