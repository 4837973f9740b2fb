//! An ActionResult as HTML: exit code, outputs with download links,
//! stdout and stderr inline (up to [`INLINE`] each, then a link), and the
//! ExecutedActionMetadata timeline. Shared by the action and operation pages.
//!
//! Stable hooks: `#result`, `#exit-code`, `#outputs` (rows `tr.output`),
//! `pre#stdout`, `pre#stderr` (each followed by `a.full-output` when cut),
//! `#timeline`, `#result-worker`.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use remote_apis::reapi::{self, ActionResult, ExecutedActionMetadata};
use remote_apis::{Digest, DigestFunction};

use super::{blob_href, digest_path, escape, fmt_bytes, fmt_time};
use crate::http::HttpState;

/// stdout and stderr are shown inline up to this many bytes.
const INLINE: u64 = 64 << 10;

/// Appends the result's sections to `out`. Problems reading its blobs are
/// said in place: the rest of the page still helps.
pub async fn render(state: &HttpState, function: DigestFunction, r: &ActionResult, out: &mut String) {
    let class = if r.exit_code == 0 { "ok" } else { "failed" };
    let _ = write!(
        out,
        "<div id=\"result\"><table><tr><th>Exit code</th><td id=\"exit-code\" class=\"{class}\">{}</td></tr>",
        r.exit_code
    );
    let worker = r.execution_metadata.as_ref().map_or("", |m| m.worker.as_str());
    let _ = write!(out, "<tr><th>Worker</th><td id=\"result-worker\">{}</td></tr></table>", escape(worker));
    outputs(function, r, out);
    for (id, raw, digest) in
        [("stdout", &r.stdout_raw, r.stdout_digest.as_ref()), ("stderr", &r.stderr_raw, r.stderr_digest.as_ref())]
    {
        let _ = write!(out, "<h3>{id}</h3>");
        stream_text(state, function, id, raw, digest, out).await;
    }
    if let Some(meta) = &r.execution_metadata {
        timeline(meta, out);
    }
    out.push_str("</div>");
}

#[allow(deprecated)] // REAPI 2.0 results carry the split symlink fields
fn outputs(function: DigestFunction, r: &ActionResult, out: &mut String) {
    let empty = r.output_files.is_empty()
        && r.output_directories.is_empty()
        && r.output_symlinks.is_empty()
        && r.output_file_symlinks.is_empty()
        && r.output_directory_symlinks.is_empty();
    out.push_str("<h3>Outputs</h3>");
    if empty {
        out.push_str("<p class=\"muted\" id=\"outputs\">No outputs.</p>");
        return;
    }
    out.push_str("<table id=\"outputs\"><tr><th>Path</th><th>Kind</th><th>Size</th><th>Content</th></tr>");
    for f in &r.output_files {
        let (size, link) = match parse(function, f.digest.as_ref()) {
            Some(d) => (fmt_bytes(d.size), download(&d, Some(&f.path), "download")),
            None => (String::new(), "<span class=\"failed\">malformed digest</span>".into()),
        };
        let kind = if f.is_executable { "file, executable" } else { "file" };
        row(out, &f.path, kind, &size, &link);
    }
    for d in &r.output_directories {
        let link = match parse(function, d.tree_digest.as_ref()) {
            Some(t) => format!(
                "<a class=\"browse\" href=\"/output-tree/{}\">browse</a> · {}",
                escape(&digest_path(&t)),
                download(&t, None, "Tree proto")
            ),
            None => "<span class=\"failed\">malformed digest</span>".into(),
        };
        row(out, &d.path, "directory", "", &link);
    }
    let links = r.output_symlinks.iter().chain(&r.output_file_symlinks).chain(&r.output_directory_symlinks);
    for s in links {
        row(out, &s.path, "symlink", "", &format!("→ <span class=\"mono\">{}</span>", escape(&s.target)));
    }
    out.push_str("</table>");
}

fn row(out: &mut String, path: &str, kind: &str, size: &str, content: &str) {
    let _ = write!(
        out,
        "<tr class=\"output\"><td class=\"mono\">{}</td><td>{kind}</td><td>{}</td><td>{content}</td></tr>",
        escape(path),
        escape(size)
    );
}

fn parse(function: DigestFunction, d: Option<&reapi::Digest>) -> Option<Digest> {
    d.and_then(|d| Digest::from_proto(function, d).ok())
}

