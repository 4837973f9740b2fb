//! `distbuild-cc`: `cargo distbuild` points `CC` at a shim that runs
//! `distbuild-cc cc` (and CXX,
//! and the per-target forms) so that the C and C++ that build scripts
//! compile are cached and executed remotely. Anything but one compile-only
//! invocation runs the real compiler here; a server problem never fails a
//! build.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use distbuild_rustc::cc::args::{CcReason, Classified, classify};
use distbuild_rustc::cc::run::{self, CcOutcome};
use distbuild_rustc::local;
use distbuild_rustc::settings::{self, Record, Settings};

fn main() -> ExitCode {
    let started = Instant::now();
    let start_us = settings::now_us();
    let mut argv = std::env::args_os().skip(1);
    let Some(compiler) = argv.next().map(PathBuf::from) else {
        eprintln!("usage: distbuild-cc <compiler> <args...>  (as CC; see `cargo distbuild --help`)");
        return ExitCode::from(2);
    };
    let raw: Vec<_> = argv.collect();
    let plain = || {
        let status = std::process::Command::new(&compiler).args(&raw).status();
        status.ok().and_then(|s| s.code()).unwrap_or(1)
    };
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("warning: distbuild: {e}; compiling locally");
            return ExitCode::from(plain().clamp(0, 255) as u8);
        }
    };
    let words: Option<Vec<String>> = raw.iter().map(|a| a.to_str().map(str::to_string)).collect();
    let (source, outcome) = match words {
        None => (String::new(), CcOutcome::local(plain(), CcReason::NotUtf8)),
        Some(words) => match classify(&words, &|f| std::fs::read_to_string(f).ok()) {
            Classified::Local(reason) => (String::new(), CcOutcome::local(local::run_plain(&compiler, &words), reason)),
            Classified::Compile(c) => {
                let o = run::run(&settings, &compiler, &words, &c);
                (c.source.rsplit('/').next().unwrap_or_default().to_string(), o)
            }
        },
    };
    settings::append(
        &settings.stats_file,
        &Record {
            t: settings::now_ms(),
            start_us,
            end_us: settings::now_us(),
            krate: source,
            outcome: outcome.outcome.to_string(),
            reason: outcome.reason.map(|r| r.to_string()),
            stored: outcome.stored,
            ms: started.elapsed().as_millis() as u64,
            saved_ms: outcome.saved_ms,
            exit: outcome.code,
            tool: "cc".to_string(),
        },
    );
    ExitCode::from(outcome.code.clamp(0, 255) as u8)
}
