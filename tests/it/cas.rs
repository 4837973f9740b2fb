//! ContentAddressableStorage and Capabilities over gRPC.

use prost::Message;
use remote_apis::reapi::{
    BatchReadBlobsRequest, BatchUpdateBlobsRequest, Directory, DirectoryNode, FileNode, FindMissingBlobsRequest,
    GetCapabilitiesRequest, GetTreeRequest, batch_update_blobs_request, compressor, digest_function,
};
use remote_apis::{Digest, DigestFunction};
use tonic::Code;
use tonic_types::StatusExt;

use crate::common::{TestServer, assert_code, data, sha};

fn update(d: &Digest, bytes: &[u8]) -> batch_update_blobs_request::Request {
    batch_update_blobs_request::Request {
        digest: Some(d.to_proto()),
        data: bytes.to_vec(),
        compressor: compressor::Value::Identity as i32,
    }
}

#[tokio::test]
async fn capabilities_tell_the_truth() {
    let server =
        TestServer::start_with(Default::default(), |c| c.cas.max_batch_size = bytesize::ByteSize::mib(8)).await;
    let caps = server.capabilities().get_capabilities(GetCapabilitiesRequest::default()).await.unwrap().into_inner();
    let cache = caps.cache_capabilities.unwrap();
    assert_eq!(
        cache.digest_functions,
        vec![digest_function::Value::Sha256 as i32, digest_function::Value::Blake3 as i32]
    );
    assert_eq!(cache.max_batch_total_size_bytes, 8 << 20);
    assert!(cache.action_cache_update_capabilities.unwrap().update_enabled);
    assert_eq!(cache.supported_compressors, vec![compressor::Value::Zstd as i32]);
    assert_eq!(caps.low_api_version.unwrap().major, 2);

    // The advertised batch size really is accepted: a batch just under it.
    let blob = data(1, (8 << 20) - 1024);
    let d = sha(&blob);
    let req = BatchUpdateBlobsRequest { requests: vec![update(&d, &blob)], ..Default::default() };
    let resp = server.cas().batch_update_blobs(req).await.unwrap().into_inner();
    assert_eq!(resp.responses[0].status.as_ref().unwrap().code, 0);
}

#[tokio::test]
async fn find_missing_and_batches() {
    let server = TestServer::start().await;
    let mut cas = server.cas();
    let (a, b, c) = (data(1, 100), data(2, 200), data(3, 300));
    let (da, db, dc) = (sha(&a), sha(&b), sha(&c));
    let empty = DigestFunction::Sha256.empty();

    let req = BatchUpdateBlobsRequest {
        requests: vec![
            update(&da, &a),
            update(&db, &c), // wrong bytes for the digest
            batch_update_blobs_request::Request {
                digest: Some(dc.to_proto()),
                data: zstd::bulk::compress(&c, 3).unwrap(),
                compressor: compressor::Value::Zstd as i32,
            },
        ],
        ..Default::default()
    };
    let resp = cas.batch_update_blobs(req).await.unwrap().into_inner();
    let codes: Vec<i32> = resp.responses.iter().map(|r| r.status.as_ref().unwrap().code).collect();
    assert_eq!(codes, vec![0, Code::InvalidArgument as i32, 0]);

    let req = FindMissingBlobsRequest {
        blob_digests: vec![da.to_proto(), db.to_proto(), dc.to_proto(), empty.to_proto()],
        ..Default::default()
    };
    let missing = cas.find_missing_blobs(req).await.unwrap().into_inner().missing_blob_digests;
    assert_eq!(missing, vec![db.to_proto()], "the bad upload stored nothing; the empty blob is present");

    // Reads: plain, zstd when acceptable, and per-blob NOT_FOUND.
    let req = BatchReadBlobsRequest {
        digests: vec![da.to_proto(), db.to_proto(), dc.to_proto(), empty.to_proto()],
        acceptable_compressors: vec![compressor::Value::Zstd as i32],
        ..Default::default()
    };
    let resp = cas.batch_read_blobs(req).await.unwrap().into_inner();
    assert_eq!(resp.responses.len(), 4);
    let r = &resp.responses[0];
    assert_eq!(r.compressor, compressor::Value::Zstd as i32);
    assert_eq!(zstd::bulk::decompress(&r.data, 1000).unwrap(), a.to_vec());
    assert_eq!(resp.responses[1].status.as_ref().unwrap().code, Code::NotFound as i32);
    assert_eq!(zstd::bulk::decompress(&resp.responses[2].data, 1000).unwrap(), c.to_vec());
    assert!(resp.responses[3].data.is_empty());

    let req = BatchReadBlobsRequest { digests: vec![da.to_proto()], ..Default::default() };
    let resp = cas.batch_read_blobs(req).await.unwrap().into_inner();
    assert_eq!(resp.responses[0].data, a.to_vec());
    assert_eq!(resp.responses[0].compressor, compressor::Value::Identity as i32);
}

