//! The `cargo-distbuild` command line. Parsing lives here; each command is a
//! small function over the library or a gRPC client.

mod asset;
mod cargo;
mod cas;
mod exec;
mod follow;
mod jobs;
mod legacy;
mod logging;
mod repl;
mod status;
mod token;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::{Backend, FileConfig};

#[derive(Parser, Debug)]
#[command(name = "cargo-distbuild", version, about = "A Remote Execution API v2 server and build cache")]
pub struct Cli {
    /// Configuration file (TOML). Default: $XDG_CONFIG_HOME/cargo-distbuild/config.toml if it exists.
    #[arg(long, global = true, env = "DISTBUILD_CONFIG")]
    config: Option<PathBuf>,

    /// Server address for client commands (default: the config's [scheduler] addr).
    #[arg(long, global = true, env = "DISTBUILD_SERVER", value_name = "grpc://HOST:PORT")]
    server: Option<String>,

    /// REAPI instance name for client commands.
    #[arg(long, global = true, default_value = "")]
    instance: String,

    #[command(flatten)]
    client: ClientFlags,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server: REAPI storage, execution and built-in workers.
    Server(ServerArgs),
    /// Run a remote worker that executes actions for a server.
    Worker(WorkerArgs),
    /// Put, get, inspect and list blobs.
    #[command(subcommand)]
    Cas(cas::CasCommand),
    /// Record what a URI names, or fetch it through the server (the Remote
    /// Asset API, as Bazel's downloader uses it).
    #[command(subcommand)]
    Asset(asset::AssetCommand),
    /// Execute a command remotely: upload inputs, execute, print its output,
    /// download outputs, exit with its exit code.
    Exec(exec::RunArgs),
    /// `cargo build` with the rustc wrapper: cached, remotely executed.
    Build(CargoArgs),
    /// `cargo check` with the rustc wrapper.
    Check(CargoArgs),
    /// `cargo test` with the rustc wrapper.
    Test(CargoArgs),
    /// `cargo run` with the rustc wrapper.
    Run(CargoArgs),
    /// `cargo bench` with the rustc wrapper.
    Bench(CargoArgs),
    /// `cargo doc` with the rustc wrapper (dependencies' rustc runs).
    Doc(CargoArgs),
    /// What the wrapper did: invocations, cache hits, remote and local
    /// executions with the reasons, time saved.
    Stats {
        /// Forget the recorded invocations.
        #[arg(long)]
        reset: bool,
    },
    /// Stop the local server `cargo distbuild build` started.
    Stop,
    /// Submit, inspect or cancel one operation.
    #[command(subcommand)]
    Job(exec::JobCommand),
    /// List operations.
    #[command(subcommand)]
    Jobs(exec::JobsCommand),
    /// List connected workers; drain one for maintenance, or undrain it.
    #[command(subcommand)]
    Workers(status::WorkersCommand),
    /// Show queues, workers and the cache hit rate.
    #[command(subcommand)]
    Scheduler(SchedulerCommand),
    /// The first README's `master submit-job|job-status|list-jobs|list-workers`.
    #[command(subcommand, hide = true)]
    Master(legacy::MasterCommand),
    /// Make bearer tokens for the server's token file.
    #[command(subcommand)]
    Token(token::TokenCommand),
}

/// How client commands, `worker` and the rustc wrapper reach a server over
/// TLS and with a token; each overrides its key in the config's `[client]`.
#[derive(clap::Args, Debug, Clone, Default)]
struct ClientFlags {
    /// CA certificates (PEM) that the server's certificate must chain to,
    /// for grpcs:// addresses (default: [client] tls_ca, else the system's roots).
    #[arg(long, global = true, env = "DISTBUILD_TLS_CA", value_name = "PEM")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for servers that verify them (mTLS).
    #[arg(long, global = true, env = "DISTBUILD_TLS_CERT", value_name = "PEM")]
    tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, global = true, env = "DISTBUILD_TLS_KEY", value_name = "PEM")]
    tls_key: Option<PathBuf>,
    /// A file holding the bearer token sent on every call (default:
    /// $DISTBUILD_TOKEN, else [client] token_file). Tokens are never
    /// taken on the command line.
    #[arg(long, global = true, env = "DISTBUILD_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
}

/// The environment variable that holds a bearer token itself.
pub(crate) const TOKEN_ENV: &str = "DISTBUILD_TOKEN";

/// The client side of TLS and authentication, resolved.
#[derive(Clone, Debug, Default)]
pub(crate) struct Client {
    pub options: remote_apis::client::ClientOptions,
    /// Where the token came from when it was a file (the rustc wrapper is
    /// given the path, not the token).
    pub token_file: Option<PathBuf>,
}

