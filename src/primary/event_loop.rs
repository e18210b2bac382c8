//! The event loop: one `epoll_wait` over the signalfd, every worker
//! channel, every worker's pidfd and every round-robin listener, and the
//! frames workers send.

#![forbid(unsafe_code)]

use std::io;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use super::workers::State;
use super::{Event, Primary};
use crate::ipc::channel::{Frame, Recv};
use crate::ipc::wire::{Kind, HEADER_LEN};
use crate::protocol::REPLY_FLAGS;
use crate::readiness::Readiness;
use crate::signal::Signal;
use crate::sys::{epoll, signal};

pub(super) const TOKEN_SIGNAL: u64 = 0;
pub(super) const TOKEN_WORKER: u64 = 1 << 32;
pub(super) const TOKEN_HANDLE: u64 = 2 << 32;
pub(super) const TOKEN_PIDFD: u64 = 3 << 32;
pub(super) const TOKEN_UPGRADE: u64 = 4 << 32;
pub(super) const TOKEN_NOTIFY: u64 = 5 << 32;
pub(super) const TOKEN_USER: u64 = 1 << 62;

fn other(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::Other, msg)
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// How much of one worker's channel one read takes, so that a flooding
/// worker cannot hold the loop (or fill the event queue) while signals,
/// accepts and the other workers wait.
#[derive(Debug, Clone, Copy)]
pub(super) struct Budget {
    frames: usize,
    bytes: usize,
    fds: usize,
    /// Trust a short read to mean empty (see `Channel::try_recv_lazy`):
    /// right in a turn woken by epoll, wrong for what an exited worker left.
    lazy: bool,
}

impl Budget {
    /// One turn of the loop. The rest is read on the next turn.
    pub(super) const TURN: Budget = Budget {
        frames: 64,
        bytes: 256 * 1024,
        fds: 256,
        lazy: true,
    };
    /// What a worker that just exited left in its channel: more than an
    /// honest one can have queued (the socket buffer), less than what a
    /// child of it holding the channel could write forever.
    pub(super) const AT_EXIT: Budget = Budget {
        frames: 8192,
        bytes: 8 * 1024 * 1024,
        fds: 2048,
        lazy: false,
    };
}

