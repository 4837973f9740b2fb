//! ContentAddressableStorage: the batch calls and GetTree, as thin adapters
//! over a [`Store`](crate::store::Store).

mod bytestream;
mod chunks;
mod tree;

pub use bytestream::ByteStreamService;

use bytes::Bytes;
use futures::StreamExt;
use remote_apis::reapi::content_addressable_storage_server::ContentAddressableStorage;
use remote_apis::reapi::{
    BatchReadBlobsRequest, BatchReadBlobsResponse, BatchUpdateBlobsRequest, BatchUpdateBlobsResponse,
    FindMissingBlobsRequest, FindMissingBlobsResponse, GetChunkMappingRequest, GetChunkMappingResponse, GetTreeRequest,
    GetTreeResponse, RegisterChunkMappingRequest, RegisterChunkMappingResponse, SpliceBlobRequest, SpliceBlobResponse,
    SplitBlobRequest, SplitBlobResponse, batch_read_blobs_response, batch_update_blobs_response,
};
use remote_apis::{Compressor, Digest, DigestFunction, InstanceName};
use tonic::{Request, Response, Status};

use crate::error::{Error, Result};
use crate::store::Store;

/// How many blobs of one batch are stored or read at once.
const BATCH_CONCURRENCY: usize = 32;

/// zstd level for what the server compresses: fast, since it is on the
/// critical path of a download.
pub(crate) const ZSTD_LEVEL: i32 = 1;

pub struct CasService {
    store: Store,
    max_batch_bytes: u64,
}

impl CasService {
    pub fn new(store: Store, max_batch_bytes: u64) -> Self {
        CasService { store, max_batch_bytes }
    }
}

/// Parses the common request header: instance name and digest function.
pub(crate) fn parse_header(instance: &str, function: i32) -> Result<(InstanceName, DigestFunction)> {
    let instance = InstanceName::new(instance).map_err(|e| Error::bad_field("instance_name", e.0))?;
    let function = DigestFunction::from_proto(function).map_err(|e| Error::bad_field("digest_function", e.0))?;
    Ok((instance, function))
}

fn parse_digests(function: DigestFunction, digests: &[remote_apis::reapi::Digest], field: &str) -> Result<Vec<Digest>> {
    digests
        .iter()
        .enumerate()
        .map(|(i, d)| Digest::from_proto(function, d).map_err(|e| Error::bad_field(&format!("{field}[{i}]"), e.0)))
        .collect()
}

impl CasService {
    async fn update_one(
        &self,
        function: DigestFunction,
        req: remote_apis::reapi::batch_update_blobs_request::Request,
    ) -> Result<Digest> {
        let digest = Digest::from_field(function, req.digest.as_ref(), "digest")?;
        let data = match Compressor::from_proto(req.compressor)? {
            Compressor::Identity => Bytes::from(req.data),
            Compressor::Zstd => Bytes::from(decompress_bounded(&req.data, digest.size)?),
        };
        self.store.put_bytes(&digest, data).await?;
        Ok(digest)
    }

    async fn read_one(&self, digest: Digest, zstd: bool) -> batch_read_blobs_response::Response {
        let result = self.store.get_bytes(&digest).await.and_then(|data| {
            if zstd && !data.is_empty() {
                let packed = zstd::bulk::compress(&data, ZSTD_LEVEL)
                    .map_err(|e| Error::internal(format!("compressing {digest}: {e}")))?;
                Ok((packed, Compressor::Zstd))
            } else {
                Ok((data.into(), Compressor::Identity))
            }
        });
        match result {
            Ok((data, compressor)) => batch_read_blobs_response::Response {
                digest: Some(digest.to_proto()),
                data,
                compressor: compressor.to_proto(),
                status: Some(Default::default()),
            },
            Err(e) => batch_read_blobs_response::Response {
                digest: Some(digest.to_proto()),
                data: Vec::new(),
                compressor: Compressor::Identity.to_proto(),
                status: Some(e.to_rpc_status()),
            },
        }
    }

