// The example of README.md and of the crate docs (src/lib.rs), verbatim
// below this comment; tests/readme_example.rs checks that SIGTERM stops it.
// Change it there and here together.

use std::io::Write;
use std::time::Duration;
use syncluster::{primary::Event, Role, Signal};

fn main() -> std::io::Result<()> {
    // Workers get the primary's arguments: they listen where it was told.
    let addr = std::env::args().nth(1).unwrap_or("127.0.0.1:8000".into());
    match syncluster::role()? {
        Role::Primary(mut primary) => {
            for _ in 0..2 {
                primary.fork()?;
            }
            // `None` once every worker has exited.
            while let Some(ev) = primary.next_event()? {
                match ev {
                    Event::Listening { id, address } => {
                        eprintln!("worker {id} listens on {address}")
                    }
                    // The primary turns these into events instead of dying:
                    // stop accepting, let the workers finish, then exit.
                    Event::Signal(Signal::TERM | Signal::INT) => {
                        primary.disconnect_all(Some(Duration::from_secs(10)))?;
                    }
                    Event::Exit { id, status, .. } => eprintln!("worker {id} ended: {status}"),
                    _ => {}
                }
            }
        }
        Role::Worker(worker) => {
            let listener = worker.listen(&addr)?;
            // Ends when the primary disconnects this worker.
            for stream in listener.incoming() {
                // A client that hung up costs only its own connection.
                let _ = stream?.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
            }
        }
    }
    Ok(())
}
