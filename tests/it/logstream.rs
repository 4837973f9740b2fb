//! Live output of running actions (REAPI LogStream) and reads of a running
//! action's declared outputs, through real servers and real workers (the
//! built-in one, and a `cargo-distbuild worker` process).

use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use cargo_distbuild::config::{Backend, FileConfig};
use prost::Message;
use remote_apis::bytestream::ReadRequest;
use remote_apis::bytestream::byte_stream_client::ByteStreamClient;
use remote_apis::longrunning::operations_client::OperationsClient;
use remote_apis::longrunning::{GetOperationRequest, Operation};
use remote_apis::reapi::execution_stage::Value as Stage;
use remote_apis::reapi::{ExecuteOperationMetadata, ExecuteResponse};
use remote_apis::{Digest, DigestFunction};
use tokio::io::AsyncBufReadExt;
use tonic::Code;
use tonic::codec::Streaming;

use crate::common::{TestServer, assert_code};
use crate::execution::{Act, execution, request, response};

/// The printing action of these tests: a line, a pause, another line.
const TWO_LINES: &str = "echo first; sleep 2; echo second";

/// Executes `act` and reads the operation stream up to the first Operation
/// that announces stream names (it is EXECUTING).
async fn until_streaming(server: &TestServer, act: &Act) -> (Streaming<Operation>, String, ExecuteOperationMetadata) {
    let digest = act.upload(server).await;
    let mut ops = execution(server).execute(request(digest)).await.unwrap().into_inner();
    loop {
        let op = ops.message().await.unwrap().expect("the operation ended without announcing streams");
        let meta = ExecuteOperationMetadata::decode(op.metadata.as_ref().unwrap().value.as_slice()).unwrap();
        if !meta.stdout_stream_name.is_empty() {
            assert_eq!(meta.stage, Stage::Executing as i32, "streams are announced from EXECUTING on");
            assert!(!op.done);
            return (ops, op.name, meta);
        }
        assert!(!op.done, "the operation ended without announcing streams");
    }
}

async fn finish(mut ops: Streaming<Operation>) -> ExecuteResponse {
    let mut last = None;
    while let Some(op) = ops.message().await.unwrap() {
        last = Some(op);
    }
    response(&last.unwrap())
}

fn read_req(name: &str, offset: i64, limit: i64) -> ReadRequest {
    ReadRequest { resource_name: name.to_string(), read_offset: offset, read_limit: limit }
}

async fn read_all(server: &TestServer, name: &str, offset: i64, limit: i64) -> Result<Vec<u8>, tonic::Status> {
    let mut stream =
        ByteStreamClient::new(server.channel.clone()).read(read_req(name, offset, limit)).await?.into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.message().await? {
        out.extend_from_slice(&chunk.data);
    }
    Ok(out)
}

async fn is_done(server: &TestServer, name: &str) -> bool {
    let req = GetOperationRequest { name: name.to_string() };
    OperationsClient::new(server.channel.clone()).get_operation(req).await.unwrap().into_inner().done
}

async fn blob(server: &TestServer, d: Option<&remote_apis::reapi::Digest>) -> Bytes {
    let d = Digest::from_proto(DigestFunction::Sha256, d.unwrap()).unwrap();
    if d.size == 0 {
        return Bytes::new();
    }
    server.client().read_blob(d).await.unwrap()
}

