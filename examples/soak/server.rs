//! The server under soak: the real binary on a free loopback port, with a
//! temporary data directory and a config whose timeouts are short enough
//! for a few minutes' run; and what the soak reads of it from /proc.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Settings written to the soak's config, as `(section, key, value)`.
/// Required ones must be known to the server; optional ones belong to the
/// hardening work (issue 9) and are dropped, with a note, when the server
/// being soaked refuses them as unknown keys.
const SETTINGS: &[(&str, &str, &str, bool)] = &[
    // Parked uploads give their temp files back soon after the soak stops.
    ("cas", "upload_resume_window", "\"5s\"", false),
    ("worker", "capacity", "2", false),
    ("execution", "default_timeout", "\"30s\"", false),
    ("execution", "max_timeout", "\"60s\"", false),
    ("server", "shutdown_grace", "\"2s\"", false),
    // Idle and silent connections closed within the soak's run.
    ("server", "handshake_timeout", "\"5s\"", true),
    ("server", "keepalive_interval", "\"5s\"", true),
    ("server", "keepalive_timeout", "\"5s\"", true),
    ("server", "idle_timeout", "\"20s\"", true),
];

/// How long the server may take to accept connections.
const STARTUP: Duration = Duration::from_secs(20);

pub struct Server {
    pub child: Child,
    pub pid: u32,
    pub url: String,
    pub port: u16,
    pub log: PathBuf,
    /// Optional settings this server did not know (not applied).
    pub dropped: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One `section.key = value` per item of `SOAK_SET` (`;`-separated), for
/// limits whose names this file does not know yet.
fn extra_settings() -> Vec<(String, String, String, bool)> {
    let raw = std::env::var("SOAK_SET").unwrap_or_default();
    raw.split(';')
        .filter_map(|item| {
            let (path, value) = item.split_once('=')?;
            let (section, key) = path.trim().split_once('.')?;
            Some((section.to_string(), key.to_string(), value.trim().to_string(), false))
        })
        .collect()
}

fn render(settings: &[(String, String, String, bool)]) -> String {
    let mut sections: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (section, key, value, _) in settings {
        sections.entry(section).or_default().push(format!("{key} = {value}"));
    }
    sections.iter().map(|(s, lines)| format!("[{s}]\n{}\n", lines.join("\n"))).collect::<Vec<_>>().join("\n")
}

/// The key a config error calls unknown, if that is what it says.
fn unknown_key(log: &str) -> Option<String> {
    let at = log.find("unknown field `")? + "unknown field `".len();
    let rest = &log[at..];
    Some(rest[..rest.find('`')?].to_string())
}

/// Starts the server; retries without an optional setting it does not know.
pub fn start(binary: &str) -> Result<Server, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let mut settings: Vec<(String, String, String, bool)> = SETTINGS
        .iter()
        .map(|(s, k, v, o)| (s.to_string(), k.to_string(), v.to_string(), *o))
        .chain(extra_settings())
        .collect();
    let mut dropped = Vec::new();
    loop {
        let config = dir.path().join("config.toml");
        std::fs::write(&config, render(&settings)).map_err(|e| format!("writing the config: {e}"))?;
        let log = dir.path().join("server.log");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("finding a free port: {e}"))?
            .port();
        let stderr = File::create(&log).map_err(|e| format!("server log: {e}"))?;
        let mut child = Command::new(binary)
            .arg("--config")
            .arg(&config)
            .args(["server", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
            .arg(dir.path().join("data"))
            .env("DISTBUILD_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("starting {binary}: {e}"))?;
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                match unknown_key(&text) {
                    Some(key) if settings.iter().any(|(_, k, _, optional)| *optional && *k == key) => {
                        settings.retain(|(_, k, _, _)| *k != key);
                        dropped.push(key);
                        break;
                    }
                    _ => return Err(format!("the server exited while starting ({status}):\n{}", tail(&text, 20))),
                }
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                let pid = child.id();
                let url = format!("grpc://127.0.0.1:{port}");
                return Ok(Server { child, pid, url, port, log, dropped, _dir: dir });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("the server did not listen on port {port} within {STARTUP:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// What the soak watches of the server process.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub rss: u64,
    pub peak: u64,
    pub fds: usize,
}

fn status_kib(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

pub fn sample(pid: u32) -> Sample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    Sample { rss: status_kib(&status, "VmRSS:"), peak: status_kib(&status, "VmHWM:"), fds }
}

/// Resets the peak RSS (VmHWM) to the current RSS; false if not allowed.
pub fn reset_peak(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// Whether `pid` is still a running process (not gone, not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

/// Processes whose command line contains `marker`, as `(pid, command line)`,
/// found the way `pgrep -f` does; never this process.
pub fn processes_with(marker: &str) -> Vec<(u32, String)> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(marker) && alive(pid) {
            found.push((pid, cmdline.trim().to_string()));
        }
    }
    found
}

/// The server's open descriptors by kind (sockets, pipes, files by
/// directory), for a failed fd check.
pub fn fd_kinds(pid: u32) -> String {
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).into_iter().flatten().flatten() {
        let target = std::fs::read_link(entry.path()).map(|t| t.display().to_string()).unwrap_or_default();
        let kind = match target.split_once(':') {
            Some((k, _)) if !target.starts_with('/') => k.to_string(),
            // Files by directory, fan-out directories (`ab/`) folded into one.
            _ => std::path::Path::new(&target)
                .parent()
                .map_or(target.clone(), |p| p.display().to_string())
                .split('/')
                .map(|c| if c.len() == 2 && c.bytes().all(|b| b.is_ascii_hexdigit()) { "*" } else { c })
                .collect::<Vec<_>>()
                .join("/"),
        };
        *kinds.entry(kind).or_default() += 1;
    }
    kinds.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", ")
}
