//! The scheduler: operations, per-platform queues, workers and dispatch.
//!
//! All state sits behind one lock and changes only through the methods here,
//! which is what a persistent backend would replace: the state is plain data
//! (operations by name, queues of names, workers by id) and every transition
//! is a method call. Nothing awaits while the lock is held.
//!
//! Invariants:
//! - an operation is in at most one queue or on at most one worker;
//! - a worker never has more tasks than slots, cancelled ones included
//!   until the worker confirms they ended;
//! - only the worker holding the current task id of an operation can finish
//!   it: answers for re-queued or cancelled attempts are ignored.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use remote_apis::reapi::execution_stage::Value as Stage;
use remote_apis::reapi::{ActionResult, ExecuteResponse};
use remote_apis::{Digest, InstanceName, rpc};
use tokio::sync::{mpsc, watch};

use super::failed::{FailedIndex, FailedRun, MAX_FAILED_RUNS};
use super::platform::Platform;
use super::validate::Checked;
use crate::ac::{AcKey, ActionResults};
use crate::auth::Principal;
use crate::error::{Error, Result};
use crate::worker::Task;

pub use types::{
    Counters, OpView, QueueView, SchedulerConfig, Status, Submission, WorkerCommand, WorkerInfo, WorkerView,
};

pub type OpWatch = watch::Receiver<Arc<OpView>>;

struct OpEntry {
    seq: u64,
    view: OpView,
    tx: watch::Sender<Arc<OpView>>,
    checked: Arc<Checked>,
    cache_key: Option<AcKey>,
    attempts: u32,
    /// (worker id, task id) while assigned.
    running: Option<(u64, String)>,
    queued_since: Instant,
    done_at: Option<Instant>,
}

impl OpEntry {
    fn publish(&self) {
        self.tx.send_replace(Arc::new(self.view.clone()));
    }
}

struct WorkerEntry {
    info: WorkerInfo,
    /// Random per worker process (see [`Scheduler::register_worker`]).
    incarnation: String,
    tx: mpsc::UnboundedSender<WorkerCommand>,
    /// task id -> operation name.
    running: HashMap<String, String>,
    done: u64,
    failed: u64,
    last_seen: Instant,
    connected_at: Instant,
    /// Dispatch skips it (see [`Scheduler::set_draining`]).
    draining: bool,
}

#[derive(Default)]
struct State {
    ops: HashMap<String, OpEntry>,
    /// Creation order, for listing.
    order: BTreeMap<u64, String>,
    /// Cacheable operations not yet done, by action: where duplicates merge.
    inflight: HashMap<AcKey, String>,
    /// Queued operation names per platform, oldest first (by seq).
    queues: HashMap<Platform, VecDeque<(u64, String)>>,
    workers: HashMap<u64, WorkerEntry>,
    /// Finished operations in the order they finished: expiry and the cap.
    finished: VecDeque<(Instant, String)>,
    next_seq: u64,
    next_worker: u64,
    counters: Counters,
    /// When each queue last had an active (not draining) worker able to run
    /// it, as the sweep saw: the unmatched wait counts from then.
    matched_at: HashMap<Platform, Instant>,
    /// Queue waits and completions, when metrics are on.
    metrics: Option<Arc<crate::metrics::ExecutionMetrics>>,
}

pub struct Scheduler {
    state: Mutex<State>,
    /// Where successful results go (through the cache policy).
    results: Arc<dyn ActionResults>,
    /// Where failed results go: they never enter the cache.
    cas: crate::store::Store,
    config: SchedulerConfig,
    /// Failed runs by action, for the status pages (a lock of its own: the
    /// pages read it without touching the scheduling state).
    failed: Mutex<FailedIndex>,
}

impl Scheduler {
    pub fn new(results: Arc<dyn ActionResults>, cas: crate::store::Store, config: SchedulerConfig) -> Self {
        let failed = Mutex::new(FailedIndex::new(config.failed_retention, MAX_FAILED_RUNS));
        Scheduler { state: Mutex::default(), results, cas, config, failed }
    }

