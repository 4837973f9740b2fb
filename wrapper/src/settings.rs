//! What the wrapper is told through its environment (`cargo distbuild` sets
//! these from `--server`, `DISTBUILD_SERVER` or `config.toml`), and the
//! records it leaves: one stats line per invocation, and a marker that keeps
//! a down server to one warning per build.
//!
//! TLS and authentication: `DISTBUILD_TLS_CA`, `DISTBUILD_TLS_CERT` and
//! `DISTBUILD_TLS_KEY` name PEM files (for `grpcs://` servers);
//! `DISTBUILD_TOKEN_FILE` names a file holding a bearer token, else
//! `DISTBUILD_TOKEN` holds the token itself.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use remote_apis::client::{ClientOptions, ClientTls, Token};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Look up, execute remotely on a miss.
    Remote,
    /// Look up, run locally on a miss and store the result (CI runners).
    CacheOnly,
    /// Plain rustc.
    Off,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub server: String,
    pub instance: String,
    pub mode: Mode,
    pub cache_dir: PathBuf,
    pub stats_file: PathBuf,
    pub sysroot: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub queue_timeout: Duration,
    /// TLS files and the bearer token (its `Debug` hides it).
    pub client: ClientOptions,
}

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

impl Settings {
    pub fn from_env() -> Result<Settings, String> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let mode = match var("DISTBUILD_MODE").as_deref() {
            None | Some("remote") => Mode::Remote,
            Some("cache-only") => Mode::CacheOnly,
            Some("off") => Mode::Off,
            Some(other) => return Err(format!("DISTBUILD_MODE={other}: expected remote, cache-only or off")),
        };
        let secs = |name: &str, default: f64| -> Result<Duration, String> {
            match var(name) {
                None => Ok(Duration::from_secs_f64(default)),
                Some(v) => v
                    .parse::<f64>()
                    .ok()
                    .filter(|s| *s >= 0.0 && s.is_finite())
                    .map(Duration::from_secs_f64)
                    .ok_or_else(|| format!("{name}={v}: expected seconds")),
            }
        };
        let server = var("DISTBUILD_SERVER").unwrap_or_else(|| "127.0.0.1:8980".to_string());
        let server = if server.contains("://") { server } else { format!("grpc://{server}") };
        let tls = ClientTls {
            ca: var("DISTBUILD_TLS_CA").map(PathBuf::from),
            cert: var("DISTBUILD_TLS_CERT").map(PathBuf::from),
            key: var("DISTBUILD_TLS_KEY").map(PathBuf::from),
        };
        let token = match (var("DISTBUILD_TOKEN_FILE"), std::env::var("DISTBUILD_TOKEN").ok()) {
            (Some(file), _) => Some(Token::from_file(Path::new(&file)).map_err(|s| s.message().to_string())?),
            (None, Some(token)) if !token.trim().is_empty() => {
                Some(Token::new(&token).map_err(|s| format!("DISTBUILD_TOKEN: {}", s.message()))?)
            }
            (None, _) => None,
        };
        let client = ClientOptions { tls: (!tls.is_empty()).then_some(tls), token };
        Ok(Settings {
            server,
            instance: var("DISTBUILD_INSTANCE").unwrap_or_default(),
            mode,
            cache_dir: var("DISTBUILD_CACHE_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| default_cache_dir().join("wrapper")),
            stats_file: stats_file(),
            sysroot: var("DISTBUILD_SYSROOT").map(PathBuf::from),
            connect_timeout: secs("DISTBUILD_CONNECT_TIMEOUT", 2.0)?,
            queue_timeout: secs("DISTBUILD_QUEUE_TIMEOUT", 30.0)?,
            client,
        })
    }

    /// A marker file shared by the wrappers of one build (cargo runs them
    /// as separate processes), e.g. `down-<server>`.
    fn marker(&self, kind: &str) -> PathBuf {
        let name: String = self.server.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        self.cache_dir.join(format!("{kind}-{name}"))
    }

    fn down_marker(&self) -> PathBuf {
        self.marker("down")
    }

    /// Whether the server recently had no worker for this kind of action
    /// (`links`: needs a C linker); such actions then run here at once
    /// instead of each waiting in the queue.
    pub fn recently_without_workers(&self, links: bool) -> bool {
        age(&self.marker(if links { "nolink" } else { "noexec" })).is_some_and(|a| a < Duration::from_secs(60))
    }

    pub fn mark_without_workers(&self, links: bool) {
        let _ = std::fs::create_dir_all(&self.cache_dir);
        let _ = std::fs::write(self.marker(if links { "nolink" } else { "noexec" }), b"");
    }

    /// Whether another invocation found the server down moments ago.
    pub fn recently_down(&self) -> bool {
        age(&self.down_marker()).is_some_and(|a| a < Duration::from_secs(30))
    }

    /// Records that the server is down; true if this invocation should warn
    /// (no other has in the last ten minutes).
    pub fn mark_down(&self) -> bool {
        let marker = self.down_marker();
        let warn = age(&marker).is_none_or(|a| a > Duration::from_secs(600));
        let _ = std::fs::create_dir_all(&self.cache_dir);
        // Written either way: the mtime says when the server was last
        // found down, which `recently_down` reads.
        let _ = std::fs::write(&marker, b"");
        warn
    }

    pub fn mark_up(&self) {
        let _ = std::fs::remove_file(self.down_marker());
    }
}

fn age(path: &Path) -> Option<Duration> {
    let m = std::fs::metadata(path).ok()?.modified().ok()?;
    Some(SystemTime::now().duration_since(m).unwrap_or_default())
}

/// One line of the stats file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    /// Milliseconds since the epoch, when the invocation ended.
    pub t: u64,
    /// Crate name ("" for queries such as `-vV`).
    pub krate: String,
    /// `hit`, `remote`, `local`.
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
    /// Which wrapper wrote it: "" for rustc (`distbuild-rustc`), "cc" for a
    /// C/C++ compiler invocation (`distbuild-cc`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tool: String,
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
