//! `cargo-distbuild worker`: connects to the scheduler over
//! `proto/worker.proto`, runs what it is assigned with an [`Executor`] whose
//! CAS is the server's, and reconnects with backoff when the stream breaks
//! (a restarted scheduler sees the worker again within seconds).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use parking_lot::Mutex;
use prost::Message;
use remote_apis::reapi::{Action, Command};
use remote_apis::{Digest, DigestFunction, InstanceName};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Executor, Task};
use crate::execution::gateway::proto::worker_gateway_client::WorkerGatewayClient;
use crate::execution::gateway::proto::{self, WorkerMessage, scheduler_message, worker_message};

pub struct WorkerOptions {
    pub scheduler: String,
    /// TLS files and the token for the connection to the scheduler.
    pub client: remote_apis::client::ClientOptions,
    pub name: String,
    pub slots: usize,
    pub properties: Vec<(String, String)>,
    /// The runner's description, for `workers list`.
    pub sandbox: String,
}

const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Serves until `stop` is cancelled. Connection failures are retried forever
/// with exponential backoff (0.2 s doubling to 30 s).
pub async fn run(options: WorkerOptions, executor: Arc<Executor>, stop: CancellationToken) -> anyhow::Result<()> {
    crate::allocator::release_freed_memory(stop.clone());
    let mut backoff = Duration::from_millis(200);
    // Lets the scheduler tell this process reconnecting from another one
    // using the same name (which it refuses while this one is connected).
    let incarnation = uuid::Uuid::new_v4().to_string();
    loop {
        let started = std::time::Instant::now();
        let outcome = session(&options, &incarnation, &executor, &stop).await;
        if stop.is_cancelled() {
            return Ok(());
        }
        match outcome {
            Ok(()) => tracing::warn!("the scheduler closed the connection; reconnecting"),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), retry_in = ?backoff, "worker connection failed"),
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(200);
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = stop.cancelled() => return Ok(()),
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection: Hello, then assignments until the stream ends. Actions
/// still running when it ends are cancelled: the scheduler has re-queued them.
async fn session(
    options: &WorkerOptions,
    incarnation: &str,
    executor: &Arc<Executor>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let connecting = remote_apis::client::connect(&options.scheduler, &options.client);
    let channel = tokio::select! {
        c = connecting => c?,
        () = stop.cancelled() => return Ok(()),
    };
    let mut client = WorkerGatewayClient::new(channel).max_decoding_message_size(64 << 20);
    let (out_tx, out_rx) = mpsc::unbounded_channel::<WorkerMessage>();
    let hello = proto::Hello {
        name: options.name.clone(),
        slots: options.slots as u32,
        properties: options
            .properties
            .iter()
            .map(|(k, v)| proto::Property { name: k.clone(), value: v.clone() })
            .collect(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        incarnation: incarnation.to_string(),
        sandbox: options.sandbox.clone(),
    };
    send(&out_tx, worker_message::Message::Hello(hello));
    let opening = client.session(tokio_stream::wrappers::UnboundedReceiverStream::new(out_rx));
    let mut inbound = tokio::select! {
        s = opening => s?.into_inner(),
        () = stop.cancelled() => return Ok(()),
    };
    let session_stop = stop.child_token();
    let _guard = session_stop.clone().drop_guard();
    let running: Running = Arc::default();
    tracing::info!(scheduler = %options.scheduler, name = %options.name, slots = options.slots, "connected");
    let result = serve_session(&mut inbound, &out_tx, executor, &session_stop, &running).await;
    super::drain(&running).await;
    result
}

type Running = Arc<Mutex<HashMap<String, CancellationToken>>>;

/// Handles the scheduler's messages until the stream ends or `stop`.
async fn serve_session(
    inbound: &mut tonic::Streaming<proto::SchedulerMessage>,
    out_tx: &mpsc::UnboundedSender<WorkerMessage>,
    executor: &Arc<Executor>,
    session_stop: &CancellationToken,
    running: &Running,
) -> anyhow::Result<()> {
    loop {
        let msg = tokio::select! {
            m = inbound.message() => match m? {
                Some(m) => m,
                None => return Ok(()),
            },
            () = session_stop.cancelled() => return Ok(()),
        };
        match msg.message {
            Some(scheduler_message::Message::Welcome(w)) => {
                let every = Duration::from_millis(w.keepalive_interval_ms.max(100));
                let (tx, token) = (out_tx.clone(), session_stop.clone());
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(every);
                    loop {
                        tokio::select! {
                            _ = tick.tick() => send(&tx, worker_message::Message::Keepalive(proto::Keepalive {})),
                            () = token.cancelled() => return,
                        }
                    }
                });
            }
            Some(scheduler_message::Message::Assign(assign)) => {
                let task = match decode_task(assign) {
                    Ok(t) => t,
                    Err(e) => anyhow::bail!("the scheduler sent an undecodable task: {e}"),
                };
                let cancel = session_stop.child_token();
                running.lock().insert(task.id.clone(), cancel.clone());
                let (executor, tx, running) = (executor.clone(), out_tx.clone(), running.clone());
                tokio::spawn(async move {
                    let started_tx = tx.clone();
                    let id = task.id.clone();
                    let response = executor
                        .execute(
                            &task,
                            move || send(&started_tx, worker_message::Message::Started(proto::Started { task_id: id })),
                            cancel,
                        )
                        .await;
                    running.lock().remove(&task.id);
                    let finished =
                        proto::Finished { task_id: task.id.clone(), execute_response: response.encode_to_vec() };
                    send(&tx, worker_message::Message::Finished(finished));
                });
            }
            Some(scheduler_message::Message::Cancel(c)) => {
                if let Some(token) = running.lock().get(&c.task_id) {
                    token.cancel();
                }
            }
            None => {}
        }
    }
}

fn send(tx: &mpsc::UnboundedSender<WorkerMessage>, message: worker_message::Message) {
    let _ = tx.send(WorkerMessage { message: Some(message) });
}

fn decode_task(a: proto::Assign) -> anyhow::Result<Task> {
    let function = DigestFunction::from_proto(a.digest_function)?;
    let digest = remote_apis::reapi::Digest::decode(a.action_digest.as_slice())?;
    Ok(Task {
        id: a.task_id,
        instance: InstanceName::new(&a.instance_name)?,
        action_digest: Digest::from_proto(function, &digest)?,
        action: Action::decode(a.action.as_slice())?,
        command: Command::decode(a.command.as_slice())?,
        timeout: Duration::from_millis(a.timeout_ms),
        queued_at: UNIX_EPOCH + Duration::from_millis(a.queued_unix_ms.max(0) as u64),
    })
}

/// A default worker name: host name and process id.
pub fn default_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    format!("{host}-{}", std::process::id())
}
