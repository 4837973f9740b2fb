//! What a running operation produces, as this replica can serve it: its
//! live streams ([`LogStreams`]) and the current content of a declared
//! output, asked of the worker that runs it.

use super::*;

/// How long a worker may take to upload a running output.
const OUTPUT_READ_TIMEOUT: Duration = Duration::from_secs(120);

impl Scheduler {
    /// The live streams of this replica's tasks.
    pub fn logs(&self) -> &Arc<LogStreams> {
        &self.logs
    }

    /// `view` with the task whose streams it announces: the running one,
    /// else the last one that had streams here.
    pub(super) fn with_streams(&self, mut view: OpView) -> OpView {
        if view.task.is_none() {
            view.task = self.logs.task_of(&view.name);
        }
        view
    }

    /// Why the streams of `task` are not here, for a NOT_FOUND.
    pub async fn stream_missing(&self, task: &str) -> String {
        let elsewhere = match self.state.workers().await {
            Ok(workers) => {
                workers.into_iter().find(|w| w.replica != self.replica && w.tasks.iter().any(|(t, _)| t == task))
            }
            Err(_) => None,
        };
        match elsewhere {
            Some(w) => format!(
                "the live stream of this action is on server replica {} (its worker {} is connected there), not on \
                 this one ({}); read it there, or wait for the ActionResult",
                w.replica, w.name, self.replica
            ),
            None => format!(
                "no live stream by that name on this server: the action ended more than {} ago (its output is in \
                 the ActionResult: stdout_digest and stderr_digest), or the name is unknown",
                humantime::format_duration(self.config.log_grace)
            ),
        }
    }

    /// The digest of the current content of `path`, a declared output of
    /// the operation `name` of `instance`: asked of the worker running it
    /// (which uploads it to the CAS), or taken from the result of a
    /// finished one. INVALID_ARGUMENT for a path the Command does not
    /// declare; NOT_FOUND for an unknown operation, one not yet running,
    /// a file not written yet, or a worker on another replica.
    pub async fn running_output(&self, instance: &InstanceName, name: &str, path: &str) -> Result<Digest> {
        let op = match self.state.get(name).await? {
            Some(op) if op.instance == instance.as_str() => op,
            _ => return Err(unknown_operation(name)),
        };
        if op.done() {
            return finished_output(&op, path);
        }
        let task = task_of(&op, String::new()).ok_or_else(|| Error::internal("an unreadable operation record"))?;
        if !declares(&task.command, path) {
            return Err(Error::bad_field(
                "resource_name",
                format!("{} is not one of the action's declared outputs", remote_apis::quote(path)),
            ));
        }
        let Some((worker, task)) = op.running.clone() else {
            return Err(Error::not_found(format!("operation {name} is not executing yet")));
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let task_function = |op: &state::OpRecord| {
            op.action_digest.parse::<Digest>().map_or(remote_apis::DigestFunction::Sha256, |d| d.function)
        };
        let function = task_function(&op);
        let request = OutputRequest { task, path: path.to_string(), function, reply };
        if !self.tell_worker(worker, WorkerCommand::ReadOutput(request)) {
            let worker = op.worker.unwrap_or_default();
            return Err(Error::not_found(format!(
                "operation {name} runs on worker {worker}, which is not connected to this server replica ({}); \
                 read its running outputs through the replica it is connected to",
                self.replica
            )));
        }
        match tokio::time::timeout(OUTPUT_READ_TIMEOUT, answer).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(Error::new(
                tonic::Code::Unavailable,
                format!("the worker running operation {name} went away before it answered"),
            )),
            Err(_) => Err(Error::new(
                tonic::Code::DeadlineExceeded,
                format!("the worker running operation {name} did not upload {path:?} within {OUTPUT_READ_TIMEOUT:?}"),
            )),
        }
    }
}

/// Whether the Command declares `path` as an output file or path.
pub fn declares(command: &remote_apis::reapi::Command, path: &str) -> bool {
    #[allow(deprecated)]
    let old = command.output_files.iter().chain(command.output_directories.iter());
    command.output_paths.iter().chain(old).any(|p| p == path)
}

/// The output file `path` of a finished operation's result.
fn finished_output(op: &state::OpRecord, path: &str) -> Result<Digest> {
    let response: Option<ExecuteResponse> = op.response.as_ref().and_then(|b| prost::Message::decode(b.as_ref()).ok());
    let function = op.action_digest.parse::<Digest>().map(|d| d.function).ok();
    let file = response.and_then(|r| r.result).and_then(|r| r.output_files.into_iter().find(|f| f.path == path));
    match (file, function) {
        (Some(f), Some(function)) => Ok(Digest::from_field(function, f.digest.as_ref(), "digest")?),
        _ => Err(Error::not_found(format!(
            "operation {} has finished and its result has no output file {}",
            op.name,
            remote_apis::quote(path)
        ))),
    }
}
