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
//! | `shared.rs` | binding a handle's socket (both policies), removing its Unix file |
//! | `endpoints.rs` | what each query gets: TCP, Unix, UDP, the program's own fds |
//! | `policy.rs` | where workers may listen ([`ListenRules`]) |
//! | `timers.rs` | deadlines: kills, pauses, orphans, hangs, stalls |
//! | `event_loop.rs` | `next_event`: epoll, signals, frames from workers |
//! | `upgrade.rs` | inherited sockets (systemd, an upgrade) and the binary upgrade |
//!
//! # The program's own sockets
//!
//! [`Primary::listen`] binds before any worker is forked, so that a port in
//! use is an error at startup. [`Primary::new`] adopts the listening sockets
//! this process inherited: systemd's socket activation (`LISTEN_FDS` for
//! this pid, with `LISTEN_FDNAMES`) and a previous primary's binary upgrade
//! (`SYNCLUSTER_UPGRADE_FDS`, see [`Primary::upgrade`]). Each must be a
//! listening stream socket; anything else fails `new` with an error naming
//! the fd. A worker's `listen()` on a matching address, or on `fd:NAME`
//! for an inherited socket's name, gets that socket instead of a new bind
//! (see [`Primary::listen`] for what matches). These sockets are the
//! program's: they stay open when their last worker leaves, until
//! [`Primary::close_listener`], [`Primary::disconnect_all`] (a stop: new
//! connections are refused rather than left in a backlog nobody accepts
//! from) or the drop of the `Primary`. systemd's and the upgrade's
//! variables never reach a worker.
//!
//! # Trust
//!
//! Every frame a worker sends is hostile input, and the primary is a
//! privilege boundary when workers run under another uid:
//!
//! - **Where workers listen.** [`Settings::listen_rules`] decides; by
//!   default anything (as Node) unless [`Settings::uid`] or
//!   [`Settings::gid`] is set, then [`ListenRules::unprivileged`]: no port
//!   below 1024, no Unix path outside listed directories. A denied request
//!   fails the worker's `listen()` with `PermissionDenied` naming the
//!   address; the worker is not killed. The program's own sockets
//!   ([`Primary::listen`], inherited ones) are offered whatever the rules:
//!   binding port 80 in the primary for unprivileged workers is what they
//!   are for. A worker gets them, never anything more.
//! - **Unix socket files** are removed through the directory fd kept since
//!   bind, and only while the entry is still the socket bound (same device
//!   and inode): never a file a worker swapped in, never through a symlink
//!   it planted. They are removed when the handle closes and when the
//!   `Primary` is dropped.
//! - **Bounded.** One worker holds at most [`Settings::max_worker_handles`]
//!   listening handles (created or joined); past that its `listen()` fails
//!   with `EMFILE` naming the cap. That is not counted as misbehaviour: an
//!   honest program may listen on many ports, and the cap alone bounds
//!   what it costs. Queries are answered at once, so none waits in the
//!   primary; the answers queue in the channel, under its caps. Each turn
//!   reads at most 64 frames, 256 KiB or 256 fds from one worker, so one
//!   worker cannot hold the loop while signals, accepts and the others
//!   wait; the rest is read on the next turn. A turn runs only once every
//!   event was handed out, so the event queue grows by at most that per
//!   worker while the program is busy. At most `max_worker_handles`
//!   sockets of crashed workers are kept for their replacements.
//! - **Resources the primary lacks** (`EMFILE` while binding or passing a
//!   shared socket) are the primary's problem: the worker gets the error
//!   from `listen()` and is not killed.
//! - **Claims a worker may not make** are protocol errors: [`Event::Error`]
//!   names it and the worker is killed; the others go on. A worker may not
//!   close a handle it was never given, report listening on a handle it
//!   did not query (or twice for one answer), name connections in a reply
//!   (it takes them by reading its pipe), refuse a handle it has no pipe
//!   for, attach fds or a payload to a control frame that has none, or
//!   send `QueryReply`, `NewConn`, `Disconnect` or `Ack`. Harmless
//!   repeats are allowed: a second `Online`, a repeated
//!   `ExitedAfterDisconnect` (answered again), a query for a handle it
//!   already holds (answered again, nothing new bound).
//! - **Its pipes** are the primary's to write: their primary end is shut
//!   for reading, so a worker that writes into one gets `EPIPE`. A worker
//!   that tears a record (reads part of it) takes that connection and no
//!   other: every fd the primary reads back from a pipe is one it wrote
//!   there, whatever the bytes around it say.
//! - **A disconnecting worker** (the program called
//!   [`Primary::disconnect`], or the worker said it leaves) gets its
//!   queries refused with `ECONNABORTED`, nothing bound: Node ignores
//!   them, which leaves the worker's `listen()` waiting forever, and its
//!   request may have crossed the disconnect on the wire, so it is not a
//!   protocol error.
//!
//! # Exits
//!
//! Each worker has a pidfd (`pidfd_open(2)`, Linux 5.3) in the epoll set:
//! its exit is seen even when another thread of the program takes
//! `SIGCHLD` (a thread started before [`Primary::new`] has the signals
//! unblocked). Where `pidfd_open` is missing (`ENOSYS`), or fails, the
//! signalfd's `SIGCHLD` is the way, as before; it stays on in any case.
//! Workers are reaped by pid, so a child the program started itself keeps
//! its exit status for its own `wait` -- except when the primary is PID 1
//! (a container without an init): then nobody else would reap orphans, so
//! on each `SIGCHLD` and worker exit it also reaps every other child, the
//! program's own included (a program that is PID 1 and waits for its own
//! children should run under an init such as `tini` or `docker --init`).

