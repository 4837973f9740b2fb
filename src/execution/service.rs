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
use remote_apis::{Digest, InstanceName};
use tonic::{Request, Response, Status};

use super::scheduler::{OpView, OpWatch, Scheduler, Submission, unknown_operation};
use super::validate::{self, Timeouts};
use crate::ac::{AcKey, ActionResults};
use crate::auth::{Auth, Caller, FunctionField, Grant, Principal, RequestContext};
use crate::error::Error;
use crate::store::Store;

const TYPE_PREFIX: &str = "type.googleapis.com/build.bazel.remote.execution.v2.";
/// ListOperations page size when the client gives none.
const DEFAULT_PAGE: usize = 100;

pub struct ExecutionService {
    cas: Store,
    results: Arc<dyn ActionResults>,
    scheduler: Arc<Scheduler>,
    timeouts: Timeouts,
    directories: crate::worker::DirectoryCache,
    /// An unchanged operation is sent again this often, so proxies and
    /// clients see a live stream.
    keepalive: Duration,
    auth: Arc<Auth>,
}

impl ExecutionService {
    pub fn new(
        cas: Store,
        results: Arc<dyn ActionResults>,
        scheduler: Arc<Scheduler>,
        timeouts: Timeouts,
        keepalive: Duration,
    ) -> Self {
        let directories = crate::worker::DirectoryCache::new(crate::worker::DIRECTORY_CACHE_ENTRIES);
        ExecutionService { cas, results, scheduler, timeouts, directories, keepalive, auth: Auth::open() }
    }

    /// The server's policy (the default allows every call).
    pub fn with_auth(self, auth: Arc<Auth>) -> Self {
        ExecutionService { auth, ..self }
    }

    /// Parses the header and checks the `execute` grant; the digest
    /// function is the request's, else the instance's default.
    fn authorize(&self, request: &Request<ExecuteRequest>) -> Result<RequestContext, Error> {
        let req = request.get_ref();
        let instance = InstanceName::new(&req.instance_name).map_err(|e| Error::bad_field("instance_name", e.0))?;
        self.auth.context(request, &instance, FunctionField::Proto(req.digest_function), Grant::Execute)
    }

    /// Everything up to the first Operation: errors here are gRPC statuses.
    /// The server stores the result in the ActionCache itself, whatever the
    /// caller's grants (`ac-write` guards only clients' own writes).
    async fn start(&self, ctx: RequestContext, req: ExecuteRequest) -> Result<OpWatch, Error> {
        let function = ctx.function();
        let RequestContext { instance, principal, settings, .. } = ctx;
        let digest = Digest::from_field(function, req.action_digest.as_ref(), "action_digest")
            .map_err(|e| Error::bad_field("action_digest", e.0))?;
        let action = validate::read_action(&self.cas, &digest).await?;
        let cacheable = !action.do_not_cache;
        let key = AcKey::new(&instance, &digest);
        if cacheable
            && !req.skip_cache_lookup
            && let Some(result) = self.results.lookup(&key, function).await?
        {
            return self.scheduler.record_hit(instance, digest, result, principal).await;
        }
        let checked =
            validate::check(&self.cas, &self.directories, digest, action, self.timeouts, &settings.platform).await?;
        self.scheduler
            .submit(Submission {
                instance,
                action_digest: digest,
                checked,
                cache_key: cacheable.then_some(key),
                owner: principal,
            })
            .await
    }
}

type OperationStream = Pin<Box<dyn Stream<Item = Result<Operation, Status>> + Send>>;

#[tonic::async_trait]
impl Execution for ExecutionService {
    type ExecuteStream = OperationStream;
    type WaitExecutionStream = OperationStream;

    async fn execute(&self, request: Request<ExecuteRequest>) -> Result<Response<OperationStream>, Status> {
        let ctx = self.authorize(&request)?;
        let watch = self.start(ctx, request.into_inner()).await?;
        Ok(Response::new(operation_stream(watch, false, self.keepalive)))
    }

