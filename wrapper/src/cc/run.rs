//! One C compile, served from the ActionCache, executed remotely, or run
//! here (and stored): the rustc wrapper's rules. A server problem means a
//! local run; a failed remote compile is rerun here, whose result (and
//! message) is the verdict.

use std::path::Path;

use remote_apis::Digest;
use remote_apis::reapi::{ActionResult, ExecutedActionMetadata, OutputFile};

use super::args::{CcCompile, CcReason};
use super::deps;
use super::prepare::{Place, Prepared, prepare};
use crate::hashcache::Caches;
use crate::local;
use crate::remote::{Remote, Server};
use crate::settings::{self, Mode, Settings};

/// How an invocation ended, for the stats file.
pub struct CcOutcome {
    pub code: i32,
    pub outcome: &'static str,
    pub reason: Option<CcReason>,
    pub stored: bool,
    pub saved_ms: i64,
}

impl CcOutcome {
    pub fn local(code: i32, reason: CcReason) -> CcOutcome {
        CcOutcome { code, outcome: "local", reason: Some(reason), stored: false, saved_ms: 0 }
    }
}

struct Job<'a> {
    settings: &'a Settings,
    caches: Caches,
    compiler: &'a Path,
    words: &'a [String],
    c: &'a CcCompile,
}

impl Job<'_> {
    fn plain(&self, reason: CcReason) -> CcOutcome {
        CcOutcome::local(local::run_plain(self.compiler, self.words), reason)
    }
}

pub fn run(settings: &Settings, compiler: &Path, words: &[String], c: &CcCompile) -> CcOutcome {
    let started = std::time::Instant::now();
    let caches = Caches::new(settings.cache_dir.clone(), remote_apis::DigestFunction::Sha256);
    let job = Job { settings, caches, compiler, words, c };
    if settings.mode == Mode::Off {
        return job.plain(CcReason::Off);
    }
    if settings.mode == Mode::Remote && settings.recently_down() {
        return job.plain(CcReason::ServerUnavailable);
    }
    let var = |n: &str| std::env::var_os(n).is_some_and(|v| !v.is_empty());
    if let Some(v) = super::prepare::COMPILER_ENV.iter().find(|n| var(n)) {
        return job.plain(CcReason::Env(v.to_string()));
    }
    let prepared = match Place::from_env() {
        Ok(place) => prepare(&job.caches, &settings.cache_dir, compiler, c, &place),
        Err(_) => Err(CcReason::PrePassFailed),
    };
    let p = match prepared {
        Ok(p) => p,
        Err(reason) => return job.plain(reason),
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(_) => return job.plain(CcReason::ServerUnavailable),
    };
    rt.block_on(serve(&job, &p, started))
}

async fn serve(job: &Job<'_>, p: &Prepared, started: std::time::Instant) -> CcOutcome {
    let settings = job.settings;
    let remote =
        match Remote::connect(&settings.server, &settings.instance, settings.connect_timeout, &settings.client).await {
            Ok(r) => r,
            Err(e) => return unavailable(job, &e),
        };
    let digest = p.built.action_digest;
    match remote.lookup(digest).await {
        Ok(Some(result)) if result.exit_code == 0 => {
            if let Ok(code) = materialize(&remote, job, p, &result).await {
                settings.mark_up();
                let saved = crate::remote::execution_ms(&result) - started.elapsed().as_millis() as i64;
                return CcOutcome { code, outcome: "hit", reason: None, stored: false, saved_ms: saved };
            }
        }
        Ok(_) => {}
        Err(e) => return unavailable(job, &e),
    }
    settings.mark_up();
    if settings.mode == Mode::CacheOnly {
        return run_and_store(&remote, job, p, CcReason::Off).await;
    }
    if settings.recently_without_workers(false) {
        return run_and_store(&remote, job, p, CcReason::NoWorker).await;
    }
    if let Err(e) = remote.upload(&p.built, &p.built.input_root).await {
        return unavailable(job, &e);
    }
    match remote.execute(digest, settings.queue_timeout).await {
        Ok(resp) => {
            let result = resp.result.unwrap_or_default();
            if result.exit_code != 0 {
                let code = local::run_plain(job.compiler, job.words);
                let reason = if code == 0 { CcReason::RemoteFailed } else { CcReason::CompileFailed };
                return CcOutcome::local(code, reason);
            }
            match materialize(&remote, job, p, &result).await {
                Ok(code) => CcOutcome { code, outcome: "remote", reason: None, stored: false, saved_ms: 0 },
                Err(_) => job.plain(CcReason::RemoteFailed),
            }
        }
        Err(s) if matches!(s.code(), tonic::Code::FailedPrecondition | tonic::Code::DeadlineExceeded) => {
            settings.mark_without_workers(false);
            run_and_store(&remote, job, p, CcReason::NoWorker).await
        }
        Err(e) => unavailable(job, &e),
    }
}

