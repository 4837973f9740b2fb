//! A CAS client that moves blobs the way REAPI servers expect: small blobs in
//! batches that respect the server's advertised limit, large ones streamed
//! through ByteStream in chunks, never whole in memory.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::codegen::http::{self, HeaderValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

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
/// `http://host:port` or plain `host:port` (plaintext), `grpcs://host:port`
/// or `https://host:port` (TLS, checked against the system's roots; use
/// [`ClientOptions`] to name a CA or a client certificate).
pub fn endpoint(server: &str) -> Result<Endpoint, tonic::Status> {
    let (url, tls) = url_of(server);
    let bad =
        |e: &dyn std::fmt::Display| tonic::Status::invalid_argument(format!("bad server address {server:?}: {e}"));
    let mut endpoint = Endpoint::from_shared(url).map_err(|e| bad(&e))?;
    if tls {
        endpoint = endpoint.tls_config(ClientTlsConfig::new().with_enabled_roots()).map_err(|e| bad(&e))?;
    }
    // Wide HTTP/2 windows: the defaults cap a single stream far below what
    // loopback and LAN links carry.
    Ok(endpoint.tcp_nodelay(true).initial_stream_window_size(8 << 20).initial_connection_window_size(16 << 20))
}

/// The URL tonic connects to, and whether it is TLS.
fn url_of(server: &str) -> (String, bool) {
    if let Some(rest) = server.strip_prefix("grpc://") {
        (format!("http://{rest}"), false)
    } else if let Some(rest) = server.strip_prefix("grpcs://") {
        (format!("https://{rest}"), true)
    } else if server.starts_with("https://") {
        (server.to_string(), true)
    } else if server.starts_with("http://") {
        (server.to_string(), false)
    } else {
        (format!("http://{server}"), false)
    }
}

/// Whether `server` names a TLS address (`grpcs://` or `https://`).
pub fn is_tls_address(server: &str) -> bool {
    url_of(server).1
}

/// PEM files a client uses on a TLS connection. Every one is optional: with
/// no `ca` the server is checked against the system's roots; `cert` and
/// `key` (both or neither) are the client certificate for mTLS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl ClientTls {
    pub fn is_empty(&self) -> bool {
        self.ca.is_none() && self.cert.is_none() && self.key.is_none()
    }

    /// Reads the files into tonic's TLS settings.
    fn load(&self) -> Result<ClientTlsConfig, tonic::Status> {
        let read = |what: &str, path: &Path| {
            std::fs::read(path).map_err(|e| {
                tonic::Status::failed_precondition(format!("reading the TLS {what} {}: {e}", path.display()))
            })
        };
        let mut config = ClientTlsConfig::new();
        config = match &self.ca {
            Some(ca) => config.ca_certificate(Certificate::from_pem(read("CA", ca)?)),
            None => config.with_enabled_roots(),
        };
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                config = config.identity(Identity::from_pem(read("certificate", cert)?, read("key", key)?));
            }
            (None, None) => {}
            _ => {
                return Err(tonic::Status::invalid_argument(
                    "a TLS client certificate needs its key and the key its certificate (--tls-cert with --tls-key)",
                ));
            }
        }
        Ok(config)
    }
}

/// A bearer token, sent as `authorization: Bearer <token>`. Its `Debug`
/// hides the value, so it never reaches a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// Refuses empty tokens and characters a header cannot carry; the
    /// error does not contain the token.
    pub fn new(token: &str) -> Result<Token, tonic::Status> {
        let token = token.trim();
        if token.is_empty() {
            return Err(tonic::Status::invalid_argument("the bearer token is empty"));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(tonic::Status::invalid_argument("the bearer token has characters other than printable ASCII"));
        }
        Ok(Token(token.to_string()))
    }

    /// The token in `path` (surrounding whitespace, such as a trailing
    /// newline, is ignored).
    pub fn from_file(path: &Path) -> Result<Token, tonic::Status> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            tonic::Status::failed_precondition(format!("reading the token file {}: {e}", path.display()))
        })?;
        Token::new(&text).map_err(|s| tonic::Status::invalid_argument(format!("{}: {}", path.display(), s.message())))
    }

    /// The plain token, for a process this one starts (never for logs).
    pub fn expose(&self) -> &str {
        &self.0
    }

    fn header(&self) -> HeaderValue {
        // Checked in `new`: printable ASCII is always a valid header value.
        let mut value = HeaderValue::try_from(format!("Bearer {}", self.0)).expect("printable ASCII");
        value.set_sensitive(true);
        value
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// How every client of this project (the command line, remote workers, the
/// rustc wrapper) reaches a server beyond its address: TLS files for
/// `grpcs://` addresses and a bearer token for every call. The one place
/// these are applied is [`connect`] and [`Transport`].
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// Used only with `grpcs://`/`https://` addresses; naming files for a
    /// plaintext address is an error (the user meant TLS).
    pub tls: Option<ClientTls>,
    pub token: Option<Token>,
}

