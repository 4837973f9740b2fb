//! Hostile requests of issue 9, each a function that returns what happened
//! (Ok: the server coped as it should; Err: how it did not). The caller
//! checks after each one that the server is still alive.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use remote_apis::bytestream::byte_stream_client::ByteStreamClient;
use remote_apis::bytestream::{ReadRequest, WriteRequest};
use remote_apis::client::CasClient;
use remote_apis::longrunning::operation;
use remote_apis::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use remote_apis::reapi::execution_client::ExecutionClient;
use remote_apis::reapi::{self, batch_update_blobs_request, compressor};
use remote_apis::{Compressor, Digest, DigestFunction, InstanceName, WriteResource};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tonic::transport::Channel;

use crate::server::{reset_peak, sample};
use crate::{Ctx, sha256};

/// Size the zstd bomb expands to (what took the server to 538 MiB with
/// four at once).
const BOMB_SIZE: usize = 256 << 20;

/// Levels of the deep input tree (10,000 overflowed the executor's stack).
const DEEP_LEVELS: usize = 10_000;

/// Idle connections held open for the whole soak.
pub const IDLE_CONNECTIONS: usize = 100;

/// Growth of the server's peak RSS that four batch bombs may cause.
const BOMB_PEAK_LIMIT: u64 = 64 << 20;

fn status_text(s: &tonic::Status) -> String {
    let m = s.message();
    format!(
        "{:?}: {}",
        s.code(),
        if m.len() > 200 { format!("{}... ({} bytes)", &m[..200], m.len()) } else { m.into() }
    )
}

/// The zstd bomb: a few KiB that expand to [`BOMB_SIZE`] zeros, and the
/// digest of those zeros. Built once, streamed (never 256 MiB in memory).
pub fn zstd_bomb() -> (Digest, Bytes) {
    let zeros = vec![0u8; 1 << 20];
    let mut hasher = DigestFunction::Sha256.hasher();
    let mut encoder = zstd::stream::Encoder::new(Vec::new(), 19).expect("zstd encoder");
    encoder.set_pledged_src_size(Some(BOMB_SIZE as u64)).expect("pledged size");
    encoder.include_contentsize(true).expect("content size");
    for _ in 0..BOMB_SIZE >> 20 {
        hasher.update(&zeros);
        encoder.write_all(&zeros).expect("compressing zeros");
    }
    (hasher.finish(), encoder.finish().expect("zstd finish").into())
}

async fn batch_update(channel: &Channel, digest: Digest, data: Bytes) -> Result<Option<i32>, tonic::Status> {
    let response = ContentAddressableStorageClient::new(channel.clone())
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            requests: vec![batch_update_blobs_request::Request {
                digest: Some(digest.to_proto()),
                data: data.to_vec(),
                compressor: compressor::Value::Zstd as i32,
            }],
            digest_function: DigestFunction::Sha256.to_proto() as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(response.responses.first().map(|r| r.status.as_ref().map_or(0, |s| s.code)))
}

/// A 5-byte zstd frame in a batch whose digest claims 2^62 bytes: refused,
/// never allocated (it aborted the server).
pub async fn zstd_huge_claim(ctx: Arc<Ctx>, channel: Channel) -> Result<String, String> {
    let frame = zstd::bulk::compress(b"hello", 1).map_err(|e| e.to_string())?;
    let hash = sha256(b"hello").hash_hex();
    let digest = Digest::new(DigestFunction::Sha256, &hash, 1 << 62).map_err(|e| e.0)?;
    let _ = &ctx;
    match batch_update(&channel, digest, frame.into()).await {
        Ok(Some(0)) => Err("a blob claiming 2^62 bytes was acknowledged".into()),
        Ok(Some(code)) => Ok(format!("blob refused with code {code}")),
        Ok(None) => Err("no per-blob answer".into()),
        Err(s) => Ok(format!("call refused: {}", status_text(&s))),
    }
}

/// Four concurrent batches, each one zstd blob of a few KiB that expands
/// to 256 MiB (digest and size true): the server's peak RSS may not grow
/// by more than [`BOMB_PEAK_LIMIT`].
pub async fn zstd_bomb_batch(ctx: Arc<Ctx>, channel: Channel) -> Result<String, String> {
    let (digest, frame) = ctx.bomb.clone();
    let before = sample(ctx.pid);
    let resettable = reset_peak(ctx.pid);
    let calls = (0..4).map(|_| batch_update(&channel, digest, frame.clone()));
    let results = futures::future::join_all(calls).await;
    let after = sample(ctx.pid);
    let base = if resettable { before.rss } else { before.peak };
    let growth = after.peak.saturating_sub(base);
    let codes: Vec<String> = results
        .iter()
        .map(|r| match r {
            Ok(Some(code)) => format!("blob code {code}"),
            Ok(None) => "no answer".into(),
            Err(s) => format!("call {:?}", s.code()),
        })
        .collect();
    let detail = format!("peak RSS +{} MiB; {}", growth >> 20, codes.join(", "));
    if growth > BOMB_PEAK_LIMIT { Err(detail) } else { Ok(detail) }
}

