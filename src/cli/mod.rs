//! The `cargo-distbuild` command line. Parsing lives here; each command is a
//! small function over the library or a gRPC client.

mod cas;

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

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server (CAS, ByteStream, ActionCache, Capabilities).
    Server(ServerArgs),
    /// Put, get, inspect and list blobs.
    #[command(subcommand)]
    Cas(cas::CasCommand),
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
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum BackendArg {
    Filesystem,
    Memory,
}

/// Entry point of the binary: one line per error, non-zero exit.
pub fn main() -> ExitCode {
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
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DISTBUILD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
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

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut file = load_config(cli.config.as_ref())?;
    let Some(command) = cli.command else {
        use clap::CommandFactory;
        Cli::command().print_help()?;
        return Ok(ExitCode::SUCCESS);
    };
    match command {
        Command::Server(args) => {
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
            let config = file.resolve()?;
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("listening on {}", config.listen))?;
            crate::server::run(listener, config, crate::server::shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cas(cmd) => {
            let server = cli.server.unwrap_or_else(|| client_address(&file.scheduler.addr));
            cas::run(cmd, &server, &cli.instance).await
        }
    }
}

/// The address a client on this machine uses for a server listening on
/// `listen` (a wildcard listen address is reached through loopback).
fn client_address(listen: &str) -> String {
    let addr = listen.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]");
    format!("grpc://{addr}")
}

/// A gRPC error as one readable line.
pub(crate) fn rpc_error(context: &str, status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{context}: {:?}: {}", status.code(), status.message())
}
