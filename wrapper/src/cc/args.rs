//! Reading a C/C++ compiler command line (gcc's syntax, which clang shares):
//! is it one compile-only invocation (`-c`, one source, `-o`) that can become
//! an Action, or something that runs the real compiler here, and why.
//!
//! Flags are allowed by name: an unknown flag could read or write files the
//! Action does not know about, so it keeps the invocation local.

use std::fmt;

/// Why a compiler invocation runs locally (a value, as in the rustc
/// wrapper's `LocalReason`, so the stats can say why).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CcReason {
    /// No `-c`, or `-E`/`-S`/`-M`...: a link, a preprocess or a query.
    NotCompileOnly(String),
    /// Not exactly one source file.
    Sources(usize),
    /// No `-o`.
    NoOutput,
    /// An `@file` that cannot be read.
    ResponseFile(String),
    /// A flag this wrapper does not know.
    UnknownFlag(String),
    /// A flag it knows and keeps local (profiles, plugins, split DWARF...).
    UnsupportedFlag(String),
    /// Arguments are not UTF-8.
    NotUtf8,
    /// The compiler is not a gcc whose files the wrapper can find.
    Compiler(String),
    /// A variable the compiler reads (`CPATH`...) is set.
    Env(String),
    /// The dependency pre-pass failed (a missing header: the local run shows it).
    PrePassFailed,
    /// `DISTBUILD_MODE=off`.
    Off,
    /// The server could not be reached or failed.
    ServerUnavailable,
    /// No worker took the action.
    NoWorker,
    /// The remote run failed; the local run is the verdict.
    RemoteFailed,
    /// The compile failed here too.
    CompileFailed,
}

impl fmt::Display for CcReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CcReason::NotCompileOnly(w) => write!(f, "not a compile-only invocation ({w})"),
            CcReason::Sources(n) => write!(f, "{n} source files"),
            CcReason::NoOutput => write!(f, "no -o"),
            CcReason::ResponseFile(p) => write!(f, "unreadable response file {p}"),
            CcReason::UnknownFlag(w) => write!(f, "unknown flag {w}"),
            CcReason::UnsupportedFlag(w) => write!(f, "unsupported flag {w}"),
            CcReason::NotUtf8 => write!(f, "arguments not UTF-8"),
            CcReason::Compiler(c) => write!(f, "compiler not supported ({c})"),
            CcReason::Env(v) => write!(f, "${v} is set"),
            CcReason::PrePassFailed => write!(f, "dependency pre-pass failed"),
            CcReason::Off => write!(f, "wrapper off"),
            CcReason::ServerUnavailable => write!(f, "server unavailable"),
            CcReason::NoWorker => write!(f, "no worker available"),
            CcReason::RemoteFailed => write!(f, "remote run failed"),
            CcReason::CompileFailed => write!(f, "compile failed"),
        }
    }
}

/// One argument of a compile, kept in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arg {
    /// Words without a path in them (`-O2`, `-D`, `X=1`, `-fPIC`).
    Plain(Vec<String>),
    /// A flag whose value is a path (`-I dir`, `-include x.h`); `glued`
    /// when written as one word (`-Idir`).
    Path { flag: String, path: String, glued: bool },
    /// `-ffile-prefix-map=OLD=NEW` and its debug and macro forms.
    PrefixMap { flag: String, old: String, new: String },
    /// The source file.
    Source(String),
}

impl Arg {
    pub fn words(&self) -> Vec<String> {
        match self {
            Arg::Plain(w) => w.clone(),
            Arg::Path { flag, path, glued: true } => vec![format!("{flag}{path}")],
            Arg::Path { flag, path, glued: false } => vec![flag.clone(), path.clone()],
            Arg::PrefixMap { flag, old, new } => vec![format!("{flag}={old}={new}")],
            Arg::Source(s) => vec![s.clone()],
        }
    }
}

/// What `-MD`/`-MMD` asked for: a make-style dependency file written beside
/// the object (the wrapper writes it from its own pre-pass).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DepFile {
    /// `-MMD`: headers from system directories left out.
    pub user_only: bool,
    /// `-MF`; else the object's name with `.d`.
    pub file: Option<String>,
    /// `-MT` (as is) and `-MQ` (quoted for make) targets, in order.
    pub targets: Vec<(bool, String)>,
    /// `-MP`: a phony target per header.
    pub phony: bool,
}

/// A compile-only invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CcCompile {
    /// Every argument but `-o` and the dependency-file flags, in order.
    pub args: Vec<Arg>,
    pub source: String,
    /// `-o`, as written.
    pub output: String,
    pub deps: Option<DepFile>,
    /// `-x LANG` if given.
    pub language: Option<String>,
}

