//! Operations of `examples/hello.rs` under faults: the short, bounded form
//! of `scripts/chaos.sh`. Real processes, real clients, port 0 (except one
//! test that needs a port held by the test), loopback only.
//!
//! Every wait has a deadline, every load loop is bounded in time and count,
//! and every process a test starts is killed by its exact pid on every path,
//! panics included (`Hello::drop`): the workers first (every pid ever seen
//! as a child of the primary, checked against its start time so a reused
//! pid is never hit), then the primary.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

#[path = "support/hello.rs"]
mod hello;
use hello::common::{cpu_ms, is_alive_as};
use hello::{hello_bin, signal, until, Hello, EXIT, GET, GET_CLOSE, IO, START};

const BODY: &[u8] = b"hello world\n";

// ---------------------------------------------------------------------------
// Clients that count every request's outcome.

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Ok,
    Non200,
    Refused,
    Reset,
    /// EOF before any byte of a response.
    Empty,
    /// EOF or reset in the middle of a response.
    Partial,
    Timeout,
    Other,
}

#[derive(Debug, Clone, Copy)]
struct Record {
    started: Instant,
    connected: Option<Instant>,
    outcome: Outcome,
}

fn classify(e: &std::io::Error) -> Outcome {
    match e.kind() {
        ErrorKind::ConnectionRefused => Outcome::Refused,
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => {
            Outcome::Reset
        }
        ErrorKind::WouldBlock | ErrorKind::TimedOut => Outcome::Timeout,
        _ => Outcome::Other,
    }
}

/// Reads one response: its outcome and whether the connection stays open.
fn read_response(s: &mut TcpStream) -> (Outcome, bool) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let status = head.split(' ').nth(1).unwrap_or("");
            let header = |name: &str| {
                head.lines()
                    .skip(1)
                    .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
            };
            let len: usize = header("content-length:")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let keep = header("connection:").as_deref() == Some("keep-alive");
            if buf.len() >= end + 4 + len {
                let ok = status == "200" && &buf[end + 4..end + 4 + len] == BODY;
                return if ok {
                    (Outcome::Ok, keep)
                } else {
                    (Outcome::Non200, false)
                };
            }
        }
        match s.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return (Outcome::Empty, false),
            Ok(0) => return (Outcome::Partial, false),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if !buf.is_empty() && classify(&e) == Outcome::Reset => {
                return (Outcome::Partial, false)
            }
            Err(e) => return (classify(&e), false),
        }
    }
}

fn connect(port: u16, timeout: Duration) -> std::io::Result<TcpStream> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

/// One `Connection: close` request on a new connection.
fn request(port: u16) -> Outcome {
    one_close(port, IO).outcome
}

fn one_close(port: u16, timeout: Duration) -> Record {
    let started = Instant::now();
    let mut s = match connect(port, timeout) {
        Ok(s) => s,
        Err(e) => {
            return Record {
                started,
                connected: None,
                outcome: classify(&e),
            }
        }
    };
    let connected = Some(Instant::now());
    let outcome = match s.write_all(GET_CLOSE) {
        Ok(()) => read_response(&mut s).0,
        Err(e) => classify(&e),
    };
    if outcome == Outcome::Ok {
        // The server closes first: wait for its EOF (bounded).
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut chunk = [0u8; 512];
        while matches!(s.read(&mut chunk), Ok(n) if n > 0) {}
    }
    Record {
        started,
        connected,
        outcome,
    }
}

/// `threads` clients, each in a loop until `finish`, `limit` or at most
/// `max_requests` requests of its own.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<Record>>>,
}

impl Load {
    fn start(port: u16, threads: usize, keep_alive: bool, limit: Duration) -> Load {
        Load::start_with(port, threads, keep_alive, limit, IO)
    }

