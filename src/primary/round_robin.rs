//! A listening handle and its queue (≈ Node's round_robin_handle.js).
//!
//! The primary accepts into `queue`, then hands connections to the handle's
//! workers in turn. A connection remembers who rejected it, so it is offered
//! to each worker at most once and closed when all have said no: it never
//! ping-pongs.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Instant;

use super::shared::Address;
use crate::protocol::Policy;

/// Whether a worker can take a connection now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Avail {
    /// Its window has room.
    Room,
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

/// One listening socket, shared by every worker whose key matches.
#[derive(Debug)]
pub(crate) struct Handle {
    pub key: String,
    pub fd: OwnedFd,
    pub address: Address,
    pub policy: Policy,
    pub unix_path: Option<PathBuf>,
    /// Workers routed to, in the order they joined.
    pub workers: Vec<u32>,
    pub cursor: usize,
    pub queue: VecDeque<Conn>,
    /// Registered for readability in epoll.
    pub polling: bool,
    /// After `EMFILE`, accept again no sooner than this.
    pub paused_until: Option<Instant>,
    /// Its last worker died unexpectedly: kept open (not accepting) until
    /// this time for a replacement to listen on the same socket.
    pub orphaned_until: Option<Instant>,
}

impl Handle {
    pub fn add_worker(&mut self, id: u32) {
        if !self.workers.contains(&id) {
            self.workers.push(id);
        }
    }

    pub fn remove_worker(&mut self, id: u32) -> bool {
        let before = self.workers.len();
        if let Some(pos) = self.workers.iter().position(|&w| w == id) {
            self.workers.remove(pos);
            if self.cursor > pos {
                self.cursor -= 1;
            }
        }
        before != self.workers.len()
    }

    /// The worker whose turn it is, if it can take `conn` now. Turns are
    /// strict, so counts stay even: a worker that is merely busy is waited
    /// for, and only one that is stalled (full and making no progress) or
    /// has rejected `conn` is skipped.
    pub fn pick(&mut self, conn: &Conn, mut avail: impl FnMut(u32) -> Avail) -> Option<u32> {
        let n = self.workers.len();
        for step in 0..n {
            let i = (self.cursor + step) % n;
            let w = self.workers[i];
            if conn.rejected_by.contains(&w) {
                continue;
            }
            match avail(w) {
                Avail::Room => {
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
