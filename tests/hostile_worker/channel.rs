//! What a worker can make the primary hold through its channel (issue 9
//! §3): the send queue to a worker that never reads, fds sent where no frame
//! announces them, a header's announced length, and oversized messages.
//! One test per item; figures go to stderr (`--nocapture` shows them).

use std::time::Duration;

use crate::common::{count_fds, exact, pred, tcp_line, Probe, DEADLINE};
use crate::{fork_hostile, honest_worker, rss_kb, settle_fds, Clients, Sampler};

const T: Duration = DEADLINE;
const KIB: u64 = 1024;

/// A primary with one honest worker serving clients in a loop, and a
/// sampler on the primary; the baseline is taken before any attack.
struct Scene {
    p: Probe,
    honest: u32,
    fds0: usize,
    rss0: u64,
    clients: Option<Clients>,
    sampler: Option<Sampler>,
}

/// Peaks over the baseline while the attack ran.
#[derive(Debug)]
struct Peaks {
    fds: usize,
    rss_kb: u64,
}

impl Scene {
    fn start(policy: &str) -> Scene {
        let mut p = Probe::start();
        p.ask(&format!("set policy {policy}"), "ok set");
        let (honest, addr) = honest_worker(&mut p);
        p.expect(format!("message {honest} listening:"), T);
        // Warm up, so first-use allocations are in the baseline.
        for _ in 0..3 {
            tcp_line(&addr, T).expect("the honest worker answers");
        }
        // The primary may still hold the last client's fd until the worker
        // accepts it: the baseline is the least seen over 100 ms.
        let mut fds0 = usize::MAX;
        for _ in 0..10 {
            fds0 = fds0.min(count_fds(p.pid()));
            std::thread::sleep(Duration::from_millis(10));
        }
        let rss0 = rss_kb(p.pid());
        let clients = Clients::start(&addr, &format!("worker {honest}"));
        let sampler = Sampler::start(p.pid());
        Scene {
            p,
            honest,
            fds0,
            rss0,
            clients: Some(clients),
            sampler: Some(sampler),
        }
    }

    /// Expects `error <id> ...` containing `why`, then the exit by SIGKILL.
    /// Returns the error line.
    fn reported_and_killed(&mut self, id: u32, why: &str) -> String {
        let line = self.p.expect(format!("error {id} "), T);
        assert!(line.contains(why), "want {why:?} in {line:?}");
        self.p
            .expect(exact(format!("exit {id} signal=9 ead=false")), T);
        line
    }

    /// Stops sampling, lets the clients go on a little, then checks every
    /// request was served, the honest worker is still the only one, and the
    /// primary's fds are back to the baseline. Returns the peaks.
    fn finish(mut self, name: &str) -> Peaks {
        let (fds, rss) = self.sampler.take().expect("sampling").stop();
        std::thread::sleep(Duration::from_millis(300));
        let served = self.clients.take().expect("clients").stop(5);
        let honest = self.honest;
        assert_eq!(self.p.workers(), format!("{honest}:listening:false:0"));
        let now = settle_fds(&self.p, self.fds0);
        assert_eq!(
            now, self.fds0,
            "{name}: the primary's fds did not come back"
        );
        let peaks = Peaks {
            fds: fds.saturating_sub(self.fds0),
            rss_kb: rss.saturating_sub(self.rss0),
        };
        eprintln!(
            "{name}: primary fds {} (+{} at peak), RSS {} kB (+{} kB at peak); \
             honest worker served {served} requests",
            self.fds0, peaks.fds, self.rss0, peaks.rss_kb
        );
        peaks
    }
}

/// Item 1, bytes: a worker sends 1 MiB messages that the primary echoes
/// (`set echo on`) and never reads. Before: the primary grew to 2 GB.
#[test]
fn worker_that_never_reads_is_killed_at_the_queue_byte_cap() {
    let mut s = Scene::start("rr");
    s.p.ask("set echo on", "ok set");
    let id = fork_hostile(&mut s.p, "never-read-flood user");
    let why = format!("worker {id} is not reading: outgoing queue over 33554432 bytes / 512 fds");
    s.reported_and_killed(id, &why);
    // The echo that overflowed got the same error back from Primary::send.
    let echo = s.p.expect(format!("err echo {id} OutOfMemory: "), T);
    assert!(echo.contains(&why), "{echo}");
    s.p.ask("set echo off", "ok set");
    let peaks = s.finish("never-read-flood user");
    // The 32 MiB queue, plus 1 MiB frames on their way in and out and
    // allocator slack (about 40 MB in all here; before: 2 GB).
    assert!(peaks.rss_kb < 56 * KIB, "{peaks:?}");
    assert!(peaks.fds < 16, "{peaks:?}");
}

/// Item 1, fds: in shared mode every QueryServer is answered with a
/// duplicate of the listening fd; a worker that floods queries and never
/// reads made the primary hit EMFILE. The bound (512 queued) also keeps
/// this test under a soft fd limit of 1024.
#[test]
fn worker_that_never_reads_query_replies_is_killed_at_the_queue_fd_cap() {
    let mut s = Scene::start("shared");
    let id = fork_hostile(&mut s.p, "never-read-flood query 127.0.0.1 0 5000");
    s.reported_and_killed(
        id,
        &format!("worker {id} is not reading: outgoing queue over 33554432 bytes / 512 fds"),
    );
    let peaks = s.finish("never-read-flood query");
    assert!(peaks.fds <= 512 + 16, "{peaks:?}");
    assert!(peaks.rss_kb < 16 * KIB, "{peaks:?}");
}

