//! GetTree: a breadth-first walk of a directory tree, streamed in pages.
//!
//! The page token is opaque to clients and stateless for the server: it
//! encodes the queue of directories still to visit, so any server replica
//! can continue a walk and nothing has to be kept between calls. A missing
//! subtree is skipped (the client gets what is present); only a missing root
//! is NOT_FOUND.
//!
//! A tree is a DAG: one Directory blob may be named by many entries, at
//! every level. The walk visits each distinct directory once per call and
//! queues a digest only the first time it sees it, so a few small blobs that
//! expand to millions of paths cost what the blobs cost (the queue, and the
//! page token made of it, hold no duplicates).

use std::collections::{HashSet, VecDeque};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures::StreamExt;
use futures::stream::BoxStream;
use prost::Message;
use remote_apis::reapi::{Directory, GetTreeResponse};
use remote_apis::{Digest, DigestFunction};
use tonic::{Code, Status};

use crate::error::{Error, Result};
use crate::store::Store;

const DEFAULT_PAGE_SIZE: usize = 1000;
/// A Directory blob larger than this is not one a client could use (it
/// would not fit a response); refused before it is read into memory.
const MAX_DIRECTORY_BYTES: u64 = 64 << 20;
/// Keeps each response far below gRPC message limits.
const MAX_PAGE_BYTES: usize = 2 << 20;
const TOKEN_VERSION: u8 = 1;

struct Walk {
    store: Store,
    function: DigestFunction,
    queue: VecDeque<Digest>,
    /// Every digest queued so far in this call.
    seen: HashSet<Digest>,
    page_size: usize,
    done: bool,
}

pub async fn get_tree(
    store: Store,
    function: DigestFunction,
    root: Digest,
    page_size: usize,
    token: &str,
) -> Result<BoxStream<'static, Result<GetTreeResponse, Status>>> {
    let queue = if token.is_empty() {
        // Only the root's absence is an error.
        if !store.find_missing(&[root]).await?.is_empty() {
            return Err(Error::blob_not_found(&root).context("GetTree root"));
        }
        VecDeque::from([root])
    } else {
        decode_token(function, token)?
    };
    let mut seen = HashSet::with_capacity(queue.len());
    let queue: VecDeque<Digest> = queue.into_iter().filter(|d| seen.insert(*d)).collect();
    let page_size = if page_size == 0 { DEFAULT_PAGE_SIZE } else { page_size };
    let walk = Walk { store, function, queue, seen, page_size, done: false };
    Ok(futures::stream::unfold(walk, |mut walk| async move {
        if walk.done {
            return None;
        }
        let page = walk.next_page().await;
        if page.is_err() || walk.queue.is_empty() {
            walk.done = true;
        }
        Some((page.map_err(Status::from), walk))
    })
    .boxed())
}

impl Walk {
    async fn next_page(&mut self) -> Result<GetTreeResponse> {
        let mut directories = Vec::new();
        let mut bytes = 0;
        while directories.len() < self.page_size && bytes < MAX_PAGE_BYTES {
            let Some(digest) = self.queue.pop_front() else { break };
            if digest.size > MAX_DIRECTORY_BYTES {
                return Err(Error::invalid(format!(
                    "blob {digest} in the tree is larger than a Directory may be ({MAX_DIRECTORY_BYTES} bytes)"
                )));
            }
            let data = match self.store.get_bytes(&digest).await {
                Ok(data) => data,
                Err(e) if e.code == Code::NotFound => continue,
                Err(e) => return Err(e),
            };
            let dir = Directory::decode(data.as_ref())
                .map_err(|e| Error::invalid(format!("blob {digest} in the tree is not a Directory: {e}")))?;
            for child in &dir.directories {
                let d = Digest::from_field(self.function, child.digest.as_ref(), "directory digest")
                    .map_err(|e| Error::invalid(format!("directory {digest}, entry {:?}: {e}", child.name)))?;
                if self.seen.insert(d) {
                    self.queue.push_back(d);
                }
            }
            bytes += data.len();
            directories.push(dir);
        }
        let next_page_token = if self.queue.is_empty() { String::new() } else { encode_token(&self.queue) };
        Ok(GetTreeResponse { directories, next_page_token })
    }
}

fn encode_token(queue: &VecDeque<Digest>) -> String {
    let mut raw = Vec::with_capacity(1 + queue.len() * 40);
    raw.push(TOKEN_VERSION);
    for d in queue {
        raw.extend_from_slice(&d.hash);
        raw.extend_from_slice(&d.size.to_le_bytes());
    }
    URL_SAFE_NO_PAD.encode(raw)
}

fn decode_token(function: DigestFunction, token: &str) -> Result<VecDeque<Digest>> {
    let bad = || Error::bad_field("page_token", "is not a token this server issued");
    let raw = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let (version, rest) = raw.split_first().ok_or_else(bad)?;
    if *version != TOKEN_VERSION || rest.len() % 40 != 0 {
        return Err(bad());
    }
    Ok(rest
        .chunks(40)
        .map(|c| Digest {
            function,
            hash: c[..32].try_into().expect("32 bytes"),
            size: u64::from_le_bytes(c[32..].try_into().expect("8 bytes")),
        })
        .collect())
}
