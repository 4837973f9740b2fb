//! From a classified compile to its Action: roots, the compiler's files,
//! the pre-pass listing, mapped arguments. An error is the reason to compile
//! locally.

use std::path::{Path, PathBuf};

use remote_apis::Digest;

use super::action::{self, CC_KEY_VERSION, CcKeyInputs};
use super::args::{Arg, CcCompile, CcReason};
use super::{deps, toolchain};
use crate::hashcache::Caches;
use crate::key::BuiltAction;
use crate::roots::{self, Roots};

/// Where a compile runs on this machine.
pub struct Place {
    pub cwd: PathBuf,
    pub cargo_home: Option<PathBuf>,
    /// The workspace root (`DISTBUILD_WORKSPACE`, set by `cargo distbuild`),
    /// else the working directory.
    pub workspace: PathBuf,
    /// `SOURCE_DATE_EPOCH`, when set.
    pub source_date_epoch: Option<String>,
}

impl Place {
    pub fn from_env() -> std::io::Result<Place> {
        let cwd = std::env::current_dir()?;
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        Ok(Place {
            workspace: var("DISTBUILD_WORKSPACE").map(PathBuf::from).unwrap_or_else(|| cwd.clone()),
            cwd,
            cargo_home: crate::settings::cargo_home(),
            source_date_epoch: var("SOURCE_DATE_EPOCH"),
        })
    }
}

/// Variables that change which files gcc reads or how: set, the compile
/// stays local (the Action would not see them).
pub const COMPILER_ENV: &[&str] = &[
    "CPATH",
    "C_INCLUDE_PATH",
    "CPLUS_INCLUDE_PATH",
    "OBJC_INCLUDE_PATH",
    "GCC_EXEC_PREFIX",
    "COMPILER_PATH",
    "DEPENDENCIES_OUTPUT",
    "SUNPRO_DEPENDENCIES",
    "GCC_COMPARE_DEBUG",
];

pub struct Prepared {
    pub roots: Roots,
    pub built: BuiltAction,
    /// The pre-pass listing, as the compiler wrote it.
    pub files: Vec<String>,
    /// The object on this machine.
    pub output: PathBuf,
    /// The object in the input root.
    pub output_mapped: String,
    /// Every input file: (path in the input root, local path).
    pub inputs: Vec<(String, PathBuf)>,
}

pub fn prepare(
    caches: &Caches,
    cache_dir: &Path,
    compiler: &Path,
    c: &CcCompile,
    place: &Place,
) -> Result<Prepared, CcReason> {
    let output = roots::normalize(&place.cwd.join(&c.output));
    let target_dir = output.parent().and_then(roots::find_target_dir);
    let roots = Roots::for_cc(place.cargo_home.as_deref(), target_dir.as_deref(), &place.workspace, &place.cwd);
    let tc = toolchain::detect(cache_dir, compiler, c.is_cplusplus())?;
    let local = |p: &Path| CcReason::Compiler(p.display().to_string());
    let mut files: Vec<(String, Digest, bool, PathBuf)> = Vec::new();
    for (m, l) in &tc.files {
        let d = caches.digest(l).map_err(|_| local(l))?;
        files.push((m.clone(), d.digest, d.executable, l.clone()));
    }
    let toolchain_id: Vec<String> = files.iter().map(|f| format!("{} {}", f.0, f.1)).collect();
    let (args, dirs) = map_args(c, &roots)?;
    let output_mapped = roots.map(&output.to_string_lossy()).ok_or(CcReason::NoOutput)?;
    let listing = deps::listing(
        caches,
        &roots,
        &tc.local_driver,
        c,
        &[CC_KEY_VERSION, &toolchain_id.join("\n"), roots.cwd_mapped(), &args.join("\0")],
    )?;
    for f in &listing {
        let m = roots.map(f).ok_or(CcReason::PrePassFailed)?;
        let abs = roots.absolute(f);
        let d = caches.digest(&abs).map_err(|_| CcReason::PrePassFailed)?;
        files.push((m, d.digest, d.executable, abs));
    }
    let env: Vec<(String, String)> =
        place.source_date_epoch.iter().map(|v| ("SOURCE_DATE_EPOCH".to_string(), v.clone())).collect();
    let inputs = CcKeyInputs {
        driver: &tc.driver,
        args: &args,
        cwd: roots.cwd_mapped(),
        env: &env,
        files: &files,
        dirs: &dirs,
        output: &output_mapped,
    };
    let built = action::build(caches.function(), &inputs).map_err(|_| CcReason::PrePassFailed)?;
    let inputs = files.into_iter().map(|(m, _, _, l)| (m, l)).collect();
    Ok(Prepared { roots, built, files: listing, output, output_mapped, inputs })
}

