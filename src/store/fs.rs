//! The filesystem store, the embedded default.
//!
//! Layout under the root:
//!
//! ```text
//! cas/{function}/{hash[0..2]}/{hash}-{size}   committed blobs
//! cas/{function}/{hash[0..2]}/.tmp-{uuid}     writes in progress
//! ```
//!
//! A write goes to a fresh temporary file and is renamed into place on
//! commit, so a crash, a failed verification or two concurrent uploads of the
//! same blob never leave a torn or wrong file under `cas/`. The index of what
//! is stored (and the least-recently-used order that eviction follows) lives
//! in memory and is rebuilt from the directory at startup, oldest
//! modification time first (reads refresh a blob's modification time, at
//! most hourly, so recently read blobs outlive a restart too). A file whose
//! length disagrees with the size in its name (a write torn by power loss
//! without `fsync`) is dropped then.
//!
//! Stored files are read-only and checked on read (see `integrity.rs`): a
//! file changed behind the store's back is hashed before it is served, and
//! dropped (reported missing) when it no longer matches its digest. The
//! startup check is cheap: sizes, and a hash only of files that became
//! writable. `cargo-distbuild cas verify` re-hashes everything.
//!
//! Eviction spares blobs used within the minimum retention (see
//! `retention.rs`), except at startup: promises made before a restart with a
//! smaller budget cannot all be kept, and the budget wins then.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use lru::LruCache;
use parking_lot::Mutex;
use remote_apis::{Digest, DigestFunction};

mod integrity;
mod scrub;
mod stream;

use integrity::Stamp;

use super::memory::check_fits;
use super::retention::Retention;
use super::{BlobInfo, BlobSink, BlobStore, BlobStream, Usage, range, stream_bytes};
use crate::error::{Error, Result};

#[derive(Clone)]
pub struct FsStore {
    shared: Arc<Shared>,
}

pub(super) struct Shared {
    root: PathBuf,
    max_bytes: u64,
    pub(super) fsync: bool,
    /// Blobs smaller than this are hashed on every read.
    verify_below: u64,
    index: Mutex<Index>,
}

struct Index {
    blobs: LruCache<Digest, Entry>,
    used: u64,
    /// Blobs evicted since the store opened, for metrics.
    evicted: u64,
    /// Blobs used more recently than this are not evicted.
    retention: Retention,
}

impl Index {
    /// Whether evicting unprotected blobs can make room for `digest`.
    fn check_room(&self, max_bytes: u64, digest: &Digest) -> Result<()> {
        self.retention.check_room(&self.blobs, |e| e.last_access, self.used, max_bytes, digest)
    }
}

#[derive(Clone, Copy)]
struct Entry {
    last_access: SystemTime,
    /// The file as the store last left it.
    stamp: Stamp,
}

