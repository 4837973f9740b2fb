//! The command line against an in-process server.

use std::process::Output;

use crate::common::{TestServer, cli, data, sha};

fn s(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

#[tokio::test]
async fn cas_put_get_stat_list() {
    let server = TestServer::start().await;
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.bin");
    let blob = data(1, 3_000_000);
    std::fs::write(&input, &blob).unwrap();

    let out = cli(s(&["cas", "put", input.to_str().unwrap(), "--server", &url])).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let digest = sha(&blob).to_string();
    assert!(stdout.starts_with(&digest), "{stdout}");

    let copy = dir.path().join("copy.bin");
    let out = cli(s(&["cas", "get", &digest, copy.to_str().unwrap(), "--server", &url])).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&copy).unwrap(), blob.to_vec());

    let out = cli(s(&["cas", "stat", &digest, "--server", &url])).await;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("present"));

    let absent = sha(b"absent").to_string();
    let out = cli(s(&["cas", "stat", &absent, "--server", &url])).await;
    assert_eq!(out.status.code(), Some(1));

    let missing_out = dir.path().join("nothing.bin");
    let out = cli(s(&["cas", "get", &absent, missing_out.to_str().unwrap(), "--server", &url])).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("NotFound"), "{err}");
    assert!(!missing_out.exists(), "a failed download leaves no file");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "nor a partial one");

    // `-` is stdout; a symlink keeps pointing at its (replaced) target; a
    // device such as /dev/null is written in place, never renamed over.
    let out = cli(s(&["cas", "get", &digest, "-", "--server", &url])).await;
    assert!(out.status.success());
    assert_eq!(out.stdout, blob.to_vec());
    let link = dir.path().join("link.bin");
    std::os::unix::fs::symlink(&copy, &link).unwrap();
    std::fs::write(&copy, b"old").unwrap();
    let out = cli(s(&["cas", "get", &digest, link.to_str().unwrap(), "--server", &url])).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read(&copy).unwrap(), blob.to_vec());
    std::fs::remove_file(&link).unwrap();
    let out = cli(s(&["cas", "get", &digest, "/dev/null", "--server", &url])).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let null = std::fs::metadata("/dev/null").unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(&null.file_type()), "/dev/null is still a device");

    let out = cli(s(&["cas", "list", "--server", &url])).await;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(&sha(&blob).hash_hex()));
}

#[tokio::test]
async fn errors_are_one_clear_line() {
    let out = cli(s(&["cas", "stat", &sha(b"x").to_string(), "--server", "grpc://127.0.0.1:1"])).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.starts_with("error: "), "{err}");

    let out = cli(s(&["cas", "stat", "abc/1"])).await;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("64 hex digits"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("config.toml");
    std::fs::write(&bad, "[cas]\nmax_sise = \"1GiB\"\n").unwrap();
    let out = cli(s(&["server", "--config", bad.to_str().unwrap()])).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_sise"), "{err}");
}

