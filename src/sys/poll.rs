//! `poll(2)` on a few fds, for a blocking wait on one listener and the channel.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

/// `POLLIN`.
pub const IN: i16 = libc::POLLIN;
/// `POLLHUP`.
pub const HUP: i16 = libc::POLLHUP;
/// `POLLERR`.
pub const ERR: i16 = libc::POLLERR;

/// Waits until one of `fds` (with its `events`) is ready; returns each fd's
/// `revents` in `out`. `EINTR` returns `Ok(())` with `out` all zero; `None`
/// waits forever, and a timeout is rounded up to the next millisecond.
pub fn poll(
    fds: &[(BorrowedFd<'_>, i16)],
    out: &mut [i16],
    timeout: Option<Duration>,
) -> io::Result<()> {
    let mut list = [libc::pollfd {
        fd: -1,
        events: 0,
        revents: 0,
    }; 4];
    let n = fds.len().min(list.len()).min(out.len());
    for (slot, (fd, ev)) in list.iter_mut().zip(fds.iter()).take(n) {
        slot.fd = fd.as_raw_fd();
        slot.events = *ev;
    }
    let ms = timeout.map_or(-1, |t| {
        ((t.as_micros() + 999) / 1000).min(i32::MAX as u128) as i32
    });
    // SAFETY: list holds n initialised pollfds that live across the call.
    let rc = unsafe { libc::poll(list.as_mut_ptr(), n as libc::nfds_t, ms) };
    for (o, p) in out.iter_mut().zip(list.iter()).take(n) {
        *o = if rc > 0 { p.revents } else { 0 };
    }
    match super::cvt(rc) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
        Err(e) => Err(e),
    }
}
