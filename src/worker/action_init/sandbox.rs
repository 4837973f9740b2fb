//! The init's sandboxed run: namespaces, the PID-1 helper, the mounts.
//!
//! The init is single-threaded, so the helper it forks may run ordinary
//! Rust (allocate, spawn) before it execs the command.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use super::{Options, Sandbox, Signals, exit_code, fail, prepare_exec, supervise, tell_worker};

/// Sets up the namespaces, forks the helper (PID 1 of the new PID
/// namespace), and supervises it as the plain init supervises the command.
pub(super) fn run(sandbox: &Sandbox, options: &Options, signals: &Signals, command: std::process::Command) -> u8 {
    if let Err(e) = enter_namespaces(sandbox) {
        return fail(&format!("sandbox: {e}"), None);
    }
    // SAFETY: the init is single-threaded; the child only runs `pid_one`.
    let helper = unsafe { libc::fork() };
    if helper < 0 {
        return fail(&format!("sandbox: fork: {}", io::Error::last_os_error()), None);
    }
    if helper == 0 {
        let code = pid_one(sandbox, options, command);
        // SAFETY: _exit never returns and runs no handler of the parent's.
        unsafe { libc::_exit(code) };
    }
    match supervise(signals, helper) {
        // The helper exits with the command's code.
        Some(status) => exit_code(status),
        None => {
            // Killing PID 1 kills every process of the namespace; the wait
            // returns once they are all gone.
            // SAFETY: kill and waitpid on our own child.
            unsafe {
                libc::kill(helper, libc::SIGKILL);
                let mut st = 0;
                libc::waitpid(helper, &mut st, 0);
            }
            128 + libc::SIGKILL as u8
        }
    }
}

fn enter_namespaces(sandbox: &Sandbox) -> io::Result<()> {
    if sandbox.user_namespace {
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        check(unsafe { libc::unshare(libc::CLONE_NEWUSER) }, "unshare(user)")?;
        std::fs::write("/proc/self/setgroups", "deny").map_err(|e| context(e, "denying setgroups"))?;
        std::fs::write("/proc/self/uid_map", format!("{uid} {uid} 1")).map_err(|e| context(e, "writing uid_map"))?;
        std::fs::write("/proc/self/gid_map", format!("{gid} {gid} 1")).map_err(|e| context(e, "writing gid_map"))?;
    }
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if !sandbox.network {
        flags |= libc::CLONE_NEWNET;
    }
    // SAFETY: unshare with flags only.
    check(unsafe { libc::unshare(flags) }, "unshare(mount, pid, net, ipc, uts)")
}

/// The helper: mounts, then the command; waits for it (reaping orphans,
/// which the kernel reparents to PID 1) and returns its exit code.
fn pid_one(sandbox: &Sandbox, options: &Options, mut command: std::process::Command) -> i32 {
    // The init only dies by SIGKILL (the worker's backstop): then so must we.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    // Read before the mounts hide it; resolved again through them (or, in
    // a chroot, made relative to the new root).
    let mut cwd = std::env::current_dir().ok();
    let prepared = match sandbox.chroot {
        Some(chroot) => {
            super::chroot::enter(&sandbox.writable, chroot, cwd.as_deref()).map(|inside| cwd = Some(inside))
        }
        None => mount_tree(sandbox),
    };
    let prepared = prepared.and_then(|()| if sandbox.network { Ok(()) } else { loopback_up() });
    if let Err(e) = prepared {
        fail(&format!("sandbox: {e}"), None);
        return 127;
    }
    if options.probe {
        tell_worker(b"ok\n");
        return 0;
    }
    if let Some((uid, gid)) = sandbox.run_as {
        // std drops supplementary groups (setgroups(0)) when root sets a uid.
        command.uid(uid).gid(gid);
    }
    if let Some(cwd) = cwd {
        command.current_dir(cwd);
    }
    let (memory, processes) = (options.memory, options.processes);
    // SAFETY: the closure only calls async-signal-safe functions.
    unsafe {
        command.pre_exec(move || {
            // No setuid binary regains what the sandbox took away.
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            prepare_exec(memory, processes)
        })
    };
    let child = match command.spawn() {
        Ok(c) => c.id() as i32,
        Err(e) => {
            fail(&e.to_string(), e.raw_os_error());
            return 127;
        }
    };
    tell_worker(b"ok\n");
    // SAFETY: the line is the init's to watch; the helper lets go of it.
    unsafe { libc::close(0) };
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid status pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == child {
            return exit_code(status) as i32;
        }
        if pid < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return 127;
        }
    }
}

