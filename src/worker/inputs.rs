//! Materializing an input root: Directory messages fetched (and remembered:
//! they are content-addressed), the tree's expanded size checked against the
//! limits, files hard-linked from the local cache (or copied, as the
//! runner's [`FilePolicy`] says). Nothing here recurses: a client chooses
//! the depth.

use remote_apis::quote;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use parking_lot::Mutex;
use prost::Message;
use remote_apis::reapi::Directory;
use remote_apis::{Digest, InstanceName, merkle};
use tokio_util::sync::CancellationToken;

use super::cache::{Key, LocalCache};
use super::cas::ExecCas;
use super::isolation::FilePolicy;
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

/// Limits on one tree (an input root, or an action's output directories):
/// `[execution] max_tree_depth`, `max_tree_directories`, `max_tree_files`.
/// A tree is counted as it is on disk, the Merkle DAG expanded: 19 Directory
/// blobs of 2.8 KB can name 524,287 directories.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeLimits {
    /// Directory levels below the root (`a/b` is 2).
    pub max_depth: usize,
    /// Directories, the root included.
    pub max_directories: u64,
    /// Files and symlinks.
    pub max_files: u64,
}

/// Defaults far above real trees and far below what hurts a worker. The
/// deepest real trees (npm's nested `node_modules`, Bazel's external
/// repositories under `execroot`) are well under 100 levels, and no path of
/// more than 2,048 components fits Linux's PATH_MAX of 4,096 bytes, so
/// 1,000 levels leave every real tree 10x room while every input path stays
/// usable by the action's tools. The largest real input roots (a whole
/// BuildStream sysroot, a `node_modules`-heavy Bazel action, a Chromium
/// checkout) have tens of thousands of directories and a few hundred
/// thousand files: 250,000 directories and 2,000,000 files leave them 5x
/// room, and refuse the 19-blob DAG that expands to 524,287 directories.
impl Default for TreeLimits {
    fn default() -> Self {
        TreeLimits { max_depth: 1_000, max_directories: 250_000, max_files: 2_000_000 }
    }
}

impl TreeLimits {
    /// Refuses a depth above the limit.
    pub fn check_depth(&self, what: &str, depth: usize) -> Result<()> {
        if depth > self.max_depth {
            return Err(over(what, format!("is more than {} directories deep", self.max_depth), "max_tree_depth"));
        }
        Ok(())
    }

    /// Refuses a size above the limits.
    pub fn check(&self, what: &str, size: &TreeSize) -> Result<()> {
        self.check_depth(what, size.depth)?;
        if size.directories > self.max_directories {
            let has = format!("has {} directories, more than {}", size.directories, self.max_directories);
            return Err(over(what, has, "max_tree_directories"));
        }
        if size.files > self.max_files {
            let has = format!("has {} files and symlinks, more than {}", size.files, self.max_files);
            return Err(over(what, has, "max_tree_files"));
        }
        Ok(())
    }
}

/// INVALID_ARGUMENT naming the limit and its configuration key; the caller
/// changes the code where the tree is not the client's request.
fn over(what: &str, has: String, key: &str) -> Error {
    Error::invalid(format!("{what} {has}, this server's limit ([execution] {key})"))
}

/// The expanded size of a tree: what materializing it creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TreeSize {
    pub depth: usize,
    pub directories: u64,
    pub files: u64,
}

/// The expanded size of the tree under `root`, from its distinct Directory
/// messages: each directory is counted once per digest and its size reused
/// wherever it appears, so the work is linear in distinct directories
/// however many times the DAG repeats them. Counts saturate.
pub fn tree_size(root: Digest, dirs: &HashMap<Digest, Arc<Directory>>) -> Result<TreeSize> {
    let mut sizes: HashMap<Digest, TreeSize> = HashMap::with_capacity(dirs.len());
    // (digest, children already pushed): a post-order walk without recursion.
    let mut stack = vec![(root, false)];
    while let Some((digest, children_done)) = stack.pop() {
        if sizes.contains_key(&digest) {
            continue;
        }
        let dir = dirs.get(&digest).ok_or_else(|| Error::internal(format!("directory {digest} was not fetched")))?;
        let children = child_digests(digest, dir)?;
        if !children_done {
            stack.push((digest, true));
            stack.extend(children.into_iter().filter(|c| !sizes.contains_key(c)).map(|c| (c, false)));
            continue;
        }
        let mut size = TreeSize { depth: 0, directories: 1, files: (dir.files.len() + dir.symlinks.len()) as u64 };
        for child in children {
            // Present: a Merkle DAG has no cycles, so children finish first.
            let c = sizes.get(&child).copied().unwrap_or_default();
            size.depth = size.depth.max(c.depth.saturating_add(1));
            size.directories = size.directories.saturating_add(c.directories);
            size.files = size.files.saturating_add(c.files);
        }
        sizes.insert(digest, size);
    }
    Ok(sizes.get(&root).copied().unwrap_or_default())
}

