//! The composing decorators (tiered, sharded, size_partitioned,
//! existence_cache) over real memory and filesystem stores: each through
//! the shared suite, then what is particular to each.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use remote_apis::Digest;
use tonic::Code;

use super::existence_cache::ExistenceCache;
use super::fs::FsStore;
use super::memory::MemoryStore;
use super::sharded::{Rendezvous, Sharded, ShardedAc};
use super::size_partitioned::SizePartitioned;
use super::suite::{ac_suite, blob_suite, salt, salted_blob};
use super::tiered::{FILL_WHOLE_BELOW, Tiered, TieredAc, WriteMode};
use super::{BlobInfo, BlobSink, BlobStore, BlobStream, Store, Usage, cas};
use crate::ac::{AcStore, MemoryAcStore};
use crate::error::{Error, Result};

/// A real store that counts the calls reaching it and fails every call
/// while told to (the engine is "down"). Reports no usage, so the suite
/// does not count bytes a background copy may be adding meanwhile.
struct Probe {
    inner: Store,
    down: AtomicBool,
    find_missing_calls: AtomicUsize,
    digests_asked: AtomicUsize,
}

impl Probe {
    fn new(inner: Store) -> Arc<Probe> {
        Arc::new(Probe {
            inner,
            down: AtomicBool::new(false),
            find_missing_calls: AtomicUsize::new(0),
            digests_asked: AtomicUsize::new(0),
        })
    }

    fn check(&self) -> Result<()> {
        match self.down.load(Ordering::SeqCst) {
            true => Err(Error::new(Code::Unavailable, "probe store: down")),
            false => Ok(()),
        }
    }

