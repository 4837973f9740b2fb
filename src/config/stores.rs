//! `[stores.NAME]`: storage declared by name and composed, and the
//! `store = "NAME"` keys of `[cas]`, `[ac]` and `[worker]` that pick from
//! it.
//!
//! Parsing gives a map of [`StoreSpec`]s; [`resolve`] checks it as a whole
//! (every name exists, no cycles, the ActionCache store keeps one, a
//! write-behind tier is durable) and gives the [`StoreGraph`] that
//! `store::graph` builds. Without any of these keys the graph is one store,
//! the `[cas]` section's filesystem or memory store, exactly as before.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;
use bytesize::ByteSize;
use serde::Deserialize;

use super::{Backend, CasSection, DEFAULT_MIN_RETENTION, DEFAULT_VERIFY_READS_BELOW};
use crate::store::existence_cache::ExistenceCacheConfig;
use crate::store::grpc::GrpcConfig;
use crate::store::redis::RedisConfig;
use crate::store::s3::S3Config;
use crate::store::sharded::ShardedConfig;
use crate::store::size_partitioned::SizePartitionedConfig;
use crate::store::tiered::{TieredConfig, WriteMode};

/// The name the `[cas]` section's own store (`backend`, `root`, ...) has in
/// the graph when `[cas] store` is unset. Brackets are not allowed in the
/// names of `[stores]`, so it never collides with one.
pub const IMPLICIT_CAS: &str = "[cas]";

/// ActionCache entries kept by a memory store unless it says otherwise
/// (and by the `[cas] backend = "memory"` store).
pub const DEFAULT_MEMORY_AC_ENTRIES: usize = 1_000_000;

/// One `[stores.NAME]` section, by its `type`. Backends hold data,
/// decorators name other stores.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StoreSpec {
    Filesystem(FilesystemConfig),
    Memory(MemoryConfig),
    Tiered(TieredConfig),
    Sharded(ShardedConfig),
    SizePartitioned(SizePartitionedConfig),
    ExistenceCache(ExistenceCacheConfig),
    Redis(RedisConfig),
    S3(S3Config),
    Grpc(GrpcConfig),
    // The engine backends (s3, redis, grpc) join here; each arm below that
    // matches on the type says what they are (durable, keep an
    // ActionCache, largest blob).
}

/// `type = "filesystem"`: blobs and ActionCache entries in a directory,
/// the same store as `[cas] backend = "filesystem"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesystemConfig {
    pub path: PathBuf,
    #[serde(default = "default_max_size")]
    pub max_size: ByteSize,
    #[serde(default)]
    pub fsync: bool,
    #[serde(default = "default_verify_reads_below")]
    pub verify_reads_below: ByteSize,
    #[serde(default = "default_min_retention", with = "humantime_serde")]
    pub min_retention: Duration,
}

/// `type = "memory"`: blobs and ActionCache entries in memory, gone at
/// restart (a cache tier, or tests).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    #[serde(default = "default_max_size")]
    pub max_size: ByteSize,
    /// ActionCache entries kept (least recently used dropped beyond it);
    /// 0: a blob-only store, with no ActionCache.
    #[serde(default = "default_ac_entries")]
    pub max_entries: usize,
    #[serde(default = "default_min_retention", with = "humantime_serde")]
    pub min_retention: Duration,
}

fn default_max_size() -> ByteSize {
    CasSection::default().max_size
}
fn default_verify_reads_below() -> ByteSize {
    ByteSize::b(DEFAULT_VERIFY_READS_BELOW)
}
fn default_min_retention() -> Duration {
    DEFAULT_MIN_RETENTION
}
fn default_ac_entries() -> usize {
    DEFAULT_MEMORY_AC_ENTRIES
}

/// `[ac]`: the ActionCache (and the Remote Asset records kept beside it).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AcSection {
    /// The store that keeps ActionCache entries; default the CAS store.
    pub store: Option<String>,
}

/// Storage as the factory builds it: the stores the server uses and the
/// ones they name, each once.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreGraph {
    pub stores: BTreeMap<String, StoreSpec>,
    /// Every store in `stores`, each after the stores it names.
    pub order: Vec<String>,
    /// The stores of the CAS, the ActionCache and the built-in workers.
    pub cas: String,
    pub ac: String,
    pub worker: String,
}

impl StoreGraph {
    /// The largest blob the CAS can keep (0: no limit), advertised as
    /// `max_cas_blob_size_bytes`.
    pub fn max_blob(&self) -> u64 {
        max_blob(&self.stores, &self.cas)
    }

    /// What the admin status calls the CAS's backend: "filesystem" or
    /// "memory" for the `[cas]` section's store, as before; the type and
    /// name of a named one.
    pub fn cas_description(&self) -> String {
        let spec = &self.stores[&self.cas];
        if self.cas == IMPLICIT_CAS {
            return spec.kind().to_string();
        }
        format!("{} \"{}\"", spec.kind(), self.cas)
    }

