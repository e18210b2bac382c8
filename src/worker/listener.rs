//! [`Listener`]: a listening socket obtained through the primary, used as
//! std's `TcpListener` is.

#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net as unix;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use super::count::ListenerCount;
use super::event_loop::Inner;
use super::{SocketAddr, Stream};
use crate::protocol::Policy;
use crate::sys::epoll::Epoll;

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
    /// Whether `shared` is in the worker's epoll now.
    pub(super) in_epoll: bool,
    /// Set while a shared listener rests after `accept` failed for want of
    /// resources (`EMFILE`...): it stays readable, so retrying would spin.
    pub(super) resting_until: Option<Instant>,
    pub(super) max: Option<usize>,
    pub(super) nonblocking: bool,
    pub(super) count: Arc<ListenerCount>,
    /// Round robin: connections handed over and not yet taken, with the
    /// primary's id for each (the acknowledgement goes when one is taken).
    pub(super) queue: VecDeque<(u32, OwnedFd)>,
}

impl ListenerState {
    /// Round robin: true when one more handed-over connection would exceed
    /// the cap (the queued ones count: each will be taken).
    pub(super) fn full_for_handover(&self) -> bool {
        self.max
            .is_some_and(|m| self.count.open() + self.queue.len() >= m)
    }
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
    /// socket, its path.
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
    /// At the cap, round robin: each connection the primary hands over is
    /// answered "rejected", and the primary gives it to another worker (or
    /// closes it, once, when every worker rejected it). Shared: the worker
    /// stops accepting (the socket leaves its epoll) until a [`Stream`] of
    /// this listener is dropped, so the other workers take the connections;
    /// when every worker is at its cap they wait in the kernel's backlog.
    /// Connections handed over but not yet taken count toward the cap.
    ///
    /// A shared listener's first cap makes the worker's wake socketpair (two
    /// fds, kept for the worker's life): that is the error this may return.
    pub fn set_max_connections(&self, max: Option<usize>) -> io::Result<()> {
        let mut inner = self.inner.borrow_mut();
        let shared = inner
            .listener(self.idx)
            .ok_or_else(closed)?
            .shared
            .is_some();
        if max.is_some() && shared {
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
