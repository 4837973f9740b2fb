//! Runs actions: fetch the input root, run the command, collect and upload
//! the outputs, report an ExecuteResponse.
//!
//! One [`Executor`] serves both kinds of worker: the server's built-in slots
//! (CAS reached through the store, see [`builtin`]) and `cargo-distbuild
//! worker` processes on other machines (CAS over gRPC, see [`remote`]).

pub mod action_init;
pub mod builtin;
mod cache;
pub mod cas;
mod inputs;
pub mod isolation;
pub mod live;
mod outputs;
pub mod remote;
pub mod runner;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use remote_apis::reapi::{Action, ActionResult, Command, ExecuteResponse, ExecutedActionMetadata};
use remote_apis::{Digest, InstanceName, protobuf, rpc};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use cache::LocalCache;
use cas::ExecCas;
pub use inputs::DirectoryCache;
use isolation::FilePolicy;
pub use live::{NoOutput, OutputSink};
pub use outputs::OutputLimits;
use outputs::Upload;
use runner::{Ending, Runner};

pub use inputs::{TreeLimits, TreeSize, check_directory, tree_size};

/// Decoded Directory messages a worker (or the scheduler) remembers.
pub const DIRECTORY_CACHE_ENTRIES: usize = 100_000;
/// Concurrent output uploads per action.
const UPLOAD_CONCURRENCY: usize = 16;

/// One attempt at running an action, as the scheduler hands it to a worker.
#[derive(Debug, Clone)]
pub struct Task {
    /// Unique per attempt.
    pub id: String,
    pub instance: InstanceName,
    pub action_digest: Digest,
    pub action: Action,
    pub command: Command,
    pub timeout: Duration,
    pub queued_at: SystemTime,
}

pub struct Executor {
    name: String,
    cas: Arc<dyn ExecCas>,
    cache: Arc<LocalCache>,
    directories: DirectoryCache,
    exec_dir: PathBuf,
    /// Bounds on input roots and output directories.
    limits: TreeLimits,
    /// How input and output files are laid out for the runner (see
    /// [`isolation`]).
    files: FilePolicy,
    /// The worker's maxima on an action's outputs.
    output_limits: OutputLimits,
    /// Runs each command (plain, or in a sandbox; see [`runner`]).
    runner: Arc<dyn Runner>,
    /// Actions past their input fetch and not yet collected, by task id:
    /// what a read of a running output needs.
    running: parking_lot::Mutex<std::collections::HashMap<String, live::RunningAction>>,
    /// Held for the executor's life: one worker per work directory.
    _lock: std::fs::File,
}

impl Executor {
    /// `work_dir` holds the blob cache (`cache/`, kept across restarts) and
    /// the actions' directories (`exec/`, emptied now). `runner` runs the
    /// commands ([`runner::build`] makes it from the configuration).
    pub fn new(
        name: String,
        cas: Arc<dyn ExecCas>,
        work_dir: &Path,
        cache_bytes: u64,
        runner: Arc<dyn Runner>,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(work_dir)?;
        let lock = lock_work_dir(work_dir)?;
        let exec_dir = work_dir.join("exec");
        clear_trash(work_dir);
        set_aside(work_dir, &exec_dir);
        std::fs::create_dir_all(&exec_dir)?;
        let cache = Arc::new(LocalCache::open(&work_dir.join("cache"), cache_bytes)?);
        // The runner's file policy from the start: no way to forget it.
        let files = runner.file_policy();
        Executor {
            name,
            cas,
            cache,
            directories: DirectoryCache::new(DIRECTORY_CACHE_ENTRIES),
            exec_dir,
            limits: TreeLimits::default(),
            files: FilePolicy::default(),
            output_limits: OutputLimits::default(),
            runner,
            running: Default::default(),
            _lock: lock,
        }
        .with_file_policy(files)
    }

