//! `cargo distbuild build|check|test|run|bench|doc [cargo args]`: cargo with
//! the rustc wrapper set, against the configured server or a local one
//! started on demand; `cargo distbuild stats` and `cargo distbuild stop`.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use remote_apis::wrapper_state::{Record, default_state_dir, lock_file, read_records, stats_file};

use super::Session;
use super::jobs::Jobs;
use crate::config::WrapperMode;

pub async fn cargo(command: &str, args: Vec<String>, ctx: Session) -> anyhow::Result<ExitCode> {
    let wrapper = wrapper_path()?;
    let mode = ctx.file.wrapper.mode;
    let server = match (&ctx.explicit_server, &ctx.file.wrapper.server) {
        (Some(s), _) | (None, Some(s)) => super::client_address(s),
        (None, None) if mode == WrapperMode::Off => String::new(),
        (None, None) => local_server().await?,
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    if let Some(w) = std::env::var_os("RUSTC_WRAPPER").filter(|w| !w.is_empty() && Path::new(w) != wrapper) {
        eprintln!("warning: distbuild: replacing RUSTC_WRAPPER={}", w.to_string_lossy());
    }
    let sysroot = std::process::Command::new(&rustc).args(["--print", "sysroot"]).output().ok();
    let stats = stats_file();
    let offset = std::fs::metadata(&stats).map(|m| m.len()).unwrap_or(0);

    // The local server started on demand is plaintext on loopback.
    let remote = ctx.explicit_server.is_some() || ctx.file.wrapper.server.is_some();
    let farm = remote && mode == WrapperMode::Remote;
    let env_jobs = std::env::var("CARGO_BUILD_JOBS").ok();
    let jobs = super::jobs::decide(&args, env_jobs.as_deref(), farm, ctx.file.wrapper.max_jobs, || {
        super::jobs::free_slots(&server, &ctx.client.options)
    })
    .await;
    let mut job_args = Vec::new();
    match jobs {
        Jobs::Leave => {}
        Jobs::Set { jobs, free } => {
            eprintln!("distbuild: -j {jobs} ({free} free execution slots on {server})");
            job_args = vec!["-j".to_string(), jobs.to_string()];
        }
        Jobs::Unknown(e) => eprintln!("distbuild: the farm's free slots are unknown ({e}); cargo picks its job count"),
    }

    let started = Instant::now();
    let mut cmd = std::process::Command::new(&cargo);
    cmd.arg(command)
        .args(&job_args)
        .args(&args)
        .env("RUSTC_WRAPPER", &wrapper)
        // The incremental cache is local state no Action can carry; with it
        // on, cargo's dev profile would keep every workspace crate local.
        .env("CARGO_INCREMENTAL", "0")
        .env("DISTBUILD_SERVER", &server)
        .env("DISTBUILD_INSTANCE", &ctx.instance)
        .env("DISTBUILD_MODE", mode.as_env())
        .env("DISTBUILD_STATS", &stats);
    client_env(&mut cmd, &ctx.client, remote)?;
    if let Some(out) = sysroot.filter(|o| o.status.success()) {
        cmd.env("DISTBUILD_SYSROOT", String::from_utf8_lossy(&out.stdout).trim());
    }
    let workspace = workspace_dir(&cargo);
    for (var, value) in c_prefix_maps(workspace.as_deref()) {
        cmd.env(var, value);
    }
    if let Some(ws) = &workspace {
        cmd.env("DISTBUILD_WORKSPACE", ws);
    }
    match cc_wrapper_path(&wrapper) {
        Some(cc) => {
            let shims = remote_apis::wrapper_state::default_cache_dir().join("cc-shims");
            for (var, words) in cc_env(&cc, &shims, std::env::vars()) {
                match shim(&shims, &words) {
                    Ok(path) => cmd.env(var, path),
                    Err(e) => {
                        eprintln!("warning: distbuild: {var} stays unwrapped (C compiles run locally): {e:#}");
                        &mut cmd
                    }
                };
            }
        }
        None => eprintln!("warning: distbuild: no distbuild-cc beside {}; C compiles run locally", wrapper.display()),
    }
    // C compilers honour it for __DATE__ and __TIME__ (mimalloc embeds
    // them), as do build scripts that stamp a build time: without it their
    // outputs, and every key that depends on them, change on each build.
    if std::env::var_os("SOURCE_DATE_EPOCH").is_none() {
        cmd.env("SOURCE_DATE_EPOCH", "0");
    }
    let status = tokio::task::spawn_blocking(move || cmd.status())
        .await?
        .with_context(|| format!("running {}", cargo.to_string_lossy()))?;
    let records = read_records(&stats, offset);
    if !records.is_empty() {
        eprintln!("{}", summary_line(&records, started.elapsed()));
    }
    Ok(match status.code() {
        Some(c) => ExitCode::from(c.clamp(0, 255) as u8),
        None => ExitCode::FAILURE,
    })
}

/// The wrapper's TLS files and token source, as the environment variables
/// it reads (absolute paths: rustc runs in other directories). A token from
/// a file is passed as the file's path; one from `DISTBUILD_TOKEN` is
/// inherited as it is. Without a `remote` server no TLS files are passed.
fn client_env(cmd: &mut std::process::Command, client: &super::Client, remote: bool) -> anyhow::Result<()> {
    let tls = client.options.tls.clone().filter(|_| remote).unwrap_or_default();
    for (var, path) in
        [("DISTBUILD_TLS_CA", &tls.ca), ("DISTBUILD_TLS_CERT", &tls.cert), ("DISTBUILD_TLS_KEY", &tls.key)]
    {
        match path {
            Some(p) => cmd.env(var, std::path::absolute(p).with_context(|| format!("{}", p.display()))?),
            None => cmd.env_remove(var),
        };
    }
    if let Some(file) = &client.token_file {
        cmd.env("DISTBUILD_TOKEN_FILE", std::path::absolute(file).with_context(|| format!("{}", file.display()))?);
    }
    Ok(())
}

/// `CFLAGS` and `CXXFLAGS` with `-ffile-prefix-map` for `CARGO_HOME` and
/// the workspace: C that build scripts compile (cc-rs reads these) then
/// embeds the same paths in every checkout, so the static libraries it
/// bundles into rlibs, and the rlibs' cache keys, are the same too.
fn c_prefix_maps(workspace: Option<&Path>) -> Vec<(&'static str, String)> {
    let mut maps = Vec::new();
    let cargo_home = remote_apis::wrapper_state::cargo_home();
    if let Some(h) = cargo_home {
        maps.push(format!("-ffile-prefix-map={}=cargo-home", h.display()));
    }
    if let Some(dir) = workspace {
        maps.push(format!("-ffile-prefix-map={}=ws", dir.display()));
    }
    ["CFLAGS", "CXXFLAGS"]
        .into_iter()
        .map(|var| {
            let mut flags = std::env::var(var).unwrap_or_default();
            for m in &maps {
                if !flags.is_empty() {
                    flags.push(' ');
                }
                flags.push_str(m);
            }
            (var, flags)
        })
        .collect()
}

/// The workspace root, as `cargo locate-project --workspace` says.
fn workspace_dir(cargo: &std::ffi::OsStr) -> Option<PathBuf> {
    let manifest = std::process::Command::new(cargo)
        .args(["locate-project", "--workspace", "--message-format", "plain"])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))?;
    manifest.parent().map(Path::to_path_buf)
}

