//! The supervisor fails fast at startup, seen through `examples/hello.rs`:
//! a port it cannot listen on and a worker count the machine cannot hold
//! end it at once with a message, where it used to respawn or fork for
//! ever; and the exit statuses hello documents hold.

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

#[path = "support/hello.rs"]
mod hello;
use hello::*;

#[test]
fn busy_port_fails_startup_within_2s_naming_the_address() {
    let held = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = held.local_addr().unwrap().to_string();
    let port = held.local_addr().unwrap().port().to_string();
    for policy in ["rr", "shared"] {
        let began = Instant::now();
        let (status, out, err) = run_bounded(Command::new(hello_bin()).args([
            "--workers",
            "2",
            "--port",
            &port,
            "--policy",
            policy,
        ]))
        .expect("hello runs");
        let took = began.elapsed();
        assert_eq!(status.code(), Some(1), "{policy}: {err}");
        assert!(took < Duration::from_secs(2), "{policy}: took {took:?}");
        assert!(err.contains(&addr), "{policy}: no {addr} in: {err}");
        // The library's own error: hello's primary binds before any fork
        // (`Primary::listen`), so one try and no worker.
        assert!(
            err.contains(&format!("listen on {addr}: Address already in use")),
            "{policy}: {err}"
        );
        assert_eq!(
            err.matches("Address already in use").count(),
            1,
            "{policy}: {err}"
        );
        assert!(!err.contains("worker"), "{policy}: {err}");
        assert!(out.is_empty(), "{policy}: {out}");
    }
}

#[test]
fn a_worker_count_beyond_the_limits_is_refused_at_once() {
    let began = Instant::now();
    let (status, out, err) =
        run_bounded(Command::new(hello_bin()).args(["--workers", "100000", "--port", "0"]))
            .expect("hello runs");
    let took = began.elapsed();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(err.contains("cannot run 100000 workers: "), "{err}");
    assert!(
        ["RLIMIT_NPROC", "RLIMIT_NOFILE", "4096"]
            .iter()
            .any(|limit| err.contains(limit)),
        "names no limit: {err}"
    );
    assert!(out.is_empty(), "{out}");
}

#[test]
fn sigttin_beyond_the_fd_limit_is_refused_and_the_cluster_keeps_serving() {
    // The primary needs 16 fds plus 2 per worker: 24 hold 4 workers, not 5.
    let (status, _, err) = run_bounded(Command::new("bash").args([
        "-c",
        "ulimit -n 24 && exec \"$@\"",
        "bash",
        hello_bin().to_str().unwrap(),
        "--workers",
        "5",
        "--port",
        "0",
    ]))
    .expect("bash runs");
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot run 5 workers: ") && err.contains("RLIMIT_NOFILE is 24"),
        "{err}"
    );

    let mut hello = Hello::start_ulimit(24, &["--workers", "4"]);
    hello.signal("TTIN");
    hello.wait_stderr("not scaling up: cannot run 5 workers", 1);
    assert!(!hello.stderr().contains("Scaled"), "{}", hello.stderr());
    assert_eq!(hello.workers().len(), 4);
    for _ in 0..4 {
        assert_hello(&request(hello.port, GET_CLOSE));
    }
    // TTOU then TTIN: back to 4, which fits.
    hello.signal("TTOU");
    hello.wait_stderr("Scaled { workers: 3 }", 1);
    hello.signal("TTIN");
    hello.wait_stderr("Scaled { workers: 4 }", 1);
    hello.stop();
}

/// hello's docs: 0 after a stop by signal, 1 when it cannot start, 2 for
/// bad arguments.
#[test]
fn documented_exit_statuses_hold() {
    let mut hello = Hello::start(&["--workers", "1"]);
    hello.signal("INT");
    let status = hello.wait_exit(EXIT).expect("exit after SIGINT");
    assert_eq!(status.code(), Some(0), "{}", hello.stderr());

    let held = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = held.local_addr().unwrap().port().to_string();
    let (status, _, err) =
        run_bounded(Command::new(hello_bin()).args(["--workers", "1", "--port", &port])).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");

    let (status, _, err) =
        run_bounded(Command::new(hello_bin()).args(["--workers", "-1"])).unwrap();
    assert_eq!(status.code(), Some(2), "{err}");
    let (status, _, err) = run_bounded(
        Command::new(hello_bin())
            .args(["--port", "0"])
            .env("HELLO_READ_TIMEOUT_MS", "soon"),
    )
    .unwrap();
    assert_eq!(status.code(), Some(2), "{err}");
}
