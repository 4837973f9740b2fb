//! Negative results: compiles that fail deterministically (a build
//! script's probe meant to fail: anyhow, thiserror, proc-macro2 and
//! rustversion compile a probe through `$RUSTC_WRAPPER $RUSTC`) are
//! remembered under their key, so the next build replays the failure
//! instead of compiling the probe again (remotely, then locally for the
//! verdict).
//!
//! A failure is remembered only when it is rustc's own verdict on the code:
//! exit code 1 (rustc's "compilation failed"; 101 is an internal compiler
//! error, anything above 128 a signal, 126/127 a missing toolchain file),
//! at least one error diagnostic, none of the errors that mean the worker's
//! toolchain is incomplete (a crate or library not found or unreadable),
//! and a compile that does not link (a link failure may be the worker's
//! system libraries). A remote failure that passes [`trusted`] is the
//! verdict at once; any other remote failure is re-run here, and the local
//! failure (the verdict) is remembered if it passes the same test.
//!
//! Stored as an ActionResult with the exit code, stdout and stderr and no
//! outputs, its `execution_metadata.worker` set to [`MARK`]. The wrapper
//! replays only results so marked ([`is_negative`]): stderr byte for byte,
//! the same exit code, nothing written.

use remote_apis::reapi::ActionResult;

/// `ExecutedActionMetadata.worker` of a negative result.
pub const MARK: &str = "distbuild-rustc negative result";

/// rustc's exit code for "the code does not compile".
const COMPILE_ERROR: i32 = 1;

/// Errors that mean the toolchain or an input is missing where the compile
/// ran, not that the code is wrong: a crate not found (E0463), compiled by
/// another rustc (E0514), found twice or invalid (E0460, E0786), and I/O
/// failures.
const ENVIRONMENT_ERRORS: &[&str] =
    &["E0463", "E0514", "E0460", "E0786", "No such file or directory", "os error", "Permission denied"];

/// Whether a failed compile's result is rustc's verdict on the code (see
/// the module documentation).
pub fn trusted(exit_code: i32, stderr: &[u8], links: bool) -> bool {
    if exit_code != COMPILE_ERROR || links {
        return false;
    }
    let text = String::from_utf8_lossy(stderr);
    let has_error = text.contains("\"level\":\"error\"") || text.lines().any(|l| l.starts_with("error"));
    has_error && !ENVIRONMENT_ERRORS.iter().any(|e| text.contains(e))
}

/// Whether `result` is a negative result the wrapper stored.
pub fn is_negative(result: &ActionResult) -> bool {
    result.exit_code == COMPILE_ERROR
        && result.output_files.is_empty()
        && result.execution_metadata.as_ref().is_some_and(|m| m.worker == MARK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use remote_apis::reapi::ExecutedActionMetadata;

    const E0554: &[u8] = b"{\"$message_type\":\"diagnostic\",\"message\":\"`#![feature]` may not be used on the stable release channel\",\"code\":{\"code\":\"E0554\"},\"level\":\"error\"}\n";

    #[test]
    fn only_rustcs_own_verdicts_are_trusted() {
        let human = b"error[E0554]: `#![feature]` may not be used on the stable release channel\n";
        let missing = b"error[E0463]: can't find crate for `std`\n";
        let io = b"error: couldn't read src/lib.rs: No such file or directory (os error 2)\n";
        let cases: [(i32, &[u8], bool, bool); 9] = [
            (1, E0554, false, true),
            (1, human, false, true),
            (1, E0554, true, false),            // links: the worker's libraries
            (101, E0554, false, false),         // an internal compiler error
            (137, b"", false, false),           // killed
            (127, b"", false, false),           // no compiler
            (1, b"warning: x\n", false, false), // no error diagnostic
            (1, missing, false, false),
            (1, io, false, false),
        ];
        for (code, stderr, links, want) in cases {
            assert_eq!(trusted(code, stderr, links), want, "{code} {} links={links}", String::from_utf8_lossy(stderr));
        }
    }

    #[test]
    fn only_marked_results_are_replayed_as_failures() {
        let marked = |worker: &str, exit_code| ActionResult {
            exit_code,
            execution_metadata: Some(ExecutedActionMetadata { worker: worker.into(), ..Default::default() }),
            ..Default::default()
        };
        assert!(is_negative(&marked(MARK, 1)));
        assert!(!is_negative(&marked("worker-1", 1)));
        assert!(!is_negative(&marked(MARK, 101)));
        assert!(!is_negative(&ActionResult { exit_code: 1, ..Default::default() }));
    }
}
