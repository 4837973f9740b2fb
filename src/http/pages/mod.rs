//! The status pages (server-rendered HTML, usable without JavaScript).
//!
//! Every page is built here from the scheduler, the CAS and the ActionCache:
//! the overview (`/`), an operation (`/operations/{id}`), an action by
//! digest (`/action/{function}/{hash}/{size}`), a directory of an input root
//! (`/tree/...`) or an output directory (`/output-tree/...`), and blob
//! downloads (`/blob/...`). The drain buttons post to `/workers/{name}/drain`
//! and `/workers/{name}/undrain`.
//!
//! Invariant: every piece of text that reaches HTML goes through [`escape`]
//! (names, paths, arguments and outputs are whatever clients sent), and
//! every value in a link through [`url_part`].

mod action;
mod blob;
mod operation;
mod overview;
mod result;
mod tree;

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prost::Message;
use remote_apis::{Digest, DigestFunction, InstanceName};

use super::HttpState;
use crate::error::Error;

/// The page routes, all behind the authentication layer.
pub fn routes() -> Router<Arc<HttpState>> {
    Router::new()
        .route("/", get(overview::page))
        .route("/workers/{name}/drain", post(overview::drain))
        .route("/workers/{name}/undrain", post(overview::undrain))
        .route("/operations/{id}", get(operation::page))
        .route("/action/{hash}/{size}", get(action::page_sha256))
        .route("/action/{function}/{hash}/{size}", get(action::page))
        .route("/tree/{function}/{hash}/{size}", get(tree::directory_page))
        .route("/output-tree/{function}/{hash}/{size}", get(tree::output_page))
        .route("/blob/{function}/{hash}/{size}", get(blob::download))
        .route("/blob/{function}/{hash}/{size}/{filename}", get(blob::download_named))
}

/// Protos this large are not decoded for a page (Action, Command,
/// Directory, Tree): a page must not hold a huge blob in memory.
const PROTO_LIMIT: u64 = 16 << 20;

/// A page that could not be shown: the status and what is wrong, as HTML.
#[derive(Debug)]
pub struct PageError {
    status: StatusCode,
    message: String,
}

impl PageError {
    fn not_found(message: impl Into<String>) -> Self {
        PageError { status: StatusCode::NOT_FOUND, message: message.into() }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        PageError { status: StatusCode::BAD_REQUEST, message: message.into() }
    }
}

