//! The request context: every call parsed once into who is asking, for which
//! instance (and that instance's settings, `[instances]`), with which digest
//! function and RequestMetadata, and checked against the grant it needs.
//! Authorization, per-instance settings, metrics labels and logs all read
//! this one value.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::{Mutex, RwLock};
use prost::Message;
use remote_apis::reapi::RequestMetadata;
use remote_apis::{DigestFunction, InstanceName};
use tokio_util::sync::CancellationToken;
use tonic::Code;

use super::tokens::{self, Policy};
use super::{AuthConfig, Grant, Grants, Mode, Principal};
use crate::config::{InstanceSettings, Instances};
use crate::error::Error;

/// The REAPI header that says which tool, invocation and action a call
/// belongs to.
pub const METADATA_HEADER: &str = "build.bazel.remote.execution.v2.requestmetadata-bin";

/// How often the token file is checked for changes.
const RELOAD_POLL: Duration = Duration::from_secs(2);

/// The digest function a call names, before its instance's default applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FunctionField {
    /// The call has none (GetCapabilities, the Operations calls, the admin API).
    Absent,
    /// A request's `digest_function` value: UNKNOWN (0) is the instance's
    /// default, an unsupported one INVALID_ARGUMENT naming the field.
    Proto(i32),
    /// Already resolved: a resource name parsed with the instance's default
    /// ([`Auth::instance`]), or a function the server chose.
    Known(DigestFunction),
}

impl From<Option<DigestFunction>> for FunctionField {
    fn from(f: Option<DigestFunction>) -> Self {
        f.map_or(FunctionField::Absent, FunctionField::Known)
    }
}

/// One parsed, authorized call.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub principal: Principal,
    pub instance: InstanceName,
    /// The call's digest function, the instance's default when the request
    /// left it unset; `None` for calls that have none (GetCapabilities, the
    /// Operations calls, the admin API).
    pub digest_function: Option<DigestFunction>,
    /// The client's RequestMetadata header, when it sent a well-formed one.
    pub metadata: Option<Arc<RequestMetadata>>,
    /// The instance's `[instances]` settings (the defaults when no key
    /// covers it).
    pub settings: Arc<InstanceSettings>,
    grants: Arc<Grants>,
}

impl RequestContext {
    /// Whether the caller also holds `grant` on this call's instance (e.g.
    /// GetCapabilities reports `update_enabled` from `ac-write`). `ac-write`
    /// never holds on an instance whose cache is read-only for clients.
    pub fn allows(&self, grant: Grant) -> bool {
        (grant != Grant::AcWrite || self.settings.ac_write) && self.grants.allows(self.instance.as_str(), grant)
    }

    /// The call's digest function: the one it named, else the instance's
    /// default (also for calls that name none, e.g. GetCapabilities).
    pub fn function(&self) -> DigestFunction {
        self.digest_function.unwrap_or(self.settings.digest_function)
    }

    /// Requires a second grant on this call's instance, for a call whose
    /// later step needs more than its first check (a FetchBlob that has to
    /// download needs `asset-fetch`): the same error as the first check.
    pub fn require(&self, grant: Grant) -> Result<(), Error> {
        tokens::check(&self.principal, &self.grants, self.instance.as_str(), grant)
    }

    /// Whether the caller holds `grant` on another instance (operations
    /// carry their own).
    pub fn allows_on(&self, instance: &InstanceName, grant: Grant) -> bool {
        self.grants.allows(instance.as_str(), grant)
    }
}

/// An authenticated caller whose grant is not checked yet: for streaming
/// calls, whose instance name arrives in the first message, and for calls
/// that name no instance.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    pub metadata: Option<Arc<RequestMetadata>>,
    grants: Arc<Grants>,
    instances: Arc<Instances>,
}

impl Caller {
    pub fn allows(&self, instance: &InstanceName, grant: Grant) -> bool {
        self.grants.allows(instance.as_str(), grant)
    }

