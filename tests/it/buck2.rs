//! The server as Buck2's REAPI client sees it. The client below talks the
//! way Buck2's published client does (`remote_execution/oss/re_grpc/src/
//! client.rs` in facebook/buck2, read, not copied): Capabilities asked at the
//! engine address for the cache's limits and compressors; no
//! `digest_function` in any request (the instance is configured as BLAKE3);
//! FindMissingBlobs in groups of 100; blobs under the batch limit in
//! BatchUpdateBlobs/BatchReadBlobs (identity), larger ones through ByteStream
//! as zstd `compressed-blobs` with no function segment, in segments of the
//! batch limit, checking `committed_size` against the compressed bytes sent
//! (or -1); responses decoded with a limit of twice the batch limit; the
//! platform in `Command.platform`; one Execute stream read to its end, never
//! WaitExecution; PERMISSION_DENIED on UpdateActionResult read as a
//! read-only cache; a blob FindMissing reported present assumed to live on.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use prost::Message;
use remote_apis::bytestream::byte_stream_client::ByteStreamClient;
use remote_apis::bytestream::{ReadRequest, WriteRequest};
use remote_apis::longrunning::operation;
use remote_apis::reapi::action_cache_client::ActionCacheClient;
use remote_apis::reapi::capabilities_client::CapabilitiesClient;
use remote_apis::reapi::command::EnvironmentVariable;
use remote_apis::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use remote_apis::reapi::execution_client::ExecutionClient;
use remote_apis::reapi::execution_stage::Value as Stage;
use remote_apis::reapi::{
    Action, ActionResult, BatchReadBlobsRequest, BatchUpdateBlobsRequest, Command, ExecuteOperationMetadata,
    ExecuteRequest, ExecuteResponse, ExecutionPolicy, FindMissingBlobsRequest, GetActionResultRequest,
    GetCapabilitiesRequest, RequestMetadata, ResultsCachePolicy, ToolDetails, UpdateActionResultRequest,
    batch_update_blobs_request, compressor, digest_function,
};
use remote_apis::{Digest, DigestFunction, merkle};
use tonic::Code;
use tonic::transport::Channel;

use crate::common::{TestServer, assert_code, data};
use crate::execution::platform_of;

const INSTANCES: &str = r#"
    [instances."buck2"]
    digest_function = "blake3"
    [instances."buck2-ro"]
    digest_function = "blake3"
    ac_write = false
"#;

async fn server(tweak: impl FnOnce(&mut cargo_distbuild::config::FileConfig)) -> TestServer {
    TestServer::start_with(Default::default(), |c| {
        c.instances = cargo_distbuild::config::FileConfig::parse(INSTANCES).unwrap().instances;
        tweak(c);
    })
    .await
}

/// What Buck2 keeps of the Capabilities answer.
struct Buck2 {
    channel: Channel,
    instance: String,
    max_batch: usize,
    zstd: bool,
}

/// Every call carries RequestMetadata naming the tool, as Buck2's does.
fn req<T>(message: T) -> tonic::Request<T> {
    let metadata = RequestMetadata {
        tool_details: Some(ToolDetails { tool_name: "buck2".into(), tool_version: "0.1.0".into() }),
        tool_invocation_id: "build-1".into(),
        ..Default::default()
    };
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert_bin(
        "build.bazel.remote.execution.v2.requestmetadata-bin",
        tonic::metadata::MetadataValue::from_bytes(&metadata.encode_to_vec()),
    );
    r
}

fn b3(bytes: &[u8]) -> Digest {
    DigestFunction::Blake3.digest_of(bytes)
}