impl FsStore {
    /// Opens (creating if needed) a store under `root`, removes unfinished
    /// writes left by a previous run and indexes what is there. Blobs under
    /// `verify_below` bytes are hashed on every read. Blocking: call before
    /// serving.
    pub fn open(root: &Path, max_bytes: u64, fsync: bool, verify_below: u64) -> Result<Self> {
        let tmp = root.join("tmp");
        if tmp.exists() {
            crate::fsutil::remove_tree(&tmp).map_err(|e| Error::io(format!("clearing {}", tmp.display()), e))?;
        }
        // Every prefix directory exists up front, so installing a blob is
        // one rename with no directory checks.
        let mut dirs = vec![tmp];
        for function in DigestFunction::ALL {
            dirs.extend((0..=255u8).map(|b| root.join("cas").join(function.name()).join(hex::encode([b]))));
        }
        for dir in dirs {
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        let mut found = scan(&root.join("cas"))?;
        found.sort_by_key(|(_, entry)| entry.last_access);
        let mut index = Index { blobs: LruCache::unbounded(), used: 0, evicted: 0, retention: Retention::default() };
        for (digest, entry) in found {
            index.used += digest.size;
            index.blobs.put(digest, entry);
        }
        let shared = Shared { root: root.to_path_buf(), max_bytes, fsync, verify_below, index: Mutex::new(index) };
        {
            let mut index = shared.index.lock();
            shared.evict_until_fits(&mut index, 0);
        }
        Ok(FsStore { shared: Arc::new(shared) })
    }

    /// Blobs reported present, written or read within `min` are not
    /// evicted (none by default); a write that finds no other room fails
    /// with RESOURCE_EXHAUSTED.
    pub fn with_min_retention(self, min: std::time::Duration) -> Self {
        self.shared.index.lock().retention = Retention(min);
        self
    }

    /// Moves every blob's last use `by` into the past, as if that time had
    /// passed (tests of the retention).
    #[cfg(test)]
    pub(super) fn age_all(&self, by: std::time::Duration) {
        for (_, entry) in self.shared.index.lock().blobs.iter_mut() {
            entry.last_access -= by;
        }
    }
}

/// Walks `cas/{function}/{xx}/` and returns every well-formed blob.
fn scan(cas: &Path) -> Result<Vec<(Digest, Entry)>> {
    let mut found = Vec::new();
    let read_dir = |p: &Path| std::fs::read_dir(p).map_err(|e| Error::io(format!("reading {}", p.display()), e));
    for function in DigestFunction::ALL {
        let dir = cas.join(function.name());
        if !dir.exists() {
            continue;
        }
        for prefix in read_dir(&dir)? {
            let prefix = prefix.map_err(|e| Error::io("scanning the store", e))?;
            for entry in read_dir(&prefix.path())? {
                let entry = entry.map_err(|e| Error::io("scanning the store", e))?;
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(TMP_PREFIX) {
                    // An unfinished write from before a crash.
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
                let Some(digest) = parse_file_name(function, &name) else {
                    tracing::warn!(path = %path.display(), "ignoring a file that is not a blob");
                    continue;
                };
                let meta = entry.metadata().map_err(|e| Error::io(format!("{}", path.display()), e))?;
                if meta.len() != digest.size {
                    tracing::warn!(path = %path.display(), "removing a blob whose length disagrees with its name");
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
                let Some(stamp) = scrub::startup_check(&path, &digest, &meta) else { continue };
                let last_access = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                found.push((digest, Entry { last_access, stamp }));
            }
        }
    }
    Ok(found)
}

fn parse_file_name(function: DigestFunction, name: &str) -> Option<Digest> {
    let (hash, size) = name.split_once('-')?;
    Digest::new(function, hash, size.parse().ok()?).ok()
}

impl Shared {
    fn blob_path(&self, d: &Digest) -> PathBuf {
        let hash = d.hash_hex();
        self.root.join("cas").join(d.function.name()).join(&hash[..2]).join(format!("{hash}-{}", d.size))
    }

    /// A temporary file beside the blob's final place: the rename that
    /// commits it stays inside one directory, and concurrent writes spread
    /// over the prefix directories instead of contending for one.
    fn tmp_path(&self, d: &Digest) -> PathBuf {
        let hash = d.hash_hex();
        self.root
            .join("cas")
            .join(d.function.name())
            .join(&hash[..2])
            .join(format!("{TMP_PREFIX}{}", uuid::Uuid::new_v4()))
    }

    /// Evicts least-recently-used blobs until `incoming` more bytes fit,
    /// whatever their retention: callers check [`Index::check_room`] first
    /// (startup alone does not). Runs under the index lock, so a concurrent
    /// commit of an evicted digest cannot have its fresh file deleted.
    fn evict_until_fits(&self, index: &mut Index, incoming: u64) {
        while index.used + incoming > self.max_bytes {
            let Some((digest, _)) = index.blobs.pop_lru() else { break };
            index.used -= digest.size;
            index.evicted += 1;
            let path = self.blob_path(&digest);
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), error = %e, "evicting a blob");
            }
            tracing::debug!(%digest, "evicted");
        }
    }

    /// Moves a complete, verified temporary file into place, read-only, and
    /// records what it looks like. Blocking.
    pub(super) fn install(&self, tmp: &Path, digest: &Digest) -> Result<()> {
        let dest = self.blob_path(digest);
        integrity::make_read_only(tmp).map_err(|e| Error::io(format!("protecting {}", tmp.display()), e))?;
        let mut index = self.index.lock();
        if index.blobs.get(digest).is_some() {
            drop(index);
            let _ = std::fs::remove_file(tmp);
            return Ok(());
        }
        // Full of protected blobs: refused, nothing evicted (the caller's
        // temporary file goes with the error).
        index.check_room(self.max_bytes, digest)?;
        self.evict_until_fits(&mut index, digest.size);
        std::fs::rename(tmp, &dest).map_err(|e| Error::io(format!("renaming into {}", dest.display()), e))?;
        // Stamped after the rename, which may itself move the ctime.
        let meta = std::fs::metadata(&dest).map_err(|e| Error::io(format!("{}", dest.display()), e))?;
        index.used += digest.size;
        index.blobs.put(*digest, Entry { last_access: SystemTime::now(), stamp: Stamp::of(&meta) });
        Ok(())
    }

    /// Marks a blob used and returns its stamp; `None` if it is not indexed.
    fn touch(&self, digest: &Digest) -> Option<Stamp> {
        let mut index = self.index.lock();
        let entry = index.blobs.get_mut(digest)?;
        entry.last_access = SystemTime::now();
        Some(entry.stamp)
    }

    /// Records a new look of a blob's file, after the store itself changed
    /// it or after its bytes were found intact.
    fn restamp(&self, digest: &Digest, stamp: Stamp) {
        if let Some(entry) = self.index.lock().blobs.peek_mut(digest) {
            entry.stamp = stamp;
        }
    }

