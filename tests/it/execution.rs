//! Remote execution through the REAPI services, with the built-in workers of
//! an in-process server: every semantic clients rely on.

use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use remote_apis::longrunning::operations_client::OperationsClient;
use remote_apis::longrunning::{CancelOperationRequest, GetOperationRequest, Operation, operation};
use remote_apis::reapi::action_cache_client::ActionCacheClient;
use remote_apis::reapi::command::EnvironmentVariable;
use remote_apis::reapi::execution_client::ExecutionClient;
use remote_apis::reapi::execution_stage::Value as Stage;
use remote_apis::reapi::{
    Action, Command, Directory, ExecuteOperationMetadata, ExecuteRequest, ExecuteResponse, GetActionResultRequest,
    Platform, Tree, WaitExecutionRequest, platform,
};
use remote_apis::{Digest, DigestFunction, merkle};
use tonic::Code;
use tonic_types::StatusExt;

use crate::common::{TestServer, assert_code, sha};

/// An action to build and upload: a shell script, inputs, outputs.
#[derive(Clone, Default)]
pub struct Act {
    pub script: String,
    pub files: Vec<(&'static str, &'static [u8], bool)>,
    pub symlinks: Vec<(&'static str, &'static str)>,
    /// Directories of the input root, empty unless files go in them.
    pub directories: Vec<&'static str>,
    pub output_paths: Vec<&'static str>,
    pub working_directory: &'static str,
    pub timeout: Option<Duration>,
    pub do_not_cache: bool,
    pub platform: Vec<(&'static str, &'static str)>,
    pub salt: &'static [u8],
    pub env: Vec<(&'static str, &'static str)>,
}

impl Act {
    pub fn sh(script: &str) -> Self {
        Act { script: script.to_string(), ..Default::default() }
    }

    pub fn command(&self) -> Command {
        let mut env: Vec<(&str, &str)> = vec![("PATH", "/usr/bin:/bin")];
        env.extend(self.env.iter().copied());
        env.sort();
        Command {
            arguments: vec!["/bin/sh".into(), "-c".into(), self.script.clone()],
            environment_variables: env
                .into_iter()
                .map(|(k, v)| EnvironmentVariable { name: k.into(), value: v.into() })
                .collect(),
            output_paths: self.output_paths.iter().map(|s| s.to_string()).collect(),
            working_directory: self.working_directory.into(),
            ..Default::default()
        }
    }

    /// Uploads everything with `command` and returns the Action's digest.
    pub async fn upload_with(&self, server: &TestServer, command: &Command) -> Digest {
        let f = DigestFunction::Sha256;
        let mut tree = merkle::TreeBuilder::new(f);
        let mut blobs: Vec<(Digest, Bytes)> = Vec::new();
        for (path, data, exec) in &self.files {
            let d = sha(data);
            tree.add_file(path, d, *exec, "unused".into()).unwrap();
            blobs.push((d, Bytes::from_static(data)));
        }
        for (path, target) in &self.symlinks {
            tree.add_symlink(path, target).unwrap();
        }
        for dir in self.directories.iter().chain([&self.working_directory]).filter(|d| !d.is_empty()) {
            tree.add_directory(dir).unwrap();
        }
        let tree = tree.build();
        blobs.extend(tree.directories.iter().map(|(d, b, _)| (*d, b.clone())));
        let (cd, cb) = merkle::encode(f, command);
        blobs.push((cd, cb));
        let action = Action {
            command_digest: Some(cd.to_proto()),
            input_root_digest: Some(tree.root_digest.to_proto()),
            timeout: self.timeout.map(|t| remote_apis::protobuf::Duration {
                seconds: t.as_secs() as i64,
                nanos: t.subsec_nanos() as i32,
            }),
            do_not_cache: self.do_not_cache,
            salt: self.salt.to_vec(),
            platform: platform_of(&self.platform),
        };
        let (ad, ab) = merkle::encode(f, &action);
        blobs.push((ad, ab));
        blobs.sort_by_key(|(d, _)| (d.hash, d.size));
        blobs.dedup_by_key(|(d, _)| *d);
        server.client().upload_blobs(blobs).await.unwrap();
        ad
    }

    pub async fn upload(&self, server: &TestServer) -> Digest {
        self.upload_with(server, &self.command()).await
    }
}

