//! Reading a rustc command line: is it a compile that can become an Action,
//! or something that runs locally, and why.
//!
//! The parse keeps every argument, in order, as a flag and its value (glued
//! forms such as `-Copt-level=1` and `--crate-name=x` are split), so the
//! mapping step can rewrite path values without knowing every flag.

use std::fmt;

/// Why an invocation runs locally. A value, not a bool, so stats and logs
/// can say why (sccache's `CannotCache(reason)`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalReason {
    /// `-V`, `-vV`, `--version`: cargo asking which rustc this is.
    Version,
    /// `--print ...`: cargo asking about the target.
    Print,
    /// The source is read from stdin (`-`).
    Stdin,
    /// `@file` arguments: their contents would be hidden from the key.
    ArgFile,
    /// No `--crate-name`: not a cargo compile.
    NoCrateName,
    /// No source file, or more than one.
    Source,
    /// No `--out-dir`.
    NoOutDir,
    /// `-o FILE` names the output directly.
    OutputFile,
    /// `-C incremental`: the incremental cache is local state.
    Incremental,
    /// An `--emit` kind other than dep-info, metadata and link, or an explicit path.
    Emit(String),
    /// `-C split-debuginfo` other than `off`: outputs we would not collect.
    SplitDebuginfo,
    /// `--explain`, `--test` without a source... things that are not a compile.
    NotACompile(String),
    /// An argument names a local path the Action cannot carry.
    LocalPath(String),
    /// An environment variable the crate reads holds a local path.
    EnvPath(String),
    /// A dependency has no record of its own dependencies (built without the wrapper).
    UnknownDependency(String),
    /// Arguments are not UTF-8.
    NotUtf8,
    /// The wrapper is turned off (`DISTBUILD_MODE=off`) or has no server.
    Off,
    /// The server could not be reached or failed.
    ServerUnavailable,
    /// No worker can link (the action needs a C linker).
    NoLinker,
    /// No worker took the action (none connected, or the queue was too long).
    NoWorker,
    /// The remote run failed; the local run is the verdict.
    RemoteFailed,
    /// The compile failed here too (a compile error, or a build script's
    /// probe meant to fail).
    CompileFailed,
    /// The dep-info pre-pass failed (usually a compile error, shown by the local run).
    DepInfoFailed,
}

impl fmt::Display for LocalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LocalReason::Version => write!(f, "version query"),
            LocalReason::Print => write!(f, "--print query"),
            LocalReason::Stdin => write!(f, "source on stdin"),
            LocalReason::ArgFile => write!(f, "@file arguments"),
            LocalReason::NoCrateName => write!(f, "no --crate-name"),
            LocalReason::Source => write!(f, "not exactly one source file"),
            LocalReason::NoOutDir => write!(f, "no --out-dir"),
            LocalReason::OutputFile => write!(f, "-o output file"),
            LocalReason::Incremental => write!(f, "incremental compilation"),
            LocalReason::Emit(e) => write!(f, "--emit {e}"),
            LocalReason::SplitDebuginfo => write!(f, "split debuginfo"),
            LocalReason::NotACompile(a) => write!(f, "not a compile ({a})"),
            LocalReason::LocalPath(p) => write!(f, "local path outside the mapped roots ({p})"),
            LocalReason::EnvPath(v) => write!(f, "reads ${v}, a local path"),
            LocalReason::UnknownDependency(d) => write!(f, "dependency {d} built without the wrapper"),
            LocalReason::NotUtf8 => write!(f, "arguments not UTF-8"),
            LocalReason::Off => write!(f, "wrapper off"),
            LocalReason::ServerUnavailable => write!(f, "server unavailable"),
            LocalReason::NoLinker => write!(f, "no worker with a linker"),
            LocalReason::NoWorker => write!(f, "no worker available"),
            LocalReason::RemoteFailed => write!(f, "remote run failed"),
            LocalReason::CompileFailed => write!(f, "compile failed"),
            LocalReason::DepInfoFailed => write!(f, "dep-info failed"),
        }
    }
}

/// One argument: a flag with its value, or a bare value (the source file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arg {
    /// Canonical flag (`-C`, `--extern`, `-L`, ...), or `None` for a positional.
    pub flag: Option<String>,
    pub value: Option<String>,
}

