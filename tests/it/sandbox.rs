//! The action sandbox (namespaces, the default): what an action cannot
//! reach, for the server's built-in worker and a remote worker process
//! alike. (Input and output file safety: `sandbox_files`.)

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use cargo_distbuild::admin::proto::{ListWorkersRequest, admin_client::AdminClient};
use cargo_distbuild::config::Backend;
use remote_apis::reapi::ExecuteResponse;
use remote_apis::{Digest, DigestFunction};

use crate::common::TestServer;
use crate::execution::{Act, execute, request, run};

#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Builtin,
    Remote,
}

/// A server and the one worker that runs its actions.
pub struct Farm {
    pub server: TestServer,
    /// The worker's work directory (blob cache and action directories).
    pub work_dir: PathBuf,
    _worker: Option<tokio::process::Child>,
    _dir: tempfile::TempDir,
}

impl Farm {
    async fn start(kind: Kind, allow_network: bool) -> Farm {
        Farm::start_with(kind, allow_network, false).await
    }

    /// `input_root_as_root`: the worker's `[worker] input_root_as_root`.
    pub async fn start_with(kind: Kind, allow_network: bool, input_root_as_root: bool) -> Farm {
        let dir = tempfile::tempdir().unwrap();
        match kind {
            Kind::Builtin => {
                let server = TestServer::start_with(Backend::Filesystem, |c| {
                    c.worker.capacity = Some(2);
                    c.worker.allow_network = allow_network;
                    c.worker.input_root_as_root = input_root_as_root;
                })
                .await;
                let work_dir = server.data_dir.join("worker");
                Farm { server, work_dir, _worker: None, _dir: dir }
            }
            Kind::Remote => {
                let server = TestServer::start_with(Backend::Filesystem, |c| c.worker.capacity = Some(0)).await;
                let work_dir = dir.path().join("work");
                let config = dir.path().join("worker.toml");
                // A token file, readable by everyone, where a sandboxed
                // action could reach it if it were not hidden (tempdir()
                // is under /tmp, which is private in the sandbox anyway).
                let token = worker_token_file();
                std::fs::write(
                    &config,
                    format!(
                        "[worker]\nallow_network = {allow_network}\ninput_root_as_root = {input_root_as_root}\n\
                         [client]\ntoken_file = \"{}\"\n",
                        token.display()
                    ),
                )
                .unwrap();
                let worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_cargo-distbuild"))
                    .args(["worker", "--scheduler", &server.url(), "--slots", "2", "--work-dir"])
                    .arg(&work_dir)
                    .env("DISTBUILD_CONFIG", &config)
                    .env("DISTBUILD_LOG", "warn")
                    .stdin(Stdio::null())
                    .kill_on_drop(true)
                    .spawn()
                    .unwrap();
                let farm = Farm { server, work_dir, _worker: Some(worker), _dir: dir };
                let deadline = Instant::now() + Duration::from_secs(20);
                while farm.sandboxes().await.is_empty() {
                    assert!(Instant::now() < deadline, "the worker never connected");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                farm
            }
        }
    }

    /// What `workers list` shows of each worker's sandbox.
    pub async fn sandboxes(&self) -> Vec<String> {
        let resp = AdminClient::new(self.server.channel.clone()).list_workers(ListWorkersRequest {}).await.unwrap();
        resp.into_inner().workers.into_iter().map(|w| w.sandbox).collect()
    }

    pub async fn run(&self, act: &Act) -> (ExecuteResponse, String, String) {
        let r = execute(&self.server, &Act { do_not_cache: true, ..act.clone() }).await;
        let result = r.result.as_ref().unwrap_or_else(|| panic!("no result: {:?}", r.status));
        let out = self.blob(result.stdout_digest.as_ref()).await;
        let err = self.blob(result.stderr_digest.as_ref()).await;
        (r, out, err)
    }

    pub async fn blob(&self, d: Option<&remote_apis::reapi::Digest>) -> String {
        let d = Digest::from_proto(DigestFunction::Sha256, d.unwrap()).unwrap();
        if d.size == 0 {
            return String::new();
        }
        String::from_utf8_lossy(&self.server.client().read_blob(d).await.unwrap()).into_owned()
    }
}

/// One test per kind of worker.
macro_rules! both {
    ($scenario:ident, $builtin:ident, $remote:ident) => {
        #[tokio::test(flavor = "multi_thread")]
        async fn $builtin() {
            $scenario(Kind::Builtin).await
        }
        #[tokio::test(flavor = "multi_thread")]
        async fn $remote() {
            $scenario(Kind::Remote).await
        }
    };
}

/// `target/tmp/distbuild-worker-<pid>.token`, mode 0644, in a directory
/// everyone can enter: a secret the worker holds and actions must not read.
fn worker_token_file() -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("distbuild-worker-{}.token", std::process::id()));
    std::fs::write(&path, "dbt_not_for_actions\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    path
}