    fn start_with(
        port: u16,
        threads: usize,
        keep_alive: bool,
        limit: Duration,
        timeout: Duration,
    ) -> Load {
        const MAX_REQUESTS: usize = 200_000;
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + limit;
        let threads = (0..threads)
            .map(|_| {
                let stop = stop.clone();
                thread::spawn(move || {
                    let mut records = Vec::new();
                    let mut conn: Option<TcpStream> = None;
                    while !stop.load(Ordering::Relaxed)
                        && Instant::now() < deadline
                        && records.len() < MAX_REQUESTS
                    {
                        if !keep_alive {
                            let r = one_close(port, timeout);
                            if r.outcome == Outcome::Refused {
                                thread::sleep(Duration::from_millis(1));
                            }
                            records.push(r);
                            continue;
                        }
                        let started = Instant::now();
                        let mut connected = None;
                        let mut s = match conn.take() {
                            Some(s) => s,
                            None => match connect(port, timeout) {
                                Ok(s) => {
                                    connected = Some(Instant::now());
                                    s
                                }
                                Err(e) => {
                                    records.push(Record {
                                        started,
                                        connected,
                                        outcome: classify(&e),
                                    });
                                    thread::sleep(Duration::from_millis(1));
                                    continue;
                                }
                            },
                        };
                        let (outcome, keep) = match s.write_all(GET) {
                            Ok(()) => read_response(&mut s),
                            Err(e) => (classify(&e), false),
                        };
                        if keep {
                            conn = Some(s);
                        }
                        records.push(Record {
                            started,
                            connected,
                            outcome,
                        });
                    }
                    records
                })
            })
            .collect();
        Load { stop, threads }
    }

    fn finish(mut self) -> Vec<Record> {
        self.stop.store(true, Ordering::Relaxed);
        std::mem::take(&mut self.threads)
            .into_iter()
            .flat_map(|t| t.join().expect("load thread"))
            .collect()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        // A panicking test still stops its clients.
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn tally<'a>(records: impl IntoIterator<Item = &'a Record>) -> BTreeMap<Outcome, usize> {
    let mut t = BTreeMap::new();
    for r in records {
        *t.entry(r.outcome).or_insert(0) += 1;
    }
    t
}

fn failed(t: &BTreeMap<Outcome, usize>) -> usize {
    t.iter()
        .filter(|(&o, _)| o != Outcome::Ok)
        .map(|(_, n)| n)
        .sum()
}

/// `n` sequential requests, all must succeed.
fn assert_serves(port: u16, n: usize) {
    for i in 0..n {
        let outcome = request(port);
        assert_eq!(outcome, Outcome::Ok, "request {i} of {n}");
    }
}

// ---------------------------------------------------------------------------

#[test]
fn sigterm_under_load_completes_accepted_requests_and_exits_0() {
    let mut hello = Hello::start(&["--workers", "2"]);
    let load = Load::start(hello.port, 8, false, Duration::from_secs(10));
    thread::sleep(Duration::from_millis(700));
    // Taken before `kill` runs: whatever connected earlier surely did so
    // before the signal.
    let signalled = Instant::now();
    hello.signal("TERM");
    let status = hello.wait_exit(EXIT);
    let exited = Instant::now();
    thread::sleep(Duration::from_millis(300));
    let records = load.finish();
    assert!(
        status.is_some_and(|s| s.success()),
        "exit after SIGTERM: {status:?}"
    );

    let before = tally(
        records
            .iter()
            .filter(|r| r.connected.is_some_and(|c| c < signalled)),
    );
    let after = tally(records.iter().filter(|r| r.started >= exited));
    let total_before: usize = before.values().sum();
    assert!(total_before > 50, "too little load: {before:?}");
    assert_eq!(
        failed(&before),
        0,
        "requests accepted before SIGTERM failed: {before:?}"
    );
    // After the stop, new connections are refused cleanly: no timeout, no
    // reset, no half-open connection.
    assert!(
        after.get(&Outcome::Refused).is_some_and(|&n| n > 0),
        "{after:?}"
    );
    assert_eq!(after.len(), 1, "after the exit: {after:?}");

    let lines = hello.lines(Duration::from_millis(500));
    assert!(
        lines.iter().any(|l| l.starts_with("served {")),
        "no served line: {lines:?}"
    );
}

#[test]
fn sighup_three_times_under_load_fails_no_request() {
    sighup_three_times(false);
}

/// Keep-alive: a retiring worker answers a busy connection's next request
/// with `Connection: close` and closes idle ones only after a grace, so no
/// client meets the idle-close race (nginx's reload has it).
#[test]
fn sighup_three_times_under_keep_alive_load_fails_no_request() {
    sighup_three_times(true);
}

fn sighup_three_times(keep_alive: bool) {
    let mut hello = Hello::start(&["--workers", "2"]);
    let first = hello.wait_workers(2, START);
    let load = Load::start(hello.port, 8, keep_alive, Duration::from_secs(12));
    thread::sleep(Duration::from_millis(300));
    for i in 1..=3 {
        // One at a time: a SIGHUP during a reload is ignored, and two
        // pending SIGHUPs merge into one.
        hello.signal("HUP");
        hello.wait_stderr("Reloaded", i);
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_millis(200));
    let records = load.finish();
    let t = tally(&records);
    assert!(records.len() > 100, "too little load: {t:?}");
    assert_eq!(failed(&t), 0, "failed or non-200 during reloads: {t:?}");
    let err = hello.stderr();
    assert_eq!(hello.stderr_count("Replaced {"), 6, "{err}");
    assert!(!err.contains("ReloadFailed"), "{err}");
    let now = hello.wait_workers(2, START);
    assert!(
        now.iter().all(|p| !first.contains(p)),
        "old workers left: {first:?} -> {now:?}"
    );
    hello.stop();
}

#[test]
fn killed_worker_is_respawned_with_backoff_and_crash_loop_is_reported() {
    // A port that is taken: hello's primary binds it before any fork and
    // stops with exit 1, never forking in a loop.
    let held = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = held.local_addr().unwrap().port().to_string();
    let mut cmd = Command::new(hello_bin());
    cmd.args(["--workers", "2", "--port", &port]);
    let mut doomed = Hello::launch(cmd);
    let status = doomed.wait_exit(EXIT);
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "{}",
        doomed.stderr()
    );
    // (stderr is read by a thread: wait for it.)
    doomed.wait_stderr("Address already in use", 1);
    thread::sleep(Duration::from_millis(100));
    // Only the primary tried: no worker ran.
    assert_eq!(doomed.stderr_count("Address already in use"), 1);
    assert_eq!(doomed.stderr_count("worker"), 0, "{}", doomed.stderr());
    assert!(doomed.lines(Duration::from_millis(100)).is_empty());
    drop(held);

