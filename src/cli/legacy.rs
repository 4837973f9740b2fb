//! The spellings the project's first README taught, which people still
//! type: `scheduler run`, `worker run --id NAME --port N`, `master
//! submit-job`, `master job-status`, `master list-jobs` and `master
//! list-workers`. Each is a modern command under another name, hidden from
//! `--help` and listed in README.md as the older spellings.

use std::process::ExitCode;

use clap::Subcommand;
use remote_apis::Digest;

use super::exec::{self, JobCommand, JobsCommand};
use super::{Session, WorkerArgs, WorkerFlags, status};

/// `master ...`: the job and worker listings of the first README.
#[derive(Subcommand, Debug)]
pub(super) enum MasterCommand {
    /// `job submit DIGEST`: execute an Action already in the CAS.
    SubmitJob {
        action: Digest,
        #[arg(long)]
        skip_cache: bool,
        #[arg(long)]
        no_wait: bool,
    },
    /// `job status OPERATION`.
    JobStatus { operation: String },
    /// `jobs list`.
    ListJobs {
        #[arg(long, default_value_t = 100)]
        limit: i32,
    },
    /// `workers list`.
    ListWorkers,
}

/// Runs a `master` command as its modern form.
pub(super) async fn master(cmd: MasterCommand, ctx: Session) -> anyhow::Result<ExitCode> {
    let (server, options, instance) = (&ctx.server, &ctx.client.options, &ctx.instance);
    match cmd {
        MasterCommand::SubmitJob { action, skip_cache, no_wait } => {
            exec::job(JobCommand::Submit { action, skip_cache, no_wait }, server, options, instance).await
        }
        MasterCommand::JobStatus { operation } => {
            exec::job(JobCommand::Status { operation }, server, options, instance).await
        }
        MasterCommand::ListJobs { limit } => exec::jobs(JobsCommand::List { limit }, server, options).await,
        MasterCommand::ListWorkers => status::workers(server, options).await,
    }
}

/// `worker run`: the first README's way to start a worker.
#[derive(Subcommand, Debug)]
pub(super) enum LegacyWorker {
    #[command(hide = true)]
    Run(LegacyWorkerRun),
}

#[derive(clap::Args, Debug)]
pub(super) struct LegacyWorkerRun {
    /// The worker's name (`--name`).
    #[arg(long, value_name = "NAME")]
    id: Option<String>,
    /// Accepted and not needed: a worker connects out to its server.
    #[arg(long, value_name = "PORT")]
    port: Option<u16>,
    #[command(flatten)]
    flags: WorkerFlags,
}

/// The worker's flags, whichever spelling was used: `worker run --id NAME`
/// is `worker --name NAME`, and flags given before `run` count too.
pub(super) fn worker_flags(args: WorkerArgs) -> WorkerFlags {
    let WorkerArgs { flags: before, legacy } = args;
    let Some(LegacyWorker::Run(run)) = legacy else { return before };
    if let Some(port) = run.port {
        tracing::warn!(
            port,
            "--port is not needed: a worker connects out to its server (--scheduler) and listens on no port"
        );
    }
    let mut flags = run.flags;
    flags.name = run.id.or(flags.name).or(before.name);
    flags.scheduler = flags.scheduler.or(before.scheduler);
    flags.slots = flags.slots.or(before.slots);
    flags.work_dir = flags.work_dir.or(before.work_dir);
    flags.properties.extend(before.properties);
    flags.docker |= before.docker;
    flags
}
