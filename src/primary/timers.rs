//! Deadlines of the primary's loop: kills after a disconnect timeout,
//! accept pauses after `EMFILE`, orphaned sockets, hung workers and
//! stalled round-robin turns. The loop sleeps until the nearest one.

#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use super::round_robin::STALL;
use super::{Event, Primary};
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
        kills
            .chain(paused)
            .chain(hangs)
            .chain(stalled)
            .chain(self.upgrade_deadline())
            .chain(self.reuseport_deadline())
            .chain(self.plain_deadline())
            .min()
    }

    pub(super) fn on_timers(&mut self) {
        self.plain_timers();
        let now = Instant::now();
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