    // A young worker killed again and again: the respawn delay doubles.
    // Two workers, and the victim is always the newest one: the other keeps
    // serving meanwhile.
    let hello = Hello::start(&["--workers", "2"]);
    let mut victim = hello.wait_workers(2, START)[1];
    let mut delays = Vec::new();
    for k in 1..=5 {
        let others: Vec<i32> = hello
            .workers()
            .into_iter()
            .filter(|&p| p != victim)
            .collect();
        let killed = Instant::now();
        signal(victim, "KILL");
        hello.wait_stderr("forking a replacement", k);
        let line = hello
            .stderr()
            .lines()
            .filter(|l| l.contains("forking a replacement"))
            .nth(k - 1)
            .unwrap()
            .to_owned();
        let delay: u64 = line
            .split(" in ")
            .nth(1)
            .and_then(|d| d.strip_suffix(" ms"))
            .map_or(0, |d| d.parse().expect("delay in ms"));
        let next = until(START, || {
            hello
                .workers()
                .into_iter()
                .find(|&p| p != victim && !others.contains(&p))
        })
        .unwrap_or_else(|| panic!("no replacement after kill {k}"));
        let waited = killed.elapsed();
        assert!(
            waited + Duration::from_millis(20) >= Duration::from_millis(delay),
            "kill {k}: replaced after {waited:?}, announced {delay} ms"
        );
        delays.push(delay);
        victim = next;
    }
    assert_eq!(delays, [0, 100, 200, 400, 800], "{}", hello.stderr());
    // The last replacement serves.
    hello.wait_stderr("is listening (a replacement)", 1);
    until(START, || (request(hello.port) == Outcome::Ok).then_some(()))
        .expect("no service after the respawns");
}

