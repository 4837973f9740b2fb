//! The sandbox's file safety (issue 10): no action can change a blob that
//! another action or the worker's cache sees, outputs adopted into the cache
//! are safe from the action that made them, and outputs over the limits are
//! refused with RESOURCE_EXHAUSTED before anything is uploaded. Every test
//! runs against the server's built-in worker and a `cargo-distbuild worker`
//! process, both with the default (sandboxed) configuration: as root, so
//! actions run as another uid (hard-linked inputs, [`FilePolicy`]'s
//! `action_owner`); and a worker process started as an unprivileged user,
//! whose actions run as that same user in a user namespace (copied inputs).
//!
//! [`FilePolicy`]: cargo_distbuild::worker::isolation::FilePolicy

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use cargo_distbuild::config::Backend;
use remote_apis::reapi::FindMissingBlobsRequest;
use remote_apis::{Digest, DigestFunction};
use tonic::Code;

use crate::common::{TestServer, sha};
use crate::execution::{Act, execute, request, run};

/// Which worker runs the actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The server's built-in worker (as root when the tests are).
    Builtin,
    /// A `cargo-distbuild worker` process, as the tests' user.
    Remote,
    /// A `cargo-distbuild worker` process as `nobody`, when the tests run
    /// as root: a worker that cannot change uids.
    Unprivileged,
}

/// The kinds this machine can run.
fn kinds() -> Vec<Kind> {
    // SAFETY: no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut kinds = vec![Kind::Builtin, Kind::Remote];
    if root {
        kinds.push(Kind::Unprivileged);
    }
    kinds
}

const NOBODY: u32 = 65534;

/// `cargo-distbuild` and the action init beside it, where uid 65534 can
/// run them: the checkout may sit in a directory only root can enter (a
/// `mktemp -d` clone is 0700). Hard links (same inode, its own mode) where
/// the temporary directory shares the filesystem, copies otherwise; made
/// once per test process.
fn binaries_nobody_can_run() -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("distbuild-bin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        for bin in [env!("CARGO_BIN_EXE_cargo-distbuild"), env!("CARGO_BIN_EXE_distbuild-action-init")] {
            let bin = Path::new(bin);
            let to = dir.join(bin.file_name().unwrap());
            let _ = std::fs::remove_file(&to);
            if std::fs::hard_link(bin, &to).is_err() {
                std::fs::copy(bin, &to).unwrap();
            }
        }
        dir
    })
    .join("cargo-distbuild")
}

/// A server with one worker: its own built-in one, or a worker process.
struct Farm {
    server: TestServer,
    work_dir: PathBuf,
    /// The uid the worker runs as (owns its cache).
    uid: u32,
    _worker: Option<(tokio::process::Child, tempfile::TempDir)>,
}

impl Farm {
    async fn start(kind: Kind) -> Farm {
        // SAFETY: no preconditions.
        let uid = unsafe { libc::geteuid() };
        if kind == Kind::Builtin {
            let server = TestServer::start().await;
            let work_dir = server.data_dir.join("worker");
            return Farm { server, work_dir, uid, _worker: None };
        }
        let server = TestServer::start_with(Backend::Filesystem, |c| {
            c.worker.capacity = Some(0);
            c.worker.heartbeat_interval_secs = 1;
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let binary = match kind {
            Kind::Unprivileged => binaries_nobody_can_run(),
            _ => PathBuf::from(env!("CARGO_BIN_EXE_cargo-distbuild")),
        };
        let mut command = tokio::process::Command::new(binary);
        command
            .args(["worker", "--scheduler", &server.url(), "--name", "files", "--slots", "1", "--work-dir"])
            .arg(dir.path())
            .env_remove("DISTBUILD_CONFIG")
            .env("XDG_CONFIG_HOME", "/nonexistent")
            .env("DISTBUILD_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let uid = if kind == Kind::Unprivileged {
            std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
            command.uid(NOBODY).gid(NOBODY);
            NOBODY
        } else {
            uid
        };
        let child = command.spawn().unwrap();
        wait_for_a_worker(&server).await;
        Farm { server, work_dir: dir.path().to_path_buf(), uid, _worker: Some((child, dir)) }
    }

    /// Every file of the worker's blob cache, checked to be the worker's
    /// and read-only, with its content.
    fn cache(&self) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(self.work_dir.join("cache")).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            assert!(meta.is_file(), "{}", path.display());
            assert_eq!(meta.uid(), self.uid, "{} is not the worker's", path.display());
            assert_eq!(meta.mode() & 0o222, 0, "{} is writable", path.display());
            out.push((path.clone(), std::fs::read(&path).unwrap()));
        }
        out
    }

