//! Worker recycling (`supervisor::Config::max_requests` with its jitter,
//! and `max_memory`), as gunicorn's without its 5xx: the counts the
//! primary keeps (through `examples/cluster_probe`), and `examples/hello.rs`
//! recycling under load with `Connection: close` and keep-alive.
//!
//! Every wait has a deadline, every load loop is bounded in time, and every
//! process is killed by its exact pid on every path (`Hello`'s and
//! `Probe`'s `Drop`).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

#[path = "support/hello.rs"]
mod hello;
use hello::common::{children_of, exact, is_alive, pred, tcp_line, until, Probe, DEADLINE};
use hello::{Hello, GET, GET_CLOSE, IO, START};

// ---------------------------------------------------------------------------
// The primary's counts, through the probe.

fn probe_listener(p: &mut Probe, policy: &str) -> (u32, String) {
    p.ask(&format!("set policy {policy}"), "ok set");
    let id = p.fork_online("PROBE_MODE=listen PROBE_ADDR=127.0.0.1:0");
    let line = p.expect(format!("listening {id} "), DEADLINE);
    (id, line.rsplit(' ').next().unwrap().to_string())
}

/// `taken` and `requests` of worker `id`, from the probe's `served`.
fn served(p: &mut Probe, id: u32) -> (u64, Option<u64>) {
    let line = p.ask("served", "served ");
    let entry = line["served ".len()..]
        .split(',')
        .find(|e| e.starts_with(&format!("{id}:")))
        .unwrap_or_else(|| p.fail(&format!("no worker {id} in {line:?}")))
        .to_string();
    let mut f = entry.split(':').skip(1);
    let taken = f.next().unwrap().parse().unwrap();
    let requests = f.next().unwrap().parse().ok();
    (taken, requests)
}

fn counts_taken_connections(policy: &str) {
    let mut p = Probe::start();
    let (id, addr) = probe_listener(&mut p, policy);
    p.cmd(&format!("maxreq {id} 25"));
    for i in 0..40 {
        let line = tcp_line(&addr, DEADLINE);
        assert!(
            matches!(&line, Ok(l) if l.starts_with("worker ")),
            "{policy} connection {i}: {line:?}"
        );
    }
    // Shared: the worker reports in batches of 16, the rest once 50 ms
    // passed, at its next turn: a message turns it.
    thread::sleep(Duration::from_millis(100));
    p.cmd(&format!("send {id} echo turn"));
    p.expect(format!("message {id} echo:turn"), DEADLINE);
    let counted = until(DEADLINE, || Some(served(&mut p, id)).filter(|s| s.0 == 40));
    assert_eq!(counted, Some((40, None)), "{policy}: {:?}", p.log());
    // Once, at the limit (shared: at the batch that crossed it).
    let line = p.expect(format!("event MaxRequests {{ id: {id}, count: "), DEADLINE);
    let count: u64 = line
        .rsplit(": ")
        .next()
        .and_then(|c| c.trim_end_matches(" }").parse().ok())
        .unwrap();
    assert!((25..=40).contains(&count), "{line}");
    p.expect_none("event MaxRequests", Duration::from_millis(200));
}

#[test]
fn round_robin_acknowledgements_count_taken_connections_and_the_limit_fires_once() {
    counts_taken_connections("rr");
}

#[test]
fn shared_workers_report_taken_connections_in_batches_and_the_limit_fires_once() {
    counts_taken_connections("shared");
}

/// A Count frame is believed (it only moves the sender's own recycling),
/// but one with an unknown flag or a payload is a protocol error.
#[test]
fn count_frames_add_up_and_malformed_ones_are_protocol_errors() {
    let py = "/usr/bin/python3";
    if !hello::common::require_tool(py) {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hostile/claims.py");
    let mut p = Probe::start();
    p.ask(&format!("set exec {py}"), "ok set");
    for (args, fate) in [
        ("0:7:0 1:5:0 0:u32max:0", None),
        ("2:1:0", Some("count with unknown flags 0x2")),
        ("0:1:4", Some("Count frame has a 4-byte payload")),
    ] {
        let args = args.replace("u32max", &u32::MAX.to_string());
        p.ask(
            &format!("set args {} count {args}", script.display()),
            "ok set",
        );
        let id = p.fork_online("");
        match fate {
            None => {
                p.expect(format!("message {id} counted"), DEADLINE);
                let want = (7 + u64::from(u32::MAX), Some(5));
                assert_eq!(served(&mut p, id), want);
                p.expect_none(format!("error {id} "), Duration::from_millis(200));
                p.ask(&format!("kill {id} 9"), "ok kill");
            }
            Some(why) => {
                p.expect(
                    pred(format!("error {id} ... {why}"), move |l: &str| {
                        l.starts_with(&format!("error {id} ")) && l.contains(why)
                    }),
                    DEADLINE,
                );
            }
        }
        p.expect(exact(format!("exit {id} signal=9 ead=false")), DEADLINE);
    }
}

// ---------------------------------------------------------------------------
// hello under load.

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    ok: usize,
    failed: usize,
}