pub fn platform_of(pairs: &[(&str, &str)]) -> Option<Platform> {
    (!pairs.is_empty()).then(|| Platform {
        properties: pairs
            .iter()
            .map(|(k, v)| platform::Property { name: k.to_string(), value: v.to_string() })
            .collect(),
    })
}

pub fn execution(server: &TestServer) -> ExecutionClient<tonic::transport::Channel> {
    ExecutionClient::new(server.channel.clone())
}

pub fn request(digest: Digest) -> ExecuteRequest {
    ExecuteRequest {
        action_digest: Some(digest.to_proto()),
        digest_function: DigestFunction::Sha256.to_proto() as i32,
        ..Default::default()
    }
}

/// Executes and collects the whole operation stream.
pub async fn run(server: &TestServer, req: ExecuteRequest) -> Result<Vec<Operation>, tonic::Status> {
    let mut stream = execution(server).execute(req).await?.into_inner();
    let mut ops = Vec::new();
    while let Some(op) = stream.message().await? {
        ops.push(op);
    }
    Ok(ops)
}

pub fn stage(op: &Operation) -> Stage {
    let m = ExecuteOperationMetadata::decode(op.metadata.as_ref().unwrap().value.as_slice()).unwrap();
    Stage::try_from(m.stage).unwrap()
}

pub fn response(op: &Operation) -> ExecuteResponse {
    assert!(op.done, "operation is not done");
    match op.result.as_ref().unwrap() {
        operation::Result::Response(any) => {
            assert!(any.type_url.ends_with("build.bazel.remote.execution.v2.ExecuteResponse"));
            ExecuteResponse::decode(any.value.as_slice()).unwrap()
        }
        operation::Result::Error(e) => panic!("Operation.error must never be set: {e:?}"),
    }
}

pub async fn execute(server: &TestServer, act: &Act) -> ExecuteResponse {
    let digest = act.upload(server).await;
    let ops = run(server, request(digest)).await.unwrap();
    response(ops.last().unwrap())
}

async fn blob(server: &TestServer, d: Option<&remote_apis::reapi::Digest>) -> Bytes {
    let d = Digest::from_proto(DigestFunction::Sha256, d.unwrap()).unwrap();
    if d.size == 0 {
        return Bytes::new();
    }
    server.client().read_blob(d).await.unwrap()
}

fn ok(r: &ExecuteResponse) -> &remote_apis::reapi::ActionResult {
    assert!(r.status.as_ref().is_none_or(|s| s.code == 0), "status: {:?}", r.status);
    r.result.as_ref().expect("a result")
}

