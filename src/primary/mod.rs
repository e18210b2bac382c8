//! The primary: forks workers, owns the listening sockets, routes
//! connections, and turns everything into events (≈ Node's primary.js).
//!
//! One epoll loop watches a signalfd, every worker channel and every
//! round-robin listener. [`Primary::next_event`] runs it until it has
//! something to say.

#![forbid(unsafe_code)]

mod round_robin;
mod shared;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use self::round_robin::{Avail, Conn, Handle};
pub use self::shared::Address;
use crate::ipc::channel::{Channel, Frame, QueueFull, Recv};
use crate::ipc::wire::{self, Kind};
use crate::protocol::{self, Policy, Query, REJECTED};
use crate::sys::{self, epoll, process, signal};

/// Environment variable that makes a process a worker and gives its id.
pub const ENV_WORKER_ID: &str = "SYNCLUSTER_WORKER_ID";
/// Environment variable naming the worker's end of the channel.
pub const ENV_CHANNEL_FD: &str = "SYNCLUSTER_CHANNEL_FD";
/// Environment variable choosing the policy: `rr` or `none`.
pub const ENV_SCHED_POLICY: &str = "SYNCLUSTER_SCHED_POLICY";
/// Environment variable setting the round-robin window (1 to 253).
pub const ENV_RR_WINDOW: &str = "SYNCLUSTER_RR_WINDOW";

/// The fd number the channel has in every worker.
const CHANNEL_FD: i32 = 3;

/// A full worker with no acknowledgement for this long loses its turn.
const STALL: Duration = Duration::from_millis(20);

const TOKEN_SIGNAL: u64 = 0;
const TOKEN_WORKER: u64 = 1 << 32;
const TOKEN_HANDLE: u64 = 2 << 32;
const TOKEN_USER: u64 = 1 << 62;

/// Signals the primary turns into events instead of dying of them.
pub const SIGNALS: [i32; 8] = [
    signal::SIGCHLD,
    signal::SIGTERM,
    signal::SIGINT,
    signal::SIGHUP,
    signal::SIGQUIT,
    signal::SIGTTIN,
    signal::SIGTTOU,
    signal::SIGUSR2,
];

/// Whether worker stdout/stderr are inherited or piped to the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stdio {
    /// Workers write to the primary's own stdout/stderr (the default).
    #[default]
    Inherit,
    /// Each worker's stdout/stderr is a pipe; see [`Primary::take_stdout`].
    Pipe,
}

/// Settings for future forks (≈ `cluster.setupPrimary`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Program to exec; `None` means the running executable (`/proc/self/exe`).
    pub exec: Option<PathBuf>,
    /// Arguments after argv[0]; `None` means the primary's own.
    pub args: Option<Vec<OsString>>,
    /// Extra environment for every worker.
    pub env: Vec<(OsString, OsString)>,
    /// Working directory of workers; `None` inherits the primary's.
    pub cwd: Option<PathBuf>,
    /// Run workers as this user id.
    pub uid: Option<u32>,
    /// Run workers as this group id.
    pub gid: Option<u32>,
    /// Inherit or pipe worker stdout/stderr.
    pub stdio: Stdio,
    /// Round robin or shared; the default comes from `SYNCLUSTER_SCHED_POLICY`, else rr.
    pub policy: Policy,
    /// `listen(2)` backlog when the worker asks for none (511, as Node).
    pub backlog: u32,
    /// Connections the primary holds per listener before it stops accepting
    /// and lets the kernel backlog absorb the burst.
    pub queue_limit: usize,
    /// Connections in flight to one worker and not yet accepted by it
    /// (Node: 1). More lets one `sendmsg` carry several fds.
    pub window: usize,
    /// Largest frame payload accepted from a worker.
    pub max_payload: u32,
    /// When the last worker of a listening socket dies unexpectedly, keep
    /// the socket this long (not accepting: the kernel backlog holds new
    /// connections) so that a replacement listens on the same port and no
    /// client is refused. A deliberate disconnect closes it at once.
    pub orphan_linger: Duration,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            exec: None,
            args: None,
            env: Vec::new(),
            cwd: None,
            uid: None,
            gid: None,
            stdio: Stdio::Inherit,
            policy: Policy::RoundRobin,
            backlog: 511,
            queue_limit: 1024,
            window: 4,
            max_payload: wire::DEFAULT_MAX_PAYLOAD,
            orphan_linger: Duration::from_secs(30),
        }
    }
}

