//! Worker recycling: see "Worker recycling" in the supervisor's docs.
//!
//! - Requests: each worker's limit is `max_requests` plus a random
//!   `0..=max_requests_jitter`, drawn when its `Fork` event passes, and
//!   given to the primary ([`Primary::set_max_requests`]), which counts
//!   and reports [`Event::MaxRequests`]: connections acknowledged (round
//!   robin), connections the worker reports taking from a shared socket,
//!   or requests once the worker's program reports them. Reports come in
//!   batches (16, or every 50 ms), so a worker may serve a few more.
//! - Memory: every second, each serving worker's `VmRSS` from
//!   `/proc/PID/status`; no frame from the worker, so a worker that leaks
//!   without answering is caught too.
//! - One at a time: `Starting` (the replacement is forked, not listening
//!   yet), then `Draining` (the old one is disconnected) until the old one
//!   exited; only then the next. A reload during `Starting` takes over:
//!   the replacement is disconnected, the reload replaces the old one. A replacement that dies, or does not
//!   listen within `reload_timeout`, is a [`Notice::RecycleFailed`]; the
//!   old worker goes back to the front of the queue after a backoff.
//!
//! [`Primary::set_max_requests`]: crate::Primary::set_max_requests

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use super::{Notice, Supervisor};
use crate::primary::{Event, State};

/// How often the workers' memory is read.
const MEMORY_CHECK: Duration = Duration::from_secs(1);

/// Why a worker is recycled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecycleReason {
    /// It served its limit ([`Config::max_requests`](super::Config::max_requests) plus its jitter).
    Requests {
        /// What it served (requests if it reports them, else connections).
        count: u64,
        /// Its limit.
        limit: u64,
    },
    /// Its resident memory is above [`Config::max_memory`](super::Config::max_memory).
    Memory {
        /// `VmRSS`, in bytes.
        rss: u64,
        /// The limit, in bytes.
        limit: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The replacement is forked and not listening yet.
    Starting {
        /// Give up on it then.
        until: Instant,
    },
    /// The old worker is disconnecting; the next recycle waits for its exit.
    Draining,
}

#[derive(Debug)]
struct Current {
    old: u32,
    new: u32,
    reason: RecycleReason,
    phase: Phase,
    /// The old worker is gone already (it died while being replaced).
    old_gone: bool,
}

/// The recycling state of a [`Supervisor`].
#[derive(Debug)]
pub(super) struct Recycler {
    /// xorshift64 state, for the jitter.
    rng: u64,
    /// Each worker's drawn request limit.
    limits: BTreeMap<u32, u64>,
    /// Workers due for recycling, in turn.
    queue: VecDeque<(u32, RecycleReason)>,
    current: Option<Current>,
    next_memory_check: Option<Instant>,
    /// After a failed recycle, none starts before then.
    paused_until: Option<Instant>,
    /// Failed recycles in a row.
    failures: u32,
}

impl Recycler {
    pub(super) fn new() -> Recycler {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let pid = u64::from(std::process::id());
        Recycler::seeded(nanos ^ pid.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15)
    }

    fn seeded(seed: u64) -> Recycler {
        Recycler {
            rng: seed.max(1),
            limits: BTreeMap::new(),
            queue: VecDeque::new(),
            current: None,
            next_memory_check: None,
            paused_until: None,
            failures: 0,
        }
    }

    /// A number in `0..=max` (xorshift64: the jitter needs no better).
    fn draw(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        match max.checked_add(1) {
            Some(m) => x % m,
            None => x,
        }
    }

    /// A recycle is replacing `id`, or forked it as the replacement.
    fn involves(&self, id: u32) -> bool {
        self.current.as_ref().is_some_and(|c| {
            matches!(c.phase, Phase::Starting { .. }) && (c.old == id || c.new == id)
        })
    }

    fn queued(&self, id: u32) -> bool {
        self.queue.iter().any(|&(q, _)| q == id)
            || self.current.as_ref().is_some_and(|c| c.old == id)
    }
}

impl Supervisor {
    /// Before the event is passed on: a new worker gets its request limit,
    /// one that reached it is queued.
    pub(super) fn recycle_observe(&mut self, ev: &Event) {
        match *ev {
            Event::Fork(id) => {
                if let Some(max) = self.config.max_requests {
                    let jitter = self.recycle.draw(self.config.max_requests_jitter);
                    let limit = max.saturating_add(jitter);
                    self.recycle.limits.insert(id, limit);
                    let _ = self.primary.set_max_requests(id, Some(limit));
                }
            }
            Event::MaxRequests { id, count } if !self.recycle.queued(id) => {
                let limit = self.recycle.limits.get(&id).copied().unwrap_or(count);
                let reason = RecycleReason::Requests { count, limit };
                self.recycle.queue.push_back((id, reason));
            }
            _ => {}
        }
    }

