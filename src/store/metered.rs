//! Metrics of a store, as a decorator: every call counted by kind and
//! result, bytes counted as they pass, committed blob sizes. The backend
//! never knows.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use remote_apis::Digest;

use super::{BlobInfo, BlobSink, BlobStore, BlobStream, Store, Usage};
use crate::ac::{AcKey, AcStore};
use crate::error::Result;
use crate::metrics::StoreMetrics;
use crate::metrics::store::{Op, Outcome};

/// A [`BlobStore`] whose calls are recorded in `metrics`.
pub struct Metered {
    inner: Store,
    metrics: StoreMetrics,
}

impl Metered {
    pub fn new(inner: Store, metrics: StoreMetrics) -> Self {
        Metered { inner, metrics }
    }

    fn record<T>(&self, op: Op, result: Result<T>) -> Result<T> {
        self.metrics.op(op, Outcome::of(&result));
        result
    }
}

#[async_trait]
impl BlobStore for Metered {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let result = self.inner.find_missing(digests).await;
        self.record(Op::FindMissing, result)
    }

    async fn get(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> Result<BlobStream> {
        let result = self.inner.get(digest, offset, limit).await;
        let stream = self.record(Op::Get, result)?;
        let metrics = self.metrics.clone();
        Ok(stream
            .inspect(move |chunk| {
                if let Ok(chunk) = chunk {
                    metrics.read(chunk.len() as u64);
                }
            })
            .boxed())
    }

    async fn put(&self, digest: &Digest) -> Result<Box<dyn BlobSink>> {
        let result = self.inner.put(digest).await;
        let sink = match result {
            Ok(sink) => sink,
            Err(e) => return self.record(Op::Put, Err(e)),
        };
        Ok(Box::new(MeteredSink { inner: sink, metrics: self.metrics.clone(), size: digest.size }))
    }

    async fn get_bytes(&self, digest: &Digest) -> Result<Bytes> {
        let result = self.inner.get_bytes(digest).await;
        let data = self.record(Op::Get, result)?;
        self.metrics.read(data.len() as u64);
        Ok(data)
    }

    async fn put_bytes(&self, digest: &Digest, data: Bytes) -> Result<()> {
        let len = data.len() as u64;
        let result = self.inner.put_bytes(digest, data).await;
        self.metrics.written(len);
        self.record(Op::Put, result)?;
        self.metrics.committed(digest.size);
        Ok(())
    }

    async fn list(&self, limit: usize) -> Result<Vec<BlobInfo>> {
        self.inner.list(limit).await
    }

    fn usage(&self) -> Usage {
        self.inner.usage()
    }
}

/// A write: bytes counted as they arrive, the put counted at its end.
struct MeteredSink {
    inner: Box<dyn BlobSink>,
    metrics: StoreMetrics,
    size: u64,
}

#[async_trait]
impl BlobSink for MeteredSink {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        self.metrics.written(data.len() as u64);
        let result = self.inner.write(data).await;
        if result.is_err() {
            self.metrics.op(Op::Put, Outcome::Error);
        }
        result
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        let MeteredSink { inner, metrics, size } = *self;
        let result = inner.commit().await;
        metrics.op(Op::Put, Outcome::of(&result));
        if result.is_ok() {
            metrics.committed(size);
        }
        result
    }
}

/// The ActionCache's store, recorded the same way (a miss is `get`
/// `not_found`).
pub struct MeteredAc {
    inner: Arc<dyn AcStore>,
    metrics: StoreMetrics,
}

impl MeteredAc {
    pub fn new(inner: Arc<dyn AcStore>, metrics: StoreMetrics) -> Self {
        MeteredAc { inner, metrics }
    }
}

#[async_trait]
impl AcStore for MeteredAc {
    async fn get(&self, key: &AcKey) -> Result<Option<Bytes>> {
        let result = self.inner.get(key).await;
        let outcome = match &result {
            Ok(Some(value)) => {
                self.metrics.read(value.len() as u64);
                Outcome::Ok
            }
            Ok(None) => Outcome::NotFound,
            Err(_) => Outcome::Error,
        };
        self.metrics.op(Op::Get, outcome);
        result
    }

    async fn put(&self, key: &AcKey, value: Bytes) -> Result<()> {
        let len = value.len() as u64;
        let result = self.inner.put(key, value).await;
        self.metrics.op(Op::Put, Outcome::of(&result));
        if result.is_ok() {
            self.metrics.written(len);
            self.metrics.committed(len);
        }
        result
    }

    async fn remove(&self, key: &AcKey) -> Result<()> {
        let result = self.inner.remove(key).await;
        self.metrics.op(Op::Remove, Outcome::of(&result));
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::store::memory::MemoryStore;

    fn sample(text: &str, name: &str, labels: &str) -> f64 {
        let prefix = format!("{name}{{{labels}}} ");
        let line = text.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no {prefix} in\n{text}"));
        line[prefix.len()..].parse().unwrap()
    }

    #[tokio::test]
    async fn calls_bytes_and_sizes_are_recorded() {
        let metrics = Metrics::new();
        let backend: Store = Arc::new(MemoryStore::new(1 << 20));
        let store = Metered::new(crate::store::cas(backend), metrics.store("cas", None));
        let data = Bytes::from_static(b"hello metrics");
        let d = remote_apis::DigestFunction::Sha256.digest_of(&data);
        store.put_bytes(&d, data.clone()).await.unwrap();
        let mut sink = store.put(&d).await.unwrap();
        sink.write(Bytes::from_static(b"wrong bytes!!")).await.unwrap();
        assert!(sink.commit().await.is_err(), "the verifier refuses it");
        assert_eq!(store.get_bytes(&d).await.unwrap(), data);
        let absent = remote_apis::DigestFunction::Sha256.digest_of(b"absent");
        assert!(store.get(&absent, 0, None).await.is_err());
        assert_eq!(store.find_missing(&[d, absent]).await.unwrap(), [absent]);

        let text = metrics.encode(false);
        let ops = |op: &str, result: &str| {
            sample(&text, "distbuild_store_operations_total", &format!("store=\"cas\",op=\"{op}\",result=\"{result}\""))
        };
        assert_eq!(ops("put", "ok"), 1.0);
        assert_eq!(ops("put", "error"), 1.0);
        assert_eq!(ops("get", "ok"), 1.0);
        assert_eq!(ops("get", "not_found"), 1.0);
        assert_eq!(ops("find_missing", "ok"), 1.0);
        assert_eq!(sample(&text, "distbuild_store_written_bytes_total", "store=\"cas\""), 26.0);
        assert_eq!(sample(&text, "distbuild_store_read_bytes_total", "store=\"cas\""), 13.0);
        assert_eq!(sample(&text, "distbuild_store_blob_size_bytes_count", "store=\"cas\""), 1.0);
        assert_eq!(sample(&text, "distbuild_store_blob_size_bytes_sum", "store=\"cas\""), 13.0);
    }
}
