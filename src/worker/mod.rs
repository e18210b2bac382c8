//! The worker side (≈ Node's child.js): the handshake, `listen()` through
//! the primary, messages, and a single-threaded event loop.
//!
//! A worker serves in one of three ways:
//! - as with std: [`Listener::accept`] or [`Listener::incoming`] in a loop;
//! - on its own loop: [`Worker::next_event`] interleaves connections,
//!   messages, the disconnect request and the readiness of fds the program
//!   registers ([`Worker::register`]), so one thread serves many connections;
//! - inside a foreign loop (libuv, mio, a C program's `poll`): wait for the
//!   fd of [`AsFd for Worker`](Worker#impl-AsFd-for-Worker) to be readable
//!   (with at most [`Worker::poll_timeout`]), then call
//!   [`Worker::try_next_event`] until it returns `Ok(None)`.
//!
//! Files: `event_loop.rs` (the state and the epoll loop), `listener.rs`,
//! `stream.rs`, `addr.rs`, `count.rs` (open connections per listener).
//! Everything hangs off one `Rc<RefCell<..>>` shared by the [`Worker`] and
//! its [`Listener`]s: no threads, so a listener's `accept()` can read the
//! channel and keep whatever else arrives for [`Worker::next_event`].

#![forbid(unsafe_code)]

mod addr;
mod count;
mod event_loop;
mod listener;
mod stream;

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub use self::addr::SocketAddr;
pub use self::listener::{Incoming, ListenOptions, Listener};
pub use self::stream::Stream;
pub use crate::readiness::{Interest, Readiness};

use self::event_loop::{check_token, Inner};
use crate::decision::{Claim, Decided};
use crate::env::{ENV_CHANNEL_FD, ENV_WORKER_ID, ENV_WORKER_PID};
use crate::sys::{self, epoll::Epoll};

/// What [`Worker::next_event`] reports.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// A new connection.
    Connection {
        /// The [`Listener::id`] of the listener it came to.
        listener: usize,
        /// The connection.
        stream: Stream,
    },
    /// A user message from the primary.
    Message {
        /// The bytes, as the primary sent them.
        bytes: Vec<u8>,
        /// The fds that came with them, close-on-exec.
        fds: Vec<OwnedFd>,
    },
    /// The primary asked this worker to stop (or died): stop taking work,
    /// finish what you hold, then return from `main`. Reported once.
    Disconnect,
    /// An fd given to [`Worker::register`] is ready.
    Ready {
        /// The token it was registered with.
        token: u64,
        /// What it is ready for.
        readiness: Readiness,
    },
}

/// The worker process's handle on the cluster (≈ `cluster.worker` in a
/// Node worker). See the module docs for the three ways to serve.
#[derive(Debug)]
pub struct Worker {
    inner: Rc<RefCell<Inner>>,
    epoll: Rc<Epoll>,
}

fn bad_env(var: &str, value: &str, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{var}={value:?}: {why}"),
    )
}

impl Worker {
    /// Reads `SYNCLUSTER_WORKER_ID` and `SYNCLUSTER_CHANNEL_FD`, adopts the
    /// channel and says Online. `Ok(None)` when neither is set, or when
    /// `SYNCLUSTER_WORKER_PID` is set to a pid that is not ours (the
    /// variables were inherited: this is not a worker). The environment is
    /// left as it is. This is [`crate::role`] without the primary side, and
    /// shares its once-per-process rule: after a worker or primary was made,
    /// it is an `AlreadyExists` error.
    pub fn from_env() -> io::Result<Option<Worker>> {
        let mut claim = Claim::take()?;
        Worker::from_env_claimed(&mut claim)
    }

