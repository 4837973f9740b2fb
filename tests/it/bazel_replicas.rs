//! Two `cargo-distbuild server` processes sharing one Redis (the scheduler
//! state) and one S3 bucket (blobs and action results): a client and the
//! only worker on different replicas, Bazel 4.2.3 on both, a replica
//! SIGKILLed with an action in flight, and every replica restarted with an
//! action queued. Real engines: `redis-server` and `s3s-fs`, started here
//! (skipped when missing unless DISTBUILD_REQUIRE_REDIS / _S3 / _BAZEL).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cargo_distbuild::testing::redis::RedisServer;
use cargo_distbuild::testing::s3::{ACCESS_KEY, REGION, S3Server, SECRET_KEY};
use remote_apis::reapi::WaitExecutionRequest;
use remote_apis::reapi::execution_stage::Value as Stage;

use crate::bazel::{Workspace, bazel_or_skip, count, external_runners, process_summary};
use crate::common::TestServer;
use crate::execution::{Act, execution, request, response, stage};

/// One replica: a server process with its own config, port and work dir.
struct Replica {
    addr: std::net::SocketAddr,
    config: PathBuf,
    child: Option<Child>,
}

impl Replica {
    fn start(dir: &Path, name: &str, redis: &str, s3: &str, slots: usize) -> Replica {
        let addr = crate::common::free_addr();
        let root = dir.join(name);
        std::fs::create_dir_all(&root).unwrap();
        let config = root.join("config.toml");
        let text = format!(
            r#"
[scheduler]
addr = "{addr}"
state = {{ redis = "{redis}" }}

[stores.bucket]
type = "s3"
bucket = "cache"
endpoint = "{s3}"
region = "{REGION}"
path_style = true
access_key_id = "{ACCESS_KEY}"
secret_access_key = "{SECRET_KEY}"
timeout = "10s"

[cas]
store = "bucket"

[ac]
store = "bucket"

[worker]
capacity = {slots}
work_dir = "{work}"
heartbeat_interval_secs = 1
action_init = "{init}"

[server]
http_listen = ""
"#,
            work = root.join("worker").display(),
            init = env!("CARGO_BIN_EXE_distbuild-action-init"),
        );
        std::fs::write(&config, text).unwrap();
        let mut replica = Replica { addr, config, child: None };
        replica.spawn();
        replica
    }

    fn spawn(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_cargo-distbuild"))
            .arg("--config")
            .arg(&self.config)
            .arg("server")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting a replica");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(self.addr).is_err() {
            assert!(std::time::Instant::now() < deadline, "replica on {} never listened", self.addr);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self) -> String {
        format!("grpc://{}", self.addr)
    }

    fn client(&self) -> TestServer {
        TestServer::connect(self.addr)
    }

    /// SIGKILL: the replica vanishes without a word to anyone.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Cluster {
    dir: tempfile::TempDir,
    redis: RedisServer,
    s3: S3Server,
}

impl Cluster {
    fn start() -> Option<Cluster> {
        // Append-only persistence: restarting Redis keeps queued operations.
        let redis = RedisServer::start_with(&["--appendonly", "yes"])?;
        let s3 = S3Server::start()?;
        s3.create_bucket("cache");
        Some(Cluster { dir: tempfile::tempdir().unwrap(), redis, s3 })
    }

    fn replica(&self, name: &str, slots: usize) -> Replica {
        Replica::start(self.dir.path(), name, &self.redis.url(), &self.s3.endpoint(), slots)
    }
}

async fn wait_on(server: &TestServer, name: &str) -> remote_apis::reapi::ExecuteResponse {
    let req = WaitExecutionRequest { name: name.to_string() };
    let mut stream = execution(server).wait_execution(req).await.unwrap().into_inner();
    let mut last = None;
    while let Some(op) = tokio::time::timeout(Duration::from_secs(90), stream.message()).await.unwrap().unwrap() {
        last = Some(op);
    }
    let last = last.expect("operations");
    assert_eq!(stage(&last), Stage::Completed);
    response(&last)
}

/// Bazel executes on replica A while the only worker is on replica B; after
/// `bazel clean`, a build against B is all cache hits (S3 holds it all).
#[tokio::test(flavor = "multi_thread")]
async fn bazel_on_one_replica_runs_on_the_other_replicas_worker() {
    let Some(bazel) = bazel_or_skip() else { return };
    let Some(cluster) = Cluster::start() else { return };
    let a = cluster.replica("a", 0);
    let b = cluster.replica("b", 2);
    let (url_a, url_b) = (a.url(), b.url());
    let (cold, warm) = tokio::task::spawn_blocking(move || {
        let ws = Workspace::new(bazel);
        let cold = process_summary(&ws.test_remotely_with(&url_a, &[]));
        assert!(ws.run("clean", &[]).0);
        let warm = process_summary(&ws.test_remotely_with(&url_b, &[]));
        (cold, warm)
    })
    .await
    .unwrap();
    assert_eq!(external_runners(&cold), ["remote"], "cold, through A: {cold:?}");
    let executed = count(&cold, "remote");
    assert_eq!(external_runners(&warm), ["remote cache hit"], "after clean, through B: {warm:?}");
    assert_eq!(count(&warm, "remote cache hit"), executed, "warm {warm:?}, cold {cold:?}");
    drop((a, b));
}

/// An action queued through A completes after A is SIGKILLed: the client
/// re-attaches to B with WaitExecution. Then, with an action queued and no
/// worker anywhere, every replica (and Redis) restarts: it still completes.
#[tokio::test(flavor = "multi_thread")]
async fn actions_survive_a_killed_replica_and_a_restart_of_all() {
    let Some(cluster) = Cluster::start() else { return };
    let mut a = cluster.replica("a", 0);
    let b = cluster.replica("b", 1);
    let act = Act::sh("sleep 2; echo survived");
    let digest = act.upload(&a.client()).await;
    let mut stream = execution(&a.client()).execute(request(digest)).await.unwrap().into_inner();
    let name = stream.message().await.unwrap().expect("a first operation").name;
    a.kill();
    let done = wait_on(&b.client(), &name).await;
    let result = done.result.clone().expect("a result");
    assert_eq!(result.exit_code, 0, "{done:?}");
    drop(b);

    // No worker anywhere: the action waits in the shared queue.
    let mut a = cluster.replica("a2", 0);
    let act = Act::sh("echo after the restart");
    let digest = act.upload(&a.client()).await;
    let mut stream = execution(&a.client()).execute(request(digest)).await.unwrap().into_inner();
    let name = stream.message().await.unwrap().expect("a first operation").name;
    a.kill();
    let mut redis = cluster.redis;
    redis.restart();
    let cluster = Cluster { redis, ..cluster };
    let _a = cluster.replica("a3", 0);
    let b = cluster.replica("b3", 1);
    let done = wait_on(&b.client(), &name).await;
    assert_eq!(done.result.expect("a result").exit_code, 0);
}
