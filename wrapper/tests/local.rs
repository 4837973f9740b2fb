//! The wrapper binary without a server: what cargo asks that is not a
//! compile passes through untouched, and a compile with the server down
//! succeeds with one warning, however many crates there are.

use std::path::Path;
use std::process::{Command, Output};

use distbuild_rustc::settings::read_records;

fn wrapper(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_distbuild-rustc"));
    cmd.current_dir(dir)
        .env("DISTBUILD_SERVER", "127.0.0.1:1")
        .env("DISTBUILD_CACHE_DIR", dir.join("cache"))
        .env("DISTBUILD_STATS", dir.join("stats.jsonl"))
        .env_remove("DISTBUILD_MODE");
    cmd
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn usage_without_arguments() {
    let out = Command::new(env!("CARGO_BIN_EXE_distbuild-rustc")).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("usage: distbuild-rustc <rustc>"), "{}", text(&out.stderr));
}

#[test]
fn queries_pass_through_and_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let direct = Command::new("rustc").arg("-vV").output().unwrap();
    let wrapped = wrapper(dir.path()).args(["rustc", "-vV"]).output().unwrap();
    assert!(wrapped.status.success());
    assert_eq!(wrapped.stdout, direct.stdout);
    assert!(wrapped.stderr.is_empty(), "{}", text(&wrapped.stderr));
    let records = read_records(&dir.path().join("stats.jsonl"), 0);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].outcome, "local");
    assert_eq!(records[0].reason.as_deref(), Some("version query"));
}

fn compile(dir: &Path, name: &str) -> Output {
    wrapper(dir)
        .args(["rustc", "--crate-name", name, "--crate-type", "lib", "--emit=dep-info,metadata,link"])
        .args(["--out-dir", "out", &format!("{name}.rs")])
        .output()
        .unwrap()
}

#[test]
fn a_down_server_costs_one_warning_and_no_failure() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["a", "b", "c"] {
        std::fs::write(dir.path().join(format!("{name}.rs")), "pub fn f() -> u32 { 7 }\n").unwrap();
    }
    let outs: Vec<Output> = ["a", "b", "c"].iter().map(|n| compile(dir.path(), n)).collect();
    let mut warnings = 0;
    for (out, name) in outs.iter().zip(["a", "b", "c"]) {
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(dir.path().join(format!("out/lib{name}.rlib")).is_file());
        assert!(dir.path().join(format!("out/{name}.d")).is_file());
        warnings += text(&out.stderr).matches("warning: distbuild:").count();
    }
    assert_eq!(warnings, 1, "one warning for the whole build");
    let records = read_records(&dir.path().join("stats.jsonl"), 0);
    assert_eq!(records.len(), 3);
    assert!(records.iter().all(|r| r.outcome == "local" && r.reason.as_deref() == Some("server unavailable")));
}

#[test]
fn a_compile_error_is_reported_as_rustc_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.rs"), "pub fn f() -> u32 { \"no\" }\n").unwrap();
    let wrapped = compile(dir.path(), "bad");
    let direct = Command::new("rustc")
        .current_dir(dir.path())
        .args(["--crate-name", "bad", "--crate-type", "lib", "--out-dir", "direct", "bad.rs"])
        .output()
        .unwrap();
    assert_eq!(wrapped.status.code(), direct.status.code());
    assert_ne!(wrapped.status.code(), Some(0));
    assert!(text(&wrapped.stderr).contains("error[E0308]: mismatched types"), "{}", text(&wrapped.stderr));
}