/// `distbuild-cc`, beside the rustc wrapper; `None` when missing or when
/// its path has whitespace (cc-rs splits `CC` on whitespace).
fn cc_wrapper_path(rustc_wrapper: &Path) -> Option<PathBuf> {
    let cc = rustc_wrapper.with_file_name("distbuild-cc");
    (cc.is_file() && !cc.to_string_lossy().contains(char::is_whitespace)).then_some(cc)
}

/// The compiler variables that route C and C++ through `distbuild-cc`,
/// keeping the user's compiler, each with the command it stands for
/// (`distbuild-cc`, then the user's words as cc-rs splits them): `CC` and
/// `CXX` (default `cc`, `c++`), and the forms the cc crate reads first when
/// the user set them (`CC_<target>` in both spellings, `TARGET_CC`,
/// `HOST_CC`, the same for `CXX`). Values that are already one of our
/// shims (a nested `cargo distbuild`) are left alone.
fn cc_env(cc: &Path, shims: &Path, env: impl Iterator<Item = (String, String)>) -> Vec<(String, Vec<String>)> {
    let wrap = |v: &str| {
        let mut words = vec![cc.to_string_lossy().into_owned()];
        words.extend(v.split_whitespace().map(str::to_string));
        words
    };
    let env: Vec<(String, String)> = env.collect();
    let get = |n: &str| env.iter().find(|(k, v)| k == n && !v.trim().is_empty()).map(|(_, v)| v.as_str());
    let ours = |v: &str| Path::new(v.trim()).starts_with(shims);
    let mut out = Vec::new();
    for (var, default) in [("CC", "cc"), ("CXX", "c++")] {
        let v = get(var).unwrap_or(default);
        if !ours(v) {
            out.push((var.to_string(), wrap(v)));
        }
    }
    for (k, v) in &env {
        let per_target = ["CC_", "CXX_"]
            .iter()
            .any(|p| k.strip_prefix(p).is_some_and(|t| t.chars().any(|c| c.is_ascii_lowercase())));
        let named = matches!(k.as_str(), "TARGET_CC" | "HOST_CC" | "TARGET_CXX" | "HOST_CXX");
        if (per_target || named) && !v.trim().is_empty() && !ours(v) {
            out.push((k.clone(), wrap(v)));
        }
    }
    out
}