    /// The CAS's directory when it is a filesystem store ("" otherwise).
    pub fn cas_dir(&self) -> String {
        match &self.stores[&self.cas] {
            StoreSpec::Filesystem(f) => f.path.display().to_string(),
            _ => String::new(),
        }
    }

    /// The directories of every filesystem store (hidden from actions).
    pub fn local_paths(&self) -> Vec<PathBuf> {
        self.stores
            .values()
            .filter_map(|s| match s {
                StoreSpec::Filesystem(f) => Some(f.path.clone()),
                _ => None,
            })
            .collect()
    }
}

impl StoreSpec {
    /// The `type` as written in the config.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreSpec::Filesystem(_) => "filesystem",
            StoreSpec::Memory(_) => "memory",
            StoreSpec::Tiered(_) => "tiered",
            StoreSpec::Sharded(_) => "sharded",
            StoreSpec::SizePartitioned(_) => "size_partitioned",
            StoreSpec::ExistenceCache(_) => "existence_cache",
            StoreSpec::Redis(_) => "redis",
            StoreSpec::S3(_) => "s3",
            StoreSpec::Grpc(_) => "grpc",
        }
    }

    /// The stores this one names, with the key that names each.
    pub fn children(&self) -> Vec<(&'static str, &str)> {
        match self {
            StoreSpec::Filesystem(_)
            | StoreSpec::Memory(_)
            | StoreSpec::Redis(_)
            | StoreSpec::S3(_)
            | StoreSpec::Grpc(_) => Vec::new(),
            StoreSpec::Tiered(t) => vec![("fast", &t.fast), ("slow", &t.slow)],
            StoreSpec::Sharded(s) => s.shards.iter().map(|sh| ("shards", sh.store.as_str())).collect(),
            StoreSpec::SizePartitioned(p) => vec![("small", &p.small), ("large", &p.large)],
            StoreSpec::ExistenceCache(e) => vec![("store", &e.store)],
        }
    }

    /// The checks of one section on its own.
    fn check(&self) -> Result<(), String> {
        match self {
            StoreSpec::Filesystem(f) if f.max_size.as_u64() == 0 => Err("max_size must be larger than zero".into()),
            StoreSpec::Memory(m) if m.max_size.as_u64() == 0 => Err("max_size must be larger than zero".into()),
            StoreSpec::Sharded(s) => s.check(),
            StoreSpec::SizePartitioned(p) => p.check(),
            StoreSpec::ExistenceCache(e) => e.check(),
            StoreSpec::Redis(r) => r.validate().map_err(|e| e.message),
            StoreSpec::S3(c) => c.validate().map_err(|e| e.message),
            StoreSpec::Tiered(t) if t.fast == t.slow => Err("fast and slow must be two stores".into()),
            _ => Ok(()),
        }
    }
}

/// Validates `[stores]` and the `store` keys, and gives the graph.
/// `data_dir` is the `[cas]` section's directory, for its implicit store.
pub(super) fn resolve(file: &super::FileConfig, data_dir: &Path) -> anyhow::Result<StoreGraph> {
    let mut stores = file.stores.clone();
    for (name, spec) in &stores {
        check_name(name)?;
        spec.check().map_err(|e| anyhow::anyhow!("[stores.{name}] {e}"))?;
    }
    let cas = match &file.cas.store {
        Some(name) => {
            refuse_implicit_keys(&file.cas, name)?;
            name.clone()
        }
        None => {
            stores.insert(IMPLICIT_CAS.to_string(), implicit_store(&file.cas, data_dir));
            IMPLICIT_CAS.to_string()
        }
    };
    let ac = file.ac.store.clone().unwrap_or_else(|| cas.clone());
    let worker = file.worker.store.clone().unwrap_or_else(|| cas.clone());
    for (section, name) in [("[cas]", &file.cas.store), ("[ac]", &file.ac.store), ("[worker]", &file.worker.store)] {
        if let Some(name) = name {
            check_exists(&stores, &format!("{section} store"), name)?;
        }
    }
    for (parent, spec) in &stores {
        for (key, child) in spec.children() {
            check_exists(&stores, &format!("[stores.{parent}] {key}"), child)?;
        }
    }
    let order = topological_order(&stores, [&cas, &ac, &worker])?;
    check_action_cache(&stores, &ac, file.ac.store.is_some())?;
    check_write_behind(&stores)?;
    check_paths(&stores)?;
    // Unused stores are checked like the others, but not opened.
    stores.retain(|name, _| order.contains(name));
    Ok(StoreGraph { stores, order, cas, ac, worker })
}

