//! Valid load: what a build client does, each kind in its own loop until
//! the deadline, every answer checked. Blobs the server acknowledged and
//! ActionCache entries it accepted are recorded, to be read back at the end.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use remote_apis::bytestream::byte_stream_client::ByteStreamClient;
use remote_apis::bytestream::{ReadRequest, WriteRequest};
use remote_apis::reapi::action_cache_client::ActionCacheClient;
use remote_apis::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use remote_apis::reapi::{self, batch_update_blobs_request, compressor};
use remote_apis::{Compressor, Digest, DigestFunction, InstanceName, ReadResource, WriteResource};
use tonic::transport::Channel;

use crate::{Ctx, Rng, Tally, sha256};

/// Bytes per WriteRequest of the soak's ByteStream uploads.
const CHUNK: usize = 256 << 10;

fn cas(channel: &Channel) -> ContentAddressableStorageClient<Channel> {
    ContentAddressableStorageClient::new(channel.clone()).max_decoding_message_size(64 << 20)
}

fn bytestream(channel: &Channel) -> ByteStreamClient<Channel> {
    ByteStreamClient::new(channel.clone()).max_decoding_message_size(64 << 20)
}

/// Runs `op` until the deadline, `pause` apart, counting outcomes in `tally`.
pub async fn repeat<F, Fut>(ctx: Arc<Ctx>, tally: Arc<Tally>, pause: Duration, mut op: F)
where
    F: FnMut(Arc<Ctx>, Channel, u64) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let channel = match ctx.connect().await {
        Ok(c) => c,
        Err(e) => return tally.record::<String>(Err(e)),
    };
    let mut i = 0u64;
    while ctx.running() {
        i += 1;
        let outcome = tokio::time::timeout(Duration::from_secs(90), op(ctx.clone(), channel.clone(), i))
            .await
            .unwrap_or_else(|_| Err("no answer within 90 s".into()));
        tally.record(outcome.map(|()| String::new()));
        tokio::time::sleep(pause).await;
    }
}

