//! The container runner: an action whose platform names `container-image`
//! runs in a container of that image, through the Docker Engine API
//! (`bollard`, over the engine's socket); every other action goes to the
//! host runner it wraps (the namespace sandbox, or plain processes).
//!
//! Per action: create, start, wait, remove. The container has
//! - the input root bind-mounted at the same path as on the host, and the
//!   Command's working directory inside it;
//! - the image's files, read-only, and a private `/tmp` (tmpfs): what the
//!   command sees of a filesystem is the image's, never the host's;
//! - the action's uid (the sandbox's `run_as`, default `nobody`, when the
//!   worker is root; the worker's own uid otherwise), no capabilities,
//!   `no-new-privileges`;
//! - no network (`none`), or the engine's default bridge for an action that
//!   asks `network=on` on a worker that allows it;
//! - the memory (`memory_limit`, swap included) and process (`process_limit`,
//!   the pids cgroup) limits, capped by the worker's maxima;
//! - as its first process the static init of `init.rs` (mounted read-only
//!   at `/.distbuild/init`): exactly the Command's environment, stdout and
//!   stderr written straight to the action's files, orphans reaped.
//!
//! On timeout or cancel the container is killed and removed; a container
//! left by a crash is removed when a worker starts on the same work
//! directory. Each carries the labels `dev.distbuild.worker=<worker name>`
//! and `dev.distbuild.work-dir=<work directory>`; only one worker runs on a
//! work directory at a time (a lock), so a container with its label and no
//! live runner holding the lock is a leftover.

pub mod credentials;
pub mod image;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, RemoveImageOptionsBuilder, WaitContainerOptionsBuilder,
};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{Ending, Limits, RunFailure, Runner, SandboxConfig, Spec, resolve_user};
use crate::worker::isolation::FilePolicy;
pub use image::{ImageRef, PROPERTY};

/// The labels every action container carries: the worker's name, and its
/// work directory (what leftovers are found by).
pub const WORKER_LABEL: &str = "dev.distbuild.worker";
pub const WORK_DIR_LABEL: &str = "dev.distbuild.work-dir";

/// Where the init, stdout and stderr are mounted in each container.
const INIT_PATH: &str = "/.distbuild/init";
const STDOUT_PATH: &str = "/.distbuild/stdout";
const STDERR_PATH: &str = "/.distbuild/stderr";

/// Seconds past the action's timeout after which the container's init ends
/// the action by itself (only when the worker has not: it died).
const INIT_DEADLINE_SLACK_SECS: u64 = 60;

/// The init, compiled by build.rs as a static executable.
static INIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/container-init"));

/// `[worker] docker`, `docker_host`, `docker_images`.
#[derive(Debug, Clone)]
pub struct ContainerConfig {
    /// The engine's address (`unix:///var/run/docker.sock`, `tcp://...`);
    /// None: `DOCKER_HOST`, else the local socket.
    pub host: Option<String>,
    /// Images this worker pulled that it keeps; past it, the least recently
    /// used is removed from the engine.
    pub keep_images: usize,
    /// The Docker CLI config file with registry credentials; None:
    /// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
    pub credentials: Option<PathBuf>,
}

impl Default for ContainerConfig {
    fn default() -> Self {
        ContainerConfig { host: None, keep_images: 8, credentials: None }
    }
}

pub struct ContainerRunner {
    docker: Docker,
    /// e.g. `docker 20.10.24 (API 1.41)`.
    engine: String,
    /// Runs the actions that name no image.
    host: Arc<dyn Runner>,
    worker: String,
    work_dir: String,
    /// Held for the runner's life: one container runner per work directory.
    _lock: std::fs::File,
    init: PathBuf,
    /// The command's uid and gid.
    user: (u32, u32),
    files: FilePolicy,
    allow_network: bool,
    limits: Limits,
    images: parking_lot::Mutex<image::Images>,
    /// One pull at a time (two actions asking for one new image pull it once).
    pulls: tokio::sync::Mutex<()>,
    credentials: credentials::Credentials,
}

