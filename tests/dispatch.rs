//! The dispatch policies of `examples/hello.rs` against real clients:
//! least-loaded passes over a worker blocked on a slow request (and plain
//! round robin does not), and reuseport loses no connection when a worker
//! leaves (scale down) or is killed with connections in its queue.
//!
//! A worker blocked on `GET /work?ms=N` is found by its wait channel
//! (`/proc/PID/wchan` names the nanosleep). Every wait has a deadline, every
//! client a socket timeout, and every process is killed by its exact pid
//! on every path (`Hello::drop`).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

#[path = "support/hello.rs"]
mod hello;
use hello::common::{require, require_root, require_tool};
use hello::{signal, until, Hello, GET_CLOSE, START};

const BODY: &[u8] = b"hello world\n";
/// How long `/work` blocks a worker in these tests.
const WORK_MS: u64 = 2000;

/// What one `Connection: close` request got.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Ok,
    /// Anything else, with what went wrong.
    Failed(String),
}

/// One `Connection: close` request for `path` on a new connection, with
/// `timeout` on every step; its outcome and how long it took.
fn get(port: u16, path: &str, timeout: Duration) -> (Outcome, Duration) {
    let started = Instant::now();
    let out = (|| {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut s =
            TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(timeout)).unwrap();
        s.set_write_timeout(Some(timeout)).unwrap();
        let req = if path == "/" {
            GET_CLOSE.to_vec()
        } else {
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").into_bytes()
        };
        s.write_all(&req).map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if buf.ends_with(BODY) => {
                    // The answer is whole; a late reset costs nothing.
                    let _ = e;
                    break;
                }
                Err(e) => {
                    return Err(format!(
                        "read after {} bytes: {e} ({:?})",
                        buf.len(),
                        e.kind()
                    ))
                }
            }
        }
        if buf.starts_with(b"HTTP/1.1 200 OK\r\n") && buf.ends_with(BODY) {
            Ok(())
        } else {
            Err(format!("answer {:?}", String::from_utf8_lossy(&buf)))
        }
    })();
    let outcome = match out {
        Ok(()) => Outcome::Ok,
        Err(why) => Outcome::Failed(why),
    };
    (outcome, started.elapsed())
}

/// The worker of `h` blocked in a sleep (`/work`), if any.
fn blocked_worker(h: &Hello) -> Option<i32> {
    h.workers().into_iter().find(|pid| {
        std::fs::read_to_string(format!("/proc/{pid}/wchan")).is_ok_and(|w| w.contains("nanosleep"))
    })
}

/// Sends `/work?ms=ms` from a thread and waits until a worker is blocked
/// on it; returns that worker and the thread (its request's outcome).
fn block_one(h: &Hello, ms: u64) -> (i32, JoinHandle<(Outcome, Duration)>) {
    let port = h.port;
    let work = thread::spawn(move || get(port, &format!("/work?ms={ms}"), Duration::from_secs(15)));
    let pid = until(START, || blocked_worker(h))
        .unwrap_or_else(|| panic!("no worker blocked on /work; stderr:\n{}", h.stderr()));
    (pid, work)
}

/// Quick requests beside a worker blocked on `/work`: `sequential` one
/// after another, then `burst` at once; the latency of each.
fn quick_beside_blocked(policy: &str, sequential: usize, burst: usize) -> Vec<Duration> {
    let h = Hello::start(&["--workers", "2", "--policy", policy]);
    let (_, work) = block_one(&h, WORK_MS);
    // Long enough for the primary to hear that the blocked one went quiet.
    thread::sleep(Duration::from_millis(50));
    let mut times = Vec::new();
    for i in 0..sequential {
        let (outcome, took) = get(h.port, "/", Duration::from_secs(10));
        assert_eq!(outcome, Outcome::Ok, "{policy}: quick request {i}");
        times.push(took);
    }
    let port = h.port;
    let clients: Vec<_> = (0..burst)
        .map(|_| thread::spawn(move || get(port, "/", Duration::from_secs(10))))
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        let (outcome, took) = c.join().unwrap();
        assert_eq!(outcome, Outcome::Ok, "{policy}: burst request {i}");
        times.push(took);
    }
    let (outcome, took) = work.join().unwrap();
    assert_eq!(outcome, Outcome::Ok, "{policy}: /work");
    assert!(
        took >= Duration::from_millis(WORK_MS),
        "/work took {took:?}"
    );
    times
}