/// The worker's token file (and TLS key) read as empty inside the sandbox.
#[tokio::test(flavor = "multi_thread")]
async fn the_workers_token_file_is_hidden_remote() {
    let farm = Farm::start(Kind::Remote, false).await;
    let token = worker_token_file();
    let act = Act { script: format!("echo bytes=$(cat {} | wc -c)", token.display()), ..Default::default() };
    let (r, out, err) = farm.run(&act).await;
    assert_eq!(r.result.unwrap().exit_code, 0, "{err}");
    assert_eq!(out, "bytes=0\n", "the action read the worker's token file: {err}");
}

fn marker() -> String {
    format!("distbuild-sandbox-{}", uuid::Uuid::new_v4().simple())
}

both!(writes_stay_inside, writes_stay_inside_builtin, writes_stay_inside_remote);
async fn writes_stay_inside(kind: Kind) {
    let farm = Farm::start(kind, false).await;
    assert!(farm.sandboxes().await[0].starts_with("namespaces("), "{:?}", farm.sandboxes().await);
    let mark = marker();
    let act = Act {
        script: format!(
            "echo x > /tmp/{mark} && echo tmp-private; touch /etc/{mark} 2>/dev/null || echo etc-read-only; \
             touch $HOME/{mark} /usr/{mark} 2>/dev/null || echo usr-read-only; echo pid=$$; echo out > out.txt"
        ),
        output_paths: vec!["out.txt"],
        ..Default::default()
    };
    let (r, out, err) = farm.run(&act).await;
    let result = r.result.unwrap();
    assert_eq!(result.exit_code, 0, "{out} {err}");
    assert!(out.contains("tmp-private") && out.contains("etc-read-only") && out.contains("usr-read-only"), "{out}");
    // PID 1 is the sandbox's helper; the shell is the first process after it.
    assert!(out.contains("pid=2\n"), "{out}");
    assert_eq!(result.output_files.len(), 1, "the action directory is writable: {err}");
    for dir in ["/tmp", "/etc", "/usr"] {
        assert!(!std::path::Path::new(dir).join(&mark).exists(), "{dir}/{mark} was written on the host");
    }
}

