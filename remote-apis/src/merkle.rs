//! Merkle trees of directories: REAPI `Directory` messages built from paths
//! and local files, and the path rules every side checks.
//!
//! A client builds an input root with [`TreeBuilder`]; a worker turns an
//! output directory into a `Tree` with [`tree_of_local_dir`]. Both produce
//! canonical messages (entries sorted by name, no duplicates), so identical
//! contents always give identical digests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use prost::Message;

use crate::reapi::{Directory, DirectoryNode, FileNode, SymlinkNode, Tree};
use crate::{Digest, DigestFunction, ParseError, quote};

/// Splits a relative REAPI path into its components.
///
/// Refused: absolute paths, `..` anywhere, and empty or `.` components (the
/// spec asks for normalized paths, and a lenient reading is how paths escape
/// the input root). The empty string is the root itself.
pub fn path_components(path: &str) -> Result<Vec<&str>, ParseError> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    if path.starts_with('/') {
        return Err(ParseError::new(format!("path {} is absolute; REAPI paths are relative", quote(path))));
    }
    let parts: Vec<&str> = path.split('/').collect();
    for part in &parts {
        check_name(part).map_err(|e| ParseError::new(format!("path {}: {}", quote(path), e.0)))?;
    }
    Ok(parts)
}

/// Checks one entry name of a `Directory`.
pub fn check_name(name: &str) -> Result<(), ParseError> {
    match name {
        "" => Err(ParseError::new("empty path component")),
        "." | ".." => Err(ParseError::new(format!("{} is not allowed as a path component", quote(name)))),
        n if n.contains('/') || n.contains('\0') => {
            Err(ParseError::new(format!("name {} contains '/' or NUL", quote(n))))
        }
        _ => Ok(()),
    }
}

/// Checks a symlink target as the spec allows it: `SymlinkNode.target` may
/// be absolute (this server advertises `symlink_absolute_path_strategy`
/// ALLOWED) and "`..` components are allowed anywhere in the target path".
/// Only what no filesystem can hold is refused: an empty target, or NUL.
/// Symlinks are data: they are staged as given and never followed by the
/// worker itself.
pub fn check_symlink_target(target: &str) -> Result<(), ParseError> {
    if target.is_empty() {
        return Err(ParseError::new("symlink target is empty"));
    }
    if target.contains('\0') {
        return Err(ParseError::new("symlink target contains NUL"));
    }
    Ok(())
}

/// Resolves an output path against the working directory, both as a
/// Command gives them, into components relative to the input root.
///
/// The spec: output paths "are relative to the working directory", use `/`,
/// and "MUST NOT include a trailing slash, nor a leading slash". So `.` (the
/// working directory itself) and `..` are legal, and an output above the
/// working directory can only be named with `..` (BuildStream sends
/// `working_directory: "buildstream/smoke/hello.bst"` with the output paths
/// `.` and `../../../buildstream-install`). Refused: absolute paths, a
/// trailing slash, empty components, and whatever climbs above the input
/// root. `..` is resolved by name: the worker never follows a symlink on an
/// output's way, so the name is what the filesystem sees.
pub fn resolve_output_path<'a>(working_directory: &'a str, path: &'a str) -> Result<Vec<&'a str>, ParseError> {
    let mut parts = path_components(working_directory)?;
    if path.is_empty() {
        return Ok(parts);
    }
    if path.starts_with('/') {
        return Err(ParseError::new(format!("path {} is absolute; output paths are relative", quote(path))));
    }
    for part in path.split('/') {
        match part {
            "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(ParseError::new(format!(
                        "path {} leaves the input root (from the working directory {})",
                        quote(path),
                        quote(working_directory)
                    )));
                }
            }
            "" => {
                return Err(ParseError::new(format!(
                    "path {} has an empty component or a trailing slash",
                    quote(path)
                )));
            }
            name => {
                check_name(name).map_err(|e| ParseError::new(format!("path {}: {}", quote(path), e.0)))?;
                parts.push(name);
            }
        }
    }
    Ok(parts)
}

