//! `epoll(7)`: the one readiness loop of the primary and of a worker.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use super::cvt;

/// `EPOLLIN`.
pub const READABLE: u32 = libc::EPOLLIN as u32;
/// `EPOLLOUT`.
pub const WRITABLE: u32 = libc::EPOLLOUT as u32;
/// `EPOLLRDHUP`: the peer closed its writing half.
pub const READ_HUP: u32 = libc::EPOLLRDHUP as u32;
/// `EPOLLHUP`.
pub const HUP: u32 = libc::EPOLLHUP as u32;
/// `EPOLLERR`.
pub const ERROR: u32 = libc::EPOLLERR as u32;
/// `EPOLLEXCLUSIVE`: wake one waiter, not every process sharing a listener.
pub const EXCLUSIVE: u32 = libc::EPOLLEXCLUSIVE as u32;

/// An epoll instance, created close-on-exec.
#[derive(Debug)]
pub struct Epoll {
    fd: OwnedFd,
}

/// A reusable buffer of ready events.
pub struct Events {
    list: Vec<libc::epoll_event>,
    len: usize,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").field("len", &self.len).finish()
    }
}

impl Events {
    /// Room for `capacity` events per wait.
    pub fn with_capacity(capacity: usize) -> Events {
        Events {
            list: vec![libc::epoll_event { events: 0, u64: 0 }; capacity.max(1)],
            len: 0,
        }
    }

    /// The ready events of the last wait as `(token, event flags)`.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.list[..self.len].iter().map(|e| {
            let (token, flags) = (e.u64, e.events);
            (token, flags)
        })
    }

    /// Number of ready events.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the last wait returned nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Epoll {
    /// `epoll_create1(EPOLL_CLOEXEC)`.
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain call; returns a new fd or -1.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: fd was just created and is unowned.
        Ok(Epoll {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn ctl(&self, op: i32, fd: BorrowedFd<'_>, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: ev is a live epoll_event; fd is borrowed and open.
        cvt(unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd.as_raw_fd(), &mut ev) })?;
        Ok(())
    }

    /// `epoll_ctl(EPOLL_CTL_ADD)` with level-triggered `events` and `token`.
    pub fn add(&self, fd: BorrowedFd<'_>, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, events, token)
    }

    /// `epoll_ctl(EPOLL_CTL_MOD)`.
    pub fn modify(&self, fd: BorrowedFd<'_>, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, events, token)
    }

    /// `epoll_ctl(EPOLL_CTL_DEL)`.
    pub fn delete(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// `epoll_wait(2)`; `None` waits forever. The timeout is rounded up to
    /// the next millisecond so that a short one never becomes a busy loop.
    /// `EINTR` is not retried: it returns `Ok(0)` and the caller re-checks
    /// its deadlines.
    pub fn wait(&self, events: &mut Events, timeout: Option<Duration>) -> io::Result<usize> {
        let ms = match timeout {
            None => -1,
            Some(t) => {
                let ms = (t.as_micros() + 999) / 1000;
                ms.min(i32::MAX as u128) as i32
            }
        };
        // SAFETY: the list is live and writable for list.len() events.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                events.list.as_mut_ptr(),
                events.list.len() as i32,
                ms,
            )
        };
        match cvt(n) {
            Ok(n) => {
                events.len = n as usize;
                Ok(n as usize)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                events.len = 0;
                Ok(0)
            }
            Err(e) => Err(e),
        }
    }
}

impl AsFd for Epoll {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
