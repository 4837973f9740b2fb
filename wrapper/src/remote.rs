//! The REAPI side of the wrapper: look an Action up, upload what the server
//! lacks, execute, fetch outputs, and store results of local runs.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures::channel::oneshot;
use prost::Message;
use remote_apis::bytestream::ReadRequest;
use remote_apis::bytestream::byte_stream_client::ByteStreamClient;
use remote_apis::client::{CasClient, ClientOptions, Transport, error_chain};
use remote_apis::merkle::BuiltTree;
use remote_apis::reapi::action_cache_client::ActionCacheClient;
use remote_apis::reapi::execution_client::ExecutionClient;
use remote_apis::reapi::execution_stage::Value as Stage;
use remote_apis::reapi::{
    ActionResult, ExecuteOperationMetadata, ExecuteRequest, ExecuteResponse, GetActionResultRequest,
    UpdateActionResultRequest,
};
use remote_apis::{Digest, DigestFunction, InstanceName};
use tokio::io::AsyncWriteExt;
use tonic::{Code, Status};

use crate::key::BuiltAction;

/// Blobs up to this size are read into memory and sent in batches.
const SMALL_FILE: u64 = 1 << 20;

/// The REAPI calls one compile makes. A trait so that the wrapper's
/// decisions (`compile.rs`) are tested against an in-memory server that
/// scripts Execute's answers and failures; [`Remote`] is the real one.
/// Generic, not `dyn`: each caller uses one implementation.
#[allow(async_fn_in_trait)]
pub trait Server {
    /// The ActionCache entry of `action`, `None` if there is none.
    async fn lookup(&self, action: Digest) -> Result<Option<ActionResult>, Status>;
    /// Uploads what executing the Action needs and the server lacks.
    async fn upload(&self, built: &BuiltAction, toolchain: &BuiltTree) -> Result<(), Status>;
    /// Executes and waits; a non-OK status of the response is an error.
    async fn execute(&self, action: Digest, queue_timeout: Duration) -> Result<ExecuteResponse, Status>;
    /// As [`Server::execute`], and once the operation runs, sends its name
    /// and its stderr stream name (LogStream) on `running` (dropped unsent
    /// when the server announces no stream): cargo's pipelining reads the
    /// live stderr for rustc's metadata notification.
    async fn execute_live(
        &self,
        action: Digest,
        queue_timeout: Duration,
        running: oneshot::Sender<Running>,
    ) -> Result<ExecuteResponse, Status>;
    /// Reads a live stream (ByteStream Read of a LogStream name) from its
    /// start, each chunk to `each`, until the stream ends or `each` says
    /// stop (returns false).
    async fn read_live(&self, name: &str, each: &mut dyn FnMut(&[u8]) -> bool) -> Result<(), Status>;
    /// The current content of `path` (one of the Command's output paths) of
    /// the running operation `operation` (distbuild's running outputs).
    async fn read_running_output(&self, operation: &str, path: &str) -> Result<Bytes, Status>;
    async fn read_blob(&self, digest: Digest) -> Result<Bytes, Status>;
    /// stdout and stderr of a result, inlined or fetched.
    async fn streams(&self, result: &ActionResult) -> Result<(Bytes, Bytes), Status>;
    /// Writes a blob to `dest` atomically.
    async fn download_to(&self, digest: Digest, dest: &Path, executable: bool) -> Result<(), Status>;
    async fn upload_files(&self, files: &[(Digest, PathBuf)]) -> Result<(), Status>;
    async fn upload_blobs(&self, blobs: Vec<(Digest, Bytes)>) -> Result<(), Status>;
    async fn store_result(&self, action: Digest, result: ActionResult) -> Result<(), Status>;
}

/// A remote execution that started: its operation and its stderr stream.
#[derive(Debug, Clone)]
pub struct Running {
    pub operation: String,
    pub stderr_stream: String,
}

#[derive(Clone)]
pub struct Remote {
    channel: Transport,
    cas: CasClient,
    instance: InstanceName,
    function: DigestFunction,
}

