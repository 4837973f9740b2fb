//! An action's page by digest (`/action/{function}/{hash}/{size}`, or
//! `/action/{hash}/{size}` for SHA-256; `?instance=` names the instance of
//! its ActionCache entry): the Action, the Command, the input root as a
//! tree, and the result, from the ActionCache, else the latest failed run,
//! else the newest operation of the action that carried one.
//!
//! Stable hooks: `#action` (facts), `#command`, `ol#argv` (one `li > code`
//! per argument), `#environment`, `#working-directory`, `#output-paths`,
//! `#input-root` (the tree, see [`super::tree`]), `#result-source`, then the
//! result's hooks (see [`super::result`]).

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use prost::Message;
use remote_apis::reapi::{Action, ActionResult, Command, Directory};
use remote_apis::{Digest, InstanceName};
use serde::Deserialize;

use super::tree::{EMBEDDED_DIRS, Source};
use super::{
    PageError, PageResult, blob_href, digest_path, escape, fmt_age, fmt_time, html, operation_href, parse_digest,
    read_proto, result, tree,
};
use crate::ac::AcKey;
use crate::http::HttpState;

#[derive(Deserialize)]
pub struct ActionQuery {
    instance: Option<String>,
}

pub async fn page_sha256(
    state: State<Arc<HttpState>>,
    Path((hash, size)): Path<(String, String)>,
    query: Query<ActionQuery>,
) -> PageResult {
    page(state, Path(("sha256".into(), hash, size)), query).await
}

pub async fn page(
    State(state): State<Arc<HttpState>>,
    Path((function, hash, size)): Path<(String, String, String)>,
    Query(q): Query<ActionQuery>,
) -> PageResult {
    let digest = parse_digest(&function, &hash, &size)?;
    let instance = instance_of(&state, &digest, q.instance.as_deref()).await?;
    // An evicted Action still leaves its result worth showing.
    let action = match read_proto::<Action>(&state, &digest, "Action").await {
        Err(e) if e.status != axum::http::StatusCode::NOT_FOUND => return Err(e),
        other => other,
    };
    let found = find_result(&state, &digest, &instance).await?;
    if let (Err(e), None) = (&action, &found) {
        return Err(PageError::not_found(format!("{}; no result of it is known either", e.message)));
    }
    let mut body = String::new();
    match action {
        Ok(action) => describe(&state, &digest, &instance, &action, &mut body).await,
        Err(e) => {
            let _ = write!(body, "<p class=\"failed\" id=\"action\">{}</p>", escape(&e.message));
        }
    }
    body.push_str("<h2 id=\"result-heading\">Result</h2>");
    match found {
        Some((source, r)) => {
            let _ = write!(body, "<p id=\"result-source\">{source}</p>");
            result::render(&state, digest.function, &r, &mut body).await;
        }
        None => body.push_str(
            "<p class=\"muted\" id=\"result-source\">No result: not in the ActionCache, and no failed run or \
             operation of it is retained.</p>",
        ),
    }
    Ok(html("Action", &body))
}

/// The instance whose ActionCache entry to show: as asked, else that of
/// the newest operation of the action, else the default one.
async fn instance_of(state: &HttpState, digest: &Digest, asked: Option<&str>) -> Result<InstanceName, PageError> {
    if let Some(name) = asked {
        return InstanceName::new(name).map_err(|e| PageError::bad_request(e.0));
    }
    let newest = state.scheduler.list().await?.into_iter().rev().find(|op| op.action_digest == *digest);
    Ok(newest.map(|op| op.instance).unwrap_or_default())
}

/// The result to show and where it came from (HTML).
async fn find_result(
    state: &HttpState,
    digest: &Digest,
    instance: &InstanceName,
) -> Result<Option<(String, ActionResult)>, PageError> {
    if let Some(bytes) = state.ac.get(&AcKey::new(instance, digest)).await?
        && let Ok(r) = ActionResult::decode(bytes.as_ref())
    {
        return Ok(Some(("From the ActionCache.".into(), r)));
    }
    if let Some(run) = state.scheduler.failed_result(digest) {
        let worker = run.worker.as_deref().map(|w| format!(" on {}", escape(w))).unwrap_or_default();
        let source = format!(
            "<span class=\"failed\">The latest failed run</span>: operation <a class=\"mono\" href=\"{}\">{}</a>, \
             finished {} ({} ago){worker}.",
            escape(&operation_href(&run.operation)),
            escape(&run.operation),
            fmt_time(run.at),
            fmt_age(run.at),
        );
        match read_proto::<ActionResult>(state, &run.result, "ActionResult").await {
            Ok(r) => return Ok(Some((source, r))),
            Err(e) => tracing::debug!(error = %e.message, "a failed run's result is gone"),
        }
    }
    let newest = state
        .scheduler
        .list()
        .await?
        .into_iter()
        .rev()
        .find(|op| op.action_digest == *digest && op.response.as_ref().is_some_and(|r| r.result.is_some()));
    Ok(newest.and_then(|op| {
        let r = op.response.as_ref()?.result.clone()?;
        let source = format!(
            "From operation <a class=\"mono\" href=\"{}\">{}</a>.",
            escape(&operation_href(&op.name)),
            escape(&op.name)
        );
        Some((source, r))
    }))
}

