//! Streaming file I/O for the filesystem store, on tokio's blocking pool.
//!
//! Reads are one short blocking task per chunk, with the next chunk read
//! while the current one is sent. Writes go through a bounded write-behind
//! queue drained by a blocking task that exists only while there is work.
//! No thread is held while a stream waits: a slow client or a parked,
//! resumable upload costs an open file, not a blocked thread of the pool.

use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use remote_apis::Digest;
use tokio::task::JoinHandle;

use super::{Shared, TempPath};
use crate::error::{Error, Result};
use crate::store::{BlobSink, BlobStream, READ_CHUNK};

/// Small writes are gathered up to this size before they reach the disk
/// (Bazel sends 16 KiB chunks).
const WRITE_CHUNK: usize = 1 << 20;

type ReadTask = JoinHandle<(File, std::io::Result<Vec<u8>>)>;

fn read_chunk(mut file: File, n: u64) -> ReadTask {
    tokio::task::spawn_blocking(move || {
        let mut buf = Vec::with_capacity(n as usize);
        let result = (&mut file).take(n).read_to_end(&mut buf).map(|_| buf);
        (file, result)
    })
}

/// Streams `len` bytes of `file`, reading the next chunk while the current
/// one is being sent.
pub(super) fn read(file: File, path: PathBuf, len: u64) -> BlobStream {
    struct State {
        pending: Option<ReadTask>,
        remaining: u64,
        path: PathBuf,
    }
    let first = (len > 0).then(|| read_chunk(file, len.min(READ_CHUNK as u64)));
    let state = State { pending: first, remaining: len, path };
    futures::stream::unfold(state, |mut state| async move {
        let task = state.pending.take()?;
        let (file, result) = match task.await {
            Ok(r) => r,
            Err(e) => return Some((Err(Error::internal(format!("reading a blob: {e}"))), state)),
        };
        let chunk = match result {
            Ok(buf) if !buf.is_empty() => buf,
            Ok(_) => {
                let e = Error::internal(format!("{} is shorter than its index entry", state.path.display()));
                return Some((Err(e), state));
            }
            Err(e) => return Some((Err(Error::io(format!("reading {}", state.path.display()), e)), state)),
        };
        state.remaining -= chunk.len() as u64;
        if state.remaining > 0 {
            state.pending = Some(read_chunk(file, state.remaining.min(READ_CHUNK as u64)));
        }
        Some((Ok(Bytes::from(chunk)), state))
    })
    .boxed()
}

/// Bytes an upload may have queued for the disk before the producer waits
/// (and, through HTTP/2 flow control, the client).
const WRITE_QUEUE_BYTES: usize = 4 << 20;

/// The write-behind queue of one upload. A blocking task drains it while
/// there is work and exits when it is empty, so an idle (or parked) upload
/// holds no thread.
struct WriteQueue {
    state: std::sync::Mutex<QueueState>,
    /// Signalled whenever the drainer makes progress or stops.
    progress: tokio::sync::Notify,
}

struct QueueState {
    chunks: std::collections::VecDeque<Bytes>,
    queued: usize,
    /// The file, while no drainer is running.
    file: Option<File>,
    running: bool,
    error: Option<std::io::Error>,
}

impl WriteQueue {
    /// Writes queued chunks until none is left. Runs on the blocking pool.
    fn drain(&self, mut file: File) {
        loop {
            let chunk = {
                let mut st = self.state.lock().expect("queue lock");
                match st.chunks.pop_front() {
                    Some(c) if st.error.is_none() => c,
                    _ => {
                        st.file = Some(file);
                        st.running = false;
                        drop(st);
                        self.progress.notify_waiters();
                        return;
                    }
                }
            };
            let result = file.write_all(&chunk);
            {
                let mut st = self.state.lock().expect("queue lock");
                st.queued -= chunk.len();
                if let Err(e) = result {
                    st.error = Some(e);
                    st.chunks.clear();
                    st.queued = 0;
                }
            }
            self.progress.notify_waiters();
        }
    }
}

/// An upload into a temporary file beside the blob's final place.
pub(super) struct FsSink {
    queue: Arc<WriteQueue>,
    /// Small chunks gathered for the next write.
    gathered: BytesMut,
    tmp: TempPath,
    shared: Arc<Shared>,
    digest: Digest,
}

impl FsSink {
    pub(super) fn new(file: File, tmp: TempPath, shared: Arc<Shared>, digest: Digest) -> Self {
        let state = QueueState { chunks: Default::default(), queued: 0, file: Some(file), running: false, error: None };
        let queue = Arc::new(WriteQueue { state: std::sync::Mutex::new(state), progress: Default::default() });
        FsSink { queue, gathered: BytesMut::new(), tmp, shared, digest }
    }

    fn io_error(&self, e: &std::io::Error) -> Error {
        Error::io(format!("writing {}", self.tmp.path().display()), std::io::Error::new(e.kind(), e.to_string()))
    }

    /// Runs `step` on the queue state until it returns a value, waiting for
    /// the drainer's progress in between. A write error ends the wait.
    async fn wait_for<T>(&self, mut step: impl FnMut(&mut QueueState) -> Option<T>) -> Result<T> {
        loop {
            let progress = self.queue.progress.notified();
            tokio::pin!(progress);
            progress.as_mut().enable();
            {
                let mut st = self.queue.state.lock().expect("queue lock");
                if let Some(e) = &st.error {
                    return Err(self.io_error(e));
                }
                if let Some(done) = step(&mut st) {
                    return Ok(done);
                }
            }
            progress.await;
        }
    }

    /// Queues `data`, waiting while the queue is full; starts a drainer if
    /// none is running.
    async fn submit(&mut self, data: Bytes) -> Result<()> {
        let mut data = Some(data);
        let queue = self.queue.clone();
        self.wait_for(|st| {
            if st.queued >= WRITE_QUEUE_BYTES {
                return None;
            }
            let data = data.take().expect("queued once");
            st.queued += data.len();
            st.chunks.push_back(data);
            if !st.running {
                st.running = true;
                let file = st.file.take().expect("the file is idle when no drainer runs");
                let queue = queue.clone();
                tokio::task::spawn_blocking(move || queue.drain(file));
            }
            Some(())
        })
        .await
    }

    /// Waits until everything queued is on disk and takes the file.
    async fn finish(&mut self) -> Result<File> {
        self.wait_for(|st| if st.running { None } else { st.file.take() }).await
    }
}

#[async_trait]
impl BlobSink for FsSink {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        if self.gathered.is_empty() && data.len() >= WRITE_CHUNK / 4 {
            return self.submit(data).await;
        }
        self.gathered.extend_from_slice(&data);
        if self.gathered.len() >= WRITE_CHUNK {
            let chunk = self.gathered.split().freeze();
            self.submit(chunk).await?;
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        if !self.gathered.is_empty() {
            let chunk = self.gathered.split().freeze();
            self.submit(chunk).await?;
        }
        let file = self.finish().await?;
        let FsSink { tmp, shared, digest, .. } = *self;
        tokio::task::spawn_blocking(move || {
            if shared.fsync {
                file.sync_data().map_err(|e| Error::io(format!("syncing {}", tmp.path().display()), e))?;
            }
            drop(file);
            shared.install(tmp.path(), &digest)?;
            tmp.disarm();
            Ok(())
        })
        .await
        .map_err(|e| Error::internal(format!("committing a blob: {e}")))?
    }
}