/// The `[cas]` section's own store, as the server has always built it.
fn implicit_store(cas: &CasSection, data_dir: &Path) -> StoreSpec {
    match cas.backend {
        Backend::Filesystem => StoreSpec::Filesystem(FilesystemConfig {
            path: data_dir.to_path_buf(),
            max_size: cas.max_size,
            fsync: cas.fsync,
            verify_reads_below: cas.verify_reads_below,
            min_retention: cas.min_retention,
        }),
        Backend::Memory => StoreSpec::Memory(MemoryConfig {
            max_size: cas.max_size,
            max_entries: DEFAULT_MEMORY_AC_ENTRIES,
            min_retention: cas.min_retention,
        }),
    }
}

/// The keys of `[cas]` that describe its own store mean nothing beside
/// `store = "NAME"`: saying so beats ignoring them.
fn refuse_implicit_keys(cas: &CasSection, name: &str) -> anyhow::Result<()> {
    let default = CasSection::default();
    let set: Vec<&str> = [
        ("backend", cas.backend != default.backend),
        ("root", cas.root.is_some()),
        ("max_size", cas.max_size != default.max_size),
        ("fsync", cas.fsync != default.fsync),
        ("verify_reads_below", cas.verify_reads_below != default.verify_reads_below),
        ("min_retention", cas.min_retention != default.min_retention),
    ]
    .into_iter()
    .filter(|(key, differs)| *differs || cas.keys_written.contains(*key))
    .map(|(key, _)| key)
    .collect();
    if !set.is_empty() {
        bail!(
            "[cas] store = {name:?} and [cas] {} both say where blobs go: set {} in [stores.{name}] instead \
             (or drop store to use the [cas] section's own store)",
            set.join(", "),
            if set.len() == 1 { "it" } else { "them" }
        );
    }
    Ok(())
}

fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !ok {
        bail!("[stores.{name:?}]: a store's name is letters, digits, '-', '_' and '.'");
    }
    Ok(())
}

fn check_exists(stores: &BTreeMap<String, StoreSpec>, key: &str, name: &str) -> anyhow::Result<()> {
    if !stores.contains_key(name) {
        let defined: Vec<&str> = stores.keys().filter(|n| *n != IMPLICIT_CAS).map(String::as_str).collect();
        let defined = if defined.is_empty() { "none".to_string() } else { defined.join(", ") };
        bail!("{key} = {name:?}: there is no [stores.{name}] (defined: {defined})");
    }
    Ok(())
}

/// Every store reachable from `roots`, each after the stores it names;
/// a cycle anywhere in `[stores]` is refused with its path.
fn topological_order<'a>(
    stores: &BTreeMap<String, StoreSpec>,
    roots: impl IntoIterator<Item = &'a String>,
) -> anyhow::Result<Vec<String>> {
    // Every store, used or not, so a cycle among unused ones is found too.
    let mut done = BTreeSet::new();
    let mut all = Vec::new();
    for name in stores.keys() {
        visit(stores, name, &mut Vec::new(), &mut done, &mut all)?;
    }
    let mut reachable = BTreeSet::new();
    let mut stack: Vec<&str> = roots.into_iter().map(String::as_str).collect();
    while let Some(name) = stack.pop() {
        if reachable.insert(name.to_string()) {
            stack.extend(stores[name].children().into_iter().map(|(_, c)| c));
        }
    }
    Ok(all.into_iter().filter(|n| reachable.contains(n)).collect())
}

fn visit(
    stores: &BTreeMap<String, StoreSpec>,
    name: &str,
    path: &mut Vec<String>,
    done: &mut BTreeSet<String>,
    order: &mut Vec<String>,
) -> anyhow::Result<()> {
    if done.contains(name) {
        return Ok(());
    }
    if let Some(at) = path.iter().position(|n| n == name) {
        let cycle: Vec<&str> = path[at..].iter().map(String::as_str).chain([name]).collect();
        bail!("[stores] form a cycle: {}", cycle.join(" -> "));
    }
    path.push(name.to_string());
    for (_, child) in stores[name].children() {
        visit(stores, child, path, done, order)?;
    }
    path.pop();
    done.insert(name.to_string());
    order.push(name.to_string());
    Ok(())
}

/// The ActionCache store must keep one; decorators forward it to a child
/// (or need it of all of them), so the error follows that chain.
fn check_action_cache(stores: &BTreeMap<String, StoreSpec>, ac: &str, named: bool) -> anyhow::Result<()> {
    if let Err(why) = keeps_action_cache(stores, ac) {
        let key = if named { "[ac] store" } else { "[cas] store (the ActionCache's too, without [ac] store)" };
        bail!("{key} = {ac:?} keeps no ActionCache: {why}");
    }
    Ok(())
}

