//! The container runner: actions whose platform names `container-image` run
//! in a container of that image on a worker with `[worker] docker = true`,
//! through the real Docker Engine on this machine.
//!
//! The image is made here from Debian's busybox-static (no registry is
//! needed): `docker import` of /bin/busybox, its applets and a marker file
//! only the image has. Skipped with a message when no engine answers or
//! busybox-static is missing, unless `DISTBUILD_REQUIRE_DOCKER=1` (CI sets
//! it), which makes that a failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cargo_distbuild::admin::proto::{ListWorkersRequest, admin_client::AdminClient};
use cargo_distbuild::config::{Backend, FileConfig};
use remote_apis::longrunning::CancelOperationRequest;
use remote_apis::longrunning::operations_client::OperationsClient;
use remote_apis::reapi::{ExecuteResponse, execution_client::ExecutionClient};
use remote_apis::{Digest, DigestFunction};
use tonic::Code;

use crate::common::TestServer;
use crate::execution::{Act, execute, request, response};

/// What only the test image has (and what its marker file holds).
const MARKER_PATH: &str = "/etc/distbuild-image-marker";
const MARKER: &str = "inside the distbuild test image";

/// Whether the Docker Engine answers; panics instead of skipping under
/// `DISTBUILD_REQUIRE_DOCKER=1`.
pub(crate) fn engine_or_skip() -> bool {
    let ok = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip("no Docker Engine answers (docker version failed)");
    }
    ok
}

fn skip(why: &str) {
    if std::env::var("DISTBUILD_REQUIRE_DOCKER").as_deref() == Ok("1") {
        panic!("{why}, and DISTBUILD_REQUIRE_DOCKER=1");
    }
    eprintln!("skipping the container test: {why}");
}

