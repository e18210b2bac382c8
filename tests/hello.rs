//! End-to-end tests of `examples/hello.rs`: real processes, real clients,
//! port 0. Every wait has a deadline, and the hello process tree is killed
//! on every path (see `Hello::drop`).

use std::io::Write;
use std::net::Shutdown;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

#[path = "support/hello.rs"]
mod hello;
use hello::*;

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
    s.write_all(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n01234")
        .unwrap();
    thread::sleep(Duration::from_millis(50));
    s.write_all(b"56789GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
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
        b"GET / HTTP/1.1\r\nHost: t\r\nNo colon here\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n",
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
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: t\r\nX: {}\r\n\r\n",
        "a".repeat(9000)
    );
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
        until(START, || Some(hello.workers()).filter(|p| p.len() == 2)).expect("two workers");
    let victim = before[0];
    signal(victim, "KILL");
    hello.wait_stderr("forking a replacement", 1);
    let after = until(START, || {
        Some(hello.workers()).filter(|p| p.len() == 2 && !p.contains(&victim))
    });
    assert!(after.is_some(), "no replacement: {:?}", hello.workers());
    // Requests and the stop wait until the replacement listens: while it
    // joins, the library has races of its own (a connection handed over in
    // the same read as the listen reply stalls; a stop between reply and
    // `Listening` gets it killed as a protocol breaker).
    hello.wait_stderr("worker 3 is listening", 1);
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

#[test]
fn deferred_accepts_a_connection_only_once_its_request_arrived() {
    for policy in ["rr", "shared"] {
        let args = ["--workers", "1", "--policy", policy];
        let timeout = [("HELLO_READ_TIMEOUT_MS", "200")];
        // Control: accepted at once, a silent connection is cut after the
        // read timeout.
        let plain = Hello::start_env(&args, &timeout);
        let mut silent = connect(plain.port);
        silent
            .set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        assert!(closes(&mut silent), "{policy}: silent connection not cut");
        drop(plain);

        // --deferred (TCP_DEFER_ACCEPT): the kernel keeps it unaccepted, so
        // no read timeout runs, until its request comes; then it is served.
        let deferred = Hello::start_env(&[&args[..], &["--deferred"]].concat(), &timeout);
        let mut silent = connect(deferred.port);
        silent
            .set_read_timeout(Some(Duration::from_millis(1000)))
            .unwrap();
        assert!(
            !closes(&mut silent),
            "{policy} --deferred: a connection with no request was accepted (and cut)"
        );
        silent.set_read_timeout(Some(IO)).unwrap();
        silent.write_all(GET_CLOSE).unwrap();
        assert_hello(&read_response(&mut silent, &mut Vec::new(), false));
        assert_hello(&request(deferred.port, GET));
    }
}
