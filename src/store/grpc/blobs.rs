//! The remote's CAS behind [`BlobStore`]: FindMissingBlobs in bounded
//! requests, small blobs in one batch call each, large ones streamed through
//! ByteStream in both directions, never whole in memory.

use std::collections::HashSet;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use remote_apis::bytestream::{ReadRequest, ReadResponse, WriteRequest, WriteResponse};
use remote_apis::client::CHUNK_SIZE;
use remote_apis::reapi::{
    BatchReadBlobsRequest, BatchUpdateBlobsRequest, FindMissingBlobsRequest, batch_update_blobs_request,
};
use remote_apis::{Compressor, Digest, DigestFunction, ReadResource, WriteResource, rpc};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::{Code, Streaming};

use super::{FIND_MISSING_CHUNK, GrpcStore};
use crate::error::{Error, Result};
use crate::store::{BlobSink, BlobStore, BlobStream, range, stream_bytes};

/// FindMissingBlobs requests in flight at once for one large query.
const FIND_MISSING_PARALLEL: usize = 4;

/// WriteRequests queued ahead of the remote: enough to keep the stream
/// busy, few enough that a stalled remote stops the writer quickly.
const WRITE_QUEUE: usize = 4;

const READ: &str = "ByteStream.Read";
const WRITE: &str = "ByteStream.Write";

#[async_trait]
impl BlobStore for GrpcStore {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        // One request names one digest function; each is split so no
        // request comes near a message limit.
        let mut requests = Vec::new();
        for function in DigestFunction::ALL {
            let of_function: Vec<Digest> = digests.iter().filter(|d| d.function == function).copied().collect();
            requests.extend(of_function.chunks(FIND_MISSING_CHUNK).map(|chunk| (function, chunk.to_vec())));
        }
        let answers: Vec<Vec<Digest>> = futures::stream::iter(requests)
            .map(|(function, chunk)| self.find_missing_chunk(function, chunk))
            .buffer_unordered(FIND_MISSING_PARALLEL)
            .try_collect()
            .await?;
        let missing: HashSet<Digest> = answers.into_iter().flatten().collect();
        Ok(digests.iter().filter(|d| missing.contains(d)).copied().collect())
    }

    async fn get(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> Result<BlobStream> {
        let (start, end) = range(digest, offset, limit)?;
        if digest.size <= self.batch_max {
            let data = self.batch_read(digest).await?;
            return stream_bytes(data, offset, limit, digest);
        }
        if start == end {
            // ByteStream reads a limit of 0 as "to the end": ask whether
            // the blob is there instead.
            if !self.find_missing(&[*digest]).await?.is_empty() {
                return Err(Error::blob_not_found(digest));
            }
            return Ok(futures::stream::empty().boxed());
        }
        self.read_stream(digest, start, end - start).await
    }

    async fn put(&self, digest: &Digest) -> Result<Box<dyn BlobSink>> {
        if digest.size <= self.batch_max {
            return Ok(Box::new(BatchSink { store: self.clone(), digest: *digest, parts: Vec::new(), len: 0 }));
        }
        Ok(Box::new(StreamSink {
            store: self.clone(),
            digest: *digest,
            call: None,
            held: None,
            written: 0,
            done_early: false,
        }))
    }
}

impl GrpcStore {
    async fn find_missing_chunk(&self, function: DigestFunction, digests: Vec<Digest>) -> Result<Vec<Digest>> {
        const WHAT: &str = "FindMissingBlobs";
        let request = FindMissingBlobsRequest {
            instance_name: self.blob_instance().to_string(),
            blob_digests: digests.iter().map(Digest::to_proto).collect(),
            digest_function: function.to_proto() as i32,
        };
        let response = self.call(WHAT, self.cas.clone().find_missing_blobs(request)).await?;
        let parse = |d| Digest::from_proto(function, d).map_err(|e| self.bad_answer(WHAT, e));
        response.missing_blob_digests.iter().map(parse).collect()
    }

    /// A whole small blob in one call, checked against its digest (cheap at
    /// this size, and a remote's mistake never becomes a client's blob).
    async fn batch_read(&self, digest: &Digest) -> Result<Bytes> {
        const WHAT: &str = "BatchReadBlobs";
        let request = BatchReadBlobsRequest {
            instance_name: self.blob_instance().to_string(),
            digests: vec![digest.to_proto()],
            acceptable_compressors: Vec::new(),
            digest_function: digest.function.to_proto() as i32,
        };
        let response = self.call(WHAT, self.cas.clone().batch_read_blobs(request)).await?;
        let Some(item) = response.responses.into_iter().next() else {
            return Err(self.bad_answer(WHAT, format!("no answer for {digest}")));
        };
        self.item_status(WHAT, digest, item.status)?;
        if item.compressor != Compressor::Identity.to_proto() {
            return Err(self.bad_answer(WHAT, format!("{digest} came compressed, unasked")));
        }
        let data = Bytes::from(item.data);
        if digest.function.digest_of(&data) != *digest {
            return Err(self.bad_answer(WHAT, format!("the bytes sent for {digest} are not that blob")));
        }
        Ok(data)
    }

