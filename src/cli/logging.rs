//! The process's log on stderr. `DISTBUILD_LOG` filters it (default
//! `info`); `DISTBUILD_LOG_FORMAT=json` writes one JSON object per line,
//! with the fields of the call it belongs to (the request log's span:
//! method, RequestMetadata, principal). Colours only on a terminal: a log
//! file or a journal gets no escape codes.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// The variable that picks the format: `json`, or `text` (the default).
pub const FORMAT_ENV: &str = "DISTBUILD_LOG_FORMAT";

pub fn init() {
    let filter = EnvFilter::try_from_env("DISTBUILD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
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
