//! Blob splitting and splicing (REAPI 2.12 SplitBlob/SpliceBlob, 2.13
//! GetChunkMapping/RegisterChunkMapping).
//!
//! Splitting is content-defined (FastCDC 2020 from the `fastcdc` crate), so
//! similar large blobs share chunks and a client that holds some of them
//! fetches only the rest. The response says `UNKNOWN` for the chunking
//! function: the spec lets the server choose, and our parameters are not
//! advertised as a standard profile a client could reproduce. Splicing
//! assembles the blob from chunks already in the CAS through the same
//! verifying write path as every upload, so a wrong digest stores nothing.
//! No mapping is kept: the blob itself is what a splice produces.

use futures::StreamExt;
use remote_apis::Digest;
use tokio_util::io::StreamReader;

use crate::error::{Error, Result};
use crate::store::Store;

/// Chunk sizes: large enough that chunk bookkeeping stays small, small enough
/// that an edit in a large blob costs about one chunk.
const MIN_CHUNK: u32 = 128 << 10;
const AVG_CHUNK: u32 = 512 << 10;
const MAX_CHUNK: u32 = 2 << 20;

/// Splits a stored blob into content-defined chunks, stores each chunk, and
/// returns their digests in order. NOT_FOUND when the blob is absent.
pub async fn split(cas: &Store, blob: Digest) -> Result<Vec<Digest>> {
    if !cas.find_missing(&[blob]).await?.is_empty() {
        return Err(Error::blob_not_found(&blob));
    }
    if blob.size <= MIN_CHUNK as u64 {
        // One chunk: the blob itself (none for the empty blob).
        return Ok(if blob.size == 0 { Vec::new() } else { vec![blob] });
    }
    let stream = cas.get(&blob, 0, None).await?.map(|r| r.map_err(|e| std::io::Error::other(e.to_string())));
    let mut cdc = fastcdc::v2020::AsyncStreamCDC::new(StreamReader::new(stream), MIN_CHUNK, AVG_CHUNK, MAX_CHUNK);
    let chunks = cdc.as_stream();
    tokio::pin!(chunks);
    let mut digests = Vec::new();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| Error::internal(format!("splitting {blob}: {e}")))?;
        let digest = blob.function.digest_of(&chunk.data);
        if cas.find_missing(&[digest]).await?.len() == 1 {
            cas.put_bytes(&digest, chunk.data.into()).await?;
        }
        digests.push(digest);
    }
    Ok(digests)
}

/// Stores `blob` as the concatenation of `chunks`, which must all be in the
/// CAS (NOT_FOUND names the absent ones). The assembled bytes are verified
/// against `blob` (INVALID_ARGUMENT, nothing stored, when they differ). A
/// blob that is already stored is left as it is.
pub async fn splice(cas: &Store, blob: Digest, chunks: &[Digest]) -> Result<()> {
    if let Some(c) = chunks.iter().find(|c| c.function != blob.function) {
        return Err(Error::bad_field("chunk_digests", format!("{c} does not use the blob's digest function")));
    }
    let total: u64 = chunks.iter().map(|c| c.size).sum();
    if total != blob.size {
        return Err(Error::bad_field(
            "chunk_digests",
            format!("the chunks total {total} bytes but blob {blob} has {}", blob.size),
        ));
    }
    if cas.find_missing(&[blob]).await?.is_empty() {
        return Ok(());
    }
    let missing = cas.find_missing(chunks).await?;
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().take(5).map(|d| d.to_string()).collect();
        let mut e = Error::not_found(format!("chunks missing from the CAS: {}", list.join(", ")));
        e.missing = missing;
        return Err(e);
    }
    let mut sink = cas.put(&blob).await?;
    for chunk in chunks {
        let mut data = cas.get(chunk, 0, None).await?;
        while let Some(bytes) = data.next().await {
            sink.write(bytes?).await?;
        }
    }
    sink.commit().await.map_err(|e| e.context(format!("splicing {blob}")))
}
