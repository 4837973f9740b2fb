//! Writing a blob to S3: a blob that fits in one part is one PUT at
//! commit; a larger one becomes a multipart upload, parts sent as they
//! fill, completed only at commit. Either way the object appears whole or
//! not at all. A sink dropped before commit aborts its multipart upload
//! (in the background: drop cannot wait), and an upload whose abort never
//! arrives (the server was down) is invisible and left to the bucket's
//! lifecycle rule for incomplete uploads.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};
use remote_apis::Digest;

use super::Shared;
use crate::error::Result;
use crate::store::BlobSink;

/// Parts being uploaded while the next one fills: with the one buffering,
/// a blob holds at most this many parts plus one in memory. One part in
/// flight made uploads through the server 65% of a direct upload with
/// object_store's default of eight (scripts/bench-s3.sh); four reach
/// about 90%.
const PARTS_IN_FLIGHT: usize = 4;

pub(super) struct S3Sink {
    store: Arc<Shared>,
    path: Path,
    digest: Digest,
    state: State,
}

enum State {
    /// Less than a part so far, kept as received (no copy).
    Buffering {
        chunks: Vec<Bytes>,
        len: usize,
    },
    Multipart(WriteMultipart),
    /// Committed, or failed: nothing to clean up.
    Done,
}

impl S3Sink {
    pub fn new(store: Arc<Shared>, path: Path, digest: Digest) -> Self {
        S3Sink { store, path, digest, state: State::Buffering { chunks: Vec::new(), len: 0 } }
    }

    fn what(&self) -> String {
        format!("writing blob {}", self.digest)
    }

    /// Turns the buffered chunks into the first part(s) of a multipart upload.
    async fn start_multipart(&mut self, chunks: Vec<Bytes>) -> Result<()> {
        let s = &self.store;
        let what = self.what();
        let upload = s.bounded(&what, s.ops.put_multipart(&self.path)).await?.map_err(|e| s.names.error(e, &what))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, s.part_size);
        for chunk in chunks {
            writer.put(chunk);
        }
        self.state = State::Multipart(writer);
        Ok(())
    }
}

#[async_trait]
impl BlobSink for S3Sink {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        match &mut self.state {
            State::Buffering { chunks, len } => {
                *len += data.len();
                chunks.push(data);
                if *len > self.store.part_size {
                    let chunks = std::mem::take(chunks);
                    self.start_multipart(chunks).await?;
                }
                Ok(())
            }
            State::Multipart(writer) => {
                // Back-pressure: the client waits while parts are in flight,
                // instead of the server buffering the blob.
                if let Err(e) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
                    return Err(self.store.names.error(e, &self.what()));
                }
                writer.put(data);
                Ok(())
            }
            State::Done => Ok(()),
        }
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        let what = self.what();
        let s = self.store.clone();
        match std::mem::replace(&mut self.state, State::Done) {
            State::Buffering { chunks, .. } => {
                let payload: PutPayload = chunks.into_iter().collect();
                s.bounded(&what, s.ops.put(&self.path, payload)).await?.map_err(|e| s.names.error(e, &what))?;
            }
            // Each part is bounded by the client's timeout; finish aborts
            // the upload itself when a part or the completion fails.
            State::Multipart(writer) => {
                writer.finish().await.map_err(|e| s.names.error(e, &what))?;
            }
            State::Done => {}
        }
        Ok(())
    }
}

impl Drop for S3Sink {
    fn drop(&mut self) {
        let State::Multipart(writer) = std::mem::replace(&mut self.state, State::Done) else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (store, digest) = (self.store.names.store.clone(), self.digest);
        runtime.spawn(async move {
            if let Err(e) = writer.abort().await {
                tracing::debug!(%digest, error = %e, "{store}: aborting an unfinished upload");
            }
        });
    }
}
