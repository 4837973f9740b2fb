//! The scheduler's shared truth as plain data behind an async trait, so
//! several server replicas can share one queue.
//!
//! [`SchedulerState`] holds operations, per-platform queues, in-flight merge
//! keys, the worker registry and the counters; every method is one atomic
//! transition. Matching, merging policy, retries and expiry decisions stay
//! in the scheduler (plain Rust); live channels (operation watchers, worker
//! streams) stay local to each replica and are driven by the change feed
//! ([`SchedulerState::subscribe_changes`]).
//!
//! Invariants (both implementations):
//! - an operation is in at most one queue or on at most one worker task;
//! - only the current task of an operation can finish it
//!   ([`SchedulerState::take_task`] answers `None` for any other);
//! - a finished operation never changes again, except its owners (detach);
//! - nothing here is a channel or an `Instant`: times are wall-clock
//!   milliseconds, so any replica can read them.

pub mod memory;
pub mod redis;

#[cfg(test)]
mod suite;

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::broadcast;

use crate::error::Result;

pub use memory::MemoryState;
pub use redis::{RedisState, RedisStateConfig};

/// Wall-clock milliseconds since the Unix epoch.
pub type Millis = u64;

pub fn now_millis() -> Millis {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// How long finished operations stay, and how many at most (the state
/// enforces both in [`SchedulerState::expire`], Redis also by key TTLs).
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub retention: Duration,
    pub max_finished: usize,
}

/// An operation to create.
#[derive(Debug, Clone)]
pub struct NewOp {
    pub instance: String,
    /// The digest's text form (`Digest`'s Display, which FromStr reads back).
    pub action_digest: String,
    /// The queue: the platform's key (see [`queue_key`]).
    pub queue: String,
    /// What a worker needs to run it (the scheduler's encoding); empty for a
    /// finished one.
    pub spec: Bytes,
    /// Identical in-flight actions with the same key merge; `None`: never.
    pub merge_key: Option<String>,
    pub owner: String,
    pub now: Millis,
}

/// One operation as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct OpRecord {
    pub name: String,
    /// Creation order: queues and listings are ordered by it.
    pub seq: u64,
    pub instance: String,
    pub action_digest: String,
    pub queue: String,
    /// Dropped (empty) once the operation is done.
    pub spec: Bytes,
    pub merge_key: Option<String>,
    pub owners: Vec<String>,
    /// REAPI `ExecutionStage.Value`s, in order; only ever grows.
    pub stages: Vec<i32>,
    /// The encoded ExecuteResponse once done.
    pub response: Option<Bytes>,
    /// The worker running it, or that ran it last.
    pub worker: Option<String>,
    pub attempts: u32,
    /// (worker id, task id) while a worker holds it.
    pub running: Option<(u64, String)>,
    pub queued_at: Millis,
    /// When it last entered a queue (a re-queue restarts it).
    pub queued_since: Millis,
    pub done_at: Option<Millis>,
}

impl OpRecord {
    pub fn done(&self) -> bool {
        self.done_at.is_some()
    }
}

/// What [`SchedulerState::submit`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    Created(String),
    /// An identical action was in flight: the caller joined it as an owner.
    Joined(String),
}

impl Submitted {
    pub fn name(&self) -> &str {
        match self {
            Submitted::Created(n) | Submitted::Joined(n) => n,
        }
    }
}

/// What [`SchedulerState::cancel`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancelled {
    /// Unknown, expired, or not the caller's.
    Unknown,
    /// The caller was one of several owners: it left, the work goes on.
    Detached,
    AlreadyDone,
    /// Finished as cancelled; `running` is the task a worker must kill.
    Cancelled {
        running: Option<(u64, String)>,
    },
}

/// What [`SchedulerState::delete`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    Unknown,
    Detached,
    /// Not finished: deleting does not cancel, it stays until it ends.
    StillRunning,
    Deleted,
}

/// A worker to add to the registry.
#[derive(Debug, Clone)]
pub struct NewWorker {
    pub name: String,
    /// The replica whose stream the worker is connected to.
    pub replica: String,
    pub properties: Vec<(String, String)>,
    pub slots: usize,
    pub builtin: bool,
    pub sandbox: String,
    /// Random per worker process; empty means none (see [`Registered`]).
    pub incarnation: String,
    pub now: Millis,
}

/// What [`SchedulerState::register_worker`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    Added(u64),
    /// Another connected worker has the name (and not the incarnation).
    NameTaken,
    /// The same process reconnected: the caller removes `old` (re-queuing
    /// its actions) and registers again.
    Reconnected {
        old: u64,
    },
}

/// A worker as stored, with the tasks it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRecord {
    pub id: u64,
    pub name: String,
    pub replica: String,
    pub properties: Vec<(String, String)>,
    pub slots: usize,
    pub builtin: bool,
    pub sandbox: String,
    pub incarnation: String,
    pub draining: bool,
    pub last_seen: Millis,
    pub connected_at: Millis,
    pub done: u64,
    pub failed: u64,
    /// (task id, operation name), cancelled tasks included until the worker
    /// says they ended: they still take a slot.
    pub tasks: Vec<(String, String)>,
}

