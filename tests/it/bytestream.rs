//! ByteStream reads and writes: ranges, verification, resumption, zstd.

use remote_apis::bytestream::{QueryWriteStatusRequest, ReadRequest, WriteRequest, WriteResponse};
use remote_apis::{Compressor, Digest, InstanceName, ReadResource, WriteResource};
use tonic::Code;

use crate::common::{TestServer, assert_code, data, sha};

fn write_name(d: &Digest, compressor: Compressor, uuid: &str) -> String {
    WriteResource { instance: InstanceName::new("ci/main").unwrap(), uuid: uuid.into(), compressor, digest: *d }
        .to_name()
}

fn read_name(d: &Digest, compressor: Compressor) -> String {
    ReadResource { instance: InstanceName::new("ci/main").unwrap(), compressor, digest: *d }.to_name()
}

/// Sends `chunks` starting at `offset`; `finish` on the last one.
async fn write(
    server: &TestServer,
    name: &str,
    chunks: Vec<Vec<u8>>,
    offset: i64,
    finish: bool,
) -> Result<WriteResponse, tonic::Status> {
    let mut reqs = Vec::new();
    let mut at = offset;
    let n = chunks.len();
    for (i, c) in chunks.into_iter().enumerate() {
        let len = c.len() as i64;
        reqs.push(WriteRequest {
            resource_name: if i == 0 { name.to_string() } else { String::new() },
            write_offset: at,
            finish_write: finish && i + 1 == n,
            data: c,
        });
        at += len;
    }
    server.bytestream().write(futures::stream::iter(reqs)).await.map(|r| r.into_inner())
}

async fn read(server: &TestServer, name: &str, offset: i64, limit: i64) -> Result<Vec<u8>, tonic::Status> {
    let req = ReadRequest { resource_name: name.into(), read_offset: offset, read_limit: limit };
    let mut stream = server.bytestream().read(req).await?.into_inner();
    let mut out = Vec::new();
    while let Some(msg) = stream.message().await? {
        out.extend_from_slice(&msg.data);
    }
    Ok(out)
}

fn split(data: &[u8], size: usize) -> Vec<Vec<u8>> {
    data.chunks(size).map(<[u8]>::to_vec).collect()
}

#[tokio::test]
async fn write_then_read_with_ranges() {
    let server = TestServer::start().await;
    let blob = data(1, 5 << 20);
    let d = sha(&blob);
    let resp =
        write(&server, &write_name(&d, Compressor::Identity, "u1"), split(&blob, 64 << 10), 0, true).await.unwrap();
    assert_eq!(resp.committed_size, d.size as i64);

    let name = read_name(&d, Compressor::Identity);
    assert_eq!(read(&server, &name, 0, 0).await.unwrap(), blob.to_vec());
    assert_eq!(read(&server, &name, 100, 1000).await.unwrap(), blob[100..1100].to_vec());
    assert_eq!(read(&server, &name, (d.size - 10) as i64, 1000).await.unwrap(), blob[blob.len() - 10..].to_vec());
    assert!(read(&server, &name, d.size as i64, 0).await.unwrap().is_empty());
    assert_code(read(&server, &name, d.size as i64 + 1, 0).await, Code::OutOfRange);
    assert_code(read(&server, &name, -1, 0).await, Code::OutOfRange);
    assert_code(read(&server, &name, 0, -5).await, Code::InvalidArgument);
    assert_code(read(&server, &read_name(&sha(b"absent"), Compressor::Identity), 0, 0).await, Code::NotFound);
    assert_code(read(&server, "blobs/nothex/3", 0, 0).await, Code::InvalidArgument);

    // Uploading what is already there completes at once.
    let resp =
        write(&server, &write_name(&d, Compressor::Identity, "u2"), vec![blob[..10].to_vec()], 0, false).await.unwrap();
    assert_eq!(resp.committed_size, d.size as i64);
}

