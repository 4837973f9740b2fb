//! The server's own execution slots: an [`Executor`] on the server's store,
//! registered with the scheduler like any worker but without a network hop.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Executor, OutputSink};
use crate::execution::logstream::LogStreams;
use crate::execution::scheduler::{Scheduler, WorkerCommand, WorkerInfo};

/// A built-in task's output goes straight into the scheduler's streams.
struct Streams {
    logs: Arc<LogStreams>,
    worker: u64,
    task: String,
}

impl OutputSink for Streams {
    fn output(&self, stdout: bytes::Bytes, stderr: bytes::Bytes) {
        self.logs.append(self.worker, &self.task, &stdout, &stderr);
    }
}

/// Registers the built-in worker and serves it until `stop` is cancelled.
/// Running actions are cancelled on stop, and this returns once they have
/// ended (process groups killed, directories removed), or after 10 s.
pub async fn run(scheduler: Arc<Scheduler>, executor: Arc<Executor>, info: WorkerInfo, stop: CancellationToken) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    // The built-in worker registers first and never reconnects: it has no
    // incarnation, so no connection can take its name.
    let id = match scheduler.register_worker(info, "", tx).await {
        Ok(id) => id,
        Err(e) => {
            tracing::error!(error = %e, "the built-in worker could not register");
            return;
        }
    };
    let running: Arc<Mutex<HashMap<String, CancellationToken>>> = Arc::default();
    loop {
        let command = tokio::select! {
            c = rx.recv() => c,
            () = stop.cancelled() => None,
        };
        match command {
            Some(WorkerCommand::Assign(task)) => {
                let cancel = stop.child_token();
                running.lock().insert(task.id.clone(), cancel.clone());
                let (scheduler, executor, running) = (scheduler.clone(), executor.clone(), running.clone());
                tokio::spawn(async move {
                    let sink = Streams { logs: scheduler.logs().clone(), worker: id, task: task.id.clone() };
                    let started = || scheduler.started(id, &task.id);
                    let response = executor.execute(&task, started, &sink, cancel).await;
                    running.lock().remove(&task.id);
                    scheduler.finished(id, &task.id, response).await;
                });
            }
            Some(WorkerCommand::ReadOutput(request)) => {
                let executor = executor.clone();
                tokio::spawn(async move {
                    let answer = executor.read_running_output(&request.task, &request.path).await;
                    let _ = request.reply.send(answer);
                });
            }
            Some(WorkerCommand::Cancel(task)) => {
                if let Some(token) = running.lock().get(&task) {
                    token.cancel();
                }
            }
            None => break,
        }
    }
    scheduler.worker_lost(id, "the server is stopping").await;
    super::drain(&running).await;
}