/// When the only worker dies, the primary keeps its listening socket for
/// the replacement: same port, nothing refused (until 524b4c2 it closed it,
/// and with `--port 0` the replacement bound a new, unannounced port).
#[test]
fn only_worker_killed_is_replaced_on_the_announced_port() {
    let mut hello = Hello::start(&["--workers", "1"]);
    let victim = hello.wait_workers(1, START)[0];
    assert_eq!(request(hello.port), Outcome::Ok);
    signal(victim, "KILL");
    hello.wait_stderr("is listening (a replacement)", 1);
    assert_eq!(request(hello.port), Outcome::Ok, "the announced port");
    hello.stop();
}

#[test]
fn sigttin_and_sigttou_scale_workers() {
    let mut hello = Hello::start(&["--workers", "2"]);
    hello.wait_workers(2, START);
    // Wait for each notice: two pending signals of a kind merge into one.
    let steps = [
        ("TTIN", 3),
        ("TTIN", 4),
        ("TTOU", 3),
        ("TTOU", 2),
        ("TTOU", 1),
        ("TTOU", 1),
    ];
    for (i, (sig, n)) in steps.into_iter().enumerate() {
        hello.signal(sig);
        hello.wait_stderr("Scaled {", i + 1);
        let line = hello
            .stderr()
            .lines()
            .filter(|l| l.contains("Scaled {"))
            .nth(i)
            .unwrap()
            .to_owned();
        assert_eq!(
            line,
            format!("Scaled {{ workers: {n} }}"),
            "step {i}: {sig}"
        );
        hello.wait_workers(n, START);
    }
    assert_serves(hello.port, 5);
    hello.stop();
}

#[test]
fn hung_worker_is_killed_and_replaced() {
    let mut hello = Hello::start_env(
        &["--workers", "2"],
        &[("HELLO_FAULT", "hang:1"), ("HELLO_HANG_TIMEOUT_MS", "1000")],
    );
    let w1 = hello.worker_with_id(1);
    let st1 = hello.started(w1);
    let began = Instant::now();
    let load = Load::start(hello.port, 4, false, Duration::from_secs(8));
    let died = until(START, || (!is_alive_as(w1, st1)).then(Instant::now))
        .expect("the hung worker was not killed");
    let hung_for = died - began;
    hello.wait_stderr("worker 1 hung; killed", 1);
    hello.wait_stderr("is listening (a replacement)", 1);
    thread::sleep(Duration::from_millis(200));
    let records = load.finish();
    let t = tally(&records);
    assert!(
        hung_for >= Duration::from_millis(900),
        "killed after {hung_for:?}"
    );
    // Only the connection the hung worker had taken is lost.
    assert!(failed(&t) <= 1, "{t:?}");
    assert!(t.get(&Outcome::Ok).is_some_and(|&n| n > 10), "{t:?}");
    hello.wait_workers(2, START);
    assert_serves(hello.port, 20);
    hello.stop();
}

#[test]
fn rogue_worker_is_killed_and_replaced() {
    let mut hello = Hello::start_env(&["--workers", "2"], &[("HELLO_FAULT", "rogue:1")]);
    let w1 = hello.worker_with_id(1);
    let st1 = hello.started(w1);
    let threads = 4;
    let load = Load::start(hello.port, threads, false, Duration::from_secs(8));
    let died = until(START, || (!is_alive_as(w1, st1)).then(Instant::now))
        .expect("the rogue worker was not killed");
    hello.wait_stderr("broke the channel protocol", 1);
    hello.wait_stderr("is listening (a replacement)", 1);
    thread::sleep(Duration::from_millis(300));
    let records = load.finish();
    let t = tally(&records);
    // At most the rogue's own connections fail: it cannot hold more than
    // one per client thread, and nothing that connected after its death.
    assert!(failed(&t) <= threads, "{t:?}");
    let late: Vec<&Record> = records
        .iter()
        .filter(|r| r.outcome != Outcome::Ok && r.connected.is_some_and(|c| c > died))
        .collect();
    assert!(late.is_empty(), "failures after the rogue died: {late:?}");
    assert!(t.get(&Outcome::Ok).is_some_and(|&n| n > 10), "{t:?}");
    hello.wait_workers(2, START);
    assert_serves(hello.port, 20);
    hello.stop();
}

