//! Asset records: what a URI (with its qualifiers) names, kept in the
//! ActionCache store under keys of their own domain, and the SRI index that
//! finds a blob by a hash of its content alone.
//!
//! A record is returned only while it has not expired and everything it
//! names is in the CAS (a blob, or a directory's whole tree, and the
//! references the pusher listed), as ActionCache entries are; otherwise it
//! is removed and reads as absent.
//!
//! The SRI index: a `checksum.sri` names content by a hash, but a CAS digest
//! is hash *and* size, and the stores look blobs up by both. So whenever the
//! asset service sees a blob whose content hash it knows for certain (a
//! download it hashed, a pushed SHA-256 blob, a pushed blob whose SRI it
//! verified), it records `(algorithm, hash, digest function) -> digest`.
//! A blob that only ever entered the CAS through the CAS calls is not in the
//! index (the stores keep no hash-only lookup); once any Push or Fetch has
//! named it, every URI finds it by SRI. (bazel-remote keys its CAS by hash
//! alone and needs no index; Buildbarn's asset service keeps references per
//! URI and qualifiers, as the records here do.)

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use prost::Message;
use remote_apis::reapi::Directory;
use remote_apis::{Digest, DigestFunction, InstanceName};
use tonic::Code;

use super::sri::Sri;
use crate::ac::{AcKey, AcStore};
use crate::error::{Error, Result};
use crate::store::Store;

/// Most directories a tree named by a record may have: a completeness
/// check reads each one.
pub const MAX_TREE_DIRECTORIES: usize = 100_000;

/// A Directory larger than this is refused unread.
const MAX_DIRECTORY_BYTES: u64 = 64 << 20;

/// Whether a record names a blob or a directory tree (part of its key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Blob,
    Directory,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Blob => "blob",
            Kind::Directory => "directory",
        }
    }
}

/// One record as stored.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Record {
    #[prost(int32, tag = "1")]
    pub digest_function: i32,
    #[prost(message, optional, tag = "2")]
    pub digest: Option<remote_apis::reapi::Digest>,
    /// Seconds since the epoch; 0: never.
    #[prost(int64, tag = "3")]
    pub expire_at: i64,
    /// When it was pushed or its download started (seconds since the epoch).
    #[prost(int64, tag = "4")]
    pub created_at: i64,
    #[prost(message, repeated, tag = "5")]
    pub references_blobs: Vec<remote_apis::reapi::Digest>,
    #[prost(message, repeated, tag = "6")]
    pub references_directories: Vec<remote_apis::reapi::Digest>,
}

/// A record found and complete.
#[derive(Debug, Clone)]
pub struct Found {
    pub digest: Digest,
    pub expire_at: Option<i64>,
}

pub fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// The records and the SRI index over one AcStore and the CAS they name.
#[derive(Clone)]
pub struct Records {
    store: Arc<dyn AcStore>,
    cas: Store,
}

/// The key of the record for one URI: instance, kind, URI and every
/// qualifier (sorted by name; names and values length-prefixed by the key
/// function). Header values are in it too, hashed: a URI fetched with
/// credentials is not found without them.
pub fn record_key(
    instance: &InstanceName,
    kind: Kind,
    uri: &str,
    qualifiers: &std::collections::BTreeMap<String, String>,
) -> AcKey {
    let mut parts: Vec<&str> = vec![instance.as_str(), kind.name(), uri];
    for (name, value) in qualifiers {
        parts.push(name);
        parts.push(value);
    }
    AcKey::derived("distbuild.asset.record.v1", &parts)
}

fn sri_key(sri: &Sri, function: DigestFunction) -> AcKey {
    AcKey::derived("distbuild.asset.sri.v1", &[sri.algorithm.name(), &sri.hash_hex(), function.name()])
}

impl Records {
    pub fn new(store: Arc<dyn AcStore>, cas: Store) -> Self {
        Records { store, cas }
    }

    pub fn cas(&self) -> &Store {
        &self.cas
    }

    pub async fn put(&self, key: &AcKey, record: &Record) -> Result<()> {
        self.store.put(key, Bytes::from(record.encode_to_vec())).await
    }

