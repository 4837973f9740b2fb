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

/// The address of the client a request came from (what tonic's
/// `Request::remote_addr` answers for its own listeners; the server's
/// listener attaches a [`ConnInfo`] instead).
pub fn remote_addr(extensions: &http::Extensions) -> Option<SocketAddr> {
    extensions.get::<ConnInfo>()?.remote
}

/// The names a client certificate carries (DER): the subject's common
/// names, then its DNS, URI and e-mail subject alternative names.
pub fn names_of_certificate(der: &[u8]) -> Result<PeerIdentity, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("unparsable certificate: {e}"))?;
    let mut names: Vec<String> =
        cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok()).map(str::to_string).collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(n) | GeneralName::URI(n) | GeneralName::RFC822Name(n) => names.push(n.to_string()),
                _ => {}
            }
        }
    }
    Ok(PeerIdentity { names })
}
