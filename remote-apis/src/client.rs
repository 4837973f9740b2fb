//! A CAS client that moves blobs the way REAPI servers expect: small blobs in
//! batches that respect the server's advertised limit, large ones streamed
//! through ByteStream in chunks, never whole in memory.

use std::path::Path;

use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tonic::transport::{Channel, Endpoint};

use crate::bytestream::byte_stream_client::ByteStreamClient;
use crate::bytestream::{ReadRequest, WriteRequest};
use crate::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use crate::reapi::{BatchUpdateBlobsRequest, FindMissingBlobsRequest, batch_update_blobs_request};
use crate::{Compressor, Digest, DigestFunction, InstanceName, ReadResource, WriteResource};

/// Bytes per ByteStream message. Large enough for throughput, small enough to
/// stay far below any gRPC message limit.
pub const CHUNK_SIZE: usize = 1 << 20;

/// Blobs up to this size go through BatchUpdateBlobs when uploaded together.
pub const BATCH_BLOB_LIMIT: u64 = 1 << 20;

/// Most blobs in one batch request: servers bound the per-blob work of a
/// call (cargo-distbuild takes 10,000).
pub const BATCH_MAX_BLOBS: usize = 10_000;

/// The address form every command takes: `grpc://host:port`,
/// `http://host:port` or plain `host:port`.
pub fn endpoint(server: &str) -> Result<Endpoint, tonic::Status> {
    let url = if let Some(rest) = server.strip_prefix("grpc://") {
        format!("http://{rest}")
    } else if server.starts_with("http://") || server.starts_with("https://") {
        server.to_string()
    } else if let Some(rest) = server.strip_prefix("grpcs://") {
        format!("https://{rest}")
    } else {
        format!("http://{server}")
    };
    let endpoint = Endpoint::from_shared(url)
        .map_err(|e| tonic::Status::invalid_argument(format!("bad server address {server:?}: {e}")))?;
    // Wide HTTP/2 windows: the defaults cap a single stream far below what
    // loopback and LAN links carry.
    Ok(endpoint.tcp_nodelay(true).initial_stream_window_size(8 << 20).initial_connection_window_size(16 << 20))
}

#[derive(Clone)]
pub struct CasClient {
    cas: ContentAddressableStorageClient<Channel>,
    bytestream: ByteStreamClient<Channel>,
    instance: InstanceName,
    function: DigestFunction,
    max_batch_bytes: u64,
}

