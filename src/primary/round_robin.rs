//! A listening handle and its queue (≈ Node's round_robin_handle.js).
//!
//! The primary accepts into `queue`, then hands connections to the handle's
//! workers in turn. A connection remembers who rejected it, so it is offered
//! to each worker at most once and closed when all have said no: it never
//! ping-pongs.

#![forbid(unsafe_code)]

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use super::handles::Handle;
use super::least_loaded::Rank;
use super::workers::{InFlight, Pipe, Slot};
use super::{Event, Primary};
use crate::ipc::wire;
use crate::protocol::{self, Policy, RECORD, REJECTED};
use crate::sys;
use crate::sys::msg::Truncated;

/// A full worker that took nothing for this long loses its turn.
pub(super) const STALL: Duration = Duration::from_millis(20);

/// Whether a worker can take a connection now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Avail {
    /// Its window has room; how loaded it is (least-loaded).
    Room(Rank),
    /// Full, but taking: wait for it.
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

    // Hands queued connections to workers with room. `force` ignores the
    // window (final sweep).
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
        // Each candidate's pipe is looked at (FIONREAD) once per call.
        let mut settled: Vec<(u32, usize)> = Vec::new();
        let workers = &mut self.workers;
        while let Some(conn) = h.queue.front() {
            if h.workers.is_empty() {
                break;
            }
            let refused = |w: &u32| {
                conn.rejected_by.contains(w)
                    || workers.get(w).is_some_and(|s| s.refusing.contains(&hid))
            };
            if h.workers.iter().all(refused) {
                // Every worker said no: close it once, never ping-pong.
                h.queue.pop_front();
                continue;
            }
            let now = Instant::now();
            let room = |w: u32| {
                let pending = batch
                    .iter()
                    .find(|(id, _)| *id == w)
                    .map_or(0, |(_, v): &(u32, Vec<Conn>)| v.len());
                match workers.get_mut(&w) {
                    Some(s) if s.refusing.contains(&hid) => Avail::Stalled,
                    Some(s) if s.channel.is_some() && pending < wire::MAX_FDS => {
                        if !settled.iter().any(|(id, _)| *id == w) {
                            settled.push((w, s.settle(now)));
                        }
                        if force || s.in_flight.len() + pending < window {
                            Avail::Room(s.rank(pending, now, force))
                        } else if now.duration_since(s.progress) < STALL {
                            Avail::Busy
                        } else {
                            Avail::Stalled
                        }
                    }
                    _ => Avail::Stalled,
                }
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
        for (w, taken) in settled {
            if taken > 0 {
                self.count_served(w, taken as u64, 0, false);
            }
        }
        for (w, conns) in batch.drain(..) {
            self.hand_over(hid, w, conns);
        }
        self.batch = batch;
        if refill {
            self.set_polling(hid, true);
        }
    }

    // Writes each connection to the worker's pipe for `hid` and closes the
    // primary's copy. What cannot be written goes back to the front of the
    // queue: for later if the pipe is full, for another worker if it broke.
    pub(super) fn hand_over(&mut self, hid: u32, w: u32, conns: Vec<Conn>) {
        let window = self.settings.window;
        let now = Instant::now();
        let mut conns = conns.into_iter();
        let mut failed: Option<(Conn, bool)> = None;
        let target = self.workers.get_mut(&w).and_then(|s| {
            let i = s.pipes.iter().position(|p| p.hid == hid)?;
            Some((s, i))
        });
        match target {
            Some((slot, i)) => {
                for conn in conns.by_ref() {
                    let full = slot.in_flight.len() + 1 >= window;
                    let rec =
                        protocol::encode_record(conn.id, if full { protocol::FULL } else { 0 });
                    let res = sys::msg::send(
                        slot.pipes[i].ours.as_fd(),
                        &[IoSlice::new(&rec)],
                        &[conn.fd.as_fd()],
                        true,
                    );
                    if let Err(e) = res {
                        failed = Some((conn, e.kind() != io::ErrorKind::WouldBlock));
                        break;
                    }
                    if slot.in_flight.is_empty() {
                        slot.progress = now;
                    }
                    slot.in_flight.push_back(InFlight {
                        handle: hid,
                        id: conn.id,
                        rejected_by: conn.rejected_by,
                        sent: now,
                    });
                    // `conn.fd` closes here: the pipe holds it now.
                }
            }
            // No such worker, or no pipe for `hid`: as a broken pipe.
            None => failed = conns.next().map(|c| (c, true)),
        }
        let Some((first, broken)) = failed else {
            return;
        };
        let Some(h) = self.handles.get_mut(&hid) else {
            return;
        };
        let rest: Vec<Conn> = std::iter::once(first).chain(conns).collect();
        for c in rest.into_iter().rev() {
            h.queue.push_front(c);
        }
        if broken {
            // The worker shut its end: route around it.
            h.remove_worker(w);
        }
    }

    /// Reads back what is unread in worker `id`'s pipes (only `hid`'s, if
    /// given) and puts it at the front of its handles' queues, oldest
    /// first; `reject` marks each as refused by `id`. What was in flight on
    /// those pipes and is not there any more, the worker took. Returns the
    /// handles that got connections back.
    pub(super) fn take_back(&mut self, id: u32, only: Option<u32>, reject: bool) -> Vec<u32> {
        let Some(slot) = self.workers.get_mut(&id) else {
            return Vec::new();
        };
        let mut back: Vec<(u32, Conn)> = Vec::new();
        let mut lost = 0;
        for p in slot
            .pipes
            .iter()
            .filter(|p| only.map_or(true, |h| h == p.hid))
        {
            loop {
                let mut rec = [0u8; RECORD];
                let mut fds = Vec::new();
                match sys::msg::recv(p.theirs.as_fd(), &mut rec, &mut fds, true) {
                    Ok(0) => break,
                    Ok(n) => {
                        // A wake record, or what a torn read left: no fd.
                        let Some(fd) = fds.pop() else { continue };
                        let cid = protocol::decode_record(&rec).0;
                        let known = (n == RECORD)
                            .then(|| {
                                slot.in_flight
                                    .iter()
                                    .position(|f| f.handle == p.hid && f.id == cid)
                            })
                            .flatten()
                            .and_then(|i| slot.in_flight.remove(i));
                        let (cid, mut rejected_by) = match known {
                            Some(f) => (f.id, f.rejected_by),
                            None => {
                                // Every fd in a pipe is one the primary put
                                // there; only its id was torn.
                                let fresh = self.next_conn;
                                self.next_conn = self.next_conn.wrapping_add(1);
                                (fresh, Vec::new())
                            }
                        };
                        if reject {
                            rejected_by.push(id);
                        }
                        back.push((
                            p.hid,
                            Conn {
                                fd,
                                id: cid,
                                rejected_by,
                            },
                        ));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        if let Some(t) = e.get_ref().and_then(|i| i.downcast_ref::<Truncated>()) {
                            lost += t.closed.max(1);
                        }
                        break;
                    }
                }
            }
        }
        let before = slot.in_flight.len();
        slot.in_flight
            .retain(|f| !only.map_or(true, |h| h == f.handle));
        let taken = before - slot.in_flight.len();
        if taken > 0 {
            slot.progress = Instant::now();
            self.count_served(id, taken as u64, 0, false);
        }
        if lost > 0 {
            self.events.push_back(Event::Error {
                id,
                error: io::Error::new(
                    io::ErrorKind::Other,
                    format!(
                        "{lost} connections handed to worker {id} were lost taking them back: \
                     no free fd in the primary (EMFILE)"
                    ),
                ),
            });
        }
        let mut hids = Vec::new();
        for (hid, conn) in back.into_iter().rev() {
            if let Some(h) = self.handles.get_mut(&hid) {
                h.queue.push_front(conn);
                if !hids.contains(&hid) {
                    hids.push(hid);
                }
            }
        }
        hids
    }

    /// Writes a wake record to each of worker `id`'s pipes: one blocked
    /// reading its pipe looks at its channel.
    pub(super) fn wake_pipes(&mut self, id: u32) {
        if let Some(slot) = self.workers.get_mut(&id) {
            let rec = protocol::encode_record(0, protocol::WAKE);
            for p in slot.pipes.iter_mut().filter(|p| p.wakes == 0) {
                if sys::msg::send(p.ours.as_fd(), &[IoSlice::new(&rec)], &[], true).is_ok() {
                    p.wakes = 1;
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
        if ids.len() != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "connection ids in a reply: a worker takes a connection by reading its pipe",
            ));
        }
        if let Some(open) = load {
            slot.load.heard(open, 0, false);
        }
        if flags & REJECTED != 0 {
            if !slot.pipes.iter().any(|p| p.hid == hid) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("refusing connections of handle {hid}, which it has no pipe for"),
                ));
            }
            if !slot.refusing.contains(&hid) {
                slot.refusing.push(hid);
            }
            // What waits unread in its pipe goes to the others.
            self.take_back(id, Some(hid), true);
        } else {
            slot.refusing.retain(|&h| h != hid);
        }
        // A report, or a full window taken from: room to refill, for every
        // handle it listens on.
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

