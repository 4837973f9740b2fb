//! `[stores]` parsing and resolution, and the factory's build of what
//! they resolve to: refusals that name the key, the default that is
//! exactly the old store, one object per named store.

use std::sync::Arc;

use bytes::Bytes;
use tonic::Code;

use super::super::FileConfig;
use super::*;
use crate::store::suite::{salt, salted_blob};

fn resolve(text: &str) -> anyhow::Result<super::super::Config> {
    FileConfig::parse(text)?.resolve()
}

fn refused(text: &str) -> String {
    match resolve(text) {
        Ok(_) => panic!("accepted: {text}"),
        Err(e) => format!("{e:#}"),
    }
}

const FULL: &str = r#"
    [cas]
    store = "front"
    [ac]
    store = "acs"
    [worker]
    store = "disk"
    [stores.disk]
    type = "filesystem"
    path = "/srv/distbuild/disk"
    max_size = "1GiB"
    [stores.mem]
    type = "memory"
    max_size = "64MiB"
    max_entries = 1000
    [stores.other]
    type = "memory"
    [stores.tier]
    type = "tiered"
    fast = "disk"
    slow = "spread"
    write = "behind"
    [stores.spread]
    type = "sharded"
    shards = [{ store = "mem", weight = 2 }, { store = "other" }]
    [stores.split]
    type = "size_partitioned"
    threshold = "1MiB"
    small = "mem"
    large = "tier"
    [stores.front]
    type = "existence_cache"
    store = "split"
    ttl = "5m"
    [stores.acs]
    type = "tiered"
    fast = "mem"
    slow = "disk"
    [stores.unused]
    type = "memory"
"#;

#[test]
fn every_type_parses_and_resolves_children_first() {
    let c = resolve(FULL).unwrap();
    let g = &c.stores;
    assert_eq!((g.cas.as_str(), g.ac.as_str(), g.worker.as_str()), ("front", "acs", "disk"));
    assert!(!g.stores.contains_key("unused") && !g.stores.contains_key(IMPLICIT_CAS), "only what is used");
    let at = |n: &str| g.order.iter().position(|o| o == n).unwrap();
    for (parent, spec) in &g.stores {
        for (_, child) in spec.children() {
            assert!(at(child) < at(parent), "{child} before {parent}: {:?}", g.order);
        }
    }
    let StoreSpec::ExistenceCache(front) = &g.stores["front"] else { panic!() };
    assert_eq!((front.ttl, front.max_entries), (Duration::from_secs(300), 1_000_000));
    let StoreSpec::Sharded(spread) = &g.stores["spread"] else { panic!() };
    assert_eq!(spread.shards[1].weight, 1, "weight defaults to 1");
    assert_eq!(g.cas_description(), "existence_cache \"front\"");
    // Largest blob: the large side, a tier of the 1 GiB disk and the
    // 64 MiB and 10 GiB memory shards.
    assert_eq!(c.max_size, 64 << 20);
    assert_eq!(g.local_paths(), vec![PathBuf::from("/srv/distbuild/disk")]);
}