fn child_digests(parent: Digest, dir: &Directory) -> Result<Vec<Digest>> {
    let digest = |d: &remote_apis::reapi::DirectoryNode| {
        Digest::from_field(parent.function, d.digest.as_ref(), "directory digest").map_err(Error::from)
    };
    dir.directories.iter().map(digest).collect()
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

/// Fetches every Directory of the tree under `root`, level by level, checks
/// names and symlink targets, and the tree's expanded size against `limits`
/// (a level beyond the depth limit is never fetched). Missing directories
/// are reported all together as FAILED_PRECONDITION.
pub async fn fetch_tree(
    cas: &dyn ExecCas,
    cache: &DirectoryCache,
    instance: &InstanceName,
    root: Digest,
    limits: &TreeLimits,
) -> Result<InputTree> {
    let mut dirs: HashMap<Digest, Arc<Directory>> = HashMap::new();
    let mut level = vec![root];
    let mut depth = 0;
    while !level.is_empty() {
        limits.check_depth("the input root", depth)?;
        let mut missing = Vec::new();
        let fetched: Vec<(Digest, Result<Arc<Directory>>)> = futures::stream::iter(level)
            .map(|digest| async move { (digest, load_directory(cas, cache, instance, digest).await) })
            .buffer_unordered(FETCH_CONCURRENCY)
            .collect()
            .await;
        let mut next = Vec::new();
        for (digest, dir) in fetched {
            let dir = match dir {
                Ok(d) => d,
                Err(e) if !e.missing.is_empty() => {
                    missing.extend(e.missing);
                    continue;
                }
                Err(e) => return Err(e),
            };
            check_directory(&dir).map_err(|e| e.context(format!("input directory {digest}")))?;
            next.extend(child_digests(digest, &dir)?.into_iter().filter(|d| !dirs.contains_key(d)));
            dirs.insert(digest, dir);
        }
        if !missing.is_empty() {
            return Err(Error::missing_blobs(missing, "input root"));
        }
        next.sort_by_key(|d| (d.hash, d.size));
        next.dedup();
        next.retain(|d| !dirs.contains_key(d));
        level = next;
        depth += 1;
    }
    limits.check("the input root", &tree_size(root, &dirs)?)?;
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

/// Names are single components and unique; symlink targets are what the
/// spec allows (absolute, or relative with `..` anywhere): they are staged
/// as given and never followed by the worker.
pub fn check_directory(dir: &Directory) -> Result<()> {
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
            return Err(Error::invalid(format!("name {} appears twice", quote(name))));
        }
    }
    for s in &dir.symlinks {
        merkle::check_symlink_target(&s.target).map_err(|e| Error::invalid(format!("{}: {}", s.name, e.0)))?;
    }
    Ok(())
}

/// When materializing must stop: the deadline (materializing is bounded on
/// its own, REAPI's timeout covers the execution only) or a cancel.
#[derive(Clone)]
pub struct Stop {
    pub deadline: Instant,
    pub limit: std::time::Duration,
    pub cancel: CancellationToken,
}

impl Stop {
    pub fn check(&self) -> Result<()> {
        if self.cancel.is_cancelled() {
            return Err(Error::new(tonic::Code::Cancelled, "the operation was cancelled"));
        }
        if Instant::now() >= self.deadline {
            return Err(self.expired());
        }
        Ok(())
    }

    /// Runs `work` until the deadline or a cancel. Only for work that can
    /// be dropped midway (async fetches); blocking steps call [`Self::check`].
    pub async fn bound<T>(&self, work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        tokio::select! {
            r = tokio::time::timeout_at(self.deadline.into(), work) => r.unwrap_or_else(|_| Err(self.expired())),
            () = self.cancel.cancelled() => Err(Error::new(tonic::Code::Cancelled, "the operation was cancelled")),
        }
    }

