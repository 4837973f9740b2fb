//! The rustc and C wrappers end to end: real cargo builds of a workspace
//! with crates.io dependencies (`tests/fixtures/cargo-ws`: serde_derive as a
//! proc-macro, build scripts, a member with its own build script, a member
//! whose build script compiles C through the cc crate, a binary, tests)
//! through `cargo distbuild` against an in-process server.

use std::path::{Path, PathBuf};
use std::process::Output;

use cargo_distbuild::config::Backend;
use remote_apis::wrapper_state::{Record, read_records};

use crate::common::TestServer;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cargo-ws")
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        if name == "target" {
            continue;
        }
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to.join(&name));
        } else {
            std::fs::copy(e.path(), to.join(&name)).unwrap();
        }
    }
}

/// The wrapper binary `cargo test --workspace` builds beside cargo-distbuild.
fn wrapper_binary() -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_cargo-distbuild")).with_file_name("distbuild-rustc");
    assert!(p.is_file(), "{} is missing: run the tests with `cargo test --workspace`", p.display());
    let cc = p.with_file_name("distbuild-cc");
    assert!(cc.is_file(), "{} is missing: run the tests with `cargo test --workspace`", cc.display());
    p
}

/// One machine: its own CARGO_HOME, wrapper cache and stats file.
struct Machine {
    home: PathBuf,
    cargo_home: Option<PathBuf>,
    env: Vec<(String, String)>,
}

impl Machine {
    fn new(root: &Path, name: &str, cargo_home: Option<PathBuf>) -> Machine {
        let home = root.join(name);
        std::fs::create_dir_all(&home).unwrap();
        Machine { home, cargo_home, env: Vec::new() }
    }

    fn stats(&self) -> PathBuf {
        self.home.join("state/cargo-distbuild/stats.jsonl")
    }