/// A reader of the announced stdout sees the first line while the action
/// runs, then the rest, then the end; the ActionResult holds the same.
async fn first_line_before_the_end(server: &TestServer) -> (ExecuteOperationMetadata, ExecuteResponse) {
    let act = Act { do_not_cache: true, ..Act::sh(TWO_LINES) };
    let (ops, op_name, meta) = until_streaming(server, &act).await;
    let mut reader = ByteStreamClient::new(server.channel.clone())
        .read(read_req(&meta.stdout_stream_name, 0, 0))
        .await
        .unwrap()
        .into_inner();
    let first = reader.message().await.unwrap().unwrap().data;
    assert_eq!(first, b"first\n");
    assert!(!is_done(server, &op_name).await, "the first line arrives while the action runs");
    let mut rest = Vec::new();
    while let Some(chunk) = reader.message().await.unwrap() {
        rest.extend_from_slice(&chunk.data);
    }
    assert_eq!(rest, b"second\n", "the rest, then the stream ends");
    let r = finish(ops).await;
    let result = r.result.as_ref().unwrap();
    assert_eq!(result.exit_code, 0, "{:?}", r.status);
    assert_eq!(blob(server, result.stdout_digest.as_ref()).await, "first\nsecond\n");
    (meta, r)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reader_sees_the_first_line_before_the_action_ends() {
    let server = TestServer::start().await;
    let (meta, _) = first_line_before_the_end(&server).await;
    assert!(meta.stdout_stream_name.starts_with("logstreams/"), "{}", meta.stdout_stream_name);
    assert!(meta.stderr_stream_name.ends_with("/stderr"), "{}", meta.stderr_stream_name);

    // Within the grace period the finished stream is still readable.
    let stdout = &meta.stdout_stream_name;
    assert_eq!(read_all(&server, stdout, 0, 0).await.unwrap(), b"first\nsecond\n");
    assert_eq!(read_all(&server, stdout, 3, 0).await.unwrap(), b"st\nsecond\n");
    assert_eq!(read_all(&server, stdout, 3, 4).await.unwrap(), b"st\ns");
    assert_eq!(read_all(&server, stdout, 13, 0).await.unwrap(), b"");
    assert_eq!(read_all(&server, &meta.stderr_stream_name, 0, 0).await.unwrap(), b"");
    assert_code(read_all(&server, stdout, 14, 0).await, Code::OutOfRange);
    // Another instance's name for the same stream, and unknown names.
    let other = format!("other/{stdout}");
    let status = assert_code(read_all(&server, &other, 0, 0).await, Code::NotFound);
    assert!(status.message().contains("ActionResult"), "{}", status.message());
    assert_code(read_all(&server, "logstreams/0123abcd/stdout", 0, 0).await, Code::NotFound);
    assert_code(read_all(&server, "logstreams/x/stdin", 0, 0).await, Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread")]
async fn after_the_grace_period_a_stream_is_not_found_and_points_at_the_result() {
    let server = TestServer::start_with(Backend::Filesystem, |c: &mut FileConfig| {
        c.execution.log_stream_grace = Duration::ZERO;
    })
    .await;
    let (meta, _) = first_line_before_the_end(&server).await;
    let status = assert_code(read_all(&server, &meta.stdout_stream_name, 0, 0).await, Code::NotFound);
    assert!(status.message().contains("ActionResult"), "{}", status.message());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_small_window_sends_late_readers_to_the_result() {
    let server = TestServer::start_with(Backend::Filesystem, |c: &mut FileConfig| {
        c.execution.log_stream_window = bytesize::ByteSize(8);
    })
    .await;
    let (meta, _) = first_line_before_the_end(&server).await;
    let status = assert_code(read_all(&server, &meta.stdout_stream_name, 0, 0).await, Code::OutOfRange);
    assert!(status.message().contains("ActionResult"), "{}", status.message());
    assert_eq!(read_all(&server, &meta.stdout_stream_name, 6, 0).await.unwrap(), b"second\n");
}

/// The action of the running-output tests: writes its declared output,
/// says so on stderr (as rustc announces its `.rmeta`), then goes on.
fn writes_then_waits() -> Act {
    Act {
        script: "printf metadata-bytes > out/lib.rmeta; echo '{\"artifact\":\"out/lib.rmeta\"}' >&2; sleep 2; \
                 printf more >> out/lib.rmeta"
            .into(),
        output_paths: vec!["out/lib.rmeta", "out/never"],
        do_not_cache: true,
        ..Default::default()
    }
}

/// Waits for the artifact line on the live stderr, then reads the running
/// output while the action still runs.
async fn read_running_output(server: &TestServer) {
    let (ops, op_name, meta) = until_streaming(server, &writes_then_waits()).await;
    let mut stderr = ByteStreamClient::new(server.channel.clone())
        .read(read_req(&meta.stderr_stream_name, 0, 0))
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while !seen.ends_with(b"}\n") {
        seen.extend_from_slice(&stderr.message().await.unwrap().expect("the stream ended early").data);
    }
    let name = remote_apis::logstream::running_output_name("", &op_name, "out/lib.rmeta");
    assert_eq!(read_all(server, &name, 0, 0).await.unwrap(), b"metadata-bytes");
    assert!(!is_done(server, &op_name).await, "read while the action runs");
    assert_eq!(read_all(server, &name, 4, 4).await.unwrap(), b"data");
    let undeclared = remote_apis::logstream::running_output_name("", &op_name, "out/other");
    assert_code(read_all(server, &undeclared, 0, 0).await, Code::InvalidArgument);
    let unwritten = remote_apis::logstream::running_output_name("", &op_name, "out/never");
    assert_code(read_all(server, &unwritten, 0, 0).await, Code::NotFound);
    let elsewhere = remote_apis::logstream::running_output_name("other", &op_name, "out/lib.rmeta");
    assert_code(read_all(server, &elsewhere, 0, 0).await, Code::NotFound);
    let unknown = remote_apis::logstream::running_output_name("", "operations/nope", "out/lib.rmeta");
    assert_code(read_all(server, &unknown, 0, 0).await, Code::NotFound);

    let r = finish(ops).await;
    assert_eq!(r.result.as_ref().unwrap().exit_code, 0, "{:?}", r.status);
    // Finished: the name serves the result's file.
    assert_eq!(read_all(server, &name, 0, 0).await.unwrap(), b"metadata-bytesmore");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_declared_output_is_readable_while_the_action_runs() {
    let server = TestServer::start().await;
    read_running_output(&server).await;
}

/// A `cargo-distbuild worker` process and a server without built-in slots.
async fn remote_setup() -> (TestServer, tokio::process::Child, tempfile::TempDir) {
    let server = TestServer::start_with(Backend::Filesystem, |c: &mut FileConfig| {
        c.worker.capacity = Some(0);
        c.worker.heartbeat_interval_secs = 1;
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_cargo-distbuild"))
        .args(["worker", "--scheduler", &server.url(), "--name", "remote", "--slots", "2", "--work-dir"])
        .arg(dir.path())
        .env("DISTBUILD_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    crate::workers::wait_for_workers(&server, 1).await;
    (server, child, dir)
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_remote_worker_streams_and_running_outputs_resolve() {
    let (server, _worker, _dir) = remote_setup().await;
    let (_, r) = first_line_before_the_end(&server).await;
    assert_eq!(r.result.unwrap().execution_metadata.unwrap().worker, "remote");
    read_running_output(&server).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_prints_the_first_line_before_the_command_ends_and_nothing_twice() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let script = "echo first; echo err-line >&2; sleep 2; echo second";
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_cargo-distbuild"))
        .args(["exec", "--server", &server.url(), "--no-cache", "--", "sh", "-c", script])
        .current_dir(dir.path())
        .env("DISTBUILD_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).await.unwrap();
    assert_eq!(line, "first\n");
    assert!(child.try_wait().unwrap().is_none(), "the first line is printed while the command runs");
    let mut rest = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stdout, &mut rest).await.unwrap();
    assert_eq!(rest, "second\n", "printed once");
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err-line\n");
}
