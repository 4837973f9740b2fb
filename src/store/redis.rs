//! Blobs up to a size limit, and ActionCache entries, in Redis or a Redis
//! Cluster: the store for small, hot, shared values that several server
//! replicas read at memory speed.
//!
//! Keys:
//!
//! ```text
//! {prefix}cas:{function}:{hash}-{size}   a blob, its whole bytes as the value
//! {prefix}ac:{key hex}                   an ActionCache entry
//! ```
//!
//! A blob is buffered by its sink (it is at most `max_blob_size`) and stored
//! with one SET at commit, which Redis applies atomically: a dropped sink or
//! a failed commit stores nothing, and readers see the whole blob or none.
//! A read checks the stored length against the digest's size in the same
//! transaction as the bytes, so a value that is not the blob (written behind
//! the store's back) is reported missing and dropped, never served. With a
//! `ttl`, every write sets it and every read or presence check refreshes it,
//! so blobs in use live on and the rest expire; without one, Redis's own
//! eviction (`maxmemory-policy allkeys-lru`) is what bounds the store.

mod conn;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ::redis::{Cmd, ConnectionInfo, IntoConnectionInfo, Pipeline};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use bytesize::ByteSize;
use futures::{StreamExt, TryStreamExt};
use remote_apis::Digest;

use self::conn::Link;
use super::{BlobSink, BlobStore, BlobStream, READ_CHUNK, range};
use crate::ac::{AcKey, AcStore};
use crate::error::{Error, Result};

/// Keys asked about in one pipeline of a standalone server's `find_missing`.
const PROBES_PER_PIPELINE: usize = 4096;

/// Keys asked about at once on a cluster, where each key is its own request
/// to the node that owns its slot (the requests share each node's
/// connection, so they travel pipelined anyway).
const CLUSTER_PROBES_IN_FLIGHT: usize = 256;

/// Redis refuses bulk values above 512 MB (`proto-max-bulk-len`).
const REDIS_MAX_VALUE: u64 = 512 << 20;

/// `[stores.NAME] type = "redis"`: where the server is and how blobs live
/// there.
#[derive(Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// A standalone server: `redis://[:password@]host:port[/db]` (or
    /// `rediss://` for TLS).
    #[serde(default)]
    pub url: Option<String>,
    /// The nodes of a Redis Cluster (any of them; the rest are discovered).
    #[serde(default)]
    pub cluster: Option<Vec<String>>,
    /// Put before every key, so several stores (or other users) can share
    /// one Redis.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Largest blob (and ActionCache entry) this store takes; put larger
    /// ones elsewhere with a `size_partitioned` store.
    #[serde(default = "default_max_blob_size")]
    pub max_blob_size: ByteSize,
    /// How long an entry lives after its last write or read (none: until
    /// Redis evicts it).
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
    /// Bounds connecting and every request, retries included.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// A file holding the password (instead of one in the URL, which would
    /// sit in the configuration file).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

fn default_prefix() -> String {
    "distbuild:".to_string()
}

fn default_max_blob_size() -> ByteSize {
    ByteSize::mib(1)
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

impl RedisConfig {
    /// A standalone server at `url`, everything else by default.
    pub fn standalone(url: impl Into<String>) -> Self {
        RedisConfig { url: Some(url.into()), ..Self::defaults() }
    }

    /// A cluster reached through `nodes`, everything else by default.
    pub fn cluster(nodes: impl IntoIterator<Item = impl Into<String>>) -> Self {
        RedisConfig { cluster: Some(nodes.into_iter().map(Into::into).collect()), ..Self::defaults() }
    }

    fn defaults() -> Self {
        RedisConfig {
            url: None,
            cluster: None,
            prefix: default_prefix(),
            max_blob_size: default_max_blob_size(),
            ttl: None,
            timeout: default_timeout(),
            password_file: None,
        }
    }

    /// What `open` checks before connecting; the config loader can call it
    /// to fail early.
    pub fn validate(&self) -> Result<()> {
        let invalid = |m: &str| Err(Error::invalid(format!("redis store: {m}")));
        match (&self.url, &self.cluster) {
            (Some(_), None) => {}
            (None, Some(nodes)) if nodes.is_empty() => return invalid("`cluster` lists no node"),
            (None, Some(_)) if self.prefix.contains(['{', '}']) => {
                return invalid("on a cluster, `prefix` cannot hold `{` or `}` (a hash tag: every key in one slot)");
            }
            (None, Some(_)) => {}
            _ => {
                return invalid(
                    "give exactly one of `url` (a standalone server) and `cluster` (a Redis Cluster's nodes)",
                );
            }
        }
        if self.max_blob_size.as_u64() > REDIS_MAX_VALUE {
            return invalid("`max_blob_size` is above 512 MiB, the largest value Redis stores");
        }
        if self.timeout.is_zero() {
            return invalid("`timeout` must be above zero");
        }
        Ok(())
    }

    /// The password from `password_file`, without its trailing newline.
    fn password(&self) -> Result<Option<String>> {
        let Some(path) = &self.password_file else { return Ok(None) };
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("redis store: reading password_file {}", path.display()), e))?;
        Ok(Some(text.trim_end_matches(['\r', '\n']).to_string()))
    }
}

