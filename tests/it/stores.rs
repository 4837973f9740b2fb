//! A server on a composed store graph (`[stores]`, `[cas]`/`[ac]`/`[worker]
//! store`): the cache, the built-in workers and the admin calls work
//! through it, and what it acknowledged survives a restart.

use std::path::{Path, PathBuf};

use cargo_distbuild::admin::proto::admin_client::AdminClient;
use cargo_distbuild::admin::proto::{GetStoreStatusRequest, VerifyBlobsRequest};
use cargo_distbuild::config::{Backend, FileConfig};
use remote_apis::{Digest, DigestFunction};

use crate::common::{TestServer, assert_code};
use crate::execution::{Act, execute};

/// A disk behind a memory tier, an existence cache in front; the
/// ActionCache on the disk; the workers skip the existence cache.
fn graph(dir: &Path) -> FileConfig {
    FileConfig::parse(&format!(
        r#"
        [cas]
        store = "front"
        [ac]
        store = "disk"
        [worker]
        store = "tier"
        [stores.mem]
        type = "memory"
        max_size = "256MiB"
        [stores.disk]
        type = "filesystem"
        path = {disk:?}
        [stores.tier]
        type = "tiered"
        fast = "mem"
        slow = "disk"
        [stores.front]
        type = "existence_cache"
        store = "tier"
        ttl = "1m"
        "#,
        disk = dir.join("disk"),
    ))
    .unwrap()
}

async fn start(dir: &Path) -> TestServer {
    let parsed = graph(dir);
    TestServer::start_in(dir, Backend::Filesystem, |f| {
        // The [cas] section's own store keys stay unset beside `store`.
        f.cas.root = None;
        f.cas.store = parsed.cas.store;
        f.ac = parsed.ac;
        f.stores = parsed.stores;
        f.worker.store = parsed.worker.store;
        f.worker.work_dir = Some(dir.join("worker"));
    })
    .await
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() { out.extend(files(&path)) } else { out.push(path) }
    }
    out
}

#[tokio::test]
async fn a_server_runs_on_a_composed_store_graph() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let act = Act { script: "echo composed > out".into(), output_paths: vec!["out"], ..Default::default() };
    let r = execute(&server, &act).await;
    assert!(r.status.as_ref().is_none_or(|s| s.code == 0), "{:?}", r.status);
    let result = r.result.unwrap();
    let out = Digest::from_proto(DigestFunction::Sha256, result.output_files[0].digest.as_ref().unwrap()).unwrap();
    assert_eq!(server.client().read_blob(out).await.unwrap(), "composed\n");
    // Written by the worker through the tier: on the disk, beside the
    // ActionCache entry.
    let on_disk = files(&dir.path().join("disk"));
    assert!(on_disk.iter().any(|p| p.to_string_lossy().contains(&out.hash_hex())), "{on_disk:?}");
    assert!(!files(&dir.path().join("disk/ac")).is_empty());
    // The largest blob is the smaller tier's budget.
    assert_eq!(server.get_capabilities().await.cache_capabilities.unwrap().max_cas_blob_size_bytes, 256 << 20);

    let mut admin = AdminClient::new(server.channel.clone());
    let status = admin.get_store_status(GetStoreStatusRequest {}).await.unwrap().into_inner();
    assert_eq!((status.backend.as_str(), status.data_dir.as_str()), ("existence_cache \"front\"", ""));
    let refused = assert_code(admin.verify_blobs(VerifyBlobsRequest {}).await, tonic::Code::FailedPrecondition);
    assert!(refused.message().contains("cannot be scrubbed"), "{}", refused.message());
    server.stop().await.unwrap();

    // The memory tier is gone after a restart; the disk answers, and the
    // ActionCache entry is a hit.
    let server = start(dir.path()).await;
    assert_eq!(server.client().read_blob(out).await.unwrap(), "composed\n");
    assert!(execute(&server, &act).await.cached_result);
    server.stop().await.unwrap();
}
