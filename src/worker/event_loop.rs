//! The worker's state and its one epoll loop: the channel to the primary,
//! shared listening sockets, the wake socketpair (see `count.rs`) and the
//! program's own fds.

#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::count::{ListenerCount, Waker, WorkerCount};
use super::listener::{ListenOptions, ListenerState};
use super::{Event, Stream};
use crate::env::ENV_FDS;
use crate::ipc::channel::{Channel, Frame, Recv};
use crate::ipc::wire::Kind;
use crate::primary::shared::{self, BindOptions};
use crate::protocol::{self, Endpoint, Policy, Query, QueryFlags, REJECTED};
use crate::readiness::Readiness;
use crate::sys::{self, epoll, poll};

const TOKEN_CHANNEL: u64 = 1 << 63;
const TOKEN_WAKE: u64 = (1 << 63) | 1;
const TOKEN_LISTENER: u64 = (1 << 63) | (1 << 62);
const TOKEN_PIPE: u64 = (1 << 63) | (1 << 61);
/// Tokens of the program's own fds are below this.
pub(super) const USER_TOKENS: u64 = 1 << 62;

/// How long a shared listener rests after `accept` failed for want of
/// resources (`EMFILE`...): it stays readable, so retrying at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// A shared listener that just gave a connection is tried again before the
/// next `epoll_wait`, as a blocking `accept` would be: under load the wait
/// is a syscall per connection for nothing. At most this many times in a
/// row, so that the channel and the program's fds are looked at too.
const HOT_ACCEPTS: u32 = 8;

/// How long a worker-initiated disconnect waits for the primary's ack.
const DISCONNECT_ACK: Duration = Duration::from_secs(5);

/// Counts for the primary (see `note_served`) go in one frame once this
/// many are unsent, or once the last frame is `REPORT_AGE` old.
const REPORT_BATCH: u64 = 64;
const REPORT_AGE: Duration = Duration::from_millis(50);
/// Least-loaded: once the worker is back in its loop with nothing to do,
/// it tells the primary (which then knows it is not blocked on a
/// connection it took), with its open count if that fell; at most this
/// long after it last took a connection or reported...
const LOAD_GAP: Duration = Duration::from_millis(1);
/// ...unless the count fell by this much.
const LOAD_BATCH: usize = 16;

/// Everything the [`Worker`](super::Worker) and its listeners share: no
/// threads, so a listener's `accept()` can read the channel and keep
/// whatever else arrives for `next_event`.
#[derive(Debug)]
pub(super) struct Inner {
    pub(super) id: u32,
    /// The primary's pid, from SO_PEERCRED at adoption.
    pub(super) primary_pid: i32,
    /// `None` once closed: EOF from the primary, or our own disconnect.
    channel: Option<Channel>,
    pub(super) epoll: Rc<epoll::Epoll>,
    events_buf: epoll::Events,
    listeners: Vec<Option<ListenerState>>,
    indexes: HashMap<String, Vec<u32>>,
    pending: VecDeque<Event>,
    disconnect_requested: bool,
    disconnect_reported: bool,
    acked: Vec<u32>,
    next_req: u32,
    /// A spare fd, closed just before a pipe is read: the connection's fd
    /// always finds a free slot, where `EMFILE` would lose it in transit.
    spare: Option<OwnedFd>,
    /// Listeners whose pipe epoll said is readable. A connection is taken
    /// only when the program is about to get it: a message that came with
    /// it (say, "close that listener") is seen first.
    ready_pipes: VecDeque<usize>,
    /// The shared listener that gave the last connection, and how many
    /// times in a row it was tried without an `epoll_wait` (`HOT_ACCEPTS`).
    hot: Option<usize>,
    hot_streak: u32,
    /// Open connections, and the wake socketpair once a shared listener
    /// got a cap.
    pub(super) counts: Arc<WorkerCount>,
    /// The extra fds the primary mapped (`SYNCLUSTER_FDS`), adopted at
    /// start, until the program takes them.
    mapped: Vec<(i32, Option<OwnedFd>)>,
    /// Connections taken from shared sockets and requests the program
    /// noted, not told to the primary yet, and when it was last told.
    unsent: Unsent,
    /// A listener is least-loaded: falls of the open count are reported.
    least_loaded: bool,
    /// The open count the primary last heard, and when.
    reported_open: usize,
    reported_at: Instant,
    /// The last thing the primary heard is that a connection was taken.
    reported_busy: bool,
}

/// See `Inner::note_served`.
#[derive(Debug)]
struct Unsent {
    conns: u64,
    requests: u64,
    since: Instant,
}

/// What the primary answered a query: the handle, its policy, its address
/// and (shared) the socket; with the index key it was asked under.
struct Granted {
    handle: u32,
    policy: Policy,
    address: String,
    shared: Option<OwnedFd>,
    pipe: Option<OwnedFd>,
    key: String,
    index: u32,
}

