//! The Remote Asset API (`build.bazel.remote.asset.v1`): Fetch and Push as
//! thin adapters over [`Records`] (what URIs name, in the ActionCache store)
//! and the [`Downloader`].
//!
//! FetchBlob answers, in this order: from the SRI index when the request
//! has a `checksum.sri` (whatever the URI), from a record of one of its
//! URIs (with exactly its qualifiers), else by downloading the URIs in
//! order when the instance may download and the caller holds
//! `asset-fetch`. FetchDirectory answers from records only (nothing is
//! unpacked). Following the spec, failures at the origin travel in the
//! response's `status` (NOT_FOUND, PERMISSION_DENIED, DEADLINE_EXCEEDED,
//! ABORTED for a checksum mismatch, RESOURCE_EXHAUSTED over `max_size`)
//! while bad requests, grants and the server's own failures are the call's
//! gRPC status.

pub mod download;
pub mod guard;
pub mod qualifiers;
pub mod records;
pub mod sri;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use remote_apis::asset::fetch_server::Fetch;
use remote_apis::asset::push_server::Push;
use remote_apis::asset::{
    FetchBlobRequest, FetchBlobResponse, FetchDirectoryRequest, FetchDirectoryResponse, PushBlobRequest,
    PushBlobResponse, PushDirectoryRequest, PushDirectoryResponse,
};
use remote_apis::protobuf::Timestamp;
use remote_apis::{Digest, DigestFunction, InstanceName, quote, rpc};
use tonic::{Code, Request, Response, Status};

pub use download::Downloader;
pub use records::Records;

use crate::auth::{Auth, Grant};
use crate::cas::parse_header;
use crate::error::{Error, Result};
use qualifiers::Qualifiers;
use records::{Kind, Record, now_secs, record_key};
use sri::Sri;

/// Whether an instance may download: `[asset] fetch`, or the instance's
/// own `asset_fetch` (the server's factory decides; the service only asks).
pub type MayFetch = Arc<dyn Fn(&InstanceName) -> bool + Send + Sync>;

pub struct AssetService {
    records: Records,
    downloader: Arc<Downloader>,
    may_fetch: MayFetch,
    auth: Arc<Auth>,
}

/// What a Fetch found: the URI that gave it, the digest, the expiry.
struct Hit {
    uri: String,
    digest: Digest,
    expire_at: Option<i64>,
}

impl AssetService {
    /// A service that allows every call; the server adds its policy with
    /// [`AssetService::with_auth`].
    pub fn new(records: Records, downloader: Arc<Downloader>, may_fetch: MayFetch) -> Self {
        AssetService { records, downloader, may_fetch, auth: Auth::open() }
    }

    pub fn with_auth(self, auth: Arc<Auth>) -> Self {
        AssetService { auth, ..self }
    }

    /// The first complete, current record of `uris` under `qualifiers`.
    async fn recorded(
        &self,
        instance: &InstanceName,
        kind: Kind,
        uris: &[String],
        qualifiers: &Qualifiers,
        oldest: Option<i64>,
    ) -> Result<Option<Hit>> {
        for uri in uris {
            let key = record_key(instance, kind, uri, &qualifiers.all);
            if let Some(found) = self.records.get(&key, kind, oldest).await? {
                return Ok(Some(Hit { uri: uri.clone(), digest: found.digest, expire_at: found.expire_at }));
            }
        }
        Ok(None)
    }