#[tokio::test]
async fn writes_with_wrong_data_store_nothing() {
    let server = TestServer::start().await;
    let blob = data(2, 100_000);
    let d = sha(&blob);
    let mut wrong = blob.to_vec();
    wrong[5000] ^= 1;
    let s = assert_code(
        write(&server, &write_name(&d, Compressor::Identity, "w"), split(&wrong, 4096), 0, true).await,
        Code::InvalidArgument,
    );
    assert!(s.message().contains("hash"), "{}", s.message());
    let s = assert_code(
        write(&server, &write_name(&d, Compressor::Identity, "w2"), split(&blob[..50_000], 4096), 0, true).await,
        Code::InvalidArgument,
    );
    assert!(s.message().contains("50000"), "{}", s.message());
    let mut longer = blob.to_vec();
    longer.extend_from_slice(b"extra");
    assert_code(
        write(&server, &write_name(&d, Compressor::Identity, "w3"), split(&longer, 4096), 0, true).await,
        Code::InvalidArgument,
    );
    assert_code(read(&server, &read_name(&d, Compressor::Identity), 0, 0).await, Code::NotFound);
    assert_code(write(&server, "uploads/x/blobs/zz/1", vec![b"a".to_vec()], 0, true).await, Code::InvalidArgument);
    // A first message at an offset the server never saw.
    assert_code(
        write(&server, &write_name(&d, Compressor::Identity, "w4"), vec![blob[10..20].to_vec()], 10, true).await,
        Code::InvalidArgument,
    );
    // Writer threads finish cleaning up shortly after the failed call returns.
    let temp_files = || walk(&server.data_dir).into_iter().filter(|n| n.starts_with(".tmp-")).count();
    for _ in 0..100 {
        if temp_files() == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(temp_files(), 0, "failed uploads leave no temporary files");
}

#[tokio::test]
async fn interrupted_uploads_resume_from_the_committed_size() {
    let server = TestServer::start().await;
    let blob = data(3, 1 << 20);
    let d = sha(&blob);
    let name = write_name(&d, Compressor::Identity, "resume-me");
    let query = |n: &str| QueryWriteStatusRequest { resource_name: n.to_string() };

    assert_code(server.bytestream().query_write_status(query(&name)).await, Code::NotFound);
    // The stream ends after 300 KiB without finish_write.
    let half = 300 << 10;
    assert!(write(&server, &name, split(&blob[..half], 100 << 10), 0, false).await.is_err());
    let status = server.bytestream().query_write_status(query(&name)).await.unwrap().into_inner();
    assert_eq!((status.committed_size, status.complete), (half as i64, false));
    assert_code(read(&server, &read_name(&d, Compressor::Identity), 0, 0).await, Code::NotFound);

    // Resuming from anywhere else is refused and keeps the upload.
    assert_code(write(&server, &name, split(&blob[1000..], 100 << 10), 1000, true).await, Code::InvalidArgument);
    // Resuming from the committed size completes it.
    let resp = write(&server, &name, split(&blob[half..], 100 << 10), half as i64, true).await.unwrap();
    assert_eq!(resp.committed_size, d.size as i64);
    assert_eq!(read(&server, &read_name(&d, Compressor::Identity), 0, 0).await.unwrap(), blob.to_vec());
    let status = server.bytestream().query_write_status(query(&name)).await.unwrap().into_inner();
    assert_eq!((status.committed_size, status.complete), (d.size as i64, true));

    // An interrupted upload may also restart from zero.
    let other = data(4, 200_000);
    let od = sha(&other);
    let oname = write_name(&od, Compressor::Identity, "restart");
    assert!(write(&server, &oname, split(&other[..50_000], 10_000), 0, false).await.is_err());
    write(&server, &oname, split(&other, 10_000), 0, true).await.unwrap();
    assert_eq!(read(&server, &read_name(&od, Compressor::Identity), 0, 0).await.unwrap(), other.to_vec());
}

#[tokio::test]
async fn zstd_both_ways() {
    let server = TestServer::start().await;
    // Compressible data, sent as two independent frames in odd-sized chunks.
    let blob: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8 ^ (i / 7919) as u8).collect();
    let d = sha(&blob);
    let mut wire = zstd::bulk::compress(&blob[..1_000_000], 3).unwrap();
    wire.extend(zstd::bulk::compress(&blob[1_000_000..], 3).unwrap());
    assert!(wire.len() < blob.len() / 4);
    let resp = write(&server, &write_name(&d, Compressor::Zstd, "z"), split(&wire, 7777), 0, true).await.unwrap();
    // The compressed bytes sent: what Buck2 and Bazel check it against.
    assert_eq!(resp.committed_size, wire.len() as i64);

    assert_eq!(read(&server, &read_name(&d, Compressor::Identity), 0, 0).await.unwrap(), blob);
    let packed = read(&server, &read_name(&d, Compressor::Zstd), 0, 0).await.unwrap();
    assert!(packed.len() < blob.len() / 4);
    assert_eq!(zstd::stream::decode_all(&packed[..]).unwrap(), blob);
    // read_offset counts uncompressed bytes.
    let tail = read(&server, &read_name(&d, Compressor::Zstd), 2_000_000, 0).await.unwrap();
    assert_eq!(zstd::stream::decode_all(&tail[..]).unwrap(), blob[2_000_000..].to_vec());
    assert_code(read(&server, &read_name(&d, Compressor::Zstd), 0, 10).await, Code::InvalidArgument);

    // A compressed upload of a blob that exists answers -1.
    let resp = write(&server, &write_name(&d, Compressor::Zstd, "z2"), split(&wire, 7777), 0, true).await.unwrap();
    assert_eq!(resp.committed_size, -1);
}