    /// [`Worker::from_env`] under a claim already taken: settles it once
    /// the channel is adopted, successfully or not.
    pub(crate) fn from_env_claimed(claim: &mut Claim) -> io::Result<Option<Worker>> {
        if let Some(v) = std::env::var_os(ENV_WORKER_PID) {
            let s = v.to_string_lossy();
            let pid = s
                .parse::<i32>()
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| bad_env(ENV_WORKER_PID, &s, "not a pid"))?;
            if pid != sys::process::getpid() {
                return Ok(None);
            }
        }
        let id_var = std::env::var_os(ENV_WORKER_ID);
        let fd_var = std::env::var_os(ENV_CHANNEL_FD);
        let (id_raw, fd_raw) = match (id_var, fd_var) {
            (None, None) => return Ok(None),
            (Some(_), None) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{ENV_WORKER_ID} is set but {ENV_CHANNEL_FD} is not"),
                ))
            }
            (None, Some(_)) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{ENV_CHANNEL_FD} is set but {ENV_WORKER_ID} is not"),
                ))
            }
            (Some(a), Some(b)) => (a, b),
        };
        let id_s = id_raw.to_string_lossy().into_owned();
        let fd_s = fd_raw.to_string_lossy().into_owned();
        let id = id_s
            .parse::<u32>()
            .ok()
            .filter(|&i| i > 0)
            .ok_or_else(|| bad_env(ENV_WORKER_ID, &id_s, "not a worker id (1, 2, 3, ...)"))?;
        let raw = fd_s
            .parse::<i32>()
            .ok()
            .filter(|&f| f > 2)
            .ok_or_else(|| bad_env(ENV_CHANNEL_FD, &fd_s, "not an fd number above 2"))?;
        let (fd, primary_pid) = sys::inherit::adopt_channel(raw)
            .map_err(|e| bad_env(ENV_CHANNEL_FD, &fd_s, &e.to_string()))?;
        // The fd is ours now: whatever happens next, no later call may
        // adopt that number again.
        match Inner::new(id, primary_pid, fd) {
            Ok(inner) => {
                claim.settle(Decided::Worker(id));
                let epoll = inner.epoll.clone();
                Ok(Some(Worker {
                    inner: Rc::new(RefCell::new(inner)),
                    epoll,
                }))
            }
            Err(e) => {
                claim.settle(Decided::FailedWorker(id));
                Err(e)
            }
        }
    }

    /// This worker's id (1, 2, 3, ...).
    pub fn id(&self) -> u32 {
        self.inner.borrow().id
    }

    /// The primary's pid, as the channel's `SO_PEERCRED` gave it when the
    /// worker adopted it (in the worker's pid namespace: 1 when the primary
    /// is a container's init).
    pub fn primary_pid(&self) -> i32 {
        self.inner.borrow().primary_pid
    }

    /// True while the primary is still this process's parent. Once it died,
    /// the worker was handed to pid 1 or to a subreaper; comparing the
    /// parent with 1 would be wrong both when the primary is pid 1 and when
    /// a subreaper takes the orphans.
    pub fn primary_is_parent(&self) -> bool {
        sys::process::getppid() == self.inner.borrow().primary_pid
    }

    /// A duplicate of the channel fd, for fault-injection tests that must
    /// write raw bytes to the primary. Not for normal use.
    #[doc(hidden)]
    pub fn raw_channel_fd(&self) -> io::Result<OwnedFd> {
        sys::fd::dup(self.inner.borrow().channel_fd()?)
    }

    /// Leaves SIGINT and SIGTERM to the primary: this worker ignores them,
    /// so a Ctrl-C to the process group (or a service manager signalling
    /// every process) lets the primary run a graceful stop instead of
    /// killing workers mid-request. The primary's death then kills the
    /// worker with SIGKILL (`PR_SET_PDEATHSIG`), as well as closing its channel.
    pub fn leave_stop_signals_to_primary(&self) -> io::Result<()> {
        sys::signal::set_ignored(sys::signal::SIGINT, true)?;
        sys::signal::set_ignored(sys::signal::SIGTERM, true)?;
        sys::process::set_pdeathsig(sys::signal::SIGKILL)?;
        if !self.primary_is_parent() {
            // The primary died before the new death signal was armed.
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!(
                    "the primary (pid {}) is gone: our parent is now pid {}",
                    self.primary_pid(),
                    sys::process::getppid()
                ),
            ));
        }
        Ok(())
    }

    /// True once the primary asked for a disconnect or died, or this worker
    /// called [`Worker::disconnect`].
    pub fn is_disconnecting(&self) -> bool {
        self.inner.borrow().disconnecting()
    }

    /// How many connections this worker holds open: the [`Stream`]s of all
    /// its listeners, closed ones included, that are not dropped yet.
    pub fn open_connections(&self) -> usize {
        self.inner.borrow().counts.open.load(Ordering::SeqCst)
    }

    /// Tells the primary that this worker served `n` more requests (an HTTP
    /// server calls it per answer, keep-alive ones included). The
    /// supervisor's [`max_requests`](crate::supervisor::Config::max_requests)
    /// then counts requests instead of connections taken. Batched, never
    /// a frame per call: sent once 16 are pending, or on a later turn of
    /// the worker's loop once 50 ms passed since the last report. After a
    /// disconnect nothing is sent.
    pub fn note_requests(&self, n: u64) {
        self.inner.borrow_mut().note_served(0, n);
    }

    /// Sends a user message to the primary (≈ `process.send`), with fds
    /// (up to 253), which the primary receives as its own close-on-exec
    /// duplicates. Blocks until written. After a disconnect the channel is
    /// closed: `NotConnected`.
    ///
    /// ```no_run
    /// # fn main() -> std::io::Result<()> {
    /// use std::os::fd::AsFd;
    /// let worker = syncluster::Worker::from_env()?.expect("run by a primary");
    /// worker.send(b"ready", &[])?;
    /// let log = std::fs::File::open("/var/log/app.log")?;
    /// worker.send(b"here is my log", &[log.as_fd()])?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        self.inner.borrow_mut().send_user(bytes, fds)
    }

    /// Blocks for the next message from the primary, with its fds.
    /// `Ok(None)` once a disconnect was requested (or the primary died).
    /// Connections that arrive meanwhile wait in their listener; other
    /// events wait for [`Worker::next_event`].
    ///
    /// ```no_run
    /// # fn main() -> std::io::Result<()> {
    /// use std::io::Read;
    /// let worker = syncluster::Worker::from_env()?.expect("run by a primary");
    /// while let Some((bytes, fds)) = worker.recv()? {
    ///     println!("{}", String::from_utf8_lossy(&bytes));
    ///     for fd in fds {
    ///         let mut text = String::new();
    ///         std::fs::File::from(fd).read_to_string(&mut text)?;
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn recv(&self) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
        let mut inner = self.inner.borrow_mut();
        loop {
            if let Some(m) = inner.pending_message() {
                return Ok(Some(m));
            }
            if inner.disconnecting() {
                return Ok(None);
            }
            inner.read_channel(true)?;
        }
    }

    /// Listens through the primary (≈ `server.listen` in a worker) on
    /// `"host:port"`, `"[v6]:port"`, a port alone (every address), or a
    /// Unix socket path: anything with a `/`, or a word with no `:` that
    /// is not a number (`app.sock`), as Node reads it. A relative path is
    /// resolved against this worker's current directory and normalized
    /// (`.`, `..`, `//`), so two spellings of one file share one socket; a
    /// path longer than a `sockaddr_un` holds still binds when its file
    /// name is short (the primary binds it through its directory), else
    /// the error is `InvalidInput`. Blocks for the primary's answer; a bind
    /// error comes back here, naming the address, and the worker may go
    /// on. Port 0 picks a port, the same for every worker's k-th `listen`
    /// of that address.
    ///
    /// ```no_run
    /// # fn main() -> std::io::Result<()> {
    /// use std::io::Write;
    /// let worker = syncluster::Worker::from_env()?.expect("run by a primary");
    /// let listener = worker.listen("127.0.0.1:0")?;
    /// println!("worker {} listens on {}", worker.id(), listener.local_addr()?);
    /// for stream in listener.incoming() {
    ///     stream?.write_all(b"hello\n")?;
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn listen(&self, addr: &str) -> io::Result<Listener> {
        self.listen_with(addr, &ListenOptions::new())
    }

    /// [`Worker::listen`] with a `listen(2)` backlog (0: the primary's
    /// default, 511); the same as `listen_with(addr, &ListenOptions::new().backlog(backlog))`.
    pub fn listen_with_backlog(&self, addr: &str, backlog: u32) -> io::Result<Listener> {
        self.listen_with(addr, &ListenOptions::new().backlog(backlog))
    }

    /// [`Worker::listen`] with options (Node's `server.listen(options)`):
    /// backlog, `IPV6_V6ONLY`, a socket of the worker's own (`exclusive`,
    /// `reuse_port`), the Unix socket file's mode, or a socket the primary
    /// offered (`fd`, with an empty `addr`). See [`ListenOptions`].
    pub fn listen_with(&self, addr: &str, opts: &ListenOptions) -> io::Result<Listener> {
        let idx = self.inner.borrow_mut().listen(addr, opts)?;
        Ok(Listener {
            inner: self.inner.clone(),
            epoll: self.epoll.clone(),
            idx,
        })
    }

    /// A UDP socket shared through the primary (≈ `dgram` `socket.bind()`
    /// in a worker, which is always a shared handle): the primary binds
    /// `addr` (`"host:port"`, `"[v6]:port"`, a port alone for `[::]`
    /// dual-stack) once, and every worker asking for it gets the same
    /// socket, so each datagram reaches exactly one of them. Port 0 picks a
    /// port, the same for every worker's k-th `bind_udp` of that address.
    /// The primary reports `Listening` with an
    /// [`Address::Udp`](crate::primary::Address::Udp). Its
    /// [`ListenRules`](crate::primary::ListenRules) TCP rules decide the UDP
    /// ports too, and each socket counts toward
    /// [`Settings::max_worker_handles`](crate::Settings::max_worker_handles).
    ///
    /// It is one socket: its options and `O_NONBLOCK` (`set_nonblocking`,
    /// `set_read_timeout`) are shared with every worker holding it. A
    /// `UdpSocket` cannot tell the primary when it is dropped: the primary
    /// keeps the socket bound for this worker until the worker disconnects
    /// or exits, and another `bind_udp` of the same address in this worker
    /// asks for the next index (another socket, as in Node after a bind
    /// that was not closed).
    ///
    /// ```no_run
    /// # fn main() -> std::io::Result<()> {
    /// let worker = syncluster::Worker::from_env()?.expect("run by a primary");
    /// let socket = worker.bind_udp("127.0.0.1:5353")?;
    /// let mut buf = [0u8; 1500];
    /// let (n, peer) = socket.recv_from(&mut buf)?;
    /// socket.send_to(&buf[..n], peer)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn bind_udp(&self, addr: &str) -> io::Result<std::net::UdpSocket> {
        self.inner.borrow_mut().bind_udp(addr)
    }

    /// Takes the fd the primary put at number `target` in this worker
    /// ([`Settings::map_fd`](crate::Settings::map_fd), Node's `stdio[4]`
    /// and up), close-on-exec. The worker adopts every such fd when it
    /// starts, so its number cannot have been reused since. `NotFound` if
    /// the primary mapped no fd there, `AlreadyExists` the second time.
    ///
    /// ```no_run
    /// # fn main() -> std::io::Result<()> {
    /// use std::io::Write;
    /// let worker = syncluster::Worker::from_env()?.expect("run by a primary");
    /// let mut log = std::fs::File::from(worker.take_fd(4)?);
    /// writeln!(log, "worker {} started", worker.id())?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn take_fd(&self, target: i32) -> io::Result<OwnedFd> {
        self.inner.borrow_mut().take_fd(target)
    }

    /// Registers an fd of the program's own (an open connection, a pipe)
    /// with the worker's loop; its readiness comes back from
    /// [`Worker::next_event`] as [`Event::Ready`] with `token`. Tokens must
    /// be below 2^62. Level-triggered.
    pub fn register(&self, fd: BorrowedFd<'_>, token: u64, interest: Interest) -> io::Result<()> {
        check_token(token)?;
        self.epoll.add(fd, interest.epoll_bits(), token)
    }

    /// Changes the interest or token of a registered fd.
    pub fn reregister(&self, fd: BorrowedFd<'_>, token: u64, interest: Interest) -> io::Result<()> {
        check_token(token)?;
        self.epoll.modify(fd, interest.epoll_bits(), token)
    }

    /// Removes a registered fd (do it before closing the fd).
    pub fn deregister(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.epoll.delete(fd)
    }

    /// Waits for the next event: a connection on any listener, a message,
    /// the disconnect request, or a registered fd's readiness.
    ///
    /// ```no_run
    /// # fn main() -> std::io::Result<()> {
    /// use std::io::Write;
    /// use syncluster::worker::Event;
    /// let worker = syncluster::Worker::from_env()?.expect("run by a primary");
    /// let _listener = worker.listen("127.0.0.1:8000")?;
    /// loop {
    ///     match worker.next_event()? {
    ///         Event::Connection { mut stream, .. } => stream.write_all(b"hello\n")?,
    ///         Event::Message { bytes, .. } => worker.send(&bytes, &[])?, // echo
    ///         Event::Disconnect => return Ok(()),
    ///         _ => {}
    ///     }
    /// }
    /// # }
    /// ```
    pub fn next_event(&self) -> io::Result<Event> {
        loop {
            if let Some(ev) = self.inner.borrow_mut().next_event(None)? {
                return Ok(ev);
            }
        }
    }

    /// Like [`Worker::next_event`], but `Ok(None)` when `timeout` passes
    /// first; `None` waits forever.
    pub fn next_event_timeout(&self, timeout: Option<Duration>) -> io::Result<Option<Event>> {
        let until = timeout.map(|t| Instant::now() + t);
        self.inner.borrow_mut().next_event(until)
    }

    /// The non-blocking step of a foreign loop: processes what is ready now
    /// and returns the next event, or `Ok(None)` when there is none. Call it
    /// until it returns `Ok(None)`, then wait for the worker's fd
    /// ([`AsFd for Worker`](Worker#impl-AsFd-for-Worker)) to become readable,
    /// for at most [`Worker::poll_timeout`].
    ///
    /// ```no_run
    /// # fn main() -> std::io::Result<()> {
    /// use std::os::fd::AsRawFd;
    /// let worker = syncluster::Worker::from_env()?.expect("run by a primary");
    /// let fd = worker.as_raw_fd(); // give it to uv_poll_start, mio's SourceFd, poll(2)...
    /// // ...and each time it is readable, or poll_timeout() has passed:
    /// while let Some(event) = worker.try_next_event()? {
    ///     println!("{event:?}");
    /// }
    /// let wait_at_most = worker.poll_timeout(); // None: until readable
    /// # let _ = (fd, wait_at_most);
    /// # Ok(())
    /// # }
    /// ```
    pub fn try_next_event(&self) -> io::Result<Option<Event>> {
        self.inner.borrow_mut().next_event(Some(Instant::now()))
    }

    /// How long a foreign loop may wait for the worker's fd before calling
    /// [`Worker::try_next_event`] (or a non-blocking [`Listener::accept`])
    /// again: the time left until a shared listener that rests after
    /// `EMFILE` (out of the epoll, so the fd does not say when) is watched
    /// again; `None` when the fd's readability is all that matters. Valid
    /// once `try_next_event` returned `Ok(None)`: events taken out of the
    /// channel and not yet returned do not make the fd readable.
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.inner.borrow().poll_timeout()
    }

    /// Worker-initiated disconnect (≈ `cluster.worker.disconnect()` in a
    /// worker): tells the primary first, so that it reports
    /// `exited_after_disconnect`, and waits up to 5 s for its
    /// acknowledgement. Then, as Node does, it stops listening, leaves the
    /// round-robin connections not yet taken to the primary (it reads them
    /// back from the pipe; other workers serve them) and closes the channel: the primary reports
    /// `Disconnect` at once, while this process may finish what it holds.
    /// Connections already taken stay open; connections a shared listener
    /// had in its backlog come from [`Worker::next_event`]. Afterwards
    /// [`Worker::send`] fails and [`Worker::recv`] returns `None`.
    pub fn disconnect(&self) -> io::Result<()> {
        self.inner.borrow_mut().disconnect()
    }
}

/// The worker's epoll fd: readable whenever [`Worker::try_next_event`] has
/// something to process (a frame from the primary, a shared listener's
/// connection, a registered fd's readiness, a capped listener's freed
/// slot). It is level-triggered and can itself be watched by another epoll,
/// libuv (`uv_poll_t`), mio (`SourceFd`) or `poll(2)`. Frames already read
/// into the worker's buffer do not make it readable: call `try_next_event`
/// until `Ok(None)` before waiting, and wait no longer than
/// [`Worker::poll_timeout`]. The same fd backs every [`Listener`]'s `AsFd`.
impl AsFd for Worker {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }
}

/// See [`AsFd for Worker`](#impl-AsFd-for-Worker).
impl AsRawFd for Worker {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}
