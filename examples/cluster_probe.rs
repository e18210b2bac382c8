//! `cluster_probe`: the scriptable cluster the integration tests drive.
//!
//! One program, primary or worker by `syncluster::role()`, written with the
//! public API only. It is also a compact tour of that API: the primary is
//! one [`Primary::next_event_timeout`] loop with stdin registered in it, the
//! worker one [`Worker::next_event`] loop.
//!
//! # Primary
//!
//! Reads commands from stdin, one per line (a thread copies fd 0 into a
//! socketpair whose read end is registered with
//! `Primary::register(fd, 0, Interest::READABLE)`; what is available is read
//! on `Event::Ready` and split into lines; when `next_event_timeout(Some(100ms))`
//! returns `None` and `primary.workers()` is empty, that socket is read with
//! a 100 ms timeout instead — never a busy loop). Prints one line per
//! event or answer to stdout and flushes after each line. EOF on stdin:
//! SIGKILL all workers, reap them, exit 0.
//!
//! Commands (each answers `ok <word>` or `err <word> <message>`, except where
//! another answer is named):
//! - `set exec PATH` | `set args A B ...` | `set cwd DIR` | `set policy rr|shared` |
//!   `set window N` | `set queue N` | `set backlog N` | `set hang MS` (0 = off) |
//!   `set uid N` | `set gid N` | `set user NAME [GROUP]` (`Settings::set_user`) |
//!   `set max_handles N` |
//!   `set listen [RULE ...]`: `Settings::listen_rules`, each RULE
//!   `tcp:HOST:LO-HI` (HOST `*` for any, `[v6]` in brackets) or `unix:DIR`;
//!   no RULE allows nothing, `set listen default` restores `None` |
//!   `set echo on|off`: when on, every user message from a worker is sent
//!   back to it (after its `message` line); a failed send prints
//!   `err echo <id> <io::ErrorKind debug>: <message>`
//! - `fork [KEY=VALUE ...]` → `forked <id>` (or `err fork <msg>`); the Fork
//!   event prints `fork <id>` too
//! - `send <id> <text...>` ; `sendfd <id> <text...>`: sends the text with one
//!   fd, one end of a socketpair whose other end wrote `fdtext` and closed
//! - `sendbig <id> <n>`: sends a message of exactly `n` bytes, `big ` then
//!   `x`s; an error answers `err sendbig <io::ErrorKind debug>: <message>`
//!   (addition for the channel caps)
//! - `kill <id> <signum>` ; `disconnect <id> [timeout_ms]` ;
//!   `disconnect_all [timeout_ms]` ; `unroute <id>`
//! - `workers` → `workers <id>:<state>:<ead>:<inflight>,...` (state lowercase:
//!   none|online|listening|disconnected|dead; empty list → `workers `)
//! - `served` → `served <id>:<taken>:<requests or ->,...` (`WorkerInfo::taken`
//!   and `requests`); `maxreq <id> <n|off>` (`Primary::set_max_requests`;
//!   its event prints `event MaxRequests { id: .., count: .. }`)
//! - `fds` → `fds <count of /proc/self/fd entries>` ; `rss` → `rss <VmRSS kB>` ;
//!   `zombies` → `zombies <n>` (children of this pid in state Z, from /proc/*/stat)
//! - `addresses` → `addresses <addr>,<addr>...` (primary.listening_addresses())
//! - `exit` → exits 0 at once without touching workers (to test primary
//!   death; use `kill -9` of the probe for the hard case)
//! - `pids` → `pids <id>:<pid>,...` (addition for the tests: which processes
//!   to kill when a test ends)
//! - `child PROGRAM [ARGS...]` → `child <pid>`: spawns a process of the
//!   primary's own (not a worker) with `std::process::Command`, stdio null;
//!   `waitchild` → `waitchild code=<c>` or `waitchild signal=<n>` once it
//!   ended (5 s at most), or `err waitchild <msg>` (additions for the
//!   tests: the cluster must not reap children that are not its workers)
//! - `role` → `role primary` / `role worker <id>` if a second
//!   `syncluster::role()` succeeds, else `err role <ErrorKind debug>: <msg>`;
//!   `whoami` → `whoami primary=<bool> worker=<bool> id=<id|none>` (from
//!   `is_primary()`, `is_worker()`, `worker_id()`)
//! - Node parity additions: `closechannel <id>` (`Primary::close_channel`);
//!   `isconnected <id>` → `isconnected <id> <bool>`; `isdead <id>` →
//!   `isdead <id> <bool>`; `mapfd <target>`: a socketpair, one end mapped
//!   at `<target>` in workers forked from now on (`Settings::map_fd`), the
//!   other kept; `fdwrite <target> <text...>` writes the text and a newline
//!   on the kept end; `fdread <target>` → `fdread <target> <line>` (one
//!   line read from the kept end, 5 s at most); `listenfd ADDR` binds ADDR
//!   itself (a path if it has a `/`, else TCP) with std and offers it
//!   (`Primary::listen_fd`) → `listenfd <n> <address>`
//!
//! Event lines:
//! `fork <id>` | `online <id>` | `listening <id> <addr>` |
//! `message <id> <text> fds=<n>` (payload as UTF-8, lossy; a newline in it is
//! printed as `\n` so that one event stays one line; a payload that starts
//! with `big ` prints as `big:<length>`) | `disconnect <id>` |
//! `exit <id> code=<c> ead=<true|false>` or `exit <id> signal=<n> ead=<..>` |
//! `signal <n>` | `error <id> <message>` | `hung <id>` | `ready ...` is never
//! printed for stdin.
//!
//! # Worker
//!
//! The mode comes from the env var `PROBE_MODE`, default `idle`; set it per
//! fork: `fork PROBE_MODE=listen PROBE_ADDR=127.0.0.1:0`.
//!
//! Every worker handles these messages from the primary (in every mode that
//! runs the loop): `echo X` → sends `echo:X`; a message with fds → reads each
//! fd to EOF, sends `fdread:<content>`; `exit N` → process exit N;
//! `disconnect [MS]` → `worker.disconnect()`, then (if MS is given) sleeps
//! MS milliseconds with the channel closed, then exit 0; `env NAME` →
//! `env:<value or <unset>>`; `cwd` → `cwd:<path>`; `argv` → `argv:<args after
//! argv0, space-joined>`; `fdlist` → `fdlist:<sorted /proc/self/fd numbers,
//! comma-joined>`; `close` → drops all listeners, sends `closed`; `relisten` →
//! listens again on PROBE_ADDR (each address), sends `listening:<addr>` per
//! listener. Additions for the tests: `sleep MS` → sends `sleeping:MS`,
//! blocks MS milliseconds (deaf to the channel meanwhile), then sends
//! `slept:MS`; `burst N` → sends `burst:0` .. `burst:<N-1>` then exits 3 at
//! once; `givefd` → sends `givefd` with one fd, a socket holding `giventext`;
//! `hogfds` → opens `/dev/null` until that fails (EMFILE), keeps them, sends
//! `hogged:<n>`; `freefds` → closes them, sends `freed:<n>`; `role` → calls
//! `syncluster::role()` again, sends `role:ok:primary`, `role:ok:worker <id>`
//! or `role:err:<ErrorKind debug>:<msg>`; `whoami` → `whoami:primary=<bool>
//! worker=<bool> id=<id|none>`;
//! `big ...` (what `sendbig` sends) → sends `big:<length>`; `sendbig N` →
//! sends a message of N bytes (`big ` then `x`s) and then `sendbig-ok:N`, or
//! on error `sendbig-err:<io::ErrorKind debug>:<message>`; `release` → drops the connections held
//! under `PROBE_HOLD`, sends `released:<n>`; `release-later MS` → sends
//! `releasing:<n>` and hands them to a thread that drops them MS
//! milliseconds later, while the worker waits; `open` →
//! `open:<worker.open_connections()>:<each listener's open_connections(),
//! comma-joined>`; `fdwrite N TEXT` → takes fd N (`worker.take_fd`, once)
//! and writes TEXT and a newline on it, sends `fdwrite:ok` or
//! `fdwrite:err:<ErrorKind debug>:<msg>`; `fdecho N` → reads one line from
//! fd N and writes `echo:<line>` back on it, sends `fdecho:<line>`;
//! `udpcount` → `udpcount:<datagrams received>`.
//! Anything else → `unknown:<text>`.
//!
//! On `Event::Disconnect`: sends `served:<n>` (connections served) then exits
//! with `PROBE_DISCONNECT_CODE` (default 0).
//!
//! Before `role()`: `PROBE_NO_PDEATHSIG` set → the worker clears its
//! parent-death signal (only the channel's EOF then tells it the primary
//! died) by re-executing itself through `python3`, which calls
//! `prctl(PR_SET_PDEATHSIG, 0)` and execs the probe again: the pid, the
//! environment and the inherited channel fd stay. Then, right after
//! `role()`, in this order: `PROBE_PAUSE_MS=N` → sleeps N ms;
//! `PROBE_STOP_SIGNALS=primary` → `worker.leave_stop_signals_to_primary()`
//! (an error ends the worker: `error: ...`, exit 1).
//!
//! Modes:
//! - `idle`: the loop above, no listener.
//! - `exit42`: exits 42 right after role() (so it was online).
//! - `listen`: listens on every comma-separated address in `PROBE_ADDR`
//!   (default `127.0.0.1:0`), with `PROBE_BACKLOG` if set and the
//!   `ListenOptions` named in `PROBE_LISTEN_OPTS` (comma-separated:
//!   `ipv6only`, `exclusive`, `reuseport`, `readable`, `writable`, `fd=N`;
//!   with `fd=N` give `PROBE_ADDR=` empty); a listen error sends
//!   `listen-error:<addr>:<io::ErrorKind debug>:<message>` and goes on; success
//!   sends `listening:<resolved addr>` (`listening:?<error>` when the
//!   address has no `SocketAddr`: a Unix path too long for a `sockaddr_un`). `PROBE_MAX_CONN=N` caps each
//!   listener (`set_max_connections(Some(N))`). Then the `worker.next_event()`
//!   loop: on `Connection { stream, .. }`: if `PROBE_SLOW_MS` is set sleep
//!   that long; write `worker <id>\n`, close (with `PROBE_HOLD` set: keep it
//!   open until `release`); count it. For a Unix listener the same line is
//!   written.
//! - `foreign`: `listen`, but the loop is a foreign one: `poll(2)` on
//!   `worker.as_fd()` for at most `worker.poll_timeout()` (done by a
//!   `python3` helper, see `ForeignPoll`), then `worker.try_next_event()`
//!   until `None`; events are handled as in `listen`.
//! - `foreign-accept`: one listener on PROBE_ADDR in non-blocking mode,
//!   sends `listening:<addr>`; `poll(2)` on `listener.as_fd()` (the same
//!   helper), then `listener.accept()` until `WouldBlock`; each connection
//!   sends `peer:<peer address>` and is served as in `listen`.
//!   `ConnectionAborted` (disconnect) sends `served:<n>` and exits 0.
//!   Messages are not read.
//! - `accept`: the simplest worker: one listener on PROBE_ADDR,
//!   `for s in listener.incoming()` write `worker <id>\n` (`PROBE_HOLD`:
//!   keep it open); after the loop ends
//!   send `served:<n>` and exit 0. (A listen error sends `listen-error:...`
//!   and exits 1.)
//! - `hang`: listens on PROBE_ADDR, takes one connection and then sleeps
//!   forever without answering.
//! - `udp`: `worker.bind_udp(PROBE_ADDR)` (default `127.0.0.1:0`), sends
//!   `udp:<local addr>` (or `udp-error:<ErrorKind debug>:<msg>` and exits
//!   1), then the `listen` loop with the socket registered in it
//!   (non-blocking): each datagram sends `dgram:<payload>`; with
//!   `PROBE_UDP_MAX=N`, after N datagrams the socket is dropped and
//!   `udp-done:<N>` sent (the primary keeps the shared socket, so the other
//!   workers read the rest).
//!
//! Workers that break the channel protocol are not the probe's business:
//! `tests/hostile/worker.py` writes frames by hand (`garbage`, `oversize`,
//! `badfds`, `badkind`, ...).
//!
//! # Errors
//!
//! # Threads
//!
//! With `PROBE_THREAD_FIRST=1` in its environment, the probe starts a
//! thread that sleeps forever, with no signal blocked, before `role()`:
//! the way a program that starts threads before `Primary::new` loses
//! signals to them.
//!
//! An error from `role()` (a malformed `SYNCLUSTER_*` variable) is printed as
//! `error: <e>` on stderr and the process exits 2. Any other error ends the
//! process with `error: <e>` on stderr and exit 1.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{exit, Command, Stdio};
use std::time::Duration;

