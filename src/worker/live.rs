//! What a worker gives out of an action while it runs: its stdout and
//! stderr as they grow, and the current content of a declared output.
//!
//! Every runner (plain process, sandbox, container) has the command write
//! straight into the action's `stdout` and `stderr` files, so the worker
//! follows those files, whichever runner ran the command: a poll every
//! [`TAIL_INTERVAL`] sends what was added since, at most [`BATCH`] bytes of
//! each stream per message, so a chatty action costs one message per
//! interval, not one per write. The files stay the truth: the result's
//! `stdout_digest`/`stderr_digest` are taken from them as before.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use remote_apis::{Digest, DigestFunction, InstanceName};
use tokio_util::sync::CancellationToken;

use super::cas::ExecCas;
use crate::error::{Error, Result};

/// How often a running action's output files are read.
pub const TAIL_INTERVAL: Duration = Duration::from_millis(50);
/// Most bytes of one stream in one batch.
pub const BATCH: usize = 64 * 1024;

/// Where a running action's output goes as it is written: the scheduler's
/// log streams for a built-in worker, `Output` messages of the worker
/// protocol for a remote one. The executor does not know which.
pub trait OutputSink: Send + Sync {
    /// New bytes of stdout and stderr (either may be empty, not both).
    fn output(&self, stdout: Bytes, stderr: Bytes);
}

/// A sink that drops everything (tests, callers without live output).
pub struct NoOutput;

impl OutputSink for NoOutput {
    fn output(&self, _: Bytes, _: Bytes) {}
}

/// One followed file.
struct Tail {
    path: PathBuf,
    file: Option<std::fs::File>,
    pos: u64,
}

impl Tail {
    fn new(path: &Path) -> Tail {
        Tail { path: path.to_path_buf(), file: None, pos: 0 }
    }

    /// Up to `max` bytes added since the last read (none until the runner
    /// has created the file).
    fn read_new(&mut self, max: usize) -> Bytes {
        if self.file.is_none() {
            self.file = std::fs::File::open(&self.path).ok();
        }
        let Some(file) = &self.file else { return Bytes::new() };
        let mut buf = vec![0; max];
        let mut filled = 0;
        while filled < max {
            match file.read_at(&mut buf[filled..], self.pos + filled as u64) {
                Ok(0) | Err(_) => break,
                Ok(n) => filled += n,
            }
        }
        buf.truncate(filled);
        self.pos += filled as u64;
        Bytes::from(buf)
    }
}

/// Sends what is new in both files; true when a stream filled its batch
/// (more may be waiting).
fn drain_once(tails: &mut [Tail; 2], sink: &dyn OutputSink) -> bool {
    let out = tails[0].read_new(BATCH);
    let err = tails[1].read_new(BATCH);
    let full = out.len() == BATCH || err.len() == BATCH;
    if !out.is_empty() || !err.is_empty() {
        sink.output(out, err);
    }
    full
}

/// Follows `stdout` and `stderr` into `sink` until `done`, then sends the
/// rest: when this returns, the sink has had every byte of both files.
pub async fn follow(stdout: &Path, stderr: &Path, sink: &dyn OutputSink, done: &CancellationToken) {
    let mut tails = [Tail::new(stdout), Tail::new(stderr)];
    let mut tick = tokio::time::interval(TAIL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let finished = tokio::select! {
            _ = tick.tick() => false,
            () = done.cancelled() => true,
        };
        // Reads of files the kernel just wrote: short, from the page cache.
        while drain_once(&mut tails, sink) {}
        if finished {
            return;
        }
    }
}

/// A running action's directories, for reads of its declared outputs.
#[derive(Debug, Clone)]
pub(super) struct RunningAction {
    pub instance: InstanceName,
    pub function: DigestFunction,
    /// The action's directory (the worker's own; `root` is inside).
    pub dir: PathBuf,
    pub root: PathBuf,
    /// The Command's working directory, relative to `root`.
    pub working_directory: String,
    pub declared: Vec<String>,
}

/// Uploads the current content of `path` (a declared output of `action`)
/// to the CAS and returns its digest. The file is copied first, into the
/// action's directory, so what is hashed is what is uploaded even while
/// the command goes on writing.
pub(super) async fn upload_output(cas: &dyn ExecCas, action: &RunningAction, path: &str) -> Result<Digest> {
    if !action.declared.iter().any(|p| p == path) {
        return Err(Error::bad_field(
            "path",
            format!("{} is not one of the action's declared outputs", remote_apis::quote(path)),
        ));
    }
    let (a, p) = (action.clone(), path.to_string());
    let copy =
        tokio::task::spawn_blocking(move || snapshot(&a, &p)).await.map_err(|e| Error::internal(e.to_string()))??;
    let uploaded = async {
        let digest = {
            let (f, c) = (action.function, copy.clone());
            tokio::task::spawn_blocking(move || remote_apis::merkle::hash_file_blocking(f, &c))
                .await
                .map_err(|e| Error::internal(e.to_string()))?
                .map_err(|e| Error::io(copy.display(), e))?
        };
        if !cas.find_missing(&action.instance, &[digest]).await?.is_empty() {
            cas.put_file(&action.instance, &digest, &copy).await?;
        }
        Ok(digest)
    }
    .await;
    let _ = tokio::fs::remove_file(&copy).await;
    uploaded
}

