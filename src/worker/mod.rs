//! The worker side (≈ Node's child.js): the handshake, `listen()` through
//! the primary, messages, and a single-threaded event loop.
//!
//! Everything hangs off one `Rc<RefCell<..>>` shared by the [`Worker`] and
//! its [`Listener`]s: no threads, so a listener's `accept()` can read the
//! channel and queue whatever else arrives (messages, connections for other
//! listeners, the disconnect request) for [`Worker::next_event`].

#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::decision::{Claim, Decided};
use crate::env::{ENV_CHANNEL_FD, ENV_WORKER_ID, ENV_WORKER_PID};
use crate::ipc::channel::{Channel, Frame, Recv};
use crate::ipc::wire::Kind;
use crate::protocol::{self, Endpoint, Policy, Query, REJECTED};
pub use crate::readiness::{Interest, Readiness};
use crate::sys::{self, epoll, poll};

const TOKEN_CHANNEL: u64 = 1 << 63;
const TOKEN_LISTENER: u64 = (1 << 63) | (1 << 62);

/// How long a shared listener rests after `accept` failed for want of
/// resources (`EMFILE`...): it stays readable, so retrying at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A connection from a TCP or a Unix listener.
#[derive(Debug)]
pub enum Stream {
    /// From a TCP listener.
    Tcp(TcpStream),
    /// From a Unix socket listener.
    Unix(UnixStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

impl Stream {
    /// Sets `O_NONBLOCK`, for use with [`Worker::register`].
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(on),
            Stream::Unix(s) => s.set_nonblocking(on),
        }
    }

    /// Sets a read timeout (`SO_RCVTIMEO`).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }
}

/// What [`Worker::next_event`] reports.
#[derive(Debug)]
pub enum Event {
    /// A new connection on the listener with this [`Listener::id`].
    Connection(usize, Stream),
    /// A user message from the primary, with any fds.
    Message(Vec<u8>, Vec<OwnedFd>),
    /// The primary asked this worker to stop (or died): stop taking work,
    /// finish what you hold, then return from `main`.
    Disconnect,
    /// A registered fd is ready; the token is the one given to `register`.
    Ready(u64, Readiness),
}

#[derive(Debug)]
struct ListenerState {
    handle: u32,
    policy: Policy,
    address: String,
    unix: bool,
    key: String,
    index: u32,
    shared: Option<OwnedFd>,
    // Set while a shared listener is out of epoll after a failed accept.
    resume_at: Option<Instant>,
    queue: VecDeque<(u32, OwnedFd)>,
}

#[derive(Debug)]
struct Inner {
    id: u32,
    // The primary's pid, from SO_PEERCRED at adoption.
    primary_pid: i32,
    channel: Channel,
    epoll: epoll::Epoll,
    events_buf: epoll::Events,
    listeners: Vec<Option<ListenerState>>,
    indexes: HashMap<String, Vec<u32>>,
    pending: VecDeque<Event>,
    disconnect_requested: bool,
    disconnect_reported: bool,
    primary_gone: bool,
    acked: Vec<u32>,
    next_req: u32,
    // Listeners whose queue has connections, round robin among them.
    ready_cursor: usize,
}

/// The worker process's handle on the cluster. See the module docs.
#[derive(Debug)]
pub struct Worker {
    inner: Rc<RefCell<Inner>>,
}

/// A listener obtained through the primary. Dropping it closes it: the
/// primary stops routing to this worker for its key, and connections queued
/// here go back to be served by another worker.
#[derive(Debug)]
pub struct Listener {
    inner: Rc<RefCell<Inner>>,
    idx: usize,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn disconnecting() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "worker is disconnecting: no more connections",
    )
}

fn bad_env(var: &str, value: &str, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{var}={value:?}: {why}"),
    )
}

impl Worker {
    /// Reads `SYNCLUSTER_WORKER_ID` and `SYNCLUSTER_CHANNEL_FD`, adopts the
    /// channel and says Online. `Ok(None)` when neither is set, or when
    /// `SYNCLUSTER_WORKER_PID` is set to a pid that is not ours (the
    /// variables were inherited: this is not a worker). The environment is
    /// left as it is. This is [`crate::role`] without the primary side, and
    /// shares its once-per-process rule: after a worker or primary was made,
    /// it is an `AlreadyExists` error.
    pub fn from_env() -> io::Result<Option<Worker>> {
        let mut claim = Claim::take()?;
        Worker::from_env_claimed(&mut claim)
    }

