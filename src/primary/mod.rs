//! The primary: forks workers, owns the listening sockets, routes
//! connections, and turns everything into events (≈ Node's primary.js).
//!
//! One epoll loop watches a signalfd, every worker channel and every
//! round-robin listener. [`Primary::next_event`] runs it until it has
//! something to say.
//!
//! One file per idea, as Node splits primary.js, round_robin_handle.js
//! and shared_handle.js:
//!
//! | file | holds |
//! |---|---|
//! | `mod.rs` | settings, events, the `Primary` type and its small accessors |
//! | `workers.rs` | the worker table and its states: fork, send, kill, disconnect, reap |
//! | `handles.rs` | query-server and the listening handles |
//! | `round_robin.rs` | accepting and handing connections to workers in turn |
//! | `shared.rs` | binding a handle's socket (both policies) |
//! | `timers.rs` | deadlines: kills, pauses, orphans, hangs, stalls |
//! | `event_loop.rs` | `next_event`: epoll, signals, frames from workers |

#![forbid(unsafe_code)]

mod event_loop;
mod handles;
mod round_robin;
mod shared;
mod timers;
mod workers;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use self::event_loop::{TOKEN_SIGNAL, TOKEN_USER};
use self::handles::Handle;
use self::round_robin::Conn;
pub use self::shared::Address;
use self::workers::Slot;
pub use self::workers::{ExitStatus, State, WorkerInfo};
pub use crate::env::{ENV_CHANNEL_FD, ENV_RR_WINDOW, ENV_SCHED_POLICY, ENV_WORKER_ID};
use crate::ipc::wire;
use crate::protocol::Policy;
use crate::sys::{epoll, signal};

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
    /// Run workers as this user id. Needs `gid` too: a fork with a uid
    /// alone fails (the worker would keep the primary's group).
    /// [`Settings::set_user`] sets both from a user name.
    pub uid: Option<u32>,
    /// Run workers as this group id.
    pub gid: Option<u32>,
    /// Supplementary groups of workers that have a uid or gid; empty (the
    /// default) drops them all. [`Settings::set_user`] fills it in.
    pub groups: Vec<u32>,
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
            groups: Vec::new(),
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

impl Settings {
    /// Runs workers as `user` (a name, or a uid with a passwd entry) in
    /// `group` (a name or a gid; `None`: the user's primary group), with
    /// the user's supplementary groups (`getgrouplist`), as systemd's
    /// `User=`/`Group=`. Resolved now, before any fork; sets `uid`, `gid`
    /// and `groups`. An unknown user or group is `InvalidInput` naming it.
    pub fn set_user(&mut self, user: &str, group: Option<&str>) -> io::Result<()> {
        let c = crate::sys::user::Credentials::lookup(user, group)?;
        (self.uid, self.gid, self.groups) = (Some(c.uid), Some(c.gid), c.groups);
        Ok(())
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
    Ready(u64, crate::readiness::Readiness),
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

    pub(super) fn gone(id: u32) -> io::Error {
        io::Error::new(
            io::ErrorKind::NotConnected,
            format!("worker {id} is not connected"),
        )
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
