//! A hello-world HTTP/1.1 server on a syncluster cluster.
//!
//! ```text
//! cargo run --release --example hello -- [--workers N] [--host H] [--port P] [--policy rr|shared]
//! ```
//!
//! The primary forks one worker per CPU, prints
//! `listening on http://HOST:PORT (N workers, POLICY)` once all of them
//! listen, replaces workers that die (with backoff), and on SIGTERM or
//! SIGINT stops gracefully and prints `served {"1":N1,...}`: connections
//! served per worker.
//!
//! Each worker is a single-threaded, non-blocking server on the worker's
//! event loop: keep-alive, pipelining, bodies read and discarded, a read
//! timeout (`HELLO_READ_TIMEOUT_MS`, default 10 s) so that a client that
//! stalls or sends garbage costs only its own connection.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashSet};
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use syncluster::primary::{Address, Event as PrimaryEvent, ExitStatus};
use syncluster::protocol::Endpoint;
use syncluster::worker::{Event as WorkerEvent, Interest, Readiness, Stream};
use syncluster::supervisor::{self, Notice, Supervisor};
use syncluster::{Policy, Primary, Role, Worker};

const USAGE: &str = "\
usage: hello [--workers N] [--host H] [--port P] [--policy rr|shared]

  --workers N     worker processes (default: the number of CPUs)
  --host H        address to listen on (default: 127.0.0.1)
  --port P        port, 0 for any free one (default: 8000)
  --policy P      rr: the primary accepts and hands connections out in turn;
                  shared: workers accept on a shared socket
                  (default: $SYNCLUSTER_SCHED_POLICY, else rr)

environment: HELLO_READ_TIMEOUT_MS  idle / header read timeout (default 10000)
             HELLO_HANG_TIMEOUT_MS  kill a worker that holds connections this long
                                    without taking the next one (default off)
";

/// Exit status of a worker that could not listen: starting more is futile.
const EXIT_LISTEN_FAILED: u8 = 3;

