//! Running an action's command: exactly its environment, its working
//! directory, its own process group (so a timeout or a cancel kills every
//! process it started), output to files.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Exit code; 128 + N for a process killed by signal N, as shells report.
    Exited(i32),
    TimedOut,
    Cancelled,
}

pub struct Spec<'a> {
    pub arguments: &'a [String],
    pub environment: &'a [(String, String)],
    pub working_dir: &'a Path,
    pub stdout: &'a Path,
    pub stderr: &'a Path,
    pub timeout: Duration,
}

/// Runs the command to its end, its timeout or `cancel`, then kills whatever
/// is left of its process group.
pub async fn run(spec: Spec<'_>, cancel: &CancellationToken) -> std::io::Result<Ending> {
    let program = resolve_program(&spec.arguments[0], spec.environment, spec.working_dir)?;
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
        status = child.wait() => {
            let status = status?;
            use std::os::unix::process::ExitStatusExt;
            Ending::Exited(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
        }
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

/// The program to execute. A name without a slash is looked up in the
/// action's own PATH (not the worker's; a PATH entry that is relative is
/// relative to the working directory); a relative path with a slash is
/// relative to the working directory.
fn resolve_program(arg0: &str, env: &[(String, String)], working_dir: &Path) -> std::io::Result<PathBuf> {
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

fn is_executable(path: &Path) -> bool {
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
