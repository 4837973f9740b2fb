//! Configuration in two stages: [`FileConfig`] is what the user wrote
//! (TOML, every key optional, unknown keys rejected); [`Config`] is what the
//! program runs on, validated and resolved. Nothing outside this module and
//! the factory in `server` reads the schema.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use bytesize::ByteSize;
use serde::Deserialize;

mod instances;
mod server;
pub use instances::{InstanceSection, InstanceSettings, Instances};
mod asset;
pub use asset::{AssetConfig, AssetSection};
mod stores;
pub use server::{DEFAULT_HTTP_ADDR, HttpConfig, ServerSection};
pub use stores::{
    AcSection, DEFAULT_MEMORY_AC_ENTRIES, FilesystemConfig, IMPLICIT_CAS, MemoryConfig, StoreGraph, StoreSpec,
};

pub const DEFAULT_ADDR: &str = "127.0.0.1:8980";

/// 4 MiB less 64 KiB: a full batch response (blob bytes plus per-blob
/// framing) still fits gRPC's default 4 MiB receive limit, which most
/// clients keep.
pub const DEFAULT_MAX_BATCH: u64 = (4 << 20) - (64 << 10);

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    pub scheduler: SchedulerSection,
    pub cas: CasSection,
    /// `[ac]`: which store keeps the ActionCache.
    pub ac: AcSection,
    /// `[stores.NAME]`: named stores, composed (see `config/stores.rs`).
    pub stores: BTreeMap<String, StoreSpec>,
    pub worker: WorkerSection,
    pub execution: ExecutionSection,
    pub server: ServerSection,
    pub wrapper: WrapperSection,
    pub tls: TlsSection,
    pub client: ClientSection,
    /// `[auth]`; absent: everything is allowed, on loopback listeners only.
    pub auth: Option<AuthSection>,
    /// `[instances."NAME"]`: settings per instance name (see
    /// `config/instances.rs`).
    pub instances: BTreeMap<String, InstanceSection>,
    /// `[asset]`: the Remote Asset API's downloads.
    pub asset: AssetSection,
}

/// `[scheduler]`: where the server listens and where clients and workers
/// find it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerSection {
    pub addr: String,
    /// Where operations, queues and workers are kept: `"memory"` (one
    /// server) or `{ redis = "redis://...", prefix = "..." }` (replicas
    /// sharing one queue).
    pub state: StateSection,
}

impl Default for SchedulerSection {
    fn default() -> Self {
        SchedulerSection { addr: DEFAULT_ADDR.to_string(), state: StateSection::default() }
    }
}

/// `[scheduler] state`: a word for the built-in state, a table for Redis.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(untagged)]
pub enum StateSection {
    #[default]
    #[serde(skip)]
    Default,
    Memory(MemoryWord),
    Redis(crate::execution::state::RedisStateConfig),
}

/// The one word `state` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryWord {
    Memory,
}

/// The scheduler state the server runs on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SchedulerState {
    #[default]
    Memory,
    Redis(crate::execution::state::RedisStateConfig),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Filesystem,
    Memory,
}

/// Parked uploads in all: a quarter of the common soft limit of 1,024 open
/// files, so parking alone can never starve connections and reads of
/// descriptors, yet a few clients' worth of interrupted uploads resume.
pub const DEFAULT_MAX_PARKED: usize = 256;

/// Parked uploads per client address: a build tool's burst of concurrent
/// uploads cut by one network blip resumes, and one address (or one
/// attacker) can hold at most a quarter of the total.
pub const DEFAULT_MAX_PARKED_PER_CLIENT: usize = 64;

/// Reads of blobs under this size are always hashed. Measured with
/// `scripts/bench-storage.sh` (2 cores): BatchReadBlobs of 100-1000 B blobs
/// ran at 32,000/s unverified and 46,000-52,000/s verified (a small blob is
/// read, hashed and served in one blocking task instead of two), 60 KiB
/// blobs at 7,700/s and 7,500/s. Above this size hashing costs more than the
/// read, so larger blobs are hashed only when their file changed.
pub const DEFAULT_VERIFY_READS_BELOW: u64 = 64 << 10;

