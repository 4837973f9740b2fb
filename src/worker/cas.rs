//! How an executor reaches the CAS: directly through the server's store
//! (built-in workers) or over gRPC (remote workers). The executor is the same
//! code either way.

use std::path::Path;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use remote_apis::client::CasClient;
use remote_apis::client::Transport;
use remote_apis::{Digest, InstanceName};
use tokio::io::AsyncWriteExt;

use crate::error::{Error, Result};
use crate::store::Store;

#[async_trait]
pub trait ExecCas: Send + Sync + 'static {
    /// A whole blob known to be small (Directory messages).
    async fn get_bytes(&self, instance: &InstanceName, digest: &Digest) -> Result<Bytes>;
    /// Writes a blob into a new file at `path`.
    async fn fetch_to(&self, instance: &InstanceName, digest: &Digest, path: &Path) -> Result<()>;
    async fn find_missing(&self, instance: &InstanceName, digests: &[Digest]) -> Result<Vec<Digest>>;
    async fn put_file(&self, instance: &InstanceName, digest: &Digest, path: &Path) -> Result<()>;
    async fn put_bytes(&self, instance: &InstanceName, digest: &Digest, data: Bytes) -> Result<()>;
}

/// The server's own store (the instance name does not partition the CAS).
pub struct StoreCas(pub Store);

#[async_trait]
impl ExecCas for StoreCas {
    async fn get_bytes(&self, _: &InstanceName, digest: &Digest) -> Result<Bytes> {
        self.0.get_bytes(digest).await
    }

    async fn fetch_to(&self, _: &InstanceName, digest: &Digest, path: &Path) -> Result<()> {
        let mut stream = self.0.get(digest, 0, None).await?;
        let mut file = tokio::fs::File::create(path).await.map_err(|e| Error::io(path.display(), e))?;
        while let Some(chunk) = stream.next().await {
            file.write_all(&chunk?).await.map_err(|e| Error::io(path.display(), e))?;
        }
        file.flush().await.map_err(|e| Error::io(path.display(), e))
    }

    async fn find_missing(&self, _: &InstanceName, digests: &[Digest]) -> Result<Vec<Digest>> {
        self.0.find_missing(digests).await
    }

    async fn put_file(&self, _: &InstanceName, digest: &Digest, path: &Path) -> Result<()> {
        use tokio::io::AsyncReadExt;
        let mut file = tokio::fs::File::open(path).await.map_err(|e| Error::io(path.display(), e))?;
        let mut sink = self.0.put(digest).await?;
        loop {
            // Each chunk is read into its own buffer and handed over, not copied.
            let mut buf = bytes::BytesMut::with_capacity(crate::store::READ_CHUNK);
            let n = file.read_buf(&mut buf).await.map_err(|e| Error::io(path.display(), e))?;
            if n == 0 {
                break;
            }
            sink.write(buf.freeze()).await?;
        }
        sink.commit().await
    }

    async fn put_bytes(&self, _: &InstanceName, digest: &Digest, data: Bytes) -> Result<()> {
        self.0.put_bytes(digest, data).await
    }
}

/// A CAS reached over gRPC (a remote worker's view of the server).
pub struct RemoteCas {
    channel: Transport,
}

impl RemoteCas {
    /// `channel`: a `Transport` (with the worker's token) or a plain `Channel`.
    pub fn new(channel: impl Into<Transport>) -> Self {
        let channel = channel.into();
        RemoteCas { channel }
    }

    fn client(&self, instance: &InstanceName, digest: &Digest) -> CasClient {
        CasClient::new(self.channel.clone(), instance.clone()).with_digest_function(digest.function)
    }
}

fn from_status(s: tonic::Status) -> Error {
    Error::new(s.code(), s.message().to_string())
}

#[async_trait]
impl ExecCas for RemoteCas {
    async fn get_bytes(&self, instance: &InstanceName, digest: &Digest) -> Result<Bytes> {
        self.client(instance, digest).read_blob(*digest).await.map_err(|s| missing_or(s, digest))
    }

    async fn fetch_to(&self, instance: &InstanceName, digest: &Digest, path: &Path) -> Result<()> {
        let mut file = tokio::fs::File::create(path).await.map_err(|e| Error::io(path.display(), e))?;
        self.client(instance, digest).download(*digest, &mut file).await.map_err(|s| missing_or(s, digest))
    }

    async fn find_missing(&self, instance: &InstanceName, digests: &[Digest]) -> Result<Vec<Digest>> {
        let Some(first) = digests.first() else { return Ok(Vec::new()) };
        self.client(instance, first).find_missing(digests).await.map_err(from_status)
    }

    async fn put_file(&self, instance: &InstanceName, digest: &Digest, path: &Path) -> Result<()> {
        let file = tokio::fs::File::open(path).await.map_err(|e| Error::io(path.display(), e))?;
        self.client(instance, digest).upload_reader(*digest, file).await.map_err(from_status)
    }

    async fn put_bytes(&self, instance: &InstanceName, digest: &Digest, data: Bytes) -> Result<()> {
        self.client(instance, digest).upload_blobs(vec![(*digest, data)]).await.map_err(from_status)
    }
}

/// NOT_FOUND from the server means the blob is missing: keep the digest so
/// the client is told which one.
fn missing_or(s: tonic::Status, digest: &Digest) -> Error {
    if s.code() == tonic::Code::NotFound { Error::blob_not_found(digest) } else { from_status(s) }
}
