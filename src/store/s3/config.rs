//! What an operator writes in a `type = "s3"` store section, and its
//! validation.

use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;

use crate::error::{Error, Result};

/// The smallest part S3 accepts in a multipart upload (all but the last).
const MIN_PART_SIZE: u64 = 5 << 20;
/// The largest part S3 accepts.
const MAX_PART_SIZE: u64 = 5 << 30;

/// One bucket (and key prefix) as a store. Credentials come from
/// `access_key_id` with `secret_access_key_file` (or, discouraged,
/// `secret_access_key` inline), else from the standard AWS environment
/// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
/// web identity, instance metadata).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub bucket: String,
    /// `http(s)://host[:port]` of an S3-compatible server; AWS when absent.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The signing region; `AWS_REGION` or us-east-1 when absent.
    #[serde(default)]
    pub region: Option<String>,
    /// Prepended to every key as written.
    #[serde(default)]
    pub prefix: String,
    /// `endpoint/bucket/key` instead of `bucket.endpoint/key` (most
    /// self-hosted servers, and any endpoint given as an IP address).
    #[serde(default)]
    pub path_style: bool,
    /// Plain HTTP; by default allowed only for an `http://` endpoint.
    #[serde(default)]
    pub allow_http: Option<bool>,
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// A file holding the secret key (trailing whitespace ignored).
    #[serde(default)]
    pub secret_access_key_file: Option<PathBuf>,
    #[serde(default)]
    pub secret_access_key: Option<Secret>,
    /// Bounds connecting, each request, and each wait for the next chunk
    /// of a blob being read.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Blobs above this are uploaded as multipart uploads of parts this
    /// size, so an upload holds at most five parts in memory (four being
    /// sent, one filling) whatever the blob's size.
    #[serde(default = "default_part_size")]
    pub part_size: ByteSize,
    /// HEAD requests in flight for one FindMissingBlobs.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
}

/// A secret from the configuration: never printed, not even by `Debug`.
#[derive(Clone, PartialEq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(secret: impl Into<String>) -> Self {
        Secret(secret.into())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_part_size() -> ByteSize {
    ByteSize::mib(8)
}

fn default_max_concurrency() -> usize {
    64
}

fn invalid(message: String) -> Error {
    Error::new(tonic::Code::InvalidArgument, message)
}

impl S3Config {
    /// The defaults for `bucket` (what an empty section with only the
    /// bucket would give).
    pub fn new(bucket: &str) -> Self {
        S3Config {
            bucket: bucket.to_string(),
            endpoint: None,
            region: None,
            prefix: String::new(),
            path_style: false,
            allow_http: None,
            access_key_id: None,
            secret_access_key_file: None,
            secret_access_key: None,
            timeout: default_timeout(),
            part_size: default_part_size(),
            max_concurrency: default_max_concurrency(),
        }
    }

    pub fn validate(&self) -> Result<()> {
        let part = self.part_size.as_u64();
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&part) {
            return Err(invalid(format!(
                "s3 store {}: part_size {} is outside S3's limits of 5 MiB to 5 GiB",
                self.bucket, self.part_size
            )));
        }
        if self.max_concurrency == 0 {
            return Err(invalid(format!("s3 store {}: max_concurrency must be at least 1", self.bucket)));
        }
        if self.timeout.is_zero() {
            return Err(invalid(format!("s3 store {}: timeout must be above zero", self.bucket)));
        }
        Ok(())
    }

    /// Plain HTTP is allowed for an `http://` endpoint unless said otherwise.
    pub(super) fn allows_http(&self) -> bool {
        self.allow_http.unwrap_or_else(|| self.endpoint.as_deref().is_some_and(|e| e.starts_with("http://")))
    }

    /// How the endpoint is named in messages.
    pub(super) fn endpoint_display(&self) -> String {
        self.endpoint.clone().unwrap_or_else(|| "AWS".to_string())
    }

    /// The endpoint requests go to. `object_store` expects a virtual-hosted
    /// endpoint to name the bucket already; an operator writes the server's
    /// address, so the bucket is put in front of its host here.
    pub(super) fn request_endpoint(&self) -> Result<Option<String>> {
        let Some(endpoint) = &self.endpoint else { return Ok(None) };
        if self.path_style {
            return Ok(Some(endpoint.clone()));
        }
        let mut url = url::Url::parse(endpoint)
            .map_err(|e| invalid(format!("s3 store {}: endpoint {endpoint:?}: {e}", self.bucket)))?;
        let host = match url.host() {
            Some(url::Host::Domain(d)) if d != "localhost" => d.to_string(),
            _ => {
                return Err(invalid(format!(
                    "s3 store {}: endpoint {endpoint} cannot address the bucket as a host name \
                     (virtual-hosted style); set path_style = true",
                    self.bucket
                )));
            }
        };
        url.set_host(Some(&format!("{}.{host}", self.bucket)))
            .map_err(|e| invalid(format!("s3 store {}: endpoint {endpoint}: {e}", self.bucket)))?;
        Ok(Some(url.as_str().trim_end_matches('/').to_string()))
    }

    /// The key pair from the configuration, if it names one.
    pub(super) fn credentials(&self) -> Result<Option<(String, String)>> {
        let secret = match (&self.secret_access_key_file, &self.secret_access_key) {
            (Some(_), Some(_)) => {
                return Err(invalid(format!(
                    "s3 store {}: set secret_access_key_file or secret_access_key, not both",
                    self.bucket
                )));
            }
            (Some(path), None) => Some(read_secret(path).map_err(|e| e.context(format!("s3 store {}", self.bucket)))?),
            (None, Some(secret)) => Some(secret.0.clone()),
            (None, None) => None,
        };
        match (&self.access_key_id, secret) {
            (Some(id), Some(secret)) => Ok(Some((id.clone(), secret))),
            (None, None) => Ok(None),
            (Some(_), None) => Err(invalid(format!(
                "s3 store {}: access_key_id needs secret_access_key_file (or secret_access_key)",
                self.bucket
            ))),
            (None, Some(_)) => Err(invalid(format!("s3 store {}: a secret key needs its access_key_id", self.bucket))),
        }
    }
}

fn read_secret(path: &std::path::Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading the secret key file {}", path.display()), e))?;
    let secret = text.trim_end().to_string();
    if secret.is_empty() {
        return Err(invalid(format!("the secret key file {} is empty", path.display())));
    }
    Ok(secret)
}