/// Uploads the deep chain of Directory messages once: level i holds one
/// directory `d` that is level i-1.
pub async fn upload_deep_tree(channel: &Channel) -> Result<Digest, String> {
    let mut child = DigestFunction::Sha256.empty();
    let mut blobs = Vec::with_capacity(DEEP_LEVELS);
    for _ in 0..DEEP_LEVELS {
        let dir = reapi::Directory {
            directories: vec![reapi::DirectoryNode { name: "d".into(), digest: Some(child.to_proto()) }],
            ..Default::default()
        };
        let bytes = Bytes::from(dir.encode_to_vec());
        child = sha256(&bytes);
        blobs.push((child, bytes));
    }
    let cas = CasClient::new(channel.clone(), InstanceName::default());
    cas.upload_blobs(blobs).await.map_err(|s| format!("uploading the deep tree: {}", status_text(&s)))?;
    Ok(child)
}

/// Executes `true` over the 10,000-level input tree (it overflowed the
/// executing thread's stack): the operation must finish, with any status.
pub async fn deep_dag(ctx: Arc<Ctx>, channel: Channel) -> Result<String, String> {
    let root = ctx.deep_root.get().copied().ok_or("the deep tree was not uploaded")?;
    let command = reapi::Command { arguments: vec!["true".into()], ..Default::default() };
    let command_bytes = Bytes::from(command.encode_to_vec());
    let action = reapi::Action {
        command_digest: Some(sha256(&command_bytes).to_proto()),
        input_root_digest: Some(root.to_proto()),
        do_not_cache: true,
        ..Default::default()
    };
    let action_bytes = Bytes::from(action.encode_to_vec());
    let action_digest = sha256(&action_bytes);
    let cas = CasClient::new(channel.clone(), InstanceName::default());
    cas.upload_blobs(vec![(sha256(&command_bytes), command_bytes), (action_digest, action_bytes)])
        .await
        .map_err(|s| format!("uploading the action: {}", status_text(&s)))?;
    let started = Instant::now();
    let outcome = execute_to_end(&channel, action_digest).await;
    let took = started.elapsed().as_secs_f32();
    outcome.map(|what| format!("{what} after {took:.1} s"))
}

/// Executes an action and reads its stream to the finished operation; Ok
/// with the final status, Err if the stream broke or never finished.
async fn execute_to_end(channel: &Channel, action: Digest) -> Result<String, String> {
    let request = reapi::ExecuteRequest {
        action_digest: Some(action.to_proto()),
        skip_cache_lookup: true,
        digest_function: DigestFunction::Sha256.to_proto() as i32,
        ..Default::default()
    };
    let mut stream = match ExecutionClient::new(channel.clone()).execute(request).await {
        Ok(r) => r.into_inner(),
        Err(s) => return Ok(format!("Execute refused: {}", status_text(&s))),
    };
    let run = async {
        loop {
            match stream.message().await {
                Ok(Some(op)) if op.done => return Ok(op),
                Ok(Some(_)) => {}
                Ok(None) => return Err("the Execute stream ended before the operation was done".to_string()),
                Err(s) => return Err(format!("the Execute stream failed: {}", status_text(&s))),
            }
        }
    };
    let op = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .map_err(|_| "the operation did not finish within 120 s".to_string())??;
    match op.result {
        Some(operation::Result::Error(s)) => Ok(format!("operation error code {}", s.code)),
        Some(operation::Result::Response(any)) => {
            let r = reapi::ExecuteResponse::decode(any.value.as_slice()).map_err(|e| e.to_string())?;
            Ok(format!("finished with code {}", r.status.map_or(0, |s| s.code)))
        }
        None => Err("finished operation without a result".into()),
    }
}

