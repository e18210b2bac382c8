//! A listening handle and its queue (≈ Node's round_robin_handle.js).
//!
//! The primary accepts into `queue`, then hands connections to the handle's
//! workers in turn. A connection remembers who rejected it, so it is offered
//! to each worker at most once and closed when all have said no: it never
//! ping-pongs.

#![forbid(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use super::handles::Handle;
use super::least_loaded::Rank;
use super::workers::InFlight;
use super::Primary;
use crate::ipc::wire::{self, Kind};
use crate::protocol::{self, Policy, REJECTED};
use crate::sys;

/// A full worker with no acknowledgement for this long loses its turn.
pub(super) const STALL: Duration = Duration::from_millis(20);

/// Whether a worker can take a connection now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Avail {
    /// Its window has room; how loaded it is (least-loaded).
    Room(Rank),
    /// Full, but acknowledging: wait for it.
    Busy,
    /// Full with no progress for a while, or its channel is gone: skip it.
    Stalled,
}

/// A connection the primary holds until a worker accepts it.
#[derive(Debug)]
pub(crate) struct Conn {
    pub fd: OwnedFd,
    pub id: u32,
    pub rejected_by: Vec<u32>,
}

impl Handle {
    /// The worker whose turn it is, if it can take `conn` now. Turns are
    /// strict, so counts stay even: a worker that is merely busy is waited
    /// for, and only one that is stalled (full and making no progress) or
    /// has rejected `conn` is skipped.
    pub fn pick(&mut self, conn: &Conn, mut avail: impl FnMut(u32) -> Avail) -> Option<u32> {
        if self.policy == Policy::LeastLoaded {
            return self.pick_least_loaded(conn, avail);
        }
        let n = self.workers.len();
        for step in 0..n {
            let i = (self.cursor + step) % n;
            let w = self.workers[i];
            if conn.rejected_by.contains(&w) {
                continue;
            }
            match avail(w) {
                Avail::Room(_) => {
                    self.cursor = (i + 1) % n;
                    return Some(w);
                }
                Avail::Busy => return None,
                Avail::Stalled => continue,
            }
        }
        None
    }

    /// True when every worker of the handle has rejected `conn`.
    pub fn all_rejected(&self, conn: &Conn) -> bool {
        self.workers.iter().all(|w| conn.rejected_by.contains(w))
    }
}

