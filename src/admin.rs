//! The operator API in `proto/admin.proto`.

use std::time::UNIX_EPOCH;

use tonic::{Request, Response, Status};

use crate::config::Backend;
use crate::store::Store;

pub mod proto {
    tonic::include_proto!("distbuild.admin.v1");
}

use proto::admin_server::Admin;
use proto::{BlobEntry, GetStoreStatusRequest, ListBlobsRequest, ListBlobsResponse, StoreStatus};

pub struct AdminService {
    store: Store,
    backend: Backend,
    data_dir: String,
}

impl AdminService {
    pub fn new(store: Store, backend: Backend, data_dir: String) -> Self {
        AdminService { store, backend, data_dir }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_blobs(&self, request: Request<ListBlobsRequest>) -> Result<Response<ListBlobsResponse>, Status> {
        let limit = match request.get_ref().limit {
            0 => 1000,
            n => n as usize,
        };
        let blobs = self.store.list(limit).await?;
        Ok(Response::new(ListBlobsResponse {
            blobs: blobs
                .into_iter()
                .map(|b| BlobEntry {
                    digest_function: b.digest.function.name().to_string(),
                    hash: b.digest.hash_hex(),
                    size_bytes: b.digest.size as i64,
                    last_access_unix_ms: b
                        .last_access
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_millis() as i64)
                        .unwrap_or(0),
                })
                .collect(),
            total_blobs: self.store.usage().blobs,
        }))
    }

    async fn get_store_status(
        &self,
        _request: Request<GetStoreStatusRequest>,
    ) -> Result<Response<StoreStatus>, Status> {
        let usage = self.store.usage();
        Ok(Response::new(StoreStatus {
            backend: match self.backend {
                Backend::Filesystem => "filesystem",
                Backend::Memory => "memory",
            }
            .to_string(),
            used_bytes: usage.used_bytes,
            max_bytes: usage.max_bytes,
            blobs: usage.blobs,
            data_dir: self.data_dir.clone(),
        }))
    }
}
