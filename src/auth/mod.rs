//! Who may do what: grants per instance-name prefix, and the one check every
//! service goes through.
//!
//! A call is parsed once into a [`RequestContext`] (principal, instance name,
//! digest function, RequestMetadata) by [`Auth::context`], which also checks
//! the grant the call needs. The identity comes from a bearer token (hashed
//! and looked up in the token file, see `tokens.rs`) or a verified client
//! certificate; a caller with neither is anonymous and gets `[auth]
//! anonymous`. No identity where one is needed is UNAUTHENTICATED; an
//! identity without the grant is PERMISSION_DENIED naming the grant and the
//! instance (Buck2 reads PERMISSION_DENIED on UpdateActionResult as a
//! read-only cache, so no other code may be used for it).

mod context;
pub mod tokens;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

pub use context::{Auth, Caller, FunctionField, METADATA_HEADER, RequestContext};

/// One capability a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Grant {
    /// FindMissingBlobs, BatchReadBlobs, ByteStream Read, GetTree, GetCapabilities.
    CasRead,
    /// BatchUpdateBlobs, ByteStream Write/QueryWriteStatus, Split/Splice and
    /// their chunk-mapping forms (both store blobs).
    CasWrite,
    /// GetActionResult.
    AcRead,
    /// UpdateActionResult: separate from `cas-write`, so developers can share
    /// blobs while only CI and workers write results.
    AcWrite,
    /// Execute, WaitExecution, and the Operations calls on the caller's own
    /// operations.
    Execute,
    /// Connecting as a remote worker (the worker gateway); implies
    /// `cas-read` and `cas-write` (see [`GrantSet::contains`]).
    Worker,
    /// The admin API and every operation, whoever created it; implies
    /// `status`.
    Admin,
    /// Reading the HTTP status pages and `/metrics` (read-only: no drain
    /// buttons, no admin RPCs), for dashboards and the people who read them.
    Status,
    /// Remote Asset FetchBlob/FetchDirectory answered from records or the
    /// CAS (no download).
    AssetRead,
    /// Remote Asset PushBlob/PushDirectory: saying what a URI names, which
    /// every later Fetch of it trusts.
    AssetPush,
    /// A FetchBlob that downloads from the URI (the server makes requests
    /// on the caller's behalf); implies `asset-read`.
    AssetFetch,
}

impl Grant {
    pub const ALL: [Grant; 11] = [
        Grant::CasRead,
        Grant::CasWrite,
        Grant::AcRead,
        Grant::AcWrite,
        Grant::Execute,
        Grant::Worker,
        Grant::Admin,
        Grant::Status,
        Grant::AssetRead,
        Grant::AssetPush,
        Grant::AssetFetch,
    ];

    /// The name used in config files, token files and error messages.
    pub fn name(self) -> &'static str {
        match self {
            Grant::CasRead => "cas-read",
            Grant::CasWrite => "cas-write",
            Grant::AcRead => "ac-read",
            Grant::AcWrite => "ac-write",
            Grant::Execute => "execute",
            Grant::Worker => "worker",
            Grant::Admin => "admin",
            Grant::Status => "status",
            Grant::AssetRead => "asset-read",
            Grant::AssetPush => "asset-push",
            Grant::AssetFetch => "asset-fetch",
        }
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Grant {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Grant::ALL.into_iter().find(|g| g.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Grant::ALL.iter().map(|g| g.name()).collect();
            format!("unknown grant {s:?} (known: {})", names.join(", "))
        })
    }
}

/// A set of grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GrantSet(u16);

impl GrantSet {
    pub const NONE: GrantSet = GrantSet(0);
    pub const ALL: GrantSet = GrantSet(u16::MAX);

    /// Whether the set allows `grant`. `worker` implies `cas-read` and
    /// `cas-write`: a worker fetches its actions' inputs and uploads their
    /// outputs, and can do nothing useful without both. `admin` implies
    /// `status`: whoever may drain a worker may see it. `asset-fetch`
    /// implies `asset-read`: a Fetch that may download may also be answered
    /// from what is already known.
    pub fn contains(self, grant: Grant) -> bool {
        self.0 & grant.bit() != 0
            || (matches!(grant, Grant::CasRead | Grant::CasWrite) && self.0 & Grant::Worker.bit() != 0)
            || (grant == Grant::Status && self.0 & Grant::Admin.bit() != 0)
            || (grant == Grant::AssetRead && self.0 & Grant::AssetFetch.bit() != 0)
    }

    pub fn insert(&mut self, grant: Grant) {
        self.0 |= grant.bit();
    }

    /// Parses grant names, e.g. `["cas-read", "ac-read"]`.
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<GrantSet, String> {
        let mut set = GrantSet::NONE;
        for n in names {
            set.insert(n.as_ref().parse()?);
        }
        Ok(set)
    }

    pub fn iter(self) -> impl Iterator<Item = Grant> {
        Grant::ALL.into_iter().filter(move |g| self.contains(*g))
    }
}

