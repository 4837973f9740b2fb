//! The server's log as an operator reads it: plain text without colour
//! codes when stderr is no terminal, and with `DISTBUILD_LOG_FORMAT=json`
//! one JSON object per line carrying the call's RequestMetadata and
//! principal (never its token).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use prost::Message;
use remote_apis::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use remote_apis::reapi::{FindMissingBlobsRequest, RequestMetadata, ToolDetails};

use crate::common::sha;

/// `cargo-distbuild` run as a server process on a free loopback port.
pub struct ServerProcess {
    pub child: tokio::process::Child,
    pub url: String,
}

impl ServerProcess {
    /// Starts `cargo-distbuild <args> --listen 127.0.0.1:PORT` with `env`,
    /// stderr piped, and waits until it answers.
    pub async fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_cargo-distbuild"))
            .args(args)
            .args(["--listen", &addr])
            .env("XDG_CONFIG_HOME", "/nonexistent")
            .env_remove("DISTBUILD_CONFIG")
            .env_remove("DISTBUILD_LOG")
            .env_remove("DISTBUILD_LOG_FORMAT")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let url = format!("grpc://{addr}");
        // Up to 20 s: the machine may be busy with the other tests.
        for _ in 0..400 {
            if tokio::net::TcpStream::connect(&addr).await.is_ok() {
                return ServerProcess { child, url };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the server never came up");
    }

    /// SIGTERM; the exit status and everything it wrote to stderr.
    pub async fn stop(self) -> (std::process::ExitStatus, String) {
        // SAFETY: signalling our own child process.
        assert_eq!(unsafe { libc::kill(self.child.id().unwrap() as i32, libc::SIGTERM) }, 0);
        let out = tokio::time::timeout(Duration::from_secs(30), self.child.wait_with_output()).await.unwrap().unwrap();
        (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn server_args(dir: &Path) -> Vec<String> {
    let data = dir.join("data");
    vec!["server".into(), "--data-dir".into(), data.to_str().unwrap().into(), "--workers".into(), "0".into()]
}

#[tokio::test]
async fn json_logs_carry_the_request_metadata_and_the_principal() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(&tokens, crate::auth::token_file_text(&[("ci", &["cas-read"], "")])).unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, format!("[auth]\ntokens = {:?}\n", tokens.to_str().unwrap())).unwrap();
    let mut args = server_args(dir.path());
    args.extend(["--config".into(), config.to_str().unwrap().into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // The per-call line of the request log is at debug level.
    let env = [("DISTBUILD_LOG_FORMAT", "json"), ("DISTBUILD_LOG", "info,tower_http=debug")];
    let server = ServerProcess::start(&args, &env).await;

    let metadata = RequestMetadata {
        tool_details: Some(ToolDetails { tool_name: "bazel".into(), tool_version: "4.2.3".into() }),
        action_id: "action-7".into(),
        tool_invocation_id: "invocation-42".into(),
        action_mnemonic: "Genrule".into(),
        target_id: "//pkg:target".into(),
        ..Default::default()
    };
    let token = crate::auth::token_of("ci");
    let mut request = tonic::Request::new(FindMissingBlobsRequest {
        blob_digests: vec![sha(b"absent").to_proto()],
        ..Default::default()
    });
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    request.metadata_mut().insert_bin(
        "build.bazel.remote.execution.v2.requestmetadata-bin",
        tonic::metadata::MetadataValue::from_bytes(&metadata.encode_to_vec()),
    );
    let channel = tonic::transport::Endpoint::from_shared(server.url.replace("grpc://", "http://")).unwrap();
    let mut cas = ContentAddressableStorageClient::new(channel.connect().await.unwrap());
    cas.find_missing_blobs(request).await.unwrap();

    let (status, stderr) = server.stop().await;
    assert!(status.success(), "{status:?}: {stderr}");
    assert!(!stderr.contains(&token), "a token in the log: {stderr}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object ({e}): {l:?}")))
        .collect();
    assert!(lines.iter().any(|l| l["message"].as_str().is_some_and(|m| m.contains("serving"))), "{stderr}");
    // The call's last line (the request log's response line): the
    // principal is known once the service has identified the caller.
    let call = lines
        .iter()
        .rev()
        .filter_map(|l| l["span"].as_object())
        .find(|span| span.get("method").and_then(|m| m.as_str()).is_some_and(|m| m.ends_with("FindMissingBlobs")))
        .unwrap_or_else(|| panic!("no line of the call: {stderr}"));
    for (field, value) in [
        ("tool", "bazel"),
        ("tool_version", "4.2.3"),
        ("invocation", "invocation-42"),
        ("action_id", "action-7"),
        ("mnemonic", "Genrule"),
        ("target", "//pkg:target"),
        ("principal", "token:ci"),
    ] {
        assert_eq!(call.get(field).and_then(|v| v.as_str()), Some(value), "{field} in {call:?}");
    }
}

#[tokio::test]
async fn text_logs_off_a_terminal_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let args = server_args(dir.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = ServerProcess::start(&args, &[]).await;
    let client = remote_apis::client::CasClient::connect(&server.url, Default::default()).await.unwrap();
    client.find_missing(&[sha(b"absent")]).await.unwrap();
    let (status, stderr) = server.stop().await;
    assert!(status.success(), "{status:?}: {stderr}");
    assert!(stderr.contains("serving REAPI"), "{stderr}");
    assert!(!stderr.contains('\x1b'), "escape codes in a piped log: {stderr:?}");
}
