//! Workers as the scheduler sees them: registration (unique names across
//! the cluster, a reconnecting process recognized by its incarnation),
//! keepalives, drains, and what happens to a lost worker's actions.

use super::*;
use crate::execution::state::{NewWorker, Registered};

impl Scheduler {
    /// Adds a worker connected to this replica. Names are unique among
    /// connected workers (of every replica): a name in use is refused
    /// (ALREADY_EXISTS), so no client can evict a worker (the built-in one
    /// included) by taking its name. The one exception is the same worker
    /// process reconnecting, recognized by its `incarnation` (a random value
    /// it never shows; empty means none): its previous stream is dead as far
    /// as it knows, so that entry is replaced at once and its actions
    /// re-queued instead of waiting for the keepalive sweep.
    pub async fn register_worker(
        &self,
        info: WorkerInfo,
        incarnation: &str,
        tx: mpsc::UnboundedSender<WorkerCommand>,
    ) -> Result<u64> {
        let record = NewWorker {
            name: info.name.clone(),
            replica: self.replica.clone(),
            properties: info.properties.pairs().to_vec(),
            slots: info.slots,
            builtin: info.builtin,
            sandbox: info.sandbox.clone(),
            incarnation: incarnation.to_string(),
            now: now_millis(),
        };
        // Twice at most: a reconnecting worker's old entry goes first.
        for _ in 0..2 {
            match self.state.register_worker(record.clone()).await? {
                Registered::Added(id) => {
                    tracing::info!(worker = %info.name, slots = info.slots, properties = %info.properties, "worker connected");
                    self.local.lock().workers.insert(id, LocalWorker { tx });
                    self.dispatch().await;
                    return Ok(id);
                }
                Registered::NameTaken => break,
                Registered::Reconnected { old } => {
                    self.local.lock().workers.remove(&old);
                    self.drop_worker(old, "reconnected").await;
                }
            }
        }
        Err(Error::new(
            tonic::Code::AlreadyExists,
            format!("a connected worker is named {:?}; give each worker its own --name", info.name),
        ))
    }

    /// Drains a worker (it finishes what it runs and is given nothing new)
    /// or puts it back to work, whichever replica it is connected to.
    /// NOT_FOUND when no connected worker has that name. A draining worker
    /// still counts for accepting new actions of its platform, but not for
    /// the unmatched sweep (see [`Scheduler::sweep`]).
    pub async fn set_draining(&self, name: &str, draining: bool) -> Result<()> {
        if self.state.set_draining(name, draining).await?.is_none() {
            return Err(Error::not_found(format!("no connected worker is named {}", remote_apis::quote(name))));
        }
        let state = if draining { "draining" } else { "active" };
        tracing::info!(worker = %name, state, "worker state changed");
        if !draining {
            self.dispatch().await;
        }
        Ok(())
    }

    pub async fn worker_alive(&self, id: u64) {
        if let Err(e) = self.state.touch_worker(id, now_millis()).await {
            tracing::warn!(error = %e, "recording a worker keepalive");
        }
    }

    /// A worker went away: its running actions are queued again (up to the
    /// attempt limit, then they fail with a status saying why).
    pub async fn worker_lost(&self, id: u64, reason: &str) {
        self.local.lock().workers.remove(&id);
        self.drop_worker(id, reason).await;
        self.dispatch().await;
    }

    /// Removes a worker from the state (of any replica); its actions are
    /// re-queued or, out of attempts, failed. Does not dispatch.
    pub(super) async fn drop_worker(&self, id: u64, reason: &str) {
        self.logs.finalize_worker(id);
        let removed = match self.state.remove_worker(id, self.config.max_attempts, now_millis()).await {
            Ok(Some(removed)) => removed,
            Ok(None) => return,
            Err(e) => return tracing::warn!(error = %e, "removing a worker"),
        };
        let worker = &removed.worker.name;
        if removed.requeued.is_empty() && removed.exhausted.is_empty() {
            tracing::info!(worker, reason, "worker gone");
        } else {
            let running = removed.requeued.len() + removed.exhausted.len();
            tracing::warn!(worker, reason, running, "worker lost mid-action");
        }
        for name in &removed.requeued {
            self.refresh(name).await;
        }
        for op in &removed.exhausted {
            let message = format!(
                "worker {worker} was lost ({reason}) while running this action; gave up after {} attempts",
                op.attempts
            );
            let response = status(tonic::Code::Unavailable, message);
            self.finish(&op.name, response, Outcome { executed: false, failed: true }).await;
        }
    }

