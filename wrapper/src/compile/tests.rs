//! The wrapper's decisions against a scripted compiler ([`Script`]), a
//! recorded console ([`Recorded`]) and an in-memory server ([`Memory`]):
//! hit, miss then remote, remote failure then the local verdict, server
//! down, no worker, negative results remembered and replayed, and the
//! `.rmeta` first.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use remote_apis::reapi::{ActionResult, ExecuteResponse, OutputFile};
use remote_apis::{Digest, DigestFunction};
use tonic::Status;

use super::*;
use crate::local::Captured;

const F: DigestFunction = DigestFunction::Sha256;

/// A compiler that answers from a script: it records each command line,
/// hands its stderr on line by line and writes the outputs cargo expects.
struct Script {
    answer: Captured,
    /// Files it writes before exiting (when it succeeds).
    writes: Vec<PathBuf>,
    runs: Mutex<Vec<Vec<String>>>,
}

impl Spawner for Script {
    fn run(&self, _: &Path, words: &[String], on_line: &mut dyn FnMut(&[u8])) -> std::io::Result<Captured> {
        self.runs.lock().unwrap().push(words.to_vec());
        if words.iter().any(|w| w == "--emit=dep-info") {
            unreachable!("the tests prepare their compiles without a pre-pass");
        }
        if self.answer.code == 0 {
            for w in &self.writes {
                std::fs::write(w, format!("compiled {}", w.display())).unwrap();
            }
        }
        for line in self.answer.stderr.split_inclusive(|b| *b == b'\n') {
            on_line(line);
        }
        Ok(self.answer.clone())
    }
}

/// What cargo would have read, and whether the `.rmeta` and `.rlib` were
/// in place at each stderr write.
#[derive(Default)]
struct Recorded {
    stdout: Mutex<Vec<u8>>,
    stderr: Mutex<Vec<(Vec<u8>, bool, bool)>>,
    watch: Vec<PathBuf>,
}

impl Console for Recorded {
    fn stdout(&self, data: &[u8]) {
        self.stdout.lock().unwrap().extend_from_slice(data);
    }
    fn stderr(&self, data: &[u8]) {
        let (rmeta, rlib) = (self.watch[0].is_file(), self.watch[1].is_file());
        self.stderr.lock().unwrap().push((data.to_vec(), rmeta, rlib));
    }
}

impl Recorded {
    fn stderr_bytes(&self) -> Vec<u8> {
        self.stderr.lock().unwrap().iter().flat_map(|(d, ..)| d.clone()).collect()
    }
}

/// A server in memory: a CAS, an ActionCache, scripted Execute answers,
/// and optionally every call failing with one status.
#[derive(Default)]
struct Memory {
    cas: Mutex<HashMap<Digest, Bytes>>,
    ac: Mutex<HashMap<Digest, ActionResult>>,
    executes: Mutex<VecDeque<Result<ExecuteResponse, Status>>>,
    executed: Mutex<usize>,
    down: Option<tonic::Code>,
    /// A running operation's live stderr and `.rmeta` (LogStream and
    /// running outputs), for remote pipelining.
    live: Option<(Vec<u8>, Bytes)>,
    rmeta_read: std::sync::atomic::AtomicBool,
}

impl Memory {
    fn put(&self, data: &[u8]) -> Digest {
        let d = F.digest_of(data);
        self.cas.lock().unwrap().insert(d, Bytes::copy_from_slice(data));
        d
    }
    fn check(&self) -> Result<(), Status> {
        match self.down {
            Some(code) => Err(Status::new(code, "scripted failure")),
            None => Ok(()),
        }
    }
}

