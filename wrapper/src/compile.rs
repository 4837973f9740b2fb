//! One compile, from cargo's command line to outputs where cargo expects
//! them: map, find inputs, build the Action, then hit, execute or run here.

use std::path::{Path, PathBuf};
use std::time::Instant;

use remote_apis::Digest;
use remote_apis::merkle::BuiltTree;
use remote_apis::reapi::{ActionResult, ExecutedActionMetadata, OutputFile};

use crate::args::{Compile, LocalReason};
use crate::hashcache::{Caches, DepInfoEntry, depinfo_key};
use crate::key::{self, BuiltAction, KEY_VERSION, KeyInputs};
use crate::local;
use crate::remote::Remote;
use crate::roots::{self, Roots};
use crate::settings::{Mode, Settings};
use crate::{depinfo, settings};

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

/// One invocation: what cargo asked and what the wrapper was told.
struct Job<'a> {
    settings: &'a Settings,
    caches: Caches,
    rustc: &'a Path,
    words: &'a [String],
    c: &'a Compile,
    trace: Trace,
}

impl Job<'_> {
    fn plain(&self, reason: LocalReason) -> Outcome {
        Outcome::local(local::run_plain(self.rustc, self.words), reason)
    }
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

pub fn run(settings: &Settings, rustc: &Path, words: &[String], c: &Compile) -> Outcome {
    let started = Instant::now();
    if settings.mode == Mode::Off {
        return Outcome::local(local::run_plain(rustc, words), LocalReason::Off);
    }
    if settings.mode == Mode::Remote && settings.recently_down() {
        return Outcome::local(local::run_plain(rustc, words), LocalReason::ServerUnavailable);
    }
    let job = Job {
        settings,
        caches: Caches::new(settings.cache_dir.clone(), remote_apis::DigestFunction::Sha256),
        rustc,
        words,
        c,
        trace: Trace::new(),
    };
    let prepared = match prepare(&job) {
        Ok(p) => p,
        Err(reason) => return job.plain(reason),
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(_) => return job.plain(LocalReason::ServerUnavailable),
    };
    rt.block_on(serve(&job, &prepared, started))
}

async fn serve(job: &Job<'_>, p: &Prepared, started: Instant) -> Outcome {
    let Job { settings, trace, .. } = job;
    let remote =
        match Remote::connect(&settings.server, &settings.instance, settings.connect_timeout, &settings.client).await {
            Ok(r) => r,
            Err(e) => return unavailable(job, &e),
        };
    trace.phase("connected");
    let digest = p.built.action_digest;
    let found = remote.lookup(digest).await;
    trace.phase("looked up");
    match found {
        Ok(Some(result)) if result.exit_code == 0 => {
            if let Ok(code) = materialize(&remote, job, p, &result).await {
                settings.mark_up();
                let saved = original_ms(&result) - started.elapsed().as_millis() as i64;
                return Outcome { code, outcome: "hit", reason: None, stored: false, saved_ms: saved };
            }
        }
        Ok(_) => {}
        Err(e) => return unavailable(job, &e),
    }
    settings.mark_up();
    if settings.mode == Mode::CacheOnly {
        return run_and_store(&remote, job, p, LocalReason::Off).await;
    }
    if settings.recently_without_workers(p.links) {
        let reason = if p.links { LocalReason::NoLinker } else { LocalReason::NoWorker };
        return run_and_store(&remote, job, p, reason).await;
    }
    if let Err(e) = remote.upload(&p.built, &p.toolchain).await {
        return unavailable(job, &e);
    }
    trace.phase("uploaded");
    let executed = remote.execute(digest, settings.queue_timeout).await;
    trace.phase("executed");
    match executed {
        Ok(resp) => {
            let result = resp.result.unwrap_or_default();
            if result.exit_code != 0 {
                // The worker may lack what this machine has (a system
                // library, a tool): the local run is the verdict.
                let code = local::run_plain(job.rustc, job.words);
                let reason = if code == 0 { LocalReason::RemoteFailed } else { LocalReason::CompileFailed };
                return Outcome::local(code, reason);
            }
            let written = materialize(&remote, job, p, &result).await;
            trace.phase("materialized");
            match written {
                Ok(code) => Outcome { code, outcome: "remote", reason: None, stored: false, saved_ms: 0 },
                Err(_) => job.plain(LocalReason::RemoteFailed),
            }
        }
        // No worker can run it (none offers the platform, none connected,
        // or the queue is too long): compile here and share the result.
        Err(s) if matches!(s.code(), tonic::Code::FailedPrecondition | tonic::Code::DeadlineExceeded) => {
            settings.mark_without_workers(p.links);
            let reason = if p.links && s.message().contains(key::LINKER_PROPERTY.0) {
                LocalReason::NoLinker
            } else {
                LocalReason::NoWorker
            };
            run_and_store(&remote, job, p, reason).await
        }
        Err(e) => unavailable(job, &e),
    }
}

