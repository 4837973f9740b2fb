//! An S3-compatible server for tests: `s3s-fs` from crates.io
//! (`cargo install s3s-fs --features binary`), which keeps each bucket as a
//! directory under its root.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{available, free_port, wait_for_port};

pub const REQUIRE: &str = "DISTBUILD_REQUIRE_S3";
pub const ACCESS_KEY: &str = "distbuild-test";
pub const SECRET_KEY: &str = "distbuild-test-secret";
pub const REGION: &str = "us-east-1";

pub struct S3Server {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl S3Server {
    /// A server with no buckets, or `None` (skip) when s3s-fs is missing.
    pub fn start() -> Option<Self> {
        if !available("s3s-fs", REQUIRE, "the S3 store") {
            return None;
        }
        let mut server = S3Server { port: free_port(false), dir: tempfile::tempdir().unwrap(), child: None };
        server.spawn();
        Some(server)
    }

    fn spawn(&mut self) {
        let child = Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(self.dir.path())
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting s3s-fs");
        self.child = Some(child);
        assert!(wait_for_port(self.port, Duration::from_secs(10)), "s3s-fs did not listen on {}", self.port);
    }

    /// Creates a bucket (a directory under the server's root).
    pub fn create_bucket(&self, name: &str) {
        std::fs::create_dir_all(self.dir.path().join(name)).expect("creating a bucket directory");
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The server's root directory (one subdirectory per bucket).
    pub fn root(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Kills the server; its data stays for [`S3Server::restart`].
    pub fn kill(&mut self) {
        super::kill(&mut self.child);
    }

    /// Starts it again on the same port and root.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}