#[tokio::test]
async fn zstd_bombs_and_truncated_frames_are_refused() {
    let server = TestServer::start().await;
    let small = b"a small blob".to_vec();
    let d = sha(&small);
    let bomb = zstd::bulk::compress(&vec![7u8; 64 << 20], 19).unwrap();
    assert!(bomb.len() < 64 << 10);
    let s = assert_code(
        write(&server, &write_name(&d, Compressor::Zstd, "b"), vec![bomb], 0, true).await,
        Code::InvalidArgument,
    );
    assert!(s.message().contains("more than"), "{}", s.message());

    let wire = zstd::bulk::compress(&small, 3).unwrap();
    let cut = wire[..wire.len() - 3].to_vec();
    assert_code(
        write(&server, &write_name(&d, Compressor::Zstd, "t"), vec![cut], 0, true).await,
        Code::InvalidArgument,
    );
    assert_code(
        write(&server, &write_name(&d, Compressor::Zstd, "g"), vec![b"not zstd".to_vec()], 0, true).await,
        Code::InvalidArgument,
    );
    assert_code(read(&server, &read_name(&d, Compressor::Identity), 0, 0).await, Code::NotFound);
}

#[tokio::test]
async fn the_empty_blob_reads_in_both_encodings() {
    let server = TestServer::start().await;
    let d = sha(b"");
    assert!(read(&server, &read_name(&d, Compressor::Identity), 0, 0).await.unwrap().is_empty());
    let packed = read(&server, &read_name(&d, Compressor::Zstd), 0, 0).await.unwrap();
    assert!(zstd::stream::decode_all(&packed[..]).unwrap().is_empty());
}

/// File names under `dir`, recursively.
fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out
}

/// Parked uploads must not pin server threads: more of them than the
/// blocking pool has threads, and the server still serves.
#[tokio::test]
async fn many_parked_uploads_do_not_starve_the_server() {
    let server = TestServer::start().await;
    let blob = data(9, 600_000);
    let d = sha(&blob);
    for i in 0..600 {
        let name = write_name(&d, Compressor::Identity, &format!("parked-{i}"));
        assert!(write(&server, &name, vec![blob[..300_000].to_vec()], 0, false).await.is_err());
    }
    let other = data(10, 2 << 20);
    let od = sha(&other);
    let served = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        write(&server, &write_name(&od, Compressor::Identity, "after"), split(&other, 1 << 20), 0, true).await.unwrap();
        read(&server, &read_name(&od, Compressor::Identity), 0, 0).await.unwrap()
    })
    .await
    .expect("the server still serves with 600 parked uploads");
    assert_eq!(served, other.to_vec());
}

#[tokio::test]
async fn a_blob_larger_than_the_store_is_invalid_argument() {
    let server = TestServer::start_with(Default::default(), |c| c.cas.max_size = bytesize::ByteSize::kib(100)).await;
    let big = data(11, 200_000);
    let name = write_name(&sha(&big), Compressor::Identity, "too-big");
    for _ in 0..2 {
        // The same upload twice: the first refusal leaves no stuck session.
        // max_cas_blob_size_bytes is the budget; REAPI 2.12 asks for
        // INVALID_ARGUMENT above it.
        let s = assert_code(write(&server, &name, split(&big, 50_000), 0, true).await, Code::InvalidArgument);
        assert!(s.message().contains("budget"), "{}", s.message());
    }
}