/// The server failed: one warning per build, then plain local runs.
fn unavailable(job: &Job<'_>, e: &tonic::Status) -> Outcome {
    let settings = job.settings;
    if settings.mark_down() {
        eprintln!(
            "warning: distbuild: {} is unavailable ({}: {}); compiling locally",
            settings.server,
            e.code(),
            e.message()
        );
    }
    job.plain(LocalReason::ServerUnavailable)
}

/// How long the execution that produced `result` took.
fn original_ms(result: &ActionResult) -> i64 {
    let m = result.execution_metadata.as_ref();
    let ms =
        |t: Option<&remote_apis::protobuf::Timestamp>| t.map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000);
    match (
        ms(m.and_then(|m| m.worker_start_timestamp.as_ref())),
        ms(m.and_then(|m| m.worker_completed_timestamp.as_ref())),
    ) {
        (Some(a), Some(b)) if b >= a => b - a,
        _ => 0,
    }
}

/// Writes a result's outputs where cargo expects them and replays rustc's
/// output. Fails (nothing replayed) if an expected output is missing.
async fn materialize(
    remote: &Remote,
    job: &Job<'_>,
    p: &Prepared,
    result: &ActionResult,
) -> Result<i32, tonic::Status> {
    let Job { caches, c, .. } = job;
    let (stdout, stderr) = remote.streams(result).await?;
    let mut have: Vec<String> = Vec::new();
    let mut depinfo = p.depinfo_text.clone();
    for f in &result.output_files {
        let name = f.path.rsplit('/').next().unwrap_or_default().to_string();
        have.push(name.clone());
        if name == p.depinfo_name {
            if depinfo.is_none() {
                depinfo = Some(remote_depinfo(remote, caches.function(), c, p, f).await?);
            }
            continue;
        }
        let dest = p
            .roots
            .unmap(&f.path)
            .ok_or_else(|| tonic::Status::data_loss(format!("output {} outside the roots", f.path)))?;
        let digest = Digest::from_field(caches.function(), f.digest.as_ref(), "digest")
            .map_err(|e| tonic::Status::data_loss(e.0))?;
        remote.download_to(digest, &dest, f.is_executable).await?;
        caches.record(&dest, digest);
    }
    for name in c.output_names() {
        if name != p.depinfo_name && !have.contains(&name) {
            return Err(tonic::Status::data_loss(format!("the result lacks {name}")));
        }
    }
    if c.emit.iter().any(|e| e == "dep-info") {
        let text = depinfo.ok_or_else(|| tonic::Status::data_loss("the result lacks the dep-info"))?;
        local::write_atomic(&p.out_dir.join(&p.depinfo_name), text.as_bytes())
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
    }
    write_sidecar(c, p);
    local::replay(&stdout, &stderr);
    Ok(result.exit_code)
}

/// A registry crate's dep-info from its result, with this machine's paths.
/// Refused (so the result is not used) when the crate read a variable whose
/// value here differs from the one it saw.
async fn remote_depinfo(
    remote: &Remote,
    function: remote_apis::DigestFunction,
    c: &Compile,
    p: &Prepared,
    f: &remote_apis::reapi::OutputFile,
) -> Result<String, tonic::Status> {
    let digest =
        Digest::from_field(function, f.digest.as_ref(), "digest").map_err(|e| tonic::Status::data_loss(e.0))?;
    let text = String::from_utf8_lossy(&remote.read_blob(digest).await?).into_owned();
    let info = depinfo::parse(&text);
    if !crate::immutable::env_agrees(&info, &p.env) {
        return Err(tonic::Status::failed_precondition("the crate read a variable whose value differs here"));
    }
    if let Some(f) = crate::immutable::unkeyed_file(&info, &p.roots, &p.env, &p.inputs) {
        return Err(tonic::Status::failed_precondition(format!("the crate read {f}, which is not in its key")));
    }
    let outputs: Vec<PathBuf> =
        c.output_names().iter().filter(|n| **n != p.depinfo_name).map(|n| p.out_dir.join(n)).collect();
    Ok(crate::immutable::local_depinfo(&text, &p.roots, &p.env, &outputs))
}

