//! `sendmsg`/`recvmsg` with `SCM_RIGHTS`: bytes and up to 253 fds per call.

use std::fmt;
use std::io::{self, IoSlice};
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::cvt_r;

/// The kernel's per-message limit (`SCM_MAX_FD`).
pub const MAX_FDS: usize = 253;

// CMSG_SPACE(253 * 4) is 1032 on 64-bit Linux; u64 words keep it aligned.
const CMSG_WORDS: usize = 132;

fn cmsg_space(nfds: usize) -> usize {
    // SAFETY: CMSG_SPACE is pure arithmetic on its argument.
    unsafe { libc::CMSG_SPACE((nfds * mem::size_of::<RawFd>()) as u32) as usize }
}

/// The error `recv` returns when `MSG_CTRUNC` says fds were lost (the
/// receiver hit `EMFILE`, or the peer sent more than 253). The fds that did
/// arrive are already closed. `bytes` says how many bytes the call did read
/// into the buffer, so a stream reader can stay in step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncated {
    /// Bytes read into the buffer by the call that was truncated.
    pub bytes: usize,
    /// How many fds arrived anyway and were closed.
    pub closed: usize,
}

impl fmt::Display for Truncated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "fds lost in transit (MSG_CTRUNC, likely EMFILE): {} that did arrive were closed",
            self.closed
        )
    }
}

impl std::error::Error for Truncated {}

/// `sendmsg(2)` of `bufs` with `fds` as one `SCM_RIGHTS` message, with
/// `MSG_NOSIGNAL` (a dead peer gives `EPIPE`, never `SIGPIPE`) and, if asked,
/// `MSG_DONTWAIT`. Retries `EINTR`. The fds ride on the first byte sent.
/// More than 253 fds, or fds with no bytes, is `InvalidInput`.
pub fn send(
    fd: BorrowedFd<'_>,
    bufs: &[IoSlice<'_>],
    fds: &[BorrowedFd<'_>],
    dontwait: bool,
) -> io::Result<usize> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} fds in one sendmsg, the kernel takes at most {MAX_FDS}",
                fds.len()
            ),
        ));
    }
    if !fds.is_empty() && bufs.iter().all(|b| b.is_empty()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "fds need at least one byte to ride on",
        ));
    }
    let mut cbuf = [0u64; CMSG_WORDS];
    // SAFETY: msghdr is plain old data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len() as _;
    if !fds.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = cmsg_space(fds.len()) as _;
        // SAFETY: msg_control points at cbuf, which is aligned and at least
        // CMSG_SPACE(fds) bytes, so CMSG_FIRSTHDR is non-null and in bounds.
        let cmsg = unsafe { &mut *libc::CMSG_FIRSTHDR(&msg) };
        cmsg.cmsg_level = libc::SOL_SOCKET;
        cmsg.cmsg_type = libc::SCM_RIGHTS;
        // SAFETY: pure arithmetic.
        cmsg.cmsg_len =
            unsafe { libc::CMSG_LEN((fds.len() * mem::size_of::<RawFd>()) as u32) } as _;
        // SAFETY: CMSG_DATA of a header inside cbuf has room for fds.len() ints.
        let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
        for (i, f) in fds.iter().enumerate() {
            // SAFETY: i < fds.len(), within the room computed above; unaligned write is allowed.
            unsafe { data.add(i).write_unaligned(f.as_raw_fd()) };
        }
    }
    let flags = libc::MSG_NOSIGNAL | if dontwait { libc::MSG_DONTWAIT } else { 0 };
    // IoSlice is ABI-compatible with iovec (std guarantees it on Unix).
    // SAFETY: msg points at live iovecs and a control buffer set up above.
    let n = cvt_r(|| unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, flags) })?;
    Ok(n as usize)
}

/// `recvmsg(2)` into `buf`, with `MSG_CMSG_CLOEXEC` and, if asked,
/// `MSG_DONTWAIT`. Received fds are pushed onto `fds`. Retries `EINTR`.
/// Returns the byte count (0 at EOF). When `MSG_CTRUNC` is set, the fds that
/// arrived in this call are closed and the error wraps [`Truncated`].
pub fn recv(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    dontwait: bool,
) -> io::Result<usize> {
    let mut cbuf = [0u64; CMSG_WORDS];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = mem::size_of_val(&cbuf) as _;
    let flags = libc::MSG_CMSG_CLOEXEC | if dontwait { libc::MSG_DONTWAIT } else { 0 };
    // SAFETY: msg points at a live, writable iovec and control buffer.
    let n = cvt_r(|| unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, flags) })? as usize;
    let before = fds.len();
    if msg.msg_controllen > 0 {
        // SAFETY: the kernel filled msg_control up to msg_controllen.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !cmsg.is_null() {
            // SAFETY: cmsg is non-null and inside the control buffer.
            let hdr = unsafe { &*cmsg };
            if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
                // SAFETY: pure arithmetic.
                let header_len = unsafe { libc::CMSG_LEN(0) } as usize;
                let count =
                    (hdr.cmsg_len as usize).saturating_sub(header_len) / mem::size_of::<RawFd>();
                // SAFETY: CMSG_DATA of a valid header points at `count` ints.
                let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
                for i in 0..count {
                    // SAFETY: i < count ints inside the control data.
                    let raw = unsafe { data.add(i).read_unaligned() };
                    // SAFETY: the kernel installed this fd for us just now.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
            // SAFETY: CMSG_NXTHDR walks within msg_controllen and returns null at the end.
            cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        let closed = fds.len() - before;
        fds.truncate(before);
        return Err(io::Error::new(
            io::ErrorKind::Other,
            Truncated { bytes: n, closed },
        ));
    }
    Ok(n)
}

