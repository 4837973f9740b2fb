//! What the transport proved about the other end of a connection: its
//! address and, over mTLS, the names in its verified client certificate.
//! The listener attaches a [`ConnInfo`] to every connection; tonic copies it
//! into each request's extensions, where the request context reads it.

use std::net::SocketAddr;
use std::sync::Arc;

/// The names a verified client certificate carries: its subject's common
/// name and its subject alternative names (DNS, URI, e-mail), in that order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    pub names: Vec<String>,
}

/// Per-connection facts, in every request's extensions.
#[derive(Debug, Clone, Default)]
pub struct ConnInfo {
    pub remote: Option<SocketAddr>,
    /// Set only when the client presented a certificate that verified
    /// against the configured CA.
    pub peer: Option<Arc<PeerIdentity>>,
}

/// The verified client certificate of the connection a request came on.
pub fn identity(extensions: &http::Extensions) -> Option<&PeerIdentity> {
    extensions.get::<ConnInfo>()?.peer.as_deref()
}
