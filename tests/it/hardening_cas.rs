//! Regression tests of the hardening issue (#9) for the CAS and the blob
//! store: bounded decompression (item 1), integrity on read (item 4), parked
//! uploads (item 5) and the cost of batch reads (item 6).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use cargo_distbuild::config::Backend;
use remote_apis::bytestream::{QueryWriteStatusRequest, ReadRequest, WriteRequest};
use remote_apis::reapi::{
    BatchReadBlobsRequest, BatchUpdateBlobsRequest, FindMissingBlobsRequest, batch_update_blobs_request,
};
use remote_apis::{Compressor, Digest, DigestFunction, InstanceName, ReadResource, WriteResource};
use tonic::Code;

use crate::common::{TestServer, assert_code, data, sha};

fn update(d: &Digest, compressor: Compressor, data: Vec<u8>) -> batch_update_blobs_request::Request {
    batch_update_blobs_request::Request { digest: Some(d.to_proto()), data, compressor: compressor.to_proto() }
}

/// Item 1: a 10-byte zstd item declaring 2^62 bytes used to make the server
/// allocate the claim and abort. Now it is refused on its own, before any
/// decoding, and the other items of the batch and later calls still work.
#[tokio::test]
async fn zstd_batch_item_with_a_huge_claim_gets_its_own_error() {
    let server = TestServer::start().await;
    let good = data(1, 1000);
    let good_digest = sha(&good);
    let mut bomb_digest = sha(b"not what it claims");
    bomb_digest.size = 1 << 62;
    let bomb = zstd::bulk::compress(&[0u8; 16], 1).unwrap();
    assert!(bomb.len() < 32);
    // A claim within the batch limit whose data expands far beyond it.
    let zeros = vec![0u8; 8 << 20];
    let mut overflow_digest = sha(&zeros[..1000]);
    overflow_digest.size = 1000;
    let overflow = zstd::bulk::compress(&zeros, 1).unwrap();
    let req = BatchUpdateBlobsRequest {
        requests: vec![
            update(&bomb_digest, Compressor::Zstd, bomb),
            update(&good_digest, Compressor::Identity, good.to_vec()),
            update(&overflow_digest, Compressor::Zstd, overflow),
        ],
        ..Default::default()
    };
    let resp = server.cas().batch_update_blobs(req).await.unwrap().into_inner();
    let codes: Vec<i32> = resp.responses.iter().map(|r| r.status.as_ref().unwrap().code).collect();
    assert_eq!(codes, [Code::InvalidArgument as i32, 0, Code::InvalidArgument as i32], "{resp:?}");
    let message = &resp.responses[0].status.as_ref().unwrap().message;
    assert!(message.contains("max_batch_total_size_bytes"), "{message}");
    assert!(resp.responses[2].status.as_ref().unwrap().message.contains("more than the digest's 1000 bytes"));

    let missing = server
        .cas()
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: vec![good_digest.to_proto(), overflow_digest.to_proto()],
            ..Default::default()
        })
        .await
        .expect("the server still serves")
        .into_inner();
    assert_eq!(missing.missing_blob_digests, vec![overflow_digest.to_proto()]);
}

/// Where the filesystem store keeps a SHA-256 blob.
fn blob_file(dir: &Path, d: &Digest) -> PathBuf {
    let hash = d.hash_hex();
    dir.join("cas/sha256").join(&hash[..2]).join(format!("{hash}-{}", d.size))
}

/// Overwrites a stored blob file behind the server's back, as an action
/// that reached the store could: made writable, other bytes of the same
/// length.
fn tamper(dir: &Path, d: &Digest) {
    let path = blob_file(dir, d);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all(&vec![0x5a; d.size as usize]).unwrap();
}

async fn read_blob(server: &TestServer, d: &Digest) -> Result<Vec<u8>, tonic::Status> {
    let name =
        ReadResource { instance: InstanceName::default(), compressor: Compressor::Identity, digest: *d }.to_name();
    let req = ReadRequest { resource_name: name, read_offset: 0, read_limit: 0 };
    let mut stream = server.bytestream().read(req).await?.into_inner();
    let mut out = Vec::new();
    while let Some(msg) = stream.message().await? {
        out.extend_from_slice(&msg.data);
    }
    Ok(out)
}

async fn missing(server: &TestServer, digests: &[Digest]) -> Vec<Digest> {
    let req =
        FindMissingBlobsRequest { blob_digests: digests.iter().map(Digest::to_proto).collect(), ..Default::default() };
    let resp = server.cas().find_missing_blobs(req).await.unwrap().into_inner();
    resp.missing_blob_digests.iter().map(|d| Digest::from_proto(DigestFunction::Sha256, d).unwrap()).collect()
}

