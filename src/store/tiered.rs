//! A fast store in front of a slow one (`type = "tiered"`): a local disk
//! before S3, memory before a disk, a regional server before a central one.
//!
//! Reads try fast, then slow, and fill fast on the way back. Writes go to
//! both: `through` acknowledges once both committed (slow first, so a blob
//! in the fast tier is always in the slow one too); `behind` acknowledges
//! once the fast tier committed and copies to the slow one in the
//! background. A crash then loses nothing the fast tier holds (the config
//! refuses a fast tier that is not durable), but a blob acknowledged and
//! not yet copied reaches the slow tier only when it is written again;
//! a failed copy is retried at the next read or write of the blob.
//!
//! Usage and listing are the slow tier's: it holds every blob.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use parking_lot::Mutex;
use remote_apis::Digest;
use serde::Deserialize;
use tokio::sync::mpsc;
use tonic::Code;

use super::{BlobInfo, BlobSink, BlobStore, BlobStream, Store, Usage, Verify, stream_bytes};
use crate::ac::{AcKey, AcStore};
use crate::error::{Error, Result};

/// `[stores.NAME] type = "tiered"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TieredConfig {
    pub fast: String,
    pub slow: String,
    #[serde(default)]
    pub write: WriteMode,
}

/// When a write to a tiered store is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteMode {
    /// Once both tiers committed.
    #[default]
    Through,
    /// Once the (durable) fast tier committed; copied to slow afterwards.
    Behind,
}

/// A range read of a blob up to this size fetches the whole blob from the
/// slow tier and fills the fast one (the next range is then local); larger
/// range reads pass through to the slow tier unfilled.
pub const FILL_WHOLE_BELOW: u64 = 4 << 20;

/// Write-behind copies waiting for a copier; beyond it a blob waits for
/// its next read or write.
const BEHIND_QUEUE: usize = 10_000;
/// Copies to the slow tier in flight at once.
const BEHIND_COPIERS: usize = 4;
/// Blobs remembered as not yet in the slow tier (failed or unqueued
/// copies); beyond it, the oldest acknowledgements are no longer retried.
const BEHIND_PENDING: usize = 100_000;

/// Two blob stores read fast-first, written to both.
pub struct Tiered {
    fast: Store,
    /// `fast` behind hash verification: fills write through it, so a slow
    /// tier that returns wrong bytes cannot plant them in the fast one.
    fill: Store,
    slow: Store,
    behind: Option<Arc<Behind>>,
}

impl Tiered {
    /// Starts the background copier for [`WriteMode::Behind`], so this
    /// must run inside a Tokio runtime; it stops when the store is dropped.
    pub fn new(fast: Store, slow: Store, write: WriteMode) -> Self {
        let fill: Store = Arc::new(Verify::new(fast.clone()));
        let behind = (write == WriteMode::Behind).then(|| Behind::start(fast.clone(), slow.clone()));
        Tiered { fast, fill, slow, behind }
    }

    /// A read from the slow tier that also fills the fast one.
    async fn get_slow(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> Result<BlobStream> {
        let whole = offset == 0 && limit.is_none_or(|l| l >= digest.size);
        if whole {
            let stream = self.slow.get(digest, 0, None).await?;
            let sink = match self.fill.put(digest).await {
                Ok(sink) => Some(sink),
                Err(e) => {
                    tracing::debug!(%digest, error = %e, "tiered store: not filling the fast tier");
                    None
                }
            };
            return Ok(tee(*digest, stream, sink));
        }
        if digest.size > FILL_WHOLE_BELOW {
            return self.slow.get(digest, offset, limit).await;
        }
        let data = self.slow.get_bytes(digest).await?;
        if data.len() as u64 != digest.size {
            return Err(Error::new(
                Code::DataLoss,
                format!("the slow tier returned {} bytes of blob {digest}", data.len()),
            ));
        }
        if let Err(e) = self.fill.put_bytes(digest, data.clone()).await {
            tracing::warn!(%digest, error = %e, "tiered store: filling the fast tier failed");
        }
        stream_bytes(data, offset, limit, digest)
    }
}

#[async_trait]
impl BlobStore for Tiered {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let rest = self.fast.find_missing(digests).await?;
        if rest.is_empty() {
            return Ok(rest);
        }
        self.slow.find_missing(&rest).await
    }