#![forbid(unsafe_code)]

mod endpoints;
mod event_loop;
mod handles;
mod least_loaded;
mod plain;
mod policy;
mod reuseport;
mod round_robin;
mod served;
pub(crate) mod shared;
mod timers;
mod upgrade;
mod workers;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use self::event_loop::{TOKEN_SIGNAL, TOKEN_USER};
use self::handles::Handle;
pub use self::plain::{Plain, DATAGRAMS_PER_TURN};
pub use self::policy::{ListenRules, TcpRule};
use self::round_robin::Conn;
pub use self::shared::Address;
pub(crate) use self::upgrade::UPGRADE_VARS;
pub use self::upgrade::{
    DEFAULT_UPGRADE_TIMEOUT, ENV_UPGRADE_FDS, ENV_UPGRADE_PID, ENV_UPGRADE_READY,
};
use self::workers::Slot;
pub use self::workers::{ExitStatus, State, WorkerInfo};
pub use crate::env::{ENV_CHANNEL_FD, ENV_RR_WINDOW, ENV_SCHED_POLICY, ENV_WORKER_ID};
use crate::ipc::wire;
use crate::protocol::Policy;
use crate::signal::Signal;
use crate::sys::{epoll, signal};

/// Signals the primary turns into events instead of dying of them.
pub(crate) const SIGNALS: [i32; 9] = [
    signal::SIGCHLD,
    signal::SIGTERM,
    signal::SIGINT,
    signal::SIGHUP,
    signal::SIGQUIT,
    signal::SIGTTIN,
    signal::SIGTTOU,
    signal::SIGUSR1,
    signal::SIGUSR2,
];

/// Whether worker stdout/stderr are inherited or piped to the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Stdio {
    /// Workers write to the primary's own stdout/stderr (the default).
    #[default]
    Inherit,
    /// Each worker's stdout/stderr is a pipe; see [`Primary::take_stdout`].
    /// The program must drain both pipes (register them with
    /// [`Primary::register`] and read them, or hand them to a thread):
    /// once one is full (64 KiB), the worker blocks in its next write.
    Pipe,
}

