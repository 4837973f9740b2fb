//! Blob storage: one narrow trait and the backends and decorators that
//! implement it.
//!
//! A store knows three things: which digests it is missing, how to stream a
//! byte range of a blob, and how to accept a blob as a stream that becomes
//! visible only when committed. Everything else (hash verification, the
//! always-present empty blob) is a decorator over that trait, and the services
//! never look behind it.

mod empty;
pub mod existence_cache;
pub mod fs;
pub mod graph;
pub mod grpc;
pub mod memory;
mod metered;
pub mod redis;
mod retention;
pub mod s3;
pub mod sharded;
pub mod size_partitioned;
pub mod tiered;
mod verify;

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::BoxStream;
use remote_apis::Digest;

pub use empty::EmptyBlob;
pub use metered::{Metered, MeteredAc};
pub use verify::Verify;

use crate::error::{Error, Result};

/// The bytes of a blob, in chunks.
pub type BlobStream = BoxStream<'static, Result<Bytes>>;

/// Size of the chunks stores hand out when streaming.
pub const READ_CHUNK: usize = 1 << 20;

/// Index lookups a backend does per hold of its lock in `find_missing`.
pub(crate) const LOOKUPS_PER_LOCK: usize = 4096;

/// One stored blob, as the admin listing shows it.
#[derive(Debug, Clone)]
pub struct BlobInfo {
    pub digest: Digest,
    pub last_access: SystemTime,
}

/// What a store holds against what it may hold.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub used_bytes: u64,
    pub max_bytes: u64,
    pub blobs: u64,
    /// Blobs evicted to stay within the budget since the store opened.
    pub evictions: u64,
}

#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// The subset of `digests` that is not stored, in the given order. Blobs
    /// that are found count as used (they move to the back of the eviction
    /// order), since a client that asks is about to rely on them.
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>>;

    /// Streams `limit` bytes (all when `None`) from `offset`. NOT_FOUND when
    /// absent, OUT_OF_RANGE when `offset` is past the end.
    async fn get(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> Result<BlobStream>;

    /// Starts a write. Nothing is visible until [`BlobSink::commit`]; a sink
    /// dropped without commit leaves no trace.
    async fn put(&self, digest: &Digest) -> Result<Box<dyn BlobSink>>;

    /// The stored blobs, most recently used first (for operators, not
    /// clients: REAPI has no listing).
    async fn list(&self, _limit: usize) -> Result<Vec<BlobInfo>> {
        Err(Error::new(tonic::Code::FailedPrecondition, "this store cannot list its blobs"))
    }

    fn usage(&self) -> Usage {
        Usage::default()
    }

    /// Reads a whole blob into memory. For blobs known to be small.
    async fn get_bytes(&self, digest: &Digest) -> Result<Bytes> {
        let mut stream = self.get(digest, 0, None).await?;
        let mut buf = BytesMut::with_capacity(digest.size as usize);
        while let Some(chunk) = stream.next().await {
            buf.extend_from_slice(&chunk?);
        }
        Ok(buf.freeze())
    }

    /// Writes a whole blob held in memory.
    async fn put_bytes(&self, digest: &Digest, data: Bytes) -> Result<()> {
        let mut sink = self.put(digest).await?;
        sink.write(data).await?;
        sink.commit().await
    }
}

/// The operator's integrity check of a whole store: re-hash every stored
/// blob and drop the ones that no longer match their digest.
///
/// An admin-only call, so it lives beside [`BlobStore`], not in it: the
/// backends implement it and the factory hands it to the admin service
/// directly, where no decorator can forward it wrongly or forget it.
#[async_trait]
pub trait Scrub: Send + Sync + 'static {
    async fn scrub(&self) -> Result<ScrubReport>;
}

/// What a scrub found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// Blobs whose bytes match their digest, and their total size.
    pub intact: u64,
    pub bytes: u64,
    /// Blobs that did not match and were removed.
    pub corrupt: u64,
    /// Indexed blobs whose file was gone (evicted during the scrub, or
    /// removed behind the store's back); forgotten.
    pub vanished: u64,
    /// Blobs that could not be read (kept; see the server's log).
    pub unreadable: u64,
}

/// A blob being written.
#[async_trait]
pub trait BlobSink: Send {
    async fn write(&mut self, data: Bytes) -> Result<()>;

    /// Makes the blob visible, atomically.
    async fn commit(self: Box<Self>) -> Result<()>;
}

pub type Store = Arc<dyn BlobStore>;

/// The CAS as services see it: a backend behind hash verification and the
/// empty-blob rule. Every path into storage goes through here. Verification
/// is outermost, so even an upload to the empty digest is checked.
pub fn cas(backend: Store) -> Store {
    Arc::new(Verify::new(Arc::new(EmptyBlob::new(backend))))
}

/// Splits an in-memory blob range into stream chunks.
pub(crate) fn stream_bytes(data: Bytes, offset: u64, limit: Option<u64>, digest: &Digest) -> Result<BlobStream> {
    let (start, end) = range(digest, offset, limit)?;
    let data = data.slice(start as usize..end as usize);
    let chunks: Vec<Result<Bytes>> =
        (0..data.len()).step_by(READ_CHUNK).map(|at| Ok(data.slice(at..(at + READ_CHUNK).min(data.len())))).collect();
    Ok(futures::stream::iter(chunks).boxed())
}

/// Resolves `offset`/`limit` against the blob size.
pub(crate) fn range(digest: &Digest, offset: u64, limit: Option<u64>) -> Result<(u64, u64)> {
    if offset > digest.size {
        return Err(Error::new(
            tonic::Code::OutOfRange,
            format!("read offset {offset} is past the end of blob {digest}"),
        ));
    }
    let end = match limit {
        Some(l) => offset.saturating_add(l).min(digest.size),
        None => digest.size,
    };
    Ok((offset, end))
}

#[cfg(test)]
mod decorator_tests;
#[cfg(test)]
pub(crate) mod suite;
#[cfg(test)]
mod tests;
