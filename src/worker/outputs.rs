//! Before the run, the working directory and the outputs' parents are
//! created; after it, outputs are collected: files, directories (as Trees)
//! and symlinks, from `output_paths` (REAPI 2.1) or from
//! `output_files`/`output_directories` (2.0 clients).
//!
//! Output paths are relative to the working directory and may use `.` and
//! `..` (resolved by name, never above the input root). The worker itself
//! never goes through a symlink on an output's way, neither creating
//! parents nor collecting (an input symlink or one the action made may point
//! anywhere, e.g. `out -> /etc`); symlinks inside outputs are reported as
//! symlinks. The action's own process may follow whatever it likes. Output
//! directories are walked without recursion, within the tree limits.

use remote_apis::quote;
use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use remote_apis::reapi::{ActionResult, Command, OutputDirectory, OutputFile, OutputSymlink};
use remote_apis::{Digest, DigestFunction, merkle};

use super::cache::Key;
use super::inputs::TreeLimits;
use crate::error::{Error, Result};

/// A blob to upload after collection.
pub enum Upload {
    File(Digest, PathBuf),
    Bytes(Digest, Bytes),
}

impl Upload {
    pub fn digest(&self) -> Digest {
        match self {
            Upload::File(d, _) | Upload::Bytes(d, _) => *d,
        }
    }
}

/// What the client declared an output to be.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Declared {
    File,
    Directory,
    /// `output_paths`, or a 2.0 path listed as both file and directory.
    Any,
}

/// The outputs a Command declares, by path, with what each is declared as.
/// The 2.0 fields are deprecated and still served (Bazel 4, recc, Goma).
#[allow(deprecated)]
fn declared(command: &Command) -> BTreeMap<&str, Declared> {
    let mut out = BTreeMap::new();
    if !command.output_paths.is_empty() {
        for p in &command.output_paths {
            out.insert(p.as_str(), Declared::Any);
        }
        return out;
    }
    for p in &command.output_files {
        out.insert(p.as_str(), Declared::File);
    }
    for p in &command.output_directories {
        let d = out.entry(p.as_str()).or_insert(Declared::Directory);
        if *d == Declared::File {
            *d = Declared::Any;
        }
    }
    out
}

/// What collection found: the result, the blobs to upload, and the output
/// files to keep in the worker's cache.
pub struct Collected {
    pub result: ActionResult,
    pub uploads: Vec<Upload>,
    pub adopt: Vec<(Key, PathBuf)>,
}

/// Creates the working directory and the parent of every output (not the
/// outputs themselves) below `root`, refusing to go through a symlink.
/// Returns the working directory. Blocking.
pub fn prepare(root: &Path, command: &Command, limits: &TreeLimits) -> Result<PathBuf> {
    let wd = merkle::path_components(&command.working_directory)
        .map_err(|e| Error::bad_field("command.working_directory", e.0))?;
    let mut made = HashSet::new();
    let working_dir = make_dirs(root, &wd, "the working directory", &mut made)?;
    for path in declared(command).into_keys() {
        let parts = resolve(command, path, limits)?;
        if let Some((_, parents)) = parts.split_last() {
            make_dirs(root, parents, &format!("output {}", quote(path)), &mut made)?;
        }
    }
    Ok(working_dir)
}

/// An output's components below the input root.
fn resolve<'a>(command: &'a Command, path: &'a str, limits: &TreeLimits) -> Result<Vec<&'a str>> {
    let parts = merkle::resolve_output_path(&command.working_directory, path)
        .map_err(|e| Error::invalid(format!("output path: {}", e.0)))?;
    limits.check_depth(&format!("output path {}", quote(path)), parts.len())?;
    Ok(parts)
}