/// BatchUpdateBlobs of 1-8 random blobs up to 64 KiB, some zstd-compressed.
pub async fn batch_upload(ctx: Arc<Ctx>, channel: Channel, i: u64) -> Result<(), String> {
    let mut rng = Rng::new(i ^ 0xba7c);
    let mut requests = Vec::new();
    for _ in 0..1 + rng.below(8) {
        let len = rng.below(64 << 10) as usize;
        let data = rng.bytes(len);
        let digest = sha256(&data);
        let (data, compressor) = if rng.below(2) == 0 {
            (zstd::bulk::compress(&data, 1).map_err(|e| e.to_string())?.into(), compressor::Value::Zstd)
        } else {
            (data, compressor::Value::Identity)
        };
        requests.push(batch_update_blobs_request::Request {
            digest: Some(digest.to_proto()),
            data: data.to_vec(),
            compressor: compressor as i32,
        });
    }
    let sent: Vec<Digest> =
        requests.iter().map(|r| Digest::from_field(DigestFunction::Sha256, r.digest.as_ref(), "d").unwrap()).collect();
    let response = cas(&channel)
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            requests,
            digest_function: DigestFunction::Sha256.to_proto() as i32,
            ..Default::default()
        })
        .await
        .map_err(|s| format!("BatchUpdateBlobs: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let mut failures = Vec::new();
    for r in response.responses {
        let digest = Digest::from_field(DigestFunction::Sha256, r.digest.as_ref(), "digest").map_err(|e| e.0)?;
        if !sent.contains(&digest) {
            return Err(format!("BatchUpdateBlobs answered for {digest}, which was not sent"));
        }
        match r.status {
            Some(s) if s.code != 0 => failures.push(format!("{digest}: code {} {}", s.code, s.message)),
            _ => ctx.acknowledged.lock().push(digest),
        }
    }
    if failures.is_empty() { Ok(()) } else { Err(format!("BatchUpdateBlobs refused {}", failures.join("; "))) }
}

/// A ByteStream upload of 64 KiB to 2 MiB, half of them zstd-compressed.
pub async fn stream_upload(ctx: Arc<Ctx>, channel: Channel, i: u64) -> Result<(), String> {
    let mut rng = Rng::new(i ^ 0x5742);
    let len = (64 << 10) + rng.below(2 << 20) as usize;
    let data = rng.bytes(len);
    let digest = sha256(&data);
    let compressor = if rng.below(2) == 0 { Compressor::Zstd } else { Compressor::Identity };
    let wire: Bytes = match compressor {
        Compressor::Zstd => zstd::bulk::compress(&data, 1).map_err(|e| e.to_string())?.into(),
        Compressor::Identity => data,
    };
    let name =
        WriteResource { instance: InstanceName::default(), uuid: uuid::Uuid::new_v4().to_string(), compressor, digest }
            .to_name();
    let total = wire.len();
    let requests: Vec<WriteRequest> = (0..total.div_ceil(CHUNK).max(1))
        .map(|k| {
            let start = k * CHUNK;
            let end = (start + CHUNK).min(total);
            WriteRequest {
                resource_name: if k == 0 { name.clone() } else { String::new() },
                write_offset: start as i64,
                finish_write: end == total,
                data: wire[start..end].to_vec(),
            }
        })
        .collect();
    let response = bytestream(&channel)
        .write(futures::stream::iter(requests))
        .await
        .map_err(|s| format!("ByteStream.Write of {digest} ({compressor:?}): {:?}: {}", s.code(), s.message()))?
        .into_inner();
    if compressor == Compressor::Identity && response.committed_size != total as i64 {
        return Err(format!("ByteStream.Write of {digest}: committed_size {} of {total}", response.committed_size));
    }
    ctx.acknowledged.lock().push(digest);
    Ok(())
}

/// Reads a blob through ByteStream (identity or zstd) and checks its digest.
pub async fn read_stream(channel: &Channel, digest: Digest, compressor: Compressor) -> Result<(), String> {
    let name = ReadResource { instance: InstanceName::default(), compressor, digest }.to_name();
    let mut stream = bytestream(channel)
        .read(ReadRequest { resource_name: name, read_offset: 0, read_limit: 0 })
        .await
        .map_err(|s| format!("ByteStream.Read of {digest}: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let mut wire = Vec::new();
    while let Some(msg) = stream.message().await.map_err(|s| format!("ByteStream.Read of {digest}: {s}"))? {
        wire.extend_from_slice(&msg.data);
    }
    let data = match compressor {
        Compressor::Zstd => zstd::stream::decode_all(wire.as_slice()).map_err(|e| format!("{digest}: zstd: {e}"))?,
        Compressor::Identity => wire,
    };
    let got = sha256(&data);
    if got != digest { Err(format!("ByteStream.Read of {digest} returned bytes of {got}")) } else { Ok(()) }
}

/// Reads blobs in one BatchReadBlobs call and checks each digest.
pub async fn read_batch(channel: &Channel, digests: &[Digest]) -> Result<(), String> {
    let response = cas(channel)
        .batch_read_blobs(reapi::BatchReadBlobsRequest {
            digests: digests.iter().map(Digest::to_proto).collect(),
            digest_function: DigestFunction::Sha256.to_proto() as i32,
            ..Default::default()
        })
        .await
        .map_err(|s| format!("BatchReadBlobs: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    if response.responses.len() != digests.len() {
        return Err(format!("BatchReadBlobs: {} answers for {} digests", response.responses.len(), digests.len()));
    }
    for r in response.responses {
        let digest = Digest::from_field(DigestFunction::Sha256, r.digest.as_ref(), "digest").map_err(|e| e.0)?;
        if let Some(s) = r.status.filter(|s| s.code != 0) {
            return Err(format!("BatchReadBlobs of {digest}: code {} {}", s.code, s.message));
        }
        if sha256(&r.data) != digest {
            return Err(format!("BatchReadBlobs of {digest} returned other bytes"));
        }
    }
    Ok(())
}

/// Reads back random acknowledged blobs: small ones in a batch, one large
/// one through ByteStream.
pub async fn read_back(ctx: Arc<Ctx>, channel: Channel, i: u64) -> Result<(), String> {
    let mut rng = Rng::new(i ^ 0x4ead);
    let picks: Vec<Digest> = {
        let all = ctx.acknowledged.lock();
        if all.is_empty() {
            return Ok(());
        }
        (0..4).map(|_| all[rng.below(all.len() as u64) as usize]).collect()
    };
    let (small, large): (Vec<Digest>, Vec<Digest>) = picks.into_iter().partition(|d| d.size <= 64 << 10);
    if !small.is_empty() {
        read_batch(&channel, &small).await?;
    }
    if let Some(d) = large.first() {
        let compressor = if rng.below(2) == 0 { Compressor::Zstd } else { Compressor::Identity };
        read_stream(&channel, *d, compressor).await?;
    }
    Ok(())
}

/// FindMissingBlobs over known and never-uploaded digests: exactly the
/// latter are missing.
pub async fn find_missing(ctx: Arc<Ctx>, channel: Channel, i: u64) -> Result<(), String> {
    let mut rng = Rng::new(i ^ 0xf1d);
    let known: Vec<Digest> = {
        let all = ctx.acknowledged.lock();
        (0..all.len().min(20)).map(|_| all[rng.below(all.len() as u64) as usize]).collect()
    };
    let unknown: Vec<Digest> = (0..5).map(|_| sha256(&rng.bytes(40))).collect();
    let all: Vec<Digest> = known.iter().chain(&unknown).copied().collect();
    let missing = missing_of(&channel, &all).await?;
    let wrong: Vec<String> = known.iter().filter(|d| missing.contains(d)).map(|d| d.to_string()).collect();
    if !wrong.is_empty() {
        return Err(format!("FindMissingBlobs reports acknowledged blobs missing: {}", wrong.join(", ")));
    }
    if unknown.iter().any(|d| !missing.contains(d)) {
        return Err("FindMissingBlobs reports a never-uploaded blob present".into());
    }
    Ok(())
}

pub async fn missing_of(channel: &Channel, digests: &[Digest]) -> Result<Vec<Digest>, String> {
    let response = cas(channel)
        .find_missing_blobs(reapi::FindMissingBlobsRequest {
            blob_digests: digests.iter().map(Digest::to_proto).collect(),
            digest_function: DigestFunction::Sha256.to_proto() as i32,
            ..Default::default()
        })
        .await
        .map_err(|s| format!("FindMissingBlobs: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    response
        .missing_blob_digests
        .iter()
        .map(|d| Digest::from_proto(DigestFunction::Sha256, d).map_err(|e| e.0))
        .collect()
}

/// UpdateActionResult naming an acknowledged blob as output, then
/// GetActionResult of it.
pub async fn action_cache(ctx: Arc<Ctx>, channel: Channel, i: u64) -> Result<(), String> {
    let mut rng = Rng::new(i ^ 0xac);
    let output = {
        let all = ctx.acknowledged.lock();
        if all.is_empty() {
            return Ok(());
        }
        all[rng.below(all.len() as u64) as usize]
    };
    let action = sha256(uuid::Uuid::new_v4().as_bytes());
    let result = reapi::ActionResult {
        output_files: vec![reapi::OutputFile {
            path: "out".into(),
            digest: Some(output.to_proto()),
            ..Default::default()
        }],
        exit_code: 0,
        ..Default::default()
    };
    let mut ac = ActionCacheClient::new(channel);
    ac.update_action_result(reapi::UpdateActionResultRequest {
        action_digest: Some(action.to_proto()),
        action_result: Some(result),
        digest_function: DigestFunction::Sha256.to_proto() as i32,
        ..Default::default()
    })
    .await
    .map_err(|s| format!("UpdateActionResult: {:?}: {}", s.code(), s.message()))?;
    check_action_result(&mut ac, action, output).await?;
    ctx.action_results.lock().push((action, output));
    Ok(())
}

/// GetActionResult of `action` answers with `output` as its one output file.
pub async fn check_action_result(
    ac: &mut ActionCacheClient<Channel>,
    action: Digest,
    output: Digest,
) -> Result<(), String> {
    let got = ac
        .get_action_result(reapi::GetActionResultRequest {
            action_digest: Some(action.to_proto()),
            digest_function: DigestFunction::Sha256.to_proto() as i32,
            ..Default::default()
        })
        .await
        .map_err(|s| format!("GetActionResult of {action}: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let first = got.output_files.first().and_then(|f| f.digest.as_ref());
    if first != Some(&output.to_proto()) {
        return Err(format!("GetActionResult of {action} does not name {output}"));
    }
    Ok(())
}

/// A small action through `cargo-distbuild exec`, tagged with the marker.
pub async fn execute(ctx: Arc<Ctx>, _channel: Channel, i: u64) -> Result<(), String> {
    let token = format!("{}-exec-{i}", ctx.marker);
    let (code, stdout) = ctx.exec(&[], &format!("echo {token}")).await?;
    if code != Some(0) || !stdout.contains(&token) {
        return Err(format!("exec {token}: exit {code:?}, stdout {:?}", stdout.chars().take(200).collect::<String>()));
    }
    Ok(())
}

/// After the load: every acknowledged blob is present and reads back with
/// its digest; every accepted ActionCache entry is still served.
pub async fn verify_all(ctx: &Ctx, channel: &Channel) -> (usize, Vec<String>) {
    let blobs: Vec<Digest> = ctx.acknowledged.lock().clone();
    let mut problems = Vec::new();
    for chunk in blobs.chunks(1000) {
        match missing_of(channel, chunk).await {
            Ok(m) if m.is_empty() => {}
            Ok(m) => problems.push(format!("{} acknowledged blobs are missing, e.g. {}", m.len(), m[0])),
            Err(e) => problems.push(e),
        }
    }
    let reads = futures::stream::iter(blobs.iter().copied())
        .map(|d| async move { read_stream(channel, d, Compressor::Identity).await })
        .buffer_unordered(4)
        .collect::<Vec<_>>()
        .await;
    problems.extend(reads.into_iter().filter_map(Result::err));
    let mut ac = ActionCacheClient::new(channel.clone());
    let entries: Vec<(Digest, Digest)> = ctx.action_results.lock().clone();
    for (action, output) in entries {
        if let Err(e) = check_action_result(&mut ac, action, output).await {
            problems.push(e);
        }
    }
    (blobs.len(), problems)
}