/// 100 KB resource names on Read and on Write, one well-formed (a long
/// instance name) and one not: a refusal or NOT_FOUND whose message a
/// default client accepts (the name came back twice, in 200 KB).
pub async fn long_resource_name(_ctx: Arc<Ctx>, channel: Channel) -> Result<String, String> {
    let hash = sha256(b"hello").hash_hex();
    let well_formed = format!("{}/blobs/{hash}/5", "i".repeat(100_000));
    let garbage = format!("{}/{hash}/5", "x/".repeat(50_000));
    let mut bs = ByteStreamClient::new(channel);
    let mut problems = Vec::new();
    let mut seen = Vec::new();
    for (kind, name) in [("well-formed", well_formed), ("malformed", garbage)] {
        let read = match bs.read(ReadRequest { resource_name: name.clone(), read_offset: 0, read_limit: 0 }).await {
            Ok(mut s) => s.get_mut().message().await.err(),
            Err(s) => Some(s),
        };
        let write = bs
            .write(futures::stream::iter(vec![WriteRequest {
                resource_name: format!("uploads/{}/{name}", uuid::Uuid::new_v4()),
                write_offset: 0,
                finish_write: true,
                data: b"hello".to_vec(),
            }]))
            .await
            .err();
        for (call, status) in [("Read", read), ("Write", write)] {
            let allowed = [tonic::Code::InvalidArgument, tonic::Code::NotFound];
            match status {
                None => problems.push(format!("{call} of a {kind} 100 KB name succeeded")),
                Some(s) if !allowed.contains(&s.code()) || s.message().len() > 4096 => problems.push(format!(
                    "{call} of a {kind} 100 KB name: {:?} with a {}-byte message",
                    s.code(),
                    s.message().len()
                )),
                Some(s) => seen.push(format!("{call} {kind}: {:?} ({} bytes)", s.code(), s.message().len())),
            }
        }
    }
    if problems.is_empty() { Ok(seen.join(", ")) } else { Err(problems.join("; ")) }
}

/// Uploads that send their first byte and are dropped, never finished:
/// half on connections that stay open, half with the connection closed.
pub async fn interrupted_uploads(ctx: Arc<Ctx>, channel: Channel) -> Result<String, String> {
    const COUNT: usize = 64;
    for i in 0..COUNT {
        let own;
        let channel = if i % 2 == 0 {
            own = ctx.connect().await?;
            &own
        } else {
            &channel
        };
        let data = Bytes::from(format!("{}-{i}-{}", ctx.marker, uuid::Uuid::new_v4()).repeat(64));
        let name = WriteResource {
            instance: InstanceName::default(),
            uuid: uuid::Uuid::new_v4().to_string(),
            compressor: Compressor::Identity,
            digest: sha256(&data),
        }
        .to_name();
        let first =
            WriteRequest { resource_name: name, write_offset: 0, finish_write: false, data: data[..1].to_vec() };
        let requests = futures::StreamExt::chain(futures::stream::iter(vec![first]), futures::stream::pending());
        let mut bs = ByteStreamClient::new(channel.clone());
        // The call cannot finish: the timeout drops it, resetting the stream.
        let _ = tokio::time::timeout(Duration::from_millis(100), bs.write(requests)).await;
    }
    Ok(format!("{COUNT} uploads dropped after one byte"))
}

/// A raw TCP connection that says nothing more (half of them after the
/// HTTP/2 preface and an empty SETTINGS frame).
pub async fn idle_connection(port: u16, preface: bool) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    if preface {
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await?;
    }
    Ok(s)
}

/// How many of `conns` the server has closed (read gives end of stream).
pub fn closed_by_server<'a>(conns: impl IntoIterator<Item = &'a TcpStream>) -> usize {
    let mut buf = [0u8; 4096];
    conns
        .into_iter()
        .filter(|c| {
            loop {
                match c.try_read(&mut buf) {
                    Ok(0) => break true,
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
                    Err(_) => break true,
                }
            }
        })
        .count()
}

/// An action that leaves a `setsid` daemon (tagged with the marker) behind
/// and exits at once: the action must finish; the end of the soak checks
/// that no daemon survived.
pub async fn setsid_daemon(ctx: Arc<Ctx>, _channel: Channel) -> Result<String, String> {
    let script =
        format!("setsid sh -c 'sleep 600; echo {}-daemon' >/dev/null 2>&1 </dev/null & echo spawned", ctx.marker);
    match ctx.exec(&["--no-cache"], &script).await? {
        (Some(0), out) if out.contains("spawned") => Ok("action finished".into()),
        (code, out) => Err(format!("exit {code:?}, stdout {:?}", out.chars().take(200).collect::<String>())),
    }
}

/// An action that outlives its 2 s timeout with a background child: it
/// must end with a failure soon after the timeout.
pub async fn timeout_action(ctx: Arc<Ctx>, _channel: Channel) -> Result<String, String> {
    let script = format!("sh -c 'sleep 600; echo {}-child' & sleep 600", ctx.marker);
    let started = Instant::now();
    let (code, _) = ctx.exec(&["--no-cache", "--timeout", "2s"], &script).await?;
    let took = started.elapsed().as_secs_f32();
    match code {
        Some(0) => Err(format!("a 600 s sleep with a 2 s timeout exited 0 after {took:.1} s")),
        _ => Ok(format!("exit {code:?} after {took:.1} s")),
    }
}
