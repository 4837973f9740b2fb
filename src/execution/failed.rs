//! Failed runs kept for inspection.
//!
//! A run that ends with a non-zero exit code or an error never enters the
//! ActionCache (clients would trust it as a hit), yet it is exactly the run
//! an operator wants to open: the scheduler stores its ActionResult in the
//! CAS and remembers it here, by action digest, for `[execution]
//! failed_retention` and up to [`MAX_FAILED_RUNS`] entries, so the action's
//! status page can show the last failure's exit code, stdout and stderr.
//!
//! Invariant: the index holds digests and names, never the result itself;
//! blobs it points at may be evicted from the CAS later, and the page then
//! says they are missing.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use remote_apis::Digest;

/// At most this many failed runs are remembered (the oldest go first): a
/// build that breaks thousands of actions cannot grow memory without bound.
pub const MAX_FAILED_RUNS: usize = 10_000;

/// The last failed run of an action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedRun {
    /// The ActionResult, encoded and stored in the CAS.
    pub result: Digest,
    /// The operation that ran it (`operations/...`).
    pub operation: String,
    /// When it finished.
    pub at: SystemTime,
    /// The worker that ran it.
    pub worker: Option<String>,
}

/// Action digest -> its latest failed run, expiring by age and by count.
pub(crate) struct FailedIndex {
    retention: Duration,
    max: usize,
    /// Action -> (seq, when stored, run).
    runs: HashMap<Digest, (u64, Instant, FailedRun)>,
    /// Insertion order: (when, seq, action). An entry whose seq no longer
    /// matches the map's was replaced by a newer failure and is skipped.
    order: VecDeque<(Instant, u64, Digest)>,
    next_seq: u64,
}

impl FailedIndex {
    pub(crate) fn new(retention: Duration, max: usize) -> Self {
        FailedIndex { retention, max, runs: HashMap::new(), order: VecDeque::new(), next_seq: 0 }
    }

    /// Remembers `run` as the latest failure of `action`, replacing an
    /// older one.
    pub(crate) fn insert(&mut self, action: Digest, run: FailedRun, now: Instant) {
        if self.retention.is_zero() || self.max == 0 {
            return;
        }
        self.next_seq += 1;
        self.runs.insert(action, (self.next_seq, now, run));
        self.order.push_back((now, self.next_seq, action));
        self.expire(now);
    }

    /// The latest failed run of `action`, unless it expired.
    pub(crate) fn get(&self, action: &Digest, now: Instant) -> Option<FailedRun> {
        let (_, at, run) = self.runs.get(action)?;
        (now.duration_since(*at) <= self.retention).then(|| run.clone())
    }

    /// Drops runs older than the retention, and the oldest beyond the cap.
    pub(crate) fn expire(&mut self, now: Instant) {
        while let Some(&(at, seq, action)) = self.order.front() {
            let live = self.runs.get(&action).is_some_and(|(s, _, _)| *s == seq);
            if live && self.runs.len() <= self.max && now.duration_since(at) <= self.retention {
                break;
            }
            self.order.pop_front();
            if live {
                self.runs.remove(&action);
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.runs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use remote_apis::DigestFunction;

    fn run(op: &str) -> FailedRun {
        let result = DigestFunction::Sha256.digest_of(op.as_bytes());
        FailedRun { result, operation: op.into(), at: SystemTime::UNIX_EPOCH, worker: None }
    }

    fn action(n: u8) -> Digest {
        DigestFunction::Sha256.digest_of(&[n])
    }

    #[test]
    fn the_latest_failure_replaces_an_older_one_and_survives_its_expiry() {
        let t0 = Instant::now();
        let mut index = FailedIndex::new(Duration::from_secs(10), 100);
        index.insert(action(1), run("operations/a"), t0);
        index.insert(action(1), run("operations/b"), t0 + Duration::from_secs(8));
        assert_eq!(index.get(&action(1), t0 + Duration::from_secs(9)).unwrap().operation, "operations/b");
        // The first insertion's expiry must not take the newer run with it.
        index.expire(t0 + Duration::from_secs(12));
        assert_eq!(index.get(&action(1), t0 + Duration::from_secs(12)).unwrap().operation, "operations/b");
        assert!(index.get(&action(1), t0 + Duration::from_secs(19)).is_none());
        index.expire(t0 + Duration::from_secs(19));
        assert_eq!(index.len(), 0);
        assert!(index.order.is_empty());
    }

    #[test]
    fn the_oldest_go_first_beyond_the_cap() {
        let t0 = Instant::now();
        let mut index = FailedIndex::new(Duration::from_secs(3600), 3);
        for n in 0..5 {
            index.insert(action(n), run(&format!("operations/{n}")), t0);
        }
        assert_eq!(index.len(), 3);
        assert!(index.get(&action(0), t0).is_none());
        assert!(index.get(&action(1), t0).is_none());
        assert_eq!(index.get(&action(4), t0).unwrap().operation, "operations/4");
    }

    #[test]
    fn zero_retention_keeps_nothing() {
        let mut index = FailedIndex::new(Duration::ZERO, 3);
        index.insert(action(1), run("operations/a"), Instant::now());
        assert_eq!(index.len(), 0);
    }
}
