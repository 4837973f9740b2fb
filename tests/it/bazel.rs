//! A real client nobody here wrote: Bazel (Debian's bazel-bootstrap, 4.2.3)
//! uses the server as its remote cache, and as its remote executor.
//!
//! Skipped with a message when `bazel` is not installed, unless
//! `DISTBUILD_REQUIRE_BAZEL=1` (CI sets it), in which case a missing Bazel
//! fails the test.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::TestServer;

/// The genrules under //gen/... in the fixture.
pub(crate) const GENRULES: usize = 8;

/// The sh_tests under //shtest/... in the fixture.
const SH_TESTS: usize = 2;

/// Flags for every build and test; the fixture's README says why each is there.
const COMMON_FLAGS: [&str; 4] =
    ["--nosandbox_debug", "--symlink_prefix=/", "--incompatible_strict_action_env", "--remote_timeout=60"];

fn bazel_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("bazel")).find(|p| p.is_file())
}

/// The `bazel` to test with, or `None` (after saying so) when the test should
/// be skipped because it is missing. Panics instead when
/// `DISTBUILD_REQUIRE_BAZEL=1`, so CI cannot pass by skipping.
pub(crate) fn bazel_or_skip() -> Option<PathBuf> {
    let bazel = bazel_binary();
    if bazel.is_none() {
        if std::env::var("DISTBUILD_REQUIRE_BAZEL").as_deref() == Ok("1") {
            panic!("bazel is not installed, and DISTBUILD_REQUIRE_BAZEL=1 (apt-get install bazel-bootstrap)");
        }
        eprintln!("skipping the Bazel test: bazel is not installed (apt-get install bazel-bootstrap)");
    }
    bazel
}

pub(crate) struct Workspace {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    output_root: PathBuf,
    bazel: PathBuf,
    /// Startup options before the command (e.g. `--host_jvm_args=...`).
    startup: Vec<String>,
}

