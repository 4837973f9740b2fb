//! The same behaviour asked of every backend, plus what is specific to the
//! filesystem store (atomic files, restart, torn files).

use std::sync::Arc;

use bytes::Bytes;
use remote_apis::{Digest, DigestFunction};
use tonic::Code;

use super::fs::FsStore;
use super::memory::MemoryStore;
use super::{Store, cas};

fn blob(seed: u8, len: usize) -> (Digest, Bytes) {
    let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
    (DigestFunction::Sha256.digest_of(&data), Bytes::from(data))
}

async fn backends(dir: &std::path::Path, max: u64) -> Vec<(&'static str, Store)> {
    vec![
        ("memory", cas(Arc::new(MemoryStore::new(max)))),
        ("fs", cas(Arc::new(FsStore::open(dir, max, false, 0).unwrap()))),
    ]
}

/// The shared suite (`suite.rs`) over both built-in backends.
#[tokio::test]
async fn memory_and_filesystem_pass_the_store_suite() {
    let dir = tempfile::tempdir().unwrap();
    for (name, store) in backends(dir.path(), 1 << 30).await {
        super::suite::blob_suite(name, store).await;
    }
    // Writer threads remove their files once the sink is gone.
    let leftovers = || walk(dir.path()).iter().filter(|p| is_temp(p)).count();
    for _ in 0..100 {
        if leftovers() == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(leftovers(), 0, "temporary files of failed writes are removed");
    let ac_dir = tempfile::tempdir().unwrap();
    super::suite::ac_suite("memory", Arc::new(crate::ac::MemoryAcStore::new(100))).await;
    super::suite::ac_suite("fs", Arc::new(crate::ac::FsAcStore::open(ac_dir.path()).unwrap())).await;
}

#[tokio::test]
async fn least_recently_used_blobs_are_evicted_first() {
    let dir = tempfile::tempdir().unwrap();
    for (name, store) in backends(dir.path(), 3000).await {
        let (a, da) = blob(10, 1000);
        let (b, db) = blob(11, 1000);
        let (c, dc) = blob(12, 1000);
        let (e, de) = blob(13, 1000);
        store.put_bytes(&a, da).await.unwrap();
        store.put_bytes(&b, db).await.unwrap();
        store.put_bytes(&c, dc).await.unwrap();
        // Touch `a`, so `b` is now the least recently used.
        assert!(store.find_missing(&[a]).await.unwrap().is_empty());
        store.put_bytes(&e, de).await.unwrap();
        assert_eq!(store.find_missing(&[a, b, c, e]).await.unwrap(), vec![b], "{name}");
        assert!(store.usage().used_bytes <= 3000, "{name}");
        // A blob larger than the whole budget is refused.
        let (big, dbig) = blob(14, 4000);
        assert_eq!(store.put_bytes(&big, dbig).await.unwrap_err().code, Code::InvalidArgument, "{name}");
    }
    let files = walk(&dir.path().join("cas"));
    assert_eq!(files.len(), 3, "evicted files are deleted: {files:?}");
}

/// `[cas] min_retention` under pressure: blobs used within it (reported
/// present, written, read) are never evicted; older ones go first as usual;
/// when only protected blobs remain a write is RESOURCE_EXHAUSTED, evicts
/// nothing and stays within the budget.
#[tokio::test]
async fn recently_used_blobs_survive_pressure() {
    let hour = std::time::Duration::from_secs(3600);
    let dir = tempfile::tempdir().unwrap();
    let memory = MemoryStore::new(3000).with_min_retention(hour);
    let fs = FsStore::open(dir.path(), 3000, false, 0).unwrap().with_min_retention(hour);
    let (m, f) = (memory.clone(), fs.clone());
    /// A backend and the way to make two hours pass for its blobs.
    type Aged = (&'static str, Store, Box<dyn Fn()>);
    let age_all: [Aged; 2] = [
        ("memory", cas(Arc::new(memory)), Box::new(move || m.age_all(2 * hour))),
        ("fs", cas(Arc::new(fs)), Box::new(move || f.age_all(2 * hour))),
    ];
    for (name, store, age_all) in age_all {
        let blobs: Vec<(Digest, Bytes)> = (0..6).map(|i| blob(40 + i, 1000)).collect();
        let d: Vec<Digest> = blobs.iter().map(|(d, _)| *d).collect();
        for (digest, data) in &blobs[..3] {
            store.put_bytes(digest, data.clone()).await.unwrap();
        }
        // All three were just written: the store is full of protected blobs.
        let err = store.put_bytes(&d[3], blobs[3].1.clone()).await.unwrap_err();
        assert_eq!(err.code, Code::ResourceExhausted, "{name}: {}", err.message);
        assert!(err.message.contains("min_retention"), "{name}: {}", err.message);
        assert!(err.message.contains("1h"), "{name}: {}", err.message);
        assert_eq!(store.find_missing(&d[..3]).await.unwrap(), vec![], "{name}: nothing evicted");
        assert!(store.put(&d[3]).await.is_err(), "{name}: a stream is refused before its bytes travel");

        // Two hours later, the client asks about d[1] (FindMissing) and reads d[2].
        age_all();
        assert!(store.find_missing(&[d[1]]).await.unwrap().is_empty());
        store.get_bytes(&d[2]).await.unwrap();
        // Only d[0] is old: one new blob fits, the next does not.
        store.put_bytes(&d[3], blobs[3].1.clone()).await.unwrap();
        let err = store.put_bytes(&d[4], blobs[4].1.clone()).await.unwrap_err();
        assert_eq!(err.code, Code::ResourceExhausted, "{name}");
        assert_eq!(store.find_missing(&d[..5]).await.unwrap(), vec![d[0], d[4]], "{name}");
        assert!(store.usage().used_bytes <= 3000, "{name}: {}", store.usage().used_bytes);
        // Rewriting a present blob counts as a use and needs no room.
        store.put_bytes(&d[1], blobs[1].1.clone()).await.unwrap();
        age_all();
        // Everything is old now: plain LRU again.
        store.put_bytes(&d[5], blobs[5].1.clone()).await.unwrap();
        assert_eq!(store.find_missing(&d[1..4]).await.unwrap().len(), 1, "{name}: one blob made room");
    }
}

#[tokio::test]
async fn filesystem_store_survives_restart_and_drops_torn_files() {
    let dir = tempfile::tempdir().unwrap();
    let (a, da) = blob(30, 5000);
    let (b, db) = blob(31, 5000);
    {
        let store = cas(Arc::new(FsStore::open(dir.path(), 1 << 20, true, 0).unwrap()));
        store.put_bytes(&a, da.clone()).await.unwrap();
        store.put_bytes(&b, db).await.unwrap();
        // An unfinished write left behind by a crash.
        let prefix = dir.path().join("cas/sha256/00");
        std::fs::write(prefix.join(".tmp-crashed"), b"partial").unwrap();
    }
    // Power loss after the rename but before the data: a short file.
    let b_path =
        walk(&dir.path().join("cas")).into_iter().find(|p| p.to_string_lossy().contains(&b.hash_hex())).unwrap();
    std::fs::write(&b_path, b"torn").unwrap();

    let store = cas(Arc::new(FsStore::open(dir.path(), 1 << 20, false, 0).unwrap()));
    assert_eq!(store.get_bytes(&a).await.unwrap(), da);
    assert_eq!(store.find_missing(&[a, b]).await.unwrap(), vec![b]);
    assert!(!b_path.exists());
    assert_eq!(walk(dir.path()).iter().filter(|p| is_temp(p)).count(), 0, "unfinished writes are cleared");
    assert_eq!(store.usage().used_bytes, 5000);
}

#[tokio::test]
async fn a_file_deleted_behind_the_store_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let store = cas(Arc::new(FsStore::open(dir.path(), 1 << 20, false, 0).unwrap()));
    let (a, da) = blob(40, 100);
    store.put_bytes(&a, da).await.unwrap();
    for p in walk(&dir.path().join("cas")) {
        std::fs::remove_file(p).unwrap();
    }
    assert_eq!(store.get(&a, 0, None).await.err().unwrap().code, Code::NotFound);
    assert_eq!(store.find_missing(&[a]).await.unwrap(), vec![a]);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
        }
    }
    out
}

