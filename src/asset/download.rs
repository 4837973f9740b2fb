//! Downloads for FetchBlob: HTTP(S) through reqwest (rustls with ring, no
//! proxy from the environment, the SSRF guard on every hop), streamed into
//! the CAS without holding the body in memory.
//!
//! Two ways in. When the digest is known before the body arrives (a
//! `sha256-` SRI, a SHA-256 request and a Content-Length), the body streams
//! straight into a CAS write of that digest, hashed on the way, and the
//! write is committed only if the hash matches (the store's own check runs
//! too). Otherwise the body is spooled to an unlinked temporary file while
//! it is hashed, the SRI is checked, and only then is the file written to
//! the CAS. Either way a mismatch, a size over `max_size` or a timeout
//! leaves nothing in the CAS.

use std::io::{Seek, Write};
use std::path::PathBuf;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use remote_apis::{Digest, DigestFunction, Hasher, quote};
use reqwest::header::{CONTENT_LENGTH, HeaderName, HeaderValue, LOCATION};
use tokio::time::Instant;
use tonic::Code;

use super::guard::{self, GuardedResolver};
use super::sri::{Sri, SriAlgorithm};
use crate::config::AssetConfig;
use crate::error::{Error, Result};
use crate::store::{READ_CHUNK, Store};

/// How long connecting to an origin may take (the whole download has
/// `[asset] timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes gathered before each CAS write (the store's own chunk size).
const WRITE_CHUNK: usize = READ_CHUNK;

/// The HTTP client and the limits of every download.
pub struct Downloader {
    client: reqwest::Client,
    allow_private: bool,
    max_redirects: usize,
    max_size: u64,
    timeout: Duration,
    /// Where bodies of unknown digest are spooled.
    spool_dir: PathBuf,
}

/// Whether `uri` is a URN (RFC 8141): a name for content, never a place to
/// download it from, such as BuildStream's artifact and source index
/// (`urn:fdc:buildstream.build:2020:artifact:...`). A FetchBlob of names
/// alone is answered from the records: a miss is NOT_FOUND, as with
/// downloads off, rather than a refused download (which a client reads as a
/// failure, not as "not cached"). Other schemes than http and https stay
/// refused when downloads are on.
pub fn is_name(uri: &str) -> bool {
    uri.get(..4).is_some_and(|s| s.eq_ignore_ascii_case("urn:"))
}

/// What one download is for.
pub struct Wanted<'a> {
    pub function: DigestFunction,
    pub sri: Option<&'a Sri>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// A download in the CAS: its digest and the content hashes known for
/// certain (for the SRI index).
#[derive(Debug)]
pub struct Downloaded {
    pub digest: Digest,
    pub hashes: Vec<Sri>,
}

/// The outcome of one download: `Err` is the origin's failure (reported in
/// the response's `status`, another mirror may still work); the outer
/// `Result` of [`Downloader::fetch`] is the server's own failure.
pub type Attempt = std::result::Result<Downloaded, Error>;

