//! A blob's body as it comes from S3, guarded: it must deliver exactly the
//! bytes asked for, or end in an error (a connection cut half-way is
//! UNAVAILABLE, never a short success), and each wait for the next chunk
//! is bounded (time spent by a slow reader between chunks is not).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::BoxStream;
use remote_apis::Digest;

use super::errors::Names;
use crate::error::{Error, Result};
use crate::store::BlobStream;

/// HTTP bodies arrive in chunks of a few KiB; each chunk a store hands out
/// becomes one ByteStream message, so small ones are gathered to this.
const GATHER: usize = crate::store::READ_CHUNK;

/// Gathered chunks read ahead of the consumer. Without them the S3
/// connection is read only while the consumer asks, and the two hops (S3
/// to here, here to the client) take turns instead of overlapping.
const READ_AHEAD: usize = 4;

pub(super) struct Guarded {
    inner: BoxStream<'static, object_store::Result<Bytes>>,
    remaining: u64,
    expected: u64,
    idle: Duration,
    names: Names,
    digest: Digest,
}

impl Guarded {
    pub fn new(
        inner: BoxStream<'static, object_store::Result<Bytes>>,
        expected: u64,
        idle: Duration,
        names: Names,
        digest: Digest,
    ) -> Self {
        Guarded { inner, remaining: expected, expected, idle, names, digest }
    }

    /// Chunks until the last byte; after an error, nothing more. A task
    /// reads up to [`READ_AHEAD`] chunks ahead, and stops when the stream
    /// is dropped.
    pub fn into_stream(mut self) -> BlobStream {
        let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD);
        tokio::spawn(async move {
            loop {
                let (item, last) = match self.next_chunk().await {
                    Ok(Some(chunk)) => (Ok(chunk), false),
                    Ok(None) => return,
                    Err(e) => (Err(e), true),
                };
                if tx.send(item).await.is_err() || last {
                    return;
                }
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx).boxed()
    }

    /// The next chunk of at least [`GATHER`] bytes (less only at the end).
    async fn next_chunk(&mut self) -> Result<Option<Bytes>> {
        let mut gathered: Option<BytesMut> = None;
        while self.remaining > 0 {
            let chunk = self.next_piece().await?;
            match &mut gathered {
                None if chunk.len() >= GATHER || self.remaining == 0 => return Ok(Some(chunk)),
                None => {
                    let mut buf = BytesMut::with_capacity(GATHER.max(chunk.len()));
                    buf.extend_from_slice(&chunk);
                    gathered = Some(buf);
                }
                Some(buf) => buf.extend_from_slice(&chunk),
            }
            if gathered.as_ref().is_some_and(|b| b.len() >= GATHER) {
                break;
            }
        }
        Ok(gathered.map(BytesMut::freeze))
    }

    /// One piece from the body, counted against what is still expected.
    async fn next_piece(&mut self) -> Result<Bytes> {
        let what = format!("reading blob {}", self.digest);
        let piece = match tokio::time::timeout(self.idle, self.inner.next()).await {
            Err(_) => return Err(self.names.timed_out(&what, self.idle)),
            Ok(None) => {
                return Err(self.names.short_read(&self.digest, self.expected - self.remaining, self.expected));
            }
            Ok(Some(Err(e))) => return Err(self.names.error(e, &what)),
            Ok(Some(Ok(piece))) => piece,
        };
        if piece.len() as u64 > self.remaining {
            return Err(Error::internal(format!(
                "{}: {what}: the server sent more than the {} bytes asked for",
                self.names.store, self.expected
            )));
        }
        self.remaining -= piece.len() as u64;
        Ok(piece)
    }
}
