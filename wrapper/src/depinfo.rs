//! rustc's dep-info (`--emit=dep-info`): the reliable list of the files a
//! crate reads, and of the environment variables it reads through `env!` and
//! `option_env!`.

/// What a dep-info file says a compile reads.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DepInfo {
    /// Files, as rustc wrote them (relative to its working directory, or absolute).
    pub files: Vec<String>,
    /// Variables read, with the value seen (`None`: read while unset).
    pub env: Vec<(String, Option<String>)>,
}

/// Parses the Makefile-style text rustc writes.
pub fn parse(text: &str) -> DepInfo {
    let mut info = DepInfo::default();
    for line in text.lines() {
        if let Some(dep) = line.strip_prefix("# env-dep:") {
            let (name, value) = match dep.split_once('=') {
                Some((n, v)) => (n, Some(unescape_env(v))),
                None => (dep, None),
            };
            info.env.push((name.to_string(), value));
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some(deps) = split_rule(line) else { continue };
        for word in split_words(deps) {
            if !info.files.contains(&word) {
                info.files.push(word);
            }
        }
    }
    info.env.sort();
    info.env.dedup();
    info
}

/// The part after the rule's `:` (a `:` escaped with `\` is part of a name).
fn split_rule(line: &str) -> Option<&str> {
    let bytes = line.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b':' if bytes.get(i + 1).is_none_or(|b| *b == b' ') => return Some(&line[i + 1..]),
            _ => i += 1,
        }
    }
    None
}

/// Words separated by unescaped spaces; `\ ` is a space inside a name.
fn split_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if matches!(chars.peek(), Some(' ') | Some(':') | Some('#')) => cur.push(chars.next().unwrap()),
            ' ' => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn unescape_env(v: &str) -> String {
    let mut out = String::new();
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('r') => out.push('\r'),
                Some(other) => out.push(other),
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustc_dep_info() {
        let text = "/w/target/debug/deps/foo-1.d: src/lib.rs src/a\\ b.rs /w/target/debug/build/foo-2/out/gen.rs\n\
                    \n\
                    src/lib.rs:\n\
                    src/a\\ b.rs:\n\
                    /w/target/debug/build/foo-2/out/gen.rs:\n\
                    \n\
                    # env-dep:CARGO_PKG_NAME=foo\n\
                    # env-dep:OUT_DIR=/w/target/debug/build/foo-2/out\n\
                    # env-dep:MAYBE\n\
                    # env-dep:MULTI=a\\nb\n";
        let info = parse(text);
        assert_eq!(info.files, vec!["src/lib.rs", "src/a b.rs", "/w/target/debug/build/foo-2/out/gen.rs"]);
        assert_eq!(
            info.env,
            vec![
                ("CARGO_PKG_NAME".to_string(), Some("foo".to_string())),
                ("MAYBE".to_string(), None),
                ("MULTI".to_string(), Some("a\nb".to_string())),
                ("OUT_DIR".to_string(), Some("/w/target/debug/build/foo-2/out".to_string())),
            ]
        );
    }

    #[test]
    fn empty_and_odd_input() {
        assert_eq!(parse(""), DepInfo::default());
        assert_eq!(parse("x.d:\n").files, Vec::<String>::new());
        assert_eq!(parse("C\\:/x.d: a.rs\n").files, vec!["a.rs"]);
    }
}