#[tokio::test]
async fn outputs_of_every_kind_and_the_stages() {
    let server = TestServer::start().await;
    let act = Act {
        script: "echo out; echo err >&2; mkdir -p d/sub; echo f > d/sub/f; ln -s sub/f d/link; \
                 printf x > o/file; chmod +x o/file; ln -s file o/link; ln -s nowhere dangling"
            .into(),
        output_paths: vec!["d", "o/file", "o/link", "dangling", "absent"],
        ..Default::default()
    };
    let digest = act.upload(&server).await;
    let ops = run(&server, request(digest)).await.unwrap();
    let stages: Vec<Stage> = ops.iter().map(stage).collect();
    assert_eq!(stages.first(), Some(&Stage::Queued), "{stages:?}");
    assert!(stages.contains(&Stage::Executing), "{stages:?}");
    assert_eq!(stages.last(), Some(&Stage::Completed));
    assert!(ops[..ops.len() - 1].iter().all(|o| !o.done && o.result.is_none()));
    assert!(ops.iter().all(|o| o.name == ops[0].name));

    let r = response(ops.last().unwrap());
    assert!(!r.cached_result);
    let result = ok(&r);
    assert_eq!(result.exit_code, 0);
    assert_eq!(blob(&server, result.stdout_digest.as_ref()).await, "out\n");
    assert_eq!(blob(&server, result.stderr_digest.as_ref()).await, "err\n");
    assert_eq!(result.output_files.len(), 1);
    let file = &result.output_files[0];
    assert_eq!((file.path.as_str(), file.is_executable), ("o/file", true));
    assert_eq!(blob(&server, file.digest.as_ref()).await, "x");
    // Kept in the worker's blob cache for the actions that consume it.
    let d = Digest::from_proto(DigestFunction::Sha256, file.digest.as_ref().unwrap()).unwrap();
    let cached = server.data_dir.join(format!("worker/cache/sha256-{}-{}-x", d.hash_hex(), d.size));
    assert!(cached.exists(), "{} is not in the worker cache", cached.display());
    let mut links: Vec<(String, String)> =
        result.output_symlinks.iter().map(|s| (s.path.clone(), s.target.clone())).collect();
    links.sort();
    assert_eq!(links, [("dangling".into(), "nowhere".into()), ("o/link".into(), "file".into())]);
    assert_eq!(result.output_directories.len(), 1);
    let tree = Tree::decode(blob(&server, result.output_directories[0].tree_digest.as_ref()).await).unwrap();
    let root = tree.root.unwrap();
    assert_eq!(root.directories[0].name, "sub");
    assert_eq!((root.symlinks[0].name.as_str(), root.symlinks[0].target.as_str()), ("link", "sub/f"));
    assert_eq!(tree.children[0].files[0].name, "f");
    assert_eq!(blob(&server, tree.children[0].files[0].digest.as_ref()).await, "f\n");

    let m = result.execution_metadata.as_ref().unwrap();
    assert!(m.worker.starts_with("builtin@"), "{}", m.worker);
    let times = [
        &m.queued_timestamp,
        &m.worker_start_timestamp,
        &m.input_fetch_start_timestamp,
        &m.input_fetch_completed_timestamp,
        &m.execution_start_timestamp,
        &m.execution_completed_timestamp,
        &m.output_upload_start_timestamp,
        &m.output_upload_completed_timestamp,
        &m.worker_completed_timestamp,
    ];
    let secs: Vec<(i64, i32)> = times.iter().map(|t| t.as_ref().map(|t| (t.seconds, t.nanos)).unwrap()).collect();
    assert!(secs.windows(2).all(|w| w[0] <= w[1]), "timestamps out of order: {secs:?}");

    // The result went into the ActionCache.
    let cached = ActionCacheClient::new(server.channel.clone())
        .get_action_result(GetActionResultRequest { action_digest: Some(digest.to_proto()), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cached.output_files, result.output_files);
}

#[tokio::test]
#[allow(deprecated)]
async fn v20_output_fields_and_a_path_in_both() {
    let server = TestServer::start().await;
    let act = Act::sh("echo a > out/a; ln -s a out/alink; mkdir -p dir; echo b > dir/b; echo c > both");
    let mut command = act.command();
    command.output_files = vec!["out/a".into(), "out/alink".into(), "both".into()];
    command.output_directories = vec!["dir".into(), "both".into()];
    let digest = act.upload_with(&server, &command).await;
    let r = response(run(&server, request(digest)).await.unwrap().last().unwrap());
    let result = ok(&r);
    let mut files: Vec<&str> = result.output_files.iter().map(|f| f.path.as_str()).collect();
    files.sort();
    assert_eq!(files, ["both", "out/a"]);
    assert_eq!(result.output_directories[0].path, "dir");
    assert_eq!(result.output_file_symlinks[0].path, "out/alink");
    assert!(result.output_symlinks.is_empty(), "2.1 field filled for a 2.0 client");
}

#[tokio::test]
async fn inputs_env_and_working_directory() {
    let server = TestServer::start().await;
    let act = Act {
        script: "set -e; test -x ../tool.sh; test ! -x ../data.txt; ../tool.sh > out.txt; cat ../link >> out.txt; \
                 stat -c %h ../data.txt >> out.txt; env | sort > env.txt; pwd > pwd.txt"
            .into(),
        files: vec![("tool.sh", b"#!/bin/sh\necho tool\n", true), ("data.txt", b"data\n", false)],
        symlinks: vec![("link", "data.txt")],
        working_directory: "wd",
        output_paths: vec!["out.txt", "env.txt", "pwd.txt"],
        env: vec![("ZED", "last"), ("A_VAR", "1")],
        ..Default::default()
    };
    let r = execute(&server, &act).await;
    let result = ok(&r);
    assert_eq!(result.exit_code, 0, "stderr: {:?}", blob(&server, result.stderr_digest.as_ref()).await);
    let by_path = |p: &str| result.output_files.iter().find(|f| f.path == p).unwrap().digest.clone();
    let out = blob(&server, by_path("out.txt").as_ref()).await;
    let out = String::from_utf8_lossy(&out);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..2], ["tool", "data"]);
    // Hard-linked from the worker's cache, not copied.
    assert!(lines[2].parse::<u32>().unwrap() >= 2, "link count {}", lines[2]);
    let env = blob(&server, by_path("env.txt").as_ref()).await;
    // Exactly the Command's variables (plus what sh itself sets: PWD and SHLVL).
    let env: Vec<String> = String::from_utf8_lossy(&env)
        .lines()
        .filter(|l| !l.starts_with("PWD=") && !l.starts_with("SHLVL=") && !l.starts_with("_="))
        .map(String::from)
        .collect();
    assert_eq!(env, ["A_VAR=1", "PATH=/usr/bin:/bin", "ZED=last"]);
    let pwd = blob(&server, by_path("pwd.txt").as_ref()).await;
    assert!(String::from_utf8_lossy(&pwd).trim_end().ends_with("/root/wd"), "{pwd:?}");
}

