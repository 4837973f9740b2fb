//! Local caches that keep a warm build from redoing work: file digests by
//! (inode, size, mtime, ctime), and dep-info results by a location-free key.
//!
//! Both live under the wrapper's cache directory as one small file per entry,
//! written to a temporary name and renamed, so concurrent wrappers (cargo
//! runs several) never see a torn entry. A missing or unreadable entry is a
//! miss, never an error.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use remote_apis::{Digest, DigestFunction};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// A file's identity as the filesystem reports it; if it is unchanged, so is
/// the content.
fn stamp(meta: &std::fs::Metadata) -> String {
    format!(
        "{} {} {} {} {}",
        meta.ino(),
        meta.size(),
        meta.mtime_nsec() + meta.mtime() * 1_000_000_000,
        meta.ctime_nsec() + meta.ctime() * 1_000_000_000,
        meta.mode() & 0o111 != 0
    )
}

fn key_of(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex::encode(h.finalize())
}

pub struct Caches {
    dir: PathBuf,
    function: DigestFunction,
}

/// A hashed input file.
#[derive(Debug, Clone, Copy)]
pub struct FileDigest {
    pub digest: Digest,
    pub executable: bool,
}

impl Caches {
    pub fn new(dir: PathBuf, function: DigestFunction) -> Caches {
        Caches { dir, function }
    }

    pub fn function(&self) -> DigestFunction {
        self.function
    }

    fn entry(&self, kind: &str, key: &str) -> PathBuf {
        self.dir.join(kind).join(&key[..2]).join(key)
    }

    fn write_entry(&self, path: &Path, data: &[u8]) {
        let _ = crate::local::write_atomic(path, data);
    }

    /// The digest of the file at `path`, from the cache when its stamp is
    /// unchanged. Symlinks are followed (rustc reads through them).
    pub fn digest(&self, path: &Path) -> std::io::Result<FileDigest> {
        let meta = std::fs::metadata(path)?;
        let executable = meta.permissions().mode() & 0o111 != 0;
        let key = key_of(&[self.function.name().as_bytes(), path.as_os_str().as_encoded_bytes()]);
        let entry = self.entry("stat", &key);
        let stamp = stamp(&meta);
        if let Ok(text) = std::fs::read_to_string(&entry)
            && let Some((s, d)) = text.rsplit_once(' ')
            && s == stamp
            && let Ok(digest) = d.parse::<Digest>()
        {
            return Ok(FileDigest { digest, executable });
        }
        let digest = remote_apis::merkle::hash_file_blocking(self.function, path)?;
        // A file changed within the last second could change again with the
        // same stamp granularity on some filesystems: do not remember it.
        let settled = meta
            .modified()
            .ok()
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .is_some_and(|age| age > Duration::from_secs(1));
        if settled {
            self.write_entry(&entry, format!("{stamp} {digest}").as_bytes());
        }
        Ok(FileDigest { digest, executable })
    }

    /// Records the digest of a file this process has just written in full.
    pub fn record(&self, path: &Path, digest: Digest) {
        if let Ok(meta) = std::fs::metadata(path) {
            let key = key_of(&[self.function.name().as_bytes(), path.as_os_str().as_encoded_bytes()]);
            self.write_entry(&self.entry("stat", &key), format!("{} {digest}", stamp(&meta)).as_bytes());
        }
    }

    pub fn load_depinfo(&self, key: &str) -> Option<DepInfoEntry> {
        let data = std::fs::read(self.entry("depinfo", key)).ok()?;
        serde_json::from_slice(&data).ok()
    }

    pub fn store_depinfo(&self, key: &str, entry: &DepInfoEntry) {
        if let Ok(data) = serde_json::to_vec(entry) {
            self.write_entry(&self.entry("depinfo", key), &data);
        }
    }
}

/// A remembered dep-info pre-pass: valid while every file it lists still has
/// the recorded digest and every variable the recorded value.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DepInfoEntry {
    /// The dep-info text with roots abstracted (see `Roots::abstract_text`).
    pub text: String,
    /// (path in the input root, digest) of every file it lists.
    pub files: Vec<(String, String)>,
    /// Variables read, with the value seen.
    pub env: Vec<(String, Option<String>)>,
}

/// The key of a dep-info pre-pass: what determines its result besides the
/// files and variables it reports.
pub fn depinfo_key(parts: &[&str]) -> String {
    let bytes: Vec<&[u8]> = parts.iter().map(|p| p.as_bytes()).collect();
    key_of(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_cached_and_invalidated_by_change() {
        let dir = tempfile::tempdir().unwrap();
        let caches = Caches::new(dir.path().join("cache"), DigestFunction::Sha256);
        let f = dir.path().join("f.rs");
        std::fs::write(&f, b"fn a() {}").unwrap();
        let d1 = caches.digest(&f).unwrap().digest;
        assert_eq!(d1, DigestFunction::Sha256.digest_of(b"fn a() {}"));
        caches.record(&f, d1);
        assert_eq!(caches.digest(&f).unwrap().digest, d1);
        std::fs::write(&f, b"fn b() {}").unwrap();
        assert_eq!(caches.digest(&f).unwrap().digest, DigestFunction::Sha256.digest_of(b"fn b() {}"));
    }

    #[test]
    fn depinfo_entries_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let caches = Caches::new(dir.path().to_path_buf(), DigestFunction::Sha256);
        let key = depinfo_key(&["a", "b"]);
        assert_ne!(key, depinfo_key(&["ab", ""]));
        assert!(caches.load_depinfo(&key).is_none());
        let e = DepInfoEntry {
            text: "x: y".into(),
            files: vec![("ws/y".into(), "h/1".into())],
            env: vec![("A".into(), None)],
        };
        caches.store_depinfo(&key, &e);
        assert_eq!(caches.load_depinfo(&key), Some(e));
    }
}
