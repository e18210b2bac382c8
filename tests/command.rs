//! `syncluster`, the command: plain programs in C, Python and Node
//! (`examples/workers/`) run as a cluster, each taking its socket the
//! systemd way. For each language: requests spread over the workers; HUP
//! under load fails nothing; a worker killed with SIGKILL is replaced and
//! costs only its own connections; TERM stops gracefully (exit 0, no
//! process left); a busy `--listen` address is exit 1 at once.
//!
//! The binary is cargo's (`CARGO_BIN_EXE_syncluster`); the C worker is
//! compiled with `cc` into cargo's tmp dir. Clusters run one at a time (a
//! load on 2 cores is enough), every wait is bounded, and every process a
//! test started is killed on the way out, failures included.

mod common;

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::{children_of, is_alive, kill, output_within, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_syncluster");
const DEADLINE: Duration = Duration::from_secs(20);
const SIGKILL: i32 = 9;
const SIGHUP: i32 = 1;
const SIGTERM: i32 = 15;
const SIGUSR2: i32 = 12;
/// Client threads of a load.
const CLIENTS: usize = 4;

fn workers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/workers")
}

/// `examples/workers/hello.c`, compiled once (again when the source is
/// newer), into a temporary name renamed into place.
fn c_worker() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let src = workers_dir().join("hello.c");
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("command-workers");
            std::fs::create_dir_all(&dir).unwrap();
            let bin = dir.join("hello");
            let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
            if mtime(&bin).is_some() && mtime(&bin) >= mtime(&src) {
                return bin;
            }
            let tmp = dir.join(format!("hello.{}", std::process::id()));
            let mut cc = Command::new("cc");
            cc.args(["-std=c99", "-O2", "-Wall", "-Wextra", "-o"])
                .arg(&tmp)
                .arg(&src);
            let out = output_within(cc, Duration::from_secs(60));
            assert!(
                out.status.success(),
                "cc hello.c: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::fs::rename(&tmp, &bin).unwrap();
            bin
        })
        .clone()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lang {
    C,
    Python,
    Node,
}

impl Lang {
    /// syncluster's own options for this worker, and PROGRAM ARGS.
    fn command(self) -> (Vec<&'static str>, Vec<OsString>) {
        let w = workers_dir();
        match self {
            Lang::C => (vec![], vec![c_worker().into()]),
            Lang::Python => (vec![], vec!["python3".into(), w.join("hello.py").into()]),
            // Node cannot send READY=1 (no Unix datagrams in its core).
            Lang::Node => (
                vec!["--ready-after", "400"],
                vec!["node".into(), w.join("hello.js").into()],
            ),
        }
    }
}

/// One cluster at a time: the load tests share 2 cores.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running `syncluster`, its stderr collected line by line.
struct Cluster {
    child: Child,
    pid: i32,
    port: u16,
    log: Arc<Mutex<Vec<String>>>,
    /// Every worker pid seen, killed on drop if still there.
    seen: BTreeSet<i32>,
    /// Other processes to kill on drop (a new primary of an upgrade).
    extra: Vec<i32>,
}

impl Cluster {
    fn start(lang: Lang, workers: usize, options: &[&str]) -> Cluster {
        let (own, program) = lang.command();
        let mut cmd = Command::new(BIN);
        cmd.args([
            "--workers",
            &workers.to_string(),
            "--graceful-timeout",
            "10",
        ])
        .args(own)
        .args(options);
        if !options.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.arg("--")
            .args(program)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env_remove("NOTIFY_SOCKET");
        Cluster::spawn(cmd)
    }

