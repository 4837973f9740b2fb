//! Prometheus metrics: one [`Metrics`] per server, served as `/metrics`.
//!
//! Metrics are recorded where the work happens: a tower layer on every gRPC
//! call ([`grpc`]), a decorator over each store ([`crate::store::Metered`]),
//! the ActionCache service ([`AcMetrics`]) and the scheduler's completions
//! ([`ExecutionMetrics`]). What the server already knows (queues, workers,
//! the scheduler's counters, store usage, the process) is read when
//! Prometheus scrapes ([`collect`]), so it costs nothing in between.
//!
//! Not a process global: tests run many servers in one process and check
//! exact values, so each server creates its own and hands it to the parts
//! that record. With `[server] metrics = false`, or with neither an HTTP
//! listener nor `[server] metrics_listen` to serve them, no `Metrics`
//! exists at all: every recording site holds an `Option` that is `None`
//! (a branch, nothing else), and `/metrics` answers 404.
//!
//! Invariant: every label has a bounded set of values (gRPC methods from a
//! fixed list, store names, failure reasons, platforms in the queues,
//! connected workers); nothing a client sends becomes a label as it is.

mod collect;
pub mod execution;
pub mod grpc;
pub mod http;
pub mod store;

use std::sync::{Arc, Weak};
use std::time::Instant;

use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

pub use execution::ExecutionMetrics;
pub use store::StoreMetrics;

use crate::execution::Scheduler;
use crate::store::BlobStore;

/// Every metric prefix.
pub const PREFIX: &str = "distbuild";

/// One server's metrics.
pub struct Metrics {
    registry: Registry,
    pub grpc: grpc::GrpcMetrics,
    pub ac: AcMetrics,
    pub execution: Arc<ExecutionMetrics>,
    stores: store::StoreFamilies,
    /// What the scrape reads: set once the server has built it.
    sources: Arc<Sources>,
}

/// The parts a scrape reads, held weakly: metrics never keep a stopped
/// server's scheduler or stores alive.
#[derive(Default)]
pub(crate) struct Sources {
    pub(crate) started: Option<Instant>,
    pub(crate) scheduler: Mutex<Option<Weak<Scheduler>>>,
    pub(crate) stores: Mutex<Vec<(&'static str, Weak<dyn BlobStore>)>>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix(PREFIX);
        let grpc = grpc::GrpcMetrics::register(&mut registry);
        let ac = AcMetrics::register(&mut registry);
        let execution = Arc::new(ExecutionMetrics::register(&mut registry));
        let stores = store::StoreFamilies::register(&mut registry);
        let sources = Arc::new(Sources { started: Some(Instant::now()), ..Default::default() });
        registry.register_collector(Box::new(collect::Scrape(sources.clone())));
        Arc::new(Metrics { registry, grpc, ac, execution, stores, sources })
    }

    /// The recorder of the store named `name` ("cas", "ac"); its usage
    /// (when `usage` is given) is read at each scrape.
    pub fn store(&self, name: &'static str, usage: Option<&Arc<dyn BlobStore>>) -> StoreMetrics {
        if let Some(store) = usage {
            self.sources.stores.lock().push((name, Arc::downgrade(store)));
        }
        self.stores.recorder(name)
    }

    /// The scheduler whose queues, workers and counters a scrape reports.
    pub fn watch_scheduler(&self, scheduler: &Arc<Scheduler>) {
        *self.sources.scheduler.lock() = Some(Arc::downgrade(scheduler));
    }

    /// Reads the scheduler's state for the next [`Metrics::encode`] (which
    /// cannot wait: the state may be remote).
    pub async fn read_scheduler(&self) {
        let scheduler = self.sources.scheduler.lock().as_ref().and_then(std::sync::Weak::upgrade);
        if let Some(scheduler) = scheduler {
            scheduler.take_snapshot().await;
        }
    }

    /// The text exposition: OpenMetrics when `openmetrics`, else the
    /// Prometheus text format 0.0.4 (what most tools parse).
    pub fn encode(&self, openmetrics: bool) -> String {
        let mut out = String::with_capacity(16 << 10);
        let written = if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &self.registry)
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        };
        // Writing into a String fails only on a metric's own encoding bug.
        if let Err(e) = written {
            tracing::error!(error = %e, "encoding the metrics");
        }
        out
    }
}

/// GetActionResult outcomes and incomplete entries hidden from clients.
#[derive(Clone)]
pub struct AcMetrics {
    hits: Counter,
    misses: Counter,
    incomplete: Counter,
}

impl AcMetrics {
    fn register(registry: &mut Registry) -> Self {
        let family =
            prometheus_client::metrics::family::Family::<[(&'static str, &'static str); 1], Counter>::default();
        registry.register(
            "action_cache_requests",
            "GetActionResult calls by result: hit (a complete result) or miss",
            family.clone(),
        );
        let incomplete = Counter::default();
        registry.register(
            "action_cache_incomplete",
            "Entries found but hidden and removed because a blob they reference is gone from the CAS",
            incomplete.clone(),
        );
        // One at a time: `get_or_create` holds the family's lock until its
        // guard is dropped, and a second call in the same expression would
        // wait for it forever.
        let hits = family.get_or_create(&[("result", "hit")]).clone();
        let misses = family.get_or_create(&[("result", "miss")]).clone();
        AcMetrics { hits, misses, incomplete }
    }

    pub fn hit(&self) {
        self.hits.inc();
    }

    pub fn miss(&self) {
        self.misses.inc();
    }

    pub fn incomplete(&self) {
        self.incomplete.inc();
    }
}