    /// The record under `key` if it is current, complete and (with
    /// `oldest`) no older than that; an expired or incomplete one is
    /// removed.
    pub async fn get(&self, key: &AcKey, kind: Kind, oldest: Option<i64>) -> Result<Option<Found>> {
        let Some(data) = self.store.get(key).await? else { return Ok(None) };
        let Ok(record) = Record::decode(data.as_ref()) else {
            tracing::warn!("dropping an undecodable asset record");
            self.store.remove(key).await?;
            return Ok(None);
        };
        if record.expire_at != 0 && record.expire_at <= now_secs() {
            self.store.remove(key).await?;
            return Ok(None);
        }
        if oldest.is_some_and(|o| record.created_at < o) {
            return Ok(None);
        }
        let function = DigestFunction::from_proto(record.digest_function)?;
        let digest = Digest::from_field(function, record.digest.as_ref(), "digest")?;
        let (blobs, directories) = match kind {
            Kind::Blob => (vec![digest], Vec::new()),
            Kind::Directory => (Vec::new(), vec![digest]),
        };
        let blobs = blobs.into_iter().chain(parse_all(function, &record.references_blobs)?).collect::<Vec<_>>();
        let directories =
            directories.into_iter().chain(parse_all(function, &record.references_directories)?).collect::<Vec<_>>();
        match self.missing(&blobs, &directories).await {
            Ok(missing) if missing.is_empty() => {}
            Ok(_) => {
                tracing::debug!("asset record names absent blobs; removing it");
                self.store.remove(key).await?;
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
        Ok(Some(Found { digest, expire_at: (record.expire_at != 0).then_some(record.expire_at) }))
    }

    /// The blobs of `blobs` and of the trees under `directories` that are
    /// not in the CAS (a missing directory is listed, its subtree unread).
    pub async fn missing(&self, blobs: &[Digest], directories: &[Digest]) -> Result<Vec<Digest>> {
        let mut wanted: Vec<Digest> = blobs.to_vec();
        let mut missing = Vec::new();
        for root in directories {
            let (tree, absent) = self.tree_blobs(*root).await?;
            wanted.extend(tree);
            missing.extend(absent);
        }
        wanted.sort_by_key(|d| (d.hash, d.size));
        wanted.dedup();
        missing.extend(self.cas.find_missing(&wanted).await?);
        Ok(missing)
    }

    /// Every blob of the tree under `root` (directories and files) that
    /// could be read, and the directories that could not. Breadth-first,
    /// each directory read once, at most [`MAX_TREE_DIRECTORIES`].
    async fn tree_blobs(&self, root: Digest) -> Result<(Vec<Digest>, Vec<Digest>)> {
        let function = root.function;
        let mut queue = VecDeque::from([root]);
        let mut seen = HashSet::from([root]);
        let (mut blobs, mut absent) = (Vec::new(), Vec::new());
        while let Some(digest) = queue.pop_front() {
            if digest.size > MAX_DIRECTORY_BYTES {
                return Err(Error::invalid(format!("directory {digest} is larger than a Directory may be")));
            }
            let data = match self.cas.get_bytes(&digest).await {
                Ok(d) => d,
                Err(e) if e.code == Code::NotFound => {
                    absent.push(digest);
                    continue;
                }
                Err(e) => return Err(e),
            };
            blobs.push(digest);
            let dir = Directory::decode(data.as_ref())
                .map_err(|e| Error::invalid(format!("blob {digest} is not a Directory: {e}")))?;
            for f in &dir.files {
                blobs.push(Digest::from_field(function, f.digest.as_ref(), "file digest")?);
            }
            for d in &dir.directories {
                let child = Digest::from_field(function, d.digest.as_ref(), "directory digest")?;
                if seen.insert(child) {
                    if seen.len() > MAX_TREE_DIRECTORIES {
                        return Err(Error::resource_exhausted(format!(
                            "the tree under {root} has more than {MAX_TREE_DIRECTORIES} directories"
                        )));
                    }
                    queue.push_back(child);
                }
            }
        }
        Ok((blobs, absent))
    }

    /// The blob with content hash `sri` (as a digest of `function`), if the
    /// index knows it and it is still in the CAS.
    pub async fn by_sri(&self, sri: &Sri, function: DigestFunction) -> Result<Option<Digest>> {
        let key = sri_key(sri, function);
        let Some(data) = self.store.get(&key).await? else { return Ok(None) };
        let digest =
            remote_apis::reapi::Digest::decode(data.as_ref()).ok().and_then(|d| Digest::from_proto(function, &d).ok());
        let Some(digest) = digest else {
            self.store.remove(&key).await?;
            return Ok(None);
        };
        if !self.cas.find_missing(&[digest]).await?.is_empty() {
            self.store.remove(&key).await?;
            return Ok(None);
        }
        Ok(Some(digest))
    }

    /// Records that `digest`'s content hashes to `sri`. Callers know it
    /// (they hashed the bytes, or the digest is that hash).
    pub async fn index_sri(&self, sri: &Sri, digest: &Digest) -> Result<()> {
        self.store.put(&sri_key(sri, digest.function), Bytes::from(digest.to_proto().encode_to_vec())).await
    }
}

fn parse_all(function: DigestFunction, list: &[remote_apis::reapi::Digest]) -> Result<Vec<Digest>> {
    list.iter().map(|d| Ok(Digest::from_proto(function, d)?)).collect()
}

/// The SRI a SHA-256 digest already is.
pub fn sha256_sri(digest: &Digest) -> Option<Sri> {
    (digest.function == DigestFunction::Sha256)
        .then(|| Sri { algorithm: super::sri::SriAlgorithm::Sha256, hash: digest.hash.to_vec() })
}
