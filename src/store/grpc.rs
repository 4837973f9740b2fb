//! Another REAPI server as a store: blobs through its ContentAddressableStorage
//! and ByteStream services, ActionCache entries through its ActionCache.
//!
//! This is what lets a regional or worker-side server sit in front of a
//! central one (usually as the slow tier of a `tiered` store). The remote is
//! spoken to exactly as any REAPI client would, so the central server's other
//! clients see what is written through the front server and the other way
//! round: ActionCache calls carry the real instance name and action digest
//! of the key ([`crate::ac::AcOrigin`]).
//!
//! Connections are made with the project's one client stack
//! ([`remote_apis::client::ClientOptions`]: TLS files, mTLS, a bearer token)
//! and lazily, so a server whose remote is down starts and its calls report
//! UNAVAILABLE until the remote is back.
//!
//! Errors: the remote's own statuses keep their code (NOT_FOUND,
//! INVALID_ARGUMENT, PERMISSION_DENIED, ...) with the endpoint prepended;
//! a broken or silent connection is UNAVAILABLE naming the endpoint. The
//! token never appears in a message.

mod ac;
mod blobs;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytesize::ByteSize;
use remote_apis::bytestream::byte_stream_client::ByteStreamClient;
use remote_apis::client::{ClientOptions, ClientTls, Token, Transport};
use remote_apis::reapi::action_cache_client::ActionCacheClient;
use remote_apis::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use remote_apis::{InstanceName, quote};
use serde::Deserialize;
use tonic::Code;

use crate::error::{Error, Result};

/// The default for [`GrpcConfig::batch_max`]: far below the 4 MiB that
/// REAPI clients assume of a server that advertises no batch limit.
pub const DEFAULT_BATCH_MAX: u64 = 1 << 20;

/// The default for [`GrpcConfig::timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest gRPC message sent to or accepted from the remote: a batch of
/// `batch_max` bytes and a FindMissingBlobs of [`FIND_MISSING_CHUNK`]
/// digests fit with room to spare.
const MESSAGE_LIMIT: usize = 64 << 20;

/// Digests per FindMissingBlobs request: about 100 bytes each on the wire,
/// so a request stays near 1 MiB, far under any server's receive limit.
const FIND_MISSING_CHUNK: usize = 10_000;

/// `type = "grpc"`: a store that is another REAPI server.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcConfig {
    /// `grpc://host:port` or `http://...` (plaintext), `grpcs://host:port`
    /// or `https://...` (TLS).
    pub endpoint: String,
    /// When set, every call uses this instance name. When unset, blobs are
    /// stored under the empty instance name (a blob is the same blob in
    /// every instance) and ActionCache entries under their own instance.
    /// Set it only when one remote instance serves every instance of this
    /// server: the same action under two of its instances is then one
    /// entry on the remote.
    #[serde(default)]
    pub instance_name: Option<String>,
    /// CA certificates (PEM) the remote's certificate must chain to
    /// (default: the system's roots). TLS endpoints only.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for a remote that requires mTLS.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// A file holding the bearer token sent on every call. Read once at
    /// open; the token is never logged.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The longest a unary call may take, and the longest a streamed read
    /// or write may go without progress (a 1 GiB transfer may take longer
    /// as a whole). Past it, the call fails with UNAVAILABLE.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Blobs up to this size are written with BatchUpdateBlobs and read with
    /// BatchReadBlobs (one round trip, one buffer); larger ones stream
    /// through ByteStream. Keep it below the remote's batch limit.
    #[serde(default = "default_batch_max")]
    pub batch_max: ByteSize,
}

fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}

fn default_batch_max() -> ByteSize {
    ByteSize::b(DEFAULT_BATCH_MAX)
}

impl GrpcConfig {
    /// A config for `endpoint` with every other key at its default.
    pub fn new(endpoint: impl Into<String>) -> Self {
        GrpcConfig {
            endpoint: endpoint.into(),
            instance_name: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            token_file: None,
            timeout: DEFAULT_TIMEOUT,
            batch_max: default_batch_max(),
        }
    }
}

/// A remote REAPI server used as a [`crate::store::BlobStore`] and an
/// [`crate::ac::AcStore`]. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct GrpcStore {
    /// The endpoint as configured, for messages.
    endpoint: Arc<str>,
    /// The configured instance name, if any (see [`GrpcConfig::instance_name`]).
    instance: Option<InstanceName>,
    timeout: Duration,
    batch_max: u64,
    cas: ContentAddressableStorageClient<Transport>,
    bytestream: ByteStreamClient<Transport>,
    ac: ActionCacheClient<Transport>,
}

