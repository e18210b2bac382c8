//! A hello-world HTTP/1.1 server on a syncluster cluster.
//!
//! ```text
//! cargo run --release --example hello -- [--workers N] [--host H] [--port P]
//!     [--policy rr|shared|reuseport|least-loaded]
//!     [--pid-file F] [--log F] [--signals gunicorn|nginx]
//!     [--max-requests N] [--max-requests-jitter J] [--max-memory MB]
//! ```
//!
//! The primary binds HOST:PORT itself first (a port in use is exit 1 at
//! once, before any fork; under systemd's socket activation, or after a
//! binary upgrade, it takes the socket it inherited instead), forks one
//! worker per CPU, prints `listening on http://HOST:PORT (N workers,
//! POLICY)` once all of them listen, replaces workers that die (with
//! backoff), and on SIGTERM or SIGINT stops gracefully and prints `served
//! {"1":N1,...}`: connections served per worker.
//!
//! SIGUSR2 upgrades the binary: the file now at hello's path is started
//! with the listening socket; once its workers listen it takes over, and
//! this primary lets its workers finish, prints `served`, and exits 0
//! (`--pid-file F` is `F.oldbin` meanwhile, as nginx). SIGUSR1 reopens the
//! `--log` file. The build id (`HELLO_BUILD_ID` when hello was compiled,
//! else `dev`) is in the primary's first stderr line.
//!
//! Each worker runs the shared server of `common/http.rs`: a
//! single-threaded, non-blocking server on the worker's event loop with
//! keep-alive, pipelining, bodies read and discarded, bounded buffers with
//! backpressure, and a read timeout (`HELLO_READ_TIMEOUT_MS`, default 10 s)
//! so that a client that stalls, trickles, never reads or sends garbage
//! costs only its own connection. `GET /work?ms=N` is a slow request: it
//! blocks its worker N ms (at most 10000), serving nothing else meanwhile,
//! then answers as any other request (see `common/http.rs`).
//!
//! Exit status:
//! - 0: stopped by SIGTERM or SIGINT (or SIGQUIT), or handed over to a new
//!   primary by a binary upgrade, after printing `served`;
//! - 1: could not start or keep running, with the reason on stderr: a port
//!   in use or an address it may not bind (before any fork), a worker
//!   count the machine cannot hold (refused before any fork), a pid or log
//!   file it cannot write, a first worker that could not listen (the
//!   supervisor stops at once), or a later worker that could not listen;
//! - 2: bad arguments or environment, with the usage.

#[path = "common/http.rs"]
mod http;

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use http::Server;
use syncluster::primary::{Address, Event as PrimaryEvent, ExitStatus};
use syncluster::supervisor::{self, Notice, StopSignals, Supervisor};
use syncluster::{Policy, Primary, Role, Worker};

