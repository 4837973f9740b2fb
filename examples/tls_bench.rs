//! ByteStream upload and download throughput over plaintext and over TLS,
//! in the same run (`scripts/bench-tls.sh`). Two servers run in this
//! process on loopback, memory store, no built-in worker: one plaintext,
//! one with a certificate made here (rcgen); the client is the project's
//! own CAS client. Each figure is the best of `ROUNDS` rounds, alternating
//! between the servers; the ratio
//! TLS / plaintext is what the target (at least 70%) is about.
//!
//! Usage: tls_bench [BLOB_MIB=256]

#[path = "support/sink.rs"]
mod sink;

use std::time::{Duration, Instant};

use bytes::Bytes;
use cargo_distbuild::config::{Backend, FileConfig};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use remote_apis::client::{CasClient, ClientOptions, ClientTls};
use remote_apis::{Digest, DigestFunction};

const ROUNDS: usize = 5;

/// A CA, and a server certificate for localhost signed by it, as files.
fn certificates(dir: &std::path::Path) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(DnType::CommonName, "bench CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    std::fs::write(dir.join("ca.pem"), ca.self_signed(&ca_key).unwrap().pem()).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let key = KeyPair::generate().unwrap();
    std::fs::write(dir.join("server.pem"), leaf.signed_by(&key, &issuer).unwrap().pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
}

/// Starts a server on an ephemeral port; returns its port.
async fn start(dir: &std::path::Path, tls: bool, blob_mib: u64) -> u16 {
    let mut file = FileConfig::default();
    file.scheduler.addr = "127.0.0.1:0".into();
    file.cas.root = Some(dir.join(if tls { "tls-data" } else { "plain-data" }));
    file.cas.backend = Backend::Memory;
    file.cas.max_size = bytesize::ByteSize::mib(4 * blob_mib + 64);
    file.worker.capacity = Some(0);
    if tls {
        file.tls.cert = Some(dir.join("server.pem"));
        file.tls.key = Some(dir.join("server.key"));
    }
    let config = file.resolve().unwrap();
    let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(cargo_distbuild::server::run(listener, config, std::future::pending()));
    port
}

async fn connect(url: &str, options: &ClientOptions) -> CasClient {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match CasClient::connect_with(url, options, Default::default()).await {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("{url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Upload and download MB/s of one new blob.
async fn round(client: &CasClient, blob_mib: u64, seed: u8) -> (f64, f64) {
    let len = (blob_mib << 20) as usize;
    let mut data = vec![0u8; len];
    // Distinct per round and server; the store does not compress.
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    let data = Bytes::from(data);
    let digest: Digest = DigestFunction::Sha256.digest_of(&data);
    let started = Instant::now();
    client.upload_blobs(vec![(digest, data)]).await.unwrap();
    let up = len as f64 / started.elapsed().as_secs_f64() / 1e6;
    let started = Instant::now();
    let mut sink = sink::Sink(0);
    client.download(digest, &mut sink).await.unwrap();
    assert_eq!(sink.0, len as u64);
    (up, len as f64 / started.elapsed().as_secs_f64() / 1e6)
}

#[tokio::main]
async fn main() {
    let blob_mib: u64 = std::env::args().nth(1).map(|a| a.parse().expect("BLOB_MIB")).unwrap_or(256);
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let plain_port = start(dir.path(), false, blob_mib).await;
    let tls_port = start(dir.path(), true, blob_mib).await;
    let plain = connect(&format!("grpc://127.0.0.1:{plain_port}"), &ClientOptions::default()).await;
    let tls_options = ClientOptions {
        tls: Some(ClientTls { ca: Some(dir.path().join("ca.pem")), cert: None, key: None }),
        token: None,
    };
    let tls = connect(&format!("grpcs://localhost:{tls_port}"), &tls_options).await;

    // Rounds alternate between the two, so background load on the machine
    // weighs on both alike.
    let (mut plain_up, mut plain_down, mut tls_up, mut tls_down) = (0f64, 0f64, 0f64, 0f64);
    for r in 0..ROUNDS as u8 {
        let (up, down) = round(&plain, blob_mib, 2 * r).await;
        (plain_up, plain_down) = (plain_up.max(up), plain_down.max(down));
        let (up, down) = round(&tls, blob_mib, 2 * r + 1).await;
        (tls_up, tls_down) = (tls_up.max(up), tls_down.max(down));
    }
    println!("ByteStream, {blob_mib} MiB blob, memory store, best of {ROUNDS}, client and server in one process");
    println!("{:<12} {:>12} {:>12} {:>8}", "", "plaintext", "TLS", "TLS/plain");
    println!("{:<12} {:>7.0} MB/s {:>7.0} MB/s {:>7.0}%", "upload", plain_up, tls_up, 100.0 * tls_up / plain_up);
    println!(
        "{:<12} {:>7.0} MB/s {:>7.0} MB/s {:>7.0}%",
        "download",
        plain_down,
        tls_down,
        100.0 * tls_down / plain_down
    );
}