both!(other_directories_are_hidden, other_directories_are_hidden_builtin, other_directories_are_hidden_remote);
async fn other_directories_are_hidden(kind: Kind) {
    let farm = Farm::start(kind, false).await;
    // Blobs in the server's store and in the worker's cache; another action
    // running meanwhile, with a file in its directory.
    let neighbour = Act {
        script: "sleep 3".into(),
        files: vec![("secret.txt", b"the neighbour's secret\n", false)],
        salt: b"neighbour",
        ..Default::default()
    };
    let server = &farm.server;
    let digest = neighbour.upload(server).await;
    let running = tokio::spawn({
        let channel = server.channel.clone();
        async move {
            let mut client = remote_apis::reapi::execution_client::ExecutionClient::new(channel);
            let mut s = client.execute(request(digest)).await.unwrap().into_inner();
            while s.message().await.unwrap().is_some() {}
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (data, work) = (server.data_dir.display(), farm.work_dir.display());
    let act = Act {
        script: format!(
            "find {data} {work} -name secret.txt 2>/dev/null | grep -v \"^$PWD/\"; \
             echo data=$(find {data} -type f 2>/dev/null | grep -vc \"^$PWD/\"); \
             echo work=$(find {work} -type f 2>/dev/null | grep -vc \"^$PWD/\"); \
             cat {work}/cache/*/* 2>/dev/null | head -c 100"
        ),
        files: vec![("mine.txt", b"my input\n", false)],
        ..Default::default()
    };
    let (r, out, err) = farm.run(&act).await;
    assert_eq!(r.result.unwrap().exit_code, 0, "{err}");
    assert_eq!(out, "data=0\nwork=0\n", "nothing of the store, the cache or the neighbour is visible: {err}");
    running.await.unwrap();
}

both!(the_network_is_loopback_only, the_network_is_loopback_only_builtin, the_network_is_loopback_only_remote);
async fn the_network_is_loopback_only(kind: Kind) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let probe = format!(
        "bash -c 'echo hi > /dev/tcp/127.0.0.1/{port}' 2>/dev/null && echo connected || echo refused; \
         bash -c 'echo hi > /dev/tcp/127.0.0.1/1' 2>&1 | grep -q refused && echo loopback-up"
    );
    // Without network=on: the host's port is not reachable, loopback works.
    let farm = Farm::start(kind, false).await;
    let (_, out, _) = farm.run(&Act::sh(&probe)).await;
    assert_eq!(out, "refused\nloopback-up\n");
    // network=on on a worker that does not allow it: never assigned.
    let asking = Act { platform: vec![("network", "on")], do_not_cache: true, ..Act::sh(&probe) };
    let digest = asking.upload(&farm.server).await;
    match run(&farm.server, request(digest)).await {
        Err(status) => assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}"),
        Ok(ops) => {
            let r = crate::execution::response(ops.last().unwrap());
            assert_eq!(r.status.as_ref().map(|s| s.code), Some(tonic::Code::FailedPrecondition as i32), "{r:?}");
        }
    }
    drop(farm);
    // A worker that allows it: the host's network.
    let farm = Farm::start(kind, true).await;
    assert!(farm.sandboxes().await[0].contains("network=allowed"));
    let (_, out, _) = farm.run(&asking).await;
    assert!(out.starts_with("connected\n"), "{out}");
    // Still loopback only for an action that does not ask.
    let (_, out, _) = farm.run(&Act::sh(&probe)).await;
    assert!(out.starts_with("refused\n"), "{out}");
}

both!(daemons_die_with_the_action, daemons_die_with_the_action_builtin, daemons_die_with_the_action_remote);
async fn daemons_die_with_the_action(kind: Kind) {
    let farm = Farm::start(kind, false).await;
    // A unique argument to find the daemon by in the host's /proc.
    let seconds = format!("3000.{}", std::process::id());
    let act = Act::sh(&format!("setsid sleep {seconds} </dev/null >/dev/null 2>&1 & echo started"));
    let (r, out, _) = farm.run(&act).await;
    assert_eq!((r.result.unwrap().exit_code, out.as_str()), (0, "started\n"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while sleeper_alive(&seconds) {
        assert!(Instant::now() < deadline, "the setsid daemon outlived its action");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn sleeper_alive(seconds: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        cmdline.split(|&b| b == 0).any(|arg| arg == seconds.as_bytes())
    })
}

both!(limits_are_enforced, limits_are_enforced_builtin, limits_are_enforced_remote);
async fn limits_are_enforced(kind: Kind) {
    let farm = Farm::start(kind, false).await;
    // Processes: 40 background sleeps under a limit of 10.
    let forks = "i=0; while [ $i -lt 40 ]; do sleep 5 & i=$((i+1)); done; echo spawned";
    let limited = Act { platform: vec![("process_limit", "10")], ..Act::sh(forks) };
    let (r, out, err) = farm.run(&limited).await;
    let code = r.result.unwrap().exit_code;
    assert!(code != 0 || !out.contains("spawned"), "40 processes under process_limit=10: {code} {out} {err}");
    let (r, out, _) = farm.run(&Act::sh(forks)).await;
    assert_eq!((r.result.unwrap().exit_code, out.as_str()), (0, "spawned\n"), "no limit asked");
    // Memory: 200 MB under a limit of 64 MiB, and 20 MB under 512 MiB.
    let alloc = |mb: u32| format!("/usr/bin/python3 -c 'print(len(bytearray({})))'", mb * 1_000_000);
    let small = Act { platform: vec![("memory_limit", "512MiB")], ..Act::sh(&alloc(20)) };
    let (r, out, err) = farm.run(&small).await;
    assert_eq!((r.result.unwrap().exit_code, out.as_str()), (0, "20000000\n"), "{err}");
    let big = Act { platform: vec![("memory_limit", "64MiB")], ..Act::sh(&alloc(200)) };
    let (r, out, err) = farm.run(&big).await;
    assert_ne!(r.result.unwrap().exit_code, 0, "200 MB under memory_limit=64MiB: {out} {err}");
    // An unreadable limit is refused when the action is submitted, not
    // silently defaulted (and it never waits in a queue).
    let bad = Act { platform: vec![("memory_limit", "lots")], do_not_cache: true, ..Act::sh("true") };
    let status = run(&farm.server, request(bad.upload(&farm.server).await)).await.expect_err("accepted");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("memory_limit"), "{}", status.message());
}