/// An encoded message and its digest.
pub fn encode<M: Message>(function: DigestFunction, message: &M) -> (Digest, Bytes) {
    let data = Bytes::from(message.encode_to_vec());
    (function.digest_of(&data), data)
}

/// A file that belongs to a built tree, and where its bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalFile {
    pub digest: Digest,
    pub path: PathBuf,
}

/// A finished tree: the root, every directory message (root included) with
/// its encoding, and the local files it names.
#[derive(Debug, Clone)]
pub struct BuiltTree {
    pub root_digest: Digest,
    pub root: Directory,
    /// Every distinct directory, the root first.
    pub directories: Vec<(Digest, Bytes, Directory)>,
    pub files: Vec<LocalFile>,
}

impl BuiltTree {
    /// The REAPI `Tree` message of this tree (root plus distinct children).
    pub fn to_tree(&self) -> Tree {
        Tree {
            root: Some(self.root.clone()),
            children: self.directories.iter().skip(1).map(|(_, _, d)| d.clone()).collect(),
        }
    }

    /// Every blob a server needs for this tree: directory messages and files.
    pub fn blob_digests(&self) -> Vec<Digest> {
        let mut out: Vec<Digest> = self.directories.iter().map(|(d, _, _)| *d).collect();
        out.extend(self.files.iter().map(|f| f.digest));
        out.sort_by_key(|d| (d.hash, d.size));
        out.dedup();
        out
    }
}

#[derive(Default)]
struct Node {
    files: BTreeMap<String, (Digest, bool)>,
    symlinks: BTreeMap<String, String>,
    dirs: BTreeMap<String, Node>,
    /// Directories known only by digest (their messages were built and
    /// uploaded elsewhere, e.g. a toolchain tree shared by many actions).
    subtrees: BTreeMap<String, Digest>,
}

/// Nodes nest as deep as the paths added; dropping them must not recurse.
impl Drop for Node {
    fn drop(&mut self) {
        let mut stack: Vec<Node> = std::mem::take(&mut self.dirs).into_values().collect();
        while let Some(mut node) = stack.pop() {
            stack.extend(std::mem::take(&mut node.dirs).into_values());
        }
    }
}

impl Node {
    fn has(&self, name: &str) -> bool {
        self.files.contains_key(name)
            || self.symlinks.contains_key(name)
            || self.dirs.contains_key(name)
            || self.subtrees.contains_key(name)
    }
}

/// Builds a tree from paths added in any order.
pub struct TreeBuilder {
    function: DigestFunction,
    root: Node,
    files: Vec<LocalFile>,
}

impl TreeBuilder {
    pub fn new(function: DigestFunction) -> Self {
        TreeBuilder { function, root: Node::default(), files: Vec::new() }
    }

    pub fn function(&self) -> DigestFunction {
        self.function
    }

    /// Adds a file at `path`; `source` is where its bytes are on this machine.
    pub fn add_file(
        &mut self,
        path: &str,
        digest: Digest,
        executable: bool,
        source: PathBuf,
    ) -> Result<(), ParseError> {
        let (dir, name) = self.parent(path)?;
        if dir.has(name) && !dir.files.contains_key(name) {
            return Err(ParseError::new(format!("{} is added both as a file and as something else", quote(path))));
        }
        dir.files.insert(name.to_string(), (digest, executable));
        self.files.push(LocalFile { digest, path: source });
        Ok(())
    }

    pub fn add_symlink(&mut self, path: &str, target: &str) -> Result<(), ParseError> {
        let (dir, name) = self.parent(path)?;
        if dir.has(name) && !dir.symlinks.contains_key(name) {
            return Err(ParseError::new(format!("{} is added both as a symlink and as something else", quote(path))));
        }
        dir.symlinks.insert(name.to_string(), target.to_string());
        Ok(())
    }

    /// Adds a directory at `path` by the digest of its `Directory` message.
    /// Nothing can be added below it; its messages and files must reach the
    /// CAS by another way.
    pub fn add_subtree(&mut self, path: &str, digest: Digest) -> Result<(), ParseError> {
        let (dir, name) = self.parent(path)?;
        if dir.has(name) && dir.subtrees.get(name) != Some(&digest) {
            return Err(ParseError::new(format!("{} is added both as a subtree and as something else", quote(path))));
        }
        dir.subtrees.insert(name.to_string(), digest);
        Ok(())
    }

