//! The example of README.md and src/lib.rs, built from its verbatim copy
//! `examples/readme.rs`: it serves, and SIGTERM (what `docker stop` and
//! `systemctl stop` send) stops it with exit 0 while clients are served,
//! instead of hanging until SIGKILL.

use std::io::{BufRead, BufReader, ErrorKind, Read};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

#[path = "support/hello.rs"]
mod hello;
use hello::{signal, until, IO, START};

/// The running example; its process tree is killed on every path.
struct Readme {
    child: Child,
    stderr: mpsc::Receiver<String>,
}

impl Readme {
    fn start() -> Readme {
        let mut child = Command::new(hello::example::example_bin("readme"))
            .arg("127.0.0.1:0")
            .env_remove("SYNCLUSTER_SCHED_POLICY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the readme example");
        let (tx, stderr) = mpsc::channel();
        let err = child.stderr.take().expect("piped stderr");
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Readme { child, stderr }
    }

    fn workers(&self) -> Vec<u32> {
        let pid = self.child.id();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Drop for Readme {
    fn drop(&mut self) {
        for pid in self.workers() {
            signal(pid, "KILL");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
    let mut readme = Readme::start();
    // Both workers listen, on the one port the primary bound.
    let mut port = None;
    for _ in 0..2 {
        let line = readme
            .stderr
            .recv_timeout(START)
            .expect("a `listens on` line");
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
    signal(readme.child.id(), "TERM");
    let sent = Instant::now();
    let status = until(Duration::from_secs(2), || readme.child.try_wait().unwrap());
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