    /// The executor of the worker `name` as `config` says: its runner
    /// ([`runner::start`]: the sandbox, and containers when asked), its work
    /// directory, cache budget and limits. Actions see neither the work
    /// directory nor anything in `hide`.
    pub async fn start(
        name: String,
        cas: Arc<dyn ExecCas>,
        config: &crate::config::Config,
        mut hide: Vec<PathBuf>,
    ) -> anyhow::Result<Self> {
        hide.push(config.work_dir.clone());
        let work_dir = config.work_dir.clone();
        let runner = runner::start(&config.sandbox, config.action_init.clone(), hide, &work_dir, &name).await?;
        let (cache_size, limits, output_limits) =
            (config.worker_cache_size, config.execution.tree_limits(), config.output_limits);
        tokio::task::spawn_blocking(move || -> anyhow::Result<Executor> {
            let e = Executor::new(name, cas, &work_dir, cache_size, runner)?;
            Ok(e.with_limits(limits).with_output_limits(output_limits))
        })
        .await?
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// What runs the commands (`workers list` shows its description).
    pub fn runner(&self) -> &dyn Runner {
        self.runner.as_ref()
    }

    /// The properties this worker offers: `configured` without sandbox
    /// settings (an action's own, not the worker's) and without `chroot`
    /// (the runner's to offer), plus `network=on` when the runner gives
    /// actions that ask for it the network, plus the runner's own.
    pub fn offered_properties(&self, configured: &[(String, String)]) -> Vec<(String, String)> {
        use crate::execution::platform;
        let mut out: Vec<(String, String)> = configured
            .iter()
            .filter(|(k, _)| !platform::is_sandbox_setting(k) && k != platform::CHROOT)
            .cloned()
            .collect();
        if self.runner.network() {
            out.push((platform::NETWORK.into(), "on".into()));
        }
        out.extend(self.runner.properties());
        out
    }

    /// Bounds on the trees this worker creates and collects (the server's
    /// `[execution]` limits, checked again here before anything is created).
    /// How the runner needs the action's files laid out (its
    /// [`isolation::FilePolicy`]). With an action owner, `exec/` can be
    /// traversed but not listed, so one action cannot find another's
    /// directory by name.
    pub fn with_file_policy(mut self, files: FilePolicy) -> std::io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        if files.action_owner.is_some() {
            std::fs::set_permissions(&self.exec_dir, std::fs::Permissions::from_mode(0o711))?;
        }
        self.files = files;
        Ok(self)
    }

    /// The worker's maxima on an action's outputs (`[worker]
    /// max_output_bytes`, `max_output_files`); an action's platform may
    /// lower them.
    pub fn with_output_limits(mut self, limits: OutputLimits) -> Self {
        self.output_limits = limits;
        self
    }