/// `docker://distbuild-test-busybox:<tag>`, imported once per content.
pub(crate) fn test_image() -> Option<&'static str> {
    static IMAGE: std::sync::Mutex<Option<&'static str>> = std::sync::Mutex::new(None);
    let mut made = IMAGE.lock().unwrap();
    if let Some(i) = *made {
        return Some(i);
    }
    if !engine_or_skip() {
        return None;
    }
    let busybox = Path::new("/bin/busybox");
    let is_static = Command::new("file")
        .arg("-L")
        .arg(busybox)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("statically linked"))
        .unwrap_or(false);
    if !busybox.is_file() || !is_static {
        skip("/bin/busybox is missing or not static (apt-get install busybox-static)");
        return None;
    }
    let bytes = std::fs::read(busybox).unwrap();
    let tag = &crate::common::sha(&bytes).hash_hex()[..12];
    // The image sets an ENV, a WORKDIR, a USER and an ENTRYPOINT of its
    // own, none of which an action may inherit.
    let name = format!("distbuild-test-busybox:{tag}-config");
    let exists = Command::new("docker").args(["image", "inspect", &name]).output().unwrap().status.success();
    if !exists {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        for d in ["bin", "etc", "tmp", "usr/bin"] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        std::fs::copy(busybox, r.join("bin/busybox")).unwrap();
        let list = Command::new(busybox).arg("--list").output().unwrap();
        for applet in String::from_utf8(list.stdout).unwrap().lines().filter(|a| *a != "busybox") {
            std::os::unix::fs::symlink("busybox", r.join("bin").join(applet)).unwrap();
        }
        std::fs::write(r.join(MARKER_PATH.trim_start_matches('/')), format!("{MARKER}\n")).unwrap();
        std::fs::write(
            r.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        )
        .unwrap();
        std::fs::write(r.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
        let mut tar = Command::new("tar").arg("-C").arg(r).args(["-c", "."]).stdout(Stdio::piped()).spawn().unwrap();
        let out = Command::new("docker")
            .args(["import", "--change", "ENV IMAGE_ENV=from-the-image", "--change", "WORKDIR /etc"])
            .args(["--change", "USER root", "--change", r#"ENTRYPOINT ["/bin/false"]"#, "-", &name])
            .stdin(tar.stdout.take().unwrap())
            .output()
            .unwrap();
        assert!(tar.wait().unwrap().success(), "tar of the image's files failed");
        assert!(out.status.success(), "docker import: {}", String::from_utf8_lossy(&out.stderr));
    }
    let image = leak(format!("docker://{name}"));
    *made = Some(image);
    Some(image)
}

/// Container IDs (running or not) with the given work directory's label.
fn containers_of(work_dir: &Path) -> Vec<String> {
    let dir = std::fs::canonicalize(work_dir).unwrap_or_else(|_| work_dir.to_path_buf());
    let out = Command::new("docker")
        .args(["ps", "-a", "-q", "--filter"])
        .arg(format!("label=dev.distbuild.work-dir={}", dir.display()))
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().split_whitespace().map(str::to_string).collect()
}

/// A server whose built-in worker runs containers.
async fn farm(tweak: impl FnOnce(&mut FileConfig)) -> TestServer {
    TestServer::start_with(Backend::Filesystem, |c| {
        c.worker.capacity = Some(2);
        c.worker.docker = true;
        tweak(c);
    })
    .await
}

fn image_act(image: &'static str, script: &str) -> Act {
    Act { platform: vec![("container-image", image)], do_not_cache: true, ..Act::sh(script) }
}

/// The image as a `'static` str for [`Act::platform`].
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

async fn text(server: &TestServer, d: Option<&remote_apis::reapi::Digest>) -> String {
    let d = Digest::from_proto(DigestFunction::Sha256, d.unwrap()).unwrap();
    if d.size == 0 {
        return String::new();
    }
    String::from_utf8_lossy(&server.client().read_blob(d).await.unwrap()).into_owned()
}

async fn outputs(server: &TestServer, r: &ExecuteResponse) -> (i32, String, String) {
    let result = r.result.as_ref().unwrap_or_else(|| panic!("no result: {:?}", r.status));
    (
        result.exit_code,
        text(server, result.stdout_digest.as_ref()).await,
        text(server, result.stderr_digest.as_ref()).await,
    )
}

/// The action sees the image's files, not the host's; it runs as the
/// sandbox's user, in its working directory, with its inputs; and its
/// environment is exactly the Command's.
#[tokio::test(flavor = "multi_thread")]
async fn container_runs_the_action_in_its_image() {
    let Some(image) = test_image() else { return };
    let server = farm(|_| {}).await;
    let act = Act {
        files: vec![("sub/input.txt", b"from the input root\n", false)],
        working_directory: "sub",
        ..image_act(
            image,
            &format!(
                "cat {MARKER_PATH} input.txt; id -u; pwd; \
                 for f in /usr/bin/env /etc/debian_version {}; do test -e $f && echo host-visible $f; done; \
                 echo done",
                env!("CARGO_MANIFEST_DIR")
            ),
        )
    };
    let r = execute(&server, &act).await;
    let (code, out, err) = outputs(&server, &r).await;
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], MARKER, "{out}");
    assert_eq!(lines[1], "from the input root");
    assert_eq!(lines[2], "65534", "the command runs as the sandbox's run_as (nobody)");
    assert!(lines[3].ends_with("/root/sub"), "working directory: {}", lines[3]);
    assert_eq!(lines[4], "done", "a host file is visible in the container: {out}");

    // Exactly the Command's environment: no PATH, HOSTNAME or image ENV
    // (IMAGE_ENV) added. `env` itself, not a shell, which adds PWD and SHLVL.
    let mut env_act = image_act(image, "");
    env_act.env = vec![("FOO", "bar baz"), ("EMPTY", ""), ("WITH_EQUALS", "a=b")];
    let mut command = env_act.command();
    command.arguments = vec!["env".into()];
    let digest = env_act.upload_with(&server, &command).await;
    let ops = crate::execution::run(&server, request(digest)).await.unwrap();
    let (code, out, err) = outputs(&server, &response(ops.last().unwrap())).await;
    assert_eq!(code, 0, "{err}");
    let mut got: Vec<&str> = out.lines().collect();
    got.sort();
    assert_eq!(got, ["EMPTY=", "FOO=bar baz", "PATH=/usr/bin:/bin", "WITH_EQUALS=a=b"]);
}

