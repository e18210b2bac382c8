//! The event loop: one `epoll_wait` over the signalfd, every worker
//! channel and every round-robin listener, and the frames workers send.

#![forbid(unsafe_code)]

use std::io;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use super::workers::State;
use super::{Event, Primary};
use crate::ipc::channel::{Frame, Recv};
use crate::ipc::wire::Kind;
use crate::readiness::Readiness;
use crate::sys::{epoll, signal};

pub(super) const TOKEN_SIGNAL: u64 = 0;
pub(super) const TOKEN_WORKER: u64 = 1 << 32;
pub(super) const TOKEN_HANDLE: u64 = 2 << 32;
pub(super) const TOKEN_USER: u64 = 1 << 62;

fn other(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::Other, msg)
}

impl Primary {
    /// Runs the loop until there is an event. `Ok(None)` once no worker is
    /// left and nothing is pending.
    pub fn next_event(&mut self) -> io::Result<Option<Event>> {
        self.next_event_timeout(None)
    }

    /// Like [`Primary::next_event`], but waits up to `timeout` even with no
    /// worker left (signals still arrive), and `Ok(None)` when it passes with
    /// nothing to report.
    pub fn next_event_timeout(&mut self, timeout: Option<Duration>) -> io::Result<Option<Event>> {
        let until = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(ev) = self.events.pop_front() {
                if let Event::Exit(id, ..) = ev {
                    self.workers.remove(&id);
                }
                return Ok(Some(ev));
            }
            if self.workers.is_empty() && until.is_none() {
                return Ok(None);
            }
            let now = Instant::now();
            if until.is_some_and(|u| now >= u) {
                return Ok(None);
            }
            let wait = [until, self.next_deadline()]
                .into_iter()
                .flatten()
                .min()
                .map(|d| d.saturating_duration_since(now));
            self.turn(wait)?;
        }
    }

    // One epoll_wait and everything it reports.
    pub(super) fn turn(&mut self, wait: Option<Duration>) -> io::Result<()> {
        let mut evs = std::mem::replace(&mut self.events_buf, epoll::Events::with_capacity(1));
        let res = self.epoll.wait(&mut evs, wait);
        if let Err(e) = res {
            self.events_buf = evs;
            return Err(e);
        }
        for (token, flags) in evs.iter() {
            match token & !0xffff_ffff {
                TOKEN_WORKER => self.on_worker(token as u32, flags),
                TOKEN_HANDLE => {
                    let hid = token as u32;
                    self.accept_ready(hid, false);
                    self.distribute(hid, false);
                }
                TOKEN_USER => {
                    let r = Readiness::from_epoll(flags);
                    self.events.push_back(Event::Ready(token & 0xffff_ffff, r));
                }
                _ => self.on_signals()?,
            }
        }
        self.events_buf = evs;
        self.on_timers();
        Ok(())
    }

    pub(super) fn on_signals(&mut self) -> io::Result<()> {
        while let Some(sig) = signal::read_signal(self.sigfd.as_fd())? {
            if sig == signal::SIGCHLD {
                self.reap();
            } else {
                self.events.push_back(Event::Signal(sig));
            }
        }
        // A SIGCHLD can merge with one read before the child was reapable.
        self.reap();
        Ok(())
    }

    pub(super) fn on_worker(&mut self, id: u32, flags: u32) {
        if flags & epoll::WRITABLE != 0 {
            self.flush_worker(id);
        }
        if flags & (epoll::READABLE | epoll::HUP | epoll::ERROR) != 0 {
            self.read_worker(id);
        }
    }

    pub(super) fn flush_worker(&mut self, id: u32) {
        let Some(slot) = self.workers.get_mut(&id) else {
            return;
        };
        let Some(ch) = slot.channel.as_mut() else {
            return;
        };
        match ch.flush() {
            Ok(true) => {
                slot.want_write = false;
                let _ = self
                    .epoll
                    .modify(ch.as_fd(), epoll::READABLE, TOKEN_WORKER | id as u64);
            }
            Ok(false) => {}
            Err(_) => self.close_channel(id),
        }
    }

    pub(super) fn read_worker(&mut self, id: u32) {
        loop {
            let Some(ch) = self.workers.get_mut(&id).and_then(|s| s.channel.as_mut()) else {
                return;
            };
            match ch.try_recv() {
                Ok(Recv::Frame(f)) => {
                    if let Err(e) = self.on_frame(id, f) {
                        self.protocol_error(id, e);
                        return;
                    }
                }
                Ok(Recv::WouldBlock) => return,
                Ok(Recv::Eof) => {
                    self.close_channel(id);
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    self.protocol_error(id, e);
                    return;
                }
                Err(_) => {
                    // ECONNRESET and friends: the worker is gone.
                    self.close_channel(id);
                    return;
                }
            }
        }
    }

    pub(super) fn on_frame(&mut self, id: u32, f: Frame) -> io::Result<()> {
        let slot = self.workers.get_mut(&id).ok_or_else(|| Self::gone(id))?;
        if slot.state == State::None {
            slot.state = State::Online;
            self.events.push_back(Event::Online(id));
        }
        if f.lost_fds > 0 && f.header.kind != Kind::User {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{:?} frame lost {} fds", f.header.kind, f.lost_fds),
            ));
        }
        match f.header.kind {
            Kind::Online => Ok(()),
            Kind::User => {
                if f.lost_fds > 0 {
                    self.events.push_back(Event::Error(
                        id,
                        other(format!(
                            "message from worker {id} lost {} fds on the way in (EMFILE in the primary)",
                            f.lost_fds
                        )),
                    ));
                }
                self.events.push_back(Event::Message(id, f.payload, f.fds));
                Ok(())
            }
            Kind::QueryServer => self.on_query(id, f.header.seq, &f.payload),
            Kind::Listening => {
                let hid = f.header.seq;
                let Some(addr) = self.handles.get(&hid).map(|h| h.address.clone()) else {
                    if hid < self.next_handle {
                        // Closed between our reply and this frame (a
                        // disconnect_all raced the worker's start): stale, fine.
                        return Ok(());
                    }
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("listening on unknown handle {hid}"),
                    ));
                };
                if let Some(s) = self.workers.get_mut(&id) {
                    if s.state == State::Online {
                        s.state = State::Listening;
                    }
                }
                self.events.push_back(Event::Listening(id, addr));
                Ok(())
            }
            Kind::ConnReply => self.on_conn_reply(id, f.header.seq, f.header.flags, &f.payload),
            Kind::Close => {
                let hid = f.header.seq;
                if let Some(s) = self.workers.get_mut(&id) {
                    s.handles.retain(|&h| h != hid);
                }
                self.leave_handle(id, hid);
                Ok(())
            }
            Kind::ExitedAfterDisconnect => {
                if let Some(s) = self.workers.get_mut(&id) {
                    s.exited_after_disconnect = true;
                }
                self.unroute(id);
                self.send_frame(id, Kind::Ack, 0, f.header.seq, &[], &[])
            }
            k => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a worker may not send {k:?} frames"),
            )),
        }
    }
}