/// Runs the Action's compile here and stores the result for everyone else.
async fn run_and_store(remote: &Remote, job: &Job<'_>, p: &Prepared, reason: LocalReason) -> Outcome {
    let Job { caches, rustc, words, c, .. } = job;
    let mut local_words = words.to_vec();
    local_words.extend(p.roots.remap_args());
    let start = settings::now_ms();
    let out = match local::run_captured(rustc, &local_words) {
        Ok(o) => o,
        Err(_) => return job.plain(reason),
    };
    let end = settings::now_ms();
    if out.code != 0 {
        local::replay(&out.stdout, &out.stderr);
        return Outcome::local(out.code, reason);
    }
    write_sidecar(c, p);
    let stored = store(remote, caches, p, &out, start, end).await.is_ok();
    local::replay(&out.stdout, &out.stderr);
    Outcome { code: 0, outcome: "local", reason: Some(reason), stored, saved_ms: 0 }
}

async fn store(
    remote: &Remote,
    caches: &Caches,
    p: &Prepared,
    out: &local::Captured,
    start: u64,
    end: u64,
) -> Result<(), tonic::Status> {
    let mut files = Vec::new();
    let mut blobs = Vec::new();
    let mut output_files = Vec::new();
    let outputs = &p.built.command.output_paths;
    for path in outputs {
        let Some(local) = p.roots.unmap(path) else { continue };
        let (digest, executable) = if path.ends_with(&format!("/{}", p.depinfo_name)) {
            // Stored as a worker would have written it: this machine's
            // paths mean nothing to the next one.
            let Ok(text) = std::fs::read_to_string(&local) else { continue };
            let targets: Vec<String> = outputs.iter().filter(|o| *o != path).cloned().collect();
            let stored = crate::immutable::worker_depinfo(&text, &p.roots, &targets);
            let digest = caches.function().digest_of(stored.as_bytes());
            blobs.push((digest, bytes::Bytes::from(stored)));
            (digest, false)
        } else {
            let Ok(d) = caches.digest(&local) else { continue };
            caches.record(&local, d.digest);
            files.push((d.digest, local));
            (d.digest, d.executable)
        };
        output_files.push(OutputFile {
            path: path.clone(),
            digest: Some(digest.to_proto()),
            is_executable: executable,
            ..Default::default()
        });
    }
    remote.upload_files(&files).await?;
    remote.upload_blobs(blobs).await?;
    let f = caches.function();
    let (so, se) = (f.digest_of(&out.stdout), f.digest_of(&out.stderr));
    remote.upload_blobs(vec![(so, out.stdout.clone().into()), (se, out.stderr.clone().into())]).await?;
    let ts = |ms: u64| remote_apis::protobuf::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    };
    let result = ActionResult {
        output_files,
        exit_code: 0,
        stdout_digest: Some(so.to_proto()),
        stderr_digest: Some(se.to_proto()),
        execution_metadata: Some(ExecutedActionMetadata {
            worker: "distbuild-rustc (local)".into(),
            worker_start_timestamp: Some(ts(start)),
            worker_completed_timestamp: Some(ts(end)),
            ..Default::default()
        }),
        ..Default::default()
    };
    remote.store_result(p.built.action_digest, result).await
}

/// The sidecar a library leaves next to its outputs: the stems of every
/// library it depends on, so a dependent can send them along (rustc needs
/// the whole graph, cargo passes only direct `--extern`s).
fn sidecar_path(stem: &str) -> PathBuf {
    PathBuf::from(format!("{stem}.dbdeps"))
}

