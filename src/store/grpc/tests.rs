//! The grpc store against a real second cargo-distbuild server, started
//! in-process on a loopback port.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use prost::Message;
use remote_apis::reapi::action_cache_client::ActionCacheClient;
use remote_apis::reapi::{ActionResult, GetActionResultRequest, OutputFile, UpdateActionResultRequest};
use remote_apis::{Digest, DigestFunction, InstanceName};
use tokio::sync::oneshot;
use tonic::Code;
use tonic::transport::Channel;

use super::*;
use crate::ac::{AcKey, AcStore};
use crate::config::{AuthSection, Backend, FileConfig};
use crate::store::{self, BlobStore, Store, suite};

/// A cargo-distbuild server on the memory store, as the remote.
struct Remote {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

impl Remote {
    async fn start(tweak: impl FnOnce(&mut FileConfig)) -> Remote {
        Remote::start_on("127.0.0.1:0", tweak).await
    }

    async fn start_on(addr: &str, tweak: impl FnOnce(&mut FileConfig)) -> Remote {
        let dir = tempfile::tempdir().unwrap();
        let mut file = FileConfig::default();
        file.scheduler.addr = addr.into();
        file.cas.root = Some(dir.path().to_path_buf());
        file.cas.backend = Backend::Memory;
        file.worker.capacity = Some(0);
        file.server.http_listen = Some(String::new());
        tweak(&mut file);
        let config = file.resolve().unwrap();
        let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(crate::server::run(listener, config, async {
            let _ = stopped.await;
        }));
        Remote { addr, stop: Some(stop), handle, _dir: dir }
    }

    fn url(&self) -> String {
        format!("grpc://{}", self.addr)
    }

