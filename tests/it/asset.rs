//! The Remote Asset API against a real HTTP server the test starts (axum on
//! a loopback port): records, SRI, downloads and their limits, the SSRF
//! guard, qualifiers, expiry.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use cargo_distbuild::config::{Backend, FileConfig};
use parking_lot::Mutex;
use prost::Message;
use remote_apis::asset::fetch_client::FetchClient;
use remote_apis::asset::push_client::PushClient;
use remote_apis::asset::{
    FetchBlobRequest, FetchBlobResponse, FetchDirectoryRequest, PushBlobRequest, PushDirectoryRequest, Qualifier,
};
use remote_apis::protobuf::Timestamp;
use remote_apis::reapi::{Directory, DirectoryNode, FileNode};
use remote_apis::{Digest, DigestFunction};
use tonic::Code;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;

use crate::common::{TestServer, assert_code, cli, data, sha};

/// An origin server: fixed paths, and a count of the requests per path.
#[derive(Clone)]
pub(crate) struct Origin {
    pub addr: SocketAddr,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    agents: Arc<Mutex<HashMap<String, String>>>,
    stop: Arc<tokio::sync::Notify>,
}

#[derive(Clone)]
struct OriginState {
    files: Arc<HashMap<String, Bytes>>,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    /// The User-Agent of the last request per path.
    agents: Arc<Mutex<HashMap<String, String>>>,
}

async fn serve(State(s): State<OriginState>, Path(name): Path<String>, headers: HeaderMap) -> Response {
    *s.hits.lock().entry(name.clone()).or_default() += 1;
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    s.agents.lock().insert(name.clone(), header("user-agent"));
    match name.as_str() {
        "redirect" => (StatusCode::FOUND, [(header::LOCATION, "/files/blob")]).into_response(),
        "redirect2" => (StatusCode::FOUND, [(header::LOCATION, "/files/redirect")]).into_response(),
        // `away-PORT`: a redirect to another origin (same host, that port).
        away if away.starts_with("away-") => {
            let to = format!("http://127.0.0.1:{}/files/needs-token", &away[5..]);
            (StatusCode::FOUND, [(header::LOCATION, to)]).into_response()
        }
        "needs-header" if header("x-token") != "sesame" || header("authorization") != "Bearer t0k" => {
            StatusCode::FORBIDDEN.into_response()
        }
        "needs-header" => s.files["blob"].clone().into_response(),
        // A custom header only (an HTTP client's own redirect handling
        // drops Authorization across origins, but not this).
        "needs-token" if header("x-token") != "sesame" => StatusCode::FORBIDDEN.into_response(),
        "needs-token" => s.files["blob"].clone().into_response(),
        // No Content-Length: the body ends with the (chunked) stream.
        "chunked" | "bad-chunked" => {
            let body = s.files[if name == "chunked" { "blob" } else { "bad" }].clone();
            let chunks = futures::stream::iter(
                body.chunks(1000).map(|c| Ok::<_, std::io::Error>(Bytes::copy_from_slice(c))).collect::<Vec<_>>(),
            );
            axum::body::Body::from_stream(chunks).into_response()
        }
        other => match s.files.get(other) {
            Some(b) => b.clone().into_response(),
            None => StatusCode::NOT_FOUND.into_response(),
        },
    }
}

impl Origin {
    pub(crate) async fn start(files: &[(&str, Bytes)]) -> Origin {
        Self::start_on(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(), files)
    }

    pub(crate) fn start_on(listener: tokio::net::TcpListener, files: &[(&str, Bytes)]) -> Origin {
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(Mutex::new(HashMap::new()));
        let agents = Arc::new(Mutex::new(HashMap::new()));
        let state = OriginState {
            files: Arc::new(files.iter().map(|(n, b)| (n.to_string(), b.clone())).collect()),
            hits: hits.clone(),
            agents: agents.clone(),
        };
        let app = axum::Router::new().route("/files/{name}", axum::routing::get(serve)).with_state(state);
        let stop = Arc::new(tokio::sync::Notify::new());
        let stopped = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app).with_graceful_shutdown(async move { stopped.notified().await }).await.unwrap();
        });
        Origin { addr, hits, agents, stop }
    }

    pub(crate) fn url(&self, name: &str) -> String {
        format!("http://{}/files/{name}", self.addr)
    }

    pub(crate) fn hits(&self, name: &str) -> usize {
        self.hits.lock().get(name).copied().unwrap_or(0)
    }

    /// The User-Agent of the last request for `name`.
    pub(crate) fn agent(&self, name: &str) -> Option<String> {
        self.agents.lock().get(name).cloned()
    }

    pub(crate) fn stop(&self) {
        self.stop.notify_one();
    }
}