use syncluster::primary::{Event, ExitStatus, ListenRules, TcpRule, ENV_CHANNEL_FD};
use syncluster::worker::{Event as WorkerEvent, Interest, ListenOptions, Listener, Stream};
use syncluster::{Policy, Primary, Role, Signal, Worker};

/// The token stdin is registered with in the primary's loop.
const STDIN: u64 = 0;
/// The token of the `udp` mode's socket in the worker's loop.
const UDP: u64 = 1;

fn main() {
    if std::env::var_os("PROBE_THREAD_FIRST").is_some_and(|v| v == "1") {
        std::thread::spawn(|| loop {
            std::thread::sleep(Duration::from_secs(3600));
        });
    }
    let mode = std::env::var("PROBE_MODE").unwrap_or_else(|_| "idle".to_string());
    if std::env::var_os("PROBE_NO_PDEATHSIG").is_some_and(|v| v != "cleared")
        && std::env::var_os(ENV_CHANNEL_FD).is_some()
    {
        let e = clear_pdeathsig_and_reexec();
        eprintln!("error: clearing the parent-death signal: {e}");
        exit(1);
    }
    let role = match syncluster::role() {
        Ok(role) => role,
        Err(e) => {
            eprintln!("error: {e}");
            exit(2);
        }
    };
    let result = match role {
        Role::Primary(primary) => run_primary(primary),
        Role::Worker(worker) => run_worker(worker, &mode),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        exit(1);
    }
}

