//! `object_store` errors as the server's errors: the engine down or slow is
//! UNAVAILABLE (clients retry), refused credentials say so, and every
//! message names the store (bucket and endpoint), never a secret.

use std::error::Error as _;
use std::time::Duration;

use object_store::client::HttpError;
use tonic::Code;

use crate::error::Error;

/// How the store names itself in errors and logs.
#[derive(Clone)]
pub(super) struct Names {
    /// "s3 store BUCKET at ENDPOINT".
    pub store: String,
}

/// S3 error codes that mean the key pair is wrong, whatever HTTP status
/// the server sent them with.
const CREDENTIAL_CODES: [&str; 4] = ["InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken"];

impl Names {
    pub fn new(bucket: &str, endpoint: &str) -> Self {
        Names { store: format!("s3 store {bucket} at {endpoint}") }
    }

    /// `e`, which happened while doing `what`.
    pub fn error(&self, e: object_store::Error, what: &str) -> Error {
        let (code, hint) = classify(&e);
        Error::new(code, format!("{}: {what}: {hint}{e}", self.store))
    }

    pub fn timed_out(&self, what: &str, after: Duration) -> Error {
        Error::new(Code::Unavailable, format!("{}: {what}: no answer within {after:?}", self.store))
    }

    /// A blob stream that ended before its last byte.
    pub fn short_read(&self, digest: &remote_apis::Digest, got: u64, expected: u64) -> Error {
        Error::new(
            Code::Unavailable,
            format!("{}: reading blob {digest}: the stream ended after {got} of {expected} bytes", self.store),
        )
    }
}

fn classify(e: &object_store::Error) -> (Code, &'static str) {
    use object_store::Error as E;
    const CREDENTIALS: (Code, &str) =
        (Code::Unavailable, "the server refused the credentials (check access_key_id and the secret key): ");
    match e {
        E::NotFound { .. } => (Code::NotFound, ""),
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => CREDENTIALS,
        E::Generic { .. } | E::JoinError { .. } => {
            let text = e.to_string();
            if text.contains("builder error") {
                // reqwest could not make its client: on Linux, almost always
                // no CA certificates for an https endpoint.
                return (
                    Code::FailedPrecondition,
                    "cannot make an HTTPS client (an https endpoint needs the system's CA certificates: \
                     install ca-certificates): ",
                );
            }
            let mut source = e.source();
            while let Some(s) = source {
                // No answer: refused, reset, timed out.
                if s.downcast_ref::<HttpError>().is_some() {
                    return (Code::Unavailable, "");
                }
                source = s.source();
            }
            classify_answer(&text, CREDENTIALS)
        }
        _ => (Code::Internal, ""),
    }
}

/// An error answer of the server. `object_store` keeps its status private
/// (`RetryError`), so it is read from the message: "...status code: 503
/// ...", or an error document in a 200 answer ("error response: ...").
fn classify_answer(message: &str, credentials: (Code, &'static str)) -> (Code, &'static str) {
    if CREDENTIAL_CODES.iter().any(|c| message.contains(c)) {
        return credentials;
    }
    let status = message
        .split_once("status code: ")
        .and_then(|(_, rest)| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok());
    match status {
        Some(500..=599 | 429) => (Code::Unavailable, ""),
        Some(401 | 403) => credentials,
        Some(_) => (Code::Internal, ""),
        // S3's retryable errors inside a 200 answer, and anything unknown:
        // the engine misbehaving is for the client to retry.
        None => (Code::Unavailable, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified_by_status_and_s3_code() {
        let creds = (Code::FailedPrecondition, "creds");
        let cases = [
            ("Server returned non-2xx status code: 503 Service Unavailable: slow", Code::Unavailable),
            ("Server returned non-2xx status code: 429 Too Many Requests: ", Code::Unavailable),
            ("Server returned non-2xx status code: 400 Bad Request: <Code>SignatureDoesNotMatch</Code>", creds.0),
            ("Server returned non-2xx status code: 403 Forbidden: ", creds.0),
            ("Server returned non-2xx status code: 400 Bad Request: <Code>EntityTooSmall</Code>", Code::Internal),
            ("Server returned error response: <Code>InternalError</Code>", Code::Unavailable),
        ];
        for (message, code) in cases {
            assert_eq!(classify_answer(message, creds).0, code, "{message}");
        }
    }
}