/// A worker's state, as Node names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Forked; no frame yet.
    None,
    /// Its first frame arrived.
    Online,
    /// At least one listener is up.
    Listening,
    /// Its channel is closed.
    Disconnected,
    /// Its process ended. [`Primary::workers`] no longer lists a worker
    /// once its `Exit` event is out, so this is seen only in between.
    Dead,
}

/// How a worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// A signal ended it.
    Signal(i32),
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(s) => write!(f, "signal {} ({s})", process::signal_name(*s)),
        }
    }
}

/// What [`Primary::next_event`] reports.
#[derive(Debug)]
pub enum Event {
    /// A worker was forked (its exec succeeded).
    Fork(u32),
    /// The worker's first frame arrived.
    Online(u32),
    /// The worker listens on this address (port 0 resolved).
    Listening(u32, Address),
    /// A user message from a worker, with any fds it sent.
    Message(u32, Vec<u8>, Vec<OwnedFd>),
    /// The worker's channel closed.
    Disconnect(u32),
    /// The worker's process ended; the flag is `exited_after_disconnect`.
    Exit(u32, ExitStatus, bool),
    /// A signal the primary should act on (SIGTERM, SIGINT, SIGHUP, ...).
    Signal(i32),
    /// The worker broke the protocol (or its frame lost fds); it is being
    /// killed when the error is fatal. `Disconnect` and `Exit` follow.
    Error(u32, io::Error),
    /// A worker held connections longer than the hang timeout without
    /// taking the next one; it is being killed.
    Hung(u32),
    /// An fd given to [`Primary::register`] is ready; the token is its own.
    Ready(u64, crate::worker::Readiness),
}

/// A worker as [`Primary::workers`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    /// Worker id, 1, 2, 3, ... never reused.
    pub id: u32,
    /// Its process id.
    pub pid: i32,
    /// Its state.
    pub state: State,
    /// True once a disconnect was asked for, by either side.
    pub exited_after_disconnect: bool,
    /// Connections handed to it and not yet accepted.
    pub in_flight: usize,
}

#[derive(Debug)]
struct InFlight {
    handle: u32,
    conn: Conn,
}

#[derive(Debug)]
struct Slot {
    pid: i32,
    state: State,
    channel: Option<Channel>,
    want_write: bool,
    exited_after_disconnect: bool,
    exit: Option<ExitStatus>,
    in_flight: VecDeque<InFlight>,
    handles: Vec<u32>,
    kill_at: Option<Instant>,
    /// When the worker last took a connection, or got its first one.
    progress: Instant,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
}

/// The primary process. See the module docs.
#[derive(Debug)]
pub struct Primary {
    settings: Settings,
    epoll: epoll::Epoll,
    events_buf: epoll::Events,
    sigfd: OwnedFd,
    workers: BTreeMap<u32, Slot>,
    pids: HashMap<i32, u32>,
    next_id: u32,
    handles: BTreeMap<u32, Handle>,
    keys: HashMap<String, u32>,
    next_handle: u32,
    next_conn: u32,
    events: VecDeque<Event>,
    hang_timeout: Option<Duration>,
    // Scratch buffers reused on the hot path.
    ids_buf: Vec<u8>,
    batch: Vec<(u32, Vec<Conn>)>,
}

fn other(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::Other, msg)
}

