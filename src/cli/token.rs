//! `cargo-distbuild token`: bearer tokens for the server's token file.

use std::io::{Read, Write};
use std::process::ExitCode;

use clap::Subcommand;

use crate::auth::Grant;
use crate::auth::tokens;

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Make a fresh random token. The token goes to stdout, once (it is
    /// stored nowhere); the entry to add to the server's token file
    /// ([auth] tokens) goes to stderr.
    New {
        /// The principal's name, shown in statuses, logs and as operation owner.
        name: String,
        /// A grant (repeatable): cas-read, cas-write, ac-read, ac-write, execute, asset-read, asset-push,
        /// asset-fetch, worker, admin.
        #[arg(long = "grant", required = true, value_name = "GRANT")]
        grants: Vec<Grant>,
        /// Grant only on the instance names under this prefix (default: every instance).
        #[arg(long, value_name = "PREFIX")]
        instance: Option<String>,
    },
    /// Print the SHA-256 a token file stores for a token read from stdin
    /// (to list a token made elsewhere).
    Hash,
}

pub fn run(command: TokenCommand) -> anyhow::Result<ExitCode> {
    match command {
        TokenCommand::New { name, mut grants, instance } => {
            tokens::check_name(&name).map_err(|e| anyhow::anyhow!("NAME: {e}"))?;
            if let Some(prefix) = &instance {
                let trimmed = prefix.trim_end_matches('/');
                remote_apis::InstanceName::new(trimmed).map_err(|e| anyhow::anyhow!("--instance: {}", e.0))?;
                anyhow::ensure!(!trimmed.chars().any(char::is_control), "--instance: control characters");
            }
            grants.sort();
            grants.dedup();
            let token = tokens::generate()?;
            let entry = tokens::entry_toml(&name, &tokens::sha256_hex(&token), &grants, instance.as_deref());
            println!("{token}");
            std::io::stdout().flush()?;
            eprintln!(
                "# The token above is shown only this once. Add this entry to the server's token file\n\
                 # ([auth] tokens; it is reloaded within seconds), and give the token to its user\n\
                 # (Bazel: --remote_header=Authorization=Bearer <token>; cargo-distbuild: DISTBUILD_TOKEN).\n\n{entry}"
            );
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::Hash => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text)?;
            let token = text.trim();
            anyhow::ensure!(!token.is_empty(), "no token on stdin");
            println!("{}", tokens::sha256_hex(token));
            Ok(ExitCode::SUCCESS)
        }
    }
}
