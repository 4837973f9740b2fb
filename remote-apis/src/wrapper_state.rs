//! What the `cargo-distbuild` command and its compiler wrappers (the
//! `distbuild-rustc` crate) both need on the user's machine: the default
//! cache and state directories, the stats file and its records, a file
//! lock, cargo's home, and the platform property of linking workers. It
//! lives here so that the server crate does not depend on the wrapper crate.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// The platform property a worker advertises when it can link (`cc` on
/// its PATH); the rustc wrapper asks for it on compiles that link.
pub const LINKER_PROPERTY: (&str, &str) = ("c-linker", "cc");

/// `$VAR/cargo-distbuild`, else `~/<fallback>/cargo-distbuild`, else
/// `./distbuild-data` (no home at all).
fn xdg_dir(var: &str, fallback: &str) -> PathBuf {
    let non_empty = |v: &str| std::env::var_os(v).filter(|d| !d.is_empty()).map(PathBuf::from);
    match (non_empty(var), non_empty("HOME")) {
        (Some(dir), _) => dir.join("cargo-distbuild"),
        (None, Some(home)) => home.join(fallback).join("cargo-distbuild"),
        (None, None) => PathBuf::from("distbuild-data"),
    }
}

/// `$XDG_CACHE_HOME/cargo-distbuild` (or `~/.cache/...`): the server's
/// default data directory, and the wrapper's caches below it.
pub fn default_cache_dir() -> PathBuf {
    xdg_dir("XDG_CACHE_HOME", ".cache")
}

/// `$XDG_STATE_HOME/cargo-distbuild` (or `~/.local/state/...`).
pub fn default_state_dir() -> PathBuf {
    xdg_dir("XDG_STATE_HOME", ".local/state")
}

/// Where invocations are recorded: `DISTBUILD_STATS`, else
/// `<state dir>/stats.jsonl`.
pub fn stats_file() -> PathBuf {
    std::env::var_os("DISTBUILD_STATS")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| default_state_dir().join("stats.jsonl"))
}

/// cargo's home: `CARGO_HOME`, else `~/.cargo`.
pub fn cargo_home() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
}

/// Takes an exclusive lock on `path` (created if needed), held until the
/// returned file is dropped.
pub fn lock_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = std::fs::File::options().create(true).truncate(false).write(true).open(path)?;
    // SAFETY: flock on a descriptor we own; released when `file` closes.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// One line of the stats file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    /// Milliseconds since the epoch, when the invocation ended.
    pub t: u64,
    /// Microseconds since the epoch, when the invocation started and
    /// ended (0 in records of older wrappers): what ran beside what.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_us: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub end_us: u64,
    /// Which wrapper wrote it: "" for rustc, "cc" for the C compiler.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tool: String,
    /// Crate name ("" for queries such as `-vV`).
    pub krate: String,
    /// `hit`, `remote`, `local`. A hit with a non-zero `exit` replayed a
    /// remembered failure (a build-script probe meant to fail).
    pub outcome: String,
    /// Why it ran locally, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Whether a local run's result was stored in the cache.
    #[serde(default)]
    pub stored: bool,
    /// Wall time of the invocation.
    pub ms: u64,
    /// For hits: what the original execution took, minus this invocation.
    #[serde(default)]
    pub saved_ms: i64,
    pub exit: i32,
}

/// Appends `record` (one `write` of one line, so concurrent wrappers do not
/// interleave).
pub fn append(file: &Path, record: &Record) {
    let Ok(mut line) = serde_json::to_vec(record) else { return };
    line.push(b'\n');
    if let Some(dir) = file.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Ok(mut f) = std::fs::File::options().create(true).append(true).open(file) {
        let _ = f.write_all(&line);
    }
}

/// The records appended to `file` after byte `offset` (lines that do not
/// parse, such as a torn last line, are skipped).
pub fn read_records(file: &Path, offset: u64) -> Vec<Record> {
    use std::io::{BufRead, Seek};
    let Ok(mut f) = std::fs::File::open(file) else { return Vec::new() };
    if f.seek(std::io::SeekFrom::Start(offset)).is_err() {
        return Vec::new();
    }
    std::io::BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str::<Record>(&l).ok())
        .collect()
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Microseconds since the epoch.
pub fn now_us() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_older_lines_still_parse() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("stats.jsonl");
        let old = r#"{"t":5,"krate":"a","outcome":"hit","stored":false,"ms":3,"saved_ms":1,"exit":0}"#;
        std::fs::write(&file, format!("{old}\n")).unwrap();
        let offset = std::fs::metadata(&file).unwrap().len();
        let new = Record {
            t: 9,
            start_us: 7_000,
            end_us: 9_000,
            tool: "cc".into(),
            krate: "b".into(),
            outcome: "hit".into(),
            reason: None,
            stored: false,
            ms: 2,
            saved_ms: 0,
            exit: 1,
        };
        append(&file, &new);
        let all = read_records(&file, 0);
        assert_eq!(all.len(), 2);
        assert_eq!((all[0].start_us, all[0].tool.as_str()), (0, ""), "older records default the new fields");
        assert_eq!(read_records(&file, offset), vec![new]);
        let rustc = serde_json::to_string(&Record { tool: String::new(), start_us: 0, end_us: 0, ..all[0].clone() });
        assert!(!rustc.unwrap().contains("tool"), "rustc records leave `tool` out");
    }
}
