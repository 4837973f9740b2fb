//! Instance names and ByteStream resource names.
//!
//! Grammar (REAPI v2, ByteStream section):
//!
//! ```text
//! read:  {instance}/blobs/{fn/}{hash}/{size}
//!        {instance}/compressed-blobs/{compressor}/{fn/}{hash}/{size}
//! write: {instance}/uploads/{uuid}/blobs/{fn/}{hash}/{size}{/metadata...}
//!        {instance}/uploads/{uuid}/compressed-blobs/{compressor}/{fn/}{hash}/{size}{/metadata...}
//! ```
//!
//! The instance may be empty (no leading slash then) or contain slashes, and
//! writes may carry trailing metadata, so names are parsed by finding the
//! keyword segment from the left, never from the right.

use std::fmt;

use crate::digest::{Digest, DigestFunction, ParseError};
use crate::quote;

/// Segments an instance name may not contain, because resource names use
/// them as keywords.
const RESERVED: [&str; 8] =
    ["blobs", "uploads", "compressed-blobs", "actions", "actionResults", "operations", "capabilities", "logstreams"];

/// An instance name: a namespace chosen by the client. It may be empty or
/// contain slashes (`projects/p/instances/i`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct InstanceName(String);

impl InstanceName {
    pub fn new(name: &str) -> Result<Self, ParseError> {
        match instance_problem(name) {
            Some(why) => Err(ParseError::new(format!("instance name {} {why}", quote(name)))),
            None => Ok(InstanceName(name.to_string())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why `name` is not an instance name, without quoting it (callers quote
/// the value once: the instance name, or the resource name it came from).
fn instance_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return None;
    }
    name.split('/').find_map(|segment| {
        if segment.is_empty() {
            Some("has an empty path segment".to_string())
        } else if segment == "." || segment == ".." {
            Some(format!("contains {segment:?}"))
        } else if RESERVED.contains(&segment) {
            Some(format!("uses the reserved segment {segment:?}"))
        } else {
            None
        }
    })
}

impl fmt::Display for InstanceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How blob bytes travel on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compressor {
    Identity,
    Zstd,
}

impl Compressor {
    fn from_segment(s: &str) -> Result<Self, ParseError> {
        match s {
            "zstd" => Ok(Compressor::Zstd),
            "identity" => Ok(Compressor::Identity),
            other => Err(ParseError::new(format!("compressor {} is not supported (supported: zstd)", quote(other)))),
        }
    }

    /// Resolves a `Compressor.Value` from a batch request.
    pub fn from_proto(value: i32) -> Result<Self, ParseError> {
        use crate::reapi::compressor::Value;
        match Value::try_from(value) {
            Ok(Value::Identity) => Ok(Compressor::Identity),
            Ok(Value::Zstd) => Ok(Compressor::Zstd),
            Ok(other) => Err(ParseError::new(format!(
                "compressor {} is not supported (supported: IDENTITY, ZSTD)",
                other.as_str_name()
            ))),
            Err(_) => Err(ParseError::new(format!("compressor {value} is not a known value"))),
        }
    }

    pub fn to_proto(self) -> i32 {
        use crate::reapi::compressor::Value;
        match self {
            Compressor::Identity => Value::Identity as i32,
            Compressor::Zstd => Value::Zstd as i32,
        }
    }
}

/// A parsed ByteStream read resource name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadResource {
    pub instance: InstanceName,
    pub compressor: Compressor,
    pub digest: Digest,
}

/// A parsed ByteStream write resource name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteResource {
    pub instance: InstanceName,
    pub uuid: String,
    pub compressor: Compressor,
    pub digest: Digest,
}

impl ReadResource {
    /// Parses a name; one without a function segment is SHA-256.
    pub fn parse(name: &str) -> Result<Self, ParseError> {
        Self::parse_with(name, |_| DigestFunction::Sha256)
    }

