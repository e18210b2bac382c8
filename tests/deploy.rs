//! Deployment with examples/hello.rs: listening in the primary (a port in
//! use fails at once), systemd's socket activation with the real
//! `systemd-socket-activate`, the sd_notify sequence on a datagram socket
//! the test owns, and the binary upgrade on SIGUSR2, under load, with its
//! pid file, its failure path and its one-at-a-time rule.
//!
//! Every process is killed by pid and start time on every path, the new
//! primary of an upgrade and its workers included (`Others`).

#[path = "support/hello.rs"]
mod hello;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use hello::common::{children_of, is_alive, is_alive_as, start_time};
use hello::{assert_hello, request, signal, until, Hello, EXIT, GET_CLOSE, START};

/// Processes a test started indirectly (the new primary of an upgrade,
/// which outlives its parent, its workers, a stuck new binary): each
/// carries `DEPLOY_TEST_MARK=<mark>` in its environment, inherited from the
/// hello the test started, and is SIGKILLed on drop, on every path.
struct Others {
    mark: String,
}

impl Others {
    fn new(test: &str) -> Others {
        Others {
            mark: format!("{test}-{}", std::process::id()),
        }
    }

    /// The variable to set on the command the test starts.
    fn var(&self) -> (&'static str, &str) {
        ("DEPLOY_TEST_MARK", &self.mark)
    }

    /// Live processes that carry the mark.
    fn marked(&self) -> Vec<i32> {
        let want = format!("DEPLOY_TEST_MARK={}", self.mark);
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| is_alive(pid) && environ(pid).contains(&want))
            .collect()
    }
}

