//! One error type for the whole server. It keeps the gRPC code it will be
//! reported with, a message a person can act on (context is prepended as the
//! error travels outward), and the typed details clients act on: the digests
//! that are missing (FAILED_PRECONDITION + PreconditionFailure) and the field
//! that was bad (INVALID_ARGUMENT + BadRequest).

use std::fmt;

use remote_apis::{Digest, ParseError, rpc};
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

impl Error {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Error { code, message: message.into(), missing: Vec::new(), bad_field: None }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(Code::InvalidArgument, message)
    }

    /// INVALID_ARGUMENT that names the offending request field.
    pub fn bad_field(field: &str, message: impl Into<String>) -> Self {
        let message = message.into();
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
        let status = tonic::Status::from(self.clone());
        if !status.details().is_empty()
            && let Ok(full) = rpc::Status::decode(status.details())
        {
            return full;
        }
        self.to_rpc_status()
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

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let mut details = ErrorDetails::new();
        let mut any = false;
        if e.code == Code::FailedPrecondition && !e.missing.is_empty() {
            for d in &e.missing {
                details.add_precondition_failure_violation(
                    "MISSING",
                    format!("blobs/{}/{}", d.hash_hex(), d.size),
                    format!("blob {d} is not in the CAS"),
                );
            }
            any = true;
        }
        if let Some((field, description)) = &e.bad_field {
            details.add_bad_request_violation(field.clone(), description.clone());
            any = true;
        }
        if any {
            tonic::Status::with_error_details(e.code, e.message, details)
        } else {
            tonic::Status::new(e.code, e.message)
        }
    }
}
