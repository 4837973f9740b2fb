//! Hash and size verification of every write.

use async_trait::async_trait;
use bytes::Bytes;
use remote_apis::{Digest, Hasher};

use super::{BlobInfo, BlobSink, BlobStore, BlobStream, Store, Usage};
use crate::error::{Error, Result};

/// Hashes every blob while it is written and refuses the commit
/// (INVALID_ARGUMENT, nothing stored) if the bytes are not the digest's.
pub struct Verify {
    inner: Store,
}

impl Verify {
    pub fn new(inner: Store) -> Self {
        Verify { inner }
    }
}

#[async_trait]
impl BlobStore for Verify {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        self.inner.find_missing(digests).await
    }

    async fn get(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> Result<BlobStream> {
        self.inner.get(digest, offset, limit).await
    }

    async fn put(&self, digest: &Digest) -> Result<Box<dyn BlobSink>> {
        let inner = self.inner.put(digest).await?;
        Ok(Box::new(VerifyingSink { inner, hasher: digest.function.hasher(), expected: *digest }))
    }

    async fn put_bytes(&self, digest: &Digest, data: Bytes) -> Result<()> {
        check(digest, digest.function.digest_of(&data))?;
        self.inner.put_bytes(digest, data).await
    }

    async fn list(&self, limit: usize) -> Result<Vec<BlobInfo>> {
        self.inner.list(limit).await
    }

    fn usage(&self) -> Usage {
        self.inner.usage()
    }
}

struct VerifyingSink {
    inner: Box<dyn BlobSink>,
    hasher: Hasher,
    expected: Digest,
}

#[async_trait]
impl BlobSink for VerifyingSink {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        let total = self.hasher.len() + data.len() as u64;
        if total > self.expected.size {
            return Err(Error::invalid(format!(
                "upload of {} sent at least {total} bytes, more than the digest's size",
                self.expected
            )));
        }
        self.hasher.update(&data);
        self.inner.write(data).await
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        let VerifyingSink { inner, hasher, expected } = *self;
        check(&expected, hasher.finish())?;
        inner.commit().await
    }
}

fn check(expected: &Digest, actual: Digest) -> Result<()> {
    if actual.size != expected.size {
        return Err(Error::invalid(format!(
            "upload of {expected} ended after {} bytes, not the digest's {}",
            actual.size, expected.size
        )));
    }
    if actual != *expected {
        return Err(Error::invalid(format!("uploaded bytes hash to {actual}, not to the declared digest {expected}")));
    }
    Ok(())
}