/// Creates `parts` below `root` one component at a time; an existing
/// component must be a real directory.
fn make_dirs(root: &Path, parts: &[&str], what: &str, made: &mut HashSet<PathBuf>) -> Result<PathBuf> {
    let mut at = root.to_path_buf();
    for (i, part) in parts.iter().enumerate() {
        at.push(part);
        if made.contains(&at) {
            continue;
        }
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => return Err(through_symlink(what, &parts[..=i].join("/"))),
            Ok(_) => {
                return Err(Error::new(
                    tonic::Code::FailedPrecondition,
                    format!("{what}: {:?} exists and is not a directory", parts[..=i].join("/")),
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&at).map_err(|e| Error::io(format!("{what}: creating a parent"), e))?;
            }
            Err(e) => return Err(Error::io(format!("{what}: {:?}", parts[..=i].join("/")), e)),
        }
        made.insert(at.clone());
    }
    Ok(at)
}

fn through_symlink(what: &str, symlink: &str) -> Error {
    Error::new(
        tonic::Code::FailedPrecondition,
        format!(
            "{what} is reached through the symlink {symlink:?}; the worker never goes through a symlink \
             (one that leaves the input root would expose the worker's own files)"
        ),
    )
}

/// The path of an output below `root`, checking that no parent is a
/// symlink. None when a parent is absent or not a directory (no output).
fn locate(root: &Path, parts: &[&str], path: &str) -> Result<Option<PathBuf>> {
    let mut at = root.to_path_buf();
    let Some((last, parents)) = parts.split_last() else { return Ok(Some(at)) };
    for (i, part) in parents.iter().enumerate() {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(through_symlink(&format!("output {}", quote(path)), &parts[..=i].join("/")));
            }
            _ => return Ok(None),
        }
    }
    at.push(last);
    Ok(Some(at))
}

/// Collects the outputs (blocking: hashes files). The limits bound every
/// output directory's depth and, together, their directories and files.
#[allow(deprecated)] // 2.0 clients read the split symlink fields
pub fn collect(function: DigestFunction, root: &Path, command: &Command, limits: &TreeLimits) -> Result<Collected> {
    let mut out = Collected { result: ActionResult::default(), uploads: Vec::new(), adopt: Vec::new() };
    let mut counted = Counted::default();
    let v21 = !command.output_paths.is_empty();
    for (path, declared) in declared(command) {
        let parts = resolve(command, path, limits)?;
        let Some(full) = locate(root, &parts, path)? else { continue };
        let Ok(meta) = std::fs::symlink_metadata(&full) else { continue };
        let kind = meta.file_type();
        if kind.is_symlink() {
            let target = std::fs::read_link(&full).map_err(|e| Error::io(full.display(), e))?;
            let symlink = OutputSymlink {
                path: path.to_string(),
                target: target.to_string_lossy().into_owned(),
                node_properties: None,
            };
            // 2.1 clients read `output_symlinks`; 2.0 clients the split fields.
            if v21 {
                out.result.output_symlinks.push(symlink);
            } else {
                let points_to_dir = std::fs::metadata(&full).is_ok_and(|m| m.is_dir());
                match declared {
                    Declared::Directory => out.result.output_directory_symlinks.push(symlink),
                    Declared::Any if points_to_dir => out.result.output_directory_symlinks.push(symlink),
                    _ => out.result.output_file_symlinks.push(symlink),
                }
            }
        } else if kind.is_file() {
            if declared == Declared::Directory {
                return Err(not_a(path, "directory", "regular file"));
            }
            let digest = merkle::hash_file_blocking(function, &full).map_err(|e| Error::io(full.display(), e))?;
            let executable = meta.permissions().mode() & 0o111 != 0;
            out.result.output_files.push(OutputFile {
                path: path.to_string(),
                digest: Some(digest.to_proto()),
                is_executable: executable,
                contents: Vec::new(),
                node_properties: None,
            });
            out.adopt.push((Key { digest, executable }, full.clone()));
            out.uploads.push(Upload::File(digest, full));
        } else if kind.is_dir() {
            if declared == Declared::File {
                return Err(not_a(path, "file", "directory"));
            }
            let tree = walk(function, &full, path, limits, &mut counted)?;
            let (tree_digest, tree_bytes) = merkle::encode(function, &tree.to_tree());
            out.result.output_directories.push(OutputDirectory {
                path: path.to_string(),
                tree_digest: Some(tree_digest.to_proto()),
                is_topologically_sorted: false,
                root_directory_digest: Some(tree.root_digest.to_proto()),
            });
            out.uploads.push(Upload::Bytes(tree_digest, tree_bytes));
            for (digest, data, _) in tree.directories {
                out.uploads.push(Upload::Bytes(digest, data));
            }
            for f in tree.files {
                out.uploads.push(Upload::File(f.digest, f.path));
            }
        } else {
            return Err(Error::new(
                tonic::Code::FailedPrecondition,
                format!("output {} is neither a file, a directory nor a symlink", quote(path)),
            ));
        }
    }
    Ok(out)
}

