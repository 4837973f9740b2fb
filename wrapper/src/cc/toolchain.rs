//! The C compiler as Action inputs, laid out so that its driver finds its
//! programs relative to itself on a worker with no compiler installed.
//!
//! For gcc (measured on Debian 12's gcc 12), a compile needs:
//! - the driver (`/usr/bin/gcc` is a symlink chain to
//!   `/usr/bin/x86_64-linux-gnu-gcc-12`), placed at its real path under
//!   `sys/`; gcc relocates itself: from `<exec>/sys/usr/bin/` it looks for
//!   its programs and headers in `<exec>/sys/usr/lib/gcc/x86_64-linux-gnu/12/`;
//! - `cc1` (C, and the preprocessor of `.S`) or `cc1plus` (C++), where
//!   `-print-prog-name` says;
//! - the assembler: gcc asks for `as` in its own program directories before
//!   `PATH`, so the real `as` goes beside `cc1`;
//! - the shared libraries those three need besides glibc (`libisl`, `libmpc`,
//!   `libmpfr`, `libgmp`, `libz`, `libzstd` for cc1; `libbfd`, `libsframe`
//!   for as), in `cc-lib/`, which the launcher puts on `LD_LIBRARY_PATH`;
//! - gcc's own headers (`lib/gcc/<triple>/12/include`): only those the
//!   compile includes, which the dependency pre-pass lists like any other.
//!
//! clang (not on the measured machine) would need its resource directory and
//! `libLLVM`/`libclang-cpp`; it is not recognised and compiles locally.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use super::args::CcReason;
use crate::hashcache::depinfo_key;

/// Where the toolchain's shared libraries go in the input root.
pub const LIB_DIR: &str = "cc-lib";

/// The compiler's files: (path in the input root, local path).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CcToolchain {
    /// The driver's path in the input root (`sys/usr/bin/...`).
    pub driver: String,
    /// The driver on this machine (symlinks resolved).
    pub local_driver: PathBuf,
    pub files: Vec<(String, PathBuf)>,
}

/// `name` as a program the shell would run: a path, or searched on `PATH`.
pub fn which(name: &Path) -> Option<PathBuf> {
    if name.components().count() > 1 {
        return name.is_file().then(|| name.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// The toolchain of `compiler` for one language, remembered under
/// `cache_dir` while the driver's file is unchanged (finding it runs the
/// driver and `ldd` several times).
pub fn detect(cache_dir: &Path, compiler: &Path, cplusplus: bool) -> Result<CcToolchain, CcReason> {
    let unsupported = || CcReason::Compiler(compiler.display().to_string());
    let driver = which(compiler).and_then(|p| std::fs::canonicalize(p).ok()).ok_or_else(unsupported)?;
    let meta = std::fs::metadata(&driver).map_err(|_| unsupported())?;
    let stamp = {
        use std::os::unix::fs::MetadataExt;
        format!("{} {} {} {cplusplus}", meta.ino(), meta.size(), meta.mtime())
    };
    let key = depinfo_key(&["cc-toolchain/1", &driver.to_string_lossy(), &stamp]);
    let entry = cache_dir.join("cc-toolchain").join(&key);
    if let Ok(data) = std::fs::read(&entry)
        && let Ok(t) = serde_json::from_slice::<CcToolchain>(&data)
    {
        return Ok(t);
    }
    let t = find(&driver, cplusplus).ok_or_else(unsupported)?;
    if let Ok(data) = serde_json::to_vec(&t) {
        let _ = crate::local::write_atomic(&entry, &data);
    }
    Ok(t)
}

fn print_prog(driver: &Path, name: &str) -> Option<String> {
    let out = Command::new(driver).arg(format!("-print-prog-name={name}")).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn sys(path: &Path) -> String {
    format!("{}{}", crate::roots::SYSTEM, path.display())
}

fn find(driver: &Path, cplusplus: bool) -> Option<CcToolchain> {
    let proper = print_prog(driver, if cplusplus { "cc1plus" } else { "cc1" })?;
    let proper = std::fs::canonicalize(&proper).ok().filter(|p| p.is_file())?;
    let dir = proper.parent()?;
    let mut files = vec![(sys(driver), driver.to_path_buf()), (sys(&proper), proper.clone())];
    let mut programs = vec![driver.to_path_buf(), proper.clone()];
    let named = print_prog(driver, "as")?;
    let assembler = which(Path::new(&named)).and_then(|p| std::fs::canonicalize(p).ok())?;
    if Path::new(&named).is_absolute() {
        files.push((sys(&assembler), assembler.clone()));
    } else {
        // Found on PATH here; beside cc1 it is found first anywhere.
        files.push((sys(&dir.join("as")), assembler.clone()));
    }
    programs.push(assembler);
    let mut libs = Vec::new();
    for p in &programs {
        libs.extend(needed_libraries(p)?);
    }
    libs.sort();
    libs.dedup();
    for (soname, local) in libs {
        files.push((format!("{LIB_DIR}/{soname}"), local));
    }
    Some(CcToolchain { driver: sys(driver), local_driver: driver.to_path_buf(), files })
}

/// The C library's own parts, which every machine has and which must match
/// its dynamic loader: never shipped.
fn is_glibc(soname: &str) -> bool {
    [
        "libc.so",
        "libm.so",
        "libdl.so",
        "libpthread.so",
        "librt.so",
        "libresolv.so",
        "libutil.so",
        "ld-linux",
        "linux-vdso",
    ]
    .iter()
    .any(|g| soname.starts_with(g))
}

/// (soname, resolved path) of the shared libraries `program` loads, from `ldd`.
fn needed_libraries(program: &Path) -> Option<Vec<(String, PathBuf)>> {
    let out = Command::new("ldd").arg(program).output().ok()?;
    if !out.status.success() {
        // A static program needs nothing.
        return Some(Vec::new());
    }
    Some(parse_ldd(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_ldd(text: &str) -> Vec<(String, PathBuf)> {
    text.lines()
        .filter_map(|l| {
            let (name, rest) = l.trim().split_once(" => ")?;
            let path = rest.split(" (").next()?.trim();
            (!is_glibc(name) && path.starts_with('/')).then(|| (name.to_string(), PathBuf::from(path)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_without_glibc() {
        let text = "\tlinux-vdso.so.1 (0x00007f6976b08000)\n\
                    \tlibisl.so.23 => /lib/x86_64-linux-gnu/libisl.so.23 (0x00007f6976800000)\n\
                    \tlibm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x00007f69765c4000)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f69763e2000)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f6976b0a000)\n";
        assert_eq!(
            parse_ldd(text),
            vec![("libisl.so.23".to_string(), PathBuf::from("/lib/x86_64-linux-gnu/libisl.so.23"))]
        );
    }

    /// On a machine with gcc: the driver, cc1 and as, and cc1's libraries.
    #[test]
    fn gcc_files_are_found() {
        let Some(gcc) = which(Path::new("gcc")) else { return };
        let dir = tempfile::tempdir().unwrap();
        let t = detect(dir.path(), &gcc, false).unwrap();
        assert!(t.driver.starts_with("sys/"), "{}", t.driver);
        let names: Vec<&str> = t.files.iter().map(|(m, _)| m.rsplit('/').next().unwrap()).collect();
        assert!(names.contains(&"cc1"), "{names:?}");
        assert!(names.contains(&"as"), "{names:?}");
        assert!(!names.iter().any(|n| n.starts_with("libc.so")), "{names:?}");
        assert_eq!(detect(dir.path(), &gcc, false).unwrap(), t, "remembered");
    }
}