/// Written by hand so that a password in a URL never reaches a log.
impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.url.as_deref().map(redact))
            .field("cluster", &self.cluster.as_ref().map(|n| n.iter().map(|u| redact(u)).collect::<Vec<_>>()))
            .field("prefix", &self.prefix)
            .field("max_blob_size", &self.max_blob_size)
            .field("ttl", &self.ttl)
            .field("timeout", &self.timeout)
            .field("password_file", &self.password_file)
            .finish()
    }
}

/// `url` with any userinfo (`user:password@`) replaced by `***@`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return "***".to_string() };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// `url` parsed, with the password from the file when there is one.
fn connection_info(url: &str, password: Option<&str>) -> Result<ConnectionInfo> {
    let info = url.into_connection_info().map_err(|e| {
        Error::invalid(format!("redis store: {} is not a Redis URL (redis://host:port/): {e}", redact(url)))
    })?;
    Ok(match password {
        Some(p) => {
            let settings = info.redis_settings().clone().set_password(p);
            info.set_redis_settings(settings)
        }
        None => info,
    })
}

/// The store over one Redis server or cluster; a `BlobStore` and an
/// `AcStore`. Cheap to clone.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    link: Link,
    prefix: String,
    max_blob_size: u64,
    /// Milliseconds an entry lives after its last use.
    ttl_ms: Option<u64>,
}

impl RedisStore {
    /// Connects and checks that the engine answers; a clear UNAVAILABLE
    /// naming the address when it does not.
    pub async fn open(config: &RedisConfig) -> Result<RedisStore> {
        config.validate()?;
        let password = config.password()?;
        let link = match (&config.url, &config.cluster) {
            (Some(url), _) => Link::single(connection_info(url, password.as_deref())?, config.timeout).await?,
            (None, Some(nodes)) => {
                let infos = nodes.iter().map(|u| connection_info(u, password.as_deref())).collect::<Result<_>>()?;
                Link::cluster(infos, config.timeout).await?
            }
            (None, None) => unreachable!("validated"),
        };
        tracing::info!(store = %link.name(), prefix = %config.prefix, "opened the redis store");
        let ttl_ms = config.ttl.map(|t| (t.as_millis() as u64).max(1));
        let inner = Inner { link, prefix: config.prefix.clone(), max_blob_size: config.max_blob_size.as_u64(), ttl_ms };
        Ok(RedisStore { inner: Arc::new(inner) })
    }

    fn cas_key(&self, d: &Digest) -> String {
        format!("{}cas:{}:{}-{}", self.inner.prefix, d.function.name(), d.hash_hex(), d.size)
    }

    fn ac_key(&self, key: &AcKey) -> String {
        format!("{}ac:{}", self.inner.prefix, key.hex())
    }

    fn check_size(&self, what: &str, size: u64) -> Result<()> {
        let max = self.inner.max_blob_size;
        if size > max {
            return Err(Error::invalid(format!(
                "{what} of {size} bytes is larger than the redis store's max_blob_size of {max} bytes; keep \
                 larger blobs in another store behind a size_partitioned store"
            )));
        }
        Ok(())
    }

