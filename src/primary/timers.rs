//! Deadlines of the primary's loop: kills after a disconnect timeout,
//! accept pauses after `EMFILE`, orphaned sockets, hung workers and
//! stalled round-robin turns. The loop sleeps until the nearest one.

#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use super::least_loaded::STUCK;
use super::round_robin::STALL;
use super::{Event, Primary};
use crate::protocol::Policy;
use crate::sys::{process, signal};

impl Primary {
    /// Kills a worker that holds connections for longer than `timeout`
    /// without coming back for the next one (gunicorn's `--timeout`).
    /// `None` (the default) turns it off.
    pub fn set_hang_timeout(&mut self, timeout: Option<Duration>) {
        self.hang_timeout = timeout;
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let kills = self.workers.values().filter_map(|s| s.kill_at);
        let paused = self
            .handles
            .values()
            .filter_map(|h| h.paused_until.or(h.orphaned_until));
        let hangs = self.hang_timeout.into_iter().flat_map(|t| {
            self.workers
                .values()
                .filter(|s| !s.in_flight.is_empty() && s.exit.is_none())
                .map(move |s| s.progress + t)
        });
        // Connections queued behind a busy worker: look again when its turn
        // may be forfeit.
        let stalled = self
            .handles
            .values()
            .any(|h| h.policy.hands_over() && !h.queue.is_empty() && !h.workers.is_empty())
            .then(|| Instant::now() + STALL);
        // Least-loaded: a worker that took nothing for STUCK while
        // connections wait in its pipe has them taken back.
        let stuck = self
            .workers
            .values()
            .filter(|s| !s.in_flight.is_empty() && s.exit.is_none())
            .filter(|s| s.pipes.iter().any(|p| self.rescues(p.hid)))
            .map(|s| s.progress + STUCK);
        kills
            .chain(paused)
            .chain(hangs)
            .chain(stuck)
            .chain(stalled)
            .chain(self.upgrade_deadline())
            .chain(self.reuseport_deadline())
            .chain(self.plain_deadline())
            .min()
    }

    // Whether connections in flight on `hid` are taken back from a worker
    // that stopped taking them (least-loaded: work-conserving, as a
    // shared socket is; round robin keeps strict turns).
    fn rescues(&self, hid: u32) -> bool {
        self.handles
            .get(&hid)
            .is_some_and(|h| h.policy == Policy::LeastLoaded)
    }

    // Takes back what waits in the pipes of least-loaded workers stuck for
    // STUCK (blocked on a slow request, say) and hands it to the others.
    fn rescue_stuck(&mut self, now: Instant) {
        let mut stuck: Vec<(u32, u32)> = Vec::new();
        let mut settled = Vec::new();
        for (&id, s) in self.workers.iter_mut() {
            if s.in_flight.is_empty() || s.exit.is_some() || s.progress + STUCK > now {
                continue;
            }
            let taken = s.settle(now);
            if taken > 0 {
                settled.push((id, taken));
                continue;
            }
            for p in &s.pipes {
                if s.in_flight.iter().any(|f| f.handle == p.hid) {
                    stuck.push((id, p.hid));
                }
            }
        }
        for (id, taken) in settled {
            self.count_served(id, taken as u64, 0, false);
        }
        for (id, hid) in stuck {
            if self.rescues(hid) {
                for h in self.take_back(id, Some(hid), false) {
                    self.distribute(h, false);
                }
            }
        }
    }

    pub(super) fn on_timers(&mut self) {
        self.plain_timers();
        let now = Instant::now();
        self.rescue_stuck(now);
        self.reuseport_timers(now);
        let due: Vec<u32> = self
            .workers
            .iter()
            .filter(|(_, s)| s.kill_at.is_some_and(|t| t <= now) && s.exit.is_none())
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            if let Some(s) = self.workers.get_mut(&id) {
                s.kill_at = None;
                let _ = process::kill(s.pid, signal::SIGKILL);
            }
        }
        if let Some(t) = self.hang_timeout {
            // Progress is seen by looking at the pipes.
            let mut settled = Vec::new();
            for (&id, s) in self.workers.iter_mut() {
                if s.exit.is_none() && s.progress + t <= now {
                    settled.push((id, s.settle(now)));
                }
            }
            for (id, taken) in settled {
                if taken > 0 {
                    self.count_served(id, taken as u64, 0, false);
                }
            }
            let hung: Vec<u32> = self
                .workers
                .iter()
                .filter(|(_, s)| {
                    s.exit.is_none() && !s.in_flight.is_empty() && s.progress + t <= now
                })
                .map(|(&id, _)| id)
                .collect();
            for id in hung {
                self.events.push_back(Event::Hung(id));
                self.abort_worker(id);
            }
        }
        let expired: Vec<u32> = self
            .handles
            .iter()
            .filter(|(_, h)| h.orphaned_until.is_some_and(|t| t <= now))
            .map(|(&id, _)| id)
            .collect();
        for hid in expired {
            self.close_handle(hid);
        }
        let queued: Vec<u32> = self
            .handles
            .iter()
            .filter(|(_, h)| !h.queue.is_empty())
            .map(|(&id, _)| id)
            .collect();
        for hid in queued {
            self.distribute(hid, false);
        }
        let resume: Vec<u32> = self
            .handles
            .iter()
            .filter(|(_, h)| h.paused_until.is_some_and(|t| t <= now))
            .map(|(&id, _)| id)
            .collect();
        for hid in resume {
            if let Some(h) = self.handles.get_mut(&hid) {
                h.paused_until = None;
            }
            self.accept_ready(hid, false);
            self.distribute(hid, false);
        }
    }
}
