//! The empty blob is always present, whatever the backend holds.

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use remote_apis::Digest;

use super::{BlobInfo, BlobSink, BlobStore, BlobStream, Store, Usage};
use crate::error::Result;

/// Answers for the empty blob of every digest function without touching the
/// backend: never missing, always readable, writes accepted and dropped.
pub struct EmptyBlob {
    inner: Store,
}

impl EmptyBlob {
    pub fn new(inner: Store) -> Self {
        EmptyBlob { inner }
    }
}

struct NullSink;

#[async_trait]
impl BlobSink for NullSink {
    async fn write(&mut self, _data: Bytes) -> Result<()> {
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

#[async_trait]
impl BlobStore for EmptyBlob {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        if !digests.iter().any(Digest::is_empty_blob) {
            return self.inner.find_missing(digests).await;
        }
        let rest: Vec<Digest> = digests.iter().filter(|d| !d.is_empty_blob()).copied().collect();
        self.inner.find_missing(&rest).await
    }

    async fn get(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> Result<BlobStream> {
        if digest.is_empty_blob() {
            super::range(digest, offset, limit)?;
            return Ok(futures::stream::empty().boxed());
        }
        self.inner.get(digest, offset, limit).await
    }

    async fn put(&self, digest: &Digest) -> Result<Box<dyn BlobSink>> {
        // Verification sits outside this decorator, so a non-empty upload
        // to the empty digest is still refused.
        if digest.is_empty_blob() {
            return Ok(Box::new(NullSink));
        }
        self.inner.put(digest).await
    }

    async fn put_bytes(&self, digest: &Digest, data: Bytes) -> Result<()> {
        if digest.is_empty_blob() && data.is_empty() {
            return Ok(());
        }
        self.inner.put_bytes(digest, data).await
    }

    async fn list(&self, limit: usize) -> Result<Vec<BlobInfo>> {
        self.inner.list(limit).await
    }

    fn usage(&self) -> Usage {
        self.inner.usage()
    }
}
