//! Running rustc on this machine: plainly (the build must succeed exactly as
//! without the wrapper) or captured (to store the result in the cache).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Runs rustc with the terminal's stdio; returns its exit code.
pub fn run_plain(rustc: &Path, words: &[String]) -> i32 {
    match Command::new(rustc).args(words).status() {
        Ok(s) => exit_code(s),
        Err(e) => {
            eprintln!("distbuild-rustc: cannot run {}: {e}", rustc.display());
            127
        }
    }
}

pub struct Captured {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Runs rustc with stdout and stderr captured. Holding stderr back until
/// the outputs are in place also keeps cargo from starting dependents on a
/// half-written library.
pub fn run_captured(rustc: &Path, words: &[String]) -> std::io::Result<Captured> {
    let out = Command::new(rustc).args(words).stdin(Stdio::null()).output()?;
    Ok(Captured { code: exit_code(out.status), stdout: out.stdout, stderr: out.stderr })
}

fn exit_code(s: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
}

/// Writes rustc's output to ours, byte for byte (cargo parses the JSON).
pub fn replay(stdout: &[u8], stderr: &[u8]) {
    let _ = std::io::stdout().lock().write_all(stdout);
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().lock().write_all(stderr);
    let _ = std::io::stderr().flush();
}

/// A temporary name beside `dest`, unique to this process: written there
/// and renamed, a file never appears half-written (cargo, or another
/// wrapper, may read it at any moment).
pub fn temp_beside(dest: &Path) -> PathBuf {
    let name = dest.file_name().unwrap_or_default().to_string_lossy();
    dest.with_file_name(format!(".distbuild-{}-{name}", std::process::id()))
}

/// Writes `data` to `dest` through [`temp_beside`] and a rename.
pub fn write_atomic(dest: &Path, data: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = temp_beside(dest);
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, dest).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}
