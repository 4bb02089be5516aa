//! How the CLI shows things: tables for people, JSON and YAML for scripts.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use muster_cli::terminal::escape;
use serde::Serialize;

/// `-o` formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Output {
    #[default]
    Table,
    Json,
    Yaml,
}

/// Writes `s` to stdout now. A closed pipe comes back as an error (see [`is_broken_pipe`])
/// rather than a panic as with `print!`.
pub fn emit(s: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(s.as_bytes())?;
    out.flush()
}

/// Whether `e` is, or was caused by, writing into a pipe whose reader has gone.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// RFC 3339 (UTC, seconds) of a Unix-ms time; `None` for 0.
pub fn rfc3339(ms: i64) -> Option<String> {
    (ms > 0)
        .then(|| humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms as u64)).to_string())
}

/// Unix milliseconds of `t`.
pub fn now_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// "3s ago", "5m ago", "in 2h", "never".
pub fn relative(ms: i64, now: SystemTime) -> String {
    if ms <= 0 {
        return "never".into();
    }
    let now_ms = now.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    let (d, future) = if ms > now_ms { (ms - now_ms, true) } else { (now_ms - ms, false) };
    let secs = d / 1000;
    let text = match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m", secs / 60),
        3600..=86_399 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    };
    if future {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

/// Serializes for `-o json|yaml`.
pub fn render<T: Serialize>(v: &T, o: Output) -> anyhow::Result<String> {
    Ok(match o {
        Output::Json => serde_json::to_string_pretty(v)? + "\n",
        Output::Yaml => serde_saphyr::to_string(v)?,
        Output::Table => String::new(),
    })
}

/// A plain aligned table. Every cell is [`escape`]d: cells hold what nodes and operators wrote.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> =
        rows.iter().map(|r| r.iter().map(|c| escape(c).into_owned()).collect()).collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}   ", w = widths[i]));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in &rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broken_pipes_are_recognised() {
        let e = anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe)).context("writing");
        assert!(is_broken_pipe(&e));
        assert!(!is_broken_pipe(&anyhow::anyhow!("broken pipe, but only in words")));
    }

    #[test]
    fn relative_times() {
        let now = UNIX_EPOCH + Duration::from_secs(100_000);
        assert_eq!(relative(0, now), "never");
        let later = UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(relative(1_000_000_000 - 3 * 86_400_000, later), "3d ago");
        assert_eq!(relative(99_000_000, now), "16m ago");
        assert_eq!(relative(100_000_000 + 7_200_000, now), "in 2h");
        assert_eq!(relative(100_000_000, now), "0s ago");
        assert_eq!(relative(100_000_000 - 59_999, now), "59s ago");
        assert_eq!(relative(100_000_000 - 60_000, now), "1m ago");
        assert_eq!(relative(-5, now), "never");
    }
}