    /// [`Worker::from_env`] under a claim already taken: settles it once
    /// the channel is adopted, successfully or not.
    pub(crate) fn from_env_claimed(claim: &mut Claim) -> io::Result<Option<Worker>> {
        if let Some(v) = std::env::var_os(ENV_WORKER_PID) {
            let s = v.to_string_lossy();
            let pid = s
                .parse::<i32>()
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| bad_env(ENV_WORKER_PID, &s, "not a pid"))?;
            if pid != sys::process::getpid() {
                return Ok(None);
            }
        }
        let id_var = std::env::var_os(ENV_WORKER_ID);
        let fd_var = std::env::var_os(ENV_CHANNEL_FD);
        let (id_raw, fd_raw) = match (id_var, fd_var) {
            (None, None) => return Ok(None),
            (Some(_), None) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{ENV_WORKER_ID} is set but {ENV_CHANNEL_FD} is not"),
                ))
            }
            (None, Some(_)) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{ENV_CHANNEL_FD} is set but {ENV_WORKER_ID} is not"),
                ))
            }
            (Some(a), Some(b)) => (a, b),
        };
        let id_s = id_raw.to_string_lossy().into_owned();
        let fd_s = fd_raw.to_string_lossy().into_owned();
        let id = id_s
            .parse::<u32>()
            .ok()
            .filter(|&i| i > 0)
            .ok_or_else(|| bad_env(ENV_WORKER_ID, &id_s, "not a worker id (1, 2, 3, ...)"))?;
        let raw = fd_s
            .parse::<i32>()
            .ok()
            .filter(|&f| f > 2)
            .ok_or_else(|| bad_env(ENV_CHANNEL_FD, &fd_s, "not an fd number above 2"))?;
        let (fd, primary_pid) = sys::inherit::adopt_channel(raw)
            .map_err(|e| bad_env(ENV_CHANNEL_FD, &fd_s, &e.to_string()))?;
        // The fd is ours now: whatever happens next, no later call may
        // adopt that number again.
        match Worker::with_channel(id, fd, primary_pid) {
            Ok(w) => {
                claim.settle(Decided::Worker(id));
                Ok(Some(w))
            }
            Err(e) => {
                claim.settle(Decided::FailedWorker(id));
                Err(e)
            }
        }
    }

    fn with_channel(id: u32, fd: OwnedFd, primary_pid: i32) -> io::Result<Worker> {
        let mut channel = Channel::new(fd, false);
        channel.send(Kind::Online, 0, 0, &[], &[])?;
        let epoll = epoll::Epoll::new()?;
        epoll.add(channel.as_fd(), epoll::READABLE, TOKEN_CHANNEL)?;
        Ok(Worker {
            inner: Rc::new(RefCell::new(Inner {
                id,
                primary_pid,
                channel,
                epoll,
                events_buf: epoll::Events::with_capacity(64),
                listeners: Vec::new(),
                indexes: HashMap::new(),
                pending: VecDeque::new(),
                disconnect_requested: false,
                disconnect_reported: false,
                primary_gone: false,
                acked: Vec::new(),
                next_req: 1,
                ready_cursor: 0,
            })),
        })
    }

    /// This worker's id (1, 2, 3, ...).
    pub fn id(&self) -> u32 {
        self.inner.borrow().id
    }

    /// The primary's pid, as the channel's `SO_PEERCRED` gave it when the
    /// worker adopted it (in the worker's pid namespace: 1 when the primary
    /// is a container's init).
    pub fn primary_pid(&self) -> i32 {
        self.inner.borrow().primary_pid
    }

    /// True while the primary is still this process's parent. Once it died,
    /// the worker was handed to pid 1 or to a subreaper; comparing the
    /// parent with 1 would be wrong both when the primary is pid 1 and when
    /// a subreaper takes the orphans.
    pub fn primary_is_parent(&self) -> bool {
        sys::process::getppid() == self.inner.borrow().primary_pid
    }

    /// A duplicate of the channel fd, for fault-injection tests that must
    /// write raw bytes to the primary. Not for normal use.
    #[doc(hidden)]
    pub fn raw_channel_fd(&self) -> io::Result<OwnedFd> {
        sys::fd::dup(self.inner.borrow().channel.as_fd())
    }

    /// Leaves SIGINT and SIGTERM to the primary: this worker ignores them,
    /// so a Ctrl-C to the process group (or a service manager signalling
    /// every process) lets the primary run a graceful stop instead of
    /// killing workers mid-request. The primary's death then kills the
    /// worker with SIGKILL (`PR_SET_PDEATHSIG`), as well as closing its channel.
    pub fn leave_stop_signals_to_primary(&self) -> io::Result<()> {
        sys::signal::set_ignored(sys::signal::SIGINT, true)?;
        sys::signal::set_ignored(sys::signal::SIGTERM, true)?;
        sys::process::set_pdeathsig(sys::signal::SIGKILL)?;
        if !self.primary_is_parent() {
            // The primary died before the new death signal was armed.
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!(
                    "the primary (pid {}) is gone: our parent is now pid {}",
                    self.primary_pid(),
                    sys::process::getppid()
                ),
            ));
        }
        Ok(())
    }

    /// True once the primary asked for a disconnect, or died.
    pub fn is_disconnecting(&self) -> bool {
        let i = self.inner.borrow();
        i.disconnect_requested || i.primary_gone
    }

    /// Sends a user message, with fds, to the primary. Blocks until written.
    pub fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        self.inner
            .borrow_mut()
            .channel
            .send(Kind::User, 0, 0, bytes, fds)
    }

    /// Listens through the primary on `"host:port"`, `"[v6]:port"`, a port
    /// alone, or a Unix socket path (≈ `server.listen` in a worker). Blocks
    /// for the primary's answer; a bind error comes back here, naming the
    /// address, and the worker may go on.
    pub fn listen(&self, addr: &str) -> io::Result<Listener> {
        self.listen_with_backlog(addr, 0)
    }

    /// [`Worker::listen`] with a `listen(2)` backlog (0: the primary's default, 511).
    pub fn listen_with_backlog(&self, addr: &str, backlog: u32) -> io::Result<Listener> {
        let endpoint = Endpoint::parse(addr)?;
        let key = endpoint.key();
        let mut inner = self.inner.borrow_mut();
        if inner.disconnect_requested || inner.primary_gone {
            return Err(disconnecting());
        }
        // Node's index: the k-th live listen on the same endpoint.
        let used = inner.indexes.entry(key.clone()).or_default();
        let index = (0..).find(|i| !used.contains(i)).unwrap_or(0);
        used.push(index);
        let q = Query {
            endpoint,
            index,
            backlog,
        };
        let seq = inner.next_req;
        inner.next_req = inner.next_req.wrapping_add(1);
        let res = inner.query(seq, &q);
        let reply = match res {
            Ok(r) => r,
            Err(e) => {
                inner.release_index(&key, index);
                return Err(e);
            }
        };
        let (handle, policy, address, shared) = match reply {
            Ok(v) => v,
            Err(e) => {
                inner.release_index(&key, index);
                return Err(e);
            }
        };
        // An inherited socket (`fd:NAME`) is Unix unless the primary's
        // address for it is an IP one.
        let unix = match &q.endpoint {
            Endpoint::Unix(_) => true,
            Endpoint::Name(_) => address.parse::<std::net::SocketAddr>().is_err(),
            _ => false,
        };
        let idx = inner.listeners.len();
        if let Some(fd) = &shared {
            inner.epoll.add(
                fd.as_fd(),
                epoll::READABLE | epoll::EXCLUSIVE,
                TOKEN_LISTENER | idx as u64,
            )?;
        }
        inner.listeners.push(Some(ListenerState {
            handle,
            policy,
            address,
            unix,
            key,
            index,
            shared,
            resume_at: None,
            queue: VecDeque::new(),
        }));
        inner.channel.send(Kind::Listening, 0, handle, &[], &[])?;
        // The blocking reply read may have pulled in later frames too.
        if inner.channel.has_buffered() {
            inner.read_channel(false)?;
        }
        drop(inner);
        Ok(Listener {
            inner: self.inner.clone(),
            idx,
        })
    }

    /// Blocks for the next message from the primary. `Ok(None)` once a
    /// disconnect was requested (or the primary died). Connections that
    /// arrive meanwhile wait in their listener.
    pub fn recv(&self) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
        let mut inner = self.inner.borrow_mut();
        loop {
            let pos = inner
                .pending
                .iter()
                .position(|e| matches!(e, Event::Message(..)));
            if let Some(Event::Message(b, f)) = pos.and_then(|p| inner.pending.remove(p)) {
                return Ok(Some((b, f)));
            }
            if inner.disconnect_requested || inner.primary_gone {
                return Ok(None);
            }
            inner.read_channel(true)?;
        }
    }

    /// Registers an fd of the worker's own (say an open connection) with the
    /// worker's loop; its readiness comes back as [`Event::Ready`] with
    /// `token`. Tokens must be below 2^62. Level-triggered.
    pub fn register(&self, fd: BorrowedFd<'_>, token: u64, interest: Interest) -> io::Result<()> {
        check_token(token)?;
        self.inner
            .borrow()
            .epoll
            .add(fd, interest.epoll_bits(), token)
    }

    /// Changes the interest or token of a registered fd.
    pub fn reregister(&self, fd: BorrowedFd<'_>, token: u64, interest: Interest) -> io::Result<()> {
        check_token(token)?;
        self.inner
            .borrow()
            .epoll
            .modify(fd, interest.epoll_bits(), token)
    }

    /// Removes a registered fd (do it before closing the fd).
    pub fn deregister(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.inner.borrow().epoll.delete(fd)
    }

    /// Waits for the next event: a connection on any listener, a message,
    /// the disconnect request, or a registered fd's readiness.
    pub fn next_event(&self) -> io::Result<Event> {
        loop {
            if let Some(ev) = self.next_event_timeout(None)? {
                return Ok(ev);
            }
        }
    }

    /// Like [`Worker::next_event`], but `Ok(None)` when `timeout` passes first.
    pub fn next_event_timeout(&self, timeout: Option<Duration>) -> io::Result<Option<Event>> {
        let until = timeout.map(|t| Instant::now() + t);
        let mut inner = self.inner.borrow_mut();
        loop {
            if let Some(ev) = inner.pending.pop_front() {
                return Ok(Some(ev));
            }
            if let Some((idx, stream)) = inner.take_queued()? {
                return Ok(Some(Event::Connection(idx, stream)));
            }
            if (inner.disconnect_requested || inner.primary_gone) && !inner.disconnect_reported {
                inner.disconnect_reported = true;
                inner.stop_listening();
                return Ok(Some(Event::Disconnect));
            }
            let now = Instant::now();
            let wait = match until {
                Some(u) if now >= u => return Ok(None),
                Some(u) => Some(u - now),
                None => None,
            };
            inner.wait(wait)?;
            if let Some(ev) = inner.pending.pop_front() {
                return Ok(Some(ev));
            }
        }
    }

    /// Worker-initiated disconnect (≈ `cluster.worker.disconnect()`): tells
    /// the primary first, so it reports `exited_after_disconnect`, and waits
    /// up to 5 s for its acknowledgement. Connections queued here go back to
    /// the primary for other workers. Then return from `main`.
    pub fn disconnect(&self) -> io::Result<()> {
        let mut inner = self.inner.borrow_mut();
        if inner.primary_gone {
            return Ok(());
        }
        let seq = inner.next_req;
        inner.next_req = inner.next_req.wrapping_add(1);
        inner
            .channel
            .send(Kind::ExitedAfterDisconnect, 0, seq, &[], &[])?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !inner.acked.contains(&seq) && !inner.primary_gone {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "primary did not acknowledge the disconnect",
                ));
            }
            inner.wait_channel(Some(left))?;
        }
        inner.disconnect_requested = true;
        inner.disconnect_reported = true;
        inner.stop_listening();
        Ok(())
    }
}

