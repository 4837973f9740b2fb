//! Running an action's prepared command: the runner seam.
//!
//! The executor materializes the input root, hands the command to a
//! [`Runner`], and collects the outputs; neither end knows which runner
//! ran it. A runner only says what it needs of the files
//! ([`Runner::file_policy`]) and what it is ([`Runner::describe`], shown by
//! `workers list`).

mod chroot;
pub mod container;
mod plain;
mod sandbox;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

pub use container::{ContainerConfig, ContainerRunner};
pub use plain::PlainRunner;
pub use sandbox::SandboxRunner;

use super::isolation::FilePolicy;
use crate::execution::platform;

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Exit code; 128 + N for a process killed by signal N, as shells report.
    Exited(i32),
    TimedOut,
    Cancelled,
}

/// One command to run.
pub struct Spec<'a> {
    pub arguments: &'a [String],
    pub environment: &'a [(String, String)],
    pub working_dir: &'a Path,
    /// The action's input root: the one directory a sandboxed command may
    /// write (besides a private `/tmp`).
    pub action_dir: &'a Path,
    pub stdout: &'a Path,
    pub stderr: &'a Path,
    pub timeout: Duration,
    /// What the action's platform asks of the sandbox.
    pub settings: &'a Settings,
}

/// Runs an action's command: a plain process, a process in Linux
/// namespaces, and (next) a container are interchangeable behind it, so
/// input materialization and output collection do not know which one ran
/// the command, and a worker picks one from its configuration.
#[async_trait::async_trait]
pub trait Runner: Send + Sync {
    /// What `workers list` shows, e.g. `namespaces(pid,mount,net,ipc,uts)
    /// run_as=65534:65534` or `none`.
    fn describe(&self) -> String;

    /// What the runner needs of the action's files so that the command
    /// cannot change a blob another action or the cache sees.
    fn file_policy(&self) -> FilePolicy;

    /// Whether an action asking `network=on` gets the host's network (the
    /// worker then offers the property `network=on`; without it such an
    /// action is never assigned here).
    fn network(&self) -> bool;

    /// Properties the runner adds to the worker's offer (the container
    /// runner: `container-image=*`).
    fn properties(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// Runs the command to its end, its timeout or `cancel`; no process of
    /// it is left when this returns. An error: the command did not start
    /// (reported as INVALID_ARGUMENT, or with the code of a [`RunFailure`]
    /// inside it).
    async fn run(&self, spec: Spec<'_>, cancel: &CancellationToken) -> std::io::Result<Ending>;
}

/// Why a command could not start when the fault is not the command's: the
/// image cannot be pulled (FAILED_PRECONDITION), the container engine is
/// gone (UNAVAILABLE). Carried inside the `std::io::Error` of
/// [`Runner::run`]; the executor reports its code and message.
#[derive(Debug, Clone)]
pub struct RunFailure {
    pub code: tonic::Code,
    pub message: String,
}

impl std::fmt::Display for RunFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RunFailure {}

impl RunFailure {
    pub fn into_io(self) -> std::io::Error {
        std::io::Error::other(self)
    }

    /// The failure inside a run's error, if it is one.
    pub fn of(e: &std::io::Error) -> Option<&RunFailure> {
        e.get_ref().and_then(|inner| inner.downcast_ref::<RunFailure>())
    }
}

/// The sandbox settings an action asks for in its platform properties
/// (`network`, `memory_limit`, `process_limit`): not worker-matching keys,
/// except `network=on` (see `execution::platform`); and the image it runs
/// in (`container-image`, a matching key: only workers that run containers
/// offer it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    pub network: bool,
    /// Bytes.
    pub memory: Option<u64>,
    pub processes: Option<u64>,
    pub container_image: Option<container::ImageRef>,
    /// `chroot=input-root`: the input root is the command's `/` (a matching
    /// key: only workers with `[worker] input_root_as_root` offer it).
    pub chroot: bool,
}

impl Settings {
    /// Reads the settings from the action's platform; an unreadable value
    /// is an error naming the property.
    pub fn from_platform(pairs: &[(String, String)]) -> Result<Settings, String> {
        let mut s = Settings::default();
        for (name, value) in pairs {
            match name.as_str() {
                platform::NETWORK => {
                    s.network = match value.as_str() {
                        "on" => true,
                        "off" | "" => false,
                        _ => return Err(format!("platform property {name}={value:?}: expected on or off")),
                    }
                }
                platform::MEMORY_LIMIT => {
                    let b: bytesize::ByteSize = value
                        .parse()
                        .map_err(|e| format!("platform property {name}={value:?}: not a size like 2GiB ({e})"))?;
                    s.memory = Some(b.as_u64());
                }
                platform::PROCESS_LIMIT => {
                    let n = value
                        .parse::<u64>()
                        .ok()
                        .filter(|&n| n > 0)
                        .ok_or_else(|| format!("platform property {name}={value:?}: expected a positive number"))?;
                    s.processes = Some(n);
                }
                container::PROPERTY => s.container_image = Some(container::ImageRef::parse(value)?),
                platform::CHROOT => {
                    if value != platform::CHROOT_INPUT_ROOT {
                        return Err(format!(
                            "platform property {name}={value:?}: the only value is {:?}",
                            platform::CHROOT_INPUT_ROOT
                        ));
                    }
                    s.chroot = true;
                }
                _ => {}
            }
        }
        if s.chroot && s.container_image.is_some() {
            return Err(format!(
                "platform properties {}={} and {}: an action runs either in a container image or with its \
                 input root as /, not both",
                platform::CHROOT,
                platform::CHROOT_INPUT_ROOT,
                container::PROPERTY
            ));
        }
        Ok(s)
    }
}

/// The error of a run asking `chroot=input-root` on a worker that does not
/// offer it.
fn chroot_not_offered() -> std::io::Error {
    RunFailure {
        code: tonic::Code::FailedPrecondition,
        message: format!(
            "the action asks for {}={} and this worker does not run actions with the input root as / \
             ([worker] input_root_as_root)",
            platform::CHROOT,
            platform::CHROOT_INPUT_ROOT
        ),
    }
    .into_io()
}

/// `[worker] sandbox`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxMode {
    /// Namespaces; the worker refuses to start where they do not work.
    #[default]
    Auto,
    /// Namespaces, required.
    Namespaces,
    /// Plain processes: the worker's user, network and filesystem. Only for
    /// trusted actions.
    None,
}

