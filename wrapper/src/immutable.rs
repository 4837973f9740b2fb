//! Crates from the registry (and git checkouts) are immutable: a package
//! directory under `CARGO_HOME` holds exactly what its published version
//! holds. For them the wrapper skips the dep-info pre-pass, which costs a
//! parse and macro expansion of every crate on a cold build: the inputs are
//! the whole package directory and the build script's `OUT_DIR`, the
//! variables are those cargo sets for the package, and the dep-info cargo
//! needs comes from the compile itself, translated to local paths.
//!
//! A crate can still read a variable cargo does not set (`option_env!`):
//! its dep-info records the value it saw, and a cached result whose
//! recorded values differ from this machine's is not used.

use std::path::{Path, PathBuf};

use crate::depinfo::DepInfo;
use crate::roots::Roots;

/// Whether rustc's working directory (mapped) is an immutable package.
pub fn applies(cwd_mapped: &str) -> bool {
    ["cargo-home/registry/src/", "cargo-home/git/checkouts/"].iter().any(|p| cwd_mapped.starts_with(p))
}

/// Variables whose values are local paths: mapped into the input root, and
/// made absolute on the worker by the launcher (`key::LAUNCHER`).
pub const PATH_VARS: &[&str] = &["OUT_DIR", "CARGO_MANIFEST_DIR", "CARGO_MANIFEST_PATH"];

/// Whether cargo sets `name` for the compile of a package.
fn set_by_cargo(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || PATH_VARS.contains(&name)
        || matches!(name, "CARGO_CRATE_NAME" | "CARGO_MANIFEST_LINKS" | "CARGO_PRIMARY_PACKAGE" | "CARGO_BIN_NAME")
}

/// The variables cargo set for this compile, path values mapped. A path
/// outside the roots was not set by cargo for this package (an `OUT_DIR`
/// inherited from an outer cargo): it is left out, and if the crate reads
/// it after all, its recorded value will not agree and the result is not
/// used ([`env_agrees`]).
pub fn package_env(roots: &Roots) -> Vec<(String, String)> {
    let mut env = Vec::new();
    for (name, value) in std::env::vars() {
        if !set_by_cargo(&name) {
            continue;
        }
        if PATH_VARS.contains(&name.as_str()) {
            if let Some(m) = roots.map(&value) {
                env.push((name, m));
            }
        } else {
            env.push((name, value));
        }
    }
    env.sort();
    env
}

/// Every regular file below `dir` (symlinks followed, as rustc would).
pub fn files_below(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let path = e?.path();
            let meta = std::fs::metadata(&path)?;
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Whether a file in a build script's `OUT_DIR` can be something rustc
/// reads (generated sources, data, libraries). Object files and programs
/// (cc-rs leaves its `flag_check` probe there) are not, and their bytes
/// vary between runs: they would make the key unstable. Should a crate
/// read one after all, its dep-info names it and the result is not used
/// ([`unkeyed_file`]).
pub fn may_be_read(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let object = path.extension().is_some_and(|e| e == "o");
    let program = std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o111 != 0);
    !object && !program
}

/// A file the compile read (per its dep-info) that is not among the key's
/// inputs, if any.
pub fn unkeyed_file(
    info: &DepInfo,
    roots: &Roots,
    key_env: &[(String, String)],
    inputs: &std::collections::HashSet<String>,
) -> Option<String> {
    let root = exec_root(info, key_env);
    info.files.iter().find_map(|f| {
        let mapped = match &root {
            Some(r) if f.starts_with(&format!("{r}/")) => f[r.len() + 1..].to_string(),
            _ if !f.starts_with('/') => {
                crate::roots::normalize(&Path::new(roots.cwd_mapped()).join(f)).to_str()?.to_string()
            }
            _ => return Some(f.clone()),
        };
        (!inputs.contains(&mapped)).then(|| f.clone())
    })
}

/// The exec root of the worker that wrote `info`, from a path variable's
/// recorded value (`<root>/<mapped value>`).
fn exec_root(info: &DepInfo, env: &[(String, String)]) -> Option<String> {
    info.env.iter().find_map(|(name, value)| {
        let mapped = env.iter().find(|(n, _)| n == name && PATH_VARS.contains(&n.as_str()))?;
        value.as_deref()?.strip_suffix(&format!("/{}", mapped.1)).map(str::to_string)
    })
}

/// Whether the variables the compile recorded agree with this machine: the
/// ones in the key by construction, the others by value.
pub fn env_agrees(info: &DepInfo, key_env: &[(String, String)]) -> bool {
    info.env.iter().all(|(name, value)| {
        key_env.iter().any(|(n, _)| n == name) || std::env::var(name).ok().as_deref() == value.as_deref()
    })
}

