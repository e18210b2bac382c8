//! Readiness types shared by the primary's and the worker's loops: what a
//! caller registers its own fds for, and what it gets back.

#![forbid(unsafe_code)]

use crate::sys::epoll;

/// Readiness interest for `Worker::register` and `Primary::register`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Interest {
    /// Wake when readable (or the peer hung up).
    pub readable: bool,
    /// Wake when writable.
    pub writable: bool,
}

impl Interest {
    /// Readable only.
    pub const READABLE: Interest = Interest {
        readable: true,
        writable: false,
    };
    /// Writable only.
    pub const WRITABLE: Interest = Interest {
        readable: false,
        writable: true,
    };
    /// Both.
    pub const BOTH: Interest = Interest {
        readable: true,
        writable: true,
    };

    pub(crate) fn epoll_bits(self) -> u32 {
        let mut b = 0;
        if self.readable {
            b |= epoll::READABLE | epoll::READ_HUP;
        }
        if self.writable {
            b |= epoll::WRITABLE;
        }
        b
    }
}

/// What a registered fd is ready for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    /// Readable, or the peer closed (a read will not block).
    pub readable: bool,
    /// Writable.
    pub writable: bool,
    /// Hung up or in error.
    pub hup: bool,
}

impl Readiness {
    pub(crate) fn from_epoll(flags: u32) -> Readiness {
        Readiness {
            readable: flags & (epoll::READABLE | epoll::READ_HUP | epoll::HUP) != 0,
            writable: flags & epoll::WRITABLE != 0,
            hup: flags & (epoll::HUP | epoll::ERROR) != 0,
        }
    }
}
