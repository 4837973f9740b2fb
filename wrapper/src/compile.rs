//! One compile, from cargo's command line to outputs where cargo expects
//! them: prepare the Action (`inputs.rs` chooses what enters the key), then
//! decide: replay a hit (or a remembered failure, `negative.rs`), execute
//! remotely, or run here (and store the result for everyone else).
//!
//! The decisions are written against three seams so that they are tested
//! without a compiler or a server (`compile/tests.rs`): [`Spawner`] starts
//! rustc, [`Console`] is where cargo reads its output, [`Server`] is the
//! REAPI side.

mod deliver;
mod early;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::time::Instant;

use remote_apis::merkle::BuiltTree;

use crate::args::{Compile, LocalReason};
use crate::hashcache::{Caches, DepInfoEntry, depinfo_key};
use crate::inputs::{self, Files};
use crate::key::{self, BuiltAction, KEY_VERSION, KeyInputs};
use crate::local::{Console, Processes, Spawner, Terminal};
use crate::remote::{Remote, Server};
use crate::roots::{self, Roots};
use crate::settings::{Mode, Settings};
use crate::{depinfo, negative, pipeline};

/// With `DISTBUILD_TRACE=FILE`, each phase of an invocation appends its
/// time to FILE (where the time of a build goes).
struct Trace(Option<(Instant, PathBuf)>);

impl Trace {
    fn new() -> Trace {
        Trace(std::env::var_os("DISTBUILD_TRACE").filter(|v| !v.is_empty()).map(|f| (Instant::now(), PathBuf::from(f))))
    }
    fn phase(&self, what: &str) {
        use std::io::Write;
        if let Some((t, file)) = &self.0 {
            let line = format!("{:>6} {:>9.1} ms {what}\n", std::process::id(), t.elapsed().as_secs_f64() * 1000.0);
            if let Ok(mut f) = std::fs::File::options().create(true).append(true).open(file) {
                let _ = f.write_all(line.as_bytes());
            }
        }
    }
}

/// How an invocation ended, for the stats file.
#[derive(Debug)]
pub struct Outcome {
    pub code: i32,
    pub outcome: &'static str,
    pub reason: Option<LocalReason>,
    pub stored: bool,
    pub saved_ms: i64,
}

impl Outcome {
    pub fn local(code: i32, reason: LocalReason) -> Outcome {
        Outcome { code, outcome: "local", reason: Some(reason), stored: false, saved_ms: 0 }
    }
}

/// One invocation: what cargo asked, what the wrapper was told, and the
/// seams it runs rustc and prints through.
struct Job<'a> {
    settings: &'a Settings,
    caches: Caches,
    rustc: &'a Path,
    words: &'a [String],
    c: &'a Compile,
    trace: Trace,
    spawner: &'a dyn Spawner,
    console: &'a dyn Console,
}

/// Everything known about a compile before talking to the server.
struct Prepared {
    roots: Roots,
    out_dir: PathBuf,
    /// dep-info text with this machine's paths, as rustc would write it;
    /// `None` for registry crates, whose dep-info comes with the result.
    depinfo_text: Option<String>,
    /// The variables in the key (5).
    env: Vec<(String, String)>,
    depinfo_name: String,
    toolchain: BuiltTree,
    built: BuiltAction,
    /// Library stems (path without extension) this crate depends on, transitively.
    closure: Vec<String>,
    links: bool,
    /// Paths in the input root of every input file (a registry crate's
    /// dep-info must name none outside them).
    inputs: std::collections::HashSet<String>,
}

impl Prepared {
    /// Where cargo expects the outputs (dep-info left out).
    fn local_outputs(&self, c: &Compile) -> Vec<PathBuf> {
        c.output_names().iter().filter(|n| **n != self.depinfo_name).map(|n| self.out_dir.join(n)).collect()
    }
}

