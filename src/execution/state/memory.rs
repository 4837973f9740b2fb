//! Scheduler state in this process: the default, one replica. The change
//! feed is a tokio broadcast.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use remote_apis::reapi::execution_stage::Value as Stage;
use tokio::sync::broadcast;

use super::*;

#[derive(Default)]
struct Inner {
    ops: HashMap<String, OpRecord>,
    /// Creation order, for listing.
    order: BTreeMap<u64, String>,
    /// Merge key -> the operation in flight for it.
    inflight: HashMap<String, String>,
    /// Queue key -> (seq -> operation name).
    queues: HashMap<String, BTreeMap<u64, String>>,
    workers: HashMap<u64, WorkerRecord>,
    /// Finished operations in the order they finished.
    finished: VecDeque<(Millis, String)>,
    next_seq: u64,
    next_worker: u64,
    counters: Counters,
}

/// [`SchedulerState`] in memory, behind one lock that no await crosses.
pub struct MemoryState {
    inner: Mutex<Inner>,
    retention: Retention,
    feed: broadcast::Sender<Change>,
}

impl MemoryState {
    pub fn new(retention: Retention) -> Self {
        MemoryState { inner: Mutex::default(), retention, feed: broadcast::channel(FEED_CAPACITY).0 }
    }

    fn tell(&self, change: Change) {
        // No receiver is fine: nobody watches.
        let _ = self.feed.send(change);
    }
}

fn new_record(st: &mut Inner, op: NewOp, response: Option<Bytes>) -> OpRecord {
    st.next_seq += 1;
    let done = response.is_some();
    OpRecord {
        name: format!("operations/{}", uuid::Uuid::new_v4()),
        seq: st.next_seq,
        instance: op.instance,
        action_digest: op.action_digest,
        queue: op.queue,
        spec: if done { Bytes::new() } else { op.spec },
        merge_key: op.merge_key,
        owners: vec![op.owner],
        stages: vec![if done { Stage::Completed } else { Stage::Queued } as i32],
        response,
        worker: None,
        attempts: 0,
        running: None,
        queued_at: op.now,
        queued_since: op.now,
        done_at: done.then_some(op.now),
    }
}

/// Finishes `name` if not done: the one place an operation ends.
fn finish(st: &mut Inner, name: &str, response: Bytes, now: Millis) -> bool {
    let Some(op) = st.ops.get_mut(name).filter(|op| !op.done()) else { return false };
    op.stages.push(Stage::Completed as i32);
    op.response = Some(response);
    op.done_at = Some(now);
    op.running = None;
    op.spec = Bytes::new();
    if let Some(key) = &op.merge_key
        && st.inflight.get(key).is_some_and(|n| n == name)
    {
        st.inflight.remove(key);
    }
    st.finished.push_back((now, name.to_string()));
    true
}

fn unqueue(st: &mut Inner, queue: &str, seq: u64) -> bool {
    let Some(q) = st.queues.get_mut(queue) else { return false };
    let found = q.remove(&seq).is_some();
    if q.is_empty() {
        st.queues.remove(queue);
    }
    found
}

/// Whether `by` may act on `op`, and whether it only detaches itself.
enum Access {
    Denied,
    Detach,
    Whole,
}

fn access(op: &OpRecord, by: Option<&str>) -> Access {
    match by {
        None => Access::Whole,
        Some(who) if !op.owners.iter().any(|o| o == who) => Access::Denied,
        Some(_) if op.owners.len() > 1 => Access::Detach,
        Some(_) => Access::Whole,
    }
}

fn detach(op: &mut OpRecord, by: Option<&str>) {
    op.owners.retain(|o| Some(o.as_str()) != by);
}

