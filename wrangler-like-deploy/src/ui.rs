//! Output in wrangler's manner: a banner, step lines on stdout; warnings and errors on stderr,
//! each with a hint; a progress line for long steps; NDJSON records appended to
//! `KEFU_OUTPUT_FILE` for scripts; prompts only on a terminal.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use serde_json::{json, Value};

/// The banner.
pub fn banner() {
    let title = format!(" kefu {}", env!("CARGO_PKG_VERSION"));
    println!("{title}\n{}", "─".repeat(title.chars().count() + 1));
}

/// A step line.
pub fn step(text: &str) {
    println!("{text}");
}

/// A warning with a hint (stderr).
pub fn warn(text: &str) {
    eprintln!("▲ [WARNING] {text}\n");
}

/// An error with a hint (stderr).
pub fn error(text: &str, hint: &str) {
    eprintln!("✘ [ERROR] {text}\n");
    if !hint.is_empty() {
        for line in hint.lines() {
            eprintln!("  {line}");
        }
        eprintln!();
    }
}

/// A long step: says it began, and when it ends how long it took.
pub struct Progress {
    label: String,
    started: Instant,
}

impl Progress {
    /// Starts `label`.
    pub fn start(label: &str) -> Progress {
        println!("  … {label}");
        let _ = std::io::stdout().flush();
        Progress { label: label.to_string(), started: Instant::now() }
    }

    /// Ends it.
    pub fn done(self) {
        println!("  ✓ {} ({:.1}s)", self.label, self.started.elapsed().as_secs_f64());
    }
}

/// Appends one record to `KEFU_OUTPUT_FILE` when it is set (`type` and `version` first).
pub fn record(kind: &str, fields: Value) {
    let Ok(path) = std::env::var("KEFU_OUTPUT_FILE") else { return };
    let mut line = json!({"type": kind, "version": 1, "timestamp": now_rfc3339()});
    if let (Some(obj), Value::Object(extra)) = (line.as_object_mut(), fields) {
        obj.extend(extra);
    }
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&path) {
        let _ = writeln!(f, "{line}");
    }
}

fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc().replace_nanosecond(0).unwrap_or_else(|_| time::OffsetDateTime::now_utc());
    now.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// Asks a yes/no question on a terminal; without one, `yes` (the `--yes` flag) decides, and
/// without it the answer is an error naming the flag.
pub fn confirm(question: &str, yes: bool) -> anyhow::Result<bool> {
    if yes {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        anyhow::bail!("{question} — not asked: stdin is not a terminal; pass --yes to go ahead");
    }
    print!("{question} [y/N] ");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes"))
}