// Adopts the fds `SYNCLUSTER_FDS` names, at start, before the program
// could reuse their numbers.
fn adopt_mapped() -> io::Result<Vec<(i32, Option<OwnedFd>)>> {
    let Some(v) = std::env::var_os(ENV_FDS) else {
        return Ok(Vec::new());
    };
    let s = v.to_string_lossy();
    let bad = |why: String| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{ENV_FDS}={s:?}: {why}"),
        )
    };
    let mut out: Vec<(i32, Option<OwnedFd>)> = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let n = part
            .parse::<i32>()
            .ok()
            .filter(|n| (4..64).contains(n))
            .ok_or_else(|| bad(format!("{part:?} is not an fd number from 4 to 63")))?;
        if out.iter().any(|(m, _)| *m == n) {
            return Err(bad(format!("fd {n} is named twice")));
        }
        let fd = sys::fd::adopt_inherited(n).map_err(|e| bad(e.to_string()))?;
        out.push((n, Some(fd)));
    }
    Ok(out)
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

pub(super) fn disconnecting() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "worker is disconnecting: no more connections",
    )
}

fn channel_closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "the channel to the primary is closed (disconnected, or the primary died)",
    )
}

/// `ECONNABORTED` (Linux number: this module names no libc): a connection
/// reset while in the backlog; the next one may be fine.
fn accept_retry(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock || e.raw_os_error() == Some(103)
}

type Reply = Result<(u32, Policy, String, Option<OwnedFd>, Option<OwnedFd>), io::Error>;

impl Inner {
    pub(super) fn new(id: u32, primary_pid: i32, fd: OwnedFd) -> io::Result<Inner> {
        let mut channel = Channel::new(fd, false);
        channel.send(Kind::Online, 0, 0, &[], &[])?;
        let epoll = epoll::Epoll::new()?;
        epoll.add(channel.as_fd(), epoll::READABLE, TOKEN_CHANNEL)?;
        let mapped = adopt_mapped()?;
        Ok(Inner {
            id,
            primary_pid,
            channel: Some(channel),
            epoll: Rc::new(epoll),
            events_buf: epoll::Events::with_capacity(64),
            listeners: Vec::new(),
            indexes: HashMap::new(),
            pending: VecDeque::new(),
            disconnect_requested: false,
            disconnect_reported: false,
            acked: Vec::new(),
            next_req: 1,
            spare: None,
            ready_pipes: VecDeque::new(),
            hot: None,
            hot_streak: 0,
            counts: Arc::new(WorkerCount::default()),
            mapped,
            unsent: Unsent {
                conns: 0,
                requests: 0,
                since: Instant::now(),
            },
            least_loaded: false,
            reported_open: 0,
            reported_at: Instant::now(),
            reported_busy: false,
        })
    }