    /// The context for `instance`, if the caller holds `grant` there: the
    /// digest function resolved against the instance's default (an
    /// unsupported one is INVALID_ARGUMENT), then the grant checked, then
    /// the instance's own rules (`ac_write = false` refuses `ac-write` with
    /// PERMISSION_DENIED, which Buck2 reads as a read-only cache).
    pub fn authorize(
        &self,
        instance: &InstanceName,
        digest_function: impl Into<FunctionField>,
        grant: Grant,
    ) -> Result<RequestContext, Error> {
        let settings = self.instances.get(instance).clone();
        let digest_function = match digest_function.into() {
            FunctionField::Absent => None,
            FunctionField::Known(f) => Some(f),
            FunctionField::Proto(value) => Some(
                DigestFunction::from_proto_or(value, settings.digest_function)
                    .map_err(|e| Error::bad_field("digest_function", e.0))?,
            ),
        };
        tokens::check(&self.principal, &self.grants, instance.as_str(), grant)?;
        if grant == Grant::AcWrite && !settings.ac_write {
            return Err(Error::new(
                Code::PermissionDenied,
                format!(
                    "the ActionCache of instance {} is read-only for clients ([instances] ac_write = false); \
                     results of remote executions are still cached",
                    remote_apis::quote(instance.as_str())
                ),
            ));
        }
        Ok(RequestContext {
            principal: self.principal.clone(),
            instance: instance.clone(),
            digest_function,
            metadata: self.metadata.clone(),
            settings,
            grants: self.grants.clone(),
        })
    }

    /// Requires one of `grants` on at least one instance (calls that name
    /// no instance; what they may touch is checked per item after).
    pub fn require_somewhere(&self, grants: &[Grant]) -> Result<(), Error> {
        if grants.iter().any(|g| self.grants.allows_somewhere(*g)) {
            return Ok(());
        }
        Err(tokens::denied(&self.principal, grants[0], "on any instance"))
    }
}

/// The authenticator and authorizer every service holds. The policy (token
/// file plus anonymous grants) is swapped whole when the file changes.
pub struct Auth {
    config: AuthConfig,
    /// `[instances]`: every context carries its instance's settings.
    instances: Arc<Instances>,
    policy: RwLock<Arc<Policy>>,
    /// The token file's stamp when last read.
    seen: Mutex<Option<FileStamp>>,
}

