//! How an action's files must be laid out so that the action cannot change
//! a blob another action or the worker's cache sees: who owns what the
//! worker creates for the action, and whether inputs may be hard links into
//! the cache at all. The runner decides (it knows which uid the command runs
//! as); input materialization and output adoption obey.
//!
//! Three policies, one per kind of runner:
//! - `action_owner: Some((uid, gid))` (a root worker running the command as
//!   another uid): inputs are hard links to cache files that the worker owns
//!   with no write bit, so the command can neither write nor chmod them;
//!   every directory the worker creates for the action is the command's, so
//!   it may delete, rename and create files. An output is taken over through
//!   one descriptor opened without following symlinks: chowned to the worker
//!   and made read-only, then linked into a directory only the worker can
//!   reach, when it has one link; copied otherwise.
//! - `copy_inputs` (the command runs as the worker's own uid): inputs are
//!   private copies (reflinks where the filesystem has them) and outputs are
//!   copied out before they are hashed, uploaded or cached.
//! - the default (the plain runner, for trusted actions only): today's hard
//!   links, which an action running as the cache's owner can chmod and
//!   rewrite. Nothing protects the cache from such an action.
//!
//! Every runner that is not the plain one must guarantee that no process of
//! the action is alive when outputs are collected: chown and chmod do not
//! take back a descriptor the action opened for writing before.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// What the runner requires of the files it is given.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FilePolicy {
    /// The (uid, gid) the command runs as when it is not the worker's own:
    /// directories the worker creates for the action are given to it, and
    /// files it cannot own (hard-linked inputs, adopted outputs) stay the
    /// worker's and read-only.
    pub action_owner: Option<(u32, u32)>,
    /// The command runs as the uid that owns the cache, so a hard link
    /// would let it change cached bytes: inputs are copies (reflinks where
    /// the filesystem has them) and outputs are copied into the cache.
    pub copy_inputs: bool,
}

/// An output file the action can no longer change, in the worker's own
/// staging directory.
#[derive(Debug)]
pub struct Secured {
    pub executable: bool,
    pub len: u64,
}

impl FilePolicy {
    /// Whether outputs are taken over (staged) before they are hashed: every
    /// policy but the plain runner's.
    pub fn stages_outputs(&self) -> bool {
        self.action_owner.is_some() || self.copy_inputs
    }

    /// Gives `dir`, a directory the worker just created for the action, to
    /// the command's uid, so the command can create and delete files there.
    /// Never follows a symlink.
    pub fn give_dir(&self, dir: &Path) -> io::Result<()> {
        match self.action_owner {
            Some((uid, gid)) => std::os::unix::fs::lchown(dir, Some(uid), Some(gid)),
            None => Ok(()),
        }
    }

    /// Places the cache file `source` at `target` in an input root: a hard
    /// link (a copy where linking is impossible), or a private copy when the
    /// command runs as the cache's owner. NotFound when `source` is gone.
    pub fn place_input(&self, source: &Path, target: &Path) -> io::Result<()> {
        if self.copy_inputs {
            let from = File::open(source)?;
            let mode = from.metadata()?.permissions().mode() & 0o7777;
            return clone_or_copy(&from, target, mode);
        }
        match std::fs::hard_link(source, target) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(e),
            Err(_) => std::fs::copy(source, target).map(|_| ()),
        }
    }

    /// Takes the output file at `path` over into `staged` (a new path in a
    /// directory only the worker reaches), so that nothing the action left
    /// behind can change it: worker-owned, read-only (0444, 0555 when any
    /// execute bit is set), its bytes fixed. `path` is opened once, without
    /// following a symlink; that descriptor is what gets linked or copied.
    /// A file with one link that the action owns is linked (free); anything
    /// else (an input hard-linked as an output, a file of the worker's, any
    /// file under `copy_inputs`) is copied.
    pub fn secure_output(&self, path: &Path, staged: &Path) -> io::Result<Secured> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)?;
        let meta = file.metadata()?;
        if !meta.file_type().is_file() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
        }
        let executable = meta.mode() & 0o111 != 0;
        let mode = if executable { 0o555 } else { 0o444 };
        let secured = Secured { executable, len: meta.len() };
        if let Some((uid, _)) = self.action_owner
            && !self.copy_inputs
            && meta.nlink() == 1
            && meta.uid() == uid
        {
            // SAFETY: plain syscalls on a descriptor we own.
            let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
            if unsafe { libc::fchown(file.as_raw_fd(), euid, egid) } != 0 {
                return Err(io::Error::last_os_error());
            }
            file.set_permissions(std::fs::Permissions::from_mode(mode))?;
            // A link made before the chown would still name the inode: the
            // action could not write it any more, but copy to keep one rule.
            if file.metadata()?.nlink() == 1 {
                link_fd(&file, staged)?;
                return Ok(secured);
            }
        }
        clone_or_copy(&file, staged, mode)?;
        Ok(secured)
    }
}