/// An hour: above bb_clientd's 5 minutes and enough for a build to go from
/// FindMissingBlobs to Execute; Buck2 assumes 3 h, so a Buck2 farm may want
/// more (README, "Buck2").
pub const DEFAULT_MIN_RETENTION: Duration = Duration::from_secs(3600);

/// `[cas]`: blob and action-cache storage.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CasSection {
    /// The `[stores.NAME]` that holds the blobs (and, without `[ac] store`,
    /// the ActionCache). Unset: the store this section describes
    /// (`backend`, `root`, `max_size`, ...), which must then be left out.
    pub store: Option<String>,
    /// Data directory; default `$XDG_CACHE_HOME/cargo-distbuild` or
    /// `~/.cache/cargo-distbuild`.
    pub root: Option<PathBuf>,
    pub backend: Backend,
    /// Budget for blobs; least recently used ones are evicted beyond it.
    pub max_size: ByteSize,
    /// Largest total of blob bytes in one batch request (advertised as
    /// `max_batch_total_size_bytes`).
    pub max_batch_size: ByteSize,
    /// fsync every blob before it becomes visible (survives power loss).
    pub fsync: bool,
    /// How long an interrupted ByteStream upload can be resumed.
    #[serde(with = "humantime_serde")]
    pub upload_resume_window: Duration,
    /// Interrupted uploads kept for resumption, in all and per client
    /// address (each holds an open temporary file); beyond either, the
    /// oldest is dropped and its client starts over.
    pub max_parked_uploads: usize,
    pub max_parked_uploads_per_client: usize,
    /// Blobs smaller than this are hashed on every read (filesystem store);
    /// larger ones when their file changed since it was written.
    pub verify_reads_below: ByteSize,
    /// A blob reported present (FindMissingBlobs), written or read is not
    /// evicted for this long: clients rely on what they were told (Buck2
    /// assumes hours, bb_clientd 5 minutes). When only such blobs remain,
    /// a write that needs room fails with RESOURCE_EXHAUSTED instead.
    #[serde(with = "humantime_serde")]
    pub min_retention: Duration,
    /// The keys the file set (filled by [`FileConfig::parse`]), so a key
    /// set to its default value beside `store` is still refused.
    #[serde(skip)]
    pub keys_written: std::collections::BTreeSet<String>,
}

impl Default for CasSection {
    fn default() -> Self {
        CasSection {
            store: None,
            keys_written: Default::default(),
            root: None,
            backend: Backend::Filesystem,
            max_size: ByteSize::gib(10),
            max_batch_size: ByteSize::b(DEFAULT_MAX_BATCH),
            fsync: false,
            upload_resume_window: Duration::from_secs(600),
            max_parked_uploads: DEFAULT_MAX_PARKED,
            max_parked_uploads_per_client: DEFAULT_MAX_PARKED_PER_CLIENT,
            verify_reads_below: ByteSize::b(DEFAULT_VERIFY_READS_BELOW),
            min_retention: DEFAULT_MIN_RETENTION,
        }
    }
}

