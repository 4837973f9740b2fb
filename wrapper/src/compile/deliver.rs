//! Results to cargo, and local results to the cache. A result is delivered
//! `.rmeta` first (`pipeline.rs`): the `.rmeta`, the sidecar, stderr up to
//! and including the metadata notification, then the rest of the outputs,
//! the dep-info and the rest of stderr, so cargo starts dependents as it
//! does with a plain rustc.

use std::path::PathBuf;

use bytes::Bytes;
use remote_apis::Digest;
use remote_apis::reapi::{ActionResult, ExecutedActionMetadata, OutputFile};

use super::{Job, Prepared};
use crate::args::Compile;
use crate::hashcache::Caches;
use crate::remote::Server;
use crate::{depinfo, inputs, local, negative, pipeline};

/// Why a result was not (wholly) delivered.
#[derive(Debug)]
pub(super) enum Failed {
    /// Nothing reached cargo: the compile may go on as if there were no result.
    Before(tonic::Status),
    /// The `.rmeta` and stderr up to its notification reached cargo, then
    /// something failed: a local run must finish without printing them again.
    AfterHead,
}

impl From<tonic::Status> for Failed {
    fn from(s: tonic::Status) -> Failed {
        Failed::Before(s)
    }
}

/// One output of a result: where it goes here.
struct Output {
    dest: PathBuf,
    digest: Digest,
    executable: bool,
}

/// Writes a result's outputs where cargo expects them and replays rustc's
/// output, `.rmeta` first. Everything that can refuse the result (a
/// missing output, a registry crate's dep-info that does not agree with
/// this machine) is checked before anything reaches cargo.
///
/// With `head_delivered`, the `.rmeta` and stderr up to its notification
/// already reached cargo while the compile ran (`early.rs`): they are not
/// delivered again, and any failure is [`Failed::AfterHead`].
pub(super) async fn materialize<S: Server>(
    remote: &S,
    job: &Job<'_>,
    p: &Prepared,
    result: &ActionResult,
    head_delivered: bool,
) -> Result<i32, Failed> {
    match deliver(remote, job, p, result, head_delivered).await {
        Err(Failed::Before(_)) if head_delivered => Err(Failed::AfterHead),
        other => other,
    }
}

async fn deliver<S: Server>(
    remote: &S,
    job: &Job<'_>,
    p: &Prepared,
    result: &ActionResult,
    head_delivered: bool,
) -> Result<i32, Failed> {
    let Job { caches, c, console, .. } = job;
    let (stdout, stderr) = remote.streams(result).await?;
    let (mut outputs, depinfo) = plan(remote, job, p, result).await?;
    let local_outputs = p.local_outputs(c);
    let stderr = pipeline::localize_all(&stderr, &local_outputs);
    let head = pipeline::after_metadata(&stderr).unwrap_or(0);
    let rmeta = outputs.iter().position(|o| o.dest.extension().is_some_and(|e| e == "rmeta"));
    if head_delivered {
        // In place already, unless the result's differs from what the
        // running operation had written.
        if let Some(i) = rmeta
            && caches.digest(&outputs[i].dest).is_ok_and(|d| d.digest == outputs[i].digest)
        {
            outputs.remove(i);
        }
    } else if let Some(i) = rmeta.filter(|_| head > 0) {
        let o = outputs.remove(i);
        remote.download_to(o.digest, &o.dest, o.executable).await?;
        caches.record(&o.dest, o.digest);
        inputs::write_sidecar(c, &p.out_dir, &p.closure);
        console.stderr(&stderr[..head]);
        pipeline::test_pause(&c.crate_name);
    }
    let head = if rmeta.is_some() || head_delivered { head } else { 0 };
    let rest = async {
        for o in &outputs {
            remote.download_to(o.digest, &o.dest, o.executable).await?;
            caches.record(&o.dest, o.digest);
        }
        if let Some(text) = &depinfo {
            local::write_atomic(&p.out_dir.join(&p.depinfo_name), text.as_bytes())
                .map_err(|e| tonic::Status::internal(e.to_string()))?;
        }
        Ok::<(), tonic::Status>(())
    }
    .await;
    match rest {
        Err(_) if head > 0 => return Err(Failed::AfterHead),
        Err(e) => return Err(Failed::Before(e)),
        Ok(()) => {}
    }
    inputs::write_sidecar(c, &p.out_dir, &p.closure);
    console.stderr(&stderr[head..]);
    console.stdout(&stdout);
    Ok(result.exit_code)
}

