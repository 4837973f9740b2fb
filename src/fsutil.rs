//! Filesystem helpers that stay safe on trees a client or an action built:
//! any depth, any path length, read-only directories.
//!
//! `std::fs::remove_dir_all` recurses (one stack frame and one open file
//! descriptor per level), so a 100,000-deep directory left by an action
//! overflows the stack or runs out of descriptors, and such a tree is too
//! deep to name by path at all (PATH_MAX is 4096 bytes). [`remove_tree`]
//! walks with `openat`/`unlinkat` relative to one open directory at a time.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Removes `path` and everything below it, whatever its depth, holding at
/// most three file descriptors. Read-only directories (actions leave them)
/// are made writable first. Symlinks are removed, never followed. An absent
/// `path` is not an error.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return ignore_absent(std::fs::remove_file(path));
    }
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let top = match open_dir_at(libc::AT_FDCWD, &c_path) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
            open_dir_at(libc::AT_FDCWD, &c_path)?
        }
        other => other?,
    };
    empty_dir(top)?;
    match std::fs::remove_dir(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// One directory being emptied: what is left to remove in it.
struct Frame {
    /// The directory's (device, inode), to check that `..` leads back to it.
    id: (u64, u64),
    /// The child being emptied, removed once the walk comes back up.
    child: CString,
    /// Entries not yet looked at.
    pending: Vec<CString>,
}

/// Empties the directory open as `dir`, depth first without recursion: the
/// stack holds names and inode numbers, not descriptors.
fn empty_dir(dir: OwnedFd) -> io::Result<()> {
    let mut cur = dir;
    let mut pending = list(&cur)?;
    let mut stack: Vec<Frame> = Vec::new();
    loop {
        if let Some(name) = pending.pop() {
            if let Some(child) = unlink_or_open(&cur, &name)? {
                let id = identity(&cur)?;
                let parent_pending = std::mem::replace(&mut pending, list(&child)?);
                stack.push(Frame { id, child: name, pending: parent_pending });
                cur = child;
            }
            continue;
        }
        let Some(frame) = stack.pop() else { return Ok(()) };
        let parent = open_dir_at(cur.as_raw_fd(), c"..")?;
        if identity(&parent)? != frame.id {
            return Err(io::Error::other("a directory was moved while it was being removed"));
        }
        cur = parent;
        retry_writable(&cur, || {
            cvt(unsafe { libc::unlinkat(cur.as_raw_fd(), frame.child.as_ptr(), libc::AT_REMOVEDIR) })
        })?;
        pending = frame.pending;
    }
}

/// Removes a non-directory entry; a directory is opened instead (made
/// readable if needed) and returned, to be emptied first.
fn unlink_or_open(dir: &OwnedFd, name: &CStr) -> io::Result<Option<OwnedFd>> {
    let unlinked = retry_writable(dir, || cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) }));
    match unlinked {
        Ok(_) => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        // Linux reports a directory as EISDIR; POSIX allows EPERM.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EISDIR) | Some(libc::EPERM)) => {
            match open_dir_at(dir.as_raw_fd(), name) {
                Ok(fd) => Ok(Some(fd)),
                Err(open) if open.raw_os_error() == Some(libc::EACCES) => {
                    // SAFETY: a NUL-terminated name relative to a descriptor we own.
                    cvt(unsafe { libc::fchmodat(dir.as_raw_fd(), name.as_ptr(), 0o700, 0) })?;
                    open_dir_at(dir.as_raw_fd(), name).map(Some)
                }
                Err(open) if open.raw_os_error() == Some(libc::ENOTDIR) => Err(e),
                Err(open) => Err(open),
            }
        }
        Err(e) => Err(e),
    }
}

/// Runs `op`; when it is refused for permissions, makes `dir` writable and
/// searchable (its owner may have made it read-only) and runs it once more.
fn retry_writable<T>(dir: &OwnedFd, mut op: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    match op() {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM)) => {
            // SAFETY: fchmod on a descriptor we own.
            if unsafe { libc::fchmod(dir.as_raw_fd(), 0o700) } != 0 {
                return Err(e);
            }
            op()
        }
        other => other,
    }
}

