//! The S3 store against a real S3-compatible server (s3s-fs, started per
//! test on a loopback port): the shared suites, multipart uploads and
//! ranged reads across parts, a blob larger than any buffer, key prefixes,
//! and the server going away mid-upload, mid-read and before a lookup.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use remote_apis::{Digest, DigestFunction, InstanceName};
use tonic::Code;

use super::{S3Config, S3Store, Secret};
use crate::ac::{AcKey, AcStore};
use crate::store::{BlobStore, Store, cas, suite};
use crate::testing::s3::{ACCESS_KEY, REGION, S3Server, SECRET_KEY};

const BUCKET: &str = "distbuild";

fn config(server: &S3Server) -> S3Config {
    let mut c = S3Config::new(BUCKET);
    c.endpoint = Some(server.endpoint());
    c.region = Some(REGION.to_string());
    c.path_style = true;
    c.access_key_id = Some(ACCESS_KEY.to_string());
    c.secret_access_key = Some(Secret::new(SECRET_KEY));
    c
}

/// A server with the bucket, or `None` when s3s-fs is not installed.
fn server() -> Option<S3Server> {
    let server = S3Server::start()?;
    server.create_bucket(BUCKET);
    Some(server)
}

/// Deterministic bytes: chunk `index` of a stream seeded by `seed`.
fn chunk(seed: u64, index: u64, len: usize) -> Bytes {
    let mut x = (seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out.into()
}

/// The digest of `len` bytes generated in `piece`-sized chunks.
fn generated_digest(seed: u64, len: usize, piece: usize) -> Digest {
    let mut h = DigestFunction::Sha256.hasher();
    for (i, at) in (0..len).step_by(piece).enumerate() {
        h.update(&chunk(seed, i as u64, piece.min(len - at)));
    }
    h.finish()
}

async fn upload_generated(store: &Store, seed: u64, len: usize, piece: usize) -> Digest {
    let digest = generated_digest(seed, len, piece);
    let mut sink = store.put(&digest).await.unwrap();
    for (i, at) in (0..len).step_by(piece).enumerate() {
        sink.write(chunk(seed, i as u64, piece.min(len - at))).await.unwrap();
    }
    sink.commit().await.unwrap();
    digest
}

async fn read_range(store: &Store, d: &Digest, offset: u64, limit: Option<u64>) -> crate::error::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut s = store.get(d, offset, limit).await?;
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c?);
    }
    Ok(out)
}

#[tokio::test]
async fn s3_passes_the_store_suites() {
    let Some(server) = server() else { return };
    let store = S3Store::open(&config(&server)).await.unwrap();
    suite::blob_suite("s3", cas(Arc::new(store.clone()))).await;
    suite::ac_suite("s3", Arc::new(store)).await;
}

/// 40 MiB in 5 MiB parts: read whole and in ranges that straddle parts.
#[tokio::test]
async fn multipart_blobs_round_trip_and_read_in_ranges() {
    let Some(server) = server() else { return };
    let mut c = config(&server);
    c.part_size = bytesize::ByteSize::mib(5);
    let store = cas(Arc::new(S3Store::open(&c).await.unwrap()));
    let len = 40 << 20;
    let d = upload_generated(&store, 7, len, 1 << 20).await;
    let data: Vec<u8> = (0..40).flat_map(|i| chunk(7, i, 1 << 20).to_vec()).collect();
    assert_eq!(store.find_missing(&[d]).await.unwrap(), vec![]);
    assert!(read_range(&store, &d, 0, None).await.unwrap() == data, "whole blob");
    let part = 5u64 << 20;
    for (offset, limit) in [(part - 10, 20), (2 * part - 1, part + 2), (0, 1), (len as u64 - 3, 3), (part, part)] {
        let got = read_range(&store, &d, offset, Some(limit)).await.unwrap();
        assert!(got == data[offset as usize..(offset + limit) as usize], "range {offset}+{limit}");
    }
    // Object files only (s3s-fs keeps uploads in progress elsewhere).
    assert_eq!(std::fs::metadata(object_file(&server, &d)).unwrap().len(), len as u64);
}

fn object_file(server: &S3Server, d: &Digest) -> std::path::PathBuf {
    server.root().join(BUCKET).join(format!("cas/sha256/{}-{}", d.hash_hex(), d.size))
}

/// A blob bigger than any buffer of the store, generated and read back in
/// chunks, never whole in memory.
#[tokio::test]
async fn a_large_blob_streams_both_ways() {
    let Some(server) = server() else { return };
    let store = cas(Arc::new(S3Store::open(&config(&server)).await.unwrap()));
    let (len, piece) = (256 << 20, 64 << 10);
    let d = upload_generated(&store, 11, len, piece).await;
    let mut h = DigestFunction::Sha256.hasher();
    let mut s = store.get(&d, 0, None).await.unwrap();
    while let Some(c) = s.next().await {
        h.update(&c.unwrap());
    }
    assert_eq!(h.finish(), d);
}