/// The worker's sandbox configuration (`[worker] sandbox`, `run_as`,
/// `allow_network`, `max_memory`, `max_processes`, `hide`).
#[derive(Debug, Clone, Default)]
pub struct SandboxConfig {
    pub mode: SandboxMode,
    /// User name, `uid` or `uid:gid`; for a worker running as root.
    pub run_as: Option<String>,
    pub allow_network: bool,
    pub limits: Limits,
    /// More paths hidden from actions (e.g. TLS keys, token files).
    pub hide: Vec<PathBuf>,
    /// `[worker] docker`: actions naming a `container-image` run in
    /// containers of it (see [`container`]).
    pub container: Option<ContainerConfig>,
    /// `[worker] input_root_as_root`: the sandbox offers `chroot=input-root`
    /// and runs actions asking for it with their input root as `/`.
    pub input_root_as_root: bool,
}

/// The worker's maxima: an action's own limit is capped by them, and an
/// action without one gets them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub max_memory: Option<u64>,
    pub max_processes: Option<u64>,
}

impl Limits {
    /// (memory, processes) for an action.
    fn apply(&self, s: &Settings) -> (Option<u64>, Option<u64>) {
        let cap = |asked: Option<u64>, max: Option<u64>| match (asked, max) {
            (Some(a), Some(m)) => Some(a.min(m)),
            (a, m) => a.or(m),
        };
        (cap(s.memory, self.max_memory), cap(s.processes, self.max_processes))
    }
}