pub fn run(settings: &Settings, rustc: &Path, words: &[String], c: &Compile) -> Outcome {
    let started = Instant::now();
    let job = Job {
        settings,
        caches: Caches::new(settings.cache_dir.clone(), remote_apis::DigestFunction::Sha256),
        rustc,
        words,
        c,
        trace: Trace::new(),
        spawner: &Processes,
        console: &Terminal,
    };
    if settings.mode == Mode::Off {
        return job.here(None, LocalReason::Off);
    }
    if settings.mode == Mode::Remote && settings.recently_down() {
        return job.here(None, LocalReason::ServerUnavailable);
    }
    let prepared = match prepare(&job) {
        Ok(p) => p,
        Err(reason) => return job.here(None, reason),
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(_) => return job.here(Some(&prepared), LocalReason::ServerUnavailable),
    };
    rt.block_on(async {
        let remote =
            Remote::connect(&settings.server, &settings.instance, settings.connect_timeout, &settings.client).await;
        match remote {
            Ok(remote) => serve(&job, &prepared, &remote, started).await,
            Err(e) => unavailable(&job, &prepared, &e),
        }
    })
}

/// The decisions, once the Action is built and a server connected.
async fn serve<S: Server>(job: &Job<'_>, p: &Prepared, remote: &S, started: Instant) -> Outcome {
    let Job { settings, trace, .. } = job;
    trace.phase("connected");
    let digest = p.built.action_digest;
    let found = remote.lookup(digest).await;
    trace.phase("looked up");
    match found {
        Ok(Some(result)) if result.exit_code == 0 => match deliver::materialize(remote, job, p, &result, false).await {
            Ok(code) => {
                settings.mark_up();
                let saved = crate::remote::execution_ms(&result) - started.elapsed().as_millis() as i64;
                return Outcome { code, outcome: "hit", reason: None, stored: false, saved_ms: saved };
            }
            // Part of the result reached cargo (the `.rmeta` and its
            // notification): only a local run can finish it now.
            Err(deliver::Failed::AfterHead) => return job.finish_here(p, LocalReason::RemoteFailed),
            Err(deliver::Failed::Before(e)) => job.trace.phase(&format!("result refused: {}", e.message())),
        },
        Ok(Some(result)) if negative::is_negative(&result) => {
            if let Ok((stdout, stderr)) = remote.streams(&result).await {
                settings.mark_up();
                job.console.stdout(&stdout);
                job.console.stderr(&stderr);
                return Outcome { code: result.exit_code, outcome: "hit", reason: None, stored: false, saved_ms: 0 };
            }
        }
        Ok(_) => {}
        Err(e) => return unavailable(job, p, &e),
    }
    settings.mark_up();
    if settings.mode == Mode::CacheOnly {
        return run_and_store(remote, job, p, LocalReason::Off).await;
    }
    if settings.recently_without_workers(p.links) {
        let reason = if p.links { LocalReason::NoLinker } else { LocalReason::NoWorker };
        return run_and_store(remote, job, p, reason).await;
    }
    if let Err(e) = remote.upload(&p.built, &p.toolchain).await {
        return unavailable(job, p, &e);
    }
    trace.phase("uploaded");
    let (executed, early) = early::execute(remote, job, p).await;
    trace.phase("executed");
    match executed {
        Ok(resp) => executed_here(remote, job, p, resp.result.unwrap_or_default(), early).await,
        // The `.rmeta` and stderr up to its notification reached cargo:
        // only a local run can finish the compile now.
        Err(_) if early => job.finish_here(p, LocalReason::RemoteFailed),
        // No worker can run it (none offers the platform, none connected,
        // or the queue is too long): compile here and share the result.
        Err(s) if matches!(s.code(), tonic::Code::FailedPrecondition | tonic::Code::DeadlineExceeded) => {
            settings.mark_without_workers(p.links);
            let reason = if p.links && s.message().contains(key::LINKER_PROPERTY.0) {
                LocalReason::NoLinker
            } else {
                LocalReason::NoWorker
            };
            run_and_store(remote, job, p, reason).await
        }
        Err(e) => unavailable(job, p, &e),
    }
}