/// Item 4: a stored blob overwritten on disk used to be served as it was,
/// also after a restart. Now the read hashes a file that changed since it
/// was written, drops it and answers NOT_FOUND, and FindMissingBlobs reports
/// it missing (so clients upload it again); a restart hashes files that
/// became writable.
#[tokio::test]
async fn a_blob_overwritten_on_disk_is_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), Backend::Filesystem, |_| {}).await;
    let client = server.client();
    // Large blobs take the changed-file check; the small one is hashed on
    // every read anyway.
    let blobs: Vec<_> = [(1, 1 << 20), (2, 1 << 20), (3, 1 << 20), (4, 100)].map(|(s, n)| data(s, n)).into();
    let digests: Vec<Digest> = blobs.iter().map(|b| sha(b)).collect();
    client.upload_blobs(digests.iter().copied().zip(blobs.iter().cloned()).collect()).await.unwrap();
    let [changed, changed_offline, intact, small] = digests[..] else { unreachable!() };

    tamper(dir.path(), &changed);
    tamper(dir.path(), &small);
    for d in [changed, small] {
        assert_code(read_blob(&server, &d).await, Code::NotFound);
    }
    assert_eq!(missing(&server, &digests).await, vec![changed, small]);
    assert_eq!(read_blob(&server, &intact).await.unwrap(), blobs[2].to_vec());
    server.stop().await.unwrap();

    tamper(dir.path(), &changed_offline);
    let server = TestServer::start_in(dir.path(), Backend::Filesystem, |_| {}).await;
    assert_eq!(missing(&server, &digests).await, vec![changed, changed_offline, small]);
    assert_code(read_blob(&server, &changed_offline).await, Code::NotFound);
    assert_eq!(read_blob(&server, &intact).await.unwrap(), blobs[2].to_vec());
    // Uploaded again, it is served again.
    server.client().upload_blobs(vec![(changed, blobs[0].clone())]).await.unwrap();
    assert_eq!(read_blob(&server, &changed).await.unwrap(), blobs[0].to_vec());
}

/// Item 4: `cas verify` re-hashes every stored blob, removes the corrupt
/// ones and says how many there were (exit status 1 when any).
#[tokio::test]
async fn cas_verify_finds_and_drops_a_corrupt_blob() {
    let server = TestServer::start().await;
    let blobs: Vec<_> = (0..3).map(|i| data(20 + i, 300_000)).collect();
    let digests: Vec<Digest> = blobs.iter().map(|b| sha(b)).collect();
    server.client().upload_blobs(digests.iter().copied().zip(blobs.iter().cloned()).collect()).await.unwrap();
    tamper(&server.data_dir, &digests[1]);

    let verify = || async {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_cargo-distbuild"))
            .args(["cas", "verify", "--server", &server.url()])
            .env_remove("DISTBUILD_SERVER")
            .env("XDG_CONFIG_HOME", "/nonexistent")
            .output()
            .await
            .unwrap()
    };
    let out = verify().await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("2 blobs intact") && stdout.contains("1 corrupt blobs removed"), "{stdout}");
    assert!(!blob_file(&server.data_dir, &digests[1]).exists());
    assert_eq!(missing(&server, &digests).await, vec![digests[1]]);

    let out = verify().await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("0 corrupt blobs removed"), "{stdout}");
}

/// Temporary files of uploads in progress under the store.
fn temp_files(dir: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.join("cas")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else if e.file_name().to_string_lossy().starts_with(".tmp-") {
                n += 1;
            }
        }
    }
    n
}

/// Item 5: every interrupted upload used to be parked with its temporary
/// file open for the whole resume window, without a cap (1,012 one-byte
/// uploads exhausted a 1,024-descriptor server). Now the oldest parked
/// uploads go beyond the per-client cap, and the newest still resume.
#[tokio::test]
async fn parked_uploads_beyond_the_cap_are_dropped() {
    let server = TestServer::start_with(Backend::Filesystem, |c| {
        c.cas.max_parked_uploads = 8;
        c.cas.max_parked_uploads_per_client = 4;
    })
    .await;
    let blob = data(30, 10_000);
    let d = sha(&blob);
    let name = |i: usize| {
        WriteResource {
            instance: InstanceName::default(),
            uuid: format!("parked-{i}"),
            compressor: Compressor::Identity,
            digest: d,
        }
        .to_name()
    };
    for i in 0..100 {
        let req = WriteRequest { resource_name: name(i), write_offset: 0, finish_write: false, data: vec![blob[0]] };
        assert!(server.bytestream().write(futures::stream::iter([req])).await.is_err());
    }
    assert_eq!(temp_files(&server.data_dir), 4, "one temporary file per parked upload, four parked");
    let status = |i: usize| {
        let mut bs = server.bytestream();
        async move { bs.query_write_status(QueryWriteStatusRequest { resource_name: name(i) }).await }
    };
    assert_eq!(status(99).await.unwrap().into_inner().committed_size, 1, "the newest is still parked");
    assert_code(status(0).await, Code::NotFound);
    // The parked one resumes where it stopped.
    let rest = WriteRequest { resource_name: name(99), write_offset: 1, finish_write: true, data: blob[1..].to_vec() };
    server.bytestream().write(futures::stream::iter([rest])).await.unwrap();
    assert_eq!(read_blob(&server, &d).await.unwrap(), blob.to_vec());
}

