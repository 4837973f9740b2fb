//! Bazel 4.2.3 (its Netty gRPC client) over TLS: `grpcs://` with
//! `--tls_certificate`, and mTLS with `--tls_client_certificate` and
//! `--tls_client_key`, as remote cache and as remote executor. The
//! certificates are made here and name `localhost` and 127.0.0.1. Skipped
//! like the other Bazel tests when `bazel` is missing.
//!
//! Debian's bazel-bootstrap 4.2.3 cannot start TLS through the JDK: its
//! Netty build reports "JDK provider does not support ALPN protocol" before
//! connecting. Its gRPC prefers OpenSSL (netty-tcnative) when the native
//! library loads, and the classes are in Bazel's own jar; Debian ships the
//! library as `libnetty-tcnative-jni`, under a file name (`libnetty-tcnative.so`)
//! that Netty neither looks for nor accepts through a symlink. The tests copy
//! it as `libnetty_tcnative.so` into a directory of their own and point
//! Bazel's JVM at it (`--host_jvm_args=-Djava.library.path=...`). Without the
//! package they skip with that message, or fail under
//! `DISTBUILD_REQUIRE_BAZEL=1` (`.ci/run` installs it).

use std::path::Path;
use std::process::Command;

use cargo_distbuild::config::Backend;

use crate::bazel::{GENRULES, Workspace, bazel_or_skip, count, external_runners, process_summary};
use crate::common::TestServer;
use crate::tls::Pki;

/// Where Debian's package puts netty-tcnative's JNI library.
const TCNATIVE_JNI: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/jni/libnetty-tcnative.so",
    "/usr/lib/aarch64-linux-gnu/jni/libnetty-tcnative.so",
    "/usr/lib/jni/libnetty-tcnative.so",
];

/// Bazel startup options that let its gRPC use OpenSSL: a directory holding
/// the JNI library under the name Netty loads, on the JVM's library path
/// (after the Debian install base, which Bazel itself puts there). `None`
/// when the library is not installed.
fn tcnative_startup_options() -> Option<Vec<String>> {
    let lib = TCNATIVE_JNI.iter().map(Path::new).find(|p| p.is_file())?;
    let dir = std::env::temp_dir().join(format!("distbuild-bazel-tcnative-{}", std::process::id()));
    let target = dir.join("libnetty_tcnative.so");
    if !target.is_file() {
        std::fs::create_dir_all(&dir).unwrap();
        // A copy, renamed into place: the two tests may race here, and Netty
        // refuses a symlink whose target has another name.
        let tmp = dir.join(format!("lib.{:?}.tmp", std::thread::current().id()));
        std::fs::copy(lib, &tmp).unwrap();
        std::fs::rename(&tmp, &target).unwrap();
    }
    let mut path = dir.display().to_string();
    if Path::new("/usr/share/bazel").is_dir() {
        path = format!("/usr/share/bazel:{path}");
    }
    Some(vec![format!("--host_jvm_args=-Djava.library.path={path}")])
}

/// Whether this Bazel can speak TLS to `url` at all: a `--nobuild` run
/// that only asks the server for its capabilities. Returns the startup
/// options that make it work, or `None` (after saying why) when the test
/// should be skipped.
fn bazel_with_tls(bazel: &Path, url: &str, ca: &Path) -> Option<Vec<String>> {
    let startup = tcnative_startup_options().unwrap_or_default();
    let root = tempfile::tempdir().unwrap();
    let ws = tempfile::tempdir().unwrap();
    std::fs::write(ws.path().join("WORKSPACE"), "").unwrap();
    std::fs::write(ws.path().join("BUILD"), "").unwrap();
    let out = Command::new(bazel)
        .current_dir(ws.path())
        .arg("--nohome_rc")
        .args(&startup)
        .arg(format!("--output_user_root={}", root.path().display()))
        .arg("--max_idle_secs=10")
        .args(["build", "--nobuild", &format!("--remote_cache={url}"), &format!("--tls_certificate={}", ca.display())])
        .arg("//...")
        .output()
        .unwrap();
    let _ = Command::new(bazel)
        .current_dir(ws.path())
        .args(&startup)
        .arg(format!("--output_user_root={}", root.path().display()))
        .arg("shutdown")
        .output();
    if out.status.success() {
        return Some(startup);
    }
    let logs: String = std::fs::read_dir(root.path())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|d| std::fs::read_to_string(d.path().join("java.log")).ok())
        .collect();
    let alpn = "JDK provider does not support ALPN protocol";
    assert!(logs.contains(alpn), "bazel --nobuild over TLS failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let why = format!(
        "this bazel cannot start TLS ({alpn}) and netty-tcnative's JNI library is not installed \
         (Debian: apt-get install libnetty-tcnative-jni)"
    );
    if std::env::var("DISTBUILD_REQUIRE_BAZEL").as_deref() == Ok("1") {
        panic!("{why}, and DISTBUILD_REQUIRE_BAZEL=1");
    }
    eprintln!("skipping the Bazel TLS test: {why}");
    None
}