impl Remote {
    /// Connects (TLS and token from `options`), giving up after `timeout`
    /// (a down server must not stall a build).
    pub async fn connect(
        server: &str,
        instance: &str,
        timeout: Duration,
        options: &ClientOptions,
    ) -> Result<Remote, Status> {
        let instance = InstanceName::new(instance).map_err(|e| Status::invalid_argument(e.0))?;
        let endpoint = options.endpoint(server)?.connect_timeout(timeout);
        let channel = tokio::time::timeout(timeout, endpoint.connect())
            .await
            .map_err(|_| Status::unavailable(format!("{server}: no answer in {timeout:?}")))?
            .map_err(|e| Status::unavailable(format!("{server}: {}", error_chain(&e))))?;
        let channel = options.transport(channel);
        let function = DigestFunction::Sha256;
        let cas = CasClient::new(channel.clone(), instance.clone()).with_digest_function(function);
        Ok(Remote { channel, cas, instance, function })
    }
}

impl Server for Remote {
    async fn lookup(&self, action: Digest) -> Result<Option<ActionResult>, Status> {
        let req = GetActionResultRequest {
            instance_name: self.instance.to_string(),
            action_digest: Some(action.to_proto()),
            inline_stdout: true,
            inline_stderr: true,
            digest_function: self.function.to_proto() as i32,
            ..Default::default()
        };
        let mut client = ActionCacheClient::new(self.channel.clone());
        match tokio::time::timeout(Duration::from_secs(30), client.get_action_result(req)).await {
            Err(_) => Err(Status::deadline_exceeded("GetActionResult took over 30 s")),
            Ok(Ok(r)) => Ok(Some(r.into_inner())),
            Ok(Err(s)) if s.code() == Code::NotFound => Ok(None),
            Ok(Err(s)) => Err(s),
        }
    }

    /// Uploads the Action, its Command, the input root and the toolchain
    /// tree: only the blobs the server reports missing.
    async fn upload(&self, built: &BuiltAction, toolchain: &BuiltTree) -> Result<(), Status> {
        let mut memory: Vec<(Digest, Bytes)> = vec![
            remote_apis::merkle::encode(self.function, &built.action),
            remote_apis::merkle::encode(self.function, &built.command),
        ];
        for tree in [&built.input_root, toolchain] {
            memory.extend(tree.directories.iter().map(|(d, data, _)| (*d, data.clone())));
        }
        let mut files: Vec<(Digest, PathBuf)> = Vec::new();
        for tree in [&built.input_root, toolchain] {
            files.extend(tree.files.iter().map(|f| (f.digest, f.path.clone())));
        }
        let mut all: Vec<Digest> = memory.iter().map(|(d, _)| *d).chain(files.iter().map(|(d, _)| *d)).collect();
        all.sort_by_key(|d| (d.hash, d.size));
        all.dedup();
        let missing: std::collections::HashSet<Digest> = self.cas.find_missing(&all).await?.into_iter().collect();
        if missing.is_empty() {
            return Ok(());
        }
        let mut batch: Vec<(Digest, Bytes)> = memory.into_iter().filter(|(d, _)| missing.contains(d)).collect();
        let mut sent = std::collections::HashSet::new();
        for (digest, path) in files {
            if !missing.contains(&digest) || !sent.insert(digest) {
                continue;
            }
            let io = |e: std::io::Error| Status::failed_precondition(format!("{}: {e}", path.display()));
            if digest.size <= SMALL_FILE {
                let data = tokio::fs::read(&path).await.map_err(io)?;
                batch.push((digest, data.into()));
            } else {
                let file = tokio::fs::File::open(&path).await.map_err(io)?;
                self.cas.upload_reader(digest, file).await?;
            }
        }
        batch.sort_by_key(|(d, _)| (d.hash, d.size));
        batch.dedup_by_key(|(d, _)| *d);
        self.cas.upload_blobs(batch).await
    }