    fn check_batch_size(&self, total: u64, what: &str) -> Result<()> {
        if total > self.max_batch_bytes {
            return Err(Error::invalid(format!(
                "{what} totals {total} bytes, more than max_batch_total_size_bytes ({}); use ByteStream for large blobs",
                self.max_batch_bytes
            )));
        }
        Ok(())
    }
}

/// The chunk digests of a split, in response messages of a bounded size.
const CHUNKS_PER_MESSAGE: usize = 10_000;

impl CasService {
    async fn split(
        &self,
        instance: &str,
        function: i32,
        blob: Option<&remote_apis::reapi::Digest>,
    ) -> Result<Vec<Digest>> {
        let (_instance, function) = parse_header(instance, function)?;
        let blob =
            Digest::from_field(function, blob, "blob_digest").map_err(|e| Error::bad_field("blob_digest", e.0))?;
        chunks::split(&self.store, blob).await
    }

    async fn splice(
        &self,
        instance: &str,
        function: i32,
        blob: Option<&remote_apis::reapi::Digest>,
        chunk_digests: &[remote_apis::reapi::Digest],
    ) -> Result<Digest> {
        let (_instance, function) = parse_header(instance, function)?;
        let blob =
            Digest::from_field(function, blob, "blob_digest").map_err(|e| Error::bad_field("blob_digest", e.0))?;
        let chunk_digests = parse_digests(function, chunk_digests, "chunk_digests")?;
        chunks::splice(&self.store, blob, &chunk_digests).await?;
        Ok(blob)
    }
}

/// Decompresses a zstd payload that must expand to exactly `size` bytes;
/// refuses to produce more (a small input cannot make the server allocate
/// more than the declared size).
pub(crate) fn decompress_bounded(data: &[u8], size: u64) -> Result<Vec<u8>> {
    let out = zstd::bulk::decompress(data, size as usize)
        .map_err(|e| Error::invalid(format!("zstd data does not decompress to at most {size} bytes: {e}")))?;
    if out.len() as u64 != size {
        return Err(Error::invalid(format!("zstd data decompresses to {} bytes, not the digest's {size}", out.len())));
    }
    Ok(out)
}

#[tonic::async_trait]
impl ContentAddressableStorage for CasService {
    async fn find_missing_blobs(
        &self,
        request: Request<FindMissingBlobsRequest>,
    ) -> Result<Response<FindMissingBlobsResponse>, Status> {
        let req = request.into_inner();
        let (_instance, function) = parse_header(&req.instance_name, req.digest_function)?;
        let digests = parse_digests(function, &req.blob_digests, "blob_digests")?;
        let missing = self.store.find_missing(&digests).await?;
        Ok(Response::new(FindMissingBlobsResponse {
            missing_blob_digests: missing.iter().map(Digest::to_proto).collect(),
        }))
    }

    async fn batch_update_blobs(
        &self,
        request: Request<BatchUpdateBlobsRequest>,
    ) -> Result<Response<BatchUpdateBlobsResponse>, Status> {
        let req = request.into_inner();
        let (_instance, function) = parse_header(&req.instance_name, req.digest_function)?;
        let total: u64 = req.requests.iter().map(|r| r.data.len() as u64).sum();
        self.check_batch_size(total, "BatchUpdateBlobs request")?;
        let responses = futures::stream::iter(req.requests)
            .map(|r| async move {
                let proto_digest = r.digest.clone();
                let status = match self.update_one(function, r).await {
                    Ok(_) => Default::default(),
                    Err(e) => e.to_rpc_status(),
                };
                batch_update_blobs_response::Response { digest: proto_digest, status: Some(status) }
            })
            .buffered(BATCH_CONCURRENCY)
            .collect()
            .await;
        Ok(Response::new(BatchUpdateBlobsResponse { responses }))
    }