    async fn run(&self, dir: &Path, program: &Path, args: &[&str], server: Option<&str>) -> Output {
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .current_dir(dir)
            .env("XDG_CACHE_HOME", self.home.join("cache"))
            .env("XDG_STATE_HOME", self.home.join("state"))
            .env("XDG_CONFIG_HOME", self.home.join("config"))
            .env_remove("DISTBUILD_CONFIG")
            .env_remove("DISTBUILD_STATS")
            .env_remove("DISTBUILD_SERVER")
            .env_remove("RUSTC_WRAPPER")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET_DIR");
        if let Some(s) = server {
            cmd.env("DISTBUILD_SERVER", s);
        }
        if let Some(h) = &self.cargo_home {
            cmd.env("CARGO_HOME", h);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.output().await.unwrap()
    }

    /// `cargo-distbuild <args>` as `cargo distbuild <args>` runs it.
    async fn distbuild(&self, dir: &Path, args: &[&str], server: Option<&str>) -> Output {
        let mut full = vec!["distbuild"];
        full.extend(args);
        self.run(dir, Path::new(env!("CARGO_BIN_EXE_cargo-distbuild")), &full, server).await
    }

    async fn cargo(&self, dir: &Path, args: &[&str]) -> Output {
        self.run(dir, Path::new(&std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())), args, None).await
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(what: &str, out: &Output) {
    assert!(out.status.success(), "{what} failed:\n{}\n{}", text(&out.stdout), text(&out.stderr));
}

/// The compiles of one build, rustc's and the C compiler's (queries such as
/// `-vV` and preprocessing left out), and the failed probes build scripts
/// run on purpose.
fn compiles(records: &[Record]) -> (Vec<&Record>, usize) {
    let all: Vec<&Record> = records.iter().filter(|r| !r.krate.is_empty()).collect();
    let probes = all.iter().filter(|r| r.exit != 0).count();
    (all.into_iter().filter(|r| r.exit == 0).collect(), probes)
}

async fn app_output(m: &Machine, dir: &Path) -> String {
    let out = m.run(dir, &dir.join("target/debug/app"), &["one", "two"], None).await;
    ok("the app", &out);
    text(&out.stdout)
}

#[tokio::test(flavor = "multi_thread")]
async fn cargo_builds_are_cached_executed_and_location_independent() {
    wrapper_binary();
    let root = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(Backend::Filesystem, |_| {}).await;
    let url = server.url();

    // A plain local build: the reference output.
    let plain = Machine::new(root.path(), "plain", None);
    let p_dir = root.path().join("plain-ws");
    copy_tree(&fixture(), &p_dir);
    ok("cargo fetch", &plain.cargo(&p_dir, &["fetch"]).await);
    ok("plain cargo build", &plain.cargo(&p_dir, &["build"]).await);
    let reference = app_output(&plain, &p_dir).await;
    assert!(reference.starts_with("{\"greeting\":\"hello, distbuild\",\"build_number\":42,"), "{reference}");

    // Machine A: cold cache, every compile executed remotely.
    let a = Machine::new(root.path(), "a", None);
    let a_dir = root.path().join("checkout-a");
    copy_tree(&fixture(), &a_dir);
    let out = a.distbuild(&a_dir, &["build"], Some(&url)).await;
    ok("cargo distbuild build (cold)", &out);
    assert_eq!(app_output(&a, &a_dir).await, reference, "the wrapper's binary behaves as the local build's");
    let records = read_records(&a.stats(), 0);
    let (cold, _) = compiles(&records);
    assert!(cold.len() >= 20, "{} compiles", cold.len());
    for r in &cold {
        assert_eq!(r.outcome, "remote", "{} ran {} ({:?})", r.krate, r.outcome, r.reason);
    }
    let c_compiles: Vec<&&Record> = cold.iter().filter(|r| r.tool == "cc").collect();
    // cnative's answer.c, and cc-rs's own flag checks (flag_check.c).
    assert!(c_compiles.iter().any(|r| r.krate == "answer.c"), "cnative's answer.c: {c_compiles:?}");
    let summary = text(&out.stderr);
    let rustc_count = records.iter().filter(|r| !r.krate.is_empty() && r.tool.is_empty()).count();
    assert!(summary.contains(&format!("distbuild: {rustc_count} rustc invocations")), "{summary}");
    let n = c_compiles.len();
    assert!(summary.contains(&format!("; {n} C compiles: 0 cache hits, {n} remote, 0 local;")), "{summary}");

    // Tests build (test harnesses link) and pass.
    let out = a.distbuild(&a_dir, &["test"], Some(&url)).await;
    ok("cargo distbuild test", &out);
    assert!(text(&out.stdout).contains("test tests::greets ... ok"), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("test the_binary_prints_its_report ... ok"), "{}", text(&out.stdout));

    // Machine B: another directory, another CARGO_HOME, an empty wrapper
    // cache. After `cargo clean`, every compile is a cache hit.
    let b = Machine::new(root.path(), "b", Some(root.path().join("b/cargo-home")));
    let b_dir = root.path().join("elsewhere/deeper/checkout-b");
    copy_tree(&fixture(), &b_dir);
    ok("cargo fetch (B)", &b.cargo(&b_dir, &["fetch"]).await);
    ok("cargo clean (B)", &b.cargo(&b_dir, &["clean"]).await);
    let out = b.distbuild(&b_dir, &["build"], Some(&url)).await;
    ok("cargo distbuild build (B)", &out);
    let records = read_records(&b.stats(), 0);
    let (warm, probes) = compiles(&records);
    assert_eq!(warm.len(), cold.len(), "the same compiles");
    for r in &warm {
        assert_eq!(r.outcome, "hit", "{} was not served from the cache: {} ({:?})", r.krate, r.outcome, r.reason);
    }
    assert!(probes <= 3, "{probes} failed compiles");
    assert!(warm.iter().any(|r| r.tool == "cc"), "the C compile is among the hits");
    assert_eq!(app_output(&b, &b_dir).await, reference);

    // A C compile error fails the build with the compiler's message.
    let answer = b_dir.join("cnative/csrc/answer.c");
    let source = std::fs::read_to_string(&answer).unwrap();
    std::fs::write(&answer, source.replace("return ANSWER_BASE", "return ANSWER_BASE +* ;")).unwrap();
    let out = b.distbuild(&b_dir, &["build"], Some(&url)).await;
    assert!(!out.status.success(), "a broken C file built");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("answer.c") && stderr.contains("error: expected expression"), "{stderr}");
    let records = read_records(&b.stats(), 0);
    let failed = records.iter().rev().find(|r| r.tool == "cc" && !r.krate.is_empty()).unwrap();
    assert_eq!((failed.exit, failed.reason.as_deref()), (1, Some("compile failed")), "{failed:?}");

    // The server unreachable: the build still succeeds, with one warning.
    ok("cargo clean (A)", &a.cargo(&a_dir, &["clean"]).await);
    let out = a.distbuild(&a_dir, &["build"], Some("127.0.0.1:1")).await;
    ok("cargo distbuild build (server down)", &out);
    assert_eq!(text(&out.stderr).matches("warning: distbuild:").count(), 1, "{}", text(&out.stderr));
    assert_eq!(app_output(&a, &a_dir).await, reference);

    // `stats` reads what the builds recorded.
    let out = a.distbuild(&a_dir, &["stats"], None).await;
    ok("cargo distbuild stats", &out);
    let stats = text(&out.stdout);
    assert!(stats.contains("server unavailable"), "{stats}");
    assert!(stats.contains("remote executions"), "{stats}");
    assert!(stats.contains("C/C++ compiles"), "{stats}");
    server.stop().await.unwrap();
}

/// Cache-only mode (CI runners): misses compile locally and are stored,
/// so another machine's build is served from the cache.
#[tokio::test(flavor = "multi_thread")]
async fn cache_only_mode_stores_local_results() {
    wrapper_binary();
    let root = tempfile::tempdir().unwrap();
    // No workers: a miss on the second machine fails fast and compiles there.
    let server = TestServer::start_with(Backend::Filesystem, |f| {
        f.worker.capacity = Some(0);
        f.execution.unmatched_timeout = std::time::Duration::from_secs(1);
    })
    .await;
    let url = server.url();
    let ci = Machine::new(root.path(), "ci", None);
    std::fs::create_dir_all(ci.home.join("config/cargo-distbuild")).unwrap();
    std::fs::write(ci.home.join("config/cargo-distbuild/config.toml"), "[wrapper]\nmode = \"cache-only\"\n").unwrap();
    let dir = root.path().join("ci-ws");
    copy_tree(&fixture(), &dir);
    ok("cargo fetch", &ci.cargo(&dir, &["fetch"]).await);
    ok("cache-only build", &ci.distbuild(&dir, &["build"], Some(&url)).await);
    let ci_records = read_records(&ci.stats(), 0);
    let (first, _) = compiles(&ci_records);
    assert!(first.len() >= 20);
    for r in &first {
        assert!(r.outcome == "local" && r.stored, "{} was not stored: {} {:?}", r.krate, r.outcome, r.reason);
    }

    let dev = Machine::new(root.path(), "dev", None);
    let dir2 = root.path().join("dev-ws");
    copy_tree(&fixture(), &dir2);
    ok("warm build", &dev.distbuild(&dir2, &["build"], Some(&url)).await);
    let dev_records = read_records(&dev.stats(), 0);
    let (second, _) = compiles(&dev_records);
    assert_eq!(second.len(), first.len());
    assert!(second.iter().all(|r| r.outcome == "hit"), "{second:?}");
    server.stop().await.unwrap();
}

async fn probe_output(m: &Machine, dir: &Path) -> String {
    let out = m.run(dir, &dir.join("target/debug/probe"), &[], None).await;
    ok("the probe binary", &out);
    text(&out.stdout)
}

/// The records of one crate's compiles.
fn of<'a>(records: &'a [Record], krate: &str) -> Vec<&'a Record> {
    records.iter().filter(|r| r.krate == krate).collect()
}