    /// SET, with the ttl when there is one.
    fn set(&self, key: &str, value: &[u8]) -> Cmd {
        let mut cmd = ::redis::cmd("SET");
        cmd.arg(key).arg(value);
        if let Some(ttl) = self.inner.ttl_ms {
            cmd.arg("PX").arg(ttl);
        }
        cmd
    }

    /// Adds the refresh of `key`'s ttl (its answer ignored), if any.
    fn refresh(&self, pipe: &mut Pipeline, key: &str) {
        if let Some(ttl) = self.inner.ttl_ms {
            pipe.cmd("PEXPIRE").arg(key).arg(ttl).ignore();
        }
    }

    /// The probe of one blob and the refresh of its ttl.
    fn probe_into(&self, pipe: &mut Pipeline, d: &Digest) {
        let key = self.cas_key(d);
        pipe.add_command(probe(d, &key));
        self.refresh(pipe, &key);
    }

    /// The probe answers for `digests`, in order.
    async fn probe_all(&self, digests: &[Digest]) -> Result<Vec<u64>> {
        let link = &self.inner.link;
        if !link.is_cluster() {
            let mut answers = Vec::with_capacity(digests.len());
            for chunk in digests.chunks(PROBES_PER_PIPELINE) {
                let mut pipe = ::redis::pipe();
                chunk.iter().for_each(|d| self.probe_into(&mut pipe, d));
                answers.extend(link.pipe::<Vec<u64>>("finding missing blobs", &pipe).await?);
            }
            return Ok(answers);
        }
        // A cluster routes a pipeline to one node: one small pipeline per key.
        let pipes: Vec<Pipeline> = digests
            .iter()
            .map(|d| {
                let mut pipe = ::redis::pipe();
                self.probe_into(&mut pipe, d);
                pipe
            })
            .collect();
        futures::stream::iter(pipes)
            .map(|pipe| {
                let link = link.clone();
                async move {
                    let (answer,): (u64,) = link.pipe("finding missing blobs", &pipe).await?;
                    Ok::<_, Error>(answer)
                }
            })
            .buffered(CLUSTER_PROBES_IN_FLIGHT)
            .try_collect()
            .await
    }

    /// Reads `start..end` of a blob and whether it is stored whole, in one
    /// transaction.
    async fn read_range(&self, d: &Digest, start: u64, end: u64) -> Result<Option<Bytes>> {
        let key = self.cas_key(d);
        let mut pipe = ::redis::pipe();
        pipe.atomic().add_command(probe(d, &key));
        if end > start {
            pipe.cmd("GETRANGE").arg(&key).arg(start).arg(end - 1);
        }
        self.refresh(&mut pipe, &key);
        let what = format!("reading blob {d}");
        let (answer, data): (u64, Vec<u8>) = if end > start {
            self.inner.link.pipe(&what, &pipe).await?
        } else {
            let (answer,): (u64,) = self.inner.link.pipe(&what, &pipe).await?;
            (answer, Vec::new())
        };
        if !present(d, answer) {
            if answer > 0 && d.size > 0 {
                self.drop_torn(d, &key, answer).await;
            }
            return Ok(None);
        }
        if data.len() as u64 != end - start {
            // Cannot happen within a transaction; never pass it on as a blob.
            return Err(Error::internal(format!(
                "{}: {what}: {} bytes came back for a range of {}",
                self.inner.link.name(),
                data.len(),
                end - start
            )));
        }
        Ok(Some(Bytes::from(data)))
    }

    /// A value of the wrong length under a blob's key was not written by
    /// this store (its writes are whole): forget it, so the client uploads
    /// the blob again.
    async fn drop_torn(&self, d: &Digest, key: &str, stored: u64) {
        tracing::warn!(store = %self.inner.link.name(), digest = %d, stored, "dropping a value of the wrong length");
        let _ = self.inner.link.cmd::<u64>("dropping a torn blob", ::redis::cmd("DEL").arg(key)).await;
    }
}

/// The command that tells whether a blob is stored whole: its length (an
/// absent key has length 0), or for the empty blob whether the key exists.
fn probe(d: &Digest, key: &str) -> Cmd {
    let mut cmd = ::redis::cmd(if d.size == 0 { "EXISTS" } else { "STRLEN" });
    cmd.arg(key);
    cmd
}

