//! [`Policy::ReusePort`](crate::Policy::ReusePort): one `SO_REUSEPORT`
//! socket per worker slot, all bound to the handle's address. Each worker
//! accepts on its own slot's socket and the kernel spreads connections
//! among them, so the primary spends nothing per connection.
//!
//! The primary keeps every slot's socket (slot 0's is the handle's own
//! fd), so no queue is ever lost with a worker:
//! - **a worker dies**: its slot is vacant, its socket and queue kept quiet
//!   for [`VACANT_GRACE`]; the next worker to listen (its replacement)
//!   takes that very socket and serves the queue. Past the grace, if the
//!   handle still has workers, the primary serves the slot as retired;
//! - **a worker leaves** (disconnect, scale down, a closed listener): its
//!   slot is retired. The primary accepts on it and hands its connections
//!   to the handle's workers in round robin (NewConn frames, as the rr
//!   policy does), while the leaving worker drains what it can; the next
//!   worker to listen takes the slot back. Where `net.ipv4.tcp_migrate_req`
//!   is 1 (Linux 5.14) a retired slot is closed instead, after one sweep:
//!   the kernel moves what is left (accept queue and handshakes in
//!   progress) to another socket of the group at its last close. Without
//!   it, closing would reset those, so the slot stays, served through the
//!   primary, until a worker takes it.
//!
//! A socket of the group is only ever given to workers; a process of the
//! same uid could still join the group by binding the port with
//! `SO_REUSEPORT` itself, as with any reuseport socket.

#![forbid(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use super::event_loop::TOKEN_HANDLE;
use super::handles::Handle;
use super::round_robin::Conn;
use super::shared::{self, Address, BindOptions};
use super::Primary;
use crate::protocol::{Endpoint, Policy, Query, QueryFlags};
use crate::sys::{self, epoll};

/// How long a dead worker's slot waits for a replacement before the
/// primary serves its queue.
pub(super) const VACANT_GRACE: Duration = Duration::from_millis(250);

const MIGRATE_SYSCTL: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// The slots of one reuseport handle.
#[derive(Debug)]
pub(super) struct Group {
    /// Where every slot binds: the first socket's address, port resolved.
    endpoint: Endpoint,
    opts: BindOptions,
    slots: Vec<PortSlot>,
}

#[derive(Debug)]
struct PortSlot {
    /// `None` for slot 0, whose socket is the handle's `fd`.
    fd: Option<OwnedFd>,
    user: User,
    /// In the primary's epoll: the primary accepts on it.
    polled: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum User {
    /// This worker accepts on it.
    Worker(u32),
    /// Its worker died: quiet (the kernel queue waits) for a replacement
    /// until then.
    Vacant(Instant),
    /// No worker: the primary accepts on it.
    Retired,
}

/// True where the kernel moves a closed reuseport socket's queue to
/// another socket of its group (`net.ipv4.tcp_migrate_req` = 1).
fn migrates() -> bool {
    std::fs::read(MIGRATE_SYSCTL).is_ok_and(|v| v.first() == Some(&b'1'))
}

fn slot_fd<'a>(h: &'a Handle, s: &'a PortSlot) -> BorrowedFd<'a> {
    s.fd.as_ref().unwrap_or(&h.fd).as_fd()
}

impl Primary {
    /// The listening socket worker `id` accepts on for `hid` (a duplicate,
    /// for the query reply): shared, the handle's; reuseport, its slot's
    /// (see the module docs), made on the first query.
    pub(super) fn worker_socket(&mut self, hid: u32, id: u32, q: &Query) -> io::Result<OwnedFd> {
        let h = &self.handles[&hid];
        if h.policy != Policy::ReusePort {
            return sys::fd::dup(h.fd.as_fd());
        }
        if !self.reuseport.contains_key(&hid) {
            let Address::Tcp(addr) = h.address else {
                return sys::fd::dup(h.fd.as_fd());
            };
            let backlog = match q.backlog {
                0 => self.settings.backlog,
                n => n,
            };
            let group = Group {
                endpoint: Endpoint::Tcp(Some(addr.ip()), addr.port()),
                opts: BindOptions {
                    backlog: backlog.min(i32::MAX as u32) as i32,
                    ipv6_only: q.flags.contains(QueryFlags::IPV6_ONLY),
                    reuse_port: true,
                    defer_accept: q.flags.contains(QueryFlags::DEFER_ACCEPT),
                    ..BindOptions::default()
                },
                slots: vec![PortSlot {
                    fd: None,
                    user: User::Vacant(Instant::now()),
                    polled: false,
                }],
            };
            self.reuseport.insert(hid, group);
        }
        let g = self.reuseport.get_mut(&hid).expect("made above");
        let mine = g.slots.iter().position(|s| s.user == User::Worker(id));
        // A repeated query keeps its slot; a newcomer takes the slot that
        // waited longest for a replacement, then a retired one.
        let free = || {
            let vacant = g
                .slots
                .iter()
                .enumerate()
                .filter_map(|(i, s)| match s.user {
                    User::Vacant(at) => Some((at, i)),
                    _ => None,
                })
                .min()
                .map(|(_, i)| i);
            vacant.or_else(|| g.slots.iter().position(|s| s.user == User::Retired))
        };
        let i = match mine.or_else(free) {
            Some(i) => i,
            None => {
                let (fd, _, _) = shared::bind(&g.endpoint, None, &g.opts)?;
                g.slots.push(PortSlot {
                    fd: Some(fd),
                    user: User::Retired,
                    polled: false,
                });
                g.slots.len() - 1
            }
        };
        let dup = sys::fd::dup(slot_fd(h, &g.slots[i]))?;
        g.slots[i].user = User::Worker(id);
        self.unpoll_slot(hid, i);
        Ok(dup)
    }

