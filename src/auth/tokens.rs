//! The token file and the policy built from it.
//!
//! ```toml
//! [[token]]
//! name = "ci"
//! sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! grants = ["cas-read", "cas-write", "ac-read", "ac-write", "execute"]   # every instance
//! instances = { "team-a" = ["admin"] }                                  # per instance-name prefix
//!
//! [[cert]]
//! name = "worker-1.build.example"   # a client certificate's subject CN or a SAN
//! grants = ["worker"]
//! ```
//!
//! Only the SHA-256 of a token is stored. A presented token is hashed and
//! looked up by that digest, so the comparison never runs over the secret
//! itself (nothing to time byte by byte) and the file is no secret.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tonic::Code;

use super::{Grant, GrantSet, Grants, Principal};
use crate::error::Error;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileText {
    #[serde(default)]
    token: Vec<TokenEntry>,
    #[serde(default)]
    cert: Vec<CertEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    sha256: String,
    #[serde(default)]
    grants: Vec<String>,
    #[serde(default)]
    instances: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CertEntry {
    name: String,
    #[serde(default)]
    grants: Vec<String>,
    #[serde(default)]
    instances: BTreeMap<String, Vec<String>>,
}

/// A principal the file names, with its grants.
#[derive(Debug, Clone)]
struct Entry {
    principal: Principal,
    grants: Arc<Grants>,
}

/// Who may do what: the token file plus the anonymous grants, or "open"
/// (everything allowed for everyone). Replaced whole on reload.
#[derive(Debug)]
pub struct Policy {
    open: bool,
    anonymous: Arc<Grants>,
    tokens: HashMap<[u8; 32], Entry>,
    certs: HashMap<String, Entry>,
}

impl Policy {
    /// Everything allowed for every caller (no `[auth]` on loopback, or
    /// `mode = "none"`).
    pub fn open() -> Policy {
        Policy {
            open: true,
            anonymous: Arc::new(Grants::everywhere(GrantSet::ALL)),
            tokens: HashMap::new(),
            certs: HashMap::new(),
        }
    }

    /// Anonymous grants only (no token file).
    pub fn anonymous_only(anonymous: GrantSet) -> Policy {
        Policy {
            open: false,
            anonymous: Arc::new(Grants::everywhere(anonymous)),
            tokens: HashMap::new(),
            certs: HashMap::new(),
        }
    }

    /// Reads and validates a token file.
    pub fn load(path: &Path, anonymous: GrantSet) -> anyhow::Result<Policy> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading the token file {}", path.display()))?;
        Policy::parse(&text, anonymous).with_context(|| format!("in the token file {}", path.display()))
    }

    pub fn parse(text: &str, anonymous: GrantSet) -> anyhow::Result<Policy> {
        let file: FileText = toml::from_str(text)?;
        let mut policy = Policy::anonymous_only(anonymous);
        let mut names = std::collections::HashSet::new();
        for (i, t) in file.token.into_iter().enumerate() {
            check_name(&t.name).with_context(|| format!("token[{i}].name"))?;
            if !names.insert(t.name.clone()) {
                bail!("token[{i}]: the name {:?} is used twice", t.name);
            }
            let digest = parse_sha256(&t.sha256).with_context(|| format!("token {:?}: sha256", t.name))?;
            let grants = grants(&t.grants, &t.instances).with_context(|| format!("token {:?}", t.name))?;
            let entry = Entry { principal: Principal::Token(t.name.as_str().into()), grants: Arc::new(grants) };
            if policy.tokens.insert(digest, entry).is_some() {
                bail!("token {:?}: the same sha256 appears twice", t.name);
            }
        }
        for (i, c) in file.cert.into_iter().enumerate() {
            if c.name.is_empty() || c.name.len() > 256 || c.name.chars().any(char::is_control) {
                bail!("cert[{i}].name must be 1-256 printable characters");
            }
            let grants = grants(&c.grants, &c.instances).with_context(|| format!("cert {:?}", c.name))?;
            let entry = Entry { principal: Principal::Certificate(c.name.as_str().into()), grants: Arc::new(grants) };
            if policy.certs.insert(c.name.clone(), entry).is_some() {
                bail!("cert {:?} is listed twice", c.name);
            }
        }
        Ok(policy)
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Tokens and certificate principals listed.
    pub fn len(&self) -> (usize, usize) {
        (self.tokens.len(), self.certs.len())
    }

    /// The caller's principal and grants. `token` is the bearer token if the
    /// call sent one (an unknown one is UNAUTHENTICATED: a mistyped token
    /// must not quietly fall back to anonymous access); `cert_names` the
    /// names of a verified client certificate, the first one the file lists
    /// winning. A valid token names the caller even over a certificate.
    pub fn identify(&self, token: Option<&str>, cert_names: &[String]) -> Result<(Principal, Arc<Grants>), Error> {
        if self.open {
            return Ok((Principal::Anonymous, self.anonymous.clone()));
        }
        if let Some(token) = token {
            let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            return match self.tokens.get(&digest) {
                Some(e) => Ok((e.principal.clone(), e.grants.clone())),
                None => Err(Error::new(
                    Code::Unauthenticated,
                    "the bearer token is not valid on this server (unknown or revoked)",
                )),
            };
        }
        if let Some(e) = cert_names.iter().find_map(|n| self.certs.get(n)) {
            return Ok((e.principal.clone(), e.grants.clone()));
        }
        if let Some(first) = cert_names.first() {
            // A certificate the CA vouches for but the file does not list:
            // known, with the anonymous grants only.
            return Ok((Principal::Certificate(first.as_str().into()), self.anonymous.clone()));
        }
        Ok((Principal::Anonymous, self.anonymous.clone()))
    }
}

/// The check itself: does `principal` with `grants` hold `grant` on
/// `instance`? The error says which grant on which instance is missing,
/// never which token was sent.
pub fn check(principal: &Principal, grants: &Grants, instance: &str, grant: Grant) -> Result<(), Error> {
    if grants.allows(instance, grant) {
        return Ok(());
    }
    Err(denied(principal, grant, &format!("on instance {}", remote_apis::quote(instance))))
}

/// The status for a missing grant: UNAUTHENTICATED for an anonymous caller
/// (an identity would be needed), PERMISSION_DENIED for a known one.
pub(crate) fn denied(principal: &Principal, grant: Grant, scope: &str) -> Error {
    if principal.is_identified() {
        Error::new(Code::PermissionDenied, format!("{principal} does not have the {grant} grant {scope}"))
    } else {
        Error::new(
            Code::Unauthenticated,
            format!(
                "this call needs the {grant} grant {scope}, which anonymous callers do not have: send a token \
                 (authorization: Bearer ...) or a client certificate"
            ),
        )
    }
}

fn grants(everywhere: &[String], instances: &BTreeMap<String, Vec<String>>) -> anyhow::Result<Grants> {
    let mut g = Grants::default();
    g.add("", GrantSet::parse(everywhere).map_err(anyhow::Error::msg).context("grants")?);
    for (prefix, names) in instances {
        let trimmed = prefix.trim_end_matches('/');
        remote_apis::InstanceName::new(trimmed).map_err(|e| anyhow::anyhow!("instances: {}", e.0))?;
        g.add(
            trimmed,
            GrantSet::parse(names).map_err(anyhow::Error::msg).with_context(|| format!("instances.{prefix:?}"))?,
        );
    }
    Ok(g)
}

/// Token names appear in logs, statuses and `jobs list`: keep them plain.
pub fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = |c: char| c.is_ascii_alphanumeric() || "._-@:+".contains(c);
    if name.is_empty() || name.len() > 128 || !name.chars().all(ok) {
        bail!("{name:?} must be 1-128 characters of letters, digits and . _ - @ : +");
    }
    Ok(())
}

