//! The operator API in `proto/admin.proto`.

use std::time::UNIX_EPOCH;

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::execution::Scheduler;

use crate::auth::{Auth, Grant};
use crate::store::{Scrub, Store};

pub mod proto {
    tonic::include_proto!("distbuild.admin.v1");
}

use proto::admin_server::Admin;
use proto::{
    BlobEntry, GetSchedulerStatusRequest, GetStoreStatusRequest, ListBlobsRequest, ListBlobsResponse,
    ListWorkersRequest, ListWorkersResponse, QueueEntry, SchedulerStatus, SetWorkerDrainingRequest, StoreStatus,
    VerifyBlobsRequest, VerifyBlobsResponse, WorkerEntry,
};

pub struct AdminService {
    store: Store,
    /// The backend's scrub: an admin-only call, beside the store trait.
    scrub: Arc<dyn Scrub>,
    /// What the CAS store is ("filesystem", "memory", or a named store's
    /// type and name).
    backend: String,
    data_dir: String,
    scheduler: Arc<Scheduler>,
    auth: Arc<Auth>,
}

impl AdminService {
    pub fn new(
        store: Store,
        scrub: Arc<dyn Scrub>,
        backend: String,
        data_dir: String,
        scheduler: Arc<Scheduler>,
    ) -> Self {
        AdminService { store, scrub, backend, data_dir, scheduler, auth: Auth::open() }
    }

    /// The server's policy (the default allows every call).
    pub fn with_auth(self, auth: Arc<Auth>) -> Self {
        AdminService { auth, ..self }
    }

    /// Every admin call needs the admin grant on all instances (prefix ""):
    /// blobs, workers and the scheduler are shared by every instance.
    fn check<T>(&self, request: &Request<T>) -> Result<(), Status> {
        self.auth.context(request, &remote_apis::InstanceName::default(), None, Grant::Admin)?;
        Ok(())
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_blobs(&self, request: Request<ListBlobsRequest>) -> Result<Response<ListBlobsResponse>, Status> {
        self.check(&request)?;
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

    async fn get_store_status(&self, request: Request<GetStoreStatusRequest>) -> Result<Response<StoreStatus>, Status> {
        self.check(&request)?;
        let usage = self.store.usage();
        Ok(Response::new(StoreStatus {
            backend: self.backend.clone(),
            used_bytes: usage.used_bytes,
            max_bytes: usage.max_bytes,
            blobs: usage.blobs,
            data_dir: self.data_dir.clone(),
        }))
    }

    async fn verify_blobs(
        &self,
        request: Request<VerifyBlobsRequest>,
    ) -> Result<Response<VerifyBlobsResponse>, Status> {
        self.check(&request)?;
        let report = self.scrub.scrub().await?;
        tracing::info!(?report, "store verified");
        Ok(Response::new(VerifyBlobsResponse {
            intact: report.intact,
            intact_bytes: report.bytes,
            corrupt: report.corrupt,
            vanished: report.vanished,
            unreadable: report.unreadable,
        }))
    }

    async fn list_workers(
        &self,
        request: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        self.check(&request)?;
        let workers = self.scheduler.status().await?.workers.into_iter().map(worker_entry).collect();
        Ok(Response::new(ListWorkersResponse { workers }))
    }

    async fn set_worker_draining(
        &self,
        request: Request<SetWorkerDrainingRequest>,
    ) -> Result<Response<WorkerEntry>, Status> {
        self.check(&request)?;
        let SetWorkerDrainingRequest { name, draining } = request.into_inner();
        self.scheduler.set_draining(&name, draining).await?;
        let worker = self.scheduler.status().await?.workers.into_iter().find(|w| w.info.name == name);
        // Gone between the two calls: it takes no work either way.
        let entry = worker.map(worker_entry).unwrap_or(WorkerEntry { name, draining, ..Default::default() });
        Ok(Response::new(entry))
    }

    async fn get_scheduler_status(
        &self,
        request: Request<GetSchedulerStatusRequest>,
    ) -> Result<Response<SchedulerStatus>, Status> {
        self.check(&request)?;
        let s = self.scheduler.status().await?;
        let c = s.counters;
        Ok(Response::new(SchedulerStatus {
            queues: s.queues.iter().map(|(p, n)| QueueEntry { platform: p.to_string(), length: *n as u64 }).collect(),
            running: s.running as u64,
            workers: s.workers.len() as u32,
            slots: s.workers.iter().map(|w| w.info.slots as u32).sum(),
            busy_slots: s.workers.iter().map(|w| w.busy as u32).sum(),
            cache_hits: c.cache_hits,
            cache_misses: c.cache_misses,
            merged: c.merged,
            executed: c.executed,
            failed: c.failed,
            requeued: c.requeued,
            cancelled: c.cancelled,
            operations: s.operations as u64,
        }))
    }
}

fn worker_entry(w: crate::execution::scheduler::WorkerView) -> WorkerEntry {
    WorkerEntry {
        name: w.info.name,
        properties: w
            .info
            .properties
            .pairs()
            .iter()
            .map(|(k, v)| proto::Property { name: k.clone(), value: v.clone() })
            .collect(),
        slots: w.info.slots as u32,
        busy: w.busy as u32,
        done: w.done,
        builtin: w.info.builtin,
        connected_secs: w.connected_for.as_secs(),
        sandbox: w.info.sandbox,
        draining: w.draining,
        replica: w.replica,
    }
}