impl Downloader {
    pub fn new(config: &AssetConfig, spool_dir: PathBuf) -> anyhow::Result<Downloader> {
        let allow_private = config.allow_private;
        let client = reqwest::Client::builder()
            // A proxy would resolve and connect for us, past the guard.
            .no_proxy()
            .dns_resolver(GuardedResolver::arc(allow_private))
            // Redirects are followed by `send` itself: each hop is checked
            // by the guard, and the qualifiers' headers go only to the
            // URI's own origin.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("cargo-distbuild/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Downloader {
            client,
            allow_private,
            max_redirects: config.max_redirects,
            max_size: config.max_size,
            timeout: config.timeout,
            spool_dir,
        })
    }

    /// The deadline of a download that starts now, `requested` (the
    /// request's own timeout) shortening `[asset] timeout`.
    pub fn deadline(&self, requested: Option<Duration>) -> Instant {
        let limit = match requested {
            Some(r) if !r.is_zero() => r.min(self.timeout),
            _ => self.timeout,
        };
        Instant::now() + limit
    }

    /// Downloads `uri` into `cas` by `deadline`.
    pub async fn fetch(&self, cas: &Store, uri: &str, wanted: &Wanted<'_>, deadline: Instant) -> Result<Attempt> {
        match tokio::time::timeout_at(deadline, self.attempt(cas, uri, wanted)).await {
            Ok(result) => result,
            Err(_) => Ok(Err(Error::new(Code::DeadlineExceeded, "the download did not finish in time"))),
        }
    }

    async fn attempt(&self, cas: &Store, uri: &str, wanted: &Wanted<'_>) -> Result<Attempt> {
        let url = match reqwest::Url::parse(uri) {
            Ok(url) => url,
            // Not quoted: the response names the URI, and a log line should not.
            Err(e) => return Ok(Err(Error::invalid(format!("the URI is not a URL: {e}")))),
        };
        if !matches!(url.scheme(), "http" | "https") {
            return Ok(Err(Error::invalid(format!("scheme {} is not supported (http, https)", quote(url.scheme())))));
        }
        if let Err(refused) = guard::check_url(&url, self.allow_private) {
            return Ok(Err(Error::new(Code::PermissionDenied, refused.0)));
        }
        let response = match self.send(url, &wanted.headers).await {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let status = response.status();
        if !status.is_success() {
            let code = match status.as_u16() {
                404 | 410 => Code::NotFound,
                401 | 403 => Code::PermissionDenied,
                429 => Code::ResourceExhausted,
                _ => Code::Unavailable,
            };
            return Ok(Err(Error::new(code, format!("the origin answered {status}"))));
        }
        let length = response.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if let Some(length) = length
            && length > self.max_size
        {
            return Ok(Err(too_large(self.max_size)));
        }
        let known = match (wanted.sri, length) {
            (Some(sri), Some(length))
                if sri.algorithm == SriAlgorithm::Sha256 && wanted.function == DigestFunction::Sha256 =>
            {
                let hash: [u8; 32] = sri.hash.as_slice().try_into().expect("sha256 hashes have 32 bytes");
                Some(Digest { function: DigestFunction::Sha256, hash, size: length })
            }
            _ => None,
        };
        match known {
            Some(digest) => self.stream_known(cas, response, digest, wanted.sri.expect("known from an SRI")).await,
            None => self.spool(cas, response, wanted).await,
        }
    }

    /// GET `url`, following up to `max_redirects` redirects. Every hop
    /// passes the guard (IP literals here, names in the resolver); the
    /// qualifiers' headers (credentials, often) are sent only while the hop
    /// stays on the first URL's origin (scheme, host and port), so a
    /// redirect elsewhere never carries them.
    async fn send(
        &self,
        first: reqwest::Url,
        headers: &[(HeaderName, HeaderValue)],
    ) -> std::result::Result<reqwest::Response, Error> {
        let origin = first.origin();
        let mut url = first;
        let mut hops = 0;
        loop {
            let mut request = self.client.get(url.clone());
            if url.origin() == origin {
                for (name, value) in headers {
                    request = request.header(name, value);
                }
            }
            let response = request.send().await.map_err(origin_error)?;
            if !response.status().is_redirection() {
                return Ok(response);
            }
            let Some(location) = response.headers().get(LOCATION).and_then(|v| v.to_str().ok()) else {
                return Ok(response);
            };
            let next = url
                .join(location)
                .map_err(|e| Error::new(Code::Unavailable, format!("the origin redirected to a bad URL: {e}")))?;
            hops += 1;
            if hops > self.max_redirects {
                return Err(Error::new(
                    Code::Unavailable,
                    format!("more than {} redirects ([asset] max_redirects)", self.max_redirects),
                ));
            }
            guard::check_url(&next, self.allow_private)
                .map_err(|refused| Error::new(Code::PermissionDenied, refused.0))?;
            url = next;
        }
    }

    /// The digest is known: straight into a CAS write (skipped when the
    /// CAS has the blob already). The store's own check (`store::Verify`,
    /// which every write passes) is the SRI check here: hashing the body a
    /// second time for the message cost a third of the download's time
    /// (`scripts/bench-asset.sh`), so a mismatch names the hash that check
    /// computed.
    async fn stream_known(
        &self,
        cas: &Store,
        response: reqwest::Response,
        digest: Digest,
        sri: &Sri,
    ) -> Result<Attempt> {
        if cas.find_missing(&[digest]).await?.is_empty() {
            return Ok(Ok(Downloaded { digest, hashes: vec![sri.clone()] }));
        }
        let mut sink = cas.put(&digest).await?;
        let mut body = Body::start(response);
        let mut total = 0u64;
        while let Some(piece) = body.next().await {
            let chunk = match piece {
                Ok(c) => c,
                Err(e) => return Ok(Err(origin_error(e))),
            };
            total += chunk.len() as u64;
            if total > digest.size {
                return Ok(Err(Error::new(Code::Aborted, "the body is longer than its Content-Length")));
            }
            sink.write(chunk).await?;
        }
        if total != digest.size {
            return Ok(Err(Error::new(
                Code::Aborted,
                format!("the body ended after {total} of its {} bytes", digest.size),
            )));
        }
        match sink.commit().await {
            Ok(()) => Ok(Ok(Downloaded { digest, hashes: vec![sri.clone()] })),
            // The store refused the bytes: they do not hash to the digest.
            Err(e) if e.code == Code::InvalidArgument => Ok(Err(Error::new(
                Code::Aborted,
                format!("checksum.sri mismatch: expected {sri} ({digest}); {}; nothing was stored", e.message),
            ))),
            Err(e) => Err(e),
        }
    }

    /// The digest is unknown: spool and hash, check, then store.
    async fn spool(&self, cas: &Store, response: reqwest::Response, wanted: &Wanted<'_>) -> Result<Attempt> {
        let dir = self.spool_dir.clone();
        let file = tokio::task::spawn_blocking(move || tempfile::tempfile_in(&dir))
            .await
            .map_err(|e| Error::internal(format!("spooling a download: {e}")))?
            .map_err(|e| Error::io(format!("creating a temporary file in {}", self.spool_dir.display()), e))?;
        let mut file = Some(file);
        let mut hasher: Hasher = wanted.function.hasher();
        // A sha256 SRI of a SHA-256 request is the digest's own hash.
        let same_hash = |s: &&Sri| s.algorithm == SriAlgorithm::Sha256 && wanted.function == DigestFunction::Sha256;
        let mut sri_hasher = wanted.sri.filter(|s| !same_hash(s)).map(|s| s.algorithm.hasher());
        let mut body = Body::start(response);
        while let Some(piece) = body.next().await {
            let chunk = match piece {
                Ok(c) => c,
                Err(e) => return Ok(Err(origin_error(e))),
            };
            if hasher.len() + chunk.len() as u64 > self.max_size {
                return Ok(Err(too_large(self.max_size)));
            }
            hasher.update(&chunk);
            if let Some(h) = &mut sri_hasher {
                h.update(&chunk);
            }
            file = Some(write_blocking(file.take().expect("the file"), chunk).await?);
        }
        let mut file = file.take().expect("the file");
        let digest = hasher.finish();
        let own = super::records::sha256_sri(&digest);
        if let Some(sri) = wanted.sri {
            let got = match sri_hasher {
                Some(h) => h.finish(),
                None => own.clone().expect("a SHA-256 digest"),
            };
            if got != *sri {
                return Ok(Err(mismatch(sri, &got)));
            }
        }
        let mut hashes: Vec<Sri> = own.into_iter().collect();
        if let Some(sri) = wanted.sri.filter(|s| !same_hash(s)) {
            hashes.push(sri.clone());
        }
        if !cas.find_missing(&[digest]).await?.is_empty() {
            file.rewind().map_err(|e| Error::io("rewinding a spooled download", e))?;
            let mut sink = cas.put(&digest).await?;
            loop {
                let (back, chunk) = read_blocking(file).await?;
                file = back;
                if chunk.is_empty() {
                    break;
                }
                sink.write(chunk).await?;
            }
            sink.commit().await?;
        }
        Ok(Ok(Downloaded { digest, hashes }))
    }
}