impl Buck2 {
    /// Connects as Buck2 does: Capabilities at the engine address decide the
    /// batch size (and so the message limit) and the ByteStream compressor.
    async fn connect(server: &TestServer, instance: &str) -> Buck2 {
        let mut caps = CapabilitiesClient::new(server.channel.clone());
        let caps = caps.get_capabilities(req(GetCapabilitiesRequest { instance_name: instance.into() })).await;
        let caps = caps.unwrap().into_inner();
        let cache = caps.cache_capabilities.expect("cache capabilities at the engine address");
        let exec = caps.execution_capabilities.expect("execution capabilities");
        assert!(exec.exec_enabled);
        assert!(cache.max_batch_total_size_bytes > 0, "Buck2 falls back to 4 MB on 0");
        Buck2 {
            channel: server.channel.clone(),
            instance: instance.into(),
            max_batch: cache.max_batch_total_size_bytes as usize,
            zstd: cache.supported_compressors.contains(&(compressor::Value::Zstd as i32)),
        }
    }

    /// Buck2's decoding limit: twice the batch size.
    fn decode_limit(&self) -> usize {
        2 * self.max_batch
    }

    fn cas(&self) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.channel.clone()).max_decoding_message_size(self.decode_limit())
    }

    fn bytestream(&self) -> ByteStreamClient<Channel> {
        ByteStreamClient::new(self.channel.clone()).max_decoding_message_size(self.decode_limit())
    }

    fn prefix(&self) -> String {
        if self.instance.is_empty() { String::new() } else { format!("{}/", self.instance) }
    }

    /// FindMissingBlobs in groups of 100, no digest function.
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, tonic::Status> {
        let mut missing = Vec::new();
        for group in digests.chunks(100) {
            let request = FindMissingBlobsRequest {
                instance_name: self.instance.clone(),
                blob_digests: group.iter().map(Digest::to_proto).collect(),
                ..Default::default()
            };
            let resp = self.cas().find_missing_blobs(req(request)).await?.into_inner();
            for d in resp.missing_blob_digests {
                missing.push(Digest::from_proto(DigestFunction::Blake3, &d).unwrap());
            }
        }
        Ok(missing)
    }

    /// Small blobs in batches whose data stays under the batch limit, large
    /// ones through ByteStream.
    async fn upload(&self, blobs: &[(Digest, Bytes)]) -> Result<(), tonic::Status> {
        let mut batches: Vec<Vec<&(Digest, Bytes)>> = vec![Vec::new()];
        let mut size = 0;
        for blob in blobs.iter().filter(|(d, _)| d.size > 0) {
            if blob.0.size as usize >= self.max_batch {
                self.write(&blob.0, &blob.1).await?;
                continue;
            }
            size += blob.0.size as usize;
            if size >= self.max_batch {
                batches.push(Vec::new());
                size = blob.0.size as usize;
            }
            batches.last_mut().unwrap().push(blob);
        }
        for batch in batches.into_iter().filter(|b| !b.is_empty()) {
            let request = BatchUpdateBlobsRequest {
                instance_name: self.instance.clone(),
                requests: batch
                    .iter()
                    .map(|(d, b)| batch_update_blobs_request::Request {
                        digest: Some(d.to_proto()),
                        data: b.to_vec(),
                        compressor: compressor::Value::Identity as i32,
                    })
                    .collect(),
                ..Default::default()
            };
            let resp = self.cas().batch_update_blobs(req(request)).await?.into_inner();
            for r in resp.responses {
                let status = r.status.unwrap_or_default();
                if status.code != 0 {
                    return Err(tonic::Status::new(Code::from(status.code), status.message));
                }
            }
        }
        Ok(())
    }

    /// A ByteStream upload: zstd when offered, segments of the batch limit,
    /// offsets counting compressed bytes, and Buck2's committed_size check.
    async fn write(&self, digest: &Digest, blob: &Bytes) -> Result<(), tonic::Status> {
        let uuid = uuid::Uuid::new_v4();
        let (name, wire) = match self.zstd {
            true => (
                format!("{}uploads/{uuid}/compressed-blobs/zstd/{}/{}", self.prefix(), digest.hash_hex(), digest.size),
                zstd::bulk::compress(blob, 3).unwrap(),
            ),
            false => {
                (format!("{}uploads/{uuid}/blobs/{}/{}", self.prefix(), digest.hash_hex(), digest.size), blob.to_vec())
            }
        };
        let mut segments = Vec::new();
        let mut offset = 0;
        for chunk in wire.chunks(self.max_batch) {
            segments.push(WriteRequest {
                resource_name: name.clone(),
                write_offset: offset,
                finish_write: false,
                data: chunk.to_vec(),
            });
            offset += chunk.len() as i64;
        }
        segments.last_mut().unwrap().finish_write = true;
        let resp = self.bytestream().write(req(futures::stream::iter(segments))).await?.into_inner();
        assert!(
            resp.committed_size == offset || resp.committed_size == -1,
            "Buck2 fails this upload: invalid committed_size {} (sent {offset})",
            resp.committed_size
        );
        Ok(())
    }

    /// Small blobs in identity batches, large ones through ByteStream.
    async fn download(&self, digests: &[Digest]) -> Result<Vec<Bytes>, tonic::Status> {
        let small: Vec<Digest> =
            digests.iter().filter(|d| d.size > 0 && (d.size as usize) < self.max_batch).copied().collect();
        let mut got = std::collections::HashMap::new();
        let mut batch = Vec::new();
        let mut size = 0;
        let mut batches = Vec::new();
        for d in small {
            size += d.size as usize;
            if size >= self.max_batch {
                batches.push(std::mem::take(&mut batch));
                size = d.size as usize;
            }
            batch.push(d);
        }
        batches.push(batch);
        for batch in batches.into_iter().filter(|b| !b.is_empty()) {
            let request = BatchReadBlobsRequest {
                instance_name: self.instance.clone(),
                digests: batch.iter().map(Digest::to_proto).collect(),
                acceptable_compressors: vec![compressor::Value::Identity as i32],
                ..Default::default()
            };
            for r in self.cas().batch_read_blobs(req(request)).await?.into_inner().responses {
                let status = r.status.unwrap_or_default();
                if status.code != 0 {
                    return Err(tonic::Status::new(Code::from(status.code), status.message));
                }
                got.insert(
                    Digest::from_proto(DigestFunction::Blake3, &r.digest.unwrap()).unwrap(),
                    Bytes::from(r.data),
                );
            }
        }
        let mut out = Vec::new();
        for d in digests {
            out.push(match got.remove(d) {
                Some(b) => b,
                None if d.size == 0 => Bytes::new(),
                None => self.read(d).await?,
            });
        }
        Ok(out)
    }

    async fn read(&self, d: &Digest) -> Result<Bytes, tonic::Status> {
        let kind = if self.zstd { "compressed-blobs/zstd" } else { "blobs" };
        let name = format!("{}{kind}/{}/{}", self.prefix(), d.hash_hex(), d.size);
        let mut stream =
            self.bytestream().read(req(ReadRequest { resource_name: name, ..Default::default() })).await?.into_inner();
        let mut wire = Vec::new();
        while let Some(chunk) = stream.next().await {
            wire.extend_from_slice(&chunk?.data);
        }
        Ok(match self.zstd {
            true => zstd::stream::decode_all(&wire[..]).unwrap().into(),
            false => wire.into(),
        })
    }

    /// One Execute stream, read to its end; the stages seen and the response.
    async fn execute(&self, action: Digest) -> Result<(Vec<Stage>, ExecuteResponse), tonic::Status> {
        let request = ExecuteRequest {
            instance_name: self.instance.clone(),
            action_digest: Some(action.to_proto()),
            execution_policy: Some(ExecutionPolicy { priority: 0 }),
            results_cache_policy: Some(ResultsCachePolicy { priority: 0 }),
            ..Default::default()
        };
        let mut stream = ExecutionClient::new(self.channel.clone()).execute(req(request)).await?.into_inner();
        let mut stages = Vec::new();
        while let Some(op) = stream.message().await? {
            let meta = ExecuteOperationMetadata::decode(op.metadata.unwrap().value.as_slice()).unwrap();
            stages.push(Stage::try_from(meta.stage).unwrap());
            if op.done {
                let Some(operation::Result::Response(any)) = op.result else { panic!("done without a response") };
                return Ok((stages, ExecuteResponse::decode(any.value.as_slice()).unwrap()));
            }
        }
        panic!("the Execute stream ended before the operation was done: {stages:?}");
    }

    async fn get_action_result(&self, action: Digest) -> Result<ActionResult, tonic::Status> {
        let request = GetActionResultRequest {
            instance_name: self.instance.clone(),
            action_digest: Some(action.to_proto()),
            ..Default::default()
        };
        Ok(ActionCacheClient::new(self.channel.clone()).get_action_result(req(request)).await?.into_inner())
    }

    async fn update_action_result(&self, action: Digest, result: ActionResult) -> Result<(), tonic::Status> {
        let request = UpdateActionResultRequest {
            instance_name: self.instance.clone(),
            action_digest: Some(action.to_proto()),
            action_result: Some(result),
            ..Default::default()
        };
        ActionCacheClient::new(self.channel.clone()).update_action_result(req(request)).await?;
        Ok(())
    }

    /// An action as Buck2 builds one: BLAKE3 digests, the platform in the
    /// Command, `output_files` (its compatibility mode), a sorted
    /// environment. Uploads what FindMissing reports absent.
    async fn action(&self, script: &str, outputs: &[&str], platform: &[(&str, &str)]) -> Digest {
        let f = DigestFunction::Blake3;
        let input = Bytes::from_static(b"input file\n");
        let mut tree = merkle::TreeBuilder::new(f);
        tree.add_file("src/in.txt", b3(&input), false, "unused".into()).unwrap();
        let tree = tree.build();
        #[allow(deprecated)]
        let command = Command {
            arguments: vec!["/bin/sh".into(), "-c".into(), script.into()],
            environment_variables: vec![EnvironmentVariable { name: "PATH".into(), value: "/usr/bin:/bin".into() }],
            output_files: outputs.iter().map(|s| s.to_string()).collect(),
            platform: Some(platform_of(platform).unwrap_or_default()),
            ..Default::default()
        };
        let (cd, cb) = merkle::encode(f, &command);
        let action = Action {
            command_digest: Some(cd.to_proto()),
            input_root_digest: Some(tree.root_digest.to_proto()),
            ..Default::default()
        };
        let (ad, ab) = merkle::encode(f, &action);
        let mut blobs = vec![(b3(&input), input), (cd, cb), (ad, ab)];
        blobs.extend(tree.directories.iter().map(|(d, b, _)| (*d, b.clone())));
        let digests: Vec<Digest> = blobs.iter().map(|(d, _)| *d).collect();
        let missing = self.find_missing(&digests).await.unwrap();
        blobs.retain(|(d, _)| missing.contains(d));
        self.upload(&blobs).await.unwrap();
        ad
    }
}