impl Drop for Others {
    fn drop(&mut self) {
        // Twice: a primary may fork a replacement for a worker killed first.
        for _ in 0..3 {
            for pid in self.marked() {
                let st = start_time(pid);
                if is_alive_as(pid, st) {
                    signal(pid, "KILL");
                }
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A private directory under the target dir, fresh for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("deploy-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A copy of hello that a test may replace, as an operator replaces the
/// binary before SIGUSR2.
fn hello_copy(dir: &Path) -> PathBuf {
    let path = dir.join("hello");
    std::fs::copy(hello::hello_bin(), &path).unwrap();
    path
}

/// Puts `content` at `path` atomically, executable.
fn replace_file(path: &Path, content: &[u8]) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, content).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The pid of the `nth` (from 1) new primary hello announced on stderr
/// (`upgrade: new primary pid N started`), waiting up to `START`.
fn new_primary(h: &Hello, nth: usize) -> i32 {
    let prefix = "upgrade: new primary pid ";
    until(START, || {
        let err = h.stderr();
        let line = err.lines().filter(|l| l.starts_with(prefix)).nth(nth - 1)?;
        line[prefix.len()..].split(' ').next()?.parse().ok()
    })
    .unwrap_or_else(|| panic!("no new primary #{nth} on stderr:\n{}", h.stderr()))
}

/// Environment variables of `pid`.
fn environ(pid: i32) -> Vec<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    env.split(|&b| b == 0)
        .map(|kv| String::from_utf8_lossy(kv).into_owned())
        .collect()
}

/// Client threads, each in a loop of `Connection: close` requests, that
/// count every outcome until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
                thread::spawn(move || {
                    // Bounded even if nobody stops it.
                    let end = Instant::now() + Duration::from_secs(60);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                        match one_request(port) {
                            Ok(()) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => failures.lock().unwrap().push(e),
                        }
                        // Load, not a flood: fewer sockets left in TIME_WAIT.
                        thread::sleep(Duration::from_millis(2));
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failures,
            threads,
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops the clients; (requests answered, failures).
    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

/// One `Connection: close` request; `Err` says what went wrong.
fn one_request(port: u16) -> Result<(), String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(GET_CLOSE).map_err(|e| format!("write: {e}"))?;
    let mut got = Vec::new();
    s.read_to_end(&mut got)
        .map_err(|e| format!("read: {e} after {:?}", String::from_utf8_lossy(&got)))?;
    if got.starts_with(b"HTTP/1.1 200 OK\r\n") && got.ends_with(b"\r\n\r\nhello world\n") {
        Ok(())
    } else {
        Err(format!("answer: {:?}", String::from_utf8_lossy(&got)))
    }
}

#[test]
fn a_port_in_use_fails_at_startup_with_exit_1_within_a_second() {
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port().to_string();
    let mut cmd = Command::new(hello::hello_bin());
    cmd.args(["--workers", "2", "--port", &port]);
    let t0 = Instant::now();
    let mut h = Hello::launch(cmd);
    let status = h.wait_exit(Duration::from_secs(1));
    let took = t0.elapsed();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{}", h.stderr());
    assert!(took < Duration::from_secs(1), "took {took:?}");
    h.wait_stderr("Address already in use", 1);
    let err = h.stderr();
    assert!(
        err.contains(&format!("listen on 127.0.0.1:{port}")),
        "{err}"
    );
    // Refused before any fork: no worker ever ran.
    assert!(!err.contains("worker"), "{err}");
    assert!(h.lines(Duration::from_millis(100)).is_empty());
}

#[test]
fn socket_activation_serves_on_the_passed_socket_by_address_by_name_or_alone() {
    let tool = "systemd-socket-activate";
    let found = Command::new(tool).arg("--version").output();
    assert!(
        found.is_ok(),
        "{tool} is missing: install Debian's systemd package (apt-get install -y systemd)"
    );
    // The tool takes no port 0: a free port, probed and released.
    let others = Others::new("activation");
    // By address (--port), by name (--listen fd:web), and with neither: the
    // one socket passed.
    for how in ["address", "name", "alone"] {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cmd = Command::new(tool);
        cmd.args(["-l", &format!("127.0.0.1:{port}"), "--fdname=web"])
            .arg(hello::hello_bin())
            .args(["--workers", "2"])
            .env(others.var().0, others.var().1);
        match how {
            "address" => cmd.args(["--port", &port.to_string()]),
            "name" => cmd.args(["--listen", "fd:web"]),
            _ => &mut cmd,
        };
        let mut h = Hello::launch(cmd);
        // It execs hello at the first connection: that connection waits in
        // the passed socket's backlog, and only an adopted socket serves it.
        let first = until(START, || TcpStream::connect(("127.0.0.1", port)).ok())
            .unwrap_or_else(|| panic!("{tool} never listened: {}", h.stderr()));
        first.set_read_timeout(Some(hello::IO)).unwrap();
        let mut first = first;
        first.write_all(GET_CLOSE).unwrap();
        let r = hello::read_response(&mut first, &mut Vec::new(), false);
        assert_hello(&r);
        let line = h.line(START).expect("listening line");
        assert_eq!(
            line,
            format!("listening on http://127.0.0.1:{port} (2 workers, rr)"),
            "{how}"
        );
        assert_hello(&request(port, GET_CLOSE));
        // The tool exec'd hello: same pid. LISTEN_* never reach a worker.
        let workers = h.wait_workers(2, START);
        assert!(environ(h.pid())
            .iter()
            .any(|v| v.starts_with("LISTEN_FDS=1")));
        for w in workers {
            let env = environ(w);
            assert!(!env.iter().any(|v| v.starts_with("LISTEN_")), "{env:?}");
        }
        h.stop();
    }
}

/// The datagrams on `rx` until `want` is among them (STATUS-only and
/// WATCHDOG ones skipped); panics after 15 s.
fn expect_notify(rx: &UnixDatagram, want: &str, h: &Hello) -> String {
    let end = Instant::now() + START;
    let mut buf = [0u8; 4096];
    let mut seen = Vec::new();
    while Instant::now() < end {
        let Ok(n) = rx.recv(&mut buf) else { continue };
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        if msg.lines().any(|l| l.starts_with(want)) {
            return msg;
        }
        if !msg
            .lines()
            .all(|l| l.starts_with("STATUS=") || l == "WATCHDOG=1")
        {
            panic!(
                "{want:?} expected, got {msg:?} (after {seen:?}); stderr:\n{}",
                h.stderr()
            );
        }
        seen.push(msg);
    }
    panic!(
        "no {want:?} within {START:?} (got {seen:?}); stderr:\n{}",
        h.stderr()
    );
}

#[test]
fn notify_socket_hears_ready_reloading_ready_mainpid_stopping_in_order() {
    let dir = scratch("notify");
    let path = dir.join("notify.sock");
    let rx = UnixDatagram::bind(&path).unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let others = Others::new("notify");
    let mut h = Hello::start_env(
        &["--workers", "2"],
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
            others.var(),
        ],
    );
    let ready = expect_notify(&rx, "READY=1", &h);
    assert!(ready.contains("STATUS=2 workers, 0 reloads"), "{ready:?}");

    // WATCHDOG=1 every 100 ms while the loop turns, none while it cannot.
    expect_notify(&rx, "WATCHDOG=1", &h);
    h.signal("STOP");
    thread::sleep(Duration::from_millis(50));
    let mut buf = [0u8; 256];
    while rx.recv(&mut buf).is_ok() {} // what was sent before the stop
    let quiet_until = Instant::now() + Duration::from_millis(400);
    while Instant::now() < quiet_until {
        if let Ok(n) = rx.recv(&mut buf) {
            h.signal("CONT");
            panic!(
                "{:?} from a stopped primary",
                String::from_utf8_lossy(&buf[..n])
            );
        }
    }
    h.signal("CONT");
    expect_notify(&rx, "WATCHDOG=1", &h);
    for w in h.wait_workers(2, START) {
        let env = environ(w);
        assert!(
            !env.iter().any(|v| v.starts_with("NOTIFY_SOCKET")),
            "{env:?}"
        );
    }

    h.signal("HUP");
    let reloading = expect_notify(&rx, "RELOADING=1", &h);
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"));
    assert!(usec > 0);
    let ready = expect_notify(&rx, "READY=1", &h);
    assert!(ready.contains("1 reloads"), "{ready:?}");

    h.signal("USR2");
    let new = new_primary(&h, 1);
    let main = expect_notify(&rx, "MAINPID=", &h);
    assert_eq!(main, format!("MAINPID={new}"));
    let old = h.wait_exit(EXIT);
    assert!(old.is_some_and(|s| s.success()), "{old:?}: {}", h.stderr());
    assert_hello(&request(h.port, GET_CLOSE));

    signal(new, "TERM");
    let stopping = expect_notify(&rx, "STOPPING=1", &h);
    assert_eq!(stopping, "STOPPING=1");
    assert!(until(EXIT, || (!is_alive(new)).then_some(())).is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The inode of the socket listening on 127.0.0.1:`port` (`/proc/net/tcp`).
fn listening_inode(port: u16) -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let local = format!("0100007F:{port:04X}");
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&local.as_str()) && f.get(3) == Some(&"0A"))
            .then(|| f.get(9).map(|s| s.to_string()))?
    })
}