/// A build script's probe meant to fail (`probe/build/build.rs` compiles
/// `build/probe.rs` through `$RUSTC_WRAPPER $RUSTC`, as anyhow does) fails
/// once; the next build, after `cargo clean`, replays the failure from the
/// cache: no local and no remote run of it, and the same cfg outcome as a
/// plain build.
#[tokio::test(flavor = "multi_thread")]
async fn failing_probes_are_remembered() {
    wrapper_binary();
    let root = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(Backend::Filesystem, |_| {}).await;
    let url = server.url();

    let plain = Machine::new(root.path(), "plain", None);
    let p_dir = root.path().join("plain-ws");
    copy_tree(&fixture(), &p_dir);
    ok("plain cargo build", &plain.cargo(&p_dir, &["build", "-p", "probe"]).await);
    let reference = probe_output(&plain, &p_dir).await;
    assert_eq!(reference, "nightly features: false\n", "the fixture assumes a stable rustc");

    let a = Machine::new(root.path(), "a", None);
    let dir = root.path().join("ws");
    copy_tree(&fixture(), &dir);
    ok("cold build", &a.distbuild(&dir, &["build", "-p", "probe"], Some(&url)).await);
    let cold = read_records(&a.stats(), 0);
    let first = of(&cold, "probe_build_probe");
    assert_eq!(first.len(), 1, "{cold:?}");
    assert_eq!((first[0].exit, first[0].outcome.as_str()), (1, "remote"), "trusted at once: {:?}", first[0]);
    assert!(first[0].stored, "remembered: {:?}", first[0]);
    assert_eq!(probe_output(&a, &dir).await, reference);

    ok("cargo clean", &a.cargo(&dir, &["clean"]).await);
    let offset = std::fs::metadata(a.stats()).unwrap().len();
    let out = a.distbuild(&dir, &["build", "-p", "probe"], Some(&url)).await;
    ok("warm build", &out);
    let warm = read_records(&a.stats(), offset);
    let again = of(&warm, "probe_build_probe");
    assert_eq!(again.len(), 1, "{warm:?}");
    assert_eq!((again[0].exit, again[0].outcome.as_str()), (1, "hit"), "replayed: {:?}", again[0]);
    assert!(text(&out.stderr).contains("(1 remembered)"), "{}", text(&out.stderr));
    assert_eq!(probe_output(&a, &dir).await, reference, "the same cfg as a plain build");
    server.stop().await.unwrap();
}