    /// Adds a directory (empty unless entries are added below it).
    pub fn add_directory(&mut self, path: &str) -> Result<(), ParseError> {
        let parts = path_components(path)?;
        let mut node = &mut self.root;
        for part in parts {
            if node.files.contains_key(part) || node.symlinks.contains_key(part) || node.subtrees.contains_key(part) {
                return Err(ParseError::new(format!("{}: {} is already a file or symlink", quote(path), quote(part))));
            }
            node = node.dirs.entry(part.to_string()).or_default();
        }
        Ok(())
    }

    fn parent<'a, 'p>(&'a mut self, path: &'p str) -> Result<(&'a mut Node, &'p str), ParseError> {
        let mut parts = path_components(path)?;
        let Some(name) = parts.pop() else {
            return Err(ParseError::new("the root cannot be a file or symlink"));
        };
        let parent = parts.join("/");
        self.add_directory(&parent)?;
        let mut node = &mut self.root;
        for part in parts {
            node = node.dirs.get_mut(part).expect("added above");
        }
        Ok((node, name))
    }

    /// Encodes every directory, depth first without recursion.
    pub fn build(mut self) -> BuiltTree {
        let mut out = TreeAssembler::new(self.function);
        let root = std::mem::take(&mut self.root);
        let mut stack = vec![emit_entries(&mut out, root).into_iter()];
        while let Some(top) = stack.last_mut() {
            match top.next() {
                Some((name, child)) => {
                    out.enter(&name);
                    stack.push(emit_entries(&mut out, child).into_iter());
                }
                None => {
                    stack.pop();
                    if !stack.is_empty() {
                        out.leave();
                    }
                }
            }
        }
        out.finish(std::mem::take(&mut self.files))
    }
}

/// Adds `node`'s files, symlinks and subtrees to the open directory and
/// returns its child directories, still to be walked.
fn emit_entries(out: &mut TreeAssembler, mut node: Node) -> Vec<(String, Node)> {
    for (name, digest) in &node.subtrees {
        out.subtree(name, *digest);
    }
    for (name, (digest, executable)) in &node.files {
        out.file(name, *digest, *executable);
    }
    for (name, target) in &node.symlinks {
        out.symlink(name, target);
    }
    std::mem::take(&mut node.dirs).into_iter().collect()
}

/// Builds canonical `Directory` messages bottom-up while something walks a
/// tree depth first: [`enter`](Self::enter) a directory, add its entries,
/// [`leave`](Self::leave) it. Time and memory are linear in the tree and
/// nothing recurses, so any depth is safe (callers bound the depth they
/// accept). [`TreeBuilder`] and the worker's output collection use it.
pub struct TreeAssembler {
    function: DigestFunction,
    /// Directories entered and not yet left, with their names (the root's
    /// is empty).
    open: Vec<(String, Directory)>,
    /// Every distinct directory left so far.
    directories: Vec<(Digest, Bytes, Directory)>,
    seen: std::collections::HashSet<Digest>,
}

impl TreeAssembler {
    /// Starts with the root open.
    pub fn new(function: DigestFunction) -> Self {
        TreeAssembler {
            function,
            open: vec![(String::new(), Directory::default())],
            directories: Vec::new(),
            seen: Default::default(),
        }
    }

    /// How many directories are open below the root.
    pub fn depth(&self) -> usize {
        self.open.len() - 1
    }

    fn current(&mut self) -> &mut Directory {
        &mut self.open.last_mut().expect("the root stays open until finish").1
    }

    /// Opens the child directory `name` of the current one.
    pub fn enter(&mut self, name: &str) {
        self.open.push((name.to_string(), Directory::default()));
    }

    pub fn file(&mut self, name: &str, digest: Digest, executable: bool) {
        self.current().files.push(FileNode {
            name: name.to_string(),
            digest: Some(digest.to_proto()),
            is_executable: executable,
            node_properties: None,
        });
    }

