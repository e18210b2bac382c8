//! What each worker served, for recycling after so many requests
//! (gunicorn's `max_requests`): connections it took, which the primary
//! sees taken from its pipe in round robin and the worker reports in shared mode,
//! and requests, when the worker's program reports them
//! ([`Worker::note_requests`](crate::Worker::note_requests)).
//!
//! A worker's reports are believed: a worker that lies only brings its own
//! recycling nearer or further, and each report only adds to two
//! saturating counters, so a flood costs no memory.

#![forbid(unsafe_code)]

use std::io;

use super::{Event, Primary};
use crate::protocol::REQUESTS;

/// A worker's counts and its limit.
#[derive(Debug, Default)]
pub(super) struct Served {
    /// Connections it took.
    pub(super) taken: u64,
    /// Requests it reported; `None` until its first report.
    pub(super) requests: Option<u64>,
    /// [`Primary::set_max_requests`].
    limit: Option<u64>,
    /// [`Event::MaxRequests`] went out.
    reached: bool,
}

impl Served {
    /// What the limit is checked against: requests once the worker reports
    /// them, else connections.
    pub(super) fn count(&self) -> u64 {
        self.requests.unwrap_or(self.taken)
    }
}

impl Primary {
    /// Reports [`Event::MaxRequests`] once the worker has served `limit`
    /// requests: connections it took (read from its pipe in round robin, reported
    /// by the worker in shared mode, in batches), or requests its program
    /// reported with [`Worker::note_requests`](crate::Worker::note_requests)
    /// once it reports any. Reported once per worker, at once if it is past
    /// the limit already; `None` takes the limit away. `NotConnected` for
    /// a worker that is gone.
    pub fn set_max_requests(&mut self, id: u32, limit: Option<u64>) -> io::Result<()> {
        let slot = self.workers.get_mut(&id).ok_or_else(|| Self::gone(id))?;
        slot.served.limit = limit;
        self.count_served(id, 0, 0, false);
        Ok(())
    }

    /// Adds to a worker's counts and reports the limit once reached.
    pub(super) fn count_served(&mut self, id: u32, conns: u64, requests: u64, reported: bool) {
        let Some(slot) = self.workers.get_mut(&id) else {
            return;
        };
        let s = &mut slot.served;
        s.taken = s.taken.saturating_add(conns);
        if reported {
            s.requests = Some(s.requests.unwrap_or(0).saturating_add(requests));
        }
        let count = s.count();
        if s.limit.is_some_and(|l| count >= l) && !s.reached && !slot.exited_after_disconnect {
            s.reached = true;
            self.events.push_back(Event::MaxRequests { id, count });
        }
    }

    /// A `Count` frame: `n` more connections taken from shared sockets, or
    /// requests served (flag `REQUESTS`).
    pub(super) fn on_count(&mut self, id: u32, flags: u8, n: u32) -> io::Result<()> {
        match flags {
            0 => self.count_served(id, n.into(), 0, false),
            REQUESTS => self.count_served(id, 0, n.into(), true),
            f => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("count with unknown flags {f:#x}"),
                ))
            }
        }
        Ok(())
    }
}
