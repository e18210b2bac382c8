//! [`Listener`]: a listening socket obtained through the primary, used as
//! std's `TcpListener` is.

#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net as unix;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use super::count::ListenerCount;
use super::event_loop::Inner;
use super::{SocketAddr, Stream};
use crate::primary::shared::UnixFile;
use crate::protocol::{Endpoint, Policy, QueryFlags};
use crate::sys::epoll::Epoll;

/// How [`Worker::listen_with`](super::Worker::listen_with) listens (the
/// options of Node's `server.listen(options)`). Build it with setters:
///
/// ```no_run
/// # fn main() -> std::io::Result<()> {
/// use syncluster::worker::ListenOptions;
/// let worker = syncluster::Worker::from_env()?.expect("run by a primary");
/// let v6 = worker.listen_with("[::]:8000", &ListenOptions::new().ipv6_only(true))?;
/// let own = worker.listen_with("127.0.0.1:9000", &ListenOptions::new().reuse_port(true))?;
/// let sock = worker.listen_with(
///     "/run/app/app.sock",
///     &ListenOptions::new().readable_all(true).writable_all(true),
/// )?;
/// # let _ = (v6, own, sock);
/// # Ok(())
/// # }
/// ```
///
/// Options that do not fit the address (`ipv6_only` on an IPv4 address or
/// a path, a file mode for a TCP address, `reuse_port` on a path, `fd`
/// with an address or with `exclusive`) make `listen_with` fail with
/// `InvalidInput`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListenOptions {
    pub(super) backlog: u32,
    pub(super) ipv6_only: bool,
    pub(super) exclusive: bool,
    pub(super) reuse_port: bool,
    pub(super) readable_all: bool,
    pub(super) writable_all: bool,
    pub(super) fd: Option<i32>,
    pub(super) defer_accept: bool,
    pub(super) nonblocking_connections: bool,
}

impl ListenOptions {
    /// The defaults: the primary binds (or joins) the socket, backlog 511,
    /// dual-stack `[::]`, the Unix socket file's mode from the primary's
    /// umask.
    pub fn new() -> ListenOptions {
        ListenOptions::default()
    }

    /// The `listen(2)` backlog (Node's `backlog`); 0 (the default) means
    /// the primary's default, 511. It applies when the socket is created:
    /// a worker joining a socket another one made gets that one's.
    pub fn backlog(mut self, backlog: u32) -> ListenOptions {
        self.backlog = backlog;
        self
    }

    /// `IPV6_V6ONLY` (Node's `ipv6Only`): `[::]` (or a port alone) takes
    /// no IPv4 traffic, so `0.0.0.0` on the same port stays free. Only
    /// for IPv6 addresses and a port alone. It is part of the handle's
    /// key: workers asking with and without it get different sockets.
    pub fn ipv6_only(mut self, on: bool) -> ListenOptions {
        self.ipv6_only = on;
        self
    }

    /// The worker binds its own socket instead of asking the primary
    /// (Node's `exclusive: true`): no other worker shares it (another
    /// worker's `listen` on the same address fails with `AddrInUse`), the
    /// primary's [`ListenRules`](crate::primary::ListenRules) do not apply
    /// (the worker's own credentials do), and the primary reports no
    /// `Listening` for it. A Unix socket file it creates is removed when
    /// the listener closes. It closes on disconnect as the others do.
    pub fn exclusive(mut self, on: bool) -> ListenOptions {
        self.exclusive = on;
        self
    }

    /// Like [`exclusive`](ListenOptions::exclusive), with `SO_REUSEPORT`
    /// (Node's `reusePort`, v22.12): every worker binds its own socket on
    /// the same port and the kernel spreads connections among them. TCP
    /// only. With port 0 each worker gets a port of its own.
    pub fn reuse_port(mut self, on: bool) -> ListenOptions {
        self.reuse_port = on;
        self
    }

    /// A Unix socket file readable by all (Node's `readableAll`): after
    /// bind, the primary (or the worker, with `exclusive`) adds `0o444` to
    /// the file's mode, through the directory it holds open, and only
    /// while the file is still the socket it bound.
    pub fn readable_all(mut self, on: bool) -> ListenOptions {
        self.readable_all = on;
        self
    }

    /// A Unix socket file writable by all (Node's `writableAll`): adds
    /// `0o222`, as [`readable_all`](ListenOptions::readable_all) does.
    /// Connecting to a Unix socket takes write permission.
    pub fn writable_all(mut self, on: bool) -> ListenOptions {
        self.writable_all = on;
        self
    }