fn is_temp(p: &std::path::Path) -> bool {
    p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(".tmp-"))
}

#[tokio::test]
async fn reads_survive_a_restart_in_the_eviction_order() {
    let dir = tempfile::tempdir().unwrap();
    let (a, da) = blob(50, 1000);
    let (b, db) = blob(51, 1000);
    let (c, dc) = blob(52, 1000);
    {
        let store = cas(Arc::new(FsStore::open(dir.path(), 2000, false, 0).unwrap()));
        store.put_bytes(&a, da).await.unwrap();
        store.put_bytes(&b, db).await.unwrap();
    }
    // Both written two hours ago, `a` (the older) read since.
    let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    for (i, p) in walk(&dir.path().join("cas")).iter().filter(|p| !is_temp(p)).enumerate() {
        let f = std::fs::File::options().write(true).open(p).unwrap();
        let age = if p.to_string_lossy().contains(&a.hash_hex()) { 60 } else { 0 };
        f.set_modified(two_hours_ago - std::time::Duration::from_secs(age + i as u64)).unwrap();
    }
    {
        let store = cas(Arc::new(FsStore::open(dir.path(), 2000, false, 0).unwrap()));
        assert_eq!(store.get_bytes(&a).await.unwrap().len(), 1000);
    }
    let store = cas(Arc::new(FsStore::open(dir.path(), 2000, false, 0).unwrap()));
    store.put_bytes(&c, dc).await.unwrap();
    assert_eq!(store.find_missing(&[a, b, c]).await.unwrap(), vec![b], "the unread blob goes first");
}