/// Reads one response: `Some(keep-alive)` for a complete 200 with hello's
/// body, `None` for anything else (EOF, reset, timeout, another status).
fn response(s: &mut TcpStream) -> Option<bool> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            if buf.len() >= end + 4 + 12 {
                let ok = head.starts_with("http/1.1 200 ")
                    && &buf[end + 4..end + 16] == b"hello world\n";
                return ok.then(|| head.contains("connection: keep-alive"));
            }
        }
        match s.read(&mut chunk) {
            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            _ => return None,
        }
    }
}

fn connect(port: u16) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), IO)?;
    s.set_read_timeout(Some(IO))?;
    s.set_write_timeout(Some(IO))?;
    Ok(s)
}

/// `threads` clients in a loop until stopped (at most `limit`).
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Tally>>,
}

impl Load {
    fn start(port: u16, threads: usize, keep_alive: bool, limit: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + limit;
        let threads = (0..threads)
            .map(|_| {
                let stop = stop.clone();
                thread::spawn(move || {
                    let mut t = Tally::default();
                    let mut conn: Option<TcpStream> = None;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let fresh = conn.is_none();
                        let mut s = match conn.take().map_or_else(|| connect(port), Ok) {
                            Ok(s) => s,
                            Err(_) => {
                                t.failed += 1;
                                thread::sleep(Duration::from_millis(1));
                                continue;
                            }
                        };
                        let req = if keep_alive { GET } else { GET_CLOSE };
                        let got = s.write_all(req).ok().and_then(|()| response(&mut s));
                        match got {
                            Some(keep) => {
                                t.ok += 1;
                                if keep && keep_alive {
                                    conn = Some(s);
                                }
                            }
                            None => {
                                t.failed += 1;
                                eprintln!("failed request (fresh connection: {fresh})");
                            }
                        }
                    }
                    t
                })
            })
            .collect();
        Load { stop, threads }
    }

    fn finish(mut self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Tally::default();
        for t in std::mem::take(&mut self.threads) {
            let t = t.join().expect("load thread");
            total.ok += t.ok;
            total.failed += t.failed;
        }
        total
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Samples the primary's live children every 2 ms; the most seen at once.
struct Census {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<usize>>,
}

impl Census {
    fn start(primary: i32) -> Census {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let mut most = 0;
            while !flag.load(Ordering::Relaxed) {
                let live = children_of(primary)
                    .into_iter()
                    .filter(|&k| is_alive(k))
                    .count();
                most = most.max(live);
                thread::sleep(Duration::from_millis(2));
            }
            most
        });
        Census {
            stop,
            thread: Some(thread),
        }
    }

    fn most(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("census thread")
    }
}

