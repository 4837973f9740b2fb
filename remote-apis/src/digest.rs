//! Content digests: a hash function, a hash and a size, checked at parse time.

use std::fmt;
use std::str::FromStr;

use crate::{quote, reapi};

/// Why a digest, resource name or instance name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

impl ParseError {
    pub(crate) fn new(msg: impl Into<String>) -> Self {
        ParseError(msg.into())
    }
}

/// A digest function this project serves. Both produce 32-byte hashes, so the
/// function cannot be inferred from the hash length alone: a request that
/// leaves it unset gets its instance's default (SHA-256 unless configured, as
/// the REAPI spec infers for 64 hex digits; Buck2 never sends the field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DigestFunction {
    Sha256,
    Blake3,
}

impl DigestFunction {
    pub const ALL: [DigestFunction; 2] = [DigestFunction::Sha256, DigestFunction::Blake3];

    /// The lower-case name used in resource names and storage paths.
    pub fn name(self) -> &'static str {
        match self {
            DigestFunction::Sha256 => "sha256",
            DigestFunction::Blake3 => "blake3",
        }
    }

    pub fn to_proto(self) -> reapi::digest_function::Value {
        match self {
            DigestFunction::Sha256 => reapi::digest_function::Value::Sha256,
            DigestFunction::Blake3 => reapi::digest_function::Value::Blake3,
        }
    }

    /// Resolves the `digest_function` field of a request. `UNKNOWN` (0) means
    /// "inferred from the hash length", which for 64 hex digits is SHA-256.
    /// Any other function is refused rather than silently treated as SHA-256.
    pub fn from_proto(value: i32) -> Result<Self, ParseError> {
        Self::from_proto_or(value, DigestFunction::Sha256)
    }

    /// Like [`DigestFunction::from_proto`], with `UNKNOWN` (0) meaning
    /// `default`: the function the server was told the instance uses.
    pub fn from_proto_or(value: i32, default: DigestFunction) -> Result<Self, ParseError> {
        use reapi::digest_function::Value;
        match Value::try_from(value) {
            Ok(Value::Unknown) => Ok(default),
            Ok(Value::Sha256) => Ok(DigestFunction::Sha256),
            Ok(Value::Blake3) => Ok(DigestFunction::Blake3),
            Ok(other) => Err(ParseError::new(format!(
                "digest function {} is not supported (supported: SHA256, BLAKE3)",
                other.as_str_name()
            ))),
            Err(_) => Err(ParseError::new(format!(
                "digest function {value} is not a known value (supported: SHA256, BLAKE3)"
            ))),
        }
    }

    /// Parses the lower-case name that appears in resource names.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "sha256" => Some(DigestFunction::Sha256),
            "blake3" => Some(DigestFunction::Blake3),
            _ => None,
        }
    }

    /// Whether a resource name must spell this function out: only functions
    /// that cannot be inferred from the hash length (here: BLAKE3).
    pub fn needs_name_in_resource(self) -> bool {
        self != DigestFunction::Sha256
    }

    pub fn hasher(self) -> Hasher {
        Hasher::new(self)
    }

    /// Hashes a whole buffer.
    pub fn digest_of(self, data: &[u8]) -> Digest {
        let mut h = self.hasher();
        h.update(data);
        h.finish()
    }

    /// The digest of the empty blob, which a server treats as always present.
    pub fn empty(self) -> Digest {
        self.digest_of(&[])
    }
}

impl fmt::Display for DigestFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An incremental hasher that counts the bytes it has seen.
pub struct Hasher {
    state: HashState,
    len: u64,
}

enum HashState {
    Sha256(Box<sha2::Sha256>),
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    fn new(function: DigestFunction) -> Self {
        let state = match function {
            DigestFunction::Sha256 => HashState::Sha256(Box::default()),
            DigestFunction::Blake3 => HashState::Blake3(Box::default()),
        };
        Hasher { state, len: 0 }
    }

    pub fn update(&mut self, data: &[u8]) {
        self.len += data.len() as u64;
        match &mut self.state {
            HashState::Sha256(h) => sha2::Digest::update(h.as_mut(), data),
            HashState::Blake3(h) => {
                h.update(data);
            }
        }
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn function(&self) -> DigestFunction {
        match self.state {
            HashState::Sha256(_) => DigestFunction::Sha256,
            HashState::Blake3(_) => DigestFunction::Blake3,
        }
    }

    pub fn finish(self) -> Digest {
        let function = self.function();
        let hash: [u8; 32] = match self.state {
            HashState::Sha256(h) => sha2::Digest::finalize(*h).into(),
            HashState::Blake3(h) => *h.finalize().as_bytes(),
        };
        Digest { function, hash, size: self.len }
    }
}

/// A blob's identity: digest function, 32-byte hash and size in bytes.
///
/// Two digests with the same hash but different sizes or functions are
/// different blobs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    pub function: DigestFunction,
    pub hash: [u8; 32],
    pub size: u64,
}