    pub fn expired(&self) -> Error {
        Error::new(
            tonic::Code::DeadlineExceeded,
            format!(
                "fetching and creating the input root took longer than the action's timeout of {} \
                 (applied to materializing on its own)",
                humantime::format_duration(self.limit)
            ),
        )
    }
}

/// Fetches every file of `tree` into the local cache, then creates the
/// directories, hard links and symlinks under `dest` (which must exist),
/// directories given to the action's owner and files placed as `policy`
/// says. Symlinks are created last, so no path the worker creates passes
/// through one.
pub async fn materialize(
    cas: &dyn ExecCas,
    cache: &LocalCache,
    instance: &InstanceName,
    tree: &InputTree,
    dest: &Path,
    policy: FilePolicy,
    stop: &Stop,
) -> Result<()> {
    let files = tree.files()?;
    let fetching = futures::stream::iter(files)
        .map(|key| async move { cache.ensure(cas, instance, key).await.map(|_| ()) })
        .buffer_unordered(FETCH_CONCURRENCY)
        .collect::<Vec<Result<()>>>();
    let results = stop.bound(async { Ok(fetching.await) }).await?;
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
    stop.check()?;
    let plan = plan(tree, dest)?;
    let links: Vec<(PathBuf, PathBuf, Key)> = plan.links.into_iter().map(|(p, k)| (cache.path(&k), p, k)).collect();
    let (dirs, symlinks, blocking_stop) = (plan.dirs, plan.symlinks, stop.clone());
    let gone = tokio::task::spawn_blocking(move || create(&dirs, &links, &symlinks, policy, &blocking_stop))
        .await
        .map_err(|e| Error::internal(e.to_string()))??;
    // Cache files evicted between fetch and link are fetched again.
    for (target, key) in gone {
        cache.forget(&key);
        let source = stop.bound(cache.ensure(cas, instance, key)).await?;
        tokio::task::spawn_blocking(move || {
            policy.place_input(&source, &target).map_err(|e| Error::io(target.display(), e))
        })
        .await
        .map_err(|e| Error::internal(e.to_string()))??;
    }
    Ok(())
}

/// Everything to create, directories parent first.
#[derive(Default)]
struct Plan {
    dirs: Vec<PathBuf>,
    links: Vec<(PathBuf, Key)>,
    symlinks: Vec<(PathBuf, String)>,
}

/// Expands the DAG into paths, depth first with an explicit stack (its size
/// was checked against the limits when it was fetched).
fn plan(tree: &InputTree, dest: &Path) -> Result<Plan> {
    let mut plan = Plan::default();
    let mut stack = vec![(tree.root, dest.to_path_buf())];
    while let Some((digest, at)) = stack.pop() {
        let dir =
            tree.dirs.get(&digest).ok_or_else(|| Error::internal(format!("directory {digest} was not fetched")))?;
        for f in &dir.files {
            let digest = Digest::from_field(digest.function, f.digest.as_ref(), "file digest")?;
            plan.links.push((at.join(&f.name), Key { digest, executable: f.is_executable }));
        }
        for s in &dir.symlinks {
            plan.symlinks.push((at.join(&s.name), s.target.clone()));
        }
        for d in &dir.directories {
            let child = at.join(&d.name);
            plan.dirs.push(child.clone());
            stack.push((Digest::from_field(digest.function, d.digest.as_ref(), "directory digest")?, child));
        }
    }
    Ok(plan)
}

/// How many entries are created between two looks at the clock.
const STOP_CHECK_EVERY: usize = 64;

/// Creates the planned directories (given to the action's owner), files
/// and symlinks, stopping at the deadline or a cancel. Returns the files
/// whose cache file vanished (evicted) before it could be placed.
fn create(
    dirs: &[PathBuf],
    links: &[(PathBuf, PathBuf, Key)],
    symlinks: &[(PathBuf, String)],
    policy: FilePolicy,
    stop: &Stop,
) -> Result<Vec<(PathBuf, Key)>> {
    let context = |e: std::io::Error, path: &Path| Error::io(path.display(), e).context("creating the input root");
    for (i, d) in dirs.iter().enumerate() {
        if i % STOP_CHECK_EVERY == 0 {
            stop.check()?;
        }
        std::fs::create_dir(d).and_then(|()| policy.give_dir(d)).map_err(|e| context(e, d))?;
    }
    let mut gone = Vec::new();
    for (i, (source, target, key)) in links.iter().enumerate() {
        if i % STOP_CHECK_EVERY == 0 {
            stop.check()?;
        }
        if let Err(e) = policy.place_input(source, target) {
            if e.kind() == std::io::ErrorKind::NotFound && !source.exists() {
                gone.push((target.clone(), *key));
                continue;
            }
            return Err(context(e, target));
        }
    }
    for (i, (path, target)) in symlinks.iter().enumerate() {
        if i % STOP_CHECK_EVERY == 0 {
            stop.check()?;
        }
        std::os::unix::fs::symlink(target, path).map_err(|e| context(e, path))?;
    }
    Ok(gone)
}