/// (modification time, size, inode, change time): an edit in place or a
/// replacement by rename both change it.
type FileStamp = (SystemTime, u64, u64, (i64, i64));

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Auth {
    /// Everything allowed for every caller: `mode = "none"`, or no `[auth]`
    /// on a loopback listener. The caller is anonymous with every grant.
    pub fn open() -> Arc<Auth> {
        Arc::new(Auth {
            config: AuthConfig::default(),
            instances: Arc::default(),
            policy: RwLock::new(Arc::new(Policy::open())),
            seen: Mutex::default(),
        })
    }

    /// The policy `config` describes, for instances configured as
    /// `instances` says; the token file must be readable and valid now
    /// (later, a broken file keeps the previous policy).
    pub fn new(config: &AuthConfig, instances: Arc<Instances>) -> anyhow::Result<Arc<Auth>> {
        let policy = match (config.mode, &config.tokens) {
            (Mode::Unset | Mode::None, _) => Policy::open(),
            (Mode::Tokens, None) => Policy::anonymous_only(config.anonymous),
            (Mode::Tokens, Some(path)) => Policy::load(path, config.anonymous)?,
        };
        let auth =
            Auth { config: config.clone(), instances, policy: RwLock::new(Arc::new(policy)), seen: Mutex::default() };
        if let Some(path) = &config.tokens {
            *auth.seen.lock() = stamp(path);
        }
        Ok(Arc::new(auth))
    }

    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    /// The settings of `instance`, for what must be parsed before the
    /// context exists (a resource name's digest function).
    pub fn instance(&self, instance: &InstanceName) -> Arc<InstanceSettings> {
        self.instances.get(instance).clone()
    }

    /// Whether every caller may do everything.
    pub fn is_open(&self) -> bool {
        self.policy.read().is_open()
    }

    /// Re-reads the token file now. On error the previous policy stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let (Mode::Tokens, Some(path)) = (self.config.mode, &self.config.tokens) else { return Ok(()) };
        let now = stamp(path);
        let policy = Policy::load(path, self.config.anonymous)?;
        let (tokens, certs) = policy.len();
        *self.policy.write() = Arc::new(policy);
        *self.seen.lock() = now;
        tracing::info!(file = %path.display(), tokens, certs, "token file loaded");
        Ok(())
    }

    /// Reloads when the token file changed since it was last read (checked
    /// every 2 s) and on SIGHUP, until `stop`. A broken file is reported and
    /// the previous policy kept; it is tried again when it changes again.
    pub fn watch(self: &Arc<Self>, stop: CancellationToken) {
        let Some(path) = self.config.tokens.clone().filter(|_| self.config.mode == Mode::Tokens) else { return };
        let auth = self.clone();
        crate::upkeep::every(RELOAD_POLL, stop.clone(), move || {
            let now = stamp(&path);
            let mut seen = auth.seen.lock();
            if now == *seen {
                return;
            }
            // Remember the broken version too: one warning per change.
            *seen = now;
            drop(seen);
            auth.reload_logged(&path);
        });
        let auth = self.clone();
        let path: PathBuf = self.config.tokens.clone().unwrap_or_default();
        if let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        got = hangup.recv() => if got.is_none() { return },
                        () = stop.cancelled() => return,
                    }
                    auth.reload_logged(&path);
                }
            });
        }
    }

    fn reload_logged(&self, path: &std::path::Path) {
        if let Err(e) = self.reload() {
            tracing::warn!(file = %path.display(), error = %format!("{e:#}"), "token file not reloaded; keeping the previous one");
        }
    }

    /// Who is calling: the bearer token of the `authorization` header, else
    /// the verified client certificate, else anonymous. UNAUTHENTICATED for
    /// a malformed header or an unknown token.
    pub fn caller<T>(&self, request: &tonic::Request<T>) -> Result<Caller, Error> {
        self.caller_from(request.metadata(), crate::server::peer::identity(request.extensions()))
    }

    /// [`Auth::caller`] from a call's headers and its connection's verified
    /// certificate: for the HTTP listener, which is not gRPC.
    pub fn caller_from(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        peer: Option<&crate::server::peer::PeerIdentity>,
    ) -> Result<Caller, Error> {
        let policy = self.policy.read().clone();
        let token = if policy.is_open() { None } else { bearer(metadata)? };
        let names = peer.map(|p| p.names.as_slice()).unwrap_or(&[]);
        let (principal, grants) = policy.identify(token, names)?;
        if principal.is_identified() {
            // The call's log span (server/request_log.rs) names the caller.
            tracing::Span::current().record("principal", tracing::field::display(&principal));
        }
        Ok(Caller { principal, metadata: request_metadata(metadata), grants, instances: self.instances.clone() })
    }

    /// The one check every service makes where it has parsed the body: the
    /// caller, authorized for `grant` on `instance`.
    pub fn context<T>(
        &self,
        request: &tonic::Request<T>,
        instance: &InstanceName,
        digest_function: impl Into<FunctionField>,
        grant: Grant,
    ) -> Result<RequestContext, Error> {
        self.caller(request)?.authorize(instance, digest_function, grant)
    }
}

fn stamp(path: &std::path::Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino(), (m.ctime(), m.ctime_nsec())))
}

/// The token of an `authorization: Bearer <token>` header. No header is no
/// token; any other form is UNAUTHENTICATED (never quoting the value).
fn bearer(metadata: &tonic::metadata::MetadataMap) -> Result<Option<&str>, Error> {
    let Some(value) = metadata.get("authorization") else { return Ok(None) };
    let bad = || Error::new(Code::Unauthenticated, "the authorization header must be \"Bearer <token>\"");
    let text = value.to_str().map_err(|_| bad())?;
    let (scheme, token) = text.split_once(' ').ok_or_else(bad)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(bad());
    }
    Ok(Some(token))
}

/// The RequestMetadata header, if present and well formed.
fn request_metadata(metadata: &tonic::metadata::MetadataMap) -> Option<Arc<RequestMetadata>> {
    let raw = metadata.get_bin(METADATA_HEADER)?.to_bytes().ok()?;
    RequestMetadata::decode(raw).ok().map(Arc::new)
}
