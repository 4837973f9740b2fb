//! ByteStream: streamed reads and resumable, verified writes of CAS blobs,
//! plain or zstd-compressed.
//!
//! An upload is a session keyed by its resource name. While a stream feeds
//! it, the session is *active*; if the stream breaks before `finish_write`,
//! the session is *parked* with everything received so far, QueryWriteStatus
//! reports that committed size, and a new stream may resume from exactly
//! there (or restart from 0) within the resume window. Data never becomes a
//! blob until the whole, verified upload is committed. Parked uploads are
//! capped in all and per client (see `sessions.rs`).

use std::net::IpAddr;
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

use super::ZSTD_LEVEL;
use super::decode::BoundedDecoder;
use super::sessions::{ParkLimits, Sessions, Slot};
use crate::auth::{Auth, Grant};
use crate::error::{Error, Result};
use crate::store::{BlobSink, READ_CHUNK, Store};

pub struct ByteStreamService {
    store: Store,
    uploads: Arc<Mutex<Sessions<Upload>>>,
    auth: Arc<Auth>,
    /// What running actions produce (see `remote_apis::logstream`); `None`
    /// on a server that runs none.
    live: Option<Arc<crate::execution::live::LiveReads>>,
}

struct Upload {
    resource: WriteResource,
    sink: Box<dyn BlobSink>,
    /// Bytes received on the wire (compressed bytes for zstd uploads).
    received: u64,
    decoder: Option<BoundedDecoder>,
}

impl ByteStreamService {
    /// `max_parked` interrupted uploads are kept for `resume_window`, at
    /// most `max_parked_per_client` from one client address.
    pub fn new(store: Store, resume_window: Duration, max_parked: usize, max_parked_per_client: usize) -> Self {
        let limits = ParkLimits { total: max_parked, per_client: max_parked_per_client, window: resume_window };
        ByteStreamService {
            store,
            uploads: Arc::new(Mutex::new(Sessions::new(limits))),
            auth: Auth::open(),
            live: None,
        }
    }

    /// Serves the live names of running actions through `live`.
    pub fn with_live(self, live: Arc<crate::execution::live::LiveReads>) -> Self {
        ByteStreamService { live: Some(live), ..self }
    }

    /// A read of a live name (a stream or a running output), already
    /// parsed: the same grant as blobs of its instance (cas-read).
    async fn read_live(
        &self,
        request: &Request<ReadRequest>,
        name: remote_apis::logstream::LiveName,
    ) -> Result<ReadStream, Status> {
        self.auth.context(request, name.instance(), None, Grant::CasRead)?;
        let (offset, limit) = read_range(request.get_ref())?;
        let Some(live) = &self.live else {
            return Err(Error::not_found("this server runs no actions: it has no live output").into());
        };
        let stream = live.read(&name, offset, limit).await?;
        Ok(stream.map_ok(|data| ReadResponse { data: data.into() }).map_err(Status::from).boxed())
    }

    /// The server's policy (the default allows every call).
    pub fn with_auth(self, auth: Arc<Auth>) -> Self {
        ByteStreamService { auth, ..self }
    }

    /// Uploads parked for resumption now.
    pub fn parked(&self) -> usize {
        self.uploads.lock().parked()
    }

    /// Drops parked uploads older than the resume window, closing and
    /// removing their temporary files. New writes sweep too, but a server
    /// that receives none must still let go of its open files: the server
    /// calls this every second.
    pub fn expire_parked(&self) {
        let expired = self.uploads.lock().sweep(Instant::now());
        // Dropped after the lock: dropping an upload removes its file.
        drop(expired);
    }