/// Opens a directory relative to `dir` without following a symlink.
fn open_dir_at(dir: RawFd, name: &CStr) -> io::Result<OwnedFd> {
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: a NUL-terminated name; the returned descriptor is new and ours.
    let fd = cvt(unsafe { libc::openat(dir, name.as_ptr(), flags) })?;
    // SAFETY: `fd` was just opened and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The names in a directory, without `.` and `..`.
fn list(dir: &OwnedFd) -> io::Result<Vec<CString>> {
    // A descriptor of its own: `fdopendir` takes it over and reads from its
    // offset.
    let fd = open_dir_at(dir.as_raw_fd(), c".")?.into_raw_fd();
    // SAFETY: `fd` is an open directory descriptor that the stream now owns.
    let stream = unsafe { libc::fdopendir(fd) };
    if stream.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so `fd` is still ours to close.
        unsafe { libc::close(fd) };
        return Err(e);
    }
    let mut names = Vec::new();
    let result = loop {
        // SAFETY: readdir reports errors only through errno, so clear it.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `stream` is open until closedir below.
        let entry = unsafe { libc::readdir(stream) };
        if entry.is_null() {
            let e = io::Error::last_os_error();
            break if e.raw_os_error() == Some(0) { Ok(()) } else { Err(e) };
        }
        // SAFETY: d_name is NUL-terminated and valid until the next readdir.
        let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
        if name != c"." && name != c".." {
            names.push(name.to_owned());
        }
    };
    // SAFETY: closes the stream (and `fd`) exactly once.
    unsafe { libc::closedir(stream) };
    result.map(|()| names)
}

fn identity(dir: &OwnedFd) -> io::Result<(u64, u64)> {
    let file = std::mem::ManuallyDrop::new(
        // SAFETY: borrowed for fstat only; ManuallyDrop keeps it open.
        unsafe { std::fs::File::from_raw_fd(dir.as_raw_fd()) },
    );
    let meta = file.metadata()?;
    Ok((meta.dev(), meta.ino()))
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

fn ignore_absent(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Creates `depth` nested directories named `d` below `dir` with
    /// relative operations (the full path is longer than PATH_MAX).
    fn deep(dir: &Path, depth: usize) {
        let c = CString::new(dir.as_os_str().as_bytes()).unwrap();
        let mut cur = open_dir_at(libc::AT_FDCWD, &c).unwrap();
        for _ in 0..depth {
            // SAFETY: test code, a descriptor we own.
            cvt(unsafe { libc::mkdirat(cur.as_raw_fd(), c"d".as_ptr(), 0o755) }).unwrap();
            cur = open_dir_at(cur.as_raw_fd(), c"d").unwrap();
        }
        std::fs::write(format!("/proc/self/fd/{}/leaf", cur.as_raw_fd()), b"x").unwrap();
    }

    #[test]
    fn removes_a_tree_deeper_than_path_max_and_the_stack() {
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().join("top");
        std::fs::create_dir(&top).unwrap();
        // Deeper than PATH_MAX can name (10,000 bytes of path), on a stack
        // that a recursive walk of 5,000 levels would overflow.
        deep(&top, 5_000);
        std::fs::write(top.join("f"), b"x").unwrap();
        let t = top.clone();
        std::thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(move || remove_tree(&t))
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        assert!(!top.exists());
    }

    #[test]
    fn removes_read_only_directories_symlinks_and_wide_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().join("top");
        std::fs::create_dir_all(top.join("ro/inner")).unwrap();
        std::fs::write(top.join("ro/inner/f"), b"x").unwrap();
        for i in 0..2000 {
            std::fs::create_dir(top.join(format!("w{i}"))).unwrap();
        }
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, top.join("link")).unwrap();
        std::fs::set_permissions(top.join("ro/inner"), std::fs::Permissions::from_mode(0o500)).unwrap();
        std::fs::set_permissions(top.join("ro"), std::fs::Permissions::from_mode(0o000)).unwrap();
        remove_tree(&top).unwrap();
        assert!(!top.exists());
        assert!(outside.join("keep").exists(), "a symlink was followed");
        remove_tree(&top).unwrap();
        // A file or a symlink at the top is removed itself.
        std::fs::write(&top, b"x").unwrap();
        remove_tree(&top).unwrap();
        std::os::unix::fs::symlink(&outside, &top).unwrap();
        remove_tree(&top).unwrap();
        assert!(outside.join("keep").exists());
    }
}