/// The server failed: one warning per build, then plain local runs.
fn unavailable(job: &Job<'_>, e: &tonic::Status) -> CcOutcome {
    let settings = job.settings;
    if settings.mark_down() {
        eprintln!(
            "warning: distbuild: {} is unavailable ({}: {}); compiling locally",
            settings.server,
            e.code(),
            e.message()
        );
    }
    job.plain(CcReason::ServerUnavailable)
}

/// Writes the `.d` file `-MD`/`-MMD` asked for.
fn write_depfile(job: &Job<'_>, p: &Prepared) -> std::io::Result<()> {
    match job.c.depfile_path() {
        Some(path) => {
            local::write_atomic(&p.roots.absolute(&path), deps::depfile_text(job.c, &p.roots, &p.files).as_bytes())
        }
        None => Ok(()),
    }
}

/// The object where the build expects it, the `.d` file, and the
/// compiler's messages. Fails (nothing replayed) if the object is missing.
async fn materialize(
    remote: &Remote,
    job: &Job<'_>,
    p: &Prepared,
    result: &ActionResult,
) -> Result<i32, tonic::Status> {
    let (stdout, stderr) = remote.streams(result).await?;
    let f = result
        .output_files
        .iter()
        .find(|f| f.path == p.output_mapped)
        .ok_or_else(|| tonic::Status::data_loss("the result lacks the object"))?;
    let digest = Digest::from_field(job.caches.function(), f.digest.as_ref(), "digest")
        .map_err(|e| tonic::Status::data_loss(e.0))?;
    remote.download_to(digest, &p.output, false).await?;
    job.caches.record(&p.output, digest);
    write_depfile(job, p).map_err(|e| tonic::Status::internal(e.to_string()))?;
    local::replay(&stdout, &stderr);
    Ok(result.exit_code)
}

/// Compiles here and stores the result for everyone else.
async fn run_and_store(remote: &Remote, job: &Job<'_>, p: &Prepared, reason: CcReason) -> CcOutcome {
    let start = settings::now_ms();
    let out = match local::run_captured(job.compiler, job.words) {
        Ok(o) => o,
        Err(_) => return job.plain(reason),
    };
    let end = settings::now_ms();
    local::replay(&out.stdout, &out.stderr);
    if out.code != 0 {
        return CcOutcome::local(out.code, CcReason::CompileFailed);
    }
    let stored = store(remote, job, p, &out, start, end).await.is_ok();
    CcOutcome { code: 0, outcome: "local", reason: Some(reason), stored, saved_ms: 0 }
}

async fn store(
    remote: &Remote,
    job: &Job<'_>,
    p: &Prepared,
    out: &local::Captured,
    start: u64,
    end: u64,
) -> Result<(), tonic::Status> {
    let f = job.caches.function();
    let d = job.caches.digest(&p.output).map_err(|e| tonic::Status::internal(e.to_string()))?;
    remote.upload_files(&[(d.digest, p.output.clone())]).await?;
    let (so, se) = (f.digest_of(&out.stdout), f.digest_of(&out.stderr));
    remote.upload_blobs(vec![(so, out.stdout.clone().into()), (se, out.stderr.clone().into())]).await?;
    let ts = |ms: u64| remote_apis::protobuf::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    };
    let result = ActionResult {
        output_files: vec![OutputFile {
            path: p.output_mapped.clone(),
            digest: Some(d.digest.to_proto()),
            is_executable: false,
            ..Default::default()
        }],
        exit_code: 0,
        stdout_digest: Some(so.to_proto()),
        stderr_digest: Some(se.to_proto()),
        execution_metadata: Some(ExecutedActionMetadata {
            worker: "distbuild-cc (local)".into(),
            worker_start_timestamp: Some(ts(start)),
            worker_completed_timestamp: Some(ts(end)),
            ..Default::default()
        }),
        ..Default::default()
    };
    remote.store_result(p.built.action_digest, result).await
}