    /// Worker `id` no longer accepts on its slot of `hid`: it died
    /// (`crashed`: the slot waits for a replacement) or left (the slot is
    /// retired: served by the primary, or closed where the kernel migrates).
    pub(super) fn reuseport_release(&mut self, hid: u32, id: u32, crashed: bool) {
        let Some(g) = self.reuseport.get_mut(&hid) else {
            return;
        };
        let Some(i) = g.slots.iter().position(|s| s.user == User::Worker(id)) else {
            return;
        };
        if crashed {
            g.slots[i].user = User::Vacant(Instant::now() + VACANT_GRACE);
            return;
        }
        g.slots[i].user = User::Retired;
        if migrates() {
            let Some(i) = self.out_of_slot_zero(hid, i) else {
                self.set_polling(hid, true);
                return;
            };
            // One sweep; the kernel moves the rest at the last close.
            self.accept_slot(hid, i, true);
            if let Some(s) = self.reuseport.get_mut(&hid).map(|g| g.slots.remove(i)) {
                self.forget_slot(s);
            }
            return;
        }
        self.set_polling(hid, true);
    }

    // Slot `i` is to close, but slot 0's socket is the handle's own fd:
    // that one trades places with slot 1 first. The new index of slot `i`;
    // `None` when it is the only slot.
    fn out_of_slot_zero(&mut self, hid: u32, i: usize) -> Option<usize> {
        if i > 0 {
            return Some(i);
        }
        let (Some(h), Some(g)) = (self.handles.get_mut(&hid), self.reuseport.get_mut(&hid)) else {
            return None;
        };
        let other = g
            .slots
            .get_mut(1)?
            .fd
            .take()
            .expect("slots past 0 own their fd");
        let old = std::mem::replace(&mut h.fd, other);
        g.slots.swap(0, 1);
        g.slots[1].fd = Some(old);
        h.polling = g.slots[0].polled;
        Some(1)
    }

    /// Reuseport: `accept_ready` on the slots no worker serves (retired;
    /// with `drain`, the final sweep, vacant ones too).
    pub(super) fn reuseport_accept(&mut self, hid: u32, drain: bool) {
        let Some(n) = self.reuseport.get(&hid).map(|g| g.slots.len()) else {
            return;
        };
        if self
            .handles
            .get(&hid)
            .is_some_and(|h| h.paused_until.is_some() && !drain)
        {
            return;
        }
        for i in 0..n {
            let user = self.reuseport[&hid].slots[i].user;
            if user == User::Retired || (drain && matches!(user, User::Vacant(_))) {
                self.accept_slot(hid, i, drain);
            }
        }
        let limit = self.settings.queue_limit.max(1);
        let Some(h) = self.handles.get(&hid) else {
            return;
        };
        let full = h.queue.len() >= limit || h.paused_until.is_some() || h.workers.is_empty();
        self.set_polling(hid, !full);
    }

