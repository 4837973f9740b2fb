//! ActionCache: per-instance entries, returned only when complete.

use prost::Message;
use remote_apis::Digest;
use remote_apis::reapi::{
    ActionResult, Directory, FileNode, GetActionResultRequest, OutputDirectory, OutputFile, Tree,
    UpdateActionResultRequest,
};
use tonic::Code;

use crate::common::{TestServer, assert_code, data, sha};

fn get(instance: &str, action: &Digest) -> GetActionResultRequest {
    GetActionResultRequest {
        instance_name: instance.into(),
        action_digest: Some(action.to_proto()),
        ..Default::default()
    }
}

fn put(instance: &str, action: &Digest, result: &ActionResult) -> UpdateActionResultRequest {
    UpdateActionResultRequest {
        instance_name: instance.into(),
        action_digest: Some(action.to_proto()),
        action_result: Some(result.clone()),
        ..Default::default()
    }
}

#[tokio::test]
async fn results_are_per_instance_and_complete() {
    let server = TestServer::start().await;
    let mut ac = server.ac();
    let action = sha(b"some action");
    let out = data(1, 5000);
    let stdout = b"hello from the action\n".to_vec();
    let result = ActionResult {
        output_files: vec![OutputFile {
            path: "out/a.o".into(),
            digest: Some(sha(&out).to_proto()),
            ..Default::default()
        }],
        stdout_digest: Some(sha(&stdout).to_proto()),
        exit_code: 0,
        ..Default::default()
    };
    assert_code(ac.get_action_result(get("main", &action)).await, Code::NotFound);
    let stored = ac.update_action_result(put("main", &action, &result)).await.unwrap().into_inner();
    assert_eq!(stored, result);

    // The output and stdout are not in the CAS yet: not a usable hit.
    let s = assert_code(ac.get_action_result(get("main", &action)).await, Code::NotFound);
    assert!(s.message().contains(&action.hash_hex()), "{}", s.message());

    // With every blob present it is a hit, in its own instance only.
    ac.update_action_result(put("main", &action, &result)).await.unwrap();
    server.client().upload_blobs(vec![(sha(&out), out.clone()), (sha(&stdout), stdout.clone().into())]).await.unwrap();
    assert_eq!(ac.get_action_result(get("main", &action)).await.unwrap().into_inner(), result);
    assert_code(ac.get_action_result(get("other", &action)).await, Code::NotFound);

    // Inlining on request.
    let mut req = get("main", &action);
    req.inline_stdout = true;
    req.inline_output_files = vec!["out/a.o".into()];
    let got = ac.get_action_result(req).await.unwrap().into_inner();
    assert_eq!(got.stdout_raw, stdout);
    assert_eq!(got.output_files[0].contents, out.to_vec());
}

#[tokio::test]
async fn files_inside_output_trees_must_be_present() {
    let server = TestServer::start().await;
    let mut ac = server.ac();
    let inner = data(2, 100);
    let tree = Tree {
        root: Some(Directory {
            files: vec![FileNode { name: "f".into(), digest: Some(sha(&inner).to_proto()), ..Default::default() }],
            ..Default::default()
        }),
        children: vec![],
    };
    let tree_bytes = tree.encode_to_vec();
    let action = sha(b"tree action");
    let result = ActionResult {
        output_directories: vec![OutputDirectory {
            path: "out".into(),
            tree_digest: Some(sha(&tree_bytes).to_proto()),
            ..Default::default()
        }],
        ..Default::default()
    };
    server.client().upload_blobs(vec![(sha(&tree_bytes), tree_bytes.into())]).await.unwrap();
    ac.update_action_result(put("", &action, &result)).await.unwrap();
    assert_code(ac.get_action_result(get("", &action)).await, Code::NotFound);

    ac.update_action_result(put("", &action, &result)).await.unwrap();
    server.client().upload_blobs(vec![(sha(&inner), inner)]).await.unwrap();
    assert!(ac.get_action_result(get("", &action)).await.is_ok());
}

#[tokio::test]
async fn bad_updates_are_refused() {
    let server = TestServer::start().await;
    let mut ac = server.ac();
    let action = sha(b"a");
    let mut req = put("", &action, &ActionResult::default());
    req.action_result = None;
    assert_code(ac.update_action_result(req).await, Code::InvalidArgument);

    let bad = ActionResult {
        output_files: vec![OutputFile {
            path: "x".into(),
            digest: Some(remote_apis::reapi::Digest { hash: "nothex".into(), size_bytes: 1 }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let s = assert_code(ac.update_action_result(put("", &action, &bad)).await, Code::InvalidArgument);
    assert!(s.message().contains("output_files[0]"), "{}", s.message());

    let mut req = get("", &action);
    req.action_digest = None;
    assert_code(ac.get_action_result(req).await, Code::InvalidArgument);
}
