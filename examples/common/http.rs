//! The hello-world HTTP/1.1 server that each worker of `examples/hello.rs`
//! and `examples/request_counter.rs` runs, included by both with
//! `#[path = "common/http.rs"] mod http;` (a file in a subdirectory of
//! `examples/` is a module, not an example).
//!
//! A single-threaded, non-blocking server on the worker's event loop:
//! keep-alive, pipelining, bodies read and discarded, and a drain on the
//! primary's disconnect request. [`Server::on_request`] tells the program
//! about each request it answers.
//!
//! A client costs only its own connection, and a bounded part of it:
//! - memory: at most [`MAX_INPUT`] unparsed bytes and about
//!   [`MAX_PENDING_OUTPUT`] unsent ones; a client that pipelines without
//!   reading its answers gets backpressure (its requests are no longer read)
//!   instead of a growing buffer;
//! - time: the read timeout bounds idleness and the whole request head;
//!   a body must keep arriving (the read timeout between bytes) and at
//!   [`MIN_BODY_RATE`] on average, so a body that stalls or trickles is cut;
//! - garbage: a malformed head is answered 400 (431, 501, 505) and closed,
//!   including an HTTP/1.1 request without Host, two Host fields, and
//!   control characters in a field value (RFC 9112 §3.2, RFC 9110 §5.5).
//!
//! `GET /work?ms=N` (N at most [`MAX_WORK_MS`]) is a slow request: it
//! blocks the worker N ms, serving nothing else meanwhile, then answers as
//! any other request does (a bad or missing N is a 400).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use syncluster::worker::{Event as WorkerEvent, Interest, ListenOptions, Readiness, Stream};
use syncluster::Worker;

/// Fault injection for hello's chaos tests (scripts/chaos.py), never set in
/// normal use: `HELLO_FAULT=rogue:ID` makes worker ID write garbage to its
/// channel, `HELLO_FAULT=hang:ID` makes it block forever, and
/// `HELLO_FAULT=grow:ID:MB` makes it keep MB megabytes more (touched, so
/// resident), each on its first connection. Every program on this server
/// honours it.
fn inject_fault(worker: &Worker) {
    let Ok(spec) = std::env::var("HELLO_FAULT") else {
        return;
    };
    let Some((what, id)) = spec.split_once(':') else {
        return;
    };
    let (id, arg) = id.split_once(':').unwrap_or((id, ""));
    if id.parse::<u32>().ok() != Some(worker.id()) {
        return;
    }
    match what {
        "rogue" => {
            if let Ok(fd) = worker.raw_channel_fd() {
                let _ = std::fs::File::from(fd).write_all(b"this is not a frame, primary");
            }
        }
        "hang" => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
        "grow" => {
            let mb: usize = arg.parse().unwrap_or(0);
            std::mem::forget(vec![1u8; mb << 20]);
        }
        _ => {}
    }
}

/// How long a stopping worker leaves an idle keep-alive connection open
/// for the client's next request (answered with `Connection: close`);
/// at most the read timeout.
const DRAIN_GRACE: Duration = Duration::from_millis(1000);
/// Largest request head (request line and headers).
const MAX_HEAD: usize = 8 * 1024;
/// Most unparsed input a connection buffers; it stops being read when full.
/// Above `MAX_HEAD`, so a head that is too large is seen as one.
pub const MAX_INPUT: usize = 2 * MAX_HEAD;
/// Unsent response bytes above which a connection stops answering, and so
/// stops reading: a client that pipelines without reading gets
/// backpressure. Bytes already written do not count.
pub const MAX_PENDING_OUTPUT: usize = 64 * 1024;
/// Slowest average a request body may arrive at: each byte earns the body
/// this much more time after the read timeout (Apache's `mod_reqtimeout`
/// `MinRate`), so an upload at any honest speed passes and a trickle does
/// not.
pub const MIN_BODY_RATE: u64 = 1024; // bytes per second
/// Output buffer kept by a connection once everything is written; a burst
/// of answers does not pin its high-water mark.
const KEEP_OUTPUT: usize = 4 * 1024;
/// How long a closing connection may take to send its EOF (see `Phase`).
const LINGER: Duration = Duration::from_secs(2);
/// The longest `GET /work?ms=N`.
pub const MAX_WORK_MS: u64 = 10_000;

