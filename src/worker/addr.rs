//! [`SocketAddr`]: the address of a TCP or a Unix socket.

#![forbid(unsafe_code)]

use std::fmt;
use std::net;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net as unix;

/// The address of either kind of socket a worker listens on, as
/// [`Listener::local_addr`](super::Listener::local_addr),
/// [`Listener::accept`](super::Listener::accept) and the
/// [`Stream`](super::Stream) methods give it.
///
/// `Display` prints a TCP address as std does (`127.0.0.1:8000`,
/// `[::1]:8000`), a Unix one as its path, an abstract one as `@name` and an
/// unnamed one (a client's end, usually) as `(unnamed)`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum SocketAddr {
    /// An IPv4 or IPv6 address.
    Inet(net::SocketAddr),
    /// A Unix socket address.
    Unix(unix::SocketAddr),
}

impl SocketAddr {
    /// The IP address, or `None` for a Unix socket.
    pub fn as_inet(&self) -> Option<&net::SocketAddr> {
        match self {
            SocketAddr::Inet(a) => Some(a),
            SocketAddr::Unix(_) => None,
        }
    }

    /// The Unix socket address, or `None` for an IP socket.
    pub fn as_unix(&self) -> Option<&unix::SocketAddr> {
        match self {
            SocketAddr::Unix(a) => Some(a),
            SocketAddr::Inet(_) => None,
        }
    }
}

impl From<net::SocketAddr> for SocketAddr {
    fn from(a: net::SocketAddr) -> SocketAddr {
        SocketAddr::Inet(a)
    }
}

impl From<unix::SocketAddr> for SocketAddr {
    fn from(a: unix::SocketAddr) -> SocketAddr {
        SocketAddr::Unix(a)
    }
}

impl fmt::Display for SocketAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SocketAddr::Inet(a) => a.fmt(f),
            SocketAddr::Unix(a) => {
                if let Some(p) = a.as_pathname() {
                    p.display().fmt(f)
                } else if let Some(name) = a.as_abstract_name() {
                    write!(f, "@{}", name.escape_ascii())
                } else {
                    f.write_str("(unnamed)")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_follows_std_and_names_each_kind_of_unix_address() {
        let v4: net::SocketAddr = "127.0.0.1:8000".parse().unwrap();
        let v6: net::SocketAddr = "[::1]:8000".parse().unwrap();
        assert_eq!(SocketAddr::from(v4).to_string(), "127.0.0.1:8000");
        assert_eq!(SocketAddr::from(v6).to_string(), "[::1]:8000");
        let path = unix::SocketAddr::from_pathname("/run/app.sock").unwrap();
        assert_eq!(SocketAddr::from(path).to_string(), "/run/app.sock");
        let abs = unix::SocketAddr::from_abstract_name(b"app\n").unwrap();
        assert_eq!(SocketAddr::from(abs).to_string(), "@app\\n");
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let unnamed = SocketAddr::from(a.local_addr().unwrap());
        assert_eq!(unnamed.to_string(), "(unnamed)");
        assert!(unnamed.as_unix().is_some() && unnamed.as_inet().is_none());
    }
}