#[tokio::test]
async fn prefixes_keep_stores_apart_in_one_bucket() {
    let Some(server) = server() else { return };
    let (mut a, mut b) = (config(&server), config(&server));
    a.prefix = "team-a/".into();
    b.prefix = "team-b/".into();
    let (a, b) = (S3Store::open(&a).await.unwrap(), S3Store::open(&b).await.unwrap());
    let (d, data) = suite::salted_blob(suite::salt(), 1, 1000);
    a.put_bytes(&d, data.clone()).await.unwrap();
    assert_eq!(a.find_missing(&[d]).await.unwrap(), vec![]);
    assert_eq!(b.find_missing(&[d]).await.unwrap(), vec![d]);
    assert_eq!(BlobStore::get(&b, &d, 0, None).await.err().unwrap().code, Code::NotFound);
    let key = AcKey::new(&InstanceName::default(), &d);
    AcStore::put(&a, &key, Bytes::from_static(b"result")).await.unwrap();
    assert_eq!(AcStore::get(&b, &key).await.unwrap(), None);
    assert!(server.root().join(BUCKET).join(format!("team-a/cas/sha256/{}-{}", d.hash_hex(), d.size)).is_file());
    assert!(server.root().join(BUCKET).join(format!("team-a/ac/{}", key.hex())).is_file());
}

fn assert_unavailable(e: &crate::error::Error) {
    assert_eq!(e.code, Code::Unavailable, "{e}");
    assert!(e.message.contains(&format!("s3 store {BUCKET} at http://127.0.0.1:")), "{e}");
}

/// The server dies with parts uploaded: the upload fails UNAVAILABLE,
/// nothing is visible after a restart, and the same upload then succeeds.
#[tokio::test]
async fn a_server_killed_mid_upload_leaves_no_blob() {
    let Some(mut server) = server() else { return };
    let mut c = config(&server);
    c.part_size = bytesize::ByteSize::mib(5);
    c.timeout = Duration::from_secs(5);
    let store = cas(Arc::new(S3Store::open(&c).await.unwrap()));
    let (len, piece) = (24 << 20, 1 << 20);
    let d = generated_digest(3, len, piece);
    let mut sink = store.put(&d).await.unwrap();
    let started = Instant::now();
    let mut failed = None;
    for i in 0..(len / piece) as u64 {
        if i == 12 {
            server.kill();
        }
        if let Err(e) = sink.write(chunk(3, i, piece)).await {
            failed = Some(e);
            break;
        }
    }
    let e = match failed {
        Some(e) => e,
        None => sink.commit().await.unwrap_err(),
    };
    assert_unavailable(&e);
    assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
    server.restart();
    assert_eq!(store.find_missing(&[d]).await.unwrap(), vec![d], "no torn object");
    assert_eq!(store.get(&d, 0, None).await.err().unwrap().code, Code::NotFound);
    assert_eq!(upload_generated(&store, 3, len, piece).await, d);
    assert!(read_range(&store, &d, 0, None).await.unwrap().len() == len);
}

/// The server dies while a blob is streamed out: the stream ends in an
/// error, never as a short success; after a restart the blob reads whole.
#[tokio::test]
async fn a_server_killed_mid_read_fails_the_stream() {
    let Some(mut server) = server() else { return };
    let mut c = config(&server);
    c.timeout = Duration::from_secs(5);
    let store = cas(Arc::new(S3Store::open(&c).await.unwrap()));
    let len = 64 << 20;
    let d = upload_generated(&store, 5, len, 1 << 20).await;
    let mut s = store.get(&d, 0, None).await.unwrap();
    let mut got = s.next().await.unwrap().unwrap().len();
    server.kill();
    let e = loop {
        match s.next().await {
            Some(Ok(c)) => got += c.len(),
            Some(Err(e)) => break e,
            None => panic!("the stream ended after {got} of {len} bytes without an error"),
        }
    };
    assert_unavailable(&e);
    assert!(got < len);
    server.restart();
    assert!(read_range(&store, &d, 0, None).await.unwrap().len() == len);
}

#[tokio::test]
async fn a_stopped_server_is_unavailable_within_the_timeout() {
    let Some(mut server) = server() else { return };
    let mut c = config(&server);
    c.timeout = Duration::from_secs(2);
    let store = cas(Arc::new(S3Store::open(&c).await.unwrap()));
    let (d, _) = suite::salted_blob(suite::salt(), 1, 10);
    server.kill();
    let started = Instant::now();
    let e = store.find_missing(&[d]).await.unwrap_err();
    assert_unavailable(&e);
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    let ac: Arc<dyn AcStore> = Arc::new(S3Store::build(&c).unwrap());
    assert_unavailable(&ac.get(&AcKey::new(&InstanceName::default(), &d)).await.unwrap_err());
}

