//! The scheduler: the logic over the shared state ([`SchedulerState`]) and
//! the live channels of one replica.
//!
//! The truth (operations, queues, workers, counters) is plain data in the
//! state, changed only by its atomic transitions; it may be shared by
//! several replicas (Redis). Here stays what is local: the watch senders
//! of operations watched through this replica and the channels of workers
//! connected to it. Matching, merging, retries, the unmatched timeout and
//! drains are decided here, in plain Rust.
//!
//! Invariants:
//! - every transition made here refreshes the local watchers of the
//!   operations it touched before it returns; changes made by other
//!   replicas arrive through the change feed ([`Scheduler::follow`]);
//! - a replica hands work only to its own workers, by claiming it from the
//!   shared queues, so two replicas never give one operation to two workers;
//! - only the worker holding the current task id of an operation can finish
//!   it: answers for re-queued or cancelled attempts are ignored.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use remote_apis::reapi::execution_stage::Value as Stage;
use remote_apis::reapi::{ActionResult, ExecuteResponse};
use remote_apis::{Digest, InstanceName, rpc};
use tokio::sync::{mpsc, watch};

use super::failed::{FailedIndex, FailedRun, MAX_FAILED_RUNS};
use super::logstream::LogStreams;
use super::platform::Platform;
use super::state::{self, Cancelled, Deleted, NewOp, Outcome, SchedulerState, Submitted, now_millis};
use super::validate::Checked;
use crate::ac::{AcKey, ActionResults};
use crate::auth::Principal;
use crate::error::{Error, Result};
use crate::worker::Task;

use records::*;
pub use types::{
    Counters, OpView, OutputRequest, QueueView, SchedulerConfig, Status, Submission, WorkerCommand, WorkerInfo,
    WorkerView,
};

pub type OpWatch = watch::Receiver<Arc<OpView>>;

/// A worker connected to this replica.
struct LocalWorker {
    tx: mpsc::UnboundedSender<WorkerCommand>,
}

/// What only this replica has.
#[derive(Default)]
struct Local {
    /// Operations watched through this replica.
    watchers: HashMap<String, watch::Sender<Arc<OpView>>>,
    workers: HashMap<u64, LocalWorker>,
    /// When each queue last had an active worker able to run it, as this
    /// replica's sweep saw: the unmatched wait counts from then.
    matched_at: HashMap<String, state::Millis>,
    /// `started` reports not yet written, by task: `finished` waits for them.
    starting: HashMap<String, tokio::task::JoinHandle<()>>,
    metrics: Option<Arc<crate::metrics::ExecutionMetrics>>,
}

pub struct Scheduler {
    state: Arc<dyn SchedulerState>,
    /// This replica's id: its workers' records name it.
    replica: String,
    local: Mutex<Local>,
    /// One dispatch at a time per replica.
    dispatching: tokio::sync::Mutex<()>,
    /// Where successful results go (through the cache policy).
    results: Arc<dyn ActionResults>,
    /// Where failed results go: they never enter the cache.
    cas: crate::store::Store,
    config: SchedulerConfig,
    /// Failed runs by action, for the status pages (this replica's).
    failed: Mutex<FailedIndex>,
    /// The last status and queues, for readers that cannot wait (metrics).
    snapshot: Mutex<Arc<(Status, Vec<QueueView>)>>,
    /// Live stdout/stderr of the tasks of this replica's workers.
    logs: Arc<LogStreams>,
}

impl Scheduler {
    /// A scheduler on its own memory state (one replica).
    pub fn new(results: Arc<dyn ActionResults>, cas: crate::store::Store, config: SchedulerConfig) -> Self {
        let retention = state::Retention { retention: config.retention, max_finished: config.max_finished };
        let state = Arc::new(state::MemoryState::new(retention));
        Self::with_state(state, "local".into(), results, cas, config)
    }

