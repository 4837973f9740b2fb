//! The action init: a small supervisor that runs between a worker and an
//! action's command, so that no process of the action outlives the action or
//! the worker, without any privilege.
//!
//! The worker runs `cargo-distbuild __action-init N K1=V1 ... KN=VN PROGRAM
//! ARGS...` with an empty environment, the action's working directory, its
//! stdout/stderr files and, as standard input, one end of a socket pair whose
//! other end only the worker holds (the *line*). The init:
//!
//! - blocks SIGCHLD, SIGTERM, SIGINT and SIGHUP and reads them from a
//!   signalfd, so it waits in one `poll` on the signals and the line: no
//!   polling loop, no latency added to the command's end;
//! - makes itself a child subreaper, so every orphaned descendant (a
//!   `setsid` daemon, a double fork) becomes its child instead of init's;
//! - spawns the command in its own process group with exactly the variables
//!   it was given (its own environment stays empty, so an action's
//!   `LD_LIBRARY_PATH` or `LD_PRELOAD` cannot break the init itself), standard
//!   input from /dev/null, and reports on the line `ok` or why the command
//!   could not start (`err ERRNO MESSAGE`);
//! - on the command's exit, a termination signal, or the line closing (the
//!   worker stopped the action, or the worker process died: the kernel
//!   closes its end either way) stops and kills every remaining descendant,
//!   reaping until it has no child left, then exits with the command's exit
//!   code (128 + N for a signal N).
//!
//! In a sandbox (options `--hide`, `--bind`, ... before `N`; see
//! [`Options`]) the init is also the one process that sets up namespaces,
//! so nothing the action runs can undo them or kill the supervisor: it
//! unshares mount, PID, network (unless `--net`), IPC and UTS namespaces
//! (first a user namespace mapping only its own uid and gid when it is not
//! root), then forks a helper that is PID 1 of the new PID namespace. The
//! helper makes every mount private, hides the given paths under empty
//! read-only tmpfs, binds the action's directory back at its path, mounts a
//! private `/tmp` (and `/dev/shm`) and a fresh `/proc`, makes the whole
//! tree read-only except those, brings loopback up in the new network
//! namespace, and spawns the command (as `--uid`, with `no_new_privs` and
//! the rlimits) and reaps. When the helper exits, or the init kills it, the
//! kernel kills every process left in the namespace, `setsid` daemons
//! included. The line protocol is the same in both modes (the helper writes
//! `ok` or `err`).
//!
//! With `--chroot` (an action asking `chroot=input-root`) the helper mounts
//! nothing of the above: it makes the action's directory the root instead
//! (see [`chroot`]), and the command, its working directory and its PATH
//! lookup are all inside it.
//!
//! The line replaces `PR_SET_PDEATHSIG`, which fires when the *thread* that
//! forked dies (a tokio blocking thread retiring would kill a healthy
//! action) and needs a `getppid` check against a race; a closed socket is
//! the worker *process* going away, with no race.

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;

mod chroot;
mod sandbox;

/// The hidden subcommand of the `cargo-distbuild` binary.
pub const SUBCOMMAND: &str = "__action-init";

/// Exit code when the command could not be started (as shells report).
const CANNOT_RUN: u8 = 127;

/// The init's arguments after [`SUBCOMMAND`]: the options (none for a
/// plain run), the command's environment, then the program (a path,
/// resolved by the worker) and its arguments.
pub fn arguments(
    options: &Options,
    environment: &[(String, String)],
    program: &OsStr,
    args: &[String],
) -> Vec<OsString> {
    let mut out = options.encode();
    out.reserve(2 + environment.len() + args.len());
    out.push(OsString::from(environment.len().to_string()));
    out.extend(environment.iter().map(|(k, v)| OsString::from(format!("{k}={v}"))));
    out.push(program.to_os_string());
    out.extend(args.iter().map(OsString::from));
    out
}

/// How the init runs the command, beyond the plain run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// Namespaces and mounts; None: the command runs on the host.
    pub sandbox: Option<Sandbox>,
    /// RLIMIT_DATA of the command (and each of its processes), bytes.
    pub memory: Option<u64>,
    /// RLIMIT_NPROC: processes of the command's uid (in its user namespace).
    pub processes: Option<u64>,
    /// Exit 0 at once (the worker's start-up check that the sandbox works
    /// runs the init itself as the command); with a sandbox, once it is set
    /// up, without running the command (the check of `chroot`, where no
    /// program of the host is visible).
    pub probe: bool,
}

