//! What the wrapper is told through its environment (`cargo distbuild` sets
//! these from `--server`, `DISTBUILD_SERVER` or `config.toml`), and the
//! records it leaves: one stats line per invocation, and a marker that keeps
//! a down server to one warning per build.
//!
//! TLS and authentication: `DISTBUILD_TLS_CA`, `DISTBUILD_TLS_CERT` and
//! `DISTBUILD_TLS_KEY` name PEM files (for `grpcs://` servers);
//! `DISTBUILD_TOKEN_FILE` names a file holding a bearer token, else
//! `DISTBUILD_TOKEN` holds the token itself.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use remote_apis::client::{ClientOptions, ClientTls, Token};
pub use remote_apis::wrapper_state::{
    Record, append, cargo_home, default_cache_dir, default_state_dir, lock_file, now_ms, now_us, read_records,
    stats_file,
};

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
