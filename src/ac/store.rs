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
///
/// The key is a hash, so local stores need nothing else; a key made from an
/// action also keeps where it came from ([`AcKey::origin`]), because a store
/// that is itself a REAPI server (the grpc store) must ask that server with
/// the real instance name and action digest, or its other clients would
/// never see the entry. Equality and hashing look at the hash only.
#[derive(Debug, Clone)]
pub struct AcKey {
    hash: [u8; 32],
    origin: Option<Arc<AcOrigin>>,
}

/// The instance and action an [`AcKey`] was made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcOrigin {
    pub instance: InstanceName,
    pub action: Digest,
}

impl AcKey {
    pub fn new(instance: &InstanceName, action: &Digest) -> Self {
        let mut h = Sha256::new();
        for part in [instance.as_str(), action.function.name(), &action.hash_hex(), &action.size.to_string()] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        let origin = AcOrigin { instance: instance.clone(), action: *action };
        AcKey { hash: h.finalize().into(), origin: Some(Arc::new(origin)) }
    }

    /// A key in a domain of its own beside the action results (the Remote
    /// Asset records live in the same store). Never equal to an action's
    /// key: that one's encoding starts with the length of an instance name,
    /// this one's with `u64::MAX`, which no name can have. It has no origin.
    pub fn derived(domain: &str, parts: &[&str]) -> Self {
        let mut h = Sha256::new();
        h.update(u64::MAX.to_le_bytes());
        for part in std::iter::once(domain).chain(parts.iter().copied()) {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        AcKey { hash: h.finalize().into(), origin: None }
    }

    /// The key's hash in hex: what stores name the entry by.
    pub fn hex(&self) -> String {
        hex::encode(self.hash)
    }

    /// The key's hash.
    pub fn bytes(&self) -> &[u8; 32] {
        &self.hash
    }

    /// The instance and action of a key made by [`AcKey::new`]; `None` for
    /// a derived key.
    pub fn origin(&self) -> Option<&AcOrigin> {
        self.origin.as_deref()
    }
}

impl PartialEq for AcKey {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash
    }
}

impl Eq for AcKey {}

impl std::hash::Hash for AcKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.hash.hash(state);
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
        self.entries.lock().put(key.clone(), value);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_their_origin_but_compare_by_hash() {
        let instance = InstanceName::new("main").unwrap();
        let action = remote_apis::DigestFunction::Sha256.digest_of(b"action");
        let key = AcKey::new(&instance, &action);
        assert_eq!(key.origin(), Some(&AcOrigin { instance: instance.clone(), action }));
        assert_eq!(key.hex().len(), 64);
        let derived = AcKey::derived("domain", &["a"]);
        assert_eq!(derived.origin(), None);
        assert_ne!(key, derived);
        // The same hash without an origin is the same key (and map entry).
        let bare = AcKey { hash: key.hash, origin: None };
        assert_eq!(key, bare);
        let mut set = std::collections::HashSet::new();
        set.insert(key.clone());
        assert!(set.contains(&bare));
        assert_ne!(key, AcKey::new(&InstanceName::default(), &action), "the instance is part of the key");
    }
}