pub(crate) fn sri256(data: &[u8]) -> String {
    let hash = <sha2::Sha256 as sha2::Digest>::digest(data);
    format!("sha256-{}", base64::engine::general_purpose::STANDARD.encode(hash))
}

fn sri512(data: &[u8]) -> String {
    let hash = <sha2::Sha512 as sha2::Digest>::digest(data);
    format!("sha512-{}", base64::engine::general_purpose::STANDARD.encode(hash))
}

fn q(name: &str, value: &str) -> Qualifier {
    Qualifier { name: name.into(), value: value.into() }
}

pub(crate) fn fetch_req(uris: &[&str], qualifiers: Vec<Qualifier>) -> FetchBlobRequest {
    FetchBlobRequest {
        uris: uris.iter().map(|u| u.to_string()).collect(),
        qualifiers,
        digest_function: DigestFunction::Sha256.to_proto() as i32,
        ..Default::default()
    }
}

pub(crate) fn push_req(uri: &str, digest: Digest, qualifiers: Vec<Qualifier>) -> PushBlobRequest {
    PushBlobRequest {
        uris: vec![uri.to_string()],
        qualifiers,
        blob_digest: Some(digest.to_proto()),
        digest_function: DigestFunction::Sha256.to_proto() as i32,
        ..Default::default()
    }
}

pub(crate) async fn fetch(server: &TestServer, req: FetchBlobRequest) -> FetchBlobResponse {
    FetchClient::new(server.channel.clone()).fetch_blob(req).await.unwrap().into_inner()
}

/// The status code inside a FetchBlob response (OK when absent).
pub(crate) fn code_of(r: &FetchBlobResponse) -> Code {
    Code::from(r.status.as_ref().map_or(0, |s| s.code))
}

pub(crate) fn message_of(r: &FetchBlobResponse) -> String {
    r.status.as_ref().map(|s| s.message.clone()).unwrap_or_default()
}

#[track_caller]
pub(crate) fn assert_digest(r: &FetchBlobResponse, want: Digest) {
    assert_eq!(code_of(r), Code::Ok, "{}", message_of(r));
    assert_eq!(r.blob_digest.as_ref(), Some(&want.to_proto()));
    assert_eq!(r.digest_function, DigestFunction::Sha256.to_proto() as i32);
}

async fn present(server: &TestServer, digest: Digest) -> bool {
    server.client().find_missing(&[digest]).await.unwrap().is_empty()
}

/// A server that may download from loopback (the test's origin).
async fn server_allowing_loopback(tweak: impl FnOnce(&mut FileConfig)) -> TestServer {
    TestServer::start_with(Backend::Filesystem, |f| {
        f.asset.allow_private = true;
        tweak(f);
    })
    .await
}

