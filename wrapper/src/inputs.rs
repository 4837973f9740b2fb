//! What enters a compile's key, chosen step by step (the numbers are
//! `key.rs`'s list): the arguments mapped into the input root (3), the
//! variables the crate reads (5), its input files (6: sources, the package
//! and `OUT_DIR` of registry crates, the `--extern` libraries and their
//! closure, native libraries) and its outputs (7). Each step is a function;
//! an error is the reason the compile runs locally.

use std::path::{Path, PathBuf};

use remote_apis::Digest;

use crate::args::{Compile, LocalReason};
use crate::depinfo::DepInfo;
use crate::hashcache::Caches;
use crate::local;
use crate::roots::Roots;

/// One input file: (path in the input root, digest, executable, local path).
pub type InputFile = (String, Digest, bool, PathBuf);

/// The arguments with every path mapped, and what they name.
#[derive(Debug, Default)]
pub struct MappedArgs {
    /// 3. The arguments as the Action's command line.
    pub words: Vec<String>,
    /// `--extern` libraries: (crate name, local path, mapped path).
    pub externs: Vec<(String, PathBuf, String)>,
    /// `-L` directories other than `dependency=`: (mapped, local).
    pub native_dirs: Vec<(String, PathBuf)>,
}

/// Item 3: maps every path in the arguments into the input root, relative
/// to the mapped working directory.
pub fn map_args(roots: &Roots, c: &Compile) -> Result<MappedArgs, LocalReason> {
    let mut m = MappedArgs::default();
    let local_path = |p: &str| LocalReason::LocalPath(p.to_string());
    for a in &c.args {
        let mut words = a.words();
        match (a.flag.as_deref(), a.value.as_deref()) {
            (None, Some(v)) | (Some("--out-dir"), Some(v)) => {
                let mapped = roots.map(v).ok_or_else(|| local_path(v))?;
                *words.last_mut().expect("a value") = roots.relative_to_cwd(&mapped);
            }
            (Some("-L"), Some(v)) => {
                let (kind, path) = v.split_once('=').unwrap_or(("all", v));
                match roots.map(path) {
                    Some(mapped) => {
                        if kind != "dependency" {
                            m.native_dirs.push((mapped.clone(), roots.absolute(path)));
                        }
                        words[1] = format!("{kind}={}", roots.relative_to_cwd(&mapped));
                    }
                    None if Path::new(path).is_absolute() && roots.mentioned_in(path).is_none() => {}
                    None => return Err(local_path(path)),
                }
            }
            (Some("--extern"), Some(v)) => {
                if let Some((name, path)) = v.split_once('=') {
                    let mapped = roots.map(path).ok_or_else(|| local_path(path))?;
                    let short = name.rsplit(':').next().unwrap_or(name).to_string();
                    m.externs.push((short, roots.absolute(path), mapped.clone()));
                    words[1] = format!("{name}={}", roots.relative_to_cwd(&mapped));
                }
            }
            (_, Some(v)) if roots.mentioned_in(v).is_some() => return Err(local_path(v)),
            _ => {}
        }
        m.words.extend(words);
    }
    Ok(m)
}

/// Item 5, the variables in the key: those dep-info lists (with `OUT_DIR`
/// mapped; any other holding a local path keeps the compile here), every
/// package variable for registry crates (`immutable`), `RUSTC_BOOTSTRAP`.
pub fn key_env(roots: &Roots, info: &DepInfo, immutable: bool) -> Result<Vec<(String, String)>, LocalReason> {
    let mut env = if immutable { crate::immutable::package_env(roots) } else { Vec::new() };
    for (name, value) in &info.env {
        let Some(v) = value else { continue };
        if name == "OUT_DIR" {
            let m = roots.map(v).ok_or_else(|| LocalReason::EnvPath(name.clone()))?;
            env.push((name.clone(), m));
        } else if roots.mentioned_in(v).is_some() {
            return Err(LocalReason::EnvPath(name.clone()));
        } else {
            env.push((name.clone(), v.clone()));
        }
    }
    if let Ok(v) = std::env::var("RUSTC_BOOTSTRAP") {
        env.push(("RUSTC_BOOTSTRAP".into(), v));
    }
    Ok(env)
}

/// Item 6, the input files as the key takes them: (mapped path, digest,
/// executable, local path), sorted and unique by mapped path.
pub struct Files<'a> {
    caches: &'a Caches,
    roots: &'a Roots,
    pub list: Vec<InputFile>,
    /// Directories that must exist in the input root.
    pub dirs: Vec<String>,
}