/// Settings for future forks (≈ `cluster.setupPrimary`). Start from
/// `Settings::default()` and assign fields; new fields will come with
/// defaults, so it is `#[non_exhaustive]`. [`Settings::validate`] checks the
/// ranges; [`Primary::new`] and every fork call it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Settings {
    /// Program to exec; `None` means the running executable (`/proc/self/exe`).
    pub exec: Option<PathBuf>,
    /// Arguments after `argv[0]`; `None` means the primary's own.
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
    /// Round robin, shared, least-loaded or reuseport (see [`Policy`]);
    /// [`role`](crate::role) takes the default from
    /// `SYNCLUSTER_SCHED_POLICY`, else rr.
    pub policy: Policy,
    /// `listen(2)` backlog when the worker asks for none (511, as Node;
    /// 1 to 2^31-1).
    pub backlog: u32,
    /// Connections the primary holds per listener before it stops accepting
    /// and lets the kernel backlog absorb the burst (1024; at least 1).
    pub queue_limit: usize,
    /// Connections handed to one worker (written to its pipe) and not yet
    /// taken by it (4; Node: 1; 1 to 253). The primary holds no fd for
    /// them; the pipe does, and gives them back if the worker never reads
    /// them.
    /// [`role`](crate::role) takes it from `SYNCLUSTER_RR_WINDOW` when set.
    pub window: usize,
    /// When the last worker of a listening socket dies unexpectedly, keep
    /// the socket this long (not accepting: the kernel backlog holds new
    /// connections) so that a replacement listens on the same port and no
    /// client is refused. A deliberate disconnect closes it at once.
    pub orphan_linger: Duration,
    /// Where workers may listen. `None`: anywhere, as Node, unless `uid` or
    /// `gid` is set, then [`ListenRules::unprivileged`] (decided per worker
    /// when it is forked).
    pub listen_rules: Option<ListenRules>,
    /// Listening handles one worker may hold at once, created or joined
    /// (64); past it, its `listen()` fails with `EMFILE`.
    pub max_worker_handles: usize,
    /// More fds for every worker (Node's `stdio[4]` and up): each fd goes
    /// to its target number in the worker, which takes it with
    /// [`Worker::take_fd`](crate::Worker::take_fd). Set with
    /// [`Settings::map_fd`], which checks the targets; a fork with a
    /// target outside 4..64, or repeated, fails with `InvalidInput`.
    pub extra_fds: Vec<(Arc<OwnedFd>, i32)>,
    /// Run [`exec`](Settings::exec) as a plain program, with no channel:
    /// its sockets at fd 3, 4, ... with `LISTEN_FDS`, readiness through
    /// `NOTIFY_SOCKET` (see [`Plain`]). Needs [`Policy::Shared`]: the
    /// workers accept themselves. `None` (the default): syncluster workers.
    pub plain: Option<Plain>,
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
            orphan_linger: Duration::from_secs(30),
            listen_rules: None,
            max_worker_handles: 64,
            extra_fds: Vec::new(),
            plain: None,
        }
    }
}

/// The range of [`Settings::window`]: 253 at most (one `sendmsg`'s fds, the
/// bound when connections traveled in frames, kept: every fd in a pipe is
/// in flight, counted against the user's `RLIMIT_NOFILE` by the kernel).
const WINDOW: std::ops::RangeInclusive<usize> = 1..=wire::MAX_FDS;

/// The most fds [`Settings::map_fd`] takes: what the spawn plan maps
/// besides the channel, stdout and stderr.
pub const MAX_EXTRA_FDS: usize = crate::sys::process::MAX_FD_MAPPINGS - 3;

impl Settings {
    /// Checks every field's range, the one place that does: an
    /// `InvalidInput` error names the field and the range. Values are never
    /// clamped silently.
    pub fn validate(&self) -> io::Result<()> {
        let bad = |msg: String| Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
        if !WINDOW.contains(&self.window) {
            return bad(format!(
                "Settings::window = {}: expected {} to {}",
                self.window,
                WINDOW.start(),
                WINDOW.end()
            ));
        }
        if self.queue_limit == 0 {
            return bad("Settings::queue_limit = 0: expected at least 1".into());
        }
        if self.backlog == 0 || self.backlog > i32::MAX as u32 {
            return bad(format!(
                "Settings::backlog = {}: expected 1 to {}",
                self.backlog,
                i32::MAX
            ));
        }
        if self.max_worker_handles == 0 {
            return bad("Settings::max_worker_handles = 0: expected at least 1".into());
        }
        if self.plain.is_some() && self.policy != Policy::Shared {
            return bad(format!(
                "Settings::plain with Settings::policy = {}: plain workers accept on their \
                 sockets themselves, set Policy::Shared",
                self.policy
            ));
        }
        if let (Some(uid), None) = (self.uid, self.gid) {
            return bad(format!(
                "Settings::uid: uid {uid} without a gid, the worker would keep the primary's \
                 group (set both, or use Settings::set_user)"
            ));
        }
        Ok(())
    }

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