/// The outputs to download (dep-info apart) and the dep-info to write
/// (when cargo asked for one); refused if an expected output is missing.
async fn plan<S: Server>(
    remote: &S,
    job: &Job<'_>,
    p: &Prepared,
    result: &ActionResult,
) -> Result<(Vec<Output>, Option<String>), tonic::Status> {
    let Job { caches, c, .. } = job;
    let mut have: Vec<String> = Vec::new();
    let mut outputs = Vec::new();
    let mut depinfo = p.depinfo_text.clone();
    for f in &result.output_files {
        let name = f.path.rsplit('/').next().unwrap_or_default().to_string();
        have.push(name.clone());
        let digest = Digest::from_field(caches.function(), f.digest.as_ref(), "digest")
            .map_err(|e| tonic::Status::data_loss(e.0))?;
        if name == p.depinfo_name {
            if depinfo.is_none() {
                depinfo = Some(remote_depinfo(remote, c, p, digest).await?);
            }
            continue;
        }
        let dest = p
            .roots
            .unmap(&f.path)
            .ok_or_else(|| tonic::Status::data_loss(format!("output {} outside the roots", f.path)))?;
        outputs.push(Output { dest, digest, executable: f.is_executable });
    }
    for name in c.output_names() {
        if name != p.depinfo_name && !have.contains(&name) {
            return Err(tonic::Status::data_loss(format!("the result lacks {name}")));
        }
    }
    if !c.emit.iter().any(|e| e == "dep-info") {
        return Ok((outputs, None));
    }
    let text = depinfo.ok_or_else(|| tonic::Status::data_loss("the result lacks the dep-info"))?;
    Ok((outputs, Some(text)))
}

/// A registry crate's dep-info from its result, with this machine's paths.
/// Refused (so the result is not used) when the crate read a variable whose
/// value here differs from the one it saw.
async fn remote_depinfo<S: Server>(
    remote: &S,
    c: &Compile,
    p: &Prepared,
    digest: Digest,
) -> Result<String, tonic::Status> {
    let text = String::from_utf8_lossy(&remote.read_blob(digest).await?).into_owned();
    let info = depinfo::parse(&text);
    if !crate::immutable::env_agrees(&info, &p.env) {
        return Err(tonic::Status::failed_precondition("the crate read a variable whose value differs here"));
    }
    if let Some(f) = crate::immutable::unkeyed_file(&info, &p.roots, &p.env, &p.inputs) {
        return Err(tonic::Status::failed_precondition(format!("the crate read {f}, which is not in its key")));
    }
    Ok(crate::immutable::local_depinfo(&text, &p.roots, &p.env, &p.local_outputs(c)))
}

/// Stores the result of a local run that succeeded.
pub(super) async fn store<S: Server>(
    remote: &S,
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
            blobs.push((digest, Bytes::from(stored)));
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
    let metadata = ExecutedActionMetadata {
        worker: "distbuild-rustc (local)".into(),
        worker_start_timestamp: Some(timestamp(start)),
        worker_completed_timestamp: Some(timestamp(end)),
        ..Default::default()
    };
    store_streams(remote, p, ActionResult { output_files, ..Default::default() }, metadata, out).await
}

/// Remembers a failure that is rustc's verdict on the code (`negative.rs`).
pub(super) async fn store_negative<S: Server>(
    remote: &S,
    p: &Prepared,
    code: i32,
    stdout: &[u8],
    stderr: &[u8],
) -> Result<(), tonic::Status> {
    let out = local::Captured { code, stdout: stdout.to_vec(), stderr: stderr.to_vec() };
    let metadata = ExecutedActionMetadata { worker: negative::MARK.into(), ..Default::default() };
    store_streams(remote, p, ActionResult { exit_code: code, ..Default::default() }, metadata, &out).await
}

async fn store_streams<S: Server>(
    remote: &S,
    p: &Prepared,
    mut result: ActionResult,
    metadata: ExecutedActionMetadata,
    out: &local::Captured,
) -> Result<(), tonic::Status> {
    let f = p.toolchain.root_digest.function;
    let (so, se) = (f.digest_of(&out.stdout), f.digest_of(&out.stderr));
    remote.upload_blobs(vec![(so, out.stdout.clone().into()), (se, out.stderr.clone().into())]).await?;
    result.stdout_digest = Some(so.to_proto());
    result.stderr_digest = Some(se.to_proto());
    result.execution_metadata = Some(metadata);
    remote.store_result(p.built.action_digest, result).await
}

fn timestamp(ms: u64) -> remote_apis::protobuf::Timestamp {
    remote_apis::protobuf::Timestamp { seconds: (ms / 1000) as i64, nanos: ((ms % 1000) * 1_000_000) as i32 }
}