/// `[worker]`: execution slots (the server's built-in ones and
/// `cargo-distbuild worker`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSection {
    /// The `[stores.NAME]` the server's built-in workers read inputs from
    /// and write outputs to; default the CAS store. E.g. a tiered store
    /// with a local disk in front of the shared CAS.
    pub store: Option<String>,
    /// Concurrent actions; default: the number of CPUs. 0 on a server: no
    /// built-in worker (scheduler only).
    pub capacity: Option<usize>,
    /// How often remote workers send keepalives; three missed ones drop the
    /// worker and re-queue its actions.
    pub heartbeat_interval_secs: u64,
    /// How long a remote worker told to stop (SIGTERM, SIGINT) lets its
    /// running actions finish before it kills them and exits; the scheduler
    /// re-queues what it killed.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Blob cache and action directories; default `<cas root>/worker`.
    pub work_dir: Option<PathBuf>,
    /// Budget of the worker's local blob cache.
    pub cache_size: ByteSize,
    /// Platform properties offered, on top of OSFamily, ISA and cpu-count.
    pub properties: BTreeMap<String, String>,
    /// The `cargo-distbuild` binary that supervises each action (kills
    /// every descendant at the action's end and when the worker dies).
    /// Default: the running binary for `server` and `worker`; unset for a
    /// server embedded in another program, which runs commands directly.
    pub action_init: Option<PathBuf>,
    /// How actions are isolated: "auto" (default: Linux namespaces; the
    /// worker refuses to start where they do not work), "namespaces" (the
    /// same, required), "none" (plain processes: trusted actions only).
    pub sandbox: crate::worker::runner::SandboxMode,
    /// The user sandboxed commands run as when the worker runs as root: a
    /// name, `uid` or `uid:gid`; default `nobody`.
    pub run_as: Option<String>,
    /// Actions whose platform asks `network=on` get the host's network
    /// (the worker offers `network=on`); others have loopback only.
    pub allow_network: bool,
    /// Most memory an action's process may have (RLIMIT_DATA), and the
    /// default for actions that set no `memory_limit`.
    pub max_memory: Option<ByteSize>,
    /// Most processes an action may have (RLIMIT_NPROC), and the default
    /// for actions that set no `process_limit`.
    pub max_processes: Option<u64>,
    /// More paths hidden from actions (beyond the work and data
    /// directories), e.g. TLS keys and token files.
    pub hide: Vec<PathBuf>,
    /// Most bytes an action may output (files, directories, stdout and
    /// stderr); an action's `output_bytes_limit` property may lower it.
    /// Over it the action fails with RESOURCE_EXHAUSTED, nothing uploaded.
    pub max_output_bytes: ByteSize,
    /// Most output files and symlinks an action may make; an action's
    /// `output_files_limit` property may lower it.
    pub max_output_files: u64,
    /// Actions whose platform names `container-image` run in a container of
    /// that image, through the Docker Engine (which must answer at start);
    /// the worker then offers `container-image=*`. Other actions run as
    /// `sandbox` says.
    pub docker: bool,
    /// The Docker Engine's address (`unix:///run/docker.sock`,
    /// `tcp://host:2375`); default: `DOCKER_HOST`, else the local socket.
    pub docker_host: Option<String>,
    /// Images this worker pulled that it keeps; past it, the least recently
    /// used one is removed from the engine (images it did not pull stay).
    pub docker_images: usize,
    /// A Docker CLI config file (`config.json`) with registry credentials
    /// for pulls (`auths`, `credHelpers`, `credsStore`), read at each pull;
    /// default: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
    /// Actions whose platform asks `chroot=input-root` run with their input
    /// root as `/` (the worker then offers the property; it needs the
    /// sandbox). Other actions run as before.
    pub input_root_as_root: bool,
}

impl Default for WorkerSection {
    fn default() -> Self {
        WorkerSection {
            store: None,
            capacity: None,
            heartbeat_interval_secs: 10,
            drain_timeout: Duration::from_secs(600),
            work_dir: None,
            cache_size: ByteSize::gib(10),
            properties: BTreeMap::new(),
            action_init: None,
            sandbox: Default::default(),
            run_as: None,
            allow_network: false,
            max_memory: None,
            max_processes: None,
            hide: Vec::new(),
            max_output_bytes: ByteSize::b(crate::worker::OutputLimits::default().max_bytes),
            max_output_files: crate::worker::OutputLimits::default().max_files,
            docker: false,
            docker_host: None,
            docker_images: crate::worker::runner::ContainerConfig::default().keep_images,
            docker_config: None,
            input_root_as_root: false,
        }
    }
}