    fn spawn(mut cmd: Command) -> Cluster {
        let mut child = cmd.spawn().expect("spawn syncluster");
        let pid = child.id() as i32;
        let log = Arc::new(Mutex::new(Vec::new()));
        let err = child.stderr.take().unwrap();
        let sink = log.clone();
        thread::spawn(move || {
            // Read promptly: a full pipe would block the primary's (and the
            // workers') writes. Python's access log is not kept.
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if !line.contains("\"GET ") {
                    sink.lock().unwrap().push(line);
                }
            }
        });
        let mut c = Cluster {
            child,
            pid,
            port: 0,
            log,
            seen: BTreeSet::new(),
            extra: Vec::new(),
        };
        let line = c.wait_line("listening on ", DEADLINE);
        c.port = line
            .split("listening on ")
            .nth(1)
            .and_then(|rest| rest.split([';', ',']).next())
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| c.fail(&format!("no port in {line:?}")));
        c.wait_line("ready:", DEADLINE);
        c.note_workers();
        c
    }

    fn lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn count(&self, pat: &str) -> usize {
        let log = self.log.lock().unwrap();
        log.iter().filter(|l| l.contains(pat)).count()
    }

    /// Waits for a line containing `pat`; fails (with the log) past `timeout`.
    fn wait_line(&mut self, pat: &str, timeout: Duration) -> String {
        self.wait_count(pat, 1, timeout);
        self.lines().into_iter().find(|l| l.contains(pat)).unwrap()
    }

    fn wait_count(&mut self, pat: &str, n: usize, timeout: Duration) {
        let end = Instant::now() + timeout;
        while self.count(pat) < n {
            if let Ok(Some(st)) = self.child.try_wait() {
                thread::sleep(Duration::from_millis(50));
                self.fail(&format!("syncluster exited ({st}) before {n} × {pat:?}"));
            }
            if Instant::now() >= end {
                self.fail(&format!("no {n} × {pat:?} within {timeout:?}"));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn workers(&mut self) -> Vec<i32> {
        self.note_workers()
    }

    fn note_workers(&mut self) -> Vec<i32> {
        let w = children_of(self.pid);
        self.seen.extend(&w);
        w
    }

    fn signal(&self, sig: i32) {
        kill(self.pid, sig).unwrap();
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() >= end {
                return None;
            }
            self.note_workers();
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn fail(&self, msg: &str) -> ! {
        panic!(
            "{msg}\n--- syncluster's stderr:\n{}",
            self.lines().join("\n")
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.note_workers();
        let _ = self.child.kill();
        let _ = self.child.wait();
        for &pid in self.seen.iter().chain(&self.extra) {
            if is_alive(pid) {
                let _ = kill(pid, SIGKILL);
            }
        }
    }
}

/// One `GET /` on a new connection with `Connection: close`: the worker id
/// in the answer, or what went wrong.
fn get(port: u16) -> Result<u32, String> {
    let addr = ([127, 0, 0, 1], port).into();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    answer(s)
}

/// Reads an answer to its end: the worker id of a 200.
fn answer(mut s: TcpStream) -> Result<u32, String> {
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&buf);
    let status = text.split(' ').nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!("answer {text:?}"));
    }
    text.rsplit("hello from worker ")
        .next()
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| format!("no worker id in {text:?}"))
}

/// Requests from [`CLIENTS`] threads, one connection each, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<Outcome>>>,
}

#[derive(Debug)]
struct Outcome {
    started: Instant,
    result: Result<u32, String>,
}

impl Load {
    fn start(port: u16) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..CLIENTS)
            .map(|_| {
                let stop = stop.clone();
                thread::spawn(move || {
                    let mut out = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let started = Instant::now();
                        let result = get(port);
                        out.push(Outcome { started, result });
                    }
                    out
                })
            })
            .collect();
        Load { stop, threads }
    }

    fn finish(mut self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all: Vec<Outcome> = std::mem::take(&mut self.threads)
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        all.sort_by_key(|o| o.started);
        all
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn failures(outcomes: &[Outcome]) -> Vec<&Outcome> {
    outcomes.iter().filter(|o| o.result.is_err()).collect()
}

fn served_by(outcomes: &[Outcome]) -> BTreeSet<u32> {
    outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().ok().copied())
        .collect()
}

// ------------------------------------------------------------- behaviours

fn requests_are_served_by_more_than_one_worker(lang: Lang) {
    let _one = serial();
    let c = Cluster::start(lang, 2, &[]);
    let load = Load::start(c.port);
    thread::sleep(Duration::from_secs(1));
    let outcomes = load.finish();
    let by = served_by(&outcomes);
    eprintln!(
        "{lang:?}: {} requests in 1 s, served by {by:?}",
        outcomes.len()
    );
    assert!(
        failures(&outcomes).is_empty(),
        "{lang:?}: failed: {:?}",
        failures(&outcomes)
    );
    assert!(
        outcomes.len() >= 20,
        "{lang:?}: only {} requests",
        outcomes.len()
    );
    assert_eq!(
        by,
        BTreeSet::from([1, 2]),
        "{lang:?}: {} requests served by {by:?}",
        outcomes.len()
    );
}

