//! An operation's page (`/operations/{id}`): its stages, action, worker and
//! response, with the result it carried rendered in full.
//!
//! Stable hooks: `#operation` (the facts table), `#stages` (one `li` per
//! stage), `#status-code`, `#status-message`, then the result's hooks (see
//! [`super::result`]).

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Path, State};
use remote_apis::reapi::execution_stage::Value as Stage;

use super::overview::outcome;
use super::{PageError, PageResult, action_href, action_link, code_name, escape, fmt_age, fmt_time, html, result};
use crate::http::HttpState;

pub async fn page(State(state): State<Arc<HttpState>>, Path(id): Path<String>) -> PageResult {
    let name = format!("operations/{id}");
    let op = state
        .scheduler
        .get(&name)
        .await?
        .ok_or_else(|| PageError::not_found(format!("operation {name} is unknown or has expired")))?;
    let mut body = String::new();
    let (class, summary) = if op.done() { outcome(&op) } else { ("", "in progress".to_string()) };
    let _ = write!(
        body,
        "<table id=\"operation\"><tr><th>Name</th><td class=\"mono\">{}</td></tr>\
         <tr><th>Instance</th><td class=\"mono\">{}</td></tr>\
         <tr><th>Action</th><td>{}</td></tr>\
         <tr><th>Submitted</th><td>{} ({} ago)</td></tr>\
         <tr><th>Worker</th><td id=\"worker\">{}</td></tr>\
         <tr><th>Outcome</th><td id=\"outcome\" class=\"{class}\">{}</td></tr></table>",
        escape(&op.name),
        escape(super::instance_label(&op.instance)),
        action_link(&op.action_digest, &op.instance),
        fmt_time(op.queued_at),
        fmt_age(op.queued_at),
        escape(op.worker.as_deref().unwrap_or("none yet")),
        escape(&summary),
    );
    body.push_str("<h2>Stages</h2><ol id=\"stages\">");
    for stage in &op.stages {
        let _ = write!(body, "<li>{}</li>", stage_name(*stage));
    }
    body.push_str("</ol>");
    if let Some(response) = &op.response {
        body.push_str("<h2>Response</h2><table id=\"response\">");
        let (code, message) = response.status.as_ref().map_or((0, ""), |s| (s.code, s.message.as_str()));
        let _ = write!(
            body,
            "<tr><th>Status</th><td id=\"status-code\">{}</td></tr>\
             <tr><th>Message</th><td id=\"status-message\"><pre>{}</pre></td></tr>\
             <tr><th>Cached result</th><td>{}</td></tr>",
            code_name(code),
            escape(message),
            if response.cached_result { "yes" } else { "no" },
        );
        if !response.message.is_empty() {
            let _ = write!(body, "<tr><th>Note</th><td>{}</td></tr>", escape(&response.message));
        }
        body.push_str("</table>");
        match &response.result {
            Some(r) => {
                let _ = write!(
                    body,
                    "<p><a id=\"action-page\" href=\"{}\">The action's page</a> (its Action, Command and inputs).</p>",
                    escape(&action_href(&op.action_digest, &op.instance))
                );
                result::render(&state, op.action_digest.function, r, &mut body).await;
            }
            None => body.push_str("<p class=\"muted\">The response carries no ActionResult.</p>"),
        }
    }
    Ok(html("Operation", &body))
}

/// A stage as REAPI names it.
pub fn stage_name(stage: Stage) -> &'static str {
    stage.as_str_name()
}
