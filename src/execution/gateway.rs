//! The scheduler's side of `proto/worker.proto`: one bidirectional stream per
//! remote worker. The stream's end (or keepalive silence, see
//! [`Scheduler::sweep`]) means the worker is gone and its actions re-queue.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use futures::{Stream, StreamExt};
use prost::Message;
use remote_apis::reapi::ExecuteResponse;
use remote_apis::{Digest, DigestFunction};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::platform::Platform;
use super::scheduler::{Scheduler, WorkerCommand, WorkerInfo};
use crate::auth::{Auth, Grant};
use crate::error::Error;

pub mod proto {
    tonic::include_proto!("distbuild.worker.v1");
}

use proto::worker_gateway_server::WorkerGateway;
use proto::{SchedulerMessage, WorkerMessage, scheduler_message, worker_message};

pub struct GatewayService {
    scheduler: Arc<Scheduler>,
    keepalive_interval: Duration,
    /// Cancelled when the server shuts down: every worker stream ends, so
    /// workers reconnect to the next server instead of holding this one open.
    closing: CancellationToken,
    auth: Arc<Auth>,
}

impl GatewayService {
    /// A gateway that admits every worker; the server adds its policy with
    /// [`GatewayService::with_auth`].
    pub fn new(scheduler: Arc<Scheduler>, keepalive_interval: Duration, closing: CancellationToken) -> Self {
        GatewayService { scheduler, keepalive_interval, closing, auth: Auth::open() }
    }

    pub fn with_auth(self, auth: Arc<Auth>) -> Self {
        GatewayService { auth, ..self }
    }
}

/// Longest worker name: names are shown in `workers list`, quoted in
/// errors and recorded in every ExecutedActionMetadata.
const MAX_NAME_LEN: usize = 256;

