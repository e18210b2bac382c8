//! Sockets: `socketpair`, TCP v4/v6 and Unix-path listeners, UDP sockets,
//! `accept4`, options and address conversion. Every socket is
//! `SOCK_CLOEXEC` from birth.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::{cvt, cvt_r};

fn owned(fd: libc::c_int) -> OwnedFd {
    // SAFETY: callers pass an fd just returned by a successful syscall that
    // created it, so it is open and owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// `socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC)`: the two ends of a
/// channel, both blocking. Never `EINTR`.
pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: fds has room for the two fds socketpair writes.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    Ok((owned(fds[0]), owned(fds[1])))
}

/// `socket(AF_INET or AF_INET6, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK)`
/// for the family of `addr`. Non-blocking, because listeners are polled.
pub fn tcp_socket(addr: &SocketAddr) -> io::Result<OwnedFd> {
    let family = match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: plain socket creation; no pointers.
    let fd = cvt(unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    })?;
    Ok(owned(fd))
}

/// `socket(AF_INET or AF_INET6, SOCK_DGRAM | SOCK_CLOEXEC)` for the family
/// of `addr`. Blocking, as std's `UdpSocket::bind` makes it: a UDP socket
/// goes to workers as a `UdpSocket`, not to the primary's loop.
pub fn udp_socket(addr: &SocketAddr) -> io::Result<OwnedFd> {
    let family = match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: plain socket creation; no pointers.
    let fd = cvt(unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    Ok(owned(fd))
}

/// `socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK)`.
pub fn unix_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket creation; no pointers.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    })?;
    Ok(owned(fd))
}

fn setsockopt_int(fd: BorrowedFd<'_>, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: value is a live c_int and the length says so.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            mem::size_of::<i32>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

fn getsockopt_int(fd: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<i32> {
    let mut value: i32 = 0;
    let mut len = mem::size_of::<i32>() as libc::socklen_t;
    // SAFETY: value and len are live and writable, len gives value's size.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut i32).cast(),
            &mut len,
        )
    })?;
    Ok(value)
}

/// `setsockopt(SOL_SOCKET, SO_REUSEADDR)`.
pub fn set_reuseaddr(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, on as i32)
}

/// `setsockopt(SOL_SOCKET, SO_REUSEPORT)`.
pub fn set_reuseport(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, on as i32)
}

/// `setsockopt(IPPROTO_TCP, TCP_DEFER_ACCEPT, secs)`: `accept` returns a
/// connection only once its first data arrived (or after about `secs`
/// seconds). nginx's `listen ... deferred`.
pub fn set_defer_accept(fd: BorrowedFd<'_>, secs: i32) -> io::Result<()> {
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT, secs)
}

/// `getsockopt(SOL_SOCKET, SO_REUSEPORT)`: whether the socket has it on.
pub fn reuseport(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT)? != 0)
}

/// `setsockopt(SOL_SOCKET, SO_PASSCRED)`: every message this `AF_UNIX`
/// socket receives then carries its sender's `SCM_CREDENTIALS` (pid, uid,
/// gid, as the kernel saw them; see [`super::msg::recv_cred`]).
pub fn set_passcred(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PASSCRED, i32::from(on))
}

/// `setsockopt(IPPROTO_IPV6, IPV6_V6ONLY)`.
pub fn set_ipv6_only(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, on as i32)
}

/// `getsockopt(SOL_SOCKET, SO_DOMAIN)`: `AF_UNIX` is 1, `AF_INET` 2, `AF_INET6` 10.
pub fn domain(fd: BorrowedFd<'_>) -> io::Result<i32> {
    getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN)
}

/// `getsockopt(SOL_SOCKET, SO_TYPE)`: `SOCK_STREAM` is 1, `SOCK_DGRAM` 2.
pub fn socket_type(fd: BorrowedFd<'_>) -> io::Result<i32> {
    getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE)
}

/// `getsockopt(SOL_SOCKET, SO_ACCEPTCONN)`: whether the socket is listening.
pub fn is_listening(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN)? != 0)
}

/// True when `fd` is an `AF_UNIX` `SOCK_STREAM` socket, as a channel must be.
pub fn is_unix_stream(fd: BorrowedFd<'_>) -> bool {
    matches!(
        (domain(fd), socket_type(fd)),
        (Ok(libc::AF_UNIX), Ok(libc::SOCK_STREAM))
    )
}

/// `SOCK_STREAM`, so that callers need not name `libc`.
pub const SOCK_STREAM: i32 = libc::SOCK_STREAM;

/// The size of `sockaddr_un.sun_path` on Linux, its NUL included: a path
/// bound by name has at most `SUN_PATH_LEN - 1` bytes.
pub const SUN_PATH_LEN: usize = 108;

/// The address family constants, so that callers need not name `libc`.
pub const AF_UNIX: i32 = libc::AF_UNIX;
/// `AF_INET`.
pub const AF_INET: i32 = libc::AF_INET;
/// `AF_INET6`.
pub const AF_INET6: i32 = libc::AF_INET6;

