//! The server process a benchmark measures: the real binary on a free
//! loopback port with a temporary data directory, killed when dropped.
//! Shared by the benchmarks through `#[path]`.

use std::process::{Child, Command, Stdio};

pub struct Server {
    pub child: Child,
    _dir: tempfile::TempDir,
    pub url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `binary server` with `extra` arguments after the listen address
/// and data directory.
pub fn start_server(binary: &str, extra: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(binary)
        .args(["server", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir.path())
        .args(extra)
        .env("DISTBUILD_LOG", "warn")
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting the server binary");
    Server { child, _dir: dir, url: format!("grpc://127.0.0.1:{port}") }
}

/// Starts `binary server` on a free port with `extra` arguments and no
/// `--data-dir`: for configs whose `[cas] store` says where blobs go (the
/// temporary directory is still the process's working directory).
pub fn start_configured_server(binary: &str, extra: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(binary)
        .args(["server", "--listen", &format!("127.0.0.1:{port}")])
        .args(extra)
        .current_dir(dir.path())
        .env("DISTBUILD_LOG", "warn")
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting the server binary");
    Server { child, _dir: dir, url: format!("grpc://127.0.0.1:{port}") }
}

/// A config file turning metrics on (with an HTTP listener on a free port,
/// so they are recorded) or off, and the directory holding it.
pub fn metrics_config(on: bool) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    let text = if on {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        format!("[server]\nhttp_listen = \"127.0.0.1:{port}\"\nmetrics = true\n")
    } else {
        "[server]\nhttp_listen = \"\"\nmetrics = false\n".to_string()
    };
    std::fs::write(&path, text).unwrap();
    (dir, path.to_string_lossy().into_owned())
}
