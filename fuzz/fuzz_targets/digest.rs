//! Digests as they arrive in requests: the function field, the function
//! name of a resource name, and hash + size. Parsing never panics; an
//! accepted digest prints back to the hash and size it was parsed from
//! (REAPI hashes are lower-case hex, so there is one spelling).
#![no_main]

use libfuzzer_sys::fuzz_target;
use remote_apis::{Digest, DigestFunction, reapi};

fuzz_target!(|input: (i32, &str, i64)| {
    let (function_field, hash, size) = input;
    let by_name = DigestFunction::from_name(hash);
    let function = DigestFunction::from_proto(function_field).ok().or(by_name).unwrap_or(DigestFunction::Sha256);
    let direct = Digest::new(function, hash, size);
    let proto = Digest::from_proto(function, &reapi::Digest { hash: hash.to_string(), size_bytes: size });
    assert_eq!(direct.is_ok(), proto.is_ok(), "Digest::new and Digest::from_proto disagree on {hash:?}/{size}");
    if let Ok(d) = direct {
        assert_eq!(d.hash_hex(), hash);
        assert_eq!(d.size as i64, size);
        assert_eq!(Digest::from_proto(function, &d.to_proto()).ok(), Some(d));
    }
});