impl Drop for Census {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The `Recycling {...}` and `Recycled {...}` lines, in order, as
/// (`true` for Recycling, id or old id, limit or new id).
fn recycle_log(stderr: &str) -> Vec<(bool, u32, u64)> {
    let num = |l: &str, key: &str| -> u64 {
        let rest = &l[l.find(key).unwrap_or_else(|| panic!("{key} in {l}")) + key.len()..];
        rest.split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{key} in {l}"))
    };
    stderr
        .lines()
        .filter_map(|l| {
            if l.starts_with("Recycling {") {
                let limit = if l.contains("Requests") {
                    num(l, "limit: ")
                } else {
                    0
                };
                Some((true, num(l, "id: ") as u32, limit))
            } else if l.starts_with("Recycled {") {
                Some((false, num(l, "old: ") as u32, num(l, "new: ")))
            } else {
                None
            }
        })
        .collect()
}

/// Each Recycling is followed by its own Recycled before the next one.
fn assert_one_at_a_time(log: &[(bool, u32, u64)], stderr: &str) {
    for pair in log.windows(2) {
        match pair {
            [(true, a, _), (false, b, _)] => assert_eq!(a, b, "{stderr}"),
            [(false, ..), (true, ..)] => {}
            _ => panic!("two recycles at once: {pair:?}\n{stderr}"),
        }
    }
}

fn recycles_under_load(policy: &str, keep_alive: bool) {
    let hello = Hello::start(&[
        "--workers",
        "2",
        "--policy",
        policy,
        "--max-requests",
        "200",
        "--max-requests-jitter",
        "40",
    ]);
    let first = hello.wait_workers(2, START);
    let census = Census::start(hello.pid());
    let load = Load::start(hello.port, 4, keep_alive, Duration::from_secs(20));
    // Enough for every worker of the first generation, and a few more.
    let enough = until(Duration::from_secs(15), || {
        (hello.stderr_count("Recycled {") >= 6).then_some(())
    });
    let t = load.finish();
    let most = census.most();
    let err = hello.stderr();
    assert!(enough.is_some(), "fewer than 6 recycles: {t:?}\n{err}");
    assert_eq!(t.failed, 0, "failed requests while recycling: {t:?}\n{err}");
    assert!(t.ok >= 1200, "too little load: {t:?}");
    assert!(!err.contains("RecycleFailed"), "{err}");
    let log = recycle_log(&err);
    assert_one_at_a_time(&log, &err);
    // The jitter: limits from 200 to 240, not all the same.
    let limits: Vec<u64> = log.iter().filter(|e| e.0).map(|e| e.2).collect();
    assert!(limits.iter().all(|l| (200..=240).contains(l)), "{limits:?}");
    assert!(
        limits.iter().any(|&l| l != limits[0]),
        "no jitter: {limits:?}"
    );
    // Never more than one worker beyond the target.
    assert!(most <= 3, "{most} workers at once\n{err}");
    let now = hello.wait_workers(2, START);
    assert!(
        now.iter().all(|p| !first.contains(p)),
        "first workers still there: {first:?} -> {now:?}"
    );
}

#[test]
fn workers_recycle_every_few_hundred_requests_without_a_failed_request() {
    recycles_under_load("rr", false);
}

#[test]
fn keep_alive_requests_count_and_recycling_fails_none_of_them() {
    recycles_under_load("rr", true);
}

#[test]
fn shared_workers_recycle_by_the_requests_they_report() {
    recycles_under_load("shared", false);
}

#[test]
fn a_worker_above_max_memory_is_replaced_and_the_others_are_not() {
    // Worker 1 keeps 64 MB more from its first connection on.
    let mut hello = Hello::start_env(
        &["--workers", "2", "--max-memory", "40"],
        &[("HELLO_FAULT", "grow:1:64")],
    );
    let first = hello.wait_workers(2, START);
    let load = Load::start(hello.port, 2, false, Duration::from_secs(15));
    hello.wait_stderr("Recycled { old: 1, ", 1);
    // Checked every second: another second or two shows no other recycle.
    thread::sleep(Duration::from_millis(2500));
    let t = load.finish();
    let err = hello.stderr();
    assert_eq!(t.failed, 0, "{t:?}\n{err}");
    assert_eq!(hello.stderr_count("Recycling {"), 1, "{err}");
    let line = err.lines().find(|l| l.starts_with("Recycling {")).unwrap();
    assert!(
        line.starts_with("Recycling { id: 1, reason: Memory { rss: ")
            && line.contains(&format!("limit: {} }}", 40u64 << 20)),
        "{line}"
    );
    let rss: u64 = line["Recycling { id: 1, reason: Memory { rss: ".len()..]
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(rss > 64 << 20, "{line}");
    let now = hello.wait_workers(2, START);
    assert_eq!(
        now.iter().filter(|p| first.contains(p)).count(),
        1,
        "{now:?}"
    );
    let lines = hello.stop();
    assert!(lines.iter().any(|l| l.starts_with("served {")), "{lines:?}");
}

/// SIGHUP while workers recycle: the reload leaves a recycle in progress
/// to finish, no recycle starts during it, and no request fails.
#[test]
fn reloads_during_recycling_finish_and_fail_no_request() {
    let hello = Hello::start(&["--workers", "2", "--max-requests", "100"]);
    hello.wait_workers(2, START);
    let load = Load::start(hello.port, 4, true, Duration::from_secs(20));
    hello.wait_stderr("Recycled {", 2);
    for i in 1..=3 {
        hello.signal("HUP");
        hello.wait_stderr("Reloaded", i);
        thread::sleep(Duration::from_millis(100));
    }
    let t = load.finish();
    let err = hello.stderr();
    assert_eq!(t.failed, 0, "{t:?}\n{err}");
    assert!(!err.contains("Failed"), "{err}");
    assert_eq!(hello.stderr_count("Replaced {"), 6, "{err}");
    // Between a Reloading and its Reloaded, no recycle begins.
    let mut reloading = false;
    for l in err.lines() {
        match l {
            "Reloading" => reloading = true,
            "Reloaded" => reloading = false,
            l if l.starts_with("Recycling {") => assert!(!reloading, "{l} during a reload\n{err}"),
            _ => {}
        }
    }
    hello.wait_workers(2, START);
}