impl Server for Memory {
    async fn lookup(&self, action: Digest) -> Result<Option<ActionResult>, Status> {
        self.check()?;
        Ok(self.ac.lock().unwrap().get(&action).cloned())
    }
    async fn upload(&self, _: &BuiltAction, _: &BuiltTree) -> Result<(), Status> {
        self.check()
    }
    async fn execute(&self, _: Digest, _: Duration) -> Result<ExecuteResponse, Status> {
        self.check()?;
        *self.executed.lock().unwrap() += 1;
        self.executes.lock().unwrap().pop_front().unwrap_or_else(|| Err(Status::internal("no scripted answer")))
    }
    async fn execute_live(
        &self,
        action: Digest,
        timeout: Duration,
        running: futures::channel::oneshot::Sender<crate::remote::Running>,
    ) -> Result<ExecuteResponse, Status> {
        use std::sync::atomic::Ordering;
        if self.live.is_some() {
            let op = crate::remote::Running {
                operation: "operations/1".into(),
                stderr_stream: "logstreams/1/stderr".into(),
            };
            let _ = running.send(op);
            // The operation runs until its .rmeta was read, and a moment
            // more (the wrapper's reads interleave with this stream).
            while !self.rmeta_read.load(Ordering::SeqCst) {
                tokio::task::yield_now().await;
            }
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        }
        self.execute(action, timeout).await
    }
    async fn read_live(&self, _: &str, each: &mut dyn FnMut(&[u8]) -> bool) -> Result<(), Status> {
        let (stderr, _) = self.live.as_ref().ok_or_else(|| Status::not_found("no stream"))?;
        for line in stderr.split_inclusive(|b| *b == b'\n') {
            tokio::task::yield_now().await;
            if !each(line) {
                break;
            }
        }
        Ok(())
    }
    async fn read_running_output(&self, operation: &str, path: &str) -> Result<Bytes, Status> {
        assert_eq!(operation, "operations/1");
        assert!(path.ends_with(".rmeta"), "{path}");
        self.rmeta_read.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(self.live.as_ref().ok_or_else(|| Status::not_found("no operation"))?.1.clone())
    }
    async fn read_blob(&self, digest: Digest) -> Result<Bytes, Status> {
        self.cas.lock().unwrap().get(&digest).cloned().ok_or_else(|| Status::not_found("blob"))
    }
    async fn streams(&self, result: &ActionResult) -> Result<(Bytes, Bytes), Status> {
        let get = |d: &Option<remote_apis::reapi::Digest>| match d {
            Some(d) => self.cas.lock().unwrap().get(&Digest::from_proto(F, d).unwrap()).cloned().unwrap_or_default(),
            None => Bytes::new(),
        };
        Ok((get(&result.stdout_digest), get(&result.stderr_digest)))
    }
    async fn download_to(&self, digest: Digest, dest: &Path, _: bool) -> Result<(), Status> {
        let data = self.read_blob(digest).await?;
        crate::local::write_atomic(dest, &data).map_err(|e| Status::internal(e.to_string()))
    }
    async fn upload_files(&self, files: &[(Digest, PathBuf)]) -> Result<(), Status> {
        for (_, path) in files {
            self.put(&std::fs::read(path).unwrap());
        }
        Ok(())
    }
    async fn upload_blobs(&self, blobs: Vec<(Digest, Bytes)>) -> Result<(), Status> {
        for (_, data) in blobs {
            self.put(&data);
        }
        Ok(())
    }
    async fn store_result(&self, action: Digest, result: ActionResult) -> Result<(), Status> {
        self.ac.lock().unwrap().insert(action, result);
        Ok(())
    }
}

/// A library compile (`--emit=metadata,link`, no dep-info, so that it
/// prepares without rustc) in a temporary workspace.
struct Fixture {
    _dir: tempfile::TempDir,
    settings: Settings,
    words: Vec<String>,
    c: Compile,
    prepared: Prepared,
    rmeta: PathBuf,
    rlib: PathBuf,
}