/// The sandbox the init sets up (see the module documentation).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sandbox {
    /// Not root: a user namespace mapping the init's own uid and gid.
    pub user_namespace: bool,
    /// Keep the host's network (no network namespace).
    pub network: bool,
    /// Hidden under an empty read-only tmpfs (the worker's directory, the
    /// server's data directory).
    pub hide: Vec<PathBuf>,
    /// The action's directory: bound back, writable, at its own path.
    pub writable: PathBuf,
    /// The command's uid and gid (a root init only).
    pub run_as: Option<(u32, u32)>,
    /// The action's directory is the command's `/` (`chroot=input-root`).
    pub chroot: Option<Chroot>,
}

/// How the init makes the action's directory the root (`chroot=input-root`).
/// The directory holds `dev` and `proc` (and `tmp` when `tmp` is set), made
/// by the worker as mount points.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Chroot {
    /// A fresh tmpfs at `/tmp` (the input root's is absent or empty).
    pub tmp: bool,
}

impl Options {
    fn encode(&self) -> Vec<OsString> {
        let mut out = Vec::new();
        let flag = |name: &str, value: &OsStr| {
            let mut s = OsString::from(format!("--{name}="));
            s.push(value);
            s
        };
        if let Some(s) = &self.sandbox {
            if s.user_namespace {
                out.push("--userns".into());
            }
            if s.network {
                out.push("--net".into());
            }
            out.extend(s.hide.iter().map(|p| flag("hide", p.as_os_str())));
            out.push(flag("bind", s.writable.as_os_str()));
            if let Some((u, g)) = s.run_as {
                out.push(format!("--uid={u}:{g}").into());
            }
            match s.chroot {
                Some(Chroot { tmp: true }) => out.push("--chroot=tmp".into()),
                Some(Chroot { tmp: false }) => out.push("--chroot".into()),
                None => {}
            }
        }
        if let Some(n) = self.memory {
            out.push(format!("--data={n}").into());
        }
        if let Some(n) = self.processes {
            out.push(format!("--nproc={n}").into());
        }
        if self.probe {
            out.push("--probe".into());
        }
        out
    }

    /// Parses the leading `--` options; returns them and the rest.
    fn decode(args: &[OsString]) -> Option<(Options, &[OsString])> {
        let mut options = Options::default();
        let mut sandbox = Sandbox::default();
        let (mut sandboxed, mut i) = (false, 0);
        while let Some(arg) = args.get(i).filter(|a| a.as_bytes().starts_with(b"--")) {
            i += 1;
            let bytes = arg.as_bytes();
            let (name, value) = match bytes.iter().position(|&b| b == b'=') {
                Some(eq) => (&bytes[2..eq], Some(OsStr::from_bytes(&bytes[eq + 1..]))),
                None => (&bytes[2..], None),
            };
            let number = |v: Option<&OsStr>| v?.to_str()?.parse::<u64>().ok();
            match (name, value) {
                (b"userns", None) => (sandboxed, sandbox.user_namespace) = (true, true),
                (b"net", None) => (sandboxed, sandbox.network) = (true, true),
                (b"hide", Some(p)) => sandbox.hide.push(PathBuf::from(p)),
                (b"bind", Some(p)) => (sandboxed, sandbox.writable) = (true, PathBuf::from(p)),
                (b"uid", Some(v)) => {
                    let (u, g) = v.to_str()?.split_once(':')?;
                    sandbox.run_as = Some((u.parse().ok()?, g.parse().ok()?));
                }
                (b"chroot", None) => (sandboxed, sandbox.chroot) = (true, Some(Chroot { tmp: false })),
                (b"chroot", Some(v)) if v == "tmp" => (sandboxed, sandbox.chroot) = (true, Some(Chroot { tmp: true })),
                (b"data", v) => options.memory = Some(number(v)?),
                (b"nproc", v) => options.processes = Some(number(v)?),
                (b"probe", None) => options.probe = true,
                _ => return None,
            }
        }
        if sandboxed || !sandbox.hide.is_empty() || sandbox.run_as.is_some() {
            if sandbox.writable.as_os_str().is_empty() {
                return None;
            }
            options.sandbox = Some(sandbox);
        }
        Some((options, &args[i..]))
    }
}

