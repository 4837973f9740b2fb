//! A real client nobody here wrote: Bazel (Debian's bazel-bootstrap, 4.2.3)
//! uses the server as its remote cache.
//!
//! Skipped with a message when `bazel` is not installed, unless
//! `DISTBUILD_REQUIRE_BAZEL=1` (CI sets it), in which case a missing Bazel
//! fails the test.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::TestServer;

/// The genrules under //gen/... in the fixture.
const GENRULES: usize = 8;

fn bazel_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("bazel")).find(|p| p.is_file())
}

struct Workspace {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    output_root: PathBuf,
    bazel: PathBuf,
}

impl Workspace {
    fn new(bazel: PathBuf) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ws");
        copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bazel"), &dir);
        let output_root = tmp.path().join("root");
        Workspace { _tmp: tmp, dir, output_root, bazel }
    }

    /// Runs `bazel <command> <args>`; returns (success, stderr).
    fn run(&self, command: &str, args: &[&str]) -> (bool, String) {
        let out = Command::new(&self.bazel)
            .current_dir(&self.dir)
            .arg("--nohome_rc")
            .arg(format!("--output_user_root={}", self.output_root.display()))
            .arg("--max_idle_secs=120")
            .arg(command)
            .args(args)
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    fn build(&self, server: &str, extra: &[&str]) -> String {
        let remote = format!("--remote_cache={server}");
        let mut args = vec![
            "--nosandbox_debug",
            "--symlink_prefix=/",
            "--incompatible_strict_action_env",
            "--spawn_strategy=local",
            "--remote_timeout=60",
            &remote,
        ];
        args.extend_from_slice(extra);
        args.push("//gen/...");
        let (ok, stderr) = self.run("build", &args);
        assert!(ok, "bazel build failed:\n{stderr}");
        stderr
    }

    fn output(&self, label_path: &str) -> String {
        let out = Command::new(&self.bazel)
            .current_dir(&self.dir)
            .arg("--nohome_rc")
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
fn process_summary(stderr: &str) -> Vec<(String, usize)> {
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

fn count(summary: &[(String, usize)], runner: &str) -> usize {
    summary.iter().filter(|(r, _)| r == runner).map(|(_, n)| n).sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn bazel_uses_the_server_as_remote_cache() {
    let Some(bazel) = bazel_binary() else {
        if std::env::var("DISTBUILD_REQUIRE_BAZEL").as_deref() == Ok("1") {
            panic!("bazel is not installed, and DISTBUILD_REQUIRE_BAZEL=1 (apt-get install bazel-bootstrap)");
        }
        eprintln!("skipping the Bazel test: bazel is not installed (apt-get install bazel-bootstrap)");
        return;
    };
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