// ---------------------------------------------------------------- primary

/// Prints one line and flushes. A closed stdout is ignored: stdin's EOF
/// follows and ends the probe.
fn say(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The primary's state besides the [`Primary`]: the last `child` spawned.
#[derive(Default)]
struct Extra {
    child: Option<std::process::Child>,
    echo: bool,
    /// `mapfd`: the primary's end of each socketpair, by target.
    mapped: Vec<(i32, std::os::unix::net::UnixStream)>,
}

fn run_primary(mut primary: Primary) -> io::Result<()> {
    let mut stdin = stdin_socket()?;
    primary.register(stdin.as_fd(), STDIN, Interest::READABLE)?;
    let mut pending = Vec::new();
    let mut extra = Extra::default();
    loop {
        let ready = match primary.next_event_timeout(Some(Duration::from_millis(100)))? {
            Some(Event::Ready { token: STDIN, .. }) => true,
            Some(Event::Message { id, bytes, fds }) if extra.echo => {
                say(&event_line(Event::Message {
                    id,
                    bytes: bytes.clone(),
                    fds,
                }));
                if let Err(e) = primary.send(id, &bytes, &[]) {
                    say(&format!("err echo {id} {:?}: {e}", e.kind()));
                }
                false
            }
            Some(ev) => {
                say(&event_line(ev));
                false
            }
            // With no workers the primary's loop returns at once without
            // waiting, so wait on stdin here: the read times out after 100 ms.
            None if primary.workers().is_empty() => true,
            None => false,
        };
        if ready && !read_commands(&mut primary, &mut extra, &mut stdin, &mut pending)? {
            primary.deregister(stdin.as_fd())?;
            return shutdown(primary);
        }
    }
}

/// A socket that gets whatever arrives on fd 0, copied by a thread, and
/// reads with a 100 ms timeout. The primary's loop waits on it like on any
/// fd; a read of it blocks 100 ms at most. It reads EOF once stdin did.
fn stdin_socket() -> io::Result<UnixStream> {
    let (ours, mut theirs) = UnixStream::pair()?;
    ours.set_read_timeout(Some(Duration::from_millis(100)))?;
    // Started after `Primary::new`, so it has the primary's signals blocked
    // too: it takes none of them.
    std::thread::spawn(move || {
        // A duplicate of fd 0 read with plain read(2): std's buffered stdin
        // could keep bytes back.
        if let Ok(fd) = io::stdin().as_fd().try_clone_to_owned() {
            let _ = io::copy(&mut File::from(fd), &mut theirs);
        }
        // Dropping `theirs`: EOF for the primary.
    });
    Ok(ours)
}

/// Reads what stdin has and runs every complete line; `false` at EOF.
fn read_commands(
    primary: &mut Primary,
    extra: &mut Extra,
    stdin: &mut UnixStream,
    pending: &mut Vec<u8>,
) -> io::Result<bool> {
    let mut chunk = [0u8; 64 * 1024];
    let n = match stdin.read(&mut chunk) {
        Ok(n) => n,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            return Ok(true)
        }
        Err(e) => return Err(e),
    };
    if n == 0 {
        return Ok(false);
    }
    pending.extend_from_slice(&chunk[..n]);
    while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
        let line: Vec<u8> = pending.drain(..=pos).collect();
        let line = String::from_utf8_lossy(&line);
        let line = line.trim_end_matches(['\n', '\r']);
        if line.trim().is_empty() {
            continue;
        }
        let word = line.split(' ').next().unwrap_or_default();
        match command(primary, extra, line) {
            Ok(Some(answer)) => say(&answer),
            Ok(None) => say(&format!("ok {word}")),
            Err(msg) => say(&format!("err {word} {msg}")),
        }
    }
    Ok(true)
}

/// stdin closed: SIGKILL every worker and reap them (5 s at most), exit 0.
fn shutdown(mut primary: Primary) -> io::Result<()> {
    for w in primary.workers() {
        let _ = primary.kill(w.id, Signal::KILL);
    }
    // Until every Exit is printed: `None` comes once no worker is left and
    // no event is queued.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        match primary.next_event_timeout(Some(Duration::from_millis(100)))? {
            Some(ev) => say(&event_line(ev)),
            None if primary.workers().is_empty() => break,
            None => {}
        }
    }
    // Dropped, so that its Unix socket files go.
    drop(primary);
    exit(0);
}