    /// Parses a name; one without a function segment uses `default` of its
    /// instance (Buck2 sends `{instance}/blobs/{hash}/{size}` for BLAKE3).
    pub fn parse_with(name: &str, default: impl FnOnce(&InstanceName) -> DigestFunction) -> Result<Self, ParseError> {
        let segments: Vec<&str> = name.split('/').collect();
        let at = segments.iter().position(|s| *s == "blobs" || *s == "compressed-blobs").ok_or_else(|| {
            ParseError::new(format!("resource name {} has no \"blobs\" or \"compressed-blobs\" segment", quote(name)))
        })?;
        let instance = instance_of(name, &segments[..at])?;
        let (compressor, digest, rest) = parse_blob_part(name, &segments[at..], default(&instance))?;
        if !rest.is_empty() {
            return Err(ParseError::new(format!(
                "resource name {} has unexpected segments after the size",
                quote(name)
            )));
        }
        Ok(ReadResource { instance, compressor, digest })
    }

    /// The name a client sends to read this blob.
    pub fn to_name(&self) -> String {
        format!("{}{}", instance_prefix(&self.instance), blob_part(self.compressor, &self.digest))
    }
}

impl WriteResource {
    /// Parses a name; one without a function segment is SHA-256.
    pub fn parse(name: &str) -> Result<Self, ParseError> {
        Self::parse_with(name, |_| DigestFunction::Sha256)
    }

    /// Parses a name; one without a function segment uses `default` of its
    /// instance.
    pub fn parse_with(name: &str, default: impl FnOnce(&InstanceName) -> DigestFunction) -> Result<Self, ParseError> {
        let segments: Vec<&str> = name.split('/').collect();
        let at = segments
            .iter()
            .position(|s| *s == "uploads")
            .ok_or_else(|| ParseError::new(format!("resource name {} has no \"uploads\" segment", quote(name))))?;
        let instance = instance_of(name, &segments[..at])?;
        let uuid = match segments.get(at + 1) {
            Some(u) if !u.is_empty() => u.to_string(),
            _ => {
                return Err(ParseError::new(format!(
                    "resource name {} has no upload id after \"uploads\"",
                    quote(name)
                )));
            }
        };
        let (compressor, digest, _metadata) = parse_blob_part(name, &segments[at + 2..], default(&instance))?;
        Ok(WriteResource { instance, uuid, compressor, digest })
    }

