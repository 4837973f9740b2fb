//! The status pages in a real browser: Debian's `chromium`, headless, driven
//! through `chromedriver` (WebDriver) against a live server with its
//! built-in worker, a failed action and a long-running one in flight.
//!
//! Each page visited is saved as a PNG under `target/browser-screenshots/`
//! (CI keeps them as artifacts). Skipped with a message when chromium or
//! chromedriver is missing, unless `DISTBUILD_REQUIRE_BROWSER=1` (CI sets
//! it), in which case a missing browser fails the test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cargo_distbuild::config::Backend;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use remote_apis::longrunning::CancelOperationRequest;
use remote_apis::longrunning::operations_client::OperationsClient;

use crate::common::{TestServer, free_addr};
use crate::execution::{Act, execution, request, response, sleeper, unique_sleep};

/// The stderr line of the failing action, as the page must show it.
const FAILURE_LINE: &str = "browser-test: this action fails on purpose";
/// Its exit code.
const FAILURE_EXIT: i32 = 3;

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// (chromium, chromedriver), or `None` (after saying so) when the test
/// should be skipped. Panics instead when `DISTBUILD_REQUIRE_BROWSER=1`.
fn browser_or_skip() -> Option<(PathBuf, PathBuf)> {
    let found = find_on_path("chromium").zip(find_on_path("chromedriver"));
    if found.is_none() {
        let hint = "apt-get install chromium chromium-driver";
        if std::env::var("DISTBUILD_REQUIRE_BROWSER").as_deref() == Ok("1") {
            panic!("chromium or chromedriver is not installed, and DISTBUILD_REQUIRE_BROWSER=1 ({hint})");
        }
        eprintln!("skipping the browser test: chromium or chromedriver is not installed ({hint})");
    }
    found
}

/// A chromedriver process with one headless chromium session. Dropping it
/// kills chromedriver and every browser process it started (they share its
/// process group), even when the test panics before closing the session.
struct Browser {
    client: Client,
    driver: Child,
    shots: PathBuf,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start(chromium: &Path, chromedriver: &Path) -> Browser {
        use std::os::unix::process::CommandExt;
        let port = free_addr().port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("starting chromedriver");
        let profile = tempfile::tempdir().unwrap();
        let caps = serde_json::json!({
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1024",
                    "--disable-dev-shm-usage", format!("--user-data-dir={}", profile.path().display()),
                ],
            }
        });
        let serde_json::Value::Object(caps) = caps else { unreachable!() };
        // chromedriver needs a moment before it listens.
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = loop {
            match ClientBuilder::new(HttpConnector::new()).capabilities(caps.clone()).connect(&url).await {
                Ok(client) => break client,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("no WebDriver session from chromedriver at {url}: {e}"),
            }
        };
        Browser { client, driver, shots: screenshot_dir(), _profile: profile }
    }

    /// Saves the current page as `NAME.png` in the screenshot directory.
    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("a screenshot");
        assert!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }

    async fn text(&self, css: &str) -> String {
        let element = self.client.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("no {css}: {e}"));
        element.text().await.unwrap()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group this struct started.
        unsafe { libc::kill(-(self.driver.id() as i32), libc::SIGKILL) };
        let _ = self.driver.wait();
    }
}