/// The runner the configuration asks for. `hide`: what actions must not
/// see (the worker's work directory; the server's data directory for
/// built-in workers). With namespaces, the sandbox is tried once now (a
/// real action init in real namespaces, in `work_dir`); where it cannot
/// work this fails with the reason and how to go on: the worker does not
/// start rather than run untrusted actions unsandboxed. Blocking.
pub fn build(
    config: &SandboxConfig,
    init: Option<PathBuf>,
    mut hide: Vec<PathBuf>,
    work_dir: &Path,
) -> anyhow::Result<Arc<dyn Runner>> {
    let init = plain::check_init(init);
    if config.mode == SandboxMode::None {
        tracing::warn!(
            "[worker] sandbox = \"none\": actions run as this worker's user, with its network and its files \
             (the blob cache included); only for trusted actions"
        );
        anyhow::ensure!(config.run_as.is_none(), "[worker] run_as needs a sandbox (it is \"none\")");
        anyhow::ensure!(
            !config.input_root_as_root,
            "[worker] input_root_as_root needs the sandbox (it is \"none\"): a plain process cannot have its \
             input root as /"
        );
        return Ok(Arc::new(PlainRunner::new(init, config.limits)));
    }
    let Some(init) = init else {
        anyhow::bail!(
            "the sandbox needs the action init ([worker] action_init); set [worker] sandbox = \"none\" to run \
             trusted actions without one"
        )
    };
    hide.extend(config.hide.iter().cloned());
    let hide: Vec<PathBuf> = hide.into_iter().filter_map(|p| std::fs::canonicalize(&p).ok().or(Some(p))).collect();
    let runner = SandboxRunner::new(init, hide.clone(), config)?;
    if let Some(owner) = runner.file_policy().action_owner {
        // The sandbox mounts a tmpfs over /tmp, /dev/shm and each hidden
        // directory, and re-creates the action's directory inside (root's,
        // 0755): only the directories above the outermost of those that
        // holds the work directory are the host's own.
        let covers = [PathBuf::from("/tmp"), PathBuf::from("/dev/shm")].into_iter().chain(hide);
        reachable_by(work_dir, covers, owner)?;
    }
    runner.probe(work_dir).map_err(|e| {
        anyhow::anyhow!(
            "the action sandbox does not work on this machine: {e}. It needs Linux namespaces: run the worker \
             as root, or allow unprivileged user namespaces (sysctl user.max_user_namespaces > 0, \
             kernel.apparmor_restrict_unprivileged_userns=0); in a container, grant CAP_SYS_ADMIN with \
             seccomp and AppArmor unconfined. Or set [worker] sandbox = \"none\" to run trusted actions \
             without a sandbox"
        )
    })?;
    tracing::info!(sandbox = %runner.describe(), "actions run in a sandbox");
    Ok(Arc::new(runner))
}

/// The runner of a worker named `worker`: [`build`]'s, wrapped by the
/// container runner when `[worker] docker` is on (the engine must answer).
pub async fn start(
    config: &SandboxConfig,
    init: Option<PathBuf>,
    hide: Vec<PathBuf>,
    work_dir: &Path,
    worker: &str,
) -> anyhow::Result<Arc<dyn Runner>> {
    let mut hide = hide;
    // Registry passwords: an action running as the worker's uid must not
    // read them.
    if let Some(containers) = &config.container {
        let credentials = container::credentials::Credentials::new(containers.credentials.clone());
        hide.extend(credentials.path().map(Path::to_path_buf));
    }
    let (c, dir) = (config.clone(), work_dir.to_path_buf());
    let host = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dir)?;
        build(&c, init, hide, &dir)
    })
    .await??;
    match &config.container {
        None => Ok(host),
        Some(containers) => Ok(Arc::new(ContainerRunner::start(host, config, containers, worker, work_dir).await?)),
    }
}

/// Fails, naming the directory and what to change, when the uid/gid
/// `owner` (the actions' user) cannot enter a host directory on the way to
/// `work_dir`, under which each action's directory is: every ancestor of
/// the outermost of `covers` (directories the sandbox replaces with a fresh
/// tmpfs) that holds `work_dir`, or of `work_dir` itself. (Without this
/// check the probe fails with a bare "Permission denied".)
fn reachable_by(
    work_dir: &Path,
    covers: impl IntoIterator<Item = PathBuf>,
    (uid, gid): (u32, u32),
) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let full = std::fs::canonicalize(work_dir).unwrap_or_else(|_| work_dir.to_path_buf());
    let covered = covers.into_iter().filter(|c| full.starts_with(c)).min_by_key(|c| c.components().count());
    let host_part = covered.as_deref().and_then(Path::parent).unwrap_or(&full);
    for dir in host_part.ancestors().collect::<Vec<_>>().into_iter().rev() {
        let Ok(m) = std::fs::metadata(dir) else { continue };
        let mode = m.mode();
        let enters = mode & 0o001 != 0
            || (m.uid() == uid && mode & 0o100 != 0)
            || (m.gid() == gid && m.uid() != uid && mode & 0o010 != 0);
        if !enters {
            anyhow::bail!(
                "actions run as {uid}:{gid} ([worker] run_as), and that user cannot enter {} (mode {:04o}, owner \
                 {}:{}) on the way to the work directory {}: allow it (chmod o+x {}), or set [worker] work_dir \
                 (--work-dir) to a directory it can reach",
                dir.display(),
                mode & 0o7777,
                m.uid(),
                m.gid(),
                full.display(),
                dir.display()
            );
        }
    }
    Ok(())
}

