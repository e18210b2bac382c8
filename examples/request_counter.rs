//! Node's cluster request counter (the `cluster` page of the Node.js docs,
//! "`process.send({ cmd: 'notifyRequest' })`"), ported to syncluster.
//!
//! ```text
//! cargo run --release --example request_counter -- [--workers N] [--port P]
//! ```
//!
//! Each worker serves hello world on 127.0.0.1:P (the server of
//! `common/http.rs`) and sends the primary a `notifyRequest` message per
//! request. The primary counts them and prints `numReqs = N` every second.
//! It prints `listening on http://127.0.0.1:PORT (N workers)` once all
//! workers listen; on SIGTERM or SIGINT it disconnects every worker, waits
//! for them to finish, prints the final `numReqs = N` and exits 0.
//!
//! Like Node's example, the primary is a plain loop over the cluster's
//! events, with no supervisor: a worker that dies is not replaced. Unlike
//! it, the primary gives up (exit 1) once no worker is left, instead of
//! counting nothing forever.

#[path = "common/http.rs"]
mod http;

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::{self, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use http::Server;
use syncluster::primary::{Event, ExitStatus};
use syncluster::{Primary, Role, Signal, Worker};

const USAGE: &str = "\
usage: request_counter [--workers N] [--port P]

  --workers N     worker processes (default: the number of CPUs)
  --port P        port on 127.0.0.1, 0 for any free one (default: 8000)
";

/// What a worker sends per request: `{ cmd: 'notifyRequest' }`.
const NOTIFY: &[u8] = b"notifyRequest";
/// Node's `setInterval(..., 1000)`.
const TICK: Duration = Duration::from_secs(1);
/// Workers still busy this long after SIGTERM are killed.
const GRACEFUL_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle / request head timeout of a connection.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Exit status of a worker that could not listen.
const EXIT_LISTEN_FAILED: u8 = 3;

struct Options {
    workers: usize,
    port: u16,
}

fn main() -> ExitCode {
    let opts = match parse_args(std::env::args_os().skip(1)) {
        Ok(Some(opts)) => opts,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(why) => {
            eprintln!("request_counter: {why}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match syncluster::role() {
        Ok(Role::Primary(primary)) => run_primary(primary, &opts),
        Ok(Role::Worker(worker)) => run_worker(&worker, &opts),
        Err(e) => Err(e),
    };
    result.unwrap_or_else(|e| {
        eprintln!("request_counter: {e}");
        ExitCode::FAILURE
    })
}

/// `Ok(None)` means `--help`. Workers get the primary's arguments.
fn parse_args(args: impl Iterator<Item = OsString>) -> Result<Option<Options>, String> {
    let mut opts = Options {
        workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
        port: 8000,
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
        let value = match inline {
            Some(v) => v,
            None => args
                .next()
                .unwrap_or_else(|| Err(format!("{flag} needs a value")))?,
        };
        match flag.as_str() {
            "--workers" => {
                opts.workers = value
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("--workers {value:?}: expected a number above 0"))?;
            }
            "--port" => {
                opts.port = value
                    .parse()
                    .map_err(|_| format!("--port {value:?}: expected 0..65535"))?;
            }
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    Ok(Some(opts))
}

/// One line on stdout, flushed at once: scripts wait for it.
fn say(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

// ---------------------------------------------------------------------------
// The primary: fork, count, tick.

fn run_primary(mut primary: Primary, opts: &Options) -> io::Result<ExitCode> {
    for _ in 0..opts.workers {
        primary.fork()?;
    }
    let mut num_reqs: u64 = 0;
    let mut listening = HashSet::new();
    let mut stopping = false;
    let mut failed = false;
    let mut next_tick = Instant::now() + TICK;
    loop {
        let now = Instant::now();
        if now >= next_tick {
            say(&format!("numReqs = {num_reqs}"));
            // A steady beat; after a stall (a stopped process), start afresh
            // rather than print the missed ticks in a burst.
            next_tick += TICK;
            if next_tick <= now {
                next_tick = now + TICK;
            }
        }
        let Some(event) = primary.next_event_timeout(Some(next_tick - now))? else {
            continue; // time to tick
        };
        match event {
            Event::Message { bytes, .. } if bytes == NOTIFY => num_reqs += 1,
            Event::Listening { id, address } => {
                // Said once: nothing replaces a worker here, so the set
                // reaches N only once.
                let first = listening.insert(id);
                if first && listening.len() == opts.workers {
                    say(&format!(
                        "listening on http://{address} ({} workers)",
                        opts.workers
                    ));
                }
            }
            Event::Signal(Signal::TERM | Signal::INT) if !stopping => {
                stopping = true;
                eprintln!("stopping gracefully");
                primary.disconnect_all(Some(GRACEFUL_TIMEOUT))?;
            }
            Event::Signal(Signal::QUIT) => {
                stopping = true;
                eprintln!("stopping now");
                for w in primary.workers() {
                    let _ = primary.kill(w.id, Signal::KILL);
                }
            }
            Event::Exit {
                id,
                status,
                exited_after_disconnect: after_disconnect,
            } => {
                if status == ExitStatus::Code(EXIT_LISTEN_FAILED.into()) && !stopping {
                    eprintln!("worker {id} could not listen; stopping");
                    (stopping, failed) = (true, true);
                    primary.disconnect_all(Some(GRACEFUL_TIMEOUT))?;
                } else if status == ExitStatus::Signal(Signal::KILL) && after_disconnect {
                    eprintln!("worker {id} killed: still busy after the graceful timeout");
                } else if !after_disconnect {
                    eprintln!("worker {id} died ({status})");
                }
                if primary.workers().is_empty() {
                    failed |= !stopping;
                    break;
                }
            }
            Event::Error { id, error } => eprintln!("worker {id}: {error}"),
            // Other signals (HUP, TTIN, ...) and events: nothing to do.
            _ => {}
        }
    }
    // Every worker has exited, so every notification has been counted.
    say(&format!("numReqs = {num_reqs}"));
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

// ---------------------------------------------------------------------------
// A worker: hello world, and a message to the primary per request.

fn run_worker(worker: &Worker, opts: &Options) -> io::Result<ExitCode> {
    // The primary alone decides when workers stop (Ctrl-C signals the whole
    // process group), so they finish their requests and notify them all.
    worker.leave_stop_signals_to_primary()?;
    let mut server = Server::new(worker, READ_TIMEOUT);
    // An error means the primary is gone, and the death signal is on its
    // way: nobody is left to count.
    server.on_request(|w| {
        let _ = w.send(NOTIFY, &[]);
    });
    match worker.listen_with(&format!("127.0.0.1:{}", opts.port), &http::listen_options()) {
        // The listener lives to the end of the arm: dropping it closes it.
        Ok(_listener) => server.run()?,
        // Stopped before it started: nothing served, nothing wrong.
        Err(_) if worker.is_disconnecting() => {}
        Err(e) => {
            eprintln!("worker {}: {e}", worker.id());
            return Ok(ExitCode::from(EXIT_LISTEN_FAILED));
        }
    }
    Ok(ExitCode::SUCCESS)
}