#[test]
fn least_loaded_passes_over_a_blocked_worker_where_round_robin_waits_behind_it() {
    let slow = Duration::from_millis(500);
    let ll = quick_beside_blocked("least-loaded", 20, 20);
    let worst = ll.iter().max().unwrap();
    assert!(
        *worst < slow,
        "least-loaded: a quick request waited {worst:?} behind the blocked worker: {ll:?}"
    );
    // The same requests under round robin: some wait their turn at the
    // blocked worker until its /work is done.
    let rr = quick_beside_blocked("rr", 20, 0);
    let waited = rr.iter().filter(|t| **t >= slow).count();
    assert!(
        waited > 0,
        "rr: no quick request waited behind the blocked worker: {rr:?}"
    );
}

/// Quick requests sent at once with a slow one, before the primary can know
/// which worker the slow one blocks: some reach that worker's pipe behind
/// it. Least-loaded takes them back once the worker took nothing for 1 ms
/// and hands them to the other, so none waits for the slow one to end.
#[test]
fn least_loaded_takes_back_what_waits_behind_a_worker_that_blocked() {
    let h = Hello::start(&["--workers", "2", "--policy", "least-loaded"]);
    let port = h.port;
    for round in 0..3 {
        let work = thread::spawn(move || {
            get(
                port,
                &format!("/work?ms={WORK_MS}"),
                Duration::from_secs(15),
            )
        });
        let clients: Vec<_> = (0..30)
            .map(|_| thread::spawn(move || get(port, "/", Duration::from_secs(10))))
            .collect();
        for (i, c) in clients.into_iter().enumerate() {
            let (outcome, took) = c.join().unwrap();
            assert_eq!(outcome, Outcome::Ok, "round {round}: quick request {i}");
            assert!(
                took < Duration::from_millis(1000),
                "round {round}: quick request {i} waited {took:?} behind the blocked worker"
            );
        }
        let (outcome, took) = work.join().unwrap();
        assert_eq!(outcome, Outcome::Ok, "round {round}: /work");
        assert!(
            took >= Duration::from_millis(WORK_MS),
            "/work took {took:?}"
        );
    }
}

#[test]
fn least_loaded_with_many_workers_spreads_and_passes_over_the_blocked_one() {
    // Above four workers two are drawn at random for each connection.
    let mut h = Hello::start(&["--workers", "6", "--policy", "least-loaded"]);
    let (_, work) = block_one(&h, WORK_MS);
    thread::sleep(Duration::from_millis(50));
    for i in 0..30 {
        let (outcome, took) = get(h.port, "/", Duration::from_secs(10));
        assert_eq!(outcome, Outcome::Ok, "quick request {i}");
        assert!(
            took < Duration::from_millis(500),
            "quick request {i} waited {took:?} behind the blocked worker"
        );
    }
    assert_eq!(work.join().unwrap().0, Outcome::Ok);
    let lines = h.stop();
    let served = lines
        .iter()
        .find_map(|l| l.strip_prefix("served "))
        .unwrap_or_else(|| panic!("no served line: {lines:?}"));
    // Sequential requests find every worker idle but the blocked one: the
    // draws and the turns spread them.
    let busy = served
        .split(',')
        .filter(|kv| !kv.ends_with(":0") && !kv.ends_with(":0}"))
        .count();
    eprintln!("least-loaded, 6 workers: served {served}");
    assert!(
        busy >= 4,
        "30 requests went to {busy} of 6 workers: {served}"
    );
}

// ---------------------------------------------------------------------------
// Reuseport.

/// Clients that send `Connection: close` requests in a loop until told to
/// stop; every failure is kept.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    ok: Arc<Mutex<usize>>,
    failed: Arc<Mutex<Vec<String>>>,
}

impl Load {
    fn start(port: u16, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(Mutex::new(0));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match get(port, "/", Duration::from_secs(5)) {
                            (Outcome::Ok, _) => *ok.lock().unwrap() += 1,
                            (Outcome::Failed(why), _) => failed.lock().unwrap().push(why),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            threads,
            ok,
            failed,
        }
    }

    fn ok(&self) -> usize {
        *self.ok.lock().unwrap()
    }

    /// Stops the clients; (answered, failures).
    fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let ok = *self.ok.lock().unwrap();
        let failed = self.failed.lock().unwrap().clone();
        (ok, failed)
    }
}

/// Listening sockets on `port` in this network namespace (`/proc/net/tcp`
/// and `tcp6`, state `0A`).
fn listeners_on(port: u16) -> usize {
    let local = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .map(|table| {
            table
                .lines()
                .skip(1)
                .filter(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.len() > 3 && f[1].ends_with(&local) && f[3] == "0A"
                })
                .count()
        })
        .sum()
}

