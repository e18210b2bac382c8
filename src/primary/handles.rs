//! Query-server and the listening handles: a worker asks for an address,
//! the primary binds it once per key and routes the worker to it
//! (≈ the `queryServer` half of Node's primary.js).

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::Instant;

use super::event_loop::TOKEN_HANDLE;
use super::round_robin::Conn;
use super::shared::{self, Address};
use super::Primary;
use crate::ipc::wire::Kind;
use crate::protocol::{self, Policy, Query};
use crate::sys::{self, epoll};

/// One listening socket, shared by every worker whose key matches.
#[derive(Debug)]
pub(super) struct Handle {
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
}

impl Primary {
    pub(super) fn on_query(&mut self, id: u32, seq: u32, payload: &[u8]) -> io::Result<()> {
        let q = Query::decode(payload)?;
        let key = format!("{}:{}", q.endpoint.key(), q.index);
        let hid = match self.keys.get(&key) {
            Some(&hid) => hid,
            None => {
                let backlog = if q.backlog == 0 {
                    self.settings.backlog
                } else {
                    q.backlog
                };
                let backlog = backlog.min(i32::MAX as u32) as i32;
                match shared::bind(&q.endpoint, backlog) {
                    Ok((fd, address)) => self.add_handle(key, fd, address)?,
                    Err(e) => {
                        let body = protocol::encode_reply_err(shared::errno_of(&e), &e);
                        return self.send_frame(
                            id,
                            Kind::QueryReply,
                            protocol::ERROR,
                            seq,
                            &body,
                            &[],
                        );
                    }
                }
            }
        };
        let h = self
            .handles
            .get_mut(&hid)
            .expect("handle just found or made");
        h.add_worker(id);
        h.orphaned_until = None;
        let body = protocol::encode_reply_ok(hid, h.policy, &h.address.to_string());
        let policy = h.policy;
        if let Some(s) = self.workers.get_mut(&id) {
            if !s.handles.contains(&hid) {
                s.handles.push(hid);
            }
        }
        match policy {
            Policy::Shared => {
                let dup = sys::fd::dup(self.handles[&hid].fd.as_fd())?;
                self.send_frame(id, Kind::QueryReply, 0, seq, &body, &[dup.as_fd()])
            }
            Policy::RoundRobin => {
                self.send_frame(id, Kind::QueryReply, 0, seq, &body, &[])?;
                self.distribute(hid, false);
                Ok(())
            }
        }
    }

    pub(super) fn add_handle(
        &mut self,
        key: String,
        fd: OwnedFd,
        address: Address,
    ) -> io::Result<u32> {
        let hid = self.next_handle;
        let policy = self.settings.policy;
        let polling = policy == Policy::RoundRobin;
        if polling {
            self.epoll
                .add(fd.as_fd(), epoll::READABLE, TOKEN_HANDLE | hid as u64)?;
        }
        self.next_handle += 1;
        let unix_path = match &address {
            Address::Unix(p) => Some(p.clone()),
            Address::Tcp(_) => None,
        };
        self.keys.insert(key.clone(), hid);
        self.handles.insert(
            hid,
            Handle {
                key,
                fd,
                address,
                policy,
                unix_path,
                workers: Vec::new(),
                cursor: 0,
                queue: VecDeque::new(),
                polling,
                paused_until: None,
                orphaned_until: None,
            },
        );
        Ok(hid)
    }

    // Stops routing `hid` to worker `id`; the last worker out closes it
    // (as Node does), otherwise its queue goes to the others.
    pub(super) fn leave_handle(&mut self, id: u32, hid: u32) {
        let Some(h) = self.handles.get_mut(&hid) else {
            return;
        };
        h.remove_worker(id);
        if h.workers.is_empty() {
            self.close_handle(hid);
        } else {
            self.distribute(hid, false);
        }
    }

    // A crash: like `leave_handle`, but the last worker out leaves the
    // socket open, quiet, for its replacement.
    pub(super) fn orphan_or_leave(&mut self, id: u32, hid: u32) {
        let linger = self.settings.orphan_linger;
        let Some(h) = self.handles.get_mut(&hid) else {
            return;
        };
        h.remove_worker(id);
        if !h.workers.is_empty() {
            self.distribute(hid, false);
        } else if linger.is_zero() {
            self.close_handle(hid);
        } else {
            h.orphaned_until = Some(Instant::now() + linger);
            self.set_polling(hid, false);
        }
    }

    pub(super) fn close_handle(&mut self, hid: u32) {
        let Some(h) = self.handles.remove(&hid) else {
            return;
        };
        self.keys.remove(&h.key);
        if h.polling {
            let _ = self.epoll.delete(h.fd.as_fd());
        }
        for w in &h.workers {
            if let Some(s) = self.workers.get_mut(w) {
                s.handles.retain(|&x| x != hid);
            }
        }
        if let Some(p) = &h.unix_path {
            let _ = std::fs::remove_file(p);
        }
        // Queued connections close with `h` (Node closes them too).
    }

    pub(super) fn set_polling(&mut self, hid: u32, on: bool) {
        let Some(h) = self.handles.get_mut(&hid) else {
            return;
        };
        if h.polling == on || h.policy != Policy::RoundRobin {
            return;
        }
        let res = if on {
            self.epoll
                .add(h.fd.as_fd(), epoll::READABLE, TOKEN_HANDLE | hid as u64)
        } else {
            self.epoll.delete(h.fd.as_fd())
        };
        if res.is_ok() {
            h.polling = on;
        }
    }
}