#[tokio::test]
async fn capabilities_at_the_engine_address_carry_the_cache() {
    let server = server(|_| {}).await;
    let buck2 = Buck2::connect(&server, "buck2").await;
    assert!(buck2.zstd, "zstd offered for ByteStream");
    assert_eq!(buck2.max_batch as u64, cargo_distbuild::config::DEFAULT_MAX_BATCH);
    let caps = server.capabilities().get_capabilities(GetCapabilitiesRequest { instance_name: "buck2".into() }).await;
    let caps = caps.unwrap().into_inner();
    let blake3 = digest_function::Value::Blake3 as i32;
    assert_eq!(caps.cache_capabilities.unwrap().digest_functions[0], blake3);
    assert_eq!(caps.execution_capabilities.unwrap().digest_function, blake3);
}

#[tokio::test]
async fn blobs_without_a_digest_function_are_blake3_in_batches_of_100_and_through_bytestream() {
    let server = server(|_| {}).await;
    let buck2 = Buck2::connect(&server, "buck2").await;
    let mut blobs: Vec<(Digest, Bytes)> = (0..100).map(|i| data(i, 1000 + i as usize)).map(|b| (b3(&b), b)).collect();
    // Larger than the batch limit: ByteStream, compressed, several segments.
    let large = data(500, buck2.max_batch * 2 + 12345);
    blobs.push((b3(&large), large));
    let digests: Vec<Digest> = blobs.iter().map(|(d, _)| *d).collect();
    assert_eq!(buck2.find_missing(&digests).await.unwrap().len(), 101);
    buck2.upload(&blobs).await.unwrap();
    assert!(buck2.find_missing(&digests).await.unwrap().is_empty());
    let got = buck2.download(&digests).await.unwrap();
    for ((d, want), got) in blobs.iter().zip(&got) {
        assert_eq!(got, want, "{d}");
    }
    // Stored as BLAKE3: visible under that function by name, not as SHA-256.
    let mut cas = server.cas();
    let named = |function: digest_function::Value| FindMissingBlobsRequest {
        instance_name: String::new(),
        blob_digests: digests.iter().map(Digest::to_proto).collect(),
        digest_function: function as i32,
    };
    let resp = cas.find_missing_blobs(named(digest_function::Value::Blake3)).await.unwrap().into_inner();
    assert!(resp.missing_blob_digests.is_empty());
    let resp = cas.find_missing_blobs(named(digest_function::Value::Sha256)).await.unwrap().into_inner();
    assert_eq!(resp.missing_blob_digests.len(), 101);
    // A second upload of the large blob: it exists, -1 (checked in `write`).
    buck2.write(&blobs[100].0, &blobs[100].1).await.unwrap();
}