#[cfg(test)]
mod tests {
    use super::*;
    use remote_apis::DigestFunction;
    use remote_apis::reapi::{DirectoryNode, FileNode, SymlinkNode};

    /// A DAG of `levels` Directory messages, each naming the one below
    /// twice, and one file at the bottom.
    fn dag(levels: usize) -> (Digest, HashMap<Digest, Arc<Directory>>) {
        let f = DigestFunction::Sha256;
        let file = FileNode { name: "f".into(), digest: Some(f.digest_of(b"x").to_proto()), ..Default::default() };
        let mut dir = Directory { files: vec![file], ..Default::default() };
        let mut dirs = HashMap::new();
        let mut digest = merkle::encode(f, &dir).0;
        dirs.insert(digest, Arc::new(dir));
        for _ in 1..levels {
            let node = |name: &str| DirectoryNode { name: name.into(), digest: Some(digest.to_proto()) };
            dir = Directory { directories: vec![node("a"), node("b")], ..Default::default() };
            digest = merkle::encode(f, &dir).0;
            dirs.insert(digest, Arc::new(dir));
        }
        (digest, dirs)
    }

    #[test]
    fn a_dag_is_counted_expanded_in_linear_time() {
        let (root, dirs) = dag(19);
        assert_eq!(dirs.len(), 19);
        let size = tree_size(root, &dirs).unwrap();
        assert_eq!(size, TreeSize { depth: 18, directories: 524_287, files: 262_144 });
        // 200 levels: counts far beyond u64 saturate instead of overflowing.
        let (root, dirs) = dag(200);
        let size = tree_size(root, &dirs).unwrap();
        assert_eq!((size.depth, size.directories, size.files), (199, u64::MAX, u64::MAX));
        let limits = TreeLimits { max_depth: 1000, max_directories: 250_000, max_files: 2_000_000 };
        let err = limits.check("the input root", &size).unwrap_err();
        assert!(err.message.contains("[execution] max_tree_directories"), "{}", err.message);
    }

    #[test]
    fn limits_name_their_key() {
        let limits = TreeLimits { max_depth: 3, max_directories: 10, max_files: 5 };
        let cases = [
            (TreeSize { depth: 4, directories: 1, files: 0 }, "max_tree_depth"),
            (TreeSize { depth: 3, directories: 11, files: 0 }, "max_tree_directories"),
            (TreeSize { depth: 3, directories: 10, files: 6 }, "max_tree_files"),
        ];
        for (size, key) in cases {
            let err = limits.check("the input root", &size).unwrap_err();
            assert!(err.message.contains(key), "{size:?}: {}", err.message);
        }
        limits.check("the input root", &TreeSize { depth: 3, directories: 10, files: 5 }).unwrap();
    }

    /// Directories are given to the action's owner; files stay the cache's
    /// inodes (linked) or become private copies, as the policy says.
    #[test]
    fn created_inputs_follow_the_policy() {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: no preconditions.
        let root_user = unsafe { libc::geteuid() } == 0;
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("blob");
        std::fs::write(&blob, b"input").unwrap();
        let key = Key { digest: DigestFunction::Sha256.digest_of(b"input"), executable: false };
        let stop = Stop {
            deadline: Instant::now() + std::time::Duration::from_secs(60),
            limit: std::time::Duration::from_secs(60),
            cancel: CancellationToken::new(),
        };
        let owner = if root_user { Some((65534, 65534)) } else { None };
        for (n, policy) in [
            FilePolicy { action_owner: owner, copy_inputs: false },
            FilePolicy { action_owner: None, copy_inputs: true },
        ]
        .into_iter()
        .enumerate()
        {
            let top = dir.path().join(n.to_string());
            std::fs::create_dir(&top).unwrap();
            let dirs = vec![top.join("a"), top.join("a/b")];
            let links = vec![(blob.clone(), top.join("a/b/f"), key), (dir.path().join("gone"), top.join("a/g"), key)];
            let symlinks = vec![(top.join("a/l"), "b/f".to_string())];
            let gone = create(&dirs, &links, &symlinks, policy, &stop).unwrap();
            assert_eq!(gone, vec![(top.join("a/g"), key)], "a vanished cache file is reported");
            for d in &dirs {
                let uid = std::fs::metadata(d).unwrap().uid();
                assert_eq!(uid, policy.action_owner.map_or(unsafe { libc::geteuid() }, |(u, _)| u), "{policy:?}");
            }
            let linked = std::fs::metadata(top.join("a/b/f")).unwrap().ino() == std::fs::metadata(&blob).unwrap().ino();
            assert_eq!(linked, !policy.copy_inputs, "{policy:?}");
            assert_eq!(std::fs::read(top.join("a/l")).unwrap(), b"input");
        }
    }

