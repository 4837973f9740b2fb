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