fn hup_under_load_fails_no_request(lang: Lang) {
    let _one = serial();
    let mut c = Cluster::start(lang, 2, &[]);
    let load = Load::start(c.port);
    thread::sleep(Duration::from_millis(300));
    for round in 1..=2 {
        c.signal(SIGHUP);
        c.wait_count("reloaded", round, DEADLINE);
    }
    // The last retired worker's exit, then more load on the new ones.
    c.wait_count("ended", 4, DEADLINE);
    let old_gone = Instant::now();
    thread::sleep(Duration::from_millis(300));
    let outcomes = load.finish();
    let failed = failures(&outcomes);
    eprintln!(
        "{lang:?}: 2 reloads under load: {} requests, {} failed",
        outcomes.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{lang:?}: {} of {} requests failed across 2 reloads: {failed:?}\n{}",
        failed.len(),
        outcomes.len(),
        c.lines().join("\n")
    );
    let after: Vec<_> = outcomes.iter().filter(|o| o.started > old_gone).collect();
    let by: BTreeSet<u32> = after.iter().filter_map(|o| o.result.clone().ok()).collect();
    assert!(
        !after.is_empty() && by.iter().all(|w| [5, 6].contains(w)),
        "{lang:?}: once the old workers ended, {} requests were served by {by:?}, \
         not the second generation of replacements (5, 6)",
        after.len()
    );
    assert_eq!(c.count("died"), 0, "{lang:?}: {}", c.lines().join("\n"));
}

fn a_killed_worker_is_respawned_and_costs_only_its_own_connections(lang: Lang) {
    let _one = serial();
    let mut c = Cluster::start(lang, 2, &[]);
    let load = Load::start(c.port);
    thread::sleep(Duration::from_millis(300));
    let victim = c.workers()[0];
    let killed = Instant::now();
    kill(victim, SIGKILL).unwrap();
    c.wait_line("died: signal SIGKILL", DEADLINE);
    c.wait_line("worker 3 started", DEADLINE);
    // Serving on, replacement included.
    let end = Instant::now() + DEADLINE;
    while Instant::now() < end {
        thread::sleep(Duration::from_millis(100));
        if c.workers().len() == 2 && Instant::now() > killed + Duration::from_millis(1500) {
            break;
        }
    }
    thread::sleep(Duration::from_millis(300));
    let outcomes = load.finish();
    assert!(!is_alive(victim), "{lang:?}: the victim {victim} lives");
    assert!(
        served_by(&outcomes).contains(&3),
        "{lang:?}: the replacement (worker 3) served nothing"
    );
    // The victim held at most one connection per client thread (C and
    // Python: one at a time); nothing begun after its death may fail.
    let failed = failures(&outcomes);
    eprintln!(
        "{lang:?}: kill -9 under load: {} requests, {} failed ({:?})",
        outcomes.len(),
        failed.len(),
        failed.iter().map(|o| &o.result).collect::<Vec<_>>()
    );
    let most = if lang == Lang::Node { CLIENTS } else { 1 };
    assert!(
        failed.len() <= most,
        "{lang:?}: {} failed, more than the victim's own: {failed:?}",
        failed.len()
    );
    let late: Vec<_> = failed
        .iter()
        .filter(|o| o.started > killed + Duration::from_millis(100))
        .collect();
    assert!(
        late.is_empty(),
        "{lang:?}: requests begun after the kill failed: {late:?}"
    );
    assert!(outcomes.len() >= 20, "{lang:?}: only {}", outcomes.len());
}

fn term_stops_gracefully_with_exit_0_and_no_orphans(lang: Lang) {
    let _one = serial();
    let mut c = Cluster::start(lang, 2, &[]);
    assert!(get(c.port).is_ok());
    let pids = c.workers();
    assert_eq!(pids.len(), 2);
    // A request half sent when TERM comes: its worker finishes it.
    let mut held = TcpStream::connect(("127.0.0.1", c.port)).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    held.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n").unwrap();
    thread::sleep(Duration::from_millis(300));
    c.signal(SIGTERM);
    thread::sleep(Duration::from_millis(300));
    held.write_all(b"Connection: close\r\n\r\n").unwrap();
    let answered = answer(held);
    let status = c
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| c.fail("still running 15 s after SIGTERM"));
    assert!(
        answered.is_ok(),
        "{lang:?}: in flight at TERM: {answered:?}"
    );
    assert_eq!(status.code(), Some(0), "{lang:?}: {}", c.lines().join("\n"));
    assert!(
        wait_until(Duration::from_secs(2), || pids
            .iter()
            .all(|&p| !is_alive(p))),
        "{lang:?}: workers left behind: {:?}",
        pids.iter().filter(|&&p| is_alive(p)).collect::<Vec<_>>()
    );
    assert_eq!(c.count("stopping"), 1);
    assert_eq!(c.count("died"), 0, "{}", c.lines().join("\n"));
    assert!(
        TcpStream::connect(("127.0.0.1", c.port)).is_err(),
        "{lang:?}: the port still accepts after the exit"
    );
}

