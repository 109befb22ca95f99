//! Output: kubectl-style tables for people, JSON and YAML for scripts, and
//! the small formatters they share (ages, short commits).

use std::io::Write;

use clap::{Args, ValueEnum};
use comfy_table::{CellAlignment, ColumnConstraint, ContentArrangement, Table, presets};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde::Serialize;

/// `-o`: how a verb prints its result.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns, for people.
    #[default]
    Table,
    /// JSON, for scripts (`jq`).
    Json,
    /// YAML.
    Yaml,
}

/// The `-o/--output` flag.
#[derive(Args, Clone, Copy, Debug, Default)]
pub struct OutputArgs {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

/// Writes `text` to stdout. A closed pipe (`kapsa status x | head`) ends
/// the process quietly, as other command-line tools do.
pub fn emit(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
    if let Err(e) = written {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(super::error::EXIT_FAILURE);
    }
}

/// [`emit`] with a newline.
pub fn emit_line(line: &str) {
    emit(&format!("{line}\n"));
}

/// Prints `value` as JSON or YAML (for `-o json|yaml`).
pub fn print_structured<T: Serialize>(value: &T, format: OutputFormat) -> anyhow::Result<()> {
    match format {
        OutputFormat::Json => emit_line(&serde_json::to_string_pretty(value)?),
        OutputFormat::Yaml => emit(&serde_yaml_ng::to_string(value)?),
        OutputFormat::Table => unreachable!("tables are printed by each verb"),
    }
    Ok(())
}

/// A borderless table with upper-case headers, like `kubectl get`.
pub fn table<const N: usize>(headers: [&str; N]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(headers.map(str::to_uppercase));
    for column in table.column_iter_mut() {
        column.set_padding((0, 3));
        column.set_cell_alignment(CellAlignment::Left);
        column.set_constraint(ColumnConstraint::ContentWidth);
    }
    table
}

/// A table as text, each line without trailing spaces.
pub fn render(table: &Table) -> String {
    let mut out = String::new();
    for line in table.lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The first 7 characters of a commit, or `-`.
pub fn short_commit(commit: Option<&str>) -> String {
    match commit {
        Some(c) if !c.is_empty() => c.chars().take(7).collect(),
        _ => "-".to_string(),
    }
}

/// `value`, or `-` when empty or absent.
pub fn or_dash(value: Option<&str>) -> String {
    match value {
        Some(v) if !v.is_empty() => v.to_string(),
        _ => "-".to_string(),
    }
}

/// Seconds from `time` to now (negative for a time in the future).
pub fn seconds_since(time: &Time) -> i64 {
    Timestamp::now().duration_since(time.0).as_secs()
}

/// How long ago `time` was, kubectl style (`45s`, `5m12s`, `3h`, `2d`).
pub fn age(time: Option<&Time>) -> String {
    time.map_or_else(|| "-".to_string(), |t| human_duration(seconds_since(t)))
}

/// `in 71h` for a time in the future, `3m ago` for one in the past.
pub fn relative(time: &Time) -> String {
    let seconds = seconds_since(time);
    if seconds < 0 {
        format!("in {}", human_duration(-seconds))
    } else {
        format!("{} ago", human_duration(seconds))
    }
}

/// A duration in seconds, short: exact at first, coarser as it grows.
pub fn human_duration(seconds: i64) -> String {
    let s = seconds.max(0);
    let (minute, hour, day) = (60, 3600, 86_400);
    match s {
        s if s < 2 * minute => format!("{s}s"),
        s if s < 10 * minute => match s % minute {
            0 => format!("{}m", s / minute),
            r => format!("{}m{r}s", s / minute),
        },
        s if s < 3 * hour => format!("{}m", s / minute),
        s if s < 8 * hour => match (s % hour) / minute {
            0 => format!("{}h", s / hour),
            m => format!("{}h{m}m", s / hour),
        },
        s if s < 2 * day => format!("{}h", s / hour),
        s if s < 8 * day => match (s % day) / hour {
            0 => format!("{}d", s / day),
            h => format!("{}d{h}h", s / day),
        },
        s if s < 365 * 2 * day => format!("{}d", s / day),
        s => format!("{}y", s / (365 * day)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_kubectl() {
        assert_eq!(human_duration(0), "0s");
        assert_eq!(human_duration(-5), "0s");
        assert_eq!(human_duration(119), "119s");
        assert_eq!(human_duration(125), "2m5s");
        assert_eq!(human_duration(300), "5m");
        assert_eq!(human_duration(3 * 3600 - 1), "179m");
        assert_eq!(human_duration(3 * 3600 + 60 * 25), "3h25m");
        assert_eq!(human_duration(71 * 3600 + 10), "2d23h");
        assert_eq!(human_duration(30 * 3600), "30h");
        assert_eq!(human_duration(10 * 86_400), "10d");
        assert_eq!(human_duration(800 * 86_400), "2y");
    }

    #[test]
    fn commits_are_shortened_to_seven() {
        assert_eq!(short_commit(Some("3f2a9c1d00")), "3f2a9c1");
        assert_eq!(short_commit(Some("")), "-");
        assert_eq!(short_commit(None), "-");
    }

    #[test]
    fn tables_have_no_borders_and_no_trailing_spaces() {
        let mut t = table(["name", "host"]);
        t.add_row(["shop", "shop.example.com"]);
        t.add_row(["a-longer-name", "-"]);
        let text = render(&t);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("NAME"), "{text}");
        assert!(lines.iter().all(|l| !l.ends_with(' ')), "{text}");
        let host_column = lines[0].find("HOST").unwrap();
        assert_eq!(lines[1].find("shop.example.com"), Some(host_column));
        assert!(!text.contains('|') && !text.contains('+'), "{text}");
    }
}
