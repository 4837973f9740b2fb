//! The upload sessions of ByteStream: which resource names a stream is
//! writing now, and which interrupted uploads are parked for resumption.
//!
//! A parked upload holds an open temporary file (or, on the memory store,
//! its bytes), so parking is bounded: at most `total` parked uploads, at most
//! `per_client` from one client address, each for at most the resume window.
//! Parking beyond a cap drops the oldest parked upload (of that client, for
//! the per-client cap); its client finds no session and starts over, which
//! costs a re-upload, never a wrong blob. Plain data, so the policy is tested
//! without streams.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub(super) struct ParkLimits {
    pub total: usize,
    pub per_client: usize,
    pub window: Duration,
}

pub(super) enum Slot<U> {
    /// A stream is writing this upload now.
    Active,
    Parked(Parked<U>),
}

pub(super) struct Parked<U> {
    pub upload: U,
    at: Instant,
    seq: u64,
    client: Option<IpAddr>,
}

pub(super) struct Sessions<U> {
    slots: HashMap<String, Slot<U>>,
    /// Parked uploads, oldest first.
    order: BTreeMap<u64, String>,
    next_seq: u64,
    per_client: HashMap<Option<IpAddr>, usize>,
    limits: ParkLimits,
    last_sweep: Option<Instant>,
}

/// How often expired parked uploads are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

impl<U> Sessions<U> {
    pub(super) fn new(limits: ParkLimits) -> Self {
        Sessions {
            slots: HashMap::new(),
            order: BTreeMap::new(),
            next_seq: 0,
            per_client: HashMap::new(),
            limits,
            last_sweep: None,
        }
    }

    pub(super) fn get(&self, key: &str) -> Option<&Slot<U>> {
        self.slots.get(key)
    }

    pub(super) fn parked(&self) -> usize {
        self.order.len()
    }

    /// Marks `key` active and returns what was there (a parked upload is
    /// taken out of the parking accounting).
    pub(super) fn claim(&mut self, key: &str) -> Option<Slot<U>> {
        let old = self.slots.insert(key.to_string(), Slot::Active);
        if let Some(Slot::Parked(p)) = &old {
            self.unpark_accounting(p.seq, p.client);
        }
        old
    }

    /// Undoes a [`claim`](Self::claim) that was refused: the previous slot
    /// comes back as it was (a parked upload keeps its age).
    pub(super) fn put_back(&mut self, key: &str, old: Option<Slot<U>>) {
        match old {
            None => {
                self.slots.remove(key);
            }
            Some(Slot::Parked(p)) => {
                self.order.insert(p.seq, key.to_string());
                *self.per_client.entry(p.client).or_default() += 1;
                self.slots.insert(key.to_string(), Slot::Parked(p));
            }
            Some(Slot::Active) => {
                self.slots.insert(key.to_string(), Slot::Active);
            }
        }
    }

    /// Ends a session, whatever state it is in; returns a parked upload.
    pub(super) fn remove(&mut self, key: &str) -> Option<U> {
        match self.slots.remove(key)? {
            Slot::Parked(p) => {
                self.unpark_accounting(p.seq, p.client);
                Some(p.upload)
            }
            Slot::Active => None,
        }
    }

    /// Frees `key` if it is still marked active (its handler went away).
    pub(super) fn remove_if_active(&mut self, key: &str) {
        if matches!(self.slots.get(key), Some(Slot::Active)) {
            self.slots.remove(key);
        }
    }

    /// Parks `upload` under `key` and returns the uploads dropped to stay
    /// within the caps, oldest first, for the caller to drop outside its
    /// lock (dropping one removes its temporary file).
    pub(super) fn park(&mut self, key: &str, upload: U, client: Option<IpAddr>, now: Instant) -> Vec<U> {
        let mut dropped: Vec<U> = self.remove(key).into_iter().collect();
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.insert(seq, key.to_string());
        *self.per_client.entry(client).or_default() += 1;
        self.slots.insert(key.to_string(), Slot::Parked(Parked { upload, at: now, seq, client }));
        while self.per_client.get(&client).copied().unwrap_or(0) > self.limits.per_client {
            let oldest = self.order.values().find(|k| self.client_of(k) == Some(client)).cloned();
            dropped.extend(oldest.and_then(|k| self.remove(&k)));
        }
        while self.order.len() > self.limits.total {
            let oldest = self.order.values().next().cloned();
            dropped.extend(oldest.and_then(|k| self.remove(&k)));
        }
        dropped
    }

