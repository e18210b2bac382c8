//! Process fds: `pidfd_open(2)` (Linux 5.3). A pidfd turns readable when
//! its process exits, whatever happens to `SIGCHLD`, so the primary sees
//! every worker's exit in its epoll set even when another thread of the
//! program takes the signal.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

use super::cvt;

/// `syscall(SYS_pidfd_open, pid, 0)`: an fd that refers to process `pid`,
/// close-on-exec (the kernel always sets it). It works on a zombie too, so
/// a child that already exited is reported at once. `ENOSYS` before Linux
/// 5.3 (and under seccomp filters that predate it). Never `EINTR`.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    if pid <= 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("pid {pid} is not a single process"),
        ));
    }
    // SAFETY: pidfd_open takes a pid and flags; no pointers.
    let fd = cvt(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    // SAFETY: fd was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pidfd_of_self_is_cloexec_and_bad_pids_are_refused() {
        match pidfd_open(std::process::id() as i32) {
            Ok(fd) => {
                use std::os::fd::AsFd;
                assert!(crate::sys::fd::is_cloexec(fd.as_fd()).unwrap());
            }
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOSYS)),
        }
        assert!(pidfd_open(0).is_err());
        assert!(pidfd_open(-1).is_err());
    }
}
