//! Real engines for tests: Redis (standalone and a three-node cluster) and
//! an S3-compatible server, each started on free loopback ports over a
//! temporary directory and stopped when dropped.
//!
//! Used by the unit tests of the backends and by the integration tests, so
//! it is part of the library (hidden from its docs). When an engine's
//! program is missing, `start` returns `None` after saying so, and the test
//! skips; with `DISTBUILD_REQUIRE_<ENGINE>` set (CI), it panics instead.

pub mod redis;
pub mod s3;

use std::net::TcpListener;
use std::time::{Duration, Instant};

/// Whether `program` is on the PATH; if not, a skip message, or a panic when
/// `require_var` is set.
pub(crate) fn available(program: &str, require_var: &str, what: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false);
    if !found {
        if std::env::var_os(require_var).is_some() {
            panic!("{program} is not installed and {require_var} is set: {what} cannot be tested");
        }
        eprintln!("skipping: {program} is not installed ({what}; set {require_var} to make this an error)");
    }
    found
}

/// A loopback port nobody listens on now (and, when `with_bus`, whose
/// +10000 twin is free too: a Redis cluster node's bus port).
pub fn free_port(with_bus: bool) -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
        let port = l.local_addr().unwrap().port();
        if !with_bus {
            return port;
        }
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// SIGKILLs an engine's process and reaps it (an engine that goes away, not
/// a clean shutdown); its data directory stays for a restart.
pub(crate) fn kill(child: &mut Option<std::process::Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Waits until something accepts connections on `port`.
pub(crate) fn wait_for_port(port: u16, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
