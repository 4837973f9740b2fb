//! A worker's local blob cache: read-only files that input roots hard-link
//! to, so an input used by many actions is fetched once and never copied.
//!
//! A file's mode is shared by all its hard links, so the executable bit is
//! part of the key: the same blob needed both ways is stored twice. Files are
//! written to a temporary name and renamed, so the cache never holds a torn
//! file, and a restart keeps what was there. Least recently used files are
//! deleted beyond the budget; a work directory that links to a deleted file
//! keeps its copy (the inode lives on).
//!
//! Invariant: every file here is the worker's, mode 0444 or 0555, and the
//! directory is 0700. An action running as another uid can therefore
//! neither write nor chmod a file it sees through a hard link; at startup a
//! file that is not so (changed by hand, or by an action under the plain
//! runner) is deleted rather than trusted.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use remote_apis::{Digest, DigestFunction, InstanceName};

use super::cas::ExecCas;
use crate::error::{Error, Result};

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Key {
    pub digest: Digest,
    pub executable: bool,
}

pub struct LocalCache {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
    /// One fetch per key at a time; others wait for it.
    fetching: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
}

struct State {
    lru: lru::LruCache<Key, u64>,
    used: u64,
}

impl LocalCache {
    /// Opens (creating) the cache in `dir`, indexing what a previous run
    /// left: files that are not as this cache makes them (the worker's,
    /// read-only, the size their name says) are deleted.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        let mut state = State { lru: lru::LruCache::unbounded(), used: 0 };
        // SAFETY: no preconditions.
        let uid = unsafe { libc::geteuid() };
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let key = name.to_str().and_then(parse_name);
            let intact = |key: &Key| {
                entry.metadata().is_ok_and(|m| {
                    m.file_type().is_file()
                        && m.uid() == uid
                        && m.mode() & 0o7777 == mode(key)
                        && m.len() == key.digest.size
                })
            };
            match key {
                Some(key) if intact(&key) => {
                    state.used += key.digest.size;
                    state.lru.put(key, key.digest.size);
                }
                _ => {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(LocalCache { dir: dir.to_path_buf(), max_bytes, state: Mutex::new(state), fetching: Mutex::default() })
    }

    pub fn path(&self, key: &Key) -> PathBuf {
        self.dir.join(file_name(key))
    }

    /// The path of `key`'s file, fetching it first if needed.
    pub async fn ensure(&self, cas: &dyn ExecCas, instance: &InstanceName, key: Key) -> Result<PathBuf> {
        if self.touch(&key) {
            return Ok(self.path(&key));
        }
        let gate = self.fetching.lock().entry(key).or_default().clone();
        let _held = gate.lock().await;
        if !self.touch(&key) {
            let fetched = self.fetch(cas, instance, &key).await;
            if fetched.is_ok() {
                self.insert(key);
            }
            self.fetching.lock().remove(&key);
            fetched?;
        }
        Ok(self.path(&key))
    }

    /// Takes a file the worker just produced (an action's output) into the
    /// cache, so a later action on this worker that consumes it links it
    /// instead of downloading it. Blocking; best effort. Under a sandboxing
    /// runner `path` is the worker's staged copy that nothing else can
    /// change (see [`super::isolation::FilePolicy::secure_output`]); under
    /// the plain runner it is the trusted action's own file. Either way it
    /// is opened once without following a symlink, and that file is linked
    /// (or copied) and made read-only.
    pub fn adopt(&self, key: Key, path: &Path) -> std::io::Result<()> {
        if self.touch(&key) {
            return Ok(());
        }
        let tmp = self.dir.join(format!(".tmp-{}", uuid::Uuid::new_v4()));
        let adopted = (|| {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
                .open(path)?;
            let meta = file.metadata()?;
            if !meta.file_type().is_file() || meta.len() != key.digest.size {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not the file that was hashed"));
            }
            if super::isolation::link_fd(&file, &tmp).is_err() {
                super::isolation::clone_or_copy(&file, &tmp, mode(&key))?;
            }
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode(&key)))?;
            std::fs::rename(&tmp, self.path(&key))
        })();
        match adopted {
            Ok(()) => {
                self.insert(key);
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Forgets a file found gone (deleted by hand); the next `ensure` refetches.
    pub fn forget(&self, key: &Key) {
        let mut state = self.state.lock();
        if let Some(size) = state.lru.pop(key) {
            state.used -= size;
        }
    }

    fn touch(&self, key: &Key) -> bool {
        self.state.lock().lru.get(key).is_some()
    }

    async fn fetch(&self, cas: &dyn ExecCas, instance: &InstanceName, key: &Key) -> Result<()> {
        let path = self.path(key);
        let tmp = self.dir.join(format!(".tmp-{}", uuid::Uuid::new_v4()));
        let result = async {
            if key.digest.size == 0 {
                tokio::fs::write(&tmp, b"").await.map_err(|e| Error::io(tmp.display(), e))?;
            } else {
                cas.fetch_to(instance, &key.digest, &tmp).await?;
            }
            tokio::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode(key)))
                .await
                .map_err(|e| Error::io(tmp.display(), e))?;
            tokio::fs::rename(&tmp, &path).await.map_err(|e| Error::io(path.display(), e))
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    fn insert(&self, key: Key) {
        let mut evict = Vec::new();
        {
            let mut state = self.state.lock();
            if state.lru.put(key, key.digest.size).is_none() {
                state.used += key.digest.size;
            }
            while state.used > self.max_bytes && state.lru.len() > 1 {
                let Some((old, size)) = state.lru.pop_lru() else { break };
                state.used -= size;
                evict.push(old);
            }
        }
        for old in evict {
            let _ = std::fs::remove_file(self.path(&old));
        }
    }
}

/// The mode of every cache file: read-only, executable when the key says.
fn mode(key: &Key) -> u32 {
    if key.executable { 0o555 } else { 0o444 }
}

fn file_name(key: &Key) -> String {
    let x = if key.executable { "x" } else { "r" };
    format!("{}-{}-{}-{x}", key.digest.function.name(), key.digest.hash_hex(), key.digest.size)
}

fn parse_name(name: &str) -> Option<Key> {
    let mut parts = name.split('-');
    let function = DigestFunction::from_name(parts.next()?)?;
    let hash = parts.next()?;
    let size: i64 = parts.next()?.parse().ok()?;
    let executable = match parts.next()? {
        "x" => true,
        "r" => false,
        _ => return None,
    };
    if parts.next().is_some() {
        return None;
    }
    Some(Key { digest: Digest::new(function, hash, size).ok()?, executable })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for function in DigestFunction::ALL {
            for executable in [false, true] {
                let key = Key { digest: function.digest_of(b"abc"), executable };
                assert_eq!(parse_name(&file_name(&key)), Some(key));
            }
        }
        assert_eq!(parse_name(".tmp-123"), None);
        assert_eq!(parse_name("sha256-zz-1-r"), None);
    }

    /// A file an action could have changed (writable, or the wrong size)
    /// is not trusted at startup; the directory is the worker's alone.
    #[test]
    fn open_keeps_only_intact_files() {
        let dir = tempfile::tempdir().unwrap();
        let function = DigestFunction::Sha256;
        let write = |data: &[u8], executable: bool, mode: u32| {
            let key = Key { digest: function.digest_of(data), executable };
            let path = dir.path().join(file_name(&key));
            std::fs::write(&path, data).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            (key, path)
        };
        let (good, good_path) = write(b"good", false, 0o444);
        let (exe, exe_path) = write(b"exe", true, 0o555);
        let (_, writable) = write(b"writable", false, 0o644);
        let (_, wrong_mode) = write(b"wrong mode", true, 0o444);
        let (short, short_path) = write(b"short", false, 0o644);
        std::fs::write(&short_path, b"sh").unwrap();
        std::fs::set_permissions(&short_path, std::fs::Permissions::from_mode(0o444)).unwrap();
        let cache = LocalCache::open(dir.path(), 1 << 20).unwrap();
        assert!(cache.touch(&good) && cache.touch(&exe) && !cache.touch(&short));
        for gone in [&writable, &wrong_mode, &short_path] {
            assert!(!gone.exists(), "{} kept", gone.display());
        }
        assert!(good_path.exists() && exe_path.exists());
        assert_eq!(std::fs::metadata(dir.path()).unwrap().mode() & 0o7777, 0o700);
    }

    /// Adopting takes the file itself, read-only; a symlink in its place
    /// is never followed.
    #[test]
    fn adopt_links_the_file_never_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let cache = LocalCache::open(&dir.path().join("cache"), 1 << 20).unwrap();
        let function = DigestFunction::Sha256;
        let out = dir.path().join("out");
        std::fs::write(&out, b"output").unwrap();
        let key = Key { digest: function.digest_of(b"output"), executable: true };
        cache.adopt(key, &out).unwrap();
        let meta = std::fs::metadata(cache.path(&key)).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o555);
        assert_eq!(meta.ino(), std::fs::metadata(&out).unwrap().ino());

        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"secret").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        let key = Key { digest: function.digest_of(b"secret"), executable: false };
        assert!(cache.adopt(key, &link).is_err());
        assert!(!cache.touch(&key) && !cache.path(&key).exists());
        assert_eq!(std::fs::metadata(&secret).unwrap().mode() & 0o222, 0o200, "the target's mode is untouched");
    }
}
