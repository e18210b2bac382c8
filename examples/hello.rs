//! A hello-world HTTP/1.1 server on a syncluster cluster.
//!
//! ```text
//! cargo run --release --example hello -- [--workers N] [--host H] [--port P]
//!     [--policy rr|shared|reuseport|least-loaded]
//! ```
//!
//! The primary forks one worker per CPU, prints
//! `listening on http://HOST:PORT (N workers, POLICY)` once all of them
//! listen, replaces workers that die (with backoff), and on SIGTERM or
//! SIGINT stops gracefully and prints `served {"1":N1,...}`: connections
//! served per worker.
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
//! - 0: stopped by SIGTERM or SIGINT (or SIGQUIT), after printing `served`;
//! - 1: could not start or keep running, with the reason on stderr: a
//!   worker count the machine cannot hold (refused before any fork), a
//!   first worker that could not listen (its port is taken, say: the
//!   supervisor stops at once), or a later worker that could not listen;
//! - 2: bad arguments or environment, with the usage.

#[path = "common/http.rs"]
mod http;

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::io::{self, Write};
use std::process::ExitCode;
use std::time::Duration;

use http::Server;
use syncluster::primary::{Address, Event as PrimaryEvent, ExitStatus};
use syncluster::supervisor::{self, Notice, Supervisor};
use syncluster::{Policy, Primary, Role, Worker};

const USAGE: &str = "\
usage: hello [--workers N] [--host H] [--port P] [--policy rr|shared|reuseport|least-loaded]

  --workers N     worker processes (default: the number of CPUs)
  --host H        address to listen on (default: 127.0.0.1)
  --port P        port, 0 for any free one (default: 8000)
  --policy P      rr: the primary accepts and hands connections out in turn;
                  shared: workers accept on a shared socket;
                  reuseport: each worker accepts on its own SO_REUSEPORT socket;
                  least-loaded: the primary hands each connection to the
                  worker holding the fewest
                  (default: $SYNCLUSTER_SCHED_POLICY, else rr)

requests: GET /work?ms=N blocks the worker N ms (at most 10000), serving
          nothing else meanwhile, then answers as any other request

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
                opts.policy = Some(Policy::parse(&v).ok_or_else(|| {
                    format!("--policy {v:?}: expected rr, shared, reuseport or least-loaded")
                })?);
            }
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    // Catch a bad host here, once, rather than in every worker.
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
        let mut config = supervisor::Config::default();
        config.workers = opts.workers;
        config.hang_timeout = opts.hang_timeout;
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
                    eprintln!("worker {id} could not listen; stopping");
                    self.failed = true;
                    return self.sup.stop();
                }
                if !after_disconnect {
                    eprintln!("worker {id} died ({status})");
                }
            }
            Notice::Cluster(PrimaryEvent::Error { id, error }) => eprintln!("worker {id}: {error}"),
            Notice::Cluster(PrimaryEvent::Hung(id)) => eprintln!("worker {id} hung; killed"),
            Notice::Cluster(_) | Notice::Ready => {}
            // The supervisor announced the respawn before we chose to stop.
            Notice::Respawning { .. } | Notice::CrashLoop { .. } if self.failed => {}
            Notice::Respawning { id, delay, .. } if delay.is_zero() => {
                eprintln!("worker {id}: forking a replacement");
            }
            Notice::Respawning { id, delay, .. } => {
                eprintln!(
                    "worker {id}: forking a replacement in {} ms",
                    delay.as_millis()
                );
            }
            Notice::CrashLoop { failures } => {
                eprintln!("workers keep dying ({failures} in a row); backing off");
            }
            Notice::Stopping { graceful } => {
                let how = if graceful { "gracefully" } else { "now" };
                eprintln!("stopping {how}");
            }
            Notice::ForceKilled(ids) => eprintln!("graceful timeout: killed workers {ids:?}"),
            Notice::ScaleRefused(e) => eprintln!("not scaling up: {e}"),
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
