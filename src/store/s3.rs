//! Blobs and ActionCache entries in an S3-compatible object store (AWS S3,
//! MinIO, Ceph RGW, Garage, s3s-fs...), through the `object_store` crate.
//!
//! Why S3 fits a CAS: an object becomes visible whole or not at all (a
//! single PUT, or a multipart upload only once it is completed), so a torn
//! blob is never readable, and concurrent writes of one digest write the
//! same bytes. Eviction is the bucket's business (lifecycle rules), so this
//! store reports no budget.
//!
//! Keys: `{prefix}cas/{function}/{hash}-{size}` for blobs and
//! `{prefix}ac/{key hex}` for ActionCache entries. The prefix is prepended
//! as written (end it with `/` to get a folder).

mod config;
mod errors;
mod read;
mod sink;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder, AwsCredential};
use object_store::path::Path;
use object_store::{
    ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, RetryConfig, StaticCredentialProvider,
};
use remote_apis::Digest;

pub use config::{S3Config, Secret};

use super::{BlobSink, BlobStore, BlobStream, Scrub, ScrubReport, range};
use crate::ac::{AcKey, AcStore};
use crate::error::{Error, Result};
use errors::Names;

/// Retries of one request (connection refused, 5xx) before its error is
/// reported; each is also bounded by the store's `timeout`.
const MAX_RETRIES: usize = 3;

/// A bucket (and a key prefix in it) as a blob store and an ActionCache.
#[derive(Clone)]
pub struct S3Store {
    shared: Arc<Shared>,
}

struct Shared {
    /// Requests whose whole exchange is bounded by `timeout`.
    ops: AmazonS3,
    /// Blob reads: only connecting is bounded by the client; the body is
    /// bounded per chunk by `read::Guarded`, so a 1 GiB blob read by a slow
    /// client is not cut off half-way.
    reads: AmazonS3,
    names: Names,
    prefix: String,
    timeout: Duration,
    part_size: usize,
    max_concurrency: usize,
}

impl S3Store {
    /// Opens the store and checks that the bucket answers with these
    /// credentials, so a wrong endpoint, bucket or key fails at startup
    /// with a message naming them, not at the first build.
    pub async fn open(config: &S3Config) -> Result<S3Store> {
        let store = S3Store::build(config)?;
        store.check_bucket().await?;
        Ok(store)
    }

    /// The store without touching the network (no request is made until
    /// first use).
    pub fn build(config: &S3Config) -> Result<S3Store> {
        config.validate()?;
        install_crypto_provider();
        let names = Names::new(&config.bucket, &config.endpoint_display());
        let builder = builder(config).map_err(|e| e.context(&names.store))?;
        let ops = client(&builder, config, ClientOptions::new().with_timeout(config.timeout), &names)?;
        let reads = client(&builder, config, ClientOptions::new().with_timeout_disabled(), &names)?;
        let shared = Shared {
            ops,
            reads,
            names,
            prefix: config.prefix.clone(),
            timeout: config.timeout,
            part_size: config.part_size.as_u64() as usize,
            max_concurrency: config.max_concurrency,
        };
        // Keys are checked once here, so later ones cannot fail to parse.
        Path::parse(shared.key("cas/x")).map_err(|e| {
            Error::new(tonic::Code::InvalidArgument, format!("{}: prefix {:?}: {e}", shared.names.store, config.prefix))
        })?;
        Ok(S3Store { shared: Arc::new(shared) })
    }

    async fn check_bucket(&self) -> Result<()> {
        let s = &self.shared;
        let prefix = Path::from(s.prefix.as_str());
        let listing = s.ops.list_with_delimiter(Some(&prefix));
        match tokio::time::timeout(s.timeout, listing).await {
            Ok(Ok(_)) => Ok(()),
            // A listing's 404 comes back as a generic error naming S3's code.
            Ok(Err(e))
                if matches!(e, object_store::Error::NotFound { .. }) || e.to_string().contains("NoSuchBucket") =>
            {
                Err(Error::new(
                    tonic::Code::FailedPrecondition,
                    format!("{}: the bucket does not exist", s.names.store),
                ))
            }
            Ok(Err(e)) => Err(s.names.error(e, "checking the bucket")),
            Err(_) => Err(s.names.timed_out("checking the bucket", s.timeout)),
        }
    }
}

/// `reqwest` finds its TLS crypto in the process default; the server uses
/// ring everywhere (no second provider), so that is the one installed.
/// Installing fails harmlessly when a provider is already set.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn builder(config: &S3Config) -> Result<AmazonS3Builder> {
    let mut b = AmazonS3Builder::from_env().with_bucket_name(&config.bucket);
    if let Some(region) = &config.region {
        b = b.with_region(region);
    }
    if let Some(endpoint) = config.request_endpoint()? {
        b = b.with_endpoint(endpoint);
    }
    b = b.with_virtual_hosted_style_request(!config.path_style);
    if let Some((key_id, secret_key)) = config.credentials()? {
        // Takes precedence over every credential source of the environment
        // (a session token there would not belong to this key).
        let credential = AwsCredential { key_id, secret_key, token: None };
        b = b.with_credentials(Arc::new(StaticCredentialProvider::new(credential)));
    }
    Ok(b)
}