impl Slot {
    /// How many of `in_flight` are still unread in the pipes.
    pub(super) fn unread(&self) -> usize {
        self.pipes
            .iter()
            .map(|p| p.unread(self.in_flight.iter().filter(|f| f.handle == p.hid).count()))
            .sum()
    }

    /// Drops from `in_flight` what the worker read from its pipes since the
    /// primary last looked (oldest first: a pipe is read in order) and
    /// returns how many: one `FIONREAD` per pipe with something in flight.
    pub(super) fn settle(&mut self, now: Instant) -> usize {
        if self.in_flight.is_empty() {
            return 0;
        }
        let mut taken = 0;
        let mut newest: Option<Instant> = None;
        for p in &self.pipes {
            let sent = self.in_flight.iter().filter(|f| f.handle == p.hid).count();
            if sent == 0 {
                continue;
            }
            let mut gone = sent - p.unread(sent);
            taken += gone;
            self.in_flight.retain(|f| {
                if gone > 0 && f.handle == p.hid {
                    gone -= 1;
                    newest = newest.max(Some(f.sent));
                    false
                } else {
                    true
                }
            });
        }
        if let Some(sent) = newest {
            self.progress = now;
            self.load.took(taken, sent);
        }
        taken
    }
}

impl Pipe {
    /// How many of the `sent` connections in flight on this pipe are still
    /// unread: one `FIONREAD` (none when nothing was sent). Wake records come after every connection
    /// (none is written once a worker is asked to disconnect), so while any
    /// connection is unread, so are they.
    fn unread(&self, sent: usize) -> usize {
        if sent == 0 {
            return 0;
        }
        match sys::socket::unread(self.theirs.as_fd()) {
            Ok(n) => ((n + RECORD - 1) / RECORD)
                .saturating_sub(self.wakes)
                .min(sent),
            Err(_) => sent,
        }
    }
}
