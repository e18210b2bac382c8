//! The harness of the tests that run `examples/hello.rs` (or another
//! example): start it on port 0, wait for its listening line, talk HTTP to
//! it, and kill every process it started on every path, panics included
//! (see `Hello::drop`). Included with
//! `#[path = "support/hello.rs"] mod hello;`; each test uses part of it.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

#[path = "../common/mod.rs"]
pub mod common;
#[path = "example.rs"]
pub mod example;
pub use common::until;
use common::{children_of, is_alive, is_alive_as, start_time};

pub const START: Duration = Duration::from_secs(15);
pub const IO: Duration = Duration::from_secs(5);
pub const EXIT: Duration = Duration::from_secs(15);
pub const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n";
pub const GET_CLOSE: &[u8] = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";

pub fn hello_bin() -> PathBuf {
    example::example_bin("hello")
}

/// A running hello cluster: its stdout lines arrive on a channel, its stderr
/// piles up in a string.
pub struct Hello {
    child: Child,
    stdout: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    /// Every worker pid seen, with its start time: the cleanup list.
    seen: Mutex<BTreeMap<i32, u64>>,
    /// The listening line, and the port in it.
    pub listening: String,
    pub port: u16,
}

impl Hello {
    pub fn start(args: &[&str]) -> Hello {
        Hello::start_env(args, &[])
    }

    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Hello {
        let mut cmd = Command::new(hello_bin());
        cmd.args(["--port", "0"])
            .args(args)
            .envs(env.iter().copied());
        Hello::spawn(cmd)
    }

    /// hello `--port 0 args` under `ulimit -n nofile` (bash execs it: the
    /// pid is hello's).
    pub fn start_ulimit(nofile: u32, args: &[&str]) -> Hello {
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(format!("ulimit -n {nofile} && exec \"$@\""))
            .arg("bash")
            .arg(hello_bin())
            .args(["--port", "0"])
            .args(args);
        Hello::spawn(cmd)
    }

    /// Runs `cmd` (hello, or something that execs it) and waits for the
    /// listening line.
    pub fn spawn(cmd: Command) -> Hello {
        Hello::spawn_within(cmd, START)
    }

    /// [`Hello::spawn`] with its own deadline for the listening line (a
    /// server under valgrind starts slowly).
    pub fn spawn_within(cmd: Command, start: Duration) -> Hello {
        let mut hello = Hello::launch(cmd);
        // On panic here, `drop` still kills the tree.
        hello.listening = hello
            .line(start)
            .unwrap_or_else(|| panic!("no listening line; stderr: {}", hello.stderr()));
        hello.port = listening_port(&hello.listening)
            .unwrap_or_else(|| panic!("not a listening line: {:?}", hello.listening));
        hello.workers();
        hello
    }

    /// Runs `cmd` and waits for nothing.
    pub fn launch(mut cmd: Command) -> Hello {
        let mut child = cmd
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
        Hello {
            child,
            stdout,
            stderr,
            seen: Mutex::new(BTreeMap::new()),
            listening: String::new(),
            port: 0,
        }
    }

    pub fn line(&self, timeout: Duration) -> Option<String> {
        self.stdout.recv_timeout(timeout).ok()
    }