impl<'a> Files<'a> {
    pub fn new(caches: &'a Caches, roots: &'a Roots) -> Files<'a> {
        Files { caches, roots, list: Vec::new(), dirs: Vec::new() }
    }

    fn add(&mut self, mapped: String, local: PathBuf) -> Result<(), LocalReason> {
        let d = self.caches.digest(&local).map_err(|_| LocalReason::LocalPath(local.display().to_string()))?;
        self.list.push((mapped, d.digest, d.executable, local));
        Ok(())
    }

    fn add_local(&mut self, local: PathBuf) -> Result<(), LocalReason> {
        let m = self
            .roots
            .map(&local.to_string_lossy())
            .ok_or_else(|| LocalReason::LocalPath(local.display().to_string()))?;
        self.add(m, local)
    }

    /// The sources dep-info lists, and the directories they climb out of.
    pub fn sources(&mut self, info: &DepInfo) -> Result<(), LocalReason> {
        for f in &info.files {
            let m = self.roots.map(f).ok_or_else(|| LocalReason::LocalPath(f.clone()))?;
            self.add(m, self.roots.absolute(f))?;
            self.dirs.extend(climbed_dirs(self.roots, f));
        }
        Ok(())
    }

    /// A registry crate: every file of the package, and what its build
    /// script generated that rustc may read.
    pub fn package(&mut self) -> Result<(), LocalReason> {
        let roots = self.roots;
        let out = std::env::var("OUT_DIR").ok().filter(|o| roots.map(o).is_some()).map(PathBuf::from);
        let below = |dir: &Path| {
            crate::immutable::files_below(dir).map_err(|_| LocalReason::LocalPath(dir.display().to_string()))
        };
        let package = below(roots.cwd())?;
        let generated = match &out {
            Some(dir) => below(dir)?,
            None => Vec::new(),
        };
        let generated = generated.into_iter().filter(|f| crate::immutable::may_be_read(f));
        for local in package.into_iter().chain(generated) {
            self.add_local(local)?;
        }
        Ok(())
    }

    /// The `--extern` libraries and, from their sidecars, every library
    /// they depend on; returns the closure (library stems), sorted.
    pub fn externs(&mut self, externs: &[(String, PathBuf, String)], links: bool) -> Result<Vec<String>, LocalReason> {
        let mut closure: Vec<String> = Vec::new();
        for (name, local, m) in externs {
            self.add(m.clone(), local.clone())?;
            let stem = local.with_extension("").to_string_lossy().to_string();
            let deps = std::fs::read_to_string(sidecar_path(&stem))
                .map_err(|_| LocalReason::UnknownDependency(name.clone()))?;
            closure.push(stem);
            closure.extend(deps.lines().filter(|l| !l.is_empty()).map(str::to_string));
        }
        closure.sort();
        closure.dedup();
        let preference: &[&str] = if links { &["rlib", "rmeta"] } else { &["rmeta", "rlib"] };
        for stem in &closure {
            let chosen = preference.iter().map(|ext| PathBuf::from(format!("{stem}.{ext}"))).find(|p| p.is_file());
            let so = PathBuf::from(format!("{stem}.so"));
            for local in chosen.into_iter().chain(so.is_file().then_some(so)) {
                self.add_local(local)?;
            }
        }
        Ok(closure)
    }

    /// The libraries in `-L native=` (and plain `-L`) directories.
    pub fn native(&mut self, dirs: &[(String, PathBuf)]) -> Result<(), LocalReason> {
        for (m, dir) in dirs {
            let entries = std::fs::read_dir(dir).map_err(|_| LocalReason::LocalPath(dir.display().to_string()))?;
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if is_library(&name) && e.file_type().is_ok_and(|t| t.is_file()) {
                    self.add(format!("{m}/{name}"), e.path())?;
                }
            }
        }
        Ok(())
    }

    /// The list, sorted and without duplicates, as the key wants it.
    pub fn finish(mut self) -> (Vec<InputFile>, Vec<String>) {
        self.list.sort_by(|a, b| a.0.cmp(&b.0));
        self.list.dedup_by(|a, b| a.0 == b.0);
        (self.list, self.dirs)
    }
}

