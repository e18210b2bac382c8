//! The HTTP server of `examples/hello.rs` against hostile clients: one that
//! pipelines and never reads, requests without or with two Host fields or
//! with control characters, and bodies that stall or trickle. Each costs
//! only its own connection, within a stated bound, while an honest client
//! on the same worker keeps getting 200s.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

#[path = "support/hello.rs"]
mod hello;
use hello::*;

/// `VmRSS` of a process, in KiB.
fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// An honest keep-alive client that asks every 20 ms until stopped, on a
/// connection of its own; returns how many 200s it got. Any other outcome
/// panics the thread, and so the test.
struct Honest {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<usize>>,
}

impl Honest {
    fn start(port: u16) -> Honest {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let mut s = connect(port);
            let mut buf = Vec::new();
            let mut ok = 0;
            while !flag.load(Ordering::Relaxed) {
                s.write_all(GET).expect("honest client: write");
                let r = read_response(&mut s, &mut buf, false);
                assert_hello(&r);
                ok += 1;
                thread::sleep(Duration::from_millis(20));
            }
            ok
        });
        Honest {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().expect("joined once").join() {
            Ok(n) => n,
            Err(p) => std::panic::resume_unwind(p),
        }
    }
}

impl Drop for Honest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The only worker of a `--workers 1` hello.
fn only_worker(hello: &Hello) -> i32 {
    until(START, || match hello.workers()[..] {
        [pid] => Some(pid),
        _ => None,
    })
    .expect("one worker")
}

/// The status of the answer to `req`, sent on a fresh connection, which the
/// server must then close.
fn status_of(port: u16, req: &[u8]) -> u16 {
    let mut s = connect(port);
    s.write_all(req).unwrap();
    let r = read_response(&mut s, &mut Vec::new(), false);
    if r.status != 200 {
        assert_eq!(r.header("connection"), Some("close"), "{req:?}: {r:?}");
        assert!(closes(&mut s), "{req:?}: left open after {}", r.status);
    }
    r.status
}

