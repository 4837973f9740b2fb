//! The sandboxed runner: each command under the action init in its own
//! Linux namespaces (see [`crate::worker::action_init`] for what the init
//! sets up). A root worker runs commands as `[worker] run_as` (default
//! `nobody`); an unprivileged one in a user namespace as its own uid.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::chroot::MountPoints;
use super::plain::{resolve_program, run_supervised};
use super::{Ending, Limits, Runner, SandboxConfig, Spec, resolve_user};
use crate::execution::platform;
use crate::worker::action_init::{self, Chroot, Options, Sandbox};
use crate::worker::isolation::FilePolicy;

/// The uid and gid of `nobody`, when /etc/passwd has none.
const NOBODY: (u32, u32) = (65534, 65534);

pub struct SandboxRunner {
    init: PathBuf,
    hide: Vec<PathBuf>,
    /// Not root: a user namespace; commands run as the worker's uid.
    user_namespace: bool,
    run_as: Option<(u32, u32)>,
    allow_network: bool,
    limits: Limits,
    /// `[worker] input_root_as_root`: actions asking `chroot=input-root`
    /// run with their input root as `/`.
    input_root_as_root: bool,
}

impl SandboxRunner {
    pub(super) fn new(init: PathBuf, hide: Vec<PathBuf>, config: &SandboxConfig) -> anyhow::Result<Self> {
        // SAFETY: geteuid cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let run_as = match (&config.run_as, root) {
            (Some(spec), true) => Some(resolve_user(spec)?),
            (None, true) => Some(resolve_user("nobody").unwrap_or(NOBODY)),
            (Some(_), false) => anyhow::bail!("[worker] run_as needs a worker started as root"),
            (None, false) => None,
        };
        if run_as.is_some_and(|(u, _)| u == 0) {
            anyhow::bail!("[worker] run_as must not be root: a root command can undo its sandbox");
        }
        Ok(SandboxRunner {
            init,
            hide,
            user_namespace: !root,
            run_as,
            allow_network: config.allow_network,
            limits: config.limits,
            input_root_as_root: config.input_root_as_root,
        })
    }

    fn options(&self, writable: &Path, network: bool, memory: Option<u64>, processes: Option<u64>) -> Options {
        Options {
            sandbox: Some(Sandbox {
                user_namespace: self.user_namespace,
                network,
                hide: self.hide.clone(),
                writable: writable.to_path_buf(),
                run_as: self.run_as,
                chroot: None,
            }),
            memory,
            processes,
            probe: false,
        }
    }

    /// Runs a command in a full sandbox (namespaces, mounts, run_as) in a
    /// directory under `work_dir`; Err says why not. The command is
    /// `/bin/sh -c "exit 0"`, or the init itself (`--probe`) on a system
    /// without a shell: not the init always, because an init installed
    /// under `/tmp` or a hidden path is not visible inside the sandbox
    /// (it runs fine: the worker starts it from outside). With
    /// `input_root_as_root`, the chroot is set up too, in an empty root
    /// (the init's probe: set up, then exit 0 without running anything).
    pub(super) fn probe(&self, work_dir: &Path) -> anyhow::Result<()> {
        let dir = work_dir.join("sandbox-probe");
        let options = self.options(&dir, false, None, None);
        let shell = Path::new("/bin/sh");
        let (program, args) = if shell.is_file() {
            (shell.as_os_str(), vec!["-c".to_string(), "exit 0".to_string()])
        } else {
            (self.init.as_os_str(), vec![action_init::SUBCOMMAND.to_string(), "--probe".to_string()])
        };
        self.probe_in(&dir, options, program, &args, |_| Ok(None))?;
        if self.input_root_as_root {
            let mut options = self.options(&dir, false, None, None);
            options.probe = true;
            self.probe_in(&dir, options, "true".as_ref(), &[], |dir| {
                let points = MountPoints::make(dir)?;
                Ok(Some(points))
            })
            .map_err(|e| anyhow::anyhow!("with the input root as / ([worker] input_root_as_root): {e}"))?;
        }
        Ok(())
    }

    /// One probe run in a fresh `dir`; `prepare` readies it (and says
    /// whether the run is a chroot).
    fn probe_in(
        &self,
        dir: &Path,
        mut options: Options,
        program: &std::ffi::OsStr,
        args: &[String],
        prepare: impl FnOnce(&Path) -> std::io::Result<Option<MountPoints>>,
    ) -> anyhow::Result<()> {
        use std::io::Read;
        let _ = crate::fsutil::remove_tree(dir);
        std::fs::create_dir_all(dir)?;
        let points = prepare(dir)?;
        if let (Some(sandbox), Some(p)) = (options.sandbox.as_mut(), &points) {
            sandbox.chroot = Some(Chroot { tmp: p.tmp });
        }
        let (mut ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let mut child = std::process::Command::new(&self.init)
            .arg(action_init::SUBCOMMAND)
            .args(action_init::arguments(&options, &[], program, args))
            .env_clear()
            .current_dir(dir)
            .stdin(std::os::fd::OwnedFd::from(theirs))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting the action init {}: {e}", self.init.display()))?;
        ours.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut line = Vec::new();
        let _ = ours.read_to_end(&mut line);
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        let status = child.wait()?;
        drop(points);
        let _ = crate::fsutil::remove_tree(dir);
        let line = String::from_utf8_lossy(&line);
        if !line.starts_with("ok") {
            let why = line.trim().strip_prefix("err ").map(|s| s.split_once(' ').map_or(s, |(_, m)| m));
            anyhow::bail!("{}", why.map(str::to_string).unwrap_or_else(|| format!("{status}: {}", stderr.trim())));
        }
        anyhow::ensure!(status.success(), "the probe exited with {status}: {}", stderr.trim());
        Ok(())
    }
}