    /// Not a check: the cost of each policy on a large input root, printed.
    /// `cargo test --release --lib inputs::tests::measure -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn measure_link_vs_copy() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        std::fs::create_dir(&cache).unwrap();
        let key = Key { digest: DigestFunction::Sha256.digest_of(b""), executable: false };
        // A synthetic 10,000-file tree of 100 directories, 4 KiB each; and
        // the rustc sysroot's target libraries (what the wrapper sends).
        let mut synthetic = Vec::new();
        for i in 0..10_000 {
            let source = cache.join(format!("s{i}"));
            std::fs::write(&source, vec![i as u8; 4096]).unwrap();
            synthetic.push((source, PathBuf::from(format!("d{}/f{i}", i % 100))));
        }
        let sysroot = std::process::Command::new("rustc").args(["--print", "sysroot"]).output().unwrap().stdout;
        let lib =
            Path::new(String::from_utf8(sysroot).unwrap().trim()).join("lib/rustlib/x86_64-unknown-linux-gnu/lib");
        let toolchain: Vec<(PathBuf, PathBuf)> = std::fs::read_dir(&lib)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().is_file())
                    .map(|e| (e.path(), e.file_name().into()))
                    .collect()
            })
            .unwrap_or_default();
        let stop = Stop {
            deadline: Instant::now() + std::time::Duration::from_secs(600),
            limit: std::time::Duration::from_secs(600),
            cancel: CancellationToken::new(),
        };
        for (name, files) in [("10,000 files x 4 KiB", &synthetic), ("rustlib target libraries", &toolchain)] {
            let bytes: u64 = files.iter().map(|(s, _)| std::fs::metadata(s).unwrap().len()).sum();
            for policy in [FilePolicy::default(), FilePolicy { action_owner: None, copy_inputs: true }] {
                let top = dir.path().join(format!("{}-{}", name.len(), policy.copy_inputs));
                let dirs: Vec<PathBuf> = (0..100).map(|i| top.join(format!("d{i}"))).collect();
                let links: Vec<(PathBuf, PathBuf, Key)> =
                    files.iter().map(|(s, t)| (s.clone(), top.join("d0").join(t.file_name().unwrap()), key)).collect();
                let links: Vec<_> = if name.starts_with("10") {
                    files.iter().map(|(s, t)| (s.clone(), top.join(t), key)).collect()
                } else {
                    links
                };
                std::fs::create_dir(&top).unwrap();
                let started = Instant::now();
                create(&dirs, &links, &[], policy, &stop).unwrap();
                let took = started.elapsed();
                println!(
                    "{name} ({} files, {} MB), copy_inputs={}: {:.1} ms",
                    files.len(),
                    bytes / 1_000_000,
                    policy.copy_inputs,
                    took.as_secs_f64() * 1000.0
                );
            }
        }
    }

    /// The spec: "The target path can be relative to the parent directory
    /// of the symlink or it can be an absolute path starting with `/`",
    /// "`..` components are allowed anywhere in the target path".
    #[test]
    fn symlink_targets_follow_the_spec() {
        let dir_with = |target: &str| Directory {
            symlinks: vec![SymlinkNode { name: "l".into(), target: target.into(), node_properties: None }],
            ..Default::default()
        };
        for ok in ["/usr/bin/env", "../../../x", "a/../../b", "b"] {
            check_directory(&dir_with(ok)).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        for bad in ["", "a\0b"] {
            assert!(check_directory(&dir_with(bad)).is_err(), "{bad:?} accepted");
        }
    }
}