/// Runs the init with the arguments that follow [`SUBCOMMAND`]; returns its
/// exit code.
pub fn main(args: &[OsString]) -> u8 {
    let Some((options, args)) = Options::decode(args) else {
        eprintln!("cargo-distbuild {SUBCOMMAND}: bad options (run by workers, not by hand)");
        return 2;
    };
    // A sandboxed probe sets the sandbox up first (see `Options::probe`).
    if options.probe && options.sandbox.is_none() {
        return 0;
    }
    let Some((env, program, rest)) = parse(args) else {
        eprintln!(
            "usage: cargo-distbuild {SUBCOMMAND} [OPTIONS] N K=V... PROGRAM ARGS... (run by workers, not by hand)"
        );
        return 2;
    };
    let signals = match Signals::block() {
        Ok(s) => s,
        Err(e) => return fail(&format!("blocking signals: {e}"), None),
    };
    let mut command = std::process::Command::new(program);
    command.args(rest).env_clear().envs(env).stdin(Stdio::null()).process_group(0);
    if let Some(sandbox) = &options.sandbox {
        return sandbox::run(sandbox, &options, &signals, command);
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        let e = std::io::Error::last_os_error();
        return fail(&format!("becoming a subreaper: {e}"), None);
    }
    let (memory, processes) = (options.memory, options.processes);
    // SAFETY: the closure only calls async-signal-safe functions.
    unsafe { command.pre_exec(move || prepare_exec(memory, processes)) };
    let child = command.spawn();
    let command = match child {
        Ok(c) => c.id() as i32,
        Err(e) => return fail(&e.to_string(), e.raw_os_error()),
    };
    tell_worker(b"ok\n");
    let exited = supervise(&signals, command);
    let killed = reap::kill_descendants(exited.is_none().then_some(command));
    exited.or(killed).map_or(128 + libc::SIGKILL as u8, exit_code)
}

/// Splits `N K=V... PROGRAM ARGS...`.
#[allow(clippy::type_complexity)]
fn parse(args: &[OsString]) -> Option<(Vec<(&OsStr, &OsStr)>, &OsStr, &[OsString])> {
    let n: usize = args.first()?.to_str()?.parse().ok()?;
    let vars = args.get(1..1 + n)?;
    let env = vars
        .iter()
        .map(|kv| {
            let bytes = kv.as_bytes();
            let eq = bytes.iter().position(|&b| b == b'=')?;
            Some((OsStr::from_bytes(&bytes[..eq]), OsStr::from_bytes(&bytes[eq + 1..])))
        })
        .collect::<Option<Vec<_>>>()?;
    let program = args.get(1 + n)?;
    Some((env, program, &args[2 + n..]))
}

