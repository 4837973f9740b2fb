//! The status pages over plain HTTP: the overview, operation, action, tree
//! and blob pages of actions that succeeded and failed, escaping, errors
//! (400, 404), and who may see and change what.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cargo_distbuild::config::Backend;

use crate::auth::{start, token_file_text, token_of};
use crate::common::{HttpResponse, TestServer, free_addr, http_get, http_request, sha};
use crate::execution::{Act, request, response, run};

/// An argument that must reach the page as text, never as markup.
const HOSTILE_ARG: &str = "<script>alert('x')</script>&";

/// Waits until the HTTP listener answers (the server binds it as it
/// starts), failing instead of hanging when something else holds the port.
async fn wait_up(http: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(http).await.is_err() {
        assert!(Instant::now() < deadline, "the HTTP listener never came up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let probe = tokio::time::timeout(Duration::from_secs(30), http_get(http, "/healthz", &[])).await;
    let probe = probe.unwrap_or_else(|_| panic!("{http} does not answer HTTP: is it our listener?"));
    assert_eq!(probe.text(), "ok\n");
}

/// The first `href="..."` value in `html` that starts with `prefix` and
/// contains `needle`.
fn href(html: &str, prefix: &str, needle: &str) -> String {
    let start = format!("href=\"{prefix}");
    html.match_indices(&start)
        .map(|(at, _)| {
            let rest = &html[at + 6..];
            rest[..rest.find('"').unwrap()].to_string()
        })
        .find(|h| h.contains(needle))
        .unwrap_or_else(|| panic!("no link {prefix}...{needle} in {html}"))
}

fn page_ok(r: &HttpResponse, what: &str) -> String {
    assert_eq!(r.status, 200, "{what}: {}", r.text());
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"), "{what}");
    r.text()
}

/// The built-in worker's name, as the scheduler knows it.
async fn worker_name(server: &TestServer) -> String {
    use cargo_distbuild::admin::proto::ListWorkersRequest;
    use cargo_distbuild::admin::proto::admin_client::AdminClient;
    let mut admin = AdminClient::new(server.channel.clone());
    let workers = admin.list_workers(ListWorkersRequest::default()).await.unwrap().into_inner().workers;
    workers[0].name.clone()
}

#[tokio::test]
async fn pages_explain_actions_that_succeed_and_fail() {
    let http = free_addr();
    let server = TestServer::start_with(Backend::Memory, |f| f.server.http_listen = Some(http.to_string())).await;

    // Succeeds, with an output file and more stdout than is shown inline.
    let ok = Act {
        script: "echo hello-out; seq 1 20000; printf data > out/file.txt".into(),
        files: vec![("src/main.sh", b"echo hi", true), ("README", b"read me", false)],
        output_paths: vec!["out/file.txt"],
        ..Default::default()
    };
    let mut command = ok.command();
    command.arguments.push(HOSTILE_ARG.into());
    let ok_digest = ok.upload_with(&server, &command).await;
    let ok_ops = run(&server, request(ok_digest)).await.unwrap();
    assert_eq!(response(ok_ops.last().unwrap()).result.unwrap().exit_code, 0);
    // Fails, with stderr.
    let bad = Act::sh("echo oops-on-stderr >&2; exit 3");
    let bad_digest = bad.upload(&server).await;
    let bad_ops = run(&server, request(bad_digest)).await.unwrap();
    assert_eq!(response(bad_ops.last().unwrap()).result.unwrap().exit_code, 3);
    wait_up(http).await;

    // The overview: the worker, and both operations, the failed one marked.
    let overview = page_ok(&http_get(http, "/?refresh=0", &[]).await, "overview");
    let worker = worker_name(&server).await;
    assert!(overview.contains(&format!("<tr id=\"worker-{worker}\"")), "{overview}");
    assert!(overview.contains("<td class=\"state active\">active</td>"), "{overview}");
    assert!(overview.contains("class=\"op failed\""), "{overview}");
    assert!(overview.contains("exit code 3"), "{overview}");
    assert!(overview.contains("id=\"cache-hit-rate\""), "{overview}");
    assert!(!overview.contains("location.reload"), "?refresh=0 turns reloading off");
    let bad_name = &bad_ops[0].name;
    assert!(overview.contains(&format!("/operations/{}", bad_name.strip_prefix("operations/").unwrap())));

    // The action page of the success: argv (escaped), exit code, stdout.
    let path = format!("/action/sha256/{}/{}", ok_digest.hash_hex(), ok_digest.size);
    let action = page_ok(&http_get(http, &path, &[]).await, "action");
    assert!(action.contains("<li><code>/bin/sh</code></li>"), "{action}");
    assert!(action.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;"), "{action}");
    assert!(!action.contains("<script>alert"), "unescaped argument in {action}");
    assert!(action.contains("<td id=\"exit-code\" class=\"ok\">0</td>"), "{action}");
    assert!(action.contains("<pre id=\"stdout\">hello-out\n1\n2\n"), "{action}");
    assert!(!action.contains("\n20000\n"), "stdout is cut at 64 KiB");
    assert!(action.contains("From the ActionCache."), "{action}");
    // The SHA-256 short form is the same page.
    let short = format!("/action/{}/{}", ok_digest.hash_hex(), ok_digest.size);
    assert!(page_ok(&http_get(http, &short, &[]).await, "short").contains("hello-out"));

    // The whole stdout behind its link.
    let full = http_get(http, &href(&action, "/blob/", "stdout.txt"), &[]).await;
    assert_eq!(full.status, 200);
    assert!(full.text().starts_with("hello-out\n") && full.text().ends_with("\n20000\n"));
    assert_eq!(full.header("content-length").unwrap(), full.body.len().to_string());

    // The output file: the right bytes, length, text type and name.
    let file = http_get(http, &href(&action, "/blob/", "file.txt"), &[]).await;
    assert_eq!((file.status, file.body.as_slice()), (200, b"data".as_slice()));
    assert_eq!(file.header("content-length"), Some("4"));
    assert_eq!(file.header("content-type"), Some("text/plain; charset=utf-8"));
    assert!(file.header("content-disposition").unwrap().contains("filename=\"file.txt\""));

    // The input tree, on its own page and embedded in the action's.
    assert!(action.contains("<summary class=\"mono\">src/</summary>"), "{action}");
    let tree = page_ok(&http_get(http, &href(&action, "/tree/", ""), &[]).await, "tree");
    assert!(tree.contains(">README</a>") && tree.contains(">main.sh</a>"), "{tree}");
    assert!(tree.contains("<span class=\"exec\">executable</span>"), "{tree}");
    let readme = http_get(http, &href(&tree, "/blob/", "README"), &[]).await;
    assert_eq!(readme.body, b"read me");

    // The failed action: its exit code and stderr, from the failed run.
    let path = format!("/action/sha256/{}/{}", bad_digest.hash_hex(), bad_digest.size);
    let failed = page_ok(&http_get(http, &path, &[]).await, "failed action");
    assert!(failed.contains("<td id=\"exit-code\" class=\"failed\">3</td>"), "{failed}");
    assert!(failed.contains("<pre id=\"stderr\">oops-on-stderr\n</pre>"), "{failed}");
    assert!(!failed.contains("From the ActionCache."), "{failed}");

    // Its operation: stages, the action's link, the result.
    let op_path = format!("/operations/{}", bad_name.strip_prefix("operations/").unwrap());
    let op = page_ok(&http_get(http, &op_path, &[]).await, "operation");
    for stage in ["QUEUED", "EXECUTING", "COMPLETED"] {
        assert!(op.contains(&format!("<li>{stage}</li>")), "{op}");
    }
    assert!(op.contains(&path), "{op}");
    assert!(op.contains("oops-on-stderr"), "{op}");

    server.stop().await.unwrap();
}

#[tokio::test]
async fn blobs_and_bad_links() {
    let http = free_addr();
    let server = TestServer::start_with(Backend::Memory, |f| f.server.http_listen = Some(http.to_string())).await;
    let binary = Bytes::from_static(b"\x7fELF\0\0\x01");
    let d = sha(&binary);
    server.client().upload_blobs(vec![(d, binary.clone())]).await.unwrap();
    wait_up(http).await;

    let got = http_get(http, &format!("/blob/sha256/{}/{}", d.hash_hex(), d.size), &[]).await;
    assert_eq!((got.status, got.body.as_slice()), (200, binary.as_ref()));
    assert_eq!(got.header("content-type"), Some("application/octet-stream"));
    assert_eq!(got.header("content-length"), Some("7"));
    assert_eq!(got.header("x-content-type-options"), Some("nosniff"));

    let unknown = sha(b"never uploaded");
    let h = unknown.hash_hex();
    let cases = [
        (format!("/blob/sha256/{h}/14"), 404),
        (format!("/action/sha256/{h}/14"), 404),
        (format!("/tree/sha256/{h}/14"), 404),
        (format!("/output-tree/blake3/{h}/14"), 404),
        ("/operations/no-such-operation".to_string(), 404),
        ("/blob/sha256/xyz/4".to_string(), 400),
        (format!("/blob/md5/{h}/14"), 400),
        (format!("/blob/sha256/{h}/-1"), 400),
        (format!("/action/{}/14", h.to_uppercase()), 400),
        (format!("/tree/sha256/{h}/size"), 400),
    ];
    for (path, status) in cases {
        let r = http_get(http, &path, &[]).await;
        assert_eq!(r.status, status, "{path}: {}", r.text());
        assert!(r.text().contains("id=\"error\""), "{path}: {}", r.text());
    }
    // The 404 says what is missing.
    let r = http_get(http, &format!("/blob/sha256/{h}/14"), &[]).await;
    assert!(r.text().contains(&format!("{h}/14 is not in the CAS")), "{}", r.text());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn drains_need_admin_and_change_the_state() {
    let http = free_addr();
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_file_text(&[("viewer", &["status"], ""), ("ops", &["admin"], ""), ("dev", &["execute"], "")]);
    let server = start(dir.path(), &tokens, &[], |f| f.server.http_listen = Some(http.to_string())).await;
    wait_up(http).await;
    let auth = |name: &str| format!("Bearer {}", token_of(name));
    let (viewer, ops, dev) = (auth("viewer"), auth("ops"), auth("dev"));

    assert_eq!(http_get(http, "/", &[]).await.status, 401);
    assert_eq!(http_get(http, "/", &[("Authorization", &dev)]).await.status, 403);
    let seen = page_ok(&http_get(http, "/?refresh=0", &[("Authorization", &viewer)]).await, "viewer");
    assert!(seen.contains("class=\"worker\""), "{seen}");
    assert!(!seen.contains("button class=\"drain\""), "a viewer gets no drain button: {seen}");
    let admin_view = page_ok(&http_get(http, "/?refresh=0", &[("Authorization", &ops)]).await, "admin");
    assert!(admin_view.contains("<button class=\"drain\" type=\"submit\">Drain</button>"), "{admin_view}");
    let worker = worker_name_from(&admin_view);
    let drain = format!("/workers/{worker}/drain");
    assert!(admin_view.contains(&format!("action=\"{drain}\"")), "{admin_view}");

    // Without admin, no drain; with it, a redirect to the overview.
    for who in [None, Some(&viewer)] {
        let headers: Vec<(&str, &str)> = who.map(|v| ("Authorization", v.as_str())).into_iter().collect();
        let r = http_request(http, "POST", &drain, &headers, b"").await;
        assert!(r.status == 401 || r.status == 403, "{}: {}", r.status, r.text());
    }
    let still = page_ok(&http_get(http, "/?refresh=0", &[("Authorization", &viewer)]).await, "viewer");
    assert!(still.contains("<td class=\"state active\">active</td>"), "{still}");
    let r = http_request(http, "POST", &drain, &[("Authorization", &ops)], b"").await;
    assert_eq!((r.status, r.header("location")), (303, Some("/")), "{}", r.text());
    let drained = page_ok(&http_get(http, "/?refresh=0", &[("Authorization", &ops)]).await, "drained");
    assert!(drained.contains("<td class=\"state draining\">draining</td>"), "{drained}");
    assert!(drained.contains("<button class=\"undrain\" type=\"submit\">Undrain</button>"), "{drained}");
    let undrain = format!("/workers/{worker}/undrain");
    assert_eq!(http_request(http, "POST", &undrain, &[("Authorization", &ops)], b"").await.status, 303);
    let back = page_ok(&http_get(http, "/?refresh=0", &[("Authorization", &ops)]).await, "undrained");
    assert!(back.contains("<td class=\"state active\">active</td>"), "{back}");
    // An unknown worker is a 404 that names it.
    let r = http_request(http, "POST", "/workers/nobody/drain", &[("Authorization", &ops)], b"").await;
    assert_eq!(r.status, 404);
    assert!(r.text().contains("nobody"), "{}", r.text());
    server.stop().await.unwrap();
}

/// The (URL-encoded) name in the first worker row's drain form.
fn worker_name_from(html: &str) -> String {
    let at = html.find("action=\"/workers/").expect("a drain form") + "action=\"/workers/".len();
    let rest = &html[at..];
    rest[..rest.find('/').unwrap()].to_string()
}