#[tokio::test(flavor = "multi_thread")]
async fn bazel_remote_cache_over_tls() {
    let Some(bazel) = bazel_or_skip() else { return };
    let pki = Pki::new();
    let server = TestServer::start_with(Backend::Filesystem, pki.server_config(false)).await;
    let url = format!("grpcs://localhost:{}", server.addr.port());
    let (probe_url, ca_path) = (url.clone(), pki.path("ca.pem"));
    let probe = tokio::task::spawn_blocking(move || bazel_with_tls(&bazel, &probe_url, &ca_path).map(|s| (bazel, s)));
    let Some((bazel, startup)) = probe.await.unwrap() else { return };
    let ca = format!("--tls_certificate={}", pki.path("ca.pem").display());
    let (cold, warm) = tokio::task::spawn_blocking(move || {
        let ws = Workspace::new(bazel).with_startup(startup);
        let cold = process_summary(&ws.build(&url, &[&ca]));
        assert!(ws.run("clean", &[]).0);
        let warm = process_summary(&ws.build(&url, &[&ca]));
        (cold, warm)
    })
    .await
    .unwrap();
    assert_eq!(count(&cold, "local"), GENRULES, "cold build: {cold:?}");
    assert_eq!(count(&warm, "remote cache hit"), GENRULES, "after clean: {warm:?}");
    assert_eq!(count(&warm, "local"), 0, "after clean: {warm:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bazel_remote_cache_and_execution_over_mtls() {
    let Some(bazel) = bazel_or_skip() else { return };
    let pki = Pki::new();
    // The probe runs against a TLS server without mTLS.
    let probe_server = TestServer::start_with(Backend::Memory, pki.server_config(false)).await;
    let (probe_url, ca_path) = (format!("grpcs://localhost:{}", probe_server.addr.port()), pki.path("ca.pem"));
    let probe = tokio::task::spawn_blocking(move || bazel_with_tls(&bazel, &probe_url, &ca_path).map(|s| (bazel, s)));
    let Some((bazel, startup)) = probe.await.unwrap() else { return };
    let server = TestServer::start_with(Backend::Filesystem, pki.server_config(true)).await;
    let url = format!("grpcs://localhost:{}", server.addr.port());
    let flags = [
        format!("--tls_certificate={}", pki.path("ca.pem").display()),
        format!("--tls_client_certificate={}", pki.path("client.pem").display()),
        format!("--tls_client_key={}", pki.path("client.key").display()),
    ];
    let (cached, cold, warm) = tokio::task::spawn_blocking(move || {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let ws = Workspace::new(bazel).with_startup(startup);
        // Remote cache only: the genrules run here and are uploaded.
        let cached = process_summary(&ws.build(&url, &flags));
        assert!(ws.run("clean", &[]).0);
        // Remote execution: every test runs on the server's workers...
        let cold = process_summary(&ws.test_remotely_with(&url, &flags));
        assert!(ws.run("clean", &[]).0);
        // ...and comes back from the action cache after a clean.
        let warm = process_summary(&ws.test_remotely_with(&url, &flags));
        (cached, cold, warm)
    })
    .await
    .unwrap();
    assert_eq!(count(&cached, "local"), GENRULES, "remote cache build: {cached:?}");
    // The genrules are already cached; the sh_tests (and their XML
    // spawns) run remotely.
    assert!(count(&cold, "remote") >= 2, "remote execution: {cold:?}");
    assert!(!external_runners(&cold).iter().any(|r| r.contains("local") || r.contains("sandbox")), "{cold:?}");
    assert_eq!(external_runners(&warm), ["remote cache hit"], "after clean: {warm:?}");
}
