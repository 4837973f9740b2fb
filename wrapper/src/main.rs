//! `distbuild-rustc`: cargo runs it as `RUSTC_WRAPPER` (`distbuild-rustc
//! <rustc> <args...>`). Each compile becomes a REAPI Action that is served
//! from the ActionCache, executed remotely, or run here; anything it cannot
//! handle runs plain rustc, and a server problem never fails a build.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use distbuild_rustc::args::{Classified, LocalReason, classify};
use distbuild_rustc::compile::{self, Outcome};
use distbuild_rustc::local;
use distbuild_rustc::settings::{self, Record, Settings};

fn main() -> ExitCode {
    let started = Instant::now();
    let start_us = settings::now_us();
    let mut argv = std::env::args_os().skip(1);
    let Some(rustc) = argv.next().map(PathBuf::from) else {
        eprintln!("usage: distbuild-rustc <rustc> <args...>  (as RUSTC_WRAPPER; see `cargo distbuild --help`)");
        return ExitCode::from(2);
    };
    let raw: Vec<_> = argv.collect();
    let words: Option<Vec<String>> = raw.iter().map(|a| a.to_str().map(str::to_string)).collect();
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("warning: distbuild: {e}; compiling locally");
            let status = std::process::Command::new(&rustc).args(&raw).status();
            return ExitCode::from(status.ok().and_then(|s| s.code()).unwrap_or(1) as u8);
        }
    };
    let (krate, outcome) = match words {
        None => {
            let status = std::process::Command::new(&rustc).args(&raw).status();
            (String::new(), Outcome::local(status.ok().and_then(|s| s.code()).unwrap_or(1), LocalReason::NotUtf8))
        }
        Some(words) => match classify(&words) {
            Classified::Local(reason) => (String::new(), Outcome::local(local::run_plain(&rustc, &words), reason)),
            Classified::Compile(c) => {
                let o = compile::run(&settings, &rustc, &words, &c);
                (c.crate_name, o)
            }
        },
    };
    settings::append(
        &settings.stats_file,
        &Record {
            t: settings::now_ms(),
            start_us,
            end_us: settings::now_us(),
            tool: String::new(),
            krate,
            outcome: outcome.outcome.to_string(),
            reason: outcome.reason.map(|r| r.to_string()),
            stored: outcome.stored,
            ms: started.elapsed().as_millis() as u64,
            saved_ms: outcome.saved_ms,
            exit: outcome.code,
        },
    );
    ExitCode::from(outcome.code.clamp(0, 255) as u8)
}