/// cargo's pipelining survives the wrapper: serde_json (a library that
/// needs only serde's `.rmeta`) starts while serde's compile still runs,
/// both when serde compiles here (its stderr streamed to cargo) and when
/// it is a cache hit (`.rmeta` delivered first). The wrapper holds serde's
/// compile open after the notification (a test hook), so the order does
/// not depend on how fast anything is.
#[tokio::test(flavor = "multi_thread")]
async fn dependents_start_at_the_rmeta() {
    wrapper_binary();
    let root = tempfile::tempdir().unwrap();
    // No workers: every compile runs here (cache-only), then hits.
    let server = TestServer::start_with(Backend::Filesystem, |f| {
        f.worker.capacity = Some(0);
        f.execution.unmatched_timeout = std::time::Duration::from_secs(1);
    })
    .await;
    let url = server.url();
    let pause = ("DISTBUILD_TEST_PAUSE_AFTER_RMETA".to_string(), "serde=4000".to_string());
    let started_before_end = |records: &[Record]| {
        let serde: Vec<&Record> = of(records, "serde").into_iter().filter(|r| r.exit == 0).collect();
        let json = of(records, "serde_json");
        assert!(!serde.is_empty() && !json.is_empty(), "{records:?}");
        let serde_end = serde.iter().map(|r| r.end_us).max().unwrap();
        let json_start = json.iter().map(|r| r.start_us).min().unwrap();
        assert!(json_start > 0 && serde_end > 0);
        (json_start < serde_end, serde.iter().map(|r| r.outcome.clone()).collect::<Vec<_>>())
    };

    let mut ci = Machine::new(root.path(), "ci", None);
    ci.env.push(pause.clone());
    std::fs::create_dir_all(ci.home.join("config/cargo-distbuild")).unwrap();
    std::fs::write(ci.home.join("config/cargo-distbuild/config.toml"), "[wrapper]\nmode = \"cache-only\"\n").unwrap();
    let dir = root.path().join("ci-ws");
    copy_tree(&fixture(), &dir);
    ok("cargo fetch", &ci.cargo(&dir, &["fetch"]).await);
    ok("local build", &ci.distbuild(&dir, &["build", "-p", "app"], Some(&url)).await);
    let (overlap, outcomes) = started_before_end(&read_records(&ci.stats(), 0));
    assert!(outcomes.iter().all(|o| o == "local"), "{outcomes:?}");
    assert!(overlap, "serde_json started only after serde's local compile ended");

    let mut dev = Machine::new(root.path(), "dev", None);
    dev.env.push(pause);
    let dir2 = root.path().join("dev-ws");
    copy_tree(&fixture(), &dir2);
    ok("warm build", &dev.distbuild(&dir2, &["build", "-p", "app"], Some(&url)).await);
    let (overlap, outcomes) = started_before_end(&read_records(&dev.stats(), 0));
    assert!(outcomes.iter().all(|o| o == "hit"), "{outcomes:?}");
    assert!(overlap, "serde_json started only after serde's cache hit was delivered");
    server.stop().await.unwrap();
}