    pub fn with_limits(mut self, limits: TreeLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Runs `task`. `started` is called once the worker begins (the
    /// operation is EXECUTING); `output` gets stdout and stderr while the
    /// command runs (see [`live`]). Never fails: problems are the
    /// response's status, with the partial result when there is one.
    pub async fn execute(
        &self,
        task: &Task,
        started: impl FnOnce(),
        output: &dyn OutputSink,
        cancel: CancellationToken,
    ) -> ExecuteResponse {
        let mut meta = ExecutedActionMetadata {
            worker: self.name.clone(),
            queued_timestamp: Some(timestamp(task.queued_at)),
            worker_start_timestamp: Some(timestamp(SystemTime::now())),
            ..Default::default()
        };
        started();
        let dir = self.exec_dir.join(&task.id);
        let outcome = self.run_in(task, &dir, &mut meta, output, &cancel).await;
        self.running.lock().remove(&task.id);
        let (work_dir, cleanup) = (self.exec_dir.parent().unwrap_or(&self.exec_dir).to_path_buf(), dir.clone());
        let _ = tokio::task::spawn_blocking(move || set_aside(&work_dir, &cleanup)).await;
        meta.worker_completed_timestamp = Some(timestamp(SystemTime::now()));
        let (mut result, status) = match outcome {
            Ok((result, ending)) => (Some(result), ending_status(ending, task.timeout)),
            Err((result, e)) => (result, Some(e.to_rpc_status_with_details())),
        };
        if let Some(r) = &mut result {
            r.execution_metadata = Some(meta);
        }
        ExecuteResponse {
            result,
            cached_result: false,
            status,
            server_logs: Default::default(),
            message: String::new(),
        }
    }

    async fn run_in(
        &self,
        task: &Task,
        dir: &Path,
        meta: &mut ExecutedActionMetadata,
        output: &dyn OutputSink,
        cancel: &CancellationToken,
    ) -> std::result::Result<(ActionResult, Ending), (Option<ActionResult>, Error)> {
        let root = dir.join("root");
        tokio::fs::create_dir_all(&root).await.map_err(|e| (None, Error::io(root.display(), e)))?;
        self.files.give_dir(&root).map_err(|e| (None, Error::io(root.display(), e)))?;

        meta.input_fetch_start_timestamp = Some(timestamp(SystemTime::now()));
        let working_dir = self.prepare_inputs(task, &root, cancel).await.map_err(|e| (None, e))?;
        meta.input_fetch_completed_timestamp = Some(timestamp(SystemTime::now()));
        self.running.lock().insert(task.id.clone(), self.running_action(task, dir, &root));

        let (stdout, stderr) = (dir.join("stdout"), dir.join("stderr"));
        let env: Vec<(String, String)> =
            task.command.environment_variables.iter().map(|v| (v.name.clone(), v.value.clone())).collect();
        let settings = sandbox_settings(task).map_err(|e| (None, e))?;
        meta.execution_start_timestamp = Some(timestamp(SystemTime::now()));
        let spec = runner::Spec {
            arguments: &task.command.arguments,
            environment: &env,
            working_dir: &working_dir,
            action_dir: &root,
            stdout: &stdout,
            stderr: &stderr,
            timeout: task.timeout,
            settings: &settings,
        };
        let done = CancellationToken::new();
        let running = async {
            let ending = self.runner.run(spec, cancel).await;
            done.cancel();
            ending
        };
        let (ending, ()) = tokio::join!(running, live::follow(&stdout, &stderr, output, &done));
        let ending = ending.map_err(|e| {
            if let Some(f) = runner::RunFailure::of(&e) {
                return (None, Error::new(f.code, f.message.clone()));
            }
            let program = task.command.arguments.first().map(String::as_str).unwrap_or("");
            (None, Error::invalid(format!("cannot run {program:?}: {e}")))
        })?;
        meta.execution_completed_timestamp = Some(timestamp(SystemTime::now()));
        if ending == Ending::Cancelled {
            return Err((None, Error::new(tonic::Code::Cancelled, "the operation was cancelled")));
        }

        meta.output_upload_start_timestamp = Some(timestamp(SystemTime::now()));
        let result = self.upload_outputs(task, &root, &stdout, &stderr, ending).await;
        meta.output_upload_completed_timestamp = Some(timestamp(SystemTime::now()));
        result.map(|r| (r, ending)).map_err(|e| (None, e.context("collecting outputs")))
    }

    /// Fetches and creates the input root, then the working directory and
    /// the outputs' parents; returns the working directory. The tree is
    /// checked against the limits before anything is created, and the whole
    /// step has a deadline of its own, the action's timeout again (REAPI's
    /// timeout covers the execution only): DEADLINE_EXCEEDED past it.
    async fn prepare_inputs(&self, task: &Task, root: &Path, cancel: &CancellationToken) -> Result<PathBuf> {
        let stop =
            inputs::Stop { deadline: Instant::now() + task.timeout, limit: task.timeout, cancel: cancel.clone() };
        let function = task.action_digest.function;
        let root_digest = Digest::from_field(function, task.action.input_root_digest.as_ref(), "input_root_digest")?;
        // A bad output limit is refused before the command runs.
        self.output_limits.for_action(&action_platform(task))?;
        let fetching =
            inputs::fetch_tree(self.cas.as_ref(), &self.directories, &task.instance, root_digest, &self.limits);
        let tree = stop.bound(fetching).await?;
        inputs::materialize(self.cas.as_ref(), &self.cache, &task.instance, &tree, root, self.files, &stop).await?;
        drop(tree);
        let (root, command, limits, files) = (root.to_path_buf(), task.command.clone(), self.limits, self.files);
        tokio::task::spawn_blocking(move || outputs::prepare(&root, &command, &limits, files))
            .await
            .map_err(|e| Error::internal(e.to_string()))?
    }

    fn running_action(&self, task: &Task, dir: &Path, root: &Path) -> live::RunningAction {
        #[allow(deprecated)]
        let old = task.command.output_files.iter().chain(task.command.output_directories.iter());
        live::RunningAction {
            instance: task.instance.clone(),
            function: task.action_digest.function,
            dir: dir.to_path_buf(),
            root: root.to_path_buf(),
            working_directory: task.command.working_directory.clone(),
            declared: task.command.output_paths.iter().chain(old).cloned().collect(),
        }
    }

    /// Uploads the current content of `path`, a declared output of the
    /// running task `task`, to the CAS and returns its digest: NOT_FOUND
    /// when the task does not run here (any more) or has not written it yet.
    pub async fn read_running_output(&self, task: &str, path: &str) -> Result<Digest> {
        let action = self.running.lock().get(task).cloned();
        let Some(action) = action else {
            return Err(Error::not_found(format!("task {task} is not running on worker {}", self.name)));
        };
        live::upload_output(self.cas.as_ref(), &action, path).await
    }

    async fn upload_outputs(
        &self,
        task: &Task,
        root: &Path,
        stdout: &Path,
        stderr: &Path,
        ending: Ending,
    ) -> Result<ActionResult> {
        let function = task.action_digest.function;
        let (root, command, limits) = (root.to_path_buf(), task.command.clone(), self.limits);
        let (out, err) = (stdout.to_path_buf(), stderr.to_path_buf());
        let mut tally = outputs::Tally::new(self.output_limits.for_action(&action_platform(task))?);
        let files = self.files;
        let (mut result, mut uploads, adopt) = tokio::task::spawn_blocking(move || -> Result<_> {
            // Counted first: an action over its limits is refused before
            // anything is read, let alone uploaded.
            for p in [&out, &err] {
                tally.add_bytes(std::fs::metadata(p).map_err(|e| Error::io(p.display(), e))?.len())?;
            }
            // Beside `root`, in the action's directory: the worker's own.
            let staging = root.with_file_name("staged");
            if files.stages_outputs() {
                use std::os::unix::fs::DirBuilderExt;
                let mut builder = std::fs::DirBuilder::new();
                builder.mode(0o700).create(&staging).map_err(|e| Error::io(staging.display(), e))?;
            }
            let staging = outputs::Staging { policy: files, dir: &staging };
            let outputs::Collected { result, mut uploads, adopt } =
                outputs::collect(function, &root, &command, &limits, &staging, &mut tally)?;
            for p in [out, err] {
                let d = remote_apis::merkle::hash_file_blocking(function, &p).map_err(|e| Error::io(p.display(), e))?;
                uploads.push(Upload::File(d, p));
            }
            Ok((result, uploads, adopt))
        })
        .await
        .map_err(|e| Error::internal(e.to_string()))??;
        // Outputs feed the next actions: `adopt` keeps them in this worker's
        // cache (the action directory is removed next, so linking is safe).
        let n = uploads.len();
        result.stdout_digest = Some(uploads[n - 2].digest().to_proto());
        result.stderr_digest = Some(uploads[n - 1].digest().to_proto());
        result.exit_code = match ending {
            Ending::Exited(code) => code,
            Ending::TimedOut | Ending::Cancelled => 128 + libc::SIGKILL,
        };
        uploads.sort_by_key(|u| (u.digest().hash, u.digest().size));
        uploads.dedup_by_key(|u| u.digest());
        let digests: Vec<Digest> = uploads.iter().map(Upload::digest).filter(|d| d.size > 0).collect();
        let missing: std::collections::HashSet<Digest> =
            self.cas.find_missing(&task.instance, &digests).await?.into_iter().collect();
        let cas = self.cas.as_ref();
        let instance = &task.instance;
        futures::stream::iter(uploads.into_iter().filter(|u| missing.contains(&u.digest())))
            .map(|u| async move {
                match u {
                    Upload::File(d, p) => cas.put_file(instance, &d, &p).await,
                    Upload::Bytes(d, b) => cas.put_bytes(instance, &d, b).await,
                }
            })
            .buffer_unordered(UPLOAD_CONCURRENCY)
            .collect::<Vec<Result<()>>>()
            .await
            .into_iter()
            .collect::<Result<Vec<()>>>()?;
        let cache = self.cache.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for (key, path) in adopt {
                if let Err(e) = cache.adopt(key, &path) {
                    tracing::debug!(path = %path.display(), error = %e, "keeping an output in the local cache");
                }
            }
        })
        .await;
        Ok(result)
    }
}

