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
//!
//! The outputs' total size and file count are counted as they are found,
//! before anything is hashed or uploaded, against [`OutputLimits`]. Under
//! a sandboxing [`FilePolicy`], output files are taken over into the
//! worker's staging directory first (see [`FilePolicy::secure_output`]) and
//! hashed, uploaded and cached from there.

use remote_apis::quote;
use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use remote_apis::reapi::{ActionResult, Command, OutputDirectory, OutputFile, OutputSymlink};
use remote_apis::{Digest, DigestFunction, merkle};

use super::cache::Key;
use super::inputs::TreeLimits;
use super::isolation::FilePolicy;
use crate::error::{Error, Result};
use crate::execution::platform::Platform;

/// Bounds on what one action may output: bytes (output files, files in
/// output directories, stdout and stderr) and files (symlinks included).
/// The worker's `[worker] max_output_bytes` / `max_output_files`, lowered
/// per action by the platform properties `output_bytes_limit` and
/// `output_files_limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLimits {
    pub max_bytes: u64,
    pub max_files: u64,
}

/// 16 GiB: 4x the largest single outputs of real builds (a linked browser
/// with debug info, a container layer, a few GB each) while a runaway
/// action stops well before it fills a worker's disk. 1,000,000 files:
/// 10x the largest real output trees (a generated SDK, `node_modules`).
impl Default for OutputLimits {
    fn default() -> Self {
        OutputLimits { max_bytes: 16 << 30, max_files: 1_000_000 }
    }
}

/// The platform property that lowers the output byte limit for one action.
pub const OUTPUT_BYTES_PROPERTY: &str = "output_bytes_limit";
/// The platform property that lowers the output file limit for one action.
pub const OUTPUT_FILES_PROPERTY: &str = "output_files_limit";

impl OutputLimits {
    /// The limits for an action with `platform`: its own values where it
    /// sets lower ones (a size like `10MiB` or a number of bytes; a count),
    /// the worker's otherwise. A value that does not parse is
    /// INVALID_ARGUMENT.
    pub fn for_action(&self, platform: &Platform) -> Result<OutputLimits> {
        let mut limits = *self;
        if let Some(v) = platform.get(OUTPUT_BYTES_PROPERTY) {
            let bytes = v.trim().parse::<bytesize::ByteSize>().map_err(|_| {
                Error::invalid(format!("platform property {OUTPUT_BYTES_PROPERTY}={v:?} is not a size (e.g. 10MiB)"))
            })?;
            limits.max_bytes = limits.max_bytes.min(bytes.as_u64());
        }
        if let Some(v) = platform.get(OUTPUT_FILES_PROPERTY) {
            let files = v.trim().parse::<u64>().map_err(|_| {
                Error::invalid(format!("platform property {OUTPUT_FILES_PROPERTY}={v:?} is not a number of files"))
            })?;
            limits.max_files = limits.max_files.min(files);
        }
        Ok(limits)
    }
}

/// What an action has output so far, checked against its limits at each
/// addition.
pub struct Tally {
    limits: OutputLimits,
    bytes: u64,
    files: u64,
}

impl Tally {
    pub fn new(limits: OutputLimits) -> Self {
        Tally { limits, bytes: 0, files: 0 }
    }

    /// Counts `bytes` more (stdout, stderr: no file).
    pub fn add_bytes(&mut self, bytes: u64) -> Result<()> {
        self.bytes = self.bytes.saturating_add(bytes);
        if self.bytes > self.limits.max_bytes {
            return Err(Error::resource_exhausted(format!(
                "the action's outputs (files, directories, stdout and stderr) hold at least {} bytes, more than \
                 this action's limit of {} bytes ({OUTPUT_BYTES_PROPERTY}; [worker] max_output_bytes); \
                 nothing was uploaded",
                self.bytes, self.limits.max_bytes
            )));
        }
        Ok(())
    }

    /// Counts one file or symlink of `bytes`.
    pub fn add_file(&mut self, bytes: u64) -> Result<()> {
        self.files += 1;
        if self.files > self.limits.max_files {
            return Err(Error::resource_exhausted(format!(
                "the action output at least {} files and symlinks, more than this action's limit of {} \
                 ({OUTPUT_FILES_PROPERTY}; [worker] max_output_files); nothing was uploaded",
                self.files, self.limits.max_files
            )));
        }
        self.add_bytes(bytes)
    }
}

