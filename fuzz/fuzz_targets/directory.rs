//! Directory validation, the check every Directory of an input root passes
//! before a worker materializes it, on whatever bytes decode as a Directory.
//! It may refuse, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use remote_apis::reapi::Directory;

fuzz_target!(|data: &[u8]| {
    if let Ok(dir) = Directory::decode(data) {
        let _ = cargo_distbuild::worker::check_directory(&dir);
    }
});