#[async_trait]
impl SchedulerState for MemoryState {
    async fn submit(&self, op: NewOp) -> Result<Submitted> {
        let mut st = self.inner.lock();
        if let Some(key) = &op.merge_key
            && let Some(name) = st.inflight.get(key).cloned()
            && let Some(existing) = st.ops.get_mut(&name)
        {
            let joined = !existing.owners.contains(&op.owner);
            if joined {
                existing.owners.push(op.owner);
            }
            st.counters.merged += 1;
            drop(st);
            if joined {
                self.tell(Change::Op(name.clone()));
            }
            return Ok(Submitted::Joined(name));
        }
        let record = new_record(&mut st, op, None);
        let name = record.name.clone();
        if let Some(key) = &record.merge_key {
            st.inflight.insert(key.clone(), name.clone());
        }
        st.queues.entry(record.queue.clone()).or_default().insert(record.seq, name.clone());
        st.order.insert(record.seq, name.clone());
        st.ops.insert(name.clone(), record);
        st.counters.cache_misses += 1;
        drop(st);
        self.tell(Change::Queue);
        Ok(Submitted::Created(name))
    }

    async fn insert_finished(&self, op: NewOp, response: Bytes) -> Result<String> {
        let mut st = self.inner.lock();
        let record = new_record(&mut st, op, Some(response));
        let name = record.name.clone();
        st.finished.push_back((record.queued_at, name.clone()));
        st.order.insert(record.seq, name.clone());
        st.ops.insert(name.clone(), record);
        st.counters.cache_hits += 1;
        Ok(name)
    }

    async fn get(&self, name: &str) -> Result<Option<OpRecord>> {
        Ok(self.inner.lock().ops.get(name).cloned())
    }

    async fn list(&self) -> Result<Vec<OpRecord>> {
        let st = self.inner.lock();
        Ok(st.order.values().filter_map(|n| st.ops.get(n)).cloned().collect())
    }

    async fn claim(&self, worker: u64, task: &str, queues: &[String]) -> Result<Option<OpRecord>> {
        let mut st = self.inner.lock();
        let Some(w) = st.workers.get(&worker) else { return Ok(None) };
        if w.draining || w.tasks.len() >= w.slots {
            return Ok(None);
        }
        let wname = w.name.clone();
        let oldest = queues
            .iter()
            .filter_map(|q| st.queues.get(q).and_then(|m| m.first_key_value()).map(|(s, n)| (*s, q.clone(), n.clone())))
            .min();
        let Some((seq, queue, name)) = oldest else { return Ok(None) };
        unqueue(&mut st, &queue, seq);
        let op = st.ops.get_mut(&name).expect("queued operations exist");
        op.attempts += 1;
        op.running = Some((worker, task.to_string()));
        op.worker = Some(wname);
        let claimed = op.clone();
        st.workers.get_mut(&worker).expect("checked").tasks.push((task.to_string(), name.clone()));
        drop(st);
        self.tell(Change::Op(name));
        Ok(Some(claimed))
    }

    async fn started(&self, worker: u64, task: &str) -> Result<()> {
        let mut st = self.inner.lock();
        let Some(name) = current_op(&st, worker, task) else { return Ok(()) };
        st.ops.get_mut(&name).expect("current").stages.push(Stage::Executing as i32);
        drop(st);
        self.tell(Change::Op(name));
        Ok(())
    }

    async fn take_task(&self, worker: u64, task: &str, succeeded: bool) -> Result<Option<OpRecord>> {
        let mut st = self.inner.lock();
        let current = current_op(&st, worker, task);
        let Some(w) = st.workers.get_mut(&worker) else { return Ok(None) };
        let before = w.tasks.len();
        w.tasks.retain(|(t, _)| t != task);
        if w.tasks.len() == before {
            return Ok(None);
        }
        w.done += 1;
        w.failed += u64::from(!succeeded);
        let taken = current.map(|name| {
            let op = st.ops.get_mut(&name).expect("current");
            op.running = None;
            op.clone()
        });
        drop(st);
        self.tell(Change::Queue);
        Ok(taken)
    }

    async fn complete(&self, name: &str, response: Bytes, outcome: Outcome) -> Result<bool> {
        let mut st = self.inner.lock();
        if !finish(&mut st, name, response, now_millis()) {
            return Ok(false);
        }
        st.counters.executed += u64::from(outcome.executed);
        st.counters.failed += u64::from(outcome.failed);
        drop(st);
        self.tell(Change::Op(name.to_string()));
        Ok(true)
    }

