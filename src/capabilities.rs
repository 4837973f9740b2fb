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

pub struct CapabilitiesService {
    max_batch_bytes: u64,
    auth: Arc<Auth>,
}

impl CapabilitiesService {
    /// A service that answers everyone; the server adds its policy with
    /// [`CapabilitiesService::with_auth`].
    pub fn new(max_batch_bytes: u64) -> Self {
        CapabilitiesService { max_batch_bytes, auth: Auth::open() }
    }

    pub fn with_auth(self, auth: Arc<Auth>) -> Self {
        CapabilitiesService { auth, ..self }
    }

    /// Cache and execution together: Bazel asks its executor endpoint for
    /// both. The legacy singular `digest_function` is set for old clients.
    fn execution(&self) -> ExecutionCapabilities {
        ExecutionCapabilities {
            digest_function: DigestFunction::Sha256.to_proto() as i32,
            exec_enabled: true,
            execution_priority_capabilities: None,
            supported_node_properties: Vec::new(),
            digest_functions: DigestFunction::ALL.iter().map(|f| f.to_proto() as i32).collect(),
        }
    }

    pub fn capabilities(&self) -> ServerCapabilities {
        let version = |major, minor| SemVer { major, minor, patch: 0, prerelease: String::new() };
        ServerCapabilities {
            cache_capabilities: Some(CacheCapabilities {
                digest_functions: DigestFunction::ALL.iter().map(|f| f.to_proto() as i32).collect(),
                action_cache_update_capabilities: Some(ActionCacheUpdateCapabilities { update_enabled: true }),
                cache_priority_capabilities: None,
                max_batch_total_size_bytes: self.max_batch_bytes as i64,
                symlink_absolute_path_strategy: symlink_absolute_path_strategy::Value::Allowed as i32,
                supported_compressors: vec![compressor::Value::Zstd as i32],
                supported_batch_update_compressors: vec![compressor::Value::Zstd as i32],
                // SplitBlob/GetChunkMapping and SpliceBlob/RegisterChunkMapping.
                split_blob_support: true,
                splice_blob_support: true,
                ..Default::default()
            }),
            execution_capabilities: Some(self.execution()),
            deprecated_api_version: None,
            low_api_version: Some(version(2, 0)),
            high_api_version: Some(version(2, 3)),
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
        // What this caller may do here: a client without ac-write sees a
        // read-only cache (Bazel then uploads no local results), one without
        // execute sees no remote execution, instead of failing on each call.
        let mut caps = self.capabilities();
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
