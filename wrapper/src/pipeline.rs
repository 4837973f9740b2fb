//! cargo's pipelining, as the wrapper keeps it: with `--json=artifacts`
//! rustc prints `{"$message_type":"artifact","artifact":"<path>","emit":
//! "metadata"}` on stderr once the `.rmeta` is written, and cargo starts
//! the crate's dependents at that line instead of at the end of the
//! compile. Whoever hands cargo that line must have the `.rmeta` (and the
//! wrapper's `.dbdeps` sidecar, which a dependent's wrapper reads) in place
//! first.
//!
//! cargo reads only whether the notification's `artifact` ends in `.rmeta`
//! (`on_stderr_line` in cargo's `compiler/mod.rs`), but a replayed line
//! still names the path where this machine's file is, never the path of the
//! machine or worker that produced the result.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// An artifact notification of rustc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    /// The path as rustc printed it.
    pub path: String,
    /// `metadata`, `link`, `dep-info`...
    pub emit: String,
}

impl Artifact {
    /// Whether cargo takes this line as "the `.rmeta` is ready".
    pub fn is_metadata(&self) -> bool {
        self.emit == "metadata" || (self.emit.is_empty() && self.path.ends_with(".rmeta"))
    }
}

/// The artifact notification in one line of rustc's stderr, if it is one.
pub fn parse_artifact(line: &[u8]) -> Option<Artifact> {
    let line = line.trim_ascii();
    // Cheap test first: most lines are diagnostics.
    if !line.starts_with(b"{") || !contains(line, b"\"artifact\"") {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    if v.get("$message_type")?.as_str()? != "artifact" {
        return None;
    }
    Some(Artifact {
        path: v.get("artifact")?.as_str()?.to_string(),
        emit: v.get("emit").and_then(|e| e.as_str()).unwrap_or_default().to_string(),
    })
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// `line` with an artifact notification's path replaced by the output of
/// the same file name in `outputs` (the local paths cargo expects); any
/// other line unchanged.
pub fn localize<'a>(line: &'a [u8], outputs: &[PathBuf]) -> Cow<'a, [u8]> {
    let Some(a) = parse_artifact(line) else { return Cow::Borrowed(line) };
    let name = a.path.rsplit(['/', '\\']).next().unwrap_or_default();
    let Some(local) = outputs.iter().find(|o| o.file_name().is_some_and(|n| n.to_string_lossy() == name)) else {
        return Cow::Borrowed(line);
    };
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(line.trim_ascii()) else {
        return Cow::Borrowed(line);
    };
    v["artifact"] = serde_json::Value::String(local.to_string_lossy().into_owned());
    let mut out = v.to_string().into_bytes();
    if line.ends_with(b"\n") {
        out.push(b'\n');
    }
    Cow::Owned(out)
}

/// Every line of `stderr` through [`localize`].
pub fn localize_all(stderr: &[u8], outputs: &[PathBuf]) -> Vec<u8> {
    let mut out = Vec::with_capacity(stderr.len());
    for line in stderr.split_inclusive(|b| *b == b'\n') {
        out.extend_from_slice(&localize(line, outputs));
    }
    out
}

/// The byte offset just after the metadata notification in `stderr`, if
/// there is one: what a cache hit prints once the `.rmeta` is in place.
pub fn after_metadata(stderr: &[u8]) -> Option<usize> {
    let mut at = 0;
    for line in stderr.split_inclusive(|b| *b == b'\n') {
        at += line.len();
        if parse_artifact(line).is_some_and(|a| a.is_metadata()) {
            return Some(at);
        }
    }
    None
}

/// The `.rmeta` among a compile's outputs.
pub fn rmeta_of(outputs: &[PathBuf]) -> Option<&Path> {
    outputs.iter().map(PathBuf::as_path).find(|o| o.extension().is_some_and(|e| e == "rmeta"))
}

/// For tests of pipelining only: with `DISTBUILD_TEST_PAUSE_AFTER_RMETA=
/// CRATE=MS`, the compile of CRATE waits MS milliseconds after handing
/// cargo the metadata notification, so that a test sees a dependent start
/// while this compile still runs (ordering, not timing, is asserted).
pub fn test_pause(crate_name: &str) {
    let Ok(v) = std::env::var("DISTBUILD_TEST_PAUSE_AFTER_RMETA") else { return };
    if let Some((name, ms)) = v.split_once('=')
        && name == crate_name
        && let Ok(ms) = ms.parse()
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// Live stderr of a compile (a local rustc, or a remote one read through
/// LogStream): hands each complete line on, and says when the metadata
/// notification goes by so that the caller can put the `.rmeta` in place
/// before printing it. Partial lines are kept until their newline.
#[derive(Default)]
pub struct LiveLines {
    partial: Vec<u8>,
    /// Bytes handed on so far (the final replay prints only the rest).
    pub passed: usize,
    pub metadata_seen: bool,
}

/// One line out of [`LiveLines::feed`].
pub struct Line<'a> {
    pub bytes: &'a [u8],
    /// The metadata notification: deliver the `.rmeta` before printing.
    pub metadata: bool,
}