impl CcCompile {
    /// Whether the source is C++ (the compiler runs cc1plus).
    pub fn is_cplusplus(&self) -> bool {
        match &self.language {
            Some(l) => l.starts_with("c++"),
            None => {
                let ext = self.source.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
                matches!(ext, "cc" | "cpp" | "cxx" | "c++" | "C" | "cp" | "CPP" | "ii")
            }
        }
    }

    /// The `.d` file `-MD`/`-MMD` write, as written on the command line.
    pub fn depfile_path(&self) -> Option<String> {
        let d = self.deps.as_ref()?;
        Some(d.file.clone().unwrap_or_else(|| match self.output.rsplit_once('.') {
            Some((stem, ext)) if !ext.contains('/') => format!("{stem}.d"),
            _ => format!("{}.d", self.output),
        }))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classified {
    Compile(CcCompile),
    Local(CcReason),
}

/// Flags whose value is a path, as a separate word or glued.
const PATH_FLAGS: &[&str] = &["-I", "-isystem", "-iquote", "-idirafter", "-include", "-imacros", "-L"];

/// Flags whose value is a separate word or glued, without a path.
const VALUE_FLAGS: &[&str] = &["-D", "-U", "-x", "-target", "-arch"];

/// Words that make the invocation something other than a compile.
const NOT_COMPILE: &[&str] = &["-E", "-S", "-M", "-MM", "-fsyntax-only", "-v", "--version", "-###", "-shared"];

/// Flags that write or read files beside the Action's, or change the
/// compiler's own files: kept local.
const UNSUPPORTED: &[&str] = &[
    "--sysroot",
    "-isysroot",
    "-B",
    "-specs",
    "-fplugin",
    "-fprofile",
    "-fauto-profile",
    "-ftest-coverage",
    "--coverage",
    "-gsplit-dwarf",
    "-fdump",
    "-save-temps",
    "-Wp,",
    "-Xpreprocessor",
    "-Xclang",
    "-fstack-usage",
    "-fcallgraph-info",
    "-aux-info",
    "-MG",
    "-fdebug-prefix-map",
    "-fmacro-prefix-map",
    "-iprefix",
    "-iwithprefix",
    "-fopt-info",
    "-frecord-gcc-switches",
];

/// Path-free flags allowed by prefix.
const PLAIN_PREFIXES: &[&str] = &[
    "-f",
    "-W",
    "-O",
    "-g",
    "-m",
    "-std=",
    "-w",
    "-pedantic",
    "-ansi",
    "-pipe",
    "-pthread",
    "-nostdinc",
    "--target=",
    "-c",
];

/// Classifies the words after the compiler. `read` reads a response file.
pub fn classify(words: &[String], read: &dyn Fn(&str) -> Option<String>) -> Classified {
    let words = match expand(words, read, 0) {
        Ok(w) => w,
        Err(r) => return Classified::Local(r),
    };
    match parse(&words) {
        Ok(c) => Classified::Compile(c),
        Err(r) => Classified::Local(r),
    }
}

/// Expands `@file` arguments (gcc's quoting: whitespace separates, quotes
/// and backslashes escape), up to a few levels deep.
fn expand(words: &[String], read: &dyn Fn(&str) -> Option<String>, depth: u32) -> Result<Vec<String>, CcReason> {
    let mut out = Vec::new();
    for w in words {
        match w.strip_prefix('@') {
            Some(file) if !file.is_empty() => {
                let text = read(file).filter(|_| depth < 8).ok_or_else(|| CcReason::ResponseFile(file.to_string()))?;
                out.extend(expand(&split_response(&text), read, depth + 1)?);
            }
            _ => out.push(w.clone()),
        }
    }
    Ok(out)
}

fn split_response(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut started = false;
    let mut quote: Option<char> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (c, quote) {
            ('\\', _) => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
                started = true;
            }
            (q, None) if q == '"' || q == '\'' => {
                quote = Some(q);
                started = true;
            }
            (q, Some(open)) if q == open => quote = None,
            (c, None) if c.is_whitespace() => {
                if started {
                    out.push(std::mem::take(&mut cur));
                    started = false;
                }
            }
            (c, _) => {
                cur.push(c);
                started = true;
            }
        }
    }
    if started {
        out.push(cur);
    }
    out
}