#[tokio::test]
async fn messages_of_twice_the_batch_limit_are_accepted() {
    let server = server(|_| {}).await;
    let buck2 = Buck2::connect(&server, "buck2").await;
    // The server's own limit, for every batch size it accepts.
    for batch in [64u64 << 10, 4 << 20, 100 << 20, 1 << 30] {
        assert!(cargo_distbuild::server::grpc_message_limit(batch) as u64 >= 2 * batch, "{batch}");
    }
    // A FindMissingBlobs message of twice the batch limit.
    let count = buck2.decode_limit() / 70 + 1;
    let digests: Vec<_> = (0..count as u64).map(|i| b3(&i.to_le_bytes()).to_proto()).collect();
    let request =
        FindMissingBlobsRequest { instance_name: "buck2".into(), blob_digests: digests, ..Default::default() };
    assert!(request.encoded_len() >= buck2.decode_limit(), "{}", request.encoded_len());
    let mut cas = ContentAddressableStorageClient::new(server.channel.clone()).max_decoding_message_size(usize::MAX);
    let resp = cas.find_missing_blobs(request).await.unwrap().into_inner();
    assert_eq!(resp.missing_blob_digests.len(), count);
    // A ByteStream message of twice the batch limit.
    let blob = data(7, buck2.decode_limit());
    let d = b3(&blob);
    let name = format!("buck2/uploads/{}/blobs/{}/{}", uuid::Uuid::new_v4(), d.hash_hex(), d.size);
    let one = WriteRequest { resource_name: name, write_offset: 0, finish_write: true, data: blob.to_vec() };
    let resp = buck2.bytestream().write(futures::stream::iter([one])).await.unwrap().into_inner();
    assert_eq!(resp.committed_size, d.size as i64);
    // A full batch read comes back within Buck2's decoding limit.
    let blobs: Vec<(Digest, Bytes)> =
        (0..4).map(|i| data(20 + i, buck2.max_batch / 4 - 1000)).map(|b| (b3(&b), b)).collect();
    buck2.upload(&blobs).await.unwrap();
    let digests: Vec<Digest> = blobs.iter().map(|(d, _)| *d).collect();
    assert_eq!(buck2.download(&digests).await.unwrap()[3], blobs[3].1);
}

