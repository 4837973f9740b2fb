//! Regression tests of the hardening issue (#9), execution side: trees of
//! any depth and size (items 2, 3, 6) and validation per the spec (items 10
//! and 11). Each failed on the code before its fix: a crash (stack overflow)
//! for items 2 and 3, work without bound for 6, INVALID_ARGUMENT for what
//! the spec allows for 10 and 11.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use remote_apis::reapi::{Action, Directory, DirectoryNode, ExecuteResponse, FileNode, Tree};
use remote_apis::{Digest, DigestFunction, merkle};
use tonic::Code;

use crate::common::{TestServer, assert_code, sha};
use crate::execution::{Act, execute, request, response, run};

const F: DigestFunction = DigestFunction::Sha256;

/// Uploads `dirs` (root last) and an action running `script` on that root.
async fn upload_tree_action(server: &TestServer, dirs: Vec<(Digest, Bytes)>, act: &Act) -> Digest {
    let root = dirs.last().unwrap().0;
    let (cd, cb) = merkle::encode(F, &act.command());
    let timeout = act
        .timeout
        .map(|t| remote_apis::protobuf::Duration { seconds: t.as_secs() as i64, nanos: t.subsec_nanos() as i32 });
    let action = Action {
        command_digest: Some(cd.to_proto()),
        input_root_digest: Some(root.to_proto()),
        timeout,
        do_not_cache: true,
        ..Default::default()
    };
    let (ad, ab) = merkle::encode(F, &action);
    let mut blobs = dirs;
    blobs.extend([(cd, cb), (ad, ab), (sha(b"x"), Bytes::from_static(b"x"))]);
    blobs.sort_by_key(|(d, _)| (d.hash, d.size));
    blobs.dedup_by_key(|(d, _)| *d);
    server.client().upload_blobs(blobs).await.unwrap();
    ad
}

/// A chain of `depth` directories named `d` below the root.
fn chain(depth: usize) -> Vec<(Digest, Bytes)> {
    let mut out = vec![merkle::encode(F, &Directory::default())];
    for _ in 0..depth {
        let below = out.last().unwrap().0;
        let dir = Directory {
            directories: vec![DirectoryNode { name: "d".into(), digest: Some(below.to_proto()) }],
            ..Default::default()
        };
        out.push(merkle::encode(F, &dir));
    }
    out
}

/// `levels` Directory blobs, each naming the one below twice (`a` and `b`),
/// one file at the bottom: 2^levels - 1 directories once expanded.
fn dag(levels: usize) -> Vec<(Digest, Bytes)> {
    let file = FileNode { name: "f".into(), digest: Some(sha(b"x").to_proto()), ..Default::default() };
    let mut out = vec![merkle::encode(F, &Directory { files: vec![file], ..Default::default() })];
    for _ in 1..levels {
        let below = out.last().unwrap().0;
        let node = |name: &str| DirectoryNode { name: name.into(), digest: Some(below.to_proto()) };
        out.push(merkle::encode(F, &Directory { directories: vec![node("a"), node("b")], ..Default::default() }));
    }
    out
}

fn status(r: &ExecuteResponse) -> (Code, &str) {
    let s = r.status.as_ref().expect("a status");
    (Code::from(s.code), s.message.as_str())
}

async fn blob(server: &TestServer, d: Option<&remote_apis::reapi::Digest>) -> Bytes {
    let d = Digest::from_proto(F, d.unwrap()).unwrap();
    if d.size == 0 {
        return Bytes::new();
    }
    server.client().read_blob(d).await.unwrap()
}

async fn assert_still_serves(server: &TestServer) {
    let r = execute(server, &Act { do_not_cache: true, ..Act::sh("echo alive") }).await;
    assert!(r.status.as_ref().is_none_or(|s| s.code == 0), "{:?}", r.status);
    assert_eq!(blob(server, r.result.unwrap().stdout_digest.as_ref()).await, "alive\n");
}

/// Creates `depth` nested `d` directories in `dir`, relative to each other
/// (the whole path is far longer than PATH_MAX).
fn perl_deep(depth: usize) -> String {
    format!("perl -e 'for (1..{depth}) {{ mkdir \"d\" or die \"$!\"; chdir \"d\" or die \"$!\" }}'")
}

/// Item 2: a 10,000-deep input tree killed whoever executed it (stack
/// overflow in input planning). Validation now refuses it naming the limit;
/// with the limit raised, the worker fails the action cleanly and lives on.
#[tokio::test(flavor = "multi_thread")]
async fn a_10000_deep_input_tree_fails_cleanly() {
    let server = TestServer::start().await;
    let digest = upload_tree_action(&server, chain(10_000), &Act::sh("true")).await;
    let refused = assert_code(run(&server, request(digest)).await, Code::InvalidArgument);
    assert!(refused.message().contains("[execution] max_tree_depth"), "{}", refused.message());

    let server = TestServer::start_with(cargo_distbuild::config::Backend::Filesystem, |c| {
        c.execution.max_tree_depth = 20_000;
    })
    .await;
    let digest = upload_tree_action(&server, chain(10_000), &Act::sh("true")).await;
    let ops = run(&server, request(digest)).await.unwrap();
    let r = response(ops.last().unwrap());
    // Deeper than a path can name: creating it fails, as a status.
    let (code, message) = status(&r);
    assert_ne!(code, Code::Ok, "{message}");
    assert_still_serves(&server).await;
}