const USAGE: &str = "\
usage: hello [--workers N] [--host H] [--port P] [--policy rr|shared|reuseport|least-loaded]
             [--pid-file F] [--log F] [--signals gunicorn|nginx]
             [--max-requests N] [--max-requests-jitter J] [--max-memory MB]
             [--deferred]

  --workers N     worker processes (default: the number of CPUs)
  --host H        address to listen on (default: 127.0.0.1)
  --port P        port, 0 for any free one (default: 8000)
  --listen A      instead of --host/--port: fd:NAME for the socket inherited
                  under that name (systemd's FileDescriptorName=); with none
                  of the three, the one socket systemd passed, if it did
  --policy P      rr: the primary accepts and hands connections out in turn;
                  shared: workers accept on a shared socket;
                  reuseport: each worker accepts on its own SO_REUSEPORT socket;
                  least-loaded: the primary hands each connection to the
                  worker holding the fewest
                  (default: $SYNCLUSTER_SCHED_POLICY, else rr)
  --pid-file F    write the primary's pid to F (F.oldbin during an upgrade)
  --log F         the primary appends its messages to F instead of stderr
                  and reopens it on SIGUSR1
  --signals S     gunicorn (default): TERM/INT graceful, QUIT immediate;
                  nginx: QUIT graceful, TERM/INT immediate
  --max-requests N
                  replace a worker once it served N requests (a new one
                  listens first, then the old one finishes; one at a time)
  --max-requests-jitter J
                  each worker's limit is --max-requests plus a random 0 to J,
                  so that workers do not recycle together (default 0)
  --max-memory MB replace a worker whose resident memory is above MB
                  megabytes (checked every second)
  --deferred      TCP_DEFER_ACCEPT on the listening socket (nginx's
                  `listen ... deferred`): a connection is accepted once its
                  request arrived; one that sends nothing waits in the kernel
                  (about 5 s). An inherited socket (--listen) keeps its own

signals: TERM/INT graceful stop, QUIT immediate stop (or as --signals says),
         HUP rolling reload, USR2 binary upgrade, USR1 reopen the log,
         TTIN/TTOU one worker more/fewer

requests: GET /work?ms=N blocks the worker N ms (at most 10000), serving
          nothing else meanwhile, then answers as any other request

environment: HELLO_READ_TIMEOUT_MS     idle / header read timeout (default 10000)
             HELLO_HANG_TIMEOUT_MS     kill a worker that holds connections this long
                                       without taking the next one (default off)
             HELLO_UPGRADE_TIMEOUT_MS  how long a binary upgrade waits for the new
                                       primary (default 30000)
";

/// The build id: `HELLO_BUILD_ID` in the environment of the compiler
/// (`HELLO_BUILD_ID=2 cargo build --example hello`), else `dev`. A binary
/// upgrade to a rebuild shows the new one.
fn build_id() -> &'static str {
    option_env!("HELLO_BUILD_ID").unwrap_or("dev")
}

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
    upgrade_timeout: Duration,
    /// `--listen fd:NAME`, instead of host and port; in a worker, also the
    /// socket its primary chose (`HELLO_LISTEN`).
    listen: Option<String>,
    /// `--host`, `--port` or `--listen` was given.
    addr_given: bool,
    pid_file: Option<PathBuf>,
    log: Option<PathBuf>,
    signals: StopSignals,
    max_requests: Option<u64>,
    max_requests_jitter: u64,
    /// Bytes.
    max_memory: Option<u64>,
    /// `--deferred`.
    deferred: bool,
}