/// `[execution]`: scheduling rules.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecutionSection {
    /// Timeout of an action that sets none.
    #[serde(with = "humantime_serde")]
    pub default_timeout: Duration,
    /// Longest timeout an action may ask for; above it, INVALID_ARGUMENT.
    #[serde(with = "humantime_serde")]
    pub max_timeout: Duration,
    /// Attempts per action when workers are lost while running it.
    pub max_attempts: u32,
    /// Properties matched as "at least" numbers rather than exactly.
    pub numeric_properties: Vec<String>,
    /// How long finished operations stay visible to WaitExecution.
    #[serde(with = "humantime_serde")]
    pub operation_retention: Duration,
    /// An Execute or WaitExecution stream whose operation has not changed
    /// for this long gets the current Operation again, so proxies and
    /// clients that never call WaitExecution (Buck2) see a live stream
    /// through a long action.
    #[serde(with = "humantime_serde")]
    pub stream_keepalive: Duration,
    /// At most this many finished operations are remembered.
    pub max_finished_operations: usize,
    /// How long an action waits when no connected worker could run it.
    #[serde(with = "humantime_serde")]
    pub unmatched_timeout: Duration,
    /// How long a failed run's result (non-zero exit or error) stays
    /// reachable from its action's status page; it never enters the
    /// ActionCache. "0s" keeps none.
    #[serde(with = "humantime_serde")]
    pub failed_retention: Duration,
    /// Limits on an input root (counted expanded: a directory named twice
    /// counts twice) and on an action's output directories: directory
    /// levels, directories, files and symlinks. Checked before queueing and
    /// again by the worker; defaults and their reasons in
    /// `worker::TreeLimits`.
    pub max_tree_depth: usize,
    pub max_tree_directories: u64,
    pub max_tree_files: u64,
    /// Bytes kept of each live stdout/stderr stream of a running action
    /// (REAPI LogStream); a reader further behind gets OUT_OF_RANGE.
    pub log_stream_window: bytesize::ByteSize,
    /// How long the live streams of a finished action stay readable; after
    /// it, NOT_FOUND (the output is in the ActionResult).
    #[serde(with = "humantime_serde")]
    pub log_stream_grace: Duration,
}

impl ExecutionSection {
    pub fn tree_limits(&self) -> crate::worker::TreeLimits {
        crate::worker::TreeLimits {
            max_depth: self.max_tree_depth,
            max_directories: self.max_tree_directories,
            max_files: self.max_tree_files,
        }
    }
}

impl Default for ExecutionSection {
    fn default() -> Self {
        ExecutionSection {
            default_timeout: Duration::from_secs(15 * 60),
            max_timeout: Duration::from_secs(3 * 3600),
            max_attempts: 3,
            numeric_properties: vec!["cpu-count".into()],
            operation_retention: Duration::from_secs(600),
            stream_keepalive: Duration::from_secs(30),
            max_finished_operations: 100_000,
            unmatched_timeout: Duration::from_secs(60),
            failed_retention: Duration::from_secs(24 * 3600),
            max_tree_depth: crate::worker::TreeLimits::default().max_depth,
            max_tree_directories: crate::worker::TreeLimits::default().max_directories,
            max_tree_files: crate::worker::TreeLimits::default().max_files,
            log_stream_window: bytesize::ByteSize(crate::execution::logstream::DEFAULT_WINDOW),
            log_stream_grace: crate::execution::logstream::DEFAULT_GRACE,
        }
    }
}

/// `[wrapper]`: what `cargo distbuild build` gives the rustc wrapper.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WrapperSection {
    /// The server builds use. Unset (and no `--server` or
    /// `DISTBUILD_SERVER`): a local server is started on demand.
    pub server: Option<String>,
    /// `remote` (look up, execute remotely on a miss), `cache-only` (look
    /// up, compile locally on a miss and store the result: CI runners) or
    /// `off`.
    pub mode: WrapperMode,
    /// With a remote server, `cargo distbuild` runs as many cargo jobs as
    /// the farm has free slots, at most this many (unless `-j` is given).
    pub max_jobs: u32,
}

fn default_max_jobs() -> u32 {
    64
}

