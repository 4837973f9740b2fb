//! ContentAddressableStorage: the batch calls and GetTree, as thin adapters
//! over a [`Store`](crate::store::Store).

mod batch_read;
mod bytestream;
mod chunks;
/// Public only for the fuzz target `zstd_decode` (fuzz/); not an API.
#[doc(hidden)]
pub mod decode;
mod sessions;
mod tree;

pub use bytestream::ByteStreamService;

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use remote_apis::reapi::content_addressable_storage_server::ContentAddressableStorage;
use remote_apis::reapi::{
    BatchReadBlobsRequest, BatchReadBlobsResponse, BatchUpdateBlobsRequest, BatchUpdateBlobsResponse,
    FindMissingBlobsRequest, FindMissingBlobsResponse, GetChunkMappingRequest, GetChunkMappingResponse, GetTreeRequest,
    GetTreeResponse, RegisterChunkMappingRequest, RegisterChunkMappingResponse, SpliceBlobRequest, SpliceBlobResponse,
    SplitBlobRequest, SplitBlobResponse, batch_update_blobs_response,
};
use remote_apis::{Compressor, Digest, DigestFunction, InstanceName};
use tonic::{Request, Response, Status};

use crate::auth::{Auth, FunctionField, Grant};
use crate::error::{Error, Result};
use crate::store::Store;
use decode::BoundedDecoder;

/// How many blobs of one batch are stored or read at once.
const BATCH_CONCURRENCY: usize = 32;

/// Fewest blobs one BatchReadBlobs or BatchUpdateBlobs call may name,
/// whatever the batch limit. Each blob costs a store lookup, a file and a
/// per-blob status whatever its size, and the transport admits some 900,000
/// digests per message (13 MB of digests once cost 10 s of server CPU).
pub const MIN_BATCH_BLOBS: usize = 10_000;

/// Most blobs one batch call may name: one per 64 bytes of
/// `max_batch_total_size_bytes`, at least [`MIN_BATCH_BLOBS`]. A response
/// spends some 80 bytes of framing per blob (digest, status) even for empty
/// blobs, so a client that packs batches by bytes alone (Buck2 does) could not
/// receive more blobs than this within its own message limit anyway; the cost
/// of a call stays proportional to the batch limit, not to the transport's.
pub fn max_batch_blobs(max_batch_bytes: u64) -> usize {
    usize::try_from(max_batch_bytes / 64).unwrap_or(usize::MAX).max(MIN_BATCH_BLOBS)
}

/// zstd level for what the server compresses: fast, since it is on the
/// critical path of a download.
pub(crate) const ZSTD_LEVEL: i32 = 1;

pub struct CasService {
    store: Store,
    max_batch_bytes: u64,
    auth: Arc<Auth>,
}

impl CasService {
    /// A service that allows every call; the server adds its policy with
    /// [`CasService::with_auth`].
    pub fn new(store: Store, max_batch_bytes: u64) -> Self {
        CasService { store, max_batch_bytes, auth: Auth::open() }
    }

    pub fn with_auth(self, auth: Arc<Auth>) -> Self {
        CasService { auth, ..self }
    }

    /// Parses the common header and checks `grant` on its instance; the
    /// digest function is the request's, else the instance's default.
    fn authorize<T>(
        &self,
        request: &Request<T>,
        instance: &str,
        function: i32,
        grant: Grant,
    ) -> Result<DigestFunction> {
        let (instance, function) = parse_header(instance, function)?;
        Ok(self.auth.context(request, &instance, function, grant)?.function())
    }
}

/// Parses the common request header: the instance name, and the digest
/// function field, which the request context resolves against the
/// instance's default ([`Auth::context`]).
pub(crate) fn parse_header(instance: &str, function: i32) -> Result<(InstanceName, FunctionField)> {
    let instance = InstanceName::new(instance).map_err(|e| Error::bad_field("instance_name", e.0))?;
    Ok((instance, FunctionField::Proto(function)))
}

fn parse_digests(function: DigestFunction, digests: &[remote_apis::reapi::Digest], field: &str) -> Result<Vec<Digest>> {
    digests
        .iter()
        .enumerate()
        .map(|(i, d)| Digest::from_proto(function, d).map_err(|e| Error::bad_field(&format!("{field}[{i}]"), e.0)))
        .collect()
}