/// Whether `probe`'s answer means the blob is there, whole.
fn present(d: &Digest, answer: u64) -> bool {
    if d.size == 0 { answer == 1 } else { answer == d.size }
}

/// `data` as a stream of chunks (sharing its memory).
fn chunked(data: Bytes) -> BlobStream {
    let chunks: Vec<Result<Bytes>> =
        (0..data.len()).step_by(READ_CHUNK).map(|at| Ok(data.slice(at..(at + READ_CHUNK).min(data.len())))).collect();
    futures::stream::iter(chunks).boxed()
}

#[async_trait]
impl BlobStore for RedisStore {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let answers = self.probe_all(digests).await?;
        Ok(digests.iter().zip(answers).filter(|(d, answer)| !present(d, *answer)).map(|(d, _)| *d).collect())
    }

    async fn get(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> Result<BlobStream> {
        // Absence wins over a bad offset, as in every other store.
        let (start, end) = match range(digest, offset, limit) {
            Ok(r) => r,
            Err(e) => {
                return Err(self.read_range(digest, 0, 0).await?.map_or_else(|| Error::blob_not_found(digest), |_| e));
            }
        };
        match self.read_range(digest, start, end).await? {
            Some(data) => Ok(chunked(data)),
            None => Err(Error::blob_not_found(digest)),
        }
    }

    async fn put(&self, digest: &Digest) -> Result<Box<dyn BlobSink>> {
        self.check_size(&format!("blob {digest}"), digest.size)?;
        Ok(Box::new(RedisSink {
            store: self.clone(),
            digest: *digest,
            buf: BytesMut::with_capacity(digest.size as usize),
        }))
    }

    async fn put_bytes(&self, digest: &Digest, data: Bytes) -> Result<()> {
        self.check_size(&format!("blob {digest}"), digest.size)?;
        check_length(digest, data.len() as u64)?;
        self.inner.link.cmd::<()>(&format!("storing blob {digest}"), &self.set(&self.cas_key(digest), &data)).await
    }
}

/// A blob on its way in: bytes gather in memory, one SET at commit.
struct RedisSink {
    store: RedisStore,
    digest: Digest,
    buf: BytesMut,
}

fn check_length(digest: &Digest, len: u64) -> Result<()> {
    if len != digest.size {
        return Err(Error::invalid(format!("blob {digest}: {len} bytes were written, not {}", digest.size)));
    }
    Ok(())
}

#[async_trait]
impl BlobSink for RedisSink {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        if (self.buf.len() + data.len()) as u64 > self.digest.size {
            return Err(Error::invalid(format!("blob {}: more bytes than its size", self.digest)));
        }
        self.buf.extend_from_slice(&data);
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        let (store, digest) = (&self.store, self.digest);
        check_length(&digest, self.buf.len() as u64)?;
        store
            .inner
            .link
            .cmd::<()>(&format!("storing blob {digest}"), &store.set(&store.cas_key(&digest), &self.buf))
            .await
    }
}

#[async_trait]
impl AcStore for RedisStore {
    async fn get(&self, key: &AcKey) -> Result<Option<Bytes>> {
        let mut cmd = ::redis::cmd(if self.inner.ttl_ms.is_some() { "GETEX" } else { "GET" });
        cmd.arg(self.ac_key(key));
        if let Some(ttl) = self.inner.ttl_ms {
            cmd.arg("PX").arg(ttl);
        }
        let value: Option<Vec<u8>> = self.inner.link.cmd("reading an action result", &cmd).await?;
        Ok(value.map(Bytes::from))
    }

    async fn put(&self, key: &AcKey, value: Bytes) -> Result<()> {
        self.check_size("an action result", value.len() as u64)?;
        self.inner.link.cmd::<()>("storing an action result", &self.set(&self.ac_key(key), &value)).await
    }

    async fn remove(&self, key: &AcKey) -> Result<()> {
        self.inner.link.cmd::<u64>("removing an action result", ::redis::cmd("DEL").arg(self.ac_key(key))).await?;
        Ok(())
    }
}