    /// `Worker::take_fd`.
    pub(super) fn take_fd(&mut self, target: i32) -> io::Result<OwnedFd> {
        match self.mapped.iter_mut().find(|(n, _)| *n == target) {
            Some((_, fd)) => fd.take().ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("fd {target} was taken already"),
                )
            }),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("fd {target} was not mapped by the primary (Settings::map_fd)"),
            )),
        }
    }

    pub(super) fn disconnecting(&self) -> bool {
        self.disconnect_requested || self.channel.is_none()
    }

    pub(super) fn channel_fd(&self) -> io::Result<BorrowedFd<'_>> {
        self.channel
            .as_ref()
            .map(|c| c.as_fd())
            .ok_or_else(channel_closed)
    }

    pub(super) fn send(
        &mut self,
        kind: Kind,
        flags: u8,
        seq: u32,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<()> {
        self.channel
            .as_mut()
            .ok_or_else(channel_closed)?
            .send(kind, flags, seq, payload, fds)
    }

    // A user message. A listener that refused connections and has room
    // again (a stream dropped since) says so first: the primary must not
    // close a connection as refused by all after the program said, in
    // this message, that it let one go.
    pub(super) fn send_user(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        if self.listeners.iter().flatten().any(|l| l.refusing) {
            self.resume_listeners();
        }
        self.send(Kind::User, 0, 0, bytes, fds)
    }

    // A ConnReply for `handle` with the open count: a load report (back in
    // the loop), a refill notice (a full window was taken from, or the
    // listener takes connections again) or, with REJECTED, a refusal. If
    // the primary is gone, nothing is owed to it: no error; the channel is
    // closed as at EOF.
    fn send_reply(&mut self, flags: u8, handle: u32) {
        if self.channel.is_none() {
            return;
        }
        let open = self.counts.open.load(std::sync::atomic::Ordering::SeqCst);
        let mut body = Vec::with_capacity(4);
        protocol::encode_conn_reply(Some(open.min(u32::MAX as usize) as u32), &[], &mut body);
        let flags = flags | protocol::LOAD;
        if self
            .send(Kind::ConnReply, flags, handle, &body, &[])
            .is_err()
        {
            self.close_channel();
            return;
        }
        self.reported_open = open;
        self.reported_at = Instant::now();
        self.reported_busy = false;
    }

    /// When a load report is due, if the worker waits from now on:
    /// least-loaded, and the primary last heard that a connection was
    /// taken, or an open count above today's (by `LOAD_BATCH` or more: at
    /// once).
    fn load_report_due(&self) -> Option<Instant> {
        if !self.least_loaded || self.channel.is_none() {
            return None;
        }
        let open = self.counts.open.load(std::sync::atomic::Ordering::SeqCst);
        let fell = self.reported_open.saturating_sub(open);
        if fell >= LOAD_BATCH {
            return Some(self.reported_at);
        }
        (fell > 0 || self.reported_busy).then_some(self.reported_at + LOAD_GAP)
    }

    /// About to wait: sends the load report if it is due; otherwise
    /// returns when it will be.
    fn report_load(&mut self) -> Option<Instant> {
        let due = self.load_report_due()?;
        if Instant::now() < due {
            return Some(due);
        }
        self.send_reply(0, 0);
        None
    }

    fn close_channel(&mut self) {
        if let Some(ch) = self.channel.take() {
            let _ = self.epoll.delete(ch.as_fd());
        }
    }

    pub(super) fn listener(&self, idx: usize) -> Option<&ListenerState> {
        self.listeners.get(idx).and_then(Option::as_ref)
    }

    pub(super) fn listener_mut(&mut self, idx: usize) -> Option<&mut ListenerState> {
        self.listeners.get_mut(idx).and_then(Option::as_mut)
    }

    pub(super) fn pending_message(&mut self) -> Option<(Vec<u8>, Vec<OwnedFd>)> {
        let pos = self
            .pending
            .iter()
            .position(|e| matches!(e, Event::Message { .. }))?;
        match self.pending.remove(pos) {
            Some(Event::Message { bytes, fds }) => Some((bytes, fds)),
            _ => None,
        }
    }

    fn release_index(&mut self, key: &str, index: u32) {
        if let Some(v) = self.indexes.get_mut(key) {
            v.retain(|&i| i != index);
            if v.is_empty() {
                self.indexes.remove(key);
            }
        }
    }

    // ------------------------------------------------------------ listen

    pub(super) fn listen(&mut self, addr: &str, opts: &ListenOptions) -> io::Result<usize> {
        let endpoint = opts.endpoint(addr)?;
        if self.disconnecting() {
            return Err(disconnecting());
        }
        if opts.exclusive || opts.reuse_port {
            return self.listen_own(&endpoint, opts);
        }
        let g = self.query_handle(endpoint.clone(), opts.flags(), opts.backlog)?;
        let idx = self.listeners.len();
        let mut added = Ok(());
        if let Some(fd) = &g.shared {
            let bits = epoll::READABLE | epoll::EXCLUSIVE;
            added = self
                .epoll
                .add(fd.as_fd(), bits, TOKEN_LISTENER | idx as u64);
        }
        if let (Ok(()), Some(fd)) = (&added, &g.pipe) {
            added = self
                .epoll
                .add(fd.as_fd(), epoll::READABLE, TOKEN_PIPE | idx as u64);
        }
        if let Err(e) = added {
            for fd in g.shared.iter().chain(g.pipe.iter()) {
                let _ = self.epoll.delete(fd.as_fd());
            }
            self.release_index(&g.key, g.index);
            let _ = self.send(Kind::Close, 0, g.handle, &[], &[]);
            return Err(e);
        }
        let unix = g.address.starts_with('/');
        self.least_loaded |= g.policy == Policy::LeastLoaded;
        self.listeners.push(Some(ListenerState {
            handle: g.handle,
            policy: g.policy,
            address: g.address,
            unix,
            key: g.key,
            index: g.index,
            in_epoll: g.shared.is_some(),
            shared: g.shared,
            own: false,
            unix_file: None,
            resting_until: None,
            max: None,
            nonblocking: false,
            nonblocking_connections: opts.nonblocking_connections,
            count: ListenerCount::new(&self.counts),
            pipe_in_epoll: g.pipe.is_some(),
            pipe: g.pipe,
            refusing: false,
        }));
        if let Err(e) = self.send(Kind::Listening, 0, g.handle, &[], &[]) {
            self.close_listener(idx);
            return Err(e);
        }
        // The blocking reply read may have pulled in later frames too.
        if self.channel.as_ref().is_some_and(Channel::has_buffered) {
            self.read_channel(false)?;
        }
        Ok(idx)
    }

    // `exclusive` or `reuse_port`: the worker binds the socket itself, with
    // its own credentials; the primary knows nothing of it (Node's
    // `listen({exclusive: true})` calls `_listen2` in the worker too).
    fn listen_own(&mut self, endpoint: &Endpoint, opts: &ListenOptions) -> io::Result<usize> {
        let backlog = match opts.backlog {
            0 => 511,
            n => n.min(i32::MAX as u32) as i32,
        };
        let bind = BindOptions {
            backlog,
            udp: false,
            ipv6_only: opts.ipv6_only,
            reuse_port: opts.reuse_port,
            defer_accept: opts.defer_accept,
            add_mode: opts.add_mode(),
        };
        let (fd, address, unix_file) = shared::bind(endpoint, None, &bind)?;
        let idx = self.listeners.len();
        let bits = epoll::READABLE | epoll::EXCLUSIVE;
        self.epoll
            .add(fd.as_fd(), bits, TOKEN_LISTENER | idx as u64)?;
        self.listeners.push(Some(ListenerState {
            handle: 0,
            policy: Policy::Shared,
            address: address.to_string(),
            unix: unix_file.is_some(),
            key: String::new(),
            index: 0,
            in_epoll: true,
            shared: Some(fd),
            own: true,
            unix_file,
            resting_until: None,
            max: None,
            nonblocking: false,
            nonblocking_connections: opts.nonblocking_connections,
            count: ListenerCount::new(&self.counts),
            pipe: None,
            pipe_in_epoll: false,
            refusing: false,
        }));
        Ok(idx)
    }

    /// `Worker::bind_udp`: the primary's UDP socket for `addr`, shared by
    /// every worker asking for it. Its index stays taken: a `UdpSocket`
    /// cannot say when it is dropped.
    pub(super) fn bind_udp(&mut self, addr: &str) -> io::Result<std::net::UdpSocket> {
        let endpoint = Endpoint::parse(addr)?;
        if matches!(endpoint, Endpoint::Unix(_)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad UDP address {addr:?}: a path is not a UDP address"),
            ));
        }
        if self.disconnecting() {
            return Err(disconnecting());
        }
        let g = self.query_handle(endpoint, QueryFlags::UDP, 0)?;
        let Some(fd) = g.shared else {
            let _ = self.send(Kind::Close, 0, g.handle, &[], &[]);
            return Err(invalid(format!(
                "the primary answered a UDP query with a {} handle and no socket",
                g.policy.name()
            )));
        };
        if let Err(e) = self.send(Kind::Listening, 0, g.handle, &[], &[]) {
            self.release_index(&g.key, g.index);
            return Err(e);
        }
        if self.channel.as_ref().is_some_and(Channel::has_buffered) {
            self.read_channel(false)?;
        }
        Ok(std::net::UdpSocket::from(fd))
    }

    // Sends a query for `endpoint` under the next free index and waits for
    // the answer; on failure the index is free again.
    fn query_handle(
        &mut self,
        endpoint: Endpoint,
        flags: QueryFlags,
        backlog: u32,
    ) -> io::Result<Granted> {
        let mut q = Query {
            endpoint,
            index: 0,
            backlog,
            flags,
        };
        let key = q.key();
        // Node's index: the k-th live listen on the same endpoint.
        let used = self.indexes.entry(key.clone()).or_default();
        let index = (0..).find(|i| !used.contains(i)).unwrap_or(0);
        used.push(index);
        q.index = index;
        let seq = self.next_req;
        self.next_req = self.next_req.wrapping_add(1);
        match self.query(seq, &q) {
            Ok(Ok((handle, policy, address, shared, pipe))) => Ok(Granted {
                handle,
                policy,
                address,
                shared,
                pipe,
                key,
                index,
            }),
            Ok(Err(e)) | Err(e) => {
                self.release_index(&key, index);
                Err(e)
            }
        }
    }

    // Sends QueryServer and reads frames until its reply.
    fn query(&mut self, seq: u32, q: &Query) -> io::Result<Reply> {
        self.send(Kind::QueryServer, 0, seq, &q.encode(), &[])?;
        loop {
            let frame = match self.channel.as_mut().ok_or_else(channel_closed)?.recv()? {
                Some(f) => f,
                None => {
                    self.close_channel();
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
                let pipe = if policy.hands_over() {
                    Some(fds.pop().ok_or_else(|| {
                        invalid(format!("{} reply without a pipe", policy.name()))
                    })?)
                } else {
                    None
                };
                let shared = if policy.worker_accepts() {
                    Some(fds.pop().ok_or_else(|| {
                        invalid(format!("{} reply without a listening fd", policy.name()))
                    })?)
                } else {
                    None
                };
                return Ok(Ok((handle, policy, address, shared, pipe)));
            }
            self.on_frame(frame)?;
        }
    }

    // ------------------------------------------------------------ frames

    fn on_frame(&mut self, f: Frame) -> io::Result<()> {
        match f.header.kind {
            Kind::Disconnect => {
                self.disconnect_requested = true;
                Ok(())
            }
            Kind::Ack => {
                self.acked.push(f.header.seq);
                Ok(())
            }
            Kind::User => {
                self.pending.push_back(Event::Message {
                    bytes: f.payload,
                    fds: f.fds,
                });
                Ok(())
            }
            k => Err(invalid(format!(
                "the primary sent an unexpected {k:?} frame"
            ))),
        }
    }

    // Reads whatever the channel has (blocking for one frame if asked).
    pub(super) fn read_channel(&mut self, block: bool) -> io::Result<()> {
        if block {
            let Some(ch) = self.channel.as_mut() else {
                return Ok(());
            };
            match ch.recv()? {
                Some(f) => self.on_frame(f)?,
                None => {
                    self.close_channel();
                    return Ok(());
                }
            }
        }
        loop {
            let Some(ch) = self.channel.as_mut() else {
                return Ok(());
            };
            // After a blocking read, a short one means the socket was
            // empty: the next wait sees what comes later.
            let next = if block {
                ch.try_recv_lazy()
            } else {
                ch.try_recv()
            };
            match next? {
                Recv::Frame(f) => self.on_frame(f)?,
                Recv::WouldBlock => return Ok(()),
                Recv::Eof => {
                    // Out of epoll too: a closed channel stays readable.
                    self.close_channel();
                    return Ok(());
                }
            }
        }
    }

    fn wait_channel(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let mut rev = [0i16; 1];
        poll::poll(&[(self.channel_fd()?, poll::IN)], &mut rev, timeout)?;
        if rev[0] != 0 {
            self.read_channel(false)?;
        }
        Ok(())
    }

    // ------------------------------------------------------------ the loop

    /// The next event, waiting until `until` (forever with `None`); a
    /// deadline already past still gets one look at what is ready.
    pub(super) fn next_event(&mut self, until: Option<Instant>) -> io::Result<Option<Event>> {
        let mut waited = false;
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Ok(Some(ev));
            }
            if let Some(ev) = self.take_ready() {
                return Ok(Some(ev));
            }
            if self.disconnecting() && !self.disconnect_reported {
                // What the primary handed over before the request is
                // served first, as a shared backlog is.
                if self.drain_pipes() {
                    continue;
                }
                self.disconnect_reported = true;
                self.stop_listening(false);
                return Ok(Some(Event::Disconnect));
            }
            let wait = match until {
                None => None,
                Some(u) => {
                    let now = Instant::now();
                    if now < u {
                        Some(u - now)
                    } else if waited {
                        return Ok(None);
                    } else {
                        Some(Duration::ZERO)
                    }
                }
            };
            self.wait(wait)?;
            waited = true;
        }
    }

    /// Time left until the first resting listener is watched again, or a
    /// load report is due.
    pub(super) fn poll_timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        self.listeners
            .iter()
            .flatten()
            .filter(|l| l.shared.is_some() || l.pipe.is_some())
            .filter_map(|l| l.resting_until)
            .chain(self.load_report_due())
            .min()
            .map(|at| at.saturating_duration_since(now))
    }

    // One epoll_wait over the channel, shared listeners and user fds.
    fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.report_served(false);
        if self.channel.as_ref().is_some_and(Channel::has_buffered) {
            // A blocking read may have pulled in more than one frame; epoll
            // would never report those.
            return self.read_channel(false);
        }
        if let Some(idx) = self.hot.take() {
            if self.hot_streak < HOT_ACCEPTS && !self.disconnecting() {
                if let Some(stream) = self.try_accept_shared(idx) {
                    self.hot = Some(idx);
                    self.hot_streak += 1;
                    self.pending.push_back(Event::Connection {
                        listener: idx,
                        stream,
                    });
                    return Ok(());
                }
            }
        }
        self.hot_streak = 0;
        let wake = [self.resume_listeners(), self.report_load()]
            .into_iter()
            .flatten()
            .min();
        let timeout = match wake {
            Some(at) => {
                let left = at.saturating_duration_since(Instant::now());
                Some(timeout.map_or(left, |t| t.min(left)))
            }
            None => timeout,
        };
        let mut evs = std::mem::replace(&mut self.events_buf, epoll::Events::with_capacity(1));
        let res = self.epoll.wait(&mut evs, timeout);
        let mut out = Ok(());
        let mut woken = false;
        if res.is_ok() {
            for (token, flags) in evs.iter() {
                if token == TOKEN_CHANNEL {
                    if let Err(e) = self.read_channel(false) {
                        out = Err(e);
                    }
                } else if token == TOKEN_WAKE {
                    woken = true;
                } else if token & TOKEN_PIPE == TOKEN_PIPE {
                    let idx = (token & 0xffff_ffff) as usize;
                    if !self.ready_pipes.contains(&idx) {
                        self.ready_pipes.push_back(idx);
                    }
                } else if token & TOKEN_LISTENER == TOKEN_LISTENER {
                    let idx = (token & 0xffff_ffff) as usize;
                    if self.disconnecting() {
                        continue;
                    }
                    if let Some(stream) = self.try_accept_shared(idx) {
                        self.hot = Some(idx);
                        self.pending.push_back(Event::Connection {
                            listener: idx,
                            stream,
                        });
                    }
                } else {
                    self.pending.push_back(Event::Ready {
                        token,
                        readiness: Readiness::from_epoll(flags),
                    });
                }
            }
        }
        self.events_buf = evs;
        if woken {
            self.resume_listeners();
        }
        res?;
        out
    }

    // ------------------------------------------------------------ shared listeners

    /// Makes the wake socketpair (once): a stream of a capped shared
    /// listener, dropped anywhere, wakes the loop through it.
    pub(super) fn ensure_waker(&mut self) -> io::Result<()> {
        if self.counts.waker.get().is_some() {
            return Ok(());
        }
        let (read, write) = sys::socket::socketpair()?;
        let (read, write) = (UnixStream::from(read), UnixStream::from(write));
        read.set_nonblocking(true)?;
        write.set_nonblocking(true)?;
        self.epoll.add(read.as_fd(), epoll::READABLE, TOKEN_WAKE)?;
        // Only this thread sets it, and it was empty just above.
        let _ = self.counts.waker.set(Waker { read, write });
        Ok(())
    }

    // Puts a listener's socket and pipe in or out of the epoll as its rest
    // and cap say, and tells the primary when its pipe starts or stops
    // taking connections.
    fn sync_listener(&mut self, idx: usize) {
        let disconnecting = self.disconnecting();
        let Some(l) = self.listeners.get_mut(idx).and_then(Option::as_mut) else {
            return;
        };
        let full = l.count.pause_if_full(l.max);
        let want = l.resting_until.is_none() && !full;
        let e = &self.epoll;
        let (shared, pipe) = (TOKEN_LISTENER | idx as u64, TOKEN_PIPE | idx as u64);
        let exclusive = epoll::READABLE | epoll::EXCLUSIVE;
        let ok = watch(
            e,
            l.shared.as_ref(),
            want,
            &mut l.in_epoll,
            exclusive,
            shared,
        );
        // A socket that could not be watched rests, and its pipe with it.
        let ok = watch(
            e,
            l.pipe.as_ref(),
            want && ok,
            &mut l.pipe_in_epoll,
            epoll::READABLE,
            pipe,
        ) && ok;
        if !ok {
            // Cannot watch it now (ENOMEM, ENOSPC): try again later.
            l.resting_until = Some(Instant::now() + ACCEPT_BACKOFF);
        }
        let want = want && ok;
        if l.pipe.is_some() && want == l.refusing && !disconnecting {
            // REJECTED: route around me and take back what I have not
            // read; without it: I take connections again.
            l.refusing = !want;
            let (handle, flags) = (l.handle, if want { 0 } else { REJECTED });
            self.send_reply(flags, handle);
        }
    }

    /// Ends the rests that are over, puts listeners under their cap back in
    /// the epoll and those at it out; returns when the next rest ends.
    pub(super) fn resume_listeners(&mut self) -> Option<Instant> {
        if let Some(w) = self.counts.waker.get() {
            let mut buf = [0u8; 64];
            while matches!((&w.read).read(&mut buf), Ok(n) if n > 0) {}
        }
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        for idx in 0..self.listeners.len() {
            let Some(l) = self.listeners[idx].as_mut() else {
                continue;
            };
            if l.shared.is_none() && l.pipe.is_none() {
                continue;
            }
            if l.resting_until.is_some_and(|at| at <= now) {
                l.resting_until = None;
            }
            self.sync_listener(idx);
            if let Some(at) = self.listener(idx).and_then(|l| l.resting_until) {
                next = Some(next.map_or(at, |n: Instant| n.min(at)));
            }
        }
        next
    }

    /// A connection from the listener's pipe, else from its socket.
    fn try_accept(&mut self, idx: usize) -> Option<Stream> {
        self.try_take(idx, false)
            .or_else(|| self.try_accept_shared(idx))
    }

    /// Reads one record from the listener's pipe (blocking if asked),
    /// unless it rests or is at its cap: the connection is ours from that
    /// read on. `None` when there is none, and for a wake record or the
    /// pipe's end (the primary closed it): the channel says why.
    fn try_take(&mut self, idx: usize, block: bool) -> Option<Stream> {
        let l = self.listeners.get_mut(idx)?.as_mut()?;
        let pipe = l.pipe.as_ref()?;
        if l.resting_until.is_some() {
            return None;
        }
        if l.count.pause_if_full(l.max) {
            self.sync_listener(idx);
            return None;
        }
        if self.spare.is_none() {
            self.spare = sys::fd::dup(self.epoll.as_fd()).ok();
            if self.spare.is_none() {
                // No fd free: read nothing (the connection could be lost in
                // transit); rest, and the primary takes back what waits.
                l.resting_until = Some(Instant::now() + ACCEPT_BACKOFF);
                self.sync_listener(idx);
                return None;
            }
        }
        let mut rec = [0u8; protocol::RECORD];
        let mut fds = Vec::with_capacity(1);
        drop(self.spare.take());
        let res = sys::msg::recv(pipe.as_fd(), &mut rec, &mut fds, !block);
        // A dup of the epoll, which lives as long as the worker: the spare
        // holds no pipe or socket open.
        self.spare = sys::fd::dup(self.epoll.as_fd()).ok();
        match res {
            Ok(0) => {
                // The primary closed the pipe: nothing more will come.
                if l.pipe_in_epoll {
                    let _ = self.epoll.delete(pipe.as_fd());
                    l.pipe_in_epoll = false;
                }
                l.pipe = None;
                None
            }
            Ok(_) => {
                let fd = fds.pop()?;
                let (_, flags) = protocol::decode_record(&rec);
                if l.nonblocking_connections {
                    // One file description with nobody else's copy now.
                    let _ = sys::fd::set_nonblocking(fd.as_fd(), true);
                }
                let (handle, capped) = (l.handle, l.max.is_some());
                let stream = Stream::new(fd, l.unix, &l.count);
                if capped {
                    self.sync_listener(idx);
                }
                if flags & protocol::FULL != 0 {
                    // The primary may hold connections for this window.
                    self.send_reply(0, handle);
                }
                if self.least_loaded {
                    // The primary sees the take in the pipe; the report
                    // that the worker is back in its loop is due from now.
                    self.reported_busy = true;
                    self.reported_at = Instant::now();
                }
                Some(stream)
            }
            Err(_) => None,
        }
    }

    /// One `accept` on a shared listener, unless it rests or is at its cap.
    /// Failures other than "nothing there" make it rest (out of the epoll
    /// for a while): a level-triggered, still-readable listener would spin.
    fn try_accept_shared(&mut self, idx: usize) -> Option<Stream> {
        let l = self.listeners.get_mut(idx)?.as_mut()?;
        if l.resting_until.is_some() || l.shared.is_none() {
            return None;
        }
        if l.count.pause_if_full(l.max) {
            self.sync_listener(idx);
            return None;
        }
        let fd = l.shared.as_ref()?;
        match sys::socket::accept(fd.as_fd(), l.nonblocking_connections) {
            Ok(conn) => {
                let stream = Stream::new(conn, l.unix, &l.count);
                if l.max.is_some() {
                    self.sync_listener(idx);
                }
                self.note_served(1, 0);
                Some(stream)
            }
            Err(e) if accept_retry(&e) => None,
            Err(_) => {
                // EMFILE, ENFILE, ENOBUFS, ENOMEM: other workers sharing
                // the socket take its connections meanwhile.
                l.resting_until = Some(Instant::now() + ACCEPT_BACKOFF);
                self.sync_listener(idx);
                None
            }
        }
    }

    // ------------------------------------------------------------ counts

    /// Counts connections taken from a shared socket (the primary sees
    /// round-robin ones in the pipe) and requests the program served, for
    /// the primary's `max_requests`. Batched: a frame once `REPORT_BATCH`
    /// are unsent, or at the next turn of the loop once `REPORT_AGE`
    /// passed since the last frame.
    pub(super) fn note_served(&mut self, conns: u64, requests: u64) {
        let u = &mut self.unsent;
        u.conns = u.conns.saturating_add(conns);
        u.requests = u.requests.saturating_add(requests);
        let full = u.conns.saturating_add(u.requests) >= REPORT_BATCH;
        self.report_served(full);
    }

    // Sends the unsent counts when `now`, or when they are old enough.
    fn report_served(&mut self, now: bool) {
        let u = &self.unsent;
        if u.conns == 0 && u.requests == 0 || !now && u.since.elapsed() < REPORT_AGE {
            return;
        }
        if self.channel.is_none() {
            return;
        }
        for flags in [0, protocol::REQUESTS] {
            let n = match flags {
                0 => &mut self.unsent.conns,
                _ => &mut self.unsent.requests,
            };
            let sent = (*n).min(u32::MAX as u64);
            *n -= sent;
            if sent > 0
                && self
                    .send(Kind::Count, flags, sent as u32, &[], &[])
                    .is_err()
            {
                // As for a report: the primary is gone.
                self.close_channel();
                return;
            }
        }
        self.unsent.since = Instant::now();
    }

    // A connection from the first ready pipe that has one. The pipe waits
    // for epoll to say it again, after the channel was looked at.
    fn take_ready(&mut self) -> Option<Event> {
        while let Some(idx) = self.ready_pipes.pop_front() {
            if let Some(stream) = self.try_take(idx, false) {
                return Some(Event::Connection {
                    listener: idx,
                    stream,
                });
            }
        }
        None
    }

    // Takes what every pipe holds now, as `Connection` events; true if
    // there was any.
    fn drain_pipes(&mut self) -> bool {
        let mut any = false;
        for idx in 0..self.listeners.len() {
            while let Some(stream) = self.try_take(idx, false) {
                self.pending.push_back(Event::Connection {
                    listener: idx,
                    stream,
                });
                any = true;
            }
        }
        any
    }

    // ------------------------------------------------------------ accept

    /// [`Listener::accept`](super::Listener::accept) without the peer address.
    pub(super) fn accept_on(&mut self, idx: usize) -> io::Result<Stream> {
        loop {
            self.resume_listeners();
            let l = self
                .listener(idx)
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "listener is closed"))?;
            let nonblocking = l.nonblocking;
            if nonblocking {
                self.read_channel(false)?;
            }
            if !nonblocking && self.pipe_only(idx) {
                // Nothing else to wait for: the blocking read of the pipe
                // is the wait, one syscall per connection. A wake record or
                // the pipe's end sends us to the channel.
                self.report_served(false);
                if let Some(s) = self.try_take(idx, true) {
                    return Ok(s);
                }
                self.read_channel(false)?;
                continue;
            }
            if let Some(s) = self.try_accept(idx) {
                return Ok(s);
            }
            if self.disconnecting() {
                self.stop_listening(false);
                return Err(disconnecting());
            }
            if self.channel.as_ref().is_some_and(Channel::has_buffered) {
                self.read_channel(false)?;
                continue;
            }
            if nonblocking {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.block_for(idx)?;
        }
    }

    // True when a blocking accept on `idx` has only its pipe and the
    // channel to watch, with no deadline: no socket of its own, no cap
    // waker, no rest, no load report due, and not disconnecting.
    fn pipe_only(&self, idx: usize) -> bool {
        let Some(l) = self.listener(idx) else {
            return false;
        };
        l.pipe.is_some()
            && l.shared.is_none()
            && l.max.is_none()
            && l.resting_until.is_none()
            && self.channel.as_ref().is_some_and(|c| !c.has_buffered())
            && !self.disconnecting()
            && self.load_report_due().is_none()
    }

    // Waits until the channel, this listener's socket or pipe (when it may
    // accept) or the waker is readable, or this listener's rest ends.
    fn block_for(&mut self, idx: usize) -> io::Result<()> {
        self.report_served(false);
        let report = self.report_load();
        let l = self.listener(idx);
        let rest = [l.and_then(|l| l.resting_until), report]
            .into_iter()
            .flatten()
            .min();
        let mut fds: Vec<(BorrowedFd<'_>, i16)> = Vec::with_capacity(4);
        let channel = self.channel.as_ref().map(|c| c.as_fd());
        if let Some(fd) = channel {
            fds.push((fd, poll::IN));
        }
        if let Some(fd) = l.filter(|l| l.in_epoll).and_then(|l| l.shared.as_ref()) {
            fds.push((fd.as_fd(), poll::IN));
        }
        if let Some(fd) = l.filter(|l| l.pipe_in_epoll).and_then(|l| l.pipe.as_ref()) {
            fds.push((fd.as_fd(), poll::IN));
        }
        if let Some(w) = self.counts.waker.get() {
            fds.push((w.read.as_fd(), poll::IN));
        }
        let timeout = rest.map(|at| at.saturating_duration_since(Instant::now()));
        let mut rev = [0i16; 4];
        poll::poll(&fds, &mut rev[..fds.len()], timeout)?;
        if channel.is_some() && rev[0] != 0 {
            self.read_channel(false)?;
        }
        Ok(())
    }

    // ------------------------------------------------------------ stopping

    // Stops taking connections. What the primary handed over and a shared
    // listener's backlog are taken first (up to the cap), so what reached
    // this worker before the stop is served; with `give_back`, the pipes
    // are closed unread instead, and the primary hands what they hold to
    // the other workers.
    pub(super) fn stop_listening(&mut self, give_back: bool) {
        if !give_back {
            self.drain_pipes();
        }
        for idx in 0..self.listeners.len() {
            let Some(l) = self.listeners[idx].as_mut() else {
                continue;
            };
            if let Some(pipe) = l.pipe.take() {
                if l.pipe_in_epoll {
                    let _ = self.epoll.delete(pipe.as_fd());
                    l.pipe_in_epoll = false;
                }
            }
            let Some(fd) = l.shared.take() else { continue };
            // The socket closes below: its file (exclusive Unix) goes too.
            let unix_file = l.unix_file.take();
            if l.in_epoll {
                let _ = self.epoll.delete(fd.as_fd());
                l.in_epoll = false;
            }
            while !l.count.pause_if_full(l.max) {
                let Ok(conn) = sys::socket::accept(fd.as_fd(), l.nonblocking_connections) else {
                    break;
                };
                let stream = Stream::new(conn, l.unix, &l.count);
                self.pending.push_back(Event::Connection {
                    listener: idx,
                    stream,
                });
            }
            l.count
                .paused
                .store(false, std::sync::atomic::Ordering::SeqCst);
            drop((fd, unix_file));
        }
    }

    /// Worker-initiated disconnect; see `Worker::disconnect`.
    pub(super) fn disconnect(&mut self) -> io::Result<()> {
        if self.channel.is_none() {
            self.disconnect_requested = true;
            return Ok(());
        }
        let seq = self.next_req;
        self.next_req = self.next_req.wrapping_add(1);
        self.send(Kind::ExitedAfterDisconnect, 0, seq, &[], &[])?;
        let deadline = Instant::now() + DISCONNECT_ACK;
        while !self.acked.contains(&seq) && self.channel.is_some() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "primary did not acknowledge the disconnect",
                ));
            }
            self.wait_channel(Some(left))?;
        }
        self.disconnect_requested = true;
        self.disconnect_reported = true;
        // As Node's worker does after the ack: what the program has not
        // taken goes back, then the channel closes, so the primary reports
        // the disconnect without waiting for this process to end.
        self.stop_listening(true);
        self.close_channel();
        Ok(())
    }

    pub(super) fn close_listener(&mut self, idx: usize) {
        let Some(l) = self.listeners.get_mut(idx).and_then(Option::take) else {
            return;
        };
        if let Some(fd) = &l.shared {
            if l.in_epoll {
                let _ = self.epoll.delete(fd.as_fd());
            }
        }
        if let Some(fd) = &l.pipe {
            if l.pipe_in_epoll {
                let _ = self.epoll.delete(fd.as_fd());
            }
        }
        l.count
            .paused
            .store(false, std::sync::atomic::Ordering::SeqCst);
        if l.own {
            // Its socket and Unix file go with `l`; the primary never knew.
            return;
        }
        self.release_index(&l.key, l.index);
        if self.channel.is_none() {
            return;
        }
        // The primary takes back what the pipe (closed with `l`) holds.
        let _ = self.send(Kind::Close, 0, l.handle, &[], &[]);
    }
}

// Puts `fd` (if any) in or out of the epoll as `want` says, keeping
// `watched` in step; false when it cannot be added now.
fn watch(
    epoll: &epoll::Epoll,
    fd: Option<&OwnedFd>,
    want: bool,
    watched: &mut bool,
    bits: u32,
    token: u64,
) -> bool {
    let Some(fd) = fd else {
        return true;
    };
    if want && !*watched {
        *watched = epoll.add(fd.as_fd(), bits, token).is_ok();
        return *watched;
    }
    if !want && *watched {
        let _ = epoll.delete(fd.as_fd());
        *watched = false;
    }
    true
}

/// Checks a token of the program's own fds.
pub(super) fn check_token(token: u64) -> io::Result<()> {
    if token >= USER_TOKENS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("worker tokens must be below 2^62, not {token}"),
        ));
    }
    Ok(())
}