#[test]
fn refusals_name_the_key_and_the_store() {
    let cases = [
        // A reference to nothing says where it was and what exists.
        (
            "[cas]\nstore = \"nope\"\n[stores.a]\ntype = \"memory\"",
            "[cas] store = \"nope\": there is no [stores.nope] (defined: a)",
        ),
        ("[ac]\nstore = \"nope\"", "[ac] store = \"nope\""),
        ("[worker]\nstore = \"nope\"", "[worker] store = \"nope\""),
        (
            "[stores.t]\ntype = \"tiered\"\nfast = \"m\"\nslow = \"gone\"\n[stores.m]\ntype = \"memory\"",
            "[stores.t] slow = \"gone\"",
        ),
        // Cycles show their path.
        (
            "[stores.a]\ntype = \"existence_cache\"\nstore = \"b\"\n[stores.b]\ntype = \"existence_cache\"\nstore = \"a\"",
            "cycle: a -> b -> a",
        ),
        ("[stores.a]\ntype = \"existence_cache\"\nstore = \"a\"", "cycle: a -> a"),
        // A typo names the field; an unknown type names the variants.
        ("[stores.d]\ntype = \"filesystem\"\npath = \"/x\"\nmax_sise = \"1GiB\"", "unknown field `max_sise`"),
        ("[stores.t]\ntype = \"tiered\"\nfast = \"a\"\nslwo = \"b\"", "unknown field `slwo`"),
        ("[stores.s]\ntype = \"sharded\"\nshards = [{ store = \"a\", wieght = 2 }]", "unknown field `wieght`"),
        ("[stores.x]\ntype = \"tape\"", "unknown variant `tape`"),
        ("[stores.x]\npath = \"/x\"", "missing field `type`"),
        ("[ac]\nstores = \"x\"", "unknown field `stores`"),
        // Zero weights, thresholds, sizes.
        (
            "[stores.s]\ntype = \"sharded\"\nshards = [{ store = \"m\", weight = 0 }]\n[stores.m]\ntype = \"memory\"",
            "[stores.s] shards: store \"m\" has weight 0",
        ),
        ("[stores.s]\ntype = \"sharded\"\nshards = []", "at least one"),
        (
            "[stores.p]\ntype = \"size_partitioned\"\nthreshold = \"0B\"\nsmall = \"a\"\nlarge = \"b\"",
            "[stores.p] threshold must be larger than zero",
        ),
        ("[stores.m]\ntype = \"memory\"\nmax_size = \"0B\"", "[stores.m] max_size"),
        ("[stores.e]\ntype = \"existence_cache\"\nstore = \"m\"\nttl = \"0s\"", "[stores.e] ttl"),
        ("[stores.\"a b\"]\ntype = \"memory\"", "a store's name"),
        // The ActionCache on a blob-only chain says which link has none.
        (
            "[cas]\nstore = \"e\"\n[ac]\nstore = \"e\"\n[stores.e]\ntype = \"existence_cache\"\nstore = \"m\"\n\
             [stores.m]\ntype = \"memory\"\nmax_entries = 0",
            "[ac] store = \"e\" keeps no ActionCache: existence_cache \"e\" forwards the ActionCache to \"m\"; \
             memory store \"m\" has max_entries = 0",
        ),
        (
            "[cas]\nstore = \"p\"\n[stores.p]\ntype = \"size_partitioned\"\nsmall = \"m\"\nlarge = \"d\"\n\
             [stores.m]\ntype = \"memory\"\nmax_entries = 0\n[stores.d]\ntype = \"filesystem\"\npath = \"/d\"",
            "[cas] store (the ActionCache's too, without [ac] store) = \"p\" keeps no ActionCache: \
             size_partitioned \"p\" keeps the ActionCache in its small store \"m\"",
        ),
        // Write-behind needs a durable fast tier.
        (
            "[cas]\nstore = \"t\"\n[stores.t]\ntype = \"tiered\"\nfast = \"m\"\nslow = \"d\"\nwrite = \"behind\"\n\
             [stores.m]\ntype = \"memory\"\n[stores.d]\ntype = \"filesystem\"\npath = \"/d\"",
            "[stores.t] write = \"behind\"",
        ),
        // One directory, one filesystem store.
        (
            "[stores.a]\ntype = \"filesystem\"\npath = \"/d\"\n[stores.b]\ntype = \"filesystem\"\npath = \"/d\"",
            "are both filesystem stores in /d",
        ),
    ];
    for (text, needle) in cases {
        let msg = refused(text);
        assert!(msg.contains(needle), "{text:?}:\n  {msg}\n  wanted: {needle}");
    }
}

#[test]
fn cas_store_refuses_the_sections_own_store_keys() {
    let stores = "[stores.m]\ntype = \"memory\"\n";
    for key in
        ["backend = \"memory\"", "root = \"/x\"", "max_size = \"1GiB\"", "backend = \"filesystem\"", "fsync = true"]
    {
        let msg = refused(&format!("[cas]\nstore = \"m\"\n{key}\n{stores}"));
        let name = key.split(' ').next().unwrap();
        assert!(msg.contains(&format!("[cas] {name}")) && msg.contains("[stores.m]"), "{key}: {msg}");
    }
    // The keys that are not about the store stay allowed.
    resolve(&format!("[cas]\nstore = \"m\"\nmax_batch_size = \"8MiB\"\n{stores}")).unwrap();
    // A write-behind tier over a durable fast tier is fine.
    resolve(
        "[cas]\nstore = \"t\"\n[stores.t]\ntype = \"tiered\"\nfast = \"d\"\nslow = \"m\"\nwrite = \"behind\"\n\
         [stores.m]\ntype = \"memory\"\n[stores.d]\ntype = \"filesystem\"\npath = \"/d\"",
    )
    .unwrap();
}

