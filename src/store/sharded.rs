//! Blobs and ActionCache entries spread over several stores
//! (`type = "sharded"`) by weighted rendezvous hashing: each key goes to
//! the shard with the highest score `-weight / ln(u)`, `u` a uniform (0,1)
//! drawn from a hash of the shard's name and the key. A shard's share of
//! the keys is its share of the weights, and adding or removing a shard
//! moves only the keys it gains or held. Shards are known by their store's
//! name, not their place in the list, so reordering moves nothing.
//!
//! Usage is the sum over the shards; a listing merges theirs, most
//! recently used first.

use std::collections::HashSet;

use async_trait::async_trait;
use bytes::Bytes;
use remote_apis::Digest;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::{BlobInfo, BlobSink, BlobStore, BlobStream, Store, Usage};
use crate::ac::{AcKey, AcStore};
use crate::error::Result;

/// `[stores.NAME] type = "sharded"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardedConfig {
    pub shards: Vec<ShardConfig>,
}

/// One entry of `shards = [{ store = "a", weight = 1 }, ...]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardConfig {
    pub store: String,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

impl ShardedConfig {
    pub(crate) fn check(&self) -> std::result::Result<(), String> {
        if self.shards.is_empty() {
            return Err("shards: name at least one store".into());
        }
        let mut seen = HashSet::new();
        for shard in &self.shards {
            if shard.weight == 0 {
                return Err(format!("shards: store {:?} has weight 0 (remove it instead)", shard.store));
            }
            if !seen.insert(&shard.store) {
                return Err(format!("shards: store {:?} is named twice (raise its weight instead)", shard.store));
            }
        }
        Ok(())
    }
}

/// The shard selector: which of the named, weighted shards a key goes to.
#[derive(Debug, Clone)]
pub struct Rendezvous {
    /// Per shard: a seed from its name, and its weight.
    shards: Vec<(u64, f64)>,
}

impl Rendezvous {
    pub fn new<'a>(shards: impl IntoIterator<Item = (&'a str, u32)>) -> Self {
        let shards = shards
            .into_iter()
            .map(|(name, weight)| {
                let h = Sha256::digest(name.as_bytes());
                (u64::from_le_bytes(h[..8].try_into().expect("8 bytes")), f64::from(weight))
            })
            .collect();
        Rendezvous { shards }
    }

    /// The shard of a key. Keys are digests (uniform already), so their
    /// first eight bytes, mixed with the shard's seed, are the draw.
    pub fn pick(&self, key: &[u8; 32]) -> usize {
        let key = u64::from_le_bytes(key[..8].try_into().expect("8 bytes"));
        let mut best = (0, f64::NEG_INFINITY);
        for (i, (seed, weight)) in self.shards.iter().enumerate() {
            let x = mix(mix(key ^ seed).wrapping_add(*seed));
            // 53 random bits, shifted off 0 and 1: ln(u) is finite and < 0.
            let u = ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            let score = -weight / u.ln();
            if score > best.1 {
                best = (i, score);
            }
        }
        best.0
    }
}

/// A 64-bit finalizer (MurmurHash3's): every input bit flips about half of
/// the output bits, so one shard's draw says nothing of another's.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// Blobs over shards.
pub struct Sharded {
    ring: Rendezvous,
    stores: Vec<Store>,
}

impl Sharded {
    /// `shards`: each store with its name and weight.
    pub fn new(shards: Vec<(String, u32, Store)>) -> Self {
        let ring = Rendezvous::new(shards.iter().map(|(n, w, _)| (n.as_str(), *w)));
        Sharded { ring, stores: shards.into_iter().map(|(_, _, s)| s).collect() }
    }

    fn shard(&self, digest: &Digest) -> &Store {
        &self.stores[self.ring.pick(&digest.hash)]
    }
}

/// Asks each store for the digests `route` gives it, all at once, and
/// answers in the order asked.
pub(super) async fn find_missing_routed(
    stores: &[Store],
    digests: &[Digest],
    route: impl Fn(&Digest) -> usize,
) -> Result<Vec<Digest>> {
    let mut groups = vec![Vec::new(); stores.len()];
    for d in digests {
        groups[route(d)].push(*d);
    }
    let asks = stores.iter().zip(&groups).filter(|(_, g)| !g.is_empty()).map(|(s, g)| s.find_missing(g));
    let missing: HashSet<Digest> = futures::future::try_join_all(asks).await?.into_iter().flatten().collect();
    Ok(digests.iter().filter(|d| missing.contains(d)).copied().collect())
}

/// Usage summed over stores.
pub(super) fn usage_sum(stores: &[Store]) -> Usage {
    stores.iter().map(|s| s.usage()).fold(Usage::default(), |a, u| Usage {
        used_bytes: a.used_bytes + u.used_bytes,
        max_bytes: a.max_bytes + u.max_bytes,
        blobs: a.blobs + u.blobs,
        evictions: a.evictions + u.evictions,
    })
}

/// Listings merged, most recently used first.
pub(super) async fn list_merged(stores: &[Store], limit: usize) -> Result<Vec<BlobInfo>> {
    let lists = futures::future::try_join_all(stores.iter().map(|s| s.list(limit))).await?;
    let mut all: Vec<BlobInfo> = lists.into_iter().flatten().collect();
    all.sort_by_key(|b| std::cmp::Reverse(b.last_access));
    all.truncate(limit);
    Ok(all)
}

#[async_trait]
impl BlobStore for Sharded {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        find_missing_routed(&self.stores, digests, |d| self.ring.pick(&d.hash)).await
    }

    async fn get(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> Result<BlobStream> {
        self.shard(digest).get(digest, offset, limit).await
    }

    async fn put(&self, digest: &Digest) -> Result<Box<dyn BlobSink>> {
        self.shard(digest).put(digest).await
    }

    async fn put_bytes(&self, digest: &Digest, data: Bytes) -> Result<()> {
        self.shard(digest).put_bytes(digest, data).await
    }

    async fn list(&self, limit: usize) -> Result<Vec<BlobInfo>> {
        list_merged(&self.stores, limit).await
    }

    fn usage(&self) -> Usage {
        usage_sum(&self.stores)
    }
}

/// ActionCache entries over shards, by the same hashing (their keys are
/// SHA-256 values too).
pub struct ShardedAc {
    ring: Rendezvous,
    stores: Vec<std::sync::Arc<dyn AcStore>>,
}

impl ShardedAc {
    pub fn new(shards: Vec<(String, u32, std::sync::Arc<dyn AcStore>)>) -> Self {
        let ring = Rendezvous::new(shards.iter().map(|(n, w, _)| (n.as_str(), *w)));
        ShardedAc { ring, stores: shards.into_iter().map(|(_, _, s)| s).collect() }
    }

    fn shard(&self, key: &AcKey) -> &dyn AcStore {
        self.stores[self.ring.pick(key.bytes())].as_ref()
    }
}

#[async_trait]
impl AcStore for ShardedAc {
    async fn get(&self, key: &AcKey) -> Result<Option<Bytes>> {
        self.shard(key).get(key).await
    }

    async fn put(&self, key: &AcKey, value: Bytes) -> Result<()> {
        self.shard(key).put(key, value).await
    }

    async fn remove(&self, key: &AcKey) -> Result<()> {
        self.shard(key).remove(key).await
    }
}
