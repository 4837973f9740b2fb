//! Storage families, per named store: operations by kind and result, bytes
//! read and written, the sizes of written blobs. Usage, budget and
//! evictions are read from the store at scrape time (see `collect`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type StoreLabel = [(&'static str, &'static str); 1];
type OpLabels = [(&'static str, &'static str); 3];

/// Blob sizes, bytes: 64 B to 4 GiB in steps of 4.
fn size_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(64.0, 4.0, 14))
}

/// What a store was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    FindMissing,
    Get,
    Put,
    Remove,
}

impl Op {
    const ALL: [Op; 4] = [Op::FindMissing, Op::Get, Op::Put, Op::Remove];

    fn name(self) -> &'static str {
        match self {
            Op::FindMissing => "find_missing",
            Op::Get => "get",
            Op::Put => "put",
            Op::Remove => "remove",
        }
    }
}

/// How it went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    NotFound,
    Error,
}

impl Outcome {
    const ALL: [Outcome; 3] = [Outcome::Ok, Outcome::NotFound, Outcome::Error];

    fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::NotFound => "not_found",
            Outcome::Error => "error",
        }
    }

    /// The outcome of a store call's result.
    pub fn of<T>(result: &crate::error::Result<T>) -> Outcome {
        match result {
            Ok(_) => Outcome::Ok,
            Err(e) if e.code == tonic::Code::NotFound => Outcome::NotFound,
            Err(_) => Outcome::Error,
        }
    }
}

pub(super) struct StoreFamilies {
    ops: Family<OpLabels, Counter>,
    read: Family<StoreLabel, Counter>,
    written: Family<StoreLabel, Counter>,
    sizes: Family<StoreLabel, Histogram>,
}

impl StoreFamilies {
    pub(super) fn register(registry: &mut Registry) -> Self {
        let f = StoreFamilies {
            ops: Family::default(),
            read: Family::default(),
            written: Family::default(),
            sizes: Family::new_with_constructor(size_histogram as fn() -> Histogram),
        };
        registry.register(
            "store_operations",
            "Store calls by store, kind (find_missing, get, put, remove) and result (ok, not_found, error)",
            f.ops.clone(),
        );
        registry.register("store_read_bytes", "Bytes read from a store", f.read.clone());
        registry.register("store_written_bytes", "Bytes written into a store", f.written.clone());
        registry.register("store_blob_size_bytes", "Sizes of the blobs committed to a store", f.sizes.clone());
        f
    }

    /// One store's handles, resolved once: recording is then an atomic add.
    /// Every (kind, result) pair exists from the start, at 0.
    pub(super) fn recorder(&self, store: &'static str) -> StoreMetrics {
        let ops = Op::ALL.map(|op| {
            Outcome::ALL.map(|outcome| {
                self.ops.get_or_create(&[("store", store), ("op", op.name()), ("result", outcome.name())]).clone()
            })
        });
        let label = [("store", store)];
        StoreMetrics {
            ops,
            read: self.read.get_or_create(&label).clone(),
            written: self.written.get_or_create(&label).clone(),
            sizes: self.sizes.get_or_create(&label).clone(),
        }
    }
}

/// The recorder a store decorator holds ([`crate::store::Metered`]).
#[derive(Clone)]
pub struct StoreMetrics {
    ops: [[Counter; 3]; 4],
    read: Counter,
    written: Counter,
    sizes: Histogram,
}

impl StoreMetrics {
    pub fn op(&self, op: Op, outcome: Outcome) {
        self.ops[op as usize][outcome as usize].inc();
    }

    pub fn read(&self, bytes: u64) {
        self.read.inc_by(bytes);
    }

    pub fn written(&self, bytes: u64) {
        self.written.inc_by(bytes);
    }

    /// A blob of `size` bytes was committed.
    pub fn committed(&self, size: u64) {
        self.sizes.observe(size as f64);
    }
}
