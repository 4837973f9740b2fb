//! The action init as a small binary of its own.
//!
//! Every action a worker runs starts one init (see
//! `cargo_distbuild::worker::action_init`), so its start-up cost is paid per
//! action: exec'ing the whole `cargo-distbuild` binary costs about 2 ms of
//! page faults, this one a fraction of that. It takes the same arguments as
//! `cargo-distbuild __action-init` (the subcommand word included), so a
//! worker spawns either the same way; workers use this one when it is
//! installed beside `cargo-distbuild`.

use std::ffi::OsString;
use std::process::ExitCode;

use cargo_distbuild::worker::action_init;

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    let rest = match args.get(1) {
        Some(word) if word == action_init::SUBCOMMAND => &args[2..],
        _ => &args[1.min(args.len())..],
    };
    ExitCode::from(action_init::main(rest))
}