fn event_line(ev: Event) -> String {
    match ev {
        Event::Fork(id) => format!("fork {id}"),
        Event::Online(id) => format!("online {id}"),
        Event::Listening { id, address } => format!("listening {id} {address}"),
        Event::Message { id, bytes, fds } if bytes.starts_with(b"big ") => {
            format!("message {id} big:{} fds={}", bytes.len(), fds.len())
        }
        Event::Message { id, bytes, fds } => format!(
            "message {id} {} fds={}",
            String::from_utf8_lossy(&bytes).replace('\n', "\\n"),
            fds.len()
        ),
        Event::Disconnect(id) => format!("disconnect {id}"),
        Event::Exit {
            id,
            status: ExitStatus::Code(c),
            exited_after_disconnect: ead,
        } => format!("exit {id} code={c} ead={ead}"),
        Event::Exit {
            id,
            status: ExitStatus::Signal(s),
            exited_after_disconnect: ead,
        } => format!("exit {id} signal={} ead={ead}", s.as_raw()),
        Event::Signal(sig) => format!("signal {}", sig.as_raw()),
        Event::Error { id, error } => format!("error {id} {error}"),
        Event::Hung(id) => format!("hung {id}"),
        Event::Ready { token, readiness } => format!("ready {token} {readiness:?}"),
        ev => format!("event {ev:?}"),
    }
}

fn num<T: std::str::FromStr>(arg: Option<&str>, what: &str) -> Result<T, String> {
    let arg = arg.ok_or_else(|| format!("missing {what}"))?;
    arg.parse().map_err(|_| format!("bad {what} {arg:?}"))
}

fn ms(arg: Option<&str>) -> Result<Option<Duration>, String> {
    match arg {
        None => Ok(None),
        some => num(some, "timeout_ms").map(|n| Some(Duration::from_millis(n))),
    }
}

/// Runs one command. `Ok(None)` prints `ok <word>`; `Ok(Some(line))` prints
/// that line; `Err(msg)` prints `err <word> <msg>`.
fn command(p: &mut Primary, extra: &mut Extra, line: &str) -> Result<Option<String>, String> {
    let mut words = line.split(' ').filter(|w| !w.is_empty());
    let word = words.next().unwrap_or_default();
    let err = |e: io::Error| e.to_string();
    match word {
        "set" if line.starts_with("set echo ") => {
            extra.echo = match words.nth(1) {
                Some("on") => true,
                Some("off") => false,
                other => return Err(format!("bad echo {other:?}: on or off")),
            };
            Ok(None)
        }
        "set" => set(p, words.next().unwrap_or_default(), words.collect()).map(|()| None),
        "sendbig" => {
            let id: u32 = num(words.next(), "id")?;
            let n: usize = num(words.next(), "n")?;
            p.send(id, &big(n), &[])
                .map_err(|e| format!("{:?}: {e}", e.kind()))?;
            Ok(None)
        }
        "fork" => {
            let mut env = Vec::new();
            for kv in words {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| format!("{kv:?} is not KEY=VALUE"))?;
                env.push((k, v));
            }
            let id = p.fork_with_env(&env).map_err(err)?;
            Ok(Some(format!("forked {id}")))
        }
        "send" | "sendfd" => {
            // The text keeps its spaces: split the line itself, not words.
            let mut parts = line.splitn(3, ' ');
            parts.next();
            let id: u32 = num(parts.next(), "id")?;
            let text = parts.next().unwrap_or_default();
            if word == "send" {
                p.send(id, text.as_bytes(), &[]).map_err(err)?;
            } else {
                let fd = fd_holding(b"fdtext").map_err(err)?;
                p.send(id, text.as_bytes(), &[fd.as_fd()]).map_err(err)?;
                // `fd` closes here: the channel sent it, or queued a dup.
            }
            Ok(None)
        }
        "kill" => {
            let id = num(words.next(), "id")?;
            let sig: i32 = num(words.next(), "signum")?;
            let sig = Signal::from_raw(sig).map_err(err)?;
            p.kill(id, sig).map_err(err).map(|()| None)
        }
        "disconnect" => {
            let id = num(words.next(), "id")?;
            let timeout = ms(words.next())?;
            p.disconnect(id, timeout).map_err(err).map(|()| None)
        }
        "disconnect_all" => {
            let timeout = ms(words.next())?;
            p.disconnect_all(timeout).map_err(err).map(|()| None)
        }
        "unroute" => {
            p.unroute(num(words.next(), "id")?);
            Ok(None)
        }
        "served" => {
            let list: Vec<String> = p
                .workers()
                .iter()
                .map(|w| match w.requests {
                    Some(r) => format!("{}:{}:{r}", w.id, w.taken),
                    None => format!("{}:{}:-", w.id, w.taken),
                })
                .collect();
            Ok(Some(format!("served {}", list.join(","))))
        }
        "maxreq" => {
            let id = num(words.next(), "id")?;
            let limit = match words.next() {
                Some("off") => None,
                n => Some(num(n, "limit")?),
            };
            p.set_max_requests(id, limit).map_err(|e| e.to_string())?;
            Ok(None)
        }
        "workers" => {
            let list: Vec<String> = p
                .workers()
                .iter()
                .map(|w| {
                    let state = w.state;
                    format!(
                        "{}:{state}:{}:{}",
                        w.id, w.exited_after_disconnect, w.in_flight
                    )
                })
                .collect();
            Ok(Some(format!("workers {}", list.join(","))))
        }
        "pids" => {
            let list: Vec<String> = p
                .workers()
                .iter()
                .map(|w| format!("{}:{}", w.id, w.pid))
                .collect();
            Ok(Some(format!("pids {}", list.join(","))))
        }
        "fds" => {
            let n = std::fs::read_dir("/proc/self/fd").map_err(err)?.count();
            Ok(Some(format!("fds {n}")))
        }
        "rss" => {
            let status = std::fs::read_to_string("/proc/self/status").map_err(err)?;
            let kb = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .ok_or("no VmRSS line in /proc/self/status")?;
            Ok(Some(format!("rss {kb}")))
        }
        "zombies" => Ok(Some(format!("zombies {}", zombie_children()))),
        "addresses" => {
            let list: Vec<String> = p
                .listening_addresses()
                .iter()
                .map(|a| a.to_string())
                .collect();
            Ok(Some(format!("addresses {}", list.join(","))))
        }
        "child" => {
            let program = words.next().ok_or("missing PROGRAM")?;
            let child = std::process::Command::new(program)
                .args(words)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .map_err(err)?;
            let pid = child.id();
            extra.child = Some(child);
            Ok(Some(format!("child {pid}")))
        }
        "waitchild" => {
            let child = extra.child.as_mut().ok_or("no child")?;
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                if let Some(status) = child.try_wait().map_err(err)? {
                    use std::os::unix::process::ExitStatusExt;
                    extra.child = None;
                    return Ok(Some(match (status.code(), status.signal()) {
                        (Some(c), _) => format!("waitchild code={c}"),
                        (None, s) => format!("waitchild signal={}", s.unwrap_or(0)),
                    }));
                }
                if std::time::Instant::now() >= deadline {
                    return Err("still running after 5 s".to_string());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        "exit" => exit(0),
        "role" => match syncluster::role() {
            Ok(Role::Primary(_)) => Ok(Some("role primary".to_string())),
            Ok(Role::Worker(w)) => Ok(Some(format!("role worker {}", w.id()))),
            Err(e) => Err(format!("{:?}: {e}", e.kind())),
        },
        "whoami" => Ok(Some(format!("whoami {}", whoami()))),
        "closechannel" => p
            .close_channel(num(words.next(), "id")?)
            .map_err(err)
            .map(|()| None),
        "isconnected" | "isdead" => {
            let id = num(words.next(), "id")?;
            let yes = if word == "isdead" {
                p.is_dead(id)
            } else {
                p.is_connected(id)
            };
            Ok(Some(format!("{word} {id} {yes}")))
        }
        "mapfd" => {
            let target = num(words.next(), "target")?;
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(err)?;
            p.settings_mut()
                .map_fd(OwnedFd::from(theirs), target)
                .map_err(|e| format!("{:?}: {e}", e.kind()))?;
            extra.mapped.push((target, ours));
            Ok(None)
        }
        "fdwrite" | "fdread" => {
            let mut parts = line.splitn(3, ' ');
            parts.next();
            let target: i32 = num(parts.next(), "target")?;
            let mut end = extra
                .mapped
                .iter()
                .find(|(t, _)| *t == target)
                .map(|(_, s)| s)
                .ok_or("no such mapfd")?;
            if word == "fdwrite" {
                let text = parts.next().unwrap_or_default();
                end.write_all(format!("{text}\n").as_bytes()).map_err(err)?;
                return Ok(None);
            }
            end.set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(err)?;
            let line = read_line(&mut end).map_err(err)?;
            Ok(Some(format!("fdread {target} {line}")))
        }
        "listenfd" => {
            let addr = words.next().ok_or("missing ADDR")?;
            let (fd, shown) = if addr.contains('/') {
                let l = std::os::unix::net::UnixListener::bind(addr).map_err(err)?;
                (OwnedFd::from(l), addr.to_string())
            } else {
                let l = std::net::TcpListener::bind(addr).map_err(err)?;
                let shown = l.local_addr().map_err(err)?.to_string();
                (OwnedFd::from(l), shown)
            };
            let n = p.listen_fd(fd).map_err(err)?;
            Ok(Some(format!("listenfd {n} {shown}")))
        }
        _ => Err("unknown command".to_string()),
    }
}

/// One line from `r`, read a byte at a time (nothing is read past it),
/// without its newline.
fn read_line(mut r: impl Read) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match r.read(&mut byte)? {
            0 => break,
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0]),
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

