//! The qualifiers of a Fetch or Push, parsed once.
//!
//! Known to this server: `checksum.sri`, `bazel.canonical_id`,
//! `http_header:NAME`, `http_header_url:N:NAME`, `bazel.auth_headers`
//! (Bazel's JSON of headers per URL) and `resource_type` (informational).
//! Every qualifier, known or not, is part of a record's key (the spec lets
//! a Push carry any, and a Fetch of pushed content must name the same
//! ones); a Fetch that has to download refuses the unknown ones.

use std::collections::BTreeMap;

use remote_apis::quote;
use reqwest::header::{HeaderName, HeaderValue};

use super::sri::Sri;
use crate::error::{Error, Result};
use remote_apis::asset::Qualifier;

pub const SRI: &str = "checksum.sri";
pub const CANONICAL_ID: &str = "bazel.canonical_id";
pub const AUTH_HEADERS: &str = "bazel.auth_headers";
pub const RESOURCE_TYPE: &str = "resource_type";
const HEADER: &str = "http_header:";
const HEADER_URL: &str = "http_header_url:";

/// A request's qualifiers.
#[derive(Debug, Default)]
pub struct Qualifiers {
    /// Every qualifier by name (names are unique), for record keys.
    pub all: BTreeMap<String, String>,
    pub sri: Option<Sri>,
    /// Headers for every URI.
    headers: Vec<(HeaderName, HeaderValue)>,
    /// Headers for the URI at an index.
    url_headers: Vec<(usize, HeaderName, HeaderValue)>,
    /// `bazel.auth_headers`: headers per exact URL.
    auth_headers: BTreeMap<String, Vec<(HeaderName, HeaderValue)>>,
    /// Names this server cannot honour when it downloads.
    pub unknown: Vec<String>,
}

impl Qualifiers {
    /// Parses; INVALID_ARGUMENT naming the qualifier for a repeated name or
    /// a malformed known value. Unknown names are kept in `unknown`.
    pub fn parse(list: &[Qualifier]) -> Result<Qualifiers> {
        let mut q = Qualifiers::default();
        for item in list {
            let name = item.name.as_str();
            if q.all.insert(item.name.clone(), item.value.clone()).is_some() {
                return Err(Error::bad_field("qualifiers.name", format!("{} appears twice", quote(name))));
            }
            let bad = |what: String| Error::bad_field(&format!("qualifiers[{}]", quote(name)), what);
            if name == SRI {
                q.sri = Some(Sri::parse(&item.value).map_err(bad)?);
            } else if name == CANONICAL_ID || name == RESOURCE_TYPE {
            } else if name == AUTH_HEADERS {
                q.auth_headers = parse_auth_headers(&item.value).map_err(bad)?;
            } else if let Some(header) = name.strip_prefix(HEADER) {
                q.headers.push(header_pair(header, &item.value).map_err(bad)?);
            } else if let Some(rest) = name.strip_prefix(HEADER_URL) {
                let (index, header) =
                    rest.split_once(':').ok_or_else(|| bad("is not http_header_url:N:NAME".into()))?;
                let index: usize =
                    index.parse().map_err(|_| bad("N in http_header_url:N:NAME is not a number".into()))?;
                let (n, v) = header_pair(header, &item.value).map_err(bad)?;
                q.url_headers.push((index, n, v));
            } else {
                q.unknown.push(item.name.clone());
            }
        }
        Ok(q)
    }

    /// INVALID_ARGUMENT with a BadRequest violation per unknown qualifier
    /// (`qualifiers.name`, `"NAME" not supported`), as the spec asks.
    pub fn refuse_unknown(&self) -> Result<()> {
        let Some(first) = self.unknown.first() else { return Ok(()) };
        let names: Vec<String> = self.unknown.iter().take(5).map(|n| quote(n).to_string()).collect();
        let mut e = Error::bad_field("qualifiers.name", format!("{} not supported", quote(first)));
        e.message = format!("qualifiers not supported: {}", names.join(", "));
        Err(e)
    }