/// A completed remote execution: its outputs to cargo, its failure
/// trusted and remembered, or (a failure that may be the worker's) the
/// compile run here as the verdict.
async fn executed_here<S: Server>(
    remote: &S,
    job: &Job<'_>,
    p: &Prepared,
    result: remote_apis::reapi::ActionResult,
    early: bool,
) -> Outcome {
    if result.exit_code != 0 && early {
        return job.finish_here(p, LocalReason::RemoteFailed);
    }
    if result.exit_code != 0 {
        if let Ok((stdout, stderr)) = remote.streams(&result).await
            && negative::trusted(result.exit_code, &stderr, p.links)
        {
            let stored = deliver::store_negative(remote, p, result.exit_code, &stdout, &stderr).await.is_ok();
            job.console.stdout(&stdout);
            job.console.stderr(&stderr);
            return Outcome { code: result.exit_code, outcome: "remote", reason: None, stored, saved_ms: 0 };
        }
        // The worker may lack what this machine has (a system library, a
        // tool): the local run is the verdict, and is shared.
        return run_and_store(remote, job, p, LocalReason::RemoteFailed).await;
    }
    let written = deliver::materialize(remote, job, p, &result, early).await;
    job.trace.phase("materialized");
    match written {
        Ok(code) => Outcome { code, outcome: "remote", reason: None, stored: false, saved_ms: 0 },
        Err(deliver::Failed::AfterHead) => job.finish_here(p, LocalReason::RemoteFailed),
        Err(deliver::Failed::Before(e)) => {
            job.trace.phase(&format!("result refused: {}", e.message()));
            job.here(Some(p), LocalReason::RemoteFailed)
        }
    }
}

/// The server failed: one warning per build, then local runs.
fn unavailable(job: &Job<'_>, p: &Prepared, e: &tonic::Status) -> Outcome {
    let settings = job.settings;
    if settings.mark_down() {
        job.console.stderr(
            format!(
                "warning: distbuild: {} is unavailable ({}: {}); compiling locally\n",
                settings.server,
                e.code(),
                e.message()
            )
            .as_bytes(),
        );
    }
    job.here(Some(p), LocalReason::ServerUnavailable)
}

/// Runs the Action's compile here and stores the result for everyone
/// else: a success, or a failure that is rustc's verdict on the code.
async fn run_and_store<S: Server>(remote: &S, job: &Job<'_>, p: &Prepared, reason: LocalReason) -> Outcome {
    let start = crate::settings::now_ms();
    let Some(out) = job.compile_here(Some(p), false) else {
        return Outcome::local(127, reason);
    };
    let end = crate::settings::now_ms();
    if out.code != 0 {
        let stored = negative::trusted(out.code, &out.stderr, p.links)
            && deliver::store_negative(remote, p, out.code, &out.stdout, &out.stderr).await.is_ok();
        let reason = if reason == LocalReason::RemoteFailed { LocalReason::CompileFailed } else { reason };
        return Outcome { stored, ..Outcome::local(out.code, reason) };
    }
    let stored = deliver::store(remote, &job.caches, p, &out, start, end).await.is_ok();
    Outcome { code: 0, outcome: "local", reason: Some(reason), stored, saved_ms: 0 }
}