/// Output files, directories and symlinks come back as from the host
/// runners; stdout and stderr too, and a non-zero exit code.
#[tokio::test(flavor = "multi_thread")]
async fn container_outputs_of_every_kind() {
    let Some(image) = test_image() else { return };
    let server = farm(|_| {}).await;
    let act = Act {
        output_paths: vec!["out/file.txt", "out/tree", "out/link"],
        ..image_act(
            image,
            "mkdir -p out/tree/deep && echo file > out/file.txt && echo leaf > out/tree/deep/leaf.txt \
             && chmod +x out/tree/deep/leaf.txt && ln -s file.txt out/link && echo to-stdout \
             && echo to-stderr >&2 && exit 3",
        )
    };
    let r = execute(&server, &act).await;
    let (code, out, err) = outputs(&server, &r).await;
    assert_eq!((code, out.as_str(), err.as_str()), (3, "to-stdout\n", "to-stderr\n"));
    let result = r.result.unwrap();
    let file = result.output_files.iter().find(|f| f.path == "out/file.txt").expect("output file");
    assert_eq!(text(&server, file.digest.as_ref()).await, "file\n");
    assert!(result.output_directories.iter().any(|d| d.path == "out/tree"), "{:?}", result.output_directories);
    let link = result.output_symlinks.iter().find(|s| s.path == "out/link");
    assert_eq!(link.expect("output symlink").target, "file.txt");
}