impl CasClient {
    /// Connects eagerly, so a server that is down is reported here.
    pub async fn connect(server: &str, instance: InstanceName) -> Result<Self, tonic::Status> {
        let channel = endpoint(server)?
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("cannot connect to {server}: {e}")))?;
        Ok(Self::new(channel, instance))
    }

    pub fn new(channel: Channel, instance: InstanceName) -> Self {
        let limit = 64 << 20;
        CasClient {
            cas: ContentAddressableStorageClient::new(channel.clone())
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            bytestream: ByteStreamClient::new(channel)
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            instance,
            function: DigestFunction::Sha256,
            max_batch_bytes: (4 << 20) - (64 << 10),
        }
    }

    /// Uses `function` for the digests this client computes.
    pub fn with_digest_function(mut self, function: DigestFunction) -> Self {
        self.function = function;
        self
    }

    /// Caps batch requests at `bytes` of blob data (the server's
    /// `max_batch_total_size_bytes`).
    pub fn with_max_batch_bytes(mut self, bytes: u64) -> Self {
        self.max_batch_bytes = bytes.max(1);
        self
    }

    pub fn digest_function(&self) -> DigestFunction {
        self.function
    }

    pub async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, tonic::Status> {
        let mut out = Vec::new();
        // Keep each request well under 4 MiB of digests.
        for chunk in digests.chunks(20_000) {
            let req = FindMissingBlobsRequest {
                instance_name: self.instance.to_string(),
                blob_digests: chunk.iter().map(Digest::to_proto).collect(),
                digest_function: self.function.to_proto() as i32,
            };
            let resp = self.cas.clone().find_missing_blobs(req).await?.into_inner();
            for d in resp.missing_blob_digests {
                out.push(
                    Digest::from_proto(self.function, &d)
                        .map_err(|e| tonic::Status::internal(format!("server returned a bad digest: {e}")))?,
                );
            }
        }
        Ok(out)
    }

    /// Uploads blobs held in memory: batches for small ones, ByteStream for
    /// the rest. Per-blob failures are returned as the first error.
    pub async fn upload_blobs(&self, blobs: Vec<(Digest, Bytes)>) -> Result<(), tonic::Status> {
        let mut batch = Vec::new();
        let mut batch_bytes = 0u64;
        for (digest, data) in blobs {
            if digest.size > BATCH_BLOB_LIMIT.min(self.max_batch_bytes) {
                self.write_stream(digest, Compressor::Identity, futures::stream::iter(chunks(data))).await?;
                continue;
            }
            if batch_bytes + digest.size > self.max_batch_bytes || batch.len() == BATCH_MAX_BLOBS {
                self.batch_update(std::mem::take(&mut batch)).await?;
                batch_bytes = 0;
            }
            batch_bytes += digest.size;
            batch.push((digest, data));
        }
        if !batch.is_empty() {
            self.batch_update(batch).await?;
        }
        Ok(())
    }

    async fn batch_update(&self, blobs: Vec<(Digest, Bytes)>) -> Result<(), tonic::Status> {
        let req = BatchUpdateBlobsRequest {
            instance_name: self.instance.to_string(),
            requests: blobs
                .into_iter()
                .map(|(d, data)| batch_update_blobs_request::Request {
                    digest: Some(d.to_proto()),
                    data: data.into(),
                    compressor: Compressor::Identity.to_proto(),
                })
                .collect(),
            digest_function: self.function.to_proto() as i32,
        };
        let resp = self.cas.clone().batch_update_blobs(req).await?.into_inner();
        for r in resp.responses {
            if let Some(status) = r.status
                && status.code != 0
            {
                let hash = r.digest.map(|d| d.hash).unwrap_or_default();
                return Err(tonic::Status::new(
                    tonic::Code::from_i32(status.code),
                    format!("upload of {hash}: {}", status.message),
                ));
            }
        }
        Ok(())
    }

    /// Hashes a file without loading it, then uploads it unless the server
    /// already has it. Returns the file's digest.
    pub async fn upload_file(&self, path: &Path) -> Result<Digest, tonic::Status> {
        let io = |e: std::io::Error| tonic::Status::failed_precondition(format!("{}: {e}", path.display()));
        let digest = hash_file(self.function, path).await.map_err(io)?;
        if self.find_missing(&[digest]).await?.is_empty() {
            return Ok(digest);
        }
        let file = tokio::fs::File::open(path).await.map_err(io)?;
        self.upload_reader(digest, file).await?;
        Ok(digest)
    }

    /// Streams `reader`, which must produce exactly the blob's bytes.
    pub async fn upload_reader(
        &self,
        digest: Digest,
        reader: impl AsyncRead + Send + Unpin + 'static,
    ) -> Result<(), tonic::Status> {
        let stream = tokio_util::io::ReaderStream::with_capacity(reader, CHUNK_SIZE);
        self.write_stream(digest, Compressor::Identity, stream).await
    }

    /// Sends already-encoded chunks (`compressor` says how) to ByteStream.Write.
    pub async fn write_stream(
        &self,
        digest: Digest,
        compressor: Compressor,
        chunks: impl futures::Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    ) -> Result<(), tonic::Status> {
        let name = WriteResource {
            instance: self.instance.clone(),
            uuid: uuid::Uuid::new_v4().to_string(),
            compressor,
            digest,
        }
        .to_name();
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteRequest>(4);
        let feeder = tokio::spawn(async move {
            let mut offset = 0i64;
            let mut first = true;
            let mut chunks = std::pin::pin!(chunks);
            loop {
                let next = chunks.next().await;
                let (data, finish) = match next {
                    Some(Ok(data)) => (data, false),
                    Some(Err(e)) => return Err(tonic::Status::aborted(format!("reading the blob: {e}"))),
                    None => (Bytes::new(), true),
                };
                let len = data.len() as i64;
                let req = WriteRequest {
                    resource_name: if first { name.clone() } else { String::new() },
                    write_offset: offset,
                    finish_write: finish,
                    data: data.into(),
                };
                first = false;
                offset += len;
                if tx.send(req).await.is_err() || finish {
                    return Ok(());
                }
            }
        });
        let result = self.bytestream.clone().write(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
        let fed = feeder.await.map_err(|e| tonic::Status::internal(e.to_string()))?;
        fed?;
        result?;
        Ok(())
    }

    /// Reads a whole blob into memory (meant for small blobs).
    pub async fn read_blob(&self, digest: Digest) -> Result<Bytes, tonic::Status> {
        let mut buf = Vec::with_capacity(digest.size.min(64 << 20) as usize);
        self.download(digest, &mut buf).await?;
        Ok(buf.into())
    }

    /// Streams a blob into `out`, checking its size and hash on the way.
    pub async fn download(&self, digest: Digest, out: &mut (impl AsyncWrite + Unpin)) -> Result<(), tonic::Status> {
        let name = ReadResource { instance: self.instance.clone(), compressor: Compressor::Identity, digest }.to_name();
        let req = ReadRequest { resource_name: name, read_offset: 0, read_limit: 0 };
        let mut stream = self.bytestream.clone().read(req).await?.into_inner();
        let mut hasher = digest.function.hasher();
        while let Some(msg) = stream.message().await? {
            hasher.update(&msg.data);
            out.write_all(&msg.data).await.map_err(|e| tonic::Status::internal(format!("writing the blob: {e}")))?;
        }
        out.flush().await.map_err(|e| tonic::Status::internal(format!("writing the blob: {e}")))?;
        let got = hasher.finish();
        if got != digest {
            return Err(tonic::Status::data_loss(format!("the server sent {got} for {digest}")));
        }
        Ok(())
    }
}

/// Computes a file's digest on the blocking pool.
pub async fn hash_file(function: DigestFunction, path: &Path) -> std::io::Result<Digest> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || crate::merkle::hash_file_blocking(function, &path))
        .await
        .map_err(std::io::Error::other)?
}

fn chunks(data: Bytes) -> Vec<std::io::Result<Bytes>> {
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < data.len() {
        let end = (offset + CHUNK_SIZE).min(data.len());
        out.push(Ok(data.slice(offset..end)));
        offset = end;
    }
    out
}