impl Job<'_> {
    /// Compiles here, rustc's stderr streamed to cargo as it comes.
    fn here(&self, p: Option<&Prepared>, reason: LocalReason) -> Outcome {
        let code = self.compile_here(p, false).map(|o| o.code).unwrap_or(127);
        let reason = if code != 0 && reason == LocalReason::RemoteFailed { LocalReason::CompileFailed } else { reason };
        Outcome::local(code, reason)
    }

    /// Compiles here after a hit or a remote result delivered its `.rmeta`
    /// and stderr up to the notification: that part is not printed again.
    fn finish_here(&self, p: &Prepared, reason: LocalReason) -> Outcome {
        let code = self.compile_here(Some(p), true).map(|o| o.code).unwrap_or(127);
        Outcome::local(code, reason)
    }

    /// Runs rustc here in one of this machine's slots (`slots.rs`),
    /// streaming its stderr to cargo. With `p`, paths are remapped as in
    /// the Action and the sidecar is written before the metadata
    /// notification reaches cargo. `None` if rustc cannot be started (the
    /// reason is printed).
    fn compile_here(&self, p: Option<&Prepared>, skip_head: bool) -> Option<crate::local::Captured> {
        let _slot = crate::slots::acquire(&self.settings.cache_dir.join("slots"), crate::slots::local_slots()).ok();
        let mut words = self.words.to_vec();
        if let Some(p) = p {
            words.extend(p.roots.remap_args());
        }
        let mut live = pipeline::LiveLines::default();
        let mut skipping = skip_head;
        let ran = self.spawner.run(self.rustc, &words, &mut |chunk| {
            live.feed(chunk, &mut |line| {
                if line.metadata
                    && let Some(p) = p
                {
                    inputs::write_sidecar(self.c, &p.out_dir, &p.closure);
                }
                if !skipping {
                    self.console.stderr(line.bytes);
                    if line.metadata {
                        pipeline::test_pause(&self.c.crate_name);
                    }
                }
                skipping &= !line.metadata;
            })
        });
        match ran {
            Ok(out) => {
                if skipping {
                    // The run never reached the notification (it failed
                    // earlier): its errors must be seen, even if some
                    // lines were printed before.
                    self.console.stderr(&out.stderr);
                } else if out.stderr.len() > live.passed {
                    // A last line without a newline.
                    self.console.stderr(&out.stderr[live.passed..]);
                }
                self.console.stdout(&out.stdout);
                if out.code == 0
                    && let Some(p) = p
                {
                    inputs::write_sidecar(self.c, &p.out_dir, &p.closure);
                }
                Some(out)
            }
            Err(e) => {
                self.console.stderr(format!("distbuild-rustc: cannot run {}: {e}\n", self.rustc.display()).as_bytes());
                None
            }
        }
    }
}

/// Maps, hashes and assembles everything; an error is the reason to run
/// locally.
fn prepare(job: &Job<'_>) -> Result<Prepared, LocalReason> {
    let Job { settings, caches, rustc, c, trace, .. } = job;
    let sysroot = match &settings.sysroot {
        Some(s) => s.clone(),
        None => crate::toolchain::sysroot(rustc).map_err(|_| LocalReason::LocalPath(rustc.display().to_string()))?,
    };
    let cwd = std::env::current_dir().map_err(|_| LocalReason::LocalPath(".".into()))?;
    let cargo_home = crate::settings::cargo_home();
    let out_dir = roots::normalize(&cwd.join(&c.out_dir));
    let target_dir = roots::find_target_dir(&out_dir);
    let roots = Roots::new(&sysroot, cargo_home.as_deref(), target_dir.as_deref(), &cwd);
    let links = c.links();
    let mapped = inputs::map_args(&roots, c)?;

    let lock = settings.cache_dir.join("toolchain.lock");
    let toolchain = crate::toolchain::tree_locked(caches, &sysroot, &lock)
        .map_err(|_| LocalReason::LocalPath(sysroot.display().to_string()))?;
    trace.phase("toolchain tree");
    let immutable = crate::immutable::applies(roots.cwd_mapped());
    let (depinfo_text, info) = if immutable {
        (None, depinfo::DepInfo::default())
    } else {
        let (text, info) = dep_info(job, &roots, &mapped.words, &toolchain, &out_dir)?;
        (Some(text), info)
    };
    trace.phase("dep-info");

    let env = inputs::key_env(&roots, &info, immutable)?;
    let mut files = Files::new(caches, &roots);
    files.sources(&info)?;
    if immutable {
        files.package()?;
    }
    let closure = files.externs(&mapped.externs, links)?;
    files.native(&mapped.native_dirs)?;
    let (files, dirs) = files.finish();
    let outputs = inputs::outputs(&roots, c, &out_dir)?;

    let inputs = KeyInputs {
        toolchain: toolchain.root_digest,
        args: &mapped.words,
        cwd: roots.cwd_mapped(),
        env: &env,
        files: &files,
        dirs: &dirs,
        outputs: &outputs,
        links,
    };
    let built = key::build(caches.function(), &inputs).map_err(LocalReason::LocalPath)?;
    trace.phase("action built");
    Ok(Prepared {
        depinfo_name: format!("{}{}.d", c.crate_name, c.extra_filename),
        roots,
        out_dir,
        depinfo_text,
        env,
        toolchain,
        built,
        closure,
        links,
        inputs: files.iter().map(|f| f.0.clone()).collect(),
    })
}