    /// The headers to send to `uris[index]`: every `http_header:`, then the
    /// URI's own `http_header_url:` and `bazel.auth_headers` entries (later
    /// ones replace earlier ones of the same name).
    pub fn headers_for(&self, index: usize, uri: &str) -> Vec<(HeaderName, HeaderValue)> {
        let mut out: Vec<(HeaderName, HeaderValue)> = self.headers.clone();
        let mut set = |n: &HeaderName, v: &HeaderValue| {
            out.retain(|(k, _)| k != n);
            out.push((n.clone(), v.clone()));
        };
        for (i, n, v) in &self.url_headers {
            if *i == index {
                set(n, v);
            }
        }
        if let Some(list) = self.auth_headers.get(uri) {
            for (n, v) in list {
                set(n, v);
            }
        }
        out
    }
}

fn header_pair(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), String> {
    let n = HeaderName::from_bytes(name.as_bytes()).map_err(|_| "names no valid HTTP header".to_string())?;
    let mut v =
        HeaderValue::from_str(value).map_err(|_| "has a value that is no valid HTTP header value".to_string())?;
    v.set_sensitive(true);
    Ok((n, v))
}

/// `{"URL": {"Header": "value" | ["value", ...]}}`: Bazel's credentials per
/// URL (the first value of a list is sent, as Bazel does).
fn parse_auth_headers(json: &str) -> Result<BTreeMap<String, Vec<(HeaderName, HeaderValue)>>, String> {
    let parsed: BTreeMap<String, BTreeMap<String, serde_json::Value>> =
        serde_json::from_str(json).map_err(|_| "is not a JSON object of URL -> {header: value}".to_string())?;
    let mut out = BTreeMap::new();
    for (url, headers) in parsed {
        let mut list = Vec::new();
        for (name, value) in headers {
            let value = match &value {
                serde_json::Value::String(s) => Some(s.as_str()),
                serde_json::Value::Array(a) => a.first().and_then(|v| v.as_str()),
                _ => return Err("has a header value that is not a string or a list of strings".into()),
            };
            if let Some(value) = value {
                list.push(header_pair(&name, value)?);
            }
        }
        out.insert(url, list);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Vec<Qualifier> {
        pairs.iter().map(|(n, v)| Qualifier { name: n.to_string(), value: v.to_string() }).collect()
    }

    #[test]
    fn known_qualifiers_parse_and_unknown_are_kept() {
        let parsed = Qualifiers::parse(&q(&[
            ("checksum.sri", "sha256-ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="),
            ("bazel.canonical_id", "abc"),
            ("resource_type", "application/x-tar"),
            ("http_header:X-Common", "one"),
            ("http_header_url:1:X-Common", "two"),
            ("bazel.auth_headers", r#"{"http://b/x": {"Authorization": ["Bearer t", "ignored"]}}"#),
            ("vcs.commit", "deadbeef"),
        ]))
        .unwrap();
        assert!(parsed.sri.is_some());
        assert_eq!(parsed.unknown, vec!["vcs.commit".to_string()]);
        let e = parsed.refuse_unknown().unwrap_err();
        assert_eq!(e.code, tonic::Code::InvalidArgument);
        assert_eq!(e.bad_field.as_ref().unwrap().0, "qualifiers.name");
        assert!(e.bad_field.as_ref().unwrap().1.contains("\"vcs.commit\" not supported"));
        let h0 = parsed.headers_for(0, "http://a/x");
        assert_eq!(h0.len(), 1);
        assert_eq!(h0[0].1, "one");
        let h1 = parsed.headers_for(1, "http://b/x");
        let names: Vec<(&str, &str)> = h1.iter().map(|(n, v)| (n.as_str(), v.to_str().unwrap())).collect();
        assert_eq!(names, vec![("x-common", "two"), ("authorization", "Bearer t")]);
    }

    #[test]
    fn malformed_known_qualifiers_are_refused_by_name() {
        let cases = [
            ("checksum.sri", "md5-xyz"),
            ("http_header:bad name", "v"),
            ("http_header:X", "line\nbreak"),
            ("http_header_url:x:Name", "v"),
            ("http_header_url:0", "v"),
            ("bazel.auth_headers", "[1,2]"),
        ];
        for (name, value) in cases {
            let e = Qualifiers::parse(&q(&[(name, value)])).unwrap_err();
            assert_eq!(e.code, tonic::Code::InvalidArgument, "{name}");
            assert!(e.bad_field.unwrap().0.contains(name.split(':').next().unwrap()), "{name}");
        }
        let e = Qualifiers::parse(&q(&[("a", "1"), ("a", "2")])).unwrap_err();
        assert!(e.message.contains("twice"), "{}", e.message);
    }
}