impl ContainerRunner {
    /// Connects to the engine (it must answer), takes `work_dir`'s
    /// container lock, removes the containers an earlier worker on
    /// `work_dir` left, and writes the init there. `worker` names the
    /// containers' worker label. An error says why containers cannot work
    /// here.
    pub async fn start(
        host: Arc<dyn Runner>,
        sandbox: &SandboxConfig,
        config: &ContainerConfig,
        worker: &str,
        work_dir: &Path,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(!INIT.is_empty(), "containers need Linux (the container init was not built)");
        let docker = connect(config.host.as_deref())
            .map_err(|e| anyhow::anyhow!("[worker] docker: connecting to the Docker Engine: {e}"))?;
        let docker = docker.negotiate_version().await.map_err(|e| {
            anyhow::anyhow!("[worker] docker: the Docker Engine does not answer ({e}); is it running, and may this user use its socket?")
        })?;
        let version = docker.version().await.map_err(|e| anyhow::anyhow!("[worker] docker: {e}"))?;
        let engine = format!(
            "docker {} (API {})",
            version.version.unwrap_or_else(|| "?".into()),
            version.api_version.unwrap_or_else(|| "?".into())
        );
        // SAFETY: geteuid, getuid and getgid cannot fail.
        let (root, uid, gid) = unsafe { (libc::geteuid() == 0, libc::getuid(), libc::getgid()) };
        let (user, files) = if root {
            // The host runner's action owner (the sandbox's run_as), else
            // the same default: the command never owns the cache's files.
            let owner = match host.file_policy().action_owner {
                Some(o) => o,
                None => match &sandbox.run_as {
                    Some(spec) => resolve_user(spec)?,
                    None => resolve_user("nobody").unwrap_or((65534, 65534)),
                },
            };
            anyhow::ensure!(owner.0 != 0, "[worker] run_as must not be root");
            (owner, FilePolicy { action_owner: Some(owner), copy_inputs: false })
        } else {
            // The command's uid is the cache's owner: it gets copies.
            ((uid, gid), FilePolicy { action_owner: None, copy_inputs: true })
        };
        std::fs::create_dir_all(work_dir)?;
        let lock = lock(&work_dir.join(".containers.lock"))?;
        let work_dir = std::fs::canonicalize(work_dir)?;
        let init = work_dir.join("container-init");
        write_init(&init)?;
        let runner = ContainerRunner {
            docker,
            engine,
            host,
            worker: worker.to_string(),
            work_dir: work_dir.display().to_string(),
            _lock: lock,
            init,
            user,
            files,
            allow_network: sandbox.allow_network,
            limits: sandbox.limits,
            images: parking_lot::Mutex::new(image::Images::new(config.keep_images)),
            pulls: tokio::sync::Mutex::new(()),
            credentials: credentials::Credentials::new(config.credentials.clone()),
        };
        let left = runner.remove_leftovers().await?;
        if left > 0 {
            tracing::warn!(containers = left, "removed action containers an earlier run of this worker left");
        }
        tracing::info!(engine = %runner.engine, "actions that name a container-image run in containers");
        Ok(runner)
    }