    /// The stdout lines until none comes for `timeout` (or stdout closes).
    pub fn lines(&self, timeout: Duration) -> Vec<String> {
        std::iter::from_fn(|| self.line(timeout)).collect()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn stderr_count(&self, needle: &str) -> usize {
        self.stderr().lines().filter(|l| l.contains(needle)).count()
    }

    /// Waits up to `START` until `needle` is on `count` stderr lines.
    pub fn wait_stderr(&self, needle: &str, count: usize) {
        if until(START, || (self.stderr_count(needle) >= count).then_some(())).is_none() {
            panic!(
                "{count} x {needle:?} not on stderr within {START:?}; stderr:\n{}",
                self.stderr()
            );
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Live workers now (remembered for the cleanup).
    pub fn workers(&self) -> Vec<i32> {
        let mut kids = children_of(self.pid());
        kids.retain(|&k| is_alive(k));
        let mut seen = self.seen.lock().unwrap();
        for &k in &kids {
            if let (false, Some(st)) = (seen.contains_key(&k), start_time(k)) {
                seen.insert(k, st);
            }
        }
        kids
    }

    /// The start time of worker `pid` when it was first seen.
    pub fn started(&self, pid: i32) -> Option<u64> {
        self.seen.lock().unwrap().get(&pid).copied()
    }

    /// Waits up to `timeout` until exactly `n` workers run; returns them.
    pub fn wait_workers(&self, n: usize, timeout: Duration) -> Vec<i32> {
        until(timeout, || Some(self.workers()).filter(|w| w.len() == n)).unwrap_or_else(|| {
            panic!(
                "not {n} workers within {timeout:?}: {:?}; stderr:\n{}",
                self.workers(),
                self.stderr()
            )
        })
    }

    /// The worker whose `SYNCLUSTER_WORKER_ID` is `id`, waiting up to `START`.
    pub fn worker_with_id(&self, id: u32) -> i32 {
        until(START, || {
            self.workers()
                .into_iter()
                .find(|&p| worker_id(p) == Some(id))
        })
        .unwrap_or_else(|| panic!("no worker {id}: {:?}", self.workers()))
    }

    pub fn signal(&self, sig: &str) {
        signal(self.pid(), sig);
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        until(timeout, || self.child.try_wait().expect("try_wait"))
    }

    /// SIGTERM, then every stdout line until the process exits; asserts a
    /// clean exit.
    pub fn stop(&mut self) -> Vec<String> {
        self.workers();
        self.signal("TERM");
        let status = self.wait_exit(EXIT);
        assert!(
            status.is_some_and(|s| s.success()),
            "exit after SIGTERM: {status:?}; stderr:\n{}",
            self.stderr()
        );
        self.lines(Duration::from_secs(2))
    }
}

impl Drop for Hello {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("hello's stderr:\n{}", self.stderr());
        }
        // Workers first: once the primary is gone they are no longer its
        // children. Then the primary, then the workers again (orphans).
        // Each by pid and start time: a reused pid is never hit.
        self.workers();
        let seen: Vec<(i32, u64)> = self.seen.lock().unwrap().clone().into_iter().collect();
        let kill_workers = || {
            for &(pid, st) in &seen {
                if is_alive_as(pid, Some(st)) {
                    signal(pid, "KILL");
                }
            }
        };
        kill_workers();
        let _ = self.child.kill();
        let _ = self.child.wait();
        kill_workers();
    }
}

/// `SYNCLUSTER_WORKER_ID` of a worker process.
fn worker_id(pid: i32) -> Option<u32> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|&b| b == 0).find_map(|kv| {
        let v = kv.strip_prefix(b"SYNCLUSTER_WORKER_ID=")?;
        std::str::from_utf8(v).ok()?.parse().ok()
    })
}

/// Sends `sig` (a name: TERM, KILL, ...) to exactly `pid`.
pub fn signal(pid: i32, sig: &str) {
    let _ = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

pub fn listening_port(line: &str) -> Option<u16> {
    let rest = line.strip_prefix("listening on http://127.0.0.1:")?;
    rest.split(' ').next()?.parse().ok()
}

// ---------------------------------------------------------------------------
// A tiny HTTP client.

pub fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(IO)).unwrap();
    s.set_write_timeout(Some(IO)).unwrap();
    s
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Reads one response from `s`; bytes past it stay in `buf`. `head_only`:
/// the answer to a HEAD request has no body.
pub fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>, head_only: bool) -> Response {
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

pub fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) {
    let mut chunk = [0; 4096];
    match s.read(&mut chunk) {
        Ok(0) => panic!("EOF in a response; got {:?}", String::from_utf8_lossy(buf)),
        Ok(n) => buf.extend_from_slice(&chunk[..n]),
        Err(e) => panic!("read: {e}; got {:?}", String::from_utf8_lossy(buf)),
    }
}

/// True if the server closes the connection (EOF or reset) within `IO`.
pub fn closes(s: &mut TcpStream) -> bool {
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

pub fn request(port: u16, req: &[u8]) -> Response {
    let mut s = connect(port);
    s.write_all(req).unwrap();
    read_response(&mut s, &mut Vec::new(), false)
}

pub fn assert_hello(r: &Response) {
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.head.starts_with("HTTP/1.1 200 OK\r\n"), "{r:?}");
    assert_eq!(r.header("content-type"), Some("text/plain"), "{r:?}");
    assert_eq!(r.header("content-length"), Some("12"), "{r:?}");
    assert_eq!(r.body, b"hello world\n", "{r:?}");
}

/// Runs a command (stdin null) with a 20 s deadline: status, stdout,
/// stderr; `None` if the program is missing.
pub fn run_bounded(cmd: &mut Command) -> Option<(ExitStatus, String, String)> {
    let out = match common::try_output_within(cmd.stdin(Stdio::null()), Duration::from_secs(20)) {
        Err(e) if e.kind() == ErrorKind::NotFound => return None,
        r => r.unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")),
    };
    let text = |b: Vec<u8>| String::from_utf8(b).expect("UTF-8 output");
    Some((out.status, text(out.stdout), text(out.stderr)))
}
