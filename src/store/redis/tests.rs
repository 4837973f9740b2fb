//! The Redis store against real `redis-server` processes: the shared suites
//! on a standalone server and on a three-node cluster, then what only this
//! backend has (ttl, the size limit, out of memory) and its faults (the
//! engine killed before a commit and during a read, a wrong password).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use remote_apis::{DigestFunction, InstanceName};
use tonic::Code;

use super::*;
use crate::store::suite::{self, salt, salted_blob};
use crate::testing::redis::{RedisCluster, RedisServer};

fn config(url: String) -> RedisConfig {
    RedisConfig {
        prefix: format!("test-{}:", uuid::Uuid::new_v4()),
        max_blob_size: ByteSize::mib(4),
        ..RedisConfig::standalone(url)
    }
}

async fn open(config: &RedisConfig) -> RedisStore {
    RedisStore::open(config).await.unwrap()
}

#[tokio::test]
async fn a_standalone_server_passes_the_suites() {
    let Some(server) = RedisServer::start() else { return };
    let store = open(&config(server.url())).await;
    suite::blob_suite("redis", crate::store::cas(Arc::new(store.clone()))).await;
    suite::ac_suite("redis", Arc::new(store)).await;
}

#[tokio::test]
async fn a_cluster_passes_the_suites_with_keys_on_every_node() {
    let Some(cluster) = RedisCluster::start() else { return };
    let config = RedisConfig { cluster: Some(cluster.urls()), url: None, ..config(String::new()) };
    let store = open(&config).await;
    suite::blob_suite("redis cluster", crate::store::cas(Arc::new(store.clone()))).await;
    suite::ac_suite("redis cluster", Arc::new(store.clone())).await;
    // Enough keys that each of the three nodes owns some of them.
    let salt = salt();
    let blobs: Vec<_> = (0..30).map(|i| salted_blob(salt, i, 100)).collect();
    for (d, data) in &blobs {
        store.put_bytes(d, data.clone()).await.unwrap();
    }
    let digests: Vec<_> = blobs.iter().map(|(d, _)| *d).collect();
    assert!(store.find_missing(&digests).await.unwrap().is_empty());
    for node in &cluster.nodes {
        let keys: u64 = node.cli(&["DBSIZE"]).trim().parse().unwrap();
        assert!(keys > 0, "node {} holds none of the keys", node.port);
    }
}