fn download(d: &Digest, name: Option<&str>, label: &str) -> String {
    format!("<a class=\"download\" href=\"{}\">{}</a>", escape(&blob_href(d, name)), escape(label))
}

/// stdout or stderr: the inlined bytes, or the first [`INLINE`] bytes of
/// the blob, then a link to all of it.
async fn stream_text(
    state: &HttpState,
    function: DigestFunction,
    id: &str,
    raw: &[u8],
    digest: Option<&reapi::Digest>,
    out: &mut String,
) {
    let digest = parse(function, digest);
    let (head, total) = if !raw.is_empty() {
        (raw[..raw.len().min(INLINE as usize)].to_vec(), raw.len() as u64)
    } else {
        match digest {
            None => (Vec::new(), 0),
            Some(d) if d.size == 0 => (Vec::new(), 0),
            Some(d) => match read_head(state, &d).await {
                Ok(bytes) => (bytes, d.size),
                Err(e) => {
                    let _ = write!(out, "<p class=\"failed\" id=\"{id}\">Cannot read it: {}</p>", escape(&e.message));
                    return;
                }
            },
        }
    };
    if total == 0 {
        let _ = write!(out, "<p class=\"muted\" id=\"{id}\">(empty)</p>");
        return;
    }
    let _ = write!(out, "<pre id=\"{id}\">{}</pre>", escape(&String::from_utf8_lossy(&head)));
    if total > head.len() as u64 {
        let more = match digest {
            Some(d) => format!(
                "<a class=\"download full-output\" href=\"{}\">all of it ({})</a>",
                escape(&blob_href(&d, Some(&format!("{id}.txt")))),
                fmt_bytes(total)
            ),
            None => String::new(),
        };
        let _ = write!(out, "<p class=\"cut\">Cut after {}. {more}</p>", fmt_bytes(head.len() as u64),);
    }
}

/// The first [`INLINE`] bytes of a blob.
async fn read_head(state: &HttpState, d: &Digest) -> crate::error::Result<Vec<u8>> {
    let mut stream = state.cas.get(d, 0, Some(INLINE)).await?;
    let mut buf = Vec::with_capacity(d.size.min(INLINE) as usize);
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk?);
    }
    Ok(buf)
}

/// The phases of the run as offsets from when it was queued.
fn timeline(m: &ExecutedActionMetadata, out: &mut String) {
    let t = |ts: &Option<remote_apis::protobuf::Timestamp>| ts.as_ref().and_then(to_system_time);
    let Some(queued) = t(&m.queued_timestamp).or(t(&m.worker_start_timestamp)) else { return };
    let phases = [
        ("queued", t(&m.queued_timestamp), t(&m.worker_start_timestamp)),
        ("input fetch", t(&m.input_fetch_start_timestamp), t(&m.input_fetch_completed_timestamp)),
        ("execution", t(&m.execution_start_timestamp), t(&m.execution_completed_timestamp)),
        ("output upload", t(&m.output_upload_start_timestamp), t(&m.output_upload_completed_timestamp)),
        ("on the worker", t(&m.worker_start_timestamp), t(&m.worker_completed_timestamp)),
    ];
    let _ = write!(
        out,
        "<h3>Timeline</h3><p>Queued at {} (times below are from then).</p>\
         <table id=\"timeline\"><tr><th>Phase</th><th>From</th><th>To</th><th>Took</th></tr>",
        fmt_time(queued)
    );
    for (name, start, end) in phases {
        let Some(start) = start else { continue };
        let took = end.map(|e| offset(start, e)).unwrap_or_default();
        let _ = write!(
            out,
            "<tr class=\"phase\"><td>{name}</td><td>+{}</td><td>{}</td><td>{took}</td></tr>",
            offset(queued, start),
            end.map(|e| format!("+{}", offset(queued, e))).unwrap_or_default(),
        );
    }
    out.push_str("</table>");
}

/// Seconds from `from` to `to`, to the millisecond.
fn offset(from: SystemTime, to: SystemTime) -> String {
    match to.duration_since(from) {
        Ok(d) => format!("{:.3}s", d.as_secs_f64()),
        Err(e) => format!("-{:.3}s", e.duration().as_secs_f64()),
    }
}

fn to_system_time(ts: &remote_apis::protobuf::Timestamp) -> Option<SystemTime> {
    let secs = u64::try_from(ts.seconds).ok()?;
    let nanos = u32::try_from(ts.nanos).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}