    /// Removes every container labelled with this work directory.
    async fn remove_leftovers(&self) -> anyhow::Result<usize> {
        let filters = HashMap::from([("label", vec![format!("{WORK_DIR_LABEL}={}", self.work_dir)])]);
        let list = self
            .docker
            .list_containers(Some(ListContainersOptionsBuilder::default().all(true).filters(&filters).build()))
            .await
            .map_err(|e| anyhow::anyhow!("[worker] docker: listing containers: {e}"))?;
        let mut n = 0;
        for c in list {
            if let Some(id) = c.id {
                remove(&self.docker, &id).await;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Makes sure the engine has `image`, pulling it when it has not.
    async fn ensure_image(&self, image: &ImageRef) -> Result<(), RunFailure> {
        if self.images.lock().known(image) {
            return Ok(());
        }
        let _one = self.pulls.lock().await;
        if self.images.lock().known(image) {
            return Ok(());
        }
        let pulled = match self.docker.inspect_image(image.as_str()).await {
            Ok(_) => false,
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {
                self.pull(image).await?;
                true
            }
            Err(e) => return Err(engine_error(&format!("inspecting image {image}"), e)),
        };
        let evict = self.images.lock().add(image.clone(), pulled);
        if let Some(old) = evict {
            // An image a running action still uses stays (the engine
            // refuses); it is tried again on its next eviction.
            let options = RemoveImageOptionsBuilder::default().noprune(false).build();
            match self.docker.remove_image(old.as_str(), Some(options), None).await {
                Ok(_) => tracing::info!(image = %old, "removed an image this worker pulled and no longer uses"),
                Err(e) => tracing::debug!(image = %old, error = %e, "keeping an image"),
            }
        }
        Ok(())
    }

    async fn pull(&self, image: &ImageRef) -> Result<(), RunFailure> {
        let started = std::time::Instant::now();
        tracing::info!(%image, "pulling an image");
        let credentials = self.credentials.for_image(image).await.map_err(|message| RunFailure {
            code: tonic::Code::FailedPrecondition,
            message: format!("the worker cannot pull the image {image}: {message}"),
        })?;
        let options = CreateImageOptionsBuilder::default().from_image(image.as_str()).build();
        let mut progress = self.docker.create_image(Some(options), None, credentials);
        while let Some(step) = progress.next().await {
            let step = step.map_err(|e| RunFailure {
                code: tonic::Code::FailedPrecondition,
                message: format!("the worker cannot pull the image {image}: {}", engine_message(&e)),
            })?;
            if let Some(detail) = step.error_detail.and_then(|d| d.message) {
                return Err(RunFailure {
                    code: tonic::Code::FailedPrecondition,
                    message: format!("the worker cannot pull the image {image}: {detail}"),
                });
            }
        }
        tracing::info!(%image, elapsed = ?started.elapsed(), "pulled an image");
        Ok(())
    }

    async fn run_container(
        &self,
        image: &ImageRef,
        spec: &Spec<'_>,
        cancel: &CancellationToken,
    ) -> std::io::Result<Ending> {
        if spec.settings.network && !self.allow_network {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "the action asks for network=on and this worker does not allow it ([worker] allow_network)",
            ));
        }
        // A pull has the action's timeout again, and stops on cancel.
        tokio::select! {
            ready = self.ensure_image(image) => ready.map_err(RunFailure::into_io)?,
            () = tokio::time::sleep(spec.timeout) => return Err(RunFailure {
                code: tonic::Code::DeadlineExceeded,
                message: format!(
                    "pulling the image {image} took longer than the action's timeout ({})",
                    humantime::format_duration(spec.timeout)
                ),
            }.into_io()),
            () = cancel.cancelled() => return Ok(Ending::Cancelled),
        }
        for path in [spec.stdout, spec.stderr] {
            output_file(path, self.files.action_owner)?;
        }
        let (memory, processes) = self.limits.apply(spec.settings);
        // The init's own deadline (past the timeout, with room for the
        // worker to kill the container first) ends the action should the
        // worker be gone.
        let deadline = spec.timeout.as_secs().saturating_add(INIT_DEADLINE_SLACK_SECS);
        let mut cmd = vec![deadline.to_string(), spec.environment.len().to_string()];
        cmd.extend(spec.environment.iter().map(|(k, v)| format!("{k}={v}")));
        cmd.extend(spec.arguments.iter().cloned());
        let bind = |from: &Path, to: &str, mode: &str| format!("{}:{to}:{mode}", from.display());
        let action_dir = spec.action_dir.display().to_string();
        let host_config = HostConfig {
            binds: Some(vec![
                format!("{action_dir}:{action_dir}:rw"),
                bind(&self.init, INIT_PATH, "ro"),
                bind(spec.stdout, STDOUT_PATH, "rw"),
                bind(spec.stderr, STDERR_PATH, "rw"),
            ]),
            network_mode: Some(if spec.settings.network { "bridge" } else { "none" }.into()),
            memory: memory.map(|m| m as i64),
            // Equal to memory: no swap on top of the limit.
            memory_swap: memory.map(|m| m as i64),
            pids_limit: processes.map(|p| p as i64),
            readonly_rootfs: Some(true),
            tmpfs: Some(HashMap::from([("/tmp".to_string(), "rw,nosuid,nodev,mode=1777".to_string())])),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges".into()]),
            // Output goes to the action's files, not through the engine.
            log_config: Some(HostConfigLogConfig { typ: Some("none".into()), config: None }),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(image.as_str().to_string()),
            entrypoint: Some(vec![INIT_PATH.into()]),
            cmd: Some(cmd),
            env: Some(Vec::new()),
            working_dir: Some(spec.working_dir.display().to_string()),
            user: Some(format!("{}:{}", self.user.0, self.user.1)),
            labels: Some(HashMap::from([
                (WORKER_LABEL.to_string(), self.worker.clone()),
                (WORK_DIR_LABEL.to_string(), self.work_dir.clone()),
            ])),
            network_disabled: Some(!spec.settings.network),
            attach_stdin: Some(false),
            attach_stdout: Some(false),
            attach_stderr: Some(false),
            host_config: Some(host_config),
            ..Default::default()
        };
        let name = format!("distbuild-{}", uuid::Uuid::new_v4().simple());
        let options = CreateContainerOptionsBuilder::default().name(&name).build();
        let mut created = self.docker.create_container(Some(options.clone()), body.clone()).await;
        if let Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) = &created {
            // The image went away since it was checked (removed by hand, or
            // evicted for another action): make sure of it again, once.
            self.images.lock().forget(image);
            self.ensure_image(image).await.map_err(RunFailure::into_io)?;
            created = self.docker.create_container(Some(options), body).await;
        }
        let created = created.map_err(|e| engine_error(&format!("creating a container of {image}"), e).into_io())?;
        // Removed however this ends, even if this future is dropped.
        let guard = Removal { docker: self.docker.clone(), id: Some(created.id.clone()) };
        self.docker
            .start_container(&created.id, None)
            .await
            .map_err(|e| engine_error(&format!("starting a container of {image}"), e).into_io())?;
        let options = WaitContainerOptionsBuilder::default().condition("not-running").build();
        let mut wait = self.docker.wait_container(&created.id, Some(options));
        let ending = tokio::select! {
            waited = wait.next() => match waited {
                Some(Ok(r)) => Ending::Exited(r.status_code as i32),
                Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => Ending::Exited(code as i32),
                Some(Err(e)) => return Err(engine_error("waiting for the action's container", e).into_io()),
                None => return Err(RunFailure { code: tonic::Code::Unavailable, message: "the container engine stopped answering".into() }.into_io()),
            },
            () = tokio::time::sleep(spec.timeout) => Ending::TimedOut,
            () = cancel.cancelled() => Ending::Cancelled,
        };
        guard.now().await;
        Ok(ending)
    }
}

