//! ByteStream: streamed reads and resumable, verified writes of CAS blobs,
//! plain or zstd-compressed.
//!
//! An upload is a session keyed by its resource name. While a stream feeds
//! it, the session is *active*; if the stream breaks before `finish_write`,
//! the session is *parked* with everything received so far, QueryWriteStatus
//! reports that committed size, and a new stream may resume from exactly
//! there (or restart from 0) within the resume window. Data never becomes a
//! blob until the whole, verified upload is committed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_compression::Level;
use async_compression::tokio::bufread::ZstdEncoder;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use parking_lot::Mutex;
use remote_apis::bytestream::byte_stream_server::ByteStream;
use remote_apis::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest, WriteResponse,
};
use remote_apis::{Compressor, ReadResource, WriteResource};
use tokio_util::io::{ReaderStream, StreamReader};
use tonic::{Code, Request, Response, Status, Streaming};
use zstd::stream::raw::{InBuffer, Operation, OutBuffer};

use super::ZSTD_LEVEL;
use crate::error::{Error, Result};
use crate::store::{BlobSink, READ_CHUNK, Store};

/// Output buffer for one step of zstd decoding: what a hostile chunk can make
/// the server allocate at once, whatever it claims to expand to.
const DECODE_BUF: usize = 256 << 10;

pub struct ByteStreamService {
    store: Store,
    uploads: Arc<Mutex<Uploads>>,
    resume_window: Duration,
}

#[derive(Default)]
struct Uploads {
    slots: HashMap<String, Slot>,
    last_sweep: Option<Instant>,
}

enum Slot {
    Active,
    Parked(Upload, Instant),
}

struct Upload {
    resource: WriteResource,
    sink: Box<dyn BlobSink>,
    /// Bytes received on the wire (compressed bytes for zstd uploads).
    received: u64,
    decoder: Option<Decoder>,
}

struct Decoder {
    zstd: zstd::stream::raw::Decoder<'static>,
    produced: u64,
    /// Whether the last byte fed ended a frame.
    at_frame_end: bool,
}

impl ByteStreamService {
    pub fn new(store: Store, resume_window: Duration) -> Self {
        ByteStreamService { store, uploads: Default::default(), resume_window }
    }

    /// Takes the session for `key`: the parked one when `offset` is where it
    /// stopped, a new one at offset 0. The slot is marked active meanwhile.
    async fn claim(&self, key: &str, resource: &WriteResource, offset: i64) -> Result<Upload> {
        {
            let mut uploads = self.uploads.lock();
            self.sweep(&mut uploads);
            let slot = uploads.slots.insert(key.to_string(), Slot::Active);
            match slot {
                Some(Slot::Parked(upload, _)) if offset >= 0 && offset as u64 == upload.received => {
                    return Ok(upload);
                }
                Some(Slot::Parked(..)) | None if offset == 0 => {}
                other => {
                    let err = match &other {
                        Some(Slot::Active) => Error::new(Code::Aborted, format!("another stream is writing {key}")),
                        Some(Slot::Parked(upload, _)) => Error::bad_field(
                            "write_offset",
                            format!("is {offset}, but the upload has {} bytes committed", upload.received),
                        ),
                        None => Error::bad_field(
                            "write_offset",
                            format!("is {offset} for an upload this server does not know; start at 0"),
                        ),
                    };
                    match other {
                        Some(slot) => {
                            uploads.slots.insert(key.to_string(), slot);
                        }
                        None => {
                            uploads.slots.remove(key);
                        }
                    }
                    return Err(err);
                }
            }
        }
        let started = async {
            let decoder = match resource.compressor {
                Compressor::Identity => None,
                Compressor::Zstd => Some(Decoder::new()?),
            };
            let sink = self.store.put(&resource.digest).await?;
            Ok(Upload { resource: resource.clone(), sink, received: 0, decoder })
        }
        .await;
        if started.is_err() {
            self.uploads.lock().slots.remove(key);
        }
        started
    }

    /// Drops old parked uploads (at most every ten seconds).
    fn sweep(&self, uploads: &mut Uploads) {
        let now = Instant::now();
        if uploads.last_sweep.is_some_and(|t| now.duration_since(t) < Duration::from_secs(10)) {
            return;
        }
        uploads.last_sweep = Some(now);
        let window = self.resume_window;
        uploads.slots.retain(|_, slot| match slot {
            Slot::Active => true,
            Slot::Parked(_, at) => now.duration_since(*at) < window,
        });
    }

