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
use crate::{Digest, DigestFunction, ParseError};

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
        return Err(ParseError::new(format!("path {path:?} is absolute; REAPI paths are relative")));
    }
    let parts: Vec<&str> = path.split('/').collect();
    for part in &parts {
        check_name(part).map_err(|e| ParseError::new(format!("path {path:?}: {}", e.0)))?;
    }
    Ok(parts)
}

/// Checks one entry name of a `Directory`.
pub fn check_name(name: &str) -> Result<(), ParseError> {
    match name {
        "" => Err(ParseError::new("empty path component")),
        "." | ".." => Err(ParseError::new(format!("{name:?} is not allowed as a path component"))),
        n if n.contains('/') || n.contains('\0') => Err(ParseError::new(format!("name {n:?} contains '/' or NUL"))),
        _ => Ok(()),
    }
}

/// Checks a symlink target: relative, and not leaving the input root when
/// resolved from the link's own directory (`depth` components below the root).
pub fn check_symlink_target(target: &str, depth: usize) -> Result<(), ParseError> {
    if target.is_empty() {
        return Err(ParseError::new("symlink target is empty"));
    }
    if target.starts_with('/') {
        return Err(ParseError::new(format!("symlink target {target:?} is absolute")));
    }
    let mut level = depth as isize;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => level -= 1,
            _ => level += 1,
        }
        if level < 0 {
            return Err(ParseError::new(format!("symlink target {target:?} points outside the input root")));
        }
    }
    Ok(())
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
            return Err(ParseError::new(format!("{path:?} is added both as a file and as something else")));
        }
        dir.files.insert(name.to_string(), (digest, executable));
        self.files.push(LocalFile { digest, path: source });
        Ok(())
    }

    pub fn add_symlink(&mut self, path: &str, target: &str) -> Result<(), ParseError> {
        let (dir, name) = self.parent(path)?;
        if dir.has(name) && !dir.symlinks.contains_key(name) {
            return Err(ParseError::new(format!("{path:?} is added both as a symlink and as something else")));
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
            return Err(ParseError::new(format!("{path:?} is added both as a subtree and as something else")));
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
                return Err(ParseError::new(format!("{path:?}: {part:?} is already a file or symlink")));
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

    pub fn build(self) -> BuiltTree {
        let mut directories = Vec::new();
        let (root_digest, root) = encode_node(self.function, &self.root, &mut directories);
        let data = Bytes::from(root.encode_to_vec());
        directories.insert(0, (root_digest, data, root.clone()));
        let mut seen = std::collections::HashSet::new();
        directories.retain(|(d, _, _)| seen.insert(*d));
        let mut files = self.files;
        files.sort_by_key(|f| (f.digest.hash, f.digest.size));
        files.dedup_by_key(|f| f.digest);
        BuiltTree { root_digest, root, directories, files }
    }
}

/// Encodes `node` and, depth first, every directory below it into `out`.
fn encode_node(
    function: DigestFunction,
    node: &Node,
    out: &mut Vec<(Digest, Bytes, Directory)>,
) -> (Digest, Directory) {
    let mut dir = Directory::default();
    for (name, child) in &node.dirs {
        let (digest, message) = encode_node(function, child, out);
        let data = Bytes::from(message.encode_to_vec());
        out.push((digest, data, message));
        dir.directories.push(DirectoryNode { name: name.clone(), digest: Some(digest.to_proto()) });
    }
    for (name, digest) in &node.subtrees {
        dir.directories.push(DirectoryNode { name: name.clone(), digest: Some(digest.to_proto()) });
    }
    dir.directories.sort_by(|a, b| a.name.cmp(&b.name));
    for (name, (digest, executable)) in &node.files {
        dir.files.push(FileNode {
            name: name.clone(),
            digest: Some(digest.to_proto()),
            is_executable: *executable,
            node_properties: None,
        });
    }
    for (name, target) in &node.symlinks {
        dir.symlinks.push(SymlinkNode { name: name.clone(), target: target.clone(), node_properties: None });
    }
    let (digest, _) = encode(function, &dir);
    (digest, dir)
}

/// Hashes a local file in fixed-size reads (blocking).
pub fn hash_file_blocking(function: DigestFunction, path: &Path) -> std::io::Result<Digest> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = function.hasher();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.update(&buf[..n]);
    }
}

/// Adds the local file, symlink or directory `local` at `path` (blocking).
/// Symlinks are recorded as symlinks, never followed; other file types
/// (sockets, devices) are an error.
pub fn add_local_path(builder: &mut TreeBuilder, path: &str, local: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let invalid = |e: ParseError| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.0);
    let meta = std::fs::symlink_metadata(local)?;
    let kind = meta.file_type();
    if kind.is_symlink() {
        let target = std::fs::read_link(local)?;
        let target = target.to_str().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: target is not UTF-8", local.display()))
        })?;
        builder.add_symlink(path, target).map_err(invalid)
    } else if kind.is_file() {
        let digest = hash_file_blocking(builder.function, local)?;
        let executable = meta.permissions().mode() & 0o111 != 0;
        builder.add_file(path, digest, executable, local.to_path_buf()).map_err(invalid)
    } else if kind.is_dir() {
        builder.add_directory(path).map_err(invalid)?;
        let mut entries: Vec<_> = std::fs::read_dir(local)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = entry.file_name();
            let name = name.to_str().ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: name is not UTF-8", local.display()))
            })?;
            let child = if path.is_empty() { name.to_string() } else { format!("{path}/{name}") };
            add_local_path(builder, &child, &entry.path())?;
        }
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is neither a file, a directory nor a symlink", local.display()),
        ))
    }
}

/// The tree of a local directory (blocking): how a worker reports an output
/// directory.
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

    #[test]
    fn symlink_targets() {
        assert!(check_symlink_target("b", 0).is_ok());
        assert!(check_symlink_target("../b", 1).is_ok());
        assert!(check_symlink_target("../b", 0).is_err());
        assert!(check_symlink_target("a/../../b", 1).is_ok());
        assert!(check_symlink_target("a/../../../b", 1).is_err());
        assert!(check_symlink_target("/etc/passwd", 3).is_err());
        assert!(check_symlink_target("", 0).is_err());
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