#[tokio::test]
async fn a_cluster_node_down_is_unavailable_and_the_store_recovers() {
    let Some(mut cluster) = RedisCluster::start() else { return };
    let timeout = Duration::from_secs(2);
    let config = RedisConfig { cluster: Some(cluster.urls()), url: None, timeout, ..config(String::new()) };
    let store = open(&config).await;
    let salt = salt();
    let blobs: Vec<_> = (0..30).map(|i| salted_blob(salt, i, 100)).collect();
    let digests: Vec<_> = blobs.iter().map(|(d, _)| *d).collect();
    for (d, data) in &blobs {
        store.put_bytes(d, data.clone()).await.unwrap();
    }
    cluster.nodes[1].kill();
    let started = Instant::now();
    let err = store.find_missing(&digests).await.unwrap_err();
    assert!(started.elapsed() < timeout + Duration::from_secs(1), "took {:?}", started.elapsed());
    assert_eq!(err.code, Code::Unavailable, "{}", err.message);
    assert!(err.message.contains("redis cluster store at 127.0.0.1:"), "{}", err.message);
    // The node comes back (empty: no persistence here); the same store
    // object finds the blobs the other nodes kept, and only those.
    cluster.nodes[1].restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    let missing = loop {
        match store.find_missing(&digests).await {
            Ok(missing) => break missing,
            Err(e) if Instant::now() < deadline => assert_eq!(e.code, Code::Unavailable, "{}", e.message),
            Err(e) => panic!("the cluster never came back: {}", e.message),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(!missing.is_empty() && missing.len() < digests.len(), "{} of {} missing", missing.len(), digests.len());
    for d in &missing {
        assert_eq!(BlobStore::get(&store, d, 0, None).await.err().unwrap().code, Code::NotFound);
    }
}

#[tokio::test]
async fn entries_expire_after_the_ttl_unless_they_are_used() {
    let Some(server) = RedisServer::start() else { return };
    let store = open(&RedisConfig { ttl: Some(Duration::from_secs(2)), ..config(server.url()) }).await;
    let salt = salt();
    let [(read, read_data), (probed, probed_data), (idle, idle_data)] = [1, 2, 3].map(|i| salted_blob(salt, i, 1000));
    for (d, data) in [(read, &read_data), (probed, &probed_data), (idle, &idle_data)] {
        store.put_bytes(&d, data.clone()).await.unwrap();
    }
    let (used, unused) = (AcKey::derived("ttl", &["used"]), AcKey::derived("ttl", &["unused"]));
    AcStore::put(&store, &used, Bytes::from_static(b"r")).await.unwrap();
    AcStore::put(&store, &unused, Bytes::from_static(b"r")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Each kind of use refreshes the ttl: a read, a presence check, an AC read.
    assert_eq!(store.get_bytes(&read).await.unwrap(), read_data);
    assert!(store.find_missing(&[probed]).await.unwrap().is_empty());
    assert!(AcStore::get(&store, &used).await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(store.find_missing(&[read, probed, idle]).await.unwrap(), vec![idle], "only the idle blob expired");
    assert_eq!(BlobStore::get(&store, &idle, 0, None).await.err().unwrap().code, Code::NotFound);
    assert!(AcStore::get(&store, &used).await.unwrap().is_some());
    assert_eq!(AcStore::get(&store, &unused).await.unwrap(), None, "the unused entry expired");
}

#[tokio::test]
async fn a_blob_above_the_limit_is_refused_and_nothing_is_stored() {
    let Some(server) = RedisServer::start() else { return };
    let store = open(&RedisConfig { max_blob_size: ByteSize::kib(1), ..config(server.url()) }).await;
    let (d, data) = salted_blob(salt(), 1, 2048);
    let err = BlobStore::put(&store, &d).await.err().unwrap();
    assert_eq!(err.code, Code::InvalidArgument);
    assert!(err.message.contains("max_blob_size of 1024 bytes"), "{}", err.message);
    assert!(err.message.contains("size_partitioned"), "{}", err.message);
    assert_eq!(store.put_bytes(&d, data).await.unwrap_err().code, Code::InvalidArgument);
    assert_eq!(store.find_missing(&[d]).await.unwrap(), vec![d]);
    let big = Bytes::from(vec![1u8; 2048]);
    let err = AcStore::put(&store, &AcKey::derived("limit", &[]), big).await.unwrap_err();
    assert_eq!(err.code, Code::InvalidArgument);
    // Exactly at the limit is fine.
    let (d, data) = salted_blob(salt(), 2, 1024);
    store.put_bytes(&d, data.clone()).await.unwrap();
    assert_eq!(store.get_bytes(&d).await.unwrap(), data);
}

#[tokio::test]
async fn a_value_of_the_wrong_length_is_missing_and_dropped() {
    let Some(server) = RedisServer::start() else { return };
    let store = open(&config(server.url())).await;
    let (d, _) = salted_blob(salt(), 1, 1000);
    let key = store.cas_key(&d);
    assert_eq!(server.cli(&["SET", &key, "not the blob"]).trim(), "OK");
    assert_eq!(store.find_missing(&[d]).await.unwrap(), vec![d], "never a false hit");
    assert_eq!(BlobStore::get(&store, &d, 0, Some(5)).await.err().unwrap().code, Code::NotFound);
    assert_eq!(server.cli(&["EXISTS", &key]).trim(), "0", "dropped");
}

#[tokio::test]
async fn out_of_memory_is_resource_exhausted_with_the_policy_hint() {
    let Some(server) = RedisServer::start_with(&["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"]) else {
        return;
    };
    let store = open(&config(server.url())).await;
    let salt = salt();
    let mut refused = None;
    for i in 0..64 {
        let (d, data) = salted_blob(salt, i, 256 << 10);
        if let Err(e) = store.put_bytes(&d, data).await {
            refused = Some(e);
            break;
        }
    }
    let err = refused.expect("a 2 MB Redis refuses 16 MiB of blobs");
    assert_eq!(err.code, Code::ResourceExhausted, "{}", err.message);
    assert!(err.message.contains("maxmemory-policy allkeys-lru"), "{}", err.message);
    assert!(err.message.contains(&format!("redis store at 127.0.0.1:{}", server.port)), "{}", err.message);
}

#[tokio::test]
async fn open_names_the_address_when_redis_is_down() {
    let port = crate::testing::free_port(false);
    let started = Instant::now();
    let config = RedisConfig { timeout: Duration::from_secs(2), ..config(format!("redis://127.0.0.1:{port}/")) };
    let err = RedisStore::open(&config).await.err().unwrap();
    assert_eq!(err.code, Code::Unavailable, "{}", err.message);
    assert!(err.message.contains(&format!("redis store at 127.0.0.1:{port}")), "{}", err.message);
    assert!(started.elapsed() < Duration::from_secs(4), "took {:?}", started.elapsed());
}

/// `rediss://` goes through rustls (with the one crypto provider the server
/// has): against a plaintext server the handshake fails, as UNAVAILABLE.
#[tokio::test]
async fn a_tls_url_speaks_tls() {
    let Some(server) = RedisServer::start() else { return };
    let info = connection_info(&format!("rediss://127.0.0.1:{}/", server.port), None).unwrap();
    assert!(matches!(info.addr(), ::redis::ConnectionAddr::TcpTls { .. }));
    let config =
        RedisConfig { timeout: Duration::from_secs(2), ..config(format!("rediss://127.0.0.1:{}/", server.port)) };
    let err = RedisStore::open(&config).await.err().unwrap();
    assert_eq!(err.code, Code::Unavailable, "{}", err.message);
    assert!(err.message.contains(&format!("redis store at 127.0.0.1:{}", server.port)), "{}", err.message);
}

#[tokio::test]
async fn a_commit_while_redis_is_down_is_unavailable_and_the_store_recovers() {
    let Some(mut server) = RedisServer::start() else { return };
    let timeout = Duration::from_secs(2);
    let store = open(&RedisConfig { timeout, ..config(server.url()) }).await;
    let (d, data) = salted_blob(salt(), 1, 100 << 10);
    let mut sink = BlobStore::put(&store, &d).await.unwrap();
    sink.write(data.clone()).await.unwrap();
    server.kill();
    let started = Instant::now();
    let err = sink.commit().await.unwrap_err();
    assert!(started.elapsed() < timeout + Duration::from_secs(1), "took {:?}", started.elapsed());
    assert_eq!(err.code, Code::Unavailable, "{}", err.message);
    assert!(err.message.contains(&format!("redis store at 127.0.0.1:{}", server.port)), "{}", err.message);
    let ac_err = AcStore::get(&store, &AcKey::derived("down", &[])).await.unwrap_err();
    assert_eq!(ac_err.code, Code::Unavailable, "{}", ac_err.message);
    // Back again: the same store object works, and the blob is not there.
    server.restart();
    assert_eq!(store.find_missing(&[d]).await.unwrap(), vec![d]);
    store.put_bytes(&d, data.clone()).await.unwrap();
    assert_eq!(store.get_bytes(&d).await.unwrap(), data);
}

/// Reads of a large blob in flight when the engine dies end in an error,
/// never in fewer bytes than asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_cut_by_redis_dying_fails_and_is_never_short() {
    let Some(mut server) = RedisServer::start() else { return };
    let store = open(&RedisConfig { max_blob_size: ByteSize::mib(64), ..config(server.url()) }).await;
    let (d, data) = salted_blob(salt(), 1, 48 << 20);
    let mut cut = 0;
    for delay_ms in [1, 3, 10, 30, 100] {
        store.put_bytes(&d, data.clone()).await.unwrap();
        let reads: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.get_bytes(&d).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        server.kill();
        for read in reads {
            match read.await.unwrap() {
                Ok(bytes) => assert!(bytes == data, "a read returned {} of {} bytes", bytes.len(), data.len()),
                Err(e) => {
                    assert_eq!(e.code, Code::Unavailable, "{}", e.message);
                    cut += 1;
                }
            }
        }
        server.restart();
        if cut > 0 {
            break;
        }
    }
    assert!(cut > 0, "no read was in flight when redis died: the test proved nothing");
}

#[tokio::test]
async fn a_password_never_appears_in_errors_or_debug_output() {
    let Some(mut server) = RedisServer::start() else { return };
    // Set after the start: the helper's readiness check speaks no password.
    assert_eq!(server.cli(&["CONFIG", "SET", "requirepass", "right-horse-battery"]).trim(), "OK");
    let wrong = config(format!("redis://:wrong-staple-42@127.0.0.1:{}/", server.port));
    assert!(!format!("{wrong:?}").contains("wrong-staple-42"), "{wrong:?}");
    let err = RedisStore::open(&wrong).await.err().unwrap();
    assert_eq!(err.code, Code::Unavailable, "{}", err.message);
    assert!(!err.message.contains("wrong-staple-42"), "{}", err.message);
    assert!(err.message.contains(&format!("127.0.0.1:{}", server.port)), "{}", err.message);
    // The right one from a file works, and an error after that does not
    // show it either.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("password");
    std::fs::write(&file, "right-horse-battery\n").unwrap();
    let right = RedisConfig { password_file: Some(file), timeout: Duration::from_secs(1), ..config(server.url()) };
    let store = open(&right).await;
    let key = AcKey::new(&InstanceName::new("pw").unwrap(), &DigestFunction::Sha256.digest_of(b"a"));
    AcStore::put(&store, &key, Bytes::from_static(b"v")).await.unwrap();
    server.kill();
    let err = AcStore::get(&store, &key).await.unwrap_err();
    assert!(!err.message.contains("right-horse-battery"), "{}", err.message);
    let in_url = config(format!("redis://:right-horse-battery@127.0.0.1:{}/", server.port));
    let err = RedisStore::open(&in_url).await.err().unwrap();
    assert!(!err.message.contains("right-horse-battery"), "{}", err.message);
}

#[test]
fn the_config_takes_exactly_one_of_url_and_cluster() {
    let parse = |text: &str| toml::from_str::<RedisConfig>(text);
    let c = parse("url = 'redis://r:6379/'\nttl = '1h'\nmax_blob_size = '64KiB'").unwrap();
    assert_eq!(
        (c.prefix.as_str(), c.ttl, c.timeout),
        ("distbuild:", Some(Duration::from_secs(3600)), default_timeout())
    );
    assert_eq!(c.max_blob_size, ByteSize::kib(64));
    c.validate().unwrap();
    parse("cluster = ['redis://a:1/', 'redis://b:2/']").unwrap().validate().unwrap();
    assert!(parse("url = 'redis://r/'\nsize = 1").is_err(), "unknown keys are refused");
    for bad in ["", "url = 'redis://r/'\ncluster = ['redis://a/']", "cluster = []"] {
        let err = parse(bad).unwrap().validate().unwrap_err();
        assert_eq!(err.code, Code::InvalidArgument, "{bad}");
        assert!(err.message.contains("redis store"), "{}", err.message);
    }
    let tagged = parse("cluster = ['redis://a/']\nprefix = '{db}:'").unwrap();
    assert!(tagged.validate().unwrap_err().message.contains("hash tag"));
    let huge = parse("url = 'redis://r/'\nmax_blob_size = '1GiB'").unwrap();
    assert!(huge.validate().unwrap_err().message.contains("512 MiB"));
}

#[test]
fn urls_are_redacted() {
    assert_eq!(redact("redis://:secret@host:6379/0"), "redis://***@host:6379/0");
    assert_eq!(redact("rediss://user:secret@host:6379"), "rediss://***@host:6379");
    assert_eq!(redact("redis://host:6379/"), "redis://host:6379/");
    assert_eq!(redact("not a url with secret@"), "***");
}