    /// A small blob in one call.
    async fn batch_update(&self, digest: &Digest, data: Vec<u8>) -> Result<()> {
        const WHAT: &str = "BatchUpdateBlobs";
        let request = BatchUpdateBlobsRequest {
            instance_name: self.blob_instance().to_string(),
            requests: vec![batch_update_blobs_request::Request {
                digest: Some(digest.to_proto()),
                data,
                compressor: Compressor::Identity.to_proto(),
            }],
            digest_function: digest.function.to_proto() as i32,
        };
        let response = self.call(WHAT, self.cas.clone().batch_update_blobs(request)).await?;
        let Some(item) = response.responses.into_iter().next() else {
            return Err(self.bad_answer(WHAT, format!("no answer for {digest}")));
        };
        self.item_status(WHAT, digest, item.status)
    }

    /// The per-blob status of a batch answer, its code kept.
    fn item_status(&self, what: &str, digest: &Digest, status: Option<rpc::Status>) -> Result<()> {
        let status = status.unwrap_or_default();
        if status.code == Code::Ok as i32 {
            return Ok(());
        }
        let mut e = Error::new(
            Code::from_i32(status.code),
            format!("grpc store {}: {what} of {digest}: {}", self.endpoint, status.message),
        );
        if e.code == Code::NotFound {
            e.missing.push(*digest);
        }
        Err(e)
    }

    /// `len` bytes from `offset` through ByteStream.Read. The first message
    /// is awaited here, so an absent blob is NOT_FOUND from `get` itself.
    async fn read_stream(&self, digest: &Digest, offset: u64, len: u64) -> Result<BlobStream> {
        let name = ReadResource { instance: self.blob_instance(), compressor: Compressor::Identity, digest: *digest };
        let request = ReadRequest { resource_name: name.to_name(), read_offset: offset as i64, read_limit: len as i64 };
        let blob_error = |mut e: Error| {
            if e.code == Code::NotFound {
                e.missing.push(*digest);
            }
            e
        };
        let stream = self.call(READ, self.bytestream.clone().read(request)).await.map_err(blob_error)?;
        let mut read = RemoteRead { store: self.clone(), stream, digest: *digest, remaining: len };
        let first = read.next_chunk().await.map_err(blob_error)?;
        let rest = futures::stream::try_unfold(read, |mut read| async move {
            Ok(read.next_chunk().await?.map(|chunk| (chunk, read)))
        });
        Ok(futures::stream::iter(first.map(Ok)).chain(rest).boxed())
    }
}

/// A ByteStream.Read in progress: exactly `remaining` more bytes are due.
struct RemoteRead {
    store: GrpcStore,
    stream: Streaming<ReadResponse>,
    digest: Digest,
    remaining: u64,
}

impl RemoteRead {
    /// The next non-empty chunk; `None` once the stream ended with every
    /// byte. A stream that ends short or runs long is an error, so a reader
    /// never takes part of a blob for all of it.
    async fn next_chunk(&mut self) -> Result<Option<Bytes>> {
        loop {
            let message = match tokio::time::timeout(self.store.timeout, self.stream.message()).await {
                Err(_) => return Err(self.store.timed_out(READ)),
                Ok(Err(status)) => return Err(self.store.status_error(READ, status)),
                Ok(Ok(message)) => message,
            };
            let Some(message) = message else {
                if self.remaining == 0 {
                    return Ok(None);
                }
                let why = format!("the stream of {} ended {} bytes short", self.digest, self.remaining);
                return Err(self.store.bad_answer(READ, why));
            };
            let len = message.data.len() as u64;
            if len > self.remaining {
                return Err(self.store.bad_answer(READ, format!("more bytes of {} than asked for", self.digest)));
            }
            if len > 0 {
                self.remaining -= len;
                return Ok(Some(Bytes::from(message.data)));
            }
        }
    }
}

/// A small blob, gathered and sent with BatchUpdateBlobs at commit.
struct BatchSink {
    store: GrpcStore,
    digest: Digest,
    parts: Vec<Bytes>,
    len: u64,
}

