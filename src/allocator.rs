//! Gives the memory mimalloc has freed back to the OS once the process is
//! idle, so a server's RSS returns to its baseline after a burst of load.
//!
//! The binaries allocate with mimalloc (`src/main.rs`). mimalloc purges a
//! freed range (`MADV_DONTNEED`) only `purge_delay` (1 s) after the free,
//! and only from inside a later call that frees a page or collects: a
//! process that goes idle keeps whatever it freed last, however much. The
//! soak (issue 9, valid load only, 40 s) measured it: RSS 68 MiB at the
//! baseline, 321 MiB 20 s after the load stopped, most of it pages freed
//! when tokio's blocking-pool threads (the store's reads and writes) exit
//! 10 s after their last task. The same run on the system allocator ended
//! at 40 MiB, so this was not live data. `MIMALLOC_PURGE_DELAY=0` ended at
//! 34 MiB but purges at every page free, so the per-chunk 1 MiB buffers of
//! a stream would page-fault again on every reuse (what mimalloc was chosen
//! to avoid); a collect once a second keeps the delay under load and ended
//! at 37 MiB.
//!
//! Without mimalloc as the global allocator (the library's tests), the
//! runtime's threads never initialize a mimalloc heap and a collect returns
//! at once.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often freed memory whose purge delay has passed is given back: the
/// same as mimalloc's default delay, so an idle process is back near its
/// live size within about two seconds.
const PERIOD: Duration = Duration::from_secs(1);

/// Spawns, on the current runtime, the task that purges freed memory every
/// [`PERIOD`] until `stop` is cancelled. For long-running processes: the
/// server and the remote worker.
pub fn release_freed_memory(stop: CancellationToken) {
    crate::upkeep::every(PERIOD, stop, collect);
}

/// A normal (not forced) collect: this thread's empty pages go back to the
/// process-wide arenas, and every arena range whose purge delay has passed
/// is purged, whichever thread freed it (exited threads included). It runs
/// on a runtime thread, whose mimalloc heap is initialized; a thread that
/// never allocated returns at once without purging.
fn collect() {
    // SAFETY: mi_collect takes no pointers and may be called from any
    // thread at any time; it only frees memory that no block uses.
    unsafe { libmimalloc_sys::mi_collect(false) };
}