#[tokio::test]
async fn bad_requests_get_clear_statuses() {
    let server = TestServer::start().await;
    let mut cas = server.cas();

    let bad_digest = remote_apis::reapi::Digest { hash: "abc".into(), size_bytes: 3 };
    let s = assert_code(
        cas.find_missing_blobs(FindMissingBlobsRequest { blob_digests: vec![bad_digest], ..Default::default() }).await,
        Code::InvalidArgument,
    );
    assert!(s.message().contains("blob_digests[0]"), "{}", s.message());
    assert_eq!(s.get_details_bad_request().unwrap().field_violations[0].field, "blob_digests[0]");

    let negative = remote_apis::reapi::Digest { hash: sha(b"x").hash_hex(), size_bytes: -1 };
    assert_code(
        cas.find_missing_blobs(FindMissingBlobsRequest { blob_digests: vec![negative], ..Default::default() }).await,
        Code::InvalidArgument,
    );

    let s = assert_code(
        cas.find_missing_blobs(FindMissingBlobsRequest {
            digest_function: digest_function::Value::Md5 as i32,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );
    assert!(s.message().contains("MD5"), "{}", s.message());

    assert_code(
        cas.find_missing_blobs(FindMissingBlobsRequest { instance_name: "/x".into(), ..Default::default() }).await,
        Code::InvalidArgument,
    );

    // A batch over the advertised limit is refused as a whole.
    let big = data(9, 5 << 20);
    let req = BatchUpdateBlobsRequest { requests: vec![update(&sha(&big), &big)], ..Default::default() };
    let s = assert_code(cas.batch_update_blobs(req).await, Code::InvalidArgument);
    assert!(s.message().contains("max_batch_total_size_bytes"), "{}", s.message());

    // zstd that expands past the declared size is refused, not expanded.
    let bomb = zstd::bulk::compress(&vec![0u8; 10 << 20], 3).unwrap();
    let small = sha(b"tiny");
    let req = BatchUpdateBlobsRequest {
        requests: vec![batch_update_blobs_request::Request {
            digest: Some(small.to_proto()),
            data: bomb,
            compressor: compressor::Value::Zstd as i32,
        }],
        ..Default::default()
    };
    let resp = cas.batch_update_blobs(req).await.unwrap().into_inner();
    assert_eq!(resp.responses[0].status.as_ref().unwrap().code, Code::InvalidArgument as i32);
}

#[tokio::test]
async fn find_missing_takes_a_very_large_input_tree() {
    let server = TestServer::start().await;
    let digests: Vec<_> = (0..200_000u32).map(|i| sha(&i.to_le_bytes()).to_proto()).collect();
    let req = FindMissingBlobsRequest { blob_digests: digests, ..Default::default() };
    let missing = server.cas().find_missing_blobs(req).await.unwrap().into_inner().missing_blob_digests;
    assert_eq!(missing.len(), 200_000);
}

#[tokio::test]
async fn blake3_blobs_live_beside_sha256() {
    let server = TestServer::start().await;
    let mut cas = server.cas();
    let blob = data(4, 1000);
    let d = DigestFunction::Blake3.digest_of(&blob);
    let req = BatchUpdateBlobsRequest {
        requests: vec![update(&d, &blob)],
        digest_function: digest_function::Value::Blake3 as i32,
        ..Default::default()
    };
    let resp = cas.batch_update_blobs(req).await.unwrap().into_inner();
    assert_eq!(resp.responses[0].status.as_ref().unwrap().code, 0);
    // The same hash asked as SHA-256 is another blob.
    let ask = |f: digest_function::Value| FindMissingBlobsRequest {
        blob_digests: vec![d.to_proto()],
        digest_function: f as i32,
        ..Default::default()
    };
    let missing = cas.find_missing_blobs(ask(digest_function::Value::Blake3)).await.unwrap().into_inner();
    assert!(missing.missing_blob_digests.is_empty());
    let missing = cas.find_missing_blobs(ask(digest_function::Value::Sha256)).await.unwrap().into_inner();
    assert_eq!(missing.missing_blob_digests.len(), 1);
}

/// Uploads a directory blob and returns its digest.
async fn put_dir(server: &TestServer, dir: &Directory) -> Digest {
    let bytes = dir.encode_to_vec();
    let d = sha(&bytes);
    server.client().upload_blobs(vec![(d, bytes.into())]).await.unwrap();
    d
}

fn dir_node(name: &str, d: &Digest) -> DirectoryNode {
    DirectoryNode { name: name.into(), digest: Some(d.to_proto()) }
}

#[tokio::test]
async fn get_tree_pages_and_skips_missing_subtrees() {
    let server = TestServer::start().await;
    let mut cas = server.cas();
    // root -> a -> (a1, a2), root -> b, root -> gone (never uploaded)
    let file = FileNode { name: "f".into(), digest: Some(sha(b"f").to_proto()), ..Default::default() };
    let a1 = put_dir(&server, &Directory { files: vec![file.clone()], ..Default::default() }).await;
    let a2 = put_dir(&server, &Directory::default()).await;
    let a = put_dir(
        &server,
        &Directory { directories: vec![dir_node("a1", &a1), dir_node("a2", &a2)], ..Default::default() },
    )
    .await;
    let other = FileNode { name: "g".into(), ..file.clone() };
    let b = put_dir(&server, &Directory { files: vec![file, other], ..Default::default() }).await;
    let gone = sha(b"not a directory that exists");
    let root = put_dir(
        &server,
        &Directory {
            directories: vec![dir_node("a", &a), dir_node("b", &b), dir_node("gone", &gone)],
            ..Default::default()
        },
    )
    .await;

    // All at once.
    let req = GetTreeRequest { root_digest: Some(root.to_proto()), ..Default::default() };
    let mut stream = cas.get_tree(req).await.unwrap().into_inner();
    let mut all = Vec::new();
    while let Some(page) = stream.message().await.unwrap() {
        all.extend(page.directories);
    }
    assert_eq!(all.len(), 5, "root, a, b, a1, a2; the missing subtree is skipped");

    // Page by page, each call continuing from the last token.
    let mut token = String::new();
    let mut paged = Vec::new();
    let mut calls = 0;
    loop {
        let req = GetTreeRequest {
            root_digest: Some(root.to_proto()),
            page_size: 2,
            page_token: token.clone(),
            ..Default::default()
        };
        let mut stream = cas.get_tree(req).await.unwrap().into_inner();
        let page = stream.message().await.unwrap().unwrap();
        assert!(page.directories.len() <= 2);
        paged.extend(page.directories);
        calls += 1;
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(paged, all);
    assert!(calls >= 3);

    let req = GetTreeRequest { root_digest: Some(gone.to_proto()), ..Default::default() };
    assert_code(cas.get_tree(req).await.map(|_| ()), Code::NotFound);
    let req =
        GetTreeRequest { root_digest: Some(root.to_proto()), page_token: "garbage!".into(), ..Default::default() };
    assert_code(cas.get_tree(req).await.map(|_| ()), Code::InvalidArgument);
}

/// Concatenates the chunks named by `digests`, read back from the server.
async fn assemble(server: &TestServer, digests: &[remote_apis::reapi::Digest]) -> Vec<u8> {
    let mut out = Vec::new();
    for d in digests {
        let d = Digest::from_proto(DigestFunction::Sha256, d).unwrap();
        out.extend_from_slice(&server.client().read_blob(d).await.unwrap());
    }
    out
}

#[tokio::test]
async fn split_blobs_into_content_defined_chunks() {
    use remote_apis::reapi::{GetChunkMappingRequest, SplitBlobRequest};
    let server = TestServer::start().await;
    let blob = data(21, 6 << 20);
    let d = sha(&blob);
    server.client().upload_blobs(vec![(d, blob.clone())]).await.unwrap();
    let split = |d: Digest| SplitBlobRequest { blob_digest: Some(d.to_proto()), ..Default::default() };
    let chunks = server.cas().split_blob(split(d)).await.unwrap().into_inner().chunk_digests;
    assert!(chunks.len() > 2, "{} chunks", chunks.len());
    assert!(chunks.iter().all(|c| c.size_bytes <= 2 << 20));
    assert_eq!(assemble(&server, &chunks).await, blob.to_vec());

    // The streamed 2.13 form gives the same mapping.
    let mut stream = server
        .cas()
        .get_chunk_mapping(GetChunkMappingRequest { blob_digest: Some(d.to_proto()), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let mut mapped = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        mapped.extend(m.chunk_digests);
    }
    assert_eq!(mapped, chunks);

    // Content-defined: a small edit in the middle changes few chunks.
    let mut edited = blob.to_vec();
    edited[3 << 20] ^= 0xff;
    let e = sha(&edited);
    server.client().upload_blobs(vec![(e, edited.clone().into())]).await.unwrap();
    let edited_chunks = server.cas().split_blob(split(e)).await.unwrap().into_inner().chunk_digests;
    let shared = edited_chunks.iter().filter(|c| chunks.contains(c)).count();
    assert!(shared + 2 >= chunks.len(), "{shared} of {} chunks shared", chunks.len());
    assert_eq!(assemble(&server, &edited_chunks).await, edited);

    assert_code(server.cas().split_blob(split(sha(b"absent"))).await, Code::NotFound);
    let small = data(22, 1000);
    server.client().upload_blobs(vec![(sha(&small), small.clone())]).await.unwrap();
    let one = server.cas().split_blob(split(sha(&small))).await.unwrap().into_inner().chunk_digests;
    assert_eq!(one, vec![sha(&small).to_proto()]);
}

#[tokio::test]
async fn splice_blobs_from_stored_chunks() {
    use remote_apis::reapi::{RegisterChunkMappingRequest, SpliceBlobRequest};
    let server = TestServer::start().await;
    let blob = data(23, 3_000_000);
    let d = sha(&blob);
    let parts: Vec<bytes::Bytes> =
        vec![blob.slice(..1_000_000), blob.slice(1_000_000..2_500_000), blob.slice(2_500_000..)];
    let part_digests: Vec<Digest> = parts.iter().map(|p| sha(p)).collect();
    let splice = |blob: Digest, chunks: &[Digest]| SpliceBlobRequest {
        blob_digest: Some(blob.to_proto()),
        chunk_digests: chunks.iter().map(Digest::to_proto).collect(),
        ..Default::default()
    };
    // A chunk is absent: NOT_FOUND, nothing stored.
    server.client().upload_blobs(vec![(part_digests[0], parts[0].clone())]).await.unwrap();
    assert_code(server.cas().splice_blob(splice(d, &part_digests)).await, Code::NotFound);
    server
        .client()
        .upload_blobs(parts.iter().cloned().zip(&part_digests).map(|(p, d)| (*d, p)).collect())
        .await
        .unwrap();
    // Sizes that do not add up, or a blob digest the bytes do not match.
    assert_code(server.cas().splice_blob(splice(d, &part_digests[..2])).await, Code::InvalidArgument);
    let liar = Digest::new(DigestFunction::Sha256, &"ab".repeat(32), d.size as i64).unwrap();
    assert_code(server.cas().splice_blob(splice(liar, &part_digests)).await, Code::InvalidArgument);
    assert_eq!(server.client().find_missing(&[d, liar]).await.unwrap(), vec![d, liar]);
    // The right splice stores the blob.
    let resp = server.cas().splice_blob(splice(d, &part_digests)).await.unwrap().into_inner();
    assert_eq!(resp.blob_digest, Some(d.to_proto()));
    assert_eq!(server.client().read_blob(d).await.unwrap(), blob);

    // The streamed 2.13 form, the list split across two messages.
    let other = data(24, 2_000_000);
    let o = sha(&other);
    let halves = [other.slice(..700_000), other.slice(700_000..)];
    let hd: Vec<Digest> = halves.iter().map(|h| sha(h)).collect();
    server.client().upload_blobs(halves.iter().cloned().zip(&hd).map(|(h, d)| (*d, h)).collect()).await.unwrap();
    let requests = vec![
        RegisterChunkMappingRequest {
            blob_digest: Some(o.to_proto()),
            chunk_digests: vec![hd[0].to_proto()],
            ..Default::default()
        },
        RegisterChunkMappingRequest { chunk_digests: vec![hd[1].to_proto()], ..Default::default() },
    ];
    server.cas().register_chunk_mapping(futures::stream::iter(requests)).await.unwrap();
    assert_eq!(server.client().read_blob(o).await.unwrap(), other);

    let caps = server.get_capabilities().await.cache_capabilities.unwrap();
    assert!(caps.split_blob_support && caps.splice_blob_support);
}