type Outbound = Pin<Box<dyn Stream<Item = Result<SchedulerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl WorkerGateway for GatewayService {
    type SessionStream = Outbound;

    async fn session(&self, request: Request<Streaming<WorkerMessage>>) -> Result<Response<Outbound>, Status> {
        // A worker receives every instance's actions and its results are
        // cached: it needs the worker grant on all instances (prefix "").
        self.auth.context(&request, &remote_apis::InstanceName::default(), None, Grant::Worker)?;
        let peer = crate::server::peer::remote_addr(request.extensions()).map(|a| a.to_string()).unwrap_or_default();
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(WorkerMessage { message: Some(worker_message::Message::Hello(h)) }) => h,
            _ => return Err(Error::invalid("the first message of a worker must be Hello").into()),
        };
        if hello.slots == 0 {
            return Err(Error::bad_field("hello.slots", "must be at least 1").into());
        }
        if hello.name.len() > MAX_NAME_LEN {
            return Err(Error::bad_field("hello.name", format!("longer than {MAX_NAME_LEN} bytes")).into());
        }
        let name = if hello.name.is_empty() { format!("worker@{peer}") } else { hello.name };
        let info = WorkerInfo {
            name: name.clone(),
            properties: Platform::new(hello.properties.into_iter().map(|p| (p.name, p.value)).collect()),
            slots: hello.slots as usize,
            builtin: false,
            sandbox: hello.sandbox.chars().take(MAX_NAME_LEN).collect(),
        };
        let (tx, rx) = mpsc::unbounded_channel::<WorkerCommand>();
        let pending = Pending::default();
        // A name in use is refused: no connection evicts another worker.
        let id = self.scheduler.register_worker(info, &hello.incarnation, tx).await?;
        let scheduler = self.scheduler.clone();
        let closing = self.closing.clone();
        let answers = pending.clone();
        tokio::spawn(async move {
            let reason = loop {
                let next = tokio::select! {
                    m = inbound.message() => m,
                    () = closing.cancelled() => break "the server is shutting down".to_string(),
                };
                match next {
                    Ok(Some(msg)) => {
                        scheduler.worker_alive(id).await;
                        if let Err(e) = handle(&scheduler, id, &name, &answers, msg).await {
                            break e;
                        }
                    }
                    Ok(None) => break "the worker closed its stream".to_string(),
                    Err(e) => break format!("stream error: {}", e.message()),
                }
            };
            scheduler.worker_lost(id, &reason).await;
        });
        let welcome = SchedulerMessage {
            message: Some(scheduler_message::Message::Welcome(proto::Welcome {
                keepalive_interval_ms: self.keepalive_interval.as_millis() as u64,
            })),
        };
        let commands = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(move |c| Ok(to_proto(c, &pending)));
        let closing = self.closing.clone().cancelled_owned();
        let stream = futures::stream::once(async { Ok(welcome) }).chain(commands).take_until(closing);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Output reads sent to one worker and not answered yet, by request id.
/// Dropped with the session: a waiting reader then hears the worker is gone.
#[derive(Clone, Default)]
struct Pending(Arc<parking_lot::Mutex<(u64, HashMap<u64, Reply>)>>);

type Reply = (DigestFunction, oneshot::Sender<crate::error::Result<Digest>>);

impl Pending {
    fn add(&self, reply: Reply) -> u64 {
        let mut p = self.0.lock();
        p.0 += 1;
        let id = p.0;
        p.1.insert(id, reply);
        id
    }

    fn answer(&self, answer: proto::OutputRead) {
        let Some((function, reply)) = self.0.lock().1.remove(&answer.request_id) else { return };
        let result = if answer.code != 0 {
            Err(Error::new(tonic::Code::from_i32(answer.code), answer.message))
        } else {
            remote_apis::reapi::Digest::decode(answer.digest.as_slice())
                .map_err(|e| Error::internal(format!("the worker sent an undecodable digest: {e}")))
                .and_then(|d| Digest::from_proto(function, &d).map_err(Error::from))
        };
        let _ = reply.send(result);
    }
}

async fn handle(
    scheduler: &Arc<Scheduler>,
    id: u64,
    name: &str,
    pending: &Pending,
    msg: WorkerMessage,
) -> Result<(), String> {
    match msg.message {
        Some(worker_message::Message::Output(o)) => scheduler.logs().append(id, &o.task_id, &o.stdout, &o.stderr),
        Some(worker_message::Message::OutputRead(r)) => pending.answer(r),
        Some(worker_message::Message::Keepalive(_)) => {}
        Some(worker_message::Message::Started(s)) => scheduler.started(id, &s.task_id),
        Some(worker_message::Message::Finished(f)) => {
            let response = ExecuteResponse::decode(f.execute_response.as_slice())
                .map_err(|e| format!("undecodable ExecuteResponse: {e}"))?;
            scheduler.finished(id, &f.task_id, response).await;
        }
        // A worker shutting down (SIGTERM) asks for nothing new. Its name is
        // its own while this stream lives (names are unique), so this
        // cannot touch another worker.
        Some(worker_message::Message::Drain(d)) => {
            scheduler.set_draining(name, d.draining).await.map_err(|e| e.to_string())?;
        }
        Some(worker_message::Message::Hello(_)) => return Err("a second Hello".into()),
        None => return Err("an empty message".into()),
    }
    Ok(())
}

fn to_proto(command: WorkerCommand, pending: &Pending) -> SchedulerMessage {
    let message = match command {
        WorkerCommand::Assign(task) => scheduler_message::Message::Assign(proto::Assign {
            task_id: task.id.clone(),
            instance_name: task.instance.to_string(),
            digest_function: task.action_digest.function.to_proto() as i32,
            action_digest: task.action_digest.to_proto().encode_to_vec(),
            action: task.action.encode_to_vec(),
            command: task.command.encode_to_vec(),
            timeout_ms: task.timeout.as_millis() as u64,
            queued_unix_ms: task.queued_at.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as i64,
        }),
        WorkerCommand::Cancel(task_id) => scheduler_message::Message::Cancel(proto::Cancel { task_id }),
        WorkerCommand::ReadOutput(r) => scheduler_message::Message::ReadOutput(proto::ReadOutput {
            request_id: pending.add((r.function, r.reply)),
            task_id: r.task,
            path: r.path,
        }),
    };
    SchedulerMessage { message: Some(message) }
}
