//! Remote workers: `cargo-distbuild worker` processes connected to an
//! in-process scheduler with no built-in worker.

use std::process::Stdio;
use std::time::{Duration, Instant};

use cargo_distbuild::config::Backend;
use remote_apis::reapi::execution_stage::Value as Stage;

use crate::common::TestServer;
use crate::execution::{Act, execution, request, response, stage};

struct Worker {
    child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

impl Worker {
    fn start(server: &TestServer, name: &str, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_cargo-distbuild"));
        command.args(["worker", "--scheduler", &server.url(), "--name", name, "--slots", "1"]);
        if !extra.contains(&"--work-dir") {
            command.arg("--work-dir").arg(dir.path());
        }
        let child =
            command.args(extra).env("DISTBUILD_LOG", "warn").stdin(Stdio::null()).kill_on_drop(true).spawn().unwrap();
        Worker { child, _dir: dir }
    }
}

/// Waits until the scheduler lists `n` workers.
pub async fn wait_for_workers(server: &TestServer, n: usize) {
    use cargo_distbuild::admin::proto::{ListWorkersRequest, admin_client::AdminClient};
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let resp = AdminClient::new(server.channel.clone()).list_workers(ListWorkersRequest {}).await.unwrap();
        if resp.into_inner().workers.len() == n {
            return;
        }
        assert!(Instant::now() < deadline, "{n} workers never connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn scheduler_only(backend: Backend) -> impl FnOnce(&mut cargo_distbuild::config::FileConfig) {
    let _ = backend;
    |c| {
        c.worker.capacity = Some(0);
        c.worker.heartbeat_interval_secs = 1;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_remote_worker_runs_actions_and_properties_route_them() {
    let server = TestServer::start_with(Backend::Filesystem, scheduler_only(Backend::Filesystem)).await;
    let _plain = Worker::start(&server, "plain", &[]);
    let _gpu = Worker::start(&server, "gpu", &["--property", "gpu=yes"]);
    wait_for_workers(&server, 2).await;
    let act = Act {
        script: "cat in.txt > out.txt; echo ran".into(),
        files: vec![("in.txt", b"remote input\n", false)],
        output_paths: vec!["out.txt"],
        platform: vec![("gpu", "yes")],
        ..Default::default()
    };
    let r = crate::execution::execute(&server, &act).await;
    let result = r.result.as_ref().unwrap();
    assert_eq!(result.exit_code, 0, "{:?}", r.status);
    assert_eq!(result.execution_metadata.as_ref().unwrap().worker, "gpu");
    let out = result.output_files[0].digest.as_ref().unwrap();
    let d = remote_apis::Digest::from_proto(remote_apis::DigestFunction::Sha256, out).unwrap();
    assert_eq!(server.client().read_blob(d).await.unwrap(), "remote input\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_action_hands_it_to_another() {
    let server = TestServer::start_with(Backend::Filesystem, scheduler_only(Backend::Filesystem)).await;
    let mut first = Worker::start(&server, "doomed", &[]);
    wait_for_workers(&server, 1).await;
    let act = Act { do_not_cache: true, output_paths: vec!["out"], ..Act::sh("sleep 2; echo finished > out") };
    let digest = act.upload(&server).await;
    let mut stream = execution(&server).execute(request(digest)).await.unwrap().into_inner();
    // Wait until the first worker runs it.
    loop {
        let op = stream.message().await.unwrap().unwrap();
        if stage(&op) == Stage::Executing {
            break;
        }
    }
    let _second = Worker::start(&server, "survivor", &[]);
    wait_for_workers(&server, 2).await;
    first.child.start_kill().unwrap(); // SIGKILL
    let mut stages = Vec::new();
    let mut last = None;
    while let Some(op) = stream.message().await.unwrap() {
        stages.push(stage(&op));
        last = Some(op);
    }
    let r = response(&last.unwrap());
    let result = r.result.as_ref().unwrap_or_else(|| panic!("no result: {:?}", r.status));
    assert_eq!(result.exit_code, 0);
    assert_eq!(result.execution_metadata.as_ref().unwrap().worker, "survivor");
    assert_eq!(stages.first(), Some(&Stage::Queued), "back in the queue first: {stages:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_reconnects_after_the_scheduler_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), Backend::Filesystem, scheduler_only(Backend::Filesystem)).await;
    let addr = server.addr;
    let _worker = Worker::start(&server, "faithful", &[]);
    wait_for_workers(&server, 1).await;
    server.stop().await.unwrap();
    // The same address again.
    let server = TestServer::start_in(dir.path(), Backend::Filesystem, |c| {
        c.scheduler.addr = addr.to_string();
        c.worker.capacity = Some(0);
    })
    .await;
    wait_for_workers(&server, 1).await;
    let r = crate::execution::execute(&server, &Act::sh("echo back")).await;
    assert_eq!(r.result.unwrap().execution_metadata.unwrap().worker, "faithful");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_worker_is_dropped_and_its_action_rerun() {
    let server = TestServer::start_with(Backend::Filesystem, scheduler_only(Backend::Filesystem)).await;
    let frozen = Worker::start(&server, "frozen", &[]);
    wait_for_workers(&server, 1).await;
    let act = Act { do_not_cache: true, ..Act::sh("sleep 1; echo ok") };
    let digest = act.upload(&server).await;
    let mut stream = execution(&server).execute(request(digest)).await.unwrap().into_inner();
    loop {
        if stage(&stream.message().await.unwrap().unwrap()) == Stage::Executing {
            break;
        }
    }
    // Stopped, not killed: the connection stays open, only keepalives stop
    // (heartbeat 1 s here, so it is dropped after 3 s of silence).
    let pid = frozen.child.id().unwrap() as i32;
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let _thawed = Worker::start(&server, "thawed", &[]);
    let mut last = None;
    while let Some(op) = stream.message().await.unwrap() {
        last = Some(op);
    }
    let r = response(&last.unwrap());
    assert_eq!(r.result.unwrap().execution_metadata.unwrap().worker, "thawed");
    unsafe { libc::kill(pid, libc::SIGCONT) };
}

#[tokio::test]
async fn two_workers_cannot_share_a_work_directory() {
    let server = TestServer::start_with(Backend::Memory, scheduler_only(Backend::Memory)).await;
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().to_str().unwrap().to_string();
    let _first = Worker::start(&server, "first", &["--work-dir", &work]);
    wait_for_workers(&server, 1).await;
    let second = tokio::process::Command::new(env!("CARGO_BIN_EXE_cargo-distbuild"))
        .args(["worker", "--scheduler", &server.url(), "--work-dir", &work])
        .output()
        .await
        .unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("in use by another worker"), "{stderr}");
}

/// Starts an action that leaves a background `sleep` and returns its pid.
async fn start_sleeper(server: &TestServer) -> (tonic::Streaming<remote_apis::longrunning::Operation>, i32) {
    let seconds = crate::execution::unique_sleep();
    let act = Act { script: format!("sleep {seconds} & wait"), do_not_cache: true, ..Default::default() };
    let digest = act.upload(server).await;
    let stream = execution(server).execute(request(digest)).await.unwrap().into_inner();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(pid) = crate::execution::sleeper(&seconds) {
            return (stream, pid);
        }
        assert!(Instant::now() < deadline, "the action never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_dead(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while crate::execution::alive(pid) {
        assert!(Instant::now() < deadline, "process {pid} outlived its worker");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_worker_leaves_no_process_behind() {
    // A remote worker stopped with SIGTERM.
    let server = TestServer::start_with(Backend::Memory, scheduler_only(Backend::Memory)).await;
    let worker = Worker::start(&server, "stopping", &[]);
    wait_for_workers(&server, 1).await;
    let (_stream, pid) = start_sleeper(&server).await;
    // SAFETY: signalling our own child process. The first SIGTERM drains
    // (the action could run on), the second stops at once.
    unsafe { libc::kill(worker.child.id().unwrap() as i32, libc::SIGTERM) };
    crate::drain::wait_draining(&server, "stopping").await;
    unsafe { libc::kill(worker.child.id().unwrap() as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(Duration::from_secs(15), worker.child.wait_with_output()).await.unwrap().unwrap();
    assert!(status.status.success(), "{status:?}");
    wait_dead(pid).await;

    // The built-in slots of a server that stops.
    let server =
        TestServer::start_with(Backend::Memory, |c| c.server.shutdown_grace = Duration::from_millis(200)).await;
    let (_stream, pid) = start_sleeper(&server).await;
    server.stop().await.unwrap();
    wait_dead(pid).await;
}
