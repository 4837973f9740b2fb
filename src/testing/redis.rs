//! Debian's `redis-server`, standalone or as a three-node cluster.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{available, free_port, wait_for_port};

pub const REQUIRE: &str = "DISTBUILD_REQUIRE_REDIS";

/// One `redis-server` process on a loopback port, with its data directory.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// A standalone server, or `None` (skip) when redis-server is missing.
    pub fn start() -> Option<Self> {
        Self::start_with(&[])
    }

    /// With extra `redis-server` arguments (`--appendonly yes`, ...).
    pub fn start_with(extra: &[&str]) -> Option<Self> {
        if !available("redis-server", REQUIRE, "the Redis store and scheduler state") {
            return None;
        }
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut server = RedisServer {
            port: free_port(true),
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        server.spawn();
        Some(server)
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--daemonize", "no"])
            .args(["--protected-mode", "no", "--loglevel", "warning"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = cmd.spawn().expect("starting redis-server");
        self.child = Some(child);
        assert!(wait_for_port(self.port, Duration::from_secs(10)), "redis-server did not listen on {}", self.port);
        self.wait_loaded();
    }

    /// Until the server answers PING (not LOADING after a restart).
    fn wait_loaded(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = Command::new("redis-cli").args(["-p", &self.port.to_string(), "PING"]).output();
            // NOAUTH: a server started with --requirepass is up too.
            if let Ok(out) = out
                && let reply = String::from_utf8_lossy(&out.stdout)
                && (reply.trim() == "PONG" || reply.starts_with("NOAUTH"))
            {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server on {} never answered PING", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Kills the server (SIGKILL: an engine that goes away, not a clean
    /// shutdown). Its data stays for [`RedisServer::restart`].
    pub fn kill(&mut self) {
        super::kill(&mut self.child);
    }

    /// Starts it again on the same port and directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Runs `redis-cli` against it and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("running redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three `redis-server` nodes joined with `redis-cli --cluster create`, no
/// replicas: every node owns a third of the slots.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> Option<Self> {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let node = RedisServer::start_with(&[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "5000",
            ])?;
            nodes.push(node);
        }
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("running redis-cli --cluster create");
        assert!(out.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&out.stdout));
        let deadline = Instant::now() + Duration::from_secs(20);
        for node in &nodes {
            while !node.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok") {
                assert!(Instant::now() < deadline, "the cluster never reached cluster_state:ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Some(RedisCluster { nodes })
    }

    /// One URL per node (`redis://127.0.0.1:PORT/`).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standalone_server_restarts_and_a_cluster_forms() {
        let Some(mut server) = RedisServer::start() else { return };
        assert_eq!(server.cli(&["SET", "k", "v"]).trim(), "OK");
        server.restart();
        assert_eq!(server.cli(&["PING"]).trim(), "PONG");
        let Some(cluster) = RedisCluster::start() else { return };
        assert_eq!(cluster.urls().len(), 3);
        assert!(cluster.nodes[0].cli(&["CLUSTER", "INFO"]).contains("cluster_known_nodes:3"));
    }
}