/// Copies the output file to a private file beside the action's root.
/// NOT_FOUND while it does not exist; FAILED_PRECONDITION for what is not a
/// regular file, or is reached through a symlink (the command could point
/// one at the worker's own files): every component is opened beneath the
/// root without following symlinks.
fn snapshot(action: &RunningAction, path: &str) -> Result<PathBuf> {
    let parts = remote_apis::merkle::resolve_output_path(&action.working_directory, path)
        .map_err(|e| Error::invalid(format!("output path: {}", e.0)))?;
    let refused = || {
        Error::new(
            tonic::Code::FailedPrecondition,
            format!("{} is not a regular file reached without symlinks", remote_apis::quote(path)),
        )
    };
    let mut source = match open_beneath(&action.root, &parts) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::not_found(format!(
                "the running action has not written {} yet",
                remote_apis::quote(path)
            )));
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => return Err(refused()),
        Err(e) => return Err(Error::io(format!("output {}", remote_apis::quote(path)), e)),
    };
    if !source.metadata().map_err(|e| Error::io(path, e))?.is_file() {
        return Err(refused());
    }
    let copy = action.dir.join(format!("peek-{}", uuid::Uuid::new_v4().simple()));
    let copied = std::fs::File::create(&copy).and_then(|mut target| std::io::copy(&mut source, &mut target));
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&copy);
        return Err(Error::io(copy.display(), e));
    }
    Ok(copy)
}

/// Opens `root/parts...` for reading, one component at a time, following
/// no symlink.
fn open_beneath(root: &Path, parts: &[&str]) -> std::io::Result<std::fs::File> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let mut at = std::fs::File::open(root)?;
    let Some((last, parents)) = parts.split_last() else { return Err(std::io::Error::from_raw_os_error(libc::EISDIR)) };
    let open = |dir: &std::fs::File, name: &str, flags: libc::c_int| -> std::io::Result<std::fs::File> {
        let name = std::ffi::CString::new(name).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: openat on a descriptor we own with a NUL-terminated name;
        // the returned descriptor is owned by the File.
        let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags | libc::O_NOFOLLOW | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        Ok(unsafe { std::fs::File::from_raw_fd(fd) })
    };
    for part in parents {
        at = open(&at, part, libc::O_RDONLY | libc::O_DIRECTORY)?;
    }
    open(&at, last, libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    #[derive(Default)]
    struct Collect(Mutex<(Vec<u8>, Vec<u8>, usize)>);

    impl OutputSink for Collect {
        fn output(&self, stdout: Bytes, stderr: Bytes) {
            let mut c = self.0.lock();
            c.0.extend_from_slice(&stdout);
            c.1.extend_from_slice(&stderr);
            c.2 += 1;
        }
    }

    #[tokio::test]
    async fn follow_sends_every_byte_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
        let sink = Collect::default();
        let done = CancellationToken::new();
        let big = vec![b'x'; 3 * BATCH + 7];
        let writing = async {
            tokio::time::sleep(TAIL_INTERVAL).await;
            std::fs::write(&out, b"one\n").unwrap();
            std::fs::write(&err, &big).unwrap();
            tokio::time::sleep(TAIL_INTERVAL * 3).await;
            let mut f = std::fs::OpenOptions::new().append(true).open(&out).unwrap();
            std::io::Write::write_all(&mut f, b"two\n").unwrap();
            done.cancel();
        };
        tokio::join!(follow(&out, &err, &sink, &done), writing);
        let c = sink.0.lock();
        assert_eq!(c.0, b"one\ntwo\n");
        assert_eq!(c.1, big);
        // Batched: a handful of messages, not one per write or per byte.
        assert!(c.2 >= 4 && c.2 <= 8, "{} messages", c.2);
    }

    #[test]
    fn a_running_output_is_copied_but_never_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let (root, outside) = (dir.path().join("root"), dir.path().join("outside"));
        std::fs::create_dir_all(root.join("work/out")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"worker's own").unwrap();
        std::fs::write(root.join("work/out/lib.rmeta"), b"meta").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("work/link")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), root.join("work/file-link")).unwrap();
        let action = RunningAction {
            instance: InstanceName::default(),
            function: DigestFunction::Sha256,
            dir: dir.path().to_path_buf(),
            root,
            working_directory: "work".into(),
            declared: Vec::new(),
        };
        let copy = snapshot(&action, "out/lib.rmeta").unwrap();
        assert_eq!(std::fs::read(&copy).unwrap(), b"meta");
        assert_eq!(snapshot(&action, "out/absent").unwrap_err().code, tonic::Code::NotFound);
        for through in ["link/secret", "file-link", "out"] {
            let e = snapshot(&action, through).unwrap_err();
            assert_eq!(e.code, tonic::Code::FailedPrecondition, "{through}: {}", e.message);
        }
    }
}