    /// `TCP_DEFER_ACCEPT` on the listening socket (nginx's `listen ...
    /// deferred`): a connection is accepted (by the primary in round
    /// robin, by a worker otherwise) only once its first bytes arrived, so
    /// the first read does not wait, and a client that connects and sends
    /// nothing costs no accept (it is let through after about 5 s). TCP
    /// addresses only. Unlike `ipv6_only` it is not part of the handle's
    /// key: the primary turns it on for the socket every worker of that
    /// address shares (a pre-bound one too) once one asks for it.
    pub fn defer_accept(mut self, on: bool) -> ListenOptions {
        self.defer_accept = on;
        self
    }

    /// Connections come in non-blocking mode (`accept4` with
    /// `SOCK_NONBLOCK`; in round robin the worker sets `O_NONBLOCK` as it
    /// takes each): a program serving them from a poll loop saves a
    /// `set_nonblocking` call per connection. Applies to this worker's
    /// listener only.
    pub fn nonblocking_connections(mut self, on: bool) -> ListenOptions {
        self.nonblocking_connections = on;
        self
    }

    /// Listens on a socket the primary offered with
    /// [`Primary::listen_fd`](crate::Primary::listen_fd), named by the
    /// number it returned (Node's `listen({fd})`, which names fd N of the
    /// primary). The address given to `listen_with` must then be empty.
    /// An fd the primary did not offer fails with `NotFound`.
    pub fn fd(mut self, fd: i32) -> ListenOptions {
        self.fd = Some(fd);
        self
    }

    /// Bits added to a Unix socket file's mode.
    pub(super) fn add_mode(&self) -> u32 {
        (if self.readable_all { 0o444 } else { 0 }) | (if self.writable_all { 0o222 } else { 0 })
    }

    /// The query flags these options ask the primary for.
    pub(super) fn flags(&self) -> QueryFlags {
        let mut f = QueryFlags::empty();
        if self.ipv6_only {
            f = f.with(QueryFlags::IPV6_ONLY);
        }
        if self.readable_all {
            f = f.with(QueryFlags::READABLE_ALL);
        }
        if self.writable_all {
            f = f.with(QueryFlags::WRITABLE_ALL);
        }
        if self.defer_accept {
            f = f.with(QueryFlags::DEFER_ACCEPT);
        }
        f
    }

    /// Where `addr` with these options listens; `InvalidInput` when they
    /// do not fit together.
    pub(super) fn endpoint(&self, addr: &str) -> io::Result<Endpoint> {
        let bad = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("listen on {addr:?}: {why}"),
            )
        };
        let endpoint = match self.fd {
            Some(_) if !addr.is_empty() => {
                return Err(bad("with ListenOptions::fd the address must be empty"))
            }
            Some(n) if n < 0 => return Err(bad("ListenOptions::fd is negative")),
            Some(n) => Endpoint::Fd(n),
            None => Endpoint::parse(addr)?,
        };
        let mode = self.readable_all || self.writable_all;
        match &endpoint {
            Endpoint::Fd(_) if self.exclusive || self.reuse_port => Err(bad(
                "ListenOptions::fd names the primary's socket; exclusive and reuse_port bind the worker's own",
            )),
            Endpoint::Fd(_) if self.ipv6_only || mode => Err(bad(
                "ipv6_only and the file mode do not apply to a socket the primary offered",
            )),
            Endpoint::Unix(_) if self.ipv6_only || self.reuse_port => {
                Err(bad("ipv6_only and reuse_port do not apply to a Unix socket path"))
            }
            Endpoint::Unix(_) | Endpoint::Fd(_) | Endpoint::Name(_) if self.defer_accept => {
                Err(bad("defer_accept applies to a TCP address only"))
            }
            Endpoint::Tcp(..) if mode => Err(bad(
                "readable_all and writable_all apply to a Unix socket path only",
            )),
            Endpoint::Tcp(Some(std::net::IpAddr::V4(_)), _) if self.ipv6_only => {
                Err(bad("ipv6_only needs an IPv6 address or a port alone"))
            }
            _ => Ok(endpoint),
        }
    }
}