/// Whether `pid` holds the socket with this inode.
fn holds_socket(pid: i32, inode: &str) -> bool {
    let want = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_str() == Some(&want)))
        })
        .unwrap_or(false)
}

fn upgrade_under_load(policy: &str) {
    let dir = scratch(&format!("upgrade-{policy}"));
    let bin = hello_copy(&dir);
    let pid_file = dir.join("hello.pid");
    let oldbin = dir.join("hello.pid.oldbin");
    let others = Others::new(&format!("upgrade-{policy}"));
    let mut cmd = Command::new(&bin);
    cmd.args([
        "--workers",
        "2",
        "--port",
        "0",
        "--policy",
        policy,
        "--pid-file",
    ])
    .arg(&pid_file)
    .env(others.var().0, others.var().1);
    let mut h = Hello::spawn(cmd);
    let old = h.pid();
    assert_eq!(read_pid(&pid_file), Some(old));
    let old_workers = h.wait_workers(2, START);
    let socket = listening_inode(h.port).expect("the listening socket in /proc/net/tcp");
    assert!(holds_socket(old, &socket));

    let load = Load::start(h.port, 4);
    assert!(until(START, || (load.ok() >= 50).then_some(())).is_some());
    let t0 = Instant::now();
    h.signal("USR2");
    let new = new_primary(&h, 1);
    h.wait_stderr(&format!("upgrade: pid {new} took over"), 1);
    let took = t0.elapsed();
    // The old one drains and leaves with exit 0; its pid file became the
    // new primary's.
    let status = h.wait_exit(EXIT);
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}: {}",
        h.stderr()
    );
    assert_eq!(read_pid(&pid_file), Some(new), "{}", h.stderr());
    assert!(!oldbin.exists());
    for w in old_workers {
        assert!(!is_alive(w), "old worker {w} still runs");
    }
    // Only the new primary's workers are left, and they serve, on the very
    // socket the old primary had (inherited, not bound anew); in shared
    // mode the workers hold it too.
    let served_before = load.ok();
    assert!(until(START, || (load.ok() >= served_before + 100).then_some(())).is_some());
    let new_workers = children_of(new);
    assert_eq!(new_workers.len(), 2, "{new_workers:?}");
    assert_eq!(listening_inode(h.port).as_ref(), Some(&socket));
    assert!(holds_socket(new, &socket));
    for w in new_workers {
        assert_eq!(holds_socket(w, &socket), policy == "shared", "{policy}");
    }
    let (ok, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "{} failed of {ok}: {failures:?}",
        failures.len()
    );
    eprintln!("upgrade under load ({policy}): {ok} requests, 0 failed, took over in {took:?}");

    signal(new, "TERM");
    assert!(until(EXIT, || (!is_alive(new)).then_some(())).is_some());
    assert!(!pid_file.exists(), "the pid file outlived its primary");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn usr2_upgrade_under_load_fails_no_request_and_hands_over_socket_and_pid_file_rr() {
    upgrade_under_load("rr");
}