fn main() -> ExitCode {
    let opts = match parse_args(std::env::args_os().skip(1)) {
        Ok(Some(opts)) => opts,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(why) => {
            eprintln!("hello: {why}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if opts.policy.is_some() {
        // The flag wins: a stale or bad value in the environment must not
        // stop role() (single-threaded here, so changing the env is sound).
        std::env::remove_var("SYNCLUSTER_SCHED_POLICY");
    }
    let result = match syncluster::role() {
        Ok(Role::Primary(primary)) => Cluster::start(primary, &opts).and_then(Cluster::run),
        Ok(Role::Worker(worker)) => serve(&worker, &opts),
        Err(e) => {
            eprintln!("hello: {e}");
            return ExitCode::from(2);
        }
    };
    result.unwrap_or_else(|e| {
        eprintln!("hello: {e}");
        ExitCode::FAILURE
    })
}

// ---------------------------------------------------------------------------
// Command line. Workers get the primary's arguments and parse them the same
// way; the primary has already rejected bad ones.

#[derive(Debug, Clone)]
struct Options {
    workers: usize,
    host: String,
    port: u16,
    /// `None`: keep the policy role() read from the environment.
    policy: Option<Policy>,
    read_timeout: Duration,
    hang_timeout: Option<Duration>,
}

impl Options {
    /// `host:port` as `Worker::listen` takes it; IPv6 needs brackets.
    fn listen_addr(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// `Ok(None)` means `--help`.
fn parse_args(args: impl Iterator<Item = OsString>) -> Result<Option<Options>, String> {
    let mut opts = Options {
        workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
        host: "127.0.0.1".into(),
        port: 8000,
        policy: None,
        read_timeout: read_timeout_from_env()?,
        hang_timeout: hang_timeout_from_env()?,
    };
    let mut args = args.map(|a| a.into_string().map_err(|a| format!("not UTF-8: {a:?}")));
    while let Some(arg) = args.next() {
        let arg = arg?;
        if arg == "--help" || arg == "-h" {
            return Ok(None);
        }
        // Both `--flag value` and `--flag=value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg, None),
        };
        let mut value = || match inline.clone() {
            Some(v) => Ok(v),
            None => args
                .next()
                .unwrap_or_else(|| Err(format!("{flag} needs a value"))),
        };
        match flag.as_str() {
            "--workers" => {
                let v = value()?;
                opts.workers = v
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("--workers {v:?}: expected a number above 0"))?;
            }
            "--host" => opts.host = value()?,
            "--port" => {
                let v = value()?;
                opts.port = v
                    .parse()
                    .map_err(|_| format!("--port {v:?}: expected 0..65535"))?;
            }
            "--policy" => {
                let v = value()?;
                opts.policy = Some(
                    Policy::parse(&v)
                        .ok_or_else(|| format!("--policy {v:?}: expected rr or shared"))?,
                );
            }
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    // Catch a bad host here, once, rather than in every worker.
    match Endpoint::parse(&opts.listen_addr()) {
        Ok(Endpoint::Tcp(..)) => Ok(Some(opts)),
        _ => Err(format!(
            "--host {:?}: expected an IP address or localhost",
            opts.host
        )),
    }
}

fn hang_timeout_from_env() -> Result<Option<Duration>, String> {
    match std::env::var("HELLO_HANG_TIMEOUT_MS") {
        Err(_) => Ok(None),
        Ok(v) => v
            .parse::<u64>()
            .ok()
            .filter(|&ms| ms > 0)
            .map(|ms| Some(Duration::from_millis(ms)))
            .ok_or_else(|| format!("HELLO_HANG_TIMEOUT_MS={v:?}: expected milliseconds above 0")),
    }
}

/// Fault injection for scripts/chaos.sh, never set in normal use:
/// `HELLO_FAULT=rogue:ID` makes worker ID write garbage to its channel, and
/// `HELLO_FAULT=hang:ID` makes it block forever, each on its first connection.
fn inject_fault(worker: &Worker) {
    let Ok(spec) = std::env::var("HELLO_FAULT") else {
        return;
    };
    let Some((what, id)) = spec.split_once(':') else {
        return;
    };
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
        _ => {}
    }
}

fn read_timeout_from_env() -> Result<Duration, String> {
    match std::env::var("HELLO_READ_TIMEOUT_MS") {
        Err(_) => Ok(Duration::from_secs(10)),
        Ok(v) => v
            .parse::<u64>()
            .ok()
            .filter(|&ms| ms > 0)
            .map(Duration::from_millis)
            .ok_or_else(|| format!("HELLO_READ_TIMEOUT_MS={v:?}: expected milliseconds above 0")),
    }
}

/// One line on stdout, flushed at once: scripts wait for it. A closed
/// stdout is not worth dying for.
fn say(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

// ---------------------------------------------------------------------------
// The primary: the crate's supervisor does the operations (respawn with
// backoff, graceful stop on SIGTERM/SIGINT, immediate stop on SIGQUIT,
// rolling reload on SIGHUP, scaling on SIGTTIN/SIGTTOU); this only
// announces, reports and collects the served counts.

struct Cluster {
    sup: Supervisor,
    workers: usize,
    /// Workers that listen; the line is printed when all N first do.
    listening: HashSet<u32>,
    announced: bool,
    /// A worker could not listen: stop, and exit non-zero.
    failed: bool,
    /// Connections served, as each worker reported before exiting.
    served: BTreeMap<u32, u64>,
}

impl Cluster {
    fn start(mut primary: Primary, opts: &Options) -> io::Result<Cluster> {
        if let Some(policy) = opts.policy {
            primary.settings_mut().policy = policy;
        }
        let config = supervisor::Config {
            workers: opts.workers,
            hang_timeout: opts.hang_timeout,
            ..supervisor::Config::default()
        };
        Ok(Cluster {
            sup: Supervisor::start(primary, config)?,
            workers: opts.workers,
            listening: HashSet::new(),
            announced: false,
            failed: false,
            served: BTreeMap::new(),
        })
    }

    fn run(mut self) -> io::Result<ExitCode> {
        // `None` once a stop finished: every worker exited and every event
        // (their reports included) was delivered.
        while let Some(notice) = self.sup.next_event()? {
            self.on_notice(notice)?;
        }
        if self.failed {
            return Ok(ExitCode::FAILURE);
        }
        let counts: Vec<String> = self
            .served
            .iter()
            .map(|(id, n)| format!("\"{id}\":{n}"))
            .collect();
        say(&format!("served {{{}}}", counts.join(",")));
        Ok(ExitCode::SUCCESS)
    }

    fn on_notice(&mut self, notice: Notice) -> io::Result<()> {
        match notice {
            Notice::Cluster(PrimaryEvent::Listening(id, addr)) => self.on_listening(id, &addr),
            Notice::Cluster(PrimaryEvent::Message(id, bytes, _fds)) => self.on_message(id, &bytes),
            Notice::Cluster(PrimaryEvent::Exit(id, status, after_disconnect)) => {
                self.listening.remove(&id);
                if status == ExitStatus::Code(EXIT_LISTEN_FAILED as i32) {
                    eprintln!("worker {id} could not listen; stopping");
                    self.failed = true;
                    return self.sup.stop();
                }
                if !after_disconnect {
                    eprintln!("worker {id} died ({status})");
                }
            }
            Notice::Cluster(PrimaryEvent::Error(id, e)) => eprintln!("worker {id}: {e}"),
            Notice::Cluster(PrimaryEvent::Hung(id)) => eprintln!("worker {id} hung; killed"),
            Notice::Cluster(_) | Notice::Ready => {}
            Notice::Respawning { id, delay, .. } if delay.is_zero() => {
                eprintln!("worker {id}: forking a replacement");
            }
            Notice::Respawning { id, delay, .. } => {
                eprintln!("worker {id}: forking a replacement in {} ms", delay.as_millis());
            }
            Notice::CrashLoop { failures } => {
                eprintln!("workers keep dying ({failures} in a row); backing off");
            }
            Notice::Stopping { graceful } => {
                let how = if graceful { "gracefully" } else { "now" };
                eprintln!("stopping {how}");
            }
            Notice::ForceKilled(ids) => eprintln!("graceful timeout: killed workers {ids:?}"),
            other => eprintln!("{other:?}"),
        }
        Ok(())
    }

    fn on_listening(&mut self, id: u32, addr: &Address) {
        if self.announced {
            // Only replacements listen after the announcement.
            eprintln!("worker {id} is listening (a replacement)");
            return;
        }
        self.listening.insert(id);
        if self.listening.len() >= self.workers {
            self.announced = true;
            let policy = self.sup.primary().settings().policy.name();
            // The primary's address has port 0 resolved.
            say(&format!(
                "listening on http://{addr} ({} workers, {policy})",
                self.workers
            ));
        }
    }

    fn on_message(&mut self, id: u32, bytes: &[u8]) {
        let count = std::str::from_utf8(bytes)
            .ok()
            .and_then(|s| s.strip_prefix("served "))
            .and_then(|n| n.parse().ok());
        if let Some(n) = count {
            self.served.insert(id, n);
        }
    }
}

/// A worker: listen through the primary and serve until told to stop.
fn serve(worker: &Worker, opts: &Options) -> io::Result<ExitCode> {
    // Ctrl-C signals the whole process group, and a service manager may
    // SIGTERM every process of the service: the primary alone decides when
    // workers stop, so they can finish their connections and report.
    worker.leave_stop_signals_to_primary()?;
    let mut server = Server::new(worker, opts.read_timeout);
    match worker.listen(&opts.listen_addr()) {
        // The listener lives to the end of the arm: dropping it closes it.
        Ok(_listener) => server.run()?,
        // Stopped before it started: nothing served, nothing wrong.
        Err(_) if worker.is_disconnecting() => {}
        Err(e) => {
            eprintln!("worker {}: {e}", worker.id());
            return Ok(ExitCode::from(EXIT_LISTEN_FAILED));
        }
    }
    // The primary may be gone already; then nobody is listening anyway.
    let _ = worker.send(format!("served {}", server.served).as_bytes(), &[]);
    Ok(ExitCode::SUCCESS)
}

/// Largest request head (request line and headers).
const MAX_HEAD: usize = 8 * 1024;
/// Unsent response bytes above which a connection stops being read: a
/// client that pipelines without reading gets backpressure.
const MAX_PENDING_OUTPUT: usize = 64 * 1024;
/// How long a closing connection may take to send its EOF (see `Phase`).
const LINGER: Duration = Duration::from_secs(2);

/// The connections of one worker, in a slab indexed by the low half of their
/// token; the high half is a generation, so a stale readiness event for a
/// closed connection never reaches the one that reused its slot.
struct Server<'w> {
    worker: &'w Worker,
    slots: Vec<Option<Conn>>,
    free: Vec<usize>,
    /// Deadlines, earliest first; each connection has one live entry
    /// (`Conn::timer`), others are stale and skipped.
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    timeout: Duration,
    draining: bool,
    served: u64,
    scratch: Vec<u8>,
}

impl<'w> Server<'w> {
    fn new(worker: &'w Worker, timeout: Duration) -> Server<'w> {
        Server {
            worker,
            slots: Vec::new(),
            free: Vec::new(),
            timers: BinaryHeap::new(),
            timeout,
            draining: false,
            served: 0,
            scratch: vec![0; 64 * 1024],
        }
    }

    fn run(&mut self) -> io::Result<()> {
        loop {
            if self.draining && self.live() == 0 {
                return Ok(());
            }
            let wait = self.expire(Instant::now());
            match self.worker.next_event_timeout(wait)? {
                Some(WorkerEvent::Connection(_, stream)) => self.accept(stream),
                Some(WorkerEvent::Ready(token, ready)) => self.on_ready(token, ready),
                Some(WorkerEvent::Disconnect) => self.drain(),
                Some(WorkerEvent::Message(..)) | None => {}
            }
        }
    }

    fn live(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn accept(&mut self, stream: Stream) {
        self.served += 1;
        if self.served == 1 {
            inject_fault(self.worker);
        }
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        if let Stream::Tcp(s) = &stream {
            // Each answer is one write: do not let Nagle hold it back.
            let _ = s.set_nodelay(true);
        }
        let idx = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let token = ((self.served & 0x3fff_ffff) << 32) | idx as u64;
        let deadline = Instant::now() + self.timeout;
        let conn = Conn::new(stream, token, deadline);
        if self
            .worker
            .register(conn.fd(), token, conn.interest)
            .is_err()
        {
            self.free.push(idx);
            return;
        }
        self.slots[idx] = Some(conn);
        self.timers.push(Reverse((deadline, token)));
        // The request often arrives with the connection: try it now.
        self.on_ready(token, READABLE);
    }

    fn on_ready(&mut self, token: u64, ready: Readiness) {
        let (worker, timeout, draining) = (self.worker, self.timeout, self.draining);
        let Some(conn) = slot(&mut self.slots, token) else {
            return; // closed since the event was queued
        };
        let before = conn.interest;
        let keep = conn.on_ready(ready, &mut self.scratch, draining, timeout)
            && (conn.interest == before
                || worker.reregister(conn.fd(), token, conn.interest).is_ok());
        if !keep {
            return self.close(token);
        }
        // Deadlines only move later (the heap catches up lazily), except
        // when lingering starts: that one needs an entry of its own.
        if conn.deadline < conn.timer {
            conn.timer = conn.deadline;
            self.timers.push(Reverse((conn.deadline, token)));
        }
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

    /// The primary asked us to stop: no new connections come; close the
    /// idle ones and let the busy ones finish.
    fn drain(&mut self) {
        self.draining = true;
        let idle: Vec<u64> = self
            .slots
            .iter()
            .flatten()
            .filter(|c| c.is_idle())
            .map(|c| c.token)
            .collect();
        for token in idle {
            self.close(token);
        }
    }

    fn close(&mut self, token: u64) {
        let idx = token as u32 as usize;
        if let Some(conn) = self.slots.get_mut(idx).and_then(Option::take) {
            let _ = self.worker.deregister(conn.fd());
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
}

struct Conn {
    stream: Stream,
    token: u64,
    phase: Phase,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Bytes of `output` already written.
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
            Phase::Open if flushed && (self.eof || (draining && self.is_idle())) => return false,
            Phase::Closing if flushed => {
                if self.eof || self.stream_shutdown().is_err() {
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

    fn wants_input(&self) -> bool {
        self.phase == Phase::Open
            && !self.eof
            && self.output.len() - self.written <= MAX_PENDING_OUTPUT
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
        match self.stream.read(scratch) {
            Ok(0) => self.eof = true,
            Ok(n) => self.input.extend_from_slice(&scratch[..n]),
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
        let mut used = 0;
        let more = loop {
            if self.phase != Phase::Open {
                break false;
            }
            if self.output.len() > MAX_PENDING_OUTPUT {
                break true;
            }
            let input = &self.input[used..];
            if let Some(req) = &mut self.request {
                let n = req.body_left.min(input.len() as u64);
                used += n as usize;
                req.body_left -= n;
                if req.body_left > 0 {
                    if n > 0 {
                        self.deadline = next_deadline; // a slow body is not a stall
                    }
                    break false;
                }
                let req = self.request.take().expect("checked above");
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
                    self.request = Some(Request {
                        body_left: head.body,
                        keep_alive: head.keep_alive,
                        head_only: head.head_only,
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
                    self.deadline = next_deadline;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.output.clear();
        self.written = 0;
        Ok(())
    }

    fn stream_shutdown(&self) -> io::Result<()> {
        match &self.stream {
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
        }
    }
}

// ---------------------------------------------------------------------------
// HTTP/1.1, just enough: request heads (RFC 9112) and the two kinds of
// answer.

const HELLO_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n";
const HELLO_BODY: &[u8] = b"hello world\n";

fn respond_hello(out: &mut Vec<u8>, keep_alive: bool, head_only: bool) {
    out.extend_from_slice(HELLO_HEAD);
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
    let (method, http11) = parse_request_line(lines.next().unwrap_or_default())?;
    let (mut close, mut keep_alive, mut expect_continue) = (false, false, false);
    let mut length: Option<u64> = None;
    for line in lines.take_while(|l| !l.is_empty()) {
        let (name, value) = split_header(line).ok_or(Status::BadRequest)?;
        if name.eq_ignore_ascii_case(b"connection") {
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
    Ok(Head {
        len: 0,
        // HTTP/1.1 keeps the connection unless told otherwise; 1.0 closes it
        // unless told otherwise.
        keep_alive: !close && (http11 || keep_alive),
        head_only: method == b"HEAD",
        body: length.unwrap_or(0),
        expect_continue: http11 && expect_continue,
    })
}

/// `METHOD SP target SP HTTP/1.x`; returns the method and whether it is 1.1.
fn parse_request_line(line: &[u8]) -> Result<(&[u8], bool), Status> {
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
        b"HTTP/1.1" => Ok((method, true)),
        b"HTTP/1.0" => Ok((method, false)),
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            Err(Status::VersionNotSupported)
        }
        _ => Err(Status::BadRequest),
    }
}

/// `name: value`; no space before the colon, no obsolete line folding.
fn split_header(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let colon = line.iter().position(|&b| b == b':')?;
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    (is_token(name) && !value.iter().any(|&b| b == b'\r' || b == 0)).then(|| (name, trim(value)))
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