impl LiveLines {
    /// Feeds a chunk of stderr; `each` gets every line completed by it.
    pub fn feed(&mut self, chunk: &[u8], each: &mut dyn FnMut(Line<'_>)) {
        self.partial.extend_from_slice(chunk);
        let Some(last) = self.partial.iter().rposition(|b| *b == b'\n') else { return };
        let rest = self.partial.split_off(last + 1);
        let done = std::mem::replace(&mut self.partial, rest);
        for bytes in done.split_inclusive(|b| *b == b'\n') {
            let metadata = !self.metadata_seen && parse_artifact(bytes).is_some_and(|a| a.is_metadata());
            self.metadata_seen |= metadata;
            self.passed += bytes.len();
            each(Line { bytes, metadata });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const META: &[u8] = b"{\"$message_type\":\"artifact\",\"artifact\":\"/w/a/target/debug/deps/libx-1.rmeta\",\"emit\":\"metadata\"}\n";

    #[test]
    fn artifact_lines_are_told_from_diagnostics() {
        type Case<'a> = (&'a [u8], Option<(&'a str, &'a str)>);
        let cases: [Case; 5] = [
            (META, Some(("/w/a/target/debug/deps/libx-1.rmeta", "metadata"))),
            (
                b"{\"$message_type\":\"artifact\",\"artifact\":\"t/libx-1.rlib\",\"emit\":\"link\"}",
                Some(("t/libx-1.rlib", "link")),
            ),
            (b"{\"$message_type\":\"diagnostic\",\"message\":\"artifact\",\"rendered\":\"\\\"artifact\\\"\"}\n", None),
            (b"warning: unused variable `artifact`\n", None),
            (b"{\"$message_type\":\"artifact\"", None),
        ];
        for (line, want) in cases {
            let got = parse_artifact(line);
            assert_eq!(
                got.as_ref().map(|a| (a.path.as_str(), a.emit.as_str())),
                want,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        assert!(parse_artifact(META).unwrap().is_metadata());
    }

    #[test]
    fn notifications_name_the_local_output() {
        let outputs = vec![PathBuf::from("/here/target/debug/deps/libx-1.rmeta")];
        let got = localize(META, &outputs);
        assert_eq!(
            &*got,
            b"{\"$message_type\":\"artifact\",\"artifact\":\"/here/target/debug/deps/libx-1.rmeta\",\"emit\":\"metadata\"}\n"
        );
        let other = b"warning: x\n";
        assert!(matches!(localize(other, &outputs), Cow::Borrowed(_)));
    }

    #[test]
    fn the_head_ends_at_the_metadata_line() {
        let stderr = [b"warning: a\n".as_slice(), META, b"warning: b\n"].concat();
        assert_eq!(after_metadata(&stderr), Some(11 + META.len()));
        assert_eq!(after_metadata(b"warning: a\n"), None);
    }

    #[test]
    fn live_lines_wait_for_newlines_and_flag_metadata_once() {
        let mut live = LiveLines::default();
        let mut seen = Vec::new();
        let (a, b) = META.split_at(20);
        live.feed(b"warning: a\nwarn", &mut |l| seen.push((l.bytes.to_vec(), l.metadata)));
        live.feed(b"ing: b\n", &mut |l| seen.push((l.bytes.to_vec(), l.metadata)));
        live.feed(a, &mut |l| seen.push((l.bytes.to_vec(), l.metadata)));
        assert_eq!(seen.len(), 2);
        live.feed(b, &mut |l| seen.push((l.bytes.to_vec(), l.metadata)));
        live.feed(META, &mut |l| seen.push((l.bytes.to_vec(), l.metadata)));
        let flags: Vec<bool> = seen.iter().map(|s| s.1).collect();
        assert_eq!(flags, vec![false, false, true, false]);
        assert_eq!(seen[2].0, META);
        assert_eq!(live.passed, 11 + 11 + 2 * META.len());
    }
}