    pub fn symlink(&mut self, name: &str, target: &str) {
        self.current().symlinks.push(SymlinkNode {
            name: name.to_string(),
            target: target.to_string(),
            node_properties: None,
        });
    }

    /// A child directory known only by digest (its messages are elsewhere).
    pub fn subtree(&mut self, name: &str, digest: Digest) {
        self.current().directories.push(DirectoryNode { name: name.to_string(), digest: Some(digest.to_proto()) });
    }

    /// Closes the current directory (not the root): encodes it and names it
    /// in its parent. Returns its digest.
    pub fn leave(&mut self) -> Digest {
        assert!(self.open.len() > 1, "leave without enter");
        let (name, dir) = self.open.pop().expect("checked above");
        let digest = self.seal(dir);
        self.subtree(&name, digest);
        digest
    }

    /// Sorts, encodes and records a directory.
    fn seal(&mut self, mut dir: Directory) -> Digest {
        dir.files.sort_by(|a, b| a.name.cmp(&b.name));
        dir.directories.sort_by(|a, b| a.name.cmp(&b.name));
        dir.symlinks.sort_by(|a, b| a.name.cmp(&b.name));
        let (digest, data) = encode(self.function, &dir);
        if self.seen.insert(digest) {
            self.directories.push((digest, data, dir));
        }
        digest
    }

    /// Closes what is still open, the root last, and returns the tree;
    /// `files` are the local files it names.
    pub fn finish(mut self, mut files: Vec<LocalFile>) -> BuiltTree {
        while self.open.len() > 1 {
            self.leave();
        }
        let (_, root) = self.open.pop().expect("the root");
        let root_digest = self.seal(root);
        let at = self.directories.iter().position(|(d, _, _)| *d == root_digest).expect("sealed");
        let entry = self.directories.remove(at);
        let root = entry.2.clone();
        self.directories.insert(0, entry);
        files.sort_by_key(|f| (f.digest.hash, f.digest.size));
        files.dedup_by_key(|f| f.digest);
        BuiltTree { root_digest, root, directories: self.directories, files }
    }
}

/// Hashes a local file in fixed-size reads (blocking).
pub fn hash_file_blocking(function: DigestFunction, path: &Path) -> std::io::Result<Digest> {
    hash_reader(function, std::fs::File::open(path)?)
}

/// Hashes everything `reader` yields, in fixed-size reads (blocking).
pub fn hash_reader(function: DigestFunction, mut reader: impl std::io::Read) -> std::io::Result<Digest> {
    let mut hasher = function.hasher();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.update(&buf[..n]);
    }
}

/// Adds the local file, symlink or directory `local` at `path` (blocking).
/// Symlinks are recorded as symlinks, never followed; other file types
/// (sockets, devices) are an error. Directories are walked with an explicit
/// stack: no recursion, whatever the depth.
pub fn add_local_path(builder: &mut TreeBuilder, path: &str, local: &Path) -> std::io::Result<()> {
    let mut stack = vec![(path.to_string(), local.to_path_buf())];
    while let Some((path, local)) = stack.pop() {
        let entries = add_local_entry(builder, &path, &local)?;
        for name in entries.into_iter().rev() {
            let child = if path.is_empty() { name.clone() } else { format!("{path}/{name}") };
            stack.push((child, local.join(&name)));
        }
    }
    Ok(())
}