impl From<Error> for PageError {
    fn from(e: Error) -> Self {
        let status = match e.code {
            tonic::Code::NotFound => StatusCode::NOT_FOUND,
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => StatusCode::BAD_REQUEST,
            tonic::Code::FailedPrecondition => StatusCode::CONFLICT,
            tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
            tonic::Code::Unavailable | tonic::Code::ResourceExhausted => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        PageError { status, message: e.message }
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let title = self.status.canonical_reason().unwrap_or("Error");
        let body = format!("<p class=\"error\" id=\"error\">{}</p>", escape(&self.message));
        let mut response = html(title, &body);
        *response.status_mut() = self.status;
        response
    }
}

pub type PageResult = Result<Response, PageError>;

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes one path segment or query value: everything but the
/// unreserved characters, so a name never changes a link's structure.
pub fn url_part(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Page styles: small, inline, no external assets.
const CSS: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}\
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}\
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}\
th{background:#f3f3f3}code,pre,.mono{font-family:ui-monospace,monospace;font-size:13px}\
pre{background:#f7f7f7;border:1px solid #ddd;padding:.5em;overflow:auto;max-height:40em;white-space:pre-wrap}\
.failed,.draining{color:#a00}.ok,.active{color:#070}.muted{color:#777}\
ul.tree{list-style:none;padding-left:1.2em}summary{cursor:pointer}\
nav a{margin-right:1em}.error{color:#a00;font-weight:bold}form{display:inline}";

/// A whole page: the layout around `body`, with the response headers all
/// pages share (a strict content policy: only inline styles and scripts).
pub fn html(title: &str, body: &str) -> Response {
    let page = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>{} · cargo-distbuild</title><style>{CSS}</style></head>\n<body>\
         <nav><a href=\"/\">cargo-distbuild</a></nav>\n<h1>{}</h1>\n{body}\n</body></html>\n",
        escape(title),
        escape(title),
    );
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; \
                 form-action 'self'; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        page,
    )
        .into_response()
}

/// Parses a digest from the path segments of a link.
pub fn parse_digest(function: &str, hash: &str, size: &str) -> Result<Digest, PageError> {
    let function = DigestFunction::from_name(function).ok_or_else(|| {
        PageError::bad_request(format!("unknown digest function {function:?} (known: sha256, blake3)"))
    })?;
    let size: i64 =
        size.parse().map_err(|_| PageError::bad_request(format!("digest size {size:?} is not a number")))?;
    Digest::new(function, hash, size).map_err(|e| PageError::bad_request(e.0))
}

/// A digest as a path: `function/hash/size`.
pub fn digest_path(d: &Digest) -> String {
    format!("{}/{}/{}", d.function, d.hash_hex(), d.size)
}

/// The link to an action's page; the instance rides along when it is not
/// the default one (ActionCache entries belong to their instance).
pub fn action_href(d: &Digest, instance: &InstanceName) -> String {
    let mut href = format!("/action/{}", digest_path(d));
    if !instance.as_str().is_empty() {
        let _ = write!(href, "?instance={}", url_part(instance.as_str()));
    }
    href
}

/// An instance name as shown: the default one is empty, which reads as a
/// missing value.
pub fn instance_label(instance: &InstanceName) -> &str {
    if instance.as_str().is_empty() { "(default)" } else { instance.as_str() }
}

/// `<a>` to an action's page showing the digest.
pub fn action_link(d: &Digest, instance: &InstanceName) -> String {
    format!("<a class=\"mono\" href=\"{}\">{}</a>", escape(&action_href(d, instance)), escape(&d.to_string()))
}

/// The download link of a blob; `name` (a file's last path component)
/// makes the browser save it under that name.
pub fn blob_href(d: &Digest, name: Option<&str>) -> String {
    match name.map(|n| n.rsplit('/').next().unwrap_or(n)).filter(|n| !n.is_empty()) {
        Some(n) => format!("/blob/{}/{}", digest_path(d), url_part(n)),
        None => format!("/blob/{}", digest_path(d)),
    }
}

/// The link to an operation's page (names are `operations/UUID`).
pub fn operation_href(name: &str) -> String {
    match name.strip_prefix("operations/") {
        Some(id) => format!("/operations/{}", url_part(id)),
        None => format!("/operations/{}", url_part(name)),
    }
}

/// Reads and decodes a proto message from the CAS; `what` names it in the
/// error (404 when absent).
pub async fn read_proto<M: Message + Default>(state: &HttpState, d: &Digest, what: &str) -> Result<M, PageError> {
    if d.size > PROTO_LIMIT {
        return Err(PageError::bad_request(format!("{what} {d} is {} bytes, too large to show", d.size)));
    }
    let data = match state.cas.get_bytes(d).await {
        Ok(data) => data,
        Err(e) if e.code == tonic::Code::NotFound => {
            return Err(PageError::not_found(format!("{what} {d} is not in the CAS")));
        }
        Err(e) => return Err(e.into()),
    };
    M::decode(data.as_ref()).map_err(|e| PageError::bad_request(format!("blob {d} is not a valid {what}: {e}")))
}

/// A point in time as people read it (UTC, to the second).
pub fn fmt_time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// How long ago `t` was, short ("3.2s", "4m 10s", "2h 5m", "3d 4h").
pub fn fmt_age(t: SystemTime) -> String {
    fmt_duration(SystemTime::now().duration_since(t).unwrap_or_default())
}

/// A duration, short: two units at most.
pub fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        1..60 => format!("{:.1}s", d.as_secs_f64()),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

/// Bytes, in binary units.
pub fn fmt_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}

/// A gRPC status code's name (`OK`, `DEADLINE_EXCEEDED`, ...).
pub fn code_name(code: i32) -> String {
    let name = format!("{:?}", tonic::Code::from(code));
    // Debug spells `DeadlineExceeded`; people know the proto's spelling.
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    if out == "O_K" { "OK".into() } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_every_special_character() {
        assert_eq!(escape("<a href=\"x\">'&'</a>"), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
        assert_eq!(escape("plain ü"), "plain ü");
    }

    #[test]
    fn url_parts_keep_only_unreserved_characters() {
        assert_eq!(url_part("w-1.a_b~"), "w-1.a_b~");
        assert_eq!(url_part("a b/c?d\"<"), "a%20b%2Fc%3Fd%22%3C");
        assert_eq!(url_part("ü"), "%C3%BC");
    }

    #[test]
    fn digests_in_links_round_trip_and_bad_ones_are_400() {
        let d = DigestFunction::Blake3.digest_of(b"x");
        let path = digest_path(&d);
        let parts: Vec<&str> = path.split('/').collect();
        assert_eq!(parse_digest(parts[0], parts[1], parts[2]).unwrap(), d);
        let h = d.hash_hex();
        for (f, hash, size) in [("md5", h.as_str(), "1"), ("sha256", "abc", "1"), ("sha256", h.as_str(), "-1")] {
            assert_eq!(parse_digest(f, hash, size).unwrap_err().status, StatusCode::BAD_REQUEST);
        }
        assert_eq!(parse_digest("sha256", &h, "x").unwrap_err().status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn links_name_the_file_and_the_instance() {
        let d = DigestFunction::Sha256.digest_of(b"x");
        assert_eq!(blob_href(&d, Some("out/a b.txt")), format!("/blob/{}/a%20b.txt", digest_path(&d)));
        assert_eq!(blob_href(&d, None), format!("/blob/{}", digest_path(&d)));
        let i = InstanceName::default();
        assert_eq!(action_href(&d, &i), format!("/action/{}", digest_path(&d)));
        assert_eq!(operation_href("operations/abc-1"), "/operations/abc-1");
    }

    #[test]
    fn durations_codes_and_sizes_read_well() {
        assert_eq!(fmt_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(fmt_duration(Duration::from_secs(125)), "2m 5s");
        assert_eq!(fmt_duration(Duration::from_secs(7300)), "2h 1m");
        assert_eq!(code_name(0), "OK");
        assert_eq!(code_name(4), "DEADLINE_EXCEEDED");
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(3 << 20), "3.0 MiB");
    }
}