    /// Drops parked uploads older than the resume window (at most every
    /// ten seconds); returns them for the caller to drop.
    pub(super) fn sweep(&mut self, now: Instant) -> Vec<U> {
        if self.last_sweep.is_some_and(|t| now.duration_since(t) < SWEEP_EVERY) {
            return Vec::new();
        }
        self.last_sweep = Some(now);
        let expired: Vec<String> = self
            .order
            .values()
            .filter(|k| match self.slots.get(*k) {
                Some(Slot::Parked(p)) => now.duration_since(p.at) >= self.limits.window,
                _ => false,
            })
            .cloned()
            .collect();
        expired.iter().filter_map(|k| self.remove(k)).collect()
    }

    fn client_of(&self, key: &str) -> Option<Option<IpAddr>> {
        match self.slots.get(key) {
            Some(Slot::Parked(p)) => Some(p.client),
            _ => None,
        }
    }

    fn unpark_accounting(&mut self, seq: u64, client: Option<IpAddr>) {
        self.order.remove(&seq);
        if let Some(n) = self.per_client.get_mut(&client) {
            *n -= 1;
            if *n == 0 {
                self.per_client.remove(&client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions(total: usize, per_client: usize) -> Sessions<u32> {
        Sessions::new(ParkLimits { total, per_client, window: Duration::from_secs(60) })
    }

    fn ip(last: u8) -> Option<IpAddr> {
        Some(IpAddr::from([10, 0, 0, last]))
    }

    #[test]
    fn parking_beyond_the_caps_drops_the_oldest() {
        let mut s = sessions(4, 2);
        let now = Instant::now();
        assert!(s.park("a1", 1, ip(1), now).is_empty());
        assert!(s.park("a2", 2, ip(1), now).is_empty());
        // A third from the same client: its oldest goes.
        assert_eq!(s.park("a3", 3, ip(1), now), vec![1]);
        assert!(s.park("b1", 4, ip(2), now).is_empty());
        assert!(s.park("b2", 5, ip(2), now).is_empty());
        // Over the total: the oldest of all goes, whoever parked it.
        assert_eq!(s.park("c1", 6, ip(3), now), vec![2]);
        assert_eq!(s.parked(), 4);
        assert!(s.get("a1").is_none() && s.get("a2").is_none());
        // Re-parking the same name replaces it instead of counting twice.
        assert_eq!(s.park("c1", 7, ip(3), now), vec![6]);
        assert_eq!(s.parked(), 4);
    }

    #[test]
    fn claims_resumes_and_refusals_keep_the_accounting() {
        let mut s = sessions(2, 2);
        let now = Instant::now();
        s.park("a", 1, ip(1), now);
        s.park("b", 2, ip(1), now);
        // Resumed: no longer parked, so a new one fits without a drop.
        let old = s.claim("a");
        assert!(matches!(old, Some(Slot::Parked(_))));
        assert_eq!(s.parked(), 1);
        assert!(s.park("c", 3, ip(1), now).is_empty());
        // A refused claim puts the parked upload back, with its age.
        let old = s.claim("b");
        s.put_back("b", old);
        assert_eq!(s.parked(), 2);
        assert_eq!(s.park("d", 4, ip(1), now), vec![2], "b is still the oldest");
        // The stream of "a" ends: its slot is freed.
        s.remove_if_active("a");
        assert!(s.get("a").is_none());
    }

    #[test]
    fn the_sweep_drops_expired_uploads() {
        let mut s = sessions(10, 10);
        let start = Instant::now();
        s.park("old", 1, None, start);
        s.park("new", 2, None, start + Duration::from_secs(50));
        assert_eq!(s.sweep(start + Duration::from_secs(61)), vec![1]);
        assert_eq!(s.parked(), 1);
    }
}