impl Default for WrapperSection {
    fn default() -> WrapperSection {
        WrapperSection { server: None, mode: WrapperMode::default(), max_jobs: default_max_jobs() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WrapperMode {
    #[default]
    Remote,
    CacheOnly,
    Off,
}

impl WrapperMode {
    /// The value of `DISTBUILD_MODE` the wrapper reads.
    pub fn as_env(self) -> &'static str {
        match self {
            WrapperMode::Remote => "remote",
            WrapperMode::CacheOnly => "cache-only",
            WrapperMode::Off => "off",
        }
    }
}

/// `[auth]`: who may do what (see `crate::auth`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// `"tokens"` (the default): bearer tokens and client certificates from
    /// the token file, `anonymous` for callers with neither. `"none"`: no
    /// authentication at all, also on non-loopback addresses.
    pub mode: Option<String>,
    /// The token file: `[[token]]` (name, sha256, grants) and `[[cert]]`
    /// entries; reloaded when it changes and on SIGHUP.
    pub tokens: Option<PathBuf>,
    /// Grants of callers without a token or certificate, on every instance,
    /// e.g. `["cas-read", "ac-read"]` for a public read-only cache.
    pub anonymous: Vec<String>,
}

impl AuthSection {
    fn resolve(&self) -> anyhow::Result<crate::auth::AuthConfig> {
        use crate::auth::{AuthConfig, GrantSet, Mode};
        let mode = match self.mode.as_deref() {
            None | Some("tokens") => Mode::Tokens,
            Some("none") => Mode::None,
            Some(other) => bail!("[auth] mode {other:?} is not \"tokens\" or \"none\""),
        };
        let anonymous = GrantSet::parse(&self.anonymous).map_err(|e| anyhow::anyhow!("[auth] anonymous: {e}"))?;
        if mode == Mode::None && (self.tokens.is_some() || !self.anonymous.is_empty()) {
            bail!("[auth] mode = \"none\" allows everything: remove tokens and anonymous, or drop the mode");
        }
        Ok(AuthConfig { mode, tokens: self.tokens.clone(), anonymous })
    }
}

/// `[tls]`: the server's TLS (every listener). Unset: plaintext. The files
/// are PEM and are reloaded when they change and on SIGHUP, without
/// dropping connections.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// The server's certificate chain, leaf first. With `key`, turns TLS on.
    pub cert: Option<PathBuf>,
    /// The certificate's private key.
    pub key: Option<PathBuf>,
    /// CA certificates that client certificates must chain to (mTLS). The
    /// names of a verified client certificate (subject CN, then DNS, URI
    /// and e-mail SANs) are the caller's certificate identity.
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: refuse clients without a certificate (default
    /// true). false: such clients connect without a certificate identity
    /// (for anonymous grants or bearer tokens), while a certificate that
    /// is presented must still verify.
    pub require_client_cert: Option<bool>,
}

impl TlsSection {
    fn resolve(&self) -> anyhow::Result<Option<crate::server::tls::TlsSettings>> {
        let (cert, key) = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => (cert.clone(), key.clone()),
            (None, None) => {
                if self.client_ca.is_some() || self.require_client_cert.is_some() {
                    bail!("[tls] client_ca and require_client_cert need the server's cert and key");
                }
                return Ok(None);
            }
            _ => bail!("[tls] cert and key go together: set both or neither"),
        };
        if self.client_ca.is_none() && self.require_client_cert == Some(true) {
            bail!("[tls] require_client_cert needs client_ca (the CA client certificates are checked against)");
        }
        Ok(Some(crate::server::tls::TlsSettings {
            cert,
            key,
            client_ca: self.client_ca.clone(),
            require_client_cert: self.client_ca.is_some() && self.require_client_cert.unwrap_or(true),
        }))
    }
}