/// A flag from `flags` at the start of `w`: (flag, glued value if any).
fn split_flag<'a>(w: &'a str, flags: &[&'static str]) -> Option<(&'static str, Option<&'a str>)> {
    // Longest first: `-include` before `-I`... none share a prefix that
    // matters except `-isystem`/`-I`, which differ in case.
    flags.iter().find_map(|f| {
        let rest = w.strip_prefix(f)?;
        Some((*f, (!rest.is_empty()).then_some(rest)))
    })
}

fn parse(words: &[String]) -> Result<CcCompile, CcReason> {
    let mut args = Vec::new();
    let mut sources = Vec::new();
    let mut output = None;
    let mut deps: Option<DepFile> = None;
    let mut dep_extra = DepFile::default();
    let mut compile_only = false;
    let mut language = None;
    let mut it = words.iter();
    let value = |it: &mut std::slice::Iter<String>, flag: &str| {
        it.next().cloned().ok_or_else(|| CcReason::UnknownFlag(format!("{flag} without a value")))
    };
    while let Some(w) = it.next() {
        let w = w.as_str();
        if w == "-c" {
            compile_only = true;
            args.push(Arg::Plain(vec![w.into()]));
        } else if NOT_COMPILE.contains(&w) {
            return Err(CcReason::NotCompileOnly(w.into()));
        } else if w == "-MD" || w == "-MMD" {
            deps = Some(DepFile { user_only: w == "-MMD", ..DepFile::default() });
        } else if w == "-MP" {
            dep_extra.phony = true;
        } else if let Some((flag, glued)) = split_flag(w, &["-MF", "-MT", "-MQ"]) {
            let v = match glued {
                Some(v) => v.to_string(),
                None => value(&mut it, flag)?,
            };
            match flag {
                "-MF" => dep_extra.file = Some(v),
                f => dep_extra.targets.push((f == "-MQ", v)),
            }
        } else if w == "-o" || (w.starts_with("-o") && w.len() > 2) {
            let v = if w == "-o" { value(&mut it, w)? } else { w[2..].to_string() };
            output = Some(v);
        } else if UNSUPPORTED.iter().any(|u| w.starts_with(u)) || w == "-" {
            return Err(CcReason::UnsupportedFlag(w.into()));
        } else if let Some(spec) = w.strip_prefix("-ffile-prefix-map=") {
            let (old, new) = spec.split_once('=').ok_or_else(|| CcReason::UnknownFlag(w.into()))?;
            args.push(Arg::PrefixMap { flag: "-ffile-prefix-map".into(), old: old.into(), new: new.into() });
        } else if let Some((flag, glued)) = split_flag(w, PATH_FLAGS) {
            let (path, glued) = match glued {
                Some(p) => (p.to_string(), true),
                None => (value(&mut it, flag)?, false),
            };
            args.push(Arg::Path { flag: flag.into(), path, glued });
        } else if let Some((flag, glued)) = split_flag(w, VALUE_FLAGS) {
            let v = match glued {
                Some(v) => v.to_string(),
                None => value(&mut it, flag)?,
            };
            if flag == "-x" {
                language = Some(v.clone());
            }
            args.push(Arg::Plain(if glued.is_some() { vec![w.into()] } else { vec![flag.into(), v] }));
        } else if PLAIN_PREFIXES.iter().any(|p| w.starts_with(p)) {
            args.push(Arg::Plain(vec![w.into()]));
        } else if w.starts_with('-') {
            return Err(CcReason::UnknownFlag(w.into()));
        } else {
            sources.push(w.to_string());
            args.push(Arg::Source(w.into()));
        }
    }
    if !compile_only {
        return Err(CcReason::NotCompileOnly("no -c".into()));
    }
    if sources.len() != 1 {
        return Err(CcReason::Sources(sources.len()));
    }
    let output = output.ok_or(CcReason::NoOutput)?;
    let deps = match deps {
        Some(d) => Some(DepFile { file: dep_extra.file, targets: dep_extra.targets, phony: dep_extra.phony, ..d }),
        None if dep_extra != DepFile::default() => return Err(CcReason::NotCompileOnly("-MF/-MT without -MD".into())),
        None => None,
    };
    Ok(CcCompile { args, source: sources.remove(0), output, deps, language })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    fn no_files(_: &str) -> Option<String> {
        None
    }

    fn classify_str(s: &str) -> Classified {
        classify(&words(s), &no_files)
    }

    #[test]
    fn classification_table() {
        use CcReason::*;
        let local: &[(&str, CcReason)] = &[
            ("-E detect.c", NotCompileOnly("-E".into())),
            ("-M x.c", NotCompileOnly("-M".into())),
            ("-MM x.c", NotCompileOnly("-MM".into())),
            ("-S x.c -o x.s", NotCompileOnly("-S".into())),
            ("x.o y.o -o app", NotCompileOnly("no -c".into())),
            ("x.c -o x", NotCompileOnly("no -c".into())),
            ("-c a.c b.c", Sources(2)),
            ("-c -O2", Sources(0)),
            ("-c x.c", NoOutput),
            ("-c x.c -o x.o --frobnicate", UnknownFlag("--frobnicate".into())),
            ("-c x.c -o x.o -Q", UnknownFlag("-Q".into())),
            ("-c x.c -o x.o -fprofile-use=x.prof", UnsupportedFlag("-fprofile-use=x.prof".into())),
            ("-c x.c -o x.o --sysroot=/s", UnsupportedFlag("--sysroot=/s".into())),
            ("-c x.c -o x.o -gsplit-dwarf", UnsupportedFlag("-gsplit-dwarf".into())),
            ("-c - -o x.o", UnsupportedFlag("-".into())),
            ("-c x.c -o x.o @missing.rsp", ResponseFile("missing.rsp".into())),
            ("-c x.c -o x.o -MF x.d", NotCompileOnly("-MF/-MT without -MD".into())),
        ];
        for (line, want) in local {
            assert_eq!(classify_str(line), Classified::Local(want.clone()), "{line}");
        }
    }

    #[test]
    fn a_cc_rs_compile() {
        let line = "-O0 -ffunction-sections -fdata-sections -fPIC -gdwarf-4 -fno-omit-frame-pointer -m64 \
                    -I /w/c -Iinclude -Wall -Wextra -DFOO=1 -D BAR -ffile-prefix-map=/w=ws \
                    -o /t/out/abc-answer.o -c /w/c/answer.c";
        let Classified::Compile(c) = classify_str(line) else { panic!("not a compile") };
        assert_eq!(c.source, "/w/c/answer.c");
        assert_eq!(c.output, "/t/out/abc-answer.o");
        assert_eq!(c.deps, None);
        assert!(!c.is_cplusplus());
        assert!(c.args.contains(&Arg::Path { flag: "-I".into(), path: "/w/c".into(), glued: false }));
        assert!(c.args.contains(&Arg::Path { flag: "-I".into(), path: "include".into(), glued: true }));
        assert!(c.args.contains(&Arg::PrefixMap {
            flag: "-ffile-prefix-map".into(),
            old: "/w".into(),
            new: "ws".into()
        }));
        assert!(c.args.contains(&Arg::Plain(vec!["-D".into(), "BAR".into()])));
        let back: Vec<String> = c.args.iter().flat_map(Arg::words).collect();
        assert!(!back.contains(&"-o".to_string()), "-o is kept apart");
        assert_eq!(back.iter().filter(|w| *w == "-c").count(), 1);
    }

    #[test]
    fn dependency_files() {
        let Classified::Compile(c) = classify_str("-MMD -MP -MT obj -MQ $x -c a.cpp -o b/a.o") else { panic!() };
        let d = c.deps.clone().unwrap();
        assert!(d.user_only && d.phony);
        assert_eq!(d.targets, vec![(false, "obj".to_string()), (true, "$x".to_string())]);
        assert_eq!(c.depfile_path().as_deref(), Some("b/a.d"));
        assert!(c.is_cplusplus());
        let Classified::Compile(c) = classify_str("-MD -MFdeps/a.d -c a.c -oa.o") else { panic!() };
        assert_eq!(c.output, "a.o");
        assert_eq!(c.depfile_path().as_deref(), Some("deps/a.d"));
        assert!(!c.deps.unwrap().user_only);
    }

    #[test]
    fn response_files_are_expanded() {
        let read = |f: &str| (f == "args.rsp").then(|| "-c \"my dir/a.c\" -o a.o\n-DX='1 2' @inner".to_string());
        let read2 = move |f: &str| if f == "inner" { Some("-O2".to_string()) } else { read(f) };
        let Classified::Compile(c) = classify(&words("@args.rsp"), &read2) else { panic!() };
        assert_eq!(c.source, "my dir/a.c");
        assert!(c.args.contains(&Arg::Plain(vec!["-DX=1 2".into()])));
        assert!(c.args.contains(&Arg::Plain(vec!["-O2".into()])));
        let looping = |_: &str| Some("@self".to_string());
        assert_eq!(classify(&words("@self"), &looping), Classified::Local(CcReason::ResponseFile("self".into())));
    }

    #[test]
    fn language_from_x() {
        let Classified::Compile(c) = classify_str("-x c++ -c a.inc -o a.o") else { panic!() };
        assert_eq!(c.language.as_deref(), Some("c++"));
        assert!(c.is_cplusplus());
    }
}
