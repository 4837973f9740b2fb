//! Authentication and authorization against the real server: every RPC of
//! every service against every grant, the status codes clients act on,
//! operation ownership, token file reload, the separate worker listener,
//! and the refusal to serve openly on a public address.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cargo_distbuild::admin::proto::admin_client::AdminClient;
use cargo_distbuild::admin::proto::{
    GetSchedulerStatusRequest, GetStoreStatusRequest, ListBlobsRequest, ListWorkersRequest, VerifyBlobsRequest,
};
use cargo_distbuild::config::{AuthSection, Backend, FileConfig};
use cargo_distbuild::execution::gateway::proto::worker_gateway_client::WorkerGatewayClient;
use cargo_distbuild::execution::gateway::proto::{Hello, WorkerMessage, worker_message};
use futures::StreamExt;
use remote_apis::bytestream::byte_stream_client::ByteStreamClient;
use remote_apis::bytestream::{QueryWriteStatusRequest, ReadRequest, WriteRequest};
use remote_apis::longrunning::operations_client::OperationsClient;
use remote_apis::longrunning::{
    CancelOperationRequest, DeleteOperationRequest, GetOperationRequest, ListOperationsRequest, WaitOperationRequest,
};
use remote_apis::reapi::action_cache_client::ActionCacheClient;
use remote_apis::reapi::capabilities_client::CapabilitiesClient;
use remote_apis::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use remote_apis::reapi::execution_client::ExecutionClient;
use remote_apis::reapi::{
    ActionResult, BatchReadBlobsRequest, BatchUpdateBlobsRequest, FindMissingBlobsRequest, GetActionResultRequest,
    GetCapabilitiesRequest, GetChunkMappingRequest, GetTreeRequest, RegisterChunkMappingRequest, SpliceBlobRequest,
    SplitBlobRequest, UpdateActionResultRequest, WaitExecutionRequest, batch_update_blobs_request,
};
use remote_apis::{DigestFunction, InstanceName, ReadResource, WriteResource};
use tonic::{Code, Request, Status};

use crate::common::{TestServer, assert_code, sha};
use crate::execution::{Act, request, stage};

const GRANTS: [&str; 11] = [
    "cas-read",
    "cas-write",
    "ac-read",
    "ac-write",
    "execute",
    "worker",
    "admin",
    "status",
    "asset-read",
    "asset-push",
    "asset-fetch",
];

/// A token's value in these tests: plain, so the file entries are readable.
pub fn token_of(name: &str) -> String {
    format!("dbt_test_{name}")
}

fn sha256_hex(text: &str) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(text.as_bytes()))
}

/// A token file with one `[[token]]` per (name, grants on every instance,
/// extra `instances` table).
pub fn token_file_text(entries: &[(&str, &[&str], &str)]) -> String {
    let mut text = String::new();
    for (name, grants, instances) in entries {
        let list: Vec<String> = grants.iter().map(|g| format!("{g:?}")).collect();
        text.push_str(&format!(
            "[[token]]\nname = {name:?}\nsha256 = {:?}\ngrants = [{}]\n{instances}\n\n",
            sha256_hex(&token_of(name)),
            list.join(", ")
        ));
    }
    text
}

/// A server on the memory store whose `[auth]` lists `tokens` (a file in
/// `dir`) and gives anonymous callers `anonymous`.
pub async fn start(dir: &Path, tokens: &str, anonymous: &[&str], tweak: impl FnOnce(&mut FileConfig)) -> TestServer {
    let path = dir.join("tokens.toml");
    std::fs::write(&path, tokens).unwrap();
    TestServer::start_with(Backend::Memory, |f| {
        f.auth = Some(AuthSection {
            mode: None,
            tokens: Some(path),
            anonymous: anonymous.iter().map(|s| s.to_string()).collect(),
        });
        tweak(f);
    })
    .await
}

/// `message` with `authorization: Bearer <token>` when a token is given.
fn authed<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(t) = token {
        request.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    request
}