#[tokio::test]
async fn execute_streams_through_a_long_action_and_the_cache_answers() {
    let server = server(|c| c.execution.stream_keepalive = Duration::from_millis(200)).await;
    let buck2 = Buck2::connect(&server, "buck2").await;
    // Longer than several keepalive periods; the platform in the Command.
    let action = buck2.action("sleep 1.5; cat src/in.txt > out.txt", &["out.txt"], &[("OSFamily", "linux")]).await;
    let (stages, response) = buck2.execute(action).await.unwrap();
    let executing = stages.iter().filter(|s| **s == Stage::Executing).count();
    assert!(executing >= 3, "the unchanged operation is re-sent while the action runs: {stages:?}");
    assert_eq!(stages.last(), Some(&Stage::Completed));
    assert!(!response.cached_result);
    let result = response.result.expect("a result");
    assert_eq!(result.exit_code, 0, "{:?}", response.status);
    let out = Digest::from_proto(DigestFunction::Blake3, result.output_files[0].digest.as_ref().unwrap()).unwrap();
    assert_eq!(out, b3(b"input file\n"), "outputs are hashed with the action's function");
    assert_eq!(buck2.download(&[out]).await.unwrap()[0], "input file\n");

    // Buck2 asks the cache first next time; then Execute is a cache hit.
    let cached = buck2.get_action_result(action).await.unwrap();
    assert_eq!(cached.output_files[0].path, "out.txt");
    let (_, again) = buck2.execute(action).await.unwrap();
    assert!(again.cached_result);

    // Command.platform is what Buck2 sets: a property nobody offers fails fast.
    let nowhere = buck2.action("true", &[], &[("pool", "nowhere")]).await;
    let status = assert_code(buck2.execute(nowhere).await, Code::FailedPrecondition);
    assert!(status.message().contains("pool=nowhere"), "{}", status.message());
}

