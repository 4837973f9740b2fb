//! The plain runner: the command as the worker's user, on the host, in its
//! own process group, under the action init (see
//! [`crate::worker::action_init`]) when the worker has one, so that no
//! descendant survives the action's end, timeout or cancel, or the worker.
//! Nothing keeps the command from the worker's files or network: only for
//! trusted actions (`[worker] sandbox = "none"`). The sandboxed runner
//! shares the supervised run ([`run_supervised`]).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Ending, Limits, Runner, Spec};
use crate::worker::action_init::{self, Options};
use crate::worker::isolation::FilePolicy;

pub struct PlainRunner {
    /// The action init; None runs commands directly (a descendant that
    /// leaves its process group survives).
    init: Option<PathBuf>,
    limits: Limits,
}

impl PlainRunner {
    /// `init` as [`check_init`] returned it.
    pub fn new(init: Option<PathBuf>, limits: Limits) -> Self {
        PlainRunner { init, limits }
    }
}

#[async_trait::async_trait]
impl Runner for PlainRunner {
    fn describe(&self) -> String {
        if self.init.is_some() { "none".into() } else { "none (no action init)".into() }
    }

    fn file_policy(&self) -> FilePolicy {
        // Unsafe for untrusted actions: the command is the cache's owner.
        FilePolicy { action_owner: None, copy_inputs: false }
    }

    fn network(&self) -> bool {
        true
    }

    async fn run(&self, spec: Spec<'_>, cancel: &CancellationToken) -> std::io::Result<Ending> {
        if spec.settings.chroot {
            // Never assigned here (no chroot=input-root offered): the backstop.
            return Err(super::chroot_not_offered());
        }
        let program = resolve_program(&spec.arguments[0], spec.environment, spec.working_dir)?;
        match &self.init {
            Some(init) => {
                let (memory, processes) = self.limits.apply(spec.settings);
                let options = Options { memory, processes, ..Default::default() };
                run_supervised(init, &program, &options, &spec, cancel).await
            }
            None => run_direct(program, &spec, cancel).await,
        }
    }
}

/// How long a stopped action init may take to kill the action's processes
/// before the worker kills it and the command's process group itself.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// The command as a child of the worker, in its own process group, which is
/// killed at the end.
async fn run_direct(program: PathBuf, spec: &Spec<'_>, cancel: &CancellationToken) -> std::io::Result<Ending> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&spec.arguments[1..])
        .env_clear()
        .envs(spec.environment.iter().map(|(k, v)| (k, v)))
        .current_dir(spec.working_dir)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(spec.stdout)?)
        .stderr(std::fs::File::create(spec.stderr)?)
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let pid = child.id().map(|p| p as i32);
    let ending = tokio::select! {
        status = child.wait() => Ending::Exited(exit_code(status?)),
        () = tokio::time::sleep(spec.timeout) => Ending::TimedOut,
        () = cancel.cancelled() => Ending::Cancelled,
    };
    if let Some(pid) = pid {
        // The whole group: shells, test runners and their background children.
        // SAFETY: killpg has no memory-safety preconditions.
        unsafe {
            libc::killpg(pid, libc::SIGKILL);
        }
    }
    let _ = child.wait().await;
    Ok(ending)
}

/// The command under the action init. The init's standard input is one end
/// of a socket pair; the worker keeps the other, so closing it (or the
/// worker dying) tells the init to kill everything and exit.
pub(super) async fn run_supervised(
    init: &Path,
    program: &Path,
    options: &Options,
    spec: &Spec<'_>,
    cancel: &CancellationToken,
) -> std::io::Result<Ending> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    ours.set_nonblocking(true)?;
    let mut line = tokio::net::UnixStream::from_std(ours)?;
    let mut cmd = tokio::process::Command::new(init);
    cmd.arg(action_init::SUBCOMMAND)
        .args(action_init::arguments(options, spec.environment, program.as_os_str(), &spec.arguments[1..]))
        .env_clear()
        .current_dir(spec.working_dir)
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .stdout(std::fs::File::create(spec.stdout)?)
        .stderr(std::fs::File::create(spec.stderr)?)
        .process_group(0);
    // No kill_on_drop: a SIGKILLed init cannot clean up. Should this future
    // be dropped, so is the line, and the init kills the action and exits.
    let mut child = cmd
        .spawn()
        .map_err(|e| std::io::Error::new(e.kind(), format!("starting the action init {}: {e}", init.display())))?;
    // Our copy of the init's end must go, or the line never reads EOF.
    drop(cmd);
    let init_pid = child.id().map(|p| p as i32);
    let step = tokio::select! {
        s = async {
            match started(&mut line).await {
                Ok(()) => Step::Exited(child.wait().await),
                Err(e) => Step::NotStarted(e),
            }
        } => s,
        () = tokio::time::sleep(spec.timeout) => Step::Stop(Ending::TimedOut),
        () = cancel.cancelled() => Step::Stop(Ending::Cancelled),
    };
    match step {
        Step::Exited(status) => Ok(Ending::Exited(exit_code(status?))),
        Step::NotStarted(e) => {
            let _ = child.wait().await;
            Err(e)
        }
        Step::Stop(ending) => {
            drop(line);
            if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_err() {
                tracing::warn!(pid = ?init_pid, "the action init did not stop in time; killing its processes");
                if let Some(pid) = init_pid {
                    kill_init_tree(pid);
                }
                let _ = child.wait().await;
            }
            Ok(ending)
        }
    }
}