fn not_a(path: &str, declared: &str, found: &str) -> Error {
    Error::new(
        tonic::Code::FailedPrecondition,
        format!("output {} is declared as a {declared} but is a {found}", quote(path)),
    )
}

/// Directories and files collected so far across an action's outputs.
#[derive(Default)]
struct Counted {
    directories: u64,
    files: u64,
}

/// The Tree of an output directory, depth first with an explicit stack:
/// each level holds its directory's path and the names not yet visited.
/// Symlinks are recorded, never followed. Over a limit: FAILED_PRECONDITION
/// naming the limit (the action made an output this server will not take).
fn walk(
    function: DigestFunction,
    dir: &Path,
    path: &str,
    limits: &TreeLimits,
    counted: &mut Counted,
) -> Result<merkle::BuiltTree> {
    let what = format!("output directory {}", quote(path));
    let over = |mut e: Error| {
        e.code = tonic::Code::FailedPrecondition;
        e
    };
    let mut tree = merkle::TreeAssembler::new(function);
    let mut files = Vec::new();
    counted.directories += 1;
    let mut stack = vec![(dir.to_path_buf(), names(dir)?)];
    while let Some((at, pending)) = stack.last_mut() {
        let Some(name) = pending.pop() else {
            stack.pop();
            if !stack.is_empty() {
                tree.leave();
            }
            continue;
        };
        let child = at.join(&name);
        let meta = std::fs::symlink_metadata(&child).map_err(|e| Error::io(child.display(), e))?;
        let kind = meta.file_type();
        if kind.is_dir() {
            counted.directories += 1;
            limits.check_depth(&what, tree.depth() + 1).map_err(over)?;
            let size = super::inputs::TreeSize { depth: 0, directories: counted.directories, files: counted.files };
            limits.check(&format!("the action's output directories: {what}"), &size).map_err(over)?;
            let entries = names(&child)?;
            tree.enter(&name);
            stack.push((child, entries));
            continue;
        }
        counted.files += 1;
        let size = super::inputs::TreeSize { depth: 0, directories: counted.directories, files: counted.files };
        limits.check(&format!("the action's output directories: {what}"), &size).map_err(over)?;
        if kind.is_symlink() {
            let target = std::fs::read_link(&child).map_err(|e| Error::io(child.display(), e))?;
            let target = target.to_str().ok_or_else(|| not_utf8(&child))?;
            tree.symlink(&name, target);
        } else if kind.is_file() {
            let digest = merkle::hash_file_blocking(function, &child).map_err(|e| Error::io(child.display(), e))?;
            tree.file(&name, digest, meta.permissions().mode() & 0o111 != 0);
            files.push(merkle::LocalFile { digest, path: child });
        } else {
            return Err(Error::new(
                tonic::Code::FailedPrecondition,
                format!("{what}: {} is neither a file, a directory nor a symlink", child.display()),
            ));
        }
    }
    Ok(tree.finish(files))
}

/// The names in a directory, sorted last first (popped in order).
fn names(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir.display(), e))? {
        let entry = entry.map_err(|e| Error::io(dir.display(), e))?;
        names.push(entry.file_name().into_string().map_err(|_| not_utf8(&dir.join(entry.file_name())))?);
    }
    names.sort_unstable_by(|a, b| b.cmp(a));
    Ok(names)
}

fn not_utf8(path: &Path) -> Error {
    Error::new(tonic::Code::FailedPrecondition, format!("output {} has a name that is not UTF-8", path.display()))
}
