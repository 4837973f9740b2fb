//! The one factory from the resolved store graph (`config::StoreGraph`) to
//! the objects the server runs on.
//!
//! Stores are built in the graph's order, each after the stores it names,
//! and each once: a store named by two parents (a disk that is both a tier
//! and a shard, say) is one object with one index and one budget. Nothing
//! else knows the config schema.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;

use crate::store::grpc::GrpcStore;
use crate::store::redis::RedisStore;
use crate::store::s3::S3Store;

use super::existence_cache::ExistenceCache;
use super::fs::FsStore;
use super::memory::MemoryStore;
use super::sharded::{Sharded, ShardedAc};
use super::size_partitioned::SizePartitioned;
use super::tiered::{Tiered, TieredAc};
use super::{Scrub, ScrubReport, Store};
use crate::ac::{AcStore, FsAcStore, MemoryAcStore};
use crate::config::{StoreGraph, StoreSpec};
use crate::error::{Error, Result};
use crate::server::Stores;

/// One built store: its blobs (raw: the server puts the CAS behind
/// verification), its ActionCache if it keeps one, and its scrub if it
/// can check its own bytes (the local backends).
#[derive(Clone)]
pub struct Node {
    pub blobs: Store,
    pub ac: Option<Arc<dyn AcStore>>,
    pub scrub: Option<Arc<dyn Scrub>>,
}

/// Builds every store of `graph` and hands out the CAS, the ActionCache
/// and the built-in workers' store.
pub async fn open(graph: &StoreGraph) -> anyhow::Result<Stores> {
    let mut built: HashMap<&str, Node> = HashMap::new();
    for name in &graph.order {
        let spec = &graph.stores[name];
        let node = build(spec, &built).await?;
        tracing::debug!(store = %name, kind = spec.kind(), "store opened");
        built.insert(name, node);
    }
    let cas_node = &built[graph.cas.as_str()];
    let cas = super::cas(cas_node.blobs.clone());
    // The same object when the workers use the CAS store, so the server can
    // tell (and meter it once).
    let worker = match graph.worker == graph.cas {
        true => cas.clone(),
        false => super::cas(built[graph.worker.as_str()].blobs.clone()),
    };
    let ac = built[graph.ac.as_str()].ac.clone().context("the ActionCache store keeps no ActionCache")?;
    let scrub = match &cas_node.scrub {
        Some(scrub) => scrub.clone(),
        None => Arc::new(NoScrub { description: graph.cas_description() }),
    };
    Ok(Stores { cas, ac, scrub, worker })
}

/// One store, from its spec and the stores it names (built already).
async fn build(spec: &StoreSpec, built: &HashMap<&str, Node>) -> anyhow::Result<Node> {
    let child = |n: &String| built[n.as_str()].clone();
    Ok(match spec {
        StoreSpec::Filesystem(f) => {
            let f = f.clone();
            let path = f.path.clone();
            let (blobs, ac) = tokio::task::spawn_blocking(move || {
                let (max, verify_below) = (f.max_size.as_u64(), f.verify_reads_below.as_u64());
                let blobs = FsStore::open(&f.path, max, f.fsync, verify_below)?.with_min_retention(f.min_retention);
                anyhow::Ok((blobs, FsAcStore::open(&f.path)?))
            })
            .await?
            .with_context(|| format!("opening the store in {}", path.display()))?;
            let blobs = Arc::new(blobs);
            Node { blobs: blobs.clone(), ac: Some(Arc::new(ac)), scrub: Some(blobs) }
        }
        StoreSpec::Memory(m) => {
            let blobs = Arc::new(MemoryStore::new(m.max_size.as_u64()).with_min_retention(m.min_retention));
            let ac = (m.max_entries > 0).then(|| Arc::new(MemoryAcStore::new(m.max_entries)) as Arc<dyn AcStore>);
            Node { blobs: blobs.clone(), ac, scrub: Some(blobs) }
        }
        StoreSpec::Tiered(t) => {
            let (fast, slow) = (child(&t.fast), child(&t.slow));
            let ac = match (fast.ac, slow.ac) {
                (Some(f), Some(s)) => Some(Arc::new(TieredAc::new(f, s)) as Arc<dyn AcStore>),
                _ => None,
            };
            Node { blobs: Arc::new(Tiered::new(fast.blobs, slow.blobs, t.write)), ac, scrub: None }
        }
        StoreSpec::Sharded(s) => {
            let shards: Vec<(String, u32, Node)> =
                s.shards.iter().map(|sh| (sh.store.clone(), sh.weight, child(&sh.store))).collect();
            let acs: Option<Vec<_>> =
                shards.iter().map(|(n, w, node)| Some((n.clone(), *w, node.ac.clone()?))).collect();
            let blobs = Sharded::new(shards.into_iter().map(|(n, w, node)| (n, w, node.blobs)).collect());
            let ac = acs.map(|acs| Arc::new(ShardedAc::new(acs)) as Arc<dyn AcStore>);
            Node { blobs: Arc::new(blobs), ac, scrub: None }
        }
        StoreSpec::SizePartitioned(p) => {
            let (small, large) = (child(&p.small), child(&p.large));
            let blobs = SizePartitioned::new(p.threshold.as_u64(), small.blobs, large.blobs);
            Node { blobs: Arc::new(blobs), ac: small.ac, scrub: None }
        }
        StoreSpec::Redis(r) => {
            let store = Arc::new(RedisStore::open(r).await.map_err(|e| anyhow::anyhow!(e.message))?);
            Node { blobs: store.clone(), ac: Some(store), scrub: None }
        }
        StoreSpec::S3(c) => {
            let store = Arc::new(S3Store::open(c).await.map_err(|e| anyhow::anyhow!(e.message))?);
            Node { blobs: store.clone(), ac: Some(store), scrub: None }
        }
        StoreSpec::Grpc(c) => {
            let store = Arc::new(GrpcStore::open(c).await.map_err(|e| anyhow::anyhow!(e.message))?);
            Node { blobs: store.clone(), ac: Some(store), scrub: None }
        }
        StoreSpec::ExistenceCache(e) => {
            let inner = child(&e.store);
            let blobs = ExistenceCache::new(inner.blobs, e.ttl, e.max_entries);
            Node { blobs: Arc::new(blobs), ac: inner.ac, scrub: None }
        }
    })
}

/// The admin scrub of a CAS that cannot check its own bytes (a decorator
/// or a remote engine): a clear refusal, naming what to do instead.
struct NoScrub {
    description: String,
}

#[async_trait]
impl Scrub for NoScrub {
    async fn scrub(&self) -> Result<ScrubReport> {
        Err(Error::new(
            tonic::Code::FailedPrecondition,
            format!(
                "the CAS store ({}) cannot be scrubbed: only filesystem and memory stores re-hash their blobs; \
                 remote engines check their own",
                self.description
            ),
        ))
    }
}