    /// From now on, records queue waits and completions in `metrics` (the
    /// server sets it before it serves).
    pub fn record_metrics(&self, metrics: Arc<crate::metrics::ExecutionMetrics>) {
        self.state.lock().metrics = Some(metrics);
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Queues an action, or joins the identical one already in flight.
    /// FAILED_PRECONDITION when connected workers exist and none can ever run
    /// it (with no worker connected yet, it waits for one).
    pub fn submit(&self, sub: Submission) -> Result<OpWatch> {
        let mut st = self.state.lock();
        if let Some(key) = &sub.cache_key
            && let Some(name) = st.inflight.get(key).cloned()
            && let Some(op) = st.ops.get_mut(&name)
        {
            // A caller of another principal joins as an owner: it must see
            // the operation it got, and cancelling it then only detaches it.
            if !op.view.owners.contains(&sub.owner) {
                op.view.owners.push(sub.owner);
                op.publish();
            }
            let rx = op.tx.subscribe();
            st.counters.merged += 1;
            return Ok(rx);
        }
        if !st.workers.is_empty() {
            self.check_satisfiable(&st, &sub.checked.platform)?;
        }
        st.counters.cache_misses += 1;
        let platform = sub.checked.platform.clone();
        let (seq, name, rx) = insert_op(
            &mut st,
            sub.instance,
            sub.action_digest,
            Arc::new(sub.checked),
            sub.cache_key.clone(),
            None,
            sub.owner,
        );
        if let Some(key) = sub.cache_key {
            st.inflight.insert(key, name.clone());
        }
        enqueue(&mut st, platform, seq, name);
        self.dispatch(&mut st);
        Ok(rx)
    }

    /// Records an ActionCache hit as a finished operation.
    pub fn record_hit(
        &self,
        instance: InstanceName,
        action_digest: Digest,
        result: ActionResult,
        owner: Principal,
    ) -> OpWatch {
        let mut st = self.state.lock();
        st.counters.cache_hits += 1;
        let response = ExecuteResponse { result: Some(result), cached_result: true, ..Default::default() };
        let (_, _, rx) = insert_op(&mut st, instance, action_digest, Arc::default(), None, Some(response), owner);
        rx
    }

    /// Whether some connected worker offers `platform`. Draining workers
    /// count: draining the only worker of a platform (for maintenance) must
    /// not turn new actions into instant failures. They wait in the queue
    /// like actions no connected worker can run, and the sweep fails them
    /// after `unmatched_timeout` unless an active worker comes (or the
    /// drained one is undrained) first.
    fn check_satisfiable(&self, st: &State, platform: &Platform) -> Result<()> {
        let numeric = &self.config.numeric_properties;
        if st.workers.values().any(|w| platform.unmet_by(&w.info.properties, numeric).is_none()) {
            return Ok(());
        }
        // Name the property nobody offers, or say no single worker offers all.
        let lonely = platform.pairs().iter().find(|(k, v)| {
            let one = Platform::new(vec![(k.clone(), v.clone())]);
            st.workers.values().all(|w| one.unmet_by(&w.info.properties, numeric).is_some())
        });
        let message = match lonely {
            Some((k, v)) => format!("no connected worker offers the platform property {k}={v}"),
            None => format!("no single connected worker offers all of the platform properties {platform}"),
        };
        Err(Error::new(tonic::Code::FailedPrecondition, message))
    }

    /// A new watch on the operation, or `None` if it is unknown or expired.
    pub fn subscribe(&self, name: &str) -> Option<OpWatch> {
        self.state.lock().ops.get(name).map(|op| op.tx.subscribe())
    }

    pub fn get(&self, name: &str) -> Option<OpView> {
        self.state.lock().ops.get(name).map(|op| op.view.clone())
    }

    /// Operations, oldest first.
    pub fn list(&self) -> Vec<OpView> {
        let st = self.state.lock();
        st.order.values().filter_map(|n| st.ops.get(n)).map(|op| op.view.clone()).collect()
    }

    /// Cancels a queued or running operation (its process is killed). A
    /// finished one is left as it is. `by` is the owner asking (`None`: an
    /// admin): an operation it does not own is NOT_FOUND, and one that other
    /// principals also own (merged identical actions) is only detached from
    /// it, so nobody cancels another principal's work.
    pub fn cancel(&self, name: &str, by: Option<&Principal>) -> Result<()> {
        let mut st = self.state.lock();
        let Some(op) = st.ops.get_mut(name) else {
            return Err(unknown_operation(name));
        };
        if let Some(who) = by {
            if !op.view.owners.contains(who) {
                return Err(unknown_operation(name));
            }
            if op.view.owners.len() > 1 {
                op.view.owners.retain(|o| o != who);
                op.publish();
                return Ok(());
            }
        }
        if op.done_at.is_some() {
            return Ok(());
        }
        let (platform, running) = (op.checked.platform.clone(), op.running.clone());
        match running {
            Some((worker, task)) => {
                if let Some(w) = st.workers.get(&worker) {
                    let _ = w.tx.send(WorkerCommand::Cancel(task));
                }
            }
            None => {
                if let Some(q) = st.queues.get_mut(&platform) {
                    q.retain(|(_, n)| n != name);
                }
            }
        }
        st.counters.cancelled += 1;
        let status = rpc::Status {
            code: tonic::Code::Cancelled as i32,
            message: "the operation was cancelled".into(),
            details: Vec::new(),
        };
        complete(&mut st, name, ExecuteResponse { status: Some(status), ..Default::default() });
        Ok(())
    }

    /// Forgets a finished operation. A running one keeps running (deleting
    /// does not cancel) and stays visible until it ends. `by` as for
    /// [`Scheduler::cancel`]: one of several owners only detaches itself.
    pub fn delete(&self, name: &str, by: Option<&Principal>) -> Result<()> {
        let mut st = self.state.lock();
        if let Some(who) = by {
            let Some(op) = st.ops.get_mut(name).filter(|op| op.view.owners.contains(who)) else {
                return Err(unknown_operation(name));
            };
            if op.view.owners.len() > 1 {
                op.view.owners.retain(|o| o != who);
                op.publish();
                return Ok(());
            }
        }
        match st.ops.get(name) {
            None => Err(unknown_operation(name)),
            Some(op) if op.done_at.is_none() => Ok(()),
            Some(_) => {
                forget(&mut st, name);
                Ok(())
            }
        }
    }

    /// The worker began the task: the operation is EXECUTING.
    pub fn started(&self, worker: u64, task: &str) {
        let mut st = self.state.lock();
        let Some(name) = st.workers.get(&worker).and_then(|w| w.running.get(task)).cloned() else { return };
        if let Some(op) = st.ops.get_mut(&name)
            && op.running.as_ref().is_some_and(|(w, t)| *w == worker && t == task)
        {
            op.view.stages.push(Stage::Executing);
            op.publish();
        }
    }

    /// The worker ended the task. A successful result is written to the
    /// ActionCache before any waiter hears of it, so a client that asks the
    /// cache right after sees it.
    pub async fn finished(&self, worker: u64, task: &str, mut response: ExecuteResponse) {
        let current = {
            let mut st = self.state.lock();
            let Some(w) = st.workers.get_mut(&worker) else { return };
            let Some(name) = w.running.remove(task) else { return };
            w.done += 1;
            let cache_key = match st.ops.get_mut(&name) {
                Some(op) if op.running.as_ref().is_some_and(|(w, t)| *w == worker && t == task) => {
                    op.running = None;
                    let v = &op.view;
                    Some((name, op.cache_key.clone(), v.action_digest, v.instance.clone(), v.worker.clone()))
                }
                _ => None, // cancelled or re-queued meanwhile
            };
            if cache_key.is_none() {
                self.dispatch(&mut st);
            }
            cache_key
        };
        let Some((name, cache_key, action, instance, ran_on)) = current else { return };
        let succeeded = response.status.as_ref().is_none_or(|s| s.code == 0)
            && response.result.as_ref().is_some_and(|r| r.exit_code == 0);
        if let (true, Some(key), Some(result)) = (succeeded, cache_key, response.result.as_ref())
            && let Err(e) = self.results.store(&key, result).await
        {
            tracing::warn!(error = %e, "storing an action result");
        }
        if !succeeded {
            self.keep_failure(&name, action, &instance, ran_on, &mut response).await;
        }
        let mut st = self.state.lock();
        st.counters.executed += 1;
        if !succeeded {
            st.counters.failed += 1;
            if let Some(w) = st.workers.get_mut(&worker) {
                w.failed += 1;
            }
        }
        complete(&mut st, &name, response);
        self.dispatch(&mut st);
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

    /// Periodic upkeep: drops silent workers, expires finished operations and
    /// fails actions that no connected worker can run.
    ///
    /// An action is unmatched while no active worker (connected and not
    /// draining) offers its platform; it fails once that has lasted
    /// `unmatched_timeout`, counted from when it was queued or from when its
    /// queue last had such a worker, whichever is later. So draining or
    /// losing the last worker of a platform gives its queue a whole
    /// `unmatched_timeout` for a replacement, however long it had waited.
    pub fn sweep(&self) {
        let mut st = self.state.lock();
        let now = Instant::now();
        let silent: Vec<u64> = st
            .workers
            .iter()
            .filter(|(_, w)| !w.info.builtin && now.duration_since(w.last_seen) > self.config.keepalive_timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in silent {
            self.drop_worker(&mut st, id, "no keepalive");
        }
        while st.finished.len() > self.config.max_finished
            || st.finished.front().is_some_and(|(t, _)| now.duration_since(*t) > self.config.retention)
        {
            let (_, name) = st.finished.pop_front().expect("checked");
            forget(&mut st, &name);
        }
        self.failed.lock().expire(now);
        let numeric = self.config.numeric_properties.clone();
        let mut stranded = Vec::new();
        let mut matched = Vec::new();
        for (platform, queue) in &st.queues {
            if st.workers.values().any(|w| !w.draining && platform.unmet_by(&w.info.properties, &numeric).is_none()) {
                matched.push(platform.clone());
                continue;
            }
            let since = st.matched_at.get(platform).copied();
            for (_, name) in queue {
                if st.ops.get(name).is_some_and(|op| {
                    let waiting_since = since.map_or(op.queued_since, |m| m.max(op.queued_since));
                    now.duration_since(waiting_since) > self.config.unmatched_timeout
                }) {
                    stranded.push((platform.clone(), name.clone()));
                }
            }
        }
        for platform in matched {
            st.matched_at.insert(platform, now);
        }
        for (platform, name) in stranded {
            if let Some(q) = st.queues.get_mut(&platform) {
                q.retain(|(_, n)| *n != name);
            }
            let message = format!(
                "no connected worker can run this action (platform {platform}) and none came within {}",
                humantime::format_duration(self.config.unmatched_timeout)
            );
            let status = rpc::Status { code: tonic::Code::FailedPrecondition as i32, message, details: Vec::new() };
            st.counters.failed += 1;
            complete(&mut st, &name, ExecuteResponse { status: Some(status), ..Default::default() });
        }
        st.queues.retain(|_, q| !q.is_empty());
        let State { matched_at, queues, .. } = &mut *st;
        matched_at.retain(|p, _| queues.contains_key(p));
        // Actions of dropped workers are queued again: hand them out now.
        self.dispatch(&mut st);
    }

    /// Hands queued actions to free slots: the oldest action any free worker
    /// can run goes first, to the matching worker with the lowest load.
    fn dispatch(&self, st: &mut State) {
        let numeric = &self.config.numeric_properties;
        loop {
            let mut best: Option<(u64, Platform, u64)> = None; // (seq, queue, worker)
            for (platform, queue) in &st.queues {
                let Some((seq, _)) = queue.front() else { continue };
                if best.as_ref().is_some_and(|(s, _, _)| s < seq) {
                    continue;
                }
                let worker = st
                    .workers
                    .iter()
                    .filter(|(_, w)| !w.draining && w.running.len() < w.info.slots)
                    .filter(|(_, w)| platform.unmet_by(&w.info.properties, numeric).is_none())
                    .min_by(|(ia, a), (ib, b)| {
                        let la = a.running.len() as f64 / a.info.slots as f64;
                        let lb = b.running.len() as f64 / b.info.slots as f64;
                        la.total_cmp(&lb).then(a.done.cmp(&b.done)).then(ia.cmp(ib))
                    })
                    .map(|(id, _)| *id);
                if let Some(w) = worker {
                    best = Some((*seq, platform.clone(), w));
                }
            }
            let Some((_, platform, worker)) = best else { return };
            let Some((_, name)) = st.queues.get_mut(&platform).and_then(VecDeque::pop_front) else { return };
            self.assign(st, &name, worker);
        }
    }

    fn assign(&self, st: &mut State, name: &str, worker: u64) {
        let Some(op) = st.ops.get_mut(name) else { return };
        let Some(w) = st.workers.get_mut(&worker) else { return };
        op.attempts += 1;
        let task_id = format!("{}-{}", uuid::Uuid::new_v4().simple(), op.attempts);
        let task = Task {
            id: task_id.clone(),
            instance: op.view.instance.clone(),
            action_digest: op.view.action_digest,
            action: op.checked.action.clone(),
            command: op.checked.command.clone(),
            timeout: op.checked.timeout,
            queued_at: op.view.queued_at,
        };
        if w.tx.send(WorkerCommand::Assign(Arc::new(task))).is_err() {
            // The worker's connection is gone; the next sweep or its own
            // disconnect removes it. Put the action back first.
            op.attempts -= 1;
            let (seq, platform, name) = (op.seq, op.checked.platform.clone(), name.to_string());
            st.workers.remove(&worker);
            enqueue(st, platform, seq, name);
            return;
        }
        w.running.insert(task_id.clone(), name.to_string());
        if let Some(m) = &st.metrics {
            m.dispatched(op.queued_since.elapsed());
        }
        op.running = Some((worker, task_id));
        op.view.worker = Some(w.info.name.clone());
        op.publish();
    }
}

/// NOT_FOUND for an operation that does not exist or is not the caller's:
/// the same words, so a caller learns nothing about other principals' work.
pub fn unknown_operation(name: &str) -> Error {
    Error::not_found(format!("operation {} is unknown or expired", remote_apis::quote(name)))
}

/// Creates an operation: QUEUED, or already finished with `response`.
fn insert_op(
    st: &mut State,
    instance: InstanceName,
    action_digest: Digest,
    checked: Arc<Checked>,
    cache_key: Option<AcKey>,
    response: Option<ExecuteResponse>,
    owner: Principal,
) -> (u64, String, OpWatch) {
    st.next_seq += 1;
    let (seq, name) = (st.next_seq, format!("operations/{}", uuid::Uuid::new_v4()));
    let done = response.is_some();
    let view = OpView {
        name: name.clone(),
        instance,
        action_digest,
        stages: vec![if done { Stage::Completed } else { Stage::Queued }],
        response: response.map(Arc::new),
        worker: None,
        queued_at: SystemTime::now(),
        owners: vec![owner],
    };
    let (tx, rx) = watch::channel(Arc::new(view.clone()));
    let now = Instant::now();
    let entry = OpEntry {
        seq,
        view,
        tx,
        checked,
        cache_key,
        attempts: 0,
        running: None,
        queued_since: now,
        done_at: done.then_some(now),
    };
    st.ops.insert(name.clone(), entry);
    st.order.insert(seq, name.clone());
    if done {
        st.finished.push_back((now, name.clone()));
    }
    (seq, name, rx)
}

/// Inserts by seq, so a re-queued action keeps its place at the front.
fn enqueue(st: &mut State, platform: Platform, seq: u64, name: String) {
    let queue = st.queues.entry(platform).or_default();
    let at = queue.partition_point(|(s, _)| *s < seq);
    queue.insert(at, (seq, name));
}

/// Removes a finished operation (expired, over the cap, or deleted).
fn forget(st: &mut State, name: &str) {
    if let Some(op) = st.ops.get(name)
        && op.done_at.is_some()
    {
        let seq = op.seq;
        st.order.remove(&seq);
        st.ops.remove(name);
    }
}

fn complete(st: &mut State, name: &str, response: ExecuteResponse) {
    match st.ops.get(name) {
        Some(op) if op.done_at.is_none() => st.finished.push_back((Instant::now(), name.to_string())),
        _ => return,
    }
    if let (Some(m), Some(op)) = (&st.metrics, st.ops.get(name)) {
        m.completed(&response, op.attempts > 0);
    }
    let Some(op) = st.ops.get_mut(name) else { return };
    op.view.stages.push(Stage::Completed);
    op.view.response = Some(Arc::new(response));
    op.done_at = Some(Instant::now());
    op.running = None;
    // A finished operation is kept for WaitExecution and listing only: its
    // Action and Command (arguments, environment) need not stay in memory.
    op.checked = Arc::default();
    op.publish();
    if let Some(key) = &op.cache_key
        && st.inflight.get(key).is_some_and(|n| n == name)
    {
        st.inflight.remove(key);
    }
}

mod types;
mod views;
mod workers;

#[cfg(test)]
mod tests;