    /// The name a client sends to upload this blob.
    pub fn to_name(&self) -> String {
        format!("{}uploads/{}/{}", instance_prefix(&self.instance), self.uuid, blob_part(self.compressor, &self.digest))
    }
}

pub(crate) fn instance_prefix(instance: &InstanceName) -> String {
    if instance.as_str().is_empty() { String::new() } else { format!("{instance}/") }
}

fn blob_part(compressor: Compressor, digest: &Digest) -> String {
    let mut s = match compressor {
        Compressor::Identity => "blobs/".to_string(),
        Compressor::Zstd => "compressed-blobs/zstd/".to_string(),
    };
    if digest.function.needs_name_in_resource() {
        s.push_str(digest.function.name());
        s.push('/');
    }
    s.push_str(&format!("{}/{}", digest.hash_hex(), digest.size));
    s
}

pub(crate) fn instance_of(name: &str, segments: &[&str]) -> Result<InstanceName, ParseError> {
    let instance = segments.join("/");
    let why = match segments.iter().any(|s| s.is_empty()) {
        true => Some("has an empty path segment".to_string()),
        false => instance_problem(&instance),
    };
    match why {
        Some(why) => Err(ParseError::new(format!("resource name {}: the instance name {why}", quote(name)))),
        None => Ok(InstanceName(instance)),
    }
}

/// Parses `blobs/{fn/}{hash}/{size}` or
/// `compressed-blobs/{compressor}/{fn/}{hash}/{size}` and returns what follows.
/// Without a function segment the digest is `default`'s.
fn parse_blob_part<'a>(
    name: &str,
    segments: &'a [&'a str],
    default: DigestFunction,
) -> Result<(Compressor, Digest, &'a [&'a str]), ParseError> {
    let short = || ParseError::new(format!("resource name {} ends before the digest size", quote(name)));
    let (compressor, mut rest) = match segments.first() {
        Some(&"blobs") => (Compressor::Identity, &segments[1..]),
        Some(&"compressed-blobs") => {
            let c = segments.get(1).ok_or_else(short)?;
            let compressor = Compressor::from_segment(c)
                .map_err(|e| ParseError::new(format!("resource name {}: {e}", quote(name))))?;
            (compressor, &segments[2..])
        }
        _ => {
            return Err(ParseError::new(format!(
                "resource name {} has no \"blobs\" or \"compressed-blobs\" segment where expected",
                quote(name)
            )));
        }
    };
    // A function segment is present when the segment is not a hash: hashes
    // are hex, every function name has a non-hex letter.
    let mut function = default;
    if let Some(first) = rest.first()
        && rest.len() >= 3
        && !first.chars().all(|c| c.is_ascii_hexdigit())
    {
        function = DigestFunction::from_name(first).ok_or_else(|| {
            ParseError::new(format!(
                "resource name {}: digest function {} is not supported (supported: sha256, blake3)",
                quote(name),
                quote(first)
            ))
        })?;
        rest = &rest[1..];
    }
    let hash = rest.first().ok_or_else(short)?;
    let size = rest.get(1).ok_or_else(short)?;
    let size: i64 = size
        .parse()
        .map_err(|_| ParseError::new(format!("resource name {}: size {} is not a number", quote(name), quote(size))))?;
    let digest = Digest::new(function, hash, size)
        .map_err(|e| ParseError::new(format!("resource name {}: {e}", quote(name))))?;
    Ok((compressor, digest, &rest[2..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn d(function: DigestFunction, size: u64) -> Digest {
        Digest::new(function, H, size as i64).unwrap()
    }

    #[test]
    fn read_names_accepted() {
        use Compressor::*;
        use DigestFunction::*;
        let cases: Vec<(String, &str, Compressor, Digest)> = vec![
            (format!("blobs/{H}/0"), "", Identity, d(Sha256, 0)),
            (format!("main/blobs/{H}/5"), "main", Identity, d(Sha256, 5)),
            (format!("projects/p/instances/i/blobs/{H}/7"), "projects/p/instances/i", Identity, d(Sha256, 7)),
            (format!("blobs/sha256/{H}/3"), "", Identity, d(Sha256, 3)),
            (format!("blobs/blake3/{H}/3"), "", Identity, d(Blake3, 3)),
            (format!("a/b/compressed-blobs/zstd/{H}/9"), "a/b", Zstd, d(Sha256, 9)),
            (format!("compressed-blobs/zstd/blake3/{H}/9"), "", Zstd, d(Blake3, 9)),
            (format!("compressed-blobs/identity/{H}/9"), "", Identity, d(Sha256, 9)),
        ];
        for (name, instance, compressor, digest) in cases {
            let r = ReadResource::parse(&name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(r.instance.as_str(), instance, "{name}");
            assert_eq!(r.compressor, compressor, "{name}");
            assert_eq!(r.digest, digest, "{name}");
        }
    }

    #[test]
    fn read_names_refused() {
        let cases = [
            (String::new(), "no \"blobs\""),
            (format!("x/{H}/1"), "no \"blobs\""),
            (format!("blobs/{H}"), "ends before"),
            (format!("blobs/{H}/-1"), "negative"),
            (format!("blobs/{H}/abc"), "not a number"),
            ("blobs/abc/1".to_string(), "64 hex digits"),
            (format!("blobs/md5/{H}/1"), "md5"),
            (format!("compressed-blobs/brotli/{H}/1"), "brotli"),
            ("compressed-blobs/zstd".to_string(), "ends before"),
            (format!("/blobs/{H}/1"), "empty path segment"),
            (format!("a//b/blobs/{H}/1"), "empty path segment"),
            (format!("blobs/{H}/1/extra"), "unexpected segments"),
        ];
        for (name, why) in cases {
            let err = ReadResource::parse(&name).unwrap_err();
            assert!(err.0.contains(why), "{name}: {err}");
        }
    }

    #[test]
    fn write_names_accepted() {
        use Compressor::*;
        use DigestFunction::*;
        let cases: Vec<(String, &str, &str, Compressor, Digest)> = vec![
            (format!("uploads/u1/blobs/{H}/4"), "", "u1", Identity, d(Sha256, 4)),
            (format!("inst/uploads/u2/blobs/{H}/4/some/meta"), "inst", "u2", Identity, d(Sha256, 4)),
            (format!("a/b/c/uploads/u3/compressed-blobs/zstd/{H}/4"), "a/b/c", "u3", Zstd, d(Sha256, 4)),
            (format!("uploads/u4/compressed-blobs/zstd/blake3/{H}/4/m"), "", "u4", Zstd, d(Blake3, 4)),
            (format!("uploads/u5/blobs/blake3/{H}/4"), "", "u5", Identity, d(Blake3, 4)),
        ];
        for (name, instance, uuid, compressor, digest) in cases {
            let w = WriteResource::parse(&name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(w.instance.as_str(), instance, "{name}");
            assert_eq!(w.uuid, uuid, "{name}");
            assert_eq!(w.compressor, compressor, "{name}");
            assert_eq!(w.digest, digest, "{name}");
        }
    }

    #[test]
    fn write_names_refused() {
        let cases = [
            (format!("blobs/{H}/1"), "no \"uploads\""),
            (format!("uploads//blobs/{H}/1"), "no upload id"),
            (format!("uploads/u/{H}/1"), "where expected"),
            (format!("uploads/u/blobs/{H}/x"), "not a number"),
            (format!("blobs/uploads/u/blobs/{H}/1"), "reserved"),
        ];
        for (name, why) in cases {
            let err = WriteResource::parse(&name).unwrap_err();
            assert!(err.0.contains(why), "{name}: {err}");
        }
    }

    /// A long name is quoted once and cut (issue 9, item 9): the message
    /// stays small whatever the client sent.
    #[test]
    fn long_names_are_quoted_once_and_cut() {
        let long = "n".repeat(100_000);
        let names = [
            format!("{long}//blobs/{H}/1"),
            format!("{long}/blobs/{H}/1/x"),
            format!("{long}/uploads/{long}/blobs/{long}/1"),
            format!("blobs/{H}/{long}"),
            format!("compressed-blobs/{long}/{H}/1"),
            format!("blobs/{long}/{H}/1"),
            long.clone(),
        ];
        for name in names {
            for err in [ReadResource::parse(&name).err(), WriteResource::parse(&name).err()].into_iter().flatten() {
                assert!(err.0.len() < 1000, "{} bytes: {}", err.0.len(), &err.0[..300]);
                assert!(err.0.contains(" bytes)"), "{err}");
            }
        }
        let err = InstanceName::new(&format!("{long}/..")).unwrap_err();
        assert!(err.0.len() < 400 && err.0.contains("\"..\""), "{err}");
    }

    /// A name without a function segment takes the instance's default; a
    /// named function still wins (Buck2 names none for BLAKE3).
    #[test]
    fn names_without_a_function_take_the_instances_default() {
        use DigestFunction::*;
        let default = |i: &InstanceName| if i.as_str() == "b3" { Blake3 } else { Sha256 };
        let cases = [
            ("b3/", "", Blake3),
            ("b3/", "compressed-", Blake3),
            ("b3/", "sha256/", Sha256),
            ("other/", "", Sha256),
            ("", "blake3/", Blake3),
        ];
        for (instance, part, function) in cases {
            let (read, write) = match part {
                "compressed-" => (
                    format!("{instance}compressed-blobs/zstd/{H}/1"),
                    format!("{instance}uploads/u/compressed-blobs/zstd/{H}/1"),
                ),
                _ => (format!("{instance}blobs/{part}{H}/1"), format!("{instance}uploads/u/blobs/{part}{H}/1")),
            };
            assert_eq!(ReadResource::parse_with(&read, default).unwrap().digest.function, function, "{read}");
            assert_eq!(WriteResource::parse_with(&write, default).unwrap().digest.function, function, "{write}");
        }
    }

    #[test]
    fn names_round_trip() {
        for function in DigestFunction::ALL {
            for compressor in [Compressor::Identity, Compressor::Zstd] {
                for instance in ["", "one", "a/b"] {
                    let instance = InstanceName::new(instance).unwrap();
                    let r = ReadResource { instance: instance.clone(), compressor, digest: d(function, 11) };
                    assert_eq!(ReadResource::parse(&r.to_name()).unwrap(), r);
                    let w = WriteResource { instance, uuid: "x".into(), compressor, digest: d(function, 11) };
                    assert_eq!(WriteResource::parse(&w.to_name()).unwrap(), w);
                }
            }
        }
    }
}
