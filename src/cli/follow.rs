//! `cargo-distbuild exec` prints a remote command's output as it is
//! written: it follows the live streams the operation announces
//! (`stdout_stream_name`, `stderr_stream_name`) and, once the result is in,
//! prints from the ActionResult only what the streams did not deliver, so
//! nothing is printed twice and nothing is lost when a stream is not
//! available (another server replica, a reader behind the window, an old
//! server).

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use remote_apis::bytestream::ReadRequest;
use remote_apis::bytestream::byte_stream_client::ByteStreamClient;
use remote_apis::client::Transport;

/// How long the end of a stream may lag behind the result before the rest
/// comes from the ActionResult instead.
const SETTLE: Duration = Duration::from_secs(5);

/// Which local stream a remote one goes to.
#[derive(Clone, Copy)]
pub enum Sink {
    Stdout,
    Stderr,
}

impl Sink {
    fn write(self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(data)?;
                out.flush()
            }
            Sink::Stderr => std::io::stderr().lock().write_all(data),
        }
    }
}

/// One followed stream: the bytes printed so far.
pub struct Follower {
    sink: Sink,
    printed: Arc<AtomicU64>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Follower {
    /// A follower that has printed nothing (no stream name yet).
    pub fn idle(sink: Sink) -> Follower {
        Follower { sink, printed: Arc::default(), task: None }
    }

    /// Starts printing stream `name` (once; later names are ignored: the
    /// rest of a re-run's output comes from its result).
    pub fn start(&mut self, channel: &Transport, name: &str) {
        if self.task.is_some() || name.is_empty() {
            return;
        }
        let (client, name, printed, sink) =
            (ByteStreamClient::new(channel.clone()), name.to_string(), self.printed.clone(), self.sink);
        self.task = Some(tokio::spawn(follow(client, name, printed, sink)));
    }

    /// Prints what the stream did not: `full` (the result's bytes) past
    /// what was printed. Waits a little for the stream's own end first.
    pub async fn finish(mut self, full: &[u8]) -> std::io::Result<()> {
        if let Some(mut task) = self.task.take() {
            // Aborted only at an await: a chunk is written and counted
            // together, never one without the other.
            if tokio::time::timeout(SETTLE, &mut task).await.is_err() {
                task.abort();
                let _ = task.await;
            }
        }
        let printed = self.printed.load(Ordering::SeqCst) as usize;
        match full.get(printed..) {
            Some(rest) if !rest.is_empty() => self.sink.write(rest),
            _ => Ok(()),
        }
    }
}

async fn follow(mut client: ByteStreamClient<Transport>, name: String, printed: Arc<AtomicU64>, sink: Sink) {
    let request = ReadRequest { resource_name: name.clone(), read_offset: 0, read_limit: 0 };
    let mut stream = match client.read(request).await {
        Ok(s) => s.into_inner(),
        Err(status) => return tracing::debug!(stream = %name, error = %status.message(), "no live output"),
    };
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => {
                if sink.write(&chunk.data).is_err() {
                    return;
                }
                printed.fetch_add(chunk.data.len() as u64, Ordering::SeqCst);
            }
            Err(status) => return tracing::debug!(stream = %name, error = %status.message(), "live output ended"),
        }
    }
}