    /// Periodic upkeep: renews this replica's lease, drops silent workers
    /// and those of replicas whose lease ended, expires finished operations
    /// and fails actions that no connected worker can run.
    ///
    /// An action is unmatched while no active worker (connected and not
    /// draining) offers its platform; it fails once that has lasted
    /// `unmatched_timeout`, counted from when it was queued or from when its
    /// queue last had such a worker, whichever is later. So draining or
    /// losing the last worker of a platform gives its queue a whole
    /// `unmatched_timeout` for a replacement, however long it had waited.
    pub async fn sweep(&self) {
        if let Err(e) = self.sweep_state().await {
            tracing::warn!(error = %e, "scheduler upkeep");
        }
        self.failed.lock().expire(Instant::now());
        self.forget_unwatched().await;
        // Actions of dropped workers are queued again: hand them out now.
        self.dispatch().await;
    }

    async fn sweep_state(&self) -> Result<()> {
        let now = now_millis();
        self.state.refresh_lease(&self.replica, self.lease()).await?;
        let live = self.state.live_replicas().await?;
        let keepalive = self.config.keepalive_timeout;
        for w in self.state.workers().await? {
            let silent = !w.builtin && since(w.last_seen, now) > keepalive;
            if silent {
                self.drop_worker(w.id, "no keepalive").await;
            } else if w.replica != self.replica && !live.contains(&w.replica) {
                self.drop_worker(w.id, "its server replica stopped renewing its lease").await;
            }
        }
        self.state.expire(now).await?;
        self.fail_unmatched(now).await
    }

    /// A replica's lease: a few sweeps, at least the keepalive timeout.
    fn lease(&self) -> Duration {
        self.config.keepalive_timeout.max(Duration::from_secs(3))
    }

    /// A clean stop: this replica's lease ends now and its workers go (their
    /// actions re-queued for the other replicas).
    pub async fn shut_down(&self) {
        let ids: Vec<u64> = self.local.lock().workers.drain().map(|(id, _)| id).collect();
        for id in ids {
            self.drop_worker(id, "the server is stopping").await;
        }
        if let Err(e) = self.state.drop_lease(&self.replica).await {
            tracing::warn!(error = %e, "ending this replica's lease");
        }
    }

    async fn fail_unmatched(&self, now: state::Millis) -> Result<()> {
        let numeric = &self.config.numeric_properties;
        let workers = self.state.workers().await?;
        let queues = self.state.queues().await?;
        let mut stranded = Vec::new();
        {
            let mut local = self.local.lock();
            for queue in &queues {
                let platform = platform_of(&queue.queue);
                let offered = |w: &state::WorkerRecord| Platform::new(w.properties.clone());
                if workers.iter().any(|w| !w.draining && platform.unmet_by(&offered(w), numeric).is_none()) {
                    local.matched_at.insert(queue.queue.clone(), now);
                    continue;
                }
                let matched = local.matched_at.get(&queue.queue).copied();
                for (_, name, queued_since) in &queue.entries {
                    let waiting_since = matched.map_or(*queued_since, |m| m.max(*queued_since));
                    if since(waiting_since, now) > self.config.unmatched_timeout {
                        stranded.push((platform.clone(), name.clone()));
                    }
                }
            }
            local.matched_at.retain(|q, _| queues.iter().any(|r| r.queue == *q));
        }
        for (platform, name) in stranded {
            let message = format!(
                "no connected worker can run this action (platform {platform}) and none came within {}",
                humantime::format_duration(self.config.unmatched_timeout)
            );
            let response = status(tonic::Code::FailedPrecondition, message);
            if self.state.fail_queued(&name, encode_response(&response)).await? {
                self.record_completion(&name, &response).await;
                self.refresh(&name).await;
            }
        }
        Ok(())
    }

    /// Watchers nobody holds any more, and those of operations gone (their
    /// streams end), are dropped.
    async fn forget_unwatched(&self) {
        let names: Vec<String> = {
            let mut local = self.local.lock();
            local.watchers.retain(|_, tx| tx.receiver_count() > 0);
            local.watchers.keys().cloned().collect()
        };
        for name in names {
            self.refresh(&name).await;
        }
    }
}