/// In the command's process before exec: the default signals, the limits.
fn prepare_exec(memory: Option<u64>, processes: Option<u64>) -> std::io::Result<()> {
    default_signals()?;
    for (resource, limit) in [(libc::RLIMIT_DATA, memory), (libc::RLIMIT_NPROC, processes)] {
        if let Some(n) = limit {
            let l = libc::rlimit { rlim_cur: n, rlim_max: n };
            // SAFETY: setrlimit with a valid struct.
            if unsafe { libc::setrlimit(resource, &l) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// In the command's process before exec: nothing blocked (std leaves the
/// mask as it is, and the init blocks the signals it waits for) and SIGPIPE
/// at its default (the Rust runtime ignores it), as a worker's direct child
/// would have them.
fn default_signals() -> std::io::Result<()> {
    // SAFETY: sigemptyset, sigprocmask and signal are async-signal-safe and
    // get valid pointers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    Ok(())
}

/// Tells the worker why the command did not start, on the line (the worker
/// turns it into the action's error) and on stderr (for a human).
fn fail(message: &str, errno: Option<i32>) -> u8 {
    let line = format!("err {} {}\n", errno.unwrap_or(0), message.replace('\n', " "));
    tell_worker(line.as_bytes());
    eprintln!("cargo-distbuild {SUBCOMMAND}: {message}");
    CANNOT_RUN
}

/// Writes to the line (standard input). A worker already gone is no error.
fn tell_worker(bytes: &[u8]) {
    use std::os::fd::FromRawFd;
    // SAFETY: fd 0 stays open for the process's life; ManuallyDrop keeps it so.
    let mut line = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(0) });
    let _ = line.write_all(bytes);
}

/// Waits for the command's end (returns its wait status) or for a reason to
/// stop it (returns None): a termination signal, or the line closing.
fn supervise(signals: &Signals, command: i32) -> Option<i32> {
    loop {
        let mut fds = [
            libc::pollfd { fd: signals.fd, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: 0, events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: two valid pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return None;
        }
        if fds[1].revents != 0 {
            // Nothing is ever sent on the line: readable means closed.
            return None;
        }
        if fds[0].revents != 0 {
            match signals.next() {
                Some(libc::SIGCHLD) => {
                    if let Some(status) = reap::reap_exited(command) {
                        return Some(status);
                    }
                }
                Some(_) => return None,
                None => {}
            }
        }
    }
}

/// The exit code for a wait status: the code, or 128 + the signal.
fn exit_code(status: i32) -> u8 {
    if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) as u8 } else { (128 + libc::WTERMSIG(status)) as u8 }
}

/// The signals the init waits for, blocked and readable from a signalfd.
struct Signals {
    fd: i32,
}

impl Signals {
    fn block() -> std::io::Result<Self> {
        // SAFETY: a zeroed sigset_t filled by sigemptyset/sigaddset, then
        // passed to sigprocmask and signalfd, which only read it.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
                libc::sigaddset(&mut set, s);
            }
            if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(Signals { fd })
        }
    }

    /// The next pending signal, if one is readable.
    fn next(&self) -> Option<i32> {
        // SAFETY: reading one signalfd_siginfo into a zeroed struct of that size.
        unsafe {
            let mut info: libc::signalfd_siginfo = std::mem::zeroed();
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            let n = libc::read(self.fd, (&mut info as *mut libc::signalfd_siginfo).cast(), size);
            (n as usize == size).then_some(info.ssi_signo as i32)
        }
    }
}

mod reap {
    //! Reaping and killing the init's descendants.

    use std::collections::HashMap;