impl Workspace {
    pub(crate) fn new(bazel: PathBuf) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ws");
        copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bazel"), &dir);
        let output_root = tmp.path().join("root");
        Workspace { _tmp: tmp, dir, output_root, bazel, startup: Vec::new() }
    }

    /// Adds Bazel startup options (they go before the command).
    pub(crate) fn with_startup(mut self, options: Vec<String>) -> Self {
        self.startup = options;
        self
    }

    /// Runs `bazel <command> <args>`.
    fn output_of(&self, command: &str, args: &[&str]) -> Output {
        Command::new(&self.bazel)
            .current_dir(&self.dir)
            .arg("--nohome_rc")
            .args(&self.startup)
            .arg(format!("--output_user_root={}", self.output_root.display()))
            .arg("--max_idle_secs=120")
            .arg(command)
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs `bazel <command> <args>`; returns (success, stderr).
    pub(crate) fn run(&self, command: &str, args: &[&str]) -> (bool, String) {
        let out = self.output_of(command, args);
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// Builds //gen/... with `server` as the remote cache only: every action
    /// that misses runs locally, unsandboxed.
    pub(crate) fn build(&self, server: &str, extra: &[&str]) -> String {
        let remote = format!("--remote_cache={server}");
        let mut args = COMMON_FLAGS.to_vec();
        args.extend(["--spawn_strategy=local", &remote]);
        args.extend_from_slice(extra);
        args.push("//gen/...");
        let (ok, stderr) = self.run("build", &args);
        assert!(ok, "bazel build failed:\n{stderr}");
        stderr
    }

    /// Builds every genrule and runs every sh_test with `server` as the
    /// remote executor; returns stderr, which holds the process summary.
    ///
    /// `--spawn_strategy=remote` without `--remote_local_fallback` means a
    /// spawn the server cannot run fails the command instead of quietly
    /// running here. Bazel 4.2.3 also uses the executor's endpoint as its
    /// remote cache, so no `--remote_cache` is needed.
    fn test_remotely(&self, server: &str) -> String {
        self.test_remotely_with(server, &[])
    }

    /// [`Workspace::test_remotely`] with more flags (e.g. `--remote_header`).
    pub(crate) fn test_remotely_with(&self, server: &str, extra: &[&str]) -> String {
        let out = self.test_remotely_output(server, extra);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        // `bazel test` succeeds only if it ran tests (no test targets is exit
        // code 4) and every one of them passed.
        assert!(
            out.status.success(),
            "bazel test failed ({}):\n{stderr}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
        stderr
    }

    /// `bazel test` of every genrule and sh_test on `server` as the remote
    /// executor, whatever the outcome.
    pub(crate) fn test_remotely_output(&self, server: &str, extra: &[&str]) -> Output {
        let remote = format!("--remote_executor={server}");
        let mut args = COMMON_FLAGS.to_vec();
        // A failing test's log then shows up in the panic message below.
        args.extend(["--spawn_strategy=remote", "--test_output=errors", &remote]);
        args.extend_from_slice(extra);
        args.extend(["//gen/...", "//shtest/..."]);
        self.output_of("test", &args)
    }

    pub(crate) fn output(&self, label_path: &str) -> String {
        let out = Command::new(&self.bazel)
            .current_dir(&self.dir)
            .arg("--nohome_rc")
            .args(&self.startup)
            .arg(format!("--output_user_root={}", self.output_root.display()))
            .args(["info", "bazel-bin"])
            .output()
            .unwrap();
        let bin = String::from_utf8(out.stdout).unwrap();
        std::fs::read_to_string(Path::new(bin.trim()).join(label_path)).unwrap()
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        let _ = self.run("shutdown", &[]);
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Parses Bazel's `INFO: N processes: ...` summary into (runner, count).
pub(crate) fn process_summary(stderr: &str) -> Vec<(String, usize)> {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("INFO:") && (l.contains(" processes") || l.contains(" process:")))
        .unwrap_or_else(|| panic!("no process summary in:\n{stderr}"));
    let Some((_, parts)) = line.split_once(": ").and_then(|(_, rest)| rest.split_once(": ")) else {
        return Vec::new();
    };
    parts
        .trim_end_matches('.')
        .split(", ")
        .filter_map(|p| {
            let (n, runner) = p.split_once(' ')?;
            Some((runner.to_string(), n.parse().ok()?))
        })
        .collect()
}

pub(crate) fn count(summary: &[(String, usize)], runner: &str) -> usize {
    summary.iter().filter(|(r, _)| r == runner).map(|(_, n)| n).sum()
}

/// The runners in `summary` other than `internal` (the symlink and runfiles
/// work Bazel does in its own process, whatever the strategy).
pub(crate) fn external_runners(summary: &[(String, usize)]) -> Vec<&str> {
    summary.iter().filter(|(r, _)| r != "internal").map(|(r, _)| r.as_str()).collect()
}

/// `process_summary` against summary lines as Bazel 4.2.3 prints them, so a
/// parsing slip cannot make the Bazel tests pass or fail for the wrong reason.
#[test]
fn process_summary_parses_bazel_lines() {
    let cases: [(&str, &[(&str, usize)]); 6] = [
        ("INFO: 9 processes: 1 internal, 8 linux-sandbox.", &[("internal", 1), ("linux-sandbox", 8)]),
        ("INFO: 9 processes: 8 remote cache hit, 1 internal.", &[("remote cache hit", 8), ("internal", 1)]),
        ("INFO: 12 processes: 3 internal, 9 remote.", &[("internal", 3), ("remote", 9)]),
        ("INFO: 5 processes: 2 internal, 3 processwrapper-sandbox.", &[("internal", 2), ("processwrapper-sandbox", 3)]),
        ("INFO: 1 process: 1 internal.", &[("internal", 1)]),
        ("INFO: 0 processes.", &[]),
    ];
    for (line, expected) in cases {
        // Surrounded by the kind of lines Bazel prints around the summary.
        let stderr = format!(
            "INFO: Analyzed 10 targets (14 packages loaded, 120 targets configured).\n\
             INFO: Found 8 targets and 2 test targets...\n\
             {line}\n\
             INFO: Build completed successfully, 14 total actions\n"
        );
        let expected: Vec<(String, usize)> = expected.iter().map(|&(r, n)| (r.to_string(), n)).collect();
        assert_eq!(process_summary(&stderr), expected, "{line}");
    }
    let summary = process_summary("INFO: 12 processes: 3 internal, 9 remote.\n");
    assert_eq!(count(&summary, "remote"), 9);
    assert_eq!(count(&summary, "local"), 0);
    assert_eq!(external_runners(&summary), ["remote"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn bazel_uses_the_server_as_remote_cache() {
    let Some(bazel) = bazel_or_skip() else { return };
    let server = TestServer::start().await;
    let url = server.url();
    let summaries = tokio::task::spawn_blocking(move || {
        let ws = Workspace::new(bazel);
        // Cold: every genrule runs locally and is uploaded.
        let first = process_summary(&ws.build(&url, &[]));
        let report = ws.output("gen/report/report.txt");
        // After `bazel clean`, everything comes from the remote cache.
        assert!(ws.run("clean", &[]).0);
        let second = process_summary(&ws.build(&url, &[]));
        assert_eq!(ws.output("gen/report/report.txt"), report);
        // And again without downloading intermediate outputs, which only
        // works if every cache hit's blobs really are there.
        assert!(ws.run("clean", &[]).0);
        let third = process_summary(&ws.build(&url, &["--remote_download_minimal"]));
        (first, second, third)
    })
    .await
    .unwrap();
    let (first, second, third) = summaries;
    assert_eq!(count(&first, "local"), GENRULES, "cold build: {first:?}");
    assert_eq!(count(&first, "remote cache hit"), 0, "cold build: {first:?}");
    assert_eq!(count(&second, "remote cache hit"), GENRULES, "after clean: {second:?}");
    assert_eq!(count(&second, "local"), 0, "after clean: {second:?}");
    assert_eq!(count(&third, "remote cache hit"), GENRULES, "minimal download: {third:?}");
}

/// Bazel hands every genrule and sh_test to the server's workers, then, after
/// `bazel clean`, gets all of them back from the action cache those remote
/// runs filled.
#[tokio::test(flavor = "multi_thread")]
async fn bazel_remote_execution() {
    let Some(bazel) = bazel_or_skip() else { return };
    // No exec properties: Bazel 4.2.3 sends an empty platform unless
    // --remote_default_exec_properties is set, and the built-in workers take
    // any action.
    let server = TestServer::start().await;
    let url = server.url();
    let (cold, warm) = tokio::task::spawn_blocking(move || {
        let ws = Workspace::new(bazel);
        let expected = "hello from the distbuild bazel fixture\nPEAR\nAPPLE\nFIG\nBANANA\nCHERRY\n";
        // Cold: nothing is cached, so the workers run every action and test.
        let cold = process_summary(&ws.test_remotely(&url));
        // Made remotely from a source file and another remote action's
        // output, then downloaded (Bazel 4.2.3 downloads all outputs).
        assert_eq!(ws.output("gen/text/greeting_full.txt"), expected);
        // After `bazel clean`, every action and test result comes from the
        // action cache that the remote runs filled.
        assert!(ws.run("clean", &[]).0);
        let warm = process_summary(&ws.test_remotely(&url));
        assert_eq!(ws.output("gen/text/greeting_full.txt"), expected);
        (cold, warm)
    })
    .await
    .unwrap();
    eprintln!("cold: {cold:?}\nwarm: {warm:?}");
    // Anything but `remote` (`local`, `linux-sandbox`, `processwrapper-sandbox`,
    // `remote cache hit`) means some spawn did not run on the server.
    assert_eq!(external_runners(&cold), ["remote"], "cold run: {cold:?}");
    // Each test also has a second spawn, which writes its test.xml from the
    // test log (--experimental_split_xml_generation is on by default), so
    // expect 12: only the genrules and the tests themselves are certain.
    let executed = count(&cold, "remote");
    assert!(executed >= GENRULES + SH_TESTS, "cold run: {cold:?}");
    // Zero `remote`: nothing ran again, and every remote run was cached. That
    // includes the XML spawns: their command line carries the test's wall
    // time in seconds, which Bazel 4.2.3 leaves at 0 for remote results.
    assert_eq!(external_runners(&warm), ["remote cache hit"], "after clean: {warm:?}");
    assert_eq!(count(&warm, "remote cache hit"), executed, "after clean: {warm:?}, cold run: {cold:?}");
}

/// A genrule that fails on the server's worker: Bazel 4.2.3 prints the
/// ExecuteResponse's message into the failed action's output whenever the
/// result is not a success (status not OK or a non-zero exit code), so the
/// link to the action's status page appears beside the failure, and that
/// page shows the run's exit code and stderr.
#[tokio::test(flavor = "multi_thread")]
async fn bazel_prints_the_status_page_of_a_failed_remote_action() {
    let Some(bazel) = bazel_or_skip() else { return };
    let http = crate::common::free_addr();
    let server = TestServer::start_with(cargo_distbuild::config::Backend::Filesystem, |f| {
        f.server.http_listen = Some(http.to_string())
    })
    .await;
    let url = server.url();
    let (ok, stderr) = tokio::task::spawn_blocking(move || {
        let ws = Workspace::new(bazel);
        let remote = format!("--remote_executor={url}");
        let mut args = COMMON_FLAGS.to_vec();
        args.extend(["--spawn_strategy=remote", &remote, "//failing:fails"]);
        ws.run("build", &args)
    })
    .await
    .unwrap();
    assert!(!ok, "the failing genrule built:\n{stderr}");
    let prefix = format!("http://{http}/action/sha256/");
    let at = stderr.find(&prefix).unwrap_or_else(|| panic!("no link to the action page in:\n{stderr}"));
    let link = stderr[at..].split_whitespace().next().unwrap();
    let from = stderr.find("ERROR:").unwrap_or(0);
    eprintln!("Bazel printed:\n{}", &stderr[from..at + link.len()]);
    let page = crate::common::http_get(http, &link[format!("http://{http}").len()..], &[]).await;
    let html = page.text();
    assert_eq!(page.status, 200, "{html}");
    assert!(html.contains("id=\"exit-code\" class=\"failed\">1<"), "no exit code 1 in:\n{html}");
    let stderr_block = html.split("<pre id=\"stderr\"").nth(1).unwrap_or_else(|| panic!("no stderr in:\n{html}"));
    assert!(stderr_block.contains("distbuild-fixture: this genrule fails on purpose"), "{html}");
}
