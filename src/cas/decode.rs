//! The one zstd decoder for uploads: BatchUpdateBlobs items and ByteStream
//! writes both go through [`BoundedDecoder`].
//!
//! It decodes incrementally into a [`BlobSink`], one bounded buffer at a
//! time, and refuses to produce more than the digest's declared size. The
//! declared size is a client's claim, so nothing is ever allocated from it:
//! a few bytes claiming 2^62 cost one small buffer, and a zstd bomb stops
//! at the first byte past the claim (which callers have already checked
//! against the batch limit and the store's budget).

use bytes::Bytes;
use remote_apis::Digest;
use zstd::stream::raw::{InBuffer, Operation, OutBuffer};

use crate::error::{Error, Result};
use crate::store::BlobSink;

/// Output buffer for one step of decoding: the most a hostile chunk can make
/// the server allocate at once, whatever it claims to expand to.
const DECODE_BUF: u64 = 256 << 10;

pub struct BoundedDecoder {
    zstd: zstd::stream::raw::Decoder<'static>,
    digest: Digest,
    produced: u64,
    /// Whether the last byte fed ended a frame.
    at_frame_end: bool,
}

impl BoundedDecoder {
    pub fn new(digest: Digest) -> Result<Self> {
        let zstd =
            zstd::stream::raw::Decoder::new().map_err(|e| Error::internal(format!("creating a zstd decoder: {e}")))?;
        Ok(BoundedDecoder { zstd, digest, produced: 0, at_frame_end: true })
    }

    /// Decodes `data` (any slice of a stream of zstd frames) and writes what
    /// it produces to `sink`. INVALID_ARGUMENT on corrupt data or output
    /// beyond the declared size.
    pub async fn feed(&mut self, data: &[u8], sink: &mut dyn BlobSink) -> Result<()> {
        if data.is_empty() {
            // Nothing is buffered between calls (see the loop's exit), and
            // running the decoder on no input would misreport a frame end.
            return Ok(());
        }
        let mut input = InBuffer::around(data);
        loop {
            // One byte beyond what is left, so output past the claim shows.
            let room = self.digest.size.saturating_sub(self.produced).saturating_add(1).min(DECODE_BUF) as usize;
            let mut out = vec![0u8; room];
            let mut output = OutBuffer::around(&mut out);
            let hint = self
                .zstd
                .run(&mut input, &mut output)
                .map_err(|e| Error::invalid(format!("zstd data for {} is corrupt: {e}", self.digest)))?;
            let n = output.pos();
            self.at_frame_end = hint == 0;
            if n > 0 {
                self.produced += n as u64;
                if self.produced > self.digest.size {
                    return Err(Error::invalid(format!(
                        "zstd data for {} decompresses to more than the digest's {} bytes",
                        self.digest, self.digest.size
                    )));
                }
                out.truncate(n);
                sink.write(Bytes::from(out)).await?;
            }
            // A buffer not filled means the decoder holds nothing more for
            // this input.
            if input.pos() == data.len() && n < room {
                return Ok(());
            }
        }
    }

    /// Checks that the data ended on a frame boundary (the verifying sink
    /// checks the size and hash at commit).
    pub fn finish(&self) -> Result<()> {
        if !self.at_frame_end {
            return Err(Error::invalid(format!("zstd data for {} ends in the middle of a frame", self.digest)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use remote_apis::DigestFunction;

    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::store::{Store, cas};

    fn store() -> Store {
        cas(Arc::new(MemoryStore::new(1 << 30)))
    }

    async fn decode(store: &Store, digest: Digest, chunks: &[&[u8]]) -> Result<()> {
        let mut decoder = BoundedDecoder::new(digest)?;
        let mut sink = store.put(&digest).await?;
        for c in chunks {
            decoder.feed(c, sink.as_mut()).await?;
        }
        decoder.finish()?;
        sink.commit().await
    }

    #[tokio::test]
    async fn frames_split_anywhere_decode_to_the_blob() {
        let blob: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let d = DigestFunction::Sha256.digest_of(&blob);
        let mut packed = zstd::bulk::compress(&blob[..100_000], 3).unwrap();
        packed.extend(zstd::bulk::compress(&blob[100_000..], 3).unwrap());
        let store = store();
        let pieces: Vec<&[u8]> = packed.chunks(7).chain([&[][..]]).collect();
        decode(&store, d, &pieces).await.unwrap();
        assert_eq!(store.get_bytes(&d).await.unwrap(), blob);
    }

    #[tokio::test]
    async fn output_stops_at_the_claim_and_torn_frames_are_refused() {
        let store = store();
        let zeros = vec![0u8; 1 << 20];
        let packed = zstd::bulk::compress(&zeros, 3).unwrap();
        // A claim beyond the store's whole budget: refused before any byte.
        let mut claim = DigestFunction::Sha256.digest_of(&zeros);
        claim.size = 1 << 62;
        let err = decode(&store, claim, &[&packed]).await.unwrap_err();
        assert_eq!(err.code, tonic::Code::InvalidArgument, "{}", err.message);
        assert!(err.message.contains("max_cas_blob_size_bytes"), "{}", err.message);
        // A large claim within it: no allocation follows from it, the hash fails.
        claim.size = 1 << 29;
        let err = decode(&store, claim, &[&packed]).await.unwrap_err();
        assert_eq!(err.code, tonic::Code::InvalidArgument, "{}", err.message);
        // A small claim: refused at the first byte past it.
        claim.size = 1000;
        let err = decode(&store, claim, &[&packed]).await.unwrap_err();
        assert!(err.message.contains("more than the digest's 1000 bytes"), "{}", err.message);
        // A frame cut short.
        let d = DigestFunction::Sha256.digest_of(&zeros);
        let err = decode(&store, d, &[&packed[..packed.len() - 3]]).await.unwrap_err();
        assert!(err.message.contains("middle of a frame"), "{}", err.message);
    }
}