    async fn fail_queued(&self, name: &str, response: Bytes) -> Result<bool> {
        let mut st = self.inner.lock();
        let Some((queue, seq)) = st.ops.get(name).map(|op| (op.queue.clone(), op.seq)) else { return Ok(false) };
        if !unqueue(&mut st, &queue, seq) {
            return Ok(false);
        }
        finish(&mut st, name, response, now_millis());
        st.counters.failed += 1;
        drop(st);
        self.tell(Change::Op(name.to_string()));
        Ok(true)
    }

    async fn cancel(&self, name: &str, by: Option<&str>, response: Bytes) -> Result<Cancelled> {
        let mut st = self.inner.lock();
        let Some(op) = st.ops.get_mut(name) else { return Ok(Cancelled::Unknown) };
        match access(op, by) {
            Access::Denied => return Ok(Cancelled::Unknown),
            Access::Detach => {
                detach(op, by);
                drop(st);
                self.tell(Change::Op(name.to_string()));
                return Ok(Cancelled::Detached);
            }
            Access::Whole if op.done() => return Ok(Cancelled::AlreadyDone),
            Access::Whole => {}
        }
        let (running, queue, seq) = (op.running.clone(), op.queue.clone(), op.seq);
        if running.is_none() {
            unqueue(&mut st, &queue, seq);
        }
        finish(&mut st, name, response, now_millis());
        st.counters.cancelled += 1;
        drop(st);
        if let Some((worker, task)) = &running {
            self.tell(Change::Cancel { worker: *worker, task: task.clone() });
        }
        self.tell(Change::Op(name.to_string()));
        Ok(Cancelled::Cancelled { running })
    }

    async fn delete(&self, name: &str, by: Option<&str>) -> Result<Deleted> {
        let mut st = self.inner.lock();
        let Some(op) = st.ops.get_mut(name) else { return Ok(Deleted::Unknown) };
        match access(op, by) {
            Access::Denied => Ok(Deleted::Unknown),
            Access::Detach => {
                detach(op, by);
                drop(st);
                self.tell(Change::Op(name.to_string()));
                Ok(Deleted::Detached)
            }
            Access::Whole if !op.done() => Ok(Deleted::StillRunning),
            Access::Whole => {
                let seq = op.seq;
                st.order.remove(&seq);
                st.ops.remove(name);
                Ok(Deleted::Deleted)
            }
        }
    }

    async fn expire(&self, now: Millis) -> Result<usize> {
        let mut st = self.inner.lock();
        let keep = self.retention.retention.as_millis() as u64;
        let mut gone = 0;
        while st.finished.len() > self.retention.max_finished
            || st.finished.front().is_some_and(|(t, _)| now.saturating_sub(*t) > keep)
        {
            let (_, name) = st.finished.pop_front().expect("checked");
            if let Some(op) = st.ops.remove(&name) {
                st.order.remove(&op.seq);
                gone += 1;
            }
        }
        Ok(gone)
    }

    async fn register_worker(&self, worker: NewWorker) -> Result<Registered> {
        let mut st = self.inner.lock();
        if let Some(old) = st.workers.values().find(|w| w.name == worker.name) {
            if worker.incarnation.is_empty() || old.incarnation != worker.incarnation {
                return Ok(Registered::NameTaken);
            }
            return Ok(Registered::Reconnected { old: old.id });
        }
        st.next_worker += 1;
        let id = st.next_worker;
        let record = WorkerRecord {
            id,
            name: worker.name,
            replica: worker.replica,
            properties: worker.properties,
            slots: worker.slots,
            builtin: worker.builtin,
            sandbox: worker.sandbox,
            incarnation: worker.incarnation,
            draining: false,
            last_seen: worker.now,
            connected_at: worker.now,
            done: 0,
            failed: 0,
            tasks: Vec::new(),
        };
        st.workers.insert(id, record);
        drop(st);
        self.tell(Change::Queue);
        Ok(Registered::Added(id))
    }