/// Private mounts; hidden directories under empty read-only tmpfs, hidden
/// files under /dev/null; a private
/// `/tmp` and `/dev/shm`; the action's directory bound back; a fresh
/// `/proc`; everything else read-only.
fn mount_tree(sandbox: &Sandbox) -> io::Result<()> {
    mount(None, "/", None, libc::MS_REC | libc::MS_PRIVATE, None).map_err(|e| context(e, "making mounts private"))?;
    let action = Tree::clone(&sandbox.writable)?;
    let scratch: Vec<PathBuf> = ["/tmp", "/dev/shm"].iter().map(PathBuf::from).filter(|p| p.is_dir()).collect();
    // Outermost first; a path inside one already covered is hidden with it.
    let mut targets: Vec<(PathBuf, bool)> = sandbox
        .hide
        .iter()
        .filter(|p| p.is_dir())
        .map(|p| (p.clone(), false))
        .chain(scratch.iter().map(|p| (p.clone(), true)))
        .collect();
    targets.sort_by_key(|(p, _)| p.components().count());
    let mut covered: Vec<PathBuf> = Vec::new();
    for (path, writable) in targets {
        if path == Path::new("/") || covered.iter().any(|c| path.starts_with(c)) {
            continue;
        }
        let data = if writable { "mode=1777" } else { "mode=0755,size=64k" };
        let flags = libc::MS_NOSUID | libc::MS_NODEV;
        mount(Some("tmpfs"), &path, Some("tmpfs"), flags, Some(data))
            .map_err(|e| context(e, &format!("mounting a tmpfs over {}", path.display())))?;
        covered.push(path);
    }
    // Hidden files (a TLS key, a token file: readable by an action that
    // runs as the worker's uid) read as empty: /dev/null bound over them.
    for file in sandbox.hide.iter().filter(|p| p.is_file() && !covered.iter().any(|c| p.starts_with(c))) {
        mount(Some("/dev/null"), file, None, libc::MS_BIND, None)
            .map_err(|e| context(e, &format!("hiding {}", file.display())))?;
    }
    if covered.iter().any(|c| sandbox.writable.starts_with(c)) {
        std::fs::create_dir_all(&sandbox.writable)
            .map_err(|e| context(e, &format!("recreating {}", sandbox.writable.display())))?;
        action.attach(&sandbox.writable)?;
    }
    mount(Some("proc"), "/proc", Some("proc"), libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, None)
        .map_err(|e| context(e, "mounting /proc"))?;
    read_only(Path::new("/"), true, true)?;
    for path in scratch.iter().chain([&sandbox.writable]) {
        read_only(path, false, false)?;
    }
    Ok(())
}

/// The action's directory as a detached mount, taken before it is hidden.
enum Tree {
    /// `open_tree(OPEN_TREE_CLONE)` (Linux 5.2).
    Detached(i32),
    /// An `O_PATH` descriptor, bound through `/proc/self/fd` (before the
    /// fresh /proc replaces the host's).
    Path(i32),
}

impl Tree {
    fn clone(path: &Path) -> io::Result<Tree> {
        let c = cstring(path)?;
        const OPEN_TREE_CLONE: libc::c_uint = 1;
        const AT_RECURSIVE: libc::c_uint = 0x8000;
        let flags = OPEN_TREE_CLONE | AT_RECURSIVE | libc::O_CLOEXEC as libc::c_uint;
        // SAFETY: a valid C string; returns a descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c.as_ptr(), flags) } as i32;
        if fd >= 0 {
            return Ok(Tree::Detached(fd));
        }
        // SAFETY: as above.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC | libc::O_DIRECTORY) };
        check(fd, &format!("opening {}", path.display()))?;
        Ok(Tree::Path(fd))
    }

    fn attach(&self, at: &Path) -> io::Result<()> {
        let target = cstring(at)?;
        let what = format!("binding the action directory at {}", at.display());
        match *self {
            Tree::Detached(fd) => {
                const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
                let empty = c"";
                // SAFETY: valid descriptors and C strings.
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_move_mount,
                        fd,
                        empty.as_ptr(),
                        libc::AT_FDCWD,
                        target.as_ptr(),
                        MOVE_MOUNT_F_EMPTY_PATH,
                    )
                };
                check(r as i32, &what)
            }
            Tree::Path(fd) => {
                let source = format!("/proc/self/fd/{fd}");
                mount(Some(&source), at, None, libc::MS_BIND | libc::MS_REC, None).map_err(|e| context(e, &what))
            }
        }
    }
}