#[tokio::test]
async fn cache_rules() {
    let server = TestServer::start().await;
    let act = Act { script: "date +%s%N".into(), ..Default::default() };
    let first = execute(&server, &act).await;
    assert!(!first.cached_result);
    let again = execute(&server, &act).await;
    assert!(again.cached_result, "an identical action is answered from the cache");
    assert_eq!(again.result, first.result);

    // skip_cache_lookup runs it again.
    let digest = act.upload(&server).await;
    let skipped = response(
        run(&server, ExecuteRequest { skip_cache_lookup: true, ..request(digest) }).await.unwrap().last().unwrap(),
    );
    assert!(!skipped.cached_result);
    assert_ne!(ok(&skipped).stdout_digest, ok(&first).stdout_digest);

    // do_not_cache: executed every time, never stored.
    let uncached = Act { do_not_cache: true, ..act.clone() };
    let digest = uncached.upload(&server).await;
    for _ in 0..2 {
        assert!(!execute(&server, &uncached).await.cached_result);
    }
    let mut ac = ActionCacheClient::new(server.channel.clone());
    let lookup = ac
        .get_action_result(GetActionResultRequest { action_digest: Some(digest.to_proto()), ..Default::default() })
        .await;
    assert_code(lookup, Code::NotFound);

    // A failing command is never cached.
    let failing = Act::sh("exit 7");
    let r = execute(&server, &failing).await;
    assert_eq!(ok(&r).exit_code, 7);
    assert!(!execute(&server, &failing).await.cached_result);
}

#[tokio::test(flavor = "multi_thread")]
async fn identical_actions_in_flight_merge() {
    let server = TestServer::start().await;
    let act = Act::sh("sleep 1; date +%s%N");
    let digest = act.upload(&server).await;
    let (a, b) = tokio::join!(run(&server, request(digest)), run(&server, request(digest)));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a[0].name, b[0].name, "one execution for both");
    assert_eq!(response(a.last().unwrap()).result, response(b.last().unwrap()).result);

    // do_not_cache actions are never merged.
    let solo = Act { do_not_cache: true, ..act.clone() };
    let digest = solo.upload(&server).await;
    let (a, b) = tokio::join!(run(&server, request(digest)), run(&server, request(digest)));
    assert_ne!(a.unwrap()[0].name, b.unwrap()[0].name);
}