#[tokio::test]
async fn a_read_only_cache_is_permission_denied_and_executions_still_fill_it() {
    let server = server(|_| {}).await;
    let buck2 = Buck2::connect(&server, "buck2-ro").await;
    let action = buck2.action("cat src/in.txt > copy", &["copy"], &[]).await;
    let status = assert_code(buck2.update_action_result(action, ActionResult::default()).await, Code::PermissionDenied);
    assert!(status.message().contains("read-only"), "{}", status.message());
    assert_code(buck2.get_action_result(action).await, Code::NotFound);
    let (_, response) = buck2.execute(action).await.unwrap();
    assert_eq!(response.result.unwrap().exit_code, 0);
    let cached = buck2.get_action_result(action).await.unwrap();
    assert_eq!(cached.output_files[0].path, "copy");
}

#[tokio::test]
async fn blobs_reported_present_survive_min_retention_under_pressure() {
    for backend in [cargo_distbuild::config::Backend::Memory, cargo_distbuild::config::Backend::Filesystem] {
        // Room for three of the blobs below; min_retention is the default (1h).
        let server = TestServer::start_with(backend, |c| {
            c.instances = cargo_distbuild::config::FileConfig::parse(INSTANCES).unwrap().instances;
            c.cas.max_size = bytesize::ByteSize::kib(300);
        })
        .await;
        let buck2 = Buck2::connect(&server, "buck2").await;
        let blobs: Vec<(Digest, Bytes)> = (0..6).map(|i| data(30 + i, 90 << 10)).map(|b| (b3(&b), b)).collect();
        let digests: Vec<Digest> = blobs.iter().map(|(d, _)| *d).collect();
        buck2.upload(&blobs[..3]).await.unwrap();
        // Buck2 is told they exist, and will not upload them again for hours.
        assert_eq!(buck2.find_missing(&digests).await.unwrap(), digests[3..].to_vec());
        // More blobs do not push them out: the store refuses instead.
        let status = assert_code(buck2.upload(&blobs[3..4]).await, Code::ResourceExhausted);
        assert!(status.message().contains("min_retention"), "{backend:?}: {}", status.message());
        let ws = assert_code(buck2.write(&digests[4], &blobs[4].1).await, Code::ResourceExhausted);
        assert!(ws.message().contains("min_retention"), "{backend:?}: {}", ws.message());
        assert_eq!(buck2.find_missing(&digests[..3]).await.unwrap(), vec![], "{backend:?}");
        let got = buck2.download(&digests[..3]).await.unwrap();
        assert_eq!(got[2], blobs[2].1, "{backend:?}");
        server.stop().await.unwrap();
    }
}
