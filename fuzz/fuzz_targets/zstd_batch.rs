//! zstd items of BatchUpdateBlobs, through the real service over a memory
//! store: whatever the items claim (sizes up to 2^63, digests true or not,
//! corrupt or bomb frames), the call never panics or allocates beyond its
//! limits, and every item it acknowledges is stored with bytes that hash to
//! its digest.
#![no_main]

use std::io::Read;
use std::sync::{Arc, LazyLock};

use cargo_distbuild::cas::CasService;
use cargo_distbuild::store::memory::MemoryStore;
use cargo_distbuild::store::{Store, cas};
use libfuzzer_sys::fuzz_target;
use remote_apis::reapi::content_addressable_storage_server::ContentAddressableStorage;
use remote_apis::reapi::{BatchUpdateBlobsRequest, batch_update_blobs_request, compressor};
use remote_apis::{Digest, DigestFunction};

/// The batch limit of the service under test (the server's default).
const MAX_BATCH: u64 = cargo_distbuild::config::DEFAULT_MAX_BATCH;

static RUNTIME: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_current_thread().build().expect("tokio runtime"));

/// One item: whether its digest is the true one of what the data decodes
/// to (else `size` and a hash of the data itself), the claimed size, and
/// the compressed bytes.
type Item = (bool, u64, Vec<u8>);

/// What `data` decodes to, read no further than just past `limit`.
fn decoded_prefix(data: &[u8], limit: u64) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    zstd::stream::read::Decoder::new(data).ok()?.take(limit + 1).read_to_end(&mut out).ok()?;
    Some(out)
}

fn digest_of_item((truthful, size, data): &Item) -> Digest {
    let function = DigestFunction::Sha256;
    match decoded_prefix(data, MAX_BATCH).filter(|_| *truthful) {
        Some(plain) => function.digest_of(&plain),
        None => {
            let hash = function.digest_of(data).hash_hex();
            Digest::new(function, &hash, (*size & (i64::MAX as u64)) as i64).expect("a well-formed digest")
        }
    }
}

fuzz_target!(|items: Vec<Item>| {
    let store: Store = cas(Arc::new(MemoryStore::new(1 << 30)));
    let service = CasService::new(store.clone(), MAX_BATCH);
    let digests: Vec<Digest> = items.iter().map(digest_of_item).collect();
    let requests = items
        .into_iter()
        .zip(&digests)
        .map(|((_, _, data), d)| batch_update_blobs_request::Request {
            digest: Some(d.to_proto()),
            data: data.into(),
            compressor: compressor::Value::Zstd as i32,
        })
        .collect();
    let request = BatchUpdateBlobsRequest { requests, ..Default::default() };
    RUNTIME.block_on(async {
        let Ok(response) = service.batch_update_blobs(tonic::Request::new(request)).await else { return };
        for r in response.into_inner().responses {
            if r.status.as_ref().is_some_and(|s| s.code != 0) {
                continue;
            }
            let d = Digest::from_field(DigestFunction::Sha256, r.digest.as_ref(), "digest").expect("answered digest");
            assert!(digests.contains(&d), "an answer for {d}, which was not sent");
            let stored = store.get_bytes(&d).await.expect("an acknowledged blob is stored");
            assert_eq!(DigestFunction::Sha256.digest_of(&stored), d, "acknowledged blob {d} holds other bytes");
        }
    });
});