    // Accepts on slot `i` until EAGAIN or the queue is full (`drain`
    // ignores the cap).
    fn accept_slot(&mut self, hid: u32, i: usize, drain: bool) {
        let limit = self.settings.queue_limit.max(1);
        let (Some(h), Some(g)) = (self.handles.get_mut(&hid), self.reuseport.get(&hid)) else {
            return;
        };
        let fd = g.slots[i].fd.as_ref().unwrap_or(&h.fd);
        while drain || h.queue.len() < limit {
            match sys::socket::accept(fd.as_fd(), false) {
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
                    // ENFILE, EMFILE, ENOBUFS, ENOMEM: pause, as rr does.
                    h.paused_until = Some(Instant::now() + Duration::from_millis(100));
                    break;
                }
                Err(_) => break,
            }
        }
    }

    /// Reuseport: `set_polling` for the slots the primary serves.
    pub(super) fn reuseport_set_polling(&mut self, hid: u32, on: bool) {
        let Some(n) = self.reuseport.get(&hid).map(|g| g.slots.len()) else {
            return;
        };
        for i in 0..n {
            let s = &self.reuseport[&hid].slots[i];
            if on && s.user == User::Retired && !s.polled {
                let h = &self.handles[&hid];
                let token = TOKEN_HANDLE | u64::from(hid);
                if self
                    .epoll
                    .add(slot_fd(h, s), epoll::READABLE, token)
                    .is_ok()
                {
                    self.mark_polled(hid, i, true);
                }
            } else if !on && s.polled {
                self.unpoll_slot(hid, i);
            }
        }
    }

    fn unpoll_slot(&mut self, hid: u32, i: usize) {
        let (Some(h), Some(g)) = (self.handles.get(&hid), self.reuseport.get(&hid)) else {
            return;
        };
        if g.slots[i].polled {
            let _ = self.epoll.delete(slot_fd(h, &g.slots[i]));
            self.mark_polled(hid, i, false);
        }
    }

    // Slot 0's socket is the handle's fd: `Handle::polling` says the same,
    // for `close_handle`.
    fn mark_polled(&mut self, hid: u32, i: usize, on: bool) {
        if let Some(g) = self.reuseport.get_mut(&hid) {
            g.slots[i].polled = on;
        }
        if i == 0 {
            if let Some(h) = self.handles.get_mut(&hid) {
                h.polling = on;
            }
        }
    }

    // A slot taken out of its group: out of the epoll, then closed (the
    // epoll would keep a socket a worker still holds).
    fn forget_slot(&mut self, s: PortSlot) {
        if let (true, Some(fd)) = (s.polled, &s.fd) {
            let _ = self.epoll.delete(fd.as_fd());
        }
    }

    /// `close_handle`: the slots go with the handle (slot 0's socket is
    /// the handle's, removed from the epoll there).
    pub(super) fn reuseport_close(&mut self, hid: u32) {
        let Some(g) = self.reuseport.remove(&hid) else {
            return;
        };
        for s in g.slots.into_iter().skip(1) {
            self.forget_slot(s);
        }
    }

    /// When the first vacant slot of a handle that has workers is due to
    /// be served by the primary.
    pub(super) fn reuseport_deadline(&self) -> Option<Instant> {
        self.reuseport
            .iter()
            .filter(|(hid, _)| self.handles.get(hid).is_some_and(|h| !h.workers.is_empty()))
            .flat_map(|(_, g)| g.slots.iter())
            .filter_map(|s| match s.user {
                User::Vacant(at) => Some(at),
                _ => None,
            })
            .min()
    }

    /// Vacant slots past their grace, in handles that have workers, are
    /// retired: the primary serves their queues.
    pub(super) fn reuseport_timers(&mut self, now: Instant) {
        let due: Vec<(u32, usize)> = self
            .reuseport
            .iter()
            .filter(|(hid, _)| self.handles.get(hid).is_some_and(|h| !h.workers.is_empty()))
            .flat_map(|(&hid, g)| {
                g.slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| matches!(s.user, User::Vacant(at) if at <= now))
                    .map(move |(i, _)| (hid, i))
            })
            .collect();
        for (hid, i) in &due {
            if let Some(g) = self.reuseport.get_mut(hid) {
                g.slots[*i].user = User::Retired;
            }
        }
        for (hid, _) in due {
            self.set_polling(hid, true);
            self.reuseport_accept(hid, false);
            self.distribute(hid, false);
        }
    }
}