/// What the action's platform (Action.platform, else the Command's, as the
/// scheduler matched it) asks of the sandbox.
fn sandbox_settings(task: &Task) -> Result<runner::Settings> {
    #[allow(deprecated)]
    let platform = match task.action.platform.as_ref() {
        Some(p) if !p.properties.is_empty() => Some(p),
        _ => task.command.platform.as_ref(),
    };
    let pairs: Vec<(String, String)> =
        platform.map(|p| p.properties.iter().map(|x| (x.name.clone(), x.value.clone())).collect()).unwrap_or_default();
    runner::Settings::from_platform(&pairs).map_err(Error::invalid)
}

/// The platform the action was matched on: Action.platform, else the
/// Command's (REAPI 2.2 moved it; older clients set the Command's).
fn action_platform(task: &Task) -> crate::execution::platform::Platform {
    #[allow(deprecated)]
    let platform = match task.action.platform.as_ref() {
        Some(p) if !p.properties.is_empty() => Some(p),
        _ => task.command.platform.as_ref(),
    };
    crate::execution::platform::Platform::from_proto(platform)
}

/// Takes the work directory's lock: a second worker on the same directory
/// would delete the first one's action directories and cache downloads.
fn lock_work_dir(work_dir: &Path) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(work_dir.join(".lock"))?;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            format!("{} is in use by another worker; give each worker its own --work-dir", work_dir.display()),
        ));
    }
    Ok(file)
}

