//! Least-loaded dispatch ([`Policy::LeastLoaded`](crate::Policy::LeastLoaded)):
//! which worker of a handle takes the next connection.
//!
//! Each worker's load is what it last reported (its open count, when it is
//! back in its loop or its count fell), plus what the primary saw it take
//! from its pipe since, plus what waits unread in its pipe.
//! The next connection goes to the worker with the lowest [`Rank`] that has
//! room in its window: an idle worker (back in its loop, see below) before
//! a busy one, then the fewest connections; ties go round robin. With more than [`SCAN_MAX`]
//! workers, two are drawn at random and the better one is taken (power of
//! two choices), so a turn costs the same at 64 workers as at 2.
//!
//! A count cannot tell a worker blocked on a slow request from one busy
//! with fast ones. A worker says when it is back in its loop with nothing
//! to do (a load report, at most 1 ms after it last took a connection), and
//! these pass a worker over:
//! - **busy, one waiting** (ranked after every other worker, but not
//!   skipped): its last word was that it took a connection, and a
//!   connection handed to it waits. A worker that just began a slow
//!   request gets more only when every other one has one waiting too, and
//!   then the one heard from last gets it;
//! - **stuck** (skipped): connections handed over and none taken for
//!   [`STUCK`]; what waits in its pipe is taken back and handed to the
//!   others, so no connection waits behind a blocked worker;
//! - **silent** (skipped): busy, and nothing came since for [`SILENT`] (a
//!   busy worker takes connections all the time; an idle one said so).
//!
//! A worker passed over gets nothing until it speaks again: the connection
//! waits in the primary's queue for the first worker that can take it,
//! which is what makes a shared socket work-conserving. Only the final
//! sweep before a disconnect ignores blocking.

#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use super::handles::Handle;
use super::round_robin::{Avail, Conn};
use super::workers::Slot;

/// Connections in flight and none taken for this long: the worker is
/// likely blocked, and is passed over.
pub(super) const STUCK: Duration = Duration::from_millis(1);
/// Took a connection and said nothing since, for this long: passed over.
const SILENT: Duration = Duration::from_millis(3);
/// Up to this many workers every one is compared; above, two at random.
const SCAN_MAX: usize = 4;

/// What the primary knows of a worker's load: the open count it last
/// reported, when, and whether it took a connection since (seen in its
/// pipe) rather than being back in its loop (a report).
#[derive(Debug, Clone, Copy)]
pub(super) struct Load {
    pub(super) open: u32,
    pub(super) heard: Instant,
    pub(super) busy: bool,
}

impl Load {
    pub(super) fn new() -> Load {
        Load {
            open: 0,
            heard: Instant::now(),
            busy: false,
        }
    }

    /// What a ConnReply with `open` says: `taken` connections accepted
    /// (none: a load report, or rejections when `rejected`).
    pub(super) fn heard(&mut self, open: u32, taken: usize, rejected: bool) {
        self.open = open;
        self.heard = Instant::now();
        if !rejected {
            self.busy = taken > 0;
        }
    }

    /// The primary saw `taken` more connections read from the worker's
    /// pipes, the newest written at `sent`: it is busy, with that many more
    /// open (until it reports). When it took them is not known, only that
    /// it was after `sent`: a worker blocked since an early take looks
    /// silent as it should, not freshly heard from. A report heard since
    /// `sent` most likely came after the take (a worker takes what it is
    /// handed at once) and counted it already.
    pub(super) fn took(&mut self, taken: usize, sent: Instant) {
        if self.heard >= sent {
            return;
        }
        self.open = self
            .open
            .saturating_add(taken.min(u32::MAX as usize) as u32);
        self.heard = sent;
        self.busy = true;
    }
}

/// A worker's standing for the next connection; lower is better, and a
/// blocked one is passed over. One with a connection waiting while busy
/// comes last (the one heard from last first, among those); then idle
/// (said it is back in its loop) before busy (took a connection since),
/// then the count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Rank {
    blocked: bool,
    deferred: bool,
    quiet: u64,
    busy: bool,
    count: u64,
}

