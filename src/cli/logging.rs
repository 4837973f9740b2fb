//! The process's log on stderr. `DISTBUILD_LOG` filters it (default
//! `info`, with object_store's per-retry lines at `warn`: an S3 store that
//! is down would log every retry of every HEAD of a FindMissingBlobs, while
//! the call's own UNAVAILABLE already says what failed); `DISTBUILD_LOG_FORMAT=json` writes one JSON object per line,
//! with the fields of the call it belongs to (the request log's span:
//! method, RequestMetadata, principal). Colours only on a terminal: a log
//! file or a journal gets no escape codes.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// The variable that picks the format: `json`, or `text` (the default).
pub const FORMAT_ENV: &str = "DISTBUILD_LOG_FORMAT";

/// The filter without `DISTBUILD_LOG`.
pub const DEFAULT_FILTER: &str = "info,object_store=warn";

pub fn init() {
    let filter = EnvFilter::try_from_env("DISTBUILD_LOG").unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let format = std::env::var(FORMAT_ENV).unwrap_or_default();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format.eq_ignore_ascii_case("json") {
        // The event's fields at the top level beside `message`; the call's
        // fields under `span` (the innermost) and `spans` (all, outermost
        // first).
        let _ = builder.json().flatten_event(true).with_current_span(true).with_span_list(true).try_init();
        return;
    }
    let _ = builder.with_ansi(std::io::stderr().is_terminal()).try_init();
    if !format.is_empty() && !format.eq_ignore_ascii_case("text") {
        tracing::warn!(%format, "{FORMAT_ENV} is \"json\" or \"text\"; writing text");
    }
}
