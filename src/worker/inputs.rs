//! Materializing an input root: Directory messages fetched (and remembered:
//! they are content-addressed), files hard-linked from the local cache.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use parking_lot::Mutex;
use prost::Message;
use remote_apis::reapi::Directory;
use remote_apis::{Digest, InstanceName, merkle};

use super::cache::{Key, LocalCache};
use super::cas::ExecCas;
use crate::error::{Error, Result};

/// Concurrent blob fetches per action.
const FETCH_CONCURRENCY: usize = 32;

/// Decoded Directory messages by digest, shared by all actions of a worker.
pub struct DirectoryCache(Mutex<lru::LruCache<Digest, Arc<Directory>>>);

impl DirectoryCache {
    pub fn new(entries: usize) -> Self {
        DirectoryCache(Mutex::new(lru::LruCache::new(entries.max(1).try_into().expect("non-zero"))))
    }

    pub fn get(&self, digest: &Digest) -> Option<Arc<Directory>> {
        self.0.lock().get(digest).cloned()
    }

    pub fn put(&self, digest: Digest, dir: Arc<Directory>) {
        self.0.lock().put(digest, dir);
    }
}

/// A fetched input tree: every directory by digest.
pub struct InputTree {
    pub root: Digest,
    pub dirs: HashMap<Digest, Arc<Directory>>,
}

impl InputTree {
    /// Every distinct file of the tree (a blob needed both executable and
    /// not is two files).
    pub fn files(&self) -> Result<Vec<Key>> {
        let mut out = HashSet::new();
        for dir in self.dirs.values() {
            for f in &dir.files {
                let digest = Digest::from_field(self.root.function, f.digest.as_ref(), "file digest")?;
                out.insert(Key { digest, executable: f.is_executable });
            }
        }
        Ok(out.into_iter().collect())
    }
}

/// Fetches every Directory of the tree under `root`, level by level, and
/// checks names and symlink targets. Missing directories are reported all
/// together as FAILED_PRECONDITION.
pub async fn fetch_tree(
    cas: &dyn ExecCas,
    cache: &DirectoryCache,
    instance: &InstanceName,
    root: Digest,
) -> Result<InputTree> {
    let mut dirs: HashMap<Digest, Arc<Directory>> = HashMap::new();
    let mut level = vec![(root, 0usize)];
    while !level.is_empty() {
        let mut missing = Vec::new();
        let fetched: Vec<(Digest, usize, Result<Arc<Directory>>)> = futures::stream::iter(level)
            .map(|(digest, depth)| async move { (digest, depth, load_directory(cas, cache, instance, digest).await) })
            .buffer_unordered(FETCH_CONCURRENCY)
            .collect()
            .await;
        let mut next = Vec::new();
        for (digest, depth, dir) in fetched {
            let dir = match dir {
                Ok(d) => d,
                Err(e) if !e.missing.is_empty() => {
                    missing.extend(e.missing);
                    continue;
                }
                Err(e) => return Err(e),
            };
            check_directory(&dir, depth).map_err(|e| e.context(format!("input directory {digest}")))?;
            for child in &dir.directories {
                let d = Digest::from_field(root.function, child.digest.as_ref(), "directory digest")?;
                if !dirs.contains_key(&d) {
                    next.push((d, depth + 1));
                }
            }
            dirs.insert(digest, dir);
        }
        if !missing.is_empty() {
            return Err(Error::missing_blobs(missing, "input root"));
        }
        next.sort_by_key(|(d, _)| (d.hash, d.size));
        next.dedup_by_key(|(d, _)| *d);
        level = next;
    }
    Ok(InputTree { root, dirs })
}

async fn load_directory(
    cas: &dyn ExecCas,
    cache: &DirectoryCache,
    instance: &InstanceName,
    digest: Digest,
) -> Result<Arc<Directory>> {
    if let Some(d) = cache.get(&digest) {
        return Ok(d);
    }
    let data = cas.get_bytes(instance, &digest).await?;
    let dir = Arc::new(
        Directory::decode(data.as_ref()).map_err(|e| Error::invalid(format!("{digest} is not a Directory: {e}")))?,
    );
    cache.put(digest, dir.clone());
    Ok(dir)
}

/// Names are single components; symlinks stay inside the input root.
pub fn check_directory(dir: &Directory, depth: usize) -> Result<()> {
    let names = dir
        .files
        .iter()
        .map(|f| &f.name)
        .chain(dir.directories.iter().map(|d| &d.name))
        .chain(dir.symlinks.iter().map(|s| &s.name));
    let mut seen = HashSet::new();
    for name in names {
        merkle::check_name(name)?;
        if !seen.insert(name) {
            return Err(Error::invalid(format!("name {name:?} appears twice")));
        }
    }
    for s in &dir.symlinks {
        merkle::check_symlink_target(&s.target, depth).map_err(|e| Error::invalid(format!("{}: {}", s.name, e.0)))?;
    }
    Ok(())
}

