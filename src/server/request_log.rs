//! One debug span per call: the gRPC method, and who is asking, from the
//! REAPI RequestMetadata header (tool, invocation, action mnemonic, target),
//! so a client's failure can be found in the server's log.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use prost::Message;
use remote_apis::reapi::RequestMetadata;
use tower_http::classify::{GrpcErrorsAsFailures, SharedClassifier};
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, MakeSpan, TraceLayer};
use tracing::{Level, Span};

use crate::auth::METADATA_HEADER;

#[derive(Clone, Copy)]
pub struct CallSpan;

impl<B> MakeSpan<B> for CallSpan {
    fn make_span(&mut self, request: &http::Request<B>) -> Span {
        // The request context decodes RequestMetadata for the services;
        // decode it here too only when the span is going to be recorded.
        if !tracing::enabled!(Level::DEBUG) {
            return Span::none();
        }
        let method = request.uri().path();
        match metadata(request.headers()) {
            Some(m) => tracing::debug_span!(
                "call",
                method,
                tool =
                    m.tool_details.as_ref().map(|t| format!("{} {}", t.tool_name, t.tool_version)).unwrap_or_default(),
                invocation = m.tool_invocation_id,
                mnemonic = m.action_mnemonic,
                target = m.target_id,
            ),
            None => tracing::debug_span!("call", method),
        }
    }
}

/// Decodes the binary RequestMetadata header, if present and well formed
/// (binary gRPC headers are base64, padded or not).
fn metadata(headers: &http::HeaderMap) -> Option<RequestMetadata> {
    let value = headers.get(METADATA_HEADER)?.as_bytes();
    let raw = STANDARD.decode(value).or_else(|_| STANDARD_NO_PAD.decode(value)).ok()?;
    RequestMetadata::decode(raw.as_slice()).ok()
}

/// The layer: spans at debug level; failures such as cache misses are
/// normal traffic, so their lines stay at debug too.
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
