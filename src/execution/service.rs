//! The gRPC faces of execution: REAPI Execution and google.longrunning
//! Operations. Thin: parse, call the scheduler, convert.

use remote_apis::quote;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use prost::Message;
use remote_apis::longrunning::operations_server::Operations;
use remote_apis::longrunning::{
    CancelOperationRequest, DeleteOperationRequest, GetOperationRequest, ListOperationsRequest, ListOperationsResponse,
    Operation, WaitOperationRequest, operation,
};
use remote_apis::protobuf::{Any, Empty};
use remote_apis::reapi::execution_server::Execution;
use remote_apis::reapi::execution_stage::Value as Stage;
use remote_apis::reapi::{ExecuteOperationMetadata, ExecuteRequest, WaitExecutionRequest};
use remote_apis::{Digest, DigestFunction, InstanceName};
use tonic::{Request, Response, Status};

use super::scheduler::{OpView, OpWatch, Scheduler, Submission};
use super::validate::{self, Timeouts};
use crate::ac::{AcKey, ActionCacheService};
use crate::error::Error;
use crate::store::Store;

const TYPE_PREFIX: &str = "type.googleapis.com/build.bazel.remote.execution.v2.";
/// ListOperations page size when the client gives none.
const DEFAULT_PAGE: usize = 100;

pub struct ExecutionService {
    cas: Store,
    ac: Arc<ActionCacheService>,
    scheduler: Arc<Scheduler>,
    timeouts: Timeouts,
    directories: crate::worker::DirectoryCache,
    /// An unchanged operation is sent again this often, so proxies and
    /// clients see a live stream.
    keepalive: Duration,
}

impl ExecutionService {
    pub fn new(
        cas: Store,
        ac: Arc<ActionCacheService>,
        scheduler: Arc<Scheduler>,
        timeouts: Timeouts,
        keepalive: Duration,
    ) -> Self {
        let directories = crate::worker::DirectoryCache::new(crate::worker::DIRECTORY_CACHE_ENTRIES);
        ExecutionService { cas, ac, scheduler, timeouts, directories, keepalive }
    }

    /// Everything up to the first Operation: errors here are gRPC statuses.
    async fn start(&self, req: ExecuteRequest) -> Result<OpWatch, Error> {
        let instance = InstanceName::new(&req.instance_name).map_err(|e| Error::bad_field("instance_name", e.0))?;
        let function =
            DigestFunction::from_proto(req.digest_function).map_err(|e| Error::bad_field("digest_function", e.0))?;
        let digest = Digest::from_field(function, req.action_digest.as_ref(), "action_digest")
            .map_err(|e| Error::bad_field("action_digest", e.0))?;
        let action = validate::read_action(&self.cas, &digest).await?;
        let cacheable = !action.do_not_cache;
        let key = AcKey::new(&instance, &digest);
        if cacheable
            && !req.skip_cache_lookup
            && let Some(result) = self.ac.lookup(&key, function).await?
        {
            return Ok(self.scheduler.record_hit(instance, digest, result));
        }
        let checked = validate::check(&self.cas, &self.directories, digest, action, self.timeouts).await?;
        self.scheduler.submit(Submission {
            instance,
            action_digest: digest,
            checked,
            cache_key: cacheable.then_some(key),
        })
    }
}

type OperationStream = Pin<Box<dyn Stream<Item = Result<Operation, Status>> + Send>>;

#[tonic::async_trait]
impl Execution for ExecutionService {
    type ExecuteStream = OperationStream;
    type WaitExecutionStream = OperationStream;

    async fn execute(&self, request: Request<ExecuteRequest>) -> Result<Response<OperationStream>, Status> {
        let watch = self.start(request.into_inner()).await?;
        Ok(Response::new(operation_stream(watch, false, self.keepalive)))
    }

    async fn wait_execution(
        &self,
        request: Request<WaitExecutionRequest>,
    ) -> Result<Response<OperationStream>, Status> {
        let name = request.into_inner().name;
        let Some(watch) = self.scheduler.subscribe(&name) else {
            return Err(
                Error::not_found(format!("operation {} is unknown or expired; execute again", quote(&name))).into()
            );
        };
        Ok(Response::new(operation_stream(watch, true, self.keepalive)))
    }
}