/// A timed-out and a cancelled action leave no container behind.
#[tokio::test(flavor = "multi_thread")]
async fn container_timeout_and_cancel_leave_no_container() {
    let Some(image) = test_image() else { return };
    let server = farm(|_| {}).await;
    let work_dir = server.data_dir.join("worker");

    let slow = Act { timeout: Some(Duration::from_secs(2)), ..image_act(image, "sleep 60") };
    let started = Instant::now();
    let r = execute(&server, &slow).await;
    let status = r.status.clone().unwrap_or_default();
    assert_eq!(status.code, Code::DeadlineExceeded as i32, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(containers_of(&work_dir), Vec::<String>::new(), "a timed-out action's container is left");

    let cancelled = image_act(image, "sleep 61");
    let digest = cancelled.upload(&server).await;
    let mut stream = ExecutionClient::new(server.channel.clone()).execute(request(digest)).await.unwrap().into_inner();
    let name = stream.message().await.unwrap().unwrap().name;
    let deadline = Instant::now() + Duration::from_secs(30);
    while containers_of(&work_dir).is_empty() {
        assert!(Instant::now() < deadline, "the action's container never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    OperationsClient::new(server.channel.clone()).cancel_operation(CancelOperationRequest { name }).await.unwrap();
    while let Some(op) = stream.message().await.unwrap() {
        if op.done {
            break;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !containers_of(&work_dir).is_empty() {
        assert!(Instant::now() < deadline, "a cancelled action's container is left: {:?}", containers_of(&work_dir));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// No network by default: only loopback.
#[tokio::test(flavor = "multi_thread")]
async fn container_has_no_network_by_default() {
    let Some(image) = test_image() else { return };
    let server = farm(|_| {}).await;
    let r = execute(&server, &image_act(image, "ls /sys/class/net")).await;
    let (code, out, err) = outputs(&server, &r).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["lo"]);
}

/// The sandbox's limits hold in containers too: processes, memory, output.
#[tokio::test(flavor = "multi_thread")]
async fn container_limits_hold() {
    let Some(image) = test_image() else { return };
    let server = farm(|_| {}).await;

    let mut forks = image_act(image, "n=0; for i in 1 2 3 4 5 6 7 8 9 10; do sleep 3 & done; wait; echo waited");
    forks.platform.push(("process_limit", "4"));
    let (code, _, err) = outputs(&server, &execute(&server, &forks).await).await;
    assert!(err.contains("fork") || err.contains("Resource temporarily unavailable"), "code {code}: {err}");

    let mut memory = image_act(image, "dd if=/dev/zero of=/dev/null bs=200M count=1 && echo survived");
    memory.platform.push(("memory_limit", "32MiB"));
    let (code, out, err) = outputs(&server, &execute(&server, &memory).await).await;
    assert_ne!(code, 0, "200 MiB under a 32 MiB limit: {out}{err}");
    assert!(!out.contains("survived"));

    let mut output = image_act(image, "head -c 100000 /dev/zero > big.bin");
    output.output_paths = vec!["big.bin"];
    output.platform.push(("output_bytes_limit", "10KiB"));
    let r = execute(&server, &output).await;
    let status = r.status.unwrap_or_default();
    assert_eq!(status.code, Code::ResourceExhausted as i32, "{status:?}");
}

/// An image the engine does not have and cannot pull fails the action
/// with FAILED_PRECONDITION naming the image; nothing is left running.
#[tokio::test(flavor = "multi_thread")]
async fn container_unknown_image_fails_with_a_clear_status() {
    if test_image().is_none() {
        return;
    }
    let server = farm(|_| {}).await;
    // Nothing listens on port 9 of loopback: the pull fails at once.
    let missing = "docker://127.0.0.1:9/distbuild/no-such-image:1";
    let r = execute(&server, &image_act(missing, "true")).await;
    let status = r.status.unwrap_or_default();
    assert_eq!(status.code, Code::FailedPrecondition as i32, "{status:?}");
    assert!(status.message.contains("127.0.0.1:9/distbuild/no-such-image:1"), "{}", status.message);
    assert!(status.message.contains("pull"), "{}", status.message);
    assert_eq!(containers_of(&server.data_dir.join("worker")), Vec::<String>::new());

    // A malformed reference is refused at Execute.
    let digest = image_act("docker://Not Valid", "true").upload(&server).await;
    let e = crate::execution::run(&server, request(digest)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("container-image"), "{}", e.message());
}

/// Without a worker that runs containers, an action naming an image is
/// FAILED_PRECONDITION at once, as for any property no worker offers; the
/// same server runs it once such a worker is there.
#[tokio::test(flavor = "multi_thread")]
async fn container_image_needs_a_worker_that_runs_containers() {
    let server = TestServer::start_with(Backend::Filesystem, |c| c.worker.capacity = Some(1)).await;
    let digest = image_act("docker://busybox", "true").upload(&server).await;
    let e = crate::execution::run(&server, request(digest)).await;
    let status = match e {
        Err(e) => (e.code(), e.message().to_string()),
        Ok(ops) => {
            let s = response(ops.last().unwrap()).status.unwrap_or_default();
            (Code::from(s.code), s.message)
        }
    };
    assert_eq!(status.0, Code::FailedPrecondition, "{status:?}");
    assert!(status.1.contains("container-image"), "{}", status.1);
}

/// Actions without `container-image` still run in the host sandbox on a
/// worker that runs containers, and `workers list` says both.
#[tokio::test(flavor = "multi_thread")]
async fn container_worker_runs_other_actions_in_the_host_sandbox() {
    if test_image().is_none() {
        return;
    }
    let server = farm(|_| {}).await;
    let r = execute(&server, &Act { do_not_cache: true, ..Act::sh("test -e /usr/bin/env && id -u") }).await;
    let (code, out, err) = outputs(&server, &r).await;
    assert_eq!((code, out.trim()), (0, "65534"), "{err}");
    let workers = AdminClient::new(server.channel.clone()).list_workers(ListWorkersRequest {}).await.unwrap();
    let w = &workers.into_inner().workers[0];
    assert!(w.sandbox.starts_with("containers(docker "), "{}", w.sandbox);
    assert!(w.sandbox.contains("else namespaces("), "{}", w.sandbox);
    assert!(w.properties.iter().any(|p| p.name == "container-image" && p.value == "*"), "{:?}", w.properties);
}

/// A remote worker process started with `--docker` runs container actions,
/// and a worker restarted on the same work directory removes the
/// containers its predecessor left.
#[tokio::test(flavor = "multi_thread")]
async fn container_remote_worker_and_leftovers() {
    let Some(image) = test_image() else { return };
    let server = TestServer::start_with(Backend::Filesystem, |c| c.worker.capacity = Some(0)).await;
    let dir = tempfile::tempdir().unwrap();
    let work_dir = dir.path().join("work");
    let start = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_cargo-distbuild"))
            .args(["worker", "--docker", "--scheduler", &server.url(), "--slots", "1", "--work-dir"])
            .arg(&work_dir)
            .env("DISTBUILD_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let mut worker = start();
    let digest = image_act(image, "sleep 120").upload(&server).await;
    let mut stream = ExecutionClient::new(server.channel.clone()).execute(request(digest)).await.unwrap().into_inner();
    let name = stream.message().await.unwrap().unwrap().name;
    let deadline = Instant::now() + Duration::from_secs(60);
    while containers_of(&work_dir).is_empty() {
        assert!(Instant::now() < deadline, "the remote worker never started the container");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = containers_of(&work_dir);
    // SIGKILL: the worker cannot clean up; its container runs on.
    worker.start_kill().unwrap();
    worker.wait().await.unwrap();
    assert_eq!(containers_of(&work_dir), left);
    OperationsClient::new(server.channel.clone()).cancel_operation(CancelOperationRequest { name }).await.unwrap();
    drop(stream);
    let mut again = start();
    let deadline = Instant::now() + Duration::from_secs(30);
    while containers_of(&work_dir).iter().any(|c| left.contains(c)) {
        assert!(Instant::now() < deadline, "the restarted worker left its predecessor's container");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let quick = image_act(image, &format!("cat {MARKER_PATH}"));
    let (code, out, err) = outputs(&server, &execute(&server, &quick).await).await;
    assert_eq!((code, out.trim()), (0, MARKER), "{err}");
    again.start_kill().unwrap();
    let _ = again.wait().await;
    assert_eq!(containers_of(&work_dir), Vec::<String>::new());
}

/// An image the engine lacks is pulled on first use, from a real registry
/// (Debian's docker-registry on a loopback port).
#[tokio::test(flavor = "multi_thread")]
async fn container_image_is_pulled_on_first_use() {
    let Some(image) = test_image() else { return };
    let Some(registry) = Registry::start(None) else { return };
    let local = image.trim_start_matches("docker://");
    let remote = format!("127.0.0.1:{}/distbuild/busybox:pulled", registry.port);
    let docker = |args: &[&str]| {
        let out = Command::new("docker").args(args).output().unwrap();
        assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    docker(&["tag", local, &remote]);
    docker(&["push", &remote]);
    docker(&["rmi", &remote]);
    let server = farm(|_| {}).await;
    let act = image_act(leak(format!("docker://{remote}")), &format!("cat {MARKER_PATH}"));
    let r = execute(&server, &act).await;
    let (code, out, err) = outputs(&server, &r).await;
    assert_eq!((code, out.trim()), (0, MARKER), "{err} {:?}", r.status);
    let _ = Command::new("docker").args(["rmi", &remote]).output();
}

/// A private registry: the worker pulls with the credentials of its
/// `[worker] docker_config` (a Docker CLI config.json), and without them
/// the action fails with FAILED_PRECONDITION naming the image. The
/// password never appears in the status.
#[tokio::test(flavor = "multi_thread")]
async fn container_private_images_are_pulled_with_the_workers_credentials() {
    use base64::Engine;
    let Some(image) = test_image() else { return };
    let Some(registry) = Registry::start(Some(HTPASSWD)) else { return };
    let dir = tempfile::tempdir().unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("ci:{REGISTRY_PASSWORD}"));
    let host = format!("127.0.0.1:{}", registry.port);
    std::fs::write(dir.path().join("config.json"), format!(r#"{{"auths": {{"{host}": {{"auth": "{auth}"}}}}}}"#))
        .unwrap();
    let remote = format!("{host}/distbuild/private:1");
    let docker = |args: &[&str]| {
        let out = Command::new("docker").arg("--config").arg(dir.path()).args(args).output().unwrap();
        assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    docker(&["tag", image.trim_start_matches("docker://"), &remote]);
    docker(&["push", &remote]);
    docker(&["rmi", &remote]);
    let act = image_act(leak(format!("docker://{remote}")), &format!("cat {MARKER_PATH}"));

    // No credentials (an empty config directory): refused by the registry.
    let empty = tempfile::tempdir().unwrap();
    let config = empty.path().join("config.json");
    let anonymous = farm(|c| c.worker.docker_config = Some(config)).await;
    let status = execute(&anonymous, &act).await.status.unwrap_or_default();
    assert_eq!(status.code, Code::FailedPrecondition as i32, "{status:?}");
    assert!(status.message.contains(&remote), "{}", status.message);

    let config = dir.path().join("config.json");
    let server = farm(|c| c.worker.docker_config = Some(config)).await;
    let r = execute(&server, &act).await;
    let (code, out, err) = outputs(&server, &r).await;
    assert_eq!((code, out.trim()), (0, MARKER), "{err} {:?}", r.status);
    let _ = Command::new("docker").args(["rmi", &remote]).output();
}

/// Debian's docker-registry serving on a free loopback port, stopped on drop.
struct Registry {
    port: u16,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

/// The htpasswd line of the authenticated registry: user `ci`, password
/// [`REGISTRY_PASSWORD`] (bcrypt, made once with Python's bcrypt).
const HTPASSWD: &str = "ci:$2b$05$G7DkVA3ifNb8zlnMPxZLVOmUiAsVoePJ9walk8e0G4mC.47tGkMQ.";
const REGISTRY_PASSWORD: &str = "distbuild-test-password";

impl Registry {
    /// `htpasswd`: a registry that wants basic-auth credentials.
    fn start(htpasswd: Option<&str>) -> Option<Registry> {
        let binary = PathBuf::from("/usr/bin/docker-registry");
        if !binary.is_file() {
            skip("/usr/bin/docker-registry is missing (apt-get install docker-registry)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let config = dir.path().join("config.yml");
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if let Some(line) = htpasswd {
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, format!("{line}\n")).unwrap();
            yaml.push_str(&format!("auth:\n  htpasswd:\n    realm: distbuild-test\n    path: {}\n", file.display()));
        }
        std::fs::write(&config, yaml).unwrap();
        let child =
            Command::new(binary).arg("serve").arg(&config).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Registry { port, child, _dir: dir })
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Bazel 4.2.3 with `--remote_executor` and
/// `--remote_default_exec_properties=container-image=docker://...` builds
/// the genrule workspace inside the image: `//container:marker` reads a file
/// only the image has, and the other genrules run with the image's tools
/// (busybox's sh, awk, sort, tr) through `--shell_executable=/bin/sh`.
#[tokio::test(flavor = "multi_thread")]
async fn container_bazel_builds_in_the_image() {
    let Some(bazel) = crate::bazel::bazel_or_skip() else { return };
    let Some(image) = test_image() else { return };
    let server = farm(|_| {}).await;
    let url = server.url();
    let work_dir = server.data_dir.join("worker");
    let summary = tokio::task::spawn_blocking(move || {
        let ws = crate::bazel::Workspace::new(bazel);
        let remote = format!("--remote_executor={url}");
        let properties = format!("--remote_default_exec_properties=container-image={image}");
        let (ok, stderr) = ws.run(
            "build",
            &[
                "--nosandbox_debug",
                "--symlink_prefix=/",
                "--incompatible_strict_action_env",
                "--remote_timeout=60",
                "--spawn_strategy=remote",
                "--shell_executable=/bin/sh",
                &remote,
                &properties,
                "//gen/...",
                "//container:marker",
            ],
        );
        assert!(ok, "bazel build failed:\n{stderr}");
        assert_eq!(ws.output("container/marker.txt"), format!("{MARKER}\n"));
        assert_eq!(
            ws.output("gen/text/greeting_full.txt"),
            "hello from the distbuild bazel fixture\nPEAR\nAPPLE\nFIG\nBANANA\nCHERRY\n"
        );
        crate::bazel::process_summary(&stderr)
    })
    .await
    .unwrap();
    assert_eq!(crate::bazel::external_runners(&summary), ["remote"], "{summary:?}");
    assert_eq!(crate::bazel::count(&summary, "remote"), crate::bazel::GENRULES + 1, "{summary:?}");
    assert_eq!(containers_of(&work_dir), Vec::<String>::new());
}