/// `target/browser-screenshots/`, beside the test binary's profile
/// directory, so it follows `CARGO_TARGET_DIR`.
fn screenshot_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/it-HASH
    let target = exe.ancestors().nth(3).map(Path::to_path_buf);
    let target = target.unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("browser-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// An action with a small input tree (a directory inside a directory) that
/// writes a known line to stderr and fails.
fn failing_action() -> Act {
    Act {
        files: vec![
            ("README.txt", b"inputs of the failing action\n", false),
            ("src/main.sh", b"#!/bin/sh\necho hello\n", true),
            ("src/lib/util.txt", b"a nested input file\n", false),
        ],
        ..Act::sh(&format!("echo '{FAILURE_LINE}' >&2; echo some stdout; exit {FAILURE_EXIT}"))
    }
}

/// Starts an action that sleeps for a minute and returns its operation's
/// name once its process runs. The stream is kept open by a task.
async fn start_sleeper(server: &TestServer) -> String {
    let seconds = unique_sleep();
    let act = Act { script: format!("sleep {seconds}"), do_not_cache: true, ..Default::default() };
    let digest = act.upload(server).await;
    let mut stream = execution(server).execute(request(digest)).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    tokio::spawn(async move { while let Ok(Some(_)) = stream.message().await {} });
    let deadline = Instant::now() + Duration::from_secs(20);
    while sleeper(&seconds).is_none() {
        assert!(Instant::now() < deadline, "the long-running action never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.name
}

/// The path and query of a URL on `http` (the link the server handed out).
fn path_of(url: &str, http: SocketAddr) -> String {
    url.strip_prefix(&format!("http://{http}")).unwrap_or_else(|| panic!("{url} is not on {http}")).to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_status_pages_in_a_real_browser() {
    let Some((chromium, chromedriver)) = browser_or_skip() else { return };
    let http = free_addr();
    let server = TestServer::start_with(Backend::Filesystem, |f| {
        f.server.http_listen = Some(http.to_string());
        f.worker.capacity = Some(2);
    })
    .await;
    let base = format!("http://{http}");

    // A failed action: its response links its page.
    let digest = failing_action().upload(&server).await;
    let ops = crate::execution::run(&server, request(digest)).await.unwrap();
    let failed = response(ops.last().unwrap());
    assert_eq!(failed.result.as_ref().unwrap().exit_code, FAILURE_EXIT);
    let action_url = format!("{base}/action/sha256/{}/{}", digest.hash_hex(), digest.size);
    assert!(failed.message.contains(&action_url), "message: {:?}", failed.message);
    // And one that runs for a while.
    let running = start_sleeper(&server).await;

    let browser = Browser::start(&chromium, &chromedriver).await;
    let c = &browser.client;

    // The overview: the built-in worker, busy, and the running action.
    c.goto(&format!("{base}/?refresh=0")).await.unwrap();
    browser.screenshot("overview").await;
    let worker = server_worker_name(&server).await;
    let row = format!("tr[id=\"worker-{worker}\"]");
    assert_eq!(browser.text(&format!("{row} td.state")).await, "active");
    assert_eq!(browser.text(&format!("{row} td.slots")).await, "1/2");
    let running_table = browser.text("table#running").await;
    let running_id = running.strip_prefix("operations/").unwrap();
    assert!(running_table.contains(&worker), "{running_table}");
    let running_link = c.find(Locator::Css("table#running a[href^=\"/operations/\"]")).await.unwrap();
    assert!(running_link.attr("href").await.unwrap().unwrap().contains(running_id), "{running_table}");
    assert!(browser.text("table#recent").await.contains("exit code 3"));

    // The failed action's page, from the link the client got.
    c.goto(&format!("{base}{}", path_of(&action_url, http))).await.unwrap();
    browser.screenshot("failed-action").await;
    assert_eq!(browser.text("#exit-code").await, FAILURE_EXIT.to_string());
    assert!(browser.text("pre#stderr").await.contains(FAILURE_LINE));
    assert!(browser.text("pre#stdout").await.contains("some stdout"));
    // The result is below the fold: a second picture shows it.
    c.execute("document.getElementById('result').scrollIntoView()", vec![]).await.unwrap();
    browser.screenshot("failed-result").await;

    // Its input tree: `src/` is closed until clicked, then shows `lib/`.
    let summary = c
        .find(Locator::XPath("//li[contains(@class,'dir')]/details/summary[starts-with(normalize-space(.),'src')]"))
        .await;
    let summary = summary.expect("the input tree lists src/");
    let main_sh = Locator::XPath("//li[contains(@class,'file')][.//a[normalize-space(.)='main.sh']]");
    let hidden = c.find(main_sh).await.unwrap();
    if hidden.is_displayed().await.unwrap() {
        // Open by default: close it first, so the click below opens it.
        summary.click().await.unwrap();
        assert!(!hidden.is_displayed().await.unwrap(), "src/ does not collapse");
    }
    summary.click().await.unwrap();
    assert!(c.find(main_sh).await.unwrap().is_displayed().await.unwrap(), "src/ does not expand");
    browser.screenshot("input-tree").await;

    // The operation page of the running action.
    c.goto(&format!("{base}/operations/{running_id}")).await.unwrap();
    browser.screenshot("running-operation").await;

    // Draining the worker from its button: the state cell says so.
    c.goto(&format!("{base}/?refresh=0")).await.unwrap();
    c.find(Locator::Css(&format!("{row} button.drain"))).await.unwrap().click().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // The form posts, then the browser lands on the overview again.
        let state = match c.find(Locator::Css(&format!("{row} td.state"))).await {
            Ok(cell) => cell.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if state == "draining" {
            break;
        }
        assert!(Instant::now() < deadline, "the worker's state is {state:?} after the drain button");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(c.find(Locator::Css(&format!("{row} button.undrain"))).await.is_ok(), "no undrain button");
    browser.screenshot("drained").await;
    let status = crate::common::http_get(http, "/?refresh=0", &[]).await.text();
    assert!(status.contains("draining"));

    browser.client.clone().close().await.unwrap();
    drop(browser);
    // Cancelled, so the server's stop need not wait for the sleep.
    let mut ops = OperationsClient::new(server.channel.clone());
    ops.cancel_operation(CancelOperationRequest { name: running }).await.unwrap();
    server.stop().await.unwrap();
}

/// The built-in worker's name, as `workers list` would show it.
async fn server_worker_name(server: &TestServer) -> String {
    use cargo_distbuild::admin::proto::ListWorkersRequest;
    use cargo_distbuild::admin::proto::admin_client::AdminClient;
    let mut admin = AdminClient::new(server.channel.clone());
    let workers = admin.list_workers(ListWorkersRequest::default()).await.unwrap().into_inner().workers;
    assert_eq!(workers.len(), 1, "{workers:?}");
    workers[0].name.clone()
}
