//! Running rustc on this machine, and the wrapper's own stdout and stderr.
//!
//! Both sit behind small traits ([`Spawner`], [`Console`]) so that the
//! decisions in `compile.rs` (hit, execute, run here, fall back) are tested
//! with scripted compilers and a recorded console (`compile/tests.rs`); the
//! real implementations are [`Processes`] and [`Terminal`].

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What a local rustc left behind.
#[derive(Debug, Clone, Default)]
pub struct Captured {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Starts compilers. It exists so that the wrapper's decisions are tested
/// without a compiler (sccache's `CommandCreator` is the model): the real
/// one spawns processes, a scripted one answers from a table.
pub trait Spawner {
    /// Runs `program` with stdout and stderr captured, handing each line of
    /// stderr (with its newline) to `on_line` as soon as it is written:
    /// cargo starts dependents at rustc's artifact notification, so it must
    /// not wait for the end of the compile.
    fn run(&self, program: &Path, words: &[String], on_line: &mut dyn FnMut(&[u8])) -> std::io::Result<Captured>;
}

/// The wrapper's own stdout and stderr, where cargo reads rustc's output.
/// A trait so that tests can assert what a build would have seen.
pub trait Console {
    fn stdout(&self, data: &[u8]);
    fn stderr(&self, data: &[u8]);
}

/// Real processes.
pub struct Processes;

impl Spawner for Processes {
    fn run(&self, program: &Path, words: &[String], on_line: &mut dyn FnMut(&[u8])) -> std::io::Result<Captured> {
        let mut child = Command::new(program)
            .args(words)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut out = child.stdout.take().expect("piped");
        // stdout is read on its own thread: a compiler blocked on a full
        // stdout pipe would never finish its stderr.
        let reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = out.read_to_end(&mut buf);
            buf
        });
        let mut stderr = Vec::new();
        let mut lines = std::io::BufReader::new(child.stderr.take().expect("piped"));
        loop {
            let start = stderr.len();
            if lines.read_until(b'\n', &mut stderr)? == 0 {
                break;
            }
            on_line(&stderr[start..]);
        }
        let status = child.wait()?;
        let stdout = reader.join().unwrap_or_default();
        Ok(Captured { code: exit_code(status), stdout, stderr })
    }
}

/// The process's stdout and stderr.
pub struct Terminal;

impl Console for Terminal {
    fn stdout(&self, data: &[u8]) {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(data);
        let _ = out.flush();
    }
    fn stderr(&self, data: &[u8]) {
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(data);
        let _ = err.flush();
    }
}

/// Runs rustc with the terminal's stdio (queries and invocations the
/// wrapper does not handle); returns its exit code.
pub fn run_plain(rustc: &Path, words: &[String]) -> i32 {
    match Command::new(rustc).args(words).status() {
        Ok(s) => exit_code(s),
        Err(e) => {
            eprintln!("distbuild-rustc: cannot run {}: {e}", rustc.display());
            127
        }
    }
}

/// Runs `program` with stdout and stderr captured, nothing handed on while
/// it runs (the C compiler wrapper: a compiler's output is replayed whole).
pub fn run_captured(program: &Path, words: &[String]) -> std::io::Result<Captured> {
    Processes.run(program, words, &mut |_| {})
}

/// Writes captured output to the terminal, byte for byte.
pub fn replay(stdout: &[u8], stderr: &[u8]) {
    Terminal.stdout(stdout);
    Terminal.stderr(stderr);
}

fn exit_code(s: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stderr_lines_arrive_before_the_process_ends() {
        // The second line is written only after the first was seen: if
        // lines were held to the end, the script would wait forever for
        // the marker file and the test would hang instead of passing.
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("seen");
        let script = format!(
            "echo one >&2; while [ ! -e {m} ]; do sleep 0.01; done; echo out; echo two >&2; exit 3",
            m = marker.display()
        );
        let mut lines = Vec::new();
        let got = Processes
            .run(Path::new("/bin/sh"), &["-c".into(), script], &mut |l| {
                lines.push(l.to_vec());
                let _ = std::fs::write(&marker, b"");
            })
            .unwrap();
        assert_eq!(lines, vec![b"one\n".to_vec(), b"two\n".to_vec()]);
        assert_eq!(got.stderr, b"one\ntwo\n");
        assert_eq!(got.stdout, b"out\n");
        assert_eq!(got.code, 3);
    }
}
