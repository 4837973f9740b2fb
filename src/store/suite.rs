//! The behaviour asked of every blob store and every ActionCache store,
//! whatever its backend or decorators: each backend's tests run these over
//! a freshly opened instance (`tests.rs` for memory and filesystem, the
//! engine-backed ones next to their backend).
//!
//! Blobs are salted per run, so two runs against one long-lived engine (a
//! shared Redis, a bucket) never see each other's blobs.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use remote_apis::{Digest, DigestFunction, InstanceName};
use tonic::Code;

use super::Store;
use crate::ac::{AcKey, AcStore};

/// Bytes unique to this run and `seed`.
pub(crate) fn salted_blob(salt: u64, seed: u8, len: usize) -> (Digest, Bytes) {
    let mut data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
    let tag = salt.to_le_bytes();
    for (i, b) in data.iter_mut().take(8).enumerate() {
        *b = tag[i];
    }
    (DigestFunction::Sha256.digest_of(&data), Bytes::from(data))
}

pub(crate) fn salt() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0
}

async fn read_all(store: &Store, d: &Digest, offset: u64, limit: Option<u64>) -> crate::error::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut s = store.get(d, offset, limit).await?;
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c?);
    }
    Ok(out)
}

/// Every check of a CAS store (`store` is already behind [`super::cas`]).
pub(crate) async fn blob_suite(name: &str, store: Store) {
    let salt = salt();
    put_get_ranges_and_missing(name, &store, salt).await;
    writes_are_verified_and_leave_nothing(name, &store, salt).await;
    empty_blob_is_always_present(name, &store).await;
    concurrent_identical_uploads(name, &store, salt).await;
}

async fn put_get_ranges_and_missing(name: &str, store: &Store, salt: u64) {
    let (d, data) = salted_blob(salt, 1, 3 << 20);
    assert_eq!(store.find_missing(&[d]).await.unwrap(), vec![d], "{name}");
    store.put_bytes(&d, data.clone()).await.unwrap();
    assert!(store.find_missing(&[d]).await.unwrap().is_empty(), "{name}");
    assert_eq!(store.get_bytes(&d).await.unwrap(), data, "{name}");
    assert_eq!(read_all(store, &d, 1000, Some(5000)).await.unwrap(), &data[1000..6000], "{name}");
    assert_eq!(read_all(store, &d, d.size - 10, None).await.unwrap(), &data[data.len() - 10..], "{name}");
    assert_eq!(read_all(store, &d, d.size, None).await.unwrap(), b"", "{name}: a read at the end is empty");
    let err = store.get(&d, d.size + 1, None).await.err().unwrap();
    assert_eq!(err.code, Code::OutOfRange, "{name}");
    let (absent, _) = salted_blob(salt, 2, 10);
    assert_eq!(store.get(&absent, 0, None).await.err().unwrap().code, Code::NotFound, "{name}");
    // Order is kept and only the absent ones come back.
    let (small, sdata) = salted_blob(salt, 3, 100);
    store.put_bytes(&small, sdata.clone()).await.unwrap();
    assert_eq!(store.find_missing(&[absent, d, small]).await.unwrap(), vec![absent], "{name}");
    assert_eq!(store.get_bytes(&small).await.unwrap(), sdata, "{name}");
    // Rewriting a present blob is fine and changes nothing.
    store.put_bytes(&small, sdata.clone()).await.unwrap();
    assert_eq!(store.get_bytes(&small).await.unwrap(), sdata, "{name}");
}

async fn writes_are_verified_and_leave_nothing(name: &str, store: &Store, salt: u64) {
    let (d, data) = salted_blob(salt, 4, 1000);
    let err = store.put_bytes(&d, Bytes::from(vec![0u8; 1000])).await.unwrap_err();
    assert_eq!(err.code, Code::InvalidArgument, "{name}");
    let mut sink = store.put(&d).await.unwrap();
    sink.write(data.clone()).await.unwrap();
    assert_eq!(sink.write(Bytes::from_static(b"x")).await.unwrap_err().code, Code::InvalidArgument, "{name}");
    drop(sink);
    let mut sink = store.put(&d).await.unwrap();
    sink.write(data.slice(..10)).await.unwrap();
    assert_eq!(sink.commit().await.unwrap_err().code, Code::InvalidArgument, "{name}");
    // A sink dropped half-way leaves no trace either.
    let mut sink = store.put(&d).await.unwrap();
    sink.write(data.slice(..500)).await.unwrap();
    drop(sink);
    assert_eq!(store.find_missing(&[d]).await.unwrap(), vec![d], "{name}: nothing stored");
    assert_eq!(store.get(&d, 0, None).await.err().unwrap().code, Code::NotFound, "{name}");
    let empty = DigestFunction::Sha256.empty();
    assert!(store.put_bytes(&empty, Bytes::from_static(b"x")).await.is_err(), "{name}");
}