    /// Executes the Action and waits for its result. `queue_timeout` bounds
    /// how long it may wait for a worker before the caller runs it locally.
    async fn execute(&self, action: Digest, queue_timeout: Duration) -> Result<ExecuteResponse, Status> {
        self.execute_watching(action, queue_timeout, None).await
    }

    async fn execute_live(
        &self,
        action: Digest,
        queue_timeout: Duration,
        running: oneshot::Sender<Running>,
    ) -> Result<ExecuteResponse, Status> {
        self.execute_watching(action, queue_timeout, Some(running)).await
    }

    async fn read_live(&self, name: &str, each: &mut dyn FnMut(&[u8]) -> bool) -> Result<(), Status> {
        let req = ReadRequest { resource_name: name.to_string(), read_offset: 0, read_limit: 0 };
        let mut stream = ByteStreamClient::new(self.channel.clone()).read(req).await?.into_inner();
        while let Some(msg) = stream.message().await? {
            if !each(&msg.data) {
                break;
            }
        }
        Ok(())
    }

    async fn read_running_output(&self, operation: &str, path: &str) -> Result<Bytes, Status> {
        let name = remote_apis::logstream::running_output_name(self.instance.as_str(), operation, path);
        let req = ReadRequest { resource_name: name, read_offset: 0, read_limit: 0 };
        let mut stream = ByteStreamClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 20)
            .read(req)
            .await?
            .into_inner();
        let mut data = Vec::new();
        while let Some(msg) = stream.message().await? {
            data.extend_from_slice(&msg.data);
        }
        Ok(data.into())
    }

    /// A small blob, whole.
    async fn read_blob(&self, digest: Digest) -> Result<Bytes, Status> {
        self.cas.read_blob(digest).await
    }

    /// stdout and stderr of a result, inlined or fetched.
    async fn streams(&self, result: &ActionResult) -> Result<(Bytes, Bytes), Status> {
        let fetch = |raw: &Vec<u8>, digest: &Option<remote_apis::reapi::Digest>| {
            let raw = Bytes::from(raw.clone());
            let digest = digest.clone();
            async move {
                match digest {
                    Some(d) if raw.is_empty() && d.size_bytes > 0 => {
                        let d = Digest::from_proto(self.function, &d).map_err(|e| Status::data_loss(e.0))?;
                        self.cas.read_blob(d).await
                    }
                    _ => Ok(raw),
                }
            }
        };
        let out = fetch(&result.stdout_raw, &result.stdout_digest).await?;
        let err = fetch(&result.stderr_raw, &result.stderr_digest).await?;
        Ok((out, err))
    }

    /// Downloads `digest` to `dest` through a temporary file and a rename,
    /// so cargo never sees half a library.
    async fn download_to(&self, digest: Digest, dest: &Path, executable: bool) -> Result<(), Status> {
        let io = |e: std::io::Error| Status::internal(format!("{}: {e}", dest.display()));
        let dir = dest.parent().ok_or_else(|| Status::internal("output without a directory"))?;
        tokio::fs::create_dir_all(dir).await.map_err(io)?;
        let tmp = crate::local::temp_beside(dest);
        let result = async {
            let mut file = tokio::fs::File::create(&tmp).await.map_err(io)?;
            self.cas.download(digest, &mut file).await?;
            file.flush().await.map_err(io)?;
            drop(file);
            let mode = if executable { 0o755 } else { 0o644 };
            tokio::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).await.map_err(io)?;
            tokio::fs::rename(&tmp, dest).await.map_err(io)
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    /// Uploads local files (outputs of a local run).
    async fn upload_files(&self, files: &[(Digest, PathBuf)]) -> Result<(), Status> {
        let digests: Vec<Digest> = files.iter().map(|(d, _)| *d).collect();
        let missing: std::collections::HashSet<Digest> = self.cas.find_missing(&digests).await?.into_iter().collect();
        for (digest, path) in files {
            if missing.contains(digest) {
                let file = tokio::fs::File::open(path)
                    .await
                    .map_err(|e| Status::failed_precondition(format!("{}: {e}", path.display())))?;
                self.cas.upload_reader(*digest, file).await?;
            }
        }
        Ok(())
    }

    async fn upload_blobs(&self, blobs: Vec<(Digest, Bytes)>) -> Result<(), Status> {
        self.cas.upload_blobs(blobs).await
    }

    async fn store_result(&self, action: Digest, result: ActionResult) -> Result<(), Status> {
        let req = UpdateActionResultRequest {
            instance_name: self.instance.to_string(),
            action_digest: Some(action.to_proto()),
            action_result: Some(result),
            digest_function: self.function.to_proto() as i32,
            ..Default::default()
        };
        ActionCacheClient::new(self.channel.clone()).update_action_result(req).await?;
        Ok(())
    }
}