impl ClientOptions {
    /// The endpoint for `server`, with TLS set up for TLS addresses.
    pub fn endpoint(&self, server: &str) -> Result<Endpoint, tonic::Status> {
        let endpoint = endpoint(server)?;
        let tls = self.tls.as_ref().filter(|t| !t.is_empty());
        match (is_tls_address(server), tls) {
            (true, Some(tls)) => endpoint.tls_config(tls.load()?).map_err(|e| {
                tonic::Status::invalid_argument(format!("TLS settings for {server}: {}", error_chain(&e)))
            }),
            (true, None) => Ok(endpoint),
            (false, Some(_)) => Err(tonic::Status::invalid_argument(format!(
                "TLS files are set but {server} is a plaintext address; use grpcs://HOST:PORT"
            ))),
            (false, None) => Ok(endpoint),
        }
    }

    /// Wraps a connected channel so every call carries the token.
    pub fn transport(&self, channel: Channel) -> Transport {
        Transport { channel, authorization: self.token.as_ref().map(Token::header) }
    }
}

/// Connects eagerly, so a server that is down (or a TLS handshake that
/// fails) is reported here.
pub async fn connect(server: &str, options: &ClientOptions) -> Result<Transport, tonic::Status> {
    let channel = options
        .endpoint(server)?
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("cannot connect to {server}: {}", error_chain(&e))))?;
    Ok(options.transport(channel))
}

/// Connects on first use (and reconnects after failures by itself).
pub fn connect_lazy(server: &str, options: &ClientOptions) -> Result<Transport, tonic::Status> {
    Ok(options.transport(options.endpoint(server)?.connect_lazy()))
}

/// An error with its causes ("transport error: ...: invalid peer
/// certificate: UnknownIssuer"): tonic's top-level message alone says
/// nothing about TLS failures.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The connection every generated client of this project runs on
/// (`ByteStreamClient<Transport>`, ...): a tonic [`Channel`] that adds the
/// `authorization` header to each call when a token is set. A `Channel`
/// converts into one without a token.
#[derive(Clone)]
pub struct Transport {
    channel: Channel,
    authorization: Option<HeaderValue>,
}

impl Transport {
    pub fn channel(&self) -> &Channel {
        &self.channel
    }
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport").field("token", &self.authorization.is_some()).finish_non_exhaustive()
    }
}

impl From<Channel> for Transport {
    fn from(channel: Channel) -> Self {
        Transport { channel, authorization: None }
    }
}

impl Service<http::Request<Body>> for Transport {
    type Response = http::Response<Body>;
    type Error = tonic::transport::Error;
    type Future = tonic::transport::channel::ResponseFuture;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        Service::poll_ready(&mut self.channel, cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        if let Some(value) = &self.authorization {
            request.headers_mut().insert(http::header::AUTHORIZATION, value.clone());
        }
        Service::call(&mut self.channel, request)
    }
}

#[derive(Clone)]
pub struct CasClient {
    cas: ContentAddressableStorageClient<Transport>,
    bytestream: ByteStreamClient<Transport>,
    instance: InstanceName,
    function: DigestFunction,
    max_batch_bytes: u64,
}

impl CasClient {
    /// Connects eagerly (plaintext or with the system's roots, no token),
    /// so a server that is down is reported here.
    pub async fn connect(server: &str, instance: InstanceName) -> Result<Self, tonic::Status> {
        Self::connect_with(server, &ClientOptions::default(), instance).await
    }

    /// Like [`CasClient::connect`], with TLS files and a token.
    pub async fn connect_with(
        server: &str,
        options: &ClientOptions,
        instance: InstanceName,
    ) -> Result<Self, tonic::Status> {
        Ok(Self::new(connect(server, options).await?, instance))
    }

    pub fn new(transport: impl Into<Transport>, instance: InstanceName) -> Self {
        let channel: Transport = transport.into();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_their_schemes() {
        let cases = [
            ("grpc://h:1", "http://h:1", false),
            ("h:1", "http://h:1", false),
            ("http://h:1", "http://h:1", false),
            ("grpcs://h:1", "https://h:1", true),
            ("https://h:1", "https://h:1", true),
        ];
        for (server, url, tls) in cases {
            assert_eq!(url_of(server), (url.to_string(), tls), "{server}");
        }
    }

    #[test]
    fn tls_files_need_a_tls_address_and_come_in_pairs() {
        let files = ClientTls { ca: Some("/nonexistent/ca.pem".into()), cert: None, key: None };
        let options = ClientOptions { tls: Some(files), token: None };
        assert_eq!(options.endpoint("grpc://h:1").unwrap_err().code(), tonic::Code::InvalidArgument);
        let missing = options.endpoint("grpcs://h:1").unwrap_err();
        assert!(missing.message().contains("/nonexistent/ca.pem"), "{}", missing.message());
        let half = ClientTls { ca: None, cert: Some("c.pem".into()), key: None };
        let options = ClientOptions { tls: Some(half), token: None };
        assert_eq!(options.endpoint("grpcs://h:1").unwrap_err().code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn tokens_are_checked_and_never_shown() {
        assert!(Token::new("  ").is_err());
        assert!(Token::new("a b").is_err());
        let err = Token::new("secret\u{7f}").unwrap_err();
        assert!(!err.message().contains("secret"));
        let token = Token::new(" secret\n").unwrap();
        assert_eq!(token.expose(), "secret");
        assert!(!format!("{token:?}").contains("secret"));
        let header = token.header();
        assert!(header.is_sensitive());
        assert_eq!(header, "Bearer secret");
    }
}
