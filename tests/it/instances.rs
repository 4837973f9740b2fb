//! `[instances."NAME"]`: a BLAKE3-default instance takes requests that name
//! no digest function, an `ac_write = false` instance refuses clients'
//! ActionCache writes and still caches executions, an instance's platform
//! properties reach its actions, and Capabilities answer per instance.

use bytes::Bytes;
use futures::StreamExt;
use remote_apis::bytestream::{ReadRequest, WriteRequest};
use remote_apis::reapi::{
    ActionResult, BatchReadBlobsRequest, BatchUpdateBlobsRequest, FindMissingBlobsRequest, GetActionResultRequest,
    GetCapabilitiesRequest, UpdateActionResultRequest, batch_update_blobs_request, digest_function,
};
use remote_apis::{Digest, DigestFunction};
use tonic::Code;

use crate::common::{TestServer, assert_code, data, sha};
use crate::execution::{Act, request, response, run};

const B3: DigestFunction = DigestFunction::Blake3;

pub fn b3(data: &[u8]) -> Digest {
    B3.digest_of(data)
}

/// A server with the instances of these tests.
async fn server() -> TestServer {
    TestServer::start_with(Default::default(), |c| {
        let instances = r#"
            [instances."buck2/*"]
            digest_function = "blake3"
            [instances."ro"]
            ac_write = false
            [instances."tight"]
            platform = { output_bytes_limit = "4" }
        "#;
        c.instances = cargo_distbuild::config::FileConfig::parse(instances).unwrap().instances;
    })
    .await
}

async fn write_blob(server: &TestServer, name: String, blob: &Bytes) -> Result<i64, tonic::Status> {
    let req = WriteRequest { resource_name: name, write_offset: 0, finish_write: true, data: blob.to_vec() };
    let resp = server.bytestream().write(futures::stream::iter(vec![req])).await?;
    Ok(resp.into_inner().committed_size)
}

async fn read_blob(server: &TestServer, name: String) -> Result<Vec<u8>, tonic::Status> {
    let mut stream = server
        .bytestream()
        .read(ReadRequest { resource_name: name, read_offset: 0, read_limit: 0 })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?.data);
    }
    Ok(out)
}