impl Remote {
    /// Executes the Action and waits for its result. `queue_timeout` bounds
    /// how long it may wait for a worker before the caller runs it locally.
    /// `running` gets the operation's name and stderr stream once it runs.
    async fn execute_watching(
        &self,
        action: Digest,
        queue_timeout: Duration,
        mut running: Option<oneshot::Sender<Running>>,
    ) -> Result<ExecuteResponse, Status> {
        let req = ExecuteRequest {
            instance_name: self.instance.to_string(),
            action_digest: Some(action.to_proto()),
            digest_function: self.function.to_proto() as i32,
            ..Default::default()
        };
        let mut stream = ExecutionClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 20)
            .execute(req)
            .await?
            .into_inner();
        let mut executing = false;
        let mut done = None;
        loop {
            let next = if executing {
                stream.message().await
            } else {
                match tokio::time::timeout(queue_timeout, stream.message()).await {
                    Ok(m) => m,
                    Err(_) => return Err(Status::deadline_exceeded(format!("queued for over {queue_timeout:?}"))),
                }
            };
            // Read to the end of the stream even after the done Operation:
            // dropping streams early makes h2 reset them.
            let Some(op) = next? else { break };
            let meta = op.metadata.as_ref().and_then(|m| ExecuteOperationMetadata::decode(m.value.as_slice()).ok());
            let stage = meta.as_ref().map(|m| m.stage);
            if let Some(m) = meta.filter(|m| m.stage == Stage::Executing as i32 && !m.stderr_stream_name.is_empty())
                && let Some(tx) = running.take()
            {
                let _ = tx.send(Running { operation: op.name.clone(), stderr_stream: m.stderr_stream_name });
            }
            executing |= matches!(stage, Some(s) if s >= Stage::Executing as i32);
            if op.done {
                done = Some(op);
            }
        }
        use remote_apis::longrunning::operation::Result as OpResult;
        match done.and_then(|op| op.result) {
            Some(OpResult::Response(any)) => {
                let resp = ExecuteResponse::decode(any.value.as_slice())
                    .map_err(|e| Status::internal(format!("decoding the ExecuteResponse: {e}")))?;
                match &resp.status {
                    Some(s) if s.code != 0 => Err(Status::new(Code::from_i32(s.code), s.message.clone())),
                    _ => Ok(resp),
                }
            }
            Some(OpResult::Error(s)) => Err(Status::new(Code::from_i32(s.code), s.message)),
            None => Err(Status::unavailable("the Execute stream ended without a result")),
        }
    }
}

/// How long the execution that produced `result` took on its worker, in
/// milliseconds (0 when the result does not say): what a hit saved.
pub fn execution_ms(result: &ActionResult) -> i64 {
    let m = result.execution_metadata.as_ref();
    let ms =
        |t: Option<&remote_apis::protobuf::Timestamp>| t.map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000);
    match (
        ms(m.and_then(|m| m.worker_start_timestamp.as_ref())),
        ms(m.and_then(|m| m.worker_completed_timestamp.as_ref())),
    ) {
        (Some(a), Some(b)) if b >= a => b - a,
        _ => 0,
    }
}
