//! Lifecycle: restart persistence, concurrency, eviction, health, shutdown.

use std::time::Duration;

use bytes::Bytes;
use cargo_distbuild::admin::proto::ListBlobsRequest;
use cargo_distbuild::admin::proto::admin_client::AdminClient;
use cargo_distbuild::config::Backend;
use remote_apis::Compressor;
use remote_apis::reapi::{ActionResult, GetActionResultRequest, OutputFile, UpdateActionResultRequest};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::common::{TestServer, data, sha};

#[tokio::test]
async fn blobs_and_results_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let blob = data(1, 3 << 20);
    let d = sha(&blob);
    let action = sha(b"action");
    let result = ActionResult {
        output_files: vec![OutputFile { path: "o".into(), digest: Some(d.to_proto()), ..Default::default() }],
        ..Default::default()
    };
    {
        let server = TestServer::start_in(dir.path(), Backend::Filesystem, |_| {}).await;
        server.client().upload_blobs(vec![(d, blob.clone())]).await.unwrap();
        let req = UpdateActionResultRequest {
            action_digest: Some(action.to_proto()),
            action_result: Some(result.clone()),
            ..Default::default()
        };
        server.ac().update_action_result(req).await.unwrap();
        server.stop().await.unwrap();
    }
    let server = TestServer::start_in(dir.path(), Backend::Filesystem, |_| {}).await;
    assert_eq!(server.client().read_blob(d).await.unwrap(), blob);
    let req = GetActionResultRequest { action_digest: Some(action.to_proto()), ..Default::default() };
    assert_eq!(server.ac().get_action_result(req).await.unwrap().into_inner(), result);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn concurrent_identical_uploads() {
    let server = TestServer::start().await;
    let blob = data(2, 4 << 20);
    let d = sha(&blob);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let client = server.client();
            let blob = blob.clone();
            tokio::spawn(async move {
                let chunks: Vec<std::io::Result<Bytes>> =
                    blob.chunks(100_000).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
                client.write_stream(d, Compressor::Identity, futures::stream::iter(chunks)).await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(server.client().read_blob(d).await.unwrap(), blob);
    let list = AdminClient::new(server.channel.clone()).list_blobs(ListBlobsRequest { limit: 10 }).await.unwrap();
    assert_eq!(list.into_inner().total_blobs, 1);
}

#[tokio::test]
async fn a_small_budget_evicts_the_least_recently_used() {
    for backend in [Backend::Filesystem, Backend::Memory] {
        let server = TestServer::start_with(backend, |c| {
            c.cas.max_size = bytesize::ByteSize::kib(1000);
            // Plain LRU: nothing is protected by recent use.
            c.cas.min_retention = std::time::Duration::ZERO;
        })
        .await;
        let blobs: Vec<Bytes> = (0..3).map(|i| data(10 + i, 400_000)).collect();
        let digests: Vec<_> = blobs.iter().map(|b| sha(b)).collect();
        let client = server.client();
        client.upload_blobs(vec![(digests[0], blobs[0].clone())]).await.unwrap();
        client.upload_blobs(vec![(digests[1], blobs[1].clone())]).await.unwrap();
        // Reading the first makes the second the least recently used.
        client.read_blob(digests[0]).await.unwrap();
        client.upload_blobs(vec![(digests[2], blobs[2].clone())]).await.unwrap();
        assert_eq!(client.find_missing(&digests).await.unwrap(), vec![digests[1]], "{backend:?}");
        let list = AdminClient::new(server.channel.clone()).list_blobs(ListBlobsRequest { limit: 0 }).await.unwrap();
        let listed: Vec<String> = list.into_inner().blobs.into_iter().map(|b| b.hash).collect();
        assert_eq!(listed, vec![digests[2].hash_hex(), digests[0].hash_hex()], "most recently used first");
        server.stop().await.unwrap();
    }
}

#[tokio::test]
async fn health_reports_serving() {
    let server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel.clone());
    for service in ["", "build.bazel.remote.execution.v2.ContentAddressableStorage", "google.bytestream.ByteStream"] {
        let resp = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(resp.status, ServingStatus::Serving as i32, "{service:?}");
    }
}

#[tokio::test]
async fn shutdown_lets_in_flight_uploads_finish() {
    use remote_apis::bytestream::{QueryWriteStatusRequest, WriteRequest};
    use remote_apis::{InstanceName, WriteResource};
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), Backend::Filesystem, |_| {}).await;
    let blob = data(3, 2 << 20);
    let d = sha(&blob);
    let name = WriteResource {
        instance: InstanceName::default(),
        uuid: "0c3f6f0e-1b1a-4a3e-9d7e-000000000001".into(),
        compressor: Compressor::Identity,
        digest: d,
    }
    .to_name();
    let (tx, rx) = tokio::sync::mpsc::channel::<WriteRequest>(1);
    let mut bytestream = server.bytestream();
    let upload = tokio::spawn(async move { bytestream.write(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
    let chunk = |offset: usize, end: usize, finish: bool| WriteRequest {
        resource_name: if offset == 0 { name.clone() } else { String::new() },
        write_offset: offset as i64,
        finish_write: finish,
        data: blob.slice(offset..end).to_vec(),
    };
    tx.send(chunk(0, 1 << 20, false)).await.unwrap();
    // Wait until the server holds the stream (QueryWriteStatus: ABORTED while
    // a stream is writing), however busy the machine is.
    let query = || QueryWriteStatusRequest { resource_name: name.clone() };
    for _ in 0..400 {
        match server.bytestream().query_write_status(query()).await {
            Err(s) if s.code() == tonic::Code::Aborted => break,
            _ => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }

    let channel = server.channel.clone();
    let stopping = tokio::spawn(server.stop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!stopping.is_finished(), "the server waits for the upload");
    tx.send(chunk(1 << 20, 2 << 20, true)).await.unwrap();
    drop(tx);
    upload.await.unwrap().unwrap();
    stopping.await.unwrap().unwrap();
    drop(channel);
    // The blob was committed before the server stopped.
    let again = TestServer::start_in(dir.path(), Backend::Filesystem, |_| {}).await;
    assert_eq!(again.client().read_blob(d).await.unwrap(), blob);
}
