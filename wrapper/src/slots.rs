//! Local slots: a counting semaphore across the wrapper processes of a
//! build, made of lock files. With a farm behind it, `cargo distbuild`
//! raises cargo's job count far above this machine's cores; the compiles
//! that still run here (fallbacks, cache-only mode, links without a
//! linking worker) each take one of N slots first, so `-j 64` does not
//! start 64 local rustcs. A slot is an `flock` on `slot-<i>` in a
//! directory of the wrapper's cache: the kernel releases it when the
//! process ends, however it ends, so a crashed wrapper never leaks one.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// One slot, held until dropped.
#[derive(Debug)]
pub struct Slot {
    _file: File,
    pub index: usize,
}

/// How many compiles may run here at once: the machine's parallelism.
pub fn local_slots() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn slot_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("slot-{i}"))
}

fn open(path: &Path) -> std::io::Result<File> {
    File::options().create(true).truncate(false).write(true).open(path)
}

fn flock(file: &File, flags: libc::c_int) -> bool {
    // SAFETY: flock on a descriptor we own; released when `file` closes.
    unsafe { libc::flock(file.as_raw_fd(), flags) == 0 }
}

/// A free slot of `n` in `dir`, if one is free now.
pub fn try_acquire(dir: &Path, n: usize) -> std::io::Result<Option<Slot>> {
    std::fs::create_dir_all(dir)?;
    for index in 0..n.max(1) {
        let file = open(&slot_path(dir, index))?;
        if flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
            return Ok(Some(Slot { _file: file, index }));
        }
    }
    Ok(None)
}

/// A slot of `n` in `dir`, waiting for one if all are taken. Waiters queue
/// on a slot picked by process id, so they spread over the slots.
pub fn acquire(dir: &Path, n: usize) -> std::io::Result<Slot> {
    if let Some(slot) = try_acquire(dir, n)? {
        return Ok(slot);
    }
    let index = std::process::id() as usize % n.max(1);
    let file = open(&slot_path(dir, index))?;
    if !flock(&file, libc::LOCK_EX) {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Slot { _file: file, index })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_n_slots_are_held_and_a_dropped_one_is_free_again() {
        let dir = tempfile::tempdir().unwrap();
        let a = try_acquire(dir.path(), 2).unwrap().expect("first");
        let b = try_acquire(dir.path(), 2).unwrap().expect("second");
        assert_ne!(a.index, b.index);
        assert!(try_acquire(dir.path(), 2).unwrap().is_none(), "a third slot of two");
        drop(a);
        let c = try_acquire(dir.path(), 2).unwrap().expect("the freed slot");
        assert_eq!(c.index, 0);
    }

    #[test]
    fn a_waiter_gets_the_slot_when_its_holder_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let held = try_acquire(dir.path(), 1).unwrap().unwrap();
        let path = dir.path().to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let slot = acquire(&path, 1).unwrap();
            tx.send(slot.index).unwrap();
        });
        // Still held: the waiter has not got it (it cannot have, whenever
        // this runs); then released: it does.
        assert!(rx.try_recv().is_err());
        drop(held);
        assert_eq!(rx.recv().unwrap(), 0);
        waiter.join().unwrap();
    }
}
