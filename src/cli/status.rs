//! `workers list|drain|undrain` and `scheduler status`: the operator's view
//! of execution.

use std::process::ExitCode;

use remote_apis::client::{ClientOptions, Transport};

use super::rpc_error;
use crate::admin::proto::admin_client::AdminClient;
use crate::admin::proto::{GetSchedulerStatusRequest, ListWorkersRequest, SetWorkerDrainingRequest};

#[derive(clap::Subcommand, Debug)]
pub enum WorkersCommand {
    /// Name, state, slots in use, actions done and properties of each worker.
    List,
    /// Take a worker out of service: it finishes what it runs and is given
    /// nothing new (needs the admin grant).
    Drain { name: String },
    /// Put a drained worker back to work (needs the admin grant).
    Undrain { name: String },
}

pub async fn workers_command(cmd: WorkersCommand, server: &str, options: &ClientOptions) -> anyhow::Result<ExitCode> {
    match cmd {
        WorkersCommand::List => workers(server, options).await,
        WorkersCommand::Drain { name } => set_draining(server, options, name, true).await,
        WorkersCommand::Undrain { name } => set_draining(server, options, name, false).await,
    }
}

async fn set_draining(server: &str, options: &ClientOptions, name: String, draining: bool) -> anyhow::Result<ExitCode> {
    let w = admin(server, options)
        .await?
        .set_worker_draining(SetWorkerDrainingRequest { name, draining })
        .await
        .map_err(|s| rpc_error("SetWorkerDraining", s))?
        .into_inner();
    if draining {
        println!("{} is draining: it finishes its {} running actions and takes no new ones", w.name, w.busy);
    } else {
        println!("{} is active: it takes actions again", w.name);
    }
    Ok(ExitCode::SUCCESS)
}

/// An admin client over the session's TLS settings and token.
pub(super) async fn admin(server: &str, options: &ClientOptions) -> anyhow::Result<AdminClient<Transport>> {
    let transport = remote_apis::client::connect(server, options).await.map_err(|s| rpc_error("connecting", s))?;
    Ok(AdminClient::new(transport))
}

pub async fn workers(server: &str, options: &ClientOptions) -> anyhow::Result<ExitCode> {
    let resp = admin(server, options)
        .await?
        .list_workers(ListWorkersRequest {})
        .await
        .map_err(|s| rpc_error("ListWorkers", s))?
        .into_inner();
    // A cluster of replicas names each worker's; one server shows no column.
    let cluster = resp.workers.iter().any(|w| !w.replica.is_empty() && w.replica != "local");
    let replica = |r: &str| if cluster { format!("{r:<40} ") } else { String::new() };
    println!(
        "{:<40} {:<8} {:>5} {:>5} {:>8} {:<8} {:<44} {}PROPERTIES",
        "NAME",
        "STATE",
        "SLOTS",
        "BUSY",
        "DONE",
        "KIND",
        "SANDBOX",
        replica("REPLICA")
    );
    for w in &resp.workers {
        let props: Vec<String> = w.properties.iter().map(|p| format!("{}={}", p.name, p.value)).collect();
        let kind = if w.builtin { "built-in" } else { "remote" };
        let sandbox = if w.sandbox.is_empty() { "(not reported)" } else { w.sandbox.as_str() };
        let state = if w.draining { "draining" } else { "active" };
        let (name, slots, busy, done) = (&w.name, w.slots, w.busy, w.done);
        let at = replica(&w.replica);
        println!(
            "{name:<40} {state:<8} {slots:>5} {busy:>5} {done:>8} {kind:<8} {sandbox:<44} {at}{}",
            props.join(",")
        );
    }
    if resp.workers.is_empty() {
        println!("(no workers connected)");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn scheduler(server: &str, options: &ClientOptions) -> anyhow::Result<ExitCode> {
    let s = admin(server, options)
        .await?
        .get_scheduler_status(GetSchedulerStatusRequest {})
        .await
        .map_err(|s| rpc_error("GetSchedulerStatus", s))?
        .into_inner();
    let lookups = s.cache_hits + s.cache_misses;
    let rate = if lookups == 0 { 0.0 } else { 100.0 * s.cache_hits as f64 / lookups as f64 };
    println!("workers:        {} ({} of {} slots busy)", s.workers, s.busy_slots, s.slots);
    println!("running:        {}", s.running);
    let queued: u64 = s.queues.iter().map(|q| q.length).sum();
    println!("queued:         {queued}");
    for q in &s.queues {
        println!("  {:<40} {}", q.platform, q.length);
    }
    println!("cache hit rate: {rate:.1}% ({} hits, {} misses, {} merged)", s.cache_hits, s.cache_misses, s.merged);
    println!(
        "executed:       {} ({} failed, {} re-queued, {} cancelled)",
        s.executed, s.failed, s.requeued, s.cancelled
    );
    println!("operations:     {}", s.operations);
    Ok(ExitCode::SUCCESS)
}
