//! Regression tests of the hardening issue for workers: an action's
//! processes die with the action and with its worker (item 7), and a worker's
//! name cannot be taken by another connection (item 8).

use std::process::Stdio;
use std::time::{Duration, Instant};

use cargo_distbuild::admin::proto::{ListWorkersRequest, admin_client::AdminClient};
use cargo_distbuild::config::Backend;
use cargo_distbuild::execution::gateway::proto::worker_gateway_client::WorkerGatewayClient;
use cargo_distbuild::execution::gateway::proto::{Hello, WorkerMessage, worker_message};
use remote_apis::longrunning::CancelOperationRequest;
use remote_apis::longrunning::operations_client::OperationsClient;
use remote_apis::reapi::execution_stage::Value as Stage;
use tonic::Code;

use crate::common::{TestServer, assert_code};
use crate::execution::{Act, alive, execute, execution, request, stage};

/// A shell script that starts a `setsid` daemon (its own session, out of
/// the action's process group) running `sleep MARKER`, then runs `rest`.
/// Actions run in their own PID namespace with a private /tmp, so the test
/// finds their processes in the host's /proc by the marker (see
/// [`read_pids`]), not through files.
fn daemon_script(marker: &str, rest: &str) -> String {
    format!("setsid sleep {marker} </dev/null >/dev/null 2>&1 & {rest}")
}

/// Host pids of the live processes whose command line holds `marker`: the
/// daemon, the shell (its script names the marker) and the action init.
fn marked(marker: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let holds = cmdline.windows(marker.len()).any(|w| w == marker.as_bytes());
            (holds && alive(pid)).then_some(pid)
        })
        .collect()
}