/// The worker's side of one listener.
#[derive(Debug)]
pub(super) struct ListenerState {
    pub(super) handle: u32,
    pub(super) policy: Policy,
    /// What the primary bound, port 0 resolved (a path for Unix).
    pub(super) address: String,
    pub(super) unix: bool,
    pub(super) key: String,
    pub(super) index: u32,
    /// Shared policy: the listening socket, until the worker disconnects.
    pub(super) shared: Option<OwnedFd>,
    /// Bound by this worker itself (`exclusive`, `reuse_port`): the
    /// primary has no handle for it.
    pub(super) own: bool,
    /// The socket file of an own Unix listener, removed when it closes.
    #[allow(dead_code)] // held for its Drop
    pub(super) unix_file: Option<UnixFile>,
    /// Whether `shared` is in the worker's epoll now.
    pub(super) in_epoll: bool,
    /// Set while a shared listener rests after `accept` failed for want of
    /// resources (`EMFILE`...): it stays readable, so retrying would spin.
    pub(super) resting_until: Option<Instant>,
    pub(super) max: Option<usize>,
    pub(super) nonblocking: bool,
    /// `ListenOptions::nonblocking_connections`.
    pub(super) nonblocking_connections: bool,
    pub(super) count: Arc<ListenerCount>,
    /// Round robin, least-loaded, reuseport: the pipe the primary hands
    /// connections over through; reading a record is taking one.
    pub(super) pipe: Option<OwnedFd>,
    /// Whether `pipe` is in the worker's epoll now.
    pub(super) pipe_in_epoll: bool,
    /// The primary was told this listener refuses connections (at its cap,
    /// or resting): it routes around this worker until told otherwise.
    pub(super) refusing: bool,
}

/// A listener obtained through the primary with [`Worker::listen`](super::Worker::listen)
/// (≈ a `net.Server` in a Node worker). Use it as std's `TcpListener`:
/// [`accept`](Listener::accept) or [`incoming`](Listener::incoming) in a
/// loop, or let [`Worker::next_event`](super::Worker::next_event) report its
/// connections as [`Event::Connection`](super::Event::Connection).
///
/// Dropping it closes it: the primary stops routing to this worker for its
/// address, and round-robin connections handed over but not taken go back
/// to be served by another worker.
#[derive(Debug)]
pub struct Listener {
    pub(super) inner: Rc<RefCell<Inner>>,
    pub(super) epoll: Rc<Epoll>,
    pub(super) idx: usize,
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "listener is closed")
}

impl Listener {
    /// Local index of this listener, as [`Event::Connection`](super::Event::Connection)
    /// names it in its `listener` field.
    pub fn id(&self) -> usize {
        self.idx
    }

    fn with<T>(&self, f: impl FnOnce(&ListenerState) -> T) -> io::Result<T> {
        let inner = self.inner.borrow();
        let l = inner.listener(self.idx).ok_or_else(closed)?;
        Ok(f(l))
    }