/// One item of a BatchUpdateBlobs request, admitted against the batch
/// limit before anything is decoded or allocated.
struct UpdateItem {
    digest: Digest,
    compressor: Compressor,
    data: Bytes,
}

impl CasService {
    /// Parses one item and counts its declared size against the batch
    /// limit. The declared size is what a zstd item will expand to, so it is
    /// checked here, per item and in request order, before any decoding: a
    /// blob larger than `max_batch_total_size_bytes` cannot legally be in a
    /// batch at all, and the items together may not declare more than that
    /// either (a small request cannot buy unbounded decompression). The
    /// store's budget is checked next, by `put`, still before any bytes.
    fn admit(
        &self,
        function: DigestFunction,
        req: remote_apis::reapi::batch_update_blobs_request::Request,
        declared: &mut u64,
    ) -> Result<UpdateItem> {
        let digest = Digest::from_field(function, req.digest.as_ref(), "digest")?;
        let compressor = Compressor::from_proto(req.compressor)?;
        let limit = self.max_batch_bytes;
        if digest.size > limit {
            return Err(Error::invalid(format!(
                "blob {digest} is larger than max_batch_total_size_bytes ({limit}), so it cannot be sent in a \
                 batch; use ByteStream"
            )));
        }
        if *declared + digest.size > limit {
            return Err(Error::invalid(format!(
                "blob {digest} and the blobs before it in the batch declare more than max_batch_total_size_bytes \
                 ({limit}) in all; send it in another batch"
            )));
        }
        if compressor == Compressor::Identity && req.data.len() as u64 != digest.size {
            return Err(Error::invalid(format!("blob {digest} came with {} bytes of data", req.data.len())));
        }
        *declared += digest.size;
        Ok(UpdateItem { digest, compressor, data: Bytes::from(req.data) })
    }

    async fn update_one(&self, item: UpdateItem) -> Result<()> {
        let UpdateItem { digest, compressor, data } = item;
        match compressor {
            Compressor::Identity => self.store.put_bytes(&digest, data).await,
            Compressor::Zstd => {
                if self.store.find_missing(&[digest]).await?.is_empty() {
                    return Ok(());
                }
                let mut decoder = BoundedDecoder::new(digest)?;
                let mut sink = self.store.put(&digest).await?;
                decoder.feed(&data, sink.as_mut()).await?;
                decoder.finish()?;
                sink.commit().await
            }
        }
    }