/// `[client]`: how client commands (`cas`, `exec`, `job`, `jobs`,
/// `workers`, `scheduler`, the shell), `worker` and the rustc wrapper that
/// `cargo distbuild` starts reach a server. The command-line flags of the
/// same names (`--tls-ca`, `--tls-cert`, `--tls-key`, `--token-file`)
/// override these; the environment variable `DISTBUILD_TOKEN` holds a
/// token itself (used when no token file is named on the command line).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientSection {
    /// CA certificates (PEM) the server's certificate is checked against,
    /// for `grpcs://` addresses. Unset: the system's roots.
    pub tls_ca: Option<PathBuf>,
    /// A client certificate (PEM) and its key, for servers that verify
    /// client certificates (mTLS).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// A file holding a bearer token, sent as `authorization: Bearer ...`
    /// on every call. The token is never put on a command line or logged.
    pub token_file: Option<PathBuf>,
}

/// The validated configuration the server runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// The `[cas]` section's backend; the CAS's store is `stores.cas`.
    pub backend: Backend,
    /// The largest blob the CAS keeps (0: no limit).
    pub max_size: u64,
    /// Every store and which one the CAS, the ActionCache and the workers
    /// use (the `[cas]` section's own store when `[stores]` is unused).
    pub stores: StoreGraph,
    pub max_batch_size: u64,
    pub fsync: bool,
    pub upload_resume_window: Duration,
    pub max_parked_uploads: usize,
    pub max_parked_uploads_per_client: usize,
    pub verify_reads_below: u64,
    pub min_retention: Duration,
    pub shutdown_grace: Duration,
    pub connections: crate::server::ConnectionLimits,
    pub worker_capacity: usize,
    pub heartbeat_interval: Duration,
    pub drain_timeout: Duration,
    pub work_dir: PathBuf,
    pub worker_cache_size: u64,
    pub worker_properties: Vec<(String, String)>,
    pub action_init: Option<PathBuf>,
    pub output_limits: crate::worker::OutputLimits,
    pub sandbox: crate::worker::runner::SandboxConfig,
    pub execution: ExecutionSection,
    /// TLS of every listener; `None`: plaintext.
    pub tls: Option<crate::server::tls::TlsSettings>,
    pub auth: crate::auth::AuthConfig,
    pub worker_listen: Option<SocketAddr>,
    pub http: HttpConfig,
    /// `[instances]`, resolved: settings per instance name.
    pub instances: std::sync::Arc<Instances>,
    pub asset: AssetConfig,
    /// `[scheduler] state`.
    pub scheduler_state: SchedulerState,
}