fn missing_subjects(status: &tonic::Status) -> Vec<String> {
    let details = status.get_error_details();
    let failure = details.precondition_failure().expect("a PreconditionFailure");
    failure
        .violations
        .iter()
        .map(|v| {
            assert_eq!(v.r#type, "MISSING");
            v.subject.clone()
        })
        .collect()
}

#[tokio::test]
async fn missing_inputs_are_listed_for_the_client_to_upload() {
    let server = TestServer::start().await;
    // The Action itself.
    let ghost = sha(b"no such action");
    let status = assert_code(run(&server, request(ghost)).await, Code::FailedPrecondition);
    assert_eq!(missing_subjects(&status), [format!("blobs/{}/{}", ghost.hash_hex(), ghost.size)]);

    // A file of the input tree and the Command.
    let f = DigestFunction::Sha256;
    let absent = sha(b"absent input");
    let mut tree = merkle::TreeBuilder::new(f);
    tree.add_file("in/x", absent, false, "unused".into()).unwrap();
    let tree = tree.build();
    let blobs: Vec<(Digest, Bytes)> = tree.directories.iter().map(|(d, b, _)| (*d, b.clone())).collect();
    server.client().upload_blobs(blobs).await.unwrap();
    let (cd, cb) = merkle::encode(f, &Act::sh("true").command());
    let action = Action {
        command_digest: Some(cd.to_proto()),
        input_root_digest: Some(tree.root_digest.to_proto()),
        ..Default::default()
    };
    let (ad, ab) = merkle::encode(f, &action);
    server.client().upload_blobs(vec![(ad, ab)]).await.unwrap();
    let status = assert_code(run(&server, request(ad)).await, Code::FailedPrecondition);
    assert_eq!(missing_subjects(&status), [format!("blobs/{}/{}", cd.hash_hex(), cd.size)]);
    server.client().upload_blobs(vec![(cd, cb)]).await.unwrap();
    let status = assert_code(run(&server, request(ad)).await, Code::FailedPrecondition);
    assert_eq!(missing_subjects(&status), [format!("blobs/{}/{}", absent.hash_hex(), absent.size)]);
    // Uploaded: now it runs.
    server.client().upload_blobs(vec![(absent, Bytes::from_static(b"absent input"))]).await.unwrap();
    let r = response(run(&server, request(ad)).await.unwrap().last().unwrap());
    assert_eq!(ok(&r).exit_code, 0);
}

#[tokio::test]
async fn paths_that_leave_the_root_are_invalid() {
    let server = TestServer::start().await;
    let cases: Vec<Act> = vec![
        Act { output_paths: vec!["../escape"], ..Act::sh("true") },
        Act { output_paths: vec!["/etc/passwd"], ..Act::sh("true") },
        // (Input symlinks may point anywhere: see hardening_exec.)
    ];
    for act in cases {
        let digest = act.upload(&server).await;
        assert_code(run(&server, request(digest)).await, Code::InvalidArgument);
    }
    // A working directory outside the root.
    let act = Act::sh("true");
    let mut command = act.command();
    command.working_directory = "../..".into();
    let digest = act.upload_with(&server, &command).await;
    assert_code(run(&server, request(digest)).await, Code::InvalidArgument);
    // A Directory entry named "..".
    let f = DigestFunction::Sha256;
    let evil = Directory {
        directories: vec![remote_apis::reapi::DirectoryNode { name: "..".into(), digest: Some(f.empty().to_proto()) }],
        ..Default::default()
    };
    let (dd, db) = merkle::encode(f, &evil);
    let (cd, cb) = merkle::encode(f, &act.command());
    let action =
        Action { command_digest: Some(cd.to_proto()), input_root_digest: Some(dd.to_proto()), ..Default::default() };
    let (ad, ab) = merkle::encode(f, &action);
    server.client().upload_blobs(vec![(dd, db), (cd, cb), (ad, ab)]).await.unwrap();
    assert_code(run(&server, request(ad)).await, Code::InvalidArgument);
}

#[tokio::test]
async fn timeouts() {
    let server = TestServer::start_with(cargo_distbuild::config::Backend::Memory, |c| {
        c.execution.max_timeout = Duration::from_secs(60);
        c.execution.default_timeout = Duration::from_secs(60);
    })
    .await;
    let too_long = Act { timeout: Some(Duration::from_secs(61)), ..Act::sh("true") };
    let digest = too_long.upload(&server).await;
    let status = assert_code(run(&server, request(digest)).await, Code::InvalidArgument);
    assert!(status.message().contains("timeout"), "{}", status.message());

    let slow = Act { timeout: Some(Duration::from_millis(500)), ..Act::sh("echo before; sleep 30; echo after") };
    let started = std::time::Instant::now();
    let r = execute(&server, &slow).await;
    assert!(started.elapsed() < Duration::from_secs(20));
    let status = r.status.as_ref().unwrap();
    assert_eq!(status.code, Code::DeadlineExceeded as i32);
    assert!(status.message.contains("timeout"), "{}", status.message);
    let result = r.result.as_ref().expect("the partial result");
    assert_eq!(blob(&server, result.stdout_digest.as_ref()).await, "before\n");
    let again = execute(&server, &slow).await;
    assert!(!again.cached_result, "a timed-out action is never cached");
}

/// A `sleep` argument no other process has: 60 seconds and a unique
/// fraction. Actions run in their own PID namespace (and a private /tmp),
/// so a test finds their processes by it in the host's /proc, not by `$!`.
pub fn unique_sleep() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("60.{}{:04}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The host pid of the live process running `sleep SECONDS`.
pub fn sleeper(seconds: &str) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let mut args = cmdline.split(|&b| b == 0);
        (args.next()?.ends_with(b"sleep") && args.next()? == seconds.as_bytes() && alive(pid)).then_some(pid)
    })
}

