//! `chroot=input-root` on workers with `[worker] input_root_as_root`: the
//! input root is the action's `/`, inside the sandbox's namespaces. The
//! input roots hold a static busybox (Debian's busybox-static) and nothing
//! else of the host; without one the tests skip, unless
//! `DISTBUILD_REQUIRE_BUSYBOX=1` (CI sets it).

use std::time::Duration;

use prost::Message;
use remote_apis::reapi::command::EnvironmentVariable;
use remote_apis::reapi::{Command, ExecuteResponse, Tree};
use remote_apis::{Digest, DigestFunction};

use crate::execution::{Act, request, response, run};
use crate::sandbox::{Farm, Kind};

const BUSYBOX: &str = "/bin/busybox";
/// The applets the scripts use, as links to busybox in `/bin`.
const APPLETS: &[(&str, &str)] = &[
    ("bin/sh", "busybox"),
    ("bin/ls", "busybox"),
    ("bin/cat", "busybox"),
    ("bin/tr", "busybox"),
    ("bin/wc", "busybox"),
    ("bin/head", "busybox"),
    ("bin/mkdir", "busybox"),
    ("bin/touch", "busybox"),
    ("bin/nc", "/bin/busybox"),
];
const CHROOT: (&str, &str) = ("chroot", "input-root");

/// The static busybox, or None (the test skips) when it is not installed
/// and `DISTBUILD_REQUIRE_BUSYBOX` is not `1`.
fn busybox() -> Option<&'static [u8]> {
    match std::fs::read(BUSYBOX) {
        Ok(bytes) => Some(Box::leak(bytes.into_boxed_slice())),
        Err(e) if std::env::var("DISTBUILD_REQUIRE_BUSYBOX").as_deref() == Ok("1") => {
            panic!("{BUSYBOX}: {e}, and DISTBUILD_REQUIRE_BUSYBOX=1 (apt-get install busybox-static)")
        }
        Err(e) => {
            eprintln!("skipping: {BUSYBOX}: {e} (apt-get install busybox-static)");
            None
        }
    }
}

/// An action on a busybox-only input root asking `chroot=input-root`.
fn chrooted(busybox: &'static [u8], script: &str) -> Act {
    let mut symlinks = APPLETS.to_vec();
    symlinks.push(("passwd", "/etc/passwd"));
    Act {
        script: script.into(),
        files: vec![("bin/busybox", busybox, true)],
        symlinks,
        platform: vec![CHROOT],
        ..Default::default()
    }
}

/// Everything the action sees, from working directory `a/b` with the
/// output `../../buildstream-install` (BuildStream's shape).
const LOOK_AROUND: &str = "echo pwd=$(pwd); echo root=$(ls / | tr '\\n' ' '); \
     test -e /usr/bin/env && echo host-env || echo no-host-env; \
     cat /passwd >/dev/null 2>&1 && echo read-passwd || echo no-passwd; \
     echo pid=$$; echo x > /dev/null && echo dev-null; echo urandom=$(head -c 4 /dev/urandom | wc -c); \
     test -e /proc/self/fd/1 && echo proc; echo dev=$(ls /dev | tr '\\n' ' '); \
     echo x > /tmp/t && echo tmp-writable; echo x > /dev/shm/t && echo shm-writable; \
     touch /dev/x 2>/dev/null || echo dev-read-only; \
     mkdir -p /buildstream-install && echo made > /buildstream-install/x";

