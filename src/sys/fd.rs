//! Plain fd operations: flags, dup, adopting an inherited fd, rlimits.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::cvt;

/// `fcntl(F_DUPFD_CLOEXEC, 0)`: a close-on-exec duplicate. Never `EINTR`.
pub fn dup(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: fcntl on a borrowed, open fd; the new fd is owned by nobody else.
    let new = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) })?;
    // SAFETY: `new` was just returned by fcntl and is open and unowned.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// `fcntl(F_GETFD)`: whether `FD_CLOEXEC` is set.
pub fn is_cloexec(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: F_GETFD only reads the fd's flags.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) })?;
    Ok(flags & libc::FD_CLOEXEC != 0)
}

/// `fcntl(F_SETFD)`: sets or clears `FD_CLOEXEC`.
pub fn set_cloexec(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    let flag = if on { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: F_SETFD only changes the fd's flags.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flag) })?;
    Ok(())
}

/// `fcntl(F_GETFL)`: whether `O_NONBLOCK` is set on the open file description.
pub fn is_nonblocking(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: F_GETFL only reads the status flags.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    Ok(flags & libc::O_NONBLOCK != 0)
}

/// `fcntl(F_SETFL)`: sets or clears `O_NONBLOCK`.
pub fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFL only reads the status flags.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    let new = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    if new != flags {
        // SAFETY: F_SETFL only changes the status flags.
        cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, new) })?;
    }
    Ok(())
}

/// Takes ownership of an fd inherited across exec (the worker's channel).
///
/// Checks with `fcntl(F_GETFD)` that `raw` is open and refuses 0, 1 and 2,
/// then sets `FD_CLOEXEC` again so the worker's own children do not inherit
/// it. Call it once per inherited fd: nothing else may own `raw`.
pub fn adopt_inherited(raw: RawFd) -> io::Result<OwnedFd> {
    if raw <= 2 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fd {raw} is stdio, not an inherited channel"),
        ));
    }
    // SAFETY: F_GETFD on any integer is harmless; EBADF says it is not open.
    if unsafe { libc::fcntl(raw, libc::F_GETFD) } == -1 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("fd {raw} is not open: {e}"),
        ));
    }
    // SAFETY: the fd is open, and by this function's contract it was inherited
    // across exec for us alone, so no other owner exists.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_cloexec(fd.as_fd(), true)?;
    Ok(fd)
}

/// `getrlimit(RLIMIT_NOFILE)`: (soft, hard).
pub fn nofile_limit() -> io::Result<(u64, u64)> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: rl is a valid, writable rlimit.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) })?;
    Ok((rl.rlim_cur, rl.rlim_max))
}

/// `setrlimit(RLIMIT_NOFILE)` with a new soft limit (the hard limit is kept).
pub fn set_nofile_soft_limit(soft: u64) -> io::Result<()> {
    let (_, hard) = nofile_limit()?;
    let rl = libc::rlimit {
        rlim_cur: soft.min(hard),
        rlim_max: hard,
    };
    // SAFETY: rl is a valid rlimit.
    cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) })?;
    Ok(())
}

/// Opens `/dev/null` read-only and close-on-exec: the fd kept in reserve so
/// that `EMFILE` on accept can be answered by closing one connection (libuv's
/// trick). Retries `EINTR`.
pub fn open_dev_null() -> io::Result<OwnedFd> {
    let path = b"/dev/null\0";
    // SAFETY: path is NUL-terminated; flags create no new file.
    let fd = super::cvt_r(|| unsafe {
        libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC)
    })?;
    // SAFETY: fd was just returned by open and is unowned.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Borrows the raw number of any fd, for messages and tests.
pub fn raw(fd: impl AsFd) -> RawFd {
    fd.as_fd().as_raw_fd()
}