    /// The address the primary bound, with port 0 resolved; for a Unix
    /// socket, its path. A Unix path longer than a `sockaddr_un` holds
    /// (bound through its directory) has no such address: `InvalidInput`.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        let (address, unix) = self.with(|l| (l.address.clone(), l.unix))?;
        if unix {
            return unix::SocketAddr::from_pathname(&address).map(SocketAddr::Unix);
        }
        address.parse().map(SocketAddr::Inet).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the primary bound {address:?}, not an IP address"),
            )
        })
    }

    /// The policy the primary chose for this listener.
    pub fn policy(&self) -> Policy {
        self.with(|l| l.policy).unwrap_or(Policy::RoundRobin)
    }

    /// Waits for the next connection and returns it with the peer's
    /// address (`getpeername(2)`), as std's `TcpListener::accept` does. A
    /// connection the client reset before it was taken (no peer any more)
    /// is dropped and the next one awaited.
    ///
    /// Meanwhile whatever else arrives (messages, the disconnect request,
    /// connections for other listeners) is kept for
    /// [`Worker::next_event`](super::Worker::next_event). After a disconnect
    /// the connections already handed over are still returned; then the
    /// error is `ConnectionAborted`. When the worker runs out of fds, a
    /// shared listener rests 100 ms instead of failing. In non-blocking mode
    /// ([`Listener::set_nonblocking`]) it fails with `WouldBlock` when no
    /// connection is ready. A listener at its cap
    /// ([`Listener::set_max_connections`]) takes no connection until one of
    /// its streams is dropped.
    ///
    /// ```no_run
    /// # fn main() -> std::io::Result<()> {
    /// use std::io::Write;
    /// let worker = syncluster::Worker::from_env()?.expect("run by a primary");
    /// let listener = worker.listen("127.0.0.1:8000")?;
    /// loop {
    ///     let (mut stream, peer) = listener.accept()?;
    ///     writeln!(stream, "hello {peer}")?;
    /// }
    /// # }
    /// ```
    pub fn accept(&self) -> io::Result<(Stream, SocketAddr)> {
        loop {
            let stream = self.inner.borrow_mut().accept_on(self.idx)?;
            match stream.peer_addr() {
                Ok(peer) => return Ok((stream, peer)),
                // Reset by the client before we got to it: take the next.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// An iterator over connections, as std's `TcpListener::incoming`: each
    /// item is [`Listener::accept`]'s stream without the peer address. It
    /// ends (`None`) once the worker is told to disconnect and the
    /// connections already handed over are served.
    pub fn incoming(&self) -> Incoming<'_> {
        Incoming { listener: self }
    }

    /// Sets non-blocking mode: [`Listener::accept`] then reads whatever
    /// frames the channel has ready and fails with `WouldBlock` instead of
    /// waiting. Wait for the fd of [`Listener::as_fd`] between calls.
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        let mut inner = self.inner.borrow_mut();
        inner.listener_mut(self.idx).ok_or_else(closed)?.nonblocking = nonblocking;
        Ok(())
    }

    /// Caps the connections this listener holds open at once (Node's
    /// `server.maxConnections`); `None` (the default) lifts the cap,
    /// `Some(0)` refuses every connection.
    ///
    /// At the cap, round robin: the worker tells the primary it refuses
    /// connections, and the primary gives them to the other workers (and
    /// closes a connection, once, when every worker refuses). Shared: the worker
    /// stops accepting (the socket leaves its epoll) until a [`Stream`] of
    /// this listener is dropped, so the other workers take the connections;
    /// when every worker is at its cap they wait in the kernel's backlog.
    ///
    /// A listener's first cap makes the worker's wake socketpair (two
    /// fds, kept for the worker's life): that is the error this may return.
    pub fn set_max_connections(&self, max: Option<usize>) -> io::Result<()> {
        let mut inner = self.inner.borrow_mut();
        let l = inner.listener(self.idx).ok_or_else(closed)?;
        let own_queue = l.shared.is_some() || l.pipe.is_some();
        if max.is_some() && own_queue {
            inner.ensure_waker()?;
        }
        inner.listener_mut(self.idx).ok_or_else(closed)?.max = max;
        inner.resume_listeners();
        Ok(())
    }

    /// The cap set by [`Listener::set_max_connections`].
    pub fn max_connections(&self) -> Option<usize> {
        self.with(|l| l.max).ok().flatten()
    }

    /// How many [`Stream`]s of this listener are open now (≈ Node's
    /// `server.getConnections()`).
    pub fn open_connections(&self) -> usize {
        self.with(|l| l.count.open()).unwrap_or(0)
    }

    /// Closes the listener now (the same as dropping it).
    pub fn close(self) {}
}

/// The worker's epoll fd, the same as [`Worker`](super::Worker)'s
/// (`AsFd for Worker`), shared by every listener of the worker. It is
/// readable when this listener may have a connection ready: in round robin,
/// when a frame arrives on the channel (connections are handed over in
/// frames); in shared mode, also when the listening socket is readable,
/// except while the listener is at its cap or resting after `EMFILE` (it is
/// out of the epoll then, so a foreign loop does not spin; wait no longer
/// than [`Worker::poll_timeout`](super::Worker::poll_timeout) for a rest to
/// end). It is also
/// readable for whatever else the worker watches (messages, other
/// listeners, fds given to [`Worker::register`](super::Worker::register)):
/// [`Listener::accept`] in non-blocking mode then fails with `WouldBlock`.
/// A program with several listeners or registered fds is better served by
/// [`Worker::try_next_event`](super::Worker::try_next_event). Register the
/// fd with a foreign loop once, whatever the number of listeners.
///
/// It is not the listening socket: that one is the primary's in round
/// robin, and in shared mode the worker closes its copy when it disconnects,
/// while the `Listener` may live on.
impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }
}

/// See [`AsFd for Listener`](#impl-AsFd-for-Listener).
impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Ok(mut inner) = self.inner.try_borrow_mut() {
            inner.close_listener(self.idx);
        }
    }
}

/// The iterator of [`Listener::incoming`].
#[derive(Debug)]
pub struct Incoming<'a> {
    listener: &'a Listener,
}

impl Iterator for Incoming<'_> {
    type Item = io::Result<Stream>;
    fn next(&mut self) -> Option<Self::Item> {
        match self
            .listener
            .inner
            .borrow_mut()
            .accept_on(self.listener.idx)
        {
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => None,
            other => Some(other),
        }
    }
}