#[test]
fn sigquit_stops_at_once() {
    let mut hello = Hello::start(&["--workers", "2"]);
    let workers = hello.wait_workers(2, START);
    // A connection in the middle of a request: a graceful stop would wait
    // for it (up to the 10 s read timeout).
    let mut slow = connect(hello.port, IO).expect("connect");
    slow.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n").unwrap();
    thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    hello.signal("QUIT");
    let status = hello.wait_exit(EXIT);
    let took = t0.elapsed();
    assert!(status.is_some(), "still running after SIGQUIT");
    assert!(took < Duration::from_secs(2), "SIGQUIT took {took:?}");
    hello.wait_stderr("stopping now", 1);
    for w in workers {
        assert!(
            !is_alive_as(w, hello.started(w)),
            "worker {w} survived SIGQUIT"
        );
    }
    // The held connection was cut, not left hanging.
    let (outcome, _) = read_response(&mut slow);
    assert!(
        matches!(outcome, Outcome::Empty | Outcome::Reset),
        "{outcome:?}"
    );
}

#[test]
fn primary_sigkill_leaves_no_orphan_within_2s() {
    let mut hello = Hello::start(&["--workers", "2"]);
    let workers = hello.wait_workers(2, START);
    // Some traffic and an idle keep-alive connection.
    assert_serves(hello.port, 4);
    let mut idle = connect(hello.port, IO).expect("connect");
    idle.write_all(GET).unwrap();
    assert_eq!(read_response(&mut idle), (Outcome::Ok, true));
    let started: Vec<(i32, Option<u64>)> = workers.iter().map(|&w| (w, hello.started(w))).collect();

    let t0 = Instant::now();
    hello.signal("KILL");
    let _ = hello.wait_exit(EXIT);
    let gone = until(Duration::from_secs(2), || {
        started
            .iter()
            .all(|&(w, st)| !is_alive_as(w, st))
            .then(|| t0.elapsed())
    });
    let left: Vec<i32> = started
        .iter()
        .filter(|&&(w, st)| is_alive_as(w, st))
        .map(|&(w, _)| w)
        .collect();
    assert!(
        gone.is_some(),
        "orphans 2 s after the primary died: {left:?}"
    );
    // `drop` kills any survivor by its recorded pid and start time.
}

/// 200 clients against hello under `ulimit -n limit`: the primary must not
/// spin on EMFILE, and service must come back once they leave.
fn fd_exhaustion(limit: u32) {
    let mut hello = Hello::start_ulimit(limit, &["--workers", "2"]);
    hello.wait_workers(2, START);
    let cpu0 = cpu_ms(hello.pid()).expect("primary cpu");
    let window = Duration::from_secs(3);
    let load = Load::start_with(hello.port, 200, true, window, Duration::from_secs(1));
    thread::sleep(window);
    let records = load.finish();
    let cpu = cpu_ms(hello.pid()).expect("primary cpu") - cpu0;
    let t = tally(&records);
    eprintln!("ulimit -n {limit}: primary CPU {cpu} ms in {window:?}; clients: {t:?}");
    assert!(t.get(&Outcome::Ok).is_some_and(|&n| n > 100), "{t:?}");
    // A spinning primary burns a whole core: ~3000 ms here.
    assert!(
        cpu < 600,
        "primary used {cpu} ms of CPU in {window:?} ({t:?})"
    );
    until(START, || (request(hello.port) == Outcome::Ok).then_some(()))
        .expect("service did not recover");
    assert_serves(hello.port, 5);
    hello.stop();
}

#[test]
fn fd_exhaustion_does_not_spin_and_service_recovers() {
    fd_exhaustion(64);
}