fn set(p: &mut Primary, what: &str, args: Vec<&str>) -> Result<(), String> {
    let one = args.first().copied();
    match what {
        "exec" => p.settings_mut().exec = Some(PathBuf::from(one.ok_or("missing PATH")?)),
        "args" => p.settings_mut().args = Some(args.iter().map(Into::into).collect()),
        "cwd" => p.settings_mut().cwd = Some(PathBuf::from(one.ok_or("missing DIR")?)),
        "policy" => {
            let name = one.ok_or("missing policy")?;
            p.settings_mut().policy =
                Policy::parse(name).ok_or_else(|| format!("bad policy {name:?}"))?;
        }
        "window" => p.settings_mut().window = num(one, "window")?,
        "queue" => p.settings_mut().queue_limit = num(one, "queue")?,
        "backlog" => p.settings_mut().backlog = num(one, "backlog")?,
        "uid" => p.settings_mut().uid = Some(num(one, "uid")?),
        "gid" => p.settings_mut().gid = Some(num(one, "gid")?),
        "user" => {
            let user = one.ok_or("missing NAME")?;
            let group = args.get(1).copied();
            p.settings_mut()
                .set_user(user, group)
                .map_err(|e| e.to_string())?;
        }
        "hang" => {
            let n: u64 = num(one, "hang")?;
            p.set_hang_timeout((n > 0).then(|| Duration::from_millis(n)));
        }
        "max_handles" => p.settings_mut().max_worker_handles = num(one, "max_handles")?,
        "listen" => p.settings_mut().listen_rules = listen_rules(&args)?,
        _ => return Err(format!("unknown setting {what:?}")),
    }
    Ok(())
}

/// `set listen` arguments: see the module docs.
fn listen_rules(args: &[&str]) -> Result<Option<ListenRules>, String> {
    if args == ["default"] {
        return Ok(None);
    }
    let mut rules = ListenRules::default();
    for rule in args {
        if let Some(dir) = rule.strip_prefix("unix:") {
            rules.unix_dirs.push(PathBuf::from(dir));
            continue;
        }
        let bad = || format!("bad rule {rule:?}: expected tcp:HOST:LO-HI or unix:DIR");
        let (host, ports) = rule
            .strip_prefix("tcp:")
            .and_then(|r| r.rsplit_once(':'))
            .ok_or_else(bad)?;
        let (lo, hi) = ports.split_once('-').ok_or_else(bad)?;
        let host = match host.trim_start_matches('[').trim_end_matches(']') {
            "*" => None,
            h => Some(h.parse().map_err(|_| bad())?),
        };
        let ports = lo.parse().map_err(|_| bad())?..=hi.parse().map_err(|_| bad())?;
        rules.tcp.push(TcpRule::new(host, ports));
    }
    Ok(Some(rules))
}

