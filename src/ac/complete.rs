//! ActionCache completeness as a decorator: results are read and written
//! through [`ActionResults`], whose one implementation here checks every
//! entry against the CAS before handing it out.
//!
//! Invariant: a lookup hit names no blob that is absent from the CAS. Builds
//! that never download outputs ("build without the bytes") rely on that; an
//! entry whose blobs were evicted is removed and reported as a miss, so the
//! client re-executes instead of failing later.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use prost::Message;
use remote_apis::reapi::{ActionResult, Tree};
use remote_apis::{Digest, DigestFunction};
use tonic::Code;

use super::store::{AcKey, AcStore};
use crate::error::{Error, Result};
use crate::store::Store;

/// Trees larger than this are checked only by their own presence.
const TREE_READ_LIMIT: u64 = 16 << 20;

/// Decoded ActionResults by key. The ActionCache service, the Execution
/// service and the scheduler depend on this, never on the gRPC service, so
/// the cache policy (completeness today) is one decorator they all share.
#[async_trait]
pub trait ActionResults: Send + Sync + 'static {
    /// The result for `key`, if it is stored and usable.
    async fn lookup(&self, key: &AcKey, function: DigestFunction) -> Result<Option<ActionResult>>;
    async fn store(&self, key: &AcKey, result: &ActionResult) -> Result<()>;
}

/// Results over an [`AcStore`], returned only when every blob they name is
/// in the CAS; incomplete or undecodable entries are removed.
pub struct CompleteResults {
    results: Arc<dyn AcStore>,
    cas: Store,
    metrics: Option<crate::metrics::AcMetrics>,
}

impl CompleteResults {
    pub fn new(results: Arc<dyn AcStore>, cas: Store) -> Self {
        CompleteResults { results, cas, metrics: None }
    }

    /// Counts the incomplete entries hidden, in `metrics`.
    pub fn with_metrics(self, metrics: Option<crate::metrics::AcMetrics>) -> Self {
        CompleteResults { metrics, ..self }
    }

    async fn drop_incomplete(&self, key: &AcKey) -> Result<Option<ActionResult>> {
        self.results.remove(key).await?;
        if let Some(m) = &self.metrics {
            m.incomplete();
        }
        Ok(None)
    }
}

#[async_trait]
impl ActionResults for CompleteResults {
    async fn lookup(&self, key: &AcKey, function: DigestFunction) -> Result<Option<ActionResult>> {
        let Some(data) = self.results.get(key).await? else { return Ok(None) };
        let Ok(result) = ActionResult::decode(data.as_ref()) else {
            tracing::warn!("dropping an undecodable action cache entry");
            self.results.remove(key).await?;
            return Ok(None);
        };
        let referenced = match referenced_blobs(&self.cas, function, &result).await {
            Ok(r) => r,
            Err(e) if e.code == Code::NotFound => return self.drop_incomplete(key).await,
            Err(e) => return Err(e),
        };
        let missing = self.cas.find_missing(&referenced).await?;
        if !missing.is_empty() {
            tracing::debug!(missing = missing.len(), "action cache entry is incomplete; removing it");
            return self.drop_incomplete(key).await;
        }
        Ok(Some(result))
    }

    async fn store(&self, key: &AcKey, result: &ActionResult) -> Result<()> {
        self.results.put(key, Bytes::from(result.encode_to_vec())).await
    }
}

/// Every blob an ActionResult depends on, including the files inside its
/// output directories' Trees. NOT_FOUND if a Tree itself is gone.
async fn referenced_blobs(cas: &Store, function: DigestFunction, result: &ActionResult) -> Result<Vec<Digest>> {
    let mut out = Vec::new();
    let mut add = |d: Option<&remote_apis::reapi::Digest>| -> Result<()> {
        if let Some(d) = d {
            out.push(Digest::from_proto(function, d)?);
        }
        Ok(())
    };
    for f in &result.output_files {
        add(f.digest.as_ref())?;
    }
    add(result.stdout_digest.as_ref())?;
    add(result.stderr_digest.as_ref())?;
    let trees = result
        .output_directories
        .iter()
        .filter_map(|d| d.tree_digest.as_ref())
        .map(|d| Digest::from_proto(function, d))
        .collect::<Result<Vec<_>, _>>()?;
    out.extend_from_slice(&trees);
    for tree_digest in trees {
        if tree_digest.size > TREE_READ_LIMIT {
            continue;
        }
        let data = cas.get_bytes(&tree_digest).await?;
        let tree = Tree::decode(data.as_ref())
            .map_err(|e| Error::invalid(format!("output tree {tree_digest} is not a Tree: {e}")))?;
        for dir in tree.root.iter().chain(tree.children.iter()) {
            for f in &dir.files {
                if let Some(d) = &f.digest {
                    out.push(Digest::from_proto(function, d)?);
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ac::MemoryAcStore;
    use crate::store::memory::MemoryStore;
    use remote_apis::reapi::OutputFile;

    fn results() -> (CompleteResults, Arc<dyn AcStore>, Store) {
        let cas = crate::store::cas(Arc::new(MemoryStore::new(1 << 20)));
        let ac: Arc<dyn AcStore> = Arc::new(MemoryAcStore::new(10));
        (CompleteResults::new(ac.clone(), cas.clone()), ac, cas)
    }

    fn key() -> AcKey {
        let action = DigestFunction::Sha256.digest_of(b"action");
        AcKey::new(&remote_apis::InstanceName::default(), &action)
    }

    #[tokio::test]
    async fn a_result_whose_blobs_are_all_present_is_a_hit() {
        let (r, _, cas) = results();
        let blob = DigestFunction::Sha256.digest_of(b"out");
        cas.put_bytes(&blob, Bytes::from_static(b"out")).await.unwrap();
        let file = OutputFile { path: "out".into(), digest: Some(blob.to_proto()), ..Default::default() };
        let result = ActionResult { output_files: vec![file], ..Default::default() };
        r.store(&key(), &result).await.unwrap();
        assert_eq!(r.lookup(&key(), DigestFunction::Sha256).await.unwrap(), Some(result));
    }

    #[tokio::test]
    async fn a_result_naming_an_absent_blob_is_a_miss_and_is_removed() {
        let (r, ac, _) = results();
        let blob = DigestFunction::Sha256.digest_of(b"evicted");
        let file = OutputFile { path: "out".into(), digest: Some(blob.to_proto()), ..Default::default() };
        r.store(&key(), &ActionResult { output_files: vec![file], ..Default::default() }).await.unwrap();
        assert_eq!(r.lookup(&key(), DigestFunction::Sha256).await.unwrap(), None);
        assert!(ac.get(&key()).await.unwrap().is_none(), "the incomplete entry is gone");
    }

    #[tokio::test]
    async fn an_undecodable_entry_is_a_miss_and_is_removed() {
        let (r, ac, _) = results();
        ac.put(&key(), Bytes::from_static(b"\xff\xff not a result")).await.unwrap();
        assert_eq!(r.lookup(&key(), DigestFunction::Sha256).await.unwrap(), None);
        assert!(ac.get(&key()).await.unwrap().is_none());
    }
}
