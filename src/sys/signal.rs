//! Signals as fds: `sigprocmask` + `signalfd`, so the primary's loop reads
//! them like any other event and no handler ever runs.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::cvt;

/// `SIGHUP`.
pub const SIGHUP: i32 = libc::SIGHUP;
/// `SIGINT`.
pub const SIGINT: i32 = libc::SIGINT;
/// `SIGQUIT`.
pub const SIGQUIT: i32 = libc::SIGQUIT;
/// `SIGKILL`.
pub const SIGKILL: i32 = libc::SIGKILL;
/// `SIGUSR1`.
pub const SIGUSR1: i32 = libc::SIGUSR1;
/// `SIGUSR2`.
pub const SIGUSR2: i32 = libc::SIGUSR2;
/// `SIGPIPE`.
pub const SIGPIPE: i32 = libc::SIGPIPE;
/// `SIGTERM`.
pub const SIGTERM: i32 = libc::SIGTERM;
/// `SIGCHLD`.
pub const SIGCHLD: i32 = libc::SIGCHLD;
/// `SIGTTIN`.
pub const SIGTTIN: i32 = libc::SIGTTIN;
/// `SIGTTOU`.
pub const SIGTTOU: i32 = libc::SIGTTOU;

fn sigset(sigs: &[i32]) -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain old data, and sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { mem::zeroed() };
    // SAFETY: set is a live sigset_t.
    cvt(unsafe { libc::sigemptyset(&mut set) })?;
    for &s in sigs {
        // SAFETY: set is a live sigset_t; a bad number gives EINVAL.
        cvt(unsafe { libc::sigaddset(&mut set, s) })?;
    }
    Ok(set)
}

/// A thread's signal mask, as [`block`] found it; give it back to
/// [`set_mask`] to undo the block.
#[derive(Clone, Copy)]
pub struct SigMask(libc::sigset_t);

impl std::fmt::Debug for SigMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let blocked: Vec<i32> = (1..=64)
            // SAFETY: self.0 is an initialised sigset_t; a bad number gives -1.
            .filter(|&s| unsafe { libc::sigismember(&self.0, s) } == 1)
            .collect();
        f.debug_tuple("SigMask").field(&blocked).finish()
    }
}

/// `pthread_sigmask(SIG_BLOCK)` of `sigs` in the calling thread, so they
/// queue for a signalfd instead of running their default action. Returns
/// the mask the thread had before.
pub fn block(sigs: &[i32]) -> io::Result<SigMask> {
    let set = sigset(sigs)?;
    // SAFETY: sigset_t is plain old data; pthread_sigmask fills it.
    let mut old: libc::sigset_t = unsafe { mem::zeroed() };
    // SAFETY: set is initialised and old writable.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(SigMask(old))
}

/// `pthread_sigmask(SIG_SETMASK, mask)`: puts back a mask [`block`]
/// returned, in the calling thread. A signal that was blocked and is
/// pending is delivered then, with its own disposition.
pub fn set_mask(mask: &SigMask) -> io::Result<()> {
    // SAFETY: mask.0 is an initialised sigset_t; the old mask is not wanted.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &mask.0, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// `pthread_sigmask(SIG_UNBLOCK)` of `sigs`.
pub fn unblock(sigs: &[i32]) -> io::Result<()> {
    let set = sigset(sigs)?;
    // SAFETY: set is initialised; the old mask is not wanted.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// `signalfd(-1, sigs, SFD_CLOEXEC | SFD_NONBLOCK)`. Block the same signals
/// first with [`block`].
pub fn signalfd(sigs: &[i32]) -> io::Result<OwnedFd> {
    let set = sigset(sigs)?;
    // SAFETY: set is initialised; -1 asks for a new fd.
    let fd = cvt(unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) })?;
    // SAFETY: fd was just created and is unowned.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `read(2)` of one `signalfd_siginfo`: `Ok(Some(signo))`, or `Ok(None)` when
/// nothing is pending. Retries `EINTR`.
pub fn read_signal(fd: BorrowedFd<'_>) -> io::Result<Option<i32>> {
    // SAFETY: signalfd_siginfo is plain old data.
    let mut info: libc::signalfd_siginfo = unsafe { mem::zeroed() };
    let size = mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: info is writable for `size` bytes.
    let res = super::cvt_r(|| unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            size,
        )
    });
    match res {
        Ok(n) if n as usize == size => Ok(Some(info.ssi_signo as i32)),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "short read on signalfd",
        )),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// `sigaction(sig, SIG_IGN)` or back to `SIG_DFL`.
pub fn set_ignored(sig: i32, ignored: bool) -> io::Result<()> {
    let handler = if ignored {
        libc::SIG_IGN
    } else {
        libc::SIG_DFL
    };
    // SAFETY: installing SIG_IGN/SIG_DFL runs no code of ours.
    let old = unsafe { libc::signal(sig, handler) };
    if old == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `raise(3)`: sends `sig` to the calling process.
pub fn raise(sig: i32) -> io::Result<()> {
    // SAFETY: plain call.
    cvt(unsafe { libc::raise(sig) })?;
    Ok(())
}