    /// Puts `fd` at number `target` in every worker forked from now on
    /// (Node's `stdio` entries past the channel: `stdio[4]` is fd 4). Give
    /// it one end of a pipe or socketpair and keep the other to talk to
    /// the workers; the worker takes its end with
    /// [`Worker::take_fd`](crate::Worker::take_fd). `target` must be 4 to
    /// 63 (0 to 2 are stdio, 3 the channel) and not mapped already; at
    /// most [`MAX_EXTRA_FDS`]; else `InvalidInput`. The fd is shared by
    /// every clone of these settings and closed with the last one.
    pub fn map_fd(&mut self, fd: OwnedFd, target: i32) -> io::Result<()> {
        check_extra_fd(target, &self.extra_fds)?;
        self.extra_fds.push((Arc::new(fd), target));
        Ok(())
    }
}

// Why `target` may not be mapped next to `mapped`.
pub(super) fn check_extra_fd(target: i32, mapped: &[(Arc<OwnedFd>, i32)]) -> io::Result<()> {
    let bad = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
    if !(4..64).contains(&target) {
        return Err(bad(format!(
            "extra fd target {target}: must be 4 to 63 (0-2 are stdio, 3 the channel)"
        )));
    }
    if mapped.iter().any(|(_, t)| *t == target) {
        return Err(bad(format!("extra fd target {target} is mapped twice")));
    }
    if mapped.len() >= MAX_EXTRA_FDS {
        return Err(bad(format!(
            "extra fd target {target}: at most {MAX_EXTRA_FDS} extra fds"
        )));
    }
    Ok(())
}

/// What [`Primary::next_event`] reports.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// A worker was forked (its exec succeeded).
    Fork(u32),
    /// The worker's first frame arrived.
    Online(u32),
    /// The worker listens on this address (port 0 resolved).
    Listening {
        /// The worker.
        id: u32,
        /// Where it listens.
        address: Address,
    },
    /// A user message from a worker, with any fds it sent (now owned by
    /// the program).
    Message {
        /// The sender.
        id: u32,
        /// The message.
        bytes: Vec<u8>,
        /// The fds that came with it.
        fds: Vec<OwnedFd>,
    },
    /// The worker's channel closed.
    Disconnect(u32),
    /// The worker's process ended. It is the last event of a worker.
    Exit {
        /// The worker.
        id: u32,
        /// How it ended.
        status: ExitStatus,
        /// True when a disconnect was asked for, by either side, before it
        /// ended (≈ `worker.exitedAfterDisconnect`).
        exited_after_disconnect: bool,
    },
    /// A signal the primary should act on (SIGTERM, SIGINT, SIGHUP, ...).
    /// The primary blocks them, so nothing happens unless the program acts.
    Signal(Signal),
    /// Something went wrong with a worker: it broke the protocol (it is
    /// being killed; `Disconnect` and `Exit` follow) or a message it sent
    /// lost fds on the way in.
    Error {
        /// The worker (0 when the error concerns no single worker).
        id: u32,
        /// What went wrong.
        error: io::Error,
    },
    /// A worker held connections longer than the hang timeout without
    /// taking the next one; it is being killed.
    Hung(u32),
    /// A worker reached the limit of [`Primary::set_max_requests`]: time
    /// to replace it (the supervisor's `max_requests`). Once per worker.
    MaxRequests {
        /// The worker.
        id: u32,
        /// What it served: requests if it reports them, else connections.
        count: u64,
    },
    /// The new primary of a binary upgrade ([`Primary::upgrade`]) is
    /// ready: every worker of it listens. This primary should now leave
    /// the sockets to it ([`Primary::retire`]) and exit once its workers
    /// are done. The new primary is no longer watched.
    UpgradeReady {
        /// The new primary.
        pid: i32,
    },
    /// The binary upgrade failed: the new program exited, closed its
    /// readiness pipe, or was not ready in time, and was killed and
    /// reaped. Nothing changed for this primary, which goes on serving.
    UpgradeFailed {
        /// The new program's pid (gone now).
        pid: i32,
        /// What happened, and how it ended.
        reason: String,
    },
    /// An fd given to [`Primary::register`] is ready.
    Ready {
        /// The token it was registered with.
        token: u64,
        /// What it is ready for.
        readiness: crate::readiness::Readiness,
    },
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
    /// Sockets the program offered workers ([`Primary::listen_fd`]), by
    /// fd number.
    offered: BTreeMap<i32, OwnedFd>,
    next_handle: u32,
    /// The slots of each reuseport handle, by handle.
    reuseport: BTreeMap<u32, reuseport::Group>,
    next_conn: u32,
    events: VecDeque<Event>,
    hang_timeout: Option<Duration>,
    /// Workers whose read budget ran out last turn: read them next turn.
    read_again: Vec<u32>,
    /// The signal mask `new` found, put back on drop.
    old_mask: signal::SigMask,
    /// PID 1 reaps every child, not only its workers.
    init: bool,
    // Scratch buffers reused on the hot path.
    batch: Vec<(u32, Vec<Conn>)>,
    /// Inherited sockets and binary upgrades.
    deploy: upgrade::Deploy,
    /// Plain-program workers (`Settings::plain`).
    plain: plain::PlainState,
}