/// Adds one local entry; for a directory, returns the names in it.
fn add_local_entry(builder: &mut TreeBuilder, path: &str, local: &Path) -> std::io::Result<Vec<String>> {
    use std::os::unix::fs::PermissionsExt;
    let invalid = |e: ParseError| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.0);
    let not_utf8 = |what: &str| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {what} is not UTF-8", local.display()))
    };
    let meta = std::fs::symlink_metadata(local)?;
    let kind = meta.file_type();
    if kind.is_symlink() {
        let target = std::fs::read_link(local)?;
        let target = target.to_str().ok_or_else(|| not_utf8("target"))?;
        builder.add_symlink(path, target).map_err(invalid)?;
        Ok(Vec::new())
    } else if kind.is_file() {
        let digest = hash_file_blocking(builder.function, local)?;
        let executable = meta.permissions().mode() & 0o111 != 0;
        builder.add_file(path, digest, executable, local.to_path_buf()).map_err(invalid)?;
        Ok(Vec::new())
    } else if kind.is_dir() {
        builder.add_directory(path).map_err(invalid)?;
        let mut names = Vec::new();
        for entry in std::fs::read_dir(local)? {
            let name = entry?.file_name();
            names.push(name.into_string().map_err(|_| not_utf8("a name"))?);
        }
        names.sort();
        Ok(names)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is neither a file, a directory nor a symlink", local.display()),
        ))
    }
}

