//! Blob downloads (`/blob/{function}/{hash}/{size}[/{filename}]`): streamed
//! from the CAS with their length, as text when they look like text, so a
//! browser shows a log or a source file instead of saving it.
//!
//! A blob is whatever a client uploaded: it is served with `nosniff` and a
//! sandboxing content policy, so an HTML blob cannot run as this site.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, header};
use axum::response::IntoResponse;
use bytes::Bytes;
use futures::StreamExt;
use remote_apis::Digest;

use super::{PageError, PageResult, parse_digest, url_part};
use crate::http::HttpState;

/// How much of a blob decides its content type.
const SNIFF: usize = 8 << 10;

pub async fn download(
    State(state): State<Arc<HttpState>>,
    Path((function, hash, size)): Path<(String, String, String)>,
) -> PageResult {
    serve(&state, parse_digest(&function, &hash, &size)?, None).await
}

pub async fn download_named(
    State(state): State<Arc<HttpState>>,
    Path((function, hash, size, filename)): Path<(String, String, String, String)>,
) -> PageResult {
    serve(&state, parse_digest(&function, &hash, &size)?, Some(&filename)).await
}

async fn serve(state: &HttpState, digest: Digest, filename: Option<&str>) -> PageResult {
    let mut stream = match state.cas.get(&digest, 0, None).await {
        Ok(s) => s,
        Err(e) if e.code == tonic::Code::NotFound => {
            return Err(PageError::not_found(format!("blob {digest} is not in the CAS")));
        }
        Err(e) => return Err(e.into()),
    };
    // Read just enough to decide the type; the rest streams.
    let mut first: Vec<Bytes> = Vec::new();
    let mut have = 0;
    let mut ended = false;
    while have < SNIFF {
        match stream.next().await {
            Some(chunk) => {
                let chunk = chunk?;
                have += chunk.len();
                first.push(chunk);
            }
            None => {
                ended = true;
                break;
            }
        }
    }
    let mut head = Vec::with_capacity(have.min(SNIFF));
    for chunk in &first {
        let want = SNIFF - head.len();
        head.extend_from_slice(&chunk[..chunk.len().min(want)]);
    }
    let content_type = if looks_like_text(&head, ended && have <= SNIFF) {
        "text/plain; charset=utf-8"
    } else {
        "application/octet-stream"
    };
    let body = Body::from_stream(futures::stream::iter(first.into_iter().map(Ok)).chain(stream));
    let mut response = (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CONTENT_LENGTH, HeaderValue::from(digest.size)),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
            (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("sandbox; default-src 'none'")),
            // Content addressed: the bytes behind a link never change.
            (header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=86400, immutable")),
        ],
        body,
    )
        .into_response();
    if let Some(name) = filename
        && let Ok(value) = HeaderValue::from_str(&disposition(name))
    {
        response.headers_mut().insert(header::CONTENT_DISPOSITION, value);
    }
    Ok(response)
}

/// Valid UTF-8 without NULs. `whole`: `head` is the entire blob; otherwise
/// a character cut at its end is not a reason to call it binary.
fn looks_like_text(head: &[u8], whole: bool) -> bool {
    if head.contains(&0) {
        return false;
    }
    match std::str::from_utf8(head) {
        Ok(_) => true,
        Err(e) => !whole && e.error_len().is_none(),
    }
}

/// `inline` with the name both as a plain ASCII fallback (quotes,
/// backslashes, controls and non-ASCII replaced) and exactly (RFC 8187).
fn disposition(name: &str) -> String {
    let plain: String =
        name.chars().map(|c| if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' { c } else { '_' }).collect();
    format!("inline; filename=\"{plain}\"; filename*=UTF-8''{}", url_part(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_utf8_without_nuls_and_a_cut_character_is_forgiven() {
        assert!(looks_like_text(b"hello\n", true));
        assert!(looks_like_text(b"", true));
        assert!(!looks_like_text(b"a\0b", true));
        assert!(!looks_like_text(&[0xff, 0xfe], true));
        let cut = &"ü".as_bytes()[..1];
        assert!(looks_like_text(cut, false));
        assert!(!looks_like_text(cut, true));
    }

    #[test]
    fn file_names_cannot_break_the_header() {
        assert_eq!(disposition("a b.txt"), "inline; filename=\"a b.txt\"; filename*=UTF-8''a%20b.txt");
        assert_eq!(disposition("x\"\r\n.txt"), "inline; filename=\"x___.txt\"; filename*=UTF-8''x%22%0D%0A.txt");
        assert_eq!(disposition("ü"), "inline; filename=\"_\"; filename*=UTF-8''%C3%BC");
    }
}