/// Whether a process is alive (and not a zombie).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_kills_the_process() {
    let server = TestServer::start().await;
    let seconds = unique_sleep();
    let act = Act { script: format!("sleep {seconds} & wait"), do_not_cache: true, ..Default::default() };
    let digest = act.upload(&server).await;
    let mut stream = execution(&server).execute(request(digest)).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let pid = loop {
        if let Some(pid) = sleeper(&seconds) {
            break pid;
        }
        assert!(std::time::Instant::now() < deadline, "the action never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut ops = OperationsClient::new(server.channel.clone());
    ops.cancel_operation(CancelOperationRequest { name: first.name.clone() }).await.unwrap();
    let mut last = first.clone();
    while let Some(op) = stream.message().await.unwrap() {
        last = op;
    }
    let r = response(&last);
    assert_eq!(r.status.unwrap().code, Code::Cancelled as i32);
    // The whole process group is killed, the background child included.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(std::time::Instant::now() < deadline, "process {pid} survived the cancel");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let op = ops.get_operation(GetOperationRequest { name: first.name.clone() }).await.unwrap().into_inner();
    assert!(op.done);
    assert_code(ops.cancel_operation(CancelOperationRequest { name: "operations/nope".into() }).await, Code::NotFound);
}

#[tokio::test]
#[allow(deprecated)]
async fn platforms_nobody_offers_fail_fast() {
    let server = TestServer::start().await;
    let act = Act { platform: vec![("OSFamily", "linux"), ("gpu", "a100")], ..Act::sh("true") };
    let digest = act.upload(&server).await;
    let status = assert_code(run(&server, request(digest)).await, Code::FailedPrecondition);
    assert!(status.message().contains("gpu=a100"), "{}", status.message());
    // "At least" for cpu-count.
    let act = Act { platform: vec![("cpu-count", "100000")], ..Act::sh("true") };
    let status = assert_code(run(&server, request(act.upload(&server).await)).await, Code::FailedPrecondition);
    assert!(status.message().contains("cpu-count"), "{}", status.message());
    let act = Act { platform: vec![("cpu-count", "1"), ("OSFamily", "linux")], ..Act::sh("true") };
    assert_eq!(ok(&execute(&server, &act).await).exit_code, 0);
    // Older clients put the platform in the Command.
    let act = Act::sh("true");
    let mut command = act.command();
    command.platform = platform_of(&[("pool", "nowhere")]);
    let digest = act.upload_with(&server, &command).await;
    let status = assert_code(run(&server, request(digest)).await, Code::FailedPrecondition);
    assert!(status.message().contains("pool=nowhere"), "{}", status.message());
}

#[tokio::test(flavor = "multi_thread")]
async fn wait_execution_reattaches() {
    let server = TestServer::start().await;
    let unknown = execution(&server).wait_execution(WaitExecutionRequest { name: "operations/unknown".into() }).await;
    assert_code(unknown, Code::NotFound);

    let act = Act { do_not_cache: true, ..Act::sh("sleep 0.5; echo done") };
    let digest = act.upload(&server).await;
    let mut stream = execution(&server).execute(request(digest)).await.unwrap().into_inner();
    let name = stream.message().await.unwrap().unwrap().name;
    drop(stream); // the client went away; the action goes on
    let mut waited =
        execution(&server).wait_execution(WaitExecutionRequest { name: name.clone() }).await.unwrap().into_inner();
    let mut last = None;
    while let Some(op) = waited.message().await.unwrap() {
        assert_eq!(op.name, name);
        last = Some(op);
    }
    let r = response(&last.unwrap());
    assert_eq!(blob(&server, ok(&r).stdout_digest.as_ref()).await, "done\n");
    // Finished operations stay visible for a while.
    let mut again = execution(&server).wait_execution(WaitExecutionRequest { name }).await.unwrap().into_inner();
    assert!(again.message().await.unwrap().unwrap().done);
}

#[tokio::test]
async fn capabilities_include_execution() {
    let server = TestServer::start().await;
    let caps = server.get_capabilities().await;
    let exec = caps.execution_capabilities.unwrap();
    assert!(exec.exec_enabled);
    assert_eq!(exec.digest_function, DigestFunction::Sha256.to_proto() as i32);
    assert_eq!(exec.digest_functions.len(), 2);
    assert!(caps.cache_capabilities.is_some());
}

#[tokio::test]
async fn outputs_are_never_read_through_a_symlink_out_of_the_root() {
    let server = TestServer::start().await;
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), "do not upload").unwrap();
    let act = Act {
        script: format!("rmdir link; ln -s {} link; ln -s {0}/secret leak", outside.path().display()),
        output_paths: vec!["link/secret", "leak"],
        ..Default::default()
    };
    let r = execute(&server, &act).await;
    let status = r.status.as_ref().expect("a status");
    assert_eq!(status.code, Code::FailedPrecondition as i32, "{status:?}");
    assert!(status.message.contains("leaves the input root"), "{}", status.message);

    // The whole working directory as one output directory.
    let whole = Act { output_paths: vec![""], ..Act::sh("echo w > f") };
    let r = execute(&server, &whole).await;
    let result = ok(&r);
    assert_eq!(result.output_directories[0].path, "");
    let tree = Tree::decode(blob(&server, result.output_directories[0].tree_digest.as_ref()).await).unwrap();
    assert_eq!(tree.root.unwrap().files[0].name, "f");

    // Alone, the symlink is reported as a symlink, its target not read.
    let act = Act { output_paths: vec!["leak"], ..act };
    let r = execute(&server, &act).await;
    let result = ok(&r);
    assert!(result.output_files.is_empty());
    assert_eq!(result.output_symlinks[0].target, format!("{}/secret", outside.path().display()));
}