impl ClientFlags {
    /// Flags over `DISTBUILD_TOKEN` over `[client]`.
    fn resolve(&self, file: &crate::config::ClientSection) -> anyhow::Result<Client> {
        use remote_apis::client::{ClientOptions, ClientTls, Token};
        let tls = ClientTls {
            ca: self.tls_ca.clone().or_else(|| file.tls_ca.clone()),
            cert: self.tls_cert.clone().or_else(|| file.tls_cert.clone()),
            key: self.tls_key.clone().or_else(|| file.tls_key.clone()),
        };
        let env_token = std::env::var(TOKEN_ENV).ok().filter(|t| !t.trim().is_empty());
        let (token, token_file) = match (&self.token_file, env_token, &file.token_file) {
            (Some(path), _, _) | (None, None, Some(path)) => {
                let token = Token::from_file(path).map_err(|s| anyhow::anyhow!("{}", s.message()))?;
                (Some(token), Some(path.clone()))
            }
            (None, Some(token), _) => {
                (Some(Token::new(&token).map_err(|s| anyhow::anyhow!("{TOKEN_ENV}: {}", s.message()))?), None)
            }
            (None, None, None) => (None, None),
        };
        let tls = (!tls.is_empty()).then_some(tls);
        Ok(Client { options: ClientOptions { tls, token }, token_file })
    }

    fn is_set(&self) -> bool {
        self.tls_ca.is_some() || self.tls_cert.is_some() || self.tls_key.is_some() || self.token_file.is_some()
    }
}

/// Arguments passed to cargo as they are.
#[derive(clap::Args, Debug)]
struct CargoArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "CARGO ARGS")]
    args: Vec<String>,
}

impl Command {
    /// `server` and `worker` (and their older spellings) run until stopped.
    fn runs_until_stopped(&self) -> bool {
        matches!(self, Command::Server(_) | Command::Worker(_) | Command::Scheduler(SchedulerCommand::Run(_)))
    }
}

#[derive(Subcommand, Debug)]
enum SchedulerCommand {
    /// Queue lengths, workers, cache hit rate.
    Status,
    /// `server`, as the first README spelled it.
    #[command(hide = true)]
    Run(ServerArgs),
}

#[derive(clap::Args, Debug)]
struct WorkerArgs {
    #[command(flatten)]
    flags: WorkerFlags,
    /// `worker run --id NAME --port N`, as the first README spelled it.
    #[command(subcommand)]
    legacy: Option<legacy::LegacyWorker>,
}

#[derive(clap::Args, Debug)]
struct WorkerFlags {
    /// The server to take actions from (default: --server, then the config's [scheduler] addr).
    #[arg(long, value_name = "grpc://HOST:PORT")]
    scheduler: Option<String>,
    /// Actions run at once (default: [worker] capacity, else the number of CPUs).
    #[arg(long)]
    slots: Option<usize>,
    /// A platform property this worker offers (repeatable), on top of OSFamily, ISA and cpu-count.
    #[arg(long = "property", value_name = "KEY=VALUE", value_parser = crate::execution::platform::parse_property)]
    properties: Vec<(String, String)>,
    /// Blob cache and action directories (default: [worker] work_dir, else <data dir>/worker).
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Name shown in `workers list` (default: host name and process id).
    #[arg(long)]
    name: Option<String>,
    /// Run actions that name a container-image in containers of it, through
    /// the Docker Engine (sets [worker] docker).
    #[arg(long)]
    docker: bool,
}

#[derive(clap::Args, Debug)]
struct ServerArgs {
    /// Address to listen on (overrides [scheduler] addr).
    #[arg(long, value_name = "IP:PORT")]
    listen: Option<String>,
    /// Data directory (overrides [cas] root).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Storage backend (overrides [cas] backend).
    #[arg(long, value_enum)]
    backend: Option<BackendArg>,
    /// Blob budget, e.g. 10GiB (overrides [cas] max_size).
    #[arg(long, value_name = "SIZE")]
    max_size: Option<bytesize::ByteSize>,
    /// Built-in execution slots (overrides [worker] capacity); 0: scheduler
    /// only, for remote workers.
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum BackendArg {
    Filesystem,
    Memory,
}

/// Entry point of the binary: one line per error, non-zero exit.
pub fn main() -> ExitCode {
    // The hidden `__action-init` subcommand supervises one action for a
    // worker: it runs before anything else (no config, no logging, no
    // runtime) so it adds as little as possible to every action.
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if raw.get(1).is_some_and(|a| a == crate::worker::action_init::SUBCOMMAND) {
        return ExitCode::from(crate::worker::action_init::main(&raw[2..]));
    }
    let mut args: Vec<String> = std::env::args().collect();
    // As a cargo subcommand, cargo runs `cargo-distbuild distbuild ...`.
    if args.get(1).map(String::as_str) == Some("distbuild") {
        args.remove(1);
    }
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // One line, like every other error of this command.
            let msg = e.to_string();
            eprintln!("{}", msg.lines().next().unwrap_or("error: bad arguments"));
            return ExitCode::from(2);
        }
        Err(e) => e.exit(), // --help, --version
    };
    logging::init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            report(format_args!("error: starting the runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            report(format_args!("error: {e:#}"));
            ExitCode::FAILURE
        }
    }
}