    async fn get(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> Result<BlobStream> {
        match self.fast.get(digest, offset, limit).await {
            Err(e) if e.code == Code::NotFound => self.get_slow(digest, offset, limit).await,
            found => {
                if let (Ok(_), Some(behind)) = (&found, &self.behind) {
                    behind.retry(digest);
                }
                found
            }
        }
    }

    async fn put(&self, digest: &Digest) -> Result<Box<dyn BlobSink>> {
        match &self.behind {
            None => {
                let slow = self.slow.put(digest).await?;
                let fast = self.fast.put(digest).await?;
                Ok(Box::new(BothSink { slow, fast }))
            }
            Some(behind) => {
                let fast = self.fast.put(digest).await?;
                Ok(Box::new(BehindSink { fast, digest: *digest, behind: behind.clone() }))
            }
        }
    }

    async fn put_bytes(&self, digest: &Digest, data: Bytes) -> Result<()> {
        match &self.behind {
            None => {
                self.slow.put_bytes(digest, data.clone()).await?;
                self.fast.put_bytes(digest, data).await
            }
            Some(behind) => {
                self.fast.put_bytes(digest, data).await?;
                behind.enqueue(*digest);
                Ok(())
            }
        }
    }

    async fn list(&self, limit: usize) -> Result<Vec<BlobInfo>> {
        self.slow.list(limit).await
    }

    fn usage(&self) -> Usage {
        self.slow.usage()
    }
}

/// Passes a slow-tier stream on and writes it into `sink`, committed only
/// when the whole blob went through (a reader that stops early, or a slow
/// tier that fails mid-way, leaves the fast tier untouched). The fill is
/// best effort: its failures are logged, never the reader's.
fn tee(digest: Digest, inner: BlobStream, sink: Option<Box<dyn BlobSink>>) -> BlobStream {
    struct Tee {
        inner: BlobStream,
        sink: Option<Box<dyn BlobSink>>,
        digest: Digest,
        failed: bool,
    }
    let state = Tee { inner, sink, digest, failed: false };
    futures::stream::unfold(state, |mut st| async move {
        if st.failed {
            return None;
        }
        match st.inner.next().await {
            Some(Ok(chunk)) => {
                if let Some(sink) = &mut st.sink
                    && let Err(e) = sink.write(chunk.clone()).await
                {
                    tracing::debug!(digest = %st.digest, error = %e, "tiered store: fill abandoned");
                    st.sink = None;
                }
                Some((Ok(chunk), st))
            }
            Some(Err(e)) => {
                st.sink = None;
                st.failed = true;
                Some((Err(e), st))
            }
            None => {
                if let Some(sink) = st.sink.take()
                    && let Err(e) = sink.commit().await
                {
                    tracing::warn!(digest = %st.digest, error = %e, "tiered store: filling the fast tier failed");
                }
                None
            }
        }
    })
    .boxed()
}

/// Write-through: both sinks get every chunk; slow commits first.
struct BothSink {
    slow: Box<dyn BlobSink>,
    fast: Box<dyn BlobSink>,
}

#[async_trait]
impl BlobSink for BothSink {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        let (slow, fast) = tokio::join!(self.slow.write(data.clone()), self.fast.write(data));
        slow.and(fast)
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        self.slow.commit().await?;
        self.fast.commit().await
    }
}

/// Write-behind: the fast sink, and a copy queued once it committed.
struct BehindSink {
    fast: Box<dyn BlobSink>,
    digest: Digest,
    behind: Arc<Behind>,
}

#[async_trait]
impl BlobSink for BehindSink {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        self.fast.write(data).await
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        self.fast.commit().await?;
        self.behind.enqueue(self.digest);
        Ok(())
    }
}

/// The write-behind queue: blobs the fast tier acknowledged that the slow
/// one may not have yet.
struct Behind {
    queue: mpsc::Sender<Digest>,
    /// Not yet copied: `true` while a copy is queued or running, `false`
    /// after it failed or found the queue full (retried on next use).
    pending: Mutex<HashMap<Digest, bool>>,
}

