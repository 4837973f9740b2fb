//! Read-only views of the (cluster-wide) state: `scheduler status`,
//! `workers list`, the status pages and the metrics read these.

use super::*;

impl Scheduler {
    pub async fn status(&self) -> Result<Status> {
        let now = now_millis();
        let workers = self.state.workers().await?;
        let ops = self.state.list().await?;
        let mut queues: Vec<(Platform, usize)> = self
            .state
            .queues()
            .await?
            .into_iter()
            .map(|q| (platform_of(&q.queue), q.entries.len()))
            .filter(|(_, n)| *n > 0)
            .collect();
        queues.sort();
        let mut views: Vec<WorkerView> = workers
            .into_iter()
            .map(|w| WorkerView {
                busy: w.tasks.len(),
                done: w.done,
                failed: w.failed,
                last_seen: if w.builtin { Duration::ZERO } else { since(w.last_seen, now) },
                connected_for: since(w.connected_at, now),
                draining: w.draining,
                replica: w.replica,
                info: WorkerInfo {
                    name: w.name,
                    properties: Platform::new(w.properties),
                    slots: w.slots,
                    builtin: w.builtin,
                    sandbox: w.sandbox,
                },
            })
            .collect();
        views.sort_by(|a, b| a.info.name.cmp(&b.info.name));
        Ok(Status {
            queues,
            running: ops.iter().filter(|op| op.running.is_some()).count(),
            operations: ops.len(),
            workers: views,
            counters: self.state.counters().await?,
        })
    }

    /// The non-empty queues, each with its length and when its oldest entry
    /// was submitted (the front one: queues are in submission order), for
    /// the status page.
    pub async fn queues(&self) -> Result<Vec<QueueView>> {
        let mut out = Vec::new();
        for q in self.state.queues().await? {
            let Some((_, front, since)) = q.entries.first() else { continue };
            let oldest = match self.state.get(front).await? {
                Some(op) => op.queued_at,
                None => *since,
            };
            out.push(QueueView { platform: platform_of(&q.queue), len: q.entries.len(), oldest: to_time(oldest) });
        }
        out.sort_by(|a, b| a.platform.cmp(&b.platform));
        Ok(out)
    }

    /// The status and queues as of the last [`Scheduler::take_snapshot`],
    /// for readers that cannot wait (the metrics collector).
    pub fn snapshot(&self) -> Arc<(Status, Vec<QueueView>)> {
        self.snapshot.lock().clone()
    }

    /// Reads the status and queues for [`Scheduler::snapshot`].
    pub async fn take_snapshot(&self) {
        match (self.status().await, self.queues().await) {
            (Ok(status), Ok(queues)) => *self.snapshot.lock() = Arc::new((status, queues)),
            (Err(e), _) | (_, Err(e)) => tracing::warn!(error = %e, "reading the scheduler status"),
        }
    }

    /// Follows the change feed for as long as the scheduler lives: operations
    /// changed by other replicas reach the watchers here, new work is
    /// claimed for the workers here, and cancels of tasks running here are
    /// passed on. Only needed when the state is shared.
    pub fn follow(self: &Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut feed = self.state.subscribe_changes();
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let change = tokio::select! {
                    c = feed.recv() => c,
                    () = stop.cancelled() => return,
                };
                let Some(this) = this.upgrade() else { return };
                match change {
                    Ok(change) => this.apply(change).await,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => this.apply(state::Change::Resync).await,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }

    async fn apply(&self, change: state::Change) {
        match change {
            state::Change::Op(name) => self.refresh(&name).await,
            state::Change::Queue => self.dispatch().await,
            state::Change::Cancel { worker, task } => {
                self.tell_worker(worker, WorkerCommand::Cancel(task));
            }
            // Claims read the flag from the state: nothing to do here.
            state::Change::Drain { .. } => {}
            state::Change::Resync => {
                let names: Vec<String> = self.local.lock().watchers.keys().cloned().collect();
                for name in names {
                    self.refresh(&name).await;
                }
                self.dispatch().await;
            }
        }
    }
}