impl Digest {
    /// Parses a hash in lower-case hex (as REAPI requires: a server that
    /// accepted other spellings would answer with a hash the client never
    /// sent) and a size.
    pub fn new(function: DigestFunction, hash_hex: &str, size: i64) -> Result<Self, ParseError> {
        if size < 0 {
            return Err(ParseError::new(format!("digest size {size} is negative")));
        }
        if hash_hex.len() != 64 {
            return Err(ParseError::new(format!(
                "digest hash {} has {} characters; a {function} hash has 64 hex digits",
                quote(hash_hex),
                hash_hex.len()
            )));
        }
        if !hash_hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(ParseError::new(format!("digest hash {} is not lower-case hexadecimal", quote(hash_hex))));
        }
        let mut hash = [0u8; 32];
        hex::decode_to_slice(hash_hex, &mut hash)
            .map_err(|_| ParseError::new(format!("digest hash {} is not hexadecimal", quote(hash_hex))))?;
        Ok(Digest { function, hash, size: size as u64 })
    }

    /// Parses a proto digest under the given function.
    pub fn from_proto(function: DigestFunction, d: &reapi::Digest) -> Result<Self, ParseError> {
        Digest::new(function, &d.hash, d.size_bytes)
    }

    /// Parses an optional proto field, naming the field when it is absent.
    pub fn from_field(function: DigestFunction, d: Option<&reapi::Digest>, field: &str) -> Result<Self, ParseError> {
        match d {
            Some(d) => Digest::from_proto(function, d),
            None => Err(ParseError::new(format!("{field} is missing"))),
        }
    }

    pub fn to_proto(&self) -> reapi::Digest {
        reapi::Digest { hash: self.hash_hex(), size_bytes: self.size as i64 }
    }

    pub fn hash_hex(&self) -> String {
        hex::encode(self.hash)
    }

    pub fn is_empty_blob(&self) -> bool {
        self.size == 0 && *self == self.function.empty()
    }
}

impl fmt::Display for Digest {
    /// `hash/size`, the form used in resource names and PreconditionFailure
    /// subjects; BLAKE3 digests are prefixed with `blake3:` when printed alone.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.function != DigestFunction::Sha256 {
            write!(f, "{}:", self.function)?;
        }
        write!(f, "{}/{}", self.hash_hex(), self.size)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Digest {
    type Err = ParseError;

    /// Accepts `HASH/SIZE`, `HASH-SIZE` or `FUNCTION:HASH/SIZE`
    /// (the forms the command line prints and takes).
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let (function, rest) = match s.split_once(':') {
            Some((name, rest)) => (
                DigestFunction::from_name(name)
                    .ok_or_else(|| ParseError::new(format!("unknown digest function {}", quote(name))))?,
                rest,
            ),
            None => (DigestFunction::Sha256, s),
        };
        let (hash, size) = rest
            .split_once(['/', '-'])
            .ok_or_else(|| ParseError::new(format!("digest {} is not of the form HASH/SIZE", quote(s))))?;
        let size: i64 =
            size.parse().map_err(|_| ParseError::new(format!("digest size {} is not a number", quote(size))))?;
        Digest::new(function, hash, size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const EMPTY_BLAKE3: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";

    #[test]
    fn empty_digests_are_the_known_values() {
        assert_eq!(DigestFunction::Sha256.empty().hash_hex(), EMPTY_SHA256);
        assert_eq!(DigestFunction::Blake3.empty().hash_hex(), EMPTY_BLAKE3);
        assert!(DigestFunction::Blake3.empty().is_empty_blob());
    }

    #[test]
    fn incremental_hash_equals_one_shot() {
        for f in DigestFunction::ALL {
            let mut h = f.hasher();
            h.update(b"hello ");
            h.update(b"world");
            assert_eq!(h.finish(), f.digest_of(b"hello world"));
            assert_eq!(f.digest_of(b"hello world").size, 11);
        }
    }

    #[test]
    fn digest_parsing_table() {
        let ok = [(EMPTY_SHA256, 0), (EMPTY_SHA256, 1 << 40)];
        for (hash, size) in ok {
            let d = Digest::new(DigestFunction::Sha256, hash, size).unwrap();
            assert_eq!(d.hash_hex(), hash);
            assert_eq!(d.size, size as u64);
        }
        let bad = [
            (EMPTY_SHA256, -1, "negative"),
            ("abc", 3, "64 hex digits"),
            (&EMPTY_SHA256[..63], 3, "64 hex digits"),
            ("zzb0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", 3, "hexadecimal"),
            ("", 0, "64 hex digits"),
            ("E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855", 0, "lower-case"),
        ];
        for (hash, size, why) in bad {
            let err = Digest::new(DigestFunction::Sha256, hash, size).unwrap_err();
            assert!(err.0.contains(why), "{hash:?}/{size}: {err}");
        }
    }

    #[test]
    fn digest_function_table() {
        use reapi::digest_function::Value;
        assert_eq!(DigestFunction::from_proto(Value::Unknown as i32), Ok(DigestFunction::Sha256));
        assert_eq!(DigestFunction::from_proto(Value::Sha256 as i32), Ok(DigestFunction::Sha256));
        assert_eq!(DigestFunction::from_proto(Value::Blake3 as i32), Ok(DigestFunction::Blake3));
        for refused in [Value::Sha1 as i32, Value::Md5 as i32, Value::Sha384 as i32, 999] {
            assert!(DigestFunction::from_proto(refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn digest_from_str_table() {
        let d: Digest = format!("{EMPTY_SHA256}/0").parse().unwrap();
        assert_eq!(d, DigestFunction::Sha256.empty());
        let d: Digest = format!("{EMPTY_SHA256}-0").parse().unwrap();
        assert_eq!(d, DigestFunction::Sha256.empty());
        let d: Digest = format!("blake3:{EMPTY_BLAKE3}/0").parse().unwrap();
        assert_eq!(d, DigestFunction::Blake3.empty());
        assert_eq!(d.to_string(), format!("blake3:{EMPTY_BLAKE3}/0"));
        for bad in ["", "abc", "md5:abc/1", &format!("{EMPTY_SHA256}/x"), &format!("{EMPTY_SHA256}/-1")] {
            assert!(bad.parse::<Digest>().is_err(), "{bad}");
        }
    }
}
