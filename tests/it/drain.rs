//! Worker drains: by an admin (`workers drain|undrain`, the SetWorkerDraining
//! call) and by SIGTERM to a `cargo-distbuild worker` process. A draining
//! worker finishes what it runs and is given nothing new.

use std::process::Stdio;
use std::time::{Duration, Instant};

use cargo_distbuild::admin::proto::admin_client::AdminClient;
use cargo_distbuild::admin::proto::{ListWorkersRequest, SetWorkerDrainingRequest, WorkerEntry};
use cargo_distbuild::config::{Backend, FileConfig};
use remote_apis::longrunning::Operation;
use remote_apis::longrunning::operations_client::OperationsClient;
use remote_apis::reapi::ExecuteResponse;
use remote_apis::reapi::execution_stage::Value as Stage;
use tonic::{Code, Request};

use crate::common::{TestServer, assert_code};
use crate::execution::{Act, execution, request, response, stage};

/// A `cargo-distbuild worker` process with its own work directory.
struct Worker {
    child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

impl Worker {
    fn start(server: &TestServer, name: &str, slots: usize, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_cargo-distbuild"))
            .args(["worker", "--scheduler", &server.url(), "--name", name, "--slots", &slots.to_string()])
            .arg("--work-dir")
            .arg(dir.path().join("work"))
            .args(extra)
            .env("DISTBUILD_LOG", "info")
            .env("XDG_CONFIG_HOME", "/nonexistent")
            .env_remove("DISTBUILD_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Worker { child, _dir: dir }
    }

    fn signal(&self, signal: i32) {
        // SAFETY: signalling our own child process.
        assert_eq!(unsafe { libc::kill(self.child.id().unwrap() as i32, signal) }, 0);
    }

    /// Waits for the process to exit on its own; its exit status and stderr.
    async fn exit(self) -> (std::process::ExitStatus, String) {
        let out = tokio::time::timeout(Duration::from_secs(30), self.child.wait_with_output())
            .await
            .expect("the worker did not exit")
            .unwrap();
        (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn scheduler_only(c: &mut FileConfig) {
    c.worker.capacity = Some(0);
    c.worker.heartbeat_interval_secs = 1;
}

fn admin(server: &TestServer) -> AdminClient<tonic::transport::Channel> {
    AdminClient::new(server.channel.clone())
}

async fn workers(server: &TestServer) -> Vec<WorkerEntry> {
    admin(server).list_workers(ListWorkersRequest {}).await.unwrap().into_inner().workers
}

/// Waits (up to 20 s) until the worker list satisfies `check`.
pub async fn wait_workers(server: &TestServer, what: &str, check: impl Fn(&[WorkerEntry]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check(&workers(server).await) {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the worker `name` is connected and draining.
pub async fn wait_draining(server: &TestServer, name: &str) {
    wait_workers(server, &format!("{name} draining"), |ws| ws.iter().any(|w| w.name == name && w.draining)).await;
}

async fn set_draining(server: &TestServer, name: &str, draining: bool) -> Result<WorkerEntry, tonic::Status> {
    let request = SetWorkerDrainingRequest { name: name.into(), draining };
    admin(server).set_worker_draining(request).await.map(|r| r.into_inner())
}

/// Starts an uncached action; returns its stream once it is EXECUTING.
async fn running(server: &TestServer, script: &str) -> tonic::Streaming<Operation> {
    let act = Act { do_not_cache: true, ..Act::sh(script) };
    let mut stream = execution(server).execute(request(act.upload(server).await)).await.unwrap().into_inner();
    while stage(&stream.message().await.unwrap().expect("ended before executing")) != Stage::Executing {}
    stream
}

/// Follows an operation stream to its end; its response and every stage seen.
async fn finish(stream: &mut tonic::Streaming<Operation>) -> (ExecuteResponse, Vec<Stage>) {
    let (mut last, mut stages) = (None, Vec::new());
    while let Some(op) = stream.message().await.unwrap() {
        stages.push(stage(&op));
        last = Some(op);
    }
    (response(&last.expect("no operation")), stages)
}

/// The worker that ran a successful action.
fn ran_on(r: &ExecuteResponse) -> String {
    let result = r.result.as_ref().unwrap_or_else(|| panic!("no result: {:?}", r.status));
    assert_eq!(result.exit_code, 0, "{:?}", r.status);
    result.execution_metadata.as_ref().unwrap().worker.clone()
}

async fn stdout_of(server: &TestServer, r: &ExecuteResponse) -> String {
    let d = r.result.as_ref().unwrap().stdout_digest.as_ref().unwrap();
    let d = remote_apis::Digest::from_proto(remote_apis::DigestFunction::Sha256, d).unwrap();
    String::from_utf8(server.client().read_blob(d).await.unwrap().to_vec()).unwrap()
}

async fn cli(server: &TestServer, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_cargo-distbuild"))
        .args(args)
        .args(["--server", &server.url()])
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .env_remove("DISTBUILD_CONFIG")
        .output()
        .await
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drained_worker_finishes_its_action_and_the_next_goes_elsewhere() {
    let server = TestServer::start_with(Backend::Memory, scheduler_only).await;
    // Two slots: only the drain keeps the second action off it.
    let _a = Worker::start(&server, "a", 2, &[]);
    wait_workers(&server, "a connected", |ws| ws.len() == 1).await;
    let mut first = running(&server, "sleep 1; echo first").await;

    let out = cli(&server, &["workers", "drain", "a"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("a is draining"), "{}", text(&out.stdout));
    let out = cli(&server, &["workers", "list"]).await;
    let listing = text(&out.stdout);
    assert!(listing.lines().next().unwrap().contains("STATE"), "{listing}");
    assert!(listing.lines().any(|l| l.starts_with("a ") && l.contains("draining")), "{listing}");

    let second = Act { do_not_cache: true, ..Act::sh("echo second") };
    let mut second = execution(&server).execute(request(second.upload(&server).await)).await.unwrap().into_inner();
    let name = second.message().await.unwrap().unwrap().name;
    let (r, _) = finish(&mut first).await;
    assert_eq!(ran_on(&r), "a", "the running action finished where it ran");
    assert_eq!(stdout_of(&server, &r).await, "first\n");
    // `a` is idle now and the second action still waits: it takes nothing new.
    let op = OperationsClient::new(server.channel.clone())
        .get_operation(remote_apis::longrunning::GetOperationRequest { name })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stage(&op), Stage::Queued);
    let _b = Worker::start(&server, "b", 1, &[]);
    let (r, _) = finish(&mut second).await;
    assert_eq!(ran_on(&r), "b", "the next action went to another worker");

    // Undrained, `a` takes work again (and `b` is drained through the API).
    let out = cli(&server, &["workers", "undrain", "a"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(set_draining(&server, "b", true).await.unwrap().draining);
    let listed = workers(&server).await;
    assert_eq!(listed.iter().map(|w| (w.name.as_str(), w.draining)).collect::<Vec<_>>(), [("a", false), ("b", true)]);
    let r = crate::execution::execute(&server, &Act { do_not_cache: true, ..Act::sh("echo third") }).await;
    assert_eq!(ran_on(&r), "a");

    // An unknown name is NOT_FOUND, through the API and the command line.
    let status = assert_code(set_draining(&server, "nobody", true).await, Code::NotFound);
    assert!(status.message().contains("nobody"), "{}", status.message());
    let out = cli(&server, &["workers", "drain", "nobody"]).await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("NotFound"), "{}", text(&out.stderr));
}

#[tokio::test]
async fn draining_needs_the_admin_grant() {
    use crate::auth::{start, token_file_text, token_of};
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_file_text(&[("ops", &["admin"], ""), ("dev", &["execute", "cas-read"], "")]);
    let server = start(dir.path(), &tokens, &[], |_| {}).await;
    let builtin = workers_as(&server, "ops").await;
    let call = |token: &str, draining: bool| {
        let mut request = Request::new(SetWorkerDrainingRequest { name: builtin.clone(), draining });
        request.metadata_mut().insert("authorization", format!("Bearer {}", token_of(token)).parse().unwrap());
        let mut client = admin(&server);
        async move { client.set_worker_draining(request).await.map(|r| r.into_inner()) }
    };
    let status = assert_code(call("dev", true).await, Code::PermissionDenied);
    assert!(status.message().contains("admin"), "{}", status.message());
    assert_code(admin(&server).set_worker_draining(SetWorkerDrainingRequest::default()).await, Code::Unauthenticated);
    assert!(call("ops", true).await.unwrap().draining);
    assert!(!call("ops", false).await.unwrap().draining);
}

/// The built-in worker's name, listed with `token`.
async fn workers_as(server: &TestServer, token: &str) -> String {
    let mut request = Request::new(ListWorkersRequest {});
    let bearer = format!("Bearer {}", crate::auth::token_of(token));
    request.metadata_mut().insert("authorization", bearer.parse().unwrap());
    let listed = admin(server).list_workers(request).await.unwrap().into_inner().workers;
    listed.into_iter().find(|w| w.builtin).expect("a built-in worker").name
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_a_busy_worker_finish_its_action_then_exit() {
    let server = TestServer::start_with(Backend::Memory, scheduler_only).await;
    let worker = Worker::start(&server, "busy", 1, &[]);
    wait_workers(&server, "busy connected", |ws| ws.len() == 1).await;
    let mut stream = running(&server, "sleep 2; echo finished after SIGTERM").await;
    worker.signal(libc::SIGTERM);
    let (r, stages) = finish(&mut stream).await;
    assert_eq!(ran_on(&r), "busy");
    assert_eq!(stdout_of(&server, &r).await, "finished after SIGTERM\n");
    assert!(!stages.contains(&Stage::Queued), "never re-queued: {stages:?}");
    let (status, stderr) = worker.exit().await;
    assert!(status.success(), "{status:?}: {stderr}");
    assert!(stderr.contains("draining"), "{stderr}");
    assert!(stderr.contains("drained"), "{stderr}");
    wait_workers(&server, "busy gone", |ws| ws.is_empty()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_sigterm_or_the_drain_timeout_stops_and_the_action_is_requeued() {
    let server = TestServer::start_with(Backend::Memory, scheduler_only).await;
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), "[worker]\ndrain_timeout = \"1s\"\n").unwrap();
    let config = config.path().to_str().unwrap().to_string();
    for (name, extra) in [("twice", vec![]), ("timed-out", vec!["--config", config.as_str()])] {
        let worker = Worker::start(&server, name, 1, &extra);
        wait_workers(&server, "connected", |ws| ws.iter().any(|w| w.name == name)).await;
        let seconds = crate::execution::unique_sleep();
        let mut stream = running(&server, &format!("sleep {seconds} & wait")).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        let pid = loop {
            if let Some(pid) = crate::execution::sleeper(&seconds) {
                break pid;
            }
            assert!(Instant::now() < deadline, "the action never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        worker.signal(libc::SIGTERM);
        wait_draining(&server, name).await;
        if name == "twice" {
            worker.signal(libc::SIGTERM);
        }
        let (status, stderr) = worker.exit().await;
        assert!(status.success(), "{status:?}: {stderr}");
        let deadline = Instant::now() + Duration::from_secs(15);
        while crate::execution::alive(pid) {
            assert!(Instant::now() < deadline, "the action's process outlived the worker");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Not reported as cancelled: back in the queue for another worker.
        let op = stream.message().await.unwrap().unwrap();
        assert_eq!(stage(&op), Stage::Queued, "{name}: {stderr}");
        assert!(!op.done);
        let expected = if name == "twice" { "stopping now" } else { "drain timeout" };
        assert!(stderr.contains(expected), "{stderr}");
        // Not left for the next worker of this loop.
        let cancel = remote_apis::longrunning::CancelOperationRequest { name: op.name };
        OperationsClient::new(server.channel.clone()).cancel_operation(cancel).await.unwrap();
    }
}
