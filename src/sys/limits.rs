//! Resource limits: `getrlimit(2)`, one resource per function.

use std::io;

use super::cvt;

/// One resource limit as `getrlimit(2)` reports it. `None` stands for
/// `RLIM_INFINITY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    /// The limit the kernel enforces.
    pub soft: Option<u64>,
    /// The ceiling an unprivileged process may raise `soft` to.
    pub hard: Option<u64>,
}

// rlim_t is 32 bits on 32-bit glibc, so the cast is not always a no-op.
#[allow(clippy::unnecessary_cast)]
fn from_raw(rl: libc::rlimit) -> Rlimit {
    let finite = |v: libc::rlim_t| (v != libc::RLIM_INFINITY).then_some(v as u64);
    Rlimit {
        soft: finite(rl.rlim_cur),
        hard: finite(rl.rlim_max),
    }
}

/// `getrlimit(RLIMIT_NOFILE)`: one more than the highest fd number this
/// process may open. Never `EINTR`.
pub fn nofile() -> io::Result<Rlimit> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: rl is a valid, writable rlimit.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) })?;
    Ok(from_raw(rl))
}

/// `getrlimit(RLIMIT_NPROC)`: how many processes (threads included) the
/// real user id may have; `fork` fails with `EAGAIN` beyond it. The kernel
/// does not enforce it for root (`CAP_SYS_RESOURCE`, `CAP_SYS_ADMIN`).
/// Never `EINTR`.
pub fn nproc() -> io::Result<Rlimit> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: rl is a valid, writable rlimit.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NPROC, &mut rl) })?;
    Ok(from_raw(rl))
}