fn a_busy_listen_address_exits_1_at_once(lang: Lang) {
    let _one = serial();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (own, program) = lang.command();
    let mut cmd = Command::new(BIN);
    cmd.args(["--workers", "2", "--listen", &addr])
        .args(own)
        .arg("--")
        .args(program)
        .stdin(Stdio::null());
    let t = Instant::now();
    let out = output_within(cmd, Duration::from_secs(10));
    let took = t.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{lang:?}: {err}");
    assert!(
        err.contains(&addr) && err.contains("in use"),
        "{lang:?}: {err}"
    );
    assert!(!err.contains("started"), "{lang:?}: a worker ran: {err}");
    assert!(took < Duration::from_secs(2), "{lang:?}: took {took:?}");
}

macro_rules! per_language {
    ($($m:ident: $lang:expr;)*) => {$(
        mod $m {
            use super::*;

            #[test]
            fn requests_are_served_by_more_than_one_worker() {
                super::requests_are_served_by_more_than_one_worker($lang);
            }

            #[test]
            fn hup_under_load_fails_no_request() {
                super::hup_under_load_fails_no_request($lang);
            }

            #[test]
            fn a_killed_worker_is_respawned_and_costs_only_its_own_connections() {
                super::a_killed_worker_is_respawned_and_costs_only_its_own_connections($lang);
            }

            #[test]
            fn term_stops_gracefully_with_exit_0_and_no_orphans() {
                super::term_stops_gracefully_with_exit_0_and_no_orphans($lang);
            }

            #[test]
            fn a_busy_listen_address_exits_1_at_once() {
                super::a_busy_listen_address_exits_1_at_once($lang);
            }
        }
    )*};
}

per_language! {
    c: Lang::C;
    python: Lang::Python;
    node: Lang::Node;
}

// ------------------------------------------------------ the contract itself

#[test]
fn bad_usage_prints_usage_and_exits_2() {
    for args in [
        &[][..],
        &["--", ""],
        &["--workers", "2", "true"],
        &["--workers", "0", "--", "true"],
        &["--workers", "many", "--", "true"],
        &["--policy", "rr", "--", "true"],
        &["--listen"],
        &["--bogus", "--", "true"],
        &["--group", "root", "--", "true"],
        &["--listen", "127.0.0.1:0"],
        &["--ready-after", "-1", "--", "true"],
    ] {
        let mut cmd = Command::new(BIN);
        cmd.args(args).stdin(Stdio::null());
        let out = output_within(cmd, Duration::from_secs(10));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("usage: syncluster"), "{args:?}: {err}");
    }
    // Nothing to listen on is bad usage too; a missing PROGRAM is 127.
    let mut cmd = Command::new(BIN);
    cmd.args(["--", "true"]).env_remove("LISTEN_FDS");
    let out = output_within(cmd, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to listen on"));
    let mut cmd = Command::new(BIN);
    cmd.args(["--listen", "127.0.0.1:0", "--", "no-such-program-here"]);
    let out = output_within(cmd, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(127));
    let mut cmd = Command::new(BIN);
    cmd.arg("--help");
    let out = output_within(cmd, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("usage: syncluster"));
}

/// A worker that reports what it was given (on each connection to fd 3,
/// as JSON), and says READY=1 (after `STATUS=` and `STOPPING=1`, which
/// must go nowhere) only when SIGUSR1 comes.
const REPORTER: &str = r#"
import json, os, signal, socket
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
open(os.path.join(os.path.dirname(__file__), "blocked"), "w").close()
fds = sorted(int(f) for f in os.listdir("/proc/self/fd"))
keys = ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "SYNCLUSTER_WORKER_ID",
        "NOTIFY_SOCKET", "SYNCLUSTER_CHANNEL_FD", "WATCHDOG_USEC"]