    async fn batch_read_blobs(
        &self,
        request: Request<BatchReadBlobsRequest>,
    ) -> Result<Response<BatchReadBlobsResponse>, Status> {
        let req = request.into_inner();
        let (_instance, function) = parse_header(&req.instance_name, req.digest_function)?;
        let digests = parse_digests(function, &req.digests, "digests")?;
        self.check_batch_size(digests.iter().map(|d| d.size).sum(), "BatchReadBlobs request")?;
        let mut zstd = false;
        for c in &req.acceptable_compressors {
            // Unknown compressors are ones we simply do not use.
            zstd |= Compressor::from_proto(*c) == Ok(Compressor::Zstd);
        }
        let responses =
            futures::stream::iter(digests).map(|d| self.read_one(d, zstd)).buffered(BATCH_CONCURRENCY).collect().await;
        Ok(Response::new(BatchReadBlobsResponse { responses }))
    }

    // Splitting and splicing (see chunks.rs). The chunking function is the
    // server's choice (reported as UNKNOWN); splicing accepts any.
    async fn split_blob(&self, request: Request<SplitBlobRequest>) -> Result<Response<SplitBlobResponse>, Status> {
        let req = request.into_inner();
        let chunks = self.split(&req.instance_name, req.digest_function, req.blob_digest.as_ref()).await?;
        Ok(Response::new(SplitBlobResponse {
            chunk_digests: chunks.iter().map(Digest::to_proto).collect(),
            chunking_function: 0,
        }))
    }

    async fn splice_blob(&self, request: Request<SpliceBlobRequest>) -> Result<Response<SpliceBlobResponse>, Status> {
        let req = request.into_inner();
        let blob =
            self.splice(&req.instance_name, req.digest_function, req.blob_digest.as_ref(), &req.chunk_digests).await?;
        Ok(Response::new(SpliceBlobResponse { blob_digest: Some(blob.to_proto()) }))
    }

    type GetChunkMappingStream = futures::stream::BoxStream<'static, Result<GetChunkMappingResponse, Status>>;

    async fn get_chunk_mapping(
        &self,
        request: Request<GetChunkMappingRequest>,
    ) -> Result<Response<Self::GetChunkMappingStream>, Status> {
        let req = request.into_inner();
        let chunks = self.split(&req.instance_name, req.digest_function, req.blob_digest.as_ref()).await?;
        let messages: Vec<Result<GetChunkMappingResponse, Status>> = chunks
            .chunks(CHUNKS_PER_MESSAGE)
            .map(|part| {
                Ok(GetChunkMappingResponse {
                    chunk_digests: part.iter().map(Digest::to_proto).collect(),
                    chunking_function: 0,
                })
            })
            .collect();
        Ok(Response::new(futures::stream::iter(messages).boxed()))
    }

    async fn register_chunk_mapping(
        &self,
        request: Request<tonic::Streaming<RegisterChunkMappingRequest>>,
    ) -> Result<Response<RegisterChunkMappingResponse>, Status> {
        let mut stream = request.into_inner();
        let Some(first) = stream.message().await? else {
            return Err(Error::invalid("RegisterChunkMapping needs at least one request").into());
        };
        let mut chunk_digests = first.chunk_digests.clone();
        while let Some(more) = stream.message().await? {
            chunk_digests.extend(more.chunk_digests);
        }
        let blob = self
            .splice(&first.instance_name, first.digest_function, first.blob_digest.as_ref(), &chunk_digests)
            .await?;
        Ok(Response::new(RegisterChunkMappingResponse { blob_digest: Some(blob.to_proto()) }))
    }

    type GetTreeStream = futures::stream::BoxStream<'static, Result<GetTreeResponse, Status>>;

    async fn get_tree(&self, request: Request<GetTreeRequest>) -> Result<Response<Self::GetTreeStream>, Status> {
        let req = request.into_inner();
        let (_instance, function) = parse_header(&req.instance_name, req.digest_function)?;
        let root = Digest::from_field(function, req.root_digest.as_ref(), "root_digest")
            .map_err(|e| Error::bad_field("root_digest", e.0))?;
        let page_size = usize::try_from(req.page_size).map_err(|_| Error::bad_field("page_size", "is negative"))?;
        let stream = tree::get_tree(self.store.clone(), function, root, page_size, &req.page_token).await?;
        Ok(Response::new(stream))
    }
}
