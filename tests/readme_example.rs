//! The example of README.md and src/lib.rs, built from its verbatim copy
//! `examples/readme.rs`: it serves, and SIGTERM (what `docker stop` and
//! `systemctl stop` send) stops it with exit 0 while clients are served,
//! instead of hanging until SIGKILL.

use std::io::{ErrorKind, Read};
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

#[path = "support/hello.rs"]
mod hello;
use hello::{until, Hello, IO, START};

/// One connection: the example answers without reading, then closes.
fn get(port: u16) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(IO))?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)?;
    Ok(answer)
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";

#[test]
fn readme_example_serves_and_stops_with_exit_0_on_sigterm() {
    let mut cmd = Command::new(hello::example::example_bin("readme"));
    cmd.arg("127.0.0.1:0");
    // Its process tree is killed on every path.
    let mut readme = Hello::launch(cmd);
    // Both workers listen, on the one port the primary bound.
    let lines = until(START, || {
        let lines: Vec<String> = readme.stderr().lines().take(2).map(str::to_owned).collect();
        (lines.len() == 2).then_some(lines)
    })
    .expect("two `listens on` lines");
    let mut port = None;
    for line in lines {
        let p: u16 = line
            .split_once(" listens on 127.0.0.1:")
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or_else(|| panic!("not a listening line: {line:?}"));
        if let Some(q) = port {
            assert_eq!(q, p, "two ports");
        }
        port = Some(p);
    }
    let port = port.unwrap();
    assert_eq!(get(port).expect("GET"), OK);

    // Clients keep coming while it stops.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let client = {
        let (stop, served) = (stop.clone(), served.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match get(port) {
                    Ok(answer) => {
                        assert_eq!(answer, OK, "a wrong or cut answer");
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    // Refused once the listener is closed, or reset if
                    // it closed with the connection in its backlog.
                    Err(e)
                        if matches!(
                            e.kind(),
                            ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset
                        ) => {}
                    Err(e) => panic!("client: {e}"),
                }
            }
        })
    };
    until(START, || {
        (served.load(Ordering::Relaxed) >= 20).then_some(())
    })
    .expect("served while the client runs");

    let workers = readme.workers();
    assert_eq!(workers.len(), 2, "{workers:?}");
    readme.signal("TERM");
    let sent = Instant::now();
    let status = readme.wait_exit(Duration::from_secs(2));
    let took = sent.elapsed();
    stop.store(true, Ordering::Relaxed);
    client.join().expect("client thread");
    let status = status.unwrap_or_else(|| panic!("still running 2 s after SIGTERM"));
    assert_eq!(status.code(), Some(0), "after {took:?}");
    // The primary reaped its workers before it returned.
    for pid in workers {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "worker {pid} outlived the primary"
        );
    }
}

/// README.md and the crate docs show exactly the code this test runs.
#[test]
fn readme_and_crate_docs_show_examples_readme_verbatim() {
    let root = env!("CARGO_MANIFEST_DIR");
    let read = |p: &str| std::fs::read_to_string(format!("{root}/{p}")).expect(p);
    let ex = read("examples/readme.rs");
    let code = &ex[ex
        .find("use std::io::Write;")
        .expect("the example's first line")..];
    assert!(
        read("README.md").contains(code.trim_end()),
        "README.md's example differs from examples/readme.rs"
    );
    let lib: String = read("src/lib.rs")
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        lib.contains(code.trim_end()),
        "src/lib.rs's example differs from examples/readme.rs"
    );
}
