//! Workers as the scheduler sees them: registration (unique names, a
//! reconnecting process recognized by its incarnation), keepalives, drains,
//! and what happens to a lost worker's actions.

use super::*;

impl Scheduler {
    /// Adds a worker. Names are unique among connected workers: a name in
    /// use is refused (ALREADY_EXISTS), so no client can evict a worker (the
    /// built-in one included) by taking its name. The one exception is the
    /// same worker process reconnecting, recognized by its `incarnation` (a
    /// random value it never shows; empty means none): its previous stream
    /// is dead as far as it knows, so that entry is replaced at once and its
    /// actions re-queued instead of waiting for the keepalive sweep.
    pub fn register_worker(
        &self,
        info: WorkerInfo,
        incarnation: &str,
        tx: mpsc::UnboundedSender<WorkerCommand>,
    ) -> Result<u64> {
        let mut st = self.state.lock();
        if let Some((&old, entry)) = st.workers.iter().find(|(_, w)| w.info.name == info.name) {
            if incarnation.is_empty() || entry.incarnation != incarnation {
                return Err(Error::new(
                    tonic::Code::AlreadyExists,
                    format!("a connected worker is named {:?}; give each worker its own --name", info.name),
                ));
            }
            self.drop_worker(&mut st, old, "reconnected");
        }
        st.next_worker += 1;
        let id = st.next_worker;
        tracing::info!(worker = %info.name, slots = info.slots, properties = %info.properties, "worker connected");
        let now = Instant::now();
        let entry = WorkerEntry {
            info,
            incarnation: incarnation.to_string(),
            tx,
            running: HashMap::new(),
            done: 0,
            failed: 0,
            last_seen: now,
            connected_at: now,
            draining: false,
        };
        st.workers.insert(id, entry);
        self.dispatch(&mut st);
        Ok(id)
    }

    /// Drains a worker (it finishes what it runs and is given nothing new)
    /// or puts it back to work. NOT_FOUND when no connected worker has that
    /// name. A draining worker still counts for accepting new actions of
    /// its platform, but not for the unmatched sweep (see
    /// [`Scheduler::sweep`]).
    pub fn set_draining(&self, name: &str, draining: bool) -> Result<()> {
        let mut st = self.state.lock();
        let Some(w) = st.workers.values_mut().find(|w| w.info.name == name) else {
            return Err(Error::not_found(format!("no connected worker is named {}", remote_apis::quote(name))));
        };
        if w.draining != draining {
            w.draining = draining;
            let state = if draining { "draining" } else { "active" };
            tracing::info!(worker = %w.info.name, running = w.running.len(), state, "worker state changed");
        }
        if !draining {
            self.dispatch(&mut st);
        }
        Ok(())
    }

    pub fn worker_alive(&self, id: u64) {
        if let Some(w) = self.state.lock().workers.get_mut(&id) {
            w.last_seen = Instant::now();
        }
    }

    /// A worker went away: its running actions are queued again (up to the
    /// attempt limit, then they fail with a status saying why).
    pub fn worker_lost(&self, id: u64, reason: &str) {
        let mut st = self.state.lock();
        self.drop_worker(&mut st, id, reason);
        self.dispatch(&mut st);
    }

    pub(super) fn drop_worker(&self, st: &mut State, id: u64, reason: &str) {
        let Some(worker) = st.workers.remove(&id) else { return };
        if worker.running.is_empty() {
            tracing::info!(worker = %worker.info.name, reason, "worker gone");
        } else {
            tracing::warn!(worker = %worker.info.name, reason, running = worker.running.len(), "worker lost mid-action");
        }
        for (task, name) in worker.running {
            let Some(op) = st.ops.get_mut(&name) else { continue };
            if op.running.as_ref() != Some(&(id, task)) {
                continue;
            }
            op.running = None;
            op.view.worker = None;
            if op.attempts >= self.config.max_attempts {
                let message = format!(
                    "worker {} was lost ({reason}) while running this action; gave up after {} attempts",
                    worker.info.name, op.attempts
                );
                let status = rpc::Status { code: tonic::Code::Unavailable as i32, message, details: Vec::new() };
                st.counters.failed += 1;
                complete(st, &name, ExecuteResponse { status: Some(status), ..Default::default() });
            } else {
                op.view.stages.push(Stage::Queued);
                op.queued_since = Instant::now();
                op.publish();
                let (seq, platform) = (op.seq, op.checked.platform.clone());
                st.counters.requeued += 1;
                enqueue(st, platform, seq, name);
            }
        }
    }
}