/// Waits (at most 10 s) until every running action of a worker has ended
/// after its cancellation, so no process outlives the worker.
pub(crate) async fn drain(running: &parking_lot::Mutex<std::collections::HashMap<String, CancellationToken>>) {
    for token in running.lock().values() {
        token.cancel();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !running.lock().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The status of a run that produced a result.
fn ending_status(ending: Ending, timeout: Duration) -> Option<rpc::Status> {
    match ending {
        Ending::Exited(_) => None,
        Ending::TimedOut => Some(rpc::Status {
            code: tonic::Code::DeadlineExceeded as i32,
            message: format!(
                "the action ran longer than its timeout of {} and was killed",
                humantime::format_duration(timeout)
            ),
            details: Vec::new(),
        }),
        Ending::Cancelled => Some(rpc::Status {
            code: tonic::Code::Cancelled as i32,
            message: "the operation was cancelled".into(),
            details: Vec::new(),
        }),
    }
}

pub fn timestamp(t: SystemTime) -> protobuf::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    protobuf::Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

/// Removes `dir` (an action's directory, or `exec/` at startup) without
/// recursion. What cannot be removed is logged and renamed aside into
/// `<work_dir>/trash/`, tried again at the next start ([`clear_trash`]),
/// so a bad leftover never stops the worker.
fn set_aside(work_dir: &Path, dir: &Path) {
    let trash = work_dir.join("trash");
    let Err(e) = crate::fsutil::remove_tree(dir) else { return };
    tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a directory; moving it aside");
    let aside = trash.join(uuid::Uuid::new_v4().to_string());
    if let Err(e) = std::fs::create_dir_all(&trash).and_then(|()| std::fs::rename(dir, &aside)) {
        tracing::error!(dir = %dir.display(), error = %e, "cannot move a directory aside either");
    }
}

/// Removes what earlier runs set aside (best effort, at startup).
fn clear_trash(work_dir: &Path) {
    let trash = work_dir.join("trash");
    if let Err(e) = crate::fsutil::remove_tree(&trash) {
        tracing::warn!(dir = %trash.display(), error = %e, "cannot remove leftovers set aside earlier; they stay");
    }
}
