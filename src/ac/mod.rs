//! ActionCache: results per instance, returned only when complete (the
//! policy lives in [`complete::CompleteResults`]; the gRPC service here is
//! a thin adapter over [`ActionResults`]).

pub mod complete;
pub mod store;

use std::sync::Arc;

use remote_apis::reapi::action_cache_server::ActionCache;
use remote_apis::reapi::{ActionResult, GetActionResultRequest, UpdateActionResultRequest};
use remote_apis::{Digest, DigestFunction};
use tonic::{Request, Response, Status};

pub use complete::{ActionResults, CompleteResults};
pub use store::{AcKey, AcOrigin, AcStore, FsAcStore, MemoryAcStore};

use crate::auth::{Auth, Grant};
use crate::cas::parse_header;
use crate::error::{Error, Result};
use crate::store::Store;

/// stdout/stderr up to this size are inlined when the client asks.
const INLINE_LIMIT: u64 = 1 << 20;
/// The REAPI ActionCache over [`ActionResults`]: parses, authorizes,
/// inlines small outputs, counts hits.
pub struct ActionCacheService {
    results: Arc<dyn ActionResults>,
    cas: Store,
    auth: Arc<Auth>,
    metrics: Option<crate::metrics::AcMetrics>,
}

impl ActionCacheService {
    /// A service that allows every call; the server adds its policy with
    /// [`ActionCacheService::with_auth`]. `cas` is where inlined outputs are
    /// read from.
    pub fn new(results: Arc<dyn ActionResults>, cas: Store) -> Self {
        ActionCacheService { results, cas, auth: Auth::open(), metrics: None }
    }

    pub fn with_auth(self, auth: Arc<Auth>) -> Self {
        ActionCacheService { auth, ..self }
    }

    /// Counts GetActionResult hits and misses in `metrics`.
    pub fn with_metrics(self, metrics: Option<crate::metrics::AcMetrics>) -> Self {
        ActionCacheService { metrics, ..self }
    }

    async fn inline(
        &self,
        result: &mut ActionResult,
        req: &GetActionResultRequest,
        function: DigestFunction,
    ) -> Result<()> {
        if req.inline_stdout && result.stdout_raw.is_empty() {
            result.stdout_raw = self.small_blob(function, result.stdout_digest.as_ref()).await?;
        }
        if req.inline_stderr && result.stderr_raw.is_empty() {
            result.stderr_raw = self.small_blob(function, result.stderr_digest.as_ref()).await?;
        }
        for file in &mut result.output_files {
            if req.inline_output_files.contains(&file.path) && file.contents.is_empty() {
                file.contents = self.small_blob(function, file.digest.as_ref()).await?;
            }
        }
        Ok(())
    }

    async fn small_blob(&self, function: DigestFunction, d: Option<&remote_apis::reapi::Digest>) -> Result<Vec<u8>> {
        let Some(d) = d else { return Ok(Vec::new()) };
        let digest = Digest::from_proto(function, d)?;
        if digest.size == 0 || digest.size > INLINE_LIMIT {
            return Ok(Vec::new());
        }
        Ok(self.cas.get_bytes(&digest).await?.into())
    }
}

/// Every digest in a result a client wants stored must parse.
fn validate(function: DigestFunction, result: &ActionResult) -> Result<()> {
    let check = |d: Option<&remote_apis::reapi::Digest>, field: &str| -> Result<()> {
        match d {
            Some(d) => Digest::from_proto(function, d).map(|_| ()).map_err(|e| Error::bad_field(field, e.0)),
            None => Ok(()),
        }
    };
    for (i, f) in result.output_files.iter().enumerate() {
        check(f.digest.as_ref(), &format!("action_result.output_files[{i}].digest"))?;
        if f.path.is_empty() {
            return Err(Error::bad_field(&format!("action_result.output_files[{i}].path"), "is empty"));
        }
    }
    for (i, d) in result.output_directories.iter().enumerate() {
        check(d.tree_digest.as_ref(), &format!("action_result.output_directories[{i}].tree_digest"))?;
    }
    check(result.stdout_digest.as_ref(), "action_result.stdout_digest")?;
    check(result.stderr_digest.as_ref(), "action_result.stderr_digest")?;
    Ok(())
}

#[tonic::async_trait]
impl ActionCache for ActionCacheService {
    async fn get_action_result(
        &self,
        request: Request<GetActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        let (instance, function) = parse_header(&request.get_ref().instance_name, request.get_ref().digest_function)?;
        let function = self.auth.context(&request, &instance, function, Grant::AcRead)?.function();
        let req = request.into_inner();
        let action = Digest::from_field(function, req.action_digest.as_ref(), "action_digest")
            .map_err(|e| Error::bad_field("action_digest", e.0))?;
        let key = AcKey::new(&instance, &action);
        let found = self.results.lookup(&key, function).await?;
        if let Some(m) = &self.metrics {
            if found.is_some() { m.hit() } else { m.miss() }
        }
        let Some(mut result) = found else {
            return Err(Error::not_found(format!("no complete action result for {action}")).into());
        };
        self.inline(&mut result, &req, function).await?;
        Ok(Response::new(result))
    }

    async fn update_action_result(
        &self,
        request: Request<UpdateActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        // PERMISSION_DENIED on an `ac_write = false` instance (the context
        // checks it): Buck2 reads exactly that code as "read-only cache".
        let (instance, function) = parse_header(&request.get_ref().instance_name, request.get_ref().digest_function)?;
        let function = self.auth.context(&request, &instance, function, Grant::AcWrite)?.function();
        let req = request.into_inner();
        let action = Digest::from_field(function, req.action_digest.as_ref(), "action_digest")
            .map_err(|e| Error::bad_field("action_digest", e.0))?;
        let result = req.action_result.ok_or_else(|| Error::bad_field("action_result", "is missing"))?;
        validate(function, &result)?;
        self.results.store(&AcKey::new(&instance, &action), &result).await?;
        Ok(Response::new(result))
    }
}
