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
//! use syncluster::{Role, primary, worker};
//! use std::io::Write;
//!
//! fn main() -> std::io::Result<()> {
//!     match syncluster::role()? {
//!         Role::Primary(mut primary) => {
//!             for _ in 0..2 {
//!                 primary.fork()?;
//!             }
//!             while let Some(ev) = primary.next_event()? {
//!                 if let primary::Event::Exit(id, status, _) = ev {
//!                     eprintln!("worker {id} ended: {status}");
//!                 }
//!             }
//!         }
//!         Role::Worker(worker) => {
//!             let listener = worker.listen("127.0.0.1:8000")?;
//!             for stream in listener.incoming() {
//!                 stream?.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")?;
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
//! | cluster | [`primary`], [`worker`], [`protocol`] | the cluster protocol, not syscalls |
//! | ipc | [`ipc::wire`], [`ipc::channel`] | frames and fds, not clusters |
//! | sys | `sys` | raw syscalls: the only module that names `libc` |
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

#[cfg(not(target_os = "linux"))]
compile_error!(
    "syncluster supports Linux only: it is built on epoll, signalfd, accept4 and SCM_RIGHTS"
);

#[doc(hidden)]
pub mod sys;

mod env;
pub mod ipc;
pub mod primary;
pub mod protocol;
mod readiness;
pub mod supervisor;
pub mod worker;

/// Signal numbers the primary reports as [`primary::Event::Signal`], and
/// the ones a program commonly sends to workers.
pub mod signal {
    pub use crate::sys::signal::{
        SIGCHLD, SIGHUP, SIGINT, SIGKILL, SIGQUIT, SIGTERM, SIGTTIN, SIGTTOU, SIGUSR1, SIGUSR2,
    };
}

use std::io;

pub use primary::{Event as PrimaryEvent, Primary, Settings};
pub use protocol::Policy;
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

/// Tells the primary from a worker by `SYNCLUSTER_WORKER_ID` and
/// `SYNCLUSTER_CHANNEL_FD` (≈ `cluster.isPrimary`), and removes both from
/// the environment. A malformed value, or an fd that is not our parent's
/// socket, is an `InvalidInput` error naming the variable.
pub fn role() -> io::Result<Role> {
    match Worker::from_env()? {
        Some(w) => Ok(Role::Worker(w)),
        None => {
            let mut settings = Settings::default();
            if let Some(p) = primary::policy_from_env()? {
                settings.policy = p;
            }
            if let Some(w) = primary::window_from_env()? {
                settings.window = w;
            }
            Primary::new(settings).map(Role::Primary)
        }
    }
}
