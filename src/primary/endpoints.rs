//! What query-server creates for each kind of request: TCP and Unix
//! listeners and UDP sockets (bound in `shared.rs`), and the listening
//! sockets the program offers its workers itself ([`Primary::listen_fd`],
//! Node's `listen({fd})`).

#![forbid(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use super::shared::{self, Address, BindOptions, Named, UnixFile};
use super::Primary;
use crate::protocol::{Endpoint, Policy, Query, QueryFlags};
use crate::sys::{self, socket};

const ENOENT: i32 = 2;

impl Primary {
    /// Offers a listening socket of the program's own to the workers, as
    /// Node's `listen({fd: N})` in a worker uses fd N of the primary.
    /// Returns N, the socket's fd number in this process: a worker's
    /// [`listen_with`](crate::Worker::listen_with) with
    /// [`ListenOptions::fd`](crate::worker::ListenOptions::fd)`(N)` (and an
    /// empty address) then listens on it, under the primary's policy, as
    /// on any handle: in round robin the primary accepts on it; shared,
    /// every such worker gets a duplicate.
    ///
    /// Unlike Node, a worker can name no other fd of the primary: only
    /// those offered here. Offering is the program's decision, so
    /// [`Settings::listen_rules`](super::Settings::listen_rules) do not
    /// apply: every worker may listen on an offered socket. The socket must be a listening TCP or Unix
    /// stream socket (`InvalidInput` otherwise); it is made close-on-exec
    /// and non-blocking, and kept until the `Primary` is dropped: handles
    /// use a duplicate of it, closed once their last worker leaves, and a
    /// later worker gets a fresh one. The primary never removes a Unix
    /// socket file it did not create.
    pub fn listen_fd(&mut self, fd: OwnedFd) -> io::Result<i32> {
        let n = fd.as_raw_fd();
        let listening = socket::socket_type(fd.as_fd()).ok() == Some(socket::SOCK_STREAM)
            && socket::is_listening(fd.as_fd()).unwrap_or(false)
            && matches!(
                socket::domain(fd.as_fd()),
                Ok(socket::AF_INET | socket::AF_INET6 | socket::AF_UNIX)
            );
        if !listening {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("listen_fd: fd {n} is not a listening TCP or Unix stream socket"),
            ));
        }
        sys::fd::set_cloexec(fd.as_fd(), true)?;
        sys::fd::set_nonblocking(fd.as_fd(), true)?;
        self.offered.insert(n, fd);
        Ok(n)
    }

    // The socket a new handle gets for `q`, its address, its Unix file
    // (to remove when it closes) and its policy: UDP is always shared
    // (as in Node); the rest follows the settings.
    pub(super) fn make_socket(
        &mut self,
        q: &Query,
        dir: Option<OwnedFd>,
        backlog: i32,
    ) -> io::Result<(OwnedFd, Address, Option<UnixFile>, Policy)> {
        let udp = q.flags.contains(QueryFlags::UDP);
        let policy = match (udp, self.settings.policy, &q.endpoint) {
            (true, ..) => Policy::Shared,
            // One socket per slot needs an address to bind again.
            (_, Policy::ReusePort, Endpoint::Unix(_) | Endpoint::Fd(_)) => Policy::Shared,
            (_, p, _) => p,
        };
        if let Endpoint::Fd(n) = q.endpoint {
            let what = q.endpoint.describe();
            let Some(own) = self.offered.get(&n) else {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    Named {
                        errno: Some(ENOENT),
                        text: format!(
                            "listen on {what}: not offered to workers (Primary::listen_fd)"
                        ),
                    },
                ));
            };
            let fd = sys::fd::dup(own.as_fd()).map_err(|e| shared::named_error(e, &what))?;
            let address = match socket::local_addr(fd.as_fd()) {
                Ok(a) => Address::Tcp(a),
                Err(_) => Address::Unix(
                    socket::local_unix_path(fd.as_fd())
                        .map_err(|e| shared::named_error(e, &what))?,
                ),
            };
            return Ok((fd, address, None, policy));
        }
        let mut add_mode = 0;
        if q.flags.contains(QueryFlags::READABLE_ALL) {
            add_mode |= 0o444;
        }
        if q.flags.contains(QueryFlags::WRITABLE_ALL) {
            add_mode |= 0o222;
        }
        let opts = BindOptions {
            backlog,
            udp,
            ipv6_only: q.flags.contains(QueryFlags::IPV6_ONLY),
            reuse_port: policy == Policy::ReusePort,
            defer_accept: q.flags.contains(QueryFlags::DEFER_ACCEPT),
            add_mode,
        };
        let (fd, address, unix) = shared::bind(&q.endpoint, dir, &opts)?;
        Ok((fd, address, unix, policy))
    }
}