info = {k: os.environ.get(k) for k in keys}
info["pid"] = os.getpid()
info["fds"] = fds
info["blocking"] = os.get_blocking(3)
info["addrs"] = [str(socket.socket(fileno=os.dup(3 + i)).getsockname())
                 for i in range(int(os.environ["LISTEN_FDS"]))]
signal.sigwait([signal.SIGUSR1])
to = "\0" + os.environ["NOTIFY_SOCKET"][1:]
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as n:
    n.sendto(b"STATUS=a worker speaks\nSTOPPING=1", to)
    n.sendto(b"READY=1", to)
signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
l = socket.socket(fileno=3)
while True:
    c, _ = l.accept()
    c.sendall(json.dumps(info).encode())
    c.close()
"#;

fn recv_all(sock: &UnixDatagram, wait: Duration) -> Vec<String> {
    sock.set_read_timeout(Some(wait)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.recv(&mut buf) {
        out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    out
}

#[test]
fn each_worker_gets_its_sockets_the_systemd_way_and_its_own_notify_socket() {
    let _one = serial();
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cmd-env-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let unix = dir.join("b.sock");
    let script = dir.join("reporter.py");
    std::fs::write(&script, REPORTER).unwrap();
    let systemd = UnixDatagram::bind(dir.join("notify")).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["--workers", "1", "--listen", "web=127.0.0.1:0", "--listen"])
        .arg(&unix)
        .arg("--")
        .arg("python3")
        .arg(&script)
        .env("NOTIFY_SOCKET", dir.join("notify"))
        .env("WATCHDOG_USEC", "60000000")
        .env("LISTEN_FDS", "7") // for another pid: ignored, not passed on
        .env("LISTEN_PID", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let err = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    let mut c = Cluster {
        pid: child.id() as i32,
        child,
        port: 0,
        log,
        seen: BTreeSet::new(),
        extra: Vec::new(),
    };
    let line = c.wait_line("listening on ", DEADLINE);
    c.port = line
        .split("listening on 127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split([',', ';']).next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| c.fail("no port"));
    c.wait_line("worker 1 started", DEADLINE);
    let worker = c.workers()[0];
    // The worker's NOTIFY_SOCKET is its own; a stranger's READY=1 on it
    // (this test's pid, not the worker's) counts for nothing.
    let environ = std::fs::read(format!("/proc/{worker}/environ")).unwrap();
    let notify = environ
        .split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(b"NOTIFY_SOCKET="))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_else(|| c.fail("the worker has no NOTIFY_SOCKET"));
    assert_eq!(notify, format!("@syncluster-{}-1", c.pid));
    let stranger = UnixDatagram::unbound().unwrap();
    let name = std::os::unix::net::SocketAddr::from_abstract_name(&notify.as_bytes()[1..]);
    use std::os::linux::net::SocketAddrExt;
    let name = name.unwrap();
    stranger.send_to_addr(b"READY=1", &name).unwrap();
    let early = recv_all(&systemd, Duration::from_millis(500));
    assert!(
        early.is_empty(),
        "systemd heard {early:?} before the worker was ready"
    );
    assert_eq!(c.count("ready:"), 0, "{}", c.lines().join("\n"));
    // USR1 reaches the worker, which then says STATUS=, STOPPING=1, READY=1
    // (once it blocked USR1: from then on a USR1 waits for its sigwait).
    assert!(
        wait_until(DEADLINE, || dir.join("blocked").exists()),
        "the worker never got to wait for USR1"
    );
    c.signal(10);
    c.wait_line("ready: 1 workers", DEADLINE);
    let heard = recv_all(&systemd, Duration::from_millis(500));
    assert!(
        heard.first().is_some_and(|d| d.starts_with("READY=1\n")),
        "systemd heard {heard:?}"
    );
    assert!(
        !heard
            .iter()
            .any(|d| d.contains("worker speaks") || d.contains("STOPPING")),
        "a worker's notification reached systemd: {heard:?}"
    );
    let mut s = TcpStream::connect(("127.0.0.1", c.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut report = String::new();
    s.read_to_string(&mut report).unwrap();
    let field = |k: &str| {
        let at = report
            .find(&format!("\"{k}\": "))
            .unwrap_or_else(|| panic!("{k} in {report}"));
        let rest = &report[at + k.len() + 4..];
        let end = rest.find([',', '}']).unwrap();
        rest[..end].trim().trim_matches('"').to_string()
    };
    assert_eq!(field("LISTEN_FDS"), "2", "{report}");
    assert_eq!(field("LISTEN_PID"), worker.to_string(), "{report}");
    assert_eq!(field("pid"), worker.to_string(), "{report}");
    assert_eq!(field("LISTEN_FDNAMES"), "web:unknown", "{report}");
    assert_eq!(field("SYNCLUSTER_WORKER_ID"), "1", "{report}");
    assert_eq!(field("SYNCLUSTER_CHANNEL_FD"), "null", "{report}");
    assert_eq!(field("WATCHDOG_USEC"), "null", "{report}");
    assert_eq!(field("blocking"), "true", "{report}");
    assert!(
        report.contains(&format!("\"('127.0.0.1', {})\"", c.port))
            && report.contains(&format!("\"{}\"", unix.display())),
        "the sockets, in --listen order: {report}"
    );
    // 0-2, the two sockets, and the fd that listed the directory.
    let fds_at = report.find("\"fds\": [").unwrap() + 8;
    let fds: Vec<i32> = report[fds_at..report[fds_at..].find(']').unwrap() + fds_at]
        .split(", ")
        .map(|f| f.parse().unwrap())
        .collect();
    assert_eq!(&fds[..5], &[0, 1, 2, 3, 4], "{report}");
    assert!(fds.len() <= 6, "fds leaked into the worker: {fds:?}");
    c.signal(SIGTERM);
    let st = c
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| c.fail("no exit"));
    assert_eq!(st.code(), Some(0));
    let last = recv_all(&systemd, Duration::from_millis(300));
    assert!(last.iter().any(|d| d == "STOPPING=1"), "{last:?}");
    assert!(!unix.exists() || std::fs::remove_file(&unix).is_ok());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The inode of fd 3 of `pid`: which socket it serves on.
fn fd3(pid: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/fd/3"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

#[test]
fn reuseport_gives_each_worker_its_own_socket_and_keeps_it_through_hup_and_kill() {
    let _one = serial();
    let mut c = Cluster::start(Lang::C, 2, &["--policy", "reuseport"]);
    let first: BTreeSet<String> = c.workers().into_iter().map(fd3).collect();
    assert_eq!(first.len(), 2, "one socket per worker: {first:?}");
    let load = Load::start(c.port);
    thread::sleep(Duration::from_millis(300));
    c.signal(SIGHUP);
    c.wait_line("reloaded", DEADLINE);
    c.wait_count("ended", 2, DEADLINE);
    let after: BTreeSet<String> = c.workers().into_iter().map(fd3).collect();
    assert_eq!(after, first, "the replacements took the same two sockets");
    let victim = c.workers()[0];
    let its = fd3(victim);
    let killed = Instant::now();
    kill(victim, SIGKILL).unwrap();
    c.wait_line("worker 5 started", DEADLINE);
    assert!(wait_until(DEADLINE, || c.workers().len() == 2));
    thread::sleep(Duration::from_millis(300));
    let outcomes = load.finish();
    let now: BTreeSet<String> = c.workers().into_iter().map(fd3).collect();
    assert_eq!(now, first, "the respawned worker took its slot's socket");
    assert!(now.contains(&its));
    let failed = failures(&outcomes);
    eprintln!(
        "reuseport: HUP and kill -9 under load: {} requests, {} failed",
        outcomes.len(),
        failed.len()
    );
    assert!(
        failed.len() <= 1
            && failed
                .iter()
                .all(|o| o.started < killed + Duration::from_millis(100)),
        "{failed:?}"
    );
    assert!(served_by(&outcomes).contains(&5), "worker 5 served nothing");
}

#[test]
fn usr2_upgrades_the_primary_under_load_and_keeps_the_sockets() {
    let _one = serial();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cmd-up-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pid_file = dir.join("pid");
    let pf = pid_file.to_str().unwrap().to_string();
    let mut c = Cluster::start(Lang::C, 2, &["--pid-file", &pf]);
    let old = c.pid;
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        old.to_string()
    );
    let load = Load::start(c.port);
    thread::sleep(Duration::from_millis(300));
    c.signal(SIGUSR2);
    let line = c.wait_line("upgrading: new primary pid ", DEADLINE);
    let new: i32 = line.rsplit(' ').next().unwrap().parse().unwrap();
    c.extra.push(new);
    c.wait_line("took over", DEADLINE);
    let status = c
        .wait_exit(DEADLINE)
        .unwrap_or_else(|| c.fail("the old primary stays"));
    assert_eq!(status.code(), Some(0));
    assert!(wait_until(DEADLINE, || {
        std::fs::read_to_string(&pid_file).is_ok_and(|s| s.trim() == new.to_string())
    }));
    let new_workers = children_of(new);
    c.extra.extend(&new_workers);
    assert_eq!(new_workers.len(), 2, "{}", c.lines().join("\n"));
    thread::sleep(Duration::from_millis(300));
    let outcomes = load.finish();
    let failed = failures(&outcomes);
    eprintln!(
        "USR2 under load: {} requests, {} failed",
        outcomes.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:?}\n{}", c.lines().join("\n"));
    assert!(get(c.port).is_ok());
    kill(new, SIGTERM).unwrap();
    assert!(
        wait_until(DEADLINE, || !is_alive(new)
            && new_workers.iter().all(|&w| !is_alive(w))),
        "the new primary and its workers did not stop"
    );
    assert!(!pid_file.exists(), "the pid file stays after the stop");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn as_pid_1_it_serves_stops_and_reaps_what_workers_leave_behind() {
    let _one = serial();
    // Each worker's sh leaves an orphan `sleep` (its subshell exits), which
    // the kernel hands to PID 1, syncluster, to reap when it ends.
    let hello = c_worker();
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--kill-child", BIN])
        .args(["--workers", "2", "--listen", "127.0.0.1:0", "--"])
        .args(["sh", "-c", "(sleep 0.6 &); exec \"$0\""])
        .arg(&hello)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut c = Cluster::spawn(cmd);
    // `unshare` is the child; syncluster, PID 1 inside, is its child.
    let init = children_of(c.pid)[0];
    c.extra.push(init);
    let orphans = children_of(init).len().saturating_sub(2);
    c.extra.extend(children_of(init));
    thread::sleep(Duration::from_millis(1000));
    let zombies = children_of(init)
        .into_iter()
        .filter(|&k| !is_alive(k))
        .count();
    assert_eq!(orphans, 2, "the sleeps were not PID 1's");
    assert_eq!(zombies, 0, "unreaped orphans under PID 1");
    let workers = children_of(init);
    c.extra.extend(&workers);
    assert_eq!(workers.len(), 2, "{workers:?}");
    assert!(get(c.port).is_ok());
    kill(init, SIGTERM).unwrap();
    let st = c
        .wait_exit(DEADLINE)
        .unwrap_or_else(|| c.fail("PID 1 did not stop"));
    assert!(st.success(), "{st}: {}", c.lines().join("\n"));
    assert!(workers.iter().all(|&w| !is_alive(w)));
}

#[test]
fn under_socket_activation_it_adopts_the_passed_socket() {
    let _one = serial();
    // A free port (systemd-socket-activate binds it itself).
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.args(["-l", &addr, "--fdname=web", BIN, "--workers", "2"])
        // Naming the very address adopts it rather than binding it again.
        .args(["--listen", &addr, "--"])
        .arg(c_worker())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("systemd-socket-activate");
    let err = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    let mut c = Cluster {
        pid: child.id() as i32,
        child,
        port,
        log,
        seen: BTreeSet::new(),
        extra: Vec::new(),
    };
    // It execs syncluster (same pid) at the first connection.
    c.wait_line(&format!("Listening on {addr}"), DEADLINE);
    let first = thread::spawn(move || get(port));
    c.wait_line("ready: 2 workers", DEADLINE);
    assert!(first.join().unwrap().is_ok());
    let by: BTreeSet<u32> = (0..50).filter_map(|_| get(port).ok()).collect();
    assert!(!by.is_empty());
    assert!(c.count(&format!("listening on {addr}")) == 1);
    assert_eq!(
        c.count("serving on fd 3 (web)"),
        2,
        "{}",
        c.lines().join("\n")
    );
    c.note_workers();
    c.signal(SIGTERM);
    let st = c.wait_exit(DEADLINE).unwrap_or_else(|| c.fail("no exit"));
    assert_eq!(st.code(), Some(0));
}