/// The last word on stderr. Not `eprintln!`, which panics (exit 101) when
/// stderr is a pipe whose reader has gone, hiding the real exit status.
fn report(message: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{message}");
}

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<FileConfig> {
    if let Some(p) = path {
        return FileConfig::load(p);
    }
    let default = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .map(|d| d.join("cargo-distbuild").join("config.toml"));
    match default {
        Some(p) if p.exists() => FileConfig::load(&p),
        _ => Ok(FileConfig::default()),
    }
}

/// What every client command needs.
#[derive(Clone, Debug)]
pub(crate) struct Session {
    file: FileConfig,
    server: String,
    /// `--server` or `DISTBUILD_SERVER`, when given.
    explicit_server: Option<String>,
    instance: String,
    client: Client,
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let file = load_config(cli.config.as_ref())?;
    let server = cli.server.clone().unwrap_or_else(|| client_address(&file.scheduler.addr));
    // The server itself reads no [client] keys: a bad token file there
    // must not stop it.
    let client = match &cli.command {
        Some(Command::Server(_) | Command::Scheduler(SchedulerCommand::Run(_))) => Client::default(),
        _ => cli.client.resolve(&file.client)?,
    };
    let ctx = Session { file, server, explicit_server: cli.server.clone(), instance: cli.instance.clone(), client };
    match cli.command {
        None => repl::run(ctx).await,
        Some(command) => dispatch(command, ctx).await,
    }
}

async fn dispatch(command: Command, ctx: Session) -> anyhow::Result<ExitCode> {
    match command {
        Command::Server(args) => server(args, ctx.file).await,
        Command::Worker(args) => worker(args, ctx).await,
        Command::Cas(cmd) => cas::run(cmd, &ctx.server, &ctx.client.options, &ctx.instance).await,
        Command::Asset(cmd) => asset::run(cmd, &ctx.server, &ctx.client.options, &ctx.instance).await,
        Command::Exec(args) => exec::run(args, &ctx.server, &ctx.client.options, &ctx.instance).await,
        Command::Build(a) => cargo::cargo("build", a.args, ctx).await,
        Command::Check(a) => cargo::cargo("check", a.args, ctx).await,
        Command::Test(a) => cargo::cargo("test", a.args, ctx).await,
        Command::Run(a) => cargo::cargo("run", a.args, ctx).await,
        Command::Bench(a) => cargo::cargo("bench", a.args, ctx).await,
        Command::Doc(a) => cargo::cargo("doc", a.args, ctx).await,
        Command::Stats { reset } => cargo::stats(reset),
        Command::Stop => cargo::stop().await,
        Command::Job(cmd) => exec::job(cmd, &ctx.server, &ctx.client.options, &ctx.instance).await,
        Command::Jobs(cmd) => exec::jobs(cmd, &ctx.server, &ctx.client.options).await,
        Command::Workers(cmd) => status::workers_command(cmd, &ctx.server, &ctx.client.options).await,
        Command::Token(cmd) => token::run(cmd),
        Command::Scheduler(SchedulerCommand::Status) => status::scheduler(&ctx.server, &ctx.client.options).await,
        Command::Scheduler(SchedulerCommand::Run(args)) => server(args, ctx.file).await,
        Command::Master(cmd) => legacy::master(cmd, ctx).await,
    }
}