impl Primary {
    /// Creates the primary: blocks [`SIGNALS`] in this thread and reads them
    /// from a signalfd. Create it before starting any thread, so that no
    /// other thread takes those signals.
    pub fn new(settings: Settings) -> io::Result<Primary> {
        signal::block(&SIGNALS)?;
        let sigfd = signal::signalfd(&SIGNALS)?;
        let epoll = epoll::Epoll::new()?;
        epoll.add(sigfd.as_fd(), epoll::READABLE, TOKEN_SIGNAL)?;
        Ok(Primary {
            settings,
            epoll,
            events_buf: epoll::Events::with_capacity(256),
            sigfd,
            workers: BTreeMap::new(),
            pids: HashMap::new(),
            next_id: 1,
            handles: BTreeMap::new(),
            keys: HashMap::new(),
            next_handle: 1,
            next_conn: 1,
            events: VecDeque::new(),
            hang_timeout: None,
            ids_buf: Vec::with_capacity(4 * 64),
            batch: Vec::new(),
        })
    }

    /// The settings future forks use.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Changes the settings for future forks (≈ `setupPrimary`).
    pub fn settings_mut(&mut self) -> &mut Settings {
        &mut self.settings
    }

    /// Kills a worker that holds connections for longer than `timeout`
    /// without coming back for the next one (gunicorn's `--timeout`).
    /// `None` (the default) turns it off.
    pub fn set_hang_timeout(&mut self, timeout: Option<Duration>) {
        self.hang_timeout = timeout;
    }