    async fn touch_worker(&self, id: u64, now: Millis) -> Result<()> {
        if let Some(w) = self.inner.lock().workers.get_mut(&id) {
            w.last_seen = now;
        }
        Ok(())
    }

    async fn set_draining(&self, name: &str, draining: bool) -> Result<Option<u64>> {
        let mut st = self.inner.lock();
        let Some(w) = st.workers.values_mut().find(|w| w.name == name) else { return Ok(None) };
        w.draining = draining;
        let id = w.id;
        drop(st);
        self.tell(Change::Drain { worker: id, draining });
        if !draining {
            self.tell(Change::Queue);
        }
        Ok(Some(id))
    }

    async fn remove_worker(&self, id: u64, max_attempts: u32, now: Millis) -> Result<Option<Removed>> {
        let mut st = self.inner.lock();
        let Some(worker) = st.workers.remove(&id) else { return Ok(None) };
        let (mut requeued, mut exhausted, mut changed) = (Vec::new(), Vec::new(), Vec::new());
        for (task, name) in &worker.tasks {
            let Some(op) = st.ops.get_mut(name) else { continue };
            if op.running.as_ref() != Some(&(id, task.clone())) {
                continue;
            }
            op.running = None;
            op.worker = None;
            changed.push(name.clone());
            if op.attempts >= max_attempts {
                exhausted.push(op.clone());
                continue;
            }
            op.stages.push(Stage::Queued as i32);
            op.queued_since = now;
            let (queue, seq) = (op.queue.clone(), op.seq);
            st.queues.entry(queue).or_default().insert(seq, name.clone());
            st.counters.requeued += 1;
            requeued.push(name.clone());
        }
        drop(st);
        for name in changed {
            self.tell(Change::Op(name));
        }
        self.tell(Change::Queue);
        Ok(Some(Removed { worker, requeued, exhausted }))
    }

    async fn workers(&self) -> Result<Vec<WorkerRecord>> {
        Ok(self.inner.lock().workers.values().cloned().collect())
    }

    async fn queues(&self) -> Result<Vec<QueueRecord>> {
        let st = self.inner.lock();
        let record = |(queue, q): (&String, &BTreeMap<u64, String>)| QueueRecord {
            queue: queue.clone(),
            entries: q
                .iter()
                .map(|(seq, name)| (*seq, name.clone(), st.ops.get(name).map_or(0, |op| op.queued_since)))
                .collect(),
        };
        Ok(st.queues.iter().map(record).collect())
    }

    async fn fronts(&self) -> Result<Vec<(String, u64)>> {
        let st = self.inner.lock();
        Ok(st.queues.iter().filter_map(|(q, m)| m.first_key_value().map(|(seq, _)| (q.clone(), *seq))).collect())
    }

    async fn counters(&self) -> Result<Counters> {
        Ok(self.inner.lock().counters)
    }

    async fn refresh_lease(&self, _replica: &str, _ttl: Duration) -> Result<()> {
        Ok(())
    }

    async fn drop_lease(&self, _replica: &str) -> Result<()> {
        Ok(())
    }

    /// One process, one replica: every worker's replica is this one.
    async fn live_replicas(&self) -> Result<HashSet<String>> {
        Ok(self.inner.lock().workers.values().map(|w| w.replica.clone()).collect())
    }

    fn subscribe_changes(&self) -> broadcast::Receiver<Change> {
        self.feed.subscribe()
    }
}

/// The operation `task` on `worker` is the current task of, if any.
fn current_op(st: &Inner, worker: u64, task: &str) -> Option<String> {
    let w = st.workers.get(&worker)?;
    let (_, name) = w.tasks.iter().find(|(t, _)| t == task)?;
    let op = st.ops.get(name)?;
    op.running.as_ref().is_some_and(|(w, t)| *w == worker && t == task).then(|| name.clone())
}