enum Step {
    Exited(std::io::Result<std::process::ExitStatus>),
    NotStarted(std::io::Error),
    Stop(Ending),
}

/// Reads the init's first line: `ok`, or `err ERRNO MESSAGE` when the
/// command could not start (the same error a direct spawn would give).
async fn started(line: &mut tokio::net::UnixStream) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    while !buf.contains(&b'\n') && buf.len() < 4096 {
        let n = line.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    let text = text.lines().next().unwrap_or("");
    if text == "ok" {
        return Ok(());
    }
    let mut parts = text.strip_prefix("err ").unwrap_or("0 the action init exited early").splitn(2, ' ');
    let errno: i32 = parts.next().and_then(|e| e.parse().ok()).unwrap_or(0);
    let message = parts.next().unwrap_or("").to_string();
    Err(if errno > 0 { std::io::Error::from_raw_os_error(errno) } else { std::io::Error::other(message) })
}

/// The backstop when the init does not stop: its children's process
/// groups (the command's), its children, then the init itself. The init is
/// not reaped yet, so none of these pids can have been reused.
fn kill_init_tree(init: i32) {
    let children = std::fs::read_to_string(format!("/proc/{init}/task/{init}/children")).unwrap_or_default();
    for pid in children.split_ascii_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
        // SAFETY: kill and killpg have no memory-safety preconditions.
        unsafe {
            libc::killpg(pid, libc::SIGKILL);
            libc::kill(pid, libc::SIGKILL);
        }
    }
    // SAFETY: as above.
    unsafe { libc::killpg(init, libc::SIGKILL) };
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// The action init to use: `init` if it is an executable file. Logged once
/// (executors are made at startup) when there is none.
pub(super) fn check_init(init: Option<PathBuf>) -> Option<PathBuf> {
    match init {
        Some(p) if is_executable(&p) => Some(p),
        Some(p) => {
            tracing::warn!(
                action_init = %p.display(),
                "the action init is not an executable file; running commands directly: \
                 processes that leave an action's process group can outlive it"
            );
            None
        }
        None => {
            tracing::warn!(
                "no action init; running commands directly: processes that leave an action's process group \
                 can outlive it"
            );
            None
        }
    }
}

/// The program to execute. A name without a slash is looked up in the
/// action's own PATH (not the worker's; a PATH entry that is relative is
/// relative to the working directory); a relative path with a slash is
/// relative to the working directory.
pub(super) fn resolve_program(arg0: &str, env: &[(String, String)], working_dir: &Path) -> std::io::Result<PathBuf> {
    if arg0.contains('/') {
        return Ok(working_dir.join(arg0));
    }
    let path: OsString = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| OsString::from(v))
        .unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
    for dir in std::env::split_paths(&path) {
        let candidate = working_dir.join(dir).join(arg0);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("{arg0:?} is not found in the action's PATH ({})", path.to_string_lossy()),
    ))
}

pub(super) fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_resolve_against_the_action_not_the_worker() {
        let wd = Path::new("/tmp");
        assert_eq!(resolve_program("./x", &[], wd).unwrap(), PathBuf::from("/tmp/./x"));
        assert_eq!(resolve_program("/bin/sh", &[], wd).unwrap(), PathBuf::from("/bin/sh"));
        let env = vec![("PATH".to_string(), "/nonexistent:/bin".to_string())];
        assert_eq!(resolve_program("sh", &env, wd).unwrap(), PathBuf::from("/bin/sh"));
        let env = vec![("PATH".to_string(), "/nonexistent".to_string())];
        let err = resolve_program("sh", &env, wd).unwrap_err();
        assert!(err.to_string().contains("/nonexistent"), "{err}");
    }
}
