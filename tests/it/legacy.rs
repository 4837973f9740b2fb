//! The spellings of the project's first README, still accepted: each does
//! what its modern form does, and none shows in `--help`.

use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use cargo_distbuild::admin::proto::ListWorkersRequest;
use cargo_distbuild::admin::proto::admin_client::AdminClient;

use crate::common::{TestServer, cli};
use crate::execution::Act;
use crate::logs::ServerProcess;

/// Its stdout, after checking that it succeeded.
fn ok(out: &Output) -> String {
    assert!(out.status.success(), "{:?}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn master_commands_are_job_jobs_and_workers() {
    let server = TestServer::start().await;
    let url = server.url();
    let digest = Act::sh("echo legacy").upload(&server).await.to_string();

    let old = ok(&cli(&["master", "submit-job", &digest, "--server", &url]).await);
    let new = ok(&cli(&["job", "submit", &digest, "--skip-cache", "--server", &url]).await);
    for out in [&old, &new] {
        assert!(out.contains("stage:     COMPLETED"), "{out}");
        assert!(out.contains("exit code: 0"), "{out}");
    }
    let op = old.lines().next().unwrap().to_string();
    assert!(op.starts_with("operations/"), "{old}");

    let pairs: [(&[&str], &[&str]); 3] = [
        (&["master", "job-status", &op], &["job", "status", &op]),
        (&["master", "list-jobs", "--limit", "5"], &["jobs", "list", "--limit", "5"]),
        (&["master", "list-workers"], &["workers", "list"]),
    ];
    for (older, modern) in pairs {
        let older_out = ok(&cli(&[older, &["--server", &url]].concat()).await);
        let modern_out = ok(&cli(&[modern, &["--server", &url]].concat()).await);
        assert_eq!(older_out, modern_out, "{older:?} and {modern:?}");
        assert!(!older_out.is_empty());
    }
    let status = ok(&cli(&["master", "job-status", &op, "--server", &url]).await);
    assert!(status.contains(&op) && status.contains("COMPLETED"), "{status}");
    let jobs = ok(&cli(&["master", "list-jobs", "--server", &url]).await);
    assert!(jobs.contains(&op), "{jobs}");
    let workers = ok(&cli(&["master", "list-workers", "--server", &url]).await);
    assert!(workers.contains("builtin@"), "{workers}");
}

#[tokio::test(flavor = "multi_thread")]
async fn scheduler_run_serves_and_worker_run_connects_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server =
        ServerProcess::start(&["scheduler", "run", "--data-dir", data.to_str().unwrap(), "--workers", "0"], &[]).await;
    let work = dir.path().join("work");
    let worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_cargo-distbuild"))
        .args(["worker", "run", "--id", "worker-1", "--port", "6001", "--server", &server.url])
        .arg("--work-dir")
        .arg(&work)
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .env_remove("DISTBUILD_CONFIG")
        .env_remove("DISTBUILD_LOG")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let channel = tonic::transport::Endpoint::from_shared(server.url.replace("grpc://", "http://")).unwrap();
    let mut admin = AdminClient::new(channel.connect().await.unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listed = admin.list_workers(ListWorkersRequest {}).await.unwrap().into_inner().workers;
        if listed.iter().any(|w| w.name == "worker-1") {
            break;
        }
        assert!(Instant::now() < deadline, "worker-1 never connected: {listed:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The server has no slots of its own: the old-style worker runs it.
    let out = ok(&cli(&["exec", "--server", &server.url, "--", "sh", "-c", "echo via the old spelling"]).await);
    assert_eq!(out, "via the old spelling\n");

    // SAFETY: signalling our own child process.
    assert_eq!(unsafe { libc::kill(worker.id().unwrap() as i32, libc::SIGTERM) }, 0);
    let out = tokio::time::timeout(Duration::from_secs(30), worker.wait_with_output()).await.unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(stderr.contains("--port is not needed"), "the port is explained: {stderr}");
    let (status, stderr) = server.stop().await;
    assert!(status.success(), "{status:?}: {stderr}");
}

#[tokio::test]
async fn older_spellings_are_hidden_from_help() {
    let help = ok(&cli(&["--help"]).await);
    assert!(help.contains("workers"), "{help}");
    assert!(!help.contains("master"), "{help}");
    // A subcommand is listed as "  NAME  what it does".
    let lists = |help: &str, name: &str| help.lines().any(|l| l.trim_start().starts_with(&format!("{name} ")));
    let help = ok(&cli(&["scheduler", "--help"]).await);
    assert!(lists(&help, "status") && !lists(&help, "run"), "{help}");
    let help = ok(&cli(&["worker", "--help"]).await);
    assert!(help.contains("--name") && !help.contains("--id") && !help.contains("--port"), "{help}");
    assert!(!lists(&help, "run") && !help.contains("COMMAND"), "{help}");
    let help = ok(&cli(&["workers", "--help"]).await);
    assert!(help.contains("drain") && help.contains("undrain"), "{help}");
}