/// The arguments with every path mapped and made relative to the mapped
/// working directory, `-o` last; and the include directories that exist.
pub fn map_args(c: &CcCompile, roots: &Roots) -> Result<(Vec<String>, Vec<String>), CcReason> {
    let map =
        |p: &str| roots.map(p).map(|m| roots.relative_to_cwd(&m)).ok_or_else(|| CcReason::UnsupportedFlag(p.into()));
    let mut out = Vec::new();
    let mut dirs = Vec::new();
    for a in &c.args {
        match a {
            Arg::Plain(w) => out.extend(w.iter().cloned()),
            Arg::Source(s) => out.push(map(s)?),
            Arg::Path { flag, path, glued } => {
                let rel = map(path)?;
                let include = flag.starts_with("-I") || matches!(flag.as_str(), "-isystem" | "-iquote" | "-idirafter");
                if include
                    && roots.absolute(path).is_dir()
                    && let Some(m) = roots.map(path)
                {
                    dirs.push(m);
                }
                out.extend(Arg::Path { flag: flag.clone(), path: rel, glued: *glued }.words());
            }
            // The launcher maps the exec root away, which gives the same
            // names when the map says what the roots say.
            Arg::PrefixMap { old, new, .. } if roots.map(old).as_deref() == Some(new.as_str()) => {}
            Arg::PrefixMap { flag, old, new } => {
                return Err(CcReason::UnsupportedFlag(format!("{flag}={old}={new}")));
            }
        }
    }
    out.push("-o".into());
    out.push(map(&c.output)?);
    Ok((out, dirs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cc::args::{Classified, classify};
    use remote_apis::DigestFunction;

    fn compile(line: &str) -> CcCompile {
        let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
        match classify(&words, &|_| None) {
            Classified::Compile(c) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn arguments_map_into_the_input_root() {
        let roots =
            Roots::for_cc(Some(Path::new("/h")), Some(Path::new("/w/target")), Path::new("/w"), Path::new("/w/c"));
        let c = compile(
            "-O2 -I /w/c/include -isystem /usr/include/x -ffile-prefix-map=/h=cargo-home -ffile-prefix-map=/w=ws \
             -c /w/c/a.c -o /w/target/debug/build/c-1/out/a.o",
        );
        let (args, _) = map_args(&c, &roots).unwrap();
        assert_eq!(
            args.join(" "),
            "-O2 -I include -isystem ../../sys/usr/include/x -c a.c -o ../../target/debug/build/c-1/out/a.o"
        );
        let c = compile("-ffile-prefix-map=/w=elsewhere -c a.c -o a.o");
        assert!(matches!(map_args(&c, &roots), Err(CcReason::UnsupportedFlag(_))));
    }

    /// Two checkouts with their own CARGO_HOME, one C file and a header.
    struct Checkout {
        _dir: tempfile::TempDir,
        ws: PathBuf,
        home: PathBuf,
    }

    fn checkout(header: &str) -> Checkout {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("some/checkout");
        let home = dir.path().join("cargo-home");
        std::fs::create_dir_all(ws.join("c")).unwrap();
        std::fs::create_dir_all(ws.join("target/debug/build/c-1/out")).unwrap();
        std::fs::write(ws.join("target/CACHEDIR.TAG"), "").unwrap();
        std::fs::create_dir_all(home.join("registry")).unwrap();
        std::fs::write(ws.join("c/answer.h"), header).unwrap();
        std::fs::write(
            ws.join("c/answer.c"),
            "#include <stddef.h>\n#include \"answer.h\"\nint answer(void) { return ANSWER; }\n",
        )
        .unwrap();
        Checkout { _dir: dir, ws, home }
    }

    fn prepared(co: &Checkout) -> Prepared {
        let cache = tempfile::tempdir().unwrap();
        let caches = Caches::new(cache.path().to_path_buf(), DigestFunction::Sha256);
        let line = format!(
            "-O2 -I {ws}/c -ffile-prefix-map={home}=cargo-home -ffile-prefix-map={ws}=ws -c {ws}/c/answer.c -o {ws}/target/debug/build/c-1/out/answer.o",
            ws = co.ws.display(),
            home = co.home.display()
        );
        let c = compile(&line);
        let place = Place {
            cwd: co.ws.join("c"),
            cargo_home: Some(co.home.clone()),
            workspace: co.ws.clone(),
            source_date_epoch: None,
        };
        let p = prepare(&caches, cache.path(), Path::new("gcc"), &c, &place).unwrap();
        assert!(p.files.iter().any(|f| f.ends_with("answer.h")), "{:?}", p.files);
        assert!(p.files.iter().any(|f| f.ends_with("stddef.h")), "system headers are inputs: {:?}", p.files);
        p
    }

    fn key_of(co: &Checkout) -> Digest {
        prepared(co).built.action_digest
    }

    /// The Action's inputs are enough: its command, run in a directory
    /// holding only them, with no compiler on PATH, compiles the object
    /// (headers come from the input root's `sys/`, through `--sysroot`).
    #[test]
    fn the_action_compiles_from_its_inputs_alone() {
        if toolchain::which(Path::new("gcc")).is_none() {
            return;
        }
        let co = checkout("#define ANSWER 42\n");
        let p = prepared(&co);
        let root = tempfile::tempdir().unwrap();
        for (m, local) in &p.inputs {
            let dest = root.path().join(m);
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            std::fs::copy(local, &dest).unwrap();
        }
        let args = &p.built.command.arguments;
        let cwd = root.path().join(&args[4]);
        std::fs::create_dir_all(&cwd).unwrap();
        std::fs::create_dir_all(root.path().join(&p.output_mapped).parent().unwrap()).unwrap();
        let out = std::process::Command::new(&args[0])
            .args(&args[1..])
            .current_dir(root.path())
            .env_clear()
            .env("PATH", "/nonexistent")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let object = std::fs::read(root.path().join(&p.output_mapped)).unwrap();
        assert!(object.starts_with(b"\x7fELF"));
        let root_path = root.path().to_string_lossy().to_string();
        assert!(
            !object.windows(root_path.len()).any(|w| w == root_path.as_bytes()),
            "the exec root is remapped out of the object"
        );
    }

    /// The key: a header's change changes it; the checkout's and
    /// CARGO_HOME's paths do not.
    #[test]
    fn the_key_follows_headers_not_places() {
        if toolchain::which(Path::new("gcc")).is_none() {
            return;
        }
        let a = key_of(&checkout("#define ANSWER 42\n"));
        let b = key_of(&checkout("#define ANSWER 42\n"));
        assert_eq!(a, b, "another checkout path and CARGO_HOME");
        let changed = key_of(&checkout("#define ANSWER 43\n"));
        assert_ne!(a, changed, "a header changed");
    }
}