fn fixture(crate_name: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let out_dir = root.join("ws/target/debug/deps");
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::create_dir_all(root.join("ws/src")).unwrap();
    let words: Vec<String> = [
        "--crate-name",
        crate_name,
        "--crate-type",
        "lib",
        "src/lib.rs",
        "--emit=metadata,link",
        "--error-format=json",
        "--json=artifacts",
        "-C",
        "extra-filename=-1",
        "--out-dir",
        &out_dir.to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let crate::args::Classified::Compile(c) = crate::args::classify(&words) else { panic!("a compile") };
    let roots = Roots::new(&root.join("sysroot"), None, Some(&root.join("ws/target")), &root.join("ws"));
    let toolchain = remote_apis::merkle::TreeBuilder::new(F).build();
    let mapped = inputs::map_args(&roots, &c).unwrap();
    let outputs = inputs::outputs(&roots, &c, &out_dir).unwrap();
    let built = key::build(
        F,
        &KeyInputs {
            toolchain: toolchain.root_digest,
            args: &mapped.words,
            cwd: roots.cwd_mapped(),
            env: &[],
            files: &[],
            dirs: &[],
            outputs: &outputs,
            links: false,
        },
    )
    .unwrap();
    let settings = Settings {
        server: "grpc://test".into(),
        instance: String::new(),
        mode: Mode::Remote,
        cache_dir: root.join("cache"),
        stats_file: root.join("stats.jsonl"),
        sysroot: None,
        connect_timeout: Duration::from_secs(1),
        queue_timeout: Duration::from_secs(1),
        client: Default::default(),
    };
    let prepared = Prepared {
        depinfo_name: format!("{crate_name}-1.d"),
        roots,
        out_dir: out_dir.clone(),
        depinfo_text: None,
        env: Vec::new(),
        toolchain,
        built,
        closure: Vec::new(),
        links: false,
        inputs: Default::default(),
    };
    Fixture {
        settings,
        words,
        c,
        prepared,
        rmeta: out_dir.join(format!("lib{crate_name}-1.rmeta")),
        rlib: out_dir.join(format!("lib{crate_name}-1.rlib")),
        _dir: dir,
    }
}

impl Fixture {
    fn script(&self, code: i32, stderr: &[u8]) -> Script {
        Script {
            answer: Captured { code, stdout: Vec::new(), stderr: stderr.to_vec() },
            writes: vec![self.rmeta.clone(), self.rlib.clone()],
            runs: Mutex::new(Vec::new()),
        }
    }

    fn console(&self) -> Recorded {
        Recorded { watch: vec![self.rmeta.clone(), self.rlib.clone()], ..Default::default() }
    }

    async fn serve(&self, server: &Memory, script: &Script, console: &Recorded) -> Outcome {
        let job = Job {
            settings: &self.settings,
            caches: Caches::new(self.settings.cache_dir.clone(), F),
            rustc: Path::new("rustc"),
            words: &self.words,
            c: &self.c,
            trace: Trace(None),
            spawner: script,
            console,
        };
        serve(&job, &self.prepared, server, Instant::now()).await
    }

    /// A result as a worker elsewhere would have made it: both outputs,
    /// and stderr naming that machine's paths.
    fn remote_result(&self, server: &Memory, stderr: &[u8]) -> ActionResult {
        let output = |path: &Path, data: &[u8]| OutputFile {
            path: self.prepared.roots.map(&path.to_string_lossy()).unwrap(),
            digest: Some(server.put(data).to_proto()),
            ..Default::default()
        };
        ActionResult {
            output_files: vec![output(&self.rlib, b"the rlib"), output(&self.rmeta, b"the rmeta")],
            stderr_digest: Some(server.put(stderr).to_proto()),
            stdout_digest: Some(server.put(b"").to_proto()),
            ..Default::default()
        }
    }

    fn key(&self) -> Digest {
        self.prepared.built.action_digest
    }
}

fn executed(result: ActionResult) -> Result<ExecuteResponse, Status> {
    Ok(ExecuteResponse { result: Some(result), ..Default::default() })
}

const WARNING: &[u8] = b"{\"$message_type\":\"diagnostic\",\"level\":\"warning\",\"message\":\"unused\"}\n";
const PROBE_ERROR: &[u8] =
    b"{\"$message_type\":\"diagnostic\",\"code\":{\"code\":\"E0554\"},\"level\":\"error\",\"message\":\"feature\"}\n";

fn metadata_line(path: &str) -> Vec<u8> {
    format!("{{\"$message_type\":\"artifact\",\"artifact\":\"{path}\",\"emit\":\"metadata\"}}\n").into_bytes()
}

#[tokio::test]
async fn a_hit_delivers_the_rmeta_and_its_notification_before_the_rlib() {
    let f = fixture("hit");
    let server = Memory::default();
    let elsewhere = metadata_line("/elsewhere/target/debug/deps/libhit-1.rmeta");
    let stderr = [WARNING, &elsewhere, WARNING].concat();
    let result = f.remote_result(&server, &stderr);
    server.ac.lock().unwrap().insert(f.key(), result);
    let (script, console) = (f.script(0, b""), f.console());

    let o = f.serve(&server, &script, &console).await;
    assert_eq!((o.code, o.outcome), (0, "hit"));
    assert!(script.runs.lock().unwrap().is_empty(), "no compile ran");
    assert_eq!(std::fs::read(&f.rlib).unwrap(), b"the rlib");
    let here = metadata_line(&f.rmeta.to_string_lossy());
    assert_eq!(console.stderr_bytes(), [WARNING, &here, WARNING].concat(), "the notification names the local path");
    let writes = console.stderr.lock().unwrap();
    let (first, rmeta_then, rlib_then) = writes[0].clone();
    assert!(first.ends_with(&here), "the first write ends at the notification");
    assert!(rmeta_then && !rlib_then, "the .rmeta is in place and the .rlib not yet when cargo reads the notification");
    assert!(f.rmeta.with_extension("dbdeps").is_file(), "the sidecar is written");
}

#[tokio::test]
async fn a_miss_executes_remotely() {
    let f = fixture("miss");
    let server = Memory::default();
    let result = f.remote_result(&server, WARNING);
    server.executes.lock().unwrap().push_back(executed(result));
    let (script, console) = (f.script(0, b""), f.console());
    let o = f.serve(&server, &script, &console).await;
    assert_eq!((o.code, o.outcome), (0, "remote"));
    assert_eq!(*server.executed.lock().unwrap(), 1);
    assert!(script.runs.lock().unwrap().is_empty());
    assert_eq!(std::fs::read(&f.rmeta).unwrap(), b"the rmeta");
    assert_eq!(console.stderr_bytes(), WARNING);
}

#[tokio::test]
async fn a_remote_failure_that_may_be_the_workers_is_compiled_here_and_not_remembered() {
    for (code, stderr) in [(101, PROBE_ERROR), (1, b"error[E0463]: can't find crate for `std`\n".as_slice())] {
        let f = fixture("verdict");
        let server = Memory::default();
        let mut result = f.remote_result(&server, stderr);
        result.exit_code = code;
        result.output_files.clear();
        server.executes.lock().unwrap().push_back(executed(result));
        let (script, console) = (f.script(0, WARNING), f.console());
        let o = f.serve(&server, &script, &console).await;
        assert_eq!((o.code, o.outcome, o.reason), (0, "local", Some(LocalReason::RemoteFailed)), "{code}");
        assert_eq!(script.runs.lock().unwrap().len(), 1, "one local run, the verdict");
        assert_eq!(console.stderr_bytes(), WARNING, "only the local run's output reaches cargo");
        let stored = server.ac.lock().unwrap().get(&f.key()).cloned().expect("the local success is shared");
        assert_eq!(stored.exit_code, 0);
    }
}

#[tokio::test]
async fn a_server_down_compiles_here_with_one_warning() {
    let f = fixture("down");
    let server = Memory { down: Some(tonic::Code::Unavailable), ..Default::default() };
    let (script, console) = (f.script(0, WARNING), f.console());
    for _ in 0..3 {
        let o = f.serve(&server, &script, &console).await;
        assert_eq!((o.code, o.reason), (0, Some(LocalReason::ServerUnavailable)));
    }
    assert_eq!(script.runs.lock().unwrap().len(), 3);
    let text = String::from_utf8(console.stderr_bytes()).unwrap();
    assert_eq!(text.matches("warning: distbuild:").count(), 1, "{text}");
    assert!(f.settings.recently_down(), "the next invocations skip the server");
}

#[tokio::test]
async fn no_worker_compiles_here_and_stores_the_result() {
    let f = fixture("noworker");
    let server = Memory::default();
    server.executes.lock().unwrap().push_back(Err(Status::failed_precondition("no worker offers the platform")));
    let (script, console) = (f.script(0, WARNING), f.console());
    let o = f.serve(&server, &script, &console).await;
    assert_eq!((o.code, o.outcome, o.reason, o.stored), (0, "local", Some(LocalReason::NoWorker), true));
    let stored = server.ac.lock().unwrap().get(&f.key()).cloned().expect("stored");
    assert_eq!(stored.output_files.len(), 2);
    assert!(f.settings.recently_without_workers(false), "the next compiles do not queue");

    // The next build is served from what this one stored.
    std::fs::remove_file(&f.rlib).unwrap();
    let (script2, console2) = (f.script(0, b""), f.console());
    let o = f.serve(&server, &script2, &console2).await;
    assert_eq!(o.outcome, "hit");
    assert!(script2.runs.lock().unwrap().is_empty());
    assert!(f.rlib.is_file());
}

#[tokio::test]
async fn a_probe_that_fails_remotely_is_trusted_remembered_and_replayed() {
    let f = fixture("probe");
    let server = Memory::default();
    let mut result = f.remote_result(&server, PROBE_ERROR);
    result.exit_code = 1;
    result.output_files.clear();
    server.executes.lock().unwrap().push_back(executed(result));
    let (script, console) = (f.script(1, PROBE_ERROR), f.console());
    let o = f.serve(&server, &script, &console).await;
    assert_eq!((o.code, o.outcome, o.stored), (1, "remote", true));
    assert!(script.runs.lock().unwrap().is_empty(), "the remote verdict is trusted: no local run");
    assert_eq!(console.stderr_bytes(), PROBE_ERROR);

    let (script, console) = (f.script(1, PROBE_ERROR), f.console());
    let o = f.serve(&server, &script, &console).await;
    assert_eq!((o.code, o.outcome), (1, "hit"));
    assert!(script.runs.lock().unwrap().is_empty(), "replayed, not compiled");
    assert_eq!(*server.executed.lock().unwrap(), 1, "not executed again");
    assert_eq!(console.stderr_bytes(), PROBE_ERROR, "stderr byte for byte");
    assert!(!f.rmeta.exists() && !f.rlib.exists(), "no outputs");
}

#[tokio::test]
async fn a_probe_that_fails_here_in_cache_only_mode_is_remembered() {
    let mut f = fixture("ciprobe");
    f.settings.mode = Mode::CacheOnly;
    let server = Memory::default();
    let (script, console) = (f.script(1, PROBE_ERROR), f.console());
    let o = f.serve(&server, &script, &console).await;
    assert_eq!((o.code, o.outcome, o.stored), (1, "local", true));
    let stored = server.ac.lock().unwrap().get(&f.key()).cloned().unwrap();
    assert!(negative::is_negative(&stored));

    let (script, console) = (f.script(1, PROBE_ERROR), f.console());
    let o = f.serve(&server, &script, &console).await;
    assert_eq!((o.code, o.outcome), (1, "hit"));
    assert!(script.runs.lock().unwrap().is_empty());
    assert_eq!(console.stderr_bytes(), PROBE_ERROR);
}

#[tokio::test]
async fn a_local_run_hands_cargo_the_notification_after_the_sidecar() {
    let mut f = fixture("streamed");
    f.settings.mode = Mode::CacheOnly;
    let server = Memory::default();
    let here = metadata_line(&f.rmeta.to_string_lossy());
    let sidecar = f.rmeta.with_extension("dbdeps");
    struct Watch<'a>(&'a Recorded, &'a Path, Mutex<Vec<bool>>);
    impl Console for Watch<'_> {
        fn stdout(&self, d: &[u8]) {
            self.0.stdout(d)
        }
        fn stderr(&self, d: &[u8]) {
            self.2.lock().unwrap().push(self.1.is_file());
            self.0.stderr(d)
        }
    }
    let script = f.script(0, &[WARNING, &here, WARNING].concat());
    let inner = f.console();
    let watch = Watch(&inner, &sidecar, Mutex::new(Vec::new()));
    let job = Job {
        settings: &f.settings,
        caches: Caches::new(f.settings.cache_dir.clone(), F),
        rustc: Path::new("rustc"),
        words: &f.words,
        c: &f.c,
        trace: Trace(None),
        spawner: &script,
        console: &watch,
    };
    let o = serve(&job, &f.prepared, &server, Instant::now()).await;
    assert_eq!((o.code, o.stored), (0, true));
    assert_eq!(*watch.2.lock().unwrap(), vec![false, true, true], "line by line, the sidecar before the notification");
}