    /// A rolling reload begins: it replaces every worker, the one being
    /// recycled too, and every worker after it must be forked after the
    /// signal, so a replacement not listening yet is disconnected (it may
    /// hold connections already: gracefully). A recycle draining its old
    /// worker goes on; the next one waits for the reload's end.
    pub(super) fn recycle_yield_to_reload(&mut self) {
        if let Some(c) = self.recycle.current.as_ref() {
            if let Phase::Starting { .. } = c.phase {
                let new = c.new;
                self.recycle.current = None;
                let _ = self
                    .primary
                    .disconnect(new, Some(self.config.graceful_timeout));
            }
        }
    }

    /// Once per turn of the loop: reads memory when due, finishes or gives
    /// up the recycle in progress, starts the next one.
    pub(super) fn recycle_turn(&mut self) {
        if self.stopping.is_some() || self.successor.is_some() {
            self.recycle.queue.clear();
            self.recycle.current = None;
            return;
        }
        let now = Instant::now();
        self.check_memory(now);
        self.check_recycle(now);
        self.start_recycle(now);
    }

    /// When the loop must wake for recycling.
    pub(super) fn recycle_deadline(&self) -> Option<Instant> {
        let r = &self.recycle;
        let until = match r.current.as_ref().map(|c| c.phase) {
            Some(Phase::Starting { until }) => Some(until),
            _ => None,
        };
        let memory = r
            .next_memory_check
            .filter(|_| self.config.max_memory.is_some());
        [until, memory, r.paused_until].into_iter().flatten().min()
    }

    /// A worker exited (not during a stop). `true`: the recycle accounts
    /// for it, no respawn.
    pub(super) fn recycle_exit(&mut self, id: u32, after_disconnect: bool) -> bool {
        let r = &mut self.recycle;
        r.queue.retain(|&(q, _)| q != id);
        r.limits.remove(&id);
        let Some(c) = r.current.as_mut() else {
            return false;
        };
        match c.phase {
            Phase::Draining if c.old == id => {
                r.current = None;
                false
            }
            Phase::Starting { .. } if c.old == id => {
                if after_disconnect {
                    // Retired by someone else (SIGTTOU): no replacement then.
                    let new = c.new;
                    r.current = None;
                    let _ = self.primary.disconnect(new, Some(Duration::ZERO));
                    return false;
                }
                // It died: the replacement on its way stands in for it.
                c.old_gone = true;
                true
            }
            Phase::Starting { .. } if c.new == id => {
                let old_gone = c.old_gone;
                self.fail_recycle(
                    format!("replacement worker {id} ended before it listened"),
                    false,
                );
                // With the old one gone too, this death is respawned as usual.
                !old_gone && !after_disconnect
            }
            _ => false,
        }
    }

    fn check_memory(&mut self, now: Instant) {
        let Some(limit) = self.config.max_memory else {
            return;
        };
        match self.recycle.next_memory_check {
            Some(t) if t > now => return,
            _ => self.recycle.next_memory_check = Some(now + MEMORY_CHECK),
        }
        for w in self.primary.workers() {
            let serving = matches!(w.state, State::Online | State::Listening);
            if !serving || w.exited_after_disconnect || self.recycle.queued(w.id) {
                continue;
            }
            if self.recycle.involves(w.id) {
                continue;
            }
            if let Some(rss) = rss_bytes(w.pid).filter(|&rss| rss > limit) {
                let reason = RecycleReason::Memory { rss, limit };
                self.recycle.queue.push_back((w.id, reason));
            }
        }
    }

    fn check_recycle(&mut self, now: Instant) {
        let Some(c) = self.recycle.current.as_ref() else {
            return;
        };
        let Phase::Starting { until } = c.phase else {
            return;
        };
        let (old, new) = (c.old, c.new);
        // As a reload: listening everywhere the old one did.
        let want = self
            .members
            .get(&old)
            .map_or(0, |m| m.listens)
            .max(self.target_listens);
        let have = self.members.get(&new).map_or(0, |m| m.listens);
        let online = self
            .primary
            .workers()
            .iter()
            .any(|w| w.id == new && matches!(w.state, State::Online | State::Listening));
        if (want == 0 && online) || (want > 0 && have >= want) {
            self.recycle.failures = 0;
            if c.old_gone {
                self.recycle.current = None;
            } else {
                let _ = self
                    .primary
                    .disconnect(old, Some(self.config.graceful_timeout));
                if let Some(c) = self.recycle.current.as_mut() {
                    c.phase = Phase::Draining;
                }
            }
            self.out.push_back(Notice::Recycled { old, new });
        } else if until <= now {
            // Its exit comes after a disconnect: no respawn for it.
            let _ = self.primary.disconnect(new, Some(Duration::ZERO));
            self.fail_recycle(
                format!("replacement worker {new} did not listen in time"),
                true,
            );
        }
    }