    /// Downloads the URIs in order; the first success is recorded under
    /// every URI and indexed by its content hashes.
    async fn download(
        &self,
        instance: &InstanceName,
        function: DigestFunction,
        req: &FetchBlobRequest,
        qualifiers: &Qualifiers,
    ) -> Result<std::result::Result<Hit, (String, Error)>> {
        let requested = req.timeout.as_ref().map(|d| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32));
        let deadline = self.downloader.deadline(requested);
        let started = now_secs();
        let cas = self.records.cas();
        let mut last = None;
        for (index, uri) in req.uris.iter().enumerate() {
            let wanted = download::Wanted {
                function,
                sri: qualifiers.sri.as_ref(),
                headers: qualifiers.headers_for(index, uri),
            };
            match self.downloader.fetch(cas, uri, &wanted, deadline).await? {
                Ok(done) => {
                    let record = Record {
                        digest_function: function.to_proto() as i32,
                        digest: Some(done.digest.to_proto()),
                        expire_at: 0,
                        created_at: started,
                        references_blobs: Vec::new(),
                        references_directories: Vec::new(),
                    };
                    for u in &req.uris {
                        self.records.put(&record_key(instance, Kind::Blob, u, &qualifiers.all), &record).await?;
                    }
                    for sri in &done.hashes {
                        self.records.index_sri(sri, &done.digest).await?;
                    }
                    tracing::info!(digest = %done.digest, mirror = index, "asset downloaded");
                    return Ok(Ok(Hit { uri: uri.clone(), digest: done.digest, expire_at: None }));
                }
                Err(e) => {
                    tracing::info!(mirror = index, code = ?e.code, error = %e.message, "asset download failed");
                    last = Some((uri.clone(), e));
                }
            }
        }
        Ok(Err(last.expect("at least one URI")))
    }

    /// Checks that `sri` is the content hash of `digest`: by the digest
    /// itself for SHA-256, else by reading the blob. A push's SRI enters
    /// the index only verified, so no client can make another URI's Fetch
    /// return other bytes.
    async fn verify_sri(&self, sri: &Sri, digest: &Digest) -> Result<()> {
        let got = match records::sha256_sri(digest) {
            Some(own) if own.algorithm == sri.algorithm => own,
            _ => {
                let mut hasher = sri.algorithm.hasher();
                let mut stream = self.records.cas().get(digest, 0, None).await?;
                while let Some(chunk) = stream.next().await {
                    hasher.update(&chunk?);
                }
                hasher.finish()
            }
        };
        if got != *sri {
            return Err(Error::bad_field(
                "qualifiers[\"checksum.sri\"]",
                format!("the blob {digest} hashes to {got}, not to {sri}"),
            ));
        }
        Ok(())
    }

    /// PushBlob and PushDirectory: check presence, write the records.
    #[allow(clippy::too_many_arguments)]
    async fn push(
        &self,
        instance: &InstanceName,
        function: DigestFunction,
        kind: Kind,
        uris: &[String],
        qualifiers: &Qualifiers,
        digest: Digest,
        refs: (Vec<Digest>, Vec<Digest>),
        expire_at: Option<&Timestamp>,
    ) -> Result<()> {
        check_uris(uris)?;
        let (mut blobs, mut directories) = refs;
        match kind {
            Kind::Blob => blobs.insert(0, digest),
            Kind::Directory => directories.insert(0, digest),
        }
        let missing = self.records.missing(&blobs, &directories).await?;
        if !missing.is_empty() {
            return Err(Error::missing_blobs(missing, "the pushed content is not in the CAS"));
        }
        if kind == Kind::Blob {
            if let Some(sri) = &qualifiers.sri {
                self.verify_sri(sri, &digest).await?;
                self.records.index_sri(sri, &digest).await?;
            }
            if let Some(own) = records::sha256_sri(&digest) {
                self.records.index_sri(&own, &digest).await?;
            }
        }
        let record = Record {
            digest_function: function.to_proto() as i32,
            digest: Some(digest.to_proto()),
            expire_at: expire_at.map(|t| t.seconds.max(1)).unwrap_or(0),
            created_at: now_secs(),
            references_blobs: blobs.iter().filter(|d| **d != digest).map(Digest::to_proto).collect(),
            references_directories: directories.iter().filter(|d| **d != digest).map(Digest::to_proto).collect(),
        };
        for uri in uris {
            self.records.put(&record_key(instance, kind, uri, &qualifiers.all), &record).await?;
        }
        Ok(())
    }
}

