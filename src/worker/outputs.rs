//! Collecting outputs after the command ran: files, directories (as Trees)
//! and symlinks, from `output_paths` (REAPI 2.1) or from
//! `output_files`/`output_directories` (2.0 clients). Nothing is followed out
//! of the input root: symlinks are reported as symlinks, and an output whose
//! parent resolves outside the root is refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use remote_apis::reapi::{ActionResult, Command, OutputDirectory, OutputFile, OutputSymlink};
use remote_apis::{Digest, DigestFunction, merkle};

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

/// Every output path, for creating parent directories before the run.
/// Output directories themselves are not created, their parents are.
pub fn output_parents(command: &Command) -> Vec<&str> {
    declared(command).into_keys().collect()
}

/// Collects the outputs under `working_dir` (blocking: hashes files).
#[allow(deprecated)] // 2.0 clients read the split symlink fields
pub fn collect(
    function: DigestFunction,
    root: &Path,
    working_dir: &Path,
    command: &Command,
) -> Result<(ActionResult, Vec<Upload>)> {
    let mut result = ActionResult::default();
    let mut uploads = Vec::new();
    let root = root.canonicalize().map_err(|e| Error::io(root.display(), e))?;
    let v21 = !command.output_paths.is_empty();
    for (path, declared) in declared(command) {
        merkle::path_components(path).map_err(|e| Error::invalid(format!("output path: {}", e.0)))?;
        let full = working_dir.join(path);
        if !inside(&root, &full, path.is_empty()) {
            return Err(Error::new(
                tonic::Code::FailedPrecondition,
                format!("output {path:?} is reached through a symlink that leaves the input root"),
            ));
        }
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
                result.output_symlinks.push(symlink);
            } else {
                let points_to_dir = std::fs::metadata(&full).is_ok_and(|m| m.is_dir());
                match declared {
                    Declared::Directory => result.output_directory_symlinks.push(symlink),
                    Declared::Any if points_to_dir => result.output_directory_symlinks.push(symlink),
                    _ => result.output_file_symlinks.push(symlink),
                }
            }
        } else if kind.is_file() {
            if declared == Declared::Directory {
                return Err(not_a(path, "directory", "regular file"));
            }
            use std::os::unix::fs::PermissionsExt;
            let digest = merkle::hash_file_blocking(function, &full).map_err(|e| Error::io(full.display(), e))?;
            result.output_files.push(OutputFile {
                path: path.to_string(),
                digest: Some(digest.to_proto()),
                is_executable: meta.permissions().mode() & 0o111 != 0,
                contents: Vec::new(),
                node_properties: None,
            });
            uploads.push(Upload::File(digest, full));
        } else if kind.is_dir() {
            if declared == Declared::File {
                return Err(not_a(path, "file", "directory"));
            }
            let tree = merkle::tree_of_local_dir(function, &full).map_err(|e| Error::io(full.display(), e))?;
            let (tree_digest, tree_bytes) = merkle::encode(function, &tree.to_tree());
            result.output_directories.push(OutputDirectory {
                path: path.to_string(),
                tree_digest: Some(tree_digest.to_proto()),
                is_topologically_sorted: false,
                root_directory_digest: Some(tree.root_digest.to_proto()),
            });
            uploads.push(Upload::Bytes(tree_digest, tree_bytes));
            for (digest, data, _) in tree.directories {
                uploads.push(Upload::Bytes(digest, data));
            }
            for f in tree.files {
                uploads.push(Upload::File(f.digest, f.path));
            }
        } else {
            return Err(Error::new(
                tonic::Code::FailedPrecondition,
                format!("output {path:?} is neither a file, a directory nor a symlink"),
            ));
        }
    }
    Ok((result, uploads))
}

fn not_a(path: &str, declared: &str, found: &str) -> Error {
    Error::new(tonic::Code::FailedPrecondition, format!("output {path:?} is declared as a {declared} but is a {found}"))
}

/// Whether the parent of `path` resolves to a place inside `root` (the last
/// component itself is never followed). The empty output path (the whole
/// working directory) is checked itself.
fn inside(root: &Path, path: &Path, whole_working_dir: bool) -> bool {
    let checked = if whole_working_dir { Some(path) } else { path.parent() };
    match checked.map(Path::canonicalize) {
        Some(Ok(parent)) => parent.starts_with(root),
        // A parent that does not exist holds no output; nothing escapes.
        Some(Err(_)) => true,
        None => false,
    }
}