impl Behind {
    fn start(fast: Store, slow: Store) -> Arc<Behind> {
        let (queue, rx) = mpsc::channel(BEHIND_QUEUE);
        let behind = Arc::new(Behind { queue, pending: Mutex::new(HashMap::new()) });
        tokio::spawn(copier(Arc::downgrade(&behind), rx, fast, slow));
        behind
    }

    /// Queues a copy unless one is queued already.
    fn enqueue(&self, digest: Digest) {
        let mut pending = self.pending.lock();
        if pending.get(&digest) == Some(&true) {
            return;
        }
        if !pending.contains_key(&digest) && pending.len() >= BEHIND_PENDING {
            tracing::warn!(%digest, "tiered store: too many copies to the slow tier pending; this one waits");
            return;
        }
        let queued = self.queue.try_send(digest).is_ok();
        if !queued {
            tracing::warn!(%digest, "tiered store: write-behind queue full; copied at the blob's next use");
        }
        pending.insert(digest, queued);
    }

    /// A blob whose copy failed or was never queued gets another try.
    fn retry(&self, digest: &Digest) {
        let failed = self.pending.lock().get(digest) == Some(&false);
        if failed {
            self.enqueue(*digest);
        }
    }

    fn finished(&self, digest: &Digest, result: Result<()>) {
        let mut pending = self.pending.lock();
        match result {
            Ok(()) => {
                pending.remove(digest);
            }
            Err(e) => {
                tracing::warn!(%digest, error = %e, "tiered store: copy to the slow tier failed; retried at the blob's next use");
                pending.insert(*digest, false);
            }
        }
    }
}

/// Copies queued blobs fast -> slow until the store is dropped.
async fn copier(behind: Weak<Behind>, rx: mpsc::Receiver<Digest>, fast: Store, slow: Store) {
    tokio_stream::wrappers::ReceiverStream::new(rx)
        .for_each_concurrent(BEHIND_COPIERS, |digest| {
            let (behind, fast, slow) = (behind.clone(), fast.clone(), slow.clone());
            async move {
                let result = copy(&fast, &slow, &digest).await;
                if let Some(behind) = behind.upgrade() {
                    behind.finished(&digest, result);
                }
            }
        })
        .await;
}

async fn copy(fast: &Store, slow: &Store, digest: &Digest) -> Result<()> {
    if slow.find_missing(&[*digest]).await?.is_empty() {
        return Ok(());
    }
    let mut stream = fast.get(digest, 0, None).await?;
    let mut sink = slow.put(digest).await?;
    while let Some(chunk) = stream.next().await {
        sink.write(chunk?).await?;
    }
    sink.commit().await
}

/// The ActionCache over two tiers: read fast, then slow (filling fast);
/// written to both, slow first. Entries are small, so writes are always
/// through.
pub struct TieredAc {
    fast: Arc<dyn AcStore>,
    slow: Arc<dyn AcStore>,
}

impl TieredAc {
    pub fn new(fast: Arc<dyn AcStore>, slow: Arc<dyn AcStore>) -> Self {
        TieredAc { fast, slow }
    }
}

#[async_trait]
impl AcStore for TieredAc {
    async fn get(&self, key: &AcKey) -> Result<Option<Bytes>> {
        if let Some(value) = self.fast.get(key).await? {
            return Ok(Some(value));
        }
        let found = self.slow.get(key).await?;
        if let Some(value) = &found
            && let Err(e) = self.fast.put(key, value.clone()).await
        {
            tracing::warn!(error = %e, "tiered store: filling the fast tier's ActionCache failed");
        }
        Ok(found)
    }

    async fn put(&self, key: &AcKey, value: Bytes) -> Result<()> {
        self.slow.put(key, value.clone()).await?;
        self.fast.put(key, value).await
    }

    async fn remove(&self, key: &AcKey) -> Result<()> {
        // Fast first: if the slow removal then fails, the entry is still
        // whole in the slow tier, not left in the fast one alone.
        self.fast.remove(key).await?;
        self.slow.remove(key).await
    }
}