    /// Watches an fd of the caller's own (stdin, an admin socket) in the
    /// primary's loop; readiness comes back as [`Event::Ready`] with `token`
    /// (below 2^32). Level-triggered. Deregister before closing the fd.
    pub fn register(
        &mut self,
        fd: BorrowedFd<'_>,
        token: u64,
        interest: crate::worker::Interest,
    ) -> io::Result<()> {
        if token >= 1 << 32 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "primary tokens must be below 2^32",
            ));
        }
        self.epoll
            .add(fd, interest.epoll_bits(), TOKEN_USER | token)
    }

    /// Removes an fd given to [`Primary::register`].
    pub fn deregister(&mut self, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.epoll.delete(fd)
    }

    /// Forks a worker with the settings' environment.
    pub fn fork(&mut self) -> io::Result<u32> {
        self.fork_with_env(&[] as &[(&str, &str)])
    }

    /// Forks a worker with extra environment variables (≈ `cluster.fork(env)`).
    /// Returns its id once exec has succeeded; an exec failure is the `Err`.
    pub fn fork_with_env<K: AsRef<OsStr>, V: AsRef<OsStr>>(
        &mut self,
        env: &[(K, V)],
    ) -> io::Result<u32> {
        let id = self.next_id;
        let s = &self.settings;
        let exec = s
            .exec
            .clone()
            .unwrap_or_else(|| PathBuf::from("/proc/self/exe"));
        let mut argv: Vec<OsString> = vec![std::env::args_os()
            .next()
            .unwrap_or_else(|| exec.clone().into())];
        match &s.args {
            Some(args) => argv.extend(args.iter().cloned()),
            None => argv.extend(std::env::args_os().skip(1)),
        }
        let ours = |k: &OsStr| k == ENV_WORKER_ID || k == ENV_CHANNEL_FD;
        let mut vars: Vec<(OsString, OsString)> =
            std::env::vars_os().filter(|(k, _)| !ours(k)).collect();
        let mut set = |k: &OsStr, v: &OsStr| {
            if let Some(slot) = vars.iter_mut().find(|(key, _)| key == k) {
                slot.1 = v.to_owned();
            } else {
                vars.push((k.to_owned(), v.to_owned()));
            }
        };
        for (k, v) in &s.env {
            set(k, v);
        }
        for (k, v) in env {
            set(k.as_ref(), v.as_ref());
        }
        set(OsStr::new(ENV_WORKER_ID), OsStr::new(&id.to_string()));
        set(
            OsStr::new(ENV_CHANNEL_FD),
            OsStr::new(&CHANNEL_FD.to_string()),
        );
        let mut plan = process::SpawnPlan::new(&exec, &argv, &vars)?;
        if let Some(cwd) = &s.cwd {
            plan.cwd(cwd)?;
        }
        if let Some(gid) = s.gid {
            plan.gid(gid);
        }
        if let Some(uid) = s.uid {
            plan.uid(uid);
        }
        let (ours_end, theirs) = sys::socket::socketpair()?;
        let pipes = match s.stdio {
            Stdio::Inherit => None,
            Stdio::Pipe => Some((process::pipe()?, process::pipe()?)),
        };
        let mut map: Vec<(BorrowedFd<'_>, i32)> = vec![(theirs.as_fd(), CHANNEL_FD)];
        if let Some(((_, out_w), (_, err_w))) = &pipes {
            map.push((out_w.as_fd(), 1));
            map.push((err_w.as_fd(), 2));
        }
        let pid = process::spawn(&plan, &map).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("fork of worker {id}: exec {}: {e}", exec.display()),
            )
        })?;
        drop(map);
        drop(theirs);
        let (stdout, stderr) = match pipes {
            Some(((out_r, _), (err_r, _))) => (Some(out_r), Some(err_r)),
            None => (None, None),
        };
        let mut channel = Channel::new(ours_end, true);
        channel.set_max_payload(self.settings.max_payload);
        if let Err(e) = self
            .epoll
            .add(channel.as_fd(), epoll::READABLE, TOKEN_WORKER | id as u64)
        {
            let _ = process::kill(pid, signal::SIGKILL);
            let _ = process::wait_pid(pid);
            return Err(e);
        }
        self.next_id += 1;
        self.pids.insert(pid, id);
        self.workers.insert(
            id,
            Slot {
                pid,
                state: State::None,
                channel: Some(channel),
                want_write: false,
                exited_after_disconnect: false,
                exit: None,
                in_flight: VecDeque::new(),
                handles: Vec::new(),
                kill_at: None,
                progress: Instant::now(),
                stdout,
                stderr,
            },
        );
        self.events.push_back(Event::Fork(id));
        Ok(id)
    }

    /// The worker's piped stdout (with [`Stdio::Pipe`]), once.
    pub fn take_stdout(&mut self, id: u32) -> Option<OwnedFd> {
        self.workers.get_mut(&id)?.stdout.take()
    }

    /// The worker's piped stderr (with [`Stdio::Pipe`]), once.
    pub fn take_stderr(&mut self, id: u32) -> Option<OwnedFd> {
        self.workers.get_mut(&id)?.stderr.take()
    }

    /// Workers by id, until their `Exit` event has been returned.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.workers
            .iter()
            .map(|(&id, s)| WorkerInfo {
                id,
                pid: s.pid,
                state: s.state,
                exited_after_disconnect: s.exited_after_disconnect,
                in_flight: s.in_flight.len(),
            })
            .collect()
    }

    /// The process id of a live worker.
    pub fn pid(&self, id: u32) -> Option<i32> {
        self.workers.get(&id).map(|s| s.pid)
    }

    /// The addresses of the open listening handles.
    pub fn listening_addresses(&self) -> Vec<Address> {
        self.handles.values().map(|h| h.address.clone()).collect()
    }

    fn gone(id: u32) -> io::Error {
        io::Error::new(
            io::ErrorKind::NotConnected,
            format!("worker {id} is not connected"),
        )
    }

    /// Sends a user message, with fds, to a worker. Buffered: never blocks
    /// on a slow worker. `Err(NotConnected)` once its channel is closed.
    /// `Err(InvalidInput)` for over 16 MiB (nothing sent). A worker that does
    /// not read, with 32 MiB or 512 fds queued for it, is reported and
    /// killed, and this returns that error (`OutOfMemory`).
    pub fn send(&mut self, id: u32, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        self.send_frame(id, Kind::User, 0, 0, bytes, fds)
    }

    fn send_frame(
        &mut self,
        id: u32,
        kind: Kind,
        flags: u8,
        seq: u32,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<()> {
        let slot = self.workers.get_mut(&id).ok_or_else(|| Self::gone(id))?;
        let ch = slot.channel.as_mut().ok_or_else(|| Self::gone(id))?;
        // [channel, issue 9 §3] A worker that lets its queue fill is broken:
        // report it and kill it; the caller gets the same error.
        if let Err(e) = ch.send(kind, flags, seq, bytes, fds) {
            let Some(full) = e.get_ref().and_then(|i| i.downcast_ref::<QueueFull>()) else {
                return Err(e);
            };
            let msg = format!("worker {id} is not reading: {full}");
            let err = || io::Error::new(io::ErrorKind::OutOfMemory, msg.clone());
            self.events.push_back(Event::Error(id, err()));
            self.abort_worker(id);
            return Err(err());
        }
        if ch.wants_write() && !slot.want_write {
            slot.want_write = true;
            self.epoll.modify(
                ch.as_fd(),
                epoll::READABLE | epoll::WRITABLE,
                TOKEN_WORKER | id as u64,
            )?;
        }
        Ok(())
    }

    /// Sends `sig` to a worker (≈ `worker.process.kill`).
    pub fn kill(&mut self, id: u32, sig: i32) -> io::Result<()> {
        let slot = self.workers.get(&id).ok_or_else(|| Self::gone(id))?;
        if slot.exit.is_some() {
            return Err(Self::gone(id));
        }
        process::kill(slot.pid, sig)
    }

    /// Graceful disconnect: stop routing to the worker, tell it to finish
    /// what it holds and exit. With `timeout`, SIGKILL follows if it is
    /// still alive then. Its exit reports `exited_after_disconnect`.
    pub fn disconnect(&mut self, id: u32, timeout: Option<Duration>) -> io::Result<()> {
        let slot = self.workers.get_mut(&id).ok_or_else(|| Self::gone(id))?;
        slot.exited_after_disconnect = true;
        if let Some(t) = timeout {
            slot.kill_at = Some(Instant::now() + t);
        }
        if slot.channel.is_none() {
            return Ok(());
        }
        self.unroute(id);
        self.send_frame(id, Kind::Disconnect, 0, 0, &[], &[])
    }

    /// Stops accepting and disconnects every worker (≈ `cluster.disconnect`).
    /// Connections already in the kernel backlog are accepted and handed to
    /// the workers first, ahead of the disconnect request, so none is lost.
    pub fn disconnect_all(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let ids: Vec<u32> = self.handles.keys().copied().collect();
        for hid in ids {
            // Round robin: sweep the kernel backlog to the workers ahead of
            // their disconnect request. Shared: the workers drain it.
            if self
                .handles
                .get(&hid)
                .is_some_and(|h| h.policy == Policy::RoundRobin)
            {
                self.accept_ready(hid, true);
                self.distribute(hid, true);
            }
            self.close_handle(hid);
        }
        let workers: Vec<u32> = self.workers.keys().copied().collect();
        for id in workers {
            let _ = self.disconnect(id, timeout);
        }
        Ok(())
    }

    /// Stops routing new connections to a worker without disconnecting it
    /// (a rolling restart retires the old worker this way). Connections
    /// queued for it go to the others.
    pub fn unroute(&mut self, id: u32) {
        let Some(slot) = self.workers.get_mut(&id) else {
            return;
        };
        let hids = std::mem::take(&mut slot.handles);
        for hid in hids {
            self.leave_handle(id, hid);
        }
    }

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

    fn next_deadline(&self) -> Option<Instant> {
        let kills = self.workers.values().filter_map(|s| s.kill_at);
        let paused = self
            .handles
            .values()
            .filter_map(|h| h.paused_until.or(h.orphaned_until));
        let hangs = self.hang_timeout.into_iter().flat_map(|t| {
            self.workers
                .values()
                .filter(|s| !s.in_flight.is_empty() && s.exit.is_none())
                .map(move |s| s.progress + t)
        });
        // Connections queued behind a busy worker: look again when its turn
        // may be forfeit.
        let stalled = self
            .handles
            .values()
            .any(|h| h.policy == Policy::RoundRobin && !h.queue.is_empty() && !h.workers.is_empty())
            .then(|| Instant::now() + STALL);
        kills.chain(paused).chain(hangs).chain(stalled).min()
    }

    // One epoll_wait and everything it reports.
    fn turn(&mut self, wait: Option<Duration>) -> io::Result<()> {
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
                    let r = crate::worker::Readiness::from_epoll(flags);
                    self.events.push_back(Event::Ready(token & 0xffff_ffff, r));
                }
                _ => self.on_signals()?,
            }
        }
        self.events_buf = evs;
        self.on_timers();
        Ok(())
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        let due: Vec<u32> = self
            .workers
            .iter()
            .filter(|(_, s)| s.kill_at.is_some_and(|t| t <= now) && s.exit.is_none())
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            if let Some(s) = self.workers.get_mut(&id) {
                s.kill_at = None;
                let _ = process::kill(s.pid, signal::SIGKILL);
            }
        }
        if let Some(t) = self.hang_timeout {
            let hung: Vec<u32> = self
                .workers
                .iter()
                .filter(|(_, s)| {
                    s.exit.is_none() && !s.in_flight.is_empty() && s.progress + t <= now
                })
                .map(|(&id, _)| id)
                .collect();
            for id in hung {
                self.events.push_back(Event::Hung(id));
                self.abort_worker(id);
            }
        }
        let expired: Vec<u32> = self
            .handles
            .iter()
            .filter(|(_, h)| h.orphaned_until.is_some_and(|t| t <= now))
            .map(|(&id, _)| id)
            .collect();
        for hid in expired {
            self.close_handle(hid);
        }
        let queued: Vec<u32> = self
            .handles
            .iter()
            .filter(|(_, h)| !h.queue.is_empty())
            .map(|(&id, _)| id)
            .collect();
        for hid in queued {
            self.distribute(hid, false);
        }
        let resume: Vec<u32> = self
            .handles
            .iter()
            .filter(|(_, h)| h.paused_until.is_some_and(|t| t <= now))
            .map(|(&id, _)| id)
            .collect();
        for hid in resume {
            if let Some(h) = self.handles.get_mut(&hid) {
                h.paused_until = None;
            }
            self.accept_ready(hid, false);
            self.distribute(hid, false);
        }
    }

    fn on_signals(&mut self) -> io::Result<()> {
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

    // Reaps only our workers, by pid: a child the program started itself
    // keeps its exit status for its own `wait`.
    fn reap(&mut self) {
        let pids: Vec<i32> = self.pids.keys().copied().collect();
        for pid in pids {
            let status = match process::wait_pid_nohang(pid) {
                Ok(Some(status)) => status,
                Ok(None) => continue,
                Err(_) => continue,
            };
            let Some(id) = self.pids.remove(&pid) else {
                continue;
            };
            let status = match status {
                process::ExitStatus::Code(c) => ExitStatus::Code(c),
                process::ExitStatus::Signal(s) => ExitStatus::Signal(s),
            };
            if let Some(s) = self.workers.get_mut(&id) {
                s.exit = Some(status);
            }
            // Frames it wrote before dying are still readable: deliver them,
            // then Disconnect, then Exit.
            self.read_worker(id);
            self.close_channel(id);
            // The slot stays (state Dead) until this Exit is handed out.
            if let Some(s) = self.workers.get_mut(&id) {
                s.state = State::Dead;
                self.events
                    .push_back(Event::Exit(id, status, s.exited_after_disconnect));
            }
        }
    }

    fn on_worker(&mut self, id: u32, flags: u32) {
        if flags & epoll::WRITABLE != 0 {
            self.flush_worker(id);
        }
        if flags & (epoll::READABLE | epoll::HUP | epoll::ERROR) != 0 {
            self.read_worker(id);
        }
    }

    fn flush_worker(&mut self, id: u32) {
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

    fn read_worker(&mut self, id: u32) {
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

    fn protocol_error(&mut self, id: u32, e: io::Error) {
        // [channel, issue 9 §3] A send to it on the way closed its channel
        // (`send_frame`, queue full) and reported why already.
        if self.workers.get(&id).is_some_and(|s| s.channel.is_none()) {
            return;
        }
        self.events.push_back(Event::Error(
            id,
            io::Error::new(
                e.kind(),
                format!("worker {id} broke the channel protocol: {e}"),
            ),
        ));
        self.abort_worker(id);
    }

    fn abort_worker(&mut self, id: u32) {
        if let Some(s) = self.workers.get(&id) {
            if s.exit.is_none() {
                let _ = process::kill(s.pid, signal::SIGKILL);
            }
        }
        self.close_channel(id);
    }

    // Closes a worker's channel once: re-queues what was in flight to it,
    // drops it from every handle, reports Disconnect.
    fn close_channel(&mut self, id: u32) {
        let Some(slot) = self.workers.get_mut(&id) else {
            return;
        };
        let Some(ch) = slot.channel.take() else {
            return;
        };
        let _ = self.epoll.delete(ch.as_fd());
        drop(ch);
        slot.state = State::Disconnected;
        let in_flight = std::mem::take(&mut slot.in_flight);
        let hids = std::mem::take(&mut slot.handles);
        // Back to the front of their queues, oldest first, for another worker.
        for f in in_flight.into_iter().rev() {
            if let Some(h) = self.handles.get_mut(&f.handle) {
                h.queue.push_front(f.conn);
            }
        }
        let crashed = !self
            .workers
            .get(&id)
            .is_some_and(|s| s.exited_after_disconnect);
        for hid in hids {
            if crashed {
                self.orphan_or_leave(id, hid);
            } else {
                self.leave_handle(id, hid);
            }
        }
        self.events.push_back(Event::Disconnect(id));
    }

    fn on_frame(&mut self, id: u32, f: Frame) -> io::Result<()> {
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

    fn on_query(&mut self, id: u32, seq: u32, payload: &[u8]) -> io::Result<()> {
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

    fn add_handle(&mut self, key: String, fd: OwnedFd, address: Address) -> io::Result<u32> {
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
    fn leave_handle(&mut self, id: u32, hid: u32) {
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
    fn orphan_or_leave(&mut self, id: u32, hid: u32) {
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

    fn close_handle(&mut self, hid: u32) {
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

    fn set_polling(&mut self, hid: u32, on: bool) {
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

    // Accepts until EAGAIN or the queue is full (`drain` ignores the cap,
    // for a final sweep of the backlog before closing).
    fn accept_ready(&mut self, hid: u32, drain: bool) {
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
    fn distribute(&mut self, hid: u32, force: bool) {
        let window = self.settings.window.clamp(1, wire::MAX_FDS);
        let Some(h) = self.handles.get_mut(&hid) else {
            return;
        };
        if h.policy != Policy::RoundRobin {
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
                        Avail::Room
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

    fn hand_over(&mut self, hid: u32, w: u32, conns: Vec<Conn>) {
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

    fn on_conn_reply(&mut self, id: u32, hid: u32, flags: u8, payload: &[u8]) -> io::Result<()> {
        let slot = self.workers.get_mut(&id).ok_or_else(|| Self::gone(id))?;
        for cid in protocol::decode_ids(payload)? {
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

/// Reads `SYNCLUSTER_SCHED_POLICY`: unset gives `None`; `rr` or `none`
/// give the policy; anything else is an `InvalidInput` error naming it.
pub fn policy_from_env() -> io::Result<Option<Policy>> {
    match std::env::var_os(ENV_SCHED_POLICY) {
        None => Ok(None),
        Some(v) => match v.to_str().and_then(Policy::parse) {
            Some(p) => Ok(Some(p)),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{ENV_SCHED_POLICY}={:?}: expected rr or none",
                    Path::new(&v)
                        .as_os_str()
                        .as_bytes()
                        .escape_ascii()
                        .to_string()
                ),
            )),
        },
    }
}

/// Reads `SYNCLUSTER_RR_WINDOW`: unset gives `None`; 1 to 253 give the
/// window; anything else is an `InvalidInput` error naming it.
pub fn window_from_env() -> io::Result<Option<usize>> {
    match std::env::var_os(ENV_RR_WINDOW) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|n| (1..=wire::MAX_FDS).contains(n))
            .map(Some)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{ENV_RR_WINDOW}={v:?}: expected 1 to {}", wire::MAX_FDS),
                )
            }),
    }
}