/// Waits up to `limit` for the server to close `s` (EOF, reset, or a write
/// that fails), writing one byte of `trickle` every 100 ms meanwhile if
/// given. Returns when it closed.
fn closed_within(s: &mut TcpStream, limit: Duration, trickle: bool) -> Option<Duration> {
    let began = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut chunk = [0; 1024];
    while began.elapsed() < limit {
        if trickle && s.write_all(b"x").is_err() {
            return Some(began.elapsed());
        }
        match s.read(&mut chunk) {
            Ok(0) => return Some(began.elapsed()),
            Ok(n) => panic!(
                "unexpected answer: {:?}",
                String::from_utf8_lossy(&chunk[..n])
            ),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Some(began.elapsed()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    None
}

// ---------------------------------------------------------------------------

/// Growth of the worker's RSS allowed while one client floods it: the
/// connection's buffers are bounded (16 KiB of input, 64 KiB of unsent
/// output, plus allocator slack), so 8 MiB is generous. Before the bound,
/// this flood took a worker from 2.5 MB to 1 GB in 4 s.
const RSS_GROWTH_KIB: u64 = 8 * 1024;

#[test]
fn pipelining_client_that_never_reads_gets_backpressure_not_memory() {
    let hello = Hello::start(&["--workers", "1"]);
    let worker = only_worker(&hello);
    // Warm up the worker's allocator with a few connections first.
    for _ in 0..5 {
        assert_hello(&request(hello.port, GET_CLOSE));
    }
    let before = rss_kib(worker).expect("worker RSS");
    let honest = Honest::start(hello.port);

    // Pipeline GETs for 3 s and never read. `write` (not `write_all`)
    // keeps the stream whole: a timed-out write sent a prefix, and the
    // next one goes on from there.
    let mut flood = connect(hello.port);
    flood
        .set_write_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let requests = GET.repeat(2048);
    let (mut pos, mut sent, mut sent_at_2s, mut peak) = (0, 0u64, None, before);
    let began = Instant::now();
    while began.elapsed() < Duration::from_secs(3) {
        match flood.write(&requests[pos..]) {
            Ok(n) => {
                pos = (pos + n) % requests.len();
                sent += n as u64;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("flood write: {e} after {sent} bytes"),
        }
        if sent_at_2s.is_none() && began.elapsed() >= Duration::from_secs(2) {
            sent_at_2s = Some(sent);
        }
        peak = peak.max(rss_kib(worker).expect("worker RSS"));
    }
    let sent_at_2s = sent_at_2s.expect("ran 3 s");
    let after = rss_kib(worker).expect("worker RSS");
    eprintln!(
        "worker RSS {before} KiB -> peak {peak} KiB, {after} KiB after; flood sent {sent} bytes, {} in its last second",
        sent - sent_at_2s
    );
    assert!(
        peak <= before + RSS_GROWTH_KIB,
        "worker RSS grew from {before} KiB to {peak} KiB"
    );
    // Backpressure: once the socket buffers are full, the server reads no
    // more of it.
    assert_eq!(sent, sent_at_2s, "the server kept reading the flood");
    let ok = honest.finish();
    assert!(ok >= 20, "honest client got only {ok} answers in 3 s");

    // The flooder is still served once it reads: answers in order, whole.
    let mut buf = Vec::new();
    for i in 0..100 {
        let r = read_response(&mut flood, &mut buf, false);
        assert_eq!((i, r.status, r.body.len()), (i, 200, 12));
    }
    drop(flood);
    assert_hello(&request(hello.port, GET_CLOSE));
}

#[test]
fn host_must_be_there_once_in_http11() {
    let hello = Hello::start(&["--workers", "1"]);
    let port = hello.port;
    let honest = Honest::start(port);
    for (req, want) in [
        (&b"GET / HTTP/1.1\r\n\r\n"[..], 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nhost: a\r\nX: y\r\nHOST: b\r\n\r\n", 400),
        (b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
        // Fine: HTTP/1.0 needs no Host; an empty one is allowed; a port,
        // an IPv6 literal.
        (b"GET / HTTP/1.0\r\n\r\n", 200),
        (b"GET / HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n", 200),
        (b"GET / HTTP/1.1\r\nHost: example.com:8080\r\n\r\n", 200),
        (b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n", 200),
    ] {
        assert_eq!(
            status_of(port, req),
            want,
            "{}",
            String::from_utf8_lossy(req)
        );
    }

    // The same with Python's http.client, which sends its own Host unless
    // told not to.
    let script = r#"
import http.client, sys
def status(hosts):
    c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=5)
    c.putrequest("GET", "/", skip_host=True)
    for h in hosts:
        c.putheader("Host", h)
    c.endheaders()
    r = c.getresponse()
    r.read()
    c.close()
    return r.status
print(status([]), status(["a", "b"]), status(["a"]))
"#;
    let port_arg = port.to_string();
    match run_bounded(Command::new("python3").args(["-c", script, &port_arg])) {
        None => eprintln!("python3 not found: skipping the http.client check"),
        Some((status, out, err)) => {
            assert!(status.success(), "python3: {out}{err}");
            assert_eq!(out.trim(), "400 400 200", "{err}");
        }
    }
    assert!(honest.finish() > 0);
}

#[test]
fn control_characters_in_a_header_value_are_a_400() {
    let hello = Hello::start(&["--workers", "1"]);
    let port = hello.port;
    for value in [
        &b"a\x01b"[..],
        b"a\rb",
        b"\x00",
        b"a\x1bb",
        b"a\x7f",
        b"\x0b",
    ] {
        let mut req = b"GET / HTTP/1.1\r\nHost: t\r\nX-Test: ".to_vec();
        req.extend_from_slice(value);
        req.extend_from_slice(b"\r\n\r\n");
        assert_eq!(status_of(port, &req), 400, "value {value:?}");
    }
    // HTAB and bytes above 0x7f (obs-text) are field content.
    assert_eq!(
        status_of(
            port,
            b"GET / HTTP/1.1\r\nHost: t\r\nX-Test: a\tb \xe9\r\n\r\n"
        ),
        200
    );
    assert_hello(&request(port, GET));
}

#[test]
fn bodies_that_stall_or_trickle_are_cut_within_the_bound() {
    // Read timeout 500 ms: a body must keep coming (500 ms between bytes)
    // and at 1 KiB/s on average, its clock starting at the end of the head.
    const TIMEOUT: Duration = Duration::from_millis(500);
    const BOUND: Duration = Duration::from_millis(1500);
    let hello = Hello::start_env(&["--workers", "1"], &[("HELLO_READ_TIMEOUT_MS", "500")]);
    let port = hello.port;
    let honest = Honest::start(port);
    let head = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n";

    // Stalls: 10 bytes, then nothing.
    let mut stall = connect(port);
    stall.write_all(head).unwrap();
    stall.write_all(b"0123456789").unwrap();
    let cut = closed_within(&mut stall, BOUND, false).expect("stalled body not cut");
    assert!(
        cut >= TIMEOUT - Duration::from_millis(100),
        "cut early: {cut:?}"
    );

    // Trickles: a byte every 100 ms, never 500 ms apart, so only the rate
    // bound cuts it (before it, every byte pushed the deadline on).
    let mut trickle = connect(port);
    trickle.write_all(head).unwrap();
    let cut = closed_within(&mut trickle, BOUND, true).expect("trickling body not cut");
    assert!(
        cut >= TIMEOUT - Duration::from_millis(100),
        "cut early: {cut:?}"
    );

    // An honest upload at full speed passes and is answered.
    let mut upload = connect(port);
    upload.write_all(head).unwrap();
    upload.write_all(&vec![b'x'; 100_000]).unwrap();
    assert_hello(&read_response(&mut upload, &mut Vec::new(), false));

    assert!(honest.finish() > 0);
}