/// Rewrites the dep-info a worker wrote into the one rustc would have
/// written here: every path local and absolute, targets the local outputs.
pub fn local_depinfo(remote: &str, roots: &Roots, key_env: &[(String, String)], outputs: &[PathBuf]) -> String {
    let info = crate::depinfo::parse(remote);
    let root = exec_root(&info, key_env);
    let localize = |p: &str| -> String {
        let mapped = match &root {
            Some(r) if p.starts_with(&format!("{r}/")) => Some(p[r.len() + 1..].to_string()),
            _ if !p.starts_with('/') => {
                crate::roots::normalize(&Path::new(roots.cwd_mapped()).join(p)).to_str().map(str::to_string)
            }
            _ => None,
        };
        mapped.and_then(|m| roots.unmap(&m)).map(|l| l.display().to_string()).unwrap_or_else(|| p.to_string())
    };
    let targets: Vec<String> = outputs.iter().map(|o| o.display().to_string()).collect();
    render(&info, &targets, localize)
}

/// Where the dep-info of a compile run here says the exec root was: a
/// stored result must read as if a worker wrote it.
const LOCAL_EXEC_ROOT: &str = "/distbuild-exec-root";

/// Rewrites the dep-info a compile run here wrote into the form a worker
/// would have written (paths relative to the mapped working directory,
/// path variables under an exec root), for the result stored in the cache.
pub fn worker_depinfo(local: &str, roots: &Roots, outputs: &[String]) -> String {
    let info = crate::depinfo::parse(local);
    let relative = |p: &str| roots.map(p).map(|m| roots.relative_to_cwd(&m)).unwrap_or_else(|| p.to_string());
    let targets: Vec<String> = outputs.iter().map(|o| roots.relative_to_cwd(o)).collect();
    let mut text = render(&info, &targets, relative);
    for name in PATH_VARS {
        if let Some((_, Some(v))) = info.env.iter().find(|(n, _)| n == name)
            && let Some(m) = roots.map(v)
        {
            text = text.replace(
                &format!("# env-dep:{name}={}", relative(v)),
                &format!("# env-dep:{name}={LOCAL_EXEC_ROOT}/{m}"),
            );
        }
    }
    text
}

