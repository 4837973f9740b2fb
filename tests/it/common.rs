//! Starting and stopping an in-process server for a test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use cargo_distbuild::config::{Backend, FileConfig};
use remote_apis::bytestream::byte_stream_client::ByteStreamClient;
use remote_apis::reapi::action_cache_client::ActionCacheClient;
use remote_apis::reapi::capabilities_client::CapabilitiesClient;
use remote_apis::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use remote_apis::{Digest, DigestFunction};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub struct TestServer {
    pub addr: SocketAddr,
    pub channel: Channel,
    pub data_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
    _dir: Option<tempfile::TempDir>,
}

impl TestServer {
    /// A server on a fresh filesystem store.
    pub async fn start() -> Self {
        Self::start_with(Backend::Filesystem, |_| {}).await
    }

    pub async fn start_with(backend: Backend, tweak: impl FnOnce(&mut FileConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut server = Self::start_in(dir.path(), backend, tweak).await;
        server._dir = Some(dir);
        server
    }

    /// A server whose data lives in `dir` (which outlives it).
    pub async fn start_in(dir: &Path, backend: Backend, tweak: impl FnOnce(&mut FileConfig)) -> Self {
        let mut file = FileConfig::default();
        file.scheduler.addr = "127.0.0.1:0".into();
        file.cas.root = Some(dir.to_path_buf());
        file.cas.backend = backend;
        // The test binary is not cargo-distbuild: name the real one, so
        // built-in workers supervise actions as the server binary does.
        file.worker.action_init = Some(env!("CARGO_BIN_EXE_distbuild-action-init").into());
        // No HTTP listener unless a test asks for one (on a free port):
        // tests run in parallel and the default port is one.
        file.server.http_listen = Some(String::new());
        tweak(&mut file);
        let config = file.resolve().unwrap();
        let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(cargo_distbuild::server::run(listener, config, async {
            let _ = stopped.await;
        }));
        let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
        TestServer { addr, channel, data_dir: dir.to_path_buf(), stop: Some(stop), handle: Some(handle), _dir: None }
    }

    /// A server on storage the caller opened (replicas share one store).
    pub async fn serve_stores(
        dir: &Path,
        stores: cargo_distbuild::server::Stores,
        tweak: impl FnOnce(&mut FileConfig),
    ) -> Self {
        let mut file = FileConfig::default();
        file.scheduler.addr = "127.0.0.1:0".into();
        file.cas.root = Some(dir.to_path_buf());
        file.cas.backend = Backend::Memory;
        file.worker.action_init = Some(env!("CARGO_BIN_EXE_distbuild-action-init").into());
        file.server.http_listen = Some(String::new());
        tweak(&mut file);
        let config = file.resolve().unwrap();
        let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            cargo_distbuild::server::serve(listener, &config, stores, async {
                let _ = stopped.await;
            })
            .await
        });
        let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
        TestServer { addr, channel, data_dir: dir.to_path_buf(), stop: Some(stop), handle: Some(handle), _dir: None }
    }

    /// A handle on a server this test did not start in-process (a
    /// `cargo-distbuild server` child process): a channel, nothing to stop.
    pub fn connect(addr: SocketAddr) -> Self {
        let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
        TestServer { addr, channel, data_dir: PathBuf::new(), stop: None, handle: None, _dir: None }
    }

    pub fn url(&self) -> String {
        format!("grpc://{}", self.addr)
    }

    /// Graceful shutdown; returns what `run` returned.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.stop.take().unwrap().send(());
        self.handle.take().unwrap().await.unwrap()
    }

    pub fn cas(&self) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    pub fn bytestream(&self) -> ByteStreamClient<Channel> {
        ByteStreamClient::new(self.channel.clone())
    }

    pub fn ac(&self) -> ActionCacheClient<Channel> {
        ActionCacheClient::new(self.channel.clone())
    }

    pub fn capabilities(&self) -> CapabilitiesClient<Channel> {
        CapabilitiesClient::new(self.channel.clone())
    }

    /// What GetCapabilities answers.
    pub async fn get_capabilities(&self) -> remote_apis::reapi::ServerCapabilities {
        let request = remote_apis::reapi::GetCapabilitiesRequest::default();
        self.capabilities().get_capabilities(request).await.unwrap().into_inner()
    }

    pub fn client(&self) -> remote_apis::client::CasClient {
        remote_apis::client::CasClient::new(self.channel.clone(), Default::default())
    }
}

/// Deterministic, poorly compressible test data.
pub fn data(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out.into()
}

pub fn sha(data: &[u8]) -> Digest {
    DigestFunction::Sha256.digest_of(data)
}

/// Asserts a gRPC error code, showing the message when it differs.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: tonic::Code) -> tonic::Status {
    match result {
        Ok(v) => panic!("expected {code:?}, got Ok({v:?})"),
        Err(s) => {
            assert_eq!(s.code(), code, "message: {}", s.message());
            s
        }
    }
}

/// A loopback address that was free a moment ago, for listeners the server
/// binds itself (such as `[server] http_listen`). Taken below the kernel's
/// ephemeral range, from which every port-0 listener of the other tests
/// (running at the same time) gets its port: a port handed out here cannot
/// be taken by one of them before the server binds it. Each call in this
/// process gets another port.
pub fn free_addr() -> std::net::SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000; // up to 32,000: below 32,768 (ip_local_port_range)
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = std::process::id().wrapping_mul(7919) % SPAN;
    for _ in 0..SPAN {
        let port = LOW + (base + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port as u16)) {
            return l.local_addr().unwrap();
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN)
}

/// One HTTP response, as read off the wire.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header lines, names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A plain HTTP/1.0 request (the body ends when the server closes), with
/// extra header lines such as `Authorization: Bearer ...`.
pub async fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The server binds its HTTP listener while it starts, after the test
    // bound the gRPC one: wait for it (refused until then).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut stream = loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await
            }
            Err(e) => panic!("connecting to {addr}: {e}"),
        }
    };
    let mut request = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n", body.len());
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    // A server that never answers fails the test instead of hanging it.
    tokio::time::timeout(std::time::Duration::from_secs(60), stream.read_to_end(&mut raw))
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no complete answer from {addr} within 60 s"))
        .unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("no end of headers");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    HttpResponse { status, headers, body: raw[split + 4..].to_vec() }
}

/// GET with optional extra headers.
pub async fn http_get(addr: std::net::SocketAddr, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    http_request(addr, "GET", path, headers, b"").await
}

/// Runs the `cargo-distbuild` binary with `args`, away from the user's
/// configuration and server variables.
pub async fn cli<S: AsRef<std::ffi::OsStr>>(args: impl IntoIterator<Item = S>) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_cargo-distbuild"))
        .args(args)
        .env_remove("DISTBUILD_SERVER")
        .env_remove("DISTBUILD_CONFIG")
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .output()
        .await
        .unwrap()
}
