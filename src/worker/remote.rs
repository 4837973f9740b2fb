//! `cargo-distbuild worker`: connects to the scheduler over
//! `proto/worker.proto`, runs what it is assigned with an [`Executor`] whose
//! CAS is the server's, and reconnects with backoff when the stream breaks
//! (a restarted scheduler sees the worker again within seconds). Told to
//! stop (SIGTERM), it drains first: see [`Shutdown`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use parking_lot::Mutex;
use prost::Message;
use remote_apis::reapi::{Action, Command};
use remote_apis::{Digest, DigestFunction, InstanceName};
use tokio::sync::{Notify, mpsc};
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
    /// How long a drain lets running actions finish (`[worker] drain_timeout`).
    pub drain_timeout: Duration,
}

/// How a worker process is told to end. `drain` first: the scheduler is
/// told to send nothing new, running actions finish and report their
/// results, and [`run`] returns once none is left or after the drain
/// timeout. `stop` ends it at once: running actions are killed and not
/// reported, so the scheduler, seeing the stream end, re-queues them
/// (counting an attempt). The drain timeout ends a drain with `stop`.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    pub drain: CancellationToken,
    pub stop: CancellationToken,
}

impl Shutdown {
    /// The first SIGTERM or SIGINT drains, the next one stops.
    pub fn on_signals() -> std::io::Result<Shutdown> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let shutdown = Shutdown::default();
        let tokens = shutdown.clone();
        tokio::spawn(async move {
            for (i, token) in [&tokens.drain, &tokens.stop].into_iter().enumerate() {
                tokio::select! {
                    _ = interrupt.recv() => {}
                    _ = terminate.recv() => {}
                }
                if i == 1 {
                    tracing::warn!("signalled again: stopping now; the scheduler re-queues the running actions");
                }
                token.cancel();
            }
        });
        Ok(shutdown)
    }
}

const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Serves until drained or stopped (see [`Shutdown`]). Connection failures
/// are retried forever with exponential backoff (0.2 s doubling to 30 s).
pub async fn run(options: WorkerOptions, executor: Arc<Executor>, shutdown: Shutdown) -> anyhow::Result<()> {
    let stop = shutdown.stop.clone();
    crate::allocator::release_freed_memory(stop.clone());
    let finished = CancellationToken::new();
    let _finished = finished.clone().drop_guard();
    end_drain_after(&shutdown, options.drain_timeout, finished);
    let mut backoff = Duration::from_millis(200);
    // Lets the scheduler tell this process reconnecting from another one
    // using the same name (which it refuses while this one is connected).
    let incarnation = uuid::Uuid::new_v4().to_string();
    loop {
        let started = std::time::Instant::now();
        let outcome = session(&options, &incarnation, &executor, &shutdown).await;
        if stop.is_cancelled() {
            return Ok(());
        }
        if shutdown.drain.is_cancelled() {
            // Drained, or the connection ended meanwhile (the scheduler
            // re-queues what ran): nothing is left to do either way.
            match outcome {
                Ok(()) => tracing::info!("drained: no action is running; exiting"),
                Err(e) => tracing::info!(error = %format!("{e:#}"), "the connection ended while draining; exiting"),
            }
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
            () = shutdown.drain.cancelled() => return Ok(()),
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Logs the start of a drain and stops the worker when it has lasted
/// `timeout` (unless `finished` first).
fn end_drain_after(shutdown: &Shutdown, timeout: Duration, finished: CancellationToken) {
    let Shutdown { drain, stop } = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = drain.cancelled() => {}
            () = finished.cancelled() => return,
        }
        let limit = humantime::format_duration(timeout).to_string();
        tracing::info!(drain_timeout = %limit, "draining: running actions finish, no new ones are taken");
        tokio::select! {
            () = tokio::time::sleep(timeout) => {}
            () = finished.cancelled() => return,
            () = stop.cancelled() => return,
        }
        tracing::warn!(drain_timeout = %limit, "still busy after the drain timeout: killing the running actions; the scheduler re-queues them");
        stop.cancel();
    });
}

/// One connection: Hello, then assignments until the stream ends. Actions
/// still running when it ends are cancelled: the scheduler has re-queued them.
/// Returns `Ok` also when a drain ends with no action running.
async fn session(
    options: &WorkerOptions,
    incarnation: &str,
    executor: &Arc<Executor>,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    let stop = &shutdown.stop;
    let connecting = remote_apis::client::connect(&options.scheduler, &options.client);
    let channel = tokio::select! {
        c = connecting => c?,
        () = stop.cancelled() => return Ok(()),
        () = shutdown.drain.cancelled() => return Ok(()),
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
        () = shutdown.drain.cancelled() => return Ok(()),
    };
    let session_stop = stop.child_token();
    let _guard = session_stop.clone().drop_guard();
    let running: Arc<Running> = Arc::default();
    tracing::info!(scheduler = %options.scheduler, name = %options.name, slots = options.slots, "connected");
    let ends = Ends { stop: &session_stop, drain: &shutdown.drain };
    let result = serve_session(&mut inbound, &out_tx, executor, ends, &running).await;
    if matches!(result, Ok(true)) {
        // Drained: every result is sent. Close this side (the keepalives
        // end with the session) and give the scheduler a moment to close
        // its own, so it has read them all before the process exits.
        session_stop.cancel();
        drop(out_tx);
        let closed = async { while let Ok(Some(_)) = inbound.message().await {} };
        let _ = tokio::time::timeout(Duration::from_secs(5), closed).await;
    }
    super::drain(&running.tasks).await;
    result.map(|_| ())
}