    fn check_batch_count(&self, count: usize, what: &str) -> Result<()> {
        let max = max_batch_blobs(self.max_batch_bytes);
        if count > max {
            return Err(Error::invalid(format!(
                "{what} names {count} blobs, more than the {max} this server takes in one call; split it"
            )));
        }
        Ok(())
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
    async fn split(&self, function: DigestFunction, blob: Option<&remote_apis::reapi::Digest>) -> Result<Vec<Digest>> {
        let blob =
            Digest::from_field(function, blob, "blob_digest").map_err(|e| Error::bad_field("blob_digest", e.0))?;
        chunks::split(&self.store, blob).await
    }

    async fn splice(
        &self,
        function: DigestFunction,
        blob: Option<&remote_apis::reapi::Digest>,
        chunk_digests: &[remote_apis::reapi::Digest],
    ) -> Result<Digest> {
        let blob =
            Digest::from_field(function, blob, "blob_digest").map_err(|e| Error::bad_field("blob_digest", e.0))?;
        let chunk_digests = parse_digests(function, chunk_digests, "chunk_digests")?;
        chunks::splice(&self.store, blob, &chunk_digests).await?;
        Ok(blob)
    }
}

#[tonic::async_trait]
impl ContentAddressableStorage for CasService {
    async fn find_missing_blobs(
        &self,
        request: Request<FindMissingBlobsRequest>,
    ) -> Result<Response<FindMissingBlobsResponse>, Status> {
        let r = request.get_ref();
        let function = self.authorize(&request, &r.instance_name, r.digest_function, Grant::CasRead)?;
        let req = request.into_inner();
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
        let r = request.get_ref();
        let function = self.authorize(&request, &r.instance_name, r.digest_function, Grant::CasWrite)?;
        let req = request.into_inner();
        self.check_batch_count(req.requests.len(), "BatchUpdateBlobs request")?;
        let total: u64 = req.requests.iter().map(|r| r.data.len() as u64).sum();
        self.check_batch_size(total, "BatchUpdateBlobs request")?;
        let mut declared = 0;
        let items: Vec<_> =
            req.requests.into_iter().map(|r| (r.digest.clone(), self.admit(function, r, &mut declared))).collect();
        let responses = futures::stream::iter(items)
            .map(|(proto_digest, item)| async move {
                let status = match async { self.update_one(item?).await }.await {
                    Ok(()) => Default::default(),
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
        let r = request.get_ref();
        let function = self.authorize(&request, &r.instance_name, r.digest_function, Grant::CasRead)?;
        let req = request.into_inner();
        self.check_batch_count(req.digests.len(), "BatchReadBlobs request")?;
        let digests = parse_digests(function, &req.digests, "digests")?;
        self.check_batch_size(digests.iter().map(|d| d.size).sum(), "BatchReadBlobs request")?;
        let mut zstd = false;
        for c in &req.acceptable_compressors {
            // Unknown compressors are ones we simply do not use.
            zstd |= Compressor::from_proto(*c) == Ok(Compressor::Zstd);
        }
        let responses = batch_read::read_batch(&self.store, digests, zstd).await?;
        Ok(Response::new(BatchReadBlobsResponse { responses }))
    }

    // Splitting and splicing (see chunks.rs). The chunking function is the
    // server's choice (reported as UNKNOWN); splicing accepts any.
    async fn split_blob(&self, request: Request<SplitBlobRequest>) -> Result<Response<SplitBlobResponse>, Status> {
        let r = request.get_ref();
        let function = self.authorize(&request, &r.instance_name, r.digest_function, Grant::CasWrite)?;
        let req = request.into_inner();
        let chunks = self.split(function, req.blob_digest.as_ref()).await?;
        Ok(Response::new(SplitBlobResponse {
            chunk_digests: chunks.iter().map(Digest::to_proto).collect(),
            chunking_function: 0,
        }))
    }

    async fn splice_blob(&self, request: Request<SpliceBlobRequest>) -> Result<Response<SpliceBlobResponse>, Status> {
        let r = request.get_ref();
        let function = self.authorize(&request, &r.instance_name, r.digest_function, Grant::CasWrite)?;
        let req = request.into_inner();
        let blob = self.splice(function, req.blob_digest.as_ref(), &req.chunk_digests).await?;
        Ok(Response::new(SpliceBlobResponse { blob_digest: Some(blob.to_proto()) }))
    }

    type GetChunkMappingStream = futures::stream::BoxStream<'static, Result<GetChunkMappingResponse, Status>>;

    async fn get_chunk_mapping(
        &self,
        request: Request<GetChunkMappingRequest>,
    ) -> Result<Response<Self::GetChunkMappingStream>, Status> {
        let r = request.get_ref();
        let function = self.authorize(&request, &r.instance_name, r.digest_function, Grant::CasWrite)?;
        let req = request.into_inner();
        let chunks = self.split(function, req.blob_digest.as_ref()).await?;
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
        let caller = self.auth.caller(&request)?;
        let mut stream = request.into_inner();
        let Some(first) = stream.message().await? else {
            return Err(Error::invalid("RegisterChunkMapping needs at least one request").into());
        };
        let (instance, function) = parse_header(&first.instance_name, first.digest_function)?;
        let function = caller.authorize(&instance, function, Grant::CasWrite)?.function();
        let mut chunk_digests = first.chunk_digests.clone();
        while let Some(more) = stream.message().await? {
            chunk_digests.extend(more.chunk_digests);
        }
        let blob = self.splice(function, first.blob_digest.as_ref(), &chunk_digests).await?;
        Ok(Response::new(RegisterChunkMappingResponse { blob_digest: Some(blob.to_proto()) }))
    }

    type GetTreeStream = futures::stream::BoxStream<'static, Result<GetTreeResponse, Status>>;

    async fn get_tree(&self, request: Request<GetTreeRequest>) -> Result<Response<Self::GetTreeStream>, Status> {
        let r = request.get_ref();
        let function = self.authorize(&request, &r.instance_name, r.digest_function, Grant::CasRead)?;
        let req = request.into_inner();
        let root = Digest::from_field(function, req.root_digest.as_ref(), "root_digest")
            .map_err(|e| Error::bad_field("root_digest", e.0))?;
        let page_size = usize::try_from(req.page_size).map_err(|_| Error::bad_field("page_size", "is negative"))?;
        let stream = tree::get_tree(self.store.clone(), function, root, page_size, &req.page_token).await?;
        Ok(Response::new(stream))
    }
}
