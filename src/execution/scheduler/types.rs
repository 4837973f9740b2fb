//! The scheduler's public types: its configuration, what it tells workers,
//! and the views of operations, workers and queues that clients, the admin
//! API, the status pages and the metrics read.

use super::*;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Attempts per action when workers are lost while running it.
    pub max_attempts: u32,
    /// A remote worker silent for this long is dropped.
    pub keepalive_timeout: Duration,
    /// Properties compared as "at least" numbers.
    pub numeric_properties: Vec<String>,
    /// How long finished operations stay visible (WaitExecution, GetOperation).
    pub retention: Duration,
    /// At most this many finished operations are kept (oldest go first), so
    /// a flood of cache hits cannot grow memory without bound.
    pub max_finished: usize,
    /// How long an action waits when no connected worker could run it.
    pub unmatched_timeout: Duration,
    /// The HTTP listener's base URL, when there is one: failed results
    /// point at their page there.
    pub status_url: Option<String>,
    /// How long failed runs stay findable (see [`Scheduler::failed_result`]).
    pub failed_retention: Duration,
    /// Bytes kept of each live stdout/stderr stream (see [`LogStreams`]).
    pub log_window: u64,
    /// How long a finished task's streams stay readable.
    pub log_grace: Duration,
}

/// What the scheduler tells a worker.
#[derive(Debug)]
pub enum WorkerCommand {
    Assign(Arc<Task>),
    Cancel(String),
    /// Upload the current content of a declared output of a running task
    /// to the CAS and answer its digest.
    ReadOutput(OutputRequest),
}

/// See [`WorkerCommand::ReadOutput`].
#[derive(Debug)]
pub struct OutputRequest {
    pub task: String,
    /// As declared in the Command (relative to the working directory).
    pub path: String,
    /// The action's digest function: the answer's.
    pub function: remote_apis::DigestFunction,
    pub reply: tokio::sync::oneshot::Sender<Result<Digest>>,
}

#[derive(Debug, Clone)]
pub struct WorkerInfo {
    pub name: String,
    pub properties: Platform,
    pub slots: usize,
    pub builtin: bool,
    /// How the worker isolates actions (its runner's description).
    pub sandbox: String,
}

/// A worker as `workers list` shows it.
#[derive(Debug, Clone)]
pub struct WorkerView {
    pub info: WorkerInfo,
    pub busy: usize,
    pub done: u64,
    /// Of `done`, the ones that did not succeed.
    pub failed: u64,
    /// Since the worker last showed it is alive (zero for the built-in one).
    pub last_seen: Duration,
    pub connected_for: Duration,
    /// Takes no new actions; finishes what it runs (see [`Scheduler::set_draining`]).
    pub draining: bool,
    /// The server replica the worker is connected to.
    pub replica: String,
}

/// One operation as clients see it. `stages` only grows (a lost worker adds
/// QUEUED again), so a stream can send every step it has not sent yet.
#[derive(Debug, Clone)]
pub struct OpView {
    pub name: String,
    pub instance: InstanceName,
    pub action_digest: Digest,
    pub stages: Vec<Stage>,
    pub response: Option<Arc<ExecuteResponse>>,
    pub worker: Option<String>,
    pub queued_at: SystemTime,
    /// Who asked for it: the creator, and callers from other principals
    /// whose identical action merged into it. Only they (and admins) see it.
    pub owners: Vec<Principal>,
    /// The task whose live streams the operation announces: the running
    /// one, else (on the replica that held it) the last one.
    pub task: Option<String>,
}

impl OpView {
    pub fn stage(&self) -> Stage {
        self.stages.last().copied().unwrap_or(Stage::Unknown)
    }

    pub fn done(&self) -> bool {
        self.response.is_some()
    }
}

/// Counters for `scheduler status` (the whole cluster's).
pub use crate::execution::state::Counters;

#[derive(Debug, Clone, Default)]
pub struct Status {
    pub queues: Vec<(Platform, usize)>,
    pub running: usize,
    pub operations: usize,
    pub workers: Vec<WorkerView>,
    pub counters: Counters,
}

/// One platform's queue, as the status page shows it.
#[derive(Debug, Clone)]
pub struct QueueView {
    pub platform: Platform,
    pub len: usize,
    /// When the oldest queued action was submitted.
    pub oldest: SystemTime,
}

/// An action to queue.
pub struct Submission {
    pub instance: InstanceName,
    pub action_digest: Digest,
    pub checked: Checked,
    /// `None` for `do_not_cache`: never merged, never cached.
    pub cache_key: Option<AcKey>,
    /// The caller: the operation belongs to it.
    pub owner: Principal,
}
