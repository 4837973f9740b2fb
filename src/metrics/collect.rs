//! What a scrape reads from the server as it is: the scheduler's queues,
//! stages, workers and counters, the stores' usage, and the process. None
//! of it costs anything between scrapes.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::Sources;
use crate::execution::Scheduler;

#[derive(Debug)]
pub(super) struct Scrape(pub(super) Arc<Sources>);

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        process(&mut encoder, &self.0)?;
        stores(&mut encoder, &self.0)?;
        let scheduler = self.0.scheduler.lock().as_ref().and_then(std::sync::Weak::upgrade);
        if let Some(scheduler) = scheduler {
            execution(&mut encoder, &scheduler)?;
        }
        Ok(())
    }
}

/// One unlabelled metric.
fn one(e: &mut DescriptorEncoder, name: &str, help: &str, metric: impl EncodeMetric) -> fmt::Result {
    let m = e.encode_descriptor(name, help, None, metric.metric_type())?;
    metric.encode(m)
}

/// A family of `kind`: one sample per label set.
fn many<L: EncodeLabelSet, M: EncodeMetric>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (L, M)>,
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, kind)?;
    for (labels, metric) in samples {
        metric.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge(v: f64) -> ConstGauge<f64> {
    ConstGauge::new(v)
}

fn counter(v: u64) -> ConstCounter<u64> {
    ConstCounter::new(v)
}

fn process(e: &mut DescriptorEncoder, sources: &Sources) -> fmt::Result {
    if let Some(rss) = resident_bytes() {
        one(e, "process_resident_memory_bytes", "Resident memory of the server process", gauge(rss as f64))?;
    }
    if let Some(fds) = open_fds() {
        one(e, "process_open_fds", "Open file descriptors of the server process", gauge(fds as f64))?;
    }
    let uptime = sources.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
    one(e, "uptime_seconds", "Time since the server started", gauge(uptime))?;
    many(
        e,
        "build_info",
        "The server's version (the value is always 1)",
        MetricType::Gauge,
        [([("version", env!("CARGO_PKG_VERSION"))], gauge(1.0))],
    )
}

/// VmRSS of /proc/self/status (Linux), in bytes.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

/// Entries of /proc/self/fd (Linux), less the one that lists them.
fn open_fds() -> Option<u64> {
    let n = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    Some(n.saturating_sub(1))
}

fn stores(e: &mut DescriptorEncoder, sources: &Sources) -> fmt::Result {
    let usage: Vec<(&'static str, crate::store::Usage)> =
        sources.stores.lock().iter().filter_map(|(name, store)| Some((*name, store.upgrade()?.usage()))).collect();
    let per_store = |f: fn(&crate::store::Usage) -> u64| usage.iter().map(move |(n, u)| ([("store", *n)], f(u)));
    let g = MetricType::Gauge;
    many(
        e,
        "store_used_bytes",
        "Bytes a store holds",
        g,
        per_store(|u| u.used_bytes).map(|(l, v)| (l, gauge(v as f64))),
    )?;
    many(e, "store_max_bytes", "A store's budget", g, per_store(|u| u.max_bytes).map(|(l, v)| (l, gauge(v as f64))))?;
    many(e, "store_blobs", "Blobs a store holds", g, per_store(|u| u.blobs).map(|(l, v)| (l, gauge(v as f64))))?;
    many(
        e,
        "store_evictions",
        "Blobs a store evicted to stay within its budget since it opened",
        MetricType::Counter,
        per_store(|u| u.evictions).map(|(l, v)| (l, counter(v))),
    )
}

fn execution(e: &mut DescriptorEncoder, scheduler: &Scheduler) -> fmt::Result {
    // As of the last sweep: a scrape cannot wait for the state.
    let snapshot = scheduler.snapshot();
    let (status, queues) = (&snapshot.0, &snapshot.1);
    let queued: usize = queues.iter().map(|q| q.len).sum();
    let completed = status.operations.saturating_sub(queued + status.running);
    let stages = [("queued", queued), ("executing", status.running), ("completed", completed)];
    many(
        e,
        "execution_operations",
        "Operations the scheduler holds by stage: queued, executing (on a worker), completed (kept for clients)",
        MetricType::Gauge,
        stages.map(|(stage, n)| ([("stage", stage)], gauge(n as f64))),
    )?;
    let now = SystemTime::now();
    let platforms: Vec<String> = queues.iter().map(|q| q.platform.to_string()).collect();
    many(
        e,
        "execution_queue_length",
        "Queued actions per platform",
        MetricType::Gauge,
        queues.iter().zip(&platforms).map(|(q, p)| ([("platform", p.as_str())], gauge(q.len as f64))),
    )?;
    many(
        e,
        "execution_queue_oldest_age_seconds",
        "How long the oldest queued action of each platform has waited",
        MetricType::Gauge,
        queues.iter().zip(&platforms).map(|(q, p)| {
            let age = now.duration_since(q.oldest).unwrap_or_default();
            ([("platform", p.as_str())], gauge(age.as_secs_f64()))
        }),
    )?;
    let c = status.counters;
    for (name, help, value) in [
        ("execution_cache_hits", "Execute calls answered from the ActionCache", c.cache_hits),
        ("execution_cache_misses", "Execute calls that queued a new action", c.cache_misses),
        ("execution_merged", "Execute calls merged into an identical action in flight", c.merged),
        ("execution_executed", "Actions a worker finished (successfully or not)", c.executed),
        ("execution_requeued", "Actions queued again after their worker was lost", c.requeued),
        ("execution_cancellations", "Operations cancelled", c.cancelled),
    ] {
        one(e, name, help, counter(value))?;
    }
    workers(e, &status.workers)
}

fn workers(e: &mut DescriptorEncoder, workers: &[crate::execution::scheduler::WorkerView]) -> fmt::Result {
    let g = MetricType::Gauge;
    let slots: usize = workers.iter().map(|w| w.info.slots).sum();
    let busy: usize = workers.iter().map(|w| w.busy).sum();
    let draining = workers.iter().filter(|w| w.draining).count();
    one(e, "workers_connected", "Connected workers (the built-in one included)", gauge(workers.len() as f64))?;
    one(e, "workers_draining", "Connected workers that take no new actions", gauge(draining as f64))?;
    one(e, "workers_slots", "Action slots of the connected workers", gauge(slots as f64))?;
    one(e, "workers_busy_slots", "Slots running an action", gauge(busy as f64))?;
    let by_name = |f: fn(&crate::execution::scheduler::WorkerView) -> f64| {
        workers.iter().map(move |w| ([("worker", w.info.name.as_str())], f(w)))
    };
    many(e, "worker_busy_slots", "Slots running an action, per worker", g, by_name(|w| w.busy as f64).map(gv))?;
    many(
        e,
        "worker_actions",
        "Actions a worker finished since it connected",
        MetricType::Counter,
        by_name(|w| w.done as f64).map(cv),
    )?;
    many(
        e,
        "worker_failed_actions",
        "Actions a worker finished without success since it connected",
        MetricType::Counter,
        by_name(|w| w.failed as f64).map(cv),
    )?;
    many(
        e,
        "worker_last_keepalive_age_seconds",
        "Time since a worker last showed it is alive (0 for the built-in worker)",
        g,
        by_name(|w| w.last_seen.as_secs_f64()).map(gv),
    )
}

fn gv<L>((labels, v): (L, f64)) -> (L, ConstGauge<f64>) {
    (labels, gauge(v))
}

fn cv<L>((labels, v): (L, f64)) -> (L, ConstCounter<u64>) {
    (labels, counter(v as u64))
}