/// A datagram [`recv_cred`] read: its length and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram {
    /// Bytes read into the buffer (at most its length).
    pub len: usize,
    /// The datagram was longer than the buffer: the rest is gone.
    pub truncated: bool,
    /// The sender's pid, from `SCM_CREDENTIALS` (0 when the sender is in a
    /// pid namespace the receiver cannot see); `None` without `SO_PASSCRED`.
    pub pid: Option<i32>,
    /// The sender's uid, likewise.
    pub uid: Option<u32>,
    /// fds that came along (`SCM_RIGHTS`), all closed already.
    pub fds_closed: usize,
}

// Room for one ucred and a full SCM_RIGHTS batch: CMSG_SPACE(12) is 32 on
// 64-bit Linux, on top of the 1032 of CMSG_WORDS.
const CRED_CMSG_WORDS: usize = CMSG_WORDS + 8;

/// `recvmsg(2)` of one datagram into `buf`, with `MSG_TRUNC` (a longer
/// datagram is cut, and said so), `MSG_CMSG_CLOEXEC` and, if asked,
/// `MSG_DONTWAIT`; the sender's credentials come from `SCM_CREDENTIALS`
/// (turn them on with [`super::socket::set_passcred`]). Any fds the sender
/// attached are closed before this returns: the caller never holds them.
/// Retries `EINTR`; `EAGAIN` comes back as `WouldBlock`.
pub fn recv_cred(fd: BorrowedFd<'_>, buf: &mut [u8], dontwait: bool) -> io::Result<Datagram> {
    let mut cbuf = [0u64; CRED_CMSG_WORDS];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = mem::size_of_val(&cbuf) as _;
    let flags =
        libc::MSG_CMSG_CLOEXEC | libc::MSG_TRUNC | if dontwait { libc::MSG_DONTWAIT } else { 0 };
    // SAFETY: msg points at a live, writable iovec and control buffer.
    let n = cvt_r(|| unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, flags) })? as usize;
    let mut out = Datagram {
        len: n.min(buf.len()),
        truncated: n > buf.len() || msg.msg_flags & libc::MSG_TRUNC != 0,
        pid: None,
        uid: None,
        fds_closed: 0,
    };
    if msg.msg_controllen > 0 {
        // SAFETY: the kernel filled msg_control up to msg_controllen.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !cmsg.is_null() {
            // SAFETY: cmsg is non-null and inside the control buffer.
            let hdr = unsafe { &*cmsg };
            // SAFETY: pure arithmetic.
            let header_len = unsafe { libc::CMSG_LEN(0) } as usize;
            let data_len = (hdr.cmsg_len as usize).saturating_sub(header_len);
            if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
                let count = data_len / mem::size_of::<RawFd>();
                // SAFETY: CMSG_DATA of a valid header points at `count` ints.
                let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
                for i in 0..count {
                    // SAFETY: i < count ints inside the control data.
                    let raw = unsafe { data.add(i).read_unaligned() };
                    // SAFETY: the kernel installed this fd for us just now;
                    // it is closed at once.
                    drop(unsafe { OwnedFd::from_raw_fd(raw) });
                    out.fds_closed += 1;
                }
            } else if hdr.cmsg_level == libc::SOL_SOCKET
                && hdr.cmsg_type == libc::SCM_CREDENTIALS
                && data_len >= mem::size_of::<libc::ucred>()
            {
                // SAFETY: CMSG_DATA of a header this long holds a ucred;
                // unaligned read is allowed.
                let cred = unsafe { libc::CMSG_DATA(cmsg).cast::<libc::ucred>().read_unaligned() };
                out.pid = Some(cred.pid);
                out.uid = Some(cred.uid);
            }
            // SAFETY: CMSG_NXTHDR walks within msg_controllen and returns null at the end.
            cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
        }
    }
    Ok(out)
}