/// Children of this process in state Z, from `/proc/*/stat`.
fn zombie_children() -> usize {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            // "pid (comm) state ppid ...": comm may hold spaces and parens.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let mut f = rest.split_whitespace();
            f.next() == Some("Z") && f.next() == Some(me.as_str())
        })
        .count()
}

/// `n` bytes: `big ` (as much of it as fits) then `x`s.
fn big(n: usize) -> Vec<u8> {
    let mut v = b"big ".to_vec();
    v.resize(n, b'x');
    v.truncate(n);
    v
}

/// One end of a socketpair whose other end wrote `content` and closed:
/// reading it gives `content`, then EOF.
fn fd_holding(content: &[u8]) -> io::Result<OwnedFd> {
    let (read_end, mut write_end) = UnixStream::pair()?;
    write_end.write_all(content)?;
    Ok(read_end.into())
}

// ---------------------------------------------------------------- worker

struct Probe {
    worker: Worker,
    listeners: Vec<Listener>,
    served: u64,
    /// Files held open by `hogfds`.
    hogged: Vec<File>,
    /// `PROBE_HOLD`: connections kept open after their line was written.
    hold: bool,
    held: Vec<Stream>,
    /// The `udp` mode's socket, until `PROBE_UDP_MAX` datagrams came.
    udp: Option<std::net::UdpSocket>,
    datagrams: u64,
    /// Fds taken with `worker.take_fd`, by target.
    taken: Vec<(i32, File)>,
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn env_num<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// `PROBE_BACKLOG` and `PROBE_LISTEN_OPTS` as `ListenOptions`.
fn listen_options() -> io::Result<ListenOptions> {
    let mut opts = ListenOptions::new().backlog(env_num("PROBE_BACKLOG").unwrap_or(0));
    for opt in env_or("PROBE_LISTEN_OPTS", "").split(',') {
        opts = match opt {
            "" => opts,
            "ipv6only" => opts.ipv6_only(true),
            "exclusive" => opts.exclusive(true),
            "reuseport" => opts.reuse_port(true),
            "readable" => opts.readable_all(true),
            "writable" => opts.writable_all(true),
            fd if fd.starts_with("fd=") => opts.fd(fd[3..].parse().unwrap_or(-1)),
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("unknown PROBE_LISTEN_OPTS entry {other:?}"),
                ))
            }
        };
    }
    Ok(opts)
}

/// `primary=<bool> worker=<bool> id=<id or none>`, from the crate's
/// read-only role helpers.
fn whoami() -> String {
    let id = syncluster::worker_id().map_or("none".to_string(), |i| i.to_string());
    format!(
        "primary={} worker={} id={id}",
        syncluster::is_primary(),
        syncluster::is_worker()
    )
}

fn run_worker(worker: Worker, mode: &str) -> io::Result<()> {
    if let Some(ms) = env_num::<u64>("PROBE_PAUSE_MS") {
        std::thread::sleep(Duration::from_millis(ms));
    }
    if std::env::var("PROBE_STOP_SIGNALS").as_deref() == Ok("primary") {
        worker.leave_stop_signals_to_primary()?;
    }
    let mut probe = Probe {
        worker,
        listeners: Vec::new(),
        served: 0,
        hogged: Vec::new(),
        hold: std::env::var_os("PROBE_HOLD").is_some(),
        held: Vec::new(),
        udp: None,
        datagrams: 0,
        taken: Vec::new(),
    };
    match mode {
        "idle" => probe.run(),
        "exit42" => exit(42),
        "listen" => {
            probe.listen_all()?;
            probe.run()
        }
        "accept" => probe.accept_loop(),
        "foreign" => {
            probe.listen_all()?;
            probe.foreign_loop()
        }
        "foreign-accept" => probe.foreign_accept(),
        "udp" => {
            let addr = env_or("PROBE_ADDR", "127.0.0.1:0");
            let socket = match probe.worker.bind_udp(&addr) {
                Ok(s) => s,
                Err(e) => {
                    probe.say(&format!("udp-error:{:?}:{e}", e.kind()))?;
                    exit(1);
                }
            };
            socket.set_nonblocking(true)?;
            probe
                .worker
                .register(socket.as_fd(), UDP, Interest::READABLE)?;
            probe.say(&format!("udp:{}", socket.local_addr()?))?;
            probe.udp = Some(socket);
            probe.run()
        }
        "hang" => {
            let addr = env_or("PROBE_ADDR", "127.0.0.1:0");
            let listener = probe.worker.listen(&addr)?;
            // Hold the listener and the connection, answer nothing.
            let _held = (&listener, listener.accept()?);
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unknown PROBE_MODE {other:?}"),
        )),
    }
}

impl Probe {
    fn say(&self, text: &str) -> io::Result<()> {
        self.worker.send(text.as_bytes(), &[])
    }

    /// Listens on each address of `PROBE_ADDR`, reporting each outcome.
    fn listen_all(&mut self) -> io::Result<()> {
        let opts = listen_options()?;
        for addr in env_or("PROBE_ADDR", "127.0.0.1:0").split(',') {
            match self.worker.listen_with(addr, &opts) {
                Ok(l) => {
                    if let Some(max) = env_num("PROBE_MAX_CONN") {
                        l.set_max_connections(Some(max))?;
                    }
                    let shown = match l.local_addr() {
                        Ok(a) => a.to_string(),
                        Err(e) => format!("?{e}"),
                    };
                    self.say(&format!("listening:{shown}"))?;
                    self.listeners.push(l);
                }
                Err(e) => self.say(&format!("listen-error:{addr}:{:?}:{e}", e.kind()))?,
            }
        }
        Ok(())
    }

    fn run(&mut self) -> io::Result<()> {
        loop {
            let event = self.worker.next_event()?;
            self.on_event(event)?;
        }
    }

