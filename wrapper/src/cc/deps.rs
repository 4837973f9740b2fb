//! The files a C compile reads: the source and every header it includes,
//! system headers too, from a local `-M` pre-pass of the compiler (which
//! preprocesses but does not compile). The listing is remembered under a
//! location-free key, as the rustc wrapper remembers dep-info, and reused
//! while every file it lists is unchanged.
//!
//! Also writes the make-style `.d` file `-MD`/`-MMD` ask for, from the same
//! listing, with this machine's paths.

use std::path::Path;

use super::args::{Arg, CcCompile, CcReason};
use crate::hashcache::{Caches, DepInfoEntry, depinfo_key};
use crate::roots::{Roots, SYSTEM};

/// The files a compile reads, as the compiler wrote them (relative to its
/// working directory, or absolute), the source first.
pub fn listing(
    caches: &Caches,
    roots: &Roots,
    driver: &Path,
    c: &CcCompile,
    key_parts: &[&str],
) -> Result<Vec<String>, CcReason> {
    let key = depinfo_key(key_parts);
    if let Some(entry) = caches.load_depinfo(&key)
        && let Some(text) = roots.concrete_text(&entry.text)
        && is_current(caches, roots, &entry)
    {
        return Ok(parse_make(&text));
    }
    let mut words: Vec<String> = c.args.iter().flat_map(Arg::words).filter(|w| w != "-c").collect();
    words.extend(["-M".to_string(), "-MT".to_string(), "x".to_string()]);
    let out = crate::local::run_captured(driver, &words).map_err(|_| CcReason::PrePassFailed)?;
    if out.code != 0 {
        return Err(CcReason::PrePassFailed);
    }
    let text = String::from_utf8(out.stdout).map_err(|_| CcReason::PrePassFailed)?;
    let files = parse_make(&text);
    let mut digests = Vec::new();
    for f in &files {
        let m = roots.map(f).ok_or(CcReason::PrePassFailed)?;
        let d = caches.digest(&roots.absolute(f)).map_err(|_| CcReason::PrePassFailed)?;
        digests.push((m, d.digest.to_string()));
    }
    caches.store_depinfo(&key, &DepInfoEntry { text: roots.abstract_text(&text), files: digests, env: Vec::new() });
    Ok(files)
}

fn is_current(caches: &Caches, roots: &Roots, entry: &DepInfoEntry) -> bool {
    entry.files.iter().all(|(m, d)| {
        roots.unmap(m).and_then(|p| caches.digest(&p).ok()).is_some_and(|now| now.digest.to_string() == *d)
    })
}

/// The prerequisites of a make rule as gcc writes it (lines continued with
/// a backslash, spaces in names escaped), in order, without duplicates.
pub fn parse_make(text: &str) -> Vec<String> {
    let joined = text.replace("\\\n", " ");
    crate::depinfo::parse(&joined).files.into_iter().map(|f| f.replace("$$", "$")).collect()
}

fn escape(path: &str) -> String {
    path.replace('$', "$$").replace(' ', "\\ ").replace('#', "\\#")
}

/// The `.d` text `-MD`/`-MMD` would have written: the object (or the `-MT`
/// and `-MQ` targets) depending on every listed file; for `-MMD` without
/// the files outside cargo's roots (system headers); with `-MP` a phony
/// rule per header.
pub fn depfile_text(c: &CcCompile, roots: &Roots, files: &[String]) -> String {
    let Some(d) = &c.deps else { return String::new() };
    let targets: Vec<String> = if d.targets.is_empty() {
        vec![escape(&c.output)]
    } else {
        d.targets.iter().map(|(quoted, t)| if *quoted { escape(t) } else { t.clone() }).collect()
    };
    let system = |f: &String| roots.map(f).is_none_or(|m| m.starts_with(&format!("{SYSTEM}/")));
    let kept: Vec<&String> = files.iter().filter(|f| !(d.user_only && system(f))).collect();
    let mut text = format!("{}:", targets.join(" "));
    for f in &kept {
        text.push_str(" \\\n ");
        text.push_str(&escape(f));
    }
    text.push('\n');
    if d.phony {
        for f in kept.iter().skip(1) {
            text.push_str(&format!("\n{}:\n", escape(f)));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cc::args::{Classified, classify};

    #[test]
    fn gcc_make_rules() {
        let text = "x: /w/c/answer.c /w/c/answer.h \\\n /usr/include/stdio.h my\\ dir/a.h \\\n /w/c/answer.h\n";
        assert_eq!(parse_make(text), vec!["/w/c/answer.c", "/w/c/answer.h", "/usr/include/stdio.h", "my dir/a.h"]);
    }

    #[test]
    fn depfiles_as_gcc_writes_them() {
        let roots =
            Roots::for_cc(Some(Path::new("/h")), Some(Path::new("/w/target")), Path::new("/w"), Path::new("/w/c"));
        let words = |s: &str| s.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        let files = vec!["answer.c".to_string(), "answer.h".into(), "/usr/include/stdio.h".into()];
        let Classified::Compile(c) = classify(&words("-MMD -MP -c answer.c -o /w/target/a.o"), &|_| None) else {
            panic!()
        };
        assert_eq!(depfile_text(&c, &roots, &files), "/w/target/a.o: \\\n answer.c \\\n answer.h\n\nanswer.h:\n");
        let Classified::Compile(c) = classify(&words("-MD -MT obj -c answer.c -o a.o"), &|_| None) else { panic!() };
        assert_eq!(depfile_text(&c, &roots, &files), "obj: \\\n answer.c \\\n answer.h \\\n /usr/include/stdio.h\n");
    }
}
