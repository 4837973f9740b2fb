//! Small blobs to one store, large ones to another
//! (`type = "size_partitioned"`): e.g. Redis below 64 KiB, S3 above. A
//! digest carries its size, so every call knows its store without asking
//! either. ActionCache entries (small, hot) go to the small store.
//!
//! Usage is the sum of both; a listing merges theirs.

use async_trait::async_trait;
use bytes::Bytes;
use bytesize::ByteSize;
use remote_apis::Digest;
use serde::Deserialize;

use super::sharded::{find_missing_routed, list_merged, usage_sum};
use super::{BlobInfo, BlobSink, BlobStore, BlobStream, Store, Usage};
use crate::error::Result;

/// `[stores.NAME] type = "size_partitioned"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SizePartitionedConfig {
    /// Blobs smaller than this go to `small`, the others to `large`.
    #[serde(default = "default_threshold")]
    pub threshold: ByteSize,
    pub small: String,
    pub large: String,
}

fn default_threshold() -> ByteSize {
    ByteSize::kib(64)
}

impl SizePartitionedConfig {
    pub(crate) fn check(&self) -> std::result::Result<(), String> {
        if self.threshold.as_u64() == 0 {
            return Err("threshold must be larger than zero (or name the large store alone)".into());
        }
        if self.small == self.large {
            return Err("small and large must be two stores".into());
        }
        Ok(())
    }
}

/// Blobs by size: `[small, large]`.
pub struct SizePartitioned {
    threshold: u64,
    stores: [Store; 2],
}

impl SizePartitioned {
    pub fn new(threshold: u64, small: Store, large: Store) -> Self {
        SizePartitioned { threshold, stores: [small, large] }
    }

    fn index(&self, digest: &Digest) -> usize {
        usize::from(digest.size >= self.threshold)
    }

    fn store(&self, digest: &Digest) -> &Store {
        &self.stores[self.index(digest)]
    }
}

#[async_trait]
impl BlobStore for SizePartitioned {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        find_missing_routed(&self.stores, digests, |d| self.index(d)).await
    }

    async fn get(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> Result<BlobStream> {
        self.store(digest).get(digest, offset, limit).await
    }

    async fn put(&self, digest: &Digest) -> Result<Box<dyn BlobSink>> {
        self.store(digest).put(digest).await
    }

    async fn put_bytes(&self, digest: &Digest, data: Bytes) -> Result<()> {
        self.store(digest).put_bytes(digest, data).await
    }

    async fn list(&self, limit: usize) -> Result<Vec<BlobInfo>> {
        list_merged(&self.stores, limit).await
    }

    fn usage(&self) -> Usage {
        usage_sum(&self.stores)
    }
}
