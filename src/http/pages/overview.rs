//! The overview (`/`): workers, queues, running and recent operations, the
//! cache hit rate and store usage; and the drain buttons' POST handlers.
//!
//! Stable hooks for browser tests: `table#workers` with one
//! `tr#worker-NAME` per worker, its `td.state` saying `active` or
//! `draining`, and (for admins) a `form.drain` / `form.undrain` with a
//! `button.drain` / `button.undrain`; `table#queues`, `table#running`,
//! `table#recent` (rows `tr.op.ok` / `tr.op.failed`), `#cache-hit-rate`,
//! `#store-usage`.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use remote_apis::reapi::execution_stage::Value as Stage;
use serde::Deserialize;

use super::{
    PageResult, action_link, code_name, escape, fmt_age, fmt_bytes, fmt_duration, html, operation_href, url_part,
};
use crate::execution::scheduler::{OpView, WorkerView};
use crate::http::{HttpState, Viewer};

/// How many finished operations the overview lists.
const RECENT: usize = 50;

/// Seconds between reloads when the page is left open (`?refresh=0`: never).
const DEFAULT_REFRESH: u64 = 10;

#[derive(Deserialize)]
pub struct OverviewQuery {
    refresh: Option<u64>,
}

pub async fn page(
    State(state): State<Arc<HttpState>>,
    Extension(viewer): Extension<Viewer>,
    Query(q): Query<OverviewQuery>,
) -> Response {
    let read = async {
        Ok::<_, crate::error::Error>((
            state.scheduler.status().await?,
            state.scheduler.list().await?,
            state.scheduler.queues().await?,
        ))
    };
    let (status, ops, queue_views) = match read.await {
        Ok(read) => read,
        Err(e) => return super::PageError::from(e).into_response(),
    };
    let mut body = String::new();
    summary(&state, &status.counters, &mut body);
    workers(&status.workers, viewer, &mut body);
    queues(queue_views, &mut body);
    running(&ops, &mut body);
    recent(&ops, &mut body);
    let refresh = q.refresh.unwrap_or(DEFAULT_REFRESH);
    if refresh > 0 {
        // Reload while the page is left open; skipped while a form has focus.
        let _ = write!(
            body,
            "<p class=\"muted\" id=\"auto-refresh\">Reloads every {refresh}s (<a href=\"/?refresh=0\">stop</a>).</p>\
             <script>setTimeout(function(){{if(!document.activeElement||document.activeElement===document.body)\
             location.reload()}},{});</script>",
            refresh.saturating_mul(1000)
        );
    }
    html("Overview", &body)
}

fn summary(state: &HttpState, c: &crate::execution::scheduler::Counters, out: &mut String) {
    let lookups = c.cache_hits + c.cache_misses;
    let rate = if lookups == 0 {
        "no lookups yet".to_string()
    } else {
        format!("{:.1}% ({} of {lookups})", c.cache_hits as f64 * 100.0 / lookups as f64, c.cache_hits)
    };
    let usage = state.cas.usage();
    let store = if usage.max_bytes > 0 {
        format!(
            "{} of {} ({:.1}%), {} blobs",
            fmt_bytes(usage.used_bytes),
            fmt_bytes(usage.max_bytes),
            usage.used_bytes as f64 * 100.0 / usage.max_bytes as f64,
            usage.blobs
        )
    } else {
        format!("{}, {} blobs", fmt_bytes(usage.used_bytes), usage.blobs)
    };
    let _ = write!(
        out,
        "<table id=\"summary\"><tr><th>Cache hit rate (Execute)</th><td id=\"cache-hit-rate\">{}</td></tr>\
         <tr><th>Store usage</th><td id=\"store-usage\">{}</td></tr>\
         <tr><th>Executed</th><td>{} ({} failed, {} merged, {} re-queued, {} cancelled)</td></tr>\
         <tr><th>Up for</th><td>{}</td></tr></table>",
        escape(&rate),
        escape(&store),
        c.executed,
        c.failed,
        c.merged,
        c.requeued,
        c.cancelled,
        fmt_duration(state.started.elapsed())
    );
}

fn workers(list: &[WorkerView], viewer: Viewer, out: &mut String) {
    out.push_str("<h2>Workers</h2>");
    if list.is_empty() {
        out.push_str("<p class=\"muted\" id=\"no-workers\">No worker is connected.</p>");
        return;
    }
    out.push_str(
        "<table id=\"workers\"><tr><th>Name</th><th>Properties</th><th>Slots busy</th><th>Done</th>\
         <th>Sandbox</th><th>Connected for</th><th>State</th>",
    );
    if viewer.admin {
        out.push_str("<th>Action</th>");
    }
    out.push_str("</tr>");
    for w in list {
        let state = if w.draining { "draining" } else { "active" };
        let kind = if w.info.builtin { " <span class=\"muted\">(built-in)</span>" } else { "" };
        let _ = write!(
            out,
            "<tr id=\"worker-{}\" class=\"worker\"><td class=\"name\">{}{kind}</td><td class=\"properties mono\">{}</td>\
             <td class=\"slots\">{}/{}</td><td>{}</td><td class=\"sandbox\">{}</td><td>{}</td>\
             <td class=\"state {state}\">{state}</td>",
            escape(&w.info.name),
            escape(&w.info.name),
            escape(&w.info.properties.to_string()),
            w.busy,
            w.info.slots,
            w.done,
            escape(&w.info.sandbox),
            fmt_duration(w.connected_for),
        );
        if viewer.admin {
            let verb = if w.draining { "undrain" } else { "drain" };
            let label = if w.draining { "Undrain" } else { "Drain" };
            let _ = write!(
                out,
                "<td><form class=\"{verb}\" method=\"post\" action=\"/workers/{}/{verb}\">\
                 <button class=\"{verb}\" type=\"submit\">{label}</button></form></td>",
                escape(&url_part(&w.info.name)),
            );
        }
        out.push_str("</tr>");
    }
    out.push_str("</table>");
}