impl Primary {
    /// Runs the loop until there is an event. `Ok(None)` once no worker is
    /// left and nothing is pending. Every worker's events come in order:
    /// `Fork`, `Online`, `Listening`..., `Disconnect`, then `Exit` last.
    ///
    /// ```no_run
    /// use syncluster::{primary::Event, Role, Signal};
    /// use std::time::Duration;
    ///
    /// # fn main() -> std::io::Result<()> {
    /// if let Role::Primary(mut primary) = syncluster::role()? {
    ///     primary.fork()?;
    ///     while let Some(ev) = primary.next_event()? {
    ///         match ev {
    ///             Event::Message { id, bytes, fds } => {
    ///                 println!("worker {id}: {} bytes, {} fds", bytes.len(), fds.len());
    ///             }
    ///             Event::Signal(Signal::TERM) => {
    ///                 primary.disconnect_all(Some(Duration::from_secs(30)))?;
    ///             }
    ///             Event::Exit { id, status, .. } => println!("worker {id}: {status}"),
    ///             _ => {}
    ///         }
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
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
                if let Event::Exit { id, .. } = ev {
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
            // A worker read up to its budget: look at everything else, then
            // read it again, without sleeping.
            let wait = if self.read_again.is_empty() {
                [until, self.next_deadline()]
                    .into_iter()
                    .flatten()
                    .min()
                    .map(|d| d.saturating_duration_since(now))
            } else {
                Some(Duration::ZERO)
            };
            self.turn(wait)?;
        }
    }

    /// The non-blocking step for a primary driven from another loop
    /// (libuv, libevent, a C service's epoll): processes whatever is ready
    /// now and returns the next event, or `Ok(None)` when nothing is left.
    /// Call it until `None` whenever [`Primary::as_fd`](AsFd::as_fd) is
    /// readable or [`Primary::poll_timeout`] has passed.
    ///
    /// ```no_run
    /// # fn main() -> std::io::Result<()> {
    /// # let mut primary = syncluster::Primary::new(Default::default())?;
    /// use std::os::fd::AsRawFd;
    /// // Register `primary.as_raw_fd()` for readability in your loop, with a
    /// // timer of `primary.poll_timeout()`; when either fires:
    /// while let Some(event) = primary.try_next_event()? {
    ///     println!("{event:?}");
    /// }
    /// # let _ = primary.as_raw_fd();
    /// # Ok(())
    /// # }
    /// ```
    pub fn try_next_event(&mut self) -> io::Result<Option<Event>> {
        loop {
            if let Some(ev) = self.events.pop_front() {
                if let Event::Exit { id, .. } = ev {
                    self.workers.remove(&id);
                }
                return Ok(Some(ev));
            }
            let again = !self.read_again.is_empty();
            self.turn(Some(Duration::ZERO))?;
            if self.events.is_empty() && !again {
                return Ok(None);
            }
        }
    }

    /// How long a host loop may sleep before calling
    /// [`Primary::try_next_event`] even if the fd stays quiet: the nearest
    /// deadline (a kill after a disconnect timeout, an accept pause, a
    /// stalled turn...). `None`: no deadline, wait for the fd alone.
    pub fn poll_timeout(&self) -> Option<Duration> {
        if !self.events.is_empty() || !self.read_again.is_empty() {
            return Some(Duration::ZERO);
        }
        self.next_deadline()
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    // One epoll_wait and everything it reports.
    pub(super) fn turn(&mut self, wait: Option<Duration>) -> io::Result<()> {
        let mut evs = std::mem::replace(&mut self.events_buf, epoll::Events::with_capacity(1));
        let res = self.epoll.wait(&mut evs, wait);
        if let Err(e) = res {
            self.events_buf = evs;
            return Err(e);
        }
        let mut again = std::mem::take(&mut self.read_again);
        for (token, flags) in evs.iter() {
            match token & !0xffff_ffff {
                TOKEN_WORKER => {
                    let id = token as u32;
                    if flags & (epoll::READABLE | epoll::HUP | epoll::ERROR) != 0 {
                        again.retain(|&w| w != id);
                    }
                    self.on_worker(id, flags);
                }
                TOKEN_PIDFD => self.reap_worker(token as u32),
                TOKEN_NOTIFY => self.on_notify(token as u32),
                // Looked at after the loop, as every turn.
                TOKEN_UPGRADE => {}
                TOKEN_HANDLE => {
                    let hid = token as u32;
                    self.accept_ready(hid, false);
                    self.distribute(hid, false);
                }
                TOKEN_USER => {
                    let r = Readiness::from_epoll(flags);
                    self.events.push_back(Event::Ready {
                        token: token & 0xffff_ffff,
                        readiness: r,
                    });
                }
                _ => self.on_signals()?,
            }
        }
        self.events_buf = evs;
        // Frames already in a channel's buffer make no epoll event.
        for id in again {
            self.read_worker(id, Budget::TURN);
        }
        self.on_timers();
        self.upgrade_turn();
        Ok(())
    }

    pub(super) fn on_signals(&mut self) -> io::Result<()> {
        while let Some(sig) = signal::read_signal(self.sigfd.as_fd())? {
            if sig == signal::SIGCHLD {
                self.reap();
            } else {
                // Only the signals in SIGNALS arrive here: all valid.
                if let Ok(sig) = Signal::from_raw(sig) {
                    self.events.push_back(Event::Signal(sig));
                }
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
            self.read_worker(id, Budget::TURN);
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
            Err(_) => self.drop_channel(id),
        }
    }

    // Reads frames until the channel has none or `budget` is spent; then
    // the worker is read again next turn.
    pub(super) fn read_worker(&mut self, id: u32, budget: Budget) {
        let (mut frames, mut bytes, mut fds) = (0, 0, 0);
        loop {
            let Some(ch) = self.workers.get_mut(&id).and_then(|s| s.channel.as_mut()) else {
                return;
            };
            if frames >= budget.frames || bytes >= budget.bytes || fds >= budget.fds {
                if !self.read_again.contains(&id) {
                    self.read_again.push(id);
                }
                return;
            }
            let res = if budget.lazy {
                ch.try_recv_lazy()
            } else {
                ch.try_recv()
            };
            match res {
                Ok(Recv::Frame(f)) => {
                    frames += 1;
                    bytes += HEADER_LEN + f.payload.len();
                    fds += f.fds.len() + f.lost_fds;
                    if let Err(e) = self.on_frame(id, f) {
                        self.protocol_error(id, e);
                        return;
                    }
                }
                Ok(Recv::WouldBlock) => return,
                Ok(Recv::Eof) => {
                    self.drop_channel(id);
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    self.protocol_error(id, e);
                    return;
                }
                Err(_) => {
                    // ECONNRESET and friends: the worker is gone.
                    self.drop_channel(id);
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
        let kind = f.header.kind;
        if kind != Kind::User && (f.lost_fds > 0 || !f.fds.is_empty()) {
            // Its fds close with `f`.
            return Err(invalid(format!(
                "{kind:?} frame came with {} fds; only user messages carry fds",
                f.fds.len() + f.lost_fds
            )));
        }
        let bare = || {
            if f.payload.is_empty() {
                Ok(())
            } else {
                Err(invalid(format!(
                    "{kind:?} frame has a {}-byte payload; it has none",
                    f.payload.len()
                )))
            }
        };
        let hid = f.header.seq;
        match kind {
            // A repeat is harmless.
            Kind::Online => bare(),
            Kind::User => {
                if f.lost_fds > 0 {
                    self.events.push_back(Event::Error {
                        id,
                        error: other(format!(
                            "message from worker {id} lost {} fds on the way in (EMFILE in the primary)",
                            f.lost_fds
                        )),
                    });
                }
                self.events.push_back(Event::Message {
                    id,
                    bytes: f.payload,
                    fds: f.fds,
                });
                Ok(())
            }
            Kind::QueryServer => self.on_query(id, f.header.seq, &f.payload),
            Kind::Listening => {
                bare()?;
                let grant = slot.grants.iter_mut().find(|g| g.hid == hid);
                match grant {
                    None => {
                        return Err(invalid(format!(
                            "listening on handle {hid}, which it was not given"
                        )))
                    }
                    Some(g) if !g.listening_owed => {
                        return Err(invalid(format!(
                            "listening on handle {hid} again, with no query answered since"
                        )))
                    }
                    Some(g) => g.listening_owed = false,
                }
                // Closed between our reply and this frame (a disconnect_all
                // raced the worker's start): stale, fine.
                let Some(addr) = self.handles.get(&hid).map(|h| h.address.clone()) else {
                    return Ok(());
                };
                if slot.state == State::Online {
                    slot.state = State::Listening;
                }
                self.events
                    .push_back(Event::Listening { id, address: addr });
                Ok(())
            }
            Kind::ConnReply => {
                if f.header.flags & !REPLY_FLAGS != 0 {
                    return Err(invalid(format!(
                        "connection reply with unknown flags {:#x}",
                        f.header.flags
                    )));
                }
                self.on_conn_reply(id, hid, f.header.flags, &f.payload)
            }
            Kind::Close => {
                bare()?;
                let Some(pos) = slot.grants.iter().position(|g| g.hid == hid) else {
                    return Err(invalid(format!(
                        "closing handle {hid}, which it was not given"
                    )));
                };
                slot.grants.remove(pos);
                let routed = slot.handles.contains(&hid);
                slot.handles.retain(|&h| h != hid);
                // What it never read from that pipe goes to the others.
                let requeued = self.take_back(id, Some(hid), false);
                if let Some(slot) = self.workers.get_mut(&id) {
                    slot.pipes.retain(|p| p.hid != hid);
                }
                if routed {
                    // Routed to it still (not unrouted or closed since): leave.
                    self.leave_handle(id, hid);
                } else if !requeued.is_empty() {
                    self.distribute(hid, false);
                }
                Ok(())
            }
            Kind::ExitedAfterDisconnect => {
                // A repeat (disconnect() called twice) is answered again.
                bare()?;
                slot.exited_after_disconnect = true;
                self.unroute(id);
                self.send_frame(id, Kind::Ack, 0, f.header.seq, &[], &[])
            }
            Kind::Count => {
                bare()?;
                self.on_count(id, f.header.flags, f.header.seq)
            }
            k => Err(invalid(format!("a worker may not send {k:?} frames"))),
        }
    }
}
