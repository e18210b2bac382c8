//! End-to-end tests of `examples/hello.rs`: real processes, real clients,
//! port 0. Every wait has a deadline, and the hello process tree is killed
//! on every path (see `Hello::drop`).

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
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
const EXIT: Duration = Duration::from_secs(15);
const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n";
const GET_CLOSE: &[u8] = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";

fn hello_bin() -> PathBuf {
    example::example_bin("hello")
}

/// A running hello cluster: its stdout lines arrive on a channel, its stderr
/// piles up in a string.
struct Hello {
    child: Child,
    stdout: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    /// The listening line, and the port in it.
    listening: String,
    port: u16,
}

impl Hello {
    fn start(args: &[&str]) -> Hello {
        Hello::start_env(args, &[])
    }

    fn start_env(args: &[&str], env: &[(&str, &str)]) -> Hello {
        let mut child = Command::new(hello_bin())
            .args(["--port", "0"])
            .args(args)
            .envs(env.iter().copied())
            .env_remove("SYNCLUSTER_SCHED_POLICY")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hello");
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
        let err = child.stderr.take().expect("piped stderr");
        let sink = stderr.clone();
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut hello = Hello {
            child,
            stdout,
            stderr,
            listening: String::new(),
            port: 0,
        };
        // On panic here, `drop` still kills the tree.
        hello.listening = hello
            .line(START)
            .unwrap_or_else(|| panic!("no listening line; stderr: {}", hello.stderr()));
        hello.port = listening_port(&hello.listening)
            .unwrap_or_else(|| panic!("not a listening line: {:?}", hello.listening));
        hello
    }

    fn line(&self, timeout: Duration) -> Option<String> {
        self.stdout.recv_timeout(timeout).ok()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn worker_pids(&self) -> Vec<u32> {
        let pid = self.pid();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    fn wait_stderr(&self, needle: &str) -> bool {
        until(START, || self.stderr().contains(needle).then_some(())).is_some()
    }

    fn signal(&self, sig: &str) {
        signal(self.pid(), sig);
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

    /// SIGTERM, then every stdout line until the process exits; asserts a
    /// clean exit.
    fn stop(&mut self) -> Vec<String> {
        self.signal("TERM");
        let status = self.wait_exit(EXIT);
        assert!(
            status.is_some_and(|s| s.success()),
            "exit after SIGTERM: {status:?}; stderr: {}",
            self.stderr()
        );
        let mut lines = Vec::new();
        while let Some(line) = self.line(Duration::from_secs(2)) {
            lines.push(line);
        }
        lines
    }
}

impl Drop for Hello {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("hello's stderr:\n{}", self.stderr());
        }
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

fn listening_port(line: &str) -> Option<u16> {
    let rest = line.strip_prefix("listening on http://127.0.0.1:")?;
    rest.split(' ').next()?.parse().ok()
}

fn until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// A tiny HTTP client.

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(IO)).unwrap();
    s.set_write_timeout(Some(IO)).unwrap();
    s
}

#[derive(Debug)]
struct Response {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Reads one response from `s`; bytes past it stay in `buf`. `head_only`:
/// the answer to a HEAD request has no body.
fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>, head_only: bool) -> Response {
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        fill(s, buf);
    };
    let head = String::from_utf8(buf[..end].to_vec()).expect("ASCII head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head:?}"));
    let mut r = Response {
        status,
        head,
        body: Vec::new(),
    };
    let len: usize = r
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .expect("content-length");
    let len = if head_only { 0 } else { len };
    while buf.len() < end + len {
        fill(s, buf);
    }
    r.body = buf[end..end + len].to_vec();
    buf.drain(..end + len);
    r
}

fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) {
    let mut chunk = [0; 4096];
    match s.read(&mut chunk) {
        Ok(0) => panic!("EOF in a response; got {:?}", String::from_utf8_lossy(buf)),
        Ok(n) => buf.extend_from_slice(&chunk[..n]),
        Err(e) => panic!("read: {e}; got {:?}", String::from_utf8_lossy(buf)),
    }
}

/// True if the server closes the connection (EOF or reset) within `IO`.
fn closes(s: &mut TcpStream) -> bool {
    let mut chunk = [0; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

fn request(port: u16, req: &[u8]) -> Response {
    let mut s = connect(port);
    s.write_all(req).unwrap();
    read_response(&mut s, &mut Vec::new(), false)
}

fn assert_hello(r: &Response) {
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.head.starts_with("HTTP/1.1 200 OK\r\n"), "{r:?}");
    assert_eq!(r.header("content-type"), Some("text/plain"), "{r:?}");
    assert_eq!(r.header("content-length"), Some("12"), "{r:?}");
    assert_eq!(r.body, b"hello world\n", "{r:?}");
}

/// Runs a command with a deadline: status, stdout, stderr; `None` if the
/// program is missing.
fn run_bounded(cmd: &mut Command) -> Option<(ExitStatus, String, String)> {
    let spawned = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) if e.kind() == ErrorKind::NotFound => return None,
        Err(e) => panic!("spawn {cmd:?}: {e}"),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish in time");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    Some((status, out, err))
}

