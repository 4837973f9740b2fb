//! One error type for the whole server. It keeps the gRPC code it will be
//! reported with, a message a person can act on (context is prepended as the
//! error travels outward), and the typed details clients act on: the digests
//! that are missing (FAILED_PRECONDITION + PreconditionFailure) and the field
//! that was bad (INVALID_ARGUMENT + BadRequest).

use std::fmt;

use remote_apis::{Digest, ParseError, rpc, truncate};
use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};

#[derive(Debug, Clone)]
pub struct Error {
    pub code: Code,
    pub message: String,
    /// Blobs whose absence caused the error.
    pub missing: Vec<Digest>,
    /// `(field, description)` of a bad request field.
    pub bad_field: Option<(String, String)>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Longest status message sent as gRPC metadata. The message travels twice
/// (`grpc-message`, percent-encoded: up to 3 bytes a byte, and inside
/// `grpc-status-details-bin`, base64), and default clients refuse a header
/// list above 16 KiB with RESOURCE_EXHAUSTED, hiding the real error. Client
/// values are already cut by [`remote_apis::quote`]; this is the backstop.
pub const MAX_STATUS_MESSAGE: usize = 2048;

/// Longest BadRequest description (it repeats what the message says).
const MAX_FIELD_DESCRIPTION: usize = 512;

/// PreconditionFailure violations sent as metadata (about 230 bytes each
/// once encoded). An operation's result (`to_rpc_status_with_details`) is a
/// message body, not metadata, and lists every missing blob.
const MAX_METADATA_VIOLATIONS: usize = 20;

impl Error {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Error { code, message: message.into(), missing: Vec::new(), bad_field: None }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(Code::InvalidArgument, message)
    }

    /// INVALID_ARGUMENT that names the offending request field. The
    /// description quotes the client's value at most once (through
    /// `remote_apis::quote`); message and BadRequest detail carry it cut.
    pub fn bad_field(field: &str, message: impl Into<String>) -> Self {
        let message = truncate(&message.into(), MAX_FIELD_DESCRIPTION).into_owned();
        let mut e = Error::invalid(format!("{field}: {message}"));
        e.bad_field = Some((field.to_string(), message));
        e
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Error::new(Code::NotFound, message)
    }

    /// A blob is absent: NOT_FOUND for reads of that blob.
    pub fn blob_not_found(digest: &Digest) -> Self {
        let mut e = Error::not_found(format!("blob {digest} is not in the CAS"));
        e.missing.push(*digest);
        e
    }

    /// Blobs an operation depends on are absent: FAILED_PRECONDITION with a
    /// PreconditionFailure listing each as `MISSING` / `blobs/{hash}/{size}`.
    pub fn missing_blobs(digests: Vec<Digest>, what: &str) -> Self {
        let list: Vec<String> = digests.iter().take(5).map(|d| d.to_string()).collect();
        let more = if digests.len() > 5 { format!(" and {} more", digests.len() - 5) } else { String::new() };
        Error {
            code: Code::FailedPrecondition,
            message: format!("{what}: missing blobs {}{more}", list.join(", ")),
            missing: digests,
            bad_field: None,
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Error::new(Code::Internal, message)
    }

    pub fn resource_exhausted(message: impl Into<String>) -> Self {
        Error::new(Code::ResourceExhausted, message)
    }

    /// Prepends what was being done when the error happened.
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// The form used for per-item statuses inside batch responses.
    pub fn to_rpc_status(&self) -> rpc::Status {
        rpc::Status { code: self.code as i32, message: self.message.clone(), details: Vec::new() }
    }

    /// The full `google.rpc.Status`, typed details included (for
    /// `ExecuteResponse.status`, where clients look for PreconditionFailure).
    pub fn to_rpc_status_with_details(&self) -> rpc::Status {
        use prost::Message;
        let status = self.to_status(usize::MAX);
        if !status.details().is_empty()
            && let Ok(full) = rpc::Status::decode(status.details())
        {
            return full;
        }
        self.to_rpc_status()
    }

    /// The status with its typed details, at most `violations` of the
    /// missing blobs listed.
    fn to_status(&self, violations: usize) -> tonic::Status {
        let mut details = ErrorDetails::new();
        let mut any = false;
        if self.code == Code::FailedPrecondition && !self.missing.is_empty() {
            for d in self.missing.iter().take(violations) {
                details.add_precondition_failure_violation(
                    "MISSING",
                    format!("blobs/{}/{}", d.hash_hex(), d.size),
                    format!("blob {d} is not in the CAS"),
                );
            }
            any = true;
        }
        if let Some((field, description)) = &self.bad_field {
            details.add_bad_request_violation(field.clone(), description.clone());
            any = true;
        }
        if any {
            tonic::Status::with_error_details(self.code, self.message.clone(), details)
        } else {
            tonic::Status::new(self.code, self.message.clone())
        }
    }

    pub fn io(context: impl fmt::Display, e: std::io::Error) -> Self {
        let code = match e.kind() {
            std::io::ErrorKind::NotFound => Code::NotFound,
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => Code::ResourceExhausted,
            _ => Code::Internal,
        };
        Error::new(code, format!("{context}: {e}"))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl std::error::Error for Error {}

impl From<ParseError> for Error {
    fn from(e: ParseError) -> Self {
        Error::invalid(e.0)
    }
}

/// The status a call returns: metadata, so bounded (message cut to
/// [`MAX_STATUS_MESSAGE`], at most 20 missing blobs listed) whatever the
/// error holds.
impl From<Error> for tonic::Status {
    fn from(mut e: Error) -> Self {
        if e.message.len() > MAX_STATUS_MESSAGE {
            e.message = truncate(&e.message, MAX_STATUS_MESSAGE).into_owned();
        }
        e.to_status(MAX_METADATA_VIOLATIONS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use remote_apis::DigestFunction;

    /// Every part of a status sent as metadata is bounded, however large
    /// the error (issue 9, item 9).
    #[test]
    fn statuses_stay_small() {
        let huge = "é".repeat(100_000);
        let digests: Vec<Digest> = (0..10_000u32).map(|i| DigestFunction::Sha256.digest_of(&i.to_le_bytes())).collect();
        let errors = [
            Error::invalid(huge.clone()),
            Error::bad_field("resource_name", huge.clone()),
            Error::missing_blobs(digests.clone(), &huge),
            Error::internal(huge.clone()).context(&huge),
        ];
        for e in errors {
            let status = tonic::Status::from(e.clone());
            assert_eq!(status.code(), e.code);
            assert!(status.message().len() <= MAX_STATUS_MESSAGE, "{}", status.message().len());
            assert!(status.message().ends_with('\u{2026}'), "cut messages say so");
            assert!(status.details().len() < 8 << 10, "details: {} bytes", status.details().len());
        }
        // The operation result (a body, not metadata) keeps every missing blob.
        let full = Error::missing_blobs(digests, "input root").to_rpc_status_with_details();
        use prost::Message;
        assert!(full.encoded_len() > 10_000 * 64, "all violations listed: {}", full.encoded_len());
    }

    #[test]
    fn bad_field_names_the_field_and_keeps_the_description_short() {
        let e = Error::bad_field(
            "instance_name",
            format!("instance name {} is bad", remote_apis::quote(&"x".repeat(5000))),
        );
        assert!(e.message.starts_with("instance_name: instance name \""), "{}", e.message);
        assert!(e.message.len() < 400, "{}", e.message.len());
        let (field, description) = e.bad_field.unwrap();
        assert_eq!(field, "instance_name");
        assert!(description.len() < 400);
    }
}
