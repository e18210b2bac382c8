//! End-to-end test of `examples/request_counter.rs`: real processes, real
//! clients, port 0. Every wait has a deadline, and the process tree is
//! killed on every path (see `Counter::drop`).

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

#[path = "support/example.rs"]
mod example;
const START: Duration = Duration::from_secs(15);
const IO: Duration = Duration::from_secs(5);
/// The primary prints every second: the count must be right within this.
const COUNTED: Duration = Duration::from_secs(5);
const EXIT: Duration = Duration::from_secs(15);
const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n";
const GET_CLOSE: &[u8] = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";

fn bin() -> PathBuf {
    example::example_bin("request_counter")
}

/// A running request_counter: stdout lines arrive on a channel, stderr
/// piles up in a string.
struct Counter {
    child: Child,
    stdout: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    /// Every stdout line received so far, for failure messages.
    log: Vec<String>,
}

impl Counter {
    fn start(args: &[&str]) -> Counter {
        let mut child = Command::new(bin())
            .args(args)
            .env_remove("SYNCLUSTER_SCHED_POLICY")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn request_counter");
        let (tx, stdout) = mpsc::channel();
        let out = child.stdout.take().expect("piped stdout");
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let (err, sink) = (child.stderr.take().expect("piped stderr"), stderr.clone());
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Counter {
            child,
            stdout,
            stderr,
            log: Vec::new(),
        }
    }

    /// The next stdout line before `deadline`.
    fn line(&mut self, deadline: Instant) -> Option<String> {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = self.stdout.recv_timeout(left).ok()?;
        self.log.push(line.clone());
        Some(line)
    }

    /// Reads lines until one satisfies `f`, or panics at the deadline.
    fn wait_for<T>(&mut self, within: Duration, mut f: impl FnMut(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + within;
        while let Some(line) = self.line(deadline) {
            if let Some(v) = f(&line) {
                return v;
            }
        }
        panic!("no such line in {within:?}: {self}");
    }

    fn worker_pids(&self) -> Vec<u32> {
        let pid = self.child.id();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl std::fmt::Display for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let stderr = self.stderr.lock().unwrap();
        write!(f, "stdout: {:?}; stderr: {stderr}", self.log)
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        // Workers first: once the primary is gone they are no longer its
        // children and we could not find them.
        for pid in self.worker_pids() {
            signal(pid, "KILL");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

fn num_reqs(line: &str) -> Option<u64> {
    line.strip_prefix("numReqs = ")?.parse().ok()
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(IO)).unwrap();
    s.set_write_timeout(Some(IO)).unwrap();
    s
}

/// Reads one hello-world response; bytes past it stay in `buf`.
fn read_hello(s: &mut TcpStream, buf: &mut Vec<u8>) {
    const BODY: &[u8] = b"\r\n\r\nhello world\n";
    let end = loop {
        if let Some(i) = buf.windows(BODY.len()).position(|w| w == BODY) {
            break i + BODY.len();
        }
        let mut chunk = [0; 4096];
        match s.read(&mut chunk) {
            Ok(0) => panic!("EOF in a response: {:?}", String::from_utf8_lossy(buf)),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("read: {e}; got {:?}", String::from_utf8_lossy(buf)),
        }
    };
    assert!(buf.starts_with(b"HTTP/1.1 200 OK\r\n"), "{buf:?}");
    buf.drain(..end);
}

/// True if the server closes the connection (EOF or reset) within `IO`.
fn closes(s: &mut TcpStream) -> bool {
    let mut chunk = [0; 64];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn counts_every_request_and_prints_the_total_on_sigterm() {
    let mut counter = Counter::start(&["--port", "0", "--workers", "2"]);
    // numReqs lines may come first: Node starts its interval before forking.
    let port = counter.wait_for(START, |line| {
        let rest = line.strip_prefix("listening on http://127.0.0.1:")?;
        let (port, workers) = rest.split_once(' ')?;
        assert_eq!(workers, "(2 workers)", "{line}");
        port.parse::<u16>().ok()
    });

    let mut k = 0;
    // Keep-alive: three connections, four requests each, one at a time.
    let mut kept: Vec<TcpStream> = (0..3).map(|_| connect(port)).collect();
    for _ in 0..4 {
        for s in &mut kept {
            s.write_all(GET).unwrap();
            read_hello(s, &mut Vec::new());
            k += 1;
        }
    }
    // Pipelined: five requests in one write on one connection.
    let mut s = connect(port);
    s.write_all(&GET.repeat(5)).unwrap();
    let mut buf = Vec::new();
    for _ in 0..5 {
        read_hello(&mut s, &mut buf);
        k += 1;
    }
    // Connection: close, each on its own connection.
    for _ in 0..6 {
        let mut s = connect(port);
        s.write_all(GET_CLOSE).unwrap();
        read_hello(&mut s, &mut Vec::new());
        assert!(closes(&mut s), "still open after Connection: close");
        k += 1;
    }
    // A request the server refuses is not a request served.
    let mut bad = connect(port);
    bad.write_all(b"nonsense\r\n\r\n").unwrap();
    assert!(closes(&mut bad), "garbage request left open");
    drop(bad); // or the stop waits for its linger to time out

    // The count only grows, and reaches exactly k within a few seconds.
    counter.wait_for(COUNTED, |line| {
        let n = num_reqs(line)?;
        assert!(n <= k, "counted {n} of {k} requests: {line}");
        (n == k).then_some(())
    });

    // Idle keep-alive connections are closed by the graceful stop.
    signal(counter.child.id(), "TERM");
    let status = counter.wait_exit(EXIT);
    assert!(
        status.is_some_and(|s| s.success()),
        "exit after SIGTERM: {status:?}; {counter}"
    );
    for s in &mut kept {
        assert!(closes(s), "keep-alive connection left open after the stop");
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while counter.line(deadline).is_some() {}
    let last = counter.log.last().map(String::as_str);
    assert_eq!(last, Some(&*format!("numReqs = {k}")), "{counter}");
    let stderr = counter.stderr.lock().unwrap().clone();
    assert!(!stderr.contains("died"), "{stderr}");
}

#[test]
fn bad_flags_print_usage_and_exit_2() {
    for args in [&["--bogus"][..], &["--workers", "0"], &["--port", "70000"]] {
        let mut child = Command::new(bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn request_counter");
        let deadline = Instant::now() + IO;
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{args:?}: still running");
            }
            thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        let _ = child.stderr.take().unwrap().read_to_string(&mut err);
        assert_eq!(status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("usage: request_counter"), "{args:?}: {err}");
    }
}