    pub fn with_state(
        state: Arc<dyn SchedulerState>,
        replica: String,
        results: Arc<dyn ActionResults>,
        cas: crate::store::Store,
        config: SchedulerConfig,
    ) -> Self {
        let failed = Mutex::new(FailedIndex::new(config.failed_retention, MAX_FAILED_RUNS));
        let snapshot = Mutex::new(Arc::new((Status::default(), Vec::new())));
        let logs = Arc::new(LogStreams::new(config.log_window, config.log_grace));
        Scheduler {
            state,
            replica,
            local: Mutex::default(),
            dispatching: tokio::sync::Mutex::new(()),
            results,
            cas,
            config,
            failed,
            snapshot,
            logs,
        }
    }

    /// From now on, records queue waits and completions in `metrics` (the
    /// server sets it before it serves).
    pub fn record_metrics(&self, metrics: Arc<crate::metrics::ExecutionMetrics>) {
        self.local.lock().metrics = Some(metrics);
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Queues an action, or joins the identical one already in flight.
    /// FAILED_PRECONDITION when connected workers exist and none can ever run
    /// it (with no worker connected yet, it waits for one).
    pub async fn submit(&self, sub: Submission) -> Result<OpWatch> {
        let workers = self.state.workers().await?;
        if !workers.is_empty() {
            self.check_satisfiable(&workers, &sub.checked.platform)?;
        }
        let op = NewOp {
            instance: sub.instance.as_str().to_string(),
            action_digest: sub.action_digest.to_string(),
            queue: queue_of(&sub.checked.platform),
            spec: encode_spec(&sub.checked),
            merge_key: sub.cache_key.as_ref().map(|_| merge_key(&sub.instance, &sub.action_digest)),
            owner: owner_key(&sub.owner),
            now: now_millis(),
        };
        let submitted = self.state.submit(op).await?;
        if let Submitted::Joined(name) = &submitted {
            self.refresh(name).await;
        } else {
            self.dispatch().await;
        }
        self.subscribe(submitted.name()).await?.ok_or_else(|| unknown_operation(submitted.name()))
    }

    /// Records an ActionCache hit as a finished operation.
    pub async fn record_hit(
        &self,
        instance: InstanceName,
        action_digest: Digest,
        result: ActionResult,
        owner: Principal,
    ) -> Result<OpWatch> {
        let response = ExecuteResponse { result: Some(result), cached_result: true, ..Default::default() };
        let op = NewOp {
            instance: instance.as_str().to_string(),
            action_digest: action_digest.to_string(),
            queue: String::new(),
            spec: bytes::Bytes::new(),
            merge_key: None,
            owner: owner_key(&owner),
            now: now_millis(),
        };
        let name = self.state.insert_finished(op, encode_response(&response)).await?;
        self.subscribe(&name).await?.ok_or_else(|| unknown_operation(&name))
    }

    /// Whether some connected worker offers `platform`. Draining workers
    /// count: draining the only worker of a platform (for maintenance) must
    /// not turn new actions into instant failures. They wait in the queue
    /// like actions no connected worker can run, and the sweep fails them
    /// after `unmatched_timeout` unless an active worker comes (or the
    /// drained one is undrained) first.
    fn check_satisfiable(&self, workers: &[state::WorkerRecord], platform: &Platform) -> Result<()> {
        let numeric = &self.config.numeric_properties;
        let offers =
            |w: &state::WorkerRecord, p: &Platform| p.unmet_by(&Platform::new(w.properties.clone()), numeric).is_none();
        if workers.iter().any(|w| offers(w, platform)) {
            return Ok(());
        }
        // Name the property nobody offers, or say no single worker offers all.
        let lonely = platform.pairs().iter().find(|(k, v)| {
            let one = Platform::new(vec![(k.clone(), v.clone())]);
            workers.iter().all(|w| !offers(w, &one))
        });
        let message = match lonely {
            Some((k, v)) => format!("no connected worker offers the platform property {k}={v}"),
            None => format!("no single connected worker offers all of the platform properties {platform}"),
        };
        Err(Error::new(tonic::Code::FailedPrecondition, message))
    }

    /// A new watch on the operation, or `None` if it is unknown or expired.
    pub async fn subscribe(&self, name: &str) -> Result<Option<OpWatch>> {
        if let Some(tx) = self.local.lock().watchers.get(name) {
            return Ok(Some(tx.subscribe()));
        }
        let Some(view) = self.get(name).await? else { return Ok(None) };
        let mut local = self.local.lock();
        let tx = local.watchers.entry(name.to_string()).or_insert_with(|| watch::channel(Arc::new(view)).0);
        Ok(Some(tx.subscribe()))
    }

    pub async fn get(&self, name: &str) -> Result<Option<OpView>> {
        Ok(self.state.get(name).await?.as_ref().and_then(to_view).map(|v| self.with_streams(v)))
    }

    /// Operations, oldest first.
    pub async fn list(&self) -> Result<Vec<OpView>> {
        Ok(self.state.list().await?.iter().filter_map(to_view).collect())
    }

    /// Re-reads an operation watched here and tells its watchers; a gone
    /// one ends their streams.
    async fn refresh(&self, name: &str) {
        if !self.local.lock().watchers.contains_key(name) {
            return;
        }
        let view = match self.state.get(name).await {
            Ok(record) => record.as_ref().and_then(to_view).map(|v| self.with_streams(v)),
            Err(e) => {
                tracing::warn!(error = %e, "re-reading an operation");
                return;
            }
        };
        let mut local = self.local.lock();
        match view {
            None => drop(local.watchers.remove(name)),
            Some(view) => {
                if let Some(tx) = local.watchers.get(name) {
                    // Stages only grow: an older read never replaces a newer one.
                    tx.send_if_modified(|current| {
                        let newer = view.stages.len() >= current.stages.len();
                        if newer {
                            *current = Arc::new(view);
                        }
                        newer
                    });
                }
            }
        }
    }

    /// Cancels a queued or running operation (its process is killed). A
    /// finished one is left as it is. `by` is the owner asking (`None`: an
    /// admin): an operation it does not own is NOT_FOUND, and one that other
    /// principals also own (merged identical actions) is only detached from
    /// it, so nobody cancels another principal's work.
    pub async fn cancel(&self, name: &str, by: Option<&Principal>) -> Result<()> {
        let response = status(tonic::Code::Cancelled, "the operation was cancelled".into());
        let by = by.map(owner_key);
        match self.state.cancel(name, by.as_deref(), encode_response(&response)).await? {
            Cancelled::Unknown => return Err(unknown_operation(name)),
            Cancelled::Detached | Cancelled::AlreadyDone => {}
            Cancelled::Cancelled { running } => {
                if let Some((worker, task)) = running {
                    self.logs.finalize(&task);
                    self.tell_worker(worker, WorkerCommand::Cancel(task));
                }
                self.record_completion(name, &response).await;
            }
        }
        self.refresh(name).await;
        Ok(())
    }

    /// Forgets a finished operation. A running one keeps running (deleting
    /// does not cancel) and stays visible until it ends. `by` as for
    /// [`Scheduler::cancel`]: one of several owners only detaches itself.
    pub async fn delete(&self, name: &str, by: Option<&Principal>) -> Result<()> {
        let by = by.map(owner_key);
        match self.state.delete(name, by.as_deref()).await? {
            Deleted::Unknown => Err(unknown_operation(name)),
            Deleted::Detached => {
                self.refresh(name).await;
                Ok(())
            }
            Deleted::StillRunning => Ok(()),
            Deleted::Deleted => {
                self.local.lock().watchers.remove(name);
                Ok(())
            }
        }
    }

    /// The worker began the task: the operation is EXECUTING. Returns at
    /// once (the built-in worker calls it from a synchronous callback);
    /// [`Scheduler::finished`] waits for it to be written.
    pub fn started(self: &Arc<Self>, worker: u64, task: &str) {
        let (this, task_id) = (self.clone(), task.to_string());
        let handle = tokio::spawn(async move {
            match this.state.started(worker, &task_id).await {
                Ok(()) => {
                    if let Some(name) = this.op_of_task(worker, &task_id).await {
                        this.refresh(&name).await;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "recording a started task"),
            }
        });
        self.local.lock().starting.insert(task.to_string(), handle);
    }

    async fn op_of_task(&self, worker: u64, task: &str) -> Option<String> {
        let workers = self.state.workers().await.ok()?;
        let w = workers.into_iter().find(|w| w.id == worker)?;
        w.tasks.into_iter().find(|(t, _)| t == task).map(|(_, name)| name)
    }

    /// The worker ended the task. A successful result is written to the
    /// ActionCache before any waiter hears of it, so a client that asks the
    /// cache right after sees it.
    pub async fn finished(&self, worker: u64, task: &str, mut response: ExecuteResponse) {
        let starting = self.local.lock().starting.remove(task);
        if let Some(handle) = starting {
            let _ = handle.await;
        }
        self.logs.finalize(task);
        let succeeded = response.status.as_ref().is_none_or(|s| s.code == 0)
            && response.result.as_ref().is_some_and(|r| r.exit_code == 0);
        let op = match self.state.take_task(worker, task, succeeded).await {
            Ok(Some(op)) => op,
            Ok(None) => return self.dispatch().await, // cancelled or re-queued meanwhile
            Err(e) => return tracing::warn!(error = %e, "recording a finished task"),
        };
        let (Ok(instance), Ok(action)) = (InstanceName::new(&op.instance), op.action_digest.parse::<Digest>()) else {
            return tracing::warn!(operation = %op.name, "an unreadable operation record");
        };
        if let (true, true, Some(result)) = (succeeded, op.merge_key.is_some(), response.result.as_ref())
            && let Err(e) = self.results.store(&AcKey::new(&instance, &action), result).await
        {
            tracing::warn!(error = %e, "storing an action result");
        }
        if !succeeded {
            self.keep_failure(&op.name, action, &instance, op.worker.clone(), &mut response).await;
        }
        let outcome = Outcome { executed: true, failed: !succeeded };
        self.finish(&op.name, response, outcome).await;
        self.dispatch().await;
    }

    /// Finishes an operation in the state and tells its watchers.
    async fn finish(&self, name: &str, response: ExecuteResponse, outcome: Outcome) {
        match self.state.complete(name, encode_response(&response), outcome).await {
            Ok(true) => self.record_completion(name, &response).await,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, operation = name, "finishing an operation"),
        }
        self.refresh(name).await;
    }

    async fn record_completion(&self, name: &str, response: &ExecuteResponse) {
        let Some(metrics) = self.local.lock().metrics.clone() else { return };
        let retried = matches!(self.state.get(name).await, Ok(Some(op)) if op.attempts > 1);
        metrics.completed(response, retried);
    }

    /// The latest failed run of `action` still retained: its ActionResult in
    /// the CAS, the operation, when and where it ran.
    pub fn failed_result(&self, action: &Digest) -> Option<FailedRun> {
        self.failed.lock().get(action, Instant::now())
    }

    /// A run that did not succeed: its ActionResult (if any) goes to the CAS
    /// and the failed index, and the response's message gains the link to
    /// the action's status page, which clients print beside the failure.
    async fn keep_failure(
        &self,
        operation: &str,
        action: Digest,
        instance: &InstanceName,
        worker: Option<String>,
        response: &mut ExecuteResponse,
    ) {
        if let Some(result) = &response.result {
            let bytes = prost::Message::encode_to_vec(result);
            let digest = action.function.digest_of(&bytes);
            match self.cas.put_bytes(&digest, bytes.into()).await {
                Ok(()) => {
                    let run = FailedRun { result: digest, operation: operation.into(), at: SystemTime::now(), worker };
                    self.failed.lock().insert(action, run, Instant::now());
                }
                Err(e) => tracing::warn!(error = %e, "storing a failed action result"),
            }
        }
        if let Some(base) = &self.config.status_url {
            let link = format!("{base}{}", crate::http::pages::action_href(&action, instance));
            let line = format!("details of the failed action: {link}");
            response.message = if response.message.is_empty() { line } else { format!("{}\n{line}", response.message) };
        }
    }

    /// Sends to a worker connected here; false if it is not (or gone).
    fn tell_worker(&self, worker: u64, command: WorkerCommand) -> bool {
        self.local.lock().workers.get(&worker).is_some_and(|w| w.tx.send(command).is_ok())
    }

    /// Hands queued actions to the free slots of this replica's workers: the
    /// oldest action any of them can run goes first, to the matching worker
    /// with the lowest load. Claims are atomic in the state, so replicas
    /// dispatching at once never hand out one action twice.
    async fn dispatch(&self) {
        let _one = self.dispatching.lock().await;
        // Bounded: each round claims one action or stops.
        for _ in 0..10_000 {
            match self.dispatch_one().await {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => return tracing::warn!(error = %e, "dispatching"),
            }
        }
    }

    /// One claim; false when nothing more can be handed out here.
    async fn dispatch_one(&self) -> Result<bool> {
        let numeric = &self.config.numeric_properties;
        let local: Vec<u64> = self.local.lock().workers.keys().copied().collect();
        let free: Vec<state::WorkerRecord> = self
            .state
            .workers()
            .await?
            .into_iter()
            .filter(|w| local.contains(&w.id) && !w.draining && w.tasks.len() < w.slots)
            .collect();
        if free.is_empty() {
            return Ok(false);
        }
        let queues = self.state.fronts().await?;
        let mut best: Option<(u64, &state::WorkerRecord)> = None; // (seq, worker)
        for (queue, seq) in &queues {
            if best.as_ref().is_some_and(|(s, _)| s < seq) {
                continue;
            }
            let platform = platform_of(queue);
            let worker = free
                .iter()
                .filter(|w| platform.unmet_by(&Platform::new(w.properties.clone()), numeric).is_none())
                .min_by(|a, b| {
                    let la = a.tasks.len() as f64 / a.slots as f64;
                    let lb = b.tasks.len() as f64 / b.slots as f64;
                    la.total_cmp(&lb).then(a.done.cmp(&b.done)).then(a.id.cmp(&b.id))
                });
            if let Some(w) = worker {
                best = Some((*seq, w));
            }
        }
        let Some((_, worker)) = best else { return Ok(false) };
        // The worker takes the oldest action of any queue it can run.
        let offered = Platform::new(worker.properties.clone());
        let runnable: Vec<String> = queues
            .iter()
            .filter(|(q, _)| platform_of(q).unmet_by(&offered, numeric).is_none())
            .map(|(q, _)| q.clone())
            .collect();
        let task_id = uuid::Uuid::new_v4().simple().to_string();
        let Some(op) = self.state.claim(worker.id, &task_id, &runnable).await? else { return Ok(true) };
        self.assign(worker.id, op, task_id).await;
        Ok(true)
    }

    async fn assign(&self, worker: u64, op: state::OpRecord, task_id: String) {
        let Some(task) = task_of(&op, task_id) else {
            tracing::error!(operation = %op.name, "an unreadable queued operation; failing it");
            let response = status(tonic::Code::Internal, "the queued operation could not be read".into());
            self.finish(&op.name, response, Outcome { executed: false, failed: true }).await;
            return;
        };
        // Open before the worker can write (or a client read) them.
        self.logs.open(&task.id, &task.instance, worker, &op.name);
        let task_id = task.id.clone();
        if !self.tell_worker(worker, WorkerCommand::Assign(Arc::new(task))) {
            self.logs.finalize(&task_id);
            // The connection is gone: its loss re-queues the action.
            self.local.lock().workers.remove(&worker);
            self.drop_worker(worker, "its connection is gone").await;
            return;
        }
        let metrics = self.local.lock().metrics.clone();
        if let Some(m) = metrics {
            m.dispatched(since(op.queued_since, now_millis()));
        }
        self.refresh(&op.name).await;
    }
}

/// NOT_FOUND for an operation that does not exist or is not the caller's:
/// the same words, so a caller learns nothing about other principals' work.
pub fn unknown_operation(name: &str) -> Error {
    Error::not_found(format!("operation {} is unknown or expired", remote_apis::quote(name)))
}

mod live;
mod records;
mod types;
mod views;
mod workers;

#[cfg(test)]
mod shared_tests;
#[cfg(test)]
mod tests;