    async fn wait_execution(
        &self,
        request: Request<WaitExecutionRequest>,
    ) -> Result<Response<OperationStream>, Status> {
        let caller = operations_caller(&self.auth, &request)?;
        let name = request.into_inner().name;
        let visible = self.scheduler.get(&name).await?.is_some_and(|v| may_see(&caller, &v));
        let Some(watch) = self.scheduler.subscribe(&name).await?.filter(|_| visible) else {
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
    let mut metadata = ExecuteOperationMetadata {
        stage: stage as i32,
        action_digest: Some(view.action_digest.to_proto()),
        digest_function: view.action_digest.function.to_proto() as i32,
        ..Default::default()
    };
    if let (Stage::Executing | Stage::Completed, Some(task)) = (stage, &view.task) {
        use remote_apis::logstream::{StreamKind, stream_name};
        metadata.stdout_stream_name = stream_name(&view.instance, task, StreamKind::Stdout);
        metadata.stderr_stream_name = stream_name(&view.instance, task, StreamKind::Stderr);
    }
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

/// The caller of a call that names an operation or none: it must hold
/// `execute` (its own operations) or `admin` (everyone's) somewhere; which
/// operations it may touch is [`may_see`].
fn operations_caller<T>(auth: &Auth, request: &Request<T>) -> Result<Caller, Error> {
    let caller = auth.caller(request)?;
    caller.require_somewhere(&[Grant::Execute, Grant::Admin])?;
    Ok(caller)
}

/// An operation is visible to an admin of its instance and to its owners
/// while they hold `execute` there; to anyone else it does not exist.
fn may_see(caller: &Caller, view: &OpView) -> bool {
    caller.allows(&view.instance, Grant::Admin)
        || (view.owners.contains(&caller.principal) && caller.allows(&view.instance, Grant::Execute))
}

pub struct OperationsService {
    scheduler: Arc<Scheduler>,
    auth: Arc<Auth>,
}

impl OperationsService {
    /// A service that allows every call; the server adds its policy with
    /// [`OperationsService::with_auth`].
    pub fn new(scheduler: Arc<Scheduler>) -> Self {
        OperationsService { scheduler, auth: Auth::open() }
    }

    pub fn with_auth(self, auth: Arc<Auth>) -> Self {
        OperationsService { auth, ..self }
    }

    async fn current(&self, caller: &Caller, name: &str) -> Result<Operation, Status> {
        match self.scheduler.get(name).await?.filter(|v| may_see(caller, v)) {
            Some(view) => Ok(to_operation(&view, view.stage(), true)),
            None => Err(unknown_operation(name).into()),
        }
    }

    /// Who `caller` acts as on operation `name`: `None` for an admin of its
    /// instance (acts on the operation itself), its principal for an owner.
    async fn acting_as(&self, caller: &Caller, name: &str) -> Result<Option<Principal>, Status> {
        match self.scheduler.get(name).await?.filter(|v| may_see(caller, v)) {
            Some(view) if caller.allows(&view.instance, Grant::Admin) => Ok(None),
            Some(_) => Ok(Some(caller.principal.clone())),
            None => Err(unknown_operation(name).into()),
        }
    }
}

#[tonic::async_trait]
impl Operations for OperationsService {
    async fn list_operations(
        &self,
        request: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        let caller = operations_caller(&self.auth, &request)?;
        let req = request.into_inner();
        let all: Vec<OpView> = self.scheduler.list().await?.into_iter().filter(|v| may_see(&caller, v)).collect();
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
        let caller = operations_caller(&self.auth, &request)?;
        self.current(&caller, &request.into_inner().name).await.map(Response::new)
    }

    async fn delete_operation(&self, request: Request<DeleteOperationRequest>) -> Result<Response<Empty>, Status> {
        let caller = operations_caller(&self.auth, &request)?;
        let name = request.into_inner().name;
        let by = self.acting_as(&caller, &name).await?;
        self.scheduler.delete(&name, by.as_ref()).await?;
        Ok(Response::new(Empty {}))
    }

    async fn cancel_operation(&self, request: Request<CancelOperationRequest>) -> Result<Response<Empty>, Status> {
        let caller = operations_caller(&self.auth, &request)?;
        let name = request.into_inner().name;
        let by = self.acting_as(&caller, &name).await?;
        self.scheduler.cancel(&name, by.as_ref()).await?;
        Ok(Response::new(Empty {}))
    }

    async fn wait_operation(&self, request: Request<WaitOperationRequest>) -> Result<Response<Operation>, Status> {
        let caller = operations_caller(&self.auth, &request)?;
        let req = request.into_inner();
        self.current(&caller, &req.name).await?;
        let Some(mut watch) = self.scheduler.subscribe(&req.name).await? else {
            return Err(unknown_operation(&req.name).into());
        };
        let limit = req
            .timeout
            .map(|t| Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32))
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(60));
        let _ = tokio::time::timeout(limit, watch.wait_for(|v| v.done())).await;
        self.current(&caller, &req.name).await.map(Response::new)
    }
}
