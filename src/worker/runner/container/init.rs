//! The first process of every action container. Not a module of the crate:
//! `build.rs` compiles this file on its own, statically linked, so that it
//! runs in any image (one without a libc, or with another one), and the
//! container runner mounts it read-only at `/.distbuild/init`.
//!
//! Arguments: a deadline in seconds (0: none), N, then N `NAME=VALUE`
//! environment entries, then the command. It exists for four reasons a
//! container engine cannot cover:
//! - exactly the Command's environment: the engine adds `PATH`, `HOSTNAME`
//!   and the image's `ENV` to the first process, and this clears them;
//! - stdout and stderr straight into the files the worker mounts at
//!   `/.distbuild/stdout` and `/.distbuild/stderr`, not through the engine's
//!   log pipeline (no copy in the daemon, no size limit of its own);
//! - a PID 1 that reaps orphans, so a command that double-forks leaves no
//!   zombies, and that exits with the command's status (128 + N for a
//!   command killed by signal N, as shells report);
//! - a deadline of its own: should the worker die (SIGKILL) and leave the
//!   container, the action still ends when PID 1 exits at the deadline (the
//!   kernel then kills every process of the container).
//!
//! A command that cannot be started is reported on its stderr with exit
//! code 127, as a shell does.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Stdio};

unsafe extern "C" {
    fn waitpid(pid: i32, status: *mut i32, options: i32) -> i32;
}

const EINTR: i32 = 4;

fn main() {
    let mut stderr = match std::fs::OpenOptions::new().append(true).open("/.distbuild/stderr") {
        Ok(f) => f,
        Err(e) => {
            eprintln!("distbuild container init: opening /.distbuild/stderr: {e}");
            std::process::exit(125);
        }
    };
    let stdout = match std::fs::OpenOptions::new().append(true).open("/.distbuild/stdout") {
        Ok(f) => f,
        Err(e) => {
            let _ = writeln!(stderr, "distbuild container init: opening /.distbuild/stdout: {e}");
            std::process::exit(125);
        }
    };
    let mut args = std::env::args_os().skip(1);
    let deadline = args.next().and_then(|n| n.to_str()?.parse::<u64>().ok());
    let count = args.next().and_then(|n| n.to_str()?.parse::<usize>().ok());
    let (Some(deadline), Some(count)) = (deadline, count) else {
        let _ = writeln!(stderr, "distbuild container init: usage: init DEADLINE N NAME=VALUE... PROGRAM ARGS...");
        std::process::exit(125);
    };
    if deadline > 0 {
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(deadline));
            // PID 1 exiting ends every process of the container.
            std::process::exit(128 + 9);
        });
    }
    let environment: Vec<OsString> = args.by_ref().take(count).collect();
    let argv: Vec<OsString> = args.collect();
    if environment.len() != count || argv.is_empty() {
        let _ = writeln!(stderr, "distbuild container init: usage: init DEADLINE N NAME=VALUE... PROGRAM ARGS...");
        std::process::exit(125);
    }
    let mut command = Command::new(&argv[0]);
    command.args(&argv[1..]).env_clear().stdin(Stdio::null()).stdout(stdout);
    match stderr.try_clone() {
        Ok(e) => command.stderr(e),
        Err(_) => command.stderr(Stdio::null()),
    };
    for entry in &environment {
        let bytes = entry.as_bytes();
        let split = bytes.iter().position(|&b| b == b'=').unwrap_or(bytes.len());
        let (name, value) = (&bytes[..split], bytes.get(split + 1..).unwrap_or(&[]));
        command.env(std::ffi::OsStr::from_bytes(name), std::ffi::OsStr::from_bytes(value));
    }
    let child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(stderr, "cannot run {:?}: {e}", argv[0]);
            std::process::exit(127);
        }
    };
    let pid = child.id() as i32;
    // PID 1: every orphan of the action is ours to reap; the command's own
    // end decides the exit code, and the engine kills what is left.
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes one int through a valid pointer.
        let reaped = unsafe { waitpid(-1, &mut status, 0) };
        if reaped == pid {
            let code = if status & 0x7f == 0 { (status >> 8) & 0xff } else { 128 + (status & 0x7f) };
            std::process::exit(code);
        }
        if reaped < 0 && std::io::Error::last_os_error().raw_os_error() != Some(EINTR) {
            let _ = writeln!(stderr, "distbuild container init: waiting: {}", std::io::Error::last_os_error());
            std::process::exit(125);
        }
    }
}