/// Item 5, found by the soak: parked uploads expired only when a new
/// upload arrived, so a server that received no more writes kept their
/// files open for good. They now go when their resume window ends.
#[tokio::test]
async fn parked_uploads_expire_without_new_uploads() {
    let server = TestServer::start_with(Backend::Filesystem, |c| {
        c.cas.upload_resume_window = std::time::Duration::from_secs(1);
    })
    .await;
    let blob = data(31, 10_000);
    let d = sha(&blob);
    for i in 0..3 {
        let resource_name = WriteResource {
            instance: InstanceName::default(),
            uuid: format!("expiring-{i}"),
            compressor: Compressor::Identity,
            digest: d,
        }
        .to_name();
        let req = WriteRequest { resource_name, write_offset: 0, finish_write: false, data: vec![blob[0]] };
        assert!(server.bytestream().write(futures::stream::iter([req])).await.is_err());
    }
    assert_eq!(temp_files(&server.data_dir), 3);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while temp_files(&server.data_dir) > 0 {
        assert!(std::time::Instant::now() < deadline, "parked uploads were never expired");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Item 6: one 13 MiB BatchReadBlobs request (190,000 digests of tiny or
/// absent blobs) cost about ten seconds of server CPU; the number of blobs
/// per call was bounded only by the message size. Now a call names at most
/// 10,000 (INVALID_ARGUMENT beyond, saying so), and repeats are read once.
#[tokio::test]
async fn batch_reads_are_bounded_in_blobs_per_call() {
    // 512 KiB of batch: the floor of 10,000 blobs applies (a 4 MiB batch
    // allows one blob per 64 bytes).
    let server =
        TestServer::start_with(Backend::Filesystem, |c| c.cas.max_batch_size = bytesize::ByteSize::kib(512)).await;
    let tiny = data(40, 10);
    let d = sha(&tiny);
    server.client().upload_blobs(vec![(d, tiny.clone())]).await.unwrap();
    let request = |n: usize| BatchReadBlobsRequest { digests: vec![d.to_proto(); n], ..Default::default() };
    let status = assert_code(server.cas().batch_read_blobs(request(10_001)).await, Code::InvalidArgument);
    assert!(status.message().contains("10001 blobs") && status.message().contains("10000"), "{}", status.message());
    let resp = server.cas().batch_read_blobs(request(10_000)).await.unwrap().into_inner();
    assert_eq!(resp.responses.len(), 10_000);
    assert!(resp.responses.iter().all(|r| r.data == tiny.to_vec() && r.status.as_ref().unwrap().code == 0));
}

/// Item 6, GetTree: a DAG whose directories each name the next one twice
/// expands to 2^depth paths. The walk used to forget what it had visited at
/// every page, so with small pages it returned (and fetched) each directory
/// once per path. Now each distinct directory comes once.
#[tokio::test]
async fn get_tree_of_a_dag_visits_each_directory_once() {
    use prost::Message;
    use remote_apis::reapi::{Directory, DirectoryNode, GetTreeRequest};
    let server = TestServer::start().await;
    let mut blobs = Vec::new();
    let mut child: Option<Digest> = None;
    for _ in 0..12 {
        let directories = match child {
            Some(c) => ["a", "b"].map(|name| DirectoryNode { name: name.into(), digest: Some(c.to_proto()) }).into(),
            None => Vec::new(),
        };
        let dir = Directory { directories, node_properties: None, files: Vec::new(), symlinks: Vec::new() };
        let bytes = bytes::Bytes::from(dir.encode_to_vec());
        let digest = sha(&bytes);
        blobs.push((digest, bytes));
        child = Some(digest);
    }
    let root = child.unwrap();
    server.client().upload_blobs(blobs).await.unwrap();
    let req = GetTreeRequest { root_digest: Some(root.to_proto()), page_size: 1, ..Default::default() };
    let mut stream = server.cas().get_tree(req).await.unwrap().into_inner();
    let mut returned = 0;
    while let Some(page) = stream.message().await.unwrap() {
        returned += page.directories.len();
        assert!(returned <= 12, "a directory came more than once");
    }
    assert_eq!(returned, 12);
}
