//! Deadlines of the primary's loop: kills after a disconnect timeout,
//! accept pauses after `EMFILE`, orphaned sockets, hung workers and
//! stalled round-robin turns. The loop sleeps until the nearest one.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::handles::Handle;
use super::least_loaded::STUCK;
use super::round_robin::STALL;
use super::workers::Slot;
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
            .filter(|s| rescued(&self.handles, s).next().is_some())
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

    // Looks at the pipes of the live workers `which` picks (one FIONREAD
    // per pipe with something in flight) and counts what they took; returns
    // those that took nothing.
    fn settle_workers(
        &mut self,
        now: Instant,
        which: impl Fn(&BTreeMap<u32, Handle>, &Slot) -> bool,
    ) -> Vec<u32> {
        let mut took = Vec::new();
        let mut idle = Vec::new();
        for (&id, s) in self.workers.iter_mut() {
            if s.exit.is_some() || !which(&self.handles, s) {
                continue;
            }
            match s.settle(now) {
                0 => idle.push(id),
                taken => took.push((id, taken)),
            }
        }
        for (id, taken) in took {
            self.count_served(id, taken as u64, 0, false);
        }
        idle
    }

    // Takes back what waits in the least-loaded pipes of workers that took
    // nothing for STUCK (blocked on a slow request, say) and hands it to
    // the others. Round-robin workers are not looked at: rr keeps strict
    // turns.
    fn rescue_stuck(&mut self, now: Instant) {
        let stuck = self.settle_workers(now, |handles, s| {
            !s.in_flight.is_empty()
                && s.progress + STUCK <= now
                && rescued(handles, s).next().is_some()
        });
        for id in stuck {
            let Some(s) = self.workers.get(&id) else {
                continue;
            };
            let hids: Vec<u32> = rescued(&self.handles, s).collect();
            for hid in hids {
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
            self.settle_workers(now, |_, s| s.progress + t <= now);
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

// The least-loaded handles a worker has connections in flight on: the
// primary takes those back if it stops taking them (work-conserving, as a
// shared socket is).
fn rescued<'a>(handles: &'a BTreeMap<u32, Handle>, s: &'a Slot) -> impl Iterator<Item = u32> + 'a {
    s.pipes.iter().map(|p| p.hid).filter(move |hid| {
        handles
            .get(hid)
            .is_some_and(|h| h.policy == Policy::LeastLoaded)
            && s.in_flight.iter().any(|f| f.handle == *hid)
    })
}
