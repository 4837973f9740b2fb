//! `workers list` and `scheduler status`: the operator's view of execution.

use std::process::ExitCode;

use remote_apis::client::{ClientOptions, Transport};

use super::rpc_error;
use crate::admin::proto::admin_client::AdminClient;
use crate::admin::proto::{GetSchedulerStatusRequest, ListWorkersRequest};

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
    println!("{:<40} {:>5} {:>5} {:>8} {:<8} {:<44} PROPERTIES", "NAME", "SLOTS", "BUSY", "DONE", "KIND", "SANDBOX");
    for w in &resp.workers {
        let props: Vec<String> = w.properties.iter().map(|p| format!("{}={}", p.name, p.value)).collect();
        let kind = if w.builtin { "built-in" } else { "remote" };
        let sandbox = if w.sandbox.is_empty() { "(not reported)" } else { w.sandbox.as_str() };
        let (name, slots, busy, done) = (&w.name, w.slots, w.busy, w.done);
        println!("{name:<40} {slots:>5} {busy:>5} {done:>8} {kind:<8} {sandbox:<44} {}", props.join(","));
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