#[tokio::test]
async fn a_hit_that_fails_after_the_rmeta_is_finished_here_without_repeating_it() {
    let f = fixture("half");
    let server = Memory::default();
    let here = metadata_line(&f.rmeta.to_string_lossy());
    let stderr = [WARNING, &metadata_line("/elsewhere/libhalf-1.rmeta"), WARNING].concat();
    let result = f.remote_result(&server, &stderr);
    // The rlib's blob is gone from the CAS: the download fails after the
    // .rmeta and its notification reached cargo.
    let rlib = Digest::from_proto(F, result.output_files[0].digest.as_ref().unwrap()).unwrap();
    server.cas.lock().unwrap().remove(&rlib);
    server.ac.lock().unwrap().insert(f.key(), result);
    let (script, console) = (f.script(0, &[WARNING, &here, WARNING].concat()), f.console());
    let o = f.serve(&server, &script, &console).await;
    assert_eq!((o.code, o.outcome, o.reason), (0, "local", Some(LocalReason::RemoteFailed)));
    assert_eq!(script.runs.lock().unwrap().len(), 1);
    assert_eq!(console.stderr_bytes(), [WARNING, &here, WARNING].concat(), "the notification reaches cargo once");
    assert_eq!(std::fs::read(&f.rlib).unwrap(), format!("compiled {}", f.rlib.display()).as_bytes());
}