fn check_token(token: u64) -> io::Result<()> {
    if token >= 1 << 62 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "worker tokens must be below 2^62",
        ));
    }
    Ok(())
}

type Reply = Result<(u32, Policy, String, Option<OwnedFd>), io::Error>;

impl Inner {
    fn release_index(&mut self, key: &str, index: u32) {
        if let Some(v) = self.indexes.get_mut(key) {
            v.retain(|&i| i != index);
            if v.is_empty() {
                self.indexes.remove(key);
            }
        }
    }

    // Sends QueryServer and reads frames until its reply.
    fn query(&mut self, seq: u32, q: &Query) -> io::Result<Reply> {
        self.channel
            .send(Kind::QueryServer, 0, seq, &q.encode(), &[])?;
        loop {
            let frame = match self.channel.recv()? {
                Some(f) => f,
                None => {
                    self.primary_gone = true;
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "primary closed the channel",
                    ));
                }
            };
            if frame.header.kind == Kind::QueryReply && frame.header.seq == seq {
                if frame.header.flags & protocol::ERROR != 0 {
                    return Ok(Err(protocol::decode_reply_err(&frame.payload)));
                }
                let (handle, policy, address) = protocol::decode_reply_ok(&frame.payload)?;
                let mut fds = frame.fds;
                let shared = match policy {
                    Policy::Shared => Some(
                        fds.pop()
                            .ok_or_else(|| invalid("shared reply without a listening fd".into()))?,
                    ),
                    Policy::RoundRobin => None,
                };
                return Ok(Ok((handle, policy, address, shared)));
            }
            self.on_frame(frame)?;
        }
    }

    fn on_frame(&mut self, f: Frame) -> io::Result<()> {
        match f.header.kind {
            Kind::NewConn => {
                let ids: Vec<u32> = protocol::decode_ids(&f.payload)?.collect();
                let handle = f.header.seq;
                if f.lost_fds > 0 || f.fds.len() != ids.len() {
                    // EMFILE here: hand them back so another worker serves them.
                    let mut body = Vec::new();
                    protocol::encode_ids(&ids, &mut body);
                    return self
                        .channel
                        .send(Kind::ConnReply, REJECTED, handle, &body, &[]);
                }
                let slot = self
                    .listeners
                    .iter_mut()
                    .flatten()
                    .find(|l| l.handle == handle && l.policy == Policy::RoundRobin);
                match slot {
                    Some(l) => {
                        l.queue.extend(ids.into_iter().zip(f.fds));
                        Ok(())
                    }
                    None => {
                        let mut body = Vec::new();
                        protocol::encode_ids(&ids, &mut body);
                        self.channel
                            .send(Kind::ConnReply, REJECTED, handle, &body, &[])
                    }
                }
            }
            Kind::Disconnect => {
                self.disconnect_requested = true;
                Ok(())
            }
            Kind::Ack => {
                self.acked.push(f.header.seq);
                Ok(())
            }
            Kind::User => {
                self.pending.push_back(Event::Message(f.payload, f.fds));
                Ok(())
            }
            k => Err(invalid(format!(
                "the primary sent an unexpected {k:?} frame"
            ))),
        }
    }

    // Reads whatever the channel has (blocking for one frame if asked).
    fn read_channel(&mut self, block: bool) -> io::Result<()> {
        if block {
            match self.channel.recv()? {
                Some(f) => self.on_frame(f)?,
                None => self.primary_gone = true,
            }
        }
        loop {
            match self.channel.try_recv()? {
                Recv::Frame(f) => self.on_frame(f)?,
                Recv::WouldBlock => return Ok(()),
                Recv::Eof => {
                    self.primary_gone = true;
                    return Ok(());
                }
            }
        }
    }

    fn wait_channel(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let mut rev = [0i16; 1];
        poll::poll(&[(self.channel.as_fd(), poll::IN)], &mut rev, timeout)?;
        if rev[0] != 0 {
            self.read_channel(false)?;
        }
        Ok(())
    }

    // One epoll_wait over the channel, shared listeners and user fds.
    fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        if self.channel.has_buffered() {
            // A blocking read may have pulled in more than one frame; epoll
            // would never report those.
            return self.read_channel(false);
        }
        let timeout = match self.resume_listeners() {
            Some(at) => {
                let left = at.saturating_duration_since(Instant::now());
                Some(timeout.map_or(left, |t| t.min(left)))
            }
            None => timeout,
        };
        let mut evs = std::mem::replace(&mut self.events_buf, epoll::Events::with_capacity(1));
        let res = self.epoll.wait(&mut evs, timeout);
        let mut out = Ok(());
        if res.is_ok() {
            for (token, flags) in evs.iter() {
                if token == TOKEN_CHANNEL {
                    if let Err(e) = self.read_channel(false) {
                        out = Err(e);
                    }
                } else if token & TOKEN_LISTENER == TOKEN_LISTENER {
                    let idx = (token & 0xffff_ffff) as usize;
                    if let Some(ev) = self.accept_shared(idx) {
                        self.pending.push_back(ev);
                    }
                } else {
                    self.pending
                        .push_back(Event::Ready(token, Readiness::from_epoll(flags)));
                }
            }
        }
        self.events_buf = evs;
        res?;
        out
    }

    fn accept_shared(&mut self, idx: usize) -> Option<Event> {
        if self.disconnect_requested || self.primary_gone {
            return None;
        }
        let l = self.listeners.get_mut(idx)?.as_mut()?;
        let fd = l.shared.as_ref()?;
        match sys::socket::accept(fd.as_fd(), false) {
            Ok(conn) => Some(Event::Connection(idx, to_stream(conn, l.unix))),
            Err(e) if accept_must_rest(&e) => {
                // Level-triggered and still readable: out of epoll for a
                // while, or the loop would spin. Other workers sharing the
                // socket take its connections meanwhile.
                let _ = self.epoll.delete(fd.as_fd());
                l.resume_at = Some(Instant::now() + ACCEPT_BACKOFF);
                None
            }
            Err(_) => None,
        }
    }

    // Puts back into epoll the shared listeners whose rest is over; returns
    // when the next one ends.
    fn resume_listeners(&mut self) -> Option<Instant> {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        for (idx, slot) in self.listeners.iter_mut().enumerate() {
            let Some(l) = slot.as_mut() else { continue };
            let Some(at) = l.resume_at else { continue };
            let Some(fd) = l.shared.as_ref() else {
                l.resume_at = None;
                continue;
            };
            if at > now {
                next = Some(next.map_or(at, |n| n.min(at)));
                continue;
            }
            l.resume_at = None;
            let bits = epoll::READABLE | epoll::EXCLUSIVE;
            if self
                .epoll
                .add(fd.as_fd(), bits, TOKEN_LISTENER | idx as u64)
                .is_err()
            {
                // Cannot watch it now (ENOMEM, ENOSPC): try again later.
                let at = now + ACCEPT_BACKOFF;
                l.resume_at = Some(at);
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        next
    }

    // Pops a connection handed over by the primary and acknowledges it.
    fn take_queued(&mut self) -> io::Result<Option<(usize, Stream)>> {
        let n = self.listeners.len();
        for step in 0..n {
            let idx = (self.ready_cursor + step) % n;
            if let Some(l) = self.listeners[idx].as_mut() {
                if let Some((cid, fd)) = l.queue.pop_front() {
                    let (handle, unix) = (l.handle, l.unix);
                    self.ready_cursor = (idx + 1) % n;
                    self.channel
                        .send(Kind::ConnReply, 0, handle, &cid.to_le_bytes(), &[])?;
                    return Ok(Some((idx, to_stream(fd, unix))));
                }
            }
        }
        Ok(None)
    }

    // Stops taking connections: shared listeners close; round-robin
    // connections already handed over stay queued and are still served.
    // Stops taking connections. Round-robin connections already handed over
    // stay queued and are still served; a shared listener's backlog is
    // drained first, so what the kernel accepted before the stop is served.
    fn stop_listening(&mut self) {
        for idx in 0..self.listeners.len() {
            let Some(l) = self.listeners[idx].as_mut() else {
                continue;
            };
            let Some(fd) = l.shared.take() else { continue };
            let _ = self.epoll.delete(fd.as_fd());
            let unix = l.unix;
            while let Ok(conn) = sys::socket::accept(fd.as_fd(), false) {
                self.pending
                    .push_back(Event::Connection(idx, to_stream(conn, unix)));
            }
        }
    }

    fn close_listener(&mut self, idx: usize) {
        let Some(l) = self.listeners.get_mut(idx).and_then(Option::take) else {
            return;
        };
        if let Some(fd) = &l.shared {
            let _ = self.epoll.delete(fd.as_fd());
        }
        self.release_index(&l.key, l.index);
        if self.primary_gone {
            return;
        }
        let _ = self.channel.send(Kind::Close, 0, l.handle, &[], &[]);
        if !l.queue.is_empty() {
            let ids: Vec<u32> = l.queue.iter().map(|(id, _)| *id).collect();
            let mut body = Vec::new();
            protocol::encode_ids(&ids, &mut body);
            let _ = self
                .channel
                .send(Kind::ConnReply, REJECTED, l.handle, &body, &[]);
        }
    }
}

/// True when `accept` failed for want of resources, which a ready listener
/// keeps reporting until some are freed: `EMFILE`, `ENFILE`, `ENOBUFS`,
/// `ENOMEM` (Linux numbers: this module names no libc).
fn accept_must_rest(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

fn to_stream(fd: OwnedFd, unix: bool) -> Stream {
    if unix {
        Stream::Unix(UnixStream::from(fd))
    } else {
        Stream::Tcp(TcpStream::from(fd))
    }
}

impl Listener {
    /// Local index of this listener, as [`Event::Connection`] names it.
    pub fn id(&self) -> usize {
        self.idx
    }

    /// The address the primary bound, with port 0 resolved (a path for Unix).
    pub fn address(&self) -> String {
        let inner = self.inner.borrow();
        inner
            .listeners
            .get(self.idx)
            .and_then(Option::as_ref)
            .map(|l| l.address.clone())
            .unwrap_or_default()
    }

    /// The bound TCP address, or `None` for a Unix socket.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.address().parse().ok()
    }

    /// The policy the primary chose for this listener.
    pub fn policy(&self) -> Policy {
        let inner = self.inner.borrow();
        inner
            .listeners
            .get(self.idx)
            .and_then(Option::as_ref)
            .map_or(Policy::RoundRobin, |l| l.policy)
    }

    /// Blocks for the next connection, as a `TcpStream`. Meanwhile messages
    /// and the disconnect request are queued for [`Worker::next_event`].
    /// After a disconnect, the connections already handed over are still
    /// returned; then `ConnectionAborted`.
    pub fn accept(&self) -> io::Result<TcpStream> {
        match self.accept_stream()? {
            Stream::Tcp(s) => Ok(s),
            Stream::Unix(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a Unix listener: use accept_unix",
            )),
        }
    }

    /// [`Listener::accept`] for a Unix socket listener.
    pub fn accept_unix(&self) -> io::Result<UnixStream> {
        match self.accept_stream()? {
            Stream::Unix(s) => Ok(s),
            Stream::Tcp(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a TCP listener: use accept",
            )),
        }
    }

    /// [`Listener::accept`] for either kind of listener.
    pub fn accept_stream(&self) -> io::Result<Stream> {
        let mut inner = self.inner.borrow_mut();
        loop {
            let l = inner
                .listeners
                .get_mut(self.idx)
                .and_then(Option::as_mut)
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "listener is closed"))?;
            if let Some((cid, fd)) = l.queue.pop_front() {
                let (handle, unix) = (l.handle, l.unix);
                inner
                    .channel
                    .send(Kind::ConnReply, 0, handle, &cid.to_le_bytes(), &[])?;
                return Ok(to_stream(fd, unix));
            }
            let unix = l.unix;
            let shared = match &l.shared {
                Some(fd) => match sys::socket::accept(fd.as_fd(), false) {
                    Ok(conn) => return Ok(to_stream(conn, unix)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
                    Err(e) if accept_must_rest(&e) => {
                        // EMFILE: back off instead of spinning on a ready listener.
                        std::thread::sleep(Duration::from_millis(10));
                        true
                    }
                    Err(_) => continue,
                },
                None => false,
            };
            if inner.disconnect_requested || inner.primary_gone {
                inner.stop_listening();
                return Err(disconnecting());
            }
            if inner.channel.has_buffered() {
                inner.read_channel(false)?;
                continue;
            }
            let mut rev = [0i16; 2];
            if shared {
                let fd = inner.listeners[self.idx]
                    .as_ref()
                    .and_then(|l| l.shared.as_ref())
                    .map(|f| f.as_fd());
                if let Some(lfd) = fd {
                    poll::poll(
                        &[(inner.channel.as_fd(), poll::IN), (lfd, poll::IN)],
                        &mut rev,
                        None,
                    )?;
                }
            } else {
                poll::poll(&[(inner.channel.as_fd(), poll::IN)], &mut rev, None)?;
            }
            if rev[0] != 0 {
                inner.read_channel(false)?;
            }
        }
    }

    /// Connections until the worker is told to disconnect (then `None`).
    pub fn incoming(&self) -> Incoming<'_> {
        Incoming { listener: self }
    }

    /// Closes the listener now (the same as dropping it).
    pub fn close(self) {}
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Ok(mut inner) = self.inner.try_borrow_mut() {
            inner.close_listener(self.idx);
        }
    }
}

/// Iterator of [`Listener::incoming`].
#[derive(Debug)]
pub struct Incoming<'a> {
    listener: &'a Listener,
}

impl Iterator for Incoming<'_> {
    type Item = io::Result<TcpStream>;
    fn next(&mut self) -> Option<Self::Item> {
        match self.listener.accept() {
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => None,
            other => Some(other),
        }
    }
}