/// Scales a reuseport cluster of 3 down to 1 under load; `migrates`: the
/// kernel moves a closed socket's queue (`net.ipv4.tcp_migrate_req` = 1),
/// so the primary closes the retired slots instead of serving them.
fn scale_down_under_load(migrates: bool) {
    let h = Hello::start(&["--workers", "3", "--policy", "reuseport"]);
    let port = h.port;
    assert_eq!(listeners_on(port), 3, "one socket per worker slot");
    let load = Load::start(port, 4);
    let progress = |n: usize| until(START, || (load.ok() >= n).then_some(()));
    assert!(progress(200).is_some(), "no load before the scale down");
    for left in [2, 1] {
        h.signal("TTOU");
        h.wait_workers(left, START);
        let seen = load.ok();
        assert!(
            progress(seen + 300).is_some(),
            "the load stalled after scaling down to {left}"
        );
    }
    let (ok, failed) = load.finish();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed while scaling down: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)]
    );
    // Retired slots: served by the primary, or closed (their queue moved).
    // (A leaving worker's copy closes when it exits.)
    let want = if migrates { 1 } else { 3 };
    let settled = until(START, || (listeners_on(port) == want).then_some(()));
    assert!(
        settled.is_some(),
        "{} listening sockets after the scale down, not {want}",
        listeners_on(port)
    );
}

#[test]
fn reuseport_scale_down_under_load_resets_no_connection() {
    // The default (and this machine's, unless someone changed it).
    let migrates = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req")
        .is_ok_and(|v| v.trim() == "1");
    scale_down_under_load(migrates);
}

/// Run by the test below, in a network namespace of its own.
#[test]
#[ignore = "run in its own network namespace by reuseport_retired_slots_close_where_the_kernel_migrates"]
fn reuseport_scale_down_with_tcp_migrate_req_in_a_namespace() {
    assert!(
        std::env::var_os("SYNCLUSTER_DISPATCH_NETNS").is_some(),
        "run through reuseport_retired_slots_close_where_the_kernel_migrates"
    );
    let v = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req").unwrap();
    assert_eq!(v.trim(), "1");
    scale_down_under_load(true);
}

#[test]
fn reuseport_retired_slots_close_where_the_kernel_migrates() {
    let have = std::path::Path::new("/proc/sys/net/ipv4/tcp_migrate_req").exists();
    if !require(have, "net.ipv4.tcp_migrate_req (Linux 5.14)")
        || !require_root("a network namespace with net.ipv4.tcp_migrate_req=1")
        || !require_tool("unshare")
        || !require_tool("ip")
    {
        return;
    }
    // This test binary again, in a namespace where the sysctl is ours to set.
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args(["-n", "sh", "-c"])
        .arg(
            "ip link set lo up && echo 1 > /proc/sys/net/ipv4/tcp_migrate_req && exec \"$0\" \"$@\"",
        )
        .arg(exe)
        .args([
            "--exact",
            "reuseport_scale_down_with_tcp_migrate_req_in_a_namespace",
            "--ignored",
            "--nocapture",
        ])
        .env("SYNCLUSTER_DISPATCH_NETNS", "1");
    let out = hello::common::output_within(cmd, Duration::from_secs(120));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "in the namespace:\n{text}");
    assert!(
        text.contains("1 passed"),
        "the inner test did not run:\n{text}"
    );
}

#[test]
fn reuseport_worker_killed_with_queued_connections_loses_none() {
    let mut h = Hello::start(&["--workers", "2", "--policy", "reuseport"]);
    let port = h.port;
    let (blocked, work) = block_one(&h, 5000);
    // Connections the kernel puts in either slot: the blocked worker's wait
    // in its socket's queue.
    let clients: Vec<_> = (0..24)
        .map(|_| thread::spawn(move || get(port, "/", Duration::from_secs(10))))
        .collect();
    thread::sleep(Duration::from_millis(300));
    let waiting = clients.iter().filter(|c| !c.is_finished()).count();
    assert!(
        waiting > 0,
        "no connection queued behind the blocked worker"
    );
    let killed_at = Instant::now();
    signal(blocked, "KILL");
    for (i, c) in clients.into_iter().enumerate() {
        let (outcome, _) = c.join().unwrap();
        assert_eq!(outcome, Outcome::Ok, "request {i}");
    }
    // Served by the replacement (or, past the grace, by the other worker),
    // long before the dead one would have woken.
    let served_in = killed_at.elapsed();
    assert!(
        served_in < Duration::from_millis(3000),
        "the queue waited {served_in:?}"
    );
    // Its /work died with it.
    assert!(matches!(work.join().unwrap().0, Outcome::Failed(_)));
    h.wait_workers(2, START);
    let served = h.stop().join(" ");
    eprintln!("{waiting} queued behind worker pid {blocked}; {served}");
}