/// Waits (up to 20 s) until the daemon runs; returns every marked pid.
async fn read_pids(marker: &str) -> Vec<i32> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if crate::execution::sleeper(marker).is_some() {
            return marked(marker);
        }
        assert!(Instant::now() < deadline, "the action never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls until none of `pids` is alive; fails after a generous deadline
/// (the deadline is no claim about speed: only that they die at all).
async fn wait_all_dead(pids: &[i32], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for &pid in pids {
        while alive(pid) {
            if Instant::now() >= deadline {
                for &p in pids {
                    // SAFETY: cleaning up after the failed test.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
                panic!("process {pid} survived {what}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sigkilled_remote_worker_takes_its_action_with_it() {
    let server = TestServer::start_with(Backend::Memory, |c| {
        c.worker.capacity = Some(0);
        c.worker.heartbeat_interval_secs = 1;
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_cargo-distbuild"))
        .args(["worker", "--scheduler", &server.url(), "--name", "doomed", "--slots", "1", "--work-dir"])
        .arg(dir.path().join("work"))
        .env("DISTBUILD_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let marker = crate::execution::unique_sleep();
    let act = Act { do_not_cache: true, ..Act::sh(&daemon_script(&marker, "sleep 1000")) };
    let digest = act.upload(&server).await;
    let _stream = execution(&server).execute(request(digest)).await.unwrap().into_inner();
    let pids = read_pids(&marker).await;
    assert!(pids.iter().all(|&p| alive(p)), "{pids:?}");
    worker.start_kill().unwrap(); // SIGKILL: the worker cleans up nothing itself
    worker.wait().await.unwrap();
    wait_all_dead(&pids, "its SIGKILLed worker").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_descendant_survives_the_end_the_cancel_or_the_timeout_of_an_action() {
    let server = TestServer::start_with(Backend::Memory, |c| {
        c.execution.default_timeout = Duration::from_secs(60);
    })
    .await;

    // The action ends on its own, leaving a daemon behind (it waits until
    // the daemon runs: `sleep MARKER` is in the namespace's /proc).
    let ended = crate::execution::unique_sleep();
    let wait = format!("until grep -qs {ended} /proc/[0-9]*/cmdline; do sleep 0.01; done; echo daemon; exit 3");
    let act = Act { do_not_cache: true, ..Act::sh(&daemon_script(&ended, &wait)) };
    let r = execute(&server, &act).await;
    assert_eq!(r.result.as_ref().unwrap().exit_code, 3, "{:?}", r.status);
    wait_all_dead(&marked(&ended), "the action's end").await;
    assert!(marked(&ended).is_empty());

    // The action is cancelled.
    let cancelled = crate::execution::unique_sleep();
    let act = Act { do_not_cache: true, ..Act::sh(&daemon_script(&cancelled, "sleep 1000")) };
    let digest = act.upload(&server).await;
    let mut stream = execution(&server).execute(request(digest)).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let pids = read_pids(&cancelled).await;
    assert!(pids.iter().all(|&p| alive(p)), "{pids:?}");
    let mut ops = OperationsClient::new(server.channel.clone());
    ops.cancel_operation(CancelOperationRequest { name: first.name.clone() }).await.unwrap();
    while stream.message().await.unwrap().is_some() {}
    wait_all_dead(&pids, "CancelOperation").await;

    // The action runs past its timeout.
    let timed_out = crate::execution::unique_sleep();
    let act = Act {
        do_not_cache: true,
        timeout: Some(Duration::from_secs(2)),
        ..Act::sh(&daemon_script(&timed_out, "sleep 1000"))
    };
    let digest = act.upload(&server).await;
    let channel = server.channel.clone();
    let running = tokio::spawn(async move {
        let mut client = remote_apis::reapi::execution_client::ExecutionClient::new(channel);
        let mut stream = client.execute(request(digest)).await.unwrap().into_inner();
        let mut last = None;
        while let Some(op) = stream.message().await.unwrap() {
            last = Some(op);
        }
        crate::execution::response(&last.unwrap())
    });
    let pids = read_pids(&timed_out).await;
    let r = running.await.unwrap();
    assert_eq!(r.status.as_ref().map(|s| s.code), Some(Code::DeadlineExceeded as i32), "{:?}", r.status);
    wait_all_dead(&pids, "the action's timeout").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_action_keeps_its_exit_code_output_and_environment_under_the_init() {
    let server = TestServer::start_with(Backend::Memory, |_| {}).await;
    let act = Act {
        script: "echo out; echo err >&2; env | sort; kill -TERM $$".into(),
        env: vec![("ONLY", "this")],
        do_not_cache: true,
        ..Default::default()
    };
    let r = execute(&server, &act).await;
    let result = r.result.as_ref().unwrap();
    assert_eq!(result.exit_code, 128 + libc::SIGTERM, "a signal is 128 + N: {:?}", r.status);
    let digest = |d: &Option<remote_apis::reapi::Digest>| {
        remote_apis::Digest::from_proto(remote_apis::DigestFunction::Sha256, d.as_ref().unwrap()).unwrap()
    };
    let stdout = server.client().read_blob(digest(&result.stdout_digest)).await.unwrap();
    let stdout = String::from_utf8_lossy(&stdout);
    let vars: Vec<&str> =
        stdout.lines().skip(1).filter(|l| !["PWD=", "SHLVL=", "_="].iter().any(|p| l.starts_with(p))).collect();
    assert_eq!(vars, ["ONLY=this", "PATH=/usr/bin:/bin"], "nothing of the init's own: {stdout}");
    let stderr = server.client().read_blob(digest(&result.stderr_digest)).await.unwrap();
    assert_eq!(stderr, "err\n");

    // A program that cannot start is still an error, not an exit code.
    let missing = Act { do_not_cache: true, ..Act::sh("true") };
    let mut command = missing.command();
    command.arguments = vec!["./absent".into()];
    let digest = missing.upload_with(&server, &command).await;
    let ops = crate::execution::run(&server, request(digest)).await.unwrap();
    let r = crate::execution::response(ops.last().unwrap());
    let status = r.status.unwrap();
    assert_eq!(status.code, Code::InvalidArgument as i32, "{}", status.message);
    assert!(status.message.contains("No such file"), "{}", status.message);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_connection_can_take_the_builtin_workers_name() {
    let server = TestServer::start_with(Backend::Memory, |_| {}).await;
    let list = || async {
        AdminClient::new(server.channel.clone()).list_workers(ListWorkersRequest {}).await.unwrap().into_inner().workers
    };
    let workers = list().await;
    assert_eq!(workers.len(), 1);
    let builtin = workers[0].name.clone();
    assert!(workers[0].builtin);

    // An impostor says Hello with the built-in worker's name.
    let hello = Hello { name: builtin.clone(), slots: 1, ..Default::default() };
    let message = WorkerMessage { message: Some(worker_message::Message::Hello(hello)) };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tx.send(message).unwrap();
    let session = WorkerGatewayClient::new(server.channel.clone())
        .session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await;
    let status = assert_code(session.map(|_| ()), Code::AlreadyExists);
    assert!(status.message().contains(&builtin), "{}", status.message());

    let workers = list().await;
    assert_eq!(workers.len(), 1, "{workers:?}");
    assert!(workers[0].builtin && workers[0].name == builtin, "{workers:?}");
    let r = execute(&server, &Act { do_not_cache: true, ..Act::sh("echo still here") }).await;
    let result = r.result.as_ref().unwrap_or_else(|| panic!("no result: {:?}", r.status));
    assert_eq!(result.execution_metadata.as_ref().unwrap().worker, builtin);
    drop(tx);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_remote_worker_with_a_taken_name_does_not_evict_the_first() {
    let server = TestServer::start_with(Backend::Memory, |c| c.worker.capacity = Some(0)).await;
    let dir = tempfile::tempdir().unwrap();
    let start = |work: &str| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_cargo-distbuild"))
            .args(["worker", "--scheduler", &server.url(), "--name", "twin", "--slots", "1", "--work-dir"])
            .arg(dir.path().join(work))
            .env("DISTBUILD_LOG", "error")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let _first = start("first");
    let deadline = Instant::now() + Duration::from_secs(20);
    let first_connected = loop {
        let w = AdminClient::new(server.channel.clone()).list_workers(ListWorkersRequest {}).await.unwrap();
        if let Some(w) = w.into_inner().workers.pop() {
            break w.connected_secs;
        }
        assert!(Instant::now() < deadline, "the first worker never connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The second process keeps retrying; whatever it does, the first stays
    // (an eviction would re-register the name with a fresh connection and
    // cancel the running action).
    let _second = start("second");
    let act = Act { do_not_cache: true, ..Act::sh("sleep 3; echo done") };
    let digest = act.upload(&server).await;
    let mut stream = execution(&server).execute(request(digest)).await.unwrap().into_inner();
    let mut stages = Vec::new();
    let mut last = None;
    while let Some(op) = stream.message().await.unwrap() {
        stages.push(stage(&op));
        last = Some(op);
    }
    let r = crate::execution::response(&last.unwrap());
    assert_eq!(r.result.as_ref().map(|r| r.exit_code), Some(0), "{:?}", r.status);
    assert_eq!(stages.iter().filter(|s| **s == Stage::Executing).count(), 1, "never re-queued: {stages:?}");
    let w = AdminClient::new(server.channel.clone()).list_workers(ListWorkersRequest {}).await.unwrap();
    let workers = w.into_inner().workers;
    assert_eq!(workers.len(), 1, "{workers:?}");
    assert!(workers[0].connected_secs >= first_connected + 3, "the first connection is still the one: {workers:?}");
}
