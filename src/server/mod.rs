//! Wires the services, storage and lifecycle together.
//!
//! [`run`] takes a bound listener and a shutdown future (the caller binds,
//! so tests bind port 0 in-process). Shutdown order: stop accepting, let
//! in-flight calls finish within the grace period, then drop storage (which
//! removes temporary files of unfinished uploads).

mod listener;
pub mod peer;
mod request_log;
pub mod tls;

pub use listener::{Conn, ConnectionLimits, incoming};

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use remote_apis::asset::fetch_server::FetchServer;
use remote_apis::asset::push_server::PushServer;
use remote_apis::bytestream::byte_stream_server::ByteStreamServer;
use remote_apis::longrunning::operations_server::OperationsServer;
use remote_apis::reapi::action_cache_server::ActionCacheServer;
use remote_apis::reapi::capabilities_server::CapabilitiesServer;
use remote_apis::reapi::content_addressable_storage_server::ContentAddressableStorageServer;
use remote_apis::reapi::execution_server::ExecutionServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;

use crate::ac::{AcStore, ActionCacheService, ActionResults, CompleteResults};
use crate::admin::AdminService;
use crate::admin::proto::admin_server::AdminServer;
use crate::asset::AssetService;
use crate::capabilities::CapabilitiesService;
use crate::cas::{ByteStreamService, CasService};
use crate::config::{Backend, Config, IMPLICIT_CAS};
use crate::execution::gateway::GatewayService;
use crate::execution::gateway::proto::worker_gateway_server::WorkerGatewayServer;
use crate::execution::platform::Platform;
use crate::execution::scheduler::WorkerInfo;
use crate::execution::service::{ExecutionService, OperationsService};
use crate::execution::validate::Timeouts;
use crate::execution::{Scheduler, SchedulerConfig};
use crate::store::{self, Store};
use crate::worker::cas::StoreCas;
use crate::worker::{Executor, builtin};

/// The storage a server runs on.
pub struct Stores {
    /// The CAS, behind verification and the empty-blob rule.
    pub cas: Store,
    pub ac: Arc<dyn AcStore>,
    /// The CAS backend's whole-store check, for the admin service (a
    /// refusal when the CAS cannot check itself).
    pub scrub: Arc<dyn store::Scrub>,
    /// What the built-in workers read and write through (`[worker] store`):
    /// the same object as `cas` unless the config names another store.
    pub worker: Store,
}

/// Opens the configured stores (the factory is `store::graph`).
pub async fn open_stores(config: &Config) -> anyhow::Result<Stores> {
    store::graph::open(&config.stores).await
}

/// gRPC message limit: room for a full batch of many small blobs (blob
/// bytes plus per-blob framing), and never below 64 MiB, so that a
/// FindMissingBlobs for a very large input tree (about 70 bytes a digest:
/// some 900,000 digests) is not refused by the transport. Batch data itself
/// is still held to `max_batch_size`. At least twice the batch limit: Buck2
/// sizes its messages (ByteStream segments, its own receive limit) from
/// the advertised batch limit and assumes twice that passes.
pub fn grpc_message_limit(max_batch_bytes: u64) -> usize {
    (2 * max_batch_bytes + (1 << 20)).max(64 << 20) as usize
}

/// Serves every service on `listener` until `shutdown` resolves.
pub async fn run(listener: TcpListener, config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    // Before opening (and scanning) the store: refuse an open server on a
    // public address at once.
    config.auth.check_listener(listener.local_addr()?, "[scheduler] addr")?;
    let stores = open_stores(&config).await?;
    serve(listener, &config, stores, shutdown).await
}

