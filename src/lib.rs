//! syncluster: Node.js's `cluster` module rebuilt on raw Linux syscalls.

#![deny(missing_docs)]

#[cfg(not(target_os = "linux"))]
compile_error!(
    "syncluster supports Linux only: it is built on epoll, signalfd, accept4 and SCM_RIGHTS"
);

#[doc(hidden)]
pub mod sys;

pub mod ipc;
pub mod protocol;
