//! syncluster: Node.js's `cluster` module rebuilt on raw Linux syscalls,
//! with `libc` as the only dependency, no async runtime and no threads.
//!
//! One program runs as the **primary** or as a **worker**. The primary forks
//! and execs copies of the program, owns every listening socket, and either
//! hands each accepted connection to a worker in round robin (the fd crosses
//! a socketpair with `SCM_RIGHTS`) or shares the listening socket with the
//! workers. Primary and workers exchange messages, with fds if they like.
//!
//! ```no_run
//! use std::io::Write;
//! use std::time::Duration;
//! use syncluster::{primary::Event, Role, Signal};
//!
//! fn main() -> std::io::Result<()> {
//!     // Workers get the primary's arguments: they listen where it was told.
//!     let addr = std::env::args().nth(1).unwrap_or("127.0.0.1:8000".into());
//!     match syncluster::role()? {
//!         Role::Primary(mut primary) => {
//!             for _ in 0..2 {
//!                 primary.fork()?;
//!             }
//!             // `None` once every worker has exited.
//!             while let Some(ev) = primary.next_event()? {
//!                 match ev {
//!                     Event::Listening { id, address } => {
//!                         eprintln!("worker {id} listens on {address}")
//!                     }
//!                     // The primary turns these into events instead of dying:
//!                     // stop accepting, let the workers finish, then exit.
//!                     Event::Signal(Signal::TERM | Signal::INT) => {
//!                         primary.disconnect_all(Some(Duration::from_secs(10)))?;
//!                     }
//!                     Event::Exit { id, status, .. } => eprintln!("worker {id} ended: {status}"),
//!                     _ => {}
//!                 }
//!             }
//!         }
//!         Role::Worker(worker) => {
//!             let listener = worker.listen(&addr)?;
//!             // Ends when the primary disconnects this worker.
//!             for stream in listener.incoming() {
//!                 // A client that hung up costs only its own connection.
//!                 let _ = stream?.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
//!             }
//!         }
//!     }
//!     Ok(())
//! }
//! ```
//!
//! # Architecture
//!
//! Data flows down; each layer knows only the one below.
//!
//! | layer | modules | knows |
//! |---|---|---|
//! | public API | `lib.rs` | role detection |
//! | cluster | [`primary`], [`worker`], [`supervisor`], `protocol` | the cluster protocol, not syscalls |
//! | ipc | `ipc::wire`, `ipc::channel` | frames and fds, not clusters |
//! | sys | `sys` | raw syscalls: the only module that names `libc` |
//!
//! Only the cluster layer's [`primary`], [`worker`] and [`supervisor`] are
//! public (with [`Policy`] and [`signal`]): the wire format, the channel
//! and the syscall wrappers are private, so that changing them breaks no
//! user.
//!
//! The primary is one epoll loop over a signalfd, the worker channels and
//! the round-robin listeners; [`primary::Primary::next_event`] turns it.
//! A worker either calls [`worker::Listener::accept`] in a loop, or runs
//! [`worker::Worker::next_event`], which interleaves connections, messages,
//! the disconnect request and readiness of the worker's own fds.
//!
//! Where Node's cluster is weak, syncluster is not: a connection in flight to
//! a worker that dies is handed to another one; the primary's accept queue
//! is bounded; a connection every worker rejects is closed once instead of
//! ping-ponging; `Disconnect` and `Exit` are both always reported.

#![deny(missing_docs)]

// Every Rust block of README.md compiles as a doctest (`cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

#[cfg(not(target_os = "linux"))]
compile_error!(
    "syncluster supports Linux only: it is built on epoll, signalfd, accept4 and SCM_RIGHTS"
);

// Private toolkits: some of their wrappers serve only the unit tests or
// work to come, which a private module would report as dead code.
#[allow(dead_code)]
mod sys;

/// The C API (`include/syncluster.h`): `extern "C"` functions over the public API.
mod capi;
mod env;
#[allow(dead_code)]
mod ipc;
pub mod primary;
mod protocol;
mod readiness;
pub mod supervisor;
mod systemd;
pub mod worker;

pub mod signal;

use std::io;

pub use primary::{Event as PrimaryEvent, Primary, Settings};
pub use protocol::Policy;
pub use signal::Signal;
pub use worker::{Event as WorkerEvent, Listener, Worker};

/// Which side of the cluster this process is.
// One value per process: the size difference between variants is moot.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Role {
    /// The primary, with default [`Settings`] (policy from
    /// `SYNCLUSTER_SCHED_POLICY`, window from `SYNCLUSTER_RR_WINDOW`, when set).
    Primary(Primary),
    /// A worker, already online.
    Worker(Worker),
}

