//! Redis store benchmark: ActionCache reads (GetActionResult's storage
//! step) and blob operations through `RedisStore`, each beside the same
//! Redis command sent with the bare client in the same run (the baseline:
//! what the engine and the loopback cost without the store).
//!
//! Usage: redis_bench [REDIS_URL|-] [GETS=10000] [VALUE_BYTES=1024]
//!
//! With `-` (the default) it starts a `redis-server` of its own on a free
//! loopback port through `cargo_distbuild::testing::redis`. Run it through
//! `scripts/bench-redis.sh` (release build). The target:
//! GetActionResult p50 under 1 ms on Redis.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cargo_distbuild::ac::{AcKey, AcStore};
use cargo_distbuild::store::BlobStore;
use cargo_distbuild::store::redis::{RedisConfig, RedisStore};
use cargo_distbuild::testing::redis::RedisServer;
use remote_apis::DigestFunction;

/// Concurrent readers in the throughput runs (a busy server's requests).
const CONCURRENCY: usize = 64;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn report(what: &str, samples: &mut [Duration]) -> Duration {
    samples.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let p50 = percentile(samples, 50.0);
    println!(
        "{what:<38} p50 {:>7.1} us  p90 {:>7.1} us  p99 {:>7.1} us  max {:>8.1} us",
        us(p50),
        us(percentile(samples, 90.0)),
        us(percentile(samples, 99.0)),
        us(*samples.last().unwrap()),
    );
    p50
}

/// Latency of `n` sequential calls of `op`.
async fn sequential<F, Fut>(n: usize, mut op: F) -> Vec<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        op().await;
        samples.push(t.elapsed());
    }
    samples
}

/// Operations a second with `CONCURRENCY` tasks doing `n` calls in all.
async fn throughput<F, Fut>(n: usize, op: F) -> f64
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let op = op.clone();
            tokio::spawn(async move {
                for _ in 0..n / CONCURRENCY {
                    op().await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    (n / CONCURRENCY * CONCURRENCY) as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let url_arg = args.get(1).cloned().unwrap_or_else(|| "-".to_string());
    let gets: usize = args.get(2).map_or(10_000, |s| s.parse().expect("GETS is a number"));
    let value_bytes: usize = args.get(3).map_or(1024, |s| s.parse().expect("VALUE_BYTES is a number"));
    let _own;
    let url = if url_arg == "-" {
        _own = RedisServer::start().expect("redis-server is not installed; pass a redis:// URL");
        _own.url()
    } else {
        url_arg
    };
    let prefix = format!("bench-{}:", uuid::Uuid::new_v4());
    let store = RedisStore::open(&RedisConfig { prefix: prefix.clone(), ..RedisConfig::standalone(url.clone()) })
        .await
        .expect("opening the redis store");
    let raw = redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
    println!("redis store benchmark: {gets} reads of a {value_bytes}-byte value, {CONCURRENCY} tasks for throughput");

    // ActionCache: what GetActionResult costs in storage.
    let key = AcKey::derived("bench", &["ac"]);
    let value = Bytes::from(vec![0x5a; value_bytes]);
    AcStore::put(&store, &key, value.clone()).await.unwrap();
    let raw_key = format!("{prefix}ac:{}", key.hex());
    // Both paths warmed up (connections, allocator, CPU caches) first.
    for _ in 0..1000 {
        AcStore::get(&store, &key).await.unwrap();
        let _: Vec<u8> = redis::AsyncCommands::get(&mut raw.clone(), &raw_key).await.unwrap();
    }
    let mut samples = sequential(gets, || {
        let mut raw = raw.clone();
        let raw_key = raw_key.clone();
        async move {
            let v: Vec<u8> = redis::AsyncCommands::get(&mut raw, &raw_key).await.unwrap();
            assert_eq!(v.len(), value_bytes);
        }
    })
    .await;
    let base = report("bare client GET (baseline)", &mut samples);
    let mut samples = sequential(gets, || async {
        assert!(AcStore::get(&store, &key).await.unwrap().is_some());
    })
    .await;
    let ours = report("RedisStore as AcStore: get", &mut samples);
    println!("{:<38} {:.2}x the baseline's p50", "", ours.as_secs_f64() / base.as_secs_f64());

    let (s, k) = (store.clone(), key);
    let ops = throughput(gets * 4, move || {
        let (s, k) = (s.clone(), k.clone());
        async move {
            AcStore::get(&s, &k).await.unwrap();
        }
    })
    .await;
    let raw_key2 = raw_key.clone();
    let raw2 = raw.clone();
    let base_ops = throughput(gets * 4, move || {
        let (mut raw, raw_key) = (raw2.clone(), raw_key2.clone());
        async move {
            let _: Vec<u8> = redis::AsyncCommands::get(&mut raw, &raw_key).await.unwrap();
        }
    })
    .await;
    println!("{:<38} {ops:>9.0} /s (bare client {base_ops:.0} /s, {:.2}x)", "AcStore get throughput", ops / base_ops);

    // Blobs: a small one read whole, and FindMissingBlobs of many digests.
    let data = Bytes::from(vec![0xa5; value_bytes]);
    let digest = DigestFunction::Sha256.digest_of(&data);
    store.put_bytes(&digest, data.clone()).await.unwrap();
    let mut samples = sequential(gets, || async {
        assert_eq!(store.get_bytes(&digest).await.unwrap().len(), value_bytes);
    })
    .await;
    report("RedisStore as BlobStore: get_bytes", &mut samples);
    let mut samples = sequential(gets / 10, || async {
        store.put_bytes(&digest, data.clone()).await.unwrap();
    })
    .await;
    report("RedisStore as BlobStore: put_bytes", &mut samples);
    let digests: Vec<_> = (0..10_000u32).map(|i| DigestFunction::Sha256.digest_of(&i.to_le_bytes())).collect();
    let mut samples = sequential(20, || async {
        assert_eq!(store.find_missing(&digests).await.unwrap().len(), digests.len());
    })
    .await;
    report("find_missing of 10,000 digests", &mut samples);
}
