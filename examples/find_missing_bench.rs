//! FindMissingBlobs of 10,000 digests through a server whose CAS is
//! `tiered(filesystem, existence_cache(s3))`, the shared-cache layout of
//! deploy/config/s3-cache.toml, beside the same call on `tiered(filesystem,
//! s3)` without the existence cache. It starts its own s3s-fs (from PATH)
//! and server in this process, uploads the blobs through the server (so
//! both tiers hold them), then drops the disk tier's copies (a fresh
//! replica: only the bucket has them) and asks FindMissingBlobs cold and
//! warm. The issue's target: under 20 ms warm with the existence cache.
//!
//! Usage: cargo run --release --example find_missing_bench [DIGESTS=10000] [ROUNDS=20]
//! (scripts/bench-find-missing.sh)

use std::time::{Duration, Instant};

use bytes::Bytes;
use cargo_distbuild::config::FileConfig;
use cargo_distbuild::testing::s3::{ACCESS_KEY, REGION, S3Server, SECRET_KEY};
use remote_apis::client::{CasClient, ClientOptions};
use remote_apis::{Digest, DigestFunction};

fn config(disk: &std::path::Path, endpoint: &str, cached: bool) -> String {
    let slow = if cached { "known" } else { "bucket" };
    format!(
        r#"
[scheduler]
addr = "127.0.0.1:0"
[server]
http_listen = ""
[worker]
capacity = 0
[stores.disk]
type = "filesystem"
path = "{disk}"
max_size = "10GiB"
[stores.bucket]
type = "s3"
bucket = "bench"
endpoint = "{endpoint}"
region = "{REGION}"
path_style = true
access_key_id = "{ACCESS_KEY}"
secret_access_key = "{SECRET_KEY}"
[stores.known]
type = "existence_cache"
store = "bucket"
ttl = "10m"
[stores.cache]
type = "tiered"
fast = "disk"
slow = "{slow}"
[cas]
store = "cache"
[ac]
store = "bucket"
"#,
        disk = disk.display()
    )
}

/// A server on `text`'s stores; returns a client of it.
async fn start(text: &str) -> CasClient {
    let file = FileConfig::parse(text).expect("the bench config parses");
    let config = file.resolve().expect("the bench config resolves");
    let stores = cargo_distbuild::server::open_stores(&config).await.expect("opening the stores");
    let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
    let url = format!("grpc://{}", listener.local_addr().unwrap());
    tokio::spawn(
        async move { cargo_distbuild::server::serve(listener, &config, stores, std::future::pending()).await },
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match CasClient::connect_with(&url, &ClientOptions::default(), Default::default()).await {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("{url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let count: usize = args.next().map_or(10_000, |a| a.parse().expect("DIGESTS is a number"));
    let rounds: usize = args.next().map_or(20, |a| a.parse().expect("ROUNDS is a number"));
    let s3 = S3Server::start().expect("s3s-fs is not installed (cargo install s3s-fs --features binary)");
    s3.create_bucket("bench");
    let blobs: Vec<(Digest, Bytes)> = (0..count)
        .map(|i| {
            let data = Bytes::from(format!("find-missing bench blob {i} {}", std::process::id()));
            (DigestFunction::Sha256.digest_of(&data), data)
        })
        .collect();
    let digests: Vec<Digest> = blobs.iter().map(|(d, _)| *d).collect();

    let upload_disk = tempfile::tempdir().unwrap();
    let uploader = start(&config(upload_disk.path(), &s3.endpoint(), false)).await;
    let t = Instant::now();
    uploader.upload_blobs(blobs).await.unwrap();
    println!("uploaded {count} small blobs through tiered(fs, s3) in {:.2?}", t.elapsed());

    for cached in [false, true] {
        // A fresh replica: an empty disk tier, the bucket holds everything.
        let disk = tempfile::tempdir().unwrap();
        let client = start(&config(disk.path(), &s3.endpoint(), cached)).await;
        let name = if cached { "tiered(fs, existence_cache(s3))" } else { "tiered(fs, s3)" };
        let t = Instant::now();
        let missing = client.find_missing(&digests).await.unwrap();
        assert!(missing.is_empty(), "{} of {count} reported missing", missing.len());
        let cold = t.elapsed();
        let mut warm = Vec::new();
        for _ in 0..rounds {
            let t = Instant::now();
            assert!(client.find_missing(&digests).await.unwrap().is_empty());
            warm.push(t.elapsed());
        }
        println!(
            "{name:<34} FindMissingBlobs of {count}: cold {cold:>9.2?}  warm p50 {:>9.2?}  p90 {:>9.2?}",
            percentile(&mut warm, 0.5),
            percentile(&mut warm, 0.9)
        );
    }
}