/// URIs in one request: a download's mirrors are a handful, and each URI of
/// a push is a record, so one request cannot write (or, in the memory
/// ActionCache store, evict) more than this many entries.
pub const MAX_URIS: usize = 100;

/// The longest URI accepted (a record key and the response echo it).
pub const MAX_URI_BYTES: usize = 8 << 10;

fn check_uris(uris: &[String]) -> Result<()> {
    if uris.is_empty() {
        return Err(Error::bad_field("uris", "at least one URI is required"));
    }
    if uris.len() > MAX_URIS {
        return Err(Error::bad_field("uris", format!("{} URIs; at most {MAX_URIS} per request", uris.len())));
    }
    if let Some(i) = uris.iter().position(|u| u.is_empty()) {
        return Err(Error::bad_field(&format!("uris[{i}]"), "is empty"));
    }
    if let Some(i) = uris.iter().position(|u| u.len() > MAX_URI_BYTES) {
        return Err(Error::bad_field(&format!("uris[{i}]"), format!("longer than {MAX_URI_BYTES} bytes")));
    }
    Ok(())
}

fn parse_refs(function: DigestFunction, list: &[remote_apis::reapi::Digest], field: &str) -> Result<Vec<Digest>> {
    list.iter()
        .enumerate()
        .map(|(i, d)| Digest::from_proto(function, d).map_err(|e| Error::bad_field(&format!("{field}[{i}]"), e.0)))
        .collect()
}

fn ok_status() -> Option<rpc::Status> {
    Some(rpc::Status { code: Code::Ok as i32, message: String::new(), details: Vec::new() })
}

fn timestamp(secs: Option<i64>) -> Option<Timestamp> {
    secs.map(|seconds| Timestamp { seconds, nanos: 0 })
}

fn blob_response(function: DigestFunction, hit: Hit) -> FetchBlobResponse {
    FetchBlobResponse {
        status: ok_status(),
        uri: hit.uri,
        qualifiers: Vec::new(),
        expires_at: timestamp(hit.expire_at),
        blob_digest: Some(hit.digest.to_proto()),
        digest_function: function.to_proto() as i32,
    }
}

fn blob_failure(function: DigestFunction, uri: String, e: &Error) -> FetchBlobResponse {
    FetchBlobResponse {
        status: Some(e.to_rpc_status()),
        uri,
        qualifiers: Vec::new(),
        expires_at: None,
        blob_digest: None,
        digest_function: function.to_proto() as i32,
    }
}

#[tonic::async_trait]
impl Fetch for AssetService {
    async fn fetch_blob(&self, request: Request<FetchBlobRequest>) -> Result<Response<FetchBlobResponse>, Status> {
        let (instance, function) = parse_header(&request.get_ref().instance_name, request.get_ref().digest_function)?;
        let ctx = self.auth.context(&request, &instance, function, Grant::AssetRead)?;
        let function = ctx.function();
        let req = request.into_inner();
        check_uris(&req.uris)?;
        let qualifiers = Qualifiers::parse(&req.qualifiers)?;
        if let Some(sri) = &qualifiers.sri
            && let Some(digest) = self.records.by_sri(sri, function).await?
        {
            let hit = Hit { uri: req.uris[0].clone(), digest, expire_at: None };
            return Ok(Response::new(blob_response(function, hit)));
        }
        let oldest = req.oldest_content_accepted.as_ref().map(|t| t.seconds);
        if let Some(hit) = self.recorded(&instance, Kind::Blob, &req.uris, &qualifiers, oldest).await? {
            return Ok(Response::new(blob_response(function, hit)));
        }
        if !(self.may_fetch)(&instance) {
            let e = Error::not_found(format!(
                "no record of {} and downloads are off for instance {}",
                quote(&req.uris[0]),
                quote(instance.as_str())
            ));
            return Ok(Response::new(blob_failure(function, req.uris[0].clone(), &e)));
        }
        if req.uris.iter().all(|u| download::is_name(u)) {
            let e = Error::not_found(format!(
                "no record of {} (a URN names content, it is not downloaded)",
                quote(&req.uris[0])
            ));
            return Ok(Response::new(blob_failure(function, req.uris[0].clone(), &e)));
        }
        ctx.require(Grant::AssetFetch)?;
        qualifiers.refuse_unknown()?;
        match self.download(&instance, function, &req, &qualifiers).await? {
            Ok(hit) => Ok(Response::new(blob_response(function, hit))),
            Err((uri, e)) => Ok(Response::new(blob_failure(function, uri, &e))),
        }
    }