    fn park(&self, key: &str, upload: Upload) {
        self.uploads.lock().slots.insert(key.to_string(), Slot::Parked(upload, Instant::now()));
    }

    fn release(&self, key: &str) {
        self.uploads.lock().slots.remove(key);
    }

    /// The response for a blob that is complete: the uncompressed size, or
    /// -1 for a compressed upload of a blob that already existed.
    fn complete(resource: &WriteResource, existed: bool) -> WriteResponse {
        let committed_size = match (resource.compressor, existed) {
            (Compressor::Zstd, true) => -1,
            _ => resource.digest.size as i64,
        };
        WriteResponse { committed_size }
    }

    async fn exists(&self, resource: &WriteResource) -> Result<bool> {
        Ok(self.store.find_missing(&[resource.digest]).await?.is_empty())
    }

    /// Feeds messages into `upload` until `finish_write`. On a broken stream
    /// the upload is handed back to be parked.
    async fn run_upload(
        &self,
        upload: &mut Upload,
        first: WriteRequest,
        stream: &mut Streaming<WriteRequest>,
    ) -> Result<(), StreamEnd> {
        let mut msg = first;
        loop {
            if msg.write_offset < 0 || msg.write_offset as u64 != upload.received {
                return Err(StreamEnd::Failed(Error::bad_field(
                    "write_offset",
                    format!("is {}, but {} bytes are committed", msg.write_offset, upload.received),
                )));
            }
            upload.received += msg.data.len() as u64;
            upload.feed(Bytes::from(msg.data)).await.map_err(StreamEnd::Failed)?;
            if msg.finish_write {
                return Ok(());
            }
            msg = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => {
                    return Err(StreamEnd::Broken(Status::invalid_argument(format!(
                        "the write stream ended without finish_write after {} bytes; resume from there",
                        upload.received
                    ))));
                }
                Err(status) => return Err(StreamEnd::Broken(status)),
            };
            if !msg.resource_name.is_empty() && msg.resource_name != upload.resource.to_name() {
                match WriteResource::parse(&msg.resource_name) {
                    Ok(r) if r == upload.resource => {}
                    _ => {
                        return Err(StreamEnd::Failed(Error::bad_field(
                            "resource_name",
                            "changed in the middle of a write stream",
                        )));
                    }
                }
            }
        }
    }
}

/// Frees an active slot whose handler went away without parking or
/// releasing it (the call was cancelled), so the upload can start again.
struct ActiveGuard {
    uploads: Arc<Mutex<Uploads>>,
    key: String,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let mut uploads = self.uploads.lock();
        if matches!(uploads.slots.get(&self.key), Some(Slot::Active)) {
            uploads.slots.remove(&self.key);
        }
    }
}

/// How an upload stream stopped short of `finish_write`.
enum StreamEnd {
    /// Bad data or a store error: the upload is dropped.
    Failed(Error),
    /// The connection broke: the upload is kept for resumption.
    Broken(Status),
}

impl Decoder {
    fn new() -> Result<Self> {
        let zstd =
            zstd::stream::raw::Decoder::new().map_err(|e| Error::internal(format!("creating a zstd decoder: {e}")))?;
        Ok(Decoder { zstd, produced: 0, at_frame_end: true })
    }
}

impl Upload {
    async fn feed(&mut self, data: Bytes) -> Result<()> {
        let Some(decoder) = self.decoder.as_mut() else {
            return self.sink.write(data).await;
        };
        let size = self.resource.digest.size;
        let mut input = InBuffer::around(&data);
        loop {
            let mut out = vec![0u8; DECODE_BUF];
            let mut output = OutBuffer::around(&mut out);
            let hint = decoder
                .zstd
                .run(&mut input, &mut output)
                .map_err(|e| Error::invalid(format!("zstd data for {} is corrupt: {e}", self.resource.digest)))?;
            let n = output.pos();
            decoder.at_frame_end = hint == 0;
            if n > 0 {
                decoder.produced += n as u64;
                if decoder.produced > size {
                    return Err(Error::invalid(format!(
                        "zstd data for {} decompresses to more than the digest's {size} bytes",
                        self.resource.digest
                    )));
                }
                out.truncate(n);
                self.sink.write(Bytes::from(out)).await?;
            }
            if input.pos() == data.len() && n < DECODE_BUF {
                return Ok(());
            }
        }
    }