/// Sets (or clears) read-only on the mount at `path`, and on every mount
/// below it when `recursive`: `mount_setattr` (Linux 5.12), else a bind
/// remount of each mount that keeps its other flags (a user namespace may
/// not drop nosuid, nodev or noexec it inherited).
pub(super) fn read_only(path: &Path, recursive: bool, on: bool) -> io::Result<()> {
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const MOUNT_ATTR_RDONLY: u64 = 1;
    const AT_RECURSIVE: libc::c_uint = 0x8000;
    let c = cstring(path)?;
    let attr = if on {
        MountAttr { attr_set: MOUNT_ATTR_RDONLY, attr_clr: 0, propagation: 0, userns_fd: 0 }
    } else {
        MountAttr { attr_set: 0, attr_clr: MOUNT_ATTR_RDONLY, propagation: 0, userns_fd: 0 }
    };
    let flags = if recursive { AT_RECURSIVE } else { 0 };
    // SAFETY: a valid C string and a mount_attr of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c.as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() != Some(libc::ENOSYS) {
        return Err(context(error, &format!("making {} read-{}", path.display(), if on { "only" } else { "write" })));
    }
    let mounts = if recursive { mount_points_under(path)? } else { vec![path.to_path_buf()] };
    for m in mounts {
        remount(&m, on)?;
    }
    Ok(())
}

fn remount(path: &Path, read_only: bool) -> io::Result<()> {
    let c = cstring(path)?;
    // SAFETY: a zeroed statvfs filled by the kernel.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and struct.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Ok(()); // gone, or not ours to see
    }
    let keep = [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ];
    let mut flags = libc::MS_REMOUNT | libc::MS_BIND;
    for (st_flag, ms_flag) in keep {
        if st.f_flag & st_flag != 0 {
            flags |= ms_flag;
        }
    }
    if read_only {
        flags |= libc::MS_RDONLY;
    }
    mount(None, path, None, flags, None).map_err(|e| {
        context(e, &format!("remounting {} read-{}", path.display(), if read_only { "only" } else { "write" }))
    })
}

/// Mount points at or under `root`, from /proc/self/mountinfo.
fn mount_points_under(root: &Path) -> io::Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(field) = line.split(' ').nth(4) else { continue };
        let path = PathBuf::from(unescape_mountinfo(field));
        if path.starts_with(root) {
            out.push(path);
        }
    }
    Ok(out)
}

/// Mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> std::ffi::OsString {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("x"), 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    OsStr::from_bytes(&out).to_os_string()
}

/// Brings `lo` up in the new network namespace (it starts down).
fn loopback_up() -> io::Result<()> {
    // SAFETY: socket returns a descriptor or -1.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(fd, "opening a socket for loopback")?;
    // SAFETY: a zeroed ifreq named "lo", passed to the two ioctls that read
    // and write its flags; the descriptor is closed after.
    let r = unsafe {
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        let mut r = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr);
        if r == 0 {
            ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            r = libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr);
        }
        let e = io::Error::last_os_error();
        libc::close(fd);
        if r == 0 { Ok(()) } else { Err(e) }
    };
    r.map_err(|e| context(e, "bringing loopback up"))
}

pub(super) fn mount(
    source: Option<&str>,
    target: impl AsRef<Path>,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let owned = |s: Option<&str>| s.map(|s| CString::new(s).map_err(io::Error::other)).transpose();
    let (source, fstype, data) = (owned(source)?, owned(fstype)?, owned(data)?);
    let target = cstring(target.as_ref())?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: valid C strings or null pointers.
    let r = unsafe { libc::mount(ptr(&source), target.as_ptr(), ptr(&fstype), flags, ptr(&data).cast()) };
    check(r, "mount")
}

pub(super) fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
}

pub(super) fn check(r: i32, what: &str) -> io::Result<()> {
    if r < 0 { Err(context(io::Error::last_os_error(), what)) } else { Ok(()) }
}

pub(super) fn context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_unescape() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/end\"), "/end\\");
    }
}