/// Encodes a `SocketAddr` as a `sockaddr_storage` and its length.
pub fn to_raw(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe {
                (&mut storage as *mut libc::sockaddr_storage)
                    .cast::<libc::sockaddr_in>()
                    .write(sin)
            };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe {
                (&mut storage as *mut libc::sockaddr_storage)
                    .cast::<libc::sockaddr_in6>()
                    .write(sin6)
            };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Decodes a `sockaddr_storage` filled by the kernel. `None` for families
/// other than `AF_INET`/`AF_INET6` (a Unix socket has no `SocketAddr`).
pub fn from_raw(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    match storage.ss_family as i32 {
        libc::AF_INET if len as usize >= mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family and length say the storage holds a sockaddr_in.
            let sin =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len as usize >= mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: the family and length say the storage holds a sockaddr_in6.
            let sin6 = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// `bind(2)` to an IP address. Never `EINTR`.
pub fn bind(fd: BorrowedFd<'_>, addr: &SocketAddr) -> io::Result<()> {
    let (storage, len) = to_raw(addr);
    // SAFETY: storage holds a valid sockaddr of `len` bytes.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&storage as *const libc::sockaddr_storage).cast(),
            len,
        )
    })?;
    Ok(())
}

fn unix_addr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut sun: libc::sockaddr_un = unsafe { mem::zeroed() };
    sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= sun.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "unix socket path {:?} is empty, holds a NUL or is longer than {} bytes",
                path,
                sun.sun_path.len() - 1
            ),
        ));
    }
    for (dst, src) in sun.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((sun, len as libc::socklen_t))
}

/// `bind(2)` of an `AF_UNIX` socket to a filesystem path.
pub fn bind_unix(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let (sun, len) = unix_addr(path)?;
    // SAFETY: sun is a valid sockaddr_un of `len` bytes.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sun as *const libc::sockaddr_un).cast(),
            len,
        )
    })?;
    Ok(())
}

/// `connect(2)` of an `AF_UNIX` socket to a path; `EINTR` is retried (Linux
/// completes the connect of a Unix socket synchronously).
pub fn connect_unix(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let (sun, len) = unix_addr(path)?;
    // SAFETY: sun is a valid sockaddr_un of `len` bytes.
    cvt_r(|| unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&sun as *const libc::sockaddr_un).cast(),
            len,
        )
    })?;
    Ok(())
}

/// `listen(2)` with `backlog`. Never `EINTR`.
pub fn listen(fd: BorrowedFd<'_>, backlog: i32) -> io::Result<()> {
    // SAFETY: plain call on a borrowed fd.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), backlog) })?;
    Ok(())
}

/// `accept4(SOCK_CLOEXEC [| SOCK_NONBLOCK])`, without the peer address.
/// Retries `EINTR`; `EAGAIN` comes back as `WouldBlock`.
pub fn accept(fd: BorrowedFd<'_>, nonblocking: bool) -> io::Result<OwnedFd> {
    let flags = libc::SOCK_CLOEXEC | if nonblocking { libc::SOCK_NONBLOCK } else { 0 };
    // SAFETY: null address pointers are allowed and mean "don't report".
    let new = cvt_r(|| unsafe {
        libc::accept4(
            fd.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            flags,
        )
    })?;
    Ok(owned(new))
}

/// `getsockname(2)` of an IP socket. An `AF_UNIX` socket gives `InvalidInput`.
pub fn local_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: storage and len are writable and len gives storage's size.
    cvt(unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    })?;
    from_raw(&storage, len)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "getsockname: not an IP socket"))
}

/// `getsockname(2)` of an `AF_UNIX` socket bound to a path: that path.
/// An unnamed or abstract socket, or another family, gives `InvalidInput`.
pub fn local_unix_path(fd: BorrowedFd<'_>) -> io::Result<std::path::PathBuf> {
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut sun: libc::sockaddr_un = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: sun and len are writable and len gives sun's size.
    cvt(unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            (&mut sun as *mut libc::sockaddr_un).cast(),
            &mut len,
        )
    })?;
    let not_path = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "getsockname: not a Unix socket bound to a path",
        )
    };
    if sun.sun_family as i32 != libc::AF_UNIX {
        return Err(not_path());
    }
    let n = (len as usize).saturating_sub(mem::size_of::<libc::sa_family_t>());
    let raw: Vec<u8> = sun.sun_path[..n.min(sun.sun_path.len())]
        .iter()
        .map(|&c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    if raw.is_empty() || sun.sun_path[0] == 0 {
        return Err(not_path());
    }
    Ok(std::path::PathBuf::from(std::ffi::OsStr::from_bytes(&raw)))
}

/// `shutdown(SHUT_WR)`: ends our half of a stream.
pub fn shutdown_write(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain call on a borrowed fd.
    cvt(unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) })?;
    Ok(())
}

/// `shutdown(SHUT_RD)`: we read no more. On a Unix stream, the peer's
/// writes fail with `EPIPE` from now on.
pub fn shutdown_read(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain call on a borrowed fd.
    cvt(unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RD) })?;
    Ok(())
}

/// `ioctl(FIONREAD)` (`SIOCINQ`): the bytes queued unread on a socket. On
/// a Unix stream that is every byte its peer wrote and nobody read yet,
/// whoever holds the fd.
pub fn unread(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which is live.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) })?;
    Ok(n.max(0) as usize)
}
