//! `cargo-distbuild cas put|get|stat|list|verify`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context;
use clap::Subcommand;
use remote_apis::client::{CasClient, ClientOptions};
use remote_apis::{Digest, DigestFunction, InstanceName};

use super::rpc_error;
use crate::admin::proto::{GetStoreStatusRequest, ListBlobsRequest, VerifyBlobsRequest};

#[derive(Subcommand, Debug)]
pub enum CasCommand {
    /// Upload files; prints each one's digest.
    Put {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Hash with BLAKE3 instead of SHA-256.
        #[arg(long)]
        blake3: bool,
    },
    /// Download a blob (HASH/SIZE, or blake3:HASH/SIZE) into a file (`-`: stdout).
    Get { digest: Digest, out: PathBuf },
    /// Say whether the server has a blob.
    Stat { digest: Digest },
    /// List stored blobs, most recently used first.
    List {
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Re-hash every stored blob on the server and remove the ones that no
    /// longer match their digest (admin). Fails when any was corrupt.
    Verify,
}

pub async fn run(cmd: CasCommand, server: &str, options: &ClientOptions, instance: &str) -> anyhow::Result<ExitCode> {
    let instance = InstanceName::new(instance).context("--instance")?;
    let connect = || async {
        CasClient::connect_with(server, options, instance.clone()).await.map_err(|s| rpc_error("connecting", s))
    };
    match cmd {
        CasCommand::Put { files, blake3 } => {
            let function = if blake3 { DigestFunction::Blake3 } else { DigestFunction::Sha256 };
            let client = connect().await?.with_digest_function(function);
            for file in files {
                let digest = client
                    .upload_file(&file)
                    .await
                    .map_err(|s| rpc_error(&format!("uploading {}", file.display()), s))?;
                println!("{digest}  {}", file.display());
            }
        }
        CasCommand::Get { digest, out } => {
            let client = connect().await?.with_digest_function(digest.function);
            download_to(&client, digest, &out).await?;
            if out.as_os_str() != "-" {
                eprintln!("wrote {} bytes to {}", digest.size, out.display());
            }
        }
        CasCommand::Stat { digest } => {
            let client = connect().await?.with_digest_function(digest.function);
            let missing = client.find_missing(&[digest]).await.map_err(|s| rpc_error("FindMissingBlobs", s))?;
            if missing.is_empty() {
                println!("{digest}: present ({} bytes)", digest.size);
            } else {
                println!("{digest}: missing");
                return Ok(ExitCode::FAILURE);
            }
        }
        CasCommand::List { limit } => {
            let mut admin = super::status::admin(server, options).await?;
            let status = admin
                .get_store_status(GetStoreStatusRequest {})
                .await
                .map_err(|s| rpc_error("GetStoreStatus", s))?
                .into_inner();
            let list = admin.list_blobs(ListBlobsRequest { limit }).await.map_err(|s| rpc_error("ListBlobs", s))?;
            let now = std::time::SystemTime::now();
            for b in list.into_inner().blobs {
                let at = UNIX_EPOCH + Duration::from_millis(b.last_access_unix_ms.max(0) as u64);
                let ago = now.duration_since(at).unwrap_or_default();
                let prefix =
                    if b.digest_function == "sha256" { String::new() } else { format!("{}:", b.digest_function) };
                println!(
                    "{prefix}{}/{}\t{} ago",
                    b.hash,
                    b.size_bytes,
                    humantime::format_duration(Duration::from_secs(ago.as_secs()))
                );
            }
            eprintln!(
                "{} blobs, {} of {} used ({} store{})",
                status.blobs,
                bytesize::ByteSize(status.used_bytes),
                bytesize::ByteSize(status.max_bytes),
                status.backend,
                if status.data_dir.is_empty() { String::new() } else { format!(" in {}", status.data_dir) }
            );
        }
        CasCommand::Verify => return verify(server, options).await,
    }
    Ok(ExitCode::SUCCESS)
}

/// `cas verify`: the admin scrub, with its counts.
async fn verify(server: &str, options: &ClientOptions) -> anyhow::Result<ExitCode> {
    let report = super::status::admin(server, options)
        .await?
        .verify_blobs(VerifyBlobsRequest {})
        .await
        .map_err(|s| rpc_error("VerifyBlobs", s))?
        .into_inner();
    println!("{} blobs intact ({})", report.intact, bytesize::ByteSize(report.intact_bytes));
    println!("{} corrupt blobs removed", report.corrupt);
    if report.vanished > 0 {
        println!("{} blobs gone from disk, forgotten", report.vanished);
    }
    if report.unreadable > 0 {
        println!("{} blobs unreadable, kept (see the server's log)", report.unreadable);
    }
    Ok(if report.corrupt > 0 || report.unreadable > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// Where `cas get` writes: `-` is stdout; an existing device, FIFO or other
/// non-regular file is written in place (renaming over `/dev/null` would
/// replace the device); a regular file (also behind a symlink) is replaced
/// atomically, so a failed download leaves the old contents or nothing.
pub(super) async fn download_to(client: &CasClient, digest: Digest, out: &std::path::Path) -> anyhow::Result<()> {
    let read_err = |s| rpc_error(&format!("reading {digest}"), s);
    if out.as_os_str() == "-" {
        let mut stdout = tokio::io::stdout();
        return client.download(digest, &mut stdout).await.map_err(read_err);
    }
    let target = match std::fs::metadata(out) {
        Ok(meta) if !meta.is_file() && !meta.is_dir() => {
            let mut file = tokio::fs::OpenOptions::new()
                .write(true)
                .open(out)
                .await
                .with_context(|| format!("opening {}", out.display()))?;
            return client.download(digest, &mut file).await.map_err(read_err);
        }
        Ok(meta) if meta.is_dir() => anyhow::bail!("{} is a directory", out.display()),
        Ok(_) => std::fs::canonicalize(out).with_context(|| format!("resolving {}", out.display()))?,
        Err(_) => out.to_path_buf(),
    };
    let dir = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let tmp = dir.join(format!(".{}.distbuild-partial", uuid::Uuid::new_v4()));
    let result = async {
        let mut file = tokio::fs::File::create(&tmp).await.with_context(|| format!("creating {}", tmp.display()))?;
        client.download(digest, &mut file).await.map_err(read_err)?;
        file.sync_all().await?;
        tokio::fs::rename(&tmp, &target).await.with_context(|| format!("writing {}", target.display()))
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result
}
