//! A worker's local blob cache: read-only files that input roots hard-link
//! to, so an input used by many actions is fetched once and never copied.
//!
//! A file's mode is shared by all its hard links, so the executable bit is
//! part of the key: the same blob needed both ways is stored twice. Files are
//! written to a temporary name and renamed, so the cache never holds a torn
//! file, and a restart keeps what was there. Least recently used files are
//! deleted beyond the budget; a work directory that links to a deleted file
//! keeps its copy (the inode lives on).

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
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
    /// Opens (creating) the cache in `dir`, indexing what a previous run left.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut state = State { lru: lru::LruCache::unbounded(), used: 0 };
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            match name.to_str().and_then(parse_name) {
                Some(key) => {
                    state.used += key.digest.size;
                    state.lru.put(key, key.digest.size);
                }
                None => {
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
    /// instead of downloading it. Blocking; best effort.
    pub fn adopt(&self, key: Key, path: &Path) -> std::io::Result<()> {
        if self.touch(&key) {
            return Ok(());
        }
        let tmp = self.dir.join(format!(".tmp-{}", uuid::Uuid::new_v4()));
        let adopted = (|| {
            if std::fs::hard_link(path, &tmp).is_err() {
                std::fs::copy(path, &tmp)?;
            }
            let mode = if key.executable { 0o555 } else { 0o444 };
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
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
            let mode = if key.executable { 0o555 } else { 0o444 };
            tokio::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
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
}