#[tokio::test]
async fn push_then_fetch_and_push_needs_the_blob() {
    let server = TestServer::start_with(Backend::Memory, |f| f.asset.fetch = false).await;
    let blob = data(1, 5000);
    let digest = sha(&blob);
    let uri = "https://example.com/archive-1.tar.gz";
    let mut push = PushClient::new(server.channel.clone());
    // Not in the CAS yet: FAILED_PRECONDITION naming the blob.
    let status = assert_code(push.push_blob(push_req(uri, digest, vec![])).await, Code::FailedPrecondition);
    use tonic_types::StatusExt;
    let violations = status.get_details_precondition_failure().expect("PreconditionFailure").violations;
    assert_eq!(violations[0].r#type, "MISSING");
    assert_eq!(violations[0].subject, format!("blobs/{}/{}", digest.hash_hex(), digest.size));

    server.client().upload_blobs(vec![(digest, blob.clone())]).await.unwrap();
    push.push_blob(push_req(uri, digest, vec![q("bazel.canonical_id", "v1")])).await.unwrap();
    let r = fetch(&server, fetch_req(&[uri], vec![q("bazel.canonical_id", "v1")])).await;
    assert_digest(&r, digest);
    assert_eq!(r.uri, uri);
    // A mirror list finds it through any URI.
    let r = fetch(&server, fetch_req(&["https://mirror.example/x", uri], vec![q("bazel.canonical_id", "v1")])).await;
    assert_digest(&r, digest);
    assert_eq!(r.uri, uri);
    // The canonical id is part of the key: another one, or none, is not this record.
    for qualifiers in [vec![q("bazel.canonical_id", "v2")], vec![]] {
        let r = fetch(&server, fetch_req(&[uri], qualifiers)).await;
        assert_eq!(code_of(&r), Code::NotFound, "{}", message_of(&r));
        assert!(message_of(&r).contains("downloads are off"), "{}", message_of(&r));
        assert!(r.blob_digest.is_none());
    }
    // Another instance has records of its own.
    let mut other = fetch_req(&[uri], vec![q("bazel.canonical_id", "v1")]);
    other.instance_name = "team-b".into();
    assert_eq!(code_of(&fetch(&server, other).await), Code::NotFound);
}

#[tokio::test]
async fn fetch_by_sri_finds_a_blob_whatever_the_uri() {
    let server = TestServer::start_with(Backend::Memory, |f| f.asset.fetch = false).await;
    let blob = data(2, 3000);
    let digest = sha(&blob);
    // Uploaded through the CAS and named by some URI (no SRI given).
    server.client().upload_blobs(vec![(digest, blob.clone())]).await.unwrap();
    PushClient::new(server.channel.clone())
        .push_blob(push_req("https://origin.example/a.tgz", digest, vec![]))
        .await
        .unwrap();
    // Any other URI with the content's SRI is answered from the CAS.
    let r =
        fetch(&server, fetch_req(&["https://elsewhere.example/b.tgz"], vec![q("checksum.sri", &sri256(&blob))])).await;
    assert_digest(&r, digest);
    assert_eq!(r.uri, "https://elsewhere.example/b.tgz");
    // Another hash is not.
    let r =
        fetch(&server, fetch_req(&["https://elsewhere.example/b.tgz"], vec![q("checksum.sri", &sri256(b"x"))])).await;
    assert_eq!(code_of(&r), Code::NotFound);
    // A push whose SRI does not match the blob is refused, and indexes nothing.
    let wrong = sri512(b"other bytes");
    let status = assert_code(
        PushClient::new(server.channel.clone())
            .push_blob(push_req("https://origin.example/c.tgz", digest, vec![q("checksum.sri", &wrong)]))
            .await,
        Code::InvalidArgument,
    );
    assert!(status.message().contains("hashes to sha512-"), "{}", status.message());
    let r = fetch(&server, fetch_req(&["https://x.example/"], vec![q("checksum.sri", &wrong)])).await;
    assert_eq!(code_of(&r), Code::NotFound);
    // A matching sha512 SRI is verified by reading the blob, then found.
    let good = sri512(&blob);
    PushClient::new(server.channel.clone())
        .push_blob(push_req("https://origin.example/d.tgz", digest, vec![q("checksum.sri", &good)]))
        .await
        .unwrap();
    assert_digest(&fetch(&server, fetch_req(&["https://y.example/"], vec![q("checksum.sri", &good)])).await, digest);
}

#[tokio::test]
async fn downloads_with_and_without_sri_and_a_mismatch_stores_nothing() {
    let blob = data(3, 3 << 20);
    let bad = data(4, 10_000);
    let origin = Origin::start(&[("blob", blob.clone()), ("bad", bad.clone())]).await;
    let server = server_allowing_loopback(|_| {}).await;
    let digest = sha(&blob);

    // Without SRI: spooled, hashed, stored, recorded.
    let r = fetch(&server, fetch_req(&[&origin.url("blob")], vec![])).await;
    assert_digest(&r, digest);
    assert!(present(&server, digest).await);
    assert_eq!(server.client().read_blob(digest).await.unwrap(), blob);
    // The record answers the second time: no new request.
    assert_digest(&fetch(&server, fetch_req(&[&origin.url("blob")], vec![])).await, digest);
    assert_eq!(origin.hits("blob"), 1);

    // With the right SRI (streamed straight into the CAS, or found there).
    let r = fetch(&server, fetch_req(&[&origin.url("chunked")], vec![q("checksum.sri", &sri256(&blob))])).await;
    assert_digest(&r, digest);

    // The wrong SRI: ABORTED naming expected and got; nothing stored. With
    // a Content-Length the body streams into the CAS, whose check refuses it.
    let expected = sri256(b"something else");
    for name in ["bad", "bad"] {
        let r = fetch(&server, fetch_req(&[&origin.url(name)], vec![q("checksum.sri", &expected)])).await;
        assert_eq!(code_of(&r), Code::Aborted, "{}", message_of(&r));
        let m = message_of(&r);
        assert!(m.contains(&format!("expected {expected}")) && m.contains(&sha(&bad).hash_hex()), "{m}");
        assert!(r.blob_digest.is_none());
    }
    // Without one the body is spooled and hashed: got is an SRI too.
    let r = fetch(&server, fetch_req(&[&origin.url("bad-chunked")], vec![q("checksum.sri", &expected)])).await;
    assert_eq!(code_of(&r), Code::Aborted, "{}", message_of(&r));
    let m = message_of(&r);
    assert!(m.contains(&format!("expected {expected}")) && m.contains(&format!("got {}", sri256(&bad))), "{m}");
    assert!(!present(&server, sha(&bad)).await, "a mismatched download must not be stored");
    assert_eq!(origin.hits("bad"), 2, "a failed download is not recorded");
    assert_eq!(origin.hits("bad-chunked"), 1);
    // The same through the spooled path (sha512 is not the CAS's function).
    let r = fetch(&server, fetch_req(&[&origin.url("bad")], vec![q("checksum.sri", &sri512(b"nope"))])).await;
    assert_eq!(code_of(&r), Code::Aborted, "{}", message_of(&r));
    assert!(!present(&server, sha(&bad)).await);
    // ... and a right sha512 stores it.
    let r = fetch(&server, fetch_req(&[&origin.url("bad")], vec![q("checksum.sri", &sri512(&bad))])).await;
    assert_digest(&r, sha(&bad));
    assert!(present(&server, sha(&bad)).await);

    // Mirrors in order: a 404 first, then the working one.
    let r =
        fetch(&server, fetch_req(&[&origin.url("absent"), &origin.url("blob")], vec![q("resource_type", "a")])).await;
    assert_digest(&r, digest);
    assert_eq!(r.uri, origin.url("blob"));
    assert_eq!(origin.hits("absent"), 1);
    let r = fetch(&server, fetch_req(&[&origin.url("absent")], vec![])).await;
    assert_eq!(code_of(&r), Code::NotFound, "{}", message_of(&r));
    assert_eq!(r.uri, origin.url("absent"));
    origin.stop();
}

#[tokio::test]
async fn redirects_are_followed_within_the_limit() {
    let blob = data(5, 20_000);
    let origin = Origin::start(&[("blob", blob.clone())]).await;
    let server = server_allowing_loopback(|f| f.asset.max_redirects = 1).await;
    let r = fetch(&server, fetch_req(&[&origin.url("redirect")], vec![])).await;
    assert_digest(&r, sha(&blob));
    assert_eq!(r.uri, origin.url("redirect"));
    let r = fetch(&server, fetch_req(&[&origin.url("redirect2")], vec![])).await;
    assert_eq!(code_of(&r), Code::Unavailable, "{}", message_of(&r));
    assert!(message_of(&r).contains("max_redirects"), "{}", message_of(&r));
    origin.stop();
}

#[tokio::test]
async fn header_qualifiers_are_sent() {
    let blob = data(6, 1000);
    let origin = Origin::start(&[("blob", blob.clone())]).await;
    let server = server_allowing_loopback(|_| {}).await;
    let url = origin.url("needs-header");
    let r = fetch(&server, fetch_req(&[&url], vec![])).await;
    assert_eq!(code_of(&r), Code::PermissionDenied, "the origin's 403: {}", message_of(&r));
    let auth = format!(r#"{{"{url}": {{"Authorization": ["Bearer t0k"]}}}}"#);
    // http_header applies to every URI; bazel.auth_headers to its URL.
    let r =
        fetch(&server, fetch_req(&[&url], vec![q("http_header:X-Token", "sesame"), q("bazel.auth_headers", &auth)]))
            .await;
    assert_digest(&r, sha(&blob));
    // http_header_url:N applies to the N-th URI only (here the second).
    let r = fetch(
        &server,
        fetch_req(
            &[&origin.url("absent"), &url],
            vec![q("http_header_url:1:X-Token", "sesame"), q("http_header_url:1:Authorization", "Bearer t0k")],
        ),
    )
    .await;
    assert_digest(&r, sha(&blob));
    assert_eq!(origin.hits("needs-header"), 3);
    origin.stop();
}

#[tokio::test]
async fn header_qualifiers_never_follow_a_redirect_to_another_origin() {
    let blob = data(6, 1000);
    let first = Origin::start(&[("blob", blob.clone())]).await;
    let other = Origin::start(&[("blob", blob.clone())]).await;
    let server = server_allowing_loopback(|_| {}).await;
    let headers = || vec![q("http_header:X-Token", "sesame")];
    // The other origin takes it when asked directly...
    let r = fetch(&server, fetch_req(&[&other.url("needs-token")], headers())).await;
    assert_digest(&r, sha(&blob));
    // ...but a redirect from the first one arrives there without it.
    let away = first.url(&format!("away-{}", other.addr.port()));
    let r = fetch(&server, fetch_req(&[&away], headers())).await;
    assert_eq!(code_of(&r), Code::PermissionDenied, "the other origin's 403: {}", message_of(&r));
    assert_eq!(first.hits(&format!("away-{}", other.addr.port())), 1);
    assert_eq!(other.hits("needs-token"), 2);
    first.stop();
    other.stop();
}

#[tokio::test]
async fn downloads_over_the_size_limit_store_nothing() {
    let big = data(7, 64 << 10);
    let origin = Origin::start(&[("blob", big.clone())]).await;
    let server = server_allowing_loopback(|f| f.asset.max_size = bytesize::ByteSize::kib(16)).await;
    // With a Content-Length (refused before the body) and without (cut off).
    for name in ["blob", "chunked"] {
        let r = fetch(&server, fetch_req(&[&origin.url(name)], vec![])).await;
        assert_eq!(code_of(&r), Code::ResourceExhausted, "{name}: {}", message_of(&r));
        assert!(message_of(&r).contains("max_size"), "{}", message_of(&r));
    }
    let r = fetch(&server, fetch_req(&[&origin.url("chunked")], vec![q("checksum.sri", &sri256(&big))])).await;
    assert_eq!(code_of(&r), Code::ResourceExhausted, "{}", message_of(&r));
    assert!(!present(&server, sha(&big)).await);
    origin.stop();
}

#[tokio::test]
async fn the_ssrf_guard_refuses_loopback_unless_allowed() {
    let blob = data(8, 100);
    let origin = Origin::start(&[("blob", blob.clone())]).await;
    // The default: allow_private = false.
    let server = TestServer::start_with(Backend::Memory, |_| {}).await;
    let by_name = format!("http://localhost:{}/files/blob", origin.addr.port());
    let v6 = format!("http://[::ffff:127.0.0.1]:{}/files/blob", origin.addr.port());
    for url in [origin.url("blob"), by_name, v6] {
        let r = fetch(&server, fetch_req(&[&url], vec![])).await;
        assert_eq!(code_of(&r), Code::PermissionDenied, "{url}: {}", message_of(&r));
        assert!(message_of(&r).contains("loopback"), "{}", message_of(&r));
    }
    assert_eq!(origin.hits("blob"), 0, "the guard refuses before any request");
    // Other schemes are refused too.
    for url in ["file:///etc/passwd", "ftp://example.com/x"] {
        let r = fetch(&server, fetch_req(&[url], vec![])).await;
        assert_eq!(code_of(&r), Code::InvalidArgument, "{url}: {}", message_of(&r));
    }
    // Allowed: the same URL works.
    let open = server_allowing_loopback(|_| {}).await;
    assert_digest(&fetch(&open, fetch_req(&[&origin.url("blob")], vec![])).await, sha(&blob));
    assert_eq!(origin.hits("blob"), 1);
    assert!(origin.agent("blob").unwrap().starts_with("cargo-distbuild/"), "{:?}", origin.agent("blob"));
    origin.stop();
}

#[tokio::test]
async fn uris_per_request_and_their_length_are_bounded() {
    let server = TestServer::start_with(Backend::Memory, |_| {}).await;
    let blob = data(9, 100);
    server.client().upload_blobs(vec![(sha(&blob), blob.clone())]).await.unwrap();
    let many: Vec<String> = (0..=cargo_distbuild::asset::MAX_URIS).map(|i| format!("urn:x:{i}")).collect();
    let long = format!("https://example.com/{}", "a".repeat(cargo_distbuild::asset::MAX_URI_BYTES));
    let mut push = PushClient::new(server.channel.clone());
    // One push cannot write (or evict) more than MAX_URIS records...
    let req = PushBlobRequest { uris: many.clone(), ..push_req("u", sha(&blob), vec![]) };
    let status = assert_code(push.push_blob(req).await, Code::InvalidArgument);
    assert!(status.message().contains("at most"), "{}", status.message());
    // ...and none of them was written.
    let r = fetch(&server, fetch_req(&["urn:x:0"], vec![])).await;
    assert_eq!(code_of(&r), Code::NotFound, "{}", message_of(&r));
    assert_code(push.push_blob(push_req(&long, sha(&blob), vec![])).await, Code::InvalidArgument);
    // Fetches too.
    let refs: Vec<&str> = many.iter().map(|s| s.as_str()).collect();
    let fetcher = || FetchClient::new(server.channel.clone());
    assert_code(fetcher().fetch_blob(fetch_req(&refs, vec![])).await, Code::InvalidArgument);
    assert_code(fetcher().fetch_blob(fetch_req(&[&long], vec![])).await, Code::InvalidArgument);
    // At the limit, it is accepted.
    let req = PushBlobRequest {
        uris: many[..cargo_distbuild::asset::MAX_URIS].to_vec(),
        ..push_req("u", sha(&blob), vec![])
    };
    push.push_blob(req).await.unwrap();
    assert_digest(&fetch(&server, fetch_req(&["urn:x:99"], vec![])).await, sha(&blob));
}

#[tokio::test]
async fn unknown_qualifiers_are_invalid_argument_naming_them() {
    let server = TestServer::start_with(Backend::Memory, |_| {}).await;
    let status = assert_code(
        FetchClient::new(server.channel.clone())
            .fetch_blob(fetch_req(&["https://example.com/x"], vec![q("vcs.commit", "abc")]))
            .await,
        Code::InvalidArgument,
    );
    use tonic_types::StatusExt;
    let bad = status.get_details_bad_request().expect("BadRequest").field_violations;
    assert_eq!(bad[0].field, "qualifiers.name");
    assert_eq!(bad[0].description, "\"vcs.commit\" not supported");
    // A malformed known one names itself.
    let status = assert_code(
        FetchClient::new(server.channel.clone())
            .fetch_blob(fetch_req(&["https://example.com/x"], vec![q("checksum.sri", "md5-abc")]))
            .await,
        Code::InvalidArgument,
    );
    assert!(status.message().contains("checksum.sri"), "{}", status.message());
    // No URI.
    assert_code(
        FetchClient::new(server.channel.clone()).fetch_blob(fetch_req(&[], vec![])).await,
        Code::InvalidArgument,
    );
    // A Push may carry any qualifier; a Fetch with exactly those finds it.
    let blob = data(9, 10);
    server.client().upload_blobs(vec![(sha(&blob), blob.clone())]).await.unwrap();
    let qs = vec![q("vcs.commit", "abc")];
    PushClient::new(server.channel.clone()).push_blob(push_req("git://x", sha(&blob), qs.clone())).await.unwrap();
    assert_digest(&fetch(&server, fetch_req(&["git://x"], qs)).await, sha(&blob));
}

#[tokio::test]
async fn records_expire() {
    let server = TestServer::start_with(Backend::Memory, |f| f.asset.fetch = false).await;
    let blob = data(10, 100);
    let digest = sha(&blob);
    server.client().upload_blobs(vec![(digest, blob)]).await.unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let mut push = PushClient::new(server.channel.clone());
    let mut past = push_req("https://e.example/past", digest, vec![]);
    past.expire_at = Some(Timestamp { seconds: now - 10, nanos: 0 });
    push.push_blob(past).await.unwrap();
    assert_eq!(code_of(&fetch(&server, fetch_req(&["https://e.example/past"], vec![])).await), Code::NotFound);

    let mut soon = push_req("https://e.example/soon", digest, vec![]);
    soon.expire_at = Some(Timestamp { seconds: now + 2, nanos: 0 });
    push.push_blob(soon).await.unwrap();
    let r = fetch(&server, fetch_req(&["https://e.example/soon"], vec![])).await;
    assert_digest(&r, digest);
    assert_eq!(r.expires_at.map(|t| t.seconds), Some(now + 2));
    tokio::time::sleep(std::time::Duration::from_millis(3100)).await;
    assert_eq!(code_of(&fetch(&server, fetch_req(&["https://e.example/soon"], vec![])).await), Code::NotFound);
    // A new push renews it.
    push.push_blob(push_req("https://e.example/soon", digest, vec![])).await.unwrap();
    assert_digest(&fetch(&server, fetch_req(&["https://e.example/soon"], vec![])).await, digest);
}

#[tokio::test]
async fn directories_need_their_whole_tree() {
    let server = TestServer::start_with(Backend::Memory, |_| {}).await;
    let file = data(11, 300);
    let sub = Directory {
        files: vec![FileNode { name: "f".into(), digest: Some(sha(&file).to_proto()), ..Default::default() }],
        ..Default::default()
    };
    let sub_bytes = Bytes::from(sub.encode_to_vec());
    let root = Directory {
        directories: vec![DirectoryNode { name: "d".into(), digest: Some(sha(&sub_bytes).to_proto()) }],
        ..Default::default()
    };
    let root_bytes = Bytes::from(root.encode_to_vec());
    let client = server.client();
    client
        .upload_blobs(vec![(sha(&root_bytes), root_bytes.clone()), (sha(&sub_bytes), sub_bytes.clone())])
        .await
        .unwrap();
    let push = |uri: &str| PushDirectoryRequest {
        uris: vec![uri.to_string()],
        root_directory_digest: Some(sha(&root_bytes).to_proto()),
        ..Default::default()
    };
    let mut pusher = PushClient::new(server.channel.clone());
    // The file deep in the tree is missing.
    let status = assert_code(pusher.push_directory(push("https://src.example/tree")).await, Code::FailedPrecondition);
    assert!(status.message().contains(&sha(&file).hash_hex()), "{}", status.message());
    client.upload_blobs(vec![(sha(&file), file.clone())]).await.unwrap();
    pusher.push_directory(push("https://src.example/tree")).await.unwrap();
    let r = FetchClient::new(server.channel.clone())
        .fetch_directory(FetchDirectoryRequest { uris: vec!["https://src.example/tree".into()], ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status.map(|s| s.code), Some(0));
    assert_eq!(r.root_directory_digest, Some(sha(&root_bytes).to_proto()));
    // Not recorded: NOT_FOUND in the response.
    let r = FetchClient::new(server.channel.clone())
        .fetch_directory(FetchDirectoryRequest { uris: vec!["https://src.example/other".into()], ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status.map(|s| s.code), Some(Code::NotFound as i32));
}

/// One call of each asset RPC for the grant table in `auth.rs`: the gRPC
/// status code (OK when the call got through).
pub(crate) async fn call(
    channel: Channel,
    rpc: &str,
    metadata: MetadataMap,
    instance: &str,
) -> Result<(), tonic::Status> {
    fn with_md<T>(metadata: &MetadataMap, mut r: tonic::Request<T>) -> tonic::Request<T> {
        *r.metadata_mut() = metadata.clone();
        r
    }
    let with = |r| with_md(&metadata, r);
    let with_dir = |r| with_md(&metadata, r);
    let with_push = |r| with_md(&metadata, r);
    let with_push_dir = |r| with_md(&metadata, r);
    let i = instance.to_string();
    // Loopback is refused by the guard: no network, an answer in the status.
    let uri = "http://127.0.0.1:1/x".to_string();
    let digest = sha(b"asset").to_proto();
    match rpc {
        "Fetch.FetchBlob" => FetchClient::new(channel)
            .fetch_blob(with(tonic::Request::new(FetchBlobRequest {
                instance_name: i,
                uris: vec![uri],
                ..Default::default()
            })))
            .await
            .map(drop),
        "Fetch.FetchDirectory" => FetchClient::new(channel)
            .fetch_directory(with_dir(tonic::Request::new(FetchDirectoryRequest {
                instance_name: i,
                uris: vec![uri],
                ..Default::default()
            })))
            .await
            .map(drop),
        "Push.PushBlob" => PushClient::new(channel)
            .push_blob(with_push(tonic::Request::new(PushBlobRequest {
                instance_name: i,
                uris: vec![uri],
                blob_digest: Some(digest),
                ..Default::default()
            })))
            .await
            .map(drop),
        "Push.PushDirectory" => PushClient::new(channel)
            .push_directory(with_push_dir(tonic::Request::new(PushDirectoryRequest {
                instance_name: i,
                uris: vec![uri],
                root_directory_digest: Some(digest),
                ..Default::default()
            })))
            .await
            .map(drop),
        other => panic!("no asset call {other}"),
    }
}

#[tokio::test]
async fn grants_govern_push_read_and_download() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = crate::auth::token_file_text(&[
        ("reader", &["asset-read", "cas-read"], ""),
        ("pusher", &["asset-push", "cas-write"], ""),
        ("fetcher", &["asset-fetch"], ""),
    ]);
    let server = crate::auth::start(dir.path(), &tokens, &[], |f| f.asset.allow_private = true).await;
    let blob = data(12, 2000);
    let origin = Origin::start(&[("blob", blob.clone())]).await;
    let md = |name: &str| {
        let mut m = MetadataMap::new();
        m.insert("authorization", format!("Bearer {}", crate::auth::token_of(name)).parse().unwrap());
        m
    };
    fn req<T>(m: MetadataMap, r: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(r);
        *r.metadata_mut() = m;
        r
    }
    let mut fetcher = FetchClient::new(server.channel.clone());
    // The reader may not download (asset-fetch), nor push (asset-push).
    let s = assert_code(
        fetcher.fetch_blob(req(md("reader"), fetch_req(&[&origin.url("blob")], vec![]))).await,
        Code::PermissionDenied,
    );
    assert!(s.message().contains("asset-fetch"), "{}", s.message());
    assert_eq!(origin.hits("blob"), 0);
    let s = assert_code(
        PushClient::new(server.channel.clone()).push_blob(req(md("reader"), push_req("u", sha(&blob), vec![]))).await,
        Code::PermissionDenied,
    );
    assert!(s.message().contains("asset-push"), "{}", s.message());
    // The fetcher downloads; then the reader is answered from the record.
    let r =
        fetcher.fetch_blob(req(md("fetcher"), fetch_req(&[&origin.url("blob")], vec![]))).await.unwrap().into_inner();
    assert_digest(&r, sha(&blob));
    let r =
        fetcher.fetch_blob(req(md("reader"), fetch_req(&[&origin.url("blob")], vec![]))).await.unwrap().into_inner();
    assert_digest(&r, sha(&blob));
    assert_eq!(origin.hits("blob"), 1);
    // The pusher may push.
    PushClient::new(server.channel.clone())
        .push_blob(req(md("pusher"), push_req("u", sha(&blob), vec![])))
        .await
        .unwrap();
    // Anonymous callers have nothing here.
    assert_code(fetcher.fetch_blob(fetch_req(&["u"], vec![])).await, Code::Unauthenticated);
    origin.stop();
}

#[tokio::test]
async fn the_command_line_pushes_and_fetches() {
    let blob = data(13, 200_000);
    let origin = Origin::start(&[("blob", blob.clone())]).await;
    let server = server_allowing_loopback(|_| {}).await;
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.tgz");
    std::fs::write(&file, data(14, 5000)).unwrap();
    let pushed = sha(&data(14, 5000)).to_string();

    let out = cli(&[
        "asset",
        "push",
        "https://x.example/a.tgz",
        file.to_str().unwrap(),
        "-q",
        "bazel.canonical_id=1",
        "--server",
        &url,
    ])
    .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), pushed);
    let out = cli(&["asset", "fetch", "https://x.example/a.tgz", "-q", "bazel.canonical_id=1", "--server", &url]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), pushed);

    // A download through the server into a file, checked by SRI.
    let copy = dir.path().join("copy");
    let sri = sri256(&blob);
    let out =
        cli(&["asset", "fetch", &origin.url("blob"), "--sri", &sri, "-o", copy.to_str().unwrap(), "--server", &url])
            .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&copy).unwrap(), blob.to_vec());

    // A failure in the response's status is one error line and a non-zero exit.
    let out = cli(&["asset", "fetch", &origin.url("absent"), "--server", &url]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("NotFound") && err.contains("404"), "{err}");
    origin.stop();
}