    fn on_event(&mut self, event: WorkerEvent) -> io::Result<()> {
        match event {
            WorkerEvent::Connection { stream, .. } => self.serve(stream),
            WorkerEvent::Message { bytes, fds } => self.on_message(&bytes, fds)?,
            WorkerEvent::Disconnect => {
                let _ = self.say(&format!("served:{}", self.served));
                exit(env_num("PROBE_DISCONNECT_CODE").unwrap_or(0));
            }
            WorkerEvent::Ready { token: UDP, .. } => self.on_datagrams()?,
            _ => {}
        }
        Ok(())
    }

    /// Reads every datagram the shared UDP socket has now.
    fn on_datagrams(&mut self) -> io::Result<()> {
        let max = env_num::<u64>("PROBE_UDP_MAX");
        let mut buf = [0u8; 2048];
        while let Some(socket) = &self.udp {
            let n = match socket.recv(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            self.datagrams += 1;
            self.say(&format!("dgram:{}", String::from_utf8_lossy(&buf[..n])))?;
            if max == Some(self.datagrams) {
                if let Some(socket) = self.udp.take() {
                    self.worker.deregister(socket.as_fd())?;
                }
                self.say(&format!("udp-done:{}", self.datagrams))?;
            }
        }
        Ok(())
    }

    /// The fd `target` taken from the worker (once), as a `File`.
    fn taken_fd(&mut self, target: i32) -> io::Result<&mut File> {
        if !self.taken.iter().any(|(t, _)| *t == target) {
            let fd = self.worker.take_fd(target)?;
            self.taken.push((target, File::from(fd)));
        }
        let pos = self.taken.iter().position(|(t, _)| *t == target);
        Ok(&mut self.taken[pos.expect("just taken")].1)
    }

    /// Writes `worker <id>` (after `PROBE_SLOW_MS`), then closes the
    /// connection or, with `PROBE_HOLD`, keeps it open.
    fn serve(&mut self, mut stream: Stream) {
        if let Some(ms) = env_num::<u64>("PROBE_SLOW_MS") {
            std::thread::sleep(Duration::from_millis(ms));
        }
        // The client may be gone already; that is its business.
        let _ = writeln!(stream, "worker {}", self.worker.id());
        self.served += 1;
        if self.hold {
            self.held.push(stream);
        }
    }

    /// The worker inside a loop of the program's own: `poll(2)` on the
    /// worker's fd, then `try_next_event` until it has nothing.
    fn foreign_loop(&mut self) -> io::Result<()> {
        let mut poll = ForeignPoll::new(self.worker.as_fd())?;
        loop {
            while let Some(event) = self.worker.try_next_event()? {
                self.on_event(event)?;
            }
            poll.wait(self.worker.poll_timeout())?;
        }
    }

    /// One listener in non-blocking mode, in a loop of the program's own:
    /// `poll(2)` on the listener's fd, then `accept` until `WouldBlock`.
    fn foreign_accept(&mut self) -> io::Result<()> {
        let addr = env_or("PROBE_ADDR", "127.0.0.1:0");
        let listener = self.worker.listen(&addr)?;
        listener.set_nonblocking(true)?;
        self.say(&format!("listening:{}", listener.local_addr()?))?;
        let mut poll = ForeignPoll::new(listener.as_fd())?;
        loop {
            match listener.accept() {
                Ok((stream, peer)) => {
                    self.say(&format!("peer:{peer}"))?;
                    self.serve(stream);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    poll.wait(self.worker.poll_timeout())?;
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {
                    let _ = self.say(&format!("served:{}", self.served));
                    exit(0);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn accept_loop(&mut self) -> io::Result<()> {
        let addr = env_or("PROBE_ADDR", "127.0.0.1:0");
        let listener = match self.worker.listen(&addr) {
            Ok(l) => l,
            Err(e) => {
                self.say(&format!("listen-error:{addr}:{:?}:{e}", e.kind()))?;
                exit(1);
            }
        };
        let id = self.worker.id();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            let _ = writeln!(stream, "worker {id}");
            self.served += 1;
            if self.hold {
                self.held.push(stream);
            }
        }
        let _ = self.say(&format!("served:{}", self.served));
        exit(0);
    }

    fn on_message(&mut self, bytes: &[u8], fds: Vec<OwnedFd>) -> io::Result<()> {
        if !fds.is_empty() {
            let mut content = String::new();
            for fd in fds {
                File::from(fd).read_to_string(&mut content)?;
            }
            return self.say(&format!("fdread:{content}"));
        }
        let text = String::from_utf8_lossy(bytes);
        let (verb, arg) = text.split_once(' ').unwrap_or((&text, ""));
        match verb {
            "echo" => self.say(&format!("echo:{arg}")),
            "exit" => exit(arg.trim().parse().unwrap_or(1)),
            "disconnect" => {
                self.worker.disconnect()?;
                if let Ok(ms) = arg.trim().parse() {
                    // Alive with the channel closed: the primary must have
                    // reported the disconnect already.
                    std::thread::sleep(Duration::from_millis(ms));
                }
                exit(0);
            }
            "release" => {
                let n = self.held.len();
                self.held.clear();
                self.say(&format!("released:{n}"))
            }
            "release-later" => {
                let held = std::mem::take(&mut self.held);
                let ms = arg.trim().parse().unwrap_or(0);
                self.say(&format!("releasing:{}", held.len()))?;
                // Dropped on another thread while the worker waits.
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(ms));
                    drop(held);
                });
                Ok(())
            }
            "open" => {
                let per: Vec<String> = self
                    .listeners
                    .iter()
                    .map(|l| l.open_connections().to_string())
                    .collect();
                let total = self.worker.open_connections();
                self.say(&format!("open:{total}:{}", per.join(",")))
            }
            "env" => {
                let value = std::env::var(arg).unwrap_or_else(|_| "<unset>".to_string());
                self.say(&format!("env:{value}"))
            }
            "cwd" => self.say(&format!("cwd:{}", std::env::current_dir()?.display())),
            "argv" => {
                let args: Vec<String> = std::env::args().skip(1).collect();
                self.say(&format!("argv:{}", args.join(" ")))
            }
            "fdlist" => {
                let mut fds: Vec<u32> = std::fs::read_dir("/proc/self/fd")?
                    .flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect();
                fds.sort_unstable();
                let list: Vec<String> = fds.iter().map(u32::to_string).collect();
                self.say(&format!("fdlist:{}", list.join(",")))
            }
            "close" => {
                self.listeners.clear();
                self.say("closed")
            }
            "relisten" => self.listen_all(),
            "sleep" => {
                let n: u64 = arg.trim().parse().unwrap_or(0);
                self.say(&format!("sleeping:{n}"))?;
                std::thread::sleep(Duration::from_millis(n));
                self.say(&format!("slept:{n}"))
            }
            "burst" => {
                let n: u32 = arg.trim().parse().unwrap_or(0);
                for i in 0..n {
                    self.say(&format!("burst:{i}"))?;
                }
                exit(3);
            }
            "big" => self.say(&format!("big:{}", bytes.len())),
            "sendbig" => {
                let n: usize = arg.trim().parse().unwrap_or(0);
                match self.worker.send(&big(n), &[]) {
                    Ok(()) => self.say(&format!("sendbig-ok:{n}")),
                    Err(e) => self.say(&format!("sendbig-err:{:?}:{e}", e.kind())),
                }
            }
            "givefd" => {
                let fd = fd_holding(b"giventext")?;
                self.worker.send(b"givefd", &[fd.as_fd()])
            }
            "hogfds" => {
                while let Ok(f) = File::open("/dev/null") {
                    self.hogged.push(f);
                }
                self.say(&format!("hogged:{}", self.hogged.len()))
            }
            "freefds" => {
                let n = self.hogged.len();
                self.hogged.clear();
                self.say(&format!("freed:{n}"))
            }
            "role" => match syncluster::role() {
                Ok(Role::Primary(_)) => self.say("role:ok:primary"),
                Ok(Role::Worker(w)) => self.say(&format!("role:ok:worker {}", w.id())),
                Err(e) => self.say(&format!("role:err:{:?}:{e}", e.kind())),
            },
            "whoami" => self.say(&format!("whoami:{}", whoami())),
            "fdwrite" => {
                let (n, rest) = arg.split_once(' ').unwrap_or((arg, ""));
                let res = n
                    .parse()
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bad fd"))
                    .and_then(|n| self.taken_fd(n))
                    .and_then(|f| f.write_all(format!("{rest}\n").as_bytes()));
                match res {
                    Ok(()) => self.say("fdwrite:ok"),
                    Err(e) => self.say(&format!("fdwrite:err:{:?}:{e}", e.kind())),
                }
            }
            "fdecho" => {
                let n = arg.trim().parse().unwrap_or(-1);
                let f = self.taken_fd(n)?;
                let line = read_line(&mut *f)?;
                f.write_all(format!("echo:{line}\n").as_bytes())?;
                self.say(&format!("fdecho:{line}"))
            }
            "udpcount" => self.say(&format!("udpcount:{}", self.datagrams)),
            _ => self.say(&format!("unknown:{text}")),
        }
    }
}

// ---------------------------------------------------------------- foreign

/// The `python3` side of [`ForeignPoll`]: fd 0 is the fd to wait on, fd 1 a
/// socket to the probe. Each line the probe writes is a timeout in ms (-1:
/// none); the answer is `ready` or `timeout`. EOF (or anything unasked) on
/// fd 1 means the probe is gone: exit.
const POLL_HELPER: &str = r#"
import select, socket, sys
ctl = socket.socket(fileno=1)
p = select.poll()
p.register(0, select.POLLIN)
p.register(1, select.POLLIN)
buf = b""
while True:
    while b"\n" not in buf:
        more = ctl.recv(64)
        if not more:
            sys.exit(0)
        buf += more
    line, buf = buf.split(b"\n", 1)
    ms = int(line)
    ready = dict(p.poll(None if ms < 0 else ms))
    if 1 in ready:
        sys.exit(0)
    ctl.sendall(b"ready\n" if 0 in ready else b"timeout\n")
"#;

/// `poll(2)` on one fd by a loop that is not the crate's: a `python3`
/// process with a duplicate of the fd as its stdin, the foreign loop the
/// `foreign` modes live in. One helper per fd, for the probe's life.
struct ForeignPoll {
    helper: std::process::Child,
    ctl: BufReader<UnixStream>,
}

impl ForeignPoll {
    fn new(fd: BorrowedFd<'_>) -> io::Result<ForeignPoll> {
        let (ours, theirs) = UnixStream::pair()?;
        let helper = Command::new("python3")
            .args(["-c", POLL_HELPER])
            .stdin(Stdio::from(fd.try_clone_to_owned()?))
            .stdout(Stdio::from(OwnedFd::from(theirs)))
            .spawn()?;
        Ok(ForeignPoll {
            helper,
            ctl: BufReader::new(ours),
        })
    }

    /// Waits until the fd is readable (`true`) or `timeout` passed.
    fn wait(&mut self, timeout: Option<Duration>) -> io::Result<bool> {
        let ms = timeout.map_or(-1, |t| {
            ((t.as_micros() + 999) / 1000).min(i32::MAX as u128) as i64
        });
        writeln!(self.ctl.get_mut(), "{ms}")?;
        let mut answer = String::new();
        self.ctl.read_line(&mut answer)?;
        match answer.trim_end() {
            "ready" => Ok(true),
            "timeout" => Ok(false),
            other => Err(io::Error::new(
                io::ErrorKind::Other,
                format!("the poll helper answered {other:?}"),
            )),
        }
    }
}

impl Drop for ForeignPoll {
    fn drop(&mut self) {
        let _ = self.helper.kill();
        let _ = self.helper.wait();
    }
}

/// Clears this worker's parent-death signal and execs the probe again,
/// before `role()` (the channel fd is not close-on-exec yet): `python3`
/// calls `prctl(PR_SET_PDEATHSIG, 0)` for the process it runs as, and exec
/// keeps the pid, so the worker is the same process. Returns only on error.
fn clear_pdeathsig_and_reexec() -> io::Error {
    // PR_SET_PDEATHSIG is 1.
    const CLEAR: &str = r#"
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).prctl(1, 0, 0, 0, 0) != 0:
    sys.exit("prctl: errno %d" % ctypes.get_errno())
os.execv(sys.argv[1], sys.argv[1:])
"#;
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return e,
    };
    Command::new("python3")
        .args(["-c", CLEAR])
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .env("PROBE_NO_PDEATHSIG", "cleared")
        .exec()
}