/// The tree of a local directory (blocking), e.g. for `exec --input`.
/// (Workers collect output directories with their own walk, which also
/// bounds depth and size.)
pub fn tree_of_local_dir(function: DigestFunction, dir: &Path) -> std::io::Result<BuiltTree> {
    let mut builder = TreeBuilder::new(function);
    add_local_path(&mut builder, "", dir)?;
    Ok(builder.build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_rules() {
        let ok = ["", "a", "a/b", "a.b/c..d/.e"];
        for p in ok {
            path_components(p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
        }
        let bad = ["/a", "a/../b", "..", "a//b", "a/", "./a", "a/.", "a\0b"];
        for p in bad {
            assert!(path_components(p).is_err(), "{p:?} accepted");
        }
    }

    /// The spec's rules for `SymlinkNode.target`: "The target path can be
    /// relative to the parent directory of the symlink or it can be an
    /// absolute path starting with `/`" and "`..` components are allowed
    /// anywhere in the target path".
    #[test]
    fn symlink_targets() {
        let ok = ["b", "../b", "a/../../b", "/etc/passwd", "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", ".", "a//b/"];
        for t in ok {
            check_symlink_target(t).unwrap_or_else(|e| panic!("{t:?}: {e}"));
        }
        for t in ["", "a\0b"] {
            assert!(check_symlink_target(t).is_err(), "{t:?} accepted");
        }
    }

    /// The spec's rules for output paths: "relative to the working directory
    /// of the action execution", "MUST NOT include a trailing slash, nor a
    /// leading slash"; the result must stay inside the input root.
    #[test]
    fn output_paths_resolve_against_the_working_directory() {
        let wd = "buildstream/smoke/hello.bst";
        let ok: &[(&str, &str, &[&str])] = &[
            ("", "a/b", &["a", "b"]),
            ("", "", &[]),
            ("", ".", &[]),
            (wd, ".", &["buildstream", "smoke", "hello.bst"]),
            (wd, "", &["buildstream", "smoke", "hello.bst"]),
            (wd, "../../../buildstream-install", &["buildstream-install"]),
            (wd, "../../..", &[]),
            ("w", "./x/../y", &["w", "y"]),
            ("w", "a.b/c..d/.e", &["w", "a.b", "c..d", ".e"]),
        ];
        for (wd, path, want) in ok {
            let got = resolve_output_path(wd, path).unwrap_or_else(|e| panic!("{wd:?} {path:?}: {e}"));
            assert_eq!(&got, want, "{wd:?} {path:?}");
        }
        let bad = [
            ("", ".."),
            ("", "a/../.."),
            (wd, "../../../.."),
            ("", "/etc/passwd"),
            ("", "a/"),
            ("", "a//b"),
            ("", "a\0b"),
            ("../w", "x"),
            ("/w", "x"),
        ];
        for (wd, path) in bad {
            assert!(resolve_output_path(wd, path).is_err(), "{wd:?} {path:?} accepted");
        }
    }

    #[test]
    fn deep_trees_build_and_drop_without_recursion() {
        let f = DigestFunction::Sha256;
        let deep = vec!["d"; 100_000].join("/");
        let run = move || {
            let mut t = TreeBuilder::new(f);
            t.add_directory(&deep).unwrap();
            let built = t.build();
            assert_eq!(built.directories.len(), 100_001);
            let mut dropped = TreeBuilder::new(f);
            dropped.add_directory(&deep).unwrap();
            drop(dropped);
        };
        std::thread::Builder::new().stack_size(256 << 10).spawn(run).unwrap().join().unwrap();
    }

    #[test]
    fn order_of_adding_does_not_change_the_digest() {
        let f = DigestFunction::Sha256;
        let a = f.digest_of(b"a");
        let b = f.digest_of(b"b");
        let mut one = TreeBuilder::new(f);
        one.add_file("x/y/a", a, false, "a".into()).unwrap();
        one.add_file("b", b, true, "b".into()).unwrap();
        one.add_symlink("x/l", "y/a").unwrap();
        let mut two = TreeBuilder::new(f);
        two.add_symlink("x/l", "y/a").unwrap();
        two.add_file("b", b, true, "b".into()).unwrap();
        two.add_file("x/y/a", a, false, "a".into()).unwrap();
        let (one, two) = (one.build(), two.build());
        assert_eq!(one.root_digest, two.root_digest);
        assert_eq!(one.directories.len(), 3);
        assert_eq!(one.root.files[0].name, "b");
        assert!(one.root.files[0].is_executable);
        assert_eq!(one.to_tree().children.len(), 2);
        assert_eq!(one.blob_digests().len(), 5);
    }

    #[test]
    fn a_subtree_by_digest_equals_the_same_directory_built_in_place() {
        let f = DigestFunction::Sha256;
        let d = f.digest_of(b"x");
        let mut inner = TreeBuilder::new(f);
        inner.add_file("bin/rustc", d, true, PathBuf::from("/t/bin/rustc")).unwrap();
        let inner = inner.build();

        let mut whole = TreeBuilder::new(f);
        whole.add_file("toolchain/bin/rustc", d, true, PathBuf::from("/t/bin/rustc")).unwrap();
        whole.add_file("ws/a.rs", d, false, PathBuf::from("/w/a.rs")).unwrap();
        let mut split = TreeBuilder::new(f);
        split.add_file("ws/a.rs", d, false, PathBuf::from("/w/a.rs")).unwrap();
        split.add_subtree("toolchain", inner.root_digest).unwrap();
        assert_eq!(whole.build().root_digest, split.build().root_digest);

        let mut clash = TreeBuilder::new(f);
        clash.add_subtree("t", inner.root_digest).unwrap();
        assert!(clash.add_file("t/x", d, false, PathBuf::new()).is_err());
        assert!(clash.add_file("t", d, false, PathBuf::new()).is_err());
    }

    #[test]
    fn conflicting_entries_are_refused() {
        let f = DigestFunction::Sha256;
        let mut t = TreeBuilder::new(f);
        t.add_file("a/b", f.digest_of(b""), false, "x".into()).unwrap();
        assert!(t.add_file("a", f.digest_of(b""), false, "x".into()).is_err());
        assert!(t.add_symlink("a/b", "c").is_err());
        assert!(t.add_file("a/b/c", f.digest_of(b""), false, "x".into()).is_err());
        assert!(t.add_file("", f.digest_of(b""), false, "x".into()).is_err());
    }

    #[test]
    fn local_directory_tree() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::create_dir_all(d.join("sub/empty")).unwrap();
        std::fs::write(d.join("sub/f"), b"hello").unwrap();
        std::fs::write(d.join("run"), b"#!/bin/sh").unwrap();
        std::fs::set_permissions(d.join("run"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("sub/f", d.join("link")).unwrap();
        let tree = tree_of_local_dir(DigestFunction::Sha256, d).unwrap();
        let root = &tree.root;
        assert_eq!(root.directories.len(), 1);
        assert_eq!(root.files.len(), 1);
        assert!(root.files[0].is_executable);
        assert_eq!(root.symlinks[0].target, "sub/f");
        let t = tree.to_tree();
        assert_eq!(t.children.len(), 2, "sub and sub/empty");
        assert_eq!(tree.files.len(), 2);
    }
}
