//! The toolchain as a Merkle tree: rustc, its shared libraries and every
//! installed target's sysroot libraries (and rust-lld). Uploaded once and
//! shared by every action through the CAS; its digest names the compiler
//! exactly, so two machines with the same toolchain share cache entries.

use std::path::{Path, PathBuf};
use std::process::Command;

use remote_apis::merkle::{BuiltTree, TreeBuilder};

use crate::hashcache::Caches;

/// The sysroot of `rustc`: next to it when cargo gave the real binary, else
/// asked (`rustc --print sysroot` through a rustup proxy).
pub fn sysroot(rustc: &Path) -> std::io::Result<PathBuf> {
    if rustc.is_absolute()
        && let Some(root) = rustc.parent().and_then(Path::parent)
        && root.join("lib/rustlib").is_dir()
        && !rustc.starts_with(root.join(".cargo"))
    {
        return Ok(root.to_path_buf());
    }
    let out = Command::new(rustc).args(["--print", "sysroot"]).output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!("{} --print sysroot failed", rustc.display())));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// [`tree`], one process at a time: when cargo starts many wrappers on a
/// cold cache, one hashes the toolchain (half a gigabyte) and the others
/// wait and then read its digests from the stat cache.
pub fn tree_locked(caches: &Caches, sysroot: &Path, lock: &Path) -> std::io::Result<BuiltTree> {
    let held = crate::settings::lock_file(lock)?;
    let tree = tree(caches, sysroot);
    drop(held);
    tree
}

/// Builds the tree of `sysroot` (file digests come from the stat cache).
pub fn tree(caches: &Caches, sysroot: &Path) -> std::io::Result<BuiltTree> {
    let mut b = TreeBuilder::new(caches.function());
    add_file(caches, &mut b, sysroot, "bin/rustc")?;
    for entry in std::fs::read_dir(sysroot.join("lib"))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        if entry.file_type()?.is_file() {
            add_file(caches, &mut b, sysroot, &format!("lib/{name}"))?;
        }
    }
    for entry in std::fs::read_dir(sysroot.join("lib/rustlib"))? {
        let entry = entry?;
        if entry.path().join("lib").is_dir() {
            let name = entry.file_name().to_string_lossy().to_string();
            add_dir(caches, &mut b, sysroot, &format!("lib/rustlib/{name}"))?;
        }
    }
    Ok(b.build())
}

fn invalid(e: remote_apis::ParseError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.0)
}

fn add_file(caches: &Caches, b: &mut TreeBuilder, root: &Path, rel: &str) -> std::io::Result<()> {
    let local = root.join(rel);
    let d = caches.digest(&local)?;
    b.add_file(rel, d.digest, d.executable, local).map_err(invalid)
}

fn add_dir(caches: &Caches, b: &mut TreeBuilder, root: &Path, rel: &str) -> std::io::Result<()> {
    b.add_directory(rel).map_err(invalid)?;
    for entry in std::fs::read_dir(root.join(rel))? {
        let entry = entry?;
        let child = format!("{rel}/{}", entry.file_name().to_string_lossy());
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            let target = std::fs::read_link(entry.path())?;
            b.add_symlink(&child, &target.to_string_lossy()).map_err(invalid)?;
        } else if kind.is_dir() {
            add_dir(caches, b, root, &child)?;
        } else if kind.is_file() {
            add_file(caches, b, root, &child)?;
        }
    }
    Ok(())
}
