//! Creating the listening socket for a handle (≈ Node's shared_handle.js,
//! which binds for `SCHED_NONE`; round robin binds the same way).

#![forbid(unsafe_code)]

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use crate::protocol::Endpoint;
use crate::sys::socket;

/// Where a handle listens, with port 0 resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp(a) => write!(f, "{a}"),
            Address::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

fn tcp_listener(addr: SocketAddr, v6only: Option<bool>, backlog: i32) -> io::Result<OwnedFd> {
    let fd = socket::tcp_socket(&addr)?;
    socket::set_reuseaddr(fd.as_fd(), true)?;
    if let (SocketAddr::V6(_), Some(only)) = (addr, v6only) {
        socket::set_ipv6_only(fd.as_fd(), only)?;
    }
    socket::bind(fd.as_fd(), &addr)?;
    socket::listen(fd.as_fd(), backlog)?;
    Ok(fd)
}

/// A bind error that names the address and keeps the errno, so the
/// worker's `listen()` gets the same `ErrorKind` (`AddrInUse`, ...).
#[derive(Debug)]
pub(crate) struct Named {
    pub errno: Option<i32>,
    pub text: String,
}

impl std::fmt::Display for Named {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for Named {}

fn named(e: io::Error, what: &str) -> io::Error {
    let errno = e.raw_os_error();
    io::Error::new(
        e.kind(),
        Named {
            errno,
            text: format!("listen on {what}: {e}"),
        },
    )
}

/// The errno behind an error, also through a [`Named`] wrapper.
pub(crate) fn errno_of(e: &io::Error) -> Option<i32> {
    e.raw_os_error().or_else(|| {
        e.get_ref()
            .and_then(|i| i.downcast_ref::<Named>())
            .and_then(|n| n.errno)
    })
}

/// Binds and listens on `endpoint`; the error names the address. No host
/// means `[::]` in dual-stack mode, falling back to `0.0.0.0` where IPv6 is
/// missing. A Unix path that already exists gives `EADDRINUSE`, as in Node.
pub fn bind(endpoint: &Endpoint, backlog: i32) -> io::Result<(OwnedFd, Address)> {
    match endpoint {
        Endpoint::Tcp(Some(ip), port) => {
            let addr = SocketAddr::new(*ip, *port);
            let only = matches!(ip, IpAddr::V6(v6) if v6.is_unspecified()).then_some(false);
            let fd = tcp_listener(addr, only, backlog).map_err(|e| named(e, &addr.to_string()))?;
            let real = socket::local_addr(fd.as_fd())?;
            Ok((fd, Address::Tcp(real)))
        }
        Endpoint::Tcp(None, port) => {
            let v6 = Endpoint::unspecified_v6(*port);
            let fd = match tcp_listener(v6, Some(false), backlog) {
                Ok(fd) => fd,
                Err(e) if matches!(e.raw_os_error(), Some(97 | 99)) => {
                    // EAFNOSUPPORT / EADDRNOTAVAIL: no IPv6 here.
                    let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), *port);
                    tcp_listener(v4, None, backlog).map_err(|e| named(e, &v4.to_string()))?
                }
                Err(e) => return Err(named(e, &v6.to_string())),
            };
            let real = socket::local_addr(fd.as_fd())?;
            Ok((fd, Address::Tcp(real)))
        }
        Endpoint::Unix(path) => {
            let what = path.display().to_string();
            let fd = socket::unix_socket().map_err(|e| named(e, &what))?;
            socket::bind_unix(fd.as_fd(), path).map_err(|e| named(e, &what))?;
            if let Err(e) = socket::listen(fd.as_fd(), backlog) {
                let _ = std::fs::remove_file(path);
                return Err(named(e, &what));
            }
            Ok((fd, Address::Unix(path.clone())))
        }
    }
}