impl FileConfig {
    /// Reads a config file. A missing file is an error: the user named it.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut file: FileConfig = toml::from_str(text)?;
        let table: toml::Table = text.parse()?;
        if let Some(toml::Value::Table(cas)) = table.get("cas") {
            file.cas.keys_written = cas.keys().cloned().collect();
        }
        Ok(file)
    }

    /// Validates and resolves defaults that depend on the machine.
    pub fn resolve(&self) -> anyhow::Result<Config> {
        let listen = self
            .scheduler
            .addr
            .parse::<SocketAddr>()
            .with_context(|| format!("[scheduler] addr {:?} is not an IP:PORT address", self.scheduler.addr))?;
        let max_batch_size = self.cas.max_batch_size.as_u64();
        if max_batch_size < 64 * 1024 {
            bail!("[cas] max_batch_size must be at least 64KiB");
        }
        if max_batch_size > 1 << 30 {
            bail!("[cas] max_batch_size must be at most 1GiB");
        }
        if self.cas.max_size.as_u64() == 0 {
            bail!("[cas] max_size must be larger than zero");
        }
        if self.cas.max_parked_uploads_per_client > self.cas.max_parked_uploads {
            bail!("[cas] max_parked_uploads_per_client must be at most max_parked_uploads");
        }
        if self.worker.max_processes == Some(0) || self.worker.max_memory.is_some_and(|m| m.as_u64() == 0) {
            bail!("[worker] max_processes and max_memory must be above zero when set");
        }
        if self.worker.properties.contains_key(crate::execution::platform::CHROOT) {
            bail!(
                "[worker] properties: {} is offered by the worker itself when it can run such actions: set \
                 [worker] input_root_as_root = true instead",
                crate::execution::platform::CHROOT
            );
        }
        if self.worker.heartbeat_interval_secs == 0 {
            bail!("[worker] heartbeat_interval_secs must be at least 1");
        }
        if self.execution.max_attempts == 0 {
            bail!("[execution] max_attempts must be at least 1");
        }
        if self.execution.default_timeout.is_zero() || self.execution.default_timeout > self.execution.max_timeout {
            bail!("[execution] default_timeout must be above zero and at most max_timeout");
        }
        if self.execution.stream_keepalive.is_zero() {
            bail!("[execution] stream_keepalive must be above zero");
        }
        if self.execution.max_tree_directories == 0 {
            bail!("[execution] max_tree_directories must be at least 1 (the root)");
        }
        let data_dir = match &self.cas.root {
            Some(p) => p.clone(),
            None => default_data_dir(),
        };
        let stores = stores::resolve(self, &data_dir)?;
        Ok(Config {
            listen,
            backend: self.cas.backend,
            max_size: stores.max_blob(),
            stores,
            max_batch_size,
            fsync: self.cas.fsync,
            upload_resume_window: self.cas.upload_resume_window,
            max_parked_uploads: self.cas.max_parked_uploads,
            max_parked_uploads_per_client: self.cas.max_parked_uploads_per_client,
            verify_reads_below: self.cas.verify_reads_below.as_u64(),
            min_retention: self.cas.min_retention,
            shutdown_grace: self.server.shutdown_grace,
            connections: self.server.connection_limits()?,
            worker_capacity: self
                .worker
                .capacity
                .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
            heartbeat_interval: Duration::from_secs(self.worker.heartbeat_interval_secs),
            drain_timeout: self.worker.drain_timeout,
            work_dir: self.worker.work_dir.clone().unwrap_or_else(|| data_dir.join("worker")),
            worker_cache_size: self.worker.cache_size.as_u64(),
            worker_properties: self.worker_properties(),
            action_init: self.worker.action_init.clone(),
            output_limits: crate::worker::OutputLimits {
                max_bytes: self.worker.max_output_bytes.as_u64(),
                max_files: self.worker.max_output_files,
            },
            sandbox: crate::worker::runner::SandboxConfig {
                mode: self.worker.sandbox,
                run_as: self.worker.run_as.clone(),
                allow_network: self.worker.allow_network,
                limits: crate::worker::runner::Limits {
                    max_memory: self.worker.max_memory.map(|b| b.as_u64()),
                    max_processes: self.worker.max_processes,
                },
                hide: self.worker.hide.clone(),
                container: self.worker.docker.then(|| crate::worker::runner::ContainerConfig {
                    host: self.worker.docker_host.clone(),
                    keep_images: self.worker.docker_images,
                    credentials: self.worker.docker_config.clone(),
                }),
                input_root_as_root: self.worker.input_root_as_root,
            },
            execution: self.execution.clone(),
            tls: self.tls.resolve()?,
            auth: self.auth.as_ref().map(AuthSection::resolve).transpose()?.unwrap_or_default(),
            worker_listen: self.server.worker_listen()?,
            http: self.server.http()?,
            instances: std::sync::Arc::new(Instances::resolve(&self.instances)?),
            asset: self.asset.resolve()?,
            scheduler_state: match &self.scheduler.state {
                StateSection::Default | StateSection::Memory(_) => SchedulerState::Memory,
                StateSection::Redis(r) if r.redis.is_empty() => bail!("[scheduler] state: redis URL is empty"),
                StateSection::Redis(r) => SchedulerState::Redis(r.clone()),
            },
            data_dir,
        })
    }
}

impl FileConfig {
    /// The host's properties, overridden and extended by `[worker] properties`.
    pub fn worker_properties(&self) -> Vec<(String, String)> {
        let mut props: BTreeMap<String, String> = crate::execution::platform::host_properties().into_iter().collect();
        props.extend(self.worker.properties.clone());
        props.into_iter().collect()
    }
}

fn default_data_dir() -> PathBuf {
    remote_apis::wrapper_state::default_cache_dir()
}

#[cfg(test)]
mod tests;