/// A server that accepts connections and never answers: bounded by the
/// timeout, not by the retries.
#[tokio::test]
async fn a_silent_server_times_out() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut c = S3Config::new(BUCKET);
    c.endpoint = Some(format!("http://{}", listener.local_addr().unwrap()));
    c.path_style = true;
    c.access_key_id = Some(ACCESS_KEY.to_string());
    c.secret_access_key = Some(Secret::new(SECRET_KEY));
    c.timeout = Duration::from_secs(1);
    let store = S3Store::build(&c).unwrap();
    let started = Instant::now();
    let e = store.find_missing(&[DigestFunction::Sha256.digest_of(b"x")]).await.unwrap_err();
    assert_eq!(e.code, Code::Unavailable, "{e}");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    let e = S3Store::open(&c).await.err().unwrap();
    assert_eq!(e.code, Code::Unavailable, "{e}");
    assert!(e.message.contains("checking the bucket"), "{e}");
}

#[tokio::test]
async fn wrong_credentials_and_missing_buckets_fail_at_open() {
    let Some(server) = server() else { return };
    let mut c = config(&server);
    c.secret_access_key = Some(Secret::new("not-the-secret"));
    let e = S3Store::open(&c).await.err().unwrap();
    assert!(e.message.contains("credentials"), "{e}");
    assert!(e.message.contains(&format!("s3 store {BUCKET} at {}", server.endpoint())), "{e}");
    assert!(!e.message.contains("not-the-secret") && !e.message.contains(SECRET_KEY), "{e}");
    let mut c = config(&server);
    c.bucket = "no-such-bucket".into();
    let e = S3Store::open(&c).await.err().unwrap();
    assert_eq!(e.code, Code::FailedPrecondition, "{e}");
    assert!(e.message.contains("s3 store no-such-bucket") && e.message.contains("does not exist"), "{e}");
}

/// HTTPS needs a TLS crypto provider in reqwest: building must not panic,
/// and a request to nothing is an ordinary UNAVAILABLE.
#[tokio::test]
async fn an_https_endpoint_is_constructible() {
    let port = crate::testing::free_port(false);
    let mut c = S3Config::new(BUCKET);
    c.endpoint = Some(format!("https://127.0.0.1:{port}"));
    c.path_style = true;
    c.access_key_id = Some(ACCESS_KEY.to_string());
    c.secret_access_key = Some(Secret::new(SECRET_KEY));
    c.timeout = Duration::from_secs(2);
    assert!(!c.allows_http());
    let store = S3Store::build(&c).unwrap();
    let e = store.find_missing(&[DigestFunction::Sha256.digest_of(b"x")]).await.unwrap_err();
    assert_eq!(e.code, Code::Unavailable, "{e}");
    // AWS itself (no endpoint) builds too, virtual-hosted.
    S3Store::build(&S3Config::new(BUCKET)).unwrap();
}

#[test]
fn configuration_parses_validates_and_hides_secrets() {
    let c: S3Config = toml::from_str(
        r#"bucket = "cache"
           endpoint = "http://s3.internal:9000"
           prefix = "ci/"
           access_key_id = "AKID"
           secret_access_key = "hunter2"
           timeout = "5s"
           part_size = "16MiB""#,
    )
    .unwrap();
    assert_eq!(c.timeout, Duration::from_secs(5));
    assert_eq!(c.part_size.as_u64(), 16 << 20);
    assert_eq!(c.max_concurrency, 64);
    assert!(c.allows_http(), "an http:// endpoint allows http");
    assert!(!format!("{c:?}").contains("hunter2"), "{c:?}");
    assert_eq!(c.request_endpoint().unwrap().as_deref(), Some("http://cache.s3.internal:9000"));
    assert!(toml::from_str::<S3Config>("bucket = \"b\"\nsecret = \"x\"").is_err(), "unknown keys are refused");

    let mut small = S3Config::new("b");
    small.part_size = bytesize::ByteSize::mib(4);
    assert!(small.validate().unwrap_err().message.contains("part_size"));
    let mut ip = S3Config::new("b");
    ip.endpoint = Some("http://127.0.0.1:9000".into());
    assert!(ip.request_endpoint().unwrap_err().message.contains("path_style"));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secret");
    std::fs::write(&file, "from-a-file\n").unwrap();
    let mut f = S3Config::new("b");
    f.access_key_id = Some("AKID".into());
    f.secret_access_key_file = Some(file);
    assert_eq!(f.credentials().unwrap(), Some(("AKID".to_string(), "from-a-file".to_string())));
    f.secret_access_key = Some(Secret::new("inline"));
    assert!(f.credentials().is_err(), "not both");
    let mut id_only = S3Config::new("b");
    id_only.access_key_id = Some("AKID".into());
    assert!(id_only.credentials().is_err());
}
