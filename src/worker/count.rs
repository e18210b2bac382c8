//! Open-connection counting: every [`Stream`](super::Stream) a listener
//! gives out carries an [`OpenGuard`] that counts it open for its listener
//! and for the worker until it is dropped.
//!
//! The counters are atomics behind `Arc`s, so a stream may be sent to and
//! dropped on another thread. A shared listener at its connection cap is out
//! of the worker's epoll; the guard of the stream that frees a slot wakes the
//! loop through a socketpair, made only for workers that cap a shared
//! listener (a worker costs two fds by default: its channel and its epoll).

#![forbid(unsafe_code)]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};

/// The worker's total, and its wake socketpair once made.
#[derive(Debug, Default)]
pub(super) struct WorkerCount {
    pub(super) open: AtomicUsize,
    pub(super) waker: OnceLock<Waker>,
}

/// Both ends, non-blocking. The read end lives as long as the write end,
/// so a guard never writes to a closed peer (no `SIGPIPE` in a program that
/// does not ignore it, a C one say), even after the worker is gone.
#[derive(Debug)]
pub(super) struct Waker {
    pub(super) read: UnixStream,
    pub(super) write: UnixStream,
}

/// One listener's count.
#[derive(Debug)]
pub(super) struct ListenerCount {
    pub(super) open: AtomicUsize,
    /// Set while the listener is out of epoll at its cap: a guard that
    /// drops then wakes the loop.
    pub(super) paused: AtomicBool,
    pub(super) worker: Arc<WorkerCount>,
}

impl ListenerCount {
    pub(super) fn new(worker: &Arc<WorkerCount>) -> Arc<ListenerCount> {
        Arc::new(ListenerCount {
            open: AtomicUsize::new(0),
            paused: AtomicBool::new(false),
            worker: worker.clone(),
        })
    }

    pub(super) fn open(&self) -> usize {
        self.open.load(SeqCst)
    }

    /// True when `max` is set and reached. Before it says yes, `paused` is
    /// set, so a guard dropping concurrently either is seen here or sees
    /// `paused` and wakes the loop (both sides are SeqCst: store then load).
    pub(super) fn pause_if_full(&self, max: Option<usize>) -> bool {
        let Some(max) = max else {
            self.paused.store(false, SeqCst);
            return false;
        };
        self.paused.store(true, SeqCst);
        if self.open.load(SeqCst) >= max {
            return true;
        }
        self.paused.store(false, SeqCst);
        false
    }
}

/// Counts one stream open until dropped.
pub(super) struct OpenGuard(Arc<ListenerCount>);

impl OpenGuard {
    pub(super) fn new(count: &Arc<ListenerCount>) -> OpenGuard {
        count.open.fetch_add(1, SeqCst);
        count.worker.open.fetch_add(1, SeqCst);
        OpenGuard(count.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        let c = &self.0;
        c.open.fetch_sub(1, SeqCst);
        c.worker.open.fetch_sub(1, SeqCst);
        if c.paused.load(SeqCst) {
            if let Some(w) = c.worker.waker.get() {
                // Non-blocking: a full socket is already readable.
                let _ = (&w.write).write(&[1]);
            }
        }
    }
}

impl std::fmt::Debug for OpenGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OpenGuard")
    }
}