    fn calls(&self) -> usize {
        self.find_missing_calls.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl BlobStore for Probe {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        self.find_missing_calls.fetch_add(1, Ordering::SeqCst);
        self.digests_asked.fetch_add(digests.len(), Ordering::SeqCst);
        self.check()?;
        self.inner.find_missing(digests).await
    }

    async fn get(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> Result<BlobStream> {
        self.check()?;
        self.inner.get(digest, offset, limit).await
    }

    async fn put(&self, digest: &Digest) -> Result<Box<dyn BlobSink>> {
        self.check()?;
        self.inner.put(digest).await
    }

    async fn list(&self, limit: usize) -> Result<Vec<BlobInfo>> {
        self.inner.list(limit).await
    }

    fn usage(&self) -> Usage {
        Usage::default()
    }
}

fn memory() -> Store {
    Arc::new(MemoryStore::new(1 << 30))
}

fn fs(dir: &tempfile::TempDir, name: &str) -> Store {
    Arc::new(FsStore::open(&dir.path().join(name), 1 << 30, false, 0).unwrap())
}

fn mem_ac() -> Arc<dyn AcStore> {
    Arc::new(MemoryAcStore::new(1000))
}

async fn has(store: &Store, d: &Digest) -> bool {
    store.find_missing(&[*d]).await.unwrap().is_empty()
}

/// Polls until `store` has `d` (a background copy), at most 10 s.
async fn eventually_has(store: &Store, d: &Digest) -> bool {
    for _ in 0..500 {
        if has(store, d).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn decorators_pass_the_store_suite() {
    let dir = tempfile::tempdir().unwrap();
    let through: Store = Arc::new(Tiered::new(memory(), fs(&dir, "slow"), WriteMode::Through));
    blob_suite("tiered through", cas(through)).await;
    let slow: Store = Probe::new(memory());
    let behind: Store = Arc::new(Tiered::new(fs(&dir, "fast"), slow, WriteMode::Behind));
    blob_suite("tiered behind", cas(behind)).await;
    let shards = vec![("a".into(), 1, memory()), ("b".into(), 2, memory()), ("c".into(), 1, fs(&dir, "c"))];
    blob_suite("sharded", cas(Arc::new(Sharded::new(shards)))).await;
    let sized: Store = Arc::new(SizePartitioned::new(64 << 10, memory(), fs(&dir, "large")));
    blob_suite("size_partitioned", cas(sized)).await;
    let cached: Store = Arc::new(ExistenceCache::new(fs(&dir, "cached"), Duration::from_secs(60), 1000));
    blob_suite("existence_cache", cas(cached)).await;
    // Decorators compose: a cache over a tier over shards.
    let shards = vec![("x".into(), 1, memory()), ("y".into(), 1, memory())];
    let tier: Store = Arc::new(Tiered::new(memory(), Arc::new(Sharded::new(shards)), WriteMode::Through));
    blob_suite("nested", cas(Arc::new(ExistenceCache::new(tier, Duration::from_secs(60), 1000)))).await;

    ac_suite("tiered", Arc::new(TieredAc::new(mem_ac(), mem_ac()))).await;
    let acs = vec![("a".into(), 1, mem_ac()), ("b".into(), 3, mem_ac())];
    ac_suite("sharded", Arc::new(ShardedAc::new(acs))).await;
}

#[tokio::test]
async fn tiered_reads_fill_the_fast_tier_only_with_whole_blobs() {
    let (fast, slow) = (memory(), memory());
    let tiered: Store = Arc::new(Tiered::new(fast.clone(), slow.clone(), WriteMode::Through));
    let salt = salt();
    let (d, data) = salted_blob(salt, 1, 3 << 20);
    slow.put_bytes(&d, data.clone()).await.unwrap();
    assert!(has(&tiered, &d).await, "found in the slow tier");
    // A reader that stops after the first chunk leaves no fill behind.
    let mut stream = tiered.get(&d, 0, None).await.unwrap();
    stream.next().await.unwrap().unwrap();
    drop(stream);
    assert!(!has(&fast, &d).await, "a partial read fills nothing");
    assert_eq!(tiered.get_bytes(&d).await.unwrap(), data);
    assert!(has(&fast, &d).await, "a whole read fills the fast tier");

    // A range of a small blob fetches it whole; of a large one, passes by.
    let (small, sdata) = salted_blob(salt, 2, 100_000);
    slow.put_bytes(&small, sdata.clone()).await.unwrap();
    let part = tiered.get(&small, 10, Some(20)).await.unwrap().next().await.unwrap().unwrap();
    assert_eq!(part, sdata.slice(10..30));
    assert!(has(&fast, &small).await, "a small blob's range read fills");
    let (large, ldata) = salted_blob(salt, 3, FILL_WHOLE_BELOW as usize + 1);
    slow.put_bytes(&large, ldata.clone()).await.unwrap();
    let part = tiered.get(&large, 5, Some(5)).await.unwrap().next().await.unwrap().unwrap();
    assert_eq!(part, ldata.slice(5..10));
    assert!(!has(&fast, &large).await, "a large blob's range read does not");

    // A slow tier that returns wrong bytes cannot plant them in the fast one.
    let (claimed, _) = salted_blob(salt, 4, 1000);
    let (_, other) = salted_blob(salt, 5, 1000);
    slow.put_bytes(&claimed, other).await.unwrap();
    let _ = tiered.get_bytes(&claimed).await;
    assert!(!has(&fast, &claimed).await);
}

#[tokio::test]
async fn tiered_write_through_needs_both_tiers() {
    let (fast, slow) = (memory(), Probe::new(memory()));
    let tiered: Store = Arc::new(Tiered::new(fast.clone(), slow.clone(), WriteMode::Through));
    let (d, data) = salted_blob(salt(), 1, 1 << 20);
    tiered.put_bytes(&d, data.clone()).await.unwrap();
    let slow_store: Store = slow.clone();
    assert!(has(&fast, &d).await && has(&slow_store, &d).await);
    // Slow down: the write fails and the fast tier does not get the blob.
    slow.down.store(true, Ordering::SeqCst);
    let (e, edata) = salted_blob(salt(), 2, 1000);
    let err = cas(tiered.clone()).put_bytes(&e, edata.clone()).await.unwrap_err();
    assert_eq!(err.code, Code::Unavailable);
    assert!(!has(&fast, &e).await);
    // A read of a blob only the slow tier had reports the engine, not absence.
    slow.down.store(false, Ordering::SeqCst);
    slow.put_bytes(&e, edata).await.unwrap();
    slow.down.store(true, Ordering::SeqCst);
    assert_eq!(tiered.get(&e, 0, None).await.err().unwrap().code, Code::Unavailable);
}

#[tokio::test]
async fn tiered_write_behind_copies_later_and_survives_a_failing_slow_tier() {
    let dir = tempfile::tempdir().unwrap();
    let (fast, probe) = (fs(&dir, "fast"), Probe::new(memory()));
    let slow: Store = probe.clone();
    let tiered: Store = Arc::new(Tiered::new(fast.clone(), slow.clone(), WriteMode::Behind));
    let (d, data) = salted_blob(salt(), 1, 2 << 20);
    cas(tiered.clone()).put_bytes(&d, data.clone()).await.unwrap();
    assert!(has(&fast, &d).await, "acknowledged: the fast tier has it");
    assert!(eventually_has(&slow, &d).await, "then the slow tier has it");

    // The slow tier down: writes still succeed, reads are served fast.
    probe.down.store(true, Ordering::SeqCst);
    let (e, edata) = salted_blob(salt(), 2, 1000);
    cas(tiered.clone()).put_bytes(&e, edata.clone()).await.unwrap();
    assert_eq!(tiered.get_bytes(&e).await.unwrap(), edata);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Back up: the next read retries the failed copy.
    probe.down.store(false, Ordering::SeqCst);
    assert!(!has(&slow, &e).await, "the copy failed while the slow tier was down");
    assert_eq!(tiered.get_bytes(&e).await.unwrap(), edata);
    assert!(eventually_has(&slow, &e).await, "retried at the next read");
}

#[tokio::test]
async fn tiered_action_cache_reads_fast_then_slow_and_fills() {
    let (fast, slow) = (mem_ac(), mem_ac());
    let ac = TieredAc::new(fast.clone(), slow.clone());
    let key = crate::ac::AcKey::derived("tiered-test", &["1"]);
    slow.put(&key, Bytes::from_static(b"result")).await.unwrap();
    assert_eq!(ac.get(&key).await.unwrap().as_deref(), Some(&b"result"[..]));
    assert_eq!(fast.get(&key).await.unwrap().as_deref(), Some(&b"result"[..]), "filled");
    ac.put(&key, Bytes::from_static(b"new")).await.unwrap();
    assert_eq!(slow.get(&key).await.unwrap().as_deref(), Some(&b"new"[..]), "written to both");
}

/// Random keys, as digests are.
fn keys(n: usize) -> Vec<[u8; 32]> {
    let salt = salt();
    (0..n).map(|i| remote_apis::DigestFunction::Sha256.digest_of(format!("{salt}-{i}").as_bytes()).hash).collect()
}

#[test]
fn rendezvous_shares_follow_the_weights_and_new_shards_take_only_their_share() {
    let keys = keys(10_000);
    let ring = Rendezvous::new([("a", 1), ("b", 2), ("c", 3)]);
    let picks: Vec<usize> = keys.iter().map(|k| ring.pick(k)).collect();
    for (shard, weight) in [(0, 1.0), (1, 2.0), (2, 3.0)] {
        let share = picks.iter().filter(|p| **p == shard).count() as f64 / keys.len() as f64;
        assert!((share - weight / 6.0).abs() < 0.02, "shard {shard}: share {share}");
    }
    // Reordering the list changes no key's store.
    let reordered = Rendezvous::new([("c", 3), ("a", 1), ("b", 2)]);
    let names = ["a", "b", "c"];
    let renamed = ["c", "a", "b"];
    assert!(keys.iter().all(|k| names[ring.pick(k)] == renamed[reordered.pick(k)]));
    // A fourth shard of weight 2 takes about 2/8 of the keys, all of them
    // from the others, and moves nothing else.
    let grown = Rendezvous::new([("a", 1), ("b", 2), ("c", 3), ("d", 2)]);
    let mut moved = 0;
    for (k, before) in keys.iter().zip(&picks) {
        let after = grown.pick(k);
        if after != *before {
            assert_eq!(after, 3, "a key moved between old shards");
            moved += 1;
        }
    }
    let share = moved as f64 / keys.len() as f64;
    assert!((share - 0.25).abs() < 0.02, "moved {share}");
    // Removing shard b moves only b's keys.
    let shrunk = Rendezvous::new([("a", 1), ("c", 3)]);
    for (k, before) in keys.iter().zip(&picks) {
        if *before != 1 {
            assert_eq!(["a", "c"][shrunk.pick(k)], names[*before]);
        }
    }
}

#[tokio::test]
async fn sharded_blobs_land_on_their_shard_only() {
    let (a, b) = (memory(), memory());
    let sharded: Store = Arc::new(Sharded::new(vec![("a".into(), 1, a.clone()), ("b".into(), 1, b.clone())]));
    let ring = Rendezvous::new([("a", 1), ("b", 1)]);
    let salt = salt();
    for seed in 0..20 {
        let (d, data) = salted_blob(salt, seed, 100);
        sharded.put_bytes(&d, data).await.unwrap();
        let (home, other) = if ring.pick(&d.hash) == 0 { (&a, &b) } else { (&b, &a) };
        assert!(has(home, &d).await && !has(other, &d).await);
    }
}

#[tokio::test]
async fn size_partitioned_routes_by_size() {
    let (small, large) = (memory(), memory());
    let store: Store = Arc::new(SizePartitioned::new(1000, small.clone(), large.clone()));
    let salt = salt();
    let (below, bdata) = salted_blob(salt, 1, 999);
    let (at, adata) = salted_blob(salt, 2, 1000);
    store.put_bytes(&below, bdata).await.unwrap();
    store.put_bytes(&at, adata).await.unwrap();
    assert!(has(&small, &below).await && !has(&large, &below).await);
    assert!(has(&large, &at).await && !has(&small, &at).await);
    let (absent, _) = salted_blob(salt, 3, 5000);
    assert_eq!(store.find_missing(&[absent, below, at]).await.unwrap(), vec![absent]);
}

#[tokio::test]
async fn existence_cache_answers_present_blobs_without_the_inner_store() {
    let probe = Probe::new(memory());
    let cache: Store = Arc::new(ExistenceCache::new(probe.clone(), Duration::from_secs(60), 100));
    let salt = salt();
    let (d, data) = salted_blob(salt, 1, 100);
    let (absent, _) = salted_blob(salt, 2, 100);
    probe.put_bytes(&d, data).await.unwrap();
    assert_eq!(cache.find_missing(&[d, absent]).await.unwrap(), vec![absent]);
    assert_eq!(probe.calls(), 1);
    assert!(cache.find_missing(&[d]).await.unwrap().is_empty());
    assert_eq!(probe.calls(), 1, "a known blob does not reach the inner store");
    // "Missing" is never remembered: only the absent one is asked again.
    assert_eq!(cache.find_missing(&[d, absent]).await.unwrap(), vec![absent]);
    assert_eq!(probe.calls(), 2);
    assert_eq!(probe.digests_asked.load(Ordering::SeqCst), 3);
    // Writes are remembered once committed.
    let (e, edata) = salted_blob(salt, 3, 100);
    cas(cache.clone()).put_bytes(&e, edata).await.unwrap();
    assert!(cache.find_missing(&[e]).await.unwrap().is_empty());
    assert_eq!(probe.calls(), 2);
}

#[tokio::test]
async fn existence_cache_entries_expire_and_are_bounded() {
    let probe = Probe::new(memory());
    let cache: Store = Arc::new(ExistenceCache::new(probe.clone(), Duration::from_millis(200), 2));
    let salt = salt();
    let blobs: Vec<(Digest, Bytes)> = (1..=3).map(|s| salted_blob(salt, s, 100)).collect();
    for (d, data) in &blobs {
        probe.put_bytes(d, data.clone()).await.unwrap();
    }
    let all: Vec<Digest> = blobs.iter().map(|b| b.0).collect();
    cache.find_missing(&all).await.unwrap();
    // Two entries at most: the least recently asked (the first) is gone.
    let asked = probe.digests_asked.load(Ordering::SeqCst);
    cache.find_missing(&all).await.unwrap();
    assert_eq!(probe.digests_asked.load(Ordering::SeqCst) - asked, 1, "one forgotten beyond max_entries");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (calls, asked) = (probe.calls(), probe.digests_asked.load(Ordering::SeqCst));
    cache.find_missing(&all).await.unwrap();
    assert_eq!(probe.calls(), calls + 1);
    assert_eq!(probe.digests_asked.load(Ordering::SeqCst) - asked, 3, "all expired");
}

#[tokio::test]
async fn existence_cache_forgets_a_blob_a_read_finds_gone() {
    // A 1000-byte budget: the inner store evicts behind the cache's back.
    let inner: Store = Arc::new(MemoryStore::new(1000));
    let cache: Store = Arc::new(ExistenceCache::new(inner.clone(), Duration::from_secs(60), 100));
    let salt = salt();
    let (a, adata) = salted_blob(salt, 1, 600);
    let (b, bdata) = salted_blob(salt, 2, 600);
    cache.put_bytes(&a, adata).await.unwrap();
    inner.put_bytes(&b, bdata).await.unwrap();
    assert!(cache.find_missing(&[a]).await.unwrap().is_empty(), "still remembered (the ttl's price)");
    assert_eq!(cache.get(&a, 0, None).await.err().unwrap().code, Code::NotFound);
    assert_eq!(cache.find_missing(&[a]).await.unwrap(), vec![a], "forgotten after the read");
}

/// Not a timed test: prints FindMissingBlobs of 10,000 digests through an
/// existence cache over a disk-over-memory tier, cold and warm
/// (`cargo test --release --lib find_missing_10k -- --ignored --nocapture`).
#[tokio::test]
#[ignore]
async fn find_missing_10k_through_the_existence_cache() {
    let dir = tempfile::tempdir().unwrap();
    let tier: Store = Arc::new(Tiered::new(fs(&dir, "fast"), memory(), WriteMode::Through));
    let cache: Store = Arc::new(ExistenceCache::new(tier.clone(), Duration::from_secs(600), 1_000_000));
    let salt = salt();
    let mut digests = Vec::new();
    for i in 0..10_000u32 {
        let (d, data) = salted_blob(salt ^ u64::from(i), (i % 251) as u8, 64);
        tier.put_bytes(&d, data).await.unwrap();
        digests.push(d);
    }
    for round in ["cold", "warm", "warm"] {
        let started = std::time::Instant::now();
        assert!(cache.find_missing(&digests).await.unwrap().is_empty());
        println!("find_missing of 10,000 present digests, {round}: {:?}", started.elapsed());
    }
    let started = std::time::Instant::now();
    assert!(tier.find_missing(&digests).await.unwrap().is_empty());
    println!("the same on the tier alone: {:?}", started.elapsed());
}
