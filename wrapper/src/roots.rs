//! Location independence: the local directories a compile touches, each
//! mapped to a fixed relative location in the Action's input root.
//!
//! | local                          | in the input root |
//! | ------------------------------ | ----------------- |
//! | the toolchain's sysroot        | `toolchain/`      |
//! | `CARGO_HOME`                   | `cargo-home/`     |
//! | the target directory           | `target/`         |
//! | rustc's working directory      | `ws/`             |
//!
//! The longest matching root wins, so a target directory inside the
//! workspace maps to `target/`. Paths are made absolute and normalized
//! lexically (never through the filesystem, so a symlinked checkout maps by
//! the path cargo used).

use std::path::{Component, Path, PathBuf};

pub const TOOLCHAIN: &str = "toolchain";
pub const CARGO_HOME: &str = "cargo-home";
pub const TARGET: &str = "target";
pub const WORKSPACE: &str = "ws";
/// For C compiles: everything outside the other roots, at its absolute
/// path (`/usr/include/stdio.h` is `sys/usr/include/stdio.h`).
pub const SYSTEM: &str = "sys";

#[derive(Debug, Clone)]
pub struct Roots {
    /// (local absolute path, name in the input root), longest path first.
    roots: Vec<(PathBuf, &'static str)>,
    cwd: PathBuf,
    cwd_mapped: String,
}

impl Roots {
    /// `cwd` is rustc's working directory; it is the workspace root unless it
    /// lies inside another root (a registry crate's directory).
    pub fn new(sysroot: &Path, cargo_home: Option<&Path>, target_dir: Option<&Path>, cwd: &Path) -> Roots {
        let cwd = normalize(cwd);
        let mut roots: Vec<(PathBuf, &'static str)> = vec![(normalize(sysroot), TOOLCHAIN)];
        if let Some(h) = cargo_home {
            roots.push((normalize(h), CARGO_HOME));
        }
        if let Some(t) = target_dir {
            roots.push((normalize(t), TARGET));
        }
        let inside_other = roots.iter().any(|(p, _)| cwd.starts_with(p));
        if !inside_other {
            roots.push((cwd.clone(), WORKSPACE));
        }
        roots.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        let mut r = Roots { roots, cwd: cwd.clone(), cwd_mapped: String::new() };
        r.cwd_mapped = r.map_abs(&cwd).unwrap_or_default();
        r
    }

    /// The roots of a C compile a build script runs: `CARGO_HOME`, the
    /// target directory and the workspace as for rustc, and `/` as
    /// [`SYSTEM`], so system headers and the compiler's own files map too.
    /// `cwd` (the package directory) need not be a root.
    pub fn for_cc(cargo_home: Option<&Path>, target_dir: Option<&Path>, workspace: &Path, cwd: &Path) -> Roots {
        let mut roots: Vec<(PathBuf, &'static str)> =
            vec![(PathBuf::from("/"), SYSTEM), (normalize(workspace), WORKSPACE)];
        if let Some(h) = cargo_home {
            roots.push((normalize(h), CARGO_HOME));
        }
        if let Some(t) = target_dir {
            roots.push((normalize(t), TARGET));
        }
        roots.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        let cwd = normalize(cwd);
        let mut r = Roots { roots, cwd: cwd.clone(), cwd_mapped: String::new() };
        r.cwd_mapped = r.map_abs(&cwd).unwrap_or_default();
        r
    }

    pub fn cwd(&self) -> &Path {
        &self.cwd
    }

    /// rustc's working directory in the input root.
    pub fn cwd_mapped(&self) -> &str {
        &self.cwd_mapped
    }

    /// `path` (absolute, or relative to rustc's working directory) as a path
    /// in the input root, or `None` when it lies outside every root.
    pub fn map(&self, path: &str) -> Option<String> {
        self.map_abs(&self.absolute(path))
    }

    pub fn absolute(&self, path: &str) -> PathBuf {
        normalize(&self.cwd.join(path))
    }

    fn map_abs(&self, abs: &Path) -> Option<String> {
        for (root, name) in &self.roots {
            if let Ok(rest) = abs.strip_prefix(root) {
                let rest = rest.to_str()?;
                return Some(if rest.is_empty() { name.to_string() } else { format!("{name}/{rest}") });
            }
        }
        None
    }

    /// A path in the input root as rustc, running in the mapped working
    /// directory, should be given it: relative, climbing with `..`.
    pub fn relative_to_cwd(&self, mapped: &str) -> String {
        relative(&self.cwd_mapped, mapped)
    }

    /// A path in the input root back to this machine.
    pub fn unmap(&self, mapped: &str) -> Option<PathBuf> {
        let (head, rest) = mapped.split_once('/').unwrap_or((mapped, ""));
        let (root, _) = self.roots.iter().find(|(_, n)| *n == head)?;
        Some(if rest.is_empty() { root.clone() } else { root.join(rest) })
    }

    /// Whether any root's local path occurs in `text` (an argument we cannot
    /// map structurally).
    pub fn mentioned_in(&self, text: &str) -> Option<&Path> {
        self.roots.iter().map(|(p, _)| p.as_path()).find(|p| p.to_str().is_some_and(|s| s != "/" && text.contains(s)))
    }

    /// `--remap-path-prefix` arguments that make a local run embed the same
    /// paths as a remote one (`<exec root>/ws/src/x.rs` becomes `ws/src/x.rs`
    /// there, so `/home/me/proj/src/x.rs` becomes `ws/src/x.rs` here).
    /// rustc applies the last matching mapping, so longest roots go last.
    pub fn remap_args(&self) -> Vec<String> {
        self.roots.iter().rev().map(|(p, n)| format!("--remap-path-prefix={}={n}", p.display())).collect()
    }

    /// Text with every root's local path replaced by `{{name}}` (for caching
    /// dep-info independently of where the checkout is).
    pub fn abstract_text(&self, text: &str) -> String {
        let mut out = text.to_string();
        for (p, n) in &self.roots {
            if let Some(s) = p.to_str().filter(|s| *s != "/") {
                out = out.replace(s, &format!("{{{{{n}}}}}"));
            }
        }
        out
    }

    /// The inverse of [`Roots::abstract_text`] for this machine.
    pub fn concrete_text(&self, text: &str) -> Option<String> {
        let mut out = text.to_string();
        for (p, n) in &self.roots {
            out = out.replace(&format!("{{{{{n}}}}}"), p.to_str()?);
        }
        let left = [TOOLCHAIN, CARGO_HOME, TARGET, WORKSPACE].iter().any(|n| out.contains(&format!("{{{{{n}}}}}")));
        (!left).then_some(out)
    }
}

/// `to` relative to `from`, both relative paths in one tree.
pub fn relative(from: &str, to: &str) -> String {
    let f: Vec<&str> = from.split('/').filter(|s| !s.is_empty()).collect();
    let t: Vec<&str> = to.split('/').filter(|s| !s.is_empty()).collect();
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<&str> = vec![".."; f.len() - common];
    parts.extend(&t[common..]);
    if parts.is_empty() { ".".to_string() } else { parts.join("/") }
}

/// Lexical normalization: `.` dropped, `..` pops (never above `/`).
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// The target directory of an output directory: the nearest ancestor with
/// the `CACHEDIR.TAG` cargo writes at the top of every target directory.
pub fn find_target_dir(out_dir: &Path) -> Option<PathBuf> {
    out_dir.ancestors().find(|d| d.join("CACHEDIR.TAG").is_file()).map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roots() -> Roots {
        Roots::new(
            Path::new("/opt/rust/toolchains/stable"),
            Some(Path::new("/home/a/.cargo")),
            Some(Path::new("/home/a/proj/target")),
            Path::new("/home/a/proj"),
        )
    }

    #[test]
    fn mapping_table() {
        let r = roots();
        let cases: &[(&str, Option<&str>)] = &[
            ("src/lib.rs", Some("ws/src/lib.rs")),
            ("./src/../src/main.rs", Some("ws/src/main.rs")),
            ("/home/a/proj/target/debug/deps", Some("target/debug/deps")),
            ("/home/a/proj/target", Some("target")),
            ("/home/a/proj/targets/x", Some("ws/targets/x")),
            (
                "/home/a/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/serde-1.0.0/src/lib.rs",
                Some("cargo-home/registry/src/index.crates.io-1949cf8c6b5b557f/serde-1.0.0/src/lib.rs"),
            ),
            ("/opt/rust/toolchains/stable/lib/rustlib", Some("toolchain/lib/rustlib")),
            ("/usr/lib/x86_64-linux-gnu", None),
            ("../other/src/lib.rs", None),
        ];
        for (path, want) in cases {
            assert_eq!(r.map(path).as_deref(), *want, "{path}");
        }
        assert_eq!(r.cwd_mapped(), "ws");
        assert_eq!(r.relative_to_cwd("target/debug/deps"), "../target/debug/deps");
        assert_eq!(r.relative_to_cwd("ws/src/lib.rs"), "src/lib.rs");
        assert_eq!(r.unmap("target/debug/x.d"), Some(PathBuf::from("/home/a/proj/target/debug/x.d")));
        assert_eq!(r.unmap("elsewhere/x"), None);
    }

    #[test]
    fn a_registry_crate_works_in_its_own_directory() {
        let cwd = "/home/a/.cargo/registry/src/idx/serde-1.0.0";
        let r = Roots::new(
            Path::new("/opt/rust"),
            Some(Path::new("/home/a/.cargo")),
            Some(Path::new("/home/a/proj/target")),
            Path::new(cwd),
        );
        assert_eq!(r.cwd_mapped(), "cargo-home/registry/src/idx/serde-1.0.0");
        assert_eq!(r.map("src/lib.rs").as_deref(), Some("cargo-home/registry/src/idx/serde-1.0.0/src/lib.rs"));
        assert_eq!(r.relative_to_cwd("target/debug/deps"), "../../../../../target/debug/deps");
        assert_eq!(r.map("/home/a/proj/src/main.rs"), None, "no workspace root when rustc runs in the registry");
    }

    #[test]
    fn two_checkouts_map_alike() {
        let a = roots();
        let b = Roots::new(
            Path::new("/opt/rust/toolchains/stable"),
            Some(Path::new("/tmp/other-home")),
            Some(Path::new("/srv/b/proj/target")),
            Path::new("/srv/b/proj"),
        );
        for (pa, pb) in [
            ("/home/a/proj/target/debug/deps/libx-1.rlib", "/srv/b/proj/target/debug/deps/libx-1.rlib"),
            ("/home/a/.cargo/registry/src/i/x-1/src/lib.rs", "/tmp/other-home/registry/src/i/x-1/src/lib.rs"),
            ("src/main.rs", "src/main.rs"),
        ] {
            assert_eq!(a.map(pa), b.map(pb));
        }
        let text = "/home/a/proj/target/debug/deps/x.d: src/lib.rs /home/a/.cargo/registry/src/i/x.rs\n";
        let abstracted = a.abstract_text(text);
        assert_eq!(abstracted, "{{target}}/debug/deps/x.d: src/lib.rs {{cargo-home}}/registry/src/i/x.rs\n");
        assert_eq!(
            b.concrete_text(&abstracted).unwrap(),
            "/srv/b/proj/target/debug/deps/x.d: src/lib.rs /tmp/other-home/registry/src/i/x.rs\n"
        );
    }

    #[test]
    fn relative_paths() {
        assert_eq!(relative("ws", "ws"), ".");
        assert_eq!(relative("", "target/x"), "target/x");
        assert_eq!(relative("a/b", "a/c/d"), "../c/d");
    }
}