/// Where and how output files are taken over before they are hashed: the
/// runner's policy and a directory only the worker reaches.
pub struct Staging<'a> {
    pub policy: FilePolicy,
    pub dir: &'a Path,
}

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
/// outputs themselves) below `root`, refusing to go through a symlink, and
/// gives those it creates to the action's owner. Returns the working
/// directory. Blocking.
pub fn prepare(root: &Path, command: &Command, limits: &TreeLimits, policy: FilePolicy) -> Result<PathBuf> {
    let wd = merkle::path_components(&command.working_directory)
        .map_err(|e| Error::bad_field("command.working_directory", e.0))?;
    let mut made = HashSet::new();
    let working_dir = make_dirs(root, &wd, "the working directory", policy, &mut made)?;
    for path in declared(command).into_keys() {
        let parts = resolve(command, path, limits)?;
        if let Some((_, parents)) = parts.split_last() {
            make_dirs(root, parents, &format!("output {}", quote(path)), policy, &mut made)?;
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
fn make_dirs(
    root: &Path,
    parts: &[&str],
    what: &str,
    policy: FilePolicy,
    made: &mut HashSet<PathBuf>,
) -> Result<PathBuf> {
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
                std::fs::create_dir(&at)
                    .and_then(|()| policy.give_dir(&at))
                    .map_err(|e| Error::io(format!("{what}: creating a parent"), e))?;
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

/// Collects the outputs (blocking: hashes files). The tree limits bound
/// every output directory's depth and, together, their directories and
/// files; `tally` counts bytes and files against the output limits before
/// each file is read. Output files are staged first under a sandboxing
/// policy.
#[allow(deprecated)] // 2.0 clients read the split symlink fields
pub fn collect(
    function: DigestFunction,
    root: &Path,
    command: &Command,
    limits: &TreeLimits,
    staging: &Staging<'_>,
    tally: &mut Tally,
) -> Result<Collected> {
    let mut out = Collected { result: ActionResult::default(), uploads: Vec::new(), adopt: Vec::new() };
    let mut counted = Counted::default();
    let v21 = !command.output_paths.is_empty();
    for (path, declared) in declared(command) {
        let parts = resolve(command, path, limits)?;
        let Some(full) = locate(root, &parts, path)? else { continue };
        let Ok(meta) = std::fs::symlink_metadata(&full) else { continue };
        let kind = meta.file_type();
        if kind.is_symlink() {
            tally.add_file(0)?;
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
            tally.add_file(meta.len())?;
            let (full, executable) = stage(staging, &full, path, &meta, out.adopt.len())?;
            let digest = merkle::hash_file_blocking(function, &full).map_err(|e| Error::io(full.display(), e))?;
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
            let tree = walk(function, &full, path, limits, &mut counted, tally)?;
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

/// The output file at `full` as it will be hashed, uploaded and cached:
/// taken over into the staging directory (as `n`) under a sandboxing
/// policy, where the action can no longer change it; as it is otherwise
/// (the plain runner's trusted actions). With whether it is executable.
fn stage(
    staging: &Staging<'_>,
    full: &Path,
    path: &str,
    meta: &std::fs::Metadata,
    n: usize,
) -> Result<(PathBuf, bool)> {
    if !staging.policy.stages_outputs() {
        return Ok((full.to_path_buf(), meta.permissions().mode() & 0o111 != 0));
    }
    let staged = staging.dir.join(n.to_string());
    let secured = staging.policy.secure_output(full, &staged).map_err(|e| {
        Error::new(tonic::Code::FailedPrecondition, format!("output {}: taking it over: {e}", quote(path)))
    })?;
    if secured.len != meta.len() {
        // Changed since it was counted: nothing of the action may still run.
        return Err(Error::new(
            tonic::Code::FailedPrecondition,
            format!("output {} changed while it was collected", quote(path)),
        ));
    }
    Ok((staged, secured.executable))
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
    tally: &mut Tally,
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
        tally.add_file(if kind.is_file() { meta.len() } else { 0 })?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn platform(pairs: &[(&str, &str)]) -> Platform {
        Platform::new(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn an_action_can_lower_the_limits_never_raise_them() {
        let worker = OutputLimits { max_bytes: 1 << 30, max_files: 1000 };
        assert_eq!(worker.for_action(&platform(&[])).unwrap(), worker);
        let lowered = worker.for_action(&platform(&[("output_bytes_limit", "10MiB"), ("output_files_limit", "5")]));
        assert_eq!(lowered.unwrap(), OutputLimits { max_bytes: 10 << 20, max_files: 5 });
        let raised = worker.for_action(&platform(&[("output_bytes_limit", "1TiB"), ("output_files_limit", "9999")]));
        assert_eq!(raised.unwrap(), worker);
        assert_eq!(worker.for_action(&platform(&[("output_bytes_limit", "123")])).unwrap().max_bytes, 123);
        for bad in [("output_bytes_limit", "lots"), ("output_files_limit", "-1"), ("output_files_limit", "1k")] {
            let err = worker.for_action(&platform(&[bad])).unwrap_err();
            assert_eq!(err.code, tonic::Code::InvalidArgument, "{bad:?}");
            assert!(err.message.contains(bad.0), "{}", err.message);
        }
    }

    #[test]
    fn the_tally_names_the_limit_and_the_amount() {
        let mut tally = Tally::new(OutputLimits { max_bytes: 100, max_files: 2 });
        tally.add_bytes(60).unwrap();
        tally.add_file(40).unwrap();
        let err = tally.add_file(1).unwrap_err();
        assert_eq!(err.code, tonic::Code::ResourceExhausted);
        assert!(
            err.message.contains("at least 101 bytes") && err.message.contains("limit of 100 bytes"),
            "{}",
            err.message
        );
        assert!(err.message.contains("max_output_bytes"), "{}", err.message);
        let err = tally.add_file(0).unwrap_err();
        assert!(err.message.contains("at least 3 files") && err.message.contains("limit of 2"), "{}", err.message);
        assert!(err.message.contains("max_output_files"), "{}", err.message);
    }

    fn command(paths: &[&str]) -> Command {
        Command { output_paths: paths.iter().map(|p| p.to_string()).collect(), ..Default::default() }
    }

    /// Under a sandboxing policy an output file is hashed, uploaded and
    /// adopted from the worker's staged copy, not from the action's path.
    #[test]
    fn staged_outputs_are_the_workers() {
        let dir = tempfile::tempdir().unwrap();
        let (root, staged) = (dir.path().join("root"), dir.path().join("staged"));
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::create_dir(&staged).unwrap();
        std::fs::write(root.join("out"), b"output").unwrap();
        std::fs::write(root.join("d/f"), b"in a directory").unwrap();
        let policy = FilePolicy { action_owner: None, copy_inputs: true };
        let staging = Staging { policy, dir: &staged };
        let mut tally = Tally::new(OutputLimits::default());
        let function = DigestFunction::Sha256;
        let c =
            collect(function, &root, &command(&["out", "d"]), &TreeLimits::default(), &staging, &mut tally).unwrap();
        assert_eq!(c.adopt.len(), 1);
        let (key, path) = &c.adopt[0];
        assert_eq!(key.digest, function.digest_of(b"output"));
        assert!(path.starts_with(&staged), "{}", path.display());
        let meta = std::fs::metadata(path).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o444);
        assert_ne!(meta.ino(), std::fs::metadata(root.join("out")).unwrap().ino());
        // The action's file changing afterwards changes nothing collected.
        std::fs::write(root.join("out"), b"CORRUPTED").unwrap();
        assert_eq!(std::fs::read(path).unwrap(), b"output");
    }

    #[test]
    fn over_the_limits_nothing_is_collected() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(root.join("out"), vec![0u8; 600]).unwrap();
        for i in 0..5 {
            std::fs::write(root.join(format!("d/{i}")), b"x").unwrap();
        }
        let staging = Staging { policy: FilePolicy::default(), dir: dir.path() };
        let cases = [
            (OutputLimits { max_bytes: 500, max_files: 100 }, "limit of 500 bytes"),
            (OutputLimits { max_bytes: 10_000, max_files: 4 }, "limit of 4"),
        ];
        for (limits, expected) in cases {
            let mut tally = Tally::new(limits);
            let result = collect(
                DigestFunction::Sha256,
                &root,
                &command(&["out", "d"]),
                &TreeLimits::default(),
                &staging,
                &mut tally,
            );
            let err = result.err().expect("over a limit");
            assert_eq!(err.code, tonic::Code::ResourceExhausted);
            assert!(err.message.contains(expected), "{}", err.message);
        }
    }
}
