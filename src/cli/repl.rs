//! The interactive shell `cargo-distbuild` opens when run without arguments:
//! the same commands as the command line, with history.

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use rustyline::error::ReadlineError;

use super::{Cli, Session};

const HELP: &str = "\
Commands (as on the command line, without `cargo-distbuild`):
  cas put|get|stat|list ...     blobs
  exec [--input P] [--output P] -- CMD ARGS...
  job submit|status|cancel ...  one operation
  jobs list                     operations the server remembers
  workers list|drain|undrain    connected workers; drain one
  scheduler status              queues, workers, cache hit rate
  build|check|test|run ...      cargo through the rustc wrapper
  stats                         what the wrapper did, time saved
  help [COMMAND]                this text, or a command's options
  history                       commands entered so far
  exit                          leave (also Ctrl-D)";

pub async fn run(ctx: Session) -> anyhow::Result<ExitCode> {
    let mut editor = rustyline::DefaultEditor::new()?;
    let history = history_file();
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    println!("cargo-distbuild {} — server {} (type `help`)", env!("CARGO_PKG_VERSION"), ctx.server);
    loop {
        let line = match tokio::task::block_in_place(|| editor.readline("distbuild> ")) {
            Ok(line) => line,
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        };
        let words = match shell_words::split(&line) {
            Ok(w) => w,
            Err(e) => {
                eprintln!("error: {e}");
                continue;
            }
        };
        if words.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(line.as_str());
        match words[0].as_str() {
            "exit" | "quit" => break,
            "help" if words.len() == 1 => println!("{HELP}"),
            "help" => {
                let mut cmd = Cli::command();
                match cmd.find_subcommand_mut(&words[1]) {
                    Some(sub) => println!("{}", sub.render_long_help()),
                    None => eprintln!("error: no command {:?}; type `help`", words[1]),
                }
            }
            "history" => {
                for (i, entry) in editor.history().iter().enumerate() {
                    println!("{:>4}  {entry}", i + 1);
                }
            }
            _ => execute(&ctx, words).await,
        }
    }
    if let Some(h) = &history {
        if let Some(dir) = h.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = editor.save_history(h);
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs one line; errors are printed and the shell goes on.
async fn execute(ctx: &Session, words: Vec<String>) {
    let args = std::iter::once("cargo-distbuild".to_string()).chain(words);
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return;
        }
    };
    let Some(command) = cli.command else { return };
    if command.runs_until_stopped() {
        eprintln!("error: `server` and `worker` run until stopped; start them outside the shell");
        return;
    }
    let mut ctx = ctx.clone();
    if let Some(server) = cli.server {
        ctx.server = server;
    }
    if !cli.instance.is_empty() {
        ctx.instance = cli.instance;
    }
    if cli.client.is_set() {
        match cli.client.resolve(&ctx.file.client) {
            Ok(client) => ctx.client = client,
            Err(e) => {
                eprintln!("error: {e:#}");
                return;
            }
        }
    }
    match Box::pin(super::dispatch(command, ctx)).await {
        Ok(code) if code != ExitCode::SUCCESS => eprintln!("({code:?})"),
        Ok(_) => {}
        Err(e) => eprintln!("error: {e:#}"),
    }
}

fn history_file() -> Option<std::path::PathBuf> {
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".local/state")))?;
    Some(state.join("cargo-distbuild").join("history"))
}
