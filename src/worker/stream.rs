//! [`Stream`]: a connection from a TCP or a Unix listener, counted open
//! for its listener until it is dropped.

#![forbid(unsafe_code)]

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use super::count::{ListenerCount, OpenGuard};
use super::SocketAddr;

#[derive(Debug)]
enum Inner {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// A connection from a [`Listener`](super::Listener), TCP or Unix, with the
/// methods of std's [`TcpStream`] and [`UnixStream`].
///
/// While it lives it counts as open for its listener
/// ([`Listener::open_connections`](super::Listener::open_connections),
/// [`Listener::set_max_connections`](super::Listener::set_max_connections))
/// and for the worker ([`Worker::open_connections`](super::Worker::open_connections)).
/// Dropping it closes the connection and frees its slot. It may be sent to
/// and dropped on another thread.
///
/// [`Stream::into_tcp`] and [`Stream::into_unix`] give the std stream out;
/// the connection then no longer counts as open, though it stays open.
/// Clones made with `as_tcp().try_clone()` do not count either.
#[derive(Debug)]
pub struct Stream {
    // Declared first: dropped (closed) before the guard frees the slot.
    inner: Inner,
    open: Option<OpenGuard>,
}

impl Stream {
    pub(super) fn new(fd: OwnedFd, unix: bool, count: &Arc<ListenerCount>) -> Stream {
        let inner = if unix {
            Inner::Unix(UnixStream::from(fd))
        } else {
            Inner::Tcp(TcpStream::from(fd))
        };
        Stream {
            inner,
            open: Some(OpenGuard::new(count)),
        }
    }

    /// The remote end's address (`getpeername(2)`); a Unix client's end is
    /// usually unnamed.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        match &self.inner {
            Inner::Tcp(s) => s.peer_addr().map(SocketAddr::Inet),
            Inner::Unix(s) => s.peer_addr().map(SocketAddr::Unix),
        }
    }

    /// This end's address (`getsockname(2)`).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.inner {
            Inner::Tcp(s) => s.local_addr().map(SocketAddr::Inet),
            Inner::Unix(s) => s.local_addr().map(SocketAddr::Unix),
        }
    }

    /// Sets or clears `O_NONBLOCK`: reads and writes that would block then
    /// fail with `WouldBlock` (for use with [`Worker::register`](super::Worker::register)).
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        match &self.inner {
            Inner::Tcp(s) => s.set_nonblocking(nonblocking),
            Inner::Unix(s) => s.set_nonblocking(nonblocking),
        }
    }

    /// Sets the read timeout (`SO_RCVTIMEO`); `None` blocks forever. A zero
    /// duration is an `InvalidInput` error, as in std.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match &self.inner {
            Inner::Tcp(s) => s.set_read_timeout(timeout),
            Inner::Unix(s) => s.set_read_timeout(timeout),
        }
    }

    /// Sets the write timeout (`SO_SNDTIMEO`); `None` blocks forever. A zero
    /// duration is an `InvalidInput` error, as in std.
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match &self.inner {
            Inner::Tcp(s) => s.set_write_timeout(timeout),
            Inner::Unix(s) => s.set_write_timeout(timeout),
        }
    }

    /// Shuts down the read half, the write half or both (`shutdown(2)`).
    /// The stream still counts as open until it is dropped.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match &self.inner {
            Inner::Tcp(s) => s.shutdown(how),
            Inner::Unix(s) => s.shutdown(how),
        }
    }

    /// The TCP stream, or `None` for a Unix connection (for the TCP-only
    /// options: `set_nodelay`, `set_ttl`...).
    pub fn as_tcp(&self) -> Option<&TcpStream> {
        match &self.inner {
            Inner::Tcp(s) => Some(s),
            Inner::Unix(_) => None,
        }
    }

    /// The Unix stream, or `None` for a TCP connection.
    pub fn as_unix(&self) -> Option<&UnixStream> {
        match &self.inner {
            Inner::Unix(s) => Some(s),
            Inner::Tcp(_) => None,
        }
    }

    /// The std TCP stream; the connection stays open but no longer counts
    /// as open for its listener. A Unix connection comes back as `Err`.
    pub fn into_tcp(mut self) -> Result<TcpStream, Stream> {
        match self.inner {
            Inner::Tcp(s) => {
                self.open = None;
                Ok(s)
            }
            Inner::Unix(_) => Err(self),
        }
    }

    /// The std Unix stream; the connection stays open but no longer counts
    /// as open for its listener. A TCP connection comes back as `Err`.
    pub fn into_unix(mut self) -> Result<UnixStream, Stream> {
        match self.inner {
            Inner::Unix(s) => {
                self.open = None;
                Ok(s)
            }
            Inner::Tcp(_) => Err(self),
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.inner {
            Inner::Tcp(s) => (&*s).read(buf),
            Inner::Unix(s) => (&*s).read(buf),
        }
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        match &self.inner {
            Inner::Tcp(s) => (&*s).read_vectored(bufs),
            Inner::Unix(s) => (&*s).read_vectored(bufs),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &self.inner {
            Inner::Tcp(s) => (&*s).write(buf),
            Inner::Unix(s) => (&*s).write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match &self.inner {
            Inner::Tcp(s) => (&*s).write_vectored(bufs),
            Inner::Unix(s) => (&*s).write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        (&*self).read_vectored(bufs)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (&*self).write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.inner {
            Inner::Tcp(s) => s.as_fd(),
            Inner::Unix(s) => s.as_fd(),
        }
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::count::WorkerCount;
    use std::sync::atomic::Ordering::SeqCst;

    fn pair(count: &Arc<ListenerCount>) -> (Stream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Stream::new(OwnedFd::from(a), true, count), b)
    }

    #[test]
    fn a_stream_counts_open_until_dropped_or_taken_out() {
        let worker = Arc::new(WorkerCount::default());
        let count = ListenerCount::new(&worker);
        let (s1, _p1) = pair(&count);
        let (s2, mut p2) = pair(&count);
        assert_eq!((count.open(), worker.open.load(SeqCst)), (2, 2));
        // Read and Write through a shared reference, as std's streams.
        (&s2).write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        p2.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        assert!(s2.as_unix().is_some() && s2.as_tcp().is_none());
        drop(s1);
        assert_eq!((count.open(), worker.open.load(SeqCst)), (1, 1));
        let s2 = s2.into_tcp().expect_err("a Unix stream is not TCP");
        let std_stream = s2.into_unix().unwrap();
        assert_eq!((count.open(), worker.open.load(SeqCst)), (0, 0));
        // Still open: it only stopped counting.
        (&std_stream).write_all(b"x").unwrap();
    }

    #[test]
    fn a_full_listener_is_paused_until_a_stream_drops() {
        let worker = Arc::new(WorkerCount::default());
        let count = ListenerCount::new(&worker);
        let (s1, _p1) = pair(&count);
        assert!(count.pause_if_full(Some(1)));
        assert!(count.paused.load(SeqCst));
        drop(s1);
        assert!(!count.pause_if_full(Some(1)));
        assert!(!count.paused.load(SeqCst));
        assert!(!count.pause_if_full(None));
    }
}
