//! One span per call: the gRPC method, who is asking (the principal, once
//! the service has identified it) and what for, from the REAPI
//! RequestMetadata header (tool, invocation, action, mnemonic, target), so
//! a client's failure can be found in the server's log. Every line logged
//! while a call is served carries these fields (in JSON logs as `span`).
//! Tokens never appear: a principal is a token's name in the token file.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use prost::Message;
use remote_apis::reapi::RequestMetadata;
use tower_http::classify::{GrpcErrorsAsFailures, SharedClassifier};
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, MakeSpan, TraceLayer};
use tracing::field::Empty;
use tracing::{Level, Span};

use crate::auth::METADATA_HEADER;

#[derive(Clone, Copy)]
pub struct CallSpan;

impl<B> MakeSpan<B> for CallSpan {
    fn make_span(&mut self, request: &http::Request<B>) -> Span {
        // The request context decodes RequestMetadata for the services;
        // decode it here too only when the span is going to be recorded.
        // Info level: warnings and errors of a call say whose call it was.
        if !tracing::enabled!(Level::INFO) {
            return Span::none();
        }
        let span = tracing::info_span!(
            "call",
            method = request.uri().path(),
            tool = Empty,
            tool_version = Empty,
            invocation = Empty,
            correlated_invocations = Empty,
            action_id = Empty,
            mnemonic = Empty,
            target = Empty,
            // Recorded by the request context (`Auth::caller`) once known.
            principal = Empty,
        );
        if let Some(m) = metadata(request.headers()) {
            let tool = m.tool_details.unwrap_or_default();
            for (field, value) in [
                ("tool", tool.tool_name),
                ("tool_version", tool.tool_version),
                ("invocation", m.tool_invocation_id),
                ("correlated_invocations", m.correlated_invocations_id),
                ("action_id", m.action_id),
                ("mnemonic", m.action_mnemonic),
                ("target", m.target_id),
            ] {
                if !value.is_empty() {
                    span.record(field, value);
                }
            }
        }
        span
    }
}

/// Decodes the binary RequestMetadata header, if present and well formed
/// (binary gRPC headers are base64, padded or not).
fn metadata(headers: &http::HeaderMap) -> Option<RequestMetadata> {
    let value = headers.get(METADATA_HEADER)?.as_bytes();
    let raw = STANDARD.decode(value).or_else(|_| STANDARD_NO_PAD.decode(value)).ok()?;
    RequestMetadata::decode(raw.as_slice()).ok()
}

/// The layer: a span per call at info level; the per-call lines (and
/// failures such as cache misses, which are normal traffic) at debug.
pub fn layer() -> TraceLayer<SharedClassifier<GrpcErrorsAsFailures>, CallSpan> {
    TraceLayer::new_for_grpc()
        .make_span_with(CallSpan)
        .on_response(DefaultOnResponse::new().level(Level::DEBUG))
        .on_failure(DefaultOnFailure::new().level(Level::DEBUG))
}

#[cfg(test)]
mod tests {
    use super::*;
    use remote_apis::reapi::ToolDetails;

    #[test]
    fn reads_bazel_request_metadata() {
        let m = RequestMetadata {
            tool_details: Some(ToolDetails { tool_name: "bazel".into(), tool_version: "4.2.3".into() }),
            tool_invocation_id: "inv-1".into(),
            action_mnemonic: "Genrule".into(),
            ..Default::default()
        };
        for encode in [STANDARD.encode(m.encode_to_vec()), STANDARD_NO_PAD.encode(m.encode_to_vec())] {
            let mut headers = http::HeaderMap::new();
            headers.insert(METADATA_HEADER, encode.parse().unwrap());
            assert_eq!(metadata(&headers), Some(m.clone()));
        }
        let mut headers = http::HeaderMap::new();
        headers.insert(METADATA_HEADER, "%%%".parse().unwrap());
        assert_eq!(metadata(&headers), None);
    }
}
