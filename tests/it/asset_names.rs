//! Remote Asset URNs, which name content rather than locate it, the way
//! BuildStream keeps its artifact and source index
//! (`urn:fdc:buildstream.build:2020:artifact:PROJECT/ELEMENT/KEY`): they are
//! only ever answered from records. A miss is NOT_FOUND in the response
//! (BuildStream reads that as "not cached"; any other code fails its pull),
//! whatever `[asset] fetch` says and whether or not the caller may download.

use cargo_distbuild::config::Backend;
use remote_apis::asset::fetch_client::FetchClient;
use remote_apis::asset::push_client::PushClient;
use remote_apis::asset::{FetchBlobRequest, PushBlobRequest};
use remote_apis::{Digest, DigestFunction};
use tonic::Code;
use tonic::metadata::MetadataMap;

use crate::asset::{assert_digest, code_of, fetch, fetch_req, message_of};
use crate::common::{TestServer, assert_code, data, sha};

const KEY: &str = "4416b52a1cf95fb3a8deabe8d2608f82975c5c37a964cba68e2b30f0e96279a9";
const WEAK: &str = "02bc4f170d0eed6b2b667ee1cc8ebc84532169575d57b985b61816178ebbc0fb";

fn artifact(key: &str) -> String {
    format!("urn:fdc:buildstream.build:2020:artifact:project/element/{key}")
}

/// BuildStream's artifact push: both keys' URNs, the Artifact proto, and the
/// blobs it references.
fn bst_push(artifact_proto: Digest, referenced: Digest) -> PushBlobRequest {
    PushBlobRequest {
        uris: vec![artifact(KEY), artifact(WEAK)],
        blob_digest: Some(artifact_proto.to_proto()),
        references_blobs: vec![referenced.to_proto()],
        digest_function: DigestFunction::Sha256.to_proto() as i32,
        ..Default::default()
    }
}

#[tokio::test]
async fn an_unrecorded_name_is_not_found_with_downloads_on() {
    let server = TestServer::start_with(Backend::Memory, |f| f.asset.fetch = true).await;
    // BuildStream's probe: no URI at all is INVALID_ARGUMENT, for Fetch and Push.
    assert_code(
        FetchClient::new(server.channel.clone()).fetch_blob(FetchBlobRequest::default()).await,
        Code::InvalidArgument,
    );
    assert_code(
        PushClient::new(server.channel.clone()).push_blob(PushBlobRequest::default()).await,
        Code::InvalidArgument,
    );
    // A lookup before anything was pushed: a miss, not a failed download.
    let r = fetch(&server, fetch_req(&[&artifact(KEY)], vec![])).await;
    assert_eq!(code_of(&r), Code::NotFound, "{}", message_of(&r));
    assert!(message_of(&r).contains("no record of"), "{}", message_of(&r));
    assert!(r.blob_digest.is_none());
    // Pushed under both keys, found by either.
    let (proto, meta) = (data(21, 600), data(22, 255));
    server.client().upload_blobs(vec![(sha(&proto), proto.clone()), (sha(&meta), meta.clone())]).await.unwrap();
    PushClient::new(server.channel.clone()).push_blob(bst_push(sha(&proto), sha(&meta))).await.unwrap();
    for key in [KEY, WEAK] {
        assert_digest(&fetch(&server, fetch_req(&[&artifact(key)], vec![])).await, sha(&proto));
    }
    // A name among http mirrors does not stop the download of the others:
    // only a request of names alone is answered this way (here the mirror is
    // refused by the SSRF guard, and that is the answer).
    let r = fetch(&server, fetch_req(&[&artifact("0".repeat(64).as_str()), "http://127.0.0.1:1/x"], vec![])).await;
    assert_ne!(code_of(&r), Code::NotFound, "{}", message_of(&r));
}

#[tokio::test]
async fn a_reader_without_asset_fetch_gets_not_found_for_a_name() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = crate::auth::token_file_text(&[("reader", &["asset-read", "cas-read"], "")]);
    let server = crate::auth::start(dir.path(), &tokens, &[], |_| {}).await;
    let mut md = MetadataMap::new();
    md.insert("authorization", format!("Bearer {}", crate::auth::token_of("reader")).parse().unwrap());
    let request = |uri: &str| {
        let mut r = tonic::Request::new(fetch_req(&[uri], vec![]));
        *r.metadata_mut() = md.clone();
        r
    };
    let mut client = FetchClient::new(server.channel.clone());
    let r = client.fetch_blob(request(&artifact(KEY))).await.unwrap().into_inner();
    assert_eq!(code_of(&r), Code::NotFound, "{}", message_of(&r));
    // A URL it could download still needs the grant.
    let s = assert_code(client.fetch_blob(request("https://example.com/archive.tar.gz")).await, Code::PermissionDenied);
    assert!(s.message().contains("asset-fetch"), "{}", s.message());
}