#[tokio::test]
async fn blake3_actions_hash_everything_with_blake3() {
    let server = TestServer::start().await;
    let f = DigestFunction::Blake3;
    let client = server.client().with_digest_function(f);
    let input = Bytes::from_static(b"blake3 input\n");
    let input_digest = f.digest_of(&input);
    let mut tree = merkle::TreeBuilder::new(f);
    tree.add_file("in.txt", input_digest, false, "unused".into()).unwrap();
    let tree = tree.build();
    let command = Act { output_paths: vec!["out.txt"], ..Act::sh("cat in.txt in.txt > out.txt") }.command();
    let (cd, cb) = merkle::encode(f, &command);
    let action = Action {
        command_digest: Some(cd.to_proto()),
        input_root_digest: Some(tree.root_digest.to_proto()),
        ..Default::default()
    };
    let (ad, ab) = merkle::encode(f, &action);
    let mut blobs: Vec<(Digest, Bytes)> = tree.directories.iter().map(|(d, b, _)| (*d, b.clone())).collect();
    blobs.extend([(input_digest, input.clone()), (cd, cb), (ad, ab)]);
    client.upload_blobs(blobs).await.unwrap();
    let req = ExecuteRequest { digest_function: f.to_proto() as i32, ..request(ad) };
    let ops = run(&server, req.clone()).await.unwrap();
    let r = response(ops.last().unwrap());
    let result = ok(&r);
    let out = result.output_files[0].digest.as_ref().unwrap();
    let expected = f.digest_of(b"blake3 input\nblake3 input\n");
    assert_eq!(Digest::from_proto(f, out).unwrap(), expected);
    assert_eq!(client.read_blob(expected).await.unwrap(), "blake3 input\nblake3 input\n");
    // Cached under the BLAKE3 key.
    let again = response(run(&server, req).await.unwrap().last().unwrap());
    assert!(again.cached_result);
}
