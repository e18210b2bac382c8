//! Taking over the channel fd a worker inherits across exec.

use std::io;
use std::mem;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::cvt;

/// Adopts `raw` as the worker's channel, after checking, without taking it
/// over, that it is open, is an `AF_UNIX` `SOCK_STREAM` socket and that its
/// peer is our parent process (`SO_PEERCRED`). An unrelated fd that happens
/// to carry that number is left alone and an error names what is wrong.
/// The adopted fd is made close-on-exec again, so the worker's own children
/// do not inherit it. Call once: nothing else may own `raw`.
///
/// Returns the fd and the peer's pid as `SO_PEERCRED` gives it (the pid
/// that made the socketpair: the primary). That pid, not 1, is what tells
/// later whether the primary is still our parent: the primary may itself be
/// pid 1 (a container without an init), and an orphan may be adopted by a
/// subreaper rather than by pid 1.
pub fn adopt_channel(raw: RawFd) -> io::Result<(OwnedFd, i32)> {
    let bad = |why: String| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("channel fd {raw}: {why}"),
        )
    };
    if raw <= 2 {
        return Err(bad("0, 1 and 2 are stdio".into()));
    }
    // SAFETY: F_GETFD on any integer is harmless; EBADF says it is not open.
    if unsafe { libc::fcntl(raw, libc::F_GETFD) } == -1 {
        return Err(bad(format!("not open ({})", io::Error::last_os_error())));
    }
    // SAFETY: raw is open (checked above) and stays open for this borrow,
    // which ends before the function returns.
    let borrowed = unsafe { BorrowedFd::borrow_raw(raw) };
    if !super::socket::is_unix_stream(borrowed) {
        return Err(bad("not a Unix stream socket".into()));
    }
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are writable and len gives cred's size.
    cvt(unsafe {
        libc::getsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    let parent = super::process::getppid();
    if cred.pid != parent {
        return Err(bad(format!(
            "its peer is pid {}, not our parent {parent}",
            cred.pid
        )));
    }
    // SAFETY: the checks above show this is the socketpair end our parent
    // made for us; by this function's contract nobody else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    super::fd::set_cloexec(std::os::fd::AsFd::as_fd(&fd), true)?;
    Ok((fd, cred.pid))
}