/// The Action, its Command and its input root.
async fn describe(state: &HttpState, digest: &Digest, instance: &InstanceName, action: &Action, out: &mut String) {
    let f = digest.function;
    let command = Digest::from_field(f, action.command_digest.as_ref(), "command_digest");
    let root = Digest::from_field(f, action.input_root_digest.as_ref(), "input_root_digest");
    let timeout = action.timeout.as_ref().map_or("none (the server's default)".to_string(), |t| {
        format!("{}s", t.seconds as f64 + f64::from(t.nanos) / 1e9)
    });
    let platform = action.platform.as_ref().map_or(String::new(), |p| {
        p.properties.iter().map(|p| format!("{}={}", p.name, p.value)).collect::<Vec<_>>().join(", ")
    });
    let _ = write!(
        out,
        "<table id=\"action\"><tr><th>Digest</th><td class=\"mono\">{}</td></tr>\
         <tr><th>Instance</th><td class=\"mono\">{}</td></tr>\
         <tr><th>Command</th><td>{}</td></tr><tr><th>Input root</th><td>{}</td></tr>\
         <tr><th>Timeout</th><td id=\"timeout\">{}</td></tr>\
         <tr><th>Platform</th><td id=\"platform\" class=\"mono\">{}</td></tr>\
         <tr><th>Salt</th><td class=\"mono\">{}</td></tr>\
         <tr><th>Do not cache</th><td id=\"do-not-cache\">{}</td></tr></table>",
        escape(&digest.to_string()),
        escape(super::instance_label(instance)),
        digest_cell(&command, |d| blob_href(d, Some("command.pb"))),
        digest_cell(&root, |d| format!("/tree/{}", digest_path(d))),
        escape(&timeout),
        escape(&platform),
        hex::encode(&action.salt),
        if action.do_not_cache { "yes" } else { "no" },
    );
    out.push_str("<h2>Command</h2>");
    match &command {
        Ok(d) => match read_proto::<Command>(state, d, "Command").await {
            Ok(c) => command_section(&c, out),
            Err(e) => {
                let _ = write!(out, "<p class=\"failed\" id=\"command\">{}</p>", escape(&e.message));
            }
        },
        Err(e) => {
            let _ = write!(out, "<p class=\"failed\" id=\"command\">{}</p>", escape(&e.0));
        }
    }
    out.push_str("<h2>Input root</h2><div id=\"input-root\">");
    match &root {
        Ok(d) => match read_proto::<Directory>(state, d, "Directory").await {
            Ok(dir) => tree::render(&Source::Cas(state), *d, dir, EMBEDDED_DIRS, out).await,
            Err(e) => {
                let _ = write!(out, "<p class=\"failed\">{}</p>", escape(&e.message));
            }
        },
        Err(e) => {
            let _ = write!(out, "<p class=\"failed\">{}</p>", escape(&e.0));
        }
    }
    out.push_str("</div>");
}

fn digest_cell(d: &Result<Digest, remote_apis::ParseError>, href: impl Fn(&Digest) -> String) -> String {
    match d {
        Ok(d) => format!("<a class=\"mono\" href=\"{}\">{}</a>", escape(&href(d)), escape(&d.to_string())),
        Err(e) => format!("<span class=\"failed\">{}</span>", escape(&e.0)),
    }
}

#[allow(deprecated)] // REAPI 2.0 clients still send output_files and output_directories
fn command_section(c: &Command, out: &mut String) {
    out.push_str("<div id=\"command\"><h3>Arguments</h3><ol id=\"argv\">");
    for arg in &c.arguments {
        let _ = write!(out, "<li><code>{}</code></li>", escape(arg));
    }
    out.push_str("</ol><h3>Environment</h3>");
    if c.environment_variables.is_empty() {
        out.push_str("<p class=\"muted\" id=\"environment\">(empty)</p>");
    } else {
        out.push_str("<table id=\"environment\">");
        for v in &c.environment_variables {
            let _ = write!(
                out,
                "<tr><th class=\"mono\">{}</th><td class=\"mono\">{}</td></tr>",
                escape(&v.name),
                escape(&v.value)
            );
        }
        out.push_str("</table>");
    }
    let wd = if c.working_directory.is_empty() { "(the input root)" } else { c.working_directory.as_str() };
    let _ = write!(out, "<h3>Working directory</h3><p id=\"working-directory\" class=\"mono\">{}</p>", escape(wd));
    let lists = [("path", &c.output_paths), ("file", &c.output_files), ("directory", &c.output_directories)];
    if lists.iter().all(|(_, paths)| paths.is_empty()) {
        out.push_str("<h3>Outputs</h3><p class=\"muted\" id=\"output-paths\">(none)</p></div>");
        return;
    }
    out.push_str("<h3>Outputs</h3><table id=\"output-paths\">");
    for (kind, paths) in lists {
        for p in paths {
            let _ = write!(out, "<tr><td class=\"mono\">{}</td><td>{kind}</td></tr>", escape(p));
        }
    }
    out.push_str("</table></div>");
}