impl fmt::Display for GrantSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.iter().map(Grant::name).collect();
        write!(f, "[{}]", names.join(", "))
    }
}

/// Whether an instance name lies under a prefix. Prefixes match whole path
/// segments: `team-a` covers `team-a` and `team-a/ci`, not `team-abc`; the
/// empty prefix covers every instance, the empty one included.
pub fn under_prefix(instance: &str, prefix: &str) -> bool {
    prefix.is_empty()
        || instance == prefix
        || (instance.len() > prefix.len() && instance.starts_with(prefix) && instance.as_bytes()[prefix.len()] == b'/')
}

/// What one principal may do: grant sets per instance-name prefix. A grant
/// holds on an instance when any prefix covering it has it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    rules: Vec<(String, GrantSet)>,
}

impl Grants {
    /// `set` on every instance.
    pub fn everywhere(set: GrantSet) -> Grants {
        Grants { rules: vec![(String::new(), set)] }
    }

    /// Adds `set` on the instances under `prefix` (a trailing `/` is
    /// ignored).
    pub fn add(&mut self, prefix: &str, set: GrantSet) {
        let prefix = prefix.trim_end_matches('/').to_string();
        match self.rules.iter_mut().find(|(p, _)| *p == prefix) {
            Some((_, s)) => s.0 |= set.0,
            None => self.rules.push((prefix, set)),
        }
    }

    pub fn allows(&self, instance: &str, grant: Grant) -> bool {
        self.rules.iter().any(|(p, s)| s.contains(grant) && under_prefix(instance, p))
    }

    /// Whether `grant` holds on at least one instance (calls that name no
    /// instance, such as GetOperation, check the operation's own after).
    pub fn allows_somewhere(&self, grant: Grant) -> bool {
        self.rules.iter().any(|(_, s)| s.contains(grant))
    }
}

/// Who is calling, as far as authorization and operation ownership care.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    /// No token and no client certificate (or one the token file does not
    /// name, see [`Principal::Certificate`]).
    Anonymous,
    /// A bearer token, by its name in the token file.
    Token(Arc<str>),
    /// A verified client certificate, by the name (subject CN or SAN) the
    /// token file lists it under, or its first name when not listed.
    Certificate(Arc<str>),
}

impl Principal {
    /// Whether the caller proved an identity (a PERMISSION_DENIED, not an
    /// UNAUTHENTICATED, when a grant is missing).
    pub fn is_identified(&self) -> bool {
        !matches!(self, Principal::Anonymous)
    }

    /// A short label (metrics, logs): `anonymous`, `token:NAME`, `cert:NAME`.
    pub fn label(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Anonymous => f.write_str("anonymous"),
            Principal::Token(n) => write!(f, "token:{n}"),
            Principal::Certificate(n) => write!(f, "cert:{n}"),
        }
    }
}

/// How calls are authenticated, from `[auth] mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// No `[auth]` section: everything is allowed, but only on loopback
    /// listeners (the server refuses to start on another address).
    #[default]
    Unset,
    /// `mode = "none"`: everything is allowed for everyone, on purpose.
    None,
    /// `mode = "tokens"` (the default once `[auth]` exists): bearer tokens
    /// and client certificates from the token file, `anonymous` for the rest.
    Tokens,
}

/// `[auth]`, validated.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    pub mode: Mode,
    /// The token file (tokens and certificate principals with their grants).
    pub tokens: Option<PathBuf>,
    /// Grants of callers without an identity, on every instance.
    pub anonymous: GrantSet,
}

impl AuthConfig {
    /// Whether every caller may do everything (no token file is read).
    pub fn is_open(&self) -> bool {
        matches!(self.mode, Mode::Unset | Mode::None)
    }

    /// Refuses an unauthenticated server on a non-loopback address: anyone
    /// who reaches it could run commands and write the cache. `what` names
    /// the listener (`[scheduler] addr`, `[server] worker_listen`).
    pub fn check_listener(&self, addr: std::net::SocketAddr, what: &str) -> anyhow::Result<()> {
        if self.mode == Mode::Unset && !addr.ip().is_loopback() {
            anyhow::bail!(
                "refusing to serve on {addr} ({what}) without authentication: anyone who can reach it could \
                 run commands and overwrite cached results. Add an [auth] section with a token file, e.g.\n  \
                 [auth]\n  tokens = \"/etc/cargo-distbuild/tokens.toml\"\n  anonymous = [\"cas-read\", \
                 \"ac-read\"]\nand create tokens with `cargo-distbuild token new NAME --grant ...`; or, on a \
                 trusted network, opt out explicitly with\n  [auth]\n  mode = \"none\"\nor listen on a loopback \
                 address"
            );
        }
        if self.mode == Mode::None && !addr.ip().is_loopback() {
            tracing::warn!(%addr, what, "[auth] mode = \"none\": every caller may write the cache and run commands");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