/// Every RPC of every service, each with the grants that admit it.
const RPCS: &[(&str, &[&str])] = &[
    ("FindMissingBlobs", &["cas-read", "worker"]),
    ("BatchReadBlobs", &["cas-read", "worker"]),
    ("GetTree", &["cas-read", "worker"]),
    ("BatchUpdateBlobs", &["cas-write", "worker"]),
    ("SplitBlob", &["cas-write", "worker"]),
    ("SpliceBlob", &["cas-write", "worker"]),
    ("GetChunkMapping", &["cas-write", "worker"]),
    ("RegisterChunkMapping", &["cas-write", "worker"]),
    ("ByteStream.Read", &["cas-read", "worker"]),
    ("ByteStream.Write", &["cas-write", "worker"]),
    ("ByteStream.QueryWriteStatus", &["cas-write", "worker"]),
    ("GetActionResult", &["ac-read"]),
    ("UpdateActionResult", &["ac-write"]),
    ("GetCapabilities", &["cas-read", "worker"]),
    ("Execute", &["execute"]),
    ("WaitExecution", &["execute", "admin"]),
    ("ListOperations", &["execute", "admin"]),
    ("GetOperation", &["execute", "admin"]),
    ("CancelOperation", &["execute", "admin"]),
    ("DeleteOperation", &["execute", "admin"]),
    ("WaitOperation", &["execute", "admin"]),
    ("WorkerGateway.Session", &["worker"]),
    ("Admin.ListBlobs", &["admin"]),
    ("Admin.GetStoreStatus", &["admin"]),
    ("Admin.VerifyBlobs", &["admin"]),
    ("Admin.ListWorkers", &["admin"]),
    ("Admin.GetSchedulerStatus", &["admin"]),
    // A URI nobody recorded: the call gets to the download, which needs
    // asset-fetch (asset-read answers only from records).
    ("Fetch.FetchBlob", &["asset-fetch"]),
    ("Fetch.FetchDirectory", &["asset-read", "asset-fetch"]),
    ("Push.PushBlob", &["asset-push"]),
    ("Push.PushDirectory", &["asset-push"]),
];