#[test]
fn usr2_upgrade_under_load_fails_no_request_and_hands_over_socket_and_pid_file_shared() {
    upgrade_under_load("shared");
}

#[test]
fn a_failed_upgrade_keeps_serving_restores_the_pid_file_and_refuses_a_second_usr2() {
    let dir = scratch("upgrade-fails");
    let bin = hello_copy(&dir);
    let real = std::fs::read(&bin).unwrap();
    let pid_file = dir.join("hello.pid");
    let oldbin = dir.join("hello.pid.oldbin");
    let others = Others::new("upgrade-fails");
    let mut cmd = Command::new(&bin);
    cmd.args(["--workers", "2", "--port", "0", "--pid-file"])
        .arg(&pid_file)
        .env("HELLO_UPGRADE_TIMEOUT_MS", "1500")
        .env(others.var().0, others.var().1);
    let mut h = Hello::spawn(cmd);
    let old = h.pid();
    let load = Load::start(h.port, 4);
    assert!(until(START, || (load.ok() >= 50).then_some(())).is_some());

    // A new binary that exits at start.
    replace_file(&bin, b"#!/bin/sh\nexit 1\n");
    h.signal("USR2");
    h.wait_stderr("upgrade failed", 1);
    let err = h.stderr();
    assert!(err.contains("ended with exit code 1"), "{err}");
    assert_eq!(read_pid(&pid_file), Some(old));
    assert!(!oldbin.exists());

    // One that never gets ready: killed at the timeout; a second USR2
    // meanwhile is refused.
    replace_file(&bin, b"#!/bin/sh\nexec sleep 30\n");
    h.signal("USR2");
    let stuck = new_primary(&h, 2);
    assert_eq!(read_pid(&oldbin), Some(old));
    h.signal("USR2");
    h.wait_stderr("upgrade refused: an upgrade is in progress", 1);
    h.wait_stderr("upgrade failed", 2);
    let err = h.stderr();
    assert!(
        err.contains("was not ready within 1.5s; it ended with signal SIGKILL"),
        "{err}"
    );
    assert!(!is_alive(stuck));
    assert_eq!(read_pid(&pid_file), Some(old));
    assert!(!oldbin.exists());
    assert_eq!(h.stderr_count("upgrade: new primary pid "), 2, "{err}");

    // Still the same primary, serving all along.
    let before = load.ok();
    assert!(until(START, || (load.ok() >= before + 50).then_some(())).is_some());
    let (ok, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "{} failed of {ok}: {failures:?}",
        failures.len()
    );
    replace_file(&bin, &real);
    h.stop();
    assert!(!pid_file.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn usr1_reopens_the_log_file_and_leaves_workers_alone() {
    let dir = scratch("log");
    let log = dir.join("hello.log");
    let others = Others::new("log");
    let mut cmd = Command::new(hello::hello_bin());
    cmd.args(["--workers", "2", "--port", "0", "--log"])
        .arg(&log)
        .env(others.var().0, others.var().1);
    let mut h = Hello::spawn(cmd);
    let workers = h.wait_workers(2, START);
    let text = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    assert!(text(&log).starts_with("primary pid "), "{:?}", text(&log));
    assert!(!h.stderr().contains("primary pid"), "{}", h.stderr());
    // logrotate moves the file away, then signals.
    let rotated = dir.join("hello.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    h.signal("USR1");
    assert!(until(START, || text(&log).contains("log reopened").then_some(())).is_some());
    assert!(text(&rotated).starts_with("primary pid "));
    assert!(!text(&rotated).contains("log reopened"));
    for w in workers {
        assert!(is_alive(w), "worker {w} died of SIGUSR1");
    }
    assert_hello(&request(h.port, GET_CLOSE));
    h.stop();
    assert!(
        text(&log).contains("stopping gracefully"),
        "{:?}",
        text(&log)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn nginx_signals_make_quit_graceful_and_term_immediate() {
    let (graceful, now) = ("stopping gracefully", "stopping now");
    for (sig, how, not) in [("QUIT", graceful, now), ("TERM", now, graceful)] {
        let mut h = Hello::start(&["--workers", "2", "--signals", "nginx"]);
        h.wait_workers(2, START);
        h.signal(sig);
        let status = h.wait_exit(EXIT);
        assert!(status.is_some(), "{sig}: no exit; {}", h.stderr());
        h.wait_stderr(how, 1);
        assert!(!h.stderr().contains(not), "{sig}: {}", h.stderr());
    }
}