impl Options {
    /// `host:port` as `Worker::listen` takes it; IPv6 needs brackets.
    fn listen_addr(&self) -> String {
        if let Some(a) = &self.listen {
            return a.clone();
        }
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
        upgrade_timeout: upgrade_timeout_from_env()?,
        // Set by the primary for its workers when it took the one socket
        // it inherited (socket activation without --host/--port).
        listen: std::env::var("HELLO_LISTEN").ok(),
        addr_given: false,
        pid_file: None,
        log: None,
        signals: StopSignals::Gunicorn,
        max_requests: None,
        max_requests_jitter: 0,
        max_memory: None,
        deferred: false,
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
            "--host" => {
                opts.host = value()?;
                opts.addr_given = true;
            }
            "--port" => {
                let v = value()?;
                opts.port = v
                    .parse()
                    .map_err(|_| format!("--port {v:?}: expected 0..65535"))?;
                opts.addr_given = true;
            }
            "--policy" => {
                let v = value()?;
                opts.policy = Some(Policy::parse(&v).ok_or_else(|| {
                    format!("--policy {v:?}: expected rr, shared, reuseport or least-loaded")
                })?);
            }
            "--listen" => {
                let v = value()?;
                if !v.starts_with("fd:") {
                    return Err(format!("--listen {v:?}: expected fd:NAME"));
                }
                opts.listen = Some(v);
                opts.addr_given = true;
            }
            "--pid-file" => opts.pid_file = Some(value()?.into()),
            "--deferred" => opts.deferred = true,
            "--log" => opts.log = Some(value()?.into()),
            "--signals" => {
                opts.signals = match value()?.as_str() {
                    "gunicorn" => StopSignals::Gunicorn,
                    "nginx" => StopSignals::Nginx,
                    v => return Err(format!("--signals {v:?}: expected gunicorn or nginx")),
                };
            }
            "--max-requests" | "--max-requests-jitter" | "--max-memory" => {
                let v = value()?;
                let n: u64 = v
                    .parse()
                    .ok()
                    .filter(|&n| n > 0 || flag == "--max-requests-jitter")
                    .ok_or_else(|| format!("{flag} {v:?}: expected a number above 0"))?;
                match flag.as_str() {
                    "--max-requests" => opts.max_requests = Some(n),
                    "--max-requests-jitter" => opts.max_requests_jitter = n,
                    _ => {
                        let bytes = n.checked_mul(1 << 20);
                        opts.max_memory =
                            Some(bytes.ok_or_else(|| format!("--max-memory {v:?}: too large"))?);
                    }
                }
            }
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    // Catch a bad host here, once, rather than in every worker.
    if opts.listen.is_some() {
        return Ok(Some(opts)); // fd:NAME: the primary checks the name
    }
    let host = opts.host.trim_start_matches('[').trim_end_matches(']');
    if matches!(host, "localhost" | "" | "*") || host.parse::<std::net::IpAddr>().is_ok() {
        Ok(Some(opts))
    } else {
        Err(format!(
            "--host {:?}: expected an IP address or localhost",
            opts.host
        ))
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

fn upgrade_timeout_from_env() -> Result<Duration, String> {
    match std::env::var("HELLO_UPGRADE_TIMEOUT_MS") {
        Err(_) => Ok(supervisor::Config::default().upgrade_timeout),
        Ok(v) => v
            .parse::<u64>()
            .ok()
            .filter(|&ms| ms > 0)
            .map(Duration::from_millis)
            .ok_or_else(|| {
                format!("HELLO_UPGRADE_TIMEOUT_MS={v:?}: expected milliseconds above 0")
            }),
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
// rolling reload on SIGHUP, binary upgrade on SIGUSR2, scaling on
// SIGTTIN/SIGTTOU); this only announces, reports and collects the served
// counts.

/// Where the primary's messages go: stderr, or `--log F` (appended to,
/// reopened on SIGUSR1, so that logrotate can move it away).
struct Log {
    path: Option<PathBuf>,
    file: Option<File>,
}

impl Log {
    fn open(path: Option<PathBuf>) -> io::Result<Log> {
        let file = match &path {
            Some(p) => Some(Log::append(p)?),
            None => None,
        };
        Ok(Log { path, file })
    }

    fn append(p: &PathBuf) -> io::Result<File> {
        File::options()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| io::Error::new(e.kind(), format!("log file {}: {e}", p.display())))
    }

    /// One `write` per line (`eprintln!` makes several): after a binary
    /// upgrade two primaries share stderr, and their lines stay whole.
    fn line(&mut self, line: &str) {
        let bytes = format!("{line}\n").into_bytes();
        let _ = match &mut self.file {
            Some(f) => f.write_all(&bytes),
            None => io::stderr().lock().write_all(&bytes),
        };
    }

    /// SIGUSR1: the file at the path now (logrotate renamed the old one).
    /// On failure the old file stays in use and stderr says why.
    fn reopen(&mut self) {
        let Some(p) = &self.path else { return };
        match Log::append(p) {
            Ok(f) => self.file = Some(f),
            Err(e) => eprintln!("hello: reopening the log: {e}"),
        }
    }
}

struct Cluster {
    sup: Supervisor,
    log: Log,
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
        let mut log = Log::open(opts.log.clone())?;
        // Bound here, before any fork: a port in use ends hello now, with
        // exit 1. An inherited socket (systemd, an upgrade) is taken as is;
        // with no address given, the one socket systemd passed is it, and
        // the workers are told.
        let mut addr = opts.listen_addr();
        if let ([inherited], false) = (&primary.listening_addresses()[..], opts.addr_given) {
            addr = inherited.to_string();
            primary
                .settings_mut()
                .env
                .push(("HELLO_LISTEN".into(), addr.clone().into()));
        }
        // Reuseport: each worker slot gets its own SO_REUSEPORT socket, made
        // by the primary at the first listen (a busy port still fails the
        // first generation, and the supervisor stops at once).
        if primary.settings().policy != Policy::ReusePort {
            primary.listen(&addr)?;
        }
        let me = std::process::id();
        match primary.upgraded_from() {
            Some(old) => log.line(&format!(
                "primary pid {me}, build {}: upgrade from pid {old}",
                build_id()
            )),
            None => log.line(&format!("primary pid {me}, build {}", build_id())),
        }
        let mut config = supervisor::Config::default();
        config.workers = opts.workers;
        config.hang_timeout = opts.hang_timeout;
        config.upgrade_timeout = opts.upgrade_timeout;
        config.pid_file = opts.pid_file.clone();
        config.stop_signals = opts.signals;
        config.max_requests = opts.max_requests;
        config.max_requests_jitter = opts.max_requests_jitter;
        config.max_memory = opts.max_memory;
        // Its workers log nothing of their own, and SIGUSR1 would end them.
        config.forward_usr1 = false;
        Ok(Cluster {
            sup: Supervisor::start(primary, config)?,
            log,
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
            Notice::Cluster(PrimaryEvent::Listening { id, address }) => {
                self.on_listening(id, &address)
            }
            Notice::Cluster(PrimaryEvent::Message { id, bytes, .. }) => self.on_message(id, &bytes),
            Notice::Cluster(PrimaryEvent::Exit {
                id,
                status,
                exited_after_disconnect: after_disconnect,
            }) => {
                self.listening.remove(&id);
                if status == ExitStatus::Code(EXIT_LISTEN_FAILED as i32) {
                    self.log
                        .line(&format!("worker {id} could not listen; stopping"));
                    self.failed = true;
                    return self.sup.stop();
                }
                if !after_disconnect {
                    self.log.line(&format!("worker {id} died ({status})"));
                }
            }
            Notice::Cluster(PrimaryEvent::Error { id, error }) => {
                self.log.line(&format!("worker {id}: {error}"))
            }
            Notice::Cluster(PrimaryEvent::Hung(id)) => {
                self.log.line(&format!("worker {id} hung; killed"))
            }
            Notice::Cluster(_) | Notice::Ready => {}
            // The supervisor announced the respawn before we chose to stop.
            Notice::Respawning { .. } | Notice::CrashLoop { .. } if self.failed => {}
            Notice::Respawning { id, delay, .. } if delay.is_zero() => {
                self.log
                    .line(&format!("worker {id}: forking a replacement"));
            }
            Notice::Respawning { id, delay, .. } => {
                self.log.line(&format!(
                    "worker {id}: forking a replacement in {} ms",
                    delay.as_millis()
                ));
            }
            Notice::CrashLoop { failures } => self.log.line(&format!(
                "workers keep dying ({failures} in a row); backing off"
            )),
            Notice::Stopping { graceful } => {
                let how = if graceful { "gracefully" } else { "now" };
                self.log.line(&format!("stopping {how}"));
            }
            Notice::ForceKilled(ids) => self
                .log
                .line(&format!("graceful timeout: killed workers {ids:?}")),
            Notice::ScaleRefused(e) => self.log.line(&format!("not scaling up: {e}")),
            Notice::ReopenLogs => {
                self.log.reopen();
                self.log.line("log reopened");
            }
            Notice::Upgrading { pid } => self
                .log
                .line(&format!("upgrade: new primary pid {pid} started")),
            Notice::Upgraded { pid } => self.log.line(&format!(
                "upgrade: pid {pid} took over; finishing with the old workers"
            )),
            Notice::UpgradeFailed(why) => self.log.line(&format!("upgrade failed: {why}")),
            Notice::UpgradeRefused(why) => self.log.line(&format!("upgrade refused: {why}")),
            other => self.log.line(&format!("{other:?}")),
        }
        Ok(())
    }

    fn on_listening(&mut self, id: u32, addr: &Address) {
        if self.announced {
            // Only replacements listen after the announcement.
            self.log
                .line(&format!("worker {id} is listening (a replacement)"));
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
    // An inherited socket (`fd:NAME`) keeps the options it came with.
    let deferred = opts.deferred && opts.listen.is_none();
    let listen = http::listen_options().defer_accept(deferred);
    match worker.listen_with(&opts.listen_addr(), &listen) {
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
