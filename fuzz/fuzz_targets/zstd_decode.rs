//! The one bounded zstd decoder of uploads (batch items and ByteStream
//! writes), fed as ByteStream feeds it: the data cut into chunks anywhere,
//! against a digest whose size is any claim up to 2^63. It never panics,
//! never allocates from the claim (a 2^62 claim aborted the server), and
//! a blob it lets the store commit hashes to its digest.
#![no_main]

use std::io::Read;
use std::sync::{Arc, LazyLock};

use cargo_distbuild::cas::decode::BoundedDecoder;
use cargo_distbuild::store::memory::MemoryStore;
use cargo_distbuild::store::{Store, cas};
use libfuzzer_sys::fuzz_target;
use remote_apis::{Digest, DigestFunction};

static RUNTIME: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_current_thread().build().expect("tokio runtime"));

/// Decoded bytes the target computes a true digest for.
const TRUE_LIMIT: u64 = 16 << 20;

/// The digest to decode against: the true one of what `data` decodes to
/// when `truthful` and it decodes, else `size` with the hash of the data.
fn digest_for(truthful: bool, size: u64, data: &[u8]) -> Digest {
    let function = DigestFunction::Sha256;
    if truthful {
        let mut plain = Vec::new();
        if let Ok(d) = zstd::stream::read::Decoder::new(data)
            && d.take(TRUE_LIMIT).read_to_end(&mut plain).is_ok()
        {
            return function.digest_of(&plain);
        }
    }
    let hash = function.digest_of(data).hash_hex();
    Digest::new(function, &hash, (size & i64::MAX as u64) as i64).expect("a well-formed digest")
}

fuzz_target!(|input: (bool, u64, Vec<u16>, &[u8])| {
    let (truthful, size, cuts, data) = input;
    let digest = digest_for(truthful, size, data);
    let store: Store = cas(Arc::new(MemoryStore::new(1 << 30)));
    RUNTIME.block_on(async {
        let Ok(mut decoder) = BoundedDecoder::new(digest) else { return };
        let Ok(mut sink) = store.put(&digest).await else { return };
        let mut rest = data;
        for cut in cuts.iter().map(|&c| usize::from(c)).chain([usize::MAX]) {
            let (chunk, tail) = rest.split_at(cut.min(rest.len()));
            rest = tail;
            if decoder.feed(chunk, sink.as_mut()).await.is_err() {
                return;
            }
            if rest.is_empty() {
                break;
            }
        }
        if decoder.finish().is_err() || sink.commit().await.is_err() {
            return;
        }
        let stored = store.get_bytes(&digest).await.expect("a committed blob is stored");
        assert_eq!(DigestFunction::Sha256.digest_of(&stored), digest, "committed blob {digest} holds other bytes");
    });
});