    /// Takes the session for `key`: the parked one when `offset` is where it
    /// stopped, a new one at offset 0. The slot is marked active meanwhile.
    async fn claim(&self, key: &str, resource: &WriteResource, offset: i64) -> Result<Upload> {
        {
            // Dropped after the lock (declared before it): dropping an
            // upload removes its temporary file.
            let mut garbage = Vec::new();
            let mut uploads = self.uploads.lock();
            garbage.extend(uploads.sweep(Instant::now()));
            match uploads.claim(key) {
                Some(Slot::Parked(p)) if offset >= 0 && offset as u64 == p.upload.received => {
                    return Ok(p.upload);
                }
                Some(Slot::Parked(p)) if offset == 0 => garbage.push(p.upload),
                None if offset == 0 => {}
                other => {
                    let err = match &other {
                        Some(Slot::Active) => Error::new(Code::Aborted, format!("another stream is writing {key}")),
                        Some(Slot::Parked(p)) => Error::bad_field(
                            "write_offset",
                            format!("is {offset}, but the upload has {} bytes committed", p.upload.received),
                        ),
                        None => Error::bad_field(
                            "write_offset",
                            format!("is {offset} for an upload this server does not know; start at 0"),
                        ),
                    };
                    uploads.put_back(key, other);
                    return Err(err);
                }
            }
        }
        let started = async {
            let decoder = match resource.compressor {
                Compressor::Identity => None,
                Compressor::Zstd => Some(BoundedDecoder::new(resource.digest)?),
            };
            let sink = self.store.put(&resource.digest).await?;
            Ok(Upload { resource: resource.clone(), sink, received: 0, decoder })
        }
        .await;
        if started.is_err() {
            self.uploads.lock().remove(key);
        }
        started
    }

    /// Keeps an interrupted upload for resumption; the oldest parked ones go
    /// when this one goes over a cap.
    fn park(&self, key: &str, upload: Upload, client: Option<IpAddr>) {
        let dropped = self.uploads.lock().park(key, upload, client, Instant::now());
        if !dropped.is_empty() {
            tracing::debug!(dropped = dropped.len(), "parked uploads over the cap dropped; their clients start over");
        }
    }

    fn release(&self, key: &str) {
        let parked = self.uploads.lock().remove(key);
        drop(parked);
    }