/// The crate's dep-info: remembered (when every file and variable it lists
/// is unchanged) or from a `--emit=dep-info` pre-pass of rustc.
fn dep_info(
    job: &Job<'_>,
    roots: &Roots,
    mapped: &[String],
    toolchain: &BuiltTree,
    out_dir: &Path,
) -> Result<(String, depinfo::DepInfo), LocalReason> {
    let Job { caches, rustc, words, c, spawner, .. } = job;
    let toolchain_digest = toolchain.root_digest.to_string();
    let args = mapped.join("\0");
    let key = depinfo_key(&[KEY_VERSION, &toolchain_digest, roots.cwd_mapped(), &args]);
    if let Some(entry) = caches.load_depinfo(&key)
        && let Some(text) = roots.concrete_text(&entry.text)
        && entry_is_current(caches, roots, &entry)
    {
        let info = depinfo::parse(&text);
        return Ok((text, info));
    }
    let tmp = out_dir.join(format!(".distbuild-depinfo-{}", std::process::id()));
    let mut pre = Vec::new();
    let mut it = words.iter();
    while let Some(w) = it.next() {
        if w == "--emit" || w == "--out-dir" || w == "-o" {
            it.next();
        } else if !(w.starts_with("--emit=") || w.starts_with("--out-dir=")) {
            pre.push(w.clone());
        }
    }
    pre.push("--emit=dep-info".into());
    pre.push("--out-dir".into());
    pre.push(tmp.to_string_lossy().to_string());
    let _ = std::fs::create_dir_all(&tmp);
    // Not in a local slot: the pre-pass stops before type checking, and
    // every compile needs one, remote or not.
    let result = spawner.run(rustc, &pre, &mut |_| {});
    let file = tmp.join(format!("{}{}.d", c.crate_name, c.extra_filename));
    let text = std::fs::read_to_string(&file);
    let _ = std::fs::remove_dir_all(&tmp);
    let text = match (result, text) {
        (Ok(r), Ok(t)) if r.code == 0 => t.replace(&*tmp.to_string_lossy(), &out_dir.to_string_lossy()),
        _ => return Err(LocalReason::DepInfoFailed),
    };
    let info = depinfo::parse(&text);
    let mut files = Vec::new();
    for f in &info.files {
        let m = roots.map(f).ok_or_else(|| LocalReason::LocalPath(f.clone()))?;
        let d = caches.digest(&roots.absolute(f)).map_err(|_| LocalReason::LocalPath(f.clone()))?;
        files.push((m, d.digest.to_string()));
    }
    let env = info.env.iter().map(|(n, v)| (n.clone(), v.as_ref().map(|v| roots.abstract_text(v)))).collect();
    caches.store_depinfo(&key, &DepInfoEntry { text: roots.abstract_text(&text), files, env });
    Ok((text, info))
}

fn entry_is_current(caches: &Caches, roots: &Roots, entry: &DepInfoEntry) -> bool {
    let files_ok = entry.files.iter().all(|(m, d)| {
        roots.unmap(m).and_then(|p| caches.digest(&p).ok()).is_some_and(|now| now.digest.to_string() == *d)
    });
    let env_ok = entry.env.iter().all(|(n, v)| std::env::var(n).ok().map(|now| roots.abstract_text(&now)) == *v);
    files_ok && env_ok
}
