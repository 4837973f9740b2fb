//! Capabilities: what this server really does, so clients can rely on it.

use remote_apis::DigestFunction;
use remote_apis::reapi::capabilities_server::Capabilities;
use remote_apis::reapi::{
    ActionCacheUpdateCapabilities, CacheCapabilities, ExecutionCapabilities, GetCapabilitiesRequest,
    ServerCapabilities, compressor, symlink_absolute_path_strategy,
};
use remote_apis::semver::SemVer;
use tonic::{Request, Response, Status};

use std::sync::Arc;

use crate::auth::{Auth, Grant};
use crate::error::Error;

/// The REAPI versions this server implements, lowest and highest. What each
/// minor version asks of a server (from the remote-apis history) and where
/// it is done here:
///
/// - 2.1: `Command.output_paths` (beside the 2.0 fields), `output_symlinks`:
///   worker/outputs.rs.
/// - 2.2: the platform in `Action.platform`, the Command's as a fallback:
///   execution/validate.rs.
/// - 2.3: `arguments[0]` looked up in the Command's own PATH (the runners'
///   `resolve_program`); the virtual execution duration is optional.
/// - 2.4: GetCapabilities without method-specific errors; the Tree
///   topological-order hint is optional (not set).
/// - 2.5-2.7: SHA256TREE and brotli values (not served, refused by name),
///   partial ExecutedActionMetadata (optional), `digest_functions` lists in
///   both capabilities with the legacy singular field kept, and a
///   `digest_function` on every request: remote-apis/src/digest.rs and the
///   request context (the instance's default when unset).
/// - 2.8: `output_directory_format`: a worker SHOULD treat what it does not
///   serve as TREE_ONLY, which is what ours produces.
/// - 2.9: inline hints on ExecuteRequest (hints; results are not inlined).
/// - 2.10: digest functions in the Remote Asset API (the asset service).
/// - 2.11: `ExecuteOperationMetadata.digest_function` always set:
///   execution/service.rs `to_operation`.
/// - 2.12: `max_cas_blob_size_bytes` (advertised from the store's budget;
///   a larger upload is INVALID_ARGUMENT, store/memory.rs `check_fits`),
///   SplitBlob/SpliceBlob with `chunking_function` (UNKNOWN accepted,
///   cas/chunks.rs), the optional ByteStream routing header.
///
/// We stop at 2.12, the newest released version. The `bazel-remote-apis`
/// crate already carries 2.13 drafts (GetChunkMapping and
/// RegisterChunkMapping replace SplitBlob/SpliceBlob); the server answers
/// those calls too, but advertising an unreleased version would promise
/// behaviour not yet fixed by the spec.
pub const LOW_API_VERSION: (i32, i32) = (2, 0);
pub const HIGH_API_VERSION: (i32, i32) = (2, 12);

pub struct CapabilitiesService {
    max_batch_bytes: u64,
    max_blob_bytes: u64,
    auth: Arc<Auth>,
}

impl CapabilitiesService {
    /// A service that answers everyone; the server adds its policy with
    /// [`CapabilitiesService::with_auth`]. `max_blob_bytes` is the largest
    /// blob the store can hold (its budget), advertised as
    /// `max_cas_blob_size_bytes`.
    pub fn new(max_batch_bytes: u64, max_blob_bytes: u64) -> Self {
        CapabilitiesService { max_batch_bytes, max_blob_bytes, auth: Auth::open() }
    }

    pub fn with_auth(self, auth: Arc<Auth>) -> Self {
        CapabilitiesService { auth, ..self }
    }

    /// Cache and execution together: Bazel and Buck2 ask their executor
    /// endpoint for both. `default` (the instance's function for requests
    /// that name none) comes first in the lists and is the legacy singular
    /// `digest_function`, which old clients use as the only one.
    pub fn capabilities(&self, default: DigestFunction) -> ServerCapabilities {
        let version = |(major, minor)| SemVer { major, minor, patch: 0, prerelease: String::new() };
        let functions: Vec<i32> = std::iter::once(default)
            .chain(DigestFunction::ALL.into_iter().filter(|f| *f != default))
            .map(|f| f.to_proto() as i32)
            .collect();
        ServerCapabilities {
            cache_capabilities: Some(CacheCapabilities {
                digest_functions: functions.clone(),
                action_cache_update_capabilities: Some(ActionCacheUpdateCapabilities { update_enabled: true }),
                cache_priority_capabilities: None,
                max_batch_total_size_bytes: self.max_batch_bytes as i64,
                symlink_absolute_path_strategy: symlink_absolute_path_strategy::Value::Allowed as i32,
                supported_compressors: vec![compressor::Value::Zstd as i32],
                supported_batch_update_compressors: vec![compressor::Value::Zstd as i32],
                max_cas_blob_size_bytes: i64::try_from(self.max_blob_bytes).unwrap_or(i64::MAX),
                // SplitBlob/GetChunkMapping and SpliceBlob/RegisterChunkMapping.
                split_blob_support: true,
                splice_blob_support: true,
                ..Default::default()
            }),
            execution_capabilities: Some(ExecutionCapabilities {
                digest_function: default.to_proto() as i32,
                exec_enabled: true,
                execution_priority_capabilities: None,
                supported_node_properties: Vec::new(),
                digest_functions: functions,
            }),
            deprecated_api_version: None,
            low_api_version: Some(version(LOW_API_VERSION)),
            high_api_version: Some(version(HIGH_API_VERSION)),
        }
    }
}

#[tonic::async_trait]
impl Capabilities for CapabilitiesService {
    async fn get_capabilities(
        &self,
        request: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<ServerCapabilities>, Status> {
        let instance = remote_apis::InstanceName::new(&request.get_ref().instance_name)
            .map_err(|e| Error::bad_field("instance_name", e.0))?;
        let ctx = self.auth.context(&request, &instance, None, Grant::CasRead)?;
        // What this caller may do on this instance: a client without ac-write sees a
        // read-only cache (Bazel then uploads no local results), one without
        // execute sees no remote execution, instead of failing on each call.
        // `ac-write` never holds where `[instances] ac_write = false`.
        let mut caps = self.capabilities(ctx.settings.digest_function);
        if let Some(cache) = caps.cache_capabilities.as_mut() {
            cache.action_cache_update_capabilities =
                Some(ActionCacheUpdateCapabilities { update_enabled: ctx.allows(Grant::AcWrite) });
        }
        if let Some(exec) = caps.execution_capabilities.as_mut() {
            exec.exec_enabled = ctx.allows(Grant::Execute);
        }
        Ok(Response::new(caps))
    }
}