    async fn commit(self) -> Result<()> {
        if let Some(d) = &self.decoder
            && !d.at_frame_end
        {
            return Err(Error::invalid(format!(
                "zstd data for {} ends in the middle of a frame",
                self.resource.digest
            )));
        }
        self.sink.commit().await
    }
}

type ReadStream = BoxStream<'static, Result<ReadResponse, Status>>;

#[tonic::async_trait]
impl ByteStream for ByteStreamService {
    type ReadStream = ReadStream;

    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<ReadStream>, Status> {
        let req = request.into_inner();
        let resource = ReadResource::parse(&req.resource_name).map_err(|e| Error::bad_field("resource_name", e.0))?;
        if req.read_offset < 0 {
            return Err(Error::new(Code::OutOfRange, format!("read_offset {} is negative", req.read_offset)).into());
        }
        if req.read_limit < 0 {
            return Err(Error::bad_field("read_limit", format!("{} is negative", req.read_limit)).into());
        }
        let offset = req.read_offset as u64;
        let stream = match resource.compressor {
            Compressor::Identity => {
                let limit = (req.read_limit > 0).then_some(req.read_limit as u64);
                self.store.get(&resource.digest, offset, limit).await?
            }
            Compressor::Zstd => {
                if req.read_limit != 0 {
                    return Err(Error::bad_field("read_limit", "must be 0 for compressed-blobs reads").into());
                }
                let plain = self.store.get(&resource.digest, offset, None).await?;
                let reader = StreamReader::new(plain.map_err(std::io::Error::other));
                let encoder = ZstdEncoder::with_quality(reader, Level::Precise(ZSTD_LEVEL));
                ReaderStream::with_capacity(encoder, READ_CHUNK)
                    .map_err(|e| Error::internal(format!("compressing: {e}")))
                    .boxed()
            }
        };
        Ok(Response::new(stream.map_ok(|data| ReadResponse { data: data.into() }).map_err(Status::from).boxed()))
    }

    async fn write(&self, request: Request<Streaming<WriteRequest>>) -> Result<Response<WriteResponse>, Status> {
        let mut stream = request.into_inner();
        let first = stream.message().await?.ok_or_else(|| Error::invalid("the write stream sent no message"))?;
        let resource =
            WriteResource::parse(&first.resource_name).map_err(|e| Error::bad_field("resource_name", e.0))?;
        let key = resource.to_name();
        if self.exists(&resource).await? {
            self.release(&key);
            return Ok(Response::new(Self::complete(&resource, true)));
        }
        let mut upload = self.claim(&key, &resource, first.write_offset).await?;
        let _guard = ActiveGuard { uploads: self.uploads.clone(), key: key.clone() };
        match self.run_upload(&mut upload, first, &mut stream).await {
            Ok(()) => {
                self.release(&key);
                upload.commit().await?;
                Ok(Response::new(Self::complete(&resource, false)))
            }
            Err(StreamEnd::Failed(e)) => {
                self.release(&key);
                Err(e.into())
            }
            Err(StreamEnd::Broken(status)) => {
                tracing::debug!(%key, received = upload.received, "upload interrupted; parked for resumption");
                self.park(&key, upload);
                Err(status)
            }
        }
    }

    async fn query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        let req = request.into_inner();
        let resource = WriteResource::parse(&req.resource_name).map_err(|e| Error::bad_field("resource_name", e.0))?;
        let key = resource.to_name();
        let parked = match self.uploads.lock().slots.get(&key) {
            Some(Slot::Parked(upload, _)) => Some(upload.received),
            Some(Slot::Active) => {
                return Err(Error::new(Code::Aborted, format!("a stream is writing {key} right now")).into());
            }
            None => None,
        };
        if let Some(received) = parked {
            return Ok(Response::new(QueryWriteStatusResponse { committed_size: received as i64, complete: false }));
        }
        if self.exists(&resource).await? {
            let committed_size = Self::complete(&resource, false).committed_size;
            return Ok(Response::new(QueryWriteStatusResponse { committed_size, complete: true }));
        }
        Err(Error::not_found(format!("no upload in progress for {key}")).into())
    }
}