impl Primary {
    // Accepts until EAGAIN or the queue is full (`drain` ignores the cap,
    // for a final sweep of the backlog before closing).
    pub(super) fn accept_ready(&mut self, hid: u32, drain: bool) {
        if self
            .handles
            .get(&hid)
            .is_some_and(|h| h.policy == Policy::ReusePort)
        {
            return self.reuseport_accept(hid, drain);
        }
        let limit = self.settings.queue_limit.max(1);
        let Some(h) = self.handles.get_mut(&hid) else {
            return;
        };
        if h.paused_until.is_some() && !drain {
            return;
        }
        while drain || h.queue.len() < limit {
            match sys::socket::accept(h.fd.as_fd(), false) {
                Ok(fd) => {
                    let id = self.next_conn;
                    self.next_conn = self.next_conn.wrapping_add(1);
                    h.queue.push_back(Conn {
                        fd,
                        id,
                        rejected_by: Vec::new(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if matches!(e.raw_os_error(), Some(23 | 24 | 105 | 12)) => {
                    // ENFILE, EMFILE, ENOBUFS, ENOMEM: pause instead of
                    // spinning; the kernel backlog keeps the connections.
                    h.paused_until = Some(Instant::now() + Duration::from_millis(100));
                    break;
                }
                Err(_) => break, // ECONNABORTED and the like: that one is gone.
            }
        }
        let full = h.queue.len() >= limit || h.paused_until.is_some() || h.workers.is_empty();
        self.set_polling(hid, !full);
    }

    // Hands queued connections to workers with room, one NewConn frame per
    // worker. `force` ignores the window (final sweep).
    pub(super) fn distribute(&mut self, hid: u32, force: bool) {
        let window = self.settings.window;
        let Some(h) = self.handles.get_mut(&hid) else {
            return;
        };
        if !h.policy.hands_over() {
            return;
        }
        let mut batch = std::mem::take(&mut self.batch);
        batch.clear();
        while let Some(conn) = h.queue.front() {
            if h.workers.is_empty() {
                break;
            }
            if h.all_rejected(conn) {
                // Every worker said no: close it once, never ping-pong.
                h.queue.pop_front();
                continue;
            }
            let workers = &self.workers;
            let pending = |w: u32| {
                batch
                    .iter()
                    .find(|(id, _)| *id == w)
                    .map_or(0, |(_, v)| v.len())
            };
            let now = Instant::now();
            let room = |w: u32| match workers.get(&w) {
                Some(s) if s.channel.is_some() && pending(w) < wire::MAX_FDS => {
                    if force || s.in_flight.len() + pending(w) < window {
                        Avail::Room(s.rank(pending(w), now, force))
                    } else if now.duration_since(s.progress) < STALL {
                        Avail::Busy
                    } else {
                        Avail::Stalled
                    }
                }
                _ => Avail::Stalled,
            };
            let conn = h.queue.pop_front().expect("front exists");
            let Some(w) = h.pick(&conn, room) else {
                h.queue.push_front(conn);
                break;
            };
            match batch.iter_mut().find(|(id, _)| *id == w) {
                Some((_, v)) => v.push(conn),
                None => batch.push((w, vec![conn])),
            }
        }
        let refill = h.queue.len() < self.settings.queue_limit.max(1)
            && h.paused_until.is_none()
            && !h.workers.is_empty();
        for (w, conns) in batch.drain(..) {
            self.hand_over(hid, w, conns);
        }
        self.batch = batch;
        if refill {
            self.set_polling(hid, true);
        }
    }

    pub(super) fn hand_over(&mut self, hid: u32, w: u32, conns: Vec<Conn>) {
        let mut ids = std::mem::take(&mut self.ids_buf);
        ids.clear();
        for c in &conns {
            ids.extend_from_slice(&c.id.to_le_bytes());
        }
        let res = {
            let fds: Vec<BorrowedFd<'_>> = conns.iter().map(|c| c.fd.as_fd()).collect();
            self.send_frame(w, Kind::NewConn, 0, hid, &ids, &fds)
        };
        self.ids_buf = ids;
        let now = Instant::now();
        match (res, self.workers.get_mut(&w)) {
            (Ok(()), Some(slot)) => {
                if slot.in_flight.is_empty() {
                    slot.progress = now;
                }
                slot.in_flight
                    .extend(conns.into_iter().map(|conn| InFlight { handle: hid, conn }));
            }
            _ => {
                // The channel is dying: keep the connections for someone else.
                if let Some(h) = self.handles.get_mut(&hid) {
                    for c in conns.into_iter().rev() {
                        h.queue.push_front(c);
                    }
                    h.remove_worker(w);
                }
            }
        }
    }

    pub(super) fn on_conn_reply(
        &mut self,
        id: u32,
        hid: u32,
        flags: u8,
        payload: &[u8],
    ) -> io::Result<()> {
        let slot = self.workers.get_mut(&id).ok_or_else(|| Self::gone(id))?;
        let (load, ids) = protocol::decode_conn_reply(flags, payload)?;
        if let Some(open) = load {
            slot.load.heard(open, ids.len(), flags & REJECTED != 0);
        }
        let mut taken = 0;
        for cid in ids {
            let pos = slot
                .in_flight
                .iter()
                .position(|f| f.conn.id == cid && f.handle == hid)
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("reply for unknown connection {cid} on handle {hid}"),
                    )
                })?;
            let f = slot.in_flight.remove(pos).expect("position is in range");
            slot.progress = Instant::now();
            if flags & REJECTED != 0 {
                let mut conn = f.conn;
                conn.rejected_by.push(id);
                if let Some(h) = self.handles.get_mut(&hid) {
                    h.queue.push_front(conn);
                }
            }
            // Accepted: `f` drops here and closes the primary's copy.
            taken += 1;
        }
        if flags & REJECTED == 0 {
            self.count_served(id, taken, 0, false);
        }
        // The reply freed room in this worker's window, which serves every
        // handle it listens on; rejected connections went back to `hid`.
        self.distribute(hid, false);
        let mut i = 0;
        while let Some(&h) = self.workers.get(&id).and_then(|s| s.handles.get(i)) {
            if h != hid {
                self.distribute(h, false);
            }
            i += 1;
        }
        Ok(())
    }
}