fn queues(queues: Vec<crate::execution::scheduler::QueueView>, out: &mut String) {
    out.push_str("<h2>Queues</h2>");
    if queues.is_empty() {
        out.push_str("<p class=\"muted\" id=\"no-queues\">Nothing is queued.</p>");
        return;
    }
    out.push_str("<table id=\"queues\"><tr><th>Platform</th><th>Queued</th><th>Oldest waits for</th></tr>");
    for q in queues {
        let _ = write!(
            out,
            "<tr><td class=\"mono\">{}</td><td>{}</td><td>{}</td></tr>",
            escape(&q.platform.to_string()),
            q.len,
            fmt_age(q.oldest)
        );
    }
    out.push_str("</table>");
}

fn running(ops: &[OpView], out: &mut String) {
    out.push_str("<h2>Running</h2>");
    let running: Vec<&OpView> = ops.iter().filter(|op| !op.done() && op.stage() == Stage::Executing).collect();
    if running.is_empty() {
        out.push_str("<p class=\"muted\" id=\"no-running\">No action is running.</p>");
        return;
    }
    out.push_str("<table id=\"running\"><tr><th>Operation</th><th>Action</th><th>Worker</th><th>Submitted</th></tr>");
    for op in running {
        let _ = write!(
            out,
            "<tr class=\"op\">{}<td>{}</td><td class=\"worker\">{}</td><td>{} ago</td></tr>",
            op_cell(op),
            action_link(&op.action_digest, &op.instance),
            escape(op.worker.as_deref().unwrap_or("")),
            fmt_age(op.queued_at)
        );
    }
    out.push_str("</table>");
}

fn recent(ops: &[OpView], out: &mut String) {
    let _ = write!(out, "<h2>Recently finished</h2>");
    let done: Vec<&OpView> = ops.iter().rev().filter(|op| op.done()).take(RECENT).collect();
    if done.is_empty() {
        out.push_str("<p class=\"muted\" id=\"no-recent\">No operation has finished yet.</p>");
        return;
    }
    out.push_str(
        "<table id=\"recent\"><tr><th>Operation</th><th>Action</th><th>Outcome</th><th>Worker</th>\
         <th>Submitted</th></tr>",
    );
    for op in done {
        let (class, outcome) = outcome(op);
        let _ = write!(
            out,
            "<tr class=\"op {class}\">{}<td>{}</td><td class=\"outcome\">{}</td><td>{}</td><td>{} ago</td></tr>",
            op_cell(op),
            action_link(&op.action_digest, &op.instance),
            escape(&outcome),
            escape(op.worker.as_deref().unwrap_or("")),
            fmt_age(op.queued_at)
        );
    }
    out.push_str("</table>");
}

fn op_cell(op: &OpView) -> String {
    let short = op.name.strip_prefix("operations/").unwrap_or(&op.name);
    format!("<td><a class=\"mono\" href=\"{}\">{}</a></td>", escape(&operation_href(&op.name)), escape(short))
}

/// `ok` or `failed`, and a short description, of a finished operation.
pub fn outcome(op: &OpView) -> (&'static str, String) {
    let Some(r) = &op.response else { return ("", String::new()) };
    if let Some(s) = r.status.as_ref().filter(|s| s.code != 0) {
        return ("failed", code_name(s.code));
    }
    match &r.result {
        Some(res) if res.exit_code != 0 => ("failed", format!("exit code {}", res.exit_code)),
        Some(_) if r.cached_result => ("ok", "cache hit".into()),
        Some(_) => ("ok", "exit code 0".into()),
        None => ("failed", "no result".into()),
    }
}

pub async fn drain(State(state): State<Arc<HttpState>>, Path(name): Path<String>) -> PageResult {
    set_draining(&state, &name, true).await
}

pub async fn undrain(State(state): State<Arc<HttpState>>, Path(name): Path<String>) -> PageResult {
    set_draining(&state, &name, false).await
}

/// The authentication layer has checked the admin grant and the origin.
async fn set_draining(state: &HttpState, name: &str, draining: bool) -> PageResult {
    state.scheduler.set_draining(name, draining).await?;
    Ok(Redirect::to("/").into_response())
}