/// Pipelining for remote compiles: the `.rmeta` of a crate compiled by a
/// worker reaches cargo (read from the running action, at rustc's
/// notification in the live stderr) before the remote compile ends, and
/// its dependents start while it still runs.
#[tokio::test(flavor = "multi_thread")]
async fn remote_compiles_hand_cargo_the_rmeta_early() {
    wrapper_binary();
    let root = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(Backend::Filesystem, |_| {}).await;
    let url = server.url();
    let trace = root.path().join("trace");
    let mut dev = Machine::new(root.path(), "dev", None);
    dev.env.push(("DISTBUILD_TRACE".to_string(), trace.to_string_lossy().into_owned()));
    // serde's wrapper lingers after handing cargo the .rmeta, so that the
    // second assertion does not depend on how fast the worker is; the
    // trace's order is what shows the early delivery.
    dev.env.push(("DISTBUILD_TEST_PAUSE_AFTER_RMETA".to_string(), "serde=3000".to_string()));
    let dir = root.path().join("ws");
    copy_tree(&fixture(), &dir);
    ok("cargo fetch", &dev.cargo(&dir, &["fetch"]).await);
    ok("remote build", &dev.distbuild(&dir, &["build", "-p", "app"], Some(&url)).await);
    let records = read_records(&dev.stats(), 0);
    let serde: Vec<&Record> = of(&records, "serde").into_iter().filter(|r| r.exit == 0).collect();
    assert!(serde.iter().any(|r| r.outcome == "remote"), "{serde:?}");

    // In serde's wrapper: the .rmeta went to cargo, then Execute returned.
    let text = std::fs::read_to_string(&trace).unwrap();
    let early = text
        .lines()
        .find(|l| l.ends_with("rmeta of serde delivered early"))
        .unwrap_or_else(|| panic!("serde's .rmeta was not delivered early:\n{text}"));
    let pid = early.split_whitespace().next().unwrap();
    let mine: Vec<&str> = text.lines().filter(|l| l.split_whitespace().next() == Some(pid)).collect();
    let at = |what: &str| mine.iter().position(|l| l.ends_with(what)).unwrap_or_else(|| panic!("{what}: {mine:?}"));
    assert!(at("rmeta of serde delivered early") < at("executed"), "{mine:?}");

    // And serde_json's compile started before serde's wrapper was done.
    let json = of(&records, "serde_json");
    let serde_end = serde.iter().map(|r| r.end_us).max().unwrap();
    let json_start = json.iter().map(|r| r.start_us).min().unwrap();
    assert!(json_start < serde_end, "serde_json started after serde's remote compile was delivered");

    // The binary works as a plain build's does.
    let bin = dir.join("target/debug/app");
    let out = std::process::Command::new(&bin).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    server.stop().await.unwrap();
}