fn client(builder: &AmazonS3Builder, config: &S3Config, options: ClientOptions, names: &Names) -> Result<AmazonS3> {
    // A plain-HTTP endpoint needs no certificates, and the platform
    // verifier refuses to build a client on a machine that has none (slim
    // container images without ca-certificates).
    let plain = config.endpoint.as_deref().is_some_and(|e| e.starts_with("http://"));
    let options = options
        .with_connect_timeout(config.timeout)
        .with_allow_http(config.allows_http())
        .with_no_system_certificates(plain);
    let retry = RetryConfig { max_retries: MAX_RETRIES, retry_timeout: config.timeout, ..Default::default() };
    builder
        .clone()
        .with_client_options(options)
        .with_retry(retry)
        .build()
        .map_err(|e| Error::new(tonic::Code::InvalidArgument, format!("{}: {e}", names.store)))
}

impl Shared {
    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    fn blob_path(&self, digest: &Digest) -> Path {
        Path::from(self.key(&format!("cas/{}/{}-{}", digest.function.name(), digest.hash_hex(), digest.size)))
    }

    fn ac_path(&self, key: &AcKey) -> Path {
        Path::from(self.key(&format!("ac/{}", key.hex())))
    }

    /// Runs one bounded request, mapping its error.
    async fn bounded<T>(
        &self,
        what: &str,
        request: impl Future<Output = object_store::Result<T>>,
    ) -> Result<object_store::Result<T>> {
        tokio::time::timeout(self.timeout, request).await.map_err(|_| self.names.timed_out(what, self.timeout))
    }

    async fn exists(&self, digest: &Digest) -> Result<bool> {
        match self.bounded("looking up a blob", self.ops.head(&self.blob_path(digest))).await? {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.names.error(e, &format!("looking up blob {digest}"))),
        }
    }
}

#[async_trait]
impl BlobStore for S3Store {
    /// One HEAD per digest, `max_concurrency` at a time, answers in order.
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let s = &self.shared;
        let lookups = digests.iter().copied().map(|d| async move { s.exists(&d).await });
        let found: Vec<bool> = futures::stream::iter(lookups).buffered(s.max_concurrency).try_collect().await?;
        Ok(digests.iter().zip(found).filter(|(_, present)| !present).map(|(d, _)| *d).collect())
    }

    async fn get(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> Result<BlobStream> {
        let s = &self.shared;
        let (start, end) = range(digest, offset, limit)?;
        if start == end {
            // HTTP has no empty range; the blob must still exist.
            return match s.exists(digest).await? {
                true => Ok(futures::stream::empty().boxed()),
                false => Err(Error::blob_not_found(digest)),
            };
        }
        let options = GetOptions { range: Some(GetRange::Bounded(start..end)), ..Default::default() };
        let what = format!("reading blob {digest}");
        let result = match s.bounded(&what, s.reads.get_opts(&s.blob_path(digest), options)).await? {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Err(Error::blob_not_found(digest)),
            Err(e) => return Err(s.names.error(e, &what)),
        };
        Ok(read::Guarded::new(result.into_stream(), end - start, s.timeout, s.names.clone(), *digest).into_stream())
    }

    async fn put(&self, digest: &Digest) -> Result<Box<dyn BlobSink>> {
        let s = self.shared.clone();
        let path = s.blob_path(digest);
        Ok(Box::new(sink::S3Sink::new(s, path, *digest)))
    }
}

#[async_trait]
impl AcStore for S3Store {
    async fn get(&self, key: &AcKey) -> Result<Option<Bytes>> {
        let s = &self.shared;
        let what = "reading an ActionCache entry";
        let read = async { s.ops.get(&s.ac_path(key)).await?.bytes().await };
        match s.bounded(what, read).await? {
            Ok(data) => Ok(Some(data)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(s.names.error(e, what)),
        }
    }

    async fn put(&self, key: &AcKey, value: Bytes) -> Result<()> {
        let s = &self.shared;
        let what = "writing an ActionCache entry";
        s.bounded(what, s.ops.put(&s.ac_path(key), value.into())).await?.map_err(|e| s.names.error(e, what))?;
        Ok(())
    }

    async fn remove(&self, key: &AcKey) -> Result<()> {
        let s = &self.shared;
        let what = "removing an ActionCache entry";
        match s.bounded(what, s.ops.delete(&s.ac_path(key))).await? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(s.names.error(e, what)),
        }
    }
}

/// Re-hashing a bucket would download all of it through this server; S3
/// keeps its own checksums, so the admin scrub says so instead.
#[async_trait]
impl Scrub for S3Store {
    async fn scrub(&self) -> Result<ScrubReport> {
        Err(Error::new(
            tonic::Code::FailedPrecondition,
            format!(
                "{}: blobs in S3 are not verified by this server (the object store checks its own)",
                self.shared.names.store
            ),
        ))
    }
}

#[cfg(test)]
mod tests;
