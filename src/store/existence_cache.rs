//! Remembers which blobs a slow store has (`type = "existence_cache"`), so
//! a build's repeated FindMissingBlobs of the same inputs is answered
//! locally instead of by a round trip per batch to S3 or another server.
//!
//! Only "present" is remembered, from a find_missing, a committed write or
//! a read that found the blob, for `ttl`, at most `max_entries` blobs (the
//! least recently asked dropped first). "Missing" is never cached (the
//! blob may be uploaded the next moment), and a read that finds the blob
//! gone forgets it. The price: a blob the inner store evicts within `ttl`
//! of an answer is still reported present, and answers served from here do
//! not refresh the inner store's retention, so keep `ttl` well below the
//! inner store's `min_retention`.
//!
//! The ActionCache, usage and listing are the inner store's.

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use lru::LruCache;
use parking_lot::Mutex;
use remote_apis::Digest;
use serde::Deserialize;
use tokio::time::Instant;
use tonic::Code;

use super::{BlobInfo, BlobSink, BlobStore, BlobStream, LOOKUPS_PER_LOCK, Store, Usage};
use crate::error::Result;

/// `[stores.NAME] type = "existence_cache"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExistenceCacheConfig {
    pub store: String,
    #[serde(default = "default_ttl", with = "humantime_serde")]
    pub ttl: Duration,
    #[serde(default = "default_max_entries")]
    pub max_entries: usize,
}

fn default_ttl() -> Duration {
    Duration::from_secs(600)
}

fn default_max_entries() -> usize {
    1_000_000
}

impl ExistenceCacheConfig {
    pub(crate) fn check(&self) -> std::result::Result<(), String> {
        if self.ttl.is_zero() || self.max_entries == 0 {
            return Err("ttl and max_entries must be above zero".into());
        }
        Ok(())
    }
}

/// A store whose "present" answers are remembered for a while.
pub struct ExistenceCache {
    inner: Store,
    ttl: Duration,
    /// When each blob was last known present.
    known: Arc<Mutex<LruCache<Digest, Instant>>>,
}

impl ExistenceCache {
    pub fn new(inner: Store, ttl: Duration, max_entries: usize) -> Self {
        let cap = NonZeroUsize::new(max_entries.max(1)).expect("at least one");
        ExistenceCache { inner, ttl, known: Arc::new(Mutex::new(LruCache::new(cap))) }
    }

    fn remember(&self, digests: impl IntoIterator<Item = Digest>, at: Instant) {
        let mut known = self.known.lock();
        for d in digests {
            known.put(d, at);
        }
    }

    /// The digests not known present (expired ones are forgotten).
    fn unknown(&self, digests: &[Digest], now: Instant) -> Vec<Digest> {
        let mut ask = Vec::new();
        for slice in digests.chunks(LOOKUPS_PER_LOCK) {
            let mut known = self.known.lock();
            for d in slice {
                match known.get(d) {
                    Some(at) if now.duration_since(*at) < self.ttl => {}
                    Some(_) => {
                        known.pop(d);
                        ask.push(*d);
                    }
                    None => ask.push(*d),
                }
            }
        }
        ask
    }
}

#[async_trait]
impl BlobStore for ExistenceCache {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let now = Instant::now();
        let ask = self.unknown(digests, now);
        if ask.is_empty() {
            return Ok(Vec::new());
        }
        let missing = self.inner.find_missing(&ask).await?;
        let absent: HashSet<Digest> = missing.iter().copied().collect();
        self.remember(ask.iter().filter(|d| !absent.contains(d)).copied(), now);
        if ask.len() == digests.len() {
            return Ok(missing);
        }
        Ok(digests.iter().filter(|d| absent.contains(d)).copied().collect())
    }

    async fn get(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> Result<BlobStream> {
        let result = self.inner.get(digest, offset, limit).await;
        match &result {
            Ok(_) => self.remember([*digest], Instant::now()),
            Err(e) if e.code == Code::NotFound => {
                self.known.lock().pop(digest);
            }
            Err(_) => {}
        }
        result
    }

    async fn put(&self, digest: &Digest) -> Result<Box<dyn BlobSink>> {
        let inner = self.inner.put(digest).await?;
        Ok(Box::new(RememberingSink { inner, digest: *digest, known: self.known.clone() }))
    }

    async fn put_bytes(&self, digest: &Digest, data: Bytes) -> Result<()> {
        self.inner.put_bytes(digest, data).await?;
        self.remember([*digest], Instant::now());
        Ok(())
    }

    async fn list(&self, limit: usize) -> Result<Vec<BlobInfo>> {
        self.inner.list(limit).await
    }

    fn usage(&self) -> Usage {
        self.inner.usage()
    }
}

/// Remembers its blob once the inner store committed it.
struct RememberingSink {
    inner: Box<dyn BlobSink>,
    digest: Digest,
    known: Arc<Mutex<LruCache<Digest, Instant>>>,
}

#[async_trait]
impl BlobSink for RememberingSink {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        self.inner.write(data).await
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        self.inner.commit().await?;
        self.known.lock().put(self.digest, Instant::now());
        Ok(())
    }
}