/// The actions a session runs, by task id.
#[derive(Default)]
struct Running {
    tasks: Mutex<HashMap<String, CancellationToken>>,
    /// Signalled when an action ends: a draining worker leaves when none is left.
    ended: Notify,
}

/// What ends a session: `stop` at once; `drain` once no action runs.
#[derive(Clone, Copy)]
struct Ends<'a> {
    stop: &'a CancellationToken,
    drain: &'a CancellationToken,
}

/// Handles the scheduler's messages until the stream ends, `stop`, or a
/// drain with nothing left running (then `Ok(true)`).
async fn serve_session(
    inbound: &mut tonic::Streaming<proto::SchedulerMessage>,
    out_tx: &mpsc::UnboundedSender<WorkerMessage>,
    executor: &Arc<Executor>,
    ends: Ends<'_>,
    running: &Arc<Running>,
) -> anyhow::Result<bool> {
    let mut draining = false;
    loop {
        if draining && running.tasks.lock().is_empty() {
            return Ok(true);
        }
        let msg = tokio::select! {
            m = inbound.message() => match m? {
                Some(m) => m,
                None => return Ok(false),
            },
            () = ends.stop.cancelled() => return Ok(false),
            () = ends.drain.cancelled(), if !draining => {
                draining = true;
                send(out_tx, worker_message::Message::Drain(proto::Drain { draining: true }));
                continue;
            }
            () = running.ended.notified(), if draining => continue,
        };
        match msg.message {
            Some(scheduler_message::Message::Welcome(w)) => keep_alive(&w, out_tx, ends.stop),
            Some(scheduler_message::Message::Assign(assign)) => {
                let task = match decode_task(assign) {
                    Ok(t) => t,
                    Err(e) => anyhow::bail!("the scheduler sent an undecodable task: {e}"),
                };
                // Run even while draining (assigned before the scheduler read
                // the Drain, or undrained by an admin): the drain waits for it.
                start(task, executor, out_tx, ends.stop, running);
            }
            Some(scheduler_message::Message::ReadOutput(r)) => read_output(r, executor, out_tx),
            Some(scheduler_message::Message::Cancel(c)) => {
                if let Some(token) = running.tasks.lock().get(&c.task_id) {
                    token.cancel();
                }
            }
            None => {}
        }
    }
}

/// Sends a Keepalive at the interval the scheduler asked for, until `stop`.
fn keep_alive(welcome: &proto::Welcome, out_tx: &mpsc::UnboundedSender<WorkerMessage>, stop: &CancellationToken) {
    let every = Duration::from_millis(welcome.keepalive_interval_ms.max(100));
    let (tx, token) = (out_tx.clone(), stop.clone());
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

/// Runs one task and reports its result. When the session is stopping
/// (`stop`) the result is not reported: the scheduler re-queues the action
/// once the stream ends, where a report would end it as cancelled.
fn start(
    task: Task,
    executor: &Arc<Executor>,
    out_tx: &mpsc::UnboundedSender<WorkerMessage>,
    stop: &CancellationToken,
    running: &Arc<Running>,
) {
    let cancel = stop.child_token();
    running.tasks.lock().insert(task.id.clone(), cancel.clone());
    let (executor, tx, running, stop) = (executor.clone(), out_tx.clone(), running.clone(), stop.clone());
    tokio::spawn(async move {
        let started_tx = tx.clone();
        let id = task.id.clone();
        let started = move || send(&started_tx, worker_message::Message::Started(proto::Started { task_id: id }));
        let sink = Streams { tx: tx.clone(), task: task.id.clone() };
        let response = executor.execute(&task, started, &sink, cancel).await;
        if !stop.is_cancelled() {
            let finished = proto::Finished { task_id: task.id.clone(), execute_response: response.encode_to_vec() };
            send(&tx, worker_message::Message::Finished(finished));
        }
        // Reported first, then gone: a drain that sees no action left has
        // every result in the stream.
        running.tasks.lock().remove(&task.id);
        running.ended.notify_one();
    });
}

/// A task's live output goes to the scheduler in `Output` messages, one per
/// batch (see [`super::live`]), on the stream that later carries its
/// `Finished`, so the scheduler has every byte before the end.
struct Streams {
    tx: mpsc::UnboundedSender<WorkerMessage>,
    task: String,
}

impl super::OutputSink for Streams {
    fn output(&self, stdout: bytes::Bytes, stderr: bytes::Bytes) {
        let output = proto::Output { task_id: self.task.clone(), stdout: stdout.into(), stderr: stderr.into() };
        send(&self.tx, worker_message::Message::Output(output));
    }
}

/// Uploads a running task's output for the scheduler and answers it.
fn read_output(request: proto::ReadOutput, executor: &Arc<Executor>, out_tx: &mpsc::UnboundedSender<WorkerMessage>) {
    let (executor, tx) = (executor.clone(), out_tx.clone());
    tokio::spawn(async move {
        let mut answer = proto::OutputRead { request_id: request.request_id, ..Default::default() };
        match executor.read_running_output(&request.task_id, &request.path).await {
            Ok(digest) => answer.digest = digest.to_proto().encode_to_vec(),
            Err(e) => (answer.code, answer.message) = (e.code as i32, e.message),
        }
        send(&tx, worker_message::Message::OutputRead(answer));
    });
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