async fn server(args: ServerArgs, mut file: FileConfig) -> anyhow::Result<ExitCode> {
    if let Some(listen) = args.listen {
        file.scheduler.addr = listen;
    }
    if let Some(dir) = args.data_dir {
        file.cas.root = Some(dir);
    }
    if let Some(b) = args.backend {
        file.cas.backend = match b {
            BackendArg::Filesystem => Backend::Filesystem,
            BackendArg::Memory => Backend::Memory,
        };
    }
    if let Some(size) = args.max_size {
        file.cas.max_size = size;
    }
    if let Some(n) = args.workers {
        file.worker.capacity = Some(n);
    }
    default_action_init(&mut file);
    let config = file.resolve()?;
    let stop = crate::server::shutdown_signal().context("installing signal handlers")?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    crate::server::run(listener, config, stop).await?;
    Ok(ExitCode::SUCCESS)
}

async fn worker(args: WorkerArgs, ctx: Session) -> anyhow::Result<ExitCode> {
    use std::sync::Arc;

    use crate::worker::{Executor, cas::RemoteCas, remote};
    let args = legacy::worker_flags(args);
    let mut file = ctx.file;
    if let Some(dir) = args.work_dir {
        file.worker.work_dir = Some(dir);
    }
    if let Some(slots) = args.slots {
        anyhow::ensure!(slots > 0, "--slots must be at least 1");
        file.worker.capacity = Some(slots);
    }
    file.worker.properties.extend(args.properties);
    if args.docker {
        file.worker.docker = true;
    }
    default_action_init(&mut file);
    // [scheduler] addr names the server here and may be a host name; it is
    // not this process's listen address.
    let scheduler = args.scheduler.unwrap_or(ctx.server);
    file.scheduler.addr = crate::config::DEFAULT_ADDR.into();
    let config = file.resolve()?;
    anyhow::ensure!(config.worker_capacity > 0, "[worker] capacity must be at least 1 for a worker");
    let name = args.name.unwrap_or_else(remote::default_name);
    let transport =
        remote_apis::client::connect_lazy(&scheduler, &ctx.client.options).map_err(|s| rpc_error("--scheduler", s))?;
    // Actions see neither the worker's files nor its client key and token file.
    let mut hide: Vec<PathBuf> = ctx.client.options.tls.as_ref().and_then(|t| t.key.clone()).into_iter().collect();
    hide.extend(ctx.client.token_file.clone());
    let executor = Executor::start(name.clone(), Arc::new(RemoteCas::new(transport)), &config, hide)
        .await
        .with_context(|| format!("preparing the worker in {}", config.work_dir.display()))?;
    let options = remote::WorkerOptions {
        scheduler,
        client: ctx.client.options.clone(),
        name,
        slots: config.worker_capacity,
        properties: executor.offered_properties(&config.worker_properties),
        sandbox: executor.runner().describe(),
        drain_timeout: config.drain_timeout,
    };
    // SIGTERM drains (running actions finish), a second one stops at once.
    let shutdown = remote::Shutdown::on_signals().context("installing signal handlers")?;
    remote::run(options, Arc::new(executor), shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// Actions are supervised by the small `distbuild-action-init` binary when
/// it is installed beside this one (exec'ing this whole binary costs about
/// 2 ms per action), else by this very binary (its hidden `__action-init`
/// subcommand; `/proc/self/exe` is this binary even after an upgrade
/// replaced the file on disk), unless the config names another. Both take
/// the same arguments.
fn default_action_init(file: &mut FileConfig) {
    if file.worker.action_init.is_some() {
        return;
    }
    let sibling = std::env::current_exe().ok().and_then(|exe| Some(exe.parent()?.join(ACTION_INIT_BINARY)));
    let own = std::path::Path::new("/proc/self/exe");
    file.worker.action_init = match sibling {
        Some(s) if s.is_file() => Some(s),
        _ if own.exists() => Some(own.to_path_buf()),
        _ => std::env::current_exe().ok(),
    };
}

/// The file name of the standalone action init (`src/bin/`).
const ACTION_INIT_BINARY: &str = "distbuild-action-init";

/// The address a client on this machine uses for a server listening on
/// `listen` (a wildcard listen address is reached through loopback).
fn client_address(listen: &str) -> String {
    if listen.contains("://") {
        return listen.to_string();
    }
    let addr = listen.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]");
    format!("grpc://{addr}")
}

/// A gRPC error as one readable line.
/// Transport failures add their causes ("received fatal alert:
/// CertificateRequired"): tonic's message alone is "transport error".
pub(crate) fn rpc_error(context: &str, status: tonic::Status) -> anyhow::Error {
    let cause = std::error::Error::source(&status)
        .map(remote_apis::client::error_chain)
        .filter(|c| c != status.message())
        .map(|c| format!(" ({c})"))
        .unwrap_or_default();
    anyhow::anyhow!("{context}: {:?}: {}{cause}", status.code(), status.message())
}