/// A response body in pieces of `WRITE_CHUNK` bytes, received by a task of
/// its own so that receiving the next piece overlaps hashing and storing
/// this one (on two cores a download no longer waits for the hash of what
/// it already has). At most `PIECES_AHEAD` pieces wait; dropping the body
/// (an error, a limit, the call's deadline) stops the task.
struct Body {
    pieces: tokio::sync::mpsc::Receiver<std::result::Result<Bytes, reqwest::Error>>,
    task: tokio::task::JoinHandle<()>,
}

const PIECES_AHEAD: usize = 4;

impl Body {
    fn start(mut response: reqwest::Response) -> Body {
        let (tx, pieces) = tokio::sync::mpsc::channel(PIECES_AHEAD);
        let task = tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(WRITE_CHUNK);
            loop {
                match response.chunk().await {
                    Ok(Some(chunk)) => {
                        buf.extend_from_slice(&chunk);
                        if buf.len() >= WRITE_CHUNK && tx.send(Ok(buf.split().freeze())).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => {
                        if !buf.is_empty() {
                            let _ = tx.send(Ok(buf.freeze())).await;
                        }
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
        });
        Body { pieces, task }
    }

    async fn next(&mut self) -> Option<std::result::Result<Bytes, reqwest::Error>> {
        self.pieces.recv().await
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn write_blocking(mut file: std::fs::File, data: Bytes) -> Result<std::fs::File> {
    tokio::task::spawn_blocking(move || file.write_all(&data).map(|()| file))
        .await
        .map_err(|e| Error::internal(format!("spooling a download: {e}")))?
        .map_err(|e| Error::io("writing a spooled download", e))
}

async fn read_blocking(mut file: std::fs::File) -> Result<(std::fs::File, Bytes)> {
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut buf = vec![0u8; WRITE_CHUNK];
        let mut filled = 0;
        while filled < buf.len() {
            match file.read(&mut buf[filled..])? {
                0 => break,
                n => filled += n,
            }
        }
        buf.truncate(filled);
        Ok::<_, std::io::Error>((file, Bytes::from(buf)))
    })
    .await
    .map_err(|e| Error::internal(format!("reading a spooled download: {e}")))?
    .map_err(|e| Error::io("reading a spooled download", e))
}

fn too_large(max: u64) -> Error {
    Error::resource_exhausted(format!("the download is larger than {max} bytes ([asset] max_size)"))
}

fn mismatch(expected: &Sri, got: &Sri) -> Error {
    Error::new(Code::Aborted, format!("checksum.sri mismatch: expected {expected}, got {got}; nothing was stored"))
}

/// A reqwest failure as the status a client reads: the guard's refusal is
/// PERMISSION_DENIED, a timeout DEADLINE_EXCEEDED, the rest UNAVAILABLE.
/// The message holds neither a header nor the URL (which may carry a
/// token in its query): the response names the URI beside it.
fn origin_error(e: reqwest::Error) -> Error {
    let e = e.without_url();
    if let Some(refused) = guard::refused_in(&e) {
        return Error::new(Code::PermissionDenied, refused.0.clone());
    }
    let code = if e.is_timeout() { Code::DeadlineExceeded } else { Code::Unavailable };
    Error::new(code, remote_apis::client::error_chain(&e))
}

#[cfg(test)]
mod tests {
    #[test]
    fn urns_are_names() {
        for (uri, name) in [
            ("urn:fdc:buildstream.build:2020:artifact:p/e/0123", true),
            ("URN:isbn:0451450523", true),
            ("urn:", true),
            ("urn", false),
            ("urnx:y", false),
            ("https://example.com/urn:x", false),
            ("git://example.com/x", false),
            ("", false),
        ] {
            assert_eq!(super::is_name(uri), name, "{uri}");
        }
    }
}