/// Resolves `[worker] run_as`: a user name, a uid (its passwd group, or
/// the same number) or `uid:gid`.
pub fn resolve_user(spec: &str) -> anyhow::Result<(u32, u32)> {
    if let Some((u, g)) = spec.split_once(':') {
        let uid = u.parse().map_err(|_| anyhow::anyhow!("[worker] run_as {spec:?}: {u:?} is not a uid"))?;
        let gid = g.parse().map_err(|_| anyhow::anyhow!("[worker] run_as {spec:?}: {g:?} is not a gid"))?;
        return Ok((uid, gid));
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let entry = passwd.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        Some((f.first()?.to_string(), f.get(2)?.parse::<u32>().ok()?, f.get(3)?.parse::<u32>().ok()?))
    });
    let entries: Vec<(String, u32, u32)> = entry.collect();
    if let Ok(uid) = spec.parse::<u32>() {
        let gid = entries.iter().find(|(_, u, _)| *u == uid).map_or(uid, |(_, _, g)| *g);
        return Ok((uid, gid));
    }
    entries
        .iter()
        .find(|(n, _, _)| n == spec)
        .map(|(_, u, g)| (*u, *g))
        .ok_or_else(|| anyhow::anyhow!("[worker] run_as {spec:?}: no such user in /etc/passwd"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn settings_come_from_the_platform() {
        let s = Settings::from_platform(&pairs(&[
            ("network", "on"),
            ("memory_limit", "2GiB"),
            ("process_limit", "64"),
            ("OSFamily", "linux"),
        ]))
        .unwrap();
        assert_eq!(
            s,
            Settings {
                network: true,
                memory: Some(2 << 30),
                processes: Some(64),
                container_image: None,
                chroot: false
            }
        );
        assert!(Settings::from_platform(&pairs(&[("chroot", "input-root")])).unwrap().chroot);
        let image = Settings::from_platform(&pairs(&[("container-image", "docker://busybox")])).unwrap();
        assert_eq!(image.container_image.unwrap().as_str(), "busybox:latest");
        assert_eq!(Settings::from_platform(&[]).unwrap(), Settings::default());
        for bad in [
            ("network", "yes"),
            ("memory_limit", "lots"),
            ("process_limit", "0"),
            ("container-image", "x y"),
            ("chroot", "host"),
            ("chroot", ""),
        ] {
            let e = Settings::from_platform(&pairs(&[bad])).unwrap_err();
            assert!(e.contains(bad.0), "{e}");
        }
        let both =
            Settings::from_platform(&pairs(&[("chroot", "input-root"), ("container-image", "docker://busybox")]));
        assert!(both.unwrap_err().contains("not both"));
    }

    #[test]
    fn worker_maxima_cap_and_default() {
        let l = Limits { max_memory: Some(100), max_processes: None };
        let asked = Settings { memory: Some(500), processes: Some(7), ..Default::default() };
        assert_eq!(l.apply(&asked), (Some(100), Some(7)));
        assert_eq!(l.apply(&Settings::default()), (Some(100), None));
        assert_eq!(Limits::default().apply(&Settings { memory: Some(5), ..Default::default() }), (Some(5), None));
    }

    #[test]
    fn the_work_dir_must_be_reachable_by_the_action_user() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let closed = dir.path().join("closed");
        let work = closed.join("worker");
        std::fs::create_dir_all(&work).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o750)).unwrap();
        // SAFETY: getuid cannot fail.
        let me = unsafe { (libc::getuid(), libc::getgid()) };
        let nobody = (65534, 65534);
        assert!(reachable_by(&work, [], me).is_ok());
        let e = reachable_by(&work, [], nobody).unwrap_err().to_string();
        assert!(e.contains(&format!("cannot enter {}", closed.display())) && e.contains("0750"), "{e}");
        // The sandbox replaces a hidden work directory (or /tmp) with a
        // tmpfs and re-creates the path inside: only what is above counts.
        assert!(reachable_by(&work, [dir.path().to_path_buf()], nobody).is_ok());
        assert!(reachable_by(&work, [closed.clone()], nobody).is_ok());
        assert!(reachable_by(&work, [work.clone()], nobody).is_err());
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o751)).unwrap();
        assert!(reachable_by(&work, [], nobody).is_ok());
    }

    #[test]
    fn the_plain_runner_refuses_the_input_root_as_root() {
        let work = tempfile::tempdir().unwrap();
        let config = SandboxConfig { mode: SandboxMode::None, input_root_as_root: true, ..Default::default() };
        let e = build(&config, None, Vec::new(), work.path()).err().expect("refused").to_string();
        assert!(e.contains("input_root_as_root") && e.contains("sandbox"), "{e}");
    }

    #[test]
    fn users_resolve() {
        assert_eq!(resolve_user("12:34").unwrap(), (12, 34));
        assert_eq!(resolve_user("root").unwrap(), (0, 0));
        assert_eq!(resolve_user("0").unwrap(), (0, 0));
        assert!(resolve_user("no-such-user-here").is_err());
        assert!(resolve_user("x:1").is_err());
    }
}