/// `{"1":3,"2":4}` → [(1, 3), (2, 4)].
fn parse_served(line: &str) -> Vec<(u32, u64)> {
    let json = line.strip_prefix("served ").expect("served line");
    let inner = json
        .strip_prefix('{')
        .and_then(|j| j.strip_suffix('}'))
        .unwrap_or_else(|| panic!("not an object: {json:?}"));
    inner
        .split(',')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once(':').expect("key:value");
            let k = k.trim_matches('"').parse().expect("worker id");
            (k, v.parse().expect("count"))
        })
        .collect()
}

// ---------------------------------------------------------------------------

const PYTHON_CLIENT: &str = r#"
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=5)
for _ in range(3):
    c.request("GET", "/")
    r = c.getresponse()
    body = r.read()
    assert r.status == 200 and body == b"hello world\n", (r.status, body)
    assert r.getheader("Content-Type") == "text/plain", r.getheaders()
c.close()
print("ok")
"#;

#[test]
fn hello_prints_one_listening_line_and_serves_hello_world() {
    for policy in ["rr", "shared"] {
        let mut hello = Hello::start(&["--workers", "2", "--policy", policy]);
        let port = hello.port;
        assert_eq!(
            hello.listening,
            format!("listening on http://127.0.0.1:{port} (2 workers, {policy})")
        );
        assert_hello(&request(port, GET));

        let url = format!("http://127.0.0.1:{port}/some/path?q=1");
        match run_bounded(Command::new("curl").args(["-s", "-i", "--max-time", "10", &url])) {
            None => eprintln!("curl not found: skipping the curl check"),
            Some((status, out, err)) => {
                assert!(status.success(), "curl: {status}: {err}");
                assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
                assert!(out.ends_with("\r\n\r\nhello world\n"), "{out}");
            }
        }
        let port_arg = port.to_string();
        match run_bounded(Command::new("python3").args(["-c", PYTHON_CLIENT, &port_arg])) {
            None => eprintln!("python3 not found: skipping the http.client check"),
            Some((status, out, err)) => {
                assert!(
                    status.success() && out.trim() == "ok",
                    "python3: {out}{err}"
                )
            }
        }

        // Exactly one listening line: nothing but the served line follows.
        let rest = hello.stop();
        assert_eq!(rest.len(), 1, "{rest:?}");
        assert!(rest[0].starts_with("served {"), "{rest:?}");
    }
}

#[test]
fn keep_alive_and_pipelining_answer_in_order() {
    let hello = Hello::start(&["--workers", "2"]);
    let mut s = connect(hello.port);
    let mut buf = Vec::new();
    // GET, a POST with a body to discard, HEAD: in one write. A HEAD answer
    // has no body, so answers out of order would not parse as expected.
    s.write_all(
        b"GET /1 HTTP/1.1\r\nHost: t\r\n\r\n\
          POST /2 HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nabcde\
          HEAD /3 HTTP/1.1\r\nHost: t\r\n\r\n",
    )
    .unwrap();
    let first = read_response(&mut s, &mut buf, false);
    assert_hello(&first);
    assert_eq!(first.header("connection"), Some("keep-alive"));
    assert_hello(&read_response(&mut s, &mut buf, false));
    let head = read_response(&mut s, &mut buf, true);
    assert_eq!(
        (head.status, head.header("content-length")),
        (200, Some("12"))
    );

    // A body split across writes, then a request in the same segment.
    s.write_all(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n01234")
        .unwrap();
    thread::sleep(Duration::from_millis(50));
    s.write_all(b"56789GET / HTTP/1.1\r\n\r\n").unwrap();
    assert_hello(&read_response(&mut s, &mut buf, false));
    assert_hello(&read_response(&mut s, &mut buf, false));

    // More pipelined requests than the server buffers answers for at once.
    const N: usize = 2000;
    s.write_all(&GET.repeat(N)).unwrap();
    for i in 0..N {
        let r = read_response(&mut s, &mut buf, false);
        assert_eq!((i, r.status, r.body.len()), (i, 200, 12));
    }

    // The connection is still open; `Connection: close` ends it.
    s.write_all(GET_CLOSE).unwrap();
    let last = read_response(&mut s, &mut buf, false);
    assert_hello(&last);
    assert_eq!(last.header("connection"), Some("close"));
    assert!(buf.is_empty(), "extra bytes: {buf:?}");
    assert!(closes(&mut s), "still open after Connection: close");
}

#[test]
fn http10_without_keep_alive_closes() {
    let hello = Hello::start(&["--workers", "2"]);
    let mut s = connect(hello.port);
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let r = read_response(&mut s, &mut Vec::new(), false);
    assert_hello(&r);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(closes(&mut s), "HTTP/1.0 connection left open");

    // HTTP/1.0 that asks for keep-alive keeps it.
    let mut s = connect(hello.port);
    let mut buf = Vec::new();
    for _ in 0..2 {
        s.write_all(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap();
        let r = read_response(&mut s, &mut buf, false);
        assert_hello(&r);
        assert_eq!(r.header("connection"), Some("keep-alive"));
    }
}

#[test]
fn garbage_and_stalled_clients_cost_only_their_connection() {
    // One worker: the stalled client and the others share its loop.
    let hello = Hello::start_env(&["--workers", "1"], &[("HELLO_READ_TIMEOUT_MS", "300")]);
    let port = hello.port;

    let mut stalled = connect(port);
    stalled.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n").unwrap();
    let stalled_at = Instant::now();
    let mut idle = connect(port);
    idle.write_all(GET).unwrap();
    assert_hello(&read_response(&mut idle, &mut Vec::new(), false));

    for garbage in [
        &b"\x00\x01\x02 nonsense\r\n\r\n"[..],
        b"GET /\r\n\r\n",
        b"GET / HTTP/1.1 extra\r\n\r\n",
        b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    ] {
        let mut s = connect(port);
        s.write_all(garbage).unwrap();
        let r = read_response(&mut s, &mut Vec::new(), false);
        assert_eq!(r.status, 400, "{garbage:?} → {r:?}");
        assert_eq!(r.header("connection"), Some("close"));
        assert!(closes(&mut s), "{garbage:?}: left open");
        // Meanwhile others are served.
        assert_hello(&request(port, GET));
    }

    let mut big = connect(port);
    let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000));
    let _ = big.write_all(huge.as_bytes());
    let r = read_response(&mut big, &mut Vec::new(), false);
    assert_eq!(r.status, 431, "{r:?}");
    assert!(closes(&mut big));

    // The stalled and the idle client are cut after the read timeout.
    assert!(closes(&mut stalled), "stalled client not cut");
    let waited = stalled_at.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "cut too early: {waited:?}"
    );
    assert!(closes(&mut idle), "idle keep-alive client not cut");
    assert_hello(&request(port, GET));
}