fn parse_sha256(text: &str) -> anyhow::Result<[u8; 32]> {
    let bytes = hex::decode(text).map_err(|_| anyhow::anyhow!("is not hex (64 characters: the token's SHA-256)"))?;
    bytes.try_into().map_err(|_| anyhow::anyhow!("must be 64 hex characters (the token's SHA-256, not the token)"))
}

/// Prefix of generated tokens, so secret scanners and people recognise one.
pub const TOKEN_PREFIX: &str = "dbt_";

/// A fresh token: 32 bytes from the operating system's random source.
pub fn generate() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("reading the OS random source: {e}"))?;
    Ok(format!("{TOKEN_PREFIX}{}", hex::encode(bytes)))
}

/// The hex SHA-256 of a token, as the token file stores it.
pub fn sha256_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The `[[token]]` entry for a token file: `grants` on every instance, or,
/// with `instance`, on the instances under that prefix.
pub fn entry_toml(name: &str, sha256: &str, grants: &[Grant], instance: Option<&str>) -> String {
    let list: Vec<String> = grants.iter().map(|g| format!("\"{g}\"")).collect();
    let list = format!("[{}]", list.join(", "));
    let grants_line = match instance {
        Some(prefix) => format!("instances = {{ \"{}\" = {list} }}", prefix.replace('\\', "\\\\").replace('"', "\\\"")),
        None => format!("grants = {list}"),
    };
    format!("[[token]]\nname = \"{name}\"\nsha256 = \"{sha256}\"\n{grants_line}\n")
}