impl Primary {
    /// Creates the primary: blocks SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGQUIT,
    /// SIGTTIN, SIGTTOU and SIGUSR2 in this thread and reads them from a
    /// signalfd (all but SIGCHLD come out as [`Event::Signal`]). Create it before starting any thread, so that no
    /// other thread takes those signals (worker exits are seen through
    /// pidfds anyway; see the module docs). Dropping the `Primary` puts the
    /// signal mask back.
    ///
    /// The first `Primary` of a process adopts the listening sockets the
    /// process inherited (see "The program's own sockets" in the module
    /// docs); one that is not a listening stream socket, or a malformed
    /// variable, is an `InvalidInput` error naming the variable and fd.
    pub fn new(settings: Settings) -> io::Result<Primary> {
        settings.validate()?;
        let old_mask = signal::block(&SIGNALS)?;
        let made = signal::signalfd(&SIGNALS).and_then(|sigfd| {
            let epoll = epoll::Epoll::new()?;
            epoll.add(sigfd.as_fd(), epoll::READABLE, TOKEN_SIGNAL)?;
            Ok((sigfd, epoll))
        });
        let (sigfd, epoll) = match made {
            Ok(v) => v,
            Err(e) => {
                let _ = signal::set_mask(&old_mask);
                return Err(e);
            }
        };
        let mut p = Primary {
            settings,
            epoll,
            events_buf: epoll::Events::with_capacity(256),
            sigfd,
            workers: BTreeMap::new(),
            pids: HashMap::new(),
            next_id: 1,
            handles: BTreeMap::new(),
            keys: HashMap::new(),
            offered: BTreeMap::new(),
            next_handle: 1,
            reuseport: BTreeMap::new(),
            next_conn: 1,
            events: VecDeque::new(),
            hang_timeout: None,
            read_again: Vec::new(),
            old_mask,
            init: crate::sys::process::getpid() == 1,
            batch: Vec::new(),
            deploy: upgrade::Deploy::default(),
            plain: plain::PlainState::default(),
        };
        // On error `p` drops: the mask goes back, adopted fds close.
        p.adopt_inherited()?;
        Ok(p)
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
            .map(|(&id, s)| {
                // As of now: what left the pipes since the loop last looked
                // was taken.
                let unread = s.unread();
                WorkerInfo {
                    id,
                    pid: s.pid,
                    state: s.state,
                    exited_after_disconnect: s.exited_after_disconnect,
                    in_flight: unread,
                    taken: s.served.taken + (s.in_flight.len() - unread) as u64,
                    requests: s.served.requests,
                }
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

/// The primary's epoll fd: readable whenever [`Primary::try_next_event`]
/// has something to do (a signal, a worker's frame or exit, a connection to
/// accept, a registered fd). Poll it from another loop; do not read it.
impl AsFd for Primary {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }
}

impl std::os::fd::AsRawFd for Primary {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.epoll.as_fd())
    }
}

impl Drop for Primary {
    /// Removes the Unix socket files of the open handles (only those still
    /// the sockets bound) and puts back the signal mask [`Primary::new`]
    /// found, in the calling thread. A signal that arrived since the last
    /// turn and was not read is then delivered with its own disposition,
    /// as if the primary had never blocked it. Workers are not touched: they
    /// see their channel close and leave. A new primary whose upgrade is
    /// still in progress is killed and reaped: nobody would retire for it.
    fn drop(&mut self) {
        self.cancel_upgrade();
        self.handles.clear();
        let _ = signal::set_mask(&self.old_mask);
    }
}

/// Reads `SYNCLUSTER_SCHED_POLICY`: unset gives `None`; a name
/// [`Policy::parse`] reads gives the policy; anything else is an `InvalidInput` error naming it.
pub(crate) fn policy_from_env() -> io::Result<Option<Policy>> {
    match std::env::var_os(ENV_SCHED_POLICY) {
        None => Ok(None),
        Some(v) => match v.to_str().and_then(Policy::parse) {
            Some(p) => Ok(Some(p)),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{ENV_SCHED_POLICY}={:?}: expected {}",
                    Path::new(&v)
                        .as_os_str()
                        .as_bytes()
                        .escape_ascii()
                        .to_string(),
                    Policy::EXPECTED
                ),
            )),
        },
    }
}