/// A one-path stand-in for the command `words`: a script that execs it,
/// named like the user's compiler (`cc`, `gcc`, `clang++`...), in a
/// directory of `dir` named by the command's hash. `CC` must be one path:
/// cc-rs and cmake split a value with spaces, but build scripts that run
/// `$CC` as a program (`Command::new(env::var("CC"))`) cannot, and the
/// wrapper must never fail a build that works without it.
fn shim(dir: &Path, words: &[String]) -> anyhow::Result<PathBuf> {
    use sha2::Digest;
    use std::os::unix::fs::PermissionsExt;
    let quoted: Vec<String> = words.iter().map(|w| format!("'{}'", w.replace('\'', "'\\''"))).collect();
    let script = format!("#!/bin/sh\nexec {} \"$@\"\n", quoted.join(" "));
    let hash = hex::encode(&sha2::Sha256::digest(script.as_bytes())[..8]);
    let name = words.get(1).and_then(|c| Path::new(c).file_name()).map(|n| n.to_string_lossy().into_owned());
    let path = dir.join(hash).join(name.unwrap_or_else(|| "cc".to_string()));
    if path.to_string_lossy().contains(char::is_whitespace) {
        bail!("{} has whitespace, which cc-rs would split", path.display());
    }
    if std::fs::read_to_string(&path).is_ok_and(|s| s == script) {
        return Ok(path);
    }
    let parent = path.parent().context("shim directory")?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(".tmp-{}", std::process::id()));
    std::fs::write(&tmp, &script).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("creating {}", path.display()))?;
    Ok(path)
}

/// `distbuild-rustc`: beside this binary (how `cargo install` and
/// `cargo build` place them), else on PATH.
fn wrapper_path() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating cargo-distbuild")?;
    let beside = exe.with_file_name("distbuild-rustc");
    if beside.is_file() {
        return Ok(beside);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("distbuild-rustc"))
        .find(|p| p.is_file())
        .context("distbuild-rustc is neither beside cargo-distbuild nor on PATH (cargo install --path wrapper)")
}

/// Counts over stats records: compiles only (queries such as `-vV` are
/// not counted as compiles).
#[derive(Default, Debug)]
struct Totals {
    compiles: usize,
    /// Compiles that failed (errors, or build-script probes meant to fail).
    failed: usize,
    /// Of those, failures replayed from the cache (remembered probes).
    failed_cached: usize,
    hits: usize,
    remote: usize,
    local: usize,
    stored: usize,
    saved_ms: i64,
    reasons: std::collections::BTreeMap<String, usize>,
}

/// rustc's compiles (`tool` ""), or the C compiler's (`tool` "cc").
fn totals(records: &[Record], tool: &str) -> Totals {
    let mut t = Totals::default();
    for r in records.iter().filter(|r| !r.krate.is_empty() && r.tool == tool) {
        t.compiles += 1;
        if r.exit != 0 {
            t.failed += 1;
            t.failed_cached += usize::from(r.outcome == "hit");
            continue;
        }
        match r.outcome.as_str() {
            "hit" => {
                t.hits += 1;
                t.saved_ms += r.saved_ms.max(0);
            }
            "remote" => t.remote += 1,
            _ => {
                t.local += 1;
                t.stored += usize::from(r.stored);
                *t.reasons.entry(r.reason.clone().unwrap_or_default()).or_default() += 1;
            }
        }
    }
    t
}

/// "2 cache hits, 1 remote, 1 local (1 no worker available), 1 failed"
fn counts(t: &Totals) -> String {
    let reasons: Vec<String> = t.reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
    let why = if reasons.is_empty() { String::new() } else { format!(" ({})", reasons.join(", ")) };
    let failed = match (t.failed, t.failed_cached) {
        (0, _) => String::new(),
        (n, 0) => format!(", {n} failed"),
        (n, c) => format!(", {n} failed ({c} remembered)"),
    };
    format!("{} cache hits, {} remote, {} local{why}{failed}", t.hits, t.remote, t.local)
}