#[async_trait]
impl BlobSink for BatchSink {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        self.len += data.len() as u64;
        if self.len > self.digest.size {
            return Err(too_long(&self.digest));
        }
        self.parts.push(data);
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        let data = match <[Bytes; 1]>::try_from(self.parts) {
            Ok([one]) => Vec::from(one),
            Err(parts) => parts.concat(),
        };
        self.store.batch_update(&self.digest, data).await
    }
}

fn too_long(digest: &Digest) -> Error {
    Error::invalid(format!("more bytes written than the {} of blob {digest}", digest.size))
}

/// A large blob, streamed to ByteStream.Write as it is written.
///
/// The last piece written is held back until the next write or the commit,
/// so the remote never has every byte before `finish_write`: a remote that
/// completes an upload when the size is reached (not only on
/// `finish_write`) still cannot store a blob whose sink was dropped. A
/// dropped sink also aborts its call.
struct StreamSink {
    store: GrpcStore,
    digest: Digest,
    /// The call, started when the first piece is sent.
    call: Option<WriteCall>,
    held: Option<Bytes>,
    written: u64,
    /// The remote ended the call with success before the last byte (it
    /// already had the blob): the rest is not sent.
    done_early: bool,
}

/// One ByteStream.Write call, run by its own task so it makes progress
/// between the sink's writes.
struct WriteCall {
    requests: mpsc::Sender<WriteRequest>,
    task: JoinHandle<Result<WriteResponse, tonic::Status>>,
    /// Bytes handed to the call so far (the next `write_offset`).
    sent: u64,
}

impl WriteCall {
    fn start(store: &GrpcStore) -> WriteCall {
        let (requests, queue) = mpsc::channel(WRITE_QUEUE);
        let mut client = store.bytestream.clone();
        let task = tokio::spawn(async move {
            let stream = tokio_stream::wrappers::ReceiverStream::new(queue);
            client.write(stream).await.map(tonic::Response::into_inner)
        });
        WriteCall { requests, task, sent: 0 }
    }
}

impl StreamSink {
    async fn send(&mut self, data: Bytes, finish: bool) -> Result<()> {
        if self.done_early {
            return Ok(());
        }
        let first = self.call.as_ref().is_none_or(|call| call.sent == 0);
        let resource_name = if first { self.write_name() } else { String::new() };
        let call = self.call.get_or_insert_with(|| WriteCall::start(&self.store));
        let len = data.len() as u64;
        let request =
            WriteRequest { resource_name, write_offset: call.sent as i64, finish_write: finish, data: data.into() };
        match tokio::time::timeout(self.store.timeout, call.requests.send(request)).await {
            Err(_) => Err(self.store.timed_out(WRITE)),
            Ok(Ok(())) => {
                call.sent += len;
                Ok(())
            }
            // The call ended before its requests did: the remote refused
            // the write, or already has the blob and said so.
            Ok(Err(_)) => {
                self.finish().await?;
                self.done_early = true;
                Ok(())
            }
        }
    }

    fn write_name(&self) -> String {
        let uuid = uuid::Uuid::new_v4().to_string();
        let instance = self.store.blob_instance();
        WriteResource { instance, uuid, compressor: Compressor::Identity, digest: self.digest }.to_name()
    }

    /// Ends the request stream and waits for the remote's answer.
    async fn finish(&mut self) -> Result<WriteResponse> {
        let Some(call) = self.call.take() else {
            return Err(Error::internal("a ByteStream write finished twice"));
        };
        drop(call.requests);
        let mut task = call.task;
        match tokio::time::timeout(self.store.timeout, &mut task).await {
            Err(_) => {
                task.abort();
                Err(self.store.timed_out(WRITE))
            }
            Ok(Err(e)) => Err(Error::internal(format!("a ByteStream write task failed: {e}"))),
            Ok(Ok(Err(status))) => Err(self.store.status_error(WRITE, status)),
            Ok(Ok(Ok(response))) => Ok(response),
        }
    }
}

#[async_trait]
impl BlobSink for StreamSink {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        self.written += data.len() as u64;
        if self.written > self.digest.size {
            return Err(too_long(&self.digest));
        }
        let mut rest = data;
        while !rest.is_empty() {
            let piece = rest.split_to(rest.len().min(CHUNK_SIZE));
            if let Some(previous) = self.held.replace(piece) {
                self.send(previous, false).await?;
            }
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        let last = self.held.take().unwrap_or_default();
        self.send(last, true).await?;
        if self.done_early {
            return Ok(());
        }
        let response = self.finish().await?;
        let size = self.digest.size as i64;
        if response.committed_size != size && response.committed_size != -1 {
            let why = format!("committed {} bytes of the {size} of {}", response.committed_size, self.digest);
            return Err(self.store.bad_answer(WRITE, why));
        }
        Ok(())
    }
}

impl Drop for StreamSink {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            call.task.abort();
        }
    }
}
