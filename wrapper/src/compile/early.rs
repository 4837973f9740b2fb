//! cargo's pipelining for a compile that runs remotely: the `.rmeta`
//! reaches cargo while the remote rustc still generates code.
//!
//! The Execute stream announces the operation's stderr stream (REAPI
//! LogStream) once it runs. Its lines are read as they come; at rustc's
//! metadata notification the `.rmeta` is read from the running operation
//! (distbuild's running outputs: ByteStream Read of
//! `{instance}/operations/{id}/outputs/{path}`), put in place with the
//! sidecar, and stderr up to and including the notification goes to cargo,
//! which starts the dependents. The rest comes with the result
//! (`deliver::materialize` with the head delivered). Anything the server
//! does not offer (no stream name, no running outputs) only means the
//! `.rmeta` comes with the result, as before.

use futures::channel::oneshot;
use futures::future::{Either, select};
use remote_apis::reapi::ExecuteResponse;

use super::{Job, Prepared};
use crate::remote::{Running, Server};
use crate::{inputs, local, pipeline};

/// Whether cargo pipelines this compile: it asks for the `.rmeta` and the
/// library in one run, with artifact notifications on stderr.
pub(super) fn pipelined(job: &Job<'_>) -> bool {
    let c = job.c;
    let emits = |k: &str| c.emit.iter().any(|e| e == k);
    let notifies = c.args.iter().any(|a| {
        a.flag.as_deref() == Some("--json")
            && a.value.as_deref().is_some_and(|v| v.split(',').any(|k| k == "artifacts"))
    });
    emits("metadata") && emits("link") && notifies
}

/// Executes the Action; for a pipelined compile, hands cargo the `.rmeta`
/// as soon as the remote rustc wrote it. The flag says whether it did:
/// stderr up to the notification has then been printed, and whatever
/// follows must not print it again.
pub(super) async fn execute<S: Server>(
    remote: &S,
    job: &Job<'_>,
    p: &Prepared,
) -> (Result<ExecuteResponse, tonic::Status>, bool) {
    let digest = p.built.action_digest;
    let timeout = job.settings.queue_timeout;
    let rmeta = p.built.command.output_paths.iter().find(|o| o.ends_with(".rmeta"));
    let Some(rmeta) = rmeta.filter(|_| pipelined(job)) else {
        return (remote.execute(digest, timeout).await, false);
    };
    let (tx, rx) = oneshot::channel();
    let exec = std::pin::pin!(remote.execute_live(digest, timeout, tx));
    let early = std::pin::pin!(deliver(remote, job, p, rx, rmeta));
    match select(exec, early).await {
        // The result came first: it carries everything. `deliver` prints
        // only at its very end, with no await after, so dropping it here
        // never leaves half a head printed.
        Either::Left((result, _)) => (result, false),
        Either::Right((delivered, exec)) => (exec.await, delivered),
    }
}

/// Follows the live stderr to the metadata notification, then puts the
/// running operation's `.rmeta` in place and prints the head. False when
/// any step is not offered or fails (nothing printed then).
async fn deliver<S: Server>(
    remote: &S,
    job: &Job<'_>,
    p: &Prepared,
    running: oneshot::Receiver<Running>,
    rmeta_path: &str,
) -> bool {
    let Ok(running) = running.await else { return false };
    let mut live = pipeline::LiveLines::default();
    let mut head = Vec::new();
    let mut seen = false;
    let read = remote
        .read_live(&running.stderr_stream, &mut |chunk| {
            live.feed(chunk, &mut |line| {
                if !seen {
                    head.extend_from_slice(line.bytes);
                    seen = line.metadata;
                }
            });
            !seen
        })
        .await;
    if read.is_err() || !seen {
        return false;
    }
    job.trace.phase("metadata notification seen");
    let Ok(bytes) = remote.read_running_output(&running.operation, rmeta_path).await else { return false };
    let outputs = p.local_outputs(job.c);
    let Some(dest) = pipeline::rmeta_of(&outputs) else { return false };
    if local::write_atomic(dest, &bytes).is_err() {
        return false;
    }
    inputs::write_sidecar(job.c, &p.out_dir, &p.closure);
    job.console.stderr(&pipeline::localize_all(&head, &outputs));
    job.trace.phase(&format!("rmeta of {} delivered early", job.c.crate_name));
    pipeline::test_pause(&job.c.crate_name);
    true
}