impl GrpcStore {
    /// Checks the config and sets up a lazy connection: nothing is sent to
    /// the remote until the first call, so a remote that is down is not an
    /// error here. A bad address, unreadable TLS files or token file are.
    pub async fn open(config: &GrpcConfig) -> Result<GrpcStore> {
        let endpoint = config.endpoint.trim();
        let context = |e: Error| e.context(format!("grpc store {}", quote(endpoint)));
        check_scheme(endpoint).map_err(context)?;
        let instance = match &config.instance_name {
            Some(name) => Some(InstanceName::new(name).map_err(|e| context(Error::bad_field("instance_name", e.0)))?),
            None => None,
        };
        let options = client_options(config).map_err(context)?;
        let channel =
            options.endpoint(endpoint).map_err(|s| context(local(s)))?.connect_timeout(config.timeout).connect_lazy();
        let transport = options.transport(channel);
        Ok(GrpcStore {
            endpoint: endpoint.into(),
            instance,
            timeout: config.timeout,
            batch_max: config.batch_max.as_u64(),
            cas: ContentAddressableStorageClient::new(transport.clone())
                .max_decoding_message_size(MESSAGE_LIMIT)
                .max_encoding_message_size(MESSAGE_LIMIT),
            bytestream: ByteStreamClient::new(transport.clone())
                .max_decoding_message_size(MESSAGE_LIMIT)
                .max_encoding_message_size(MESSAGE_LIMIT),
            ac: ActionCacheClient::new(transport)
                .max_decoding_message_size(MESSAGE_LIMIT)
                .max_encoding_message_size(MESSAGE_LIMIT),
        })
    }

    /// The instance name blob calls use.
    fn blob_instance(&self) -> InstanceName {
        self.instance.clone().unwrap_or_default()
    }

    /// Runs one unary call within the timeout, mapping its error.
    async fn call<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(self.status_error(what, status)),
            Err(_) => Err(self.timed_out(what)),
        }
    }

    /// The error for a failed call: the remote's status keeps its code; a
    /// transport failure (the status carries its cause) is UNAVAILABLE.
    fn status_error(&self, what: &str, status: tonic::Status) -> Error {
        let (code, detail) = match std::error::Error::source(&status) {
            Some(cause) => {
                // Each cause once: tonic's message often repeats the first.
                let mut detail = status.message().to_string();
                let mut next = Some(cause);
                while let Some(cause) = next {
                    let text = cause.to_string();
                    if !detail.contains(&text) {
                        detail = format!("{detail}: {text}");
                    }
                    next = cause.source();
                }
                (Code::Unavailable, detail)
            }
            None => (status.code(), status.message().to_string()),
        };
        Error::new(code, format!("grpc store {}: {what}: {detail}", self.endpoint))
    }

    fn timed_out(&self, what: &str) -> Error {
        let message = format!("grpc store {}: {what}: no answer within {:?}", self.endpoint, self.timeout);
        Error::new(Code::Unavailable, message)
    }

    /// An answer the remote should never give (a malformed digest, a batch
    /// response without our blob, a short stream).
    fn bad_answer(&self, what: &str, why: impl std::fmt::Display) -> Error {
        Error::new(Code::DataLoss, format!("grpc store {}: {what}: {why}", self.endpoint))
    }
}

/// Only the schemes [`remote_apis::client::endpoint`] gives a meaning to:
/// anything else (a typo, `redis://`) is refused rather than guessed.
fn check_scheme(endpoint: &str) -> Result<()> {
    let known = ["grpc://", "grpcs://", "http://", "https://"];
    if known.iter().any(|s| endpoint.starts_with(s)) {
        return Ok(());
    }
    Err(Error::bad_field(
        "endpoint",
        format!("{} is not a grpc://, grpcs://, http:// or https:// address", quote(endpoint)),
    ))
}

/// TLS files and the token, read into the client stack's options.
fn client_options(config: &GrpcConfig) -> Result<ClientOptions> {
    let tls = ClientTls { ca: config.tls_ca.clone(), cert: config.tls_cert.clone(), key: config.tls_key.clone() };
    let token = match &config.token_file {
        Some(path) => Some(Token::from_file(path).map_err(local)?),
        None => None,
    };
    Ok(ClientOptions { tls: (!tls.is_empty()).then_some(tls), token })
}

/// A status made here (not by the remote), as an error.
fn local(status: tonic::Status) -> Error {
    Error::new(status.code(), status.message())
}

#[cfg(test)]
mod tests;