/// How a [`Server`]'s listeners listen: its connections must come
/// non-blocking, and this way no `fcntl` per connection is spent on it.
pub fn listen_options() -> ListenOptions {
    ListenOptions::new().nonblocking_connections(true)
}

/// See [`Server::on_request`].
type OnRequest<'w> = Box<dyn FnMut(&Worker) + 'w>;

/// The connections of one worker, in a slab indexed by the low half of their
/// token; the high half is a generation, so a stale readiness event for a
/// closed connection never reaches the one that reused its slot.
pub struct Server<'w> {
    worker: &'w Worker,
    slots: Vec<Option<Conn>>,
    free: Vec<usize>,
    /// Deadlines, earliest first; each connection has one live entry
    /// (`Conn::timer`), others are stale and skipped.
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    timeout: Duration,
    draining: bool,
    /// Connections accepted (also the generation of the next token).
    pub served: u64,
    scratch: Vec<u8>,
    on_request: Option<OnRequest<'w>>,
}

impl<'w> Server<'w> {
    /// `timeout`: how long a connection may be idle, or take to send a
    /// request head, before it is cut.
    pub fn new(worker: &'w Worker, timeout: Duration) -> Server<'w> {
        Server {
            worker,
            slots: Vec::new(),
            free: Vec::new(),
            timers: BinaryHeap::new(),
            timeout,
            draining: false,
            served: 0,
            scratch: vec![0; 64 * 1024],
            on_request: None,
        }
    }

    /// Calls `f` once per request answered with hello world, in order (Node's
    /// `'request'` event). Not for requests refused with an error status.
    #[allow(dead_code)] // hello has no use for it
    pub fn on_request(&mut self, f: impl FnMut(&Worker) + 'w) {
        self.on_request = Some(Box::new(f));
    }

    /// Serves until the primary asks this worker to disconnect and every
    /// connection has finished.
    pub fn run(&mut self) -> io::Result<()> {
        loop {
            let wait = self.expire(Instant::now());
            // After expire: when it closed the last connection, the wait it
            // returns is for a stale timer, and nothing else may wake us --
            // but connections the worker took from a shared socket's
            // backlog as it stopped may still be queued: serve those first.
            let event = if self.draining && self.live() == 0 {
                match self.worker.try_next_event()? {
                    Some(ev) => Some(ev),
                    None => return Ok(()),
                }
            } else {
                self.worker.next_event_timeout(wait)?
            };
            match event {
                Some(WorkerEvent::Connection { stream, .. }) => self.accept(stream),
                Some(WorkerEvent::Ready { token, readiness }) => self.on_ready(token, readiness),
                Some(WorkerEvent::Disconnect) => self.drain(),
                Some(_) | None => {}
            }
        }
    }

    fn live(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// A new connection; non-blocking (see [`listen_options`]).
    fn accept(&mut self, stream: Stream) {
        self.served += 1;
        if self.served == 1 {
            inject_fault(self.worker);
        }
        let idx = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let token = ((self.served & 0x3fff_ffff) << 32) | idx as u64;
        let deadline = Instant::now() + self.timeout;
        self.slots[idx] = Some(Conn::new(stream, token, deadline));
        // The request usually arrives with the connection: serve it now,
        // and register with epoll only if the connection must wait (with
        // `Connection: close` it is often answered and closed already).
        if !self.serve(token, READABLE) {
            return;
        }
        let Some(conn) = slot(&mut self.slots, token) else {
            return;
        };
        if let Some(s) = conn.stream.as_tcp() {
            // Each answer is one write: do not let Nagle hold back the
            // next ones (the first went out at once, nothing was in flight).
            let _ = s.set_nodelay(true);
        }
        if self
            .worker
            .register(conn.fd(), token, conn.interest)
            .is_err()
        {
            self.slots[idx] = None;
            self.free.push(idx);
            return;
        }
        conn.registered = true;
        self.timers.push(Reverse((conn.deadline, token)));
        conn.timer = conn.deadline;
    }

    fn on_ready(&mut self, token: u64, ready: Readiness) {
        self.serve(token, ready);
    }

    /// Does what `ready` allows on a connection; `false` when it is closed.
    fn serve(&mut self, token: u64, ready: Readiness) -> bool {
        let (worker, timeout, draining) = (self.worker, self.timeout, self.draining);
        let Some(conn) = slot(&mut self.slots, token) else {
            return false; // closed since the event was queued
        };
        let (before, answered) = (conn.interest, conn.answered);
        let keep = conn.on_ready(ready, &mut self.scratch, draining, timeout)
            && (conn.interest == before
                || !conn.registered
                || worker.reregister(conn.fd(), token, conn.interest).is_ok());
        // Before a close: a request answered on its way out still counts.
        if conn.answered > answered {
            // For the primary's max_requests (keep-alive requests count).
            worker.note_requests(conn.answered - answered);
        }
        if let Some(f) = &mut self.on_request {
            for _ in answered..conn.answered {
                f(worker);
            }
        }
        if !keep {
            self.close(token);
            return false;
        }
        if draining && conn.is_idle() {
            // Idle while stopping: closed after the grace (see `drain`).
            conn.deadline = conn.deadline.min(Instant::now() + DRAIN_GRACE.min(timeout));
        }
        // Deadlines only move later (the heap catches up lazily), except
        // when lingering starts: that one needs an entry of its own.
        if conn.registered && conn.deadline < conn.timer {
            conn.timer = conn.deadline;
            self.timers.push(Reverse((conn.deadline, token)));
        }
        true
    }

    /// Closes connections past their deadline; returns the wait until the
    /// next one.
    fn expire(&mut self, now: Instant) -> Option<Duration> {
        while let Some(&Reverse((at, token))) = self.timers.peek() {
            if at > now {
                return Some(at - now);
            }
            self.timers.pop();
            let Some(conn) = slot(&mut self.slots, token) else {
                continue;
            };
            if conn.timer != at {
                continue; // superseded by an earlier entry
            }
            if conn.deadline <= now {
                self.close(token);
            } else {
                conn.timer = conn.deadline;
                self.timers.push(Reverse((conn.deadline, token)));
            }
        }
        None
    }

    /// The primary asked us to stop: no new connections come. Busy
    /// connections finish; each next answer says `Connection: close`. An
    /// idle keep-alive connection is closed only once it has been idle for
    /// `DRAIN_GRACE`: closing one that was just used races the client's
    /// next request (it would meet a FIN or a RST instead of an answer,
    /// RFC 9112 §9.3.1), so a recent one is left the time to send it and
    /// get it answered, with `Connection: close`.
    fn drain(&mut self) {
        self.draining = true;
        let grace = DRAIN_GRACE.min(self.timeout);
        for conn in self.slots.iter_mut().flatten() {
            if conn.is_idle() {
                // `deadline` is the last activity plus the read timeout.
                let at = conn.deadline - self.timeout + grace;
                if at < conn.deadline {
                    conn.deadline = at;
                    conn.timer = at;
                    self.timers.push(Reverse((at, conn.token)));
                }
            }
        }
    }

    fn close(&mut self, token: u64) {
        let idx = token as u32 as usize;
        if let Some(conn) = self.slots.get_mut(idx).and_then(Option::take) {
            if conn.registered {
                let _ = self.worker.deregister(conn.fd());
            }
            self.free.push(idx);
        }
    }
}

/// The live connection with this token, if any.
fn slot(slots: &mut [Option<Conn>], token: u64) -> Option<&mut Conn> {
    let conn = slots.get_mut(token as u32 as usize)?.as_mut()?;
    (conn.token == token).then_some(conn)
}

const READABLE: Readiness = Readiness {
    readable: true,
    writable: false,
    hup: false,
};

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading requests and answering them.
    Open,
    /// The last response is queued; close once it is written.
    Closing,
    /// Written and shut down for writing; reading until the client's EOF,
    /// because closing with unread input would send a RST that can destroy
    /// the response before the client reads it.
    Lingering,
}

/// A request whose head is parsed and whose body is still being discarded;
/// it is answered when the body is complete.
struct Request {
    body_left: u64,
    keep_alive: bool,
    head_only: bool,
    /// The body must be complete by then: the read timeout after the head,
    /// plus what the bytes received earned at `MIN_BODY_RATE`.
    body_deadline: Instant,
    /// `/work?ms=N`: block this long before answering.
    work: Option<Duration>,
}

struct Conn {
    stream: Stream,
    token: u64,
    phase: Phase,
    /// Received and not parsed yet; at most `MAX_INPUT`.
    input: Vec<u8>,
    output: Vec<u8>,
    /// Bytes of `output` already written: only the rest counts against
    /// `MAX_PENDING_OUTPUT`, and `answer` drops them before adding more.
    written: usize,
    request: Option<Request>,
    answered: u64,
    eof: bool,
    interest: Interest,
    /// When the connection is cut: the read timeout after the last answer
    /// (so idle time and a slow head both count) or after write progress.
    deadline: Instant,
    /// The deadline of this connection's live entry in the timer heap.
    timer: Instant,
    /// Registered with the worker's epoll (and in the timer heap): not yet
    /// while its first request is served straight after accept.
    registered: bool,
    /// The last read took less than it had room for: the socket was empty.
    drained: bool,
}

impl Conn {
    fn new(stream: Stream, token: u64, deadline: Instant) -> Conn {
        Conn {
            stream,
            token,
            phase: Phase::Open,
            input: Vec::new(),
            output: Vec::new(),
            written: 0,
            request: None,
            answered: 0,
            eof: false,
            interest: Interest::READABLE,
            deadline,
            timer: deadline,
            registered: false,
            drained: false,
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }

    /// Served at least one request and holds nothing: safe to close when
    /// stopping (a fresh connection still gets its first answer).
    fn is_idle(&self) -> bool {
        self.phase == Phase::Open
            && self.answered > 0
            && self.request.is_none()
            && self.input.is_empty()
            && self.output.is_empty()
    }

    /// Does what the readiness allows; `false` means close it now.
    fn on_ready(
        &mut self,
        ready: Readiness,
        scratch: &mut [u8],
        draining: bool,
        timeout: Duration,
    ) -> bool {
        let now = Instant::now();
        if self.phase == Phase::Lingering {
            // Discard until EOF (or an error, or the deadline).
            return match self.stream.read(scratch) {
                Ok(n) => n > 0,
                Err(e) => e.kind() == io::ErrorKind::WouldBlock,
            };
        }
        if (ready.readable || ready.hup) && self.wants_input() && self.fill(scratch).is_err() {
            return false;
        }
        let next_deadline = now + timeout;
        // Answer and write until the socket is full or nothing is left.
        loop {
            let more = self.answer(draining, next_deadline);
            if self.flush(next_deadline).is_err() {
                return false;
            }
            if !more || !self.output.is_empty() {
                break;
            }
        }
        let flushed = self.output.is_empty();
        match self.phase {
            Phase::Open if flushed && self.eof => return false,
            Phase::Closing if flushed => {
                // Nothing unread (the last read emptied the socket, the
                // usual case): close at once, as a blocking server does;
                // waiting for the client's FIN would cost an epoll
                // registration and a wake per connection.
                let unread = !self.input.is_empty() || self.request.is_some() || !self.drained;
                if self.eof || !unread || self.stream_shutdown().is_err() {
                    return false;
                }
                self.phase = Phase::Lingering;
                self.deadline = self.deadline.min(now + LINGER.min(timeout));
            }
            _ => {}
        }
        self.interest = self.wanted_interest();
        true
    }

    fn unsent(&self) -> usize {
        self.output.len() - self.written
    }

    /// Reading stops while the input buffer is full or the client is not
    /// reading its answers; `answer` frees one or waits for the other.
    fn wants_input(&self) -> bool {
        self.phase == Phase::Open
            && !self.eof
            && self.input.len() < MAX_INPUT
            && self.unsent() <= MAX_PENDING_OUTPUT
    }

    fn wanted_interest(&self) -> Interest {
        let write = !self.output.is_empty();
        let read = self.phase == Phase::Lingering || self.wants_input();
        match (read, write) {
            (true, true) => Interest::BOTH,
            (false, true) => Interest::WRITABLE,
            _ => Interest::READABLE,
        }
    }

    /// One read per readiness event keeps connections fair; the loop is
    /// level-triggered, so the rest comes next turn.
    fn fill(&mut self, scratch: &mut [u8]) -> io::Result<()> {
        let room = MAX_INPUT
            .saturating_sub(self.input.len())
            .min(scratch.len());
        match self.stream.read(&mut scratch[..room]) {
            Ok(0) => self.eof = true,
            Ok(n) => {
                self.input.extend_from_slice(&scratch[..n]);
                self.drained = n < room;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Answers the complete requests in `input`, in order. `true`: stopped
    /// with requests left because enough output is pending.
    fn answer(&mut self, draining: bool, next_deadline: Instant) -> bool {
        if self.written > 0 {
            self.output.drain(..self.written);
            self.written = 0;
        }
        let mut used = 0;
        let more = loop {
            if self.phase != Phase::Open {
                break false;
            }
            if self.unsent() > MAX_PENDING_OUTPUT {
                break true;
            }
            let input = &self.input[used..];
            if let Some(req) = &mut self.request {
                let n = req.body_left.min(input.len() as u64);
                used += n as usize;
                req.body_left -= n;
                if req.body_left > 0 {
                    if n > 0 {
                        // A slow body is not a stall, but a trickle is.
                        req.body_deadline += earned(n);
                        self.progress(next_deadline);
                    }
                    break false;
                }
                let req = self.request.take().expect("checked above");
                if let Some(work) = req.work {
                    // The whole worker waits: that is the point.
                    std::thread::sleep(work);
                }
                let keep_alive = req.keep_alive && !draining;
                respond_hello(&mut self.output, keep_alive, req.head_only);
                self.answered += 1;
                self.deadline = next_deadline;
                if !keep_alive {
                    self.phase = Phase::Closing;
                }
                continue;
            }
            match parse_head(input) {
                Parsed::Partial => break false,
                Parsed::Bad(status) => {
                    respond_error(&mut self.output, status);
                    self.phase = Phase::Closing;
                }
                Parsed::Head(head) => {
                    used += head.len;
                    if head.expect_continue && head.body > 0 {
                        self.output
                            .extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                    }
                    if head.body > 0 {
                        // The head's own time is over; the body's begins.
                        self.deadline = next_deadline;
                    }
                    self.request = Some(Request {
                        body_left: head.body,
                        keep_alive: head.keep_alive,
                        head_only: head.head_only,
                        body_deadline: next_deadline,
                        work: head.work,
                    });
                }
            }
        };
        self.input.drain(..used);
        more
    }

    fn flush(&mut self, next_deadline: Instant) -> io::Result<()> {
        while self.written < self.output.len() {
            match self.stream.write(&self.output[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.written += n;
                    self.progress(next_deadline);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.output.clear();
        self.output.shrink_to(KEEP_OUTPUT);
        self.written = 0;
        Ok(())
    }

    /// Pushes the deadline to `next_deadline`, never past the body's.
    fn progress(&mut self, next_deadline: Instant) {
        self.deadline = match &self.request {
            Some(req) => next_deadline.min(req.body_deadline),
            None => next_deadline,
        };
    }

    fn stream_shutdown(&self) -> io::Result<()> {
        self.stream.shutdown(Shutdown::Write)
    }
}

/// The extra time `n` body bytes earn at `MIN_BODY_RATE`.
fn earned(n: u64) -> Duration {
    Duration::from_micros(n.saturating_mul(1_000_000) / MIN_BODY_RATE)
}

// ---------------------------------------------------------------------------
// HTTP/1.1, just enough: request heads (RFC 9112) and the two kinds of
// answer.

const HELLO_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n";
const HELLO_BODY: &[u8] = b"hello world\n";

fn respond_hello(out: &mut Vec<u8>, keep_alive: bool, head_only: bool) {
    out.extend_from_slice(HELLO_HEAD);
    // Builds made to test binary upgrades say which build answered; the
    // usual build sends the same bytes as the C servers it is compared with.
    if let Some(id) = option_env!("HELLO_BUILD_ID") {
        out.extend_from_slice(b"x-build: ");
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(if keep_alive {
        b"Connection: keep-alive\r\n\r\n"
    } else {
        b"Connection: close\r\n\r\n"
    });
    if !head_only {
        out.extend_from_slice(HELLO_BODY);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    BadRequest,
    HeadTooLarge,
    NotImplemented,
    VersionNotSupported,
}

fn respond_error(out: &mut Vec<u8>, status: Status) {
    let (code, reason) = match status {
        Status::BadRequest => (400, "Bad Request"),
        Status::HeadTooLarge => (431, "Request Header Fields Too Large"),
        Status::NotImplemented => (501, "Not Implemented"),
        Status::VersionNotSupported => (505, "HTTP Version Not Supported"),
    };
    let body = format!("{reason}\n");
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(body.as_bytes());
}

#[derive(Debug, PartialEq, Eq)]
struct Head {
    /// Bytes of the head, blank line included.
    len: usize,
    keep_alive: bool,
    head_only: bool,
    body: u64,
    expect_continue: bool,
    work: Option<Duration>,
}

#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Partial,
    Head(Head),
    Bad(Status),
}

fn parse_head(buf: &[u8]) -> Parsed {
    // RFC 9112 §2.2: ignore empty lines before a request line.
    let skip = buf
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    let Some(end) = head_end(&buf[skip..]) else {
        return if buf.len() > MAX_HEAD {
            Parsed::Bad(Status::HeadTooLarge)
        } else {
            Parsed::Partial
        };
    };
    if end > MAX_HEAD {
        return Parsed::Bad(Status::HeadTooLarge);
    }
    match parse_lines(&buf[skip..skip + end]) {
        Ok(mut head) => {
            head.len = skip + end;
            Parsed::Head(head)
        }
        Err(status) => Parsed::Bad(status),
    }
}

/// The length of the head up to and including its blank line (CRLF or a
/// bare LF, which RFC 9112 lets servers accept).
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = buf[from..].iter().position(|&b| b == b'\n') {
        let rest = &buf[from + i + 1..];
        if rest.starts_with(b"\n") {
            return Some(from + i + 2);
        }
        if rest.starts_with(b"\r\n") {
            return Some(from + i + 3);
        }
        from += i + 1;
    }
    None
}

fn parse_lines(head: &[u8]) -> Result<Head, Status> {
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let (method, target, http11) = parse_request_line(lines.next().unwrap_or_default())?;
    let work = work_of(target)?;
    let (mut close, mut keep_alive, mut expect_continue) = (false, false, false);
    let mut length: Option<u64> = None;
    let mut hosts = 0;
    for line in lines.take_while(|l| !l.is_empty()) {
        let (name, value) = split_header(line).ok_or(Status::BadRequest)?;
        if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
            if !is_host(value) {
                return Err(Status::BadRequest);
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            for option in value.split(|&b| b == b',').map(trim) {
                close |= option.eq_ignore_ascii_case(b"close");
                keep_alive |= option.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_length(value).ok_or(Status::BadRequest)?;
            // Two different lengths: which one the client meant is unknowable.
            if length.is_some_and(|m| m != n) {
                return Err(Status::BadRequest);
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Chunked bodies are not worth the code in a hello world.
            return Err(Status::NotImplemented);
        } else if name.eq_ignore_ascii_case(b"expect") {
            expect_continue = value.eq_ignore_ascii_case(b"100-continue");
        }
    }
    // RFC 9112 §3.2: HTTP/1.1 needs exactly one Host; no version two.
    if hosts > 1 || (http11 && hosts == 0) {
        return Err(Status::BadRequest);
    }
    Ok(Head {
        len: 0,
        // HTTP/1.1 keeps the connection unless told otherwise; 1.0 closes it
        // unless told otherwise.
        keep_alive: !close && (http11 || keep_alive),
        head_only: method == b"HEAD",
        body: length.unwrap_or(0),
        expect_continue: http11 && expect_continue,
        work,
    })
}

/// `/work?ms=N`: how long to block; any other target is plain hello.
fn work_of(target: &[u8]) -> Result<Option<Duration>, Status> {
    let Some(query) = target.strip_prefix(b"/work") else {
        return Ok(None);
    };
    if !query.is_empty() && !query.starts_with(b"?") {
        return Ok(None); // `/workers`, say
    }
    let ms = query
        .strip_prefix(b"?ms=")
        .filter(|n| !n.is_empty() && n.len() <= 5 && n.iter().all(u8::is_ascii_digit))
        .and_then(|n| std::str::from_utf8(n).ok()?.parse::<u64>().ok())
        .filter(|&ms| ms <= MAX_WORK_MS)
        .ok_or(Status::BadRequest)?;
    Ok(Some(Duration::from_millis(ms)))
}

/// `METHOD SP target SP HTTP/1.x`; returns the method, the target and
/// whether it is 1.1.
fn parse_request_line(line: &[u8]) -> Result<(&[u8], &[u8], bool), Status> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Status::BadRequest);
    };
    let target_ok = !target.is_empty() && target.iter().all(|&b| b > b' ' && b != 0x7f);
    if !is_token(method) || !target_ok {
        return Err(Status::BadRequest);
    }
    match version {
        b"HTTP/1.1" => Ok((method, target, true)),
        b"HTTP/1.0" => Ok((method, target, false)),
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            Err(Status::VersionNotSupported)
        }
        _ => Err(Status::BadRequest),
    }
}

/// `name: value`; no space before the colon, no obsolete line folding, no
/// control character in the value but HTAB (RFC 9110 §5.5: CR, LF and NUL
/// are forbidden, and the other controls are no field content either).
fn split_header(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let colon = line.iter().position(|&b| b == b':')?;
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    let control = |b: &u8| (*b < b' ' && *b != b'\t') || *b == 0x7f;
    (is_token(name) && !value.iter().any(control)).then(|| (name, trim(value)))
}

/// A Host value: `uri-host [":" port]`, possibly empty (RFC 9112 §3.2); the
/// characters of a reg-name, an IP literal or a port, nothing else.
fn is_host(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:[]%".contains(&b))
}

fn parse_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

fn is_token(s: &[u8]) -> bool {
    !s.is_empty()
        && s.iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn trim(s: &[u8]) -> &[u8] {
    let is_space = |b: &u8| *b == b' ' || *b == b'\t';
    let start = s.iter().position(|b| !is_space(b)).unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|b| !is_space(b))
        .map_or(start, |i| i + 1);
    &s[start..end]
}
