//! Printing: human text or versioned JSON on stdout, progress bars on stderr.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

/// Version of the JSON documents printed with `--json` (docs/json.md). 2: one name per thing
/// (`snapshot_id`, `length`, `_bytes` sizes, nested `stats`), no Rust debug text.
pub const JSON_FORMAT_VERSION: u32 = 2;

/// Settings shared by all commands.
pub struct Context {
    pub quiet: bool,
    /// `-r/--repo`.
    pub repo_flag: Option<std::path::PathBuf>,
    /// `$STACKVAULT_REPOSITORY` (ignored when empty).
    pub repo_env: Option<std::path::PathBuf>,
    /// Set by SIGINT and SIGTERM (see `main`); long operations stop cleanly at their next
    /// safe point.
    pub cancel: stackvault::Cancel,
}

impl Context {
    /// A progress reporter: bars on a terminal stderr, nothing otherwise.
    pub fn progress(&self) -> Bars {
        Bars {
            enabled: !self.quiet && std::io::stderr().is_terminal(),
            bar: Mutex::new(None),
            cancel: self.cancel.clone(),
        }
    }
}

/// Writes a line to stdout; a closed pipe ends the program quietly (see `is_broken_pipe`).
pub fn line(s: impl AsRef<str>) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", s.as_ref())?;
    Ok(())
}

/// Writes bytes to stdout as they are (completion scripts, the man page).
pub fn raw(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.flush()?;
    Ok(())
}

/// Prints a report as one JSON object with a `format_version` field.
pub fn json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    let mut v = serde_json::to_value(value)?;
    if let serde_json::Value::Object(map) = &mut v {
        map.insert("format_version".into(), JSON_FORMAT_VERSION.into());
    }
    line(serde_json::to_string_pretty(&v)?)
}

/// Prints a report as [`json`] does, with a `requests` field added: the requests the command
/// sent to object storage by kind (see [`requests_json`]).
pub fn json_with_requests<T: Serialize>(
    value: &T,
    requests: serde_json::Value,
) -> anyhow::Result<()> {
    let mut v = serde_json::to_value(value)?;
    if let serde_json::Value::Object(map) = &mut v {
        map.insert("requests".into(), requests);
    }
    json(&v)
}

/// The `requests` value of a repository: `null` for a local one, else every kind of its store
/// with its count (zeros included, so the shape is the same for every run) and a `total` (retries are counted in their kind and once more under `retries`, so they are
/// left out of the total).
pub fn requests_json(repo: &stackvault::Repo) -> serde_json::Value {
    match repo.backend().request_counts() {
        None => serde_json::Value::Null,
        Some(counts) => {
            let total: u64 = counts
                .iter()
                .filter(|(k, _)| **k != "retries")
                .map(|(_, n)| *n)
                .sum();
            let mut map: serde_json::Map<String, serde_json::Value> = counts
                .into_iter()
                .map(|(k, n)| (k.to_string(), n.into()))
                .collect();
            map.insert("total".into(), total.into());
            serde_json::Value::Object(map)
        }
    }
}

/// One line for human output on a remote repository (`requests: 12 (put 3, get 9)`); `None`
/// for a local one.
pub fn requests_line(repo: &stackvault::Repo) -> Option<String> {
    let counts = repo.backend().request_counts()?;
    let total: u64 = counts
        .iter()
        .filter(|(k, _)| **k != "retries")
        .map(|(_, n)| *n)
        .sum();
    let kinds: Vec<String> = counts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{} {n}", k.replace('_', " ")))
        .collect();
    Some(format!("  requests: {total} ({})", kinds.join(", ")))
}

pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Human-readable byte count in binary units.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[unit])
    }
}

/// A transfer rate in the progress bars' unit (binary: `12.50 MiB/s`), of `bytes` actually
/// read or written in `duration_ms`.
pub fn rate(bytes: u64, duration_ms: u64) -> String {
    let per_second = (bytes as f64 * 1000.0 / duration_ms.max(1) as f64) as u64;
    format!("{}/s", self::bytes(per_second))
}

/// indicatif bars behind the engine's `Progress` trait.
pub struct Bars {
    enabled: bool,
    bar: Mutex<Option<ProgressBar>>,
    cancel: stackvault::Cancel,
}

impl stackvault::Progress for Bars {
    fn start(&self, phase: &str, total_bytes: u64) {
        if !self.enabled {
            return;
        }
        let bar = ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{prefix:>8} [{bar:32}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(phase.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        if let Ok(mut slot) = self.bar.lock() {
            *slot = Some(bar);
        }
    }

    fn advance(&self, bytes: u64) {
        if let Ok(slot) = self.bar.lock() {
            if let Some(bar) = slot.as_ref() {
                bar.inc(bytes);
            }
        }
    }

    fn finish(&self) {
        if let Ok(mut slot) = self.bar.lock() {
            if let Some(bar) = slot.take() {
                bar.finish_and_clear();
            }
        }
    }

    fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}