    async fn fetch_directory(
        &self,
        request: Request<FetchDirectoryRequest>,
    ) -> Result<Response<FetchDirectoryResponse>, Status> {
        let (instance, function) = parse_header(&request.get_ref().instance_name, request.get_ref().digest_function)?;
        let function = self.auth.context(&request, &instance, function, Grant::AssetRead)?.function();
        let req = request.into_inner();
        check_uris(&req.uris)?;
        let qualifiers = Qualifiers::parse(&req.qualifiers)?;
        let oldest = req.oldest_content_accepted.as_ref().map(|t| t.seconds);
        let hit = self.recorded(&instance, Kind::Directory, &req.uris, &qualifiers, oldest).await?;
        let mut response = FetchDirectoryResponse {
            status: ok_status(),
            uri: req.uris[0].clone(),
            qualifiers: Vec::new(),
            expires_at: None,
            root_directory_digest: None,
            digest_function: function.to_proto() as i32,
        };
        match hit {
            Some(hit) => {
                response.uri = hit.uri;
                response.expires_at = timestamp(hit.expire_at);
                response.root_directory_digest = Some(hit.digest.to_proto());
            }
            None => {
                let e = Error::not_found(format!(
                    "no directory is recorded for {} (directories are answered from PushDirectory records only)",
                    quote(&req.uris[0])
                ));
                response.status = Some(e.to_rpc_status());
            }
        }
        Ok(Response::new(response))
    }
}

#[tonic::async_trait]
impl Push for AssetService {
    async fn push_blob(&self, request: Request<PushBlobRequest>) -> Result<Response<PushBlobResponse>, Status> {
        let (instance, function) = parse_header(&request.get_ref().instance_name, request.get_ref().digest_function)?;
        let function = self.auth.context(&request, &instance, function, Grant::AssetPush)?.function();
        let req = request.into_inner();
        let qualifiers = Qualifiers::parse(&req.qualifiers)?;
        let digest = Digest::from_field(function, req.blob_digest.as_ref(), "blob_digest")
            .map_err(|e| Error::bad_field("blob_digest", e.0))?;
        let refs = (
            parse_refs(function, &req.references_blobs, "references_blobs")?,
            parse_refs(function, &req.references_directories, "references_directories")?,
        );
        self.push(&instance, function, Kind::Blob, &req.uris, &qualifiers, digest, refs, req.expire_at.as_ref())
            .await?;
        Ok(Response::new(PushBlobResponse {}))
    }

    async fn push_directory(
        &self,
        request: Request<PushDirectoryRequest>,
    ) -> Result<Response<PushDirectoryResponse>, Status> {
        let (instance, function) = parse_header(&request.get_ref().instance_name, request.get_ref().digest_function)?;
        let function = self.auth.context(&request, &instance, function, Grant::AssetPush)?.function();
        let req = request.into_inner();
        let qualifiers = Qualifiers::parse(&req.qualifiers)?;
        let digest = Digest::from_field(function, req.root_directory_digest.as_ref(), "root_directory_digest")
            .map_err(|e| Error::bad_field("root_directory_digest", e.0))?;
        let refs = (
            parse_refs(function, &req.references_blobs, "references_blobs")?,
            parse_refs(function, &req.references_directories, "references_directories")?,
        );
        let kind = Kind::Directory;
        self.push(&instance, function, kind, &req.uris, &qualifiers, digest, refs, req.expire_at.as_ref()).await?;
        Ok(Response::new(PushDirectoryResponse {}))
    }
}
