//! ByteStream resource names, as a client sends them: parsing never panics,
//! and a parsed name survives the round trip through the name the client
//! library would send for it (the server answers with what it parsed).
#![no_main]

use libfuzzer_sys::fuzz_target;
use remote_apis::{ReadResource, WriteResource};

fuzz_target!(|data: &[u8]| {
    let Ok(name) = std::str::from_utf8(data) else { return };
    if let Ok(read) = ReadResource::parse(name) {
        let again = ReadResource::parse(&read.to_name()).expect("a read name the library printed parses");
        assert_eq!(again, read, "read resource round trip of {name:?}");
    }
    if let Ok(write) = WriteResource::parse(name) {
        let again = WriteResource::parse(&write.to_name()).expect("a write name the library printed parses");
        assert_eq!(again, write, "write resource round trip of {name:?}");
    }
});
