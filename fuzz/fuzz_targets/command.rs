//! Command validation at Execute time (arguments, working directory,
//! output paths, environment) on whatever bytes decode as a Command. It may
//! refuse, never panic.
#![no_main]

use cargo_distbuild::execution::validate::check_command;
use cargo_distbuild::worker::TreeLimits;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use remote_apis::reapi::Command;

fuzz_target!(|data: &[u8]| {
    if let Ok(command) = Command::decode(data) {
        let _ = check_command(&command, &TreeLimits::default());
    }
});