/// The Operations of one operation: one per stage it goes through (from the
/// current one when `from_latest`), the current one again every `keepalive`
/// while nothing changes, and the end after the one that is done.
pub fn operation_stream(watch: OpWatch, from_latest: bool, keepalive: Duration) -> OperationStream {
    struct St {
        watch: OpWatch,
        sent: usize,
        pending: std::collections::VecDeque<Operation>,
        finished: bool,
    }
    let sent = if from_latest { watch.borrow().stages.len().saturating_sub(1) } else { 0 };
    let st = St { watch, sent, pending: Default::default(), finished: false };
    Box::pin(futures::stream::unfold(st, move |mut st| async move {
        loop {
            if let Some(op) = st.pending.pop_front() {
                return Some((Ok(op), st));
            }
            if st.finished {
                return None;
            }
            let view = st.watch.borrow_and_update().clone();
            if view.stages.len() > st.sent {
                for i in st.sent..view.stages.len() {
                    let last = i + 1 == view.stages.len();
                    st.pending.push_back(to_operation(&view, view.stages[i], last));
                }
                st.sent = view.stages.len();
                st.finished = view.done();
                continue;
            }
            match tokio::time::timeout(keepalive, st.watch.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    st.finished = true;
                    let status = Status::not_found(format!("operation {} was deleted", view.name));
                    return Some((Err(status), st));
                }
                Err(_) => st.pending.push_back(to_operation(&view, view.stage(), true)),
            }
        }
    }))
}

/// The google.longrunning form. Problems while running are in the
/// ExecuteResponse's status; `Operation.error` is never used.
pub fn to_operation(view: &OpView, stage: Stage, last: bool) -> Operation {
    let metadata = ExecuteOperationMetadata {
        stage: stage as i32,
        action_digest: Some(view.action_digest.to_proto()),
        digest_function: view.action_digest.function.to_proto() as i32,
        ..Default::default()
    };
    let response = if last { view.response.as_ref() } else { None };
    Operation {
        name: view.name.clone(),
        metadata: Some(any("ExecuteOperationMetadata", &metadata)),
        done: response.is_some(),
        result: response.map(|r| operation::Result::Response(any("ExecuteResponse", r.as_ref()))),
    }
}

fn any(type_name: &str, message: &impl Message) -> Any {
    Any { type_url: format!("{TYPE_PREFIX}{type_name}"), value: message.encode_to_vec() }
}

pub struct OperationsService {
    scheduler: Arc<Scheduler>,
}

impl OperationsService {
    pub fn new(scheduler: Arc<Scheduler>) -> Self {
        OperationsService { scheduler }
    }

    fn current(&self, name: &str) -> Result<Operation, Status> {
        match self.scheduler.get(name) {
            Some(view) => Ok(to_operation(&view, view.stage(), true)),
            None => Err(Error::not_found(format!("operation {} is unknown or expired", quote(name))).into()),
        }
    }
}

#[tonic::async_trait]
impl Operations for OperationsService {
    async fn list_operations(
        &self,
        request: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        let req = request.into_inner();
        let all = self.scheduler.list();
        let start = match req.page_token.as_str() {
            "" => 0,
            token => token.parse::<usize>().map_err(|_| Error::bad_field("page_token", "is not a token we issued"))?,
        };
        let size = if req.page_size > 0 { req.page_size as usize } else { DEFAULT_PAGE };
        let page: Vec<Operation> =
            all.iter().skip(start).take(size).map(|v| to_operation(v, v.stage(), true)).collect();
        let next = start + page.len();
        Ok(Response::new(ListOperationsResponse {
            operations: page,
            next_page_token: if next < all.len() { next.to_string() } else { String::new() },
            unreachable: Vec::new(),
        }))
    }

    async fn get_operation(&self, request: Request<GetOperationRequest>) -> Result<Response<Operation>, Status> {
        self.current(&request.into_inner().name).map(Response::new)
    }

    async fn delete_operation(&self, request: Request<DeleteOperationRequest>) -> Result<Response<Empty>, Status> {
        self.scheduler.delete(&request.into_inner().name)?;
        Ok(Response::new(Empty {}))
    }

    async fn cancel_operation(&self, request: Request<CancelOperationRequest>) -> Result<Response<Empty>, Status> {
        self.scheduler.cancel(&request.into_inner().name)?;
        Ok(Response::new(Empty {}))
    }

    async fn wait_operation(&self, request: Request<WaitOperationRequest>) -> Result<Response<Operation>, Status> {
        let req = request.into_inner();
        let Some(mut watch) = self.scheduler.subscribe(&req.name) else {
            return Err(Error::not_found(format!("operation {} is unknown or expired", quote(&req.name))).into());
        };
        let limit = req
            .timeout
            .map(|t| Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32))
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(60));
        let _ = tokio::time::timeout(limit, watch.wait_for(|v| v.done())).await;
        self.current(&req.name).map(Response::new)
    }
}