    // Gives up the recycle in progress: the old worker serves on and is
    // queued again, after a backoff. `respawn`: a worker must be forked
    // if the old one is gone too.
    fn fail_recycle(&mut self, why: String, respawn: bool) {
        if let Some(c) = self.recycle.current.take() {
            self.give_up(c.old, c.reason, c.old_gone && respawn, c.old_gone, why);
        }
    }

    fn give_up(
        &mut self,
        old: u32,
        reason: RecycleReason,
        respawn: bool,
        old_gone: bool,
        why: String,
    ) {
        let r = &mut self.recycle;
        r.failures += 1;
        let factor = 1u32 << (r.failures - 1).min(20);
        let pause = (self.config.backoff_initial * factor).min(self.config.backoff_max);
        r.paused_until = Some(Instant::now() + pause);
        if respawn {
            self.respawn_at.push(Instant::now());
        }
        if !old_gone {
            r.queue.push_front((old, reason));
        }
        self.out.push_back(Notice::RecycleFailed(why));
    }

    fn start_recycle(&mut self, now: Instant) {
        let r = &self.recycle;
        let busy = r.current.is_some()
            || r.paused_until.is_some_and(|t| t > now)
            || !self.ready
            || self.reload.is_some()
            || self.primary.upgrade_pid().is_some();
        if busy {
            return;
        }
        self.recycle.paused_until = None;
        // Gone, or disconnecting already (a reload, SIGTTOU): not ours.
        let next = loop {
            match self.recycle.queue.pop_front() {
                Some((id, reason)) if self.primary.is_connected(id) => break Some((id, reason)),
                Some(_) => continue,
                None => break None,
            }
        };
        let Some((old, reason)) = next else {
            return;
        };
        match self.fork() {
            Ok(new) => {
                let until = now + self.config.reload_timeout;
                self.recycle.current = Some(Current {
                    old,
                    new,
                    reason,
                    phase: Phase::Starting { until },
                    old_gone: false,
                });
                self.out.push_back(Notice::Recycling { id: old, reason });
            }
            Err(e) => self.give_up(
                old,
                reason,
                false,
                false,
                format!("fork of a replacement for worker {old}: {e}"),
            ),
        }
    }
}

/// `VmRSS` of a process in bytes; `None` once it is a zombie or gone.
fn rss_bytes(pid: i32) -> Option<u64> {
    parse_vm_rss(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let v = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let mut words = v.split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => n.checked_mul(1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_read_in_bytes_and_a_zombie_has_none() {
        let status = "Name:\thello\nVmPeak:\t  9000 kB\nVmRSS:\t    2048 kB\nRssAnon:\t 1 kB\n";
        assert_eq!(parse_vm_rss(status), Some(2048 * 1024));
        assert_eq!(parse_vm_rss("Name:\thello\nState:\tZ (zombie)\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\t12 MB\n"), None);
        let me = rss_bytes(std::process::id() as i32).expect("our own VmRSS");
        assert!(me > 1024 * 1024, "{me}");
    }

    #[test]
    fn jitter_draws_spread_over_the_whole_range_and_zero_means_none() {
        let mut r = Recycler::seeded(12345);
        assert_eq!(r.draw(0), 0);
        let draws: Vec<u64> = (0..2000).map(|_| r.draw(50)).collect();
        assert!(draws.iter().all(|&d| d <= 50));
        for v in [0, 25, 50] {
            assert!(draws.contains(&v), "{v} never drawn");
        }
        let _ = r.draw(u64::MAX);
        // Two seeds, two sequences: workers of two primaries differ.
        let mut a = Recycler::seeded(1);
        let mut b = Recycler::seeded(2);
        let a: Vec<u64> = (0..8).map(|_| a.draw(1000)).collect();
        let b: Vec<u64> = (0..8).map(|_| b.draw(1000)).collect();
        assert_ne!(a, b);
    }
}
