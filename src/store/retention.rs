//! Minimum retention (`[cas] min_retention`): a blob reported present by
//! FindMissingBlobs, written or read is not evicted for that long, because
//! clients act on what they were told (Buck2 assumes about 3 h after
//! FindMissing, bb_clientd 5 minutes) and an action whose inputs vanish
//! between FindMissing and Execute fails.
//!
//! Both backends keep blobs in least-recently-used order and stamp each
//! with its last use, so the protected blobs are the most recent ones and
//! eviction stops at the first of them. When the unprotected blobs cannot
//! make room, the write fails with RESOURCE_EXHAUSTED (clients retry) and
//! nothing is evicted: the budget is never exceeded, not even by one blob.

use std::time::{Duration, SystemTime};

use lru::LruCache;
use remote_apis::Digest;

use crate::error::{Error, Result};

/// How long a used blob is kept, whatever the pressure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention(pub Duration);

impl Retention {
    /// Whether a blob last used at `last_use` may not be evicted at `now`.
    /// A clock that went backwards protects (never evict on doubt).
    pub fn protects(self, last_use: SystemTime, now: SystemTime) -> bool {
        !self.0.is_zero() && now.duration_since(last_use).map_or(true, |age| age < self.0)
    }

    /// Checks that evicting unprotected blobs from the least recently used
    /// end of `blobs` can make `incoming` bytes fit under `max` (with `used`
    /// taken), without evicting anything. `last_use` reads an entry's stamp.
    pub fn check_room<V>(
        self,
        blobs: &LruCache<Digest, V>,
        last_use: impl Fn(&V) -> SystemTime,
        used: u64,
        max: u64,
        incoming: &Digest,
    ) -> Result<()> {
        let mut free = max.saturating_sub(used);
        if free >= incoming.size {
            return Ok(());
        }
        let now = SystemTime::now();
        for (digest, entry) in blobs.iter().rev() {
            if self.protects(last_use(entry), now) {
                break;
            }
            free += digest.size;
            if free >= incoming.size {
                return Ok(());
            }
        }
        Err(Error::resource_exhausted(format!(
            "the store is full: blob {incoming} needs {} more bytes than the {} free, and every blob that could \
             make room was reported present, written or read within the last {} ([cas] min_retention), so \
             clients may still rely on it; retry later, or raise [cas] max_size",
            incoming.size - max.saturating_sub(used),
            max.saturating_sub(used),
            humantime::format_duration(self.0)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protection_follows_the_last_use() {
        let now = SystemTime::now();
        let r = Retention(Duration::from_secs(60));
        assert!(r.protects(now - Duration::from_secs(59), now));
        assert!(!r.protects(now - Duration::from_secs(61), now));
        assert!(r.protects(now + Duration::from_secs(5), now), "a clock that went back protects");
        assert!(!Retention::default().protects(now, now), "zero protects nothing");
    }
}