/// Item 2: a 16 MiB header, then 1 byte per sendmsg with 253 fds each.
/// Before: the primary went from 8 to 19,996 fds in under a second.
#[test]
fn fd_flood_on_bytes_no_frame_announced_is_cut_at_the_first_batch() {
    let mut s = Scene::start("rr");
    let id = fork_hostile(&mut s.p, "fd-flood");
    s.reported_and_killed(id, "253 fds arrived where no frame announcing fds starts");
    let peaks = s.finish("fd-flood");
    assert!(peaks.fds <= 253 + 16, "{peaks:?}");
    assert!(peaks.rss_kb < 16 * KIB, "{peaks:?}");
}

/// Item 2: fds on a byte in the middle of a frame that did get its own fds
/// are an error at once, without waiting for the frame to end, and all of
/// them are closed.
#[test]
fn fds_in_the_middle_of_a_frame_are_an_error_at_once() {
    let mut s = Scene::start("rr");
    let id = fork_hostile(&mut s.p, "fds-mid-frame");
    s.reported_and_killed(id, "2 fds arrived where no frame announcing fds starts");
    let peaks = s.finish("fds-mid-frame");
    assert!(peaks.fds < 16, "{peaks:?}");
}

/// Item 3: eight workers each announce a 16 MiB frame and send nothing
/// more. Before: 16 MiB committed per worker at the header.
#[test]
fn headers_alone_commit_no_payload_memory() {
    const N: usize = 8;
    let mut s = Scene::start("rr");
    let ids: Vec<u32> = (0..N)
        .map(|_| fork_hostile(&mut s.p, "header-only"))
        .collect();
    // Give the primary time to read every header, then measure it still.
    std::thread::sleep(Duration::from_millis(500));
    let held = rss_kb(s.p.pid()).saturating_sub(s.rss0);
    assert!(
        held < 8 * KIB,
        "{N} headers of 16 MiB hold {held} kB of the primary"
    );
    // Cutting the frame short is a protocol error: reported and killed.
    for &id in &ids {
        s.p.ask(&format!("kill {id} 10"), "ok kill");
        s.reported_and_killed(id, "truncated frame: have 16 bytes, need 16777232");
    }
    let peaks = s.finish("header-only x8");
    eprintln!("header-only x8: the primary held +{held} kB with every header in");
    assert!(peaks.rss_kb < 8 * KIB, "{peaks:?}");
}

/// Item 4, receive side: a worker that skips the send-side cap and writes
/// a whole 17 MiB frame is cut at the header; the payload is never read
/// into memory.
#[test]
fn oversized_frame_is_refused_at_its_header() {
    let mut s = Scene::start("rr");
    let id = fork_hostile(&mut s.p, "oversize-send");
    s.reported_and_killed(
        id,
        "frame payload of 17825792 bytes exceeds the 16777216-byte cap",
    );
    let peaks = s.finish("oversize-send");
    assert!(peaks.rss_kb < 8 * KIB, "{peaks:?}");
}

/// Item 4, primary side: `Primary::send` of 17 MiB is `InvalidInput`
/// naming the size and the cap, nothing is queued, and the worker is fine;
/// exactly the cap goes through.
#[test]
fn primary_send_over_the_cap_is_invalid_input_and_the_worker_lives() {
    let mut p = Probe::start();
    let w = p.fork_online("");
    let err = p.ask(&format!("sendbig {w} 17825792"), "err sendbig");
    assert_eq!(
        err,
        "err sendbig InvalidInput: cannot send: \
         frame payload of 17825792 bytes exceeds the 16777216-byte cap"
    );
    p.ask(&format!("sendbig {w} 16777216"), "ok sendbig");
    p.expect(exact(format!("message {w} big:16777216 fds=0")), T);
    p.ask(&format!("send {w} echo still here"), "ok send");
    p.expect(exact(format!("message {w} echo:still here fds=0")), T);
    p.expect_none(
        pred("an error or exit", |l: &str| {
            l.starts_with("error ") || l.starts_with("exit ")
        }),
        Duration::from_millis(200),
    );
    assert_eq!(p.workers(), format!("{w}:online:false:0"));
}

/// Item 4, worker side: `Worker::send` of 17 MiB is `InvalidInput` and
/// nothing reaches the primary, so the worker is not killed; exactly the
/// cap goes through.
#[test]
fn worker_send_over_the_cap_is_invalid_input_and_the_worker_lives() {
    let mut p = Probe::start();
    let w = p.fork_online("");
    p.ask(&format!("send {w} sendbig 17825792"), "ok send");
    p.expect(
        exact(format!(
            "message {w} sendbig-err:InvalidInput:cannot send: \
             frame payload of 17825792 bytes exceeds the 16777216-byte cap fds=0"
        )),
        T,
    );
    p.ask(&format!("send {w} sendbig 16777216"), "ok send");
    p.expect_all(
        &[
            exact(format!("message {w} big:16777216 fds=0")),
            exact(format!("message {w} sendbig-ok:16777216 fds=0")),
        ],
        T,
    );
    p.expect_none(
        pred("an error or exit", |l: &str| {
            l.starts_with("error ") || l.starts_with("exit ")
        }),
        Duration::from_millis(200),
    );
    assert_eq!(p.workers(), format!("{w}:online:false:0"));
}
