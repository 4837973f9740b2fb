//! The wrapper's rustc argument classifier: any argument list cargo (or a
//! build script) could pass is either a Compile or a reason to run rustc
//! locally, never a panic.
#![no_main]

use distbuild_rustc::args::{Classified, classify, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|words: Vec<String>| {
    let parsed = parse(&words);
    if let Classified::Compile(c) = classify(&words) {
        assert!(parsed.is_ok(), "a Compile whose arguments do not parse");
        assert!(words.contains(&c.source), "the source {:?} is one of the arguments", c.source);
        assert!(!c.emit.is_empty(), "a Compile emits something");
    }
});
