//! A bounded in-memory store with least-recently-used eviction that spares
//! recently used blobs (`retention.rs`). Also the fake that tests run the
//! services against.

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use lru::LruCache;
use parking_lot::Mutex;
use remote_apis::Digest;

use super::retention::Retention;
use super::{BlobInfo, BlobSink, BlobStore, BlobStream, Scrub, ScrubReport, Usage, stream_bytes};
use crate::error::{Error, Result};

#[derive(Clone)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

struct Shared {
    inner: Mutex<Inner>,
    max_bytes: u64,
}

struct Inner {
    blobs: LruCache<Digest, (Bytes, SystemTime)>,
    used: u64,
    evicted: u64,
    retention: Retention,
}

impl Inner {
    fn check_room(&self, max_bytes: u64, digest: &Digest) -> Result<()> {
        self.retention.check_room(&self.blobs, |(_, at)| *at, self.used, max_bytes, digest)
    }
}

impl MemoryStore {
    pub fn new(max_bytes: u64) -> Self {
        let inner =
            Mutex::new(Inner { blobs: LruCache::unbounded(), used: 0, evicted: 0, retention: Retention::default() });
        MemoryStore { shared: Arc::new(Shared { inner, max_bytes }) }
    }

    /// Blobs reported present, written or read within `min` are not
    /// evicted (none by default); a write that finds no other room fails
    /// with RESOURCE_EXHAUSTED.
    pub fn with_min_retention(self, min: std::time::Duration) -> Self {
        self.shared.inner.lock().retention = Retention(min);
        self
    }

    /// Moves every blob's last use `by` into the past, as if that time had
    /// passed (tests of the retention).
    #[cfg(test)]
    pub(super) fn age_all(&self, by: std::time::Duration) {
        for (_, entry) in self.shared.inner.lock().blobs.iter_mut() {
            entry.1 -= by;
        }
    }
}

impl Shared {
    fn insert(&self, digest: Digest, data: Bytes) -> Result<()> {
        let size = data.len() as u64;
        check_fits(&digest, self.max_bytes)?;
        let mut inner = self.inner.lock();
        if let Some(entry) = inner.blobs.get_mut(&digest) {
            entry.1 = SystemTime::now();
            return Ok(());
        }
        inner.check_room(self.max_bytes, &digest)?;
        while inner.used + size > self.max_bytes {
            match inner.blobs.pop_lru() {
                Some((_, (old, _))) => {
                    inner.used -= old.len() as u64;
                    inner.evicted += 1;
                }
                None => break,
            }
        }
        inner.used += size;
        inner.blobs.put(digest, (data, SystemTime::now()));
        Ok(())
    }
}

/// What a sink reserves up front, whatever size the blob claims.
const INITIAL_CAPACITY: u64 = 1 << 20;

/// A blob larger than the whole budget can never be stored. The budget is
/// advertised as `max_cas_blob_size_bytes`, and REAPI 2.12 asks for
/// INVALID_ARGUMENT above it (no retrying helps).
pub(crate) fn check_fits(digest: &Digest, max_bytes: u64) -> Result<()> {
    if digest.size > max_bytes {
        return Err(Error::invalid(format!(
            "blob {digest} is larger than the store's whole budget of {max_bytes} bytes (max_cas_blob_size_bytes)"
        )));
    }
    Ok(())
}

#[async_trait]
impl BlobStore for MemoryStore {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let now = SystemTime::now();
        let mut missing = Vec::new();
        for slice in digests.chunks(super::LOOKUPS_PER_LOCK) {
            let mut inner = self.shared.inner.lock();
            missing.extend(slice.iter().filter(|d| match inner.blobs.get_mut(*d) {
                Some(entry) => {
                    entry.1 = now;
                    false
                }
                None => true,
            }));
        }
        Ok(missing)
    }

    async fn get(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> Result<BlobStream> {
        let data = {
            let mut inner = self.shared.inner.lock();
            match inner.blobs.get_mut(digest) {
                Some(entry) => {
                    entry.1 = SystemTime::now();
                    entry.0.clone()
                }
                None => return Err(Error::blob_not_found(digest)),
            }
        };
        stream_bytes(data, offset, limit, digest)
    }

    async fn put(&self, digest: &Digest) -> Result<Box<dyn BlobSink>> {
        check_fits(digest, self.shared.max_bytes)?;
        self.shared.inner.lock().check_room(self.shared.max_bytes, digest)?;
        Ok(Box::new(MemorySink {
            store: self.shared.clone(),
            digest: *digest,
            // The declared size is a client's claim: grow as bytes arrive.
            buf: BytesMut::with_capacity(digest.size.min(INITIAL_CAPACITY) as usize),
        }))
    }

    async fn put_bytes(&self, digest: &Digest, data: Bytes) -> Result<()> {
        self.shared.insert(*digest, data)
    }

    async fn list(&self, limit: usize) -> Result<Vec<BlobInfo>> {
        let inner = self.shared.inner.lock();
        Ok(inner.blobs.iter().take(limit).map(|(d, (_, at))| BlobInfo { digest: *d, last_access: *at }).collect())
    }

    fn usage(&self) -> Usage {
        let inner = self.shared.inner.lock();
        let blobs = inner.blobs.len() as u64;
        Usage { used_bytes: inner.used, max_bytes: self.shared.max_bytes, blobs, evictions: inner.evicted }
    }
}

/// Memory cannot be changed behind the store's back, but the scrub is the
/// same call on every backend (and this store is the tests' fake).
#[async_trait]
impl Scrub for MemoryStore {
    async fn scrub(&self) -> Result<ScrubReport> {
        let blobs: Vec<(Digest, Bytes)> =
            self.shared.inner.lock().blobs.iter().map(|(d, (data, _))| (*d, data.clone())).collect();
        let mut report = ScrubReport::default();
        for (digest, data) in blobs {
            if digest.function.digest_of(&data) == digest {
                report.intact += 1;
                report.bytes += digest.size;
            } else {
                let mut inner = self.shared.inner.lock();
                if inner.blobs.pop(&digest).is_some() {
                    inner.used -= digest.size;
                }
                report.corrupt += 1;
            }
        }
        Ok(report)
    }
}

struct MemorySink {
    store: Arc<Shared>,
    digest: Digest,
    buf: BytesMut,
}

#[async_trait]
impl BlobSink for MemorySink {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        self.buf.extend_from_slice(&data);
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        self.store.insert(self.digest, self.buf.freeze())
    }
}
