//! How listings are printed: a table for people, JSON for programs. Every
//! listing builds rows of one serializable struct, so both forms always show
//! the same fields.

use comfy_table::presets::NOTHING;
use comfy_table::{ContentArrangement, Table};
use serde::Serialize;

/// `-o table` or `-o json`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns.
    #[default]
    Table,
    /// A JSON array of objects (one object for `show` commands).
    Json,
}

/// A row of a listing: its column headers and its cells.
pub trait Row: Serialize {
    /// Column headers, in order.
    fn headers() -> &'static [&'static str];
    /// The cells, in the order of the headers.
    fn cells(&self) -> Vec<String>;
}

/// `println!` that hands back a failed write instead of panicking, so that
/// a closed stdout (`fabricctl ... | head`) ends the command quietly
/// ([`is_closed_stdout`]) instead of with a panic.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::write_line(format_args!($($arg)*))
    };
}

/// Write one line to stdout (see [`outln!`]).
pub fn write_line(line: std::fmt::Arguments<'_>) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_fmt(line)?;
    out.write_all(b"\n")
}

/// Write `bytes` to stdout and flush it (see [`outln!`]).
pub fn write_all(bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.flush()
}

/// Whether `err` is a write to a stdout whose reader has gone (EPIPE, as
/// `| head` does once it has its lines): not a failure of the command,
/// which then ends quietly.
pub fn is_closed_stdout(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Print `rows` as a table or as JSON.
pub fn print_rows<R: Row>(rows: &[R], format: OutputFormat) -> anyhow::Result<()> {
    match format {
        OutputFormat::Json => outln!("{}", serde_json::to_string_pretty(rows)?)?,
        OutputFormat::Table => {
            let mut table = Table::new();
            table
                .load_preset(NOTHING)
                .set_content_arrangement(ContentArrangement::Disabled)
                .set_header(R::headers().iter().map(|h| h.to_uppercase()));
            for row in rows {
                table.add_row(row.cells());
            }
            let text = table.to_string();
            for line in text.lines() {
                outln!("{}", line.trim_end())?;
            }
        }
    }
    Ok(())
}

/// Print one value as JSON, or with `describe` for people.
pub fn print_one<T: Serialize>(
    value: &T,
    format: OutputFormat,
    describe: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    match format {
        OutputFormat::Json => outln!("{}", serde_json::to_string_pretty(value)?)?,
        OutputFormat::Table => write_all(describe(value).as_bytes())?,
    }
    Ok(())
}

/// A byte count as people read it (IEC units).
pub fn bytes(count: u64) -> String {
    fabric_proto::bytes_word(count)
}

/// A count with its noun, singular or plural: "1 file", "3 files".
pub fn count(number: u64, noun: &str) -> String {
    if number == 1 {
        format!("1 {noun}")
    } else if let Some(stem) = noun.strip_suffix('y') {
        format!("{number} {stem}ies")
    } else {
        format!("{number} {noun}s")
    }
}

/// A Unix time in milliseconds as RFC 3339 in UTC (`2026-12-07T02:05:00Z`),
/// for JSON output; "" for 0.
pub fn rfc3339_ms(ms: i64) -> String {
    if ms <= 0 {
        return String::new();
    }
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.unsigned_abs());
    humantime::format_rfc3339_seconds(time).to_string()
}

/// A Unix time in milliseconds as `YYYY-MM-DD HH:MM:SSZ`: RFC 3339 in UTC
/// with the space RFC 3339 allows for readability; "-" for 0.
pub fn time_ms(ms: i64) -> String {
    if ms <= 0 {
        return "-".to_owned();
    }
    rfc3339_ms(ms).replace('T', " ")
}

/// A duration in milliseconds, short (`1m 20s`).
pub fn duration_ms(ms: i64) -> String {
    if ms < 0 {
        return "-".to_owned();
    }
    let seconds = ms.unsigned_abs() / 1000;
    if seconds == 0 {
        return format!("{ms}ms");
    }
    humantime::format_duration(std::time::Duration::from_secs(seconds)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_closed_stdout_is_a_quiet_end() {
        let closed = anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            .context("printing the table");
        assert!(is_closed_stdout(&closed));
        let other = anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::NotFound));
        assert!(!is_closed_stdout(&other));
        assert!(!is_closed_stdout(&anyhow::anyhow!(
            "broken pipe, in words only"
        )));
    }

    #[test]
    fn sizes_and_times_read_well() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 * 1024 * 1024 * 1024), "5.0 GiB");
        assert_eq!(time_ms(0), "-");
        assert_eq!(time_ms(1_700_000_000_000), "2023-11-14 22:13:20Z");
        assert_eq!(rfc3339_ms(1_700_000_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(duration_ms(80_000), "1m 20s");
        assert_eq!(duration_ms(250), "250ms");
    }
}
