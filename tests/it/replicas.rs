//! Two in-process server replicas sharing one scheduler state on Redis and
//! one CAS (the same memory store handed to both): work flows between them.
//! Skipped when `redis-server` is not installed (DISTBUILD_REQUIRE_REDIS
//! makes that a failure).

use std::path::Path;
use std::time::Duration;

use cargo_distbuild::config::FileConfig;
use cargo_distbuild::execution::state::RedisStateConfig;
use cargo_distbuild::server::Stores;
use cargo_distbuild::testing::redis::RedisServer;
use remote_apis::longrunning::ListOperationsRequest;
use remote_apis::longrunning::operations_client::OperationsClient;
use remote_apis::reapi::WaitExecutionRequest;
use remote_apis::reapi::execution_stage::Value as Stage;

use crate::common::TestServer;
use crate::execution::{Act, execution, request, response, run, stage};

/// One shared memory CAS and AC, handed to every replica.
struct Shared {
    dir: tempfile::TempDir,
    stores: Stores,
    redis: RedisServer,
}

impl Shared {
    async fn start() -> Option<Self> {
        let redis = RedisServer::start()?;
        let dir = tempfile::tempdir().unwrap();
        let mut file = FileConfig::default();
        file.cas.backend = cargo_distbuild::config::Backend::Memory;
        file.cas.root = Some(dir.path().to_path_buf());
        let stores = cargo_distbuild::server::open_stores(&file.resolve().unwrap()).await.unwrap();
        Some(Shared { dir, stores, redis })
    }

    /// A replica with `slots` built-in worker slots (0: none).
    async fn replica(&self, slots: usize) -> TestServer {
        let stores = Stores {
            cas: self.stores.cas.clone(),
            ac: self.stores.ac.clone(),
            scrub: self.stores.scrub.clone(),
            worker: self.stores.worker.clone(),
        };
        let redis = RedisStateConfig { redis: self.redis.url(), prefix: None };
        let dir: &Path = self.dir.path();
        TestServer::serve_stores(dir, stores, |f| {
            f.worker.capacity = Some(slots);
            f.worker.heartbeat_interval_secs = 1;
            f.scheduler.state = cargo_distbuild::config::StateSection::Redis(redis);
        })
        .await
    }
}

async fn first_operation(
    server: &TestServer,
    act: &Act,
) -> (String, tonic::Streaming<remote_apis::longrunning::Operation>) {
    let digest = act.upload(server).await;
    let mut stream = execution(server).execute(request(digest)).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().expect("a first operation");
    (first.name, stream)
}

async fn wait_on(server: &TestServer, name: &str) -> remote_apis::reapi::ExecuteResponse {
    let req = WaitExecutionRequest { name: name.to_string() };
    let mut stream = execution(server).wait_execution(req).await.unwrap().into_inner();
    let mut last = None;
    while let Some(op) = tokio::time::timeout(Duration::from_secs(60), stream.message()).await.unwrap().unwrap() {
        last = Some(op);
    }
    let last = last.expect("operations");
    assert_eq!(stage(&last), Stage::Completed);
    response(&last)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_action_executed_through_a_runs_on_the_worker_of_b() {
    let Some(shared) = Shared::start().await else { return };
    let a = shared.replica(0).await;
    let b = shared.replica(1).await;
    let act = Act::sh("echo from-b");
    let digest = act.upload(&a).await;
    let ops = tokio::time::timeout(Duration::from_secs(60), run(&a, request(digest))).await.unwrap().unwrap();
    let done = response(ops.last().unwrap());
    assert_eq!(done.result.unwrap().exit_code, 0, "{}", done.message);
    assert!(ops.iter().any(|op| stage(op) == Stage::Executing), "A's watcher saw B's worker start it");
    // B's clients see it too, and it is a cache hit there now.
    let again = run(&b, request(digest)).await.unwrap();
    assert!(response(again.last().unwrap()).cached_result);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn wait_execution_on_b_follows_an_operation_created_on_a() {
    let Some(shared) = Shared::start().await else { return };
    let a = shared.replica(1).await;
    let b = shared.replica(0).await;
    let (name, _stream) = first_operation(&a, &Act::sh("sleep 1; echo waited")).await;
    let done = wait_on(&b, &name).await;
    assert_eq!(done.result.unwrap().exit_code, 0);
    let listed = OperationsClient::new(b.channel.clone())
        .list_operations(ListOperationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.operations.iter().any(|op| op.name == name), "B lists A's operation");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_action_through_a_and_b_at_once_runs_once() {
    let Some(shared) = Shared::start().await else { return };
    let a = shared.replica(0).await;
    let b = shared.replica(0).await;
    // No worker yet: both submissions wait in the shared queue.
    let act = Act::sh("echo once; date +%s%N");
    let (on_a, _sa) = first_operation(&a, &act).await;
    let (on_b, _sb) = first_operation(&b, &act).await;
    assert_eq!(on_a, on_b, "merged into one operation across replicas");
    let worker = shared.replica(1).await;
    let (from_a, from_b) = tokio::join!(wait_on(&a, &on_a), wait_on(&b, &on_b));
    assert_eq!(from_a.result, from_b.result, "one run, one result");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queued_action_survives_restarting_every_replica() {
    let Some(shared) = Shared::start().await else { return };
    let a = shared.replica(0).await;
    let b = shared.replica(0).await;
    let (name, stream) = first_operation(&a, &Act::sh("echo survived")).await;
    drop(stream);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    // Fresh replicas on the same Redis; a worker comes with one of them.
    let c = shared.replica(1).await;
    let done = wait_on(&c, &name).await;
    assert_eq!(done.result.unwrap().exit_code, 0);
    c.stop().await.unwrap();
}

/// A `cargo-distbuild worker` process connected to `server`.
fn remote_worker(server: &TestServer, name: &str, dir: &Path) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_cargo-distbuild"))
        .args(["worker", "--scheduler", &server.url(), "--name", name, "--slots", "1", "--work-dir"])
        .arg(dir)
        .env("DISTBUILD_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_on_b_has_its_action_rerun_by_a_worker_on_a() {
    let Some(shared) = Shared::start().await else { return };
    let a = shared.replica(0).await;
    let b = shared.replica(0).await;
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut doomed = remote_worker(&b, "doomed", dirs.0.path());
    let act = Act { do_not_cache: true, output_paths: vec!["out"], ..Act::sh("sleep 2; echo finished > out") };
    let digest = act.upload(&a).await;
    let mut stream = execution(&a).execute(request(digest)).await.unwrap().into_inner();
    loop {
        let op = tokio::time::timeout(Duration::from_secs(30), stream.message()).await.unwrap().unwrap().unwrap();
        if stage(&op) == Stage::Executing {
            break;
        }
    }
    let _survivor = remote_worker(&a, "survivor", dirs.1.path());
    doomed.start_kill().unwrap(); // SIGKILL: B sees its stream end
    let mut last = None;
    while let Some(op) = tokio::time::timeout(Duration::from_secs(60), stream.message()).await.unwrap().unwrap() {
        last = Some(op);
    }
    let r = response(&last.unwrap());
    let result = r.result.as_ref().unwrap_or_else(|| panic!("no result: {:?}", r.status));
    assert_eq!(result.exit_code, 0);
    assert_eq!(result.execution_metadata.as_ref().unwrap().worker, "survivor");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}