/// Calls `rpc` with a small, valid-looking request; the status code (OK for
/// success). Anything but UNAUTHENTICATED and PERMISSION_DENIED means the
/// call got past authorization.
async fn call(server: &TestServer, rpc: &str, token: Option<&str>, instance: &str) -> Code {
    let ch = server.channel.clone();
    let blob = b"authorized bytes";
    let d = sha(blob).to_proto();
    let f = DigestFunction::Sha256.to_proto() as i32;
    let i = instance.to_string();
    let op = "operations/00000000-0000-0000-0000-000000000000".to_string();
    let code = |r: Result<(), Status>| r.err().map_or(Code::Ok, |s| s.code());
    let mut cas = ContentAddressableStorageClient::new(ch.clone());
    let mut bs = ByteStreamClient::new(ch.clone());
    let mut ops = OperationsClient::new(ch.clone());
    let mut admin = AdminClient::new(ch.clone());
    let write_name = WriteResource {
        instance: InstanceName::new(instance).unwrap(),
        uuid: uuid::Uuid::new_v4().to_string(),
        compressor: remote_apis::Compressor::Identity,
        digest: sha(blob),
    }
    .to_name();
    let result = match rpc {
        "FindMissingBlobs" => cas
            .find_missing_blobs(authed(
                FindMissingBlobsRequest { instance_name: i, blob_digests: vec![d], digest_function: f },
                token,
            ))
            .await
            .map(drop),
        "BatchReadBlobs" => cas
            .batch_read_blobs(authed(
                BatchReadBlobsRequest { instance_name: i, digests: vec![d], digest_function: f, ..Default::default() },
                token,
            ))
            .await
            .map(drop),
        "GetTree" => match cas
            .get_tree(authed(GetTreeRequest { instance_name: i, root_digest: Some(d), ..Default::default() }, token))
            .await
        {
            Ok(mut s) => s.get_mut().message().await.map(drop),
            Err(e) => Err(e),
        },
        "BatchUpdateBlobs" => cas
            .batch_update_blobs(authed(
                BatchUpdateBlobsRequest {
                    instance_name: i,
                    requests: vec![batch_update_blobs_request::Request {
                        digest: Some(d),
                        data: blob.to_vec(),
                        compressor: 0,
                    }],
                    digest_function: f,
                },
                token,
            ))
            .await
            .map(drop),
        "SplitBlob" => cas
            .split_blob(authed(
                SplitBlobRequest { instance_name: i, blob_digest: Some(d), digest_function: f, ..Default::default() },
                token,
            ))
            .await
            .map(drop),
        "SpliceBlob" => cas
            .splice_blob(authed(
                SpliceBlobRequest {
                    instance_name: i,
                    blob_digest: Some(d.clone()),
                    chunk_digests: vec![d],
                    digest_function: f,
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
        "GetChunkMapping" => cas
            .get_chunk_mapping(authed(
                GetChunkMappingRequest {
                    instance_name: i,
                    blob_digest: Some(d),
                    digest_function: f,
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
        "RegisterChunkMapping" => {
            let m = RegisterChunkMappingRequest {
                instance_name: i,
                blob_digest: Some(d.clone()),
                chunk_digests: vec![d],
                digest_function: f,
                ..Default::default()
            };
            cas.register_chunk_mapping(authed(futures::stream::iter(vec![m]), token)).await.map(drop)
        }
        "ByteStream.Read" => {
            let name = ReadResource {
                instance: InstanceName::new(instance).unwrap(),
                compressor: remote_apis::Compressor::Identity,
                digest: sha(blob),
            }
            .to_name();
            match bs.read(authed(ReadRequest { resource_name: name, ..Default::default() }, token)).await {
                Ok(mut s) => s.get_mut().message().await.map(drop),
                Err(e) => Err(e),
            }
        }
        "ByteStream.Write" => {
            let m =
                WriteRequest { resource_name: write_name, write_offset: 0, finish_write: true, data: blob.to_vec() };
            bs.write(authed(futures::stream::iter(vec![m]), token)).await.map(drop)
        }
        "ByteStream.QueryWriteStatus" => {
            bs.query_write_status(authed(QueryWriteStatusRequest { resource_name: write_name }, token)).await.map(drop)
        }
        "GetActionResult" => ActionCacheClient::new(ch)
            .get_action_result(authed(
                GetActionResultRequest {
                    instance_name: i,
                    action_digest: Some(d),
                    digest_function: f,
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
        "UpdateActionResult" => ActionCacheClient::new(ch)
            .update_action_result(authed(
                UpdateActionResultRequest {
                    instance_name: i,
                    action_digest: Some(d),
                    action_result: Some(ActionResult::default()),
                    digest_function: f,
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
        "GetCapabilities" => CapabilitiesClient::new(ch)
            .get_capabilities(authed(GetCapabilitiesRequest { instance_name: i }, token))
            .await
            .map(drop),
        "Execute" => {
            let mut req = request(sha(b"no such action"));
            req.instance_name = i;
            ExecutionClient::new(ch).execute(authed(req, token)).await.map(drop)
        }
        "WaitExecution" => {
            ExecutionClient::new(ch).wait_execution(authed(WaitExecutionRequest { name: op }, token)).await.map(drop)
        }
        "ListOperations" => ops.list_operations(authed(ListOperationsRequest::default(), token)).await.map(drop),
        "GetOperation" => ops.get_operation(authed(GetOperationRequest { name: op }, token)).await.map(drop),
        "CancelOperation" => ops.cancel_operation(authed(CancelOperationRequest { name: op }, token)).await.map(drop),
        "DeleteOperation" => ops.delete_operation(authed(DeleteOperationRequest { name: op }, token)).await.map(drop),
        "WaitOperation" => {
            ops.wait_operation(authed(WaitOperationRequest { name: op, timeout: None }, token)).await.map(drop)
        }
        "WorkerGateway.Session" => {
            // No Hello: a worker that got past the grant check is refused
            // for that (INVALID_ARGUMENT), without registering.
            let none: Vec<WorkerMessage> = Vec::new();
            WorkerGatewayClient::new(ch).session(authed(futures::stream::iter(none), token)).await.map(drop)
        }
        "Admin.ListBlobs" => admin.list_blobs(authed(ListBlobsRequest::default(), token)).await.map(drop),
        "Admin.GetStoreStatus" => admin.get_store_status(authed(GetStoreStatusRequest {}, token)).await.map(drop),
        "Admin.VerifyBlobs" => admin.verify_blobs(authed(VerifyBlobsRequest {}, token)).await.map(drop),
        "Admin.ListWorkers" => admin.list_workers(authed(ListWorkersRequest {}, token)).await.map(drop),
        "Fetch.FetchBlob" | "Fetch.FetchDirectory" | "Push.PushBlob" | "Push.PushDirectory" => {
            crate::asset::call(ch.clone(), rpc, authed((), token).metadata().clone(), &i).await
        }
        "Admin.GetSchedulerStatus" => {
            admin.get_scheduler_status(authed(GetSchedulerStatusRequest {}, token)).await.map(drop)
        }
        other => panic!("no call for {other}"),
    };
    code(result)
}

fn refused(code: Code) -> bool {
    matches!(code, Code::Unauthenticated | Code::PermissionDenied)
}

/// The table: each RPC with a token holding exactly one grant, for every
/// grant, plus anonymous callers; on the root instance and on instances
/// inside and outside a token's prefix.
#[tokio::test]
async fn every_rpc_against_every_grant() {
    let dir = tempfile::tempdir().unwrap();
    let mut entries: Vec<(&str, &[&str], &str)> = GRANTS.iter().map(|g| (*g, std::slice::from_ref(g), "")).collect();
    // Writes only under team-a: reads everywhere.
    entries.push(("team-a-writer", &["cas-read"], "instances = { \"team-a\" = [\"cas-write\", \"ac-write\"] }"));
    let server = start(dir.path(), &token_file_text(&entries), &[], |_| {}).await;
    let mut failures = Vec::new();
    for (rpc, admitted_by) in RPCS {
        for grant in GRANTS {
            let token = token_of(grant);
            let got = call(&server, rpc, Some(&token), "").await;
            let want_allowed = admitted_by.contains(&grant);
            if refused(got) == want_allowed || (!want_allowed && got != Code::PermissionDenied) {
                failures.push(format!("{rpc} with {grant}: {got:?}"));
            }
        }
        let got = call(&server, rpc, None, "").await;
        if got != Code::Unauthenticated {
            failures.push(format!("{rpc} anonymous: {got:?}"));
        }
    }
    // Instance prefixes, on the calls that name an instance.
    let writer = token_of("team-a-writer");
    for (rpc, instance, allowed) in [
        ("BatchUpdateBlobs", "team-a", true),
        ("BatchUpdateBlobs", "team-a/ci", true),
        ("BatchUpdateBlobs", "team-ab", false),
        ("BatchUpdateBlobs", "", false),
        ("ByteStream.Write", "team-a", true),
        ("ByteStream.Write", "team-b", false),
        ("UpdateActionResult", "team-a", true),
        ("UpdateActionResult", "team-b", false),
        ("FindMissingBlobs", "team-b", true),
        ("GetActionResult", "team-a", false),
    ] {
        let got = call(&server, rpc, Some(&writer), instance).await;
        if refused(got) == allowed {
            failures.push(format!("{rpc} on {instance:?} by team-a-writer: {got:?}"));
        }
    }
    assert!(failures.is_empty(), "unexpected results:\n{}", failures.join("\n"));
}

#[tokio::test]
async fn identity_problems_are_unauthenticated_and_anonymous_grants_apply() {
    let dir = tempfile::tempdir().unwrap();
    let server =
        start(dir.path(), &token_file_text(&[("ci", &["cas-read"], "")]), &["cas-read", "ac-read"], |_| {}).await;
    // Anonymous reads are allowed; anonymous writes need an identity.
    assert_eq!(call(&server, "FindMissingBlobs", None, "").await, Code::Ok);
    assert_eq!(call(&server, "GetActionResult", None, "").await, Code::NotFound);
    let caps = CapabilitiesClient::new(server.channel.clone())
        .get_capabilities(authed(GetCapabilitiesRequest::default(), None))
        .await
        .unwrap()
        .into_inner();
    assert!(!caps.cache_capabilities.unwrap().action_cache_update_capabilities.unwrap().update_enabled);
    for rpc in ["BatchUpdateBlobs", "ByteStream.Write", "UpdateActionResult", "Execute"] {
        assert_eq!(call(&server, rpc, None, "").await, Code::Unauthenticated, "{rpc}");
    }
    // A wrong token is never anonymous access, even for what anonymous may do.
    let mut cas = ContentAddressableStorageClient::new(server.channel.clone());
    let bad = FindMissingBlobsRequest::default();
    let s = assert_code(cas.find_missing_blobs(authed(bad.clone(), Some("dbt_guess"))).await, Code::Unauthenticated);
    assert!(!s.message().contains("dbt_guess"), "{}", s.message());
    let mut req = Request::new(bad);
    req.metadata_mut().insert("authorization", "Basic dXNlcjpwdw==".parse().unwrap());
    let s = assert_code(cas.find_missing_blobs(req).await, Code::Unauthenticated);
    assert!(s.message().contains("Bearer"), "{}", s.message());
}

/// A read-only token on every write path: PERMISSION_DENIED naming the
/// grant and instance (Buck2 reads it on UpdateActionResult as "read-only
/// cache"), never the token; GetCapabilities tells the same in advance.
#[tokio::test]
async fn read_only_tokens_are_denied_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &token_file_text(&[("reader", &["cas-read", "ac-read"], "")]), &[], |_| {}).await;
    let token = token_of("reader");
    let f = DigestFunction::Sha256.to_proto() as i32;
    let mut ac = ActionCacheClient::new(server.channel.clone());
    let update = UpdateActionResultRequest {
        instance_name: "ci".into(),
        action_digest: Some(sha(b"a").to_proto()),
        action_result: Some(ActionResult::default()),
        digest_function: f,
        ..Default::default()
    };
    let s = assert_code(ac.update_action_result(authed(update, Some(&token))).await, Code::PermissionDenied);
    assert!(s.message().contains("ac-write") && s.message().contains("\"ci\""), "{}", s.message());
    assert!(!s.message().contains(&token));
    for (rpc, grant) in [
        ("BatchUpdateBlobs", "cas-write"),
        ("ByteStream.Write", "cas-write"),
        ("SpliceBlob", "cas-write"),
        ("Execute", "execute"),
    ] {
        assert_eq!(call(&server, rpc, Some(&token), "").await, Code::PermissionDenied, "{rpc} needs {grant}");
    }
    let caps = CapabilitiesClient::new(server.channel.clone())
        .get_capabilities(authed(GetCapabilitiesRequest::default(), Some(&token)))
        .await
        .unwrap()
        .into_inner();
    let cache = caps.cache_capabilities.unwrap();
    assert!(!cache.action_cache_update_capabilities.unwrap().update_enabled);
    assert!(!caps.execution_capabilities.unwrap().exec_enabled);
}

/// Execution results reach the ActionCache through the server, whatever
/// the client may write; another principal cannot see, wait for, cancel or
/// delete an operation; an admin can.
#[tokio::test]
async fn operations_belong_to_their_principal() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_file_text(&[
        ("alice", &["cas-read", "ac-read", "execute"], ""),
        ("bob", &["cas-read", "ac-read", "execute"], ""),
        ("root", &["admin"], ""),
    ]);
    // Anyone may upload (Act uploads without a token); only execution and
    // the operations need an identity.
    let server = start(dir.path(), &tokens, &["cas-read", "cas-write"], |f| f.worker.capacity = Some(2)).await;
    let (alice, bob, root) = (token_of("alice"), token_of("bob"), token_of("root"));

    // A finished action of Alice's: its result was cached by the server
    // although Alice has no ac-write.
    let quick = Act::sh("echo cached-by-the-server").upload(&server).await;
    let mut exec = ExecutionClient::new(server.channel.clone());
    let mut stream = exec.execute(authed(request(quick), Some(&alice))).await.unwrap().into_inner();
    while stream.message().await.unwrap().is_some() {}
    let hit = ActionCacheClient::new(server.channel.clone())
        .get_action_result(authed(
            GetActionResultRequest { action_digest: Some(quick.to_proto()), ..Default::default() },
            Some(&alice),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hit.exit_code, 0);

    // A running one.
    let slow = Act::sh("sleep 30").upload(&server).await;
    let mut stream = exec.execute(authed(request(slow), Some(&alice))).await.unwrap().into_inner();
    let name = stream.message().await.unwrap().unwrap().name;
    let mut ops = OperationsClient::new(server.channel.clone());
    let get = |t: &str| authed(GetOperationRequest { name: name.clone() }, Some(t));
    ops.get_operation(get(&alice)).await.unwrap();
    let unknown = assert_code(ops.get_operation(get(&bob)).await, Code::NotFound);
    let nonexistent = assert_code(
        ops.get_operation(authed(GetOperationRequest { name: "operations/nope".into() }, Some(&bob))).await,
        Code::NotFound,
    );
    assert_eq!(
        unknown.message().replace(&name, "X"),
        nonexistent.message().replace("operations/nope", "X"),
        "an operation of someone else's reads exactly like one that does not exist"
    );
    let wait = WaitExecutionRequest { name: name.clone() };
    assert_code(exec.wait_execution(authed(wait.clone(), Some(&bob))).await, Code::NotFound);
    let cancel = CancelOperationRequest { name: name.clone() };
    assert_code(ops.cancel_operation(authed(cancel.clone(), Some(&bob))).await, Code::NotFound);
    let delete = DeleteOperationRequest { name: name.clone() };
    assert_code(ops.delete_operation(authed(delete, Some(&bob))).await, Code::NotFound);
    let list = |t: &str| authed(ListOperationsRequest::default(), Some(t));
    let names = |r: remote_apis::longrunning::ListOperationsResponse| -> Vec<String> {
        r.operations.into_iter().map(|o| o.name).collect()
    };
    assert!(names(ops.list_operations(list(&bob)).await.unwrap().into_inner()).is_empty());
    assert_eq!(names(ops.list_operations(list(&alice)).await.unwrap().into_inner()).len(), 2);
    assert_eq!(names(ops.list_operations(list(&root)).await.unwrap().into_inner()).len(), 2);
    // Bob's cancel changed nothing.
    let op = ops.get_operation(get(&alice)).await.unwrap().into_inner();
    assert!(!op.done, "bob cancelled alice's operation");

    // Bob executing the identical action joins it (merging stays) and owns
    // it too; his cancel only detaches him.
    let mut bob_stream = exec.execute(authed(request(slow), Some(&bob))).await.unwrap().into_inner();
    assert_eq!(bob_stream.message().await.unwrap().unwrap().name, name);
    ops.get_operation(get(&bob)).await.unwrap();
    ops.cancel_operation(authed(cancel.clone(), Some(&bob))).await.unwrap();
    assert!(!ops.get_operation(get(&alice)).await.unwrap().into_inner().done);
    assert_code(ops.get_operation(get(&bob)).await, Code::NotFound);

    // The admin sees and cancels it for real.
    ops.get_operation(get(&root)).await.unwrap();
    ops.cancel_operation(authed(cancel, Some(&root))).await.unwrap();
    let last = loop {
        match stream.message().await.unwrap() {
            Some(op) if op.done => break op,
            Some(_) => continue,
            None => panic!("stream ended without the cancelled result"),
        }
    };
    assert_eq!(stage(&last), remote_apis::reapi::execution_stage::Value::Completed);
}

/// A worker connection without the `worker` grant is refused before its
/// Hello is read; with it, the worker registers.
#[tokio::test]
async fn workers_need_the_worker_grant() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_file_text(&[("dev", &["cas-read", "execute", "admin"], ""), ("w1", &["worker"], "")]);
    let server = start(dir.path(), &tokens, &[], |f| f.worker.capacity = Some(0)).await;
    let hello = |name: &str| WorkerMessage {
        message: Some(worker_message::Message::Hello(Hello { name: name.into(), slots: 1, ..Default::default() })),
    };
    let mut gateway = WorkerGatewayClient::new(server.channel.clone());
    for token in [None, Some(token_of("dev"))] {
        let stream = futures::stream::iter(vec![hello("intruder")]).chain(futures::stream::pending());
        let got = gateway.session(authed(stream, token.as_deref())).await.map(drop);
        let want = if token.is_some() { Code::PermissionDenied } else { Code::Unauthenticated };
        let s = assert_code(got, want);
        assert!(s.message().contains("worker"), "{}", s.message());
    }
    let stream = futures::stream::iter(vec![hello("w1")]).chain(futures::stream::pending());
    let _session = gateway.session(authed(stream, Some(&token_of("w1")))).await.unwrap();
    let workers = AdminClient::new(server.channel.clone())
        .list_workers(authed(ListWorkersRequest {}, Some(&token_of("dev"))))
        .await
        .unwrap()
        .into_inner()
        .workers;
    let names: Vec<String> = workers.into_iter().map(|w| w.name).collect();
    assert_eq!(names, ["w1"]);
}

/// Changes to the token file apply within seconds; a broken file keeps the
/// previous one.
#[tokio::test]
async fn the_token_file_is_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &token_file_text(&[("old", &["cas-read"], "")]), &[], |_| {}).await;
    let path: PathBuf = dir.path().join("tokens.toml");
    assert_eq!(call(&server, "FindMissingBlobs", Some(&token_of("old")), "").await, Code::Ok);
    assert_eq!(call(&server, "FindMissingBlobs", Some(&token_of("new")), "").await, Code::Unauthenticated);
    // Revoke "old", add "new" (written aside and renamed, as editors do).
    std::fs::write(dir.path().join("next"), token_file_text(&[("new", &["cas-read"], "")])).unwrap();
    std::fs::rename(dir.path().join("next"), &path).unwrap();
    wait_until(|| async { call(&server, "FindMissingBlobs", Some(&token_of("new")), "").await == Code::Ok }).await;
    assert_eq!(call(&server, "FindMissingBlobs", Some(&token_of("old")), "").await, Code::Unauthenticated);
    // A grant added in place.
    std::fs::write(&path, token_file_text(&[("new", &["cas-read", "ac-write"], "")])).unwrap();
    wait_until(|| async { !refused(call(&server, "UpdateActionResult", Some(&token_of("new")), "").await) }).await;
    // Broken: the previous policy stays.
    std::fs::write(&path, "[[token]]\nname = \"new\"\nsha256 = \"oops\"\n").unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(call(&server, "FindMissingBlobs", Some(&token_of("new")), "").await, Code::Ok);
}

async fn wait_until<F: std::future::Future<Output = bool>>(mut check: impl FnMut() -> F) {
    for _ in 0..100 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("not reloaded within 10 s");
}

/// With `[server] worker_listen`, workers connect there and the public port
/// has no worker protocol.
#[tokio::test]
async fn the_worker_protocol_can_have_its_own_port() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let worker_addr = free.local_addr().unwrap();
    drop(free);
    let server = TestServer::start_with(Backend::Memory, |f| {
        f.server.worker_listen = Some(worker_addr.to_string());
        f.worker.capacity = Some(0);
    })
    .await;
    let hello = WorkerMessage {
        message: Some(worker_message::Message::Hello(Hello { name: "w".into(), slots: 1, ..Default::default() })),
    };
    let stream = futures::stream::iter(vec![hello.clone()]).chain(futures::stream::pending());
    let public = WorkerGatewayClient::new(server.channel.clone()).session(stream).await.map(drop);
    assert_code(public, Code::Unimplemented);
    let channel = tonic::transport::Channel::from_shared(format!("http://{worker_addr}")).unwrap();
    let mut gateway = WorkerGatewayClient::new(channel.connect().await.unwrap());
    let stream = futures::stream::iter(vec![hello]).chain(futures::stream::pending());
    let mut session = gateway.session(stream).await.unwrap().into_inner();
    assert!(session.message().await.unwrap().is_some(), "the worker is welcomed");
    server.stop().await.unwrap();
}

/// No `[auth]` on a non-loopback address: the server refuses to start and
/// says how to fix it; `mode = "none"` opts out explicitly.
#[tokio::test]
async fn an_open_server_on_a_public_address_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = |auth: Option<AuthSection>| {
        let mut f = FileConfig::default();
        f.scheduler.addr = "0.0.0.0:0".into();
        f.cas.backend = Backend::Memory;
        f.cas.root = Some(dir.path().to_path_buf());
        f.worker.capacity = Some(0);
        f.auth = auth;
        f.resolve().unwrap()
    };
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let err = cargo_distbuild::server::run(listener, config(None), async {}).await.unwrap_err().to_string();
    assert!(err.contains("[auth]") && err.contains("mode = \"none\"") && err.contains("token new"), "{err}");
    // Explicitly open: it starts (and stops at once).
    let none = AuthSection { mode: Some("none".into()), ..Default::default() };
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    cargo_distbuild::server::run(listener, config(Some(none)), async {}).await.unwrap();
    // The binary says the same and exits non-zero.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cargo-distbuild"))
        .args(["server", "--listen", "0.0.0.0:0", "--backend", "memory", "--workers", "0"])
        .env_remove("DISTBUILD_CONFIG")
        .env("HOME", dir.path())
        .env("XDG_CONFIG_HOME", dir.path())
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refusing to serve on 0.0.0.0"), "{stderr}");
}

/// `token new` prints a token once on stdout and an entry the server takes.
#[tokio::test]
async fn token_new_makes_a_working_entry() {
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cargo-distbuild"))
        .args(["token", "new", "laptop", "--grant", "cas-read", "--grant", "execute", "--instance", "team-a"])
        .env_remove("DISTBUILD_CONFIG")
        .env("HOME", dir.path())
        .env("XDG_CONFIG_HOME", dir.path())
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let entry = String::from_utf8(out.stderr).unwrap();
    assert!(token.starts_with("dbt_") && !entry.contains(&token), "the token appears once, on stdout");
    let server = start(dir.path(), &entry, &[], |_| {}).await;
    assert_eq!(call(&server, "FindMissingBlobs", Some(&token), "team-a").await, Code::Ok);
    assert_eq!(call(&server, "FindMissingBlobs", Some(&token), "team-b").await, Code::PermissionDenied);
    let bad = tokio::process::Command::new(env!("CARGO_BIN_EXE_cargo-distbuild"))
        .args(["token", "new", "x", "--grant", "cas-reed"])
        .output()
        .await
        .unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("cas-reed"));
}

/// Bazel 4.2.3 with `--remote_header=Authorization=Bearer ...`: remote
/// execution (whose endpoint is also its cache) works with a token, the
/// results come back as cache hits after `bazel clean`, and without the
/// header the build fails on UNAUTHENTICATED instead of running locally.
#[tokio::test(flavor = "multi_thread")]
async fn bazel_with_a_bearer_token() {
    use crate::bazel::{GENRULES, Workspace, bazel_or_skip, count, external_runners, process_summary};
    let Some(bazel) = bazel_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_file_text(&[("bazel", &["cas-read", "cas-write", "ac-read", "execute"], "")]);
    let server = start(dir.path(), &tokens, &[], |f| f.cas.backend = Backend::Filesystem).await;
    let url = server.url();
    let header = format!("--remote_header=Authorization=Bearer {}", token_of("bazel"));
    let (cold, warm, refused) = tokio::task::spawn_blocking(move || {
        let ws = Workspace::new(bazel);
        let out = ws.test_remotely_output(&url, &[]);
        let refused = (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned());
        let cold = process_summary(&ws.test_remotely_with(&url, &[&header]));
        assert!(ws.run("clean", &[]).0);
        let warm = process_summary(&ws.test_remotely_with(&url, &[&header]));
        (cold, warm, refused)
    })
    .await
    .unwrap();
    assert!(!refused.0, "bazel succeeded without a token");
    assert!(refused.1.contains("UNAUTHENTICATED"), "{}", refused.1);
    assert_eq!(external_runners(&cold), ["remote"], "cold: {cold:?}");
    assert!(count(&cold, "remote") >= GENRULES, "cold: {cold:?}");
    // Results the server cached itself although the token has no ac-write.
    assert_eq!(external_runners(&warm), ["remote cache hit"], "warm: {warm:?}");
}

/// Live names (streams, running outputs) need what blobs of their instance
/// need: cas-read. Executing alone does not let a caller read them.
#[tokio::test(flavor = "multi_thread")]
async fn live_output_needs_cas_read() {
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_file_text(&[("runner", &["execute"], ""), ("reader", &["cas-read"], "")]);
    let server = start(dir.path(), &tokens, &["cas-write"], |f| f.worker.capacity = Some(1)).await;
    let (runner, reader) = (token_of("runner"), token_of("reader"));
    let act = Act { output_paths: vec!["out"], do_not_cache: true, ..Act::sh("echo live > out; sleep 1") };
    let digest = act.upload(&server).await;
    let mut exec = ExecutionClient::new(server.channel.clone());
    let mut stream = exec.execute(authed(request(digest), Some(&runner))).await.unwrap().into_inner();
    let mut names = None;
    while let Some(op) = stream.message().await.unwrap() {
        let meta = ExecuteOperationMetadataForAuth::decode(op.metadata.unwrap().value.as_slice()).unwrap();
        if names.is_none() && !meta.stdout_stream_name.is_empty() {
            names = Some((op.name.clone(), meta.stdout_stream_name));
        }
    }
    let (op, stdout) = names.expect("the operation announced its streams");
    let output = remote_apis::logstream::running_output_name("", &op, "out");
    for name in [stdout.as_str(), output.as_str()] {
        let req = |token: &str| {
            authed(ReadRequest { resource_name: name.to_string(), read_offset: 0, read_limit: 0 }, Some(token))
        };
        let mut client = ByteStreamClient::new(server.channel.clone());
        assert_code(client.read(req(&runner)).await, Code::PermissionDenied);
        assert!(client.read(req(&reader)).await.is_ok(), "{name}");
    }
}

use remote_apis::reapi::ExecuteOperationMetadata as ExecuteOperationMetadataForAuth;
