//! Whole-store checks of the filesystem store: the cheap one at startup and
//! the full scrub an operator asks for (`cargo-distbuild cas verify`).

use std::fs::{File, Metadata};
use std::path::Path;

use async_trait::async_trait;
use remote_apis::Digest;

use super::integrity::{Stamp, hashes_to, is_writable, make_read_only};
use super::{FsStore, Shared};
use crate::error::{Error, Result};
use crate::store::{Scrub, ScrubReport};

/// The startup check of one file whose size is right: a file that is still
/// read-only is taken as it is (hashing a whole store at every start would
/// cost minutes); one that became writable may have been written, so it is
/// hashed, and removed when it no longer matches. Returns the stamp to
/// index, `None` for a file that is not indexed.
pub(super) fn startup_check(path: &Path, digest: &Digest, meta: &Metadata) -> Option<Stamp> {
    if !is_writable(meta) {
        return Some(Stamp::of(meta));
    }
    let checked = File::open(path).and_then(|mut f| Ok((hashes_to(&mut f, digest)?, f)));
    match checked {
        Ok((true, file)) => {
            if let Err(e) = make_read_only(path) {
                tracing::warn!(path = %path.display(), error = %e, "could not make a blob read-only");
            }
            file.metadata().ok().map(|m| Stamp::of(&m))
        }
        Ok((false, _)) => {
            tracing::warn!(%digest, path = %path.display(), "removing a stored blob that no longer matches its digest");
            let _ = std::fs::remove_file(path);
            None
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring a blob that cannot be read");
            None
        }
    }
}

impl Shared {
    /// Re-hashes every indexed blob; drops the ones that fail. Blocking.
    fn scrub(&self) -> ScrubReport {
        let digests: Vec<Digest> = self.index.lock().blobs.iter().map(|(d, _)| *d).collect();
        let mut report = ScrubReport::default();
        for digest in digests {
            let path = self.blob_path(&digest);
            let mut file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    // Evicted meanwhile, or removed behind the store's back.
                    self.forget(&digest);
                    report.vanished += 1;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "scrub: cannot open a blob");
                    report.unreadable += 1;
                    continue;
                }
            };
            match hashes_to(&mut file, &digest) {
                Ok(true) => {
                    report.intact += 1;
                    report.bytes += digest.size;
                    let Ok(meta) = file.metadata() else { continue };
                    if is_writable(&meta) && make_read_only(&path).is_err() {
                        continue;
                    }
                    if let Ok(meta) = file.metadata() {
                        self.restamp(&digest, Stamp::of(&meta));
                    }
                }
                Ok(false) => {
                    self.drop_corrupt(&path, &digest);
                    report.corrupt += 1;
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "scrub: cannot read a blob");
                    report.unreadable += 1;
                }
            }
        }
        report
    }
}

#[async_trait]
impl Scrub for FsStore {
    async fn scrub(&self) -> Result<ScrubReport> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.scrub())
            .await
            .map_err(|e| Error::internal(format!("scrubbing the store: {e}")))
    }
}