#[async_trait::async_trait]
impl Runner for ContainerRunner {
    fn describe(&self) -> String {
        format!("containers({} as {}:{}) else {}", self.engine, self.user.0, self.user.1, self.host.describe())
    }

    fn file_policy(&self) -> FilePolicy {
        self.files
    }

    fn network(&self) -> bool {
        self.allow_network && self.host.network()
    }

    fn properties(&self) -> Vec<(String, String)> {
        let mut p = self.host.properties();
        p.push((PROPERTY.into(), crate::execution::platform::ANY_VALUE.into()));
        p
    }

    async fn run(&self, spec: Spec<'_>, cancel: &CancellationToken) -> std::io::Result<Ending> {
        match spec.settings.container_image.clone() {
            Some(image) => self.run_container(&image, &spec, cancel).await,
            None => self.host.run(spec, cancel).await,
        }
    }
}

fn connect(host: Option<&str>) -> Result<Docker, bollard::errors::Error> {
    const TIMEOUT_SECS: u64 = 120;
    match host {
        None => Docker::connect_with_local_defaults(),
        Some(h) if h.starts_with("unix://") || h.starts_with('/') => {
            Docker::connect_with_unix(h, TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
        }
        Some(h) => {
            let http = h.replacen("tcp://", "http://", 1);
            Docker::connect_with_http(&http, TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
        }
    }
}

/// Takes the lock file `path`: one container runner per work directory,
/// so that the leftovers it removes at start are no live worker's.
fn lock(path: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path)?;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        anyhow::bail!(
            "{} is in use by another worker; give each worker its own --work-dir",
            path.parent().unwrap_or(path).display()
        );
    }
    Ok(file)
}

/// The init on disk, executable, readable by the action's uid.
fn write_init(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    std::fs::write(&tmp, INIT)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o555))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// An empty stdout or stderr file the command's uid can write.
fn output_file(path: &Path, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    }
    Ok(())
}

/// Kills and removes a container (best effort: logged).
async fn remove(docker: &Docker, id: &str) {
    let options = RemoveContainerOptionsBuilder::default().force(true).v(true).build();
    match docker.remove_container(id, Some(options)).await {
        Ok(()) | Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {}
        Err(e) => tracing::warn!(container = id, error = %e, "cannot remove an action container"),
    }
}

/// Removes the container when the run ends, or when the run's future is
/// dropped (the worker stopping): then in a task of its own.
struct Removal {
    docker: Docker,
    id: Option<String>,
}

impl Removal {
    async fn now(mut self) {
        if let Some(id) = self.id.take() {
            remove(&self.docker, &id).await;
        }
    }
}

impl Drop for Removal {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let docker = self.docker.clone();
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move { remove(&docker, &id).await });
            }
        }
    }
}

/// The engine's own message for an error (its JSON `message`), else the
/// error's text.
fn engine_message(e: &bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerResponseServerError { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// An engine error while running an action: the image's fault (a 4xx about
/// it) is FAILED_PRECONDITION; the engine's is UNAVAILABLE (clients retry).
fn engine_error(what: &str, e: bollard::errors::Error) -> RunFailure {
    let code = match &e {
        bollard::errors::Error::DockerResponseServerError { status_code, .. } if (400..500).contains(status_code) => {
            tonic::Code::FailedPrecondition
        }
        _ => tonic::Code::Unavailable,
    };
    RunFailure { code, message: format!("{what}: {}", engine_message(&e)) }
}