/// A removed worker and what became of its actions.
#[derive(Debug, Clone, PartialEq)]
pub struct Removed {
    pub worker: WorkerRecord,
    /// Queued again (attempts left).
    pub requeued: Vec<String>,
    /// Out of attempts: released from the worker but not finished; the
    /// caller completes them with a status saying why.
    pub exhausted: Vec<OpRecord>,
}

/// One queue: (seq, operation name, queued_since), oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueRecord {
    pub queue: String,
    pub entries: Vec<(u64, String, Millis)>,
}

/// What a completion counts as (see [`Counters`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    pub executed: bool,
    pub failed: bool,
}

/// Cluster-wide counters for `scheduler status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub merged: u64,
    pub executed: u64,
    pub failed: u64,
    pub requeued: u64,
    pub cancelled: u64,
}

/// The change feed: what replicas react to. Every replica hears every
/// change, its own included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The operation changed: local watchers re-read it.
    Op(String),
    /// Work was queued or a slot freed: replicas try dispatch.
    Queue,
    /// The replica holding the worker's stream tells it to kill the task.
    Cancel { worker: u64, task: String },
    /// The worker was drained or undrained.
    Drain { worker: u64, draining: bool },
    /// The feed may have missed changes (a reconnect): re-read everything
    /// watched here and try dispatch. Receivers treat `Lagged` the same.
    Resync,
}

/// The shared scheduling state. Each method is one atomic transition.
/// Engine trouble is UNAVAILABLE, naming the engine.
#[async_trait]
pub trait SchedulerState: Send + Sync + 'static {
    /// Queues a new operation, or, if one with the same merge key is in
    /// flight, adds `owner` to it (counting a merge).
    async fn submit(&self, op: NewOp) -> Result<Submitted>;
    /// Creates an operation already finished with `response` (a cache hit).
    async fn insert_finished(&self, op: NewOp, response: Bytes) -> Result<String>;
    async fn get(&self, name: &str) -> Result<Option<OpRecord>>;
    /// Every operation, oldest first.
    async fn list(&self) -> Result<Vec<OpRecord>>;
    /// Takes the oldest operation of `queues` for `task` on `worker`
    /// (attempts + 1), if the worker exists, is not draining and has a free
    /// slot. The scheduler chooses the queues the worker can run.
    async fn claim(&self, worker: u64, task: &str, queues: &[String]) -> Result<Option<OpRecord>>;
    /// The task began: the operation is EXECUTING (if still current).
    async fn started(&self, worker: u64, task: &str) -> Result<()>;
    /// The worker ended the task: its slot is free. The operation, released
    /// but not yet finished, if the task was still its current one.
    async fn take_task(&self, worker: u64, task: &str, succeeded: bool) -> Result<Option<OpRecord>>;
    /// Finishes an operation not done yet. False if it was done already.
    async fn complete(&self, name: &str, response: Bytes, outcome: Outcome) -> Result<bool>;
    /// Finishes a queued operation (one no worker came for). False if it was
    /// not queued any more.
    async fn fail_queued(&self, name: &str, response: Bytes) -> Result<bool>;
    /// `by`: the owner asking; `None`, an admin. `response` is the
    /// cancelled status to finish it with.
    async fn cancel(&self, name: &str, by: Option<&str>, response: Bytes) -> Result<Cancelled>;
    async fn delete(&self, name: &str, by: Option<&str>) -> Result<Deleted>;
    /// Forgets finished operations past retention or over the cap.
    async fn expire(&self, now: Millis) -> Result<usize>;

    async fn register_worker(&self, worker: NewWorker) -> Result<Registered>;
    async fn touch_worker(&self, id: u64, now: Millis) -> Result<()>;
    /// The id of the worker so named, if connected anywhere.
    async fn set_draining(&self, name: &str, draining: bool) -> Result<Option<u64>>;
    /// Removes a worker; its current tasks' operations are queued again
    /// while they have attempts left (`max_attempts`).
    async fn remove_worker(&self, id: u64, max_attempts: u32, now: Millis) -> Result<Option<Removed>>;
    async fn workers(&self) -> Result<Vec<WorkerRecord>>;
    /// The non-empty queues.
    async fn queues(&self) -> Result<Vec<QueueRecord>>;
    /// The front of every non-empty queue: (queue, seq of its oldest). What
    /// dispatch reads, without copying whole queues.
    async fn fronts(&self) -> Result<Vec<(String, u64)>>;
    async fn counters(&self) -> Result<Counters>;

    /// Says the replica is alive for `ttl` more.
    async fn refresh_lease(&self, replica: &str, ttl: Duration) -> Result<()>;
    /// A clean stop: the replica's lease ends now.
    async fn drop_lease(&self, replica: &str) -> Result<()>;
    async fn live_replicas(&self) -> Result<HashSet<String>>;

    /// Every change from now on. A receiver that lags (`Lagged`) must
    /// re-read what it watches.
    fn subscribe_changes(&self) -> broadcast::Receiver<Change>;
}

/// A platform's queue key: its sorted pairs as JSON (readable, reversible).
pub fn queue_key(pairs: &[(String, String)]) -> String {
    serde_json::to_string(pairs).expect("strings serialize")
}

/// The pairs of a [`queue_key`].
pub fn queue_pairs(key: &str) -> Vec<(String, String)> {
    serde_json::from_str(key).unwrap_or_default()
}

/// The change feed's capacity per receiver before it lags.
pub(crate) const FEED_CAPACITY: usize = 4096;