    fn forget(&self, digest: &Digest) {
        let mut index = self.index.lock();
        if index.blobs.pop(digest).is_some() {
            index.used -= digest.size;
        }
    }
}

#[async_trait]
impl BlobStore for FsStore {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let now = SystemTime::now();
        let mut missing = Vec::new();
        // The lock is taken per slice, so a call with a million digests
        // does not stall every other request for its whole duration.
        for slice in digests.chunks(super::LOOKUPS_PER_LOCK) {
            let mut index = self.shared.index.lock();
            missing.extend(slice.iter().filter(|d| match index.blobs.get_mut(*d) {
                Some(entry) => {
                    entry.last_access = now;
                    false
                }
                None => true,
            }));
        }
        Ok(missing)
    }

    async fn get(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> Result<BlobStream> {
        let Some(stamp) = self.shared.touch(digest) else {
            return Err(Error::blob_not_found(digest));
        };
        let (start, end) = range(digest, offset, limit)?;
        let path = self.shared.blob_path(digest);
        let opened = {
            let (shared, path, digest) = (self.shared.clone(), path.clone(), *digest);
            tokio::task::spawn_blocking(move || shared.open_checked(&path, &digest, stamp, start)).await
        };
        match opened.map_err(|e| Error::internal(format!("opening a blob: {e}")))? {
            Ok(integrity::Opened::File(file)) => Ok(stream::read(file, path, end - start)),
            Ok(integrity::Opened::Bytes(data)) => stream_bytes(data, offset, limit, digest),
            Ok(integrity::Opened::Missing) => Err(Error::blob_not_found(digest)),
            Err(e) => Err(Error::io(format!("opening {}", path.display()), e)),
        }
    }

    async fn put(&self, digest: &Digest) -> Result<Box<dyn BlobSink>> {
        check_fits(digest, self.shared.max_bytes)?;
        // Refused before the bytes travel when there is no room now (the
        // commit checks again: room may have gone meanwhile).
        self.shared.index.lock().check_room(self.shared.max_bytes, digest)?;
        let tmp = TempPath(Some(self.shared.tmp_path(digest)));
        let file = {
            let path = tmp.path().to_path_buf();
            tokio::task::spawn_blocking(move || std::fs::File::create(&path))
                .await
                .map_err(|e| Error::internal(format!("creating a blob file: {e}")))?
                .map_err(|e| create_error(tmp.path(), e))?
        };
        Ok(Box::new(stream::FsSink::new(file, tmp, self.shared.clone(), *digest)))
    }

    async fn put_bytes(&self, digest: &Digest, data: Bytes) -> Result<()> {
        check_fits(digest, self.shared.max_bytes)?;
        if self.shared.touch(digest).is_some() {
            return Ok(());
        }
        self.shared.index.lock().check_room(self.shared.max_bytes, digest)?;
        let shared = self.shared.clone();
        let digest = *digest;
        tokio::task::spawn_blocking(move || {
            let tmp = TempPath(Some(shared.tmp_path(&digest)));
            let path = tmp.path();
            let mut file = std::fs::File::create(path).map_err(|e| create_error(path, e))?;
            file.write_all(&data).map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
            if shared.fsync {
                file.sync_data().map_err(|e| Error::io(format!("syncing {}", path.display()), e))?;
            }
            drop(file);
            shared.install(path, &digest)?;
            tmp.disarm();
            Ok(())
        })
        .await
        .map_err(|e| Error::internal(format!("writing a blob: {e}")))?
    }

    async fn list(&self, limit: usize) -> Result<Vec<BlobInfo>> {
        let index = self.shared.index.lock();
        Ok(index.blobs.iter().take(limit).map(|(d, e)| BlobInfo { digest: *d, last_access: e.last_access }).collect())
    }

    fn usage(&self) -> Usage {
        let index = self.shared.index.lock();
        let blobs = index.blobs.len() as u64;
        Usage { used_bytes: index.used, max_bytes: self.shared.max_bytes, blobs, evictions: index.evicted }
    }
}

/// An error creating a file. Running out of descriptors is the server
/// being busy, not broken: RESOURCE_EXHAUSTED, which clients retry.
fn create_error(path: &Path, e: std::io::Error) -> Error {
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    if matches!(e.raw_os_error(), Some(ENFILE | EMFILE)) {
        return Error::resource_exhausted(format!("too many open files to start a blob write; retry later ({e})"));
    }
    Error::io(format!("creating {}", path.display()), e)
}

/// A temporary file that is removed when dropped, unless disarmed.
pub(super) struct TempPath(Option<PathBuf>);

impl TempPath {
    pub(super) fn path(&self) -> &Path {
        self.0.as_deref().expect("armed")
    }

    pub(super) fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Names of writes in progress, beside committed blobs.
const TMP_PREFIX: &str = ".tmp-";