impl Arg {
    /// The argument as command-line words, in canonical (split) form.
    pub fn words(&self) -> Vec<String> {
        match (&self.flag, &self.value) {
            (Some(f), Some(v)) => vec![f.clone(), v.clone()],
            (Some(f), None) => vec![f.clone()],
            (None, Some(v)) => vec![v.clone()],
            (None, None) => vec![],
        }
    }
}

/// A compile cargo asked for, with what the Action needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compile {
    pub args: Vec<Arg>,
    pub crate_name: String,
    pub crate_types: Vec<String>,
    pub emit: Vec<String>,
    pub out_dir: String,
    pub extra_filename: String,
    pub source: String,
    pub target: Option<String>,
    pub test: bool,
}

impl Compile {
    /// Linking needs a C linker on the machine that runs it.
    pub fn links(&self) -> bool {
        self.emit.iter().any(|e| e == "link")
            && (self.test
                || self.crate_types.iter().any(|t| matches!(t.as_str(), "bin" | "dylib" | "cdylib" | "proc-macro")))
    }

    /// The files rustc writes into `out_dir`, by file name.
    pub fn output_names(&self) -> Vec<String> {
        let (n, e) = (&self.crate_name, &self.extra_filename);
        let mut out = Vec::new();
        for emit in &self.emit {
            match emit.as_str() {
                "dep-info" => out.push(format!("{n}{e}.d")),
                "metadata" => out.push(format!("lib{n}{e}.rmeta")),
                "link" if self.test => out.push(format!("{n}{e}")),
                "link" => {
                    for t in &self.crate_types {
                        out.push(match t.as_str() {
                            "bin" => format!("{n}{e}"),
                            "lib" | "rlib" => format!("lib{n}{e}.rlib"),
                            "staticlib" => format!("lib{n}{e}.a"),
                            _ => format!("lib{n}{e}.so"),
                        });
                    }
                }
                _ => {}
            }
        }
        out.sort();
        out.dedup();
        out
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classified {
    Compile(Compile),
    Local(LocalReason),
}

/// Flags that take a value (as the next word, after `=`, or glued for the
/// one-letter ones).
const VALUE_FLAGS: &[&str] = &[
    "--crate-name",
    "--edition",
    "--crate-type",
    "--emit",
    "--out-dir",
    "-o",
    "-L",
    "-l",
    "--extern",
    "--cfg",
    "--check-cfg",
    "--cap-lints",
    "--error-format",
    "--json",
    "--diagnostic-width",
    "--target",
    "-C",
    "--codegen",
    "-Z",
    "-W",
    "-A",
    "-D",
    "-F",
    "--warn",
    "--allow",
    "--deny",
    "--forbid",
    "--force-warn",
    "--color",
    "--sysroot",
    "--remap-path-prefix",
    "--print",
    "--explain",
    "--crate-attr",
    "--env-set",
    "--target-dir",
    "--out-dir",
];

/// Splits the words after the rustc path into [`Arg`]s.
pub fn parse(words: &[String]) -> Result<Vec<Arg>, LocalReason> {
    let mut out = Vec::new();
    let mut it = words.iter();
    while let Some(w) = it.next() {
        if w.starts_with('@') {
            return Err(LocalReason::ArgFile);
        }
        if w == "-" || !w.starts_with('-') {
            out.push(Arg { flag: None, value: Some(w.clone()) });
            continue;
        }
        let canonical = |f: &str| match f {
            "--codegen" => "-C".to_string(),
            other => other.to_string(),
        };
        if let Some((f, v)) = w.split_once('=').filter(|(f, _)| f.starts_with("--") && VALUE_FLAGS.contains(f)) {
            out.push(Arg { flag: Some(canonical(f)), value: Some(v.to_string()) });
        } else if VALUE_FLAGS.contains(&w.as_str()) {
            let value = it.next().cloned();
            out.push(Arg { flag: Some(canonical(w)), value });
        } else if let Some(short) =
            w.get(..2).filter(|s| !w.starts_with("--") && w.len() > 2 && VALUE_FLAGS.contains(s))
        {
            out.push(Arg { flag: Some(short.to_string()), value: Some(w[2..].to_string()) });
        } else {
            out.push(Arg { flag: Some(w.clone()), value: None });
        }
    }
    Ok(out)
}

/// Decides whether `words` (rustc's arguments) can become an Action.
pub fn classify(words: &[String]) -> Classified {
    match classify_inner(words) {
        Ok(c) => Classified::Compile(c),
        Err(r) => Classified::Local(r),
    }
}

fn classify_inner(words: &[String]) -> Result<Compile, LocalReason> {
    let args = parse(words)?;
    let mut crate_name = None;
    let mut crate_types = Vec::new();
    let mut emit = Vec::new();
    let mut out_dir = None;
    let mut extra_filename = String::new();
    let mut sources = Vec::new();
    let mut target = None;
    let mut test = false;
    for a in &args {
        let v = a.value.clone().unwrap_or_default();
        match a.flag.as_deref() {
            None if v == "-" => return Err(LocalReason::Stdin),
            None => sources.push(v),
            Some("-V" | "-vV" | "--version") => return Err(LocalReason::Version),
            Some("--print") => return Err(LocalReason::Print),
            Some("--explain") => return Err(LocalReason::NotACompile("--explain".into())),
            Some("-o") => return Err(LocalReason::OutputFile),
            Some("--crate-name") => crate_name = Some(v),
            Some("--crate-type") => crate_types.extend(v.split(',').map(str::to_string)),
            Some("--emit") => {
                for kind in v.split(',') {
                    if kind.contains('=') || !matches!(kind, "dep-info" | "metadata" | "link") {
                        return Err(LocalReason::Emit(kind.to_string()));
                    }
                    emit.push(kind.to_string());
                }
            }
            Some("--out-dir") => out_dir = Some(v),
            Some("--target") => target = Some(v),
            Some("--test") => test = true,
            Some("-C") => {
                let (k, val) = v.split_once('=').unwrap_or((v.as_str(), ""));
                match k {
                    "incremental" => return Err(LocalReason::Incremental),
                    "extra-filename" => extra_filename = val.to_string(),
                    "split-debuginfo" if val != "off" => return Err(LocalReason::SplitDebuginfo),
                    _ => {}
                }
            }
            Some("-h" | "--help" | "-v") => return Err(LocalReason::NotACompile(a.flag.clone().unwrap_or_default())),
            _ => {}
        }
    }
    let crate_name = crate_name.ok_or(LocalReason::NoCrateName)?;
    if sources.len() != 1 {
        return Err(LocalReason::Source);
    }
    let out_dir = out_dir.ok_or(LocalReason::NoOutDir)?;
    if emit.is_empty() {
        emit.push("link".to_string());
    }
    if crate_types.is_empty() && !test {
        crate_types.push("bin".to_string());
    }
    Ok(Compile {
        args,
        crate_name,
        crate_types,
        emit,
        out_dir,
        extra_filename,
        source: sources.remove(0),
        target,
        test,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    /// Found by the `rustc_args` fuzz target: a short flag whose second
    /// character is multi-byte (`-é`) panicked on a byte slice.
    #[test]
    fn dash_and_multibyte_char_is_a_flag() {
        let w = words("-é");
        assert_eq!(parse(&w), Ok(vec![Arg { flag: Some("-é".into()), value: None }]));
        assert!(matches!(classify(&w), Classified::Local(LocalReason::NoCrateName)));
    }

    #[test]
    fn classification_table() {
        let lib = "--crate-name serde --edition=2018 /h/.cargo/registry/src/x/serde-1.0/src/lib.rs --error-format=json \
                   --json=diagnostic-rendered-ansi,artifacts --crate-type lib --emit=dep-info,metadata,link -C embed-bitcode=no \
                   -C debuginfo=2 -C metadata=abc -C extra-filename=-abc --out-dir /w/target/debug/deps \
                   -L dependency=/w/target/debug/deps --extern serde_derive=/w/target/debug/deps/libserde_derive-1.so --cap-lints allow";
        let cases: &[(&str, Option<LocalReason>)] = &[
            (lib, None),
            ("--crate-name m src/main.rs --crate-type bin --emit=dep-info,link --out-dir t", None),
            ("--crate-name build_script_build build.rs --crate-type bin --out-dir t/build/x", None),
            ("--crate-name d src/lib.rs --crate-type proc-macro --out-dir t", None),
            ("--crate-name c src/lib.rs --crate-type cdylib --out-dir t", None),
            ("--crate-name t src/lib.rs --test --out-dir t", None),
            ("-vV", Some(LocalReason::Version)),
            ("- --crate-name ___ --print=file-names --crate-type bin", Some(LocalReason::Stdin)),
            ("--crate-name x --print cfg src/lib.rs", Some(LocalReason::Print)),
            ("@args.txt", Some(LocalReason::ArgFile)),
            ("src/lib.rs --out-dir t", Some(LocalReason::NoCrateName)),
            ("--crate-name x --out-dir t", Some(LocalReason::Source)),
            ("--crate-name x a.rs b.rs --out-dir t", Some(LocalReason::Source)),
            ("--crate-name x a.rs", Some(LocalReason::NoOutDir)),
            ("--crate-name x a.rs -o out", Some(LocalReason::OutputFile)),
            (
                "--crate-name x a.rs --out-dir t -C incremental=/w/target/debug/incremental",
                Some(LocalReason::Incremental),
            ),
            ("--crate-name x a.rs --out-dir t -Cincremental=/i", Some(LocalReason::Incremental)),
            ("--crate-name x a.rs --out-dir t --emit=asm", Some(LocalReason::Emit("asm".into()))),
            ("--crate-name x a.rs --out-dir t --emit=link=/tmp/x", Some(LocalReason::Emit("link=/tmp/x".into()))),
            ("--crate-name x a.rs --out-dir t -C split-debuginfo=unpacked", Some(LocalReason::SplitDebuginfo)),
            ("--crate-name x a.rs --out-dir t -C split-debuginfo=off", None),
            ("--explain E0308", Some(LocalReason::NotACompile("--explain".into()))),
        ];
        for (line, want) in cases {
            let got = classify(&words(line));
            match (want, got) {
                (None, Classified::Compile(_)) => {}
                (Some(w), Classified::Local(r)) => assert_eq!(&r, w, "{line}"),
                (w, g) => panic!("{line}: want {w:?}, got {g:?}"),
            }
        }
    }

    #[test]
    fn parsed_fields_and_outputs() {
        let Classified::Compile(c) = classify(&words(
            "--crate-name foo --edition=2021 src/lib.rs --crate-type lib --crate-type proc-macro \
             --emit=dep-info,metadata,link -Cextra-filename=-0a1b --out-dir=/w/t --target x86_64-unknown-linux-gnu",
        )) else {
            panic!("not a compile")
        };
        assert_eq!(c.crate_name, "foo");
        assert_eq!(c.crate_types, vec!["lib", "proc-macro"]);
        assert_eq!(c.extra_filename, "-0a1b");
        assert_eq!(c.out_dir, "/w/t");
        assert_eq!(c.source, "src/lib.rs");
        assert_eq!(c.target.as_deref(), Some("x86_64-unknown-linux-gnu"));
        assert!(c.links());
        assert_eq!(c.output_names(), vec!["foo-0a1b.d", "libfoo-0a1b.rlib", "libfoo-0a1b.rmeta", "libfoo-0a1b.so"]);

        let Classified::Compile(t) =
            classify(&words("--crate-name it tests/it.rs --test -C extra-filename=-9 --out-dir t"))
        else {
            panic!("not a compile")
        };
        assert!(t.links());
        assert_eq!(t.output_names(), vec!["it-9"]);

        let Classified::Compile(m) =
            classify(&words("--crate-name m src/lib.rs --crate-type lib --emit=dep-info,metadata --out-dir t"))
        else {
            panic!("not a compile")
        };
        assert!(!m.links());
        assert_eq!(m.output_names(), vec!["libm.rmeta", "m.d"]);
    }

    #[test]
    fn glued_and_split_forms_parse_alike() {
        let a = parse(&words("-Copt-level=1 -L native=/x --cfg=feature=\"a\" -Wunused --extern=a=b")).unwrap();
        let b = parse(&words("-C opt-level=1 -Lnative=/x --cfg feature=\"a\" -W unused --extern a=b")).unwrap();
        assert_eq!(a, b);
        assert_eq!(a[0].words(), vec!["-C", "opt-level=1"]);
    }
}