fn keeps_action_cache(stores: &BTreeMap<String, StoreSpec>, name: &str) -> Result<(), String> {
    let all = |children: Vec<(&str, &str)>| -> Result<(), String> {
        children.into_iter().try_for_each(|(_, c)| keeps_action_cache(stores, c))
    };
    match &stores[name] {
        StoreSpec::Filesystem(_) | StoreSpec::Redis(_) | StoreSpec::S3(_) | StoreSpec::Grpc(_) => Ok(()),
        StoreSpec::Memory(m) if m.max_entries == 0 => Err(format!("memory store {name:?} has max_entries = 0")),
        StoreSpec::Memory(_) => Ok(()),
        spec @ (StoreSpec::Tiered(_) | StoreSpec::Sharded(_)) => all(spec.children())
            .map_err(|why| format!("{} {name:?} needs an ActionCache in each of its stores; {why}", spec.kind())),
        StoreSpec::SizePartitioned(p) => keeps_action_cache(stores, &p.small).map_err(|why| {
            format!("size_partitioned {name:?} keeps the ActionCache in its small store {:?}; {why}", p.small)
        }),
        StoreSpec::ExistenceCache(e) => keeps_action_cache(stores, &e.store)
            .map_err(|why| format!("existence_cache {name:?} forwards the ActionCache to {:?}; {why}", e.store)),
    }
}

/// A write-behind tier acknowledges a blob when its fast store has it, so
/// that store must survive a restart.
fn check_write_behind(stores: &BTreeMap<String, StoreSpec>) -> anyhow::Result<()> {
    for (name, spec) in stores {
        if let StoreSpec::Tiered(t) = spec
            && t.write == WriteMode::Behind
            && !durable(stores, &t.fast)
        {
            bail!(
                "[stores.{name}] write = \"behind\" acknowledges a blob once the fast store {:?} has it, but \
                 that store loses blobs at a restart (memory): use write = \"through\" or a durable fast store \
                 (filesystem, s3, redis)",
                t.fast
            );
        }
    }
    Ok(())
}

/// Whether everything `name` acknowledges survives a restart of this
/// server. A Redis without persistence is the operator's call.
fn durable(stores: &BTreeMap<String, StoreSpec>, name: &str) -> bool {
    match &stores[name] {
        // Redis: as durable as its persistence (the operator's call, README
        // "Scaling out").
        StoreSpec::Filesystem(_) | StoreSpec::Redis(_) | StoreSpec::S3(_) | StoreSpec::Grpc(_) => true,
        StoreSpec::Memory(_) => false,
        StoreSpec::Tiered(t) => durable(stores, &t.fast) || (t.write == WriteMode::Through && durable(stores, &t.slow)),
        StoreSpec::Sharded(s) => s.shards.iter().all(|sh| durable(stores, &sh.store)),
        StoreSpec::SizePartitioned(p) => durable(stores, &p.small) && durable(stores, &p.large),
        StoreSpec::ExistenceCache(e) => durable(stores, &e.store),
    }
}

/// Two filesystem stores over one directory would each think they own it.
fn check_paths(stores: &BTreeMap<String, StoreSpec>) -> anyhow::Result<()> {
    let mut seen: BTreeMap<&Path, &str> = BTreeMap::new();
    for (name, spec) in stores {
        if let StoreSpec::Filesystem(f) = spec
            && let Some(other) = seen.insert(&f.path, name)
        {
            bail!("[stores.{name}] and [stores.{other}] are both filesystem stores in {}", f.path.display());
        }
    }
    Ok(())
}

/// The largest blob `name` can keep (0: no limit of its own).
fn max_blob(stores: &BTreeMap<String, StoreSpec>, name: &str) -> u64 {
    let min = |limits: &mut dyn Iterator<Item = u64>| limits.filter(|l| *l > 0).min().unwrap_or(0);
    match &stores[name] {
        StoreSpec::Filesystem(f) => f.max_size.as_u64(),
        StoreSpec::Memory(m) => m.max_size.as_u64(),
        StoreSpec::Redis(r) => r.max_blob_size.as_u64(),
        // The remote's own limit is its own to enforce.
        StoreSpec::S3(_) | StoreSpec::Grpc(_) => 0,
        // Both tiers must take it (the fast one on write and on fill).
        StoreSpec::Tiered(t) => min(&mut [&t.fast, &t.slow].into_iter().map(|c| max_blob(stores, c))),
        StoreSpec::Sharded(s) => min(&mut s.shards.iter().map(|sh| max_blob(stores, &sh.store))),
        StoreSpec::SizePartitioned(p) => max_blob(stores, &p.large),
        StoreSpec::ExistenceCache(e) => max_blob(stores, &e.store),
    }
}

#[cfg(test)]
mod tests;