/// Item 7, the outputs, mapped.
pub fn outputs(roots: &Roots, c: &Compile, out_dir: &Path) -> Result<Vec<String>, LocalReason> {
    let out_mapped = roots.map(&out_dir.to_string_lossy()).ok_or_else(|| LocalReason::LocalPath(c.out_dir.clone()))?;
    Ok(c.output_names().iter().map(|n| format!("{out_mapped}/{n}")).collect())
}

/// The sidecar a library leaves next to its outputs: the stems of every
/// library it depends on, so a dependent can send them along (rustc needs
/// the whole graph, cargo passes only direct `--extern`s).
pub fn sidecar_path(stem: &str) -> PathBuf {
    PathBuf::from(format!("{stem}.dbdeps"))
}

/// Writes the sidecar of the library `c` produces in `out_dir`.
pub fn write_sidecar(c: &Compile, out_dir: &Path, closure: &[String]) {
    let stem = out_dir.join(format!("lib{}{}", c.crate_name, c.extra_filename));
    let _ = local::write_atomic(&sidecar_path(&stem.to_string_lossy()), closure.join("\n").as_bytes());
}

/// What rustc and the linker look for in `-L native=` directories: libraries
/// by name. A build script's `OUT_DIR` also holds objects and probe
/// programs (cc-rs's `flag_check`) whose bytes vary between runs; they are
/// never read and would only make the key unstable.
fn is_library(name: &str) -> bool {
    name.ends_with(".a")
        || name.ends_with(".so")
        || name.contains(".so.")
        || name.ends_with(".rlib")
        || name.ends_with(".rmeta")
}

/// The directories `path` (as rustc wrote it) climbs out of with `..`,
/// mapped: `src/a/b/../c.rs` needs `src/a/b` to exist even when nothing in
/// it is read (libc's `#[path]` modules do this).
fn climbed_dirs(roots: &Roots, path: &str) -> Vec<String> {
    let mut prefix = PathBuf::new();
    let mut out = Vec::new();
    for comp in Path::new(path).components() {
        if comp == std::path::Component::ParentDir
            && let Some(m) = prefix.to_str().and_then(|p| roots.map(p))
        {
            out.push(m);
        }
        prefix.push(comp);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_libraries_are_taken_from_native_directories() {
        for (name, want) in [
            ("libzstd.a", true),
            ("libssl.so", true),
            ("libssl.so.3", true),
            ("93acce08ba6f4ffe-static.o", false),
            ("flag_check", false),
            ("flag_check.c", false),
            ("generated.rs", false),
        ] {
            assert_eq!(is_library(name), want, "{name}");
        }
    }

    #[test]
    fn directories_climbed_out_of_are_kept() {
        let roots = Roots::new(Path::new("/t"), Some(Path::new("/h")), None, Path::new("/w"));
        assert_eq!(climbed_dirs(&roots, "src/lib.rs"), Vec::<String>::new());
        assert_eq!(
            climbed_dirs(&roots, "src/new/glibc/sysdeps/nptl/bits/../../x86/nptl/bits/m.rs"),
            vec!["ws/src/new/glibc/sysdeps/nptl/bits", "ws/src/new/glibc/sysdeps/nptl"]
        );
        assert_eq!(climbed_dirs(&roots, "/h/registry/src/x/a/../b.rs"), vec!["cargo-home/registry/src/x/a"]);
    }

    #[test]
    fn arguments_are_mapped_relative_to_the_working_directory() {
        let roots =
            Roots::new(Path::new("/t"), Some(Path::new("/h")), Some(Path::new("/w/target")), Path::new("/w/app"));
        let words: Vec<String> = [
            "--crate-name",
            "app",
            "src/main.rs",
            "--out-dir",
            "/w/target/debug/deps",
            "-L",
            "dependency=/w/target/debug/deps",
            "-L",
            "native=/w/target/debug/build/x/out",
            "--extern",
            "util=/w/target/debug/deps/libutil-1.rlib",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let crate::args::Classified::Compile(c) = crate::args::classify(&words) else { panic!("a compile") };
        let m = map_args(&roots, &c).unwrap();
        assert!(m.words.iter().all(|w| !w.starts_with("/w")), "{:?}", m.words);
        assert_eq!(m.externs.len(), 1);
        assert_eq!(m.externs[0].0, "util");
        assert_eq!(m.externs[0].1, PathBuf::from("/w/target/debug/deps/libutil-1.rlib"));
        assert_eq!(m.native_dirs.len(), 1, "dependency= directories are not native");
    }
}
