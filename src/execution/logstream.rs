//! Live stdout and stderr of the tasks running on this replica's workers
//! (REAPI LogStream, read through ByteStream).
//!
//! A task's two streams open when the scheduler hands the task to a worker
//! and take what the worker sends while the command runs (a built-in worker
//! appends directly, a remote one in `Output` messages of the worker
//! protocol). They are finalized when the task ends (finished, cancelled,
//! or its worker lost), stay readable for a grace period, then go: their
//! content is in the ActionResult (`stdout_digest`, `stderr_digest`).
//!
//! Invariants:
//! - memory is bounded: a stream keeps its last `window` bytes; a reader
//!   behind them gets OUT_OF_RANGE;
//! - only the worker that holds a task can write its streams;
//! - a stream lives on the replica that holds its worker's connection;
//!   nothing of it is in the shared scheduler state.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::BoxStream;
use parking_lot::Mutex;
use remote_apis::InstanceName;
use remote_apis::logstream::{StreamKind, StreamName};
use tokio::sync::watch;
use tonic::Code;

use crate::error::{Error, Result};

/// Most bytes one read message carries.
const READ_CHUNK: usize = 64 * 1024;

/// `[execution] log_stream_window` when unset.
pub const DEFAULT_WINDOW: u64 = 1 << 20;
/// `[execution] log_stream_grace` when unset.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(60);

/// The live streams of this replica, by task id.
pub struct LogStreams {
    window: usize,
    grace: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    sets: HashMap<String, Set>,
    /// Finalized sets, oldest first, for expiry.
    finalized: VecDeque<(Instant, String)>,
    /// The latest task of each operation with streams here.
    by_op: HashMap<String, String>,
}

/// One task's streams.
struct Set {
    instance: InstanceName,
    worker: u64,
    op: String,
    finalized: bool,
    stdout: Arc<Stream>,
    stderr: Arc<Stream>,
}

impl Set {
    fn stream(&self, kind: StreamKind) -> &Arc<Stream> {
        match kind {
            StreamKind::Stdout => &self.stdout,
            StreamKind::Stderr => &self.stderr,
        }
    }
}

/// One stream: its last bytes, and a signal for readers.
struct Stream {
    buf: Mutex<Window>,
    changed: watch::Sender<()>,
}

#[derive(Default)]
struct Window {
    data: VecDeque<u8>,
    /// Offset of `data[0]` in the whole stream.
    start: u64,
    finalized: bool,
}

impl Window {
    fn end(&self) -> u64 {
        self.start + self.data.len() as u64
    }
}

impl Stream {
    fn new() -> Arc<Stream> {
        Arc::new(Stream { buf: Mutex::default(), changed: watch::channel(()).0 })
    }

    fn append(&self, data: &[u8], window: usize) {
        {
            let mut w = self.buf.lock();
            if w.finalized {
                return;
            }
            w.data.extend(data);
            let over = w.data.len().saturating_sub(window);
            if over > 0 {
                w.data.drain(..over);
                w.start += over as u64;
            }
        }
        self.changed.send_replace(());
    }

    fn finalize(&self) {
        self.buf.lock().finalized = true;
        self.changed.send_replace(());
    }
}

impl LogStreams {
    /// Streams keep their last `window` bytes and stay readable for
    /// `grace` once finalized.
    pub fn new(window: u64, grace: Duration) -> Self {
        LogStreams { window: window.max(1) as usize, grace, inner: Mutex::default() }
    }

    /// Opens the streams of `task`, which `worker` runs for operation `op`.
    pub fn open(&self, task: &str, instance: &InstanceName, worker: u64, op: &str) {
        let mut inner = self.inner.lock();
        inner.expire(Instant::now(), self.grace);
        let set = Set {
            instance: instance.clone(),
            worker,
            op: op.to_string(),
            finalized: false,
            stdout: Stream::new(),
            stderr: Stream::new(),
        };
        inner.sets.insert(task.to_string(), set);
        inner.by_op.insert(op.to_string(), task.to_string());
    }