/// Like [`run`], on storage the caller opened (tests share it across
/// restarts or inspect it).
pub async fn serve(
    listener: TcpListener,
    config: &Config,
    stores: Stores,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    config.auth.check_listener(listener.local_addr()?, "[scheduler] addr")?;
    let worker_listener = match config.worker_listen {
        Some(addr) => {
            config.auth.check_listener(addr, "[server] worker_listen")?;
            Some(TcpListener::bind(addr).await.with_context(|| format!("[server] worker_listen: binding {addr}"))?)
        }
        None => None,
    };
    let auth = crate::auth::Auth::new(&config.auth, config.instances.clone())?;
    let limit = grpc_message_limit(config.max_batch_size);
    let fd_limit = listener::raise_fd_limit();
    let conns = ConnectionLimits {
        max_connections: listener::effective_max_connections(config.connections.max_connections, fd_limit),
        ..config.connections.clone()
    };
    let http_listener = match &config.http.listen {
        Some(addr) => {
            config.auth.check_listener(*addr, "[server] http_listen")?;
            crate::http::bind(&config.http).await?
        }
        None => None,
    };
    // Open by design (a Prometheus scrape carries no token): no listener check.
    let metrics_listener = match config.http.metrics_listen {
        Some(addr) => {
            Some(TcpListener::bind(addr).await.with_context(|| format!("[server] metrics_listen: binding {addr}"))?)
        }
        None => None,
    };
    // Recorded only when some listener can serve them.
    let readable = http_listener.is_some() || metrics_listener.is_some();
    let metrics = (config.http.metrics && readable).then(crate::metrics::Metrics::new);
    let http_url = match &http_listener {
        Some(l) => Some(crate::http::base_url(config.http.url.as_deref(), l.local_addr()?, config.tls.is_some())),
        None => None,
    };
    let Stores { cas, ac: ac_store, scrub, worker } = stores;
    let worker_is_cas = Arc::ptr_eq(&worker, &cas);
    let (cas, ac_store) = metered(metrics.as_deref(), cas, ac_store);
    let worker = if worker_is_cas { cas.clone() } else { worker };
    let asset = Arc::new(asset_service(config, &cas, &ac_store)?.with_auth(auth.clone()));
    let ac_metrics = metrics.as_ref().map(|m| m.ac.clone());
    let results: Arc<dyn ActionResults> =
        Arc::new(CompleteResults::new(ac_store.clone(), cas.clone()).with_metrics(ac_metrics.clone()));
    let ac = Arc::new(
        ActionCacheService::new(results.clone(), cas.clone()).with_auth(auth.clone()).with_metrics(ac_metrics),
    );
    let stop_workers = CancellationToken::new();
    let closing = CancellationToken::new();
    let (execution, builtin_worker) =
        start_execution(config, &cas, &worker, &results, &stop_workers, http_url.clone()).await?;
    if let Some(m) = &metrics {
        execution.record_metrics(m.execution.clone());
        m.watch_scheduler(&execution);
    }
    let tls = match &config.tls {
        Some(settings) => {
            let tls = tls::ServerTls::new(settings.clone())?;
            tls.watch(closing.clone()).context("installing the SIGHUP handler")?;
            Some(tls)
        }
        None => None,
    };
    auth.watch(closing.clone());

    let bytestream = Arc::new(
        ByteStreamService::new(
            cas.clone(),
            config.upload_resume_window,
            config.max_parked_uploads,
            config.max_parked_uploads_per_client,
        )
        .with_auth(auth.clone())
        .with_live(Arc::new(crate::execution::live::LiveReads::new(execution.clone(), cas.clone()))),
    );
    // Parked uploads go when their resume window ends, even if no new
    // upload arrives to sweep them.
    let parked = bytestream.clone();
    crate::upkeep::every(Duration::from_secs(1), closing.clone(), move || parked.expire_parked());
    crate::allocator::release_freed_memory(closing.clone());

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ContentAddressableStorageServer<CasService>>().await;
    health.set_serving::<ByteStreamServer<ByteStreamService>>().await;
    health.set_serving::<ActionCacheServer<ActionCacheService>>().await;
    health.set_serving::<CapabilitiesServer<CapabilitiesService>>().await;
    health.set_serving::<ExecutionServer<ExecutionService>>().await;
    health.set_serving::<FetchServer<AssetService>>().await;
    health.set_serving::<PushServer<AssetService>>().await;

    macro_rules! limits {
        ($svc:expr) => {
            $svc.max_decoding_message_size(limit)
                .max_encoding_message_size(limit)
                .accept_compressed(CompressionEncoding::Zstd)
                .send_compressed(CompressionEncoding::Zstd)
        };
    }
    let (backend, data_dir) = (config.stores.cas_description(), config.stores.cas_dir());
    macro_rules! builder {
        () => {
            tonic::transport::Server::builder()
                .layer(request_log::layer())
                .layer(crate::metrics::grpc::layer(metrics.clone()))
                .tcp_nodelay(true)
                .max_concurrent_streams(conns.max_concurrent_streams)
                .http2_keepalive_interval(conns.keepalive_interval)
                .http2_keepalive_timeout(Some(conns.keepalive_timeout))
                .initial_stream_window_size(Some(8 << 20))
                .initial_connection_window_size(Some(16 << 20))
                .max_frame_size(Some(1 << 20))
        };
    }
    let gateway = limits!(WorkerGatewayServer::new(
        GatewayService::new(execution.clone(), config.heartbeat_interval, closing.clone()).with_auth(auth.clone())
    ));
    let mut router = builder!()
        .add_service(health_service)
        .add_service(limits!(CapabilitiesServer::new(
            CapabilitiesService::new(config.max_batch_size, config.max_size).with_auth(auth.clone())
        )))
        .add_service(limits!(ContentAddressableStorageServer::new(
            CasService::new(cas.clone(), config.max_batch_size).with_auth(auth.clone())
        )))
        .add_service(limits!(ByteStreamServer::from_arc(bytestream.clone())))
        .add_service(limits!(ActionCacheServer::from_arc(ac.clone())))
        .add_service(limits!(FetchServer::from_arc(asset.clone())))
        .add_service(limits!(PushServer::from_arc(asset)))
        .add_service(limits!(ExecutionServer::new(
            ExecutionService::new(
                cas.clone(),
                results,
                execution.clone(),
                Timeouts {
                    default: config.execution.default_timeout,
                    max: config.execution.max_timeout,
                    tree: config.execution.tree_limits(),
                },
                config.execution.stream_keepalive,
            )
            .with_auth(auth.clone())
        )))
        .add_service(limits!(OperationsServer::new(OperationsService::new(execution.clone()).with_auth(auth.clone()))))
        .add_service(limits!(AdminServer::new(
            AdminService::new(cas.clone(), scrub, backend, data_dir, execution.clone()).with_auth(auth.clone())
        )));
    // With [server] worker_listen, the worker protocol is served there only.
    let worker_server = match worker_listener {
        None => {
            router = router.add_service(gateway);
            None
        }
        Some(worker_listener) => {
            let addr = worker_listener.local_addr()?;
            tracing::info!(%addr, "serving the worker protocol");
            let incoming = listener::incoming(worker_listener, &conns, tls.clone());
            let serving = builder!()
                .add_service(gateway)
                .serve_with_incoming_shutdown(incoming, closing.clone().cancelled_owned());
            Some(tokio::spawn(serving))
        }
    };

    let http_server = match http_listener {
        Some(http_listener) => {
            let addr = http_listener.local_addr()?;
            let state = Arc::new(crate::http::HttpState {
                scheduler: execution.clone(),
                cas: cas.clone(),
                ac: ac_store,
                auth: auth.clone(),
                base_url: http_url.clone().unwrap_or_default(),
                started: std::time::Instant::now(),
                closing: closing.clone(),
                metrics: metrics.clone(),
            });
            tracing::info!(%addr, url = %state.base_url, "serving the status pages and /metrics");
            let router = crate::http::router(state);
            Some(tokio::spawn(crate::http::serve(http_listener, &conns, tls.clone(), router, closing.clone())?))
        }
        None => None,
    };

    let metrics_server = match metrics_listener {
        Some(l) => {
            tracing::info!(addr = %l.local_addr()?, "serving /metrics without authentication");
            let router = crate::metrics::http::router(metrics.clone());
            Some(tokio::spawn(crate::http::serve(l, &conns, tls.clone(), router, closing.clone())?))
        }
        None => None,
    };

    let addr = listener.local_addr()?;
    let tls_mode = match &config.tls {
        None => "off",
        Some(t) if t.client_ca.is_none() => "on",
        Some(t) if t.require_client_cert => "mTLS (client certificate required)",
        Some(_) => "mTLS (client certificate optional)",
    };
    tracing::info!(%addr, store = %config.stores.cas_description(), data_dir = %config.data_dir.display(), tls = tls_mode, "serving REAPI");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // The builder's `tcp_nodelay` applies only to listeners tonic binds
    // itself: `incoming` sets it on every connection.
    let incoming = listener::incoming(listener, &conns, tls.clone());
    let serving = router.serve_with_incoming_shutdown(incoming, async {
        let _ = stop_rx.await;
    });
    tokio::pin!(serving);
    tokio::select! {
        result = &mut serving => result?,
        () = shutdown => {
            tracing::info!(grace = ?config.shutdown_grace, "shutting down: finishing in-flight calls");
            // Load balancers and probes see the server going away first.
            health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
            closing.cancel();
            let _ = stop_tx.send(());
            match tokio::time::timeout(config.shutdown_grace, &mut serving).await {
                Ok(result) => result?,
                Err(_) => tracing::warn!("grace period over; abandoning the calls still running"),
            }
        }
    }
    closing.cancel();
    if let Some(worker_server) = worker_server {
        // Its streams end with `closing`; the listener stops with them.
        match tokio::time::timeout(config.shutdown_grace, worker_server).await {
            Ok(Ok(result)) => result?,
            Ok(Err(e)) => tracing::warn!(error = %e, "the worker listener's task failed"),
            Err(_) => tracing::warn!("the worker listener did not stop within the grace period"),
        }
    }
    if let Some(http_server) = http_server {
        match tokio::time::timeout(config.shutdown_grace, http_server).await {
            Ok(Ok(result)) => result.context("the HTTP listener")?,
            Ok(Err(e)) => tracing::warn!(error = %e, "the HTTP listener's task failed"),
            Err(_) => tracing::warn!("the HTTP listener did not stop within the grace period"),
        }
    }
    if let Some(metrics_server) = metrics_server {
        let _ = tokio::time::timeout(config.shutdown_grace, metrics_server).await;
    }
    // Workers go after the listener: no new action can arrive, running ones
    // are killed and their directories cleaned.
    stop_workers.cancel();
    if let Some(worker) = builtin_worker {
        let _ = worker.await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// The stores behind their metrics decorators ("cas", "ac"), when metrics
/// are on.
fn metered(metrics: Option<&crate::metrics::Metrics>, cas: Store, ac: Arc<dyn AcStore>) -> (Store, Arc<dyn AcStore>) {
    let Some(m) = metrics else { return (cas, ac) };
    let cas_metrics = m.store("cas", Some(&cas));
    let ac_metrics = m.store("ac", None);
    (Arc::new(store::Metered::new(cas, cas_metrics)), Arc::new(store::MeteredAc::new(ac, ac_metrics)))
}

/// The Remote Asset service: records in the ActionCache store, downloads
/// spooled beside the stored blobs (or in the system's temporary directory
/// for the memory backend), each instance allowed to download as its
/// `[instances] asset_fetch` says, else `[asset] fetch`.
fn asset_service(config: &Config, cas: &Store, ac: &Arc<dyn AcStore>) -> anyhow::Result<AssetService> {
    let spool = match (config.stores.cas.as_str(), config.backend) {
        (IMPLICIT_CAS, Backend::Filesystem) => config.data_dir.join("tmp"),
        _ => std::env::temp_dir(),
    };
    let downloader = crate::asset::Downloader::new(&config.asset, spool).context("the asset downloader")?;
    let fetch = config.asset.fetch;
    let instances = config.instances.clone();
    let may_fetch: crate::asset::MayFetch =
        Arc::new(move |instance| instances.get(instance).asset_fetch.unwrap_or(fetch));
    Ok(AssetService::new(crate::asset::Records::new(ac.clone(), cas.clone()), Arc::new(downloader), may_fetch))
}

/// The scheduler, its upkeep task and the built-in worker (unless
/// `worker_capacity` is 0: a scheduler-only server for remote workers),
/// which reads and writes blobs through `worker_store`.
async fn start_execution(
    config: &Config,
    cas: &Store,
    worker_store: &Store,
    results: &Arc<dyn ActionResults>,
    stop: &CancellationToken,
    status_url: Option<String>,
) -> anyhow::Result<(Arc<Scheduler>, Option<tokio::task::JoinHandle<()>>)> {
    let e = &config.execution;
    let scheduler_config = SchedulerConfig {
        max_attempts: e.max_attempts,
        keepalive_timeout: config.heartbeat_interval * 3,
        numeric_properties: e.numeric_properties.clone(),
        retention: e.operation_retention,
        max_finished: e.max_finished_operations,
        unmatched_timeout: e.unmatched_timeout,
        status_url,
        failed_retention: e.failed_retention,
        log_window: e.log_stream_window.as_u64(),
        log_grace: e.log_stream_grace,
    };
    let scheduler = Arc::new(open_scheduler(config, results, cas, scheduler_config).await?);
    if !matches!(config.scheduler_state, crate::config::SchedulerState::Memory) {
        scheduler.follow(stop.clone());
    }
    spawn_sweeper(scheduler.clone(), stop.clone());
    if config.worker_capacity > 0 {
        let name = format!("builtin@{}", crate::worker::remote::default_name());
        // Actions see neither the stored blobs and results (of any local
        // store) nor the worker's files, nor the server's TLS key and token
        // file.
        let mut hide = vec![config.data_dir.clone()];
        hide.extend(config.stores.local_paths().into_iter().filter(|p| *p != config.data_dir));
        hide.extend(config.tls.iter().map(|t| t.key.clone()));
        hide.extend(config.auth.tokens.clone());
        let executor = Executor::start(name.clone(), Arc::new(StoreCas(worker_store.clone())), config, hide)
            .await
            .with_context(|| format!("preparing the built-in worker in {}", config.work_dir.display()))?;
        let info = WorkerInfo {
            name,
            properties: Platform::new(executor.offered_properties(&config.worker_properties)),
            slots: config.worker_capacity,
            builtin: true,
            sandbox: executor.runner().describe(),
        };
        tracing::info!(slots = info.slots, work_dir = %config.work_dir.display(), "built-in worker");
        let worker = tokio::spawn(builtin::run(scheduler.clone(), Arc::new(executor), info, stop.clone()));
        // Registered before the first request can arrive.
        while !scheduler.status().await.is_ok_and(|s| s.workers.iter().any(|w| w.replica == scheduler.replica())) {
            tokio::task::yield_now().await;
        }
        return Ok((scheduler, Some(worker)));
    }
    Ok((scheduler, None))
}

/// The scheduler on the configured state: its own memory (one server) or
/// Redis shared by replicas, each with an id of its own.
async fn open_scheduler(
    config: &Config,
    results: &Arc<dyn ActionResults>,
    cas: &Store,
    scheduler_config: SchedulerConfig,
) -> anyhow::Result<Scheduler> {
    let (results, cas) = (results.clone(), cas.clone());
    let redis = match &config.scheduler_state {
        crate::config::SchedulerState::Memory => return Ok(Scheduler::new(results, cas, scheduler_config)),
        crate::config::SchedulerState::Redis(redis) => redis,
    };
    let retention = crate::execution::state::Retention {
        retention: scheduler_config.retention,
        max_finished: scheduler_config.max_finished,
    };
    let state = crate::execution::state::RedisState::open(redis, retention)
        .await
        .map_err(|e| anyhow::anyhow!("[scheduler] state: {e}"))?;
    let replica = format!("{}-{}", crate::worker::remote::default_name(), uuid::Uuid::new_v4().simple());
    tracing::info!(replica, "scheduler state on redis");
    Ok(Scheduler::with_state(Arc::new(state), replica, results, cas, scheduler_config))
}

/// The scheduler's upkeep every second; on stop, a clean goodbye (the lease
/// ends, this replica's workers' actions go back to the shared queue).
fn spawn_sweeper(scheduler: Arc<Scheduler>, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => scheduler.sweep().await,
                () = stop.cancelled() => break,
            }
        }
        scheduler.shut_down().await;
    });
}

/// A future that resolves on SIGINT or SIGTERM. The handlers are installed
/// when this is called, not when the future is first polled: a signal that
/// arrives while the server is still starting is then a graceful stop, not
/// the default disposition (death by signal).
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}