    /// The remote's ActionCache, spoken to directly (as its other clients do).
    fn ac(&self) -> ActionCacheClient<Channel> {
        ActionCacheClient::new(Channel::from_shared(format!("http://{}", self.addr)).unwrap().connect_lazy())
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.handle.await.unwrap().unwrap();
    }
}

async fn open(config: GrpcConfig) -> GrpcStore {
    GrpcStore::open(&config).await.unwrap()
}

fn blob(seed: u8, len: usize) -> (Digest, Bytes) {
    suite::salted_blob(suite::salt(), seed, len)
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_store_passes_the_suites() {
    let remote = Remote::start(|_| {}).await;
    let store = open(GrpcConfig::new(remote.url())).await;
    suite::blob_suite("grpc", store::cas(Arc::new(store.clone()))).await;
    suite::ac_suite_without_remove("grpc", Arc::new(store)).await;
    // Everything under one configured instance, and with every blob on
    // the ByteStream path.
    let mut config = GrpcConfig::new(remote.url());
    config.instance_name = Some("projects/p/instances/front".into());
    config.batch_max = bytesize::ByteSize::b(0);
    let store = open(config).await;
    // (Not the ActionCache suite: with one instance for every call, the
    // same action under two of the front's instances is one entry.)
    suite::blob_suite("grpc, one instance, streams only", store::cas(Arc::new(store))).await;
    remote.stop().await;
}

/// An ActionResult whose stdout is a blob in the remote's CAS.
fn result_with_stdout(stdout: &Digest) -> ActionResult {
    ActionResult {
        stdout_digest: Some(stdout.to_proto()),
        output_files: vec![OutputFile { path: "out".into(), digest: Some(stdout.to_proto()), ..Default::default() }],
        exit_code: 0,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn entries_are_shared_with_the_remotes_other_clients() {
    let remote = Remote::start(|_| {}).await;
    let store = open(GrpcConfig::new(remote.url())).await;
    let cas = store::cas(Arc::new(store.clone()));
    let instance = InstanceName::new("team/a").unwrap();
    let (output, data) = blob(1, 5000);
    cas.put_bytes(&output, data).await.unwrap();

    // Written through the store, read from the remote directly.
    let (action, _) = blob(2, 100);
    let result = result_with_stdout(&output);
    AcStore::put(&store, &AcKey::new(&instance, &action), Bytes::from(result.encode_to_vec())).await.unwrap();
    let request = GetActionResultRequest {
        instance_name: "team/a".into(),
        action_digest: Some(action.to_proto()),
        ..Default::default()
    };
    let got = remote.ac().get_action_result(request.clone()).await.unwrap().into_inner();
    assert_eq!(got, result);
    // Not under another instance.
    let elsewhere = GetActionResultRequest { instance_name: "team/b".into(), ..request };
    assert_eq!(remote.ac().get_action_result(elsewhere).await.unwrap_err().code(), Code::NotFound);

    // Written on the remote directly, read through the store.
    let (action, _) = blob(3, 100);
    let update = UpdateActionResultRequest {
        instance_name: "team/a".into(),
        action_digest: Some(action.to_proto()),
        action_result: Some(result.clone()),
        ..Default::default()
    };
    remote.ac().update_action_result(update).await.unwrap();
    let got = AcStore::get(&store, &AcKey::new(&instance, &action)).await.unwrap().expect("a hit");
    assert_eq!(ActionResult::decode(got).unwrap(), result);
    assert_eq!(AcStore::get(&store, &AcKey::new(&InstanceName::default(), &action)).await.unwrap(), None);

    // With a configured instance name, that is where entries go.
    let mut config = GrpcConfig::new(remote.url());
    config.instance_name = Some("central".into());
    let central = open(config).await;
    let (action, _) = blob(4, 100);
    AcStore::put(&central, &AcKey::new(&instance, &action), Bytes::from(result.encode_to_vec())).await.unwrap();
    let request = GetActionResultRequest {
        instance_name: "central".into(),
        action_digest: Some(action.to_proto()),
        ..Default::default()
    };
    assert_eq!(remote.ac().get_action_result(request).await.unwrap().into_inner(), result);
    remote.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_value_that_is_not_an_action_result_is_refused() {
    let remote = Remote::start(|_| {}).await;
    let store = open(GrpcConfig::new(remote.url())).await;
    let (action, _) = blob(1, 10);
    let key = AcKey::new(&InstanceName::default(), &action);
    let e = AcStore::put(&store, &key, Bytes::from_static(b"\xff\xff not a proto")).await.unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument, "{}", e.message);
    // The remote's own refusals keep their code: a result naming a bad digest.
    let bad = ActionResult { stdout_digest: Some(remote_apis::reapi::Digest::default()), ..Default::default() };
    let e = AcStore::put(&store, &key, Bytes::from(bad.encode_to_vec())).await.unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument, "{}", e.message);
    assert!(e.message.contains(&remote.url()), "{}", e.message);
    remote.stop().await;
}

async fn read_all(store: &Store, digest: &Digest, offset: u64, limit: Option<u64>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut stream = store.get(digest, offset, limit).await.unwrap();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn large_blobs_stream_both_ways() {
    let remote = Remote::start(|f| f.cas.max_size = bytesize::ByteSize::mib(256)).await;
    let store: Store = store::cas(Arc::new(open(GrpcConfig::new(remote.url())).await));
    let (digest, data) = blob(1, 40 << 20);
    let started = Instant::now();
    let mut sink = store.put(&digest).await.unwrap();
    for chunk in data.chunks(256 << 10) {
        sink.write(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    sink.commit().await.unwrap();
    let wrote = started.elapsed();
    let started = Instant::now();
    assert!(read_all(&store, &digest, 0, None).await == data[..], "the whole blob");
    let read = started.elapsed();
    let (at, len) = (17 << 20, 3 << 20);
    assert!(read_all(&store, &digest, at, Some(len)).await == data[at as usize..(at + len) as usize]);
    // The remote's own clients see it.
    let client = remote_apis::client::CasClient::new(
        Channel::from_shared(format!("http://{}", remote.addr)).unwrap().connect_lazy(),
        InstanceName::default(),
    );
    assert!(client.read_blob(digest).await.unwrap() == data);
    // The same transfer by the project's client, straight to the remote, for
    // comparison (printed, never asserted).
    let (other, other_data) = blob(2, 40 << 20);
    let started = Instant::now();
    client.upload_blobs(vec![(other, other_data)]).await.unwrap();
    let direct_write = started.elapsed();
    let started = Instant::now();
    client.read_blob(other).await.unwrap();
    let direct_read = started.elapsed();
    eprintln!(
        "40 MiB through the grpc store: write {wrote:?}, read {read:?}; the client straight to the remote: \
         write {direct_write:?}, read {direct_read:?}"
    );

    // BLAKE3 names its function in the resource name.
    let data = data.slice(..(3 << 20));
    let digest = DigestFunction::Blake3.digest_of(&data);
    store.put_bytes(&digest, data.clone()).await.unwrap();
    assert!(store.find_missing(&[digest]).await.unwrap().is_empty());
    assert!(read_all(&store, &digest, 0, None).await == data[..]);
    remote.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_sink_stores_nothing_even_with_every_byte_written() {
    let remote = Remote::start(|_| {}).await;
    // No verification in front: the store itself must not commit.
    let store = open(GrpcConfig::new(remote.url())).await;
    let (digest, data) = blob(1, 3 << 20);
    let mut sink = BlobStore::put(&store, &digest).await.unwrap();
    for chunk in data.chunks(1 << 20) {
        sink.write(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    drop(sink);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(store.find_missing(&[digest]).await.unwrap(), vec![digest]);
    // Too many bytes are refused at once.
    let mut sink = BlobStore::put(&store, &digest).await.unwrap();
    sink.write(data.clone()).await.unwrap();
    assert_eq!(sink.write(Bytes::from_static(b"x")).await.unwrap_err().code, Code::InvalidArgument);
    drop(sink);
    // Both calls ended: the remote's graceful stop waits for no upload.
    let started = Instant::now();
    remote.stop().await;
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}

/// Every kind of call fails with UNAVAILABLE naming the endpoint.
async fn assert_unavailable(store: &GrpcStore, endpoint: &str) {
    let (small, small_data) = blob(1, 100);
    let (large, large_data) = blob(2, 2 << 20);
    let key = AcKey::new(&InstanceName::default(), &small);
    let mut errors = vec![
        store.find_missing(&[small]).await.unwrap_err(),
        BlobStore::get(store, &small, 0, None).await.err().unwrap(),
        BlobStore::get(store, &large, 0, None).await.err().unwrap(),
        store.put_bytes(&small, small_data).await.unwrap_err(),
        store.put_bytes(&large, large_data).await.unwrap_err(),
        AcStore::get(store, &key).await.unwrap_err(),
        AcStore::put(store, &key, Bytes::new()).await.unwrap_err(),
    ];
    for e in errors.drain(..) {
        assert_eq!(e.code, Code::Unavailable, "{}", e.message);
        assert!(e.message.contains(endpoint), "{}", e.message);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_remote_that_is_down_is_unavailable_until_it_is_back() {
    let remote = Remote::start(|_| {}).await;
    let (addr, url) = (remote.addr, remote.url());
    let store = open(GrpcConfig::new(&url)).await;
    let (digest, data) = blob(1, 100);
    store.put_bytes(&digest, data.clone()).await.unwrap();
    remote.stop().await;
    assert_unavailable(&store, &url).await;
    // The same address again (a new, empty remote): the store reconnects.
    let remote = Remote::start_on(&addr.to_string(), |_| {}).await;
    store.put_bytes(&digest, data.clone()).await.unwrap();
    assert_eq!(store.get_bytes(&digest).await.unwrap(), data);
    remote.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_remote_times_out() {
    // Accepts connections (the kernel does) and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("grpc://{}", silent.local_addr().unwrap());
    let mut config = GrpcConfig::new(&url);
    config.timeout = Duration::from_millis(300);
    let store = open(config).await;
    let started = Instant::now();
    assert_unavailable(&store, &url).await;
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn opening_checks_the_config_but_not_the_remote() {
    // Nothing listens there: opening still succeeds (the server starts).
    open(GrpcConfig::new("grpc://127.0.0.1:1")).await;
    for bad in ["127.0.0.1:1", "redis://127.0.0.1:1", "grpc://"] {
        let e = GrpcStore::open(&GrpcConfig::new(bad)).await.err().unwrap();
        assert_eq!(e.code, Code::InvalidArgument, "{bad}: {}", e.message);
    }
    let mut config = GrpcConfig::new("grpc://127.0.0.1:1");
    config.instance_name = Some("/bad/".into());
    assert_eq!(GrpcStore::open(&config).await.err().unwrap().code, Code::InvalidArgument);
    // TLS files on a plaintext address: the operator meant TLS.
    let mut config = GrpcConfig::new("grpc://127.0.0.1:1");
    config.tls_ca = Some("/nonexistent/ca.pem".into());
    assert_eq!(GrpcStore::open(&config).await.err().unwrap().code, Code::InvalidArgument);
    let mut config = GrpcConfig::new("grpc://127.0.0.1:1");
    config.token_file = Some("/nonexistent/token".into());
    let e = GrpcStore::open(&config).await.err().unwrap();
    assert!(e.message.contains("/nonexistent/token"), "{}", e.message);
}

#[test]
fn config_parses_with_defaults_and_refuses_unknown_keys() {
    let config: GrpcConfig = toml::from_str("endpoint = \"grpcs://cache:8980\"").unwrap();
    assert_eq!(config.timeout, DEFAULT_TIMEOUT);
    assert_eq!(config.batch_max.as_u64(), DEFAULT_BATCH_MAX);
    let text = "endpoint = \"grpc://c:1\"\ninstance_name = \"main\"\ntimeout = \"5s\"\nbatch_max = \"64KiB\"\n\
                tls_ca = \"/ca.pem\"\ntls_cert = \"/c.pem\"\ntls_key = \"/c.key\"\ntoken_file = \"/t\"";
    let config: GrpcConfig = toml::from_str(text).unwrap();
    assert_eq!((config.timeout, config.batch_max.as_u64()), (Duration::from_secs(5), 64 << 10));
    assert_eq!(config.instance_name.as_deref(), Some("main"));
    assert!(toml::from_str::<GrpcConfig>("endpoint = \"grpc://c:1\"\ntoken = \"x\"").is_err());
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, in
/// a directory.
fn pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, "grpc store test CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    std::fs::write(dir.join("ca.pem"), params.self_signed(&ca_key).unwrap().pem()).unwrap();
    let issuer = Issuer::new(params, ca_key);
    let issue = |name: &str, san: SanType| {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names.push(san);
        let key = KeyPair::generate().unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), params.signed_by(&key, &issuer).unwrap().pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
        (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")))
    };
    let (server_cert, server_key) = issue("server", SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let (client_cert, client_key) = issue("client", SanType::DnsName("client.example".try_into().unwrap()));
    (dir.join("ca.pem"), server_cert, server_key, client_cert, client_key)
}

/// A token file entry giving `token` the `grants`.
fn token_entry(name: &str, token: &str, grants: &[&str]) -> String {
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(token.as_bytes()));
    let grants: Vec<String> = grants.iter().map(|g| format!("{g:?}")).collect();
    format!("[[token]]\nname = {name:?}\nsha256 = {sha:?}\ngrants = [{}]\n\n", grants.join(", "))
}

#[tokio::test(flavor = "multi_thread")]
async fn mtls_and_a_token_work_and_refusals_keep_their_code() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, server_cert, server_key, client_cert, client_key) = pki(dir.path());
    let all = ["cas-read", "cas-write", "ac-read", "ac-write"];
    let tokens = token_entry("front", "dbt_front_token", &all) + &token_entry("reader", "dbt_reader", &["cas-read"]);
    std::fs::write(dir.path().join("tokens.toml"), tokens).unwrap();
    let remote = Remote::start(|f| {
        f.tls.cert = Some(server_cert);
        f.tls.key = Some(server_key);
        f.tls.client_ca = Some(ca.clone());
        f.auth = Some(AuthSection { mode: None, tokens: Some(dir.path().join("tokens.toml")), anonymous: vec![] });
    })
    .await;
    let url = format!("grpcs://127.0.0.1:{}", remote.addr.port());
    let config = |token: &str| {
        let path = dir.path().join(format!("{token}.token"));
        std::fs::write(&path, format!("{token}\n")).unwrap();
        let mut config = GrpcConfig::new(&url);
        config.tls_ca = Some(ca.clone());
        config.tls_cert = Some(client_cert.clone());
        config.tls_key = Some(client_key.clone());
        config.token_file = Some(path);
        config
    };
    let store = open(config("dbt_front_token")).await;
    suite::blob_suite("grpc over mTLS", store::cas(Arc::new(store.clone()))).await;
    suite::ac_suite_without_remove("grpc over mTLS", Arc::new(store)).await;

    let (digest, data) = blob(1, 100);
    let wrong = open(config("dbt_wrong")).await;
    let e = wrong.find_missing(&[digest]).await.unwrap_err();
    assert!(matches!(e.code, Code::Unauthenticated | Code::PermissionDenied), "{:?}: {}", e.code, e.message);
    assert!(!e.message.contains("dbt_wrong"), "the token is never shown: {}", e.message);
    let reader = open(config("dbt_reader")).await;
    assert_eq!(reader.find_missing(&[digest]).await.unwrap(), vec![digest]);
    let e = reader.put_bytes(&digest, data).await.unwrap_err();
    assert_eq!(e.code, Code::PermissionDenied, "{}", e.message);

    // Without a client certificate the handshake fails: UNAVAILABLE.
    let mut no_cert = config("dbt_front_token");
    (no_cert.tls_cert, no_cert.tls_key) = (None, None);
    let e = open(no_cert).await.find_missing(&[digest]).await.unwrap_err();
    assert_eq!(e.code, Code::Unavailable, "{}", e.message);
    remote.stop().await;
}

/// A TCP relay to the remote whose open connections can be cut at once,
/// as a network failure or a crashed remote would (the remote itself
/// stays up, so what it stored can be checked afterwards).
struct Relay {
    addr: SocketAddr,
    connections: Arc<parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(to: SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let open = connections.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let relay = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                open.lock().push(relay);
            }
        });
        Relay { addr, connections, accept }
    }

    fn url(&self) -> String {
        format!("grpc://{}", self.addr)
    }

    /// Drops every open connection; new ones are relayed again.
    fn cut(&self) {
        for connection in self.connections.lock().drain(..) {
            connection.abort();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_lost_mid_transfer_is_unavailable_and_stores_no_torn_blob() {
    let remote = Remote::start(|f| f.cas.max_size = bytesize::ByteSize::mib(256)).await;
    let relay = Relay::start(remote.addr).await;
    let store: Store = store::cas(Arc::new(open(GrpcConfig::new(relay.url())).await));
    let (digest, data) = blob(1, 32 << 20);
    store.put_bytes(&digest, data.clone()).await.unwrap();

    // Mid-read: the stream ends in an error, never early and clean.
    let mut stream = store.get(&digest, 0, None).await.unwrap();
    let mut got = stream.next().await.unwrap().unwrap().len();
    relay.cut();
    let error = loop {
        match stream.next().await {
            Some(Ok(chunk)) => got += chunk.len(),
            Some(Err(e)) => break e,
            None => panic!("the read ended cleanly after {got} of {} bytes", data.len()),
        }
    };
    assert_eq!(error.code, Code::Unavailable, "{}", error.message);
    assert!(error.message.contains(&relay.url()), "{}", error.message);
    eprintln!("mid-read: {}", error.message);

    // Mid-upload: the write fails and the remote has nothing.
    let (torn, torn_data) = blob(2, 8 << 20);
    let mut sink = store.put(&torn).await.unwrap();
    sink.write(torn_data.slice(..2 << 20)).await.unwrap();
    // Let the call start and the first megabyte reach the remote (a cut
    // before the call starts is no failure: it goes out on a new connection).
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.cut();
    let result = async {
        for at in (2 << 20..torn_data.len()).step_by(1 << 20) {
            sink.write(torn_data.slice(at..at + (1 << 20))).await?;
        }
        sink.commit().await
    };
    let error = result.await.unwrap_err();
    assert_eq!(error.code, Code::Unavailable, "{}", error.message);
    eprintln!("mid-upload: {}", error.message);
    let direct = open(GrpcConfig::new(remote.url())).await;
    assert_eq!(direct.find_missing(&[torn]).await.unwrap(), vec![torn], "no torn blob on the remote");

    // New connections work again.
    store.put_bytes(&torn, torn_data.clone()).await.unwrap();
    assert_eq!(direct.get_bytes(&torn).await.unwrap(), torn_data);
    drop(relay);
    remote.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn find_missing_splits_large_queries_and_keeps_their_order() {
    let remote = Remote::start(|_| {}).await;
    let store = open(GrpcConfig::new(remote.url())).await;
    let salt = suite::salt();
    // 25,000 digests of two functions: three SHA-256 requests, one BLAKE3.
    let mut digests: Vec<Digest> = (0..25_000u64)
        .map(|i| {
            let text = format!("{salt}-{i}");
            let function = if i % 5 == 0 { DigestFunction::Blake3 } else { DigestFunction::Sha256 };
            function.digest_of(text.as_bytes())
        })
        .collect();
    let present = [3usize, 12_345, 24_999];
    for &i in &present {
        let data = Bytes::from(format!("{salt}-{i}"));
        store.put_bytes(&digests[i], data).await.unwrap();
    }
    digests.push(digests[3]);
    let started = Instant::now();
    let missing = store.find_missing(&digests).await.unwrap();
    eprintln!("FindMissing of {} digests through the grpc store: {:?}", digests.len(), started.elapsed());
    let expected: Vec<Digest> =
        digests.iter().enumerate().filter(|(i, _)| !present.contains(i) && *i != 25_000).map(|(_, d)| *d).collect();
    assert_eq!(missing, expected);
    assert!(store.find_missing(&[]).await.unwrap().is_empty());
    remote.stop().await;
}