async fn empty_blob_is_always_present(name: &str, store: &Store) {
    for f in DigestFunction::ALL {
        assert!(store.find_missing(&[f.empty()]).await.unwrap().is_empty(), "{name} {f}");
        assert!(store.get_bytes(&f.empty()).await.unwrap().is_empty(), "{name} {f}");
    }
}

async fn concurrent_identical_uploads(name: &str, store: &Store, salt: u64) {
    let (d, data) = salted_blob(salt, 20, 2 << 20);
    let before = store.usage().used_bytes;
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (store, data) = (store.clone(), data.clone());
            tokio::spawn(async move {
                let mut sink = store.put(&d).await?;
                for chunk in data.chunks(64 << 10) {
                    sink.write(Bytes::copy_from_slice(chunk)).await?;
                    tokio::task::yield_now().await;
                }
                sink.commit().await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(store.get_bytes(&d).await.unwrap(), data, "{name}");
    if store.usage().max_bytes > 0 {
        assert_eq!(store.usage().used_bytes - before, d.size, "{name}: counted once");
    }
}

/// Every check of an ActionCache store.
pub(crate) async fn ac_suite(name: &str, ac: Arc<dyn AcStore>) {
    ac_checks(name, ac, true).await;
}

/// The checks for a store that cannot delete (another REAPI server: the
/// API has no delete): `remove` succeeds and may leave the entry.
pub(crate) async fn ac_suite_without_remove(name: &str, ac: Arc<dyn AcStore>) {
    ac_checks(name, ac, false).await;
}

/// An encoded ActionResult, as the ActionCache service stores them: values
/// under an action's key are those (a store may rely on it), values under a
/// derived key are any bytes.
fn result_bytes(stdout: &[u8]) -> Bytes {
    use prost::Message;
    let result = remote_apis::reapi::ActionResult { stdout_raw: stdout.to_vec(), ..Default::default() };
    Bytes::from(result.encode_to_vec())
}

async fn ac_checks(name: &str, ac: Arc<dyn AcStore>, removes: bool) {
    let salt = salt().to_string();
    let instance = InstanceName::new(&format!("suite-{salt}")).unwrap();
    let (action, _) = salted_blob(salt.len() as u64, 9, 10);
    let key = AcKey::new(&instance, &action);
    let other = AcKey::new(&InstanceName::new(&format!("other-{salt}")).unwrap(), &action);
    let derived = AcKey::derived("suite", &[&salt]);
    let (first, second) = (result_bytes(b"first"), result_bytes(b"second"));
    assert_eq!(ac.get(&key).await.unwrap(), None, "{name}");
    ac.put(&key, first.clone()).await.unwrap();
    assert_eq!(ac.get(&key).await.unwrap(), Some(first), "{name}");
    assert_eq!(ac.get(&other).await.unwrap(), None, "{name}: another instance's entry is another entry");
    ac.put(&key, second.clone()).await.unwrap();
    assert_eq!(ac.get(&key).await.unwrap(), Some(second.clone()), "{name}: replaced");
    ac.put(&derived, Bytes::from_static(b"record")).await.unwrap();
    assert_eq!(ac.get(&derived).await.unwrap().as_deref(), Some(&b"record"[..]), "{name}");
    ac.remove(&key).await.unwrap();
    let after_remove = if removes { None } else { Some(second) };
    assert_eq!(ac.get(&key).await.unwrap(), after_remove, "{name}: removed");
    ac.remove(&key).await.unwrap();
    assert_eq!(ac.get(&derived).await.unwrap().as_deref(), Some(&b"record"[..]), "{name}: the other stays");
    // A value of some size, and an empty one.
    let big = result_bytes(&vec![7u8; 300 << 10]);
    ac.put(&other, big.clone()).await.unwrap();
    assert_eq!(ac.get(&other).await.unwrap(), Some(big), "{name}");
    ac.put(&other, Bytes::new()).await.unwrap();
    assert_eq!(ac.get(&other).await.unwrap(), Some(Bytes::new()), "{name}");
    let big_record = Bytes::from(vec![9u8; 300 << 10]);
    ac.put(&derived, big_record.clone()).await.unwrap();
    assert_eq!(ac.get(&derived).await.unwrap(), Some(big_record), "{name}: a large derived value");
}
