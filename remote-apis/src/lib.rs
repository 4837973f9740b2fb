//! What every side of cargo-distbuild needs of the Remote Execution API.
//!
//! The wire types come from the `bazel-remote-apis` crate and are re-exported
//! as [`reapi`], [`asset`], [`bytestream`], [`longrunning`] and [`rpc`]. On top of them
//! this crate holds the strong types that are parsed once at the boundary
//! ([`Digest`], [`DigestFunction`], [`InstanceName`], [`ReadResource`],
//! [`WriteResource`]) and a [`client::CasClient`] that moves blobs the way
//! the server expects (batches for small blobs, ByteStream for large ones).

pub mod client;
pub mod digest;
pub mod logstream;
pub mod merkle;
pub mod resource;
pub mod wrapper_state;

pub use digest::{Digest, DigestFunction, Hasher, ParseError};
pub use resource::{Compressor, InstanceName, ReadResource, WriteResource};

/// `build.bazel.remote.asset.v1` (the Remote Asset API: Fetch and Push).
pub use bazel_remote_apis::build::bazel::remote::asset::v1 as asset;
/// `build.bazel.remote.execution.v2`.
pub use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
/// `build.bazel.semver`.
pub use bazel_remote_apis::build::bazel::semver;
/// `google.bytestream`.
pub use bazel_remote_apis::google::bytestream;
/// `google.longrunning`.
pub use bazel_remote_apis::google::longrunning;
/// `google.protobuf` well-known types as generated for the REAPI messages.
pub use bazel_remote_apis::google::protobuf;
/// `google.rpc`.
pub use bazel_remote_apis::google::rpc;

/// Longest part of a client-supplied value that an error message quotes.
/// Names arrive from clients unbounded (a 100 KB resource name is a valid
/// request); a message that repeats them can exceed what gRPC clients accept
/// as metadata, and then they see RESOURCE_EXHAUSTED instead of the error.
pub const QUOTE_LIMIT: usize = 200;

/// A client-supplied value for an error message: debug-quoted, and cut to
/// [`QUOTE_LIMIT`] bytes (at a char boundary) with an ellipsis and the full
/// length when longer. Every message that names a client's value goes
/// through this, once.
pub fn quote(value: &str) -> Quoted<'_> {
    Quoted(value)
}

/// See [`quote`].
#[derive(Clone, Copy)]
pub struct Quoted<'a>(&'a str);

impl std::fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let head = &self.0[..floor_char_boundary(self.0, QUOTE_LIMIT)];
        write!(f, "{head:?}")?;
        if head.len() < self.0.len() {
            write!(f, "\u{2026} ({} bytes)", self.0.len())?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Quoted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Cuts `text` to at most `max` bytes at a char boundary; a cut text ends
/// with an ellipsis (counted in `max`). For whole messages; values inside
/// them go through [`quote`].
pub fn truncate(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    const ELLIPSIS: &str = "\u{2026}";
    let head = &text[..floor_char_boundary(text, max.saturating_sub(ELLIPSIS.len()))];
    format!("{head}{ELLIPSIS}").into()
}

/// The largest char boundary of `s` at or below `at`.
fn floor_char_boundary(s: &str, at: usize) -> usize {
    let mut i = at.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_keeps_short_values_whole() {
        assert_eq!(quote("main").to_string(), "\"main\"");
        assert_eq!(quote("").to_string(), "\"\"");
        assert_eq!(quote("a\"b\n").to_string(), "\"a\\\"b\\n\"");
        let exact = "x".repeat(QUOTE_LIMIT);
        assert_eq!(quote(&exact).to_string(), format!("\"{exact}\""));
    }

    #[test]
    fn quote_cuts_long_values_once_with_length() {
        let long = "x".repeat(100_000);
        let q = quote(&long).to_string();
        assert_eq!(q, format!("\"{}\"\u{2026} (100000 bytes)", "x".repeat(QUOTE_LIMIT)));
    }

    #[test]
    fn quote_cuts_at_char_boundaries() {
        // 'é' is 2 bytes: 199 ASCII bytes then 'é' straddles the limit.
        let s = format!("{}é{}", "a".repeat(QUOTE_LIMIT - 1), "b".repeat(10));
        let q = quote(&s).to_string();
        assert_eq!(q, format!("\"{}\"\u{2026} ({} bytes)", "a".repeat(QUOTE_LIMIT - 1), s.len()));
        let wide = "€".repeat(1000);
        let q = quote(&wide).to_string();
        assert!(q.starts_with(&format!("\"{}\"", "€".repeat(QUOTE_LIMIT / 3))), "{q}");
    }

    #[test]
    fn truncate_table() {
        let cases: [(&str, usize, &str); 6] = [
            ("short", 10, "short"),
            ("exactly10!", 10, "exactly10!"),
            ("eleven char", 10, "eleven \u{2026}"),
            ("ééééé", 8, "éé\u{2026}"),
            ("ééééé", 9, "ééé\u{2026}"),
            ("abc", 0, "\u{2026}"),
        ];
        for (text, max, want) in cases {
            let got = truncate(text, max);
            assert_eq!(got, want, "{text:?} at {max}");
            assert!(got.len() <= max.max(3), "{text:?} at {max}: {} bytes", got.len());
        }
    }
}