#[tokio::test]
async fn a_remote_compile_hands_cargo_the_rmeta_while_it_runs() {
    let f = fixture("early");
    let elsewhere = metadata_line("/worker/exec/ws/target/debug/deps/libearly-1.rmeta");
    let stderr = [WARNING, &elsewhere, WARNING].concat();
    let server = Memory { live: Some((stderr.clone(), Bytes::from_static(b"the rmeta"))), ..Default::default() };
    let result = f.remote_result(&server, &stderr);
    server.executes.lock().unwrap().push_back(executed(result));
    let (script, console) = (f.script(0, b""), f.console());
    let o = f.serve(&server, &script, &console).await;
    assert_eq!((o.code, o.outcome), (0, "remote"));
    assert!(server.rmeta_read.load(std::sync::atomic::Ordering::SeqCst), "the .rmeta was read from the running action");
    let here = metadata_line(&f.rmeta.to_string_lossy());
    assert_eq!(console.stderr_bytes(), [WARNING, &here, WARNING].concat(), "every line once, the local path named");
    let writes = console.stderr.lock().unwrap();
    let (first, rmeta_then, rlib_then) = writes[0].clone();
    assert_eq!(first, [WARNING, &here].concat(), "the head goes to cargo in one write, before the result");
    assert!(rmeta_then && !rlib_then, "the .rmeta is in place and the .rlib not yet when cargo reads the notification");
    assert!(f.rmeta.with_extension("dbdeps").is_file(), "the sidecar is written first");
    assert_eq!(std::fs::read(&f.rlib).unwrap(), b"the rlib");
}

