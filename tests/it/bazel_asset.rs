//! Bazel 4.2.3 fetches an `http_archive` through the server
//! (`--experimental_remote_downloader`), from a local HTTP server the test
//! starts; then, with that HTTP server gone and Bazel's caches cleared, a
//! clean build still gets the archive, from the server's record.
//!
//! Skipped with a message when `bazel` is not installed, unless
//! `DISTBUILD_REQUIRE_BAZEL=1`.

use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use remote_apis::asset::fetch_client::FetchClient;
use remote_apis::asset::{FetchBlobRequest, Qualifier};
use remote_apis::reapi::Digest as ProtoDigest;

use crate::asset::{Origin, sri256};
use crate::bazel::bazel_or_skip;
use crate::common::TestServer;

/// A tar.gz holding `ext-1.0/BUILD` and `ext-1.0/data.txt`, made with the
/// system's tar.
fn make_archive(dir: &Path) -> Bytes {
    let src = dir.join("src/ext-1.0");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("BUILD"), "exports_files([\"data.txt\"])\n").unwrap();
    std::fs::write(src.join("data.txt"), "fetched through the remote downloader\n").unwrap();
    let out = dir.join("ext.tar.gz");
    let status = Command::new("tar")
        .args(["-czf", out.to_str().unwrap(), "-C", dir.join("src").to_str().unwrap(), "ext-1.0"])
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::read(out).unwrap().into()
}

fn write_workspace(dir: &Path, url: &str, sha256: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("WORKSPACE"),
        format!(
            "workspace(name = \"asset_fixture\")\n\
             load(\"@bazel_tools//tools/build_defs/repo:http.bzl\", \"http_archive\")\n\
             http_archive(\n    name = \"ext\",\n    urls = [\"{url}\"],\n    sha256 = \"{sha256}\",\n    \
             strip_prefix = \"ext-1.0\",\n)\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("BUILD"),
        "genrule(\n    name = \"copy\",\n    srcs = [\"@ext//:data.txt\"],\n    outs = [\"copy.txt\"],\n    \
         cmd = \"cp $< $@\",\n)\n",
    )
    .unwrap();
}

struct Bazel {
    bazel: PathBuf,
    dir: PathBuf,
    output_root: PathBuf,
}

impl Bazel {
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
}

impl Drop for Bazel {
    fn drop(&mut self) {
        let _ = self.run("shutdown", &[]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bazel_fetches_http_archives_through_the_server() {
    let Some(bazel) = bazel_or_skip() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let archive = make_archive(tmp.path());
    let origin = Origin::start(&[("ext.tar.gz", archive.clone())]).await;
    let url = origin.url("ext.tar.gz");
    let sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&archive));
    let ws = tmp.path().join("ws");
    write_workspace(&ws, &url, &sha256);
    // The origin is on loopback: this server may reach it.
    let server = TestServer::start_with(cargo_distbuild::config::Backend::Filesystem, |f| {
        f.asset.allow_private = true;
    })
    .await;
    let repo_cache = tmp.path().join("repository-cache");
    let b = Bazel { bazel, dir: ws.clone(), output_root: tmp.path().join("root") };
    let flags = vec![
        "--nosandbox_debug".to_string(),
        "--symlink_prefix=/".to_string(),
        "--spawn_strategy=local".to_string(),
        format!("--remote_cache={}", server.url()),
        format!("--experimental_remote_downloader={}", server.url()),
        format!("--repository_cache={}", repo_cache.display()),
        "//:copy".to_string(),
    ];
    let b = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = flags.iter().map(String::as_str).collect();
        let (ok, stderr) = b.run("build", &args);
        assert!(ok, "first build failed:\n{stderr}");
        (b, flags)
    })
    .await
    .unwrap();
    // The archive came through the server: one request, made by it.
    assert_eq!(origin.hits("ext.tar.gz"), 1);
    let agent = origin.agent("ext.tar.gz").unwrap();
    assert!(agent.starts_with("cargo-distbuild/"), "the origin saw {agent:?}, not the server");
    origin.stop();

    // Offline: the origin is gone, Bazel's repository cache and output
    // base are cleared; a clean build gets the archive from the server.
    let (b, flags) = b;
    std::fs::remove_dir_all(&repo_cache).unwrap();
    let b = tokio::task::spawn_blocking(move || {
        let (ok, stderr) = b.run("clean", &["--expunge"]);
        assert!(ok, "clean failed:\n{stderr}");
        let args: Vec<&str> = flags.iter().map(String::as_str).collect();
        let (ok, stderr) = b.run("build", &args);
        assert!(ok, "the offline build failed:\n{stderr}");
        b
    })
    .await
    .unwrap();
    assert_eq!(origin.hits("ext.tar.gz"), 1, "nothing reached the stopped origin");
    let copy = std::fs::read_to_string(
        Command::new(&b.bazel)
            .current_dir(&b.dir)
            .arg("--nohome_rc")
            .arg(format!("--output_user_root={}", b.output_root.display()))
            .args(["info", "bazel-bin"])
            .output()
            .map(|o| PathBuf::from(String::from_utf8(o.stdout).unwrap().trim()).join("copy.txt"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(copy, "fetched through the remote downloader\n");
    // The server answers for the URL from what it recorded.
    let r = FetchClient::new(server.channel.clone())
        .fetch_blob(FetchBlobRequest {
            uris: vec![url],
            qualifiers: vec![Qualifier { name: "checksum.sri".into(), value: sri256(&archive) }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let want = ProtoDigest { hash: sha256, size_bytes: archive.len() as i64 };
    assert_eq!(r.blob_digest, Some(want));
    tokio::task::spawn_blocking(move || drop(b)).await.unwrap();
}