/// Tells the primary from a worker (≈ `cluster.isPrimary`) and sets that
/// side up: a worker adopts its channel and says Online; a primary gets
/// default [`Settings`].
///
/// A process is a worker when `SYNCLUSTER_WORKER_ID` and
/// `SYNCLUSTER_CHANNEL_FD` are set and, if `SYNCLUSTER_WORKER_PID` is set
/// too, it equals this process's pid. A process that inherited a worker's
/// variables (a worker's own child) sees a pid that is not its own, ignores
/// them and is a primary, as systemd's `LISTEN_PID` works. The environment
/// is read, never changed. A malformed value, or a channel fd that is not a
/// socket to our parent, is an `InvalidInput` error naming the variable.
///
/// Call it once per process. Its decision holds for the process's life: a
/// second call is an `AlreadyExists` error naming the role (and worker id)
/// the first call returned. A second `Primary` would take the first one's
/// signals; a second `Worker` would own the channel twice. A call that
/// failed before deciding anything (a malformed variable) may be repeated.
/// [`is_worker`], [`is_primary`] and [`worker_id`] read the decision.
pub fn role() -> io::Result<Role> {
    let mut claim = decision::Claim::take()?;
    match worker::Worker::from_env_claimed(&mut claim)? {
        Some(w) => Ok(Role::Worker(w)),
        None => {
            let mut settings = Settings::default();
            if let Some(p) = primary::policy_from_env()? {
                settings.policy = p;
            }
            if let Some(w) = primary::window_from_env()? {
                settings.window = w;
            }
            let p = Primary::new(settings)?;
            claim.settle(decision::Decided::Primary);
            Ok(Role::Primary(p))
        }
    }
}

/// True once [`role`] returned [`Role::Primary`] in this process (≈
/// `cluster.isPrimary`, except that it is false before `role()` decided).
pub fn is_primary() -> bool {
    decision::current() == Some(decision::Decided::Primary)
}

/// True once [`role`] (or [`Worker::from_env`]) made this process a worker
/// (≈ `cluster.isWorker`).
pub fn is_worker() -> bool {
    worker_id().is_some()
}

/// This worker's id (≈ `cluster.worker.id`), once [`role`] made this
/// process a worker; `None` in a primary or before `role()`.
pub fn worker_id() -> Option<u32> {
    match decision::current() {
        Some(decision::Decided::Worker(id)) => Some(id),
        _ => None,
    }
}

/// What [`role`] decided, for the life of the process (exec starts afresh).
pub(crate) mod decision {
    use std::io;
    use std::sync::atomic::{AtomicU64, Ordering};

    // 0: undecided; 1: a call is deciding; 2: primary; id << 8 | 3: worker
    // id; id << 8 | 4: worker id that adopted its channel, then failed.
    static STATE: AtomicU64 = AtomicU64::new(UNDECIDED);
    const UNDECIDED: u64 = 0;
    const DECIDING: u64 = 1;
    const PRIMARY: u64 = 2;
    const WORKER: u64 = 3;
    const WORKER_FAILED: u64 = 4;

    /// A role this process took.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Decided {
        Primary,
        Worker(u32),
        /// Adopted the channel of worker `id`, then failed: the channel fd
        /// is gone, so no later call may adopt that fd number again.
        FailedWorker(u32),
    }

    fn decode(v: u64) -> Option<Decided> {
        let id = (v >> 8) as u32;
        match v & 0xff {
            PRIMARY => Some(Decided::Primary),
            WORKER => Some(Decided::Worker(id)),
            WORKER_FAILED => Some(Decided::FailedWorker(id)),
            _ => None,
        }
    }

    fn encode(d: Decided) -> u64 {
        match d {
            Decided::Primary => PRIMARY,
            Decided::Worker(id) => u64::from(id) << 8 | WORKER,
            Decided::FailedWorker(id) => u64::from(id) << 8 | WORKER_FAILED,
        }
    }

    /// The decision, if one was made.
    pub(crate) fn current() -> Option<Decided> {
        decode(STATE.load(Ordering::Acquire))
    }

    /// The right to decide, held by one call at a time. Dropped unsettled
    /// (an error before anything was taken over, or a panic), it leaves the
    /// process undecided.
    #[derive(Debug)]
    pub(crate) struct Claim {
        settled: bool,
    }

    impl Claim {
        /// Takes the right to decide, or says why not: `AlreadyExists`
        /// naming the earlier decision.
        pub(crate) fn take() -> io::Result<Claim> {
            match STATE.compare_exchange(UNDECIDED, DECIDING, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => Ok(Claim { settled: false }),
                Err(v) => {
                    let what = match decode(v) {
                        Some(Decided::Primary) => "returned Primary: a second primary would \
                             take the first one's signals"
                            .to_string(),
                        Some(Decided::Worker(id)) => {
                            format!("returned Worker {id}: the channel is adopted once per process")
                        }
                        Some(Decided::FailedWorker(id)) => format!(
                            "adopted the channel of worker {id}, then failed: it cannot be \
                             adopted again"
                        ),
                        None => "is still deciding in another thread".to_string(),
                    };
                    Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("syncluster::role() was already called in this process and {what}"),
                    ))
                }
            }
        }

        /// Records the decision for the rest of the process's life.
        pub(crate) fn settle(&mut self, d: Decided) {
            STATE.store(encode(d), Ordering::Release);
            self.settled = true;
        }
    }

    impl Drop for Claim {
        fn drop(&mut self) {
            if !self.settled {
                STATE.store(UNDECIDED, Ordering::Release);
            }
        }
    }
}