    /// The response for a blob that is complete. Uncompressed: its size.
    /// Compressed: -1 when it already existed (`sent` is `None`), else the
    /// bytes the client sent, which is what the spec's write offsets count
    /// after the first and what Buck2 and Bazel check `committed_size`
    /// against (they accept that or -1; the uncompressed size fails Buck2's
    /// upload with "invalid committed_size").
    fn complete(resource: &WriteResource, sent: Option<u64>) -> WriteResponse {
        let committed_size = match (resource.compressor, sent) {
            (Compressor::Zstd, None) => -1,
            (Compressor::Zstd, Some(sent)) => sent as i64,
            (Compressor::Identity, _) => resource.digest.size as i64,
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
                // Parsed as the first was: Buck2 repeats a name without the
                // function segment in every message.
                match WriteResource::parse_with(&msg.resource_name, |i| self.default_function(i)) {
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
    uploads: Arc<Mutex<Sessions<Upload>>>,
    key: String,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.uploads.lock().remove_if_active(&self.key);
    }
}

/// How long a client told to retry waits first.
const RETRY_AFTER: Duration = Duration::from_secs(1);

impl ByteStreamService {
    /// The digest function of a resource name without a function segment:
    /// its instance's default (Buck2 names none for BLAKE3).
    fn default_function(&self, instance: &remote_apis::InstanceName) -> remote_apis::DigestFunction {
        self.auth.instance(instance).digest_function
    }

    /// The status for `e`, with a RetryInfo when the store ran short of
    /// something that frees up (descriptors, disk space): RESOURCE_EXHAUSTED
    /// for a blob within the store's budget. A blob larger than the whole
    /// budget never fits, so it gets no RetryInfo.
    fn retry_if_transient(&self, e: Error, resource: &WriteResource) -> Status {
        let max = self.store.usage().max_bytes;
        if e.code != Code::ResourceExhausted || (max > 0 && resource.digest.size > max) {
            return e.into();
        }
        let details = tonic_types::ErrorDetails::with_retry_info(Some(RETRY_AFTER));
        <Status as tonic_types::StatusExt>::with_error_details(Code::ResourceExhausted, e.message, details)
    }
}

/// How an upload stream stopped short of `finish_write`.
enum StreamEnd {
    /// Bad data or a store error: the upload is dropped.
    Failed(Error),
    /// The connection broke: the upload is kept for resumption.
    Broken(Status),
}

impl Upload {
    async fn feed(&mut self, data: Bytes) -> Result<()> {
        match self.decoder.as_mut() {
            Some(decoder) => decoder.feed(&data, self.sink.as_mut()).await,
            None => self.sink.write(data).await,
        }
    }

    async fn commit(self) -> Result<()> {
        if let Some(d) = &self.decoder {
            d.finish()?;
        }
        self.sink.commit().await
    }
}

type ReadStream = BoxStream<'static, Result<ReadResponse, Status>>;

/// A read's offset and limit (`None`: to the end), refused when negative.
fn read_range(req: &ReadRequest) -> Result<(u64, Option<u64>)> {
    if req.read_offset < 0 {
        return Err(Error::new(Code::OutOfRange, format!("read_offset {} is negative", req.read_offset)));
    }
    if req.read_limit < 0 {
        return Err(Error::bad_field("read_limit", format!("{} is negative", req.read_limit)));
    }
    Ok((req.read_offset as u64, (req.read_limit > 0).then_some(req.read_limit as u64)))
}

#[tonic::async_trait]
impl ByteStream for ByteStreamService {
    type ReadStream = ReadStream;

    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<ReadStream>, Status> {
        if let Some(live) = remote_apis::logstream::parse(&request.get_ref().resource_name) {
            let name = live.map_err(|e| Error::bad_field("resource_name", e.0))?;
            return self.read_live(&request, name).await.map(Response::new);
        }
        let resource = ReadResource::parse_with(&request.get_ref().resource_name, |i| self.default_function(i))
            .map_err(|e| Error::bad_field("resource_name", e.0))?;
        self.auth.context(&request, &resource.instance, Some(resource.digest.function), Grant::CasRead)?;
        let req = request.into_inner();
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
        let client = crate::server::peer::remote_addr(request.extensions()).map(|a| a.ip());
        let caller = self.auth.caller(&request)?;
        let mut stream = request.into_inner();
        let first = stream.message().await?.ok_or_else(|| Error::invalid("the write stream sent no message"))?;
        let resource = WriteResource::parse_with(&first.resource_name, |i| self.default_function(i))
            .map_err(|e| Error::bad_field("resource_name", e.0))?;
        caller.authorize(&resource.instance, Some(resource.digest.function), Grant::CasWrite)?;
        let key = resource.to_name();
        if self.exists(&resource).await? {
            self.release(&key);
            return Ok(Response::new(Self::complete(&resource, None)));
        }
        let mut upload =
            self.claim(&key, &resource, first.write_offset).await.map_err(|e| self.retry_if_transient(e, &resource))?;
        let _guard = ActiveGuard { uploads: self.uploads.clone(), key: key.clone() };
        match self.run_upload(&mut upload, first, &mut stream).await {
            Ok(()) => {
                self.release(&key);
                let sent = upload.received;
                upload.commit().await.map_err(|e| self.retry_if_transient(e, &resource))?;
                Ok(Response::new(Self::complete(&resource, Some(sent))))
            }
            Err(StreamEnd::Failed(e)) => {
                self.release(&key);
                Err(self.retry_if_transient(e, &resource))
            }
            Err(StreamEnd::Broken(status)) => {
                tracing::debug!(%key, received = upload.received, "upload interrupted; parked for resumption");
                self.park(&key, upload, client);
                Err(status)
            }
        }
    }

    async fn query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        let resource = WriteResource::parse_with(&request.get_ref().resource_name, |i| self.default_function(i))
            .map_err(|e| Error::bad_field("resource_name", e.0))?;
        self.auth.context(&request, &resource.instance, Some(resource.digest.function), Grant::CasWrite)?;
        let key = resource.to_name();
        let parked = match self.uploads.lock().get(&key) {
            Some(Slot::Parked(p)) => Some(p.upload.received),
            Some(Slot::Active) => {
                return Err(Error::new(Code::Aborted, format!("a stream is writing {key} right now")).into());
            }
            None => None,
        };
        if let Some(received) = parked {
            return Ok(Response::new(QueryWriteStatusResponse { committed_size: received as i64, complete: false }));
        }
        if self.exists(&resource).await? {
            // The blob's size whatever the encoding: the stream that wrote it
            // is gone, and resuming is over.
            let committed_size = resource.digest.size as i64;
            return Ok(Response::new(QueryWriteStatusResponse { committed_size, complete: true }));
        }
        Err(Error::not_found(format!("no upload in progress for {key}")).into())
    }
}