/// Creates `target` (which must not exist) with the bytes of `from`: a
/// reflink (FICLONE) where the filesystem shares extents (btrfs, XFS), else
/// an in-kernel copy (copy_file_range, through `std::io::copy`). The new
/// file gets `mode` once its bytes are in place.
pub fn clone_or_copy(from: &File, target: &Path, mode: u32) -> io::Result<()> {
    let mut to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(target)?;
    let copied = (|| {
        // SAFETY: FICLONE takes the source descriptor as its argument.
        if unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONE, from.as_raw_fd()) } != 0 {
            let mut reader = from;
            // Copy from the start, whoever read the descriptor before.
            io::Seek::seek(&mut reader, io::SeekFrom::Start(0))?;
            io::copy(&mut reader, &mut to)?;
        }
        to.set_permissions(std::fs::Permissions::from_mode(mode))
    })();
    if copied.is_err() {
        let _ = std::fs::remove_file(target);
    }
    copied
}

/// Links the file open as `file` at `target`, through the descriptor (no
/// path the action can swap is looked up again).
pub fn link_fd(file: &File, target: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let target = CString::new(target.as_os_str().as_bytes())?;
    let empty = c"";
    // SAFETY: valid C strings; AT_EMPTY_PATH links the descriptor itself
    // (needs CAP_DAC_READ_SEARCH, which a root worker has).
    let r =
        unsafe { libc::linkat(file.as_raw_fd(), empty.as_ptr(), libc::AT_FDCWD, target.as_ptr(), libc::AT_EMPTY_PATH) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::ENOENT) && e.raw_os_error() != Some(libc::EPERM) {
        return Err(e);
    }
    // Without the capability: the descriptor's /proc entry, followed.
    let proc = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::linkat(libc::AT_FDCWD, proc.as_ptr(), libc::AT_FDCWD, target.as_ptr(), libc::AT_SYMLINK_FOLLOW)
    };
    if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    const NOBODY: (u32, u32) = (65534, 65534);

    fn is_root() -> bool {
        // SAFETY: no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// A temporary directory another uid can traverse.
    fn shared_tempdir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    /// Runs `sh -c script` in `dir` as `owner`; returns whether it succeeded.
    fn run_as(owner: (u32, u32), dir: &Path, script: &str) -> bool {
        std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .current_dir(dir)
            .uid(owner.0)
            .gid(owner.1)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
    }

    /// The repro from issue 10, as the uid the runner picks: the hard-linked
    /// cache file keeps its bytes, while the command still owns its
    /// directory (it may replace the name with a file of its own).
    #[test]
    fn another_uid_cannot_change_a_linked_input() {
        if !is_root() {
            eprintln!("skipped: needs root to run a command as another uid");
            return;
        }
        let dir = shared_tempdir();
        let cache = dir.path().join("cache");
        std::fs::create_dir(&cache).unwrap();
        let blob = cache.join("blob");
        std::fs::write(&blob, b"original").unwrap();
        std::fs::set_permissions(&blob, std::fs::Permissions::from_mode(0o444)).unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let policy = FilePolicy { action_owner: Some(NOBODY), copy_inputs: false };
        policy.give_dir(&root).unwrap();
        policy.place_input(&blob, &root.join("in.txt")).unwrap();
        assert_eq!(std::fs::metadata(root.join("in.txt")).unwrap().ino(), std::fs::metadata(&blob).unwrap().ino());

        assert!(!run_as(NOBODY, &root, "chmod u+w in.txt || exit 1; echo CORRUPTED > in.txt"));
        assert!(!run_as(NOBODY, &root, "echo CORRUPTED > in.txt"));
        assert_eq!(std::fs::read(&blob).unwrap(), b"original");
        assert!(run_as(NOBODY, &root, "rm -f in.txt && echo X > in.txt && mkdir sub && echo Y > sub/f"));
        assert_eq!(std::fs::read(&blob).unwrap(), b"original");
        assert_eq!(std::fs::read(root.join("in.txt")).unwrap(), b"X\n");
        assert_eq!(std::fs::metadata(&root).unwrap().uid(), NOBODY.0);
    }

    /// Under `copy_inputs` an input is a separate inode: rewriting it, even
    /// as the cache's owner, leaves the cache file alone.
    #[test]
    fn copied_inputs_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("blob");
        std::fs::write(&blob, vec![7u8; 300_000]).unwrap();
        std::fs::set_permissions(&blob, std::fs::Permissions::from_mode(0o555)).unwrap();
        let policy = FilePolicy { action_owner: None, copy_inputs: true };
        let input = dir.path().join("in");
        policy.place_input(&blob, &input).unwrap();
        let meta = std::fs::metadata(&input).unwrap();
        assert_ne!(meta.ino(), std::fs::metadata(&blob).unwrap().ino());
        assert_eq!(meta.mode() & 0o7777, 0o555, "the copy keeps the cache file's mode");
        std::fs::set_permissions(&input, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(&input, b"CORRUPTED").unwrap();
        assert_eq!(std::fs::read(&blob).unwrap(), vec![7u8; 300_000]);
        // An existing target is never overwritten (nor followed).
        assert_eq!(policy.place_input(&blob, &input).unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(
            policy.place_input(&dir.path().join("gone"), &dir.path().join("x")).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn clone_or_copy_copies_from_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("s");
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&source, &data).unwrap();
        let mut from = File::open(&source).unwrap();
        io::Read::read_exact(&mut from, &mut [0u8; 10]).unwrap();
        clone_or_copy(&from, &dir.path().join("t"), 0o444).unwrap();
        assert_eq!(std::fs::read(dir.path().join("t")).unwrap(), data);
        assert_eq!(std::fs::metadata(dir.path().join("t")).unwrap().mode() & 0o7777, 0o444);
    }

    /// An output the action owns with one link is taken over in place:
    /// worker-owned, read-only, the same inode; the action can then neither
    /// write nor chmod it.
    #[test]
    fn an_owned_output_is_taken_over_by_link() {
        if !is_root() {
            eprintln!("skipped: needs root to run a command as another uid");
            return;
        }
        let dir = shared_tempdir();
        let (root, staging) = (dir.path().join("root"), dir.path().join("staging"));
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(&staging).unwrap();
        let policy = FilePolicy { action_owner: Some(NOBODY), copy_inputs: false };
        policy.give_dir(&root).unwrap();
        assert!(run_as(NOBODY, &root, "echo out > out.txt && chmod 700 out.txt && echo x > y && ln y z"));
        let staged = staging.join("0");
        let secured = policy.secure_output(&root.join("out.txt"), &staged).unwrap();
        assert!(secured.executable);
        assert_eq!(secured.len, 4);
        let meta = std::fs::metadata(&staged).unwrap();
        assert_eq!(meta.ino(), std::fs::metadata(root.join("out.txt")).unwrap().ino());
        assert_eq!((meta.uid(), meta.mode() & 0o7777), (0, 0o555));
        assert!(!run_as(NOBODY, &root, "chmod u+w out.txt || exit 1; echo CORRUPTED > out.txt"));
        assert_eq!(std::fs::read(&staged).unwrap(), b"out\n");

        // Two links: copied, the action's inode left as it was.
        let staged = staging.join("1");
        policy.secure_output(&root.join("y"), &staged).unwrap();
        let meta = std::fs::metadata(&staged).unwrap();
        assert_ne!(meta.ino(), std::fs::metadata(root.join("y")).unwrap().ino());
        assert_eq!((meta.uid(), meta.mode() & 0o7777, meta.nlink()), (0, 0o444, 1));
        assert_eq!(std::fs::metadata(root.join("y")).unwrap().uid(), NOBODY.0);
    }

    /// A symlink planted where an output was is never followed, and a
    /// FIFO does not block.
    #[test]
    fn outputs_are_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"secret").unwrap();
        std::os::unix::fs::symlink(&secret, dir.path().join("out")).unwrap();
        for policy in [
            FilePolicy { action_owner: None, copy_inputs: true },
            FilePolicy { action_owner: Some(NOBODY), copy_inputs: false },
        ] {
            let err = policy.secure_output(&dir.path().join("out"), &dir.path().join("staged")).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::ELOOP), "{policy:?}");
            assert!(!dir.path().join("staged").exists());
        }
        let fifo = std::ffi::CString::new(dir.path().join("fifo").to_str().unwrap()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let policy = FilePolicy { action_owner: None, copy_inputs: true };
        let err = policy.secure_output(&dir.path().join("fifo"), &dir.path().join("staged")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn a_descriptor_is_linked_by_itself() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"a").unwrap();
        let file = File::open(dir.path().join("a")).unwrap();
        std::fs::rename(dir.path().join("a"), dir.path().join("moved")).unwrap();
        link_fd(&file, &dir.path().join("b")).unwrap();
        assert_eq!(std::fs::metadata(dir.path().join("b")).unwrap().ino(), file.metadata().unwrap().ino());
    }
}
