//! Where ActionResults are kept: small values under a key derived from the
//! instance name, the digest function and the action digest.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use lru::LruCache;
use parking_lot::Mutex;
use remote_apis::{Digest, InstanceName};
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

/// An ActionCache entry belongs to its instance: the same action under two
/// instance names is two entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AcKey([u8; 32]);

impl AcKey {
    pub fn new(instance: &InstanceName, action: &Digest) -> Self {
        let mut h = Sha256::new();
        for part in [instance.as_str(), action.function.name(), &action.hash_hex(), &action.size.to_string()] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        AcKey(h.finalize().into())
    }

    /// A key in a domain of its own beside the action results (the Remote
    /// Asset records live in the same store). Never equal to an action's
    /// key: that one's encoding starts with the length of an instance name,
    /// this one's with `u64::MAX`, which no name can have.
    pub fn derived(domain: &str, parts: &[&str]) -> Self {
        let mut h = Sha256::new();
        h.update(u64::MAX.to_le_bytes());
        for part in std::iter::once(domain).chain(parts.iter().copied()) {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        AcKey(h.finalize().into())
    }

    /// The key as 64 hex digits: how stores that keep entries by name (files,
    /// objects, Redis keys) name it.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

#[async_trait]
pub trait AcStore: Send + Sync + 'static {
    async fn get(&self, key: &AcKey) -> Result<Option<Bytes>>;
    async fn put(&self, key: &AcKey, value: Bytes) -> Result<()>;
    async fn remove(&self, key: &AcKey) -> Result<()>;
}

/// Entries in memory, the oldest dropped beyond `max_entries`.
pub struct MemoryAcStore {
    entries: Mutex<LruCache<AcKey, Bytes>>,
}

impl MemoryAcStore {
    pub fn new(max_entries: usize) -> Self {
        let cap = std::num::NonZeroUsize::new(max_entries.max(1)).expect("at least one");
        MemoryAcStore { entries: Mutex::new(LruCache::new(cap)) }
    }
}

#[async_trait]
impl AcStore for MemoryAcStore {
    async fn get(&self, key: &AcKey) -> Result<Option<Bytes>> {
        Ok(self.entries.lock().get(key).cloned())
    }

    async fn put(&self, key: &AcKey, value: Bytes) -> Result<()> {
        self.entries.lock().put(*key, value);
        Ok(())
    }

    async fn remove(&self, key: &AcKey) -> Result<()> {
        self.entries.lock().pop(key);
        Ok(())
    }
}

/// One file per entry under `{root}/ac/{xx}/{key}`, replaced atomically
/// (temporary file + rename), so a reader sees the old or the new result,
/// never a mix.
pub struct FsAcStore {
    root: Arc<PathBuf>,
}

impl FsAcStore {
    pub fn open(root: &Path) -> Result<Self> {
        let dir = root.join("ac");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        std::fs::create_dir_all(root.join("tmp"))
            .map_err(|e| Error::io(format!("creating {}", root.join("tmp").display()), e))?;
        Ok(FsAcStore { root: Arc::new(root.to_path_buf()) })
    }

    fn path(&self, key: &AcKey) -> PathBuf {
        let hex = key.hex();
        self.root.join("ac").join(&hex[..2]).join(hex)
    }
}

#[async_trait]
impl AcStore for FsAcStore {
    async fn get(&self, key: &AcKey) -> Result<Option<Bytes>> {
        let path = self.path(key);
        match tokio::fs::read(&path).await {
            Ok(data) => Ok(Some(data.into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    async fn put(&self, key: &AcKey, value: Bytes) -> Result<()> {
        let path = self.path(key);
        let tmp = self.root.join("tmp").join(uuid::Uuid::new_v4().to_string());
        tokio::task::spawn_blocking(move || {
            let parent = path.parent().expect("entries have a parent");
            std::fs::create_dir_all(parent).map_err(|e| Error::io(format!("creating {}", parent.display()), e))?;
            std::fs::write(&tmp, &value).map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
            std::fs::rename(&tmp, &path).map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                Error::io(format!("renaming into {}", path.display()), e)
            })
        })
        .await
        .map_err(|e| Error::internal(format!("writing an action result: {e}")))?
    }

    async fn remove(&self, key: &AcKey) -> Result<()> {
        match tokio::fs::remove_file(self.path(key)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("removing an action result", e)),
        }
    }
}
