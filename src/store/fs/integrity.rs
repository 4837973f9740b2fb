//! Integrity on read for the filesystem store.
//!
//! A stored file is read-only from the moment it is installed, and the
//! index remembers what it looked like then ([`Stamp`]: inode, size, ctime).
//! Anything else that writes to it, replaces it or makes it writable again
//! changes at least the ctime, which the kernel sets and no unprivileged
//! process can set back. So every read `fstat`s the opened file and hashes
//! the whole file before serving it when the stamp differs; small blobs,
//! where hashing costs little beside the read itself, are hashed on every
//! read. A file that fails is removed and reported missing, so clients
//! upload it again; nothing that does not match its digest is ever served.
//! The store's own changes to a file (the hourly mtime refresh, which moves
//! the ctime) update the stamp.

use std::fs::{File, Metadata};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use bytes::Bytes;
use remote_apis::Digest;

/// What a blob file looked like when the store last wrote or touched it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    ino: u64,
    dev: u64,
    size: u64,
    ctime: i64,
    ctime_nsec: i64,
}

impl Stamp {
    pub(crate) fn of(meta: &Metadata) -> Self {
        Stamp { ino: meta.ino(), dev: meta.dev(), size: meta.len(), ctime: meta.ctime(), ctime_nsec: meta.ctime_nsec() }
    }
}

/// Whether anyone may write to the file through its mode.
pub(crate) fn is_writable(meta: &Metadata) -> bool {
    meta.permissions().mode() & 0o222 != 0
}

/// Makes a stored file read-only (for everyone: stored blobs are shared).
pub(crate) fn make_read_only(path: &Path) -> std::io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444))
}

/// Whether the whole of `file` hashes to `digest` (size included). Reads
/// from the start; leaves the position at the end.
pub(crate) fn hashes_to(file: &mut File, digest: &Digest) -> std::io::Result<bool> {
    file.seek(SeekFrom::Start(0))?;
    // One byte past the size is enough to tell a longer file: the digest
    // then differs in size.
    Ok(remote_apis::merkle::hash_reader(digest.function, file.by_ref().take(digest.size + 1))? == *digest)
}

/// Reads a whole small file and checks it against `digest`: `None` when the
/// bytes are not the blob's.
pub(crate) fn read_verified(file: &mut File, digest: &Digest) -> std::io::Result<Option<Bytes>> {
    let mut data = Vec::with_capacity(digest.size as usize);
    file.seek(SeekFrom::Start(0))?;
    file.by_ref().take(digest.size + 1).read_to_end(&mut data)?;
    if data.len() as u64 != digest.size || digest.function.digest_of(&data) != *digest {
        return Ok(None);
    }
    Ok(Some(Bytes::from(data)))
}

/// How stale a blob's modification time may get before a read refreshes it.
const TOUCH_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// A blob opened for reading, after the integrity check.
pub(crate) enum Opened {
    /// Positioned at the requested offset; streamed in chunks.
    File(File),
    /// A small blob, read and hashed whole.
    Bytes(Bytes),
    /// Absent, or dropped because its bytes no longer match.
    Missing,
}

impl super::Shared {
    /// Opens a blob for reading at `offset`, checked against `stamp` (what
    /// the index recorded): a file that changed is hashed before it is
    /// served, a small one always is. A read also refreshes the file's
    /// modification time (at most hourly, to spare the journal), which is
    /// the order a restarted store rebuilds its eviction queue from.
    /// Blocking.
    pub(super) fn open_checked(
        &self,
        path: &Path,
        digest: &Digest,
        stamp: Stamp,
        offset: u64,
    ) -> std::io::Result<Opened> {
        let mut file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Removed behind our back: the index was wrong, not the client.
                self.forget(digest);
                return Ok(Opened::Missing);
            }
            Err(e) => return Err(e),
        };
        let meta = file.metadata()?;
        let data = if digest.size < self.verify_below {
            match read_verified(&mut file, digest)? {
                Some(data) => Some(data),
                None => return Ok(self.drop_corrupt(path, digest)),
            }
        } else {
            None
        };
        let mut current = Stamp::of(&meta);
        if current != stamp {
            if data.is_none() && !hashes_to(&mut file, digest)? {
                return Ok(self.drop_corrupt(path, digest));
            }
            // Intact, but not as the store left it: protect and re-record.
            if is_writable(&meta) {
                match make_read_only(path) {
                    Ok(()) => current = Stamp::of(&file.metadata()?),
                    Err(e) => tracing::warn!(path = %path.display(), error = %e, "could not make a blob read-only"),
                }
            }
            self.restamp(digest, current);
        }
        if let Some(refreshed) = refresh_mtime(&file, &meta, current, path) {
            self.restamp(digest, refreshed);
        }
        match data {
            Some(data) => Ok(Opened::Bytes(data)),
            None => {
                file.seek(SeekFrom::Start(offset))?;
                Ok(Opened::File(file))
            }
        }
    }

    /// Removes a blob whose file no longer matches its digest; it is
    /// reported missing from now on, so clients upload it again. Done under
    /// the index lock, so a fresh upload of the same blob is not removed.
    pub(super) fn drop_corrupt(&self, path: &Path, digest: &Digest) -> Opened {
        tracing::warn!(%digest, path = %path.display(), "removing a stored blob that no longer matches its digest");
        let mut index = self.index.lock();
        if index.blobs.pop(digest).is_some() {
            index.used -= digest.size;
            if let Err(e) = std::fs::remove_file(path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), error = %e, "could not remove a corrupt blob");
            }
        }
        Opened::Missing
    }
}

/// Moves the modification time to now when it is over an hour old, and
/// returns the file's new stamp (the change moves its ctime). Refreshes only
/// a file that still is what was just checked.
fn refresh_mtime(file: &File, meta: &Metadata, checked: Stamp, path: &Path) -> Option<Stamp> {
    let now = std::time::SystemTime::now();
    let modified = meta.modified().ok()?;
    if !now.duration_since(modified).is_ok_and(|age| age > TOUCH_AFTER) {
        return None;
    }
    if file.metadata().ok().map(|m| Stamp::of(&m)) != Some(checked) {
        return None;
    }
    if let Err(e) = file.set_modified(now) {
        tracing::debug!(path = %path.display(), error = %e, "could not refresh a blob's modification time");
        return None;
    }
    file.metadata().ok().map(|m| Stamp::of(&m))
}
