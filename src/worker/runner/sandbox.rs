//! The sandboxed runner: each command under the action init in its own
//! Linux namespaces (see [`crate::worker::action_init`] for what the init
//! sets up). A root worker runs commands as `[worker] run_as` (default
//! `nobody`); an unprivileged one in a user namespace as its own uid.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::plain::{resolve_program, run_supervised};
use super::{Ending, Limits, Runner, SandboxConfig, Spec, resolve_user};
use crate::worker::action_init::{self, Options, Sandbox};
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
    /// (it runs fine: the worker starts it from outside).
    pub(super) fn probe(&self, work_dir: &Path) -> anyhow::Result<()> {
        use std::io::Read;
        let dir = work_dir.join("sandbox-probe");
        let _ = crate::fsutil::remove_tree(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut options = self.options(&dir, false, None, None);
        options.probe = false;
        let shell = Path::new("/bin/sh");
        let (program, args) = if shell.is_file() {
            (shell.as_os_str(), vec!["-c".to_string(), "exit 0".to_string()])
        } else {
            (self.init.as_os_str(), vec![action_init::SUBCOMMAND.to_string(), "--probe".to_string()])
        };
        let (mut ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let mut child = std::process::Command::new(&self.init)
            .arg(action_init::SUBCOMMAND)
            .args(action_init::arguments(&options, &[], program, &args))
            .env_clear()
            .current_dir(&dir)
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
        let _ = crate::fsutil::remove_tree(&dir);
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
        d
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
        let program = resolve_program(&spec.arguments[0], spec.environment, spec.working_dir)?;
        let (memory, processes) = self.limits.apply(spec.settings);
        let options = self.options(spec.action_dir, spec.settings.network, memory, processes);
        run_supervised(&self.init, &program, &options, &spec, cancel).await
    }
}
