//! `cargo-distbuild asset push|fetch`: the Remote Asset API from the
//! command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use remote_apis::asset::fetch_client::FetchClient;
use remote_apis::asset::push_client::PushClient;
use remote_apis::asset::{FetchBlobRequest, PushBlobRequest, Qualifier};
use remote_apis::client::{CasClient, ClientOptions};
use remote_apis::{Digest, DigestFunction, InstanceName};

use super::rpc_error;

#[derive(Subcommand, Debug)]
pub enum AssetCommand {
    /// Upload FILE to the CAS and record that URI (with the qualifiers)
    /// names it; prints its digest.
    Push {
        uri: String,
        file: PathBuf,
        /// A qualifier NAME=VALUE (repeatable), e.g. checksum.sri=sha256-...
        #[arg(long = "qualifier", short = 'q', value_parser = parse_qualifier)]
        qualifiers: Vec<Qualifier>,
    },
    /// Ask the server for what URI names (from its records, the CAS, or a
    /// download); prints the digest.
    Fetch {
        /// The URI, then mirrors tried in order.
        #[arg(required = true)]
        uris: Vec<String>,
        /// The content's Subresource Integrity (sha256-BASE64, sha384-, sha512-).
        #[arg(long)]
        sri: Option<String>,
        /// A qualifier NAME=VALUE (repeatable).
        #[arg(long = "qualifier", short = 'q', value_parser = parse_qualifier)]
        qualifiers: Vec<Qualifier>,
        /// Also download the blob into this file (`-`: stdout).
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
    },
}

fn parse_qualifier(text: &str) -> Result<Qualifier, String> {
    let (name, value) = text.split_once('=').ok_or("a qualifier is NAME=VALUE")?;
    Ok(Qualifier { name: name.to_string(), value: value.to_string() })
}

pub async fn run(cmd: AssetCommand, server: &str, options: &ClientOptions, instance: &str) -> anyhow::Result<ExitCode> {
    let instance = InstanceName::new(instance).context("--instance")?;
    let transport = remote_apis::client::connect(server, options).await.map_err(|s| rpc_error("connecting", s))?;
    let cas = CasClient::new(transport.clone(), instance.clone());
    match cmd {
        AssetCommand::Push { uri, file, qualifiers } => {
            let digest =
                cas.upload_file(&file).await.map_err(|s| rpc_error(&format!("uploading {}", file.display()), s))?;
            PushClient::new(transport)
                .push_blob(PushBlobRequest {
                    instance_name: instance.as_str().to_string(),
                    uris: vec![uri],
                    qualifiers,
                    blob_digest: Some(digest.to_proto()),
                    digest_function: DigestFunction::Sha256.to_proto() as i32,
                    ..Default::default()
                })
                .await
                .map_err(|s| rpc_error("PushBlob", s))?;
            println!("{digest}");
        }
        AssetCommand::Fetch { uris, sri, mut qualifiers, output } => {
            if let Some(sri) = sri {
                qualifiers.push(Qualifier { name: "checksum.sri".into(), value: sri });
            }
            let response = FetchClient::new(transport)
                .fetch_blob(FetchBlobRequest {
                    instance_name: instance.as_str().to_string(),
                    uris,
                    qualifiers,
                    digest_function: DigestFunction::Sha256.to_proto() as i32,
                    ..Default::default()
                })
                .await
                .map_err(|s| rpc_error("FetchBlob", s))?
                .into_inner();
            if let Some(status) = response.status.filter(|s| s.code != 0) {
                let code = tonic::Code::from_i32(status.code);
                anyhow::bail!("fetching {}: {code:?}: {}", response.uri, status.message);
            }
            let digest = Digest::from_field(DigestFunction::Sha256, response.blob_digest.as_ref(), "blob_digest")
                .context("the server's answer")?;
            match output {
                Some(out) => {
                    super::cas::download_to(&cas, digest, &out).await?;
                    if out.as_os_str() != "-" {
                        eprintln!("{digest}: wrote {} bytes to {}", digest.size, out.display());
                    }
                }
                None => println!("{digest}"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