    /// Reaps every exited child; returns the command's wait status if it
    /// was among them (other children are orphans that ended on their own).
    pub fn reap_exited(command: i32) -> Option<i32> {
        let mut found = None;
        loop {
            let mut status = 0;
            // SAFETY: waitpid with a valid status pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return found;
            }
            if pid == command {
                found = Some(status);
            }
        }
    }

    /// Kills every descendant, round after round, until the init has no
    /// child left; returns the command's wait status if it reaped it.
    /// `command` is the command's pid while it is unreaped: its process
    /// group is killed at once (after the reap the id may be reused, so it
    /// is not signalled then). Each round stops the tree top-down before
    /// listing a process's children (a stopped process can neither fork nor
    /// reap, so every listed pid stays valid), kills it, and reaps the
    /// init's own children; children of killed processes are reparented to
    /// the init (a subreaper) and are found by the next round.
    pub fn kill_descendants(command: Option<i32>) -> Option<i32> {
        if let Some(pgid) = command {
            // SAFETY: killpg has no memory-safety preconditions.
            unsafe { libc::killpg(pgid, libc::SIGKILL) };
        }
        let me = std::process::id() as i32;
        let mut status = None;
        loop {
            let mut listing = Listing::new();
            let children = listing.children(me);
            if children.is_empty() {
                return status;
            }
            let mut tree = children.clone();
            let mut i = 0;
            while i < tree.len() {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(tree[i], libc::SIGSTOP) };
                let grandchildren = listing.children(tree[i]);
                tree.extend(grandchildren);
                i += 1;
            }
            for &pid in &tree {
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            for &pid in &children {
                let mut st = 0;
                // SAFETY: waitpid on our own child with a valid status pointer.
                if unsafe { libc::waitpid(pid, &mut st, 0) } == pid && Some(pid) == command {
                    status = Some(st);
                }
            }
        }
    }

    /// Children of a process: from `/proc/PID/task/*/children` where the
    /// kernel has it, else from one scan of every process's parent.
    pub(super) struct Listing {
        pub(super) scan: Option<HashMap<i32, Vec<i32>>>,
    }

    impl Listing {
        fn new() -> Self {
            let has_children_files = std::path::Path::new("/proc/thread-self/children").exists();
            Listing { scan: (!has_children_files).then(scan_parents) }
        }

        pub(super) fn children(&mut self, pid: i32) -> Vec<i32> {
            if let Some(map) = &self.scan {
                return map.get(&pid).cloned().unwrap_or_default();
            }
            let mut out = Vec::new();
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
            for task in tasks.flatten() {
                if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
                    out.extend(text.split_ascii_whitespace().filter_map(|p| p.parse::<i32>().ok()));
                }
            }
            out
        }
    }

    /// Parent -> children for every process (`/proc/*/stat`, field 4).
    pub(super) fn scan_parents() -> HashMap<i32, Vec<i32>> {
        let mut map: HashMap<i32, Vec<i32>> = HashMap::new();
        let Ok(entries) = std::fs::read_dir("/proc") else { return map };
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok());
            if let Some(ppid) = ppid {
                map.entry(ppid).or_default().push(pid);
            }
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_round_trip_with_equals_signs_and_empty_values() {
        let env = vec![("A".to_string(), "x=y".to_string()), ("EMPTY".to_string(), String::new())];
        let args = arguments(&Options::default(), &env, OsStr::new("/bin/sh"), &["-c".into(), "echo".into()]);
        let (options, args) = Options::decode(&args).unwrap();
        assert_eq!(options, Options::default());
        let (parsed, program, rest) = parse(args).unwrap();
        assert_eq!(parsed, [(OsStr::new("A"), OsStr::new("x=y")), (OsStr::new("EMPTY"), OsStr::new(""))]);
        assert_eq!(program, "/bin/sh");
        assert_eq!(rest, [OsString::from("-c"), OsString::from("echo")]);
        assert!(parse(&[OsString::from("2"), OsString::from("A=1")]).is_none(), "too few variables");
        assert!(parse(&[OsString::from("1"), OsString::from("NOEQUALS"), OsString::from("p")]).is_none());
    }

    #[test]
    fn sandbox_options_round_trip() {
        let options = Options {
            sandbox: Some(Sandbox {
                user_namespace: true,
                network: false,
                hide: vec!["/var/lib/x".into(), "/with space/--hide=y".into()],
                writable: "/work/exec/1/root".into(),
                run_as: Some((65534, 65533)),
                chroot: None,
            }),
            memory: Some(1 << 30),
            processes: Some(64),
            probe: false,
        };
        let args = arguments(&options, &[("K".into(), "V".into())], OsStr::new("/bin/sh"), &["--net".into()]);
        let (decoded, rest) = Options::decode(&args).unwrap();
        assert_eq!(decoded, options);
        let (env, program, args) = parse(rest).unwrap();
        assert_eq!((env.len(), program, args), (1, OsStr::new("/bin/sh"), &[OsString::from("--net")][..]));
        for chroot in [Chroot { tmp: true }, Chroot { tmp: false }] {
            let mut chrooted = options.clone();
            chrooted.sandbox.as_mut().unwrap().chroot = Some(chroot);
            let args = arguments(&chrooted, &[], OsStr::new("sh"), &[]);
            assert_eq!(Options::decode(&args).unwrap().0, chrooted);
        }
        assert!(Options::decode(&[OsString::from("--chroot=other"), OsString::from("--bind=/x")]).is_none());
        assert!(Options::decode(&[OsString::from("--bogus")]).is_none());
        assert!(Options::decode(&[OsString::from("--hide=/x")]).is_none(), "a sandbox needs --bind");
    }

    #[test]
    fn children_are_listed_from_the_kernels_files_and_from_a_scan() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let (me, pid) = (std::process::id() as i32, child.id() as i32);
        let mut files = reap::Listing { scan: None };
        let mut scan = reap::Listing { scan: Some(reap::scan_parents()) };
        let found = (files.children(me).contains(&pid), scan.children(me).contains(&pid));
        child.kill().unwrap();
        child.wait().unwrap();
        // The files are missing on kernels without CONFIG_PROC_CHILDREN.
        let has_files = std::path::Path::new("/proc/thread-self/children").exists();
        assert_eq!(found, (has_files, true));
    }

    #[test]
    fn exit_codes_are_the_shells() {
        assert_eq!(exit_code(3 << 8), 3);
        assert_eq!(exit_code(libc::SIGKILL), 137);
    }
}
