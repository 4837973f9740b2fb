//! TLS and mTLS with certificates made here (rcgen): the server's listener,
//! the client library, the command line and a remote worker process.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cargo_distbuild::config::{Backend, FileConfig};
use cargo_distbuild::server::peer::{self, PeerIdentity};
use parking_lot::Mutex;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use remote_apis::client::{CasClient, ClientOptions, ClientTls, Token, Transport};

use crate::common::{TestServer, data, sha};

/// A certificate authority for one test.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { issuer: Issuer::new(params, key), pem }
    }

    /// A certificate (PEM) and its key (PEM) with subject `cn` and the
    /// given SANs (IP addresses become IP SANs, `scheme://` ones URIs).
    pub fn issue(&self, cn: &str, sans: &[&str]) -> (String, String) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        for san in sans {
            params.subject_alt_names.push(if let Ok(ip) = san.parse() {
                SanType::IpAddress(ip)
            } else if san.contains("://") {
                SanType::URI((*san).try_into().unwrap())
            } else {
                SanType::DnsName((*san).try_into().unwrap())
            });
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Certificate files in a directory: a server certificate for localhost
/// and 127.0.0.1, and a client certificate, both issued by `ca`.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
}

impl Pki {
    pub fn new() -> Pki {
        let pki = Pki { dir: tempfile::tempdir().unwrap(), ca: Ca::new("distbuild test CA") };
        pki.write("ca.pem", &pki.ca.pem);
        let (cert, key) = pki.ca.issue("localhost", &["localhost", "127.0.0.1"]);
        pki.write("server.pem", &cert);
        pki.write("server.key", &key);
        let (cert, key) = pki.ca.issue("client-1", &["client-1.example"]);
        pki.write("client.pem", &cert);
        pki.write("client.key", &key);
        pki
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `name` atomically (a reload never sees half a file).
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        let tmp = self.path(&format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }

    /// `[tls]` for the server; with `mtls`, client certificates from this
    /// CA are required.
    pub fn server_config(&self, mtls: bool) -> impl FnOnce(&mut FileConfig) + use<> {
        let (cert, key, ca) = (self.path("server.pem"), self.path("server.key"), self.path("ca.pem"));
        move |c| {
            c.tls.cert = Some(cert);
            c.tls.key = Some(key);
            if mtls {
                c.tls.client_ca = Some(ca);
            }
        }
    }

    /// Client options trusting this CA, with the client certificate or not.
    pub fn client(&self, with_cert: bool) -> ClientOptions {
        let tls = ClientTls {
            ca: Some(self.path("ca.pem")),
            cert: with_cert.then(|| self.path("client.pem")),
            key: with_cert.then(|| self.path("client.key")),
        };
        ClientOptions { tls: Some(tls), token: None }
    }
}

fn tls_url(server: &TestServer) -> String {
    format!("grpcs://localhost:{}", server.addr.port())
}

/// A call that needs the whole stack: FindMissingBlobs.
async fn probe(transport: Transport) -> Result<(), tonic::Status> {
    CasClient::new(transport, Default::default()).find_missing(&[sha(b"probe")]).await.map(|_| ())
}

/// Connects and makes one call, within 10 s (a refused client must fail,
/// not hang).
async fn connect_and_call(url: &str, options: &ClientOptions) -> Result<(), tonic::Status> {
    let attempt = async {
        let transport = remote_apis::client::connect(url, options).await?;
        probe(transport).await
    };
    tokio::time::timeout(Duration::from_secs(10), attempt).await.expect("a TLS failure must not hang")
}

#[tokio::test(flavor = "multi_thread")]
async fn cas_and_bytestream_round_trip_over_tls() {
    let pki = Pki::new();
    let server = TestServer::start_with(Backend::Memory, pki.server_config(false)).await;
    let url = tls_url(&server);
    let client = CasClient::connect_with(&url, &pki.client(false), Default::default()).await.unwrap();
    // 3 MB goes through ByteStream, the small one through a batch.
    let (big, small) = (data(1, 3_000_000), data(2, 1000));
    let blobs = vec![(sha(&big), big.clone()), (sha(&small), small.clone())];
    client.upload_blobs(blobs).await.unwrap();
    assert!(client.find_missing(&[sha(&big), sha(&small)]).await.unwrap().is_empty());
    assert_eq!(client.read_blob(sha(&big)).await.unwrap(), big);
    assert_eq!(client.read_blob(sha(&small)).await.unwrap(), small);
    // 127.0.0.1 is in the certificate too.
    let by_ip = format!("grpcs://127.0.0.1:{}", server.addr.port());
    connect_and_call(&by_ip, &pki.client(false)).await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_and_untrusting_clients_fail_cleanly() {
    let pki = Pki::new();
    let server = TestServer::start_with(Backend::Memory, pki.server_config(false)).await;
    let plain = format!("grpc://localhost:{}", server.addr.port());
    // The server reads the HTTP/2 preface as a bad TLS record and closes.
    connect_and_call(&plain, &ClientOptions::default()).await.unwrap_err();
    // A client that trusts another CA refuses the server's certificate.
    let other = Pki::new();
    let e = connect_and_call(&tls_url(&server), &other.client(false)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("certificate"), "{}", e.message());
    // TLS files with a plaintext address: the user meant TLS.
    let e = remote_apis::client::connect(&plain, &pki.client(false)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    // The server still serves TLS clients.
    connect_and_call(&tls_url(&server), &pki.client(false)).await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn mtls_accepts_only_certificates_from_its_ca() {
    let pki = Pki::new();
    let server = TestServer::start_with(Backend::Memory, pki.server_config(true)).await;
    let url = tls_url(&server);
    connect_and_call(&url, &pki.client(false)).await.unwrap_err();

    // A certificate from another CA, with the right server CA.
    let other = Pki::new();
    let mut foreign = pki.client(true);
    foreign.tls.as_mut().unwrap().cert = Some(other.path("client.pem"));
    foreign.tls.as_mut().unwrap().key = Some(other.path("client.key"));
    connect_and_call(&url, &foreign).await.unwrap_err();

    connect_and_call(&url, &pki.client(true)).await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn optional_client_certificates() {
    let pki = Pki::new();
    let server = TestServer::start_with(Backend::Memory, |c| {
        pki.server_config(true)(c);
        c.tls.require_client_cert = Some(false);
    })
    .await;
    let url = tls_url(&server);
    connect_and_call(&url, &pki.client(false)).await.unwrap();
    connect_and_call(&url, &pki.client(true)).await.unwrap();
    // A certificate that is presented must still verify.
    let other = Pki::new();
    let mut foreign = pki.client(true);
    foreign.tls.as_mut().unwrap().cert = Some(other.path("client.pem"));
    foreign.tls.as_mut().unwrap().key = Some(other.path("client.key"));
    connect_and_call(&url, &foreign).await.unwrap_err();
    server.stop().await.unwrap();
}

/// What a request saw of its connection, recorded by an interceptor on a
/// server built from the same listener code as the real one.
#[derive(Default, Debug)]
struct Seen {
    identity: Option<PeerIdentity>,
    remote: Option<std::net::SocketAddr>,
    authorization: Option<String>,
}

async fn recording_server(tls: Arc<cargo_distbuild::server::tls::ServerTls>) -> (u16, Arc<Mutex<Vec<Seen>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let limits = cargo_distbuild::server::ConnectionLimits {
        max_connections: 16,
        handshake_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(60),
        max_concurrent_streams: 10,
        keepalive_interval: None,
        keepalive_timeout: Duration::from_secs(5),
    };
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let record = seen.clone();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let incoming = cargo_distbuild::server::incoming(listener, &limits, Some(tls));
    let router = tonic::transport::Server::builder()
        .layer(tonic::service::InterceptorLayer::new(move |request: tonic::Request<()>| {
            record.lock().push(Seen {
                identity: peer::identity(request.extensions()).cloned(),
                remote: peer::remote_addr(request.extensions()),
                authorization: request.metadata().get("authorization").map(|v| v.to_str().unwrap().to_string()),
            });
            Ok(request)
        }))
        .add_service(health);
    tokio::spawn(router.serve_with_incoming(incoming));
    (port, seen)
}

async fn health_check(transport: Transport) {
    use tonic_health::pb::health_client::HealthClient;
    HealthClient::new(transport).check(tonic_health::pb::HealthCheckRequest::default()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn verified_certificate_names_and_the_token_reach_the_request() {
    let pki = Pki::new();
    let (cert, key) = pki.ca.issue("worker-7", &["worker-7.farm.example", "spiffe://farm/worker/7", "10.1.2.3"]);
    pki.write("w.pem", &cert);
    pki.write("w.key", &key);
    let tls = cargo_distbuild::server::tls::ServerTls::new(cargo_distbuild::server::tls::TlsSettings {
        cert: pki.path("server.pem"),
        key: pki.path("server.key"),
        client_ca: Some(pki.path("ca.pem")),
        require_client_cert: false,
    })
    .unwrap();
    let (port, seen) = recording_server(tls).await;
    let url = format!("grpcs://localhost:{port}");

    let mut options = pki.client(false);
    options.tls.as_mut().unwrap().cert = Some(pki.path("w.pem"));
    options.tls.as_mut().unwrap().key = Some(pki.path("w.key"));
    options.token = Some(Token::new("s3cret-token").unwrap());
    health_check(remote_apis::client::connect(&url, &options).await.unwrap()).await;
    // Without a certificate (allowed here) and without a token.
    health_check(remote_apis::client::connect(&url, &pki.client(false)).await.unwrap()).await;

    let seen = seen.lock();
    assert_eq!(seen.len(), 2);
    let names = &seen[0].identity.as_ref().expect("the verified certificate's names").names;
    // CN first, then DNS and URI SANs; IP SANs are not names.
    assert_eq!(names, &["worker-7", "worker-7.farm.example", "spiffe://farm/worker/7"]);
    assert_eq!(seen[0].authorization.as_deref(), Some("Bearer s3cret-token"));
    assert!(seen[0].remote.is_some_and(|a| a.ip().is_loopback()));
    assert_eq!(seen[1].identity, None);
    assert_eq!(seen[1].authorization, None);
    assert!(seen[1].remote.is_some());
    // The token never shows in Debug output.
    assert!(!format!("{options:?}").contains("s3cret"));
}

#[tokio::test(flavor = "multi_thread")]
async fn certificates_reload_without_dropping_connections() {
    let pki = Pki::new();
    let server = TestServer::start_with(Backend::Memory, pki.server_config(false)).await;
    let url = tls_url(&server);
    let old = remote_apis::client::connect(&url, &pki.client(false)).await.unwrap();
    probe(old.clone()).await.unwrap();

    // A new certificate from a new CA replaces the files.
    let next = Ca::new("next CA");
    let (cert, key) = next.issue("localhost", &["localhost", "127.0.0.1"]);
    let next_ca = pki.write("next-ca.pem", &next.pem);
    pki.write("server.key", &key);
    pki.write("server.pem", &cert);
    let next_client = ClientOptions { tls: Some(ClientTls { ca: Some(next_ca), cert: None, key: None }), token: None };
    let deadline = Instant::now() + Duration::from_secs(15);
    while connect_and_call(&url, &next_client).await.is_err() {
        assert!(Instant::now() < deadline, "the new certificate was never served");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // New connections no longer get the old certificate...
    connect_and_call(&url, &pki.client(false)).await.unwrap_err();
    // ...while the connection made before the reload keeps working.
    probe(old.clone()).await.unwrap();

    // A broken file is not loaded: the server keeps the last good one.
    pki.write("server.pem", "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n");
    tokio::time::sleep(cargo_distbuild::server::tls::POLL_PERIOD * 2).await;
    connect_and_call(&url, &next_client).await.unwrap();
    probe(old).await.unwrap();
    server.stop().await.unwrap();
}

async fn cli(args: &[&str], envs: &[(&str, &Path)]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_cargo-distbuild"));
    command
        .args(args)
        .env_remove("DISTBUILD_SERVER")
        .env_remove("DISTBUILD_CONFIG")
        .env_remove("DISTBUILD_TOKEN")
        .env("XDG_CONFIG_HOME", "/nonexistent");
    for (k, v) in envs {
        command.env(k, v);
    }
    command.output().await.unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_cas_put_and_get_over_mtls() {
    let pki = Pki::new();
    let server = TestServer::start_with(Backend::Memory, pki.server_config(true)).await;
    let url = tls_url(&server);
    let input = pki.path("input.bin");
    let blob = data(7, 2_500_000);
    std::fs::write(&input, &blob).unwrap();
    let (ca, cert, key) = (pki.path("ca.pem"), pki.path("client.pem"), pki.path("client.key"));
    let flags =
        ["--tls-ca", ca.to_str().unwrap(), "--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()];

    let mut put = vec!["--server", &url, "cas", "put", input.to_str().unwrap()];
    put.extend(flags);
    let out = cli(&put, &[]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with(&sha(&blob).to_string()), "{}", text(&out.stdout));

    // The same files through the environment, a token through a file.
    let token = pki.write("token", "a-token\n");
    let output = pki.path("output.bin");
    let digest = sha(&blob).to_string();
    let get =
        ["--server", &url, "--token-file", token.to_str().unwrap(), "cas", "get", &digest, output.to_str().unwrap()];
    let envs = [("DISTBUILD_TLS_CA", ca.as_path()), ("DISTBUILD_TLS_CERT", &cert), ("DISTBUILD_TLS_KEY", &key)];
    let out = cli(&get, &envs).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::read(&output).unwrap(), blob);

    // Without the client certificate: one clear line, non-zero exit.
    let out = cli(&["--server", &url, "--tls-ca", ca.to_str().unwrap(), "cas", "stat", &digest], &[]).await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    // TLS 1.3: the server refuses the client after the client's side of
    // the handshake, so the first call reports it: as the server's alert,
    // or as the closed connection when the client writes first, or (seen
    // once under CI load) as hyper's "connection was not ready" when the
    // close arrives before the first request is sent.
    assert!(err.starts_with("error: ") && err.lines().count() == 1, "{err}");
    let causes = ["CertificateRequired", "broken pipe", "reset", "connection closed", "connection was not ready"];
    assert!(causes.iter().any(|c| err.contains(c)), "{err}");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_remote_worker_with_its_own_certificate_runs_actions() {
    let pki = Pki::new();
    let server = TestServer::start_with(Backend::Filesystem, |c| {
        pki.server_config(true)(c);
        c.worker.capacity = Some(0);
        c.worker.heartbeat_interval_secs = 1;
    })
    .await;
    let url = tls_url(&server);
    let (cert, key) = pki.ca.issue("worker-1", &["worker-1.example"]);
    let (wcert, wkey) = (pki.write("worker.pem", &cert), pki.write("worker.key", &key));
    let work = tempfile::tempdir().unwrap();
    let ca = pki.path("ca.pem");
    let _worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_cargo-distbuild"))
        .args(["worker", "--scheduler", &url, "--name", "tls-worker", "--slots", "1"])
        .arg("--work-dir")
        .arg(work.path())
        .arg("--tls-ca")
        .arg(&ca)
        .arg("--tls-cert")
        .arg(&wcert)
        .arg("--tls-key")
        .arg(&wkey)
        .env_remove("DISTBUILD_CONFIG")
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .env("DISTBUILD_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // `workers list` over mTLS shows it once it connected.
    let (ccert, ckey) = (pki.path("client.pem"), pki.path("client.key"));
    let tls_flags = |args: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec!["--server".into(), url.clone()];
        for (flag, path) in [("--tls-ca", &ca), ("--tls-cert", &ccert), ("--tls-key", &ckey)] {
            v.push(flag.into());
            v.push(path.display().to_string());
        }
        v.extend(args.iter().map(|a| a.to_string()));
        v
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let args = tls_flags(&["workers", "list"]);
        let out = cli(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]).await;
        assert!(out.status.success(), "{}", text(&out.stderr));
        if text(&out.stdout).contains("tls-worker") {
            break;
        }
        assert!(Instant::now() < deadline, "the worker never connected over mTLS");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.txt"), "through TLS\n").unwrap();
    let args = tls_flags(&[
        "exec",
        "--input",
        "in.txt",
        "--output",
        "out.txt",
        "--",
        "sh",
        "-c",
        "cat in.txt > out.txt; echo ran",
    ]);
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cargo-distbuild"))
        .args(&args)
        .current_dir(dir.path())
        .env_remove("DISTBUILD_SERVER")
        .env_remove("DISTBUILD_CONFIG")
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "ran\n");
    assert_eq!(std::fs::read_to_string(dir.path().join("out.txt")).unwrap(), "through TLS\n");
    server.stop().await.unwrap();
}

#[test]
fn tls_config_is_validated() {
    let cases = [
        ("[tls]\ncert = \"c.pem\"", "cert and key"),
        ("[tls]\nclient_ca = \"ca.pem\"", "client_ca"),
        ("[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nrequire_client_cert = true", "require_client_cert needs client_ca"),
        ("[tls]\ncertificate = \"c.pem\"", "unknown field"),
        ("[client]\ntoken = \"abc\"", "unknown field"),
    ];
    for (text, needle) in cases {
        let err = FileConfig::parse(text).and_then(|f| f.resolve()).unwrap_err();
        assert!(format!("{err:#}").contains(needle), "{text:?}: {err:#}");
    }
    let c = FileConfig::parse("[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nclient_ca = \"ca.pem\"")
        .unwrap()
        .resolve()
        .unwrap();
    assert!(c.tls.unwrap().require_client_cert, "client_ca alone requires client certificates");
}

#[tokio::test]
async fn a_server_with_unreadable_tls_files_does_not_start() {
    let pki = Pki::new();
    std::fs::write(pki.path("server.key"), "no key here").unwrap();
    let server = TestServer::start_with(Backend::Memory, pki.server_config(false)).await;
    let err = format!("{:#}", server.stop().await.unwrap_err());
    assert!(err.contains("[tls] key") && err.contains("server.key"), "{err}");
}