async fn the_input_root_is_slash(kind: Kind) {
    let Some(busybox) = busybox() else { return };
    let farm = Farm::start_with(kind, false, true).await;
    let sandboxes = farm.sandboxes().await;
    assert!(sandboxes[0].starts_with("namespaces(") && sandboxes[0].contains("chroot=input-root"), "{sandboxes:?}");
    let act = Act {
        working_directory: "a/b",
        output_paths: vec!["../../buildstream-install"],
        ..chrooted(busybox, LOOK_AROUND)
    };
    let (r, out, err) = farm.run(&act).await;
    let result = r.result.as_ref().unwrap();
    assert_eq!(result.exit_code, 0, "{out} {err}");
    let expected = "pwd=/a/b\nroot=a bin dev passwd proc tmp\nno-host-env\nno-passwd\npid=2\ndev-null\nurandom=4\n\
                    proc\ndev=fd full null random shm stderr stdin stdout tty urandom zero\ntmp-writable\n\
                    shm-writable\ndev-read-only\n";
    assert_eq!(out, expected, "{err}");
    assert_eq!(result.output_directories.len(), 1, "{result:?}");
    let installed = tree(&farm, &result.output_directories[0].tree_digest).await;
    assert_eq!(result.output_directories[0].path, "../../buildstream-install");
    let x = &installed.root.as_ref().unwrap().files;
    assert_eq!(x.len(), 1);
    assert_eq!(x[0].name, "x");
    assert_eq!(farm.blob(x[0].digest.as_ref()).await, "made\n");

    // The whole root as the output (BuildStream's `.`): the sandbox's mount
    // points are not in it, what the action wrote is.
    let act = Act { output_paths: vec!["."], ..chrooted(busybox, "echo made > /new; echo x > /tmp/t") };
    let (r, _, err) = farm.run(&act).await;
    let result = r.result.as_ref().unwrap();
    assert_eq!(result.exit_code, 0, "{err}");
    let root = tree(&farm, &result.output_directories[0].tree_digest).await.root.unwrap();
    let mut names: Vec<&str> = root.directories.iter().map(|d| d.name.as_str()).collect();
    names.extend(root.files.iter().map(|f| f.name.as_str()));
    names.extend(root.symlinks.iter().map(|l| l.name.as_str()));
    names.sort();
    assert_eq!(names, ["bin", "new", "passwd"]);
    let passwd = root.symlinks.iter().find(|l| l.name == "passwd").unwrap();
    assert_eq!(passwd.target, "/etc/passwd", "a link in the root is collected as it is");

    // The program is looked up in the root, by the action's PATH; the
    // host's is not there.
    let found = command(&["sh", "-c", "echo found-by-path"], "/bin");
    let digest = chrooted(busybox, "").upload_with(&farm.server, &found).await;
    let r = finished(&farm, digest).await;
    let result = r.result.as_ref().unwrap_or_else(|| panic!("{:?}", r.status));
    assert_eq!(result.exit_code, 0);
    assert_eq!(farm.blob(result.stdout_digest.as_ref()).await, "found-by-path\n");
    let host = command(&["/usr/bin/env"], "/bin");
    let digest = chrooted(busybox, "").upload_with(&farm.server, &host).await;
    let r = finished(&farm, digest).await;
    let status = r.status.expect("a status");
    assert_eq!(status.code, tonic::Code::InvalidArgument as i32, "{status:?}");
    assert!(status.message.contains("/usr/bin/env") && status.message.contains("inside the input root"), "{status:?}");

    // An action without the property on the same worker runs as before,
    // on the host's (read-only) tree.
    let (r, out, _) = farm.run(&Act::sh("test -e /usr/bin/env && echo host-env")).await;
    assert_eq!((r.result.unwrap().exit_code, out.as_str()), (0, "host-env\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_input_root_is_slash_builtin() {
    the_input_root_is_slash(Kind::Builtin).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_input_root_is_slash_remote() {
    the_input_root_is_slash(Kind::Remote).await
}

/// What BuildStream sends (see REAPI-NOTES 17a): empty `dev`, `proc`,
/// `tmp` and `buildstream-install` in the root, a deep working directory,
/// `sh` found by PATH, outputs `.` and `../../../buildstream-install`.
#[tokio::test(flavor = "multi_thread")]
async fn a_buildstream_shaped_action() {
    let Some(busybox) = busybox() else { return };
    let farm = Farm::start_with(Kind::Builtin, false, true).await;
    let act = Act {
        files: vec![("bin/busybox", busybox, true), ("buildstream/p/hello.bst/greeting.txt", b"hello\n", false)],
        directories: vec!["dev", "proc", "tmp", "buildstream-install"],
        working_directory: "buildstream/p/hello.bst",
        output_paths: vec![".", "../../../buildstream-install"],
        ..chrooted(busybox, "")
    };
    let script = "cat greeting.txt > /tmp/g; mkdir -p /buildstream-install/share; \
                  cat /tmp/g > /buildstream-install/share/greeting; echo x > /dev/null";
    let mut bst = command(&["sh", "-c", "-e", script], "/usr/bin:/bin:/usr/sbin:/sbin");
    bst.output_paths = act.output_paths.iter().map(|p| p.to_string()).collect();
    bst.working_directory = act.working_directory.into();
    let r = finished(&farm, act.upload_with(&farm.server, &bst).await).await;
    let result = r.result.as_ref().unwrap_or_else(|| panic!("{:?}", r.status));
    let err = farm.blob(result.stderr_digest.as_ref()).await;
    assert_eq!(result.exit_code, 0, "{err}");
    let dirs: Vec<&str> = result.output_directories.iter().map(|d| d.path.as_str()).collect();
    assert_eq!(dirs, [".", "../../../buildstream-install"]);
    // `.` is the working directory (the build tree).
    let build = tree(&farm, &result.output_directories[0].tree_digest).await.root.unwrap();
    assert_eq!(build.files.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(), ["greeting.txt"]);
    let installed = tree(&farm, &result.output_directories[1].tree_digest).await;
    let share = &installed.root.as_ref().unwrap().directories;
    assert_eq!(share.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["share"]);
    let greeting = &installed.children[0].files[0];
    assert_eq!(greeting.name, "greeting");
    assert_eq!(farm.blob(greeting.digest.as_ref()).await, "hello\n");

    // A script element: working directory "" and `.`, the whole root. The
    // mount points come back as they came (empty); the file written to
    // /tmp was on the sandbox's tmpfs.
    let act = Act { working_directory: "", output_paths: vec!["."], ..act };
    let mut script = command(&["sh", "-c", "-e", "echo x > /tmp/g; echo made > /made"], "/bin");
    script.output_paths = vec![".".into()];
    let r = finished(&farm, act.upload_with(&farm.server, &script).await).await;
    let result = r.result.as_ref().unwrap_or_else(|| panic!("{:?}", r.status));
    assert_eq!(result.exit_code, 0, "{}", farm.blob(result.stderr_digest.as_ref()).await);
    let whole = tree(&farm, &result.output_directories[0].tree_digest).await;
    let root = whole.root.as_ref().unwrap();
    let names: Vec<&str> = root.directories.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["bin", "buildstream", "buildstream-install", "dev", "proc", "tmp"]);
    assert_eq!(root.files.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(), ["made"]);
    let empty = |name: &str| {
        let d = root.directories.iter().find(|d| d.name == name).unwrap().digest.clone().unwrap();
        let (empty, _) = remote_apis::merkle::encode(DigestFunction::Sha256, &remote_apis::reapi::Directory::default());
        d == empty.to_proto()
    };
    assert!(empty("tmp") && empty("dev") && empty("proc"), "{root:?}");
}

/// No network but the sandbox's own loopback, as in the host sandbox.
#[tokio::test(flavor = "multi_thread")]
async fn the_network_is_loopback_only() {
    let Some(busybox) = busybox() else { return };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let farm = Farm::start_with(Kind::Builtin, false, true).await;
    let script = format!("echo hi | nc -w 2 127.0.0.1 {port} && echo connected || echo refused");
    let (r, out, err) = farm.run(&chrooted(busybox, &script)).await;
    assert_eq!(r.result.unwrap().exit_code, 0, "{err}");
    assert_eq!(out, "refused\n", "{err}");
    assert!(listener.accept().is_err(), "the host's listener was reached");
}

/// Only workers offering the property run such actions; a value other
/// than `input-root` is refused at Execute.
#[tokio::test(flavor = "multi_thread")]
async fn only_workers_that_offer_it_run_it() {
    let farm = Farm::start_with(Kind::Builtin, false, false).await;
    assert!(!farm.sandboxes().await[0].contains("chroot"));
    let act = Act { platform: vec![CHROOT], do_not_cache: true, ..Act::sh("true") };
    let digest = act.upload(&farm.server).await;
    let status = match run(&farm.server, request(digest)).await {
        Err(status) => (status.code(), status.message().to_string()),
        Ok(ops) => {
            let s = response(ops.last().unwrap()).status.expect("a status");
            (tonic::Code::from(s.code), s.message)
        }
    };
    assert_eq!(status.0, tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.1.contains("chroot=input-root"), "{status:?}");

    for bad in ["host", "", "input-root "] {
        let act = Act { platform: vec![("chroot", bad)], do_not_cache: true, ..Act::sh("true") };
        let status = run(&farm.server, request(act.upload(&farm.server).await)).await.expect_err("accepted");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("chroot"), "{}", status.message());
    }
}

/// A Command with these arguments and PATH.
fn command(arguments: &[&str], path: &str) -> Command {
    Command {
        arguments: arguments.iter().map(|a| a.to_string()).collect(),
        environment_variables: vec![EnvironmentVariable { name: "PATH".into(), value: path.into() }],
        ..Default::default()
    }
}

async fn finished(farm: &Farm, digest: Digest) -> ExecuteResponse {
    let ops = tokio::time::timeout(Duration::from_secs(60), run(&farm.server, request(digest))).await.unwrap().unwrap();
    response(ops.last().unwrap())
}

async fn tree(farm: &Farm, digest: &Option<remote_apis::reapi::Digest>) -> Tree {
    let d = Digest::from_proto(DigestFunction::Sha256, digest.as_ref().unwrap()).unwrap();
    Tree::decode(farm.server.client().read_blob(d).await.unwrap()).unwrap()
}