impl Slot {
    /// Its rank now, with `pending` connections picked for it this turn.
    /// `force` (the final sweep before a disconnect) ignores blocking.
    pub(super) fn rank(&self, pending: usize, now: Instant, force: bool) -> Rank {
        let stuck =
            !self.in_flight.is_empty() && now.saturating_duration_since(self.progress) >= STUCK;
        let silent = self.load.busy && now.saturating_duration_since(self.load.heard) >= SILENT;
        let in_flight = self.in_flight.len() + pending;
        let deferred = self.load.busy && in_flight >= 1;
        // Among the deferred, the one heard from last is the least likely
        // to be blocked.
        let quiet = if deferred {
            now.saturating_duration_since(self.load.heard).as_micros() as u64
        } else {
            0
        };
        Rank {
            blocked: !force && (stuck || silent),
            deferred,
            quiet,
            busy: self.load.busy,
            count: u64::from(self.load.open) + in_flight as u64,
        }
    }
}

/// A well-mixed 64-bit value of `x` (splitmix64's finalizer): the random
/// draws of a turn, from the connection id, with no state to keep.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Handle {
    /// The least-loaded worker that can take `conn` now (see the module
    /// docs); `None` leaves it queued until a worker takes one.
    pub(super) fn pick_least_loaded(
        &mut self,
        conn: &Conn,
        mut avail: impl FnMut(u32) -> Avail,
    ) -> Option<u32> {
        let n = self.workers.len();
        if n == 0 {
            return None;
        }
        let cursor = self.cursor % n;
        // (rank, distance from the cursor): ties go to the next in turn.
        let mut best: Option<(Rank, usize)> = None;
        let mut consider = |i: usize, best: &mut Option<(Rank, usize)>| {
            let w = self.workers[i];
            if conn.rejected_by.contains(&w) {
                return;
            }
            let Avail::Room(rank) = avail(w) else {
                return;
            };
            if rank.blocked {
                return;
            }
            let key = (rank, (i + n - cursor) % n);
            if best.map_or(true, |b| key < b) {
                *best = Some(key);
            }
        };
        if n > SCAN_MAX {
            let r = mix(u64::from(conn.id) ^ (conn.rejected_by.len() as u64) << 32);
            let a = (r % n as u64) as usize;
            let b = (a + 1 + ((r >> 32) % (n as u64 - 1)) as usize) % n;
            consider(a, &mut best);
            consider(b, &mut best);
        }
        if best.is_none() {
            for step in 0..n {
                consider((cursor + step) % n, &mut best);
            }
        }
        let (_, dist) = best?;
        let i = (cursor + dist) % n;
        self.cursor = (i + 1) % n;
        Some(self.workers[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_random_draws_differ_and_cover_every_worker() {
        for n in [5u64, 8, 64] {
            let mut seen = vec![0u32; n as usize];
            for id in 0..2000u64 {
                let r = mix(id);
                let a = r % n;
                let b = (a + 1 + (r >> 32) % (n - 1)) % n;
                assert_ne!(a, b);
                seen[a as usize] += 1;
                seen[b as usize] += 1;
            }
            let (lo, hi) = (seen.iter().min().unwrap(), seen.iter().max().unwrap());
            assert!(*lo > 0 && hi / lo < 3, "n {n}: {seen:?}");
        }
    }

    #[test]
    fn rank_puts_a_busy_worker_with_one_waiting_last_then_busy_then_the_count() {
        let r = |deferred, quiet, busy, count| Rank {
            blocked: false,
            deferred,
            quiet,
            busy,
            count,
        };
        assert!(r(false, 0, true, 9) < r(true, 0, false, 0));
        assert!(r(true, 10, true, 9) < r(true, 500, true, 1));
        assert!(r(false, 0, false, 9) < r(false, 0, true, 0));
        assert!(r(false, 0, true, 1) < r(false, 0, true, 2));
    }

    #[test]
    fn a_load_report_clears_busy_and_a_rejection_keeps_it() {
        let mut l = Load::new();
        l.heard(3, 2, false);
        assert!(l.busy && l.open == 3);
        l.heard(3, 1, true);
        assert!(l.busy);
        l.heard(1, 0, false);
        assert!(!l.busy && l.open == 1);
    }
}