/// Fetches every file of `tree` into the local cache, then creates the
/// directories, hard links and symlinks under `dest` (which must exist).
pub async fn materialize(
    cas: &dyn ExecCas,
    cache: &LocalCache,
    instance: &InstanceName,
    tree: &InputTree,
    dest: &Path,
) -> Result<()> {
    let files = tree.files()?;
    let results: Vec<Result<()>> = futures::stream::iter(files)
        .map(|key| async move { cache.ensure(cas, instance, key).await.map(|_| ()) })
        .buffer_unordered(FETCH_CONCURRENCY)
        .collect()
        .await;
    let mut missing = Vec::new();
    for r in results {
        match r {
            Ok(()) => {}
            Err(e) if !e.missing.is_empty() => missing.extend(e.missing),
            Err(e) => return Err(e.context("fetching inputs")),
        }
    }
    if !missing.is_empty() {
        return Err(Error::missing_blobs(missing, "input root"));
    }
    let mut links = Vec::new();
    let mut dirs = Vec::new();
    let mut symlinks = Vec::new();
    plan(tree, tree.root, dest.to_path_buf(), &mut dirs, &mut links, &mut symlinks)?;
    let links: Vec<(PathBuf, PathBuf, Key)> = links.into_iter().map(|(p, k)| (cache.path(&k), p, k)).collect();
    let gone = tokio::task::spawn_blocking(move || create(&dirs, &links, &symlinks))
        .await
        .map_err(|e| Error::internal(e.to_string()))?
        .map_err(|e| e.context("creating the input root"))?;
    // Cache files evicted between fetch and link are fetched again.
    for (target, key) in gone {
        cache.forget(&key);
        let source = cache.ensure(cas, instance, key).await?;
        tokio::task::spawn_blocking(move || link_or_copy(&source, &target).map_err(|e| Error::io(target.display(), e)))
            .await
            .map_err(|e| Error::internal(e.to_string()))??;
    }
    Ok(())
}

fn plan(
    tree: &InputTree,
    digest: Digest,
    at: PathBuf,
    dirs: &mut Vec<PathBuf>,
    links: &mut Vec<(PathBuf, Key)>,
    symlinks: &mut Vec<(PathBuf, String)>,
) -> Result<()> {
    let dir = tree.dirs.get(&digest).ok_or_else(|| Error::internal(format!("directory {digest} was not fetched")))?;
    for f in &dir.files {
        let digest = Digest::from_field(digest.function, f.digest.as_ref(), "file digest")?;
        links.push((at.join(&f.name), Key { digest, executable: f.is_executable }));
    }
    for s in &dir.symlinks {
        symlinks.push((at.join(&s.name), s.target.clone()));
    }
    for d in &dir.directories {
        let child = at.join(&d.name);
        dirs.push(child.clone());
        let cd = Digest::from_field(digest.function, d.digest.as_ref(), "directory digest")?;
        plan(tree, cd, child, dirs, links, symlinks)?;
    }
    Ok(())
}

/// Creates the planned directories, hard links and symlinks. Returns the
/// links whose cache file vanished (evicted) before it could be linked.
fn create(
    dirs: &[PathBuf],
    links: &[(PathBuf, PathBuf, Key)],
    symlinks: &[(PathBuf, String)],
) -> Result<Vec<(PathBuf, Key)>> {
    for d in dirs {
        std::fs::create_dir(d).map_err(|e| Error::io(d.display(), e))?;
    }
    let mut gone = Vec::new();
    for (source, target, key) in links {
        if let Err(e) = link_or_copy(source, target) {
            if e.kind() == std::io::ErrorKind::NotFound && !source.exists() {
                gone.push((target.clone(), *key));
                continue;
            }
            return Err(Error::io(target.display(), e));
        }
    }
    for (path, target) in symlinks {
        std::os::unix::fs::symlink(target, path).map_err(|e| Error::io(path.display(), e))?;
    }
    Ok(gone)
}

/// Hard link; a copy where a link is impossible (another filesystem, or the
/// file's link count at its limit).
fn link_or_copy(source: &Path, target: &Path) -> std::io::Result<()> {
    match std::fs::hard_link(source, target) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(e),
        Err(_) => std::fs::copy(source, target).map(|_| ()),
    }
}