/// Reads `SYNCLUSTER_RR_WINDOW`: unset gives `None`; 1 to 253 give the
/// window; anything else is an `InvalidInput` error naming it.
pub(crate) fn window_from_env() -> io::Result<Option<usize>> {
    match std::env::var_os(ENV_RR_WINDOW) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|n| WINDOW.contains(n))
            .map(Some)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{ENV_RR_WINDOW}={v:?}: expected {} to {}",
                        WINDOW.start(),
                        WINDOW.end()
                    ),
                )
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // This thread's blocked signals, from /proc.
    fn blocked() -> u64 {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        let hex = status
            .lines()
            .find_map(|l| l.strip_prefix("SigBlk:"))
            .unwrap()
            .trim();
        u64::from_str_radix(hex, 16).unwrap()
    }

    #[test]
    fn dropping_the_primary_puts_the_signal_mask_back() {
        let before = blocked();
        let p = Primary::new(Settings::default()).unwrap();
        let during = blocked();
        for sig in SIGNALS {
            assert_ne!(during & (1 << (sig - 1)), 0, "signal {sig} not blocked");
        }
        drop(p);
        assert_eq!(blocked(), before);
    }

    #[test]
    fn a_foreign_poll_loop_drives_the_primary_with_its_fd_and_try_next_event() {
        let settings = Settings {
            exec: Some("/bin/sh".into()),
            args: Some(vec!["-c".into(), "exit 3".into()]),
            ..Settings::default()
        };
        let mut p = Primary::new(settings).unwrap();
        assert!(p.try_next_event().unwrap().is_none(), "nothing yet");
        let id = p.fork().unwrap();
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !seen.iter().any(|e| matches!(e, Event::Exit { .. })) {
            assert!(std::time::Instant::now() < deadline, "no exit: {seen:?}");
            // The host loop: poll(2) on the primary's fd, bounded by its timeout.
            let mut rev = [0i16; 1];
            let wait = p.poll_timeout().unwrap_or(Duration::from_secs(1));
            crate::sys::poll::poll(&[(p.as_fd(), crate::sys::poll::IN)], &mut rev, Some(wait))
                .unwrap();
            while let Some(ev) = p.try_next_event().unwrap() {
                seen.push(ev);
            }
        }
        assert!(matches!(seen[0], Event::Fork(i) if i == id), "{seen:?}");
        assert!(
            seen.iter().any(|e| matches!(
                e,
                Event::Exit { id: i, status: ExitStatus::Code(3), .. } if *i == id
            )),
            "{seen:?}"
        );
        assert!(p.try_next_event().unwrap().is_none());
    }

    #[test]
    fn out_of_range_settings_are_refused_by_name_not_clamped() {
        for (settings, field) in [
            (
                Settings {
                    window: 0,
                    ..Settings::default()
                },
                "window",
            ),
            (
                Settings {
                    window: 254,
                    ..Settings::default()
                },
                "window",
            ),
            (
                Settings {
                    queue_limit: 0,
                    ..Settings::default()
                },
                "queue_limit",
            ),
            (
                Settings {
                    backlog: 0,
                    ..Settings::default()
                },
                "backlog",
            ),
            (
                Settings {
                    max_worker_handles: 0,
                    ..Settings::default()
                },
                "max_worker_handles",
            ),
            (
                Settings {
                    uid: Some(65534),
                    ..Settings::default()
                },
                "uid",
            ),
        ] {
            let e = Primary::new(settings).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
            assert!(e.to_string().contains(field), "{field}: {e}");
        }
        // A change through settings_mut is checked at the next fork.
        let mut p = Primary::new(Settings::default()).unwrap();
        p.settings_mut().window = 1000;
        let e = p.fork().unwrap_err();
        assert!(e.to_string().contains("window = 1000"), "{e}");
        assert!(p.workers().is_empty());
    }
}