#[async_trait::async_trait]
impl Runner for SandboxRunner {
    fn describe(&self) -> String {
        let mut namespaces = vec!["pid", "mount", "net", "ipc", "uts"];
        if self.user_namespace {
            namespaces.push("user");
        }
        let mut d = format!("namespaces({})", namespaces.join(","));
        match self.run_as {
            Some((u, g)) => d.push_str(&format!(" run_as={u}:{g}")),
            // SAFETY: getuid cannot fail.
            None => d.push_str(&format!(" run_as={}", unsafe { libc::getuid() })),
        }
        if self.allow_network {
            d.push_str(" network=allowed");
        }
        if self.input_root_as_root {
            d.push_str(&format!(" {}={}", platform::CHROOT, platform::CHROOT_INPUT_ROOT));
        }
        d
    }

    fn properties(&self) -> Vec<(String, String)> {
        match self.input_root_as_root {
            true => vec![(platform::CHROOT.into(), platform::CHROOT_INPUT_ROOT.into())],
            false => Vec::new(),
        }
    }

    fn file_policy(&self) -> FilePolicy {
        match self.run_as {
            // The command's uid owns nothing of the cache: links are safe.
            Some(owner) => FilePolicy { action_owner: Some(owner), copy_inputs: false },
            // The command's uid is the cache's owner: it gets copies.
            None => FilePolicy { action_owner: None, copy_inputs: true },
        }
    }

    fn network(&self) -> bool {
        self.allow_network
    }

    async fn run(&self, spec: Spec<'_>, cancel: &CancellationToken) -> std::io::Result<Ending> {
        if spec.settings.network && !self.allow_network {
            // The scheduler does not assign such actions here (the worker
            // offers no network=on); this is the backstop.
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "the action asks for network=on and this worker does not allow it ([worker] allow_network)",
            ));
        }
        let (memory, processes) = self.limits.apply(spec.settings);
        let mut options = self.options(spec.action_dir, spec.settings.network, memory, processes);
        if !spec.settings.chroot {
            let program = resolve_program(&spec.arguments[0], spec.environment, spec.working_dir)?;
            return run_supervised(&self.init, &program, &options, &spec, cancel).await;
        }
        if !self.input_root_as_root {
            // The backstop, as for the network: such an action is only
            // assigned to workers offering chroot=input-root.
            return Err(super::chroot_not_offered());
        }
        // The program is looked up inside the new root, by the command's
        // own PATH, from its working directory (by the init's exec).
        let points = MountPoints::make(spec.action_dir)?;
        let sandbox = options.sandbox.as_mut().expect("a sandbox");
        sandbox.chroot = Some(Chroot { tmp: points.tmp });
        // Nothing of the host is visible: there is nothing to hide.
        sandbox.hide.clear();
        let program = Path::new(&spec.arguments[0]);
        let ending = run_supervised(&self.init, program, &options, &spec, cancel).await;
        drop(points);
        ending.map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => std::io::Error::new(e.kind(), format!("{e} (inside the input root)")),
            _ => e,
        })
    }
}