#[test]
fn without_stores_the_graph_is_the_cas_sections_store() {
    let c = resolve("[cas]\nroot = \"/srv/x\"").unwrap();
    let fs = StoreSpec::Filesystem(FilesystemConfig {
        path: "/srv/x".into(),
        max_size: ByteSize::gib(10),
        fsync: false,
        verify_reads_below: ByteSize::b(DEFAULT_VERIFY_READS_BELOW),
        min_retention: DEFAULT_MIN_RETENTION,
    });
    let expected = StoreGraph {
        stores: [(IMPLICIT_CAS.to_string(), fs)].into(),
        order: vec![IMPLICIT_CAS.to_string()],
        cas: IMPLICIT_CAS.into(),
        ac: IMPLICIT_CAS.into(),
        worker: IMPLICIT_CAS.into(),
    };
    assert_eq!(c.stores, expected);
    assert_eq!((c.stores.cas_description(), c.stores.cas_dir()), ("filesystem".into(), "/srv/x".into()));
    let c = resolve("[cas]\nbackend = \"memory\"\nmax_size = \"1GiB\"\nmin_retention = \"5m\"").unwrap();
    let memory = MemoryConfig {
        max_size: ByteSize::gib(1),
        max_entries: DEFAULT_MEMORY_AC_ENTRIES,
        min_retention: Duration::from_secs(300),
    };
    assert_eq!(c.stores.stores[IMPLICIT_CAS], StoreSpec::Memory(memory));
    assert_eq!(c.max_size, 1 << 30);
    // [stores] beside the [cas] section's own store: [ac] may pick one.
    let c = resolve("[ac]\nstore = \"m\"\n[stores.m]\ntype = \"memory\"").unwrap();
    assert_eq!((c.stores.cas.as_str(), c.stores.ac.as_str()), (IMPLICIT_CAS, "m"));
}

#[tokio::test]
async fn the_default_config_builds_the_filesystem_store_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let mut file = FileConfig::parse("").unwrap();
    file.cas.root = Some(dir.path().to_path_buf());
    let stores = crate::store::graph::open(&file.resolve().unwrap().stores).await.unwrap();
    assert!(Arc::ptr_eq(&stores.cas, &stores.worker), "the workers use the CAS itself");
    let (d, data) = salted_blob(salt(), 1, 1000);
    stores.cas.put_bytes(&d, data).await.unwrap();
    let key = crate::ac::AcKey::derived("graph-test", &["1"]);
    stores.ac.put(&key, Bytes::from_static(b"entry")).await.unwrap();
    // The same layout as ever: blobs and entries under the root, scrubbable.
    let files = |sub: &str| walkdir(&dir.path().join(sub));
    assert_eq!(files("ac").len(), 1);
    assert!(files("").iter().any(|p| p.file_name().unwrap().to_string_lossy().contains(&d.hash_hex())));
    assert_eq!(stores.scrub.scrub().await.unwrap().intact, 1);
    assert_eq!(stores.cas.usage().max_bytes, 10 << 30);
}

fn walkdir(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() { out.extend(walkdir(&path)) } else { out.push(path) }
    }
    out
}

#[tokio::test]
async fn a_store_named_twice_is_one_object() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[cas]\nstore = \"tier\"\n[worker]\nstore = \"mem\"\n\
         [stores.mem]\ntype = \"memory\"\n\
         [stores.disk]\ntype = \"filesystem\"\npath = {:?}\n\
         [stores.tier]\ntype = \"tiered\"\nfast = \"mem\"\nslow = \"disk\"",
        dir.path().join("disk")
    );
    let stores = crate::store::graph::open(&resolve(&text).unwrap().stores).await.unwrap();
    assert!(!Arc::ptr_eq(&stores.cas, &stores.worker));
    // Written by a worker into "mem": the CAS's fast tier is that store.
    let (d, data) = salted_blob(salt(), 1, 1000);
    stores.worker.put_bytes(&d, data.clone()).await.unwrap();
    assert!(stores.cas.find_missing(&[d]).await.unwrap().is_empty());
    // The worker's store is verified too.
    let (e, _) = salted_blob(salt(), 2, 1000);
    assert_eq!(stores.worker.put_bytes(&e, data).await.unwrap_err().code, Code::InvalidArgument);
    // A tiered CAS cannot scrub itself: a clear refusal, not a panic.
    let err = stores.scrub.scrub().await.unwrap_err();
    assert_eq!(err.code, Code::FailedPrecondition);
    assert!(err.message.contains("tiered \"tier\""), "{}", err.message);
    // Both tiers keep an ActionCache: the CAS store's is the tiered one.
    let key = crate::ac::AcKey::derived("graph-test", &["2"]);
    stores.ac.put(&key, Bytes::from_static(b"x")).await.unwrap();
    assert_eq!(walkdir(&dir.path().join("disk/ac")).len(), 1, "written through to the slow tier");
}

#[test]
fn the_readme_example_resolves() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = &readme[readme.find("### Composed stores").expect("the README section")..];
    let start = section.find("```toml\n").unwrap() + "```toml\n".len();
    let example = &section[start..start + section[start..].find("```").unwrap()];
    let c = resolve(example).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(c.stores.cas, "cache");
    assert_eq!(c.stores.order.len(), 8);
}