#[test]
fn bad_flags_print_usage_and_exit_2() {
    let bad: &[&[&str]] = &[
        &["--bogus"],
        &["--workers", "0"],
        &["--workers", "x"],
        &["--port", "70000"],
        &["--policy", "fast"],
        &["--port"],
        &["--host", "not a host"],
    ];
    for args in bad {
        let (status, out, err) = run_bounded(Command::new(hello_bin()).args(*args)).unwrap();
        assert_eq!(status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("usage: hello"), "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?}: {out}");
    }
    let (status, out, _) = run_bounded(Command::new(hello_bin()).arg("--help")).unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(out.starts_with("usage: hello"), "{out}");
}

#[test]
fn killed_worker_is_replaced() {
    let mut hello = Hello::start(&["--workers", "2"]);
    let before =
        until(START, || Some(hello.worker_pids()).filter(|p| p.len() == 2)).expect("two workers");
    let victim = before[0];
    signal(victim, "KILL");
    assert!(
        hello.wait_stderr("forking a replacement"),
        "{}",
        hello.stderr()
    );
    let after = until(START, || {
        Some(hello.worker_pids()).filter(|p| p.len() == 2 && !p.contains(&victim))
    });
    assert!(after.is_some(), "no replacement: {:?}", hello.worker_pids());
    // Requests and the stop wait until the replacement listens: while it
    // joins, the library has races of its own (a connection handed over in
    // the same read as the listen reply stalls; a stop between reply and
    // `Listening` gets it killed as a protocol breaker).
    assert!(
        hello.wait_stderr("worker 3 is listening"),
        "{}",
        hello.stderr()
    );
    for _ in 0..6 {
        assert_hello(&request(hello.port, GET_CLOSE));
    }
    // No second listening line; the replacement reports too.
    let rest = hello.stop();
    assert_eq!(rest.len(), 1, "{rest:?}");
    let served = parse_served(&rest[0]);
    assert!(served.iter().any(|&(id, _)| id == 3), "{served:?}");
}

#[test]
fn sigterm_prints_served_counts_and_exits_0() {
    const K: u64 = 10;
    for policy in ["rr", "shared"] {
        let mut hello = Hello::start(&["--workers", "2", "--policy", policy]);
        for _ in 0..K {
            let mut s = connect(hello.port);
            s.write_all(GET_CLOSE).unwrap();
            assert_hello(&read_response(&mut s, &mut Vec::new(), false));
            assert!(closes(&mut s));
            s.shutdown(Shutdown::Both).ok();
        }
        let rest = hello.stop();
        assert_eq!(rest.len(), 1, "{rest:?}");
        let served = parse_served(&rest[0]);
        let ids: Vec<u32> = served.iter().map(|&(id, _)| id).collect();
        assert_eq!(ids, [1, 2], "{policy}: {}", rest[0]);
        let total: u64 = served.iter().map(|&(_, n)| n).sum();
        assert_eq!(total, K, "{policy}: {}", rest[0]);
    }
}