/// Item 3: an action that made a 100,000-deep output directory crashed the
/// server (recursive removal), and every later start on that data
/// directory. Now collection fails with a status naming the limit, the
/// directory is removed, and a start over such a leftover is clean.
#[tokio::test(flavor = "multi_thread")]
async fn a_100000_deep_output_directory_is_an_error_status_and_restarts_are_clean() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(data.path(), cargo_distbuild::config::Backend::Filesystem, |_| {}).await;
    let act = Act {
        output_paths: vec!["out"],
        do_not_cache: true,
        ..Act::sh(&format!("mkdir out && cd out && {}", perl_deep(100_000)))
    };
    let r = execute(&server, &act).await;
    let (code, message) = status(&r);
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    assert!(message.contains("[execution] max_tree_depth"), "{message}");
    assert_still_serves(&server).await;
    server.stop().await.unwrap();

    // A leftover as a crash would leave it, removed at the next start.
    let exec = data.path().join("worker/exec/leftover");
    std::fs::create_dir_all(&exec).unwrap();
    let made = std::process::Command::new("sh").arg("-c").arg(perl_deep(100_000)).current_dir(&exec).status();
    assert!(made.unwrap().success());
    let server = TestServer::start_in(data.path(), cargo_distbuild::config::Backend::Filesystem, |_| {}).await;
    assert_still_serves(&server).await;
    assert!(!exec.exists(), "the leftover was not removed");
    server.stop().await.unwrap();
}

/// Item 6: 19 Directory blobs (a few KB) expand to 524,287 directories; the
/// DAG is counted expanded and refused before any work, naming the limit.
#[tokio::test]
async fn the_19_blob_dag_is_refused_before_work() {
    let server = TestServer::start().await;
    let digest = upload_tree_action(&server, dag(19), &Act::sh("true")).await;
    let refused = assert_code(run(&server, request(digest)).await, Code::InvalidArgument);
    let message = refused.message();
    assert!(message.contains("524287 directories"), "{message}");
    assert!(message.contains("[execution] max_tree_directories"), "{message}");
}

/// Item 6: materializing the input root has a deadline of its own (the
/// action's timeout again): 32,767 directories cannot be created in 1 ms,
/// and the action fails with DEADLINE_EXCEEDED before its command runs.
#[tokio::test(flavor = "multi_thread")]
async fn materializing_the_input_root_has_a_deadline() {
    let server = TestServer::start().await;
    let act = Act { timeout: Some(Duration::from_millis(1)), ..Act::sh("echo ran") };
    let digest = upload_tree_action(&server, dag(15), &act).await;
    let ops = run(&server, request(digest)).await.unwrap();
    let r = response(ops.last().unwrap());
    let (code, message) = status(&r);
    assert_eq!(code, Code::DeadlineExceeded, "{message}");
    assert!(message.contains("input root"), "{message}");
    assert!(r.result.is_none(), "the command ran");
    assert_still_serves(&server).await;
}

/// Item 10: BuildStream's outputs, `.` and `../../../buildstream-install`
/// from a deep working directory, are collected and reported under the
/// paths it gave.
#[tokio::test]
async fn buildstream_outputs_with_dot_and_dotdot_are_collected() {
    let server = TestServer::start().await;
    let act = Act {
        working_directory: "buildstream/smoke/hello.bst",
        output_paths: vec![".", "../../../buildstream-install"],
        ..Act::sh(
            "echo here > made; mkdir -p ../../../buildstream-install/bin; echo hi > ../../../buildstream-install/bin/hello",
        )
    };
    let r = execute(&server, &act).await;
    assert!(r.status.as_ref().is_none_or(|s| s.code == 0), "{:?}", r.status);
    let result = r.result.unwrap();
    let paths: Vec<&str> = result.output_directories.iter().map(|d| d.path.as_str()).collect();
    assert_eq!(paths, [".", "../../../buildstream-install"]);
    let tree = |i: usize| {
        let d = result.output_directories[i].tree_digest.clone();
        let server = &server;
        async move { Tree::decode(blob(server, d.as_ref()).await).unwrap() }
    };
    let wd = tree(0).await;
    assert_eq!(wd.root.unwrap().files[0].name, "made");
    let install = tree(1).await;
    assert_eq!(install.root.unwrap().directories[0].name, "bin");
    assert_eq!(install.children[0].files[0].name, "hello");
}

/// Item 11: Capabilities advertise absolute symlinks as ALLOWED, and input
/// symlinks, absolute or climbing out of the root, are staged as given.
/// The worker itself never goes through one: an output parent that is a
/// symlink to outside is refused with FAILED_PRECONDITION and nothing is
/// created there.
#[tokio::test]
async fn input_symlinks_are_staged_as_given_and_never_followed_by_the_worker() {
    let server = TestServer::start().await;
    let caps = server.get_capabilities().await;
    let allowed = remote_apis::reapi::symlink_absolute_path_strategy::Value::Allowed as i32;
    assert_eq!(caps.cache_capabilities.unwrap().symlink_absolute_path_strategy, allowed);

    let act = Act {
        symlinks: vec![("abs", "/usr/bin/env"), ("up", "../../../x")],
        do_not_cache: true,
        ..Act::sh("readlink abs; readlink up")
    };
    let r = execute(&server, &act).await;
    assert!(r.status.as_ref().is_none_or(|s| s.code == 0), "{:?}", r.status);
    let stdout = blob(&server, r.result.unwrap().stdout_digest.as_ref()).await;
    assert_eq!(stdout, "/usr/bin/env\n../../../x\n");

    let outside = tempfile::tempdir().unwrap();
    let target: &'static str = Box::leak(outside.path().display().to_string().into_boxed_str());
    let act = Act {
        symlinks: vec![("out", target)],
        output_paths: vec!["out/sub/file"],
        do_not_cache: true,
        ..Act::sh("true")
    };
    let r = execute(&server, &act).await;
    let (code, message) = status(&r);
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    assert!(message.contains("symlink \"out\""), "{message}");
    assert!(!Path::new(target).join("sub").exists(), "the worker created a directory through the symlink");
}
