//! Read-only views of the scheduler's state: `scheduler status`, `workers
//! list`, the status pages and the metrics read these.

use super::*;

impl Scheduler {
    pub fn status(&self) -> Status {
        let st = self.state.lock();
        let mut queues: Vec<(Platform, usize)> =
            st.queues.iter().filter(|(_, q)| !q.is_empty()).map(|(p, q)| (p.clone(), q.len())).collect();
        queues.sort();
        let mut workers: Vec<WorkerView> = st
            .workers
            .values()
            .map(|w| WorkerView {
                info: w.info.clone(),
                busy: w.running.len(),
                done: w.done,
                failed: w.failed,
                last_seen: if w.info.builtin { Duration::ZERO } else { w.last_seen.elapsed() },
                connected_for: w.connected_at.elapsed(),
                draining: w.draining,
            })
            .collect();
        workers.sort_by(|a, b| a.info.name.cmp(&b.info.name));
        Status {
            queues,
            running: st.ops.values().filter(|op| op.running.is_some()).count(),
            operations: st.ops.len(),
            workers,
            counters: st.counters,
        }
    }

    /// The non-empty queues, each with its length and when its oldest entry
    /// was submitted (the front one: queues are in submission order), for
    /// the status page.
    pub fn queues(&self) -> Vec<QueueView> {
        let st = self.state.lock();
        let mut out: Vec<QueueView> = st
            .queues
            .iter()
            .filter_map(|(p, q)| {
                let (_, front) = q.front()?;
                let oldest = st.ops.get(front).map_or_else(SystemTime::now, |op| op.view.queued_at);
                Some(QueueView { platform: p.clone(), len: q.len(), oldest })
            })
            .collect();
        out.sort_by(|a, b| a.platform.cmp(&b.platform));
        out
    }
}