    /// Output of `task` from `worker`; ignored unless that worker holds
    /// the task and its streams are open.
    pub fn append(&self, worker: u64, task: &str, stdout: &[u8], stderr: &[u8]) {
        let streams = {
            let inner = self.inner.lock();
            match inner.sets.get(task) {
                Some(set) if set.worker == worker && !set.finalized => (set.stdout.clone(), set.stderr.clone()),
                _ => return,
            }
        };
        for (stream, data) in [(streams.0, stdout), (streams.1, stderr)] {
            if !data.is_empty() {
                stream.append(data, self.window);
            }
        }
    }

    /// The task ended: its readers get the rest and their streams end.
    pub fn finalize(&self, task: &str) {
        let mut inner = self.inner.lock();
        let now = Instant::now();
        if let Some(set) = inner.sets.get_mut(task).filter(|s| !s.finalized) {
            set.finalized = true;
            set.stdout.finalize();
            set.stderr.finalize();
            inner.finalized.push_back((now, task.to_string()));
        }
        inner.expire(now, self.grace);
    }

    /// Every task of a worker that is gone ends.
    pub fn finalize_worker(&self, worker: u64) {
        let tasks: Vec<String> = {
            let inner = self.inner.lock();
            inner.sets.iter().filter(|(_, s)| s.worker == worker && !s.finalized).map(|(t, _)| t.clone()).collect()
        };
        for task in tasks {
            self.finalize(&task);
        }
    }

    /// The task whose streams an operation announces: its latest one with
    /// streams here (also once the operation is done, for the grace period).
    pub fn task_of(&self, op: &str) -> Option<String> {
        self.inner.lock().by_op.get(op).cloned()
    }

    /// Reads `name` from `offset`: what exists, then what comes, until the
    /// stream is finalized or `limit` bytes were sent. `None` for a stream
    /// that is not here (or of another instance).
    pub fn read(
        &self,
        name: &StreamName,
        offset: u64,
        limit: Option<u64>,
    ) -> Result<Option<BoxStream<'static, Result<Bytes>>>> {
        let stream = {
            let mut inner = self.inner.lock();
            inner.expire(Instant::now(), self.grace);
            match inner.sets.get(&name.id).filter(|s| s.instance == name.instance) {
                Some(set) => set.stream(name.kind).clone(),
                None => return Ok(None),
            }
        };
        // Checked now too, so a bad offset fails the call, not the stream.
        stream.check(offset, self.window)?;
        let window = self.window;
        let rx = stream.changed.subscribe();
        let reader = Reader { stream, rx, offset, remaining: limit, window, done: false };
        Ok(Some(Box::pin(futures::stream::unfold(reader, Reader::next))))
    }
}

impl Inner {
    /// Drops sets finalized longer than `grace` ago.
    fn expire(&mut self, now: Instant, grace: Duration) {
        while let Some((at, _)) = self.finalized.front() {
            if now.duration_since(*at) < grace {
                break;
            }
            let Some((_, task)) = self.finalized.pop_front() else { break };
            if let Some(set) = self.sets.remove(&task)
                && self.by_op.get(&set.op) == Some(&task)
            {
                self.by_op.remove(&set.op);
            }
        }
    }
}

impl Stream {
    /// OUT_OF_RANGE for an offset this stream can never serve.
    fn check(&self, offset: u64, window: usize) -> Result<()> {
        let w = self.buf.lock();
        if offset < w.start {
            return Err(Error::new(
                Code::OutOfRange,
                format!(
                    "read_offset {offset} is behind the live window: this server keeps the last {window} bytes of a \
                     live stream (from offset {}); the whole output is in the ActionResult once the action ends",
                    w.start
                ),
            ));
        }
        if w.finalized && offset > w.end() {
            return Err(Error::new(
                Code::OutOfRange,
                format!("read_offset {offset} is past the end of the finalized stream ({} bytes)", w.end()),
            ));
        }
        Ok(())
    }
}

struct Reader {
    stream: Arc<Stream>,
    rx: watch::Receiver<()>,
    offset: u64,
    remaining: Option<u64>,
    window: usize,
    done: bool,
}