    /// The action directories left (none once every action has ended).
    fn action_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.work_dir.join("exec")).unwrap().map(|e| e.unwrap().path()).collect()
    }
}

async fn wait_for_a_worker(server: &TestServer) {
    use cargo_distbuild::admin::proto::{ListWorkersRequest, admin_client::AdminClient};
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let resp = AdminClient::new(server.channel.clone()).list_workers(ListWorkersRequest {}).await.unwrap();
        if !resp.into_inner().workers.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "the worker never connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `cargo-distbuild exec` in `dir` against `server`.
async fn exec(server: &TestServer, dir: &Path, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_cargo-distbuild"))
        .arg("exec")
        .arg("--server")
        .arg(server.url())
        .args(args)
        .current_dir(dir)
        .env_remove("DISTBUILD_CONFIG")
        .env_remove("DISTBUILD_SERVER")
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .env("XDG_STATE_HOME", dir.join(".state"))
        .output()
        .await
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn missing(server: &TestServer, digests: &[Digest]) -> Vec<Digest> {
    let req = FindMissingBlobsRequest {
        blob_digests: digests.iter().map(Digest::to_proto).collect(),
        digest_function: DigestFunction::Sha256.to_proto() as i32,
        ..Default::default()
    };
    let resp = server.cas().find_missing_blobs(req).await.unwrap().into_inner();
    resp.missing_blob_digests.iter().map(|d| Digest::from_proto(DigestFunction::Sha256, d).unwrap()).collect()
}

/// The repro from issue 10, and its variant that replaces the file: a
/// second, different action with the same input prints the original bytes.
#[tokio::test(flavor = "multi_thread")]
async fn an_action_cannot_change_an_input_another_action_sees() {
    for kind in kinds() {
        let farm = Farm::start(kind).await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("in.txt"), "original\n").unwrap();
        let attacks = [
            "chmod u+w in.txt; echo CORRUPTED > in.txt",
            "rm in.txt; echo CORRUPTED > in.txt; cat in.txt",
            "chmod -R u+w . ; : > in.txt; ln -f in.txt x; echo CORRUPTED >> x",
        ];
        for (n, attack) in attacks.into_iter().enumerate() {
            let out =
                exec(&farm.server, dir.path(), &["--input", "in.txt", "--no-cache", "--", "sh", "-c", attack]).await;
            if n == 1 {
                // Allowed: the directory is the action's; the name is now its own file.
                assert_eq!(text(&out.stdout), "CORRUPTED\n", "{kind:?}: {}", text(&out.stderr));
            }
            let script = format!("cat in.txt; echo {n}");
            let out =
                exec(&farm.server, dir.path(), &["--input", "in.txt", "--no-cache", "--", "sh", "-c", &script]).await;
            assert_eq!(
                text(&out.stdout),
                format!("original\n{n}\n"),
                "{kind:?}, after {attack:?}: {}",
                text(&out.stderr)
            );
        }
        for (path, data) in farm.cache() {
            assert!(!text(&data).contains("CORRUPTED"), "{}", path.display());
        }
        assert_eq!(std::fs::read_to_string(dir.path().join("in.txt")).unwrap(), "original\n");
        farm.server.stop().await.unwrap();
    }
}

/// An output is adopted into the worker's cache; a child the action left
/// behind that rewrites it afterwards changes neither the CAS nor what the
/// next action on the worker reads.
#[tokio::test(flavor = "multi_thread")]
async fn an_adopted_output_is_safe_from_the_action_that_made_it() {
    for kind in kinds() {
        let farm = Farm::start(kind).await;
        let act = Act {
            output_paths: vec!["out.txt"],
            ..Act::sh("echo good > out.txt; (sleep 1; chmod u+w out.txt; echo BAD > out.txt) >/dev/null 2>&1 &")
        };
        let response = execute(&farm.server, &act).await;
        assert_eq!(response.status.as_ref().map_or(0, |s| s.code), 0, "{kind:?}: {:?}", response.status);
        let result = response.result.unwrap();
        let good = sha(b"good\n");
        assert_eq!(result.output_files[0].digest, Some(good.to_proto()), "{kind:?}");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(missing(&farm.server, &[good]).await.is_empty());
        let stored = farm.server.client().read_blob(good).await.unwrap();
        assert_eq!(stored.as_ref(), b"good\n");
        // The next action gets the adopted file from the worker's cache.
        let next = Act { files: vec![("in.txt", b"good\n", false)], ..Act::sh("cat in.txt") };
        let response = execute(&farm.server, &next).await;
        let stdout = response.result.unwrap().stdout_digest.unwrap();
        let stdout = Digest::from_proto(DigestFunction::Sha256, &stdout).unwrap();
        assert_eq!(stdout, good, "{kind:?}: the next action did not read the output's bytes");
        for (path, data) in farm.cache() {
            assert_ne!(data, b"BAD\n", "{}", path.display());
        }
        farm.server.stop().await.unwrap();
    }
}

/// An output that is a hard link to an input (where the kernel lets the
/// action make one; a copy otherwise) is collected with the input's bytes,
/// and the cached input stays as it was.
#[tokio::test(flavor = "multi_thread")]
async fn an_output_linked_to_an_input_leaves_the_input_safe() {
    for kind in kinds() {
        let farm = Farm::start(kind).await;
        let input: &'static [u8] = b"linked input\n";
        let act = Act {
            files: vec![("in.txt", input, false)],
            output_paths: vec!["out.txt"],
            ..Act::sh("ln in.txt out.txt 2>/dev/null || cp in.txt out.txt; chmod u+w out.txt 2>/dev/null; true")
        };
        let response = execute(&farm.server, &act).await;
        let result = response.result.unwrap();
        assert_eq!(result.output_files[0].digest, Some(sha(input).to_proto()), "{kind:?}");
        // Writing through the output's name, then reading the input.
        let attack = Act {
            files: vec![("in.txt", input, false)],
            salt: b"attack",
            ..Act::sh("ln in.txt out.txt 2>/dev/null; chmod u+w out.txt in.txt; echo CORRUPTED > out.txt; true")
        };
        execute(&farm.server, &attack).await;
        let read = Act { files: vec![("in.txt", input, false)], salt: b"read", ..Act::sh("cat in.txt") };
        let stdout = execute(&farm.server, &read).await.result.unwrap().stdout_digest.unwrap();
        assert_eq!(Digest::from_proto(DigestFunction::Sha256, &stdout).unwrap(), sha(input), "{kind:?}");
        for (path, data) in farm.cache() {
            assert!(!text(&data).contains("CORRUPTED"), "{}", path.display());
        }
        farm.server.stop().await.unwrap();
    }
}

/// Over an output limit (set lower by the action's platform): the
/// response's status is RESOURCE_EXHAUSTED naming the limit and what was
/// counted, no result, nothing uploaded, and the action's directory is gone.
#[tokio::test(flavor = "multi_thread")]
async fn outputs_over_the_limits_are_refused_and_not_uploaded() {
    for kind in kinds() {
        let farm = Farm::start(kind).await;
        let big: Vec<u8> = vec![b'z'; 5000];
        let act = Act {
            output_paths: vec!["big.bin"],
            platform: vec![("output_bytes_limit", "4000")],
            ..Act::sh("head -c 5000 /dev/zero | tr '\\0' z > big.bin; echo over-the-byte-limit")
        };
        let response = execute(&farm.server, &act).await;
        let status = response.status.expect("a status");
        assert_eq!(status.code, Code::ResourceExhausted as i32, "{kind:?}: {status:?}");
        assert!(status.message.contains("limit of 4000 bytes"), "{}", status.message);
        assert!(status.message.contains("at least 50"), "{}", status.message);
        assert!(status.message.contains("output_bytes_limit"), "{}", status.message);
        assert!(response.result.is_none());
        let stdout = sha(b"over-the-byte-limit\n");
        assert_eq!(missing(&farm.server, &[sha(&big), stdout]).await.len(), 2, "{kind:?}: something was uploaded");

        let act = Act {
            output_paths: vec!["d"],
            platform: vec![("output_files_limit", "3")],
            ..Act::sh("mkdir d; for i in 1 2 3 4 5; do echo over-the-file-limit-$i > d/$i; done")
        };
        let response = execute(&farm.server, &act).await;
        let status = response.status.expect("a status");
        assert_eq!(status.code, Code::ResourceExhausted as i32, "{kind:?}: {status:?}");
        assert!(
            status.message.contains("at least 4 files") && status.message.contains("limit of 3"),
            "{}",
            status.message
        );
        assert!(status.message.contains("output_files_limit"), "{}", status.message);
        let files: Vec<Digest> = (1..=5).map(|i| sha(format!("over-the-file-limit-{i}\n").as_bytes())).collect();
        assert_eq!(missing(&farm.server, &files).await.len(), 5, "{kind:?}: something was uploaded");

        // A value that is not a size is refused when the action is submitted.
        let act = Act { platform: vec![("output_bytes_limit", "lots")], ..Act::sh("echo ran") };
        let status = run(&farm.server, request(act.upload(&farm.server).await)).await.expect_err("accepted");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("output_bytes_limit"), "{}", status.message());

        // Under the limits, the same kind of action succeeds.
        let act = Act {
            output_paths: vec!["big.bin"],
            platform: vec![("output_bytes_limit", "10KiB"), ("output_files_limit", "1")],
            ..Act::sh("head -c 5000 /dev/zero | tr '\\0' z > big.bin")
        };
        let response = execute(&farm.server, &act).await;
        assert_eq!(response.status.as_ref().map_or(0, |s| s.code), 0, "{:?}", response.status);
        assert!(missing(&farm.server, &[sha(&big)]).await.is_empty());

        let deadline = Instant::now() + Duration::from_secs(5);
        while !farm.action_dirs().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(farm.action_dirs(), Vec::<PathBuf>::new(), "{kind:?}");
        farm.server.stop().await.unwrap();
    }
}

/// `[worker] max_output_bytes` bounds every action of a built-in worker.
#[tokio::test(flavor = "multi_thread")]
async fn the_workers_maximum_applies_without_a_platform_property() {
    let server = TestServer::start_with(Backend::Filesystem, |c| {
        c.worker.max_output_bytes = bytesize::ByteSize::b(100);
    })
    .await;
    let status = execute(&server, &Act::sh("head -c 200 /dev/zero")).await.status.expect("a status");
    assert_eq!(status.code, Code::ResourceExhausted as i32, "{status:?}");
    assert!(status.message.contains("limit of 100 bytes"), "{}", status.message);
    // An action cannot raise it.
    let act = Act { platform: vec![("output_bytes_limit", "1GiB")], ..Act::sh("head -c 200 /dev/zero") };
    let status = execute(&server, &act).await.status.expect("a status");
    assert_eq!(status.code, Code::ResourceExhausted as i32, "{status:?}");
    server.stop().await.unwrap();
}
