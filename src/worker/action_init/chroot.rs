//! The init's chroot (`chroot=input-root`): the action's directory becomes
//! the command's `/`.
//!
//! In the helper's private mount namespace, before it spawns the command,
//! the directory is bound onto itself (`pivot_root` wants a mount point)
//! and gets what a build needs and nothing of the host: a `/proc` of the
//! sandbox's PID namespace (read-only), a read-only `/dev` tmpfs holding the
//! host's `null`, `zero`, `full`, `random`, `urandom` and `tty` (bound in),
//! the `fd`, `stdin`, `stdout` and `stderr` links and a writable `shm`, and
//! a fresh `/tmp` unless the input root has one with something in it. `pivot_root` then makes it
//! the root and the host's tree is detached: no path of the host resolves
//! any more, absolute symlinks in the input root included.
//!
//! The mount points (`dev`, `proc`, `tmp`) are made by the worker, which
//! checked that they are directories and removes the ones it made after the
//! run (see `runner::chroot`); they are checked again here.

use std::io;
use std::path::{Path, PathBuf};

use super::Chroot;
use super::sandbox::{check, context, cstring, mount, read_only};

/// Devices bound from the host's `/dev` (those it has).
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];
/// Links in `/dev`, as every libc and shell expects them.
const LINKS: &[(&str, &str)] = &[
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
];

/// Makes `root` the root of this mount namespace (mounts private first);
/// returns `cwd`, a path under `root` on the host, as seen from the new root
/// (`/` when it is not under `root`).
pub(super) fn enter(root: &Path, chroot: Chroot, cwd: Option<&Path>) -> io::Result<PathBuf> {
    mount(None, "/", None, libc::MS_REC | libc::MS_PRIVATE, None).map_err(|e| context(e, "making mounts private"))?;
    let canonical = std::fs::canonicalize(root).map_err(|e| context(e, &format!("resolving {}", root.display())))?;
    let inside = cwd
        .and_then(|c| c.strip_prefix(&canonical).ok())
        .map_or_else(|| PathBuf::from("/"), |r| Path::new("/").join(r));
    let root = canonical.as_path();
    let root_str = root.to_str().ok_or_else(|| io::Error::other("the action directory's path is not UTF-8"))?;
    mount(Some(root_str), root, None, libc::MS_BIND | libc::MS_REC, None)
        .map_err(|e| context(e, "binding the input root onto itself"))?;
    make_dev(&mount_point(root, "dev")?)?;
    mount(
        Some("proc"),
        mount_point(root, "proc")?,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )
    .map_err(|e| context(e, "mounting /proc"))?;
    if chroot.tmp {
        mount(
            Some("tmpfs"),
            mount_point(root, "tmp")?,
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=1777"),
        )
        .map_err(|e| context(e, "mounting a tmpfs at /tmp"))?;
    }
    pivot(root)?;
    read_only(Path::new("/proc"), false, true)?;
    Ok(inside)
}

/// `root/name`, which must be a directory (not a symlink: a mount on it
/// would land where the link points).
fn mount_point(root: &Path, name: &str) -> io::Result<PathBuf> {
    let path = root.join(name);
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() => Ok(path),
        Ok(_) => Err(io::Error::other(format!("the input root's /{name} is not a directory"))),
        Err(e) => Err(context(e, &format!("the input root's /{name}"))),
    }
}

/// A tmpfs at `dev` with the host's devices bound in, the links and a
/// writable `shm`; read-only (the devices stay writable: they are mounts of
/// their own).
fn make_dev(dev: &Path) -> io::Result<()> {
    let flags = libc::MS_NOSUID | libc::MS_NOEXEC;
    mount(Some("tmpfs"), dev, Some("tmpfs"), flags, Some("mode=0755,size=64k"))
        .map_err(|e| context(e, "mounting a tmpfs at /dev"))?;
    for name in DEVICES {
        let host = Path::new("/dev").join(name);
        if std::fs::symlink_metadata(&host).is_err() {
            continue;
        }
        let at = dev.join(name);
        std::fs::File::create(&at).map_err(|e| context(e, &format!("creating /dev/{name}")))?;
        mount(Some(&format!("/dev/{name}")), &at, None, libc::MS_BIND, None)
            .map_err(|e| context(e, &format!("binding /dev/{name}")))?;
    }
    for (name, target) in LINKS {
        std::os::unix::fs::symlink(target, dev.join(name)).map_err(|e| context(e, &format!("linking /dev/{name}")))?;
    }
    let shm = dev.join("shm");
    std::fs::create_dir(&shm).map_err(|e| context(e, "creating /dev/shm"))?;
    mount(Some("tmpfs"), &shm, Some("tmpfs"), libc::MS_NOSUID | libc::MS_NODEV, Some("mode=1777"))
        .map_err(|e| context(e, "mounting a tmpfs at /dev/shm"))?;
    read_only(dev, false, true)
}

/// `pivot_root(root, root)`, then the old root (stacked on the new one)
/// detached: only `root`'s tree is left.
fn pivot(root: &Path) -> io::Result<()> {
    let c = cstring(root)?;
    let dot = c".";
    // SAFETY: valid C strings; chdir, pivot_root and umount2 take nothing else.
    unsafe {
        check(libc::chdir(c.as_ptr()), "entering the input root")?;
        check(libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) as i32, "pivot_root")?;
        check(libc::umount2(dot.as_ptr(), libc::MNT_DETACH), "detaching the host's root")?;
        check(libc::chdir(c"/".as_ptr()), "entering /")?;
    }
    Ok(())
}