#[tokio::test]
async fn the_binary_serves_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_cargo-distbuild"))
        .args(["server", "--listen", &addr, "--data-dir", dir.path().to_str().unwrap()])
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let url = format!("grpc://{addr}");
    let blob = data(5, 1000);
    let mut client = None;
    // Up to 20 s: the machine may be busy with the other tests.
    for _ in 0..400 {
        if let Ok(c) = remote_apis::client::CasClient::connect(&url, Default::default()).await {
            client = Some(c);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let client = client.expect("the server came up");
    client.upload_blobs(vec![(sha(&blob), blob)]).await.unwrap();
    let pid = child.id().unwrap() as i32;
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let out =
        tokio::time::timeout(std::time::Duration::from_secs(20), child.wait_with_output()).await.unwrap().unwrap();
    assert!(out.status.success(), "{:?}: {}", out.status, String::from_utf8_lossy(&out.stderr));
}

/// Runs the binary in `dir`, with `stdin` as its input.
async fn cli_in(dir: &std::path::Path, args: Vec<String>, stdin: &str) -> Output {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_cargo-distbuild"))
        .args(args)
        .current_dir(dir)
        .env_remove("DISTBUILD_CONFIG")
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .env("XDG_STATE_HOME", dir.join("state"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    child.wait_with_output().await.unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn run_job_jobs_workers_and_scheduler_status() {
    let server = TestServer::start().await;
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("src")).unwrap();
    std::fs::write(d.join("src/words.txt"), "b\na\nc\n").unwrap();
    let run = |script: &str| {
        s(&[
            "exec",
            "--server",
            &url,
            "--input",
            "src",
            "--output",
            "out/sorted.txt",
            "--output",
            "report",
            "--",
            "sh",
            "-c",
            script,
        ])
    };
    let script = "mkdir -p report; sort src/words.txt > out/sorted.txt; echo ok > report/r; echo to-stdout; \
                  echo to-stderr >&2; exit 4";
    let out = cli_in(d, run(script), "").await;
    assert_eq!(out.status.code(), Some(4), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "to-stdout\n");
    assert!(text(&out.stderr).contains("to-stderr"), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(d.join("out/sorted.txt")).unwrap(), "a\nb\nc\n");
    assert_eq!(std::fs::read_to_string(d.join("report/r")).unwrap(), "ok\n");

    // An input path outside the current directory is refused.
    let out = cli_in(d, s(&["exec", "--server", &url, "--input", "../x", "--", "true"]), "").await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--input"), "{}", text(&out.stderr));

    let out = cli_in(d, s(&["jobs", "list", "--server", &url]), "").await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listing = text(&out.stdout);
    let op = listing.lines().nth(1).and_then(|l| l.split_whitespace().next()).unwrap().to_string();
    assert!(op.starts_with("operations/"), "{listing}");
    assert!(listing.contains("exit 4"), "{listing}");

    let out = cli_in(d, s(&["job", "status", &op, "--server", &url]), "").await;
    assert!(text(&out.stdout).contains("COMPLETED"), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("exit code: 4"), "{}", text(&out.stdout));
    let out = cli_in(d, s(&["job", "status", "operations/none", "--server", &url]), "").await;
    assert!(text(&out.stderr).contains("NotFound"), "{}", text(&out.stderr));

    let out = cli_in(d, s(&["workers", "list", "--server", &url]), "").await;
    assert!(text(&out.stdout).contains("builtin@"), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("OSFamily=linux"), "{}", text(&out.stdout));
    let out = cli_in(d, s(&["scheduler", "status", "--server", &url]), "").await;
    let status = text(&out.stdout);
    assert!(status.contains("executed:       1"), "{status}");
    assert!(status.contains("cache hit rate"), "{status}");

    // The interactive shell: same commands, help, history, exit.
    let session = "workers list\nhelp\nnot-a-command\nhistory\nexit\nworkers list\n";
    let out = cli_in(d, s(&["--server", &url]), session).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(stdout.matches("builtin@").count(), 1, "stops at exit: {stdout}");
    assert!(stdout.contains("jobs list"), "help: {stdout}");
    assert!(stdout.contains("   1  workers list"), "history: {stdout}");
    assert!(text(&out.stderr).contains("not-a-command"), "{}", text(&out.stderr));
    assert!(d.join("state/cargo-distbuild/history").exists());
}

/// A failed command's page: `exec` prints the link the server put in
/// `ExecuteResponse.message` after the command's own stderr, and the link
/// opens the page with that stderr.
#[tokio::test(flavor = "multi_thread")]
async fn exec_prints_the_page_of_a_failure() {
    let http = crate::common::free_addr();
    let server = TestServer::start_with(cargo_distbuild::config::Backend::Memory, |f| {
        f.server.http_listen = Some(http.to_string())
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let script = "echo exec-page-test-oops >&2; exit 5";
    let out = cli_in(dir.path(), s(&["exec", "--server", &server.url(), "--", "sh", "-c", script]), "").await;
    assert_eq!(out.status.code(), Some(5));
    let stderr = text(&out.stderr);
    let prefix = format!("http://{http}");
    let link = stderr.split_whitespace().find(|w| w.starts_with(&prefix)).unwrap_or_else(|| panic!("{stderr}"));
    assert!(stderr.find("exec-page-test-oops").unwrap() < stderr.find(link).unwrap(), "{stderr}");
    let page = crate::common::http_get(http, &link[prefix.len()..], &[]).await;
    assert_eq!(page.status, 200);
    assert!(page.text().contains("exec-page-test-oops"), "{}", page.text());
    // A success prints nothing of the kind.
    let out = cli_in(dir.path(), s(&["exec", "--server", &server.url(), "--", "true"]), "").await;
    assert!(out.status.success() && out.stderr.is_empty(), "{}", text(&out.stderr));
}
