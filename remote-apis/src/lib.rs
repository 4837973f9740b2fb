//! What every side of cargo-distbuild needs of the Remote Execution API.
//!
//! The wire types come from the `bazel-remote-apis` crate and are re-exported
//! as [`reapi`], [`bytestream`], [`longrunning`] and [`rpc`]. On top of them
//! this crate holds the strong types that are parsed once at the boundary
//! ([`Digest`], [`DigestFunction`], [`InstanceName`], [`ReadResource`],
//! [`WriteResource`]) and a [`client::CasClient`] that moves blobs the way
//! the server expects (batches for small blobs, ByteStream for large ones).

pub mod client;
pub mod digest;
pub mod merkle;
pub mod resource;

pub use digest::{Digest, DigestFunction, Hasher, ParseError};
pub use resource::{Compressor, InstanceName, ReadResource, WriteResource};

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