impl Reader {
    async fn next(mut self) -> Option<(Result<Bytes>, Reader)> {
        loop {
            if self.done || self.remaining == Some(0) {
                return None;
            }
            self.rx.borrow_and_update();
            if let Err(e) = self.stream.check(self.offset, self.window) {
                self.done = true;
                return Some((Err(e), self));
            }
            let chunk = {
                let w = self.stream.buf.lock();
                let end = w.end();
                if self.offset < end {
                    let mut n = (end - self.offset).min(READ_CHUNK as u64);
                    if let Some(r) = self.remaining {
                        n = n.min(r);
                    }
                    let from = (self.offset - w.start) as usize;
                    Some(Bytes::from(w.data.range(from..from + n as usize).copied().collect::<Vec<u8>>()))
                } else if w.finalized {
                    return None;
                } else {
                    None
                }
            };
            if let Some(chunk) = chunk {
                self.offset += chunk.len() as u64;
                if let Some(r) = self.remaining.as_mut() {
                    *r -= chunk.len() as u64;
                }
                return Some((Ok(chunk), self));
            }
            // The sender lives as long as the stream (held here): a change
            // always comes, at the latest when the stream is finalized.
            if self.rx.changed().await.is_err() {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn name(id: &str, kind: StreamKind) -> StreamName {
        StreamName { instance: InstanceName::default(), id: id.into(), kind }
    }

    async fn collect(s: BoxStream<'static, Result<Bytes>>) -> Result<Vec<u8>> {
        let parts: Vec<Result<Bytes>> = s.collect().await;
        let mut out = Vec::new();
        for p in parts {
            out.extend_from_slice(&p?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn a_reader_gets_what_exists_then_what_comes_then_the_end() {
        let logs = Arc::new(LogStreams::new(1024, Duration::from_secs(60)));
        logs.open("t", &InstanceName::default(), 1, "operations/o");
        logs.append(1, "t", b"first\n", b"");
        let mut s = logs.read(&name("t", StreamKind::Stdout), 0, None).unwrap().unwrap();
        assert_eq!(s.next().await.unwrap().unwrap(), Bytes::from_static(b"first\n"));
        let rest = tokio::spawn(collect(s));
        // Another worker cannot write it.
        logs.append(2, "t", b"intruder\n", b"");
        logs.append(1, "t", b"second\n", b"err\n");
        logs.finalize("t");
        assert_eq!(rest.await.unwrap().unwrap(), b"second\n");
        let err = logs.read(&name("t", StreamKind::Stderr), 0, None).unwrap().unwrap();
        assert_eq!(collect(err).await.unwrap(), b"err\n");
        let mid = logs.read(&name("t", StreamKind::Stdout), 3, Some(5)).unwrap().unwrap();
        assert_eq!(collect(mid).await.unwrap(), b"st\nse");
        let past = logs.read(&name("t", StreamKind::Stdout), 100, None);
        assert_eq!(past.err().unwrap().code, Code::OutOfRange);
    }

    #[tokio::test]
    async fn the_window_bounds_memory_and_grace_bounds_life() {
        let logs = LogStreams::new(4, Duration::ZERO);
        let inst = InstanceName::new("a").unwrap();
        logs.open("t", &inst, 1, "operations/o");
        logs.append(1, "t", b"0123456789", b"");
        let stdout = StreamName { instance: inst.clone(), id: "t".into(), kind: StreamKind::Stdout };
        let behind = logs.read(&stdout, 0, None);
        assert_eq!(behind.err().unwrap().code, Code::OutOfRange);
        let other = logs.read(&name("t", StreamKind::Stdout), 6, None);
        assert!(other.unwrap().is_none(), "another instance's name");
        assert_eq!(logs.task_of("operations/o").as_deref(), Some("t"));
        logs.finalize("t");
        assert!(logs.read(&stdout, 6, None).unwrap().is_none(), "gone after the grace period");
        assert_eq!(logs.task_of("operations/o"), None);
    }
}