#[tokio::test]
async fn a_blake3_instance_takes_requests_that_name_no_function() {
    let server = server().await;
    let mut cas = server.cas();
    let (a, b) = (data(1, 1000), data(2, 2000));
    let (da, db) = (b3(&a), b3(&b));

    // Batches without digest_function: the bytes are checked against BLAKE3
    // (as SHA-256 they would fail verification).
    let update = |d: &Digest, blob: &Bytes| batch_update_blobs_request::Request {
        digest: Some(d.to_proto()),
        data: blob.to_vec(),
        compressor: 0,
    };
    let req = BatchUpdateBlobsRequest {
        instance_name: "buck2/main".into(),
        requests: vec![update(&da, &a)],
        ..Default::default()
    };
    let resp = cas.batch_update_blobs(req).await.unwrap().into_inner();
    assert_eq!(resp.responses[0].status.as_ref().unwrap().code, 0, "{:?}", resp.responses[0]);
    let missing = |instance: &str, function: i32, digests: Vec<Digest>| FindMissingBlobsRequest {
        instance_name: instance.into(),
        blob_digests: digests.iter().map(Digest::to_proto).collect(),
        digest_function: function,
    };
    let resp = cas.find_missing_blobs(missing("buck2/main", 0, vec![da, db])).await.unwrap().into_inner();
    assert_eq!(resp.missing_blob_digests, vec![db.to_proto()]);
    // Stored as BLAKE3: the same hash asked as SHA-256 is another blob.
    let sha256 = digest_function::Value::Sha256 as i32;
    let resp = cas.find_missing_blobs(missing("buck2/main", sha256, vec![da])).await.unwrap().into_inner();
    assert_eq!(resp.missing_blob_digests.len(), 1);
    let resp = cas.find_missing_blobs(missing("", 0, vec![da])).await.unwrap().into_inner();
    assert_eq!(resp.missing_blob_digests.len(), 1, "the default instance infers SHA-256");
    let blake3 = digest_function::Value::Blake3 as i32;
    let resp = cas.find_missing_blobs(missing("", blake3, vec![da])).await.unwrap().into_inner();
    assert!(resp.missing_blob_digests.is_empty(), "an explicit function wins everywhere");

    // ByteStream names without a function segment.
    let (hash, size) = (db.hash_hex(), db.size);
    assert_eq!(write_blob(&server, format!("buck2/main/uploads/u1/blobs/{hash}/{size}"), &b).await.unwrap(), 2000);
    assert_eq!(read_blob(&server, format!("buck2/main/blobs/{hash}/{size}")).await.unwrap(), b.to_vec());
    assert_eq!(read_blob(&server, format!("blobs/blake3/{hash}/{size}")).await.unwrap(), b.to_vec());
    assert_code(read_blob(&server, format!("blobs/{hash}/{size}")).await, Code::NotFound);
    let read =
        BatchReadBlobsRequest { instance_name: "buck2".into(), digests: vec![da.to_proto()], ..Default::default() };
    let resp = cas.batch_read_blobs(read).await.unwrap().into_inner();
    assert_eq!(resp.responses[0].data, a.to_vec());
    // A SHA-256 upload under the BLAKE3 default still works when named.
    let c = data(3, 100);
    let dc = sha(&c);
    let name = format!("buck2/uploads/u2/blobs/sha256/{}/{}", dc.hash_hex(), dc.size);
    write_blob(&server, name, &c).await.unwrap();
    // Unnamed, the SHA-256 bytes do not match the BLAKE3 reading of the name.
    let name = format!("buck2/uploads/u3/blobs/{}/{}", sha(&a).hash_hex(), a.len());
    assert_code(write_blob(&server, name, &a).await, Code::InvalidArgument);

    // The ActionCache: the result's digests are BLAKE3 too.
    let action = b3(b"an action");
    let result = ActionResult { stdout_digest: Some(da.to_proto()), ..Default::default() };
    let mut ac = server.ac();
    ac.update_action_result(UpdateActionResultRequest {
        instance_name: "buck2/main".into(),
        action_digest: Some(action.to_proto()),
        action_result: Some(result.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    let get = |function: i32| GetActionResultRequest {
        instance_name: "buck2/main".into(),
        action_digest: Some(action.to_proto()),
        inline_stdout: true,
        digest_function: function,
        ..Default::default()
    };
    let got = ac.get_action_result(get(0)).await.unwrap().into_inner();
    assert_eq!(got.stdout_raw, a.to_vec(), "stdout read as the BLAKE3 blob it names");
    assert_code(ac.get_action_result(get(sha256)).await, Code::NotFound);
}

#[tokio::test]
async fn capabilities_answer_per_instance() {
    let server = server().await;
    let caps = |instance: &str| {
        let mut client = server.capabilities();
        let req = GetCapabilitiesRequest { instance_name: instance.into() };
        async move { client.get_capabilities(req).await.unwrap().into_inner() }
    };
    let (sha256, blake3) = (digest_function::Value::Sha256 as i32, digest_function::Value::Blake3 as i32);
    for (instance, first, update) in [("", sha256, true), ("buck2/x", blake3, true), ("ro", sha256, false)] {
        let c = caps(instance).await;
        let cache = c.cache_capabilities.unwrap();
        let exec = c.execution_capabilities.unwrap();
        assert_eq!(cache.digest_functions[0], first, "{instance:?}");
        assert_eq!(cache.digest_functions.len(), 2, "{instance:?}");
        assert_eq!(exec.digest_functions, cache.digest_functions, "{instance:?}");
        assert_eq!(exec.digest_function, first, "{instance:?}: the legacy field is the default");
        assert_eq!(cache.action_cache_update_capabilities.unwrap().update_enabled, update, "{instance:?}");
        assert!(exec.exec_enabled);
        assert_eq!(cache.max_cas_blob_size_bytes, 10 << 30, "the store's budget");
        let high = c.high_api_version.unwrap();
        assert_eq!((high.major, high.minor), (2, 12));
    }
}

#[tokio::test]
async fn a_read_only_cache_refuses_clients_and_still_caches_executions() {
    let server = server().await;
    let mut ac = server.ac();
    let action = sha(b"some action");
    let status = assert_code(
        ac.update_action_result(UpdateActionResultRequest {
            instance_name: "ro".into(),
            action_digest: Some(action.to_proto()),
            action_result: Some(ActionResult::default()),
            ..Default::default()
        })
        .await,
        Code::PermissionDenied,
    );
    assert!(status.message().contains("read-only") && status.message().contains("\"ro\""), "{}", status.message());

    let act = Act { output_paths: vec!["out"], ..Act::sh("echo built > out") };
    let digest = act.upload(&server).await;
    let ops = run(&server, remote_apis::reapi::ExecuteRequest { instance_name: "ro".into(), ..request(digest) })
        .await
        .unwrap();
    let r = response(ops.last().unwrap());
    assert_eq!(r.result.as_ref().unwrap().exit_code, 0, "{:?}", r.status);
    let get = GetActionResultRequest {
        instance_name: "ro".into(),
        action_digest: Some(digest.to_proto()),
        ..Default::default()
    };
    let cached = ac.get_action_result(get).await.unwrap().into_inner();
    assert_eq!(cached.output_files[0].path, "out");
}

#[tokio::test]
async fn an_instances_platform_reaches_its_actions_where_they_lack_the_name() {
    let server = server().await;
    // `tight` adds output_bytes_limit=4, which the worker enforces.
    let act = Act { output_paths: vec!["out"], ..Act::sh("echo 0123456789 > out") };
    let digest = act.upload(&server).await;
    let on = |instance: &str| remote_apis::reapi::ExecuteRequest { instance_name: instance.into(), ..request(digest) };
    let r = response(run(&server, on("tight")).await.unwrap().last().unwrap());
    let status = r.status.expect("a status");
    assert_eq!(status.code, Code::ResourceExhausted as i32, "{status:?}");
    assert!(status.message.contains("output_bytes_limit"), "{}", status.message);
    // Elsewhere the same action runs.
    let r = response(run(&server, on("")).await.unwrap().last().unwrap());
    assert_eq!(r.result.unwrap().exit_code, 0);
    // An action naming the property keeps its own value.
    let act = Act { platform: vec![("output_bytes_limit", "1KiB")], ..act };
    let digest = act.upload(&server).await;
    let req = remote_apis::reapi::ExecuteRequest { instance_name: "tight".into(), ..request(digest) };
    let r = response(run(&server, req).await.unwrap().last().unwrap());
    assert_eq!(r.result.unwrap().exit_code, 0, "{:?}", r.status);
}