/// Writes dep-info as rustc does: one rule per target, one empty rule per
/// file, then the variables; `path` rewrites every path.
fn render(info: &DepInfo, targets: &[String], path: impl Fn(&str) -> String) -> String {
    let escape = |p: &str| p.replace(' ', "\\ ");
    let deps: Vec<String> = info.files.iter().map(|f| escape(&path(f))).collect();
    let mut text = String::new();
    for t in targets {
        text.push_str(&format!("{}: {}\n", escape(t), deps.join(" ")));
    }
    text.push('\n');
    for d in &deps {
        text.push_str(&format!("{d}:\n"));
    }
    if !info.env.is_empty() {
        text.push('\n');
        for (name, value) in &info.env {
            match value {
                Some(v) => {
                    let v = if PATH_VARS.contains(&name.as_str()) { path(v) } else { v.clone() };
                    let v = v.replace('\\', "\\\\").replace('\n', "\\n").replace('\r', "\\r");
                    text.push_str(&format!("# env-dep:{name}={v}\n"));
                }
                None => text.push_str(&format!("# env-dep:{name}\n")),
            }
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_and_git_packages_are_immutable() {
        assert!(applies("cargo-home/registry/src/index.crates.io-1949cf8c6b5b557f/serde-1.0.0"));
        assert!(applies("cargo-home/git/checkouts/repo-abc/123"));
        assert!(!applies("ws"));
        assert!(!applies("cargo-home/bin"));
    }

    #[test]
    fn every_file_a_registry_crate_read_must_be_in_its_key() {
        let roots = Roots::new(
            Path::new("/opt/rust"),
            Some(Path::new("/h")),
            Some(Path::new("/p/target")),
            Path::new("/h/registry/src/i/foo-1"),
        );
        let key_env = vec![("OUT_DIR".to_string(), "target/debug/build/foo-1/out".to_string())];
        let info = crate::depinfo::parse(
            "x.d: src/lib.rs /w/9/target/debug/build/foo-1/out/gen.rs\n# env-dep:OUT_DIR=/w/9/target/debug/build/foo-1/out\n",
        );
        let mut inputs: std::collections::HashSet<String> =
            ["cargo-home/registry/src/i/foo-1/src/lib.rs".to_string()].into_iter().collect();
        assert_eq!(
            unkeyed_file(&info, &roots, &key_env, &inputs).as_deref(),
            Some("/w/9/target/debug/build/foo-1/out/gen.rs")
        );
        inputs.insert("target/debug/build/foo-1/out/gen.rs".into());
        assert_eq!(unkeyed_file(&info, &roots, &key_env, &inputs), None);
    }

    #[test]
    fn objects_and_programs_in_out_dir_are_not_inputs() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        for (name, mode, want) in [
            ("gen.rs", 0o644, true),
            ("libz.a", 0o644, true),
            ("x-static.o", 0o644, false),
            ("flag_check", 0o755, false),
        ] {
            let p = dir.path().join(name);
            std::fs::write(&p, b"x").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(may_be_read(&p), want, "{name}");
        }
    }

    #[test]
    fn a_local_run_is_stored_in_worker_form_and_reads_back_alike() {
        let roots = Roots::new(
            Path::new("/opt/rust"),
            Some(Path::new("/home/me/.cargo")),
            Some(Path::new("/src/p/target")),
            Path::new("/home/me/.cargo/registry/src/idx/foo-1.0"),
        );
        let pkg = "/home/me/.cargo/registry/src/idx/foo-1.0";
        let local = format!(
            "/src/p/target/debug/deps/libfoo-1.rlib: {pkg}/src/lib.rs /src/p/target/debug/build/foo-1/out/gen.rs\n\n\
             {pkg}/src/lib.rs:\n/src/p/target/debug/build/foo-1/out/gen.rs:\n\n\
             # env-dep:OUT_DIR=/src/p/target/debug/build/foo-1/out\n"
        );
        let stored = worker_depinfo(&local, &roots, &["target/debug/deps/libfoo-1.rlib".to_string()]);
        assert!(!stored.contains("/home/me") && !stored.contains("/src/p"), "{stored}");
        let key_env = vec![("OUT_DIR".to_string(), "target/debug/build/foo-1/out".to_string())];
        let inputs: std::collections::HashSet<String> = [
            "cargo-home/registry/src/idx/foo-1.0/src/lib.rs".to_string(),
            "target/debug/build/foo-1/out/gen.rs".to_string(),
        ]
        .into_iter()
        .collect();
        assert_eq!(unkeyed_file(&crate::depinfo::parse(&stored), &roots, &key_env, &inputs), None);
        let back = local_depinfo(&stored, &roots, &key_env, &[PathBuf::from("/src/p/target/debug/deps/libfoo-1.rlib")]);
        assert_eq!(back, local);
    }

    #[test]
    fn remote_dep_info_becomes_local() {
        let roots = Roots::new(
            Path::new("/opt/rust"),
            Some(Path::new("/home/me/.cargo")),
            Some(Path::new("/src/p/target")),
            Path::new("/home/me/.cargo/registry/src/idx/foo-1.0"),
        );
        let key_env = vec![("OUT_DIR".to_string(), "target/debug/build/foo-1/out".to_string())];
        let remote = "../../../../../target/debug/deps/foo-1.d: src/lib.rs src/a\\ b.rs /w/actions/7/target/debug/build/foo-1/out/gen.rs\n\n\
                      src/lib.rs:\n\n\
                      # env-dep:CARGO_PKG_NAME=foo\n\
                      # env-dep:OUT_DIR=/w/actions/7/target/debug/build/foo-1/out\n\
                      # env-dep:MAYBE\n";
        let outputs = vec![PathBuf::from("/src/p/target/debug/deps/libfoo-1.rlib")];
        let local = local_depinfo(remote, &roots, &key_env, &outputs);
        let pkg = "/home/me/.cargo/registry/src/idx/foo-1.0";
        assert_eq!(
            local,
            format!(
                "/src/p/target/debug/deps/libfoo-1.rlib: {pkg}/src/lib.rs {pkg}/src/a\\ b.rs /src/p/target/debug/build/foo-1/out/gen.rs\n\n\
                 {pkg}/src/lib.rs:\n{pkg}/src/a\\ b.rs:\n/src/p/target/debug/build/foo-1/out/gen.rs:\n\n\
                 # env-dep:CARGO_PKG_NAME=foo\n\
                 # env-dep:MAYBE\n\
                 # env-dep:OUT_DIR=/src/p/target/debug/build/foo-1/out\n"
            )
        );
        let info = crate::depinfo::parse(remote);
        // SAFETY (test): MAYBE is read by nothing else in this process.
        assert!(env_agrees(&info, &[("CARGO_PKG_NAME".into(), "foo".into()), ("OUT_DIR".into(), String::new())]));
        let other = crate::depinfo::parse("x: a.rs\n# env-dep:DISTBUILD_TEST_UNSET_VAR=set-there\n");
        assert!(!env_agrees(&other, &[]), "a value this machine lacks");
    }
}