#[tokio::test]
async fn a_remote_failure_after_the_early_rmeta_finishes_here_without_repeating_the_head() {
    let f = fixture("earlyfail");
    let elsewhere = metadata_line("/worker/exec/ws/target/debug/deps/libearlyfail-1.rmeta");
    let stderr = [WARNING, &elsewhere].concat();
    let server = Memory { live: Some((stderr.clone(), Bytes::from_static(b"the rmeta"))), ..Default::default() };
    let mut result = f.remote_result(&server, &stderr);
    result.exit_code = 101; // not rustc's verdict: may be the worker's
    result.output_files.clear();
    server.executes.lock().unwrap().push_back(executed(result));
    let here = metadata_line(&f.rmeta.to_string_lossy());
    let local_tail = b"{\"$message_type\":\"diagnostic\",\"level\":\"warning\",\"message\":\"late\"}\n";
    let (script, console) = (f.script(0, &[WARNING, &here, local_tail].concat()), f.console());
    let o = f.serve(&server, &script, &console).await;
    assert_eq!((o.code, o.reason), (0, Some(LocalReason::RemoteFailed)));
    assert_eq!(script.runs.lock().unwrap().len(), 1, "finished here");
    assert_eq!(
        console.stderr_bytes(),
        [WARNING, &here, local_tail].concat(),
        "the head once (from the running action), then the local run's rest"
    );
}