fn summary_line(records: &[Record], took: Duration) -> String {
    let t = totals(records, "");
    let c = totals(records, "cc");
    let cc = if c.compiles == 0 { String::new() } else { format!("; {} C compiles: {}", c.compiles, counts(&c)) };
    format!(
        "distbuild: {} rustc invocations in {:.1}s: {}{cc}; {:.1}s of compiling saved",
        t.compiles,
        took.as_secs_f64(),
        counts(&t),
        (t.saved_ms + c.saved_ms) as f64 / 1000.0
    )
}

/// `cargo distbuild stats`.
pub fn stats(reset: bool) -> anyhow::Result<ExitCode> {
    let file = stats_file();
    if reset {
        match std::fs::remove_file(&file) {
            Ok(()) => println!("cleared {}", file.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => println!("no stats yet"),
            Err(e) => return Err(e).with_context(|| format!("removing {}", file.display())),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let records = read_records(&file, 0);
    let t = totals(&records, "");
    let pct = |n: usize| if t.compiles == 0 { 0.0 } else { n as f64 * 100.0 / t.compiles as f64 };
    let rustc_records = records.iter().filter(|r| r.tool.is_empty()).count();
    println!("stats file          {}", file.display());
    println!("rustc invocations   {} compiles, {} queries", t.compiles, rustc_records - t.compiles);
    println!("cache hits          {} ({:.1}%)", t.hits, pct(t.hits));
    println!("remote executions   {} ({:.1}%)", t.remote, pct(t.remote));
    println!("local executions    {} ({:.1}%), {} of them stored in the cache", t.local, pct(t.local), t.stored);
    for (reason, n) in &t.reasons {
        println!("  {n:>6}  {reason}");
    }
    println!(
        "failed compiles     {} (compile errors, and build-script probes meant to fail), {} of them replayed from the cache",
        t.failed, t.failed_cached
    );
    println!(
        "time saved          {:.1}s (what the cached executions took, minus fetching them)",
        t.saved_ms as f64 / 1000.0
    );
    let c = totals(&records, "cc");
    let others = records.iter().filter(|r| r.tool == "cc").count() - c.compiles;
    println!("C/C++ compiles      {} (and {others} other compiler runs: preprocessing, probes, links)", c.compiles);
    println!("  {}", counts(&c));
    for (reason, n) in &c.reasons {
        println!("  {n:>6}  {reason}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Where the on-demand server keeps its pid, address and log.
fn local_dir() -> PathBuf {
    default_state_dir().join("local-server")
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

fn read_local() -> Option<(i32, String)> {
    let dir = local_dir();
    let pid = std::fs::read_to_string(dir.join("pid")).ok()?.trim().parse().ok()?;
    let addr = std::fs::read_to_string(dir.join("addr")).ok()?.trim().to_string();
    alive(pid).then_some((pid, addr))
}

async fn reachable(addr: &str) -> bool {
    let hostport = addr.trim_start_matches("grpc://").to_string();
    matches!(tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(hostport)).await, Ok(Ok(_)))
}

/// The local server's address, starting it if it is not running: a
/// filesystem cache in the default data directory, built-in workers, left
/// running for the next build (`cargo distbuild stop` ends it).
async fn local_server() -> anyhow::Result<String> {
    let dir = local_dir();
    // One `cargo distbuild` at a time checks for, and starts, the server.
    let _lock = lock_file(&dir.join("lock")).with_context(|| format!("locking {}", dir.display()))?;
    if let Some((_, addr)) = read_local()
        && reachable(&addr).await
    {
        return Ok(addr);
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let listen = format!("127.0.0.1:{port}");
    let log = std::fs::File::create(dir.join("server.log"))?;
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["server", "--listen", &listen]).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: setsid and close_range are async-signal-safe system
        // calls. The server outlives this process: it must not get the
        // terminal's Ctrl-C, nor keep descriptors it inherited open (a
        // caller's lock file or output pipe would stay held for as long as
        // the server runs: `flock L cargo distbuild build` never released
        // L). CLOSE_RANGE_CLOEXEC (4) closes them at exec, so std's own
        // exec-error pipe still works; kernels before 5.11 ignore it.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 4u32);
                Ok(())
            })
        };
    }
    let child = cmd.spawn().context("starting the local server")?;
    let addr = format!("grpc://{listen}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !reachable(&addr).await {
        if Instant::now() > deadline {
            bail!("the local server did not start; see {}", dir.join("server.log").display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::write(dir.join("pid"), child.id().to_string())?;
    std::fs::write(dir.join("addr"), &addr)?;
    eprintln!("distbuild: started a local server at {addr} (pid {}; `cargo distbuild stop` ends it)", child.id());
    Ok(addr)
}

/// `cargo distbuild stop`.
pub async fn stop() -> anyhow::Result<ExitCode> {
    let Some((pid, addr)) = read_local() else {
        println!("no local server is running");
        return Ok(ExitCode::SUCCESS);
    };
    // SAFETY: plain kill(2) of the pid we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(60);
    while alive(pid) {
        if Instant::now() > deadline {
            bail!("the local server (pid {pid}) did not stop within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = std::fs::remove_file(local_dir().join("pid"));
    println!("stopped the local server at {addr} (pid {pid})");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(krate: &str, outcome: &str, reason: Option<&str>, saved: i64) -> Record {
        Record {
            t: 0,
            start_us: 0,
            end_us: 0,
            tool: String::new(),
            krate: krate.into(),
            outcome: outcome.into(),
            reason: reason.map(str::to_string),
            stored: reason == Some("no worker with a linker"),
            ms: 1,
            saved_ms: saved,
            exit: 0,
        }
    }

    #[test]
    fn summary_counts_compiles_and_reasons() {
        let records = vec![
            rec("", "local", Some("version query"), 0),
            rec("a", "hit", None, 1500),
            rec("b", "hit", None, -20),
            rec("c", "remote", None, 0),
            rec("d", "local", Some("no worker with a linker"), 0),
            Record { exit: 1, ..rec("e", "local", Some("compile failed"), 0) },
            Record { exit: 1, ..rec("f", "hit", None, 0) },
        ];
        let line = summary_line(&records, Duration::from_millis(2500));
        assert_eq!(
            line,
            "distbuild: 6 rustc invocations in 2.5s: 2 cache hits, 1 remote, 1 local (1 no worker with a linker), 2 failed (1 remembered); 1.5s of compiling saved"
        );
        assert_eq!(totals(&records, "").stored, 1);
    }

    #[test]
    fn c_compiles_are_counted_apart() {
        let cc = |krate: &str, outcome: &str, reason: Option<&str>| Record {
            tool: "cc".into(),
            ..rec(krate, outcome, reason, 0)
        };
        let records = vec![
            rec("a", "hit", None, 1000),
            cc("", "local", Some("not a compile-only invocation (-E)")),
            cc("answer.c", "hit", None),
            cc("zstd.c", "remote", None),
            cc("x.c", "local", Some("unknown flag -Q")),
        ];
        let line = summary_line(&records, Duration::from_millis(1000));
        assert_eq!(
            line,
            "distbuild: 1 rustc invocations in 1.0s: 1 cache hits, 0 remote, 0 local; 3 C compiles: 1 cache hits, 1 remote, 1 local (1 unknown flag -Q); 1.0s of compiling saved"
        );
    }

    #[test]
    fn compiler_variables_keep_the_users_compiler() {
        let env = [
            ("CC", "clang -m64"),
            ("CC_x86_64-unknown-linux-gnu", "gcc-12"),
            ("CC_ENABLE_DEBUG_OUTPUT", "1"),
            ("HOST_CXX", "g++"),
            ("TARGET_CC", "/s/cc-shims/0123/cc"),
            ("PATH", "/bin"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let mut got = cc_env(Path::new("/b/distbuild-cc"), Path::new("/s/cc-shims"), env.into_iter());
        got.sort();
        let w = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let want = vec![
            ("CC".to_string(), w(&["/b/distbuild-cc", "clang", "-m64"])),
            ("CC_x86_64-unknown-linux-gnu".to_string(), w(&["/b/distbuild-cc", "gcc-12"])),
            ("CXX".to_string(), w(&["/b/distbuild-cc", "c++"])),
            ("HOST_CXX".to_string(), w(&["/b/distbuild-cc", "g++"])),
        ];
        assert_eq!(got, want);
    }

    /// A shim is one path that runs the whole command, arguments with
    /// quotes and spaces included, and is reused when it exists.
    #[test]
    fn a_shim_runs_the_command_it_stands_for() {
        let dir = tempfile::tempdir().unwrap();
        let words: Vec<String> = ["/bin/echo", "it's", "a b"].map(str::to_string).to_vec();
        let path = shim(dir.path(), &words).unwrap();
        assert_eq!(path.file_name().unwrap(), "it's");
        let out = std::process::Command::new(&path).arg("$HOME").output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "it's a b $HOME\n");
        let again = shim(dir.path(), &words).unwrap();
        assert_eq!(path, again);
        let cc: Vec<String> = ["/b/distbuild-cc", "/usr/bin/gcc-12", "-m64"].map(str::to_string).to_vec();
        assert_eq!(shim(dir.path(), &cc).unwrap().file_name().unwrap(), "gcc-12");
    }
}