fn write_sidecar(c: &Compile, p: &Prepared) {
    let stem = p.out_dir.join(format!("lib{}{}", c.crate_name, c.extra_filename));
    let _ = local::write_atomic(&sidecar_path(&stem.to_string_lossy()), p.closure.join("\n").as_bytes());
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
    let mut mapped = Vec::new();
    let mut externs = Vec::new();
    let mut native_dirs = Vec::new();
    for a in &c.args {
        let mut words = a.words();
        match (a.flag.as_deref(), a.value.as_deref()) {
            (None, Some(v)) | (Some("--out-dir"), Some(v)) => {
                let m = roots.map(v).ok_or_else(|| LocalReason::LocalPath(v.to_string()))?;
                *words.last_mut().unwrap() = roots.relative_to_cwd(&m);
            }
            (Some("-L"), Some(v)) => {
                let (kind, path) = v.split_once('=').unwrap_or(("all", v));
                match roots.map(path) {
                    Some(m) => {
                        if kind != "dependency" {
                            native_dirs.push((m.clone(), roots.absolute(path)));
                        }
                        words[1] = format!("{kind}={}", roots.relative_to_cwd(&m));
                    }
                    None if Path::new(path).is_absolute() && roots.mentioned_in(path).is_none() => {}
                    None => return Err(LocalReason::LocalPath(path.to_string())),
                }
            }
            (Some("--extern"), Some(v)) => {
                if let Some((name, path)) = v.split_once('=') {
                    let m = roots.map(path).ok_or_else(|| LocalReason::LocalPath(path.to_string()))?;
                    externs.push((
                        name.rsplit(':').next().unwrap_or(name).to_string(),
                        roots.absolute(path),
                        m.clone(),
                    ));
                    words[1] = format!("{name}={}", roots.relative_to_cwd(&m));
                }
            }
            (_, Some(v)) if roots.mentioned_in(v).is_some() => return Err(LocalReason::LocalPath(v.to_string())),
            _ => {}
        }
        mapped.extend(words);
    }

    let lock = settings.cache_dir.join("toolchain.lock");
    let toolchain = crate::toolchain::tree_locked(caches, &sysroot, &lock)
        .map_err(|_| LocalReason::LocalPath(sysroot.display().to_string()))?;
    trace.phase("toolchain tree");
    let immutable = crate::immutable::applies(roots.cwd_mapped());
    let (depinfo_text, info) = if immutable {
        (None, depinfo::DepInfo::default())
    } else {
        let (text, info) = dep_info(job, &roots, &mapped, &toolchain, &out_dir)?;
        (Some(text), info)
    };
    trace.phase("dep-info");

    // 5. Variables the crate reads.
    let mut env = Vec::new();
    if immutable {
        env = crate::immutable::package_env(&roots);
    }
    for (name, value) in &info.env {
        let Some(v) = value else { continue };
        if name == "OUT_DIR" {
            let m = roots.map(v).ok_or_else(|| LocalReason::EnvPath(name.clone()))?;
            env.push((name.clone(), m));
        } else if roots.mentioned_in(v).is_some() {
            return Err(LocalReason::EnvPath(name.clone()));
        } else {
            env.push((name.clone(), v.clone()));
        }
    }
    if let Ok(v) = std::env::var("RUSTC_BOOTSTRAP") {
        env.push(("RUSTC_BOOTSTRAP".into(), v));
    }

    // 6. Input files.
    let mut files = Vec::new();
    let mut add = |mapped: String, local: PathBuf| -> Result<(), LocalReason> {
        let d = caches.digest(&local).map_err(|_| LocalReason::LocalPath(local.display().to_string()))?;
        files.push((mapped, d.digest, d.executable, local));
        Ok(())
    };
    let mut dirs = Vec::new();
    for f in &info.files {
        let m = roots.map(f).ok_or_else(|| LocalReason::LocalPath(f.clone()))?;
        add(m, roots.absolute(f))?;
        dirs.extend(climbed_dirs(&roots, f));
    }
    if immutable {
        let out = std::env::var("OUT_DIR").ok().filter(|o| roots.map(o).is_some()).map(PathBuf::from);
        let package = crate::immutable::files_below(roots.cwd())
            .map_err(|_| LocalReason::LocalPath(roots.cwd().display().to_string()))?;
        let generated = match &out {
            Some(dir) => {
                crate::immutable::files_below(dir).map_err(|_| LocalReason::LocalPath(dir.display().to_string()))?
            }
            None => Vec::new(),
        };
        let generated = generated.into_iter().filter(|f| crate::immutable::may_be_read(f));
        for local in package.into_iter().chain(generated) {
            let m = roots
                .map(&local.to_string_lossy())
                .ok_or_else(|| LocalReason::LocalPath(local.display().to_string()))?;
            add(m, local)?;
        }
    }
    let mut closure: Vec<String> = Vec::new();
    for (name, local, m) in &externs {
        add(m.clone(), local.clone())?;
        let stem = local.with_extension("").to_string_lossy().to_string();
        let deps =
            std::fs::read_to_string(sidecar_path(&stem)).map_err(|_| LocalReason::UnknownDependency(name.clone()))?;
        closure.push(stem);
        closure.extend(deps.lines().filter(|l| !l.is_empty()).map(str::to_string));
    }
    closure.sort();
    closure.dedup();
    let preference: &[&str] = if links { &["rlib", "rmeta"] } else { &["rmeta", "rlib"] };
    for stem in &closure {
        let chosen = preference.iter().map(|ext| PathBuf::from(format!("{stem}.{ext}"))).find(|p| p.is_file());
        let so = PathBuf::from(format!("{stem}.so"));
        for local in chosen.into_iter().chain(so.is_file().then_some(so)) {
            let m = roots
                .map(&local.to_string_lossy())
                .ok_or_else(|| LocalReason::LocalPath(local.display().to_string()))?;
            add(m, local)?;
        }
    }
    for (m, dir) in &native_dirs {
        let entries = std::fs::read_dir(dir).map_err(|_| LocalReason::LocalPath(dir.display().to_string()))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if is_library(&name) && e.file_type().is_ok_and(|t| t.is_file()) {
                add(format!("{m}/{name}"), e.path())?;
            }
        }
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    files.dedup_by(|a, b| a.0 == b.0);

    // 7. Outputs.
    let out_mapped = roots.map(&out_dir.to_string_lossy()).ok_or_else(|| LocalReason::LocalPath(c.out_dir.clone()))?;
    let outputs: Vec<String> = c.output_names().iter().map(|n| format!("{out_mapped}/{n}")).collect();

    let inputs = KeyInputs {
        toolchain: toolchain.root_digest,
        args: &mapped,
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

/// What rustc and the linker look for in `-L native=` directories: libraries
/// by name. A build script's `OUT_DIR` also holds objects and probe
/// programs (cc-rs's `flag_check`) whose bytes vary between runs; they are
/// never read and would only make the key unstable.
fn is_library(name: &str) -> bool {
    name.ends_with(".a")
        || name.ends_with(".so")
        || name.contains(".so.")
        || name.ends_with(".rlib")
        || name.ends_with(".rmeta")
}

/// The directories `path` (as rustc wrote it) climbs out of with `..`,
/// mapped: `src/a/b/../c.rs` needs `src/a/b` to exist even when nothing in
/// it is read (libc's `#[path]` modules do this).
fn climbed_dirs(roots: &Roots, path: &str) -> Vec<String> {
    let mut prefix = PathBuf::new();
    let mut out = Vec::new();
    for comp in Path::new(path).components() {
        if comp == std::path::Component::ParentDir
            && let Some(m) = prefix.to_str().and_then(|p| roots.map(p))
        {
            out.push(m);
        }
        prefix.push(comp);
    }
    out
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
    let Job { caches, rustc, words, c, .. } = job;
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
    let result = local::run_captured(rustc, &pre);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_libraries_are_taken_from_native_directories() {
        for (name, want) in [
            ("libzstd.a", true),
            ("libssl.so", true),
            ("libssl.so.3", true),
            ("93acce08ba6f4ffe-static.o", false),
            ("flag_check", false),
            ("flag_check.c", false),
            ("generated.rs", false),
        ] {
            assert_eq!(is_library(name), want, "{name}");
        }
    }

    #[test]
    fn directories_climbed_out_of_are_kept() {
        let roots = Roots::new(Path::new("/t"), Some(Path::new("/h")), None, Path::new("/w"));
        assert_eq!(climbed_dirs(&roots, "src/lib.rs"), Vec::<String>::new());
        assert_eq!(
            climbed_dirs(&roots, "src/new/glibc/sysdeps/nptl/bits/../../x86/nptl/bits/m.rs"),
            vec!["ws/src/new/glibc/sysdeps/nptl/bits", "ws/src/new/glibc/sysdeps/nptl"]
        );
        assert_eq!(climbed_dirs(&roots, "/h/registry/src/x/a/../b.rs"), vec!["cargo-home/registry/src/x/a"]);
    }
}
