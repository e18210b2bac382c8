//! `ipc::channel` with real processes, real fds, real loopback TCP.
//!
//! Child processes are this test binary run again with
//! `--exact <this module>::child_entry` and `SYNCLUSTER_TEST_CHILD=<role>`;
//! the channel end is mapped to fd 3. Every wait is bounded: sockets get
//! 10 s timeouts, children are polled for at most 10 s and killed and
//! reaped on every path.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufRead, BufReader, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use crate::ipc::channel::{Channel, Frame, QueueFull, Recv, DEFAULT_MAX_QUEUED_BYTES};
use crate::ipc::wire::{Header, Kind, WireError, DEFAULT_MAX_PAYLOAD, HEADER_LEN, MAX_FDS};
use crate::sys::epoll::{Epoll, Events, WRITABLE};
use crate::sys::fd::{adopt_inherited, is_cloexec, nofile_limit, set_nofile_soft_limit};
use crate::sys::msg::{self, Truncated};
use crate::sys::process::{self, ExitStatus, SpawnPlan};
use crate::sys::signal::SIGKILL;
use crate::sys::socket;

const DEADLINE: Duration = Duration::from_secs(10);
const CHILD_VAR: &str = "SYNCLUSTER_TEST_CHILD";
const CHILD_FD: i32 = 3;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Gives a socket 10 s read and write timeouts, so that a blocking channel
/// on it fails (`WouldBlock`) instead of hanging.
fn with_timeouts(fd: OwnedFd) -> OwnedFd {
    let s = UnixStream::from(fd);
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.set_write_timeout(Some(DEADLINE)).unwrap();
    OwnedFd::from(s)
}

/// A child process that is killed and reaped on drop unless waited for.
struct Child {
    pid: i32,
    reaped: bool,
}

impl Child {
    /// Runs this test binary's `child_entry` with `role`, `channel` as fd 3,
    /// stdin and stdout on /dev/null and stderr inherited (panics show up).
    fn spawn(role: &str, channel: BorrowedFd<'_>) -> Child {
        let exe = std::env::current_exe().unwrap();
        // The harness names tests without the crate's own name.
        let entry = format!(
            "{}::child_entry",
            module_path!().split_once("::").unwrap().1
        );
        let argv: Vec<OsString> = [
            exe.as_os_str(),
            "--exact".as_ref(),
            entry.as_ref(),
            "--nocapture".as_ref(),
            "--test-threads=1".as_ref(),
        ]
        .iter()
        .map(|s| s.to_os_string())
        .collect();
        let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
            .filter(|(k, _)| k != CHILD_VAR)
            .collect();
        env.push((CHILD_VAR.into(), role.into()));
        let mut plan = SpawnPlan::new(&exe, &argv, &env).unwrap();
        plan.pdeathsig(Some(SIGKILL));
        let null = File::open("/dev/null").unwrap();
        let pid = process::spawn(
            &plan,
            &[(null.as_fd(), 0), (null.as_fd(), 1), (channel, CHILD_FD)],
        )
        .unwrap();
        Child { pid, reaped: false }
    }

    /// Waits at most 10 s for the child; kills, reaps and panics on timeout.
    fn wait(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = process::wait_pid_nohang(self.pid).unwrap() {
                self.reaped = true;
                return status;
            }
            if start.elapsed() > DEADLINE {
                let _ = process::kill(self.pid, SIGKILL);
                let _ = process::wait_pid(self.pid);
                self.reaped = true;
                panic!("child {} did not exit within {DEADLINE:?}", self.pid);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = process::kill(self.pid, SIGKILL);
            let _ = process::wait_pid(self.pid);
        }
    }
}

/// A pipe whose write end already holds `tag` and is closed: the read end
/// is an fd whose identity a receiver can check by reading it.
fn tagged_pipe(tag: &[u8]) -> OwnedFd {
    let (r, w) = process::pipe().unwrap();
    File::from(w).write_all(tag).unwrap();
    r
}

fn tag(frame: usize, fd: usize) -> [u8; 8] {
    let mut t = [0u8; 8];
    t[..4].copy_from_slice(&(frame as u32).to_le_bytes());
    t[4..].copy_from_slice(&(fd as u32).to_le_bytes());
    t
}

/// Reads the 8-byte tag of a received tagged pipe.
fn read_tag(fd: OwnedFd) -> [u8; 8] {
    let mut t = [0u8; 8];
    File::from(fd).read_exact(&mut t).unwrap();
    t
}

fn borrow_all(fds: &[OwnedFd]) -> Vec<BorrowedFd<'_>> {
    fds.iter().map(|f| f.as_fd()).collect()
}

/// Raises the soft `RLIMIT_NOFILE` to at least `want` (capped by the hard limit).
fn ensure_nofile(want: u64) {
    let (soft, hard) = nofile_limit().unwrap();
    if soft < want {
        set_nofile_soft_limit(want.min(hard)).unwrap();
    }
}

/// Pattern bytes with a period (251) that no power-of-two chunking hides.
fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i % 251) as u8).wrapping_mul(7).wrapping_add(salt))
        .collect()
}

fn first_mismatch(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// `/proc/self/fd` entries, without the fd of the directory being listed.
fn open_fds() -> Vec<i32> {
    let own_dir = format!("/proc/{}/fd", process::getpid());
    let mut fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let target = std::fs::read_link(e.path()).ok()?;
            if target.as_os_str() == own_dir.as_str() {
                return None;
            }
            e.file_name().to_str()?.parse().ok()
        })
        .collect();
    fds.sort_unstable();
    fds
}

// ---------------------------------------------------------------------------
// The child side: one entry point, dispatched on the role.
// ---------------------------------------------------------------------------

#[test]
fn child_entry() {
    let Some(role) = std::env::var_os(CHILD_VAR) else {
        return; // A normal run: not a child.
    };
    let fd = adopt_inherited(CHILD_FD).expect("the channel on fd 3");
    let fd = with_timeouts(fd);
    match role.to_str() {
        Some("listen_and_conn") => child_listen_and_conn(Channel::new(fd, false)),
        Some("large_echo") => child_large_echo(Channel::new(fd, false)),
        Some("ctrunc") => child_ctrunc(fd),
        Some("header_rss") => child_header_rss(Channel::new(fd, false)),
        other => panic!("unknown child role {other:?}"),
    }
}

fn child_listen_and_conn(mut ch: Channel) {
    let frame = ch.recv().unwrap().expect("a frame before EOF");
    assert_eq!(frame.header.kind, Kind::User);
    assert_eq!(frame.payload, b"listen_and_conn");
    assert_eq!((frame.fds.len(), frame.lost_fds), (2, 0));
    let mut fds = frame.fds.into_iter();
    let (lfd, cfd) = (fds.next().unwrap(), fds.next().unwrap());
    assert!(is_cloexec(lfd.as_fd()).unwrap());
    assert!(is_cloexec(cfd.as_fd()).unwrap());
    assert!(socket::is_listening(lfd.as_fd()).unwrap());
    assert!(!socket::is_listening(cfd.as_fd()).unwrap());

    // The listener is non-blocking (sys::socket::tcp_socket): poll accept
    // with a deadline.
    let listener = TcpListener::from(lfd);
    let start = Instant::now();
    let (mut conn, peer) = loop {
        match listener.accept() {
            Ok(c) => break c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                assert!(start.elapsed() < DEADLINE, "no connection to accept");
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line).unwrap();
    conn.write_all(format!("echo:{line}").as_bytes()).unwrap();

    let mut connected = TcpStream::from(cfd);
    connected
        .write_all(format!("hello from child {}\n", process::getpid()).as_bytes())
        .unwrap();

    ch.send(Kind::Ack, 0, 2, format!("peer={peer}").as_bytes(), &[])
        .unwrap();
}

const LARGE: usize = 800_004;

fn child_large_echo(mut ch: Channel) {
    let frame = ch.recv().unwrap().expect("a frame before EOF");
    assert_eq!(frame.header.len as usize, LARGE);
    assert_eq!(frame.payload.len(), LARGE);
    let want = pattern(LARGE, 1);
    assert_eq!(first_mismatch(&frame.payload, &want), None);
    assert_eq!((frame.fds.len(), frame.lost_fds), (1, 0));
    // The fd is the write end of the parent's pipe: use it.
    let mut w = File::from(frame.fds.into_iter().next().unwrap());
    w.write_all(b"child wrote through the passed fd").unwrap();
    drop(w);

    // The other direction: a large payload and our own fd.
    let back = tagged_pipe(b"a pipe made by the child");
    ch.send(Kind::User, 0, 2, &pattern(LARGE, 2), &[back.as_fd()])
        .unwrap();
    drop(back);
    // Wait for the parent to close, so we do not exit before it read.
    assert!(ch.recv().unwrap().is_none());
}

/// The soft fd limit that leaves exactly `free` fd numbers free below it.
fn limit_leaving(free: usize) -> u64 {
    let used = open_fds();
    let mut n = 0i32;
    let mut have = 0;
    while have < free {
        if used.binary_search(&n).is_err() {
            have += 1;
        }
        n += 1;
    }
    n as u64
}

fn child_ctrunc(fd: OwnedFd) {
    let (soft, _) = nofile_limit().unwrap();
    let before = open_fds();

    // 1. Raw recvmsg: 5 fds arrive, only 2 fit under the limit.
    set_nofile_soft_limit(limit_leaving(2)).unwrap();
    let mut buf = [0u8; 3];
    let mut fds = Vec::new();
    let res = msg::recv(fd.as_fd(), &mut buf, &mut fds, false);
    set_nofile_soft_limit(soft).unwrap();
    let err = res.expect_err("recv under a tiny fd limit must report MSG_CTRUNC");
    let t = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<Truncated>())
        .copied()
        .unwrap_or_else(|| panic!("error is not Truncated: {err:?}"));
    assert_eq!(
        t,
        Truncated {
            bytes: 3,
            closed: 2
        }
    );
    assert!(fds.is_empty());
    assert_eq!(&buf, b"RAW");
    assert_eq!(open_fds(), before, "fds that did arrive must be closed");

    // 2. The same through a Channel: the frame survives, its fds are lost.
    let mut ch = Channel::new(fd, false);
    set_nofile_soft_limit(limit_leaving(2)).unwrap();
    let res = ch.recv();
    set_nofile_soft_limit(soft).unwrap();
    let lost = res.unwrap().expect("frame");
    assert_eq!(lost.payload, b"lost");
    assert_eq!(lost.header.nfds, 5);
    assert!(lost.fds.is_empty());
    assert_eq!(lost.lost_fds, 5);
    drop(lost);
    assert_eq!(open_fds(), before);

    // 3. The channel is still in step and usable.
    let next = ch.recv().unwrap().expect("frame");
    assert_eq!(next.payload, b"next");
    assert_eq!((next.fds.len(), next.lost_fds), (0, 0));
    let after = ch.recv().unwrap().expect("frame");
    assert_eq!(after.payload, b"after");
    assert_eq!(after.lost_fds, 0);
    let tags: Vec<[u8; 8]> = after.fds.into_iter().map(read_tag).collect();
    assert_eq!(tags, [tag(7, 0), tag(7, 1)]);
    assert_eq!(open_fds(), before);
    ch.send(Kind::Ack, 0, 0, b"ctrunc ok", &[]).unwrap();
    assert!(ch.recv().unwrap().is_none());
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// A listening socket made the way the primary makes one: non-blocking,
/// close-on-exec, on 127.0.0.1 port 0.
fn sys_listener() -> (OwnedFd, SocketAddr) {
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let fd = socket::tcp_socket(&addr).unwrap();
    socket::set_reuseaddr(fd.as_fd(), true).unwrap();
    socket::bind(fd.as_fd(), &addr).unwrap();
    socket::listen(fd.as_fd(), 16).unwrap();
    let bound = socket::local_addr(fd.as_fd()).unwrap();
    (fd, bound)
}

#[test]
fn child_receives_listening_and_connected_sockets_and_uses_both() {
    let (ours, theirs) = socket::socketpair().unwrap();
    let mut child = Child::spawn("listen_and_conn", theirs.as_fd());
    drop(theirs);
    let mut ch = Channel::new(with_timeouts(ours), false);

    let (listener, listen_addr) = sys_listener();
    // A connected pair; the child gets the server end.
    let side = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(side.local_addr().unwrap()).unwrap();
    let (server_end, _) = side.accept().unwrap();
    drop(side);
    client.set_read_timeout(Some(DEADLINE)).unwrap();

    ch.send(
        Kind::User,
        0,
        1,
        b"listen_and_conn",
        &[listener.as_fd(), server_end.as_fd()],
    )
    .unwrap();
    // From here on only the child holds them.
    drop(listener);
    drop(server_end);

    // The listener: connect, and the child accepts and echoes.
    let mut conn = TcpStream::connect(listen_addr).unwrap();
    conn.set_read_timeout(Some(DEADLINE)).unwrap();
    conn.write_all(b"ping\n").unwrap();
    let mut echo = String::new();
    BufReader::new(&conn).read_line(&mut echo).unwrap();
    assert_eq!(echo, "echo:ping\n");

    // The connected socket: the child wrote to our peer.
    let mut hello = String::new();
    BufReader::new(&client).read_line(&mut hello).unwrap();
    assert_eq!(hello, format!("hello from child {}\n", child.pid));

    let report = ch.recv().unwrap().expect("the child's report");
    assert_eq!(report.header.kind, Kind::Ack);
    assert_eq!(report.header.seq, 2);
    assert_eq!(
        String::from_utf8(report.payload).unwrap(),
        format!("peer={}", conn.local_addr().unwrap())
    );
    assert!(ch.recv().unwrap().is_none(), "EOF once the child is done");
    assert_eq!(child.wait(), ExitStatus::Code(0));

    // With the child gone nobody holds the sockets any more: the connected
    // one reads EOF and the port refuses connections.
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    let err = TcpStream::connect(listen_addr).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
}

const FRAMES: usize = 1000;
const FD_COUNTS: [usize; 12] = [0, 1, 2, 3, 0, 5, MAX_FDS, 7, 0, 16, 1, 64];

fn fds_for(i: usize) -> usize {
    FD_COUNTS[i % FD_COUNTS.len()]
}

fn payload_for(i: usize) -> Vec<u8> {
    let mut p = format!("frame {i:04}").into_bytes();
    p.extend((0..(i * 37) % 2000).map(|k| (i + k) as u8));
    p
}

/// Checks frame `i` of the sequence sent by [`send_frame`].
fn check_frame(i: usize, f: Frame) {
    assert_eq!(f.header.kind, Kind::User, "frame {i}");
    assert_eq!(f.header.seq, i as u32, "frame {i} out of order");
    assert_eq!(f.header.flags, i as u8, "frame {i}");
    assert_eq!(f.payload, payload_for(i), "frame {i} payload");
    assert_eq!(f.lost_fds, 0, "frame {i}");
    assert_eq!(f.fds.len(), fds_for(i), "frame {i} fd count");
    for (j, fd) in f.fds.into_iter().enumerate() {
        assert!(is_cloexec(fd.as_fd()).unwrap());
        assert_eq!(read_tag(fd), tag(i, j), "frame {i} fd {j}");
    }
}

/// Sends frame `i`: payload naming it and `fds_for(i)` tagged pipes, whose
/// read ends are closed right after (the channel dups what it queues).
fn send_frame(tx: &mut Channel, i: usize) {
    let pipes: Vec<OwnedFd> = (0..fds_for(i)).map(|j| tagged_pipe(&tag(i, j))).collect();
    tx.send(
        Kind::User,
        i as u8,
        i as u32,
        &payload_for(i),
        &borrow_all(&pipes),
    )
    .unwrap();
}

#[test]
fn thousand_frames_with_interleaved_fds_arrive_in_order() {
    ensure_nofile(8192);
    let (a, b) = socket::socketpair().unwrap();
    let b = with_timeouts(b);
    // The receiver starts reading only once the sender has seen the socket
    // full, and pauses now and then, so the sender's queue builds up and
    // drains through epoll several times.
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let receiver = thread::spawn(move || {
        let mut rx = Channel::new(b, false);
        go_rx
            .recv_timeout(DEADLINE)
            .expect("the sender never filled the socket");
        for i in 0..FRAMES {
            if i % 250 == 249 {
                thread::sleep(Duration::from_millis(20));
            }
            let f = rx.recv().unwrap().unwrap_or_else(|| panic!("EOF at {i}"));
            check_frame(i, f);
        }
        assert!(rx.recv().unwrap().is_none(), "nothing after the last frame");
    });

    let mut tx = Channel::new(a, true);
    // Up to 48 KiB of these frames hold some 800 fds, over the default
    // cap: lift it.
    tx.set_queue_limits(usize::MAX, usize::MAX);
    let ep = Epoll::new().unwrap();
    ep.add(tx.as_fd(), WRITABLE, 0).unwrap();
    let mut events = Events::with_capacity(1);
    let start = Instant::now();
    let mut saw_queue = false;
    // Lets the queue grow to this many bytes before waiting for writability.
    const HIGH_WATER: usize = 48 * 1024;
    let mut flush_until = |tx: &mut Channel, limit: usize| {
        while tx.queued() > limit {
            if tx.flush().unwrap() {
                break;
            }
            if receiver.is_finished() {
                return false;
            }
            assert!(start.elapsed() < 3 * DEADLINE, "sender stalled");
            ep.wait(&mut events, Some(Duration::from_millis(100)))
                .unwrap();
        }
        true
    };
    let mut ok = true;
    let mut go = Some(go_tx);
    for i in 0..FRAMES {
        send_frame(&mut tx, i);
        if tx.wants_write() {
            saw_queue = true;
            if let Some(go) = go.take() {
                go.send(()).unwrap();
            }
            if !flush_until(&mut tx, HIGH_WATER) {
                ok = false;
                break;
            }
        }
    }
    drop(go); // Never filled: the receiver fails instead of waiting.
    ok = ok && flush_until(&mut tx, 0);
    drop(tx); // EOF for the receiver.
    if let Err(p) = receiver.join() {
        std::panic::resume_unwind(p);
    }
    assert!(ok, "receiver finished before the sender");
    assert!(saw_queue, "the socket never filled: nothing was queued");
}

#[test]
fn large_payload_with_fd_round_trips_intact() {
    let (ours, theirs) = socket::socketpair().unwrap();
    let mut child = Child::spawn("large_echo", theirs.as_fd());
    drop(theirs);
    let mut ch = Channel::new(with_timeouts(ours), false);

    let (r, w) = process::pipe().unwrap();
    let payload = pattern(LARGE, 1);
    ch.send(Kind::User, 0, 1, &payload, &[w.as_fd()]).unwrap();
    drop(w);

    let back = ch.recv().unwrap().expect("the child's answer");
    assert_eq!(back.header.seq, 2);
    assert_eq!(back.payload.len(), LARGE);
    assert_eq!(first_mismatch(&back.payload, &pattern(LARGE, 2)), None);
    assert_eq!((back.fds.len(), back.lost_fds), (1, 0));
    let mut from_child = String::new();
    File::from(back.fds.into_iter().next().unwrap())
        .read_to_string(&mut from_child)
        .unwrap();
    assert_eq!(from_child, "a pipe made by the child");
    drop(ch); // The child waits for this EOF before it exits.

    assert_eq!(child.wait(), ExitStatus::Code(0));
    // Every copy of the write end is closed now, so this reads to EOF.
    let mut through = String::new();
    File::from(r).read_to_string(&mut through).unwrap();
    assert_eq!(through, "child wrote through the passed fd");
}

#[test]
fn msg_ctrunc_closes_arrived_fds_and_reports() {
    let (ours, theirs) = socket::socketpair().unwrap();
    let mut child = Child::spawn("ctrunc", theirs.as_fd());
    drop(theirs);
    let ours = with_timeouts(ours);

    let five: Vec<OwnedFd> = (0..5).map(|j| tagged_pipe(&tag(6, j))).collect();
    // Raw: 3 bytes and 5 fds in one sendmsg.
    let n = msg::send(
        ours.as_fd(),
        &[IoSlice::new(b"RAW")],
        &borrow_all(&five),
        false,
    )
    .unwrap();
    assert_eq!(n, 3);
    let mut ch = Channel::new(ours, false);
    ch.send(Kind::User, 0, 1, b"lost", &borrow_all(&five))
        .unwrap();
    drop(five);
    ch.send(Kind::User, 0, 2, b"next", &[]).unwrap();
    let two: Vec<OwnedFd> = (0..2).map(|j| tagged_pipe(&tag(7, j))).collect();
    ch.send(Kind::User, 0, 3, b"after", &borrow_all(&two))
        .unwrap();
    drop(two);

    let report = ch.recv().unwrap().expect("the child's report");
    assert_eq!(report.payload, b"ctrunc ok");
    drop(ch);
    assert_eq!(child.wait(), ExitStatus::Code(0));
}

#[test]
fn nonblocking_send_queues_partial_writes_and_flush_completes() {
    const FILL_PAYLOAD: usize = 8 * 1024;
    const FILL_FDS: [usize; 5] = [1, 0, 3, 0, 2];
    let (a, b) = socket::socketpair().unwrap();
    let mut tx = Channel::new(a, true);
    let mut rx = Channel::new(b, true);

    let frame_payload = |i: usize| {
        let mut p = format!("#{i}#").into_bytes();
        p.extend(pattern(FILL_PAYLOAD, i as u8));
        p
    };
    let nfds = |i: usize| FILL_FDS[i % FILL_FDS.len()];
    let send = |tx: &mut Channel, i: usize| {
        let pipes: Vec<OwnedFd> = (0..nfds(i)).map(|j| tagged_pipe(&tag(i, j))).collect();
        tx.send(
            Kind::User,
            0,
            i as u32,
            &frame_payload(i),
            &borrow_all(&pipes),
        )
        .unwrap();
        // Closing our copies right away: queued frames hold duplicates.
    };

    // Fill the socket until a frame is only partly written.
    let mut sent = 0;
    while !tx.wants_write() {
        send(&mut tx, sent);
        sent += 1;
        assert!(sent < 100_000, "the socket never filled");
    }
    let partial = tx.queued();
    assert!(partial > 0 && partial <= HEADER_LEN + FILL_PAYLOAD + 16);
    // Queue well over a socketful behind it, fds interleaved with frames
    // without.
    for _ in 0..60 {
        send(&mut tx, sent);
        sent += 1;
    }
    assert!(tx.queued() >= partial + 60 * (HEADER_LEN + FILL_PAYLOAD));
    assert!(!tx.flush().unwrap(), "nobody reads yet: still queued");
    assert!(tx.wants_write());

    // Drain while flushing, and keep queueing more while the queue is
    // partly written (so it compacts with fds still queued behind).
    let total = sent + 60;
    let start = Instant::now();
    let mut got = 0;
    let mut flushed = false;
    while got < total {
        assert!(
            start.elapsed() < DEADLINE,
            "stuck at frame {got} of {total}"
        );
        match rx.try_recv().unwrap() {
            Recv::Frame(f) => {
                assert_eq!(f.header.seq, got as u32, "out of order");
                assert_eq!(f.payload, frame_payload(got), "frame {got}");
                assert_eq!((f.fds.len(), f.lost_fds), (nfds(got), 0), "frame {got}");
                for (j, fd) in f.fds.into_iter().enumerate() {
                    assert_eq!(read_tag(fd), tag(got, j), "frame {got} fd {j}");
                }
                got += 1;
            }
            Recv::WouldBlock => {
                if sent < total {
                    for _ in 0..3.min(total - sent) {
                        send(&mut tx, sent);
                        sent += 1;
                    }
                } else {
                    assert!(!flushed, "all flushed but frame {got} is missing");
                }
                flushed = tx.flush().unwrap();
            }
            Recv::Eof => panic!("EOF at frame {got}"),
        }
    }
    assert!(tx.flush().unwrap());
    assert!(!tx.wants_write());
    assert_eq!(tx.queued(), 0);
    assert!(matches!(rx.try_recv().unwrap(), Recv::WouldBlock));
    drop(tx);
    assert!(matches!(rx.try_recv().unwrap(), Recv::Eof));
}

// ---------------------------------------------------------------------------
// Bounds: what a peer can make this end hold (issue 9 §3)
// ---------------------------------------------------------------------------

fn raw_header(kind: Kind, nfds: u16, len: u32) -> Vec<u8> {
    Header {
        kind,
        flags: 0,
        nfds,
        seq: 0,
        len,
    }
    .encode()
    .to_vec()
}

/// Sends `bytes` in one sendmsg with `fds`, all of it.
fn raw_send(fd: &OwnedFd, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    let n = msg::send(fd.as_fd(), &[IoSlice::new(bytes)], fds, false).unwrap();
    assert_eq!(n, bytes.len());
}

/// A pipe: the read end to send, the write end to see whether any copy of
/// the read end is still open anywhere.
fn probe_pipe() -> (OwnedFd, File) {
    let (r, w) = process::pipe().unwrap();
    (r, File::from(w))
}

/// True while some copy of the pipe's read end is open (in a process or in
/// flight in a socket): a write succeeds. Closed everywhere: `EPIPE`.
fn read_end_open(w: &mut File) -> bool {
    match w.write(b"x") {
        Ok(_) => true,
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => false,
        Err(e) => panic!("write to a pipe: {e}"),
    }
}

fn queue_full(e: &io::Error) -> QueueFull {
    assert_eq!(e.kind(), io::ErrorKind::OutOfMemory, "{e}");
    *e.get_ref()
        .and_then(|i| i.downcast_ref::<QueueFull>())
        .unwrap_or_else(|| panic!("not QueueFull: {e:?}"))
}

fn wire_error(e: &io::Error) -> WireError {
    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    e.get_ref()
        .and_then(|i| i.downcast_ref::<WireError>())
        .cloned()
        .unwrap_or_else(|| panic!("not a WireError: {e:?}"))
}

#[test]
fn send_refuses_a_payload_over_the_send_cap_and_sends_nothing() {
    for nonblocking in [false, true] {
        let (a, b) = socket::socketpair().unwrap();
        let mut tx = Channel::new(with_timeouts(a), nonblocking);
        let mut rx = Channel::new(b, true);
        let over = vec![0u8; DEFAULT_MAX_PAYLOAD as usize + 1];
        let e = tx.send(Kind::User, 0, 0, &over, &[]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        assert_eq!(
            e.to_string(),
            "cannot send: frame payload of 16777217 bytes exceeds the 16777216-byte cap"
        );
        assert!(!tx.wants_write());
        tx.set_max_send_payload(100);
        let e = tx.send(Kind::User, 0, 1, &[1; 101], &[]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        assert!(e.to_string().contains("101 bytes exceeds the 100-byte cap"));
        tx.send(Kind::User, 0, 2, &[2; 100], &[]).unwrap();
        // Only the frame at the cap went out.
        match rx.try_recv().unwrap() {
            Recv::Frame(f) => assert_eq!((f.header.seq, f.payload), (2, vec![2; 100])),
            other => panic!("{other:?}"),
        }
        assert!(matches!(rx.try_recv().unwrap(), Recv::WouldBlock));
    }
}

#[test]
fn queue_to_a_peer_that_never_reads_stops_at_the_byte_cap() {
    const CAP: usize = 1 << 20;
    const FRAME: usize = 64 * 1024;
    let (a, b) = socket::socketpair().unwrap();
    let mut tx = Channel::new(a, true);
    assert_eq!(DEFAULT_MAX_QUEUED_BYTES, 32 << 20);
    tx.set_queue_limits(CAP, 1024);
    let mut sent = 0u32;
    let err = loop {
        match tx.send(Kind::User, 0, sent, &pattern(FRAME, sent as u8), &[]) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 1000, "never refused");
    };
    let full = queue_full(&err);
    assert_eq!((full.max_bytes, full.max_fds), (CAP, 1024));
    assert_eq!(full.queued_bytes, tx.queued());
    assert_eq!(full.frame_bytes, HEADER_LEN + FRAME);
    assert!(tx.queued() <= CAP && tx.queued() + HEADER_LEN + FRAME > CAP);
    assert!(
        err.to_string()
            .starts_with("outgoing queue over 1048576 bytes / 1024 fds"),
        "{err}"
    );
    // Refused means nothing queued; the queue still drains intact.
    let queued = tx.queued();
    assert!(tx.send(Kind::User, 0, sent, &[0; FRAME], &[]).is_err());
    assert_eq!(tx.queued(), queued);
    let mut rx = Channel::new(b, true);
    let start = Instant::now();
    let mut got = 0;
    while got < sent {
        assert!(start.elapsed() < DEADLINE, "stuck at frame {got}");
        tx.flush().unwrap();
        match rx.try_recv().unwrap() {
            Recv::Frame(f) => {
                assert_eq!(f.header.seq, got);
                assert_eq!(first_mismatch(&f.payload, &pattern(FRAME, got as u8)), None);
                got += 1;
            }
            Recv::WouldBlock => {}
            Recv::Eof => panic!("EOF"),
        }
    }
    assert!(tx.flush().unwrap());
    assert!(matches!(rx.try_recv().unwrap(), Recv::WouldBlock));
}

#[test]
fn queue_stops_at_the_fd_cap_and_its_dups_close_with_it() {
    let (a, _b) = socket::socketpair().unwrap();
    let mut tx = Channel::new(a, true);
    tx.set_queue_limits(usize::MAX, 10);
    while !tx.wants_write() {
        tx.send(Kind::User, 0, 0, &[0; 4096], &[]).unwrap();
    }
    // Frames with 4 fds each: two fit under 10, the third is refused.
    let mut kept = Vec::new();
    for i in 0..3 {
        let (r, w): (Vec<OwnedFd>, Vec<File>) = (0..4).map(|_| probe_pipe()).unzip();
        let res = tx.send(Kind::User, 0, i, b"fds", &borrow_all(&r));
        drop(r); // Only the channel's duplicates are left.
        if i < 2 {
            res.unwrap();
            kept.extend(w);
        } else {
            let full = queue_full(&res.unwrap_err());
            assert_eq!((full.queued_fds, full.frame_fds, full.max_fds), (8, 4, 10));
            // Refused: no duplicate was made.
            for mut w in w {
                assert!(!read_end_open(&mut w));
            }
        }
    }
    assert_eq!(tx.queued_fds(), 8);
    for w in &mut kept {
        assert!(read_end_open(w), "a queued fd must stay open");
    }
    drop(tx);
    for w in &mut kept {
        assert!(!read_end_open(w), "a dropped channel closes its queued fds");
    }
}

#[test]
fn an_empty_queue_takes_one_frame_over_the_cap() {
    let (a, b) = socket::socketpair().unwrap();
    let mut tx = Channel::new(a, true);
    tx.set_queue_limits(1000, 0);
    let (r, mut w) = probe_pipe();
    let big = pattern(512 * 1024, 9);
    tx.send(Kind::User, 0, 1, &big, &[r.as_fd()]).unwrap();
    drop(r);
    assert!(tx.queued() > 1000, "the socket took it all: test nothing");
    queue_full(&tx.send(Kind::Ack, 0, 2, &[], &[]).unwrap_err());
    let mut rx = Channel::new(b, true);
    let start = Instant::now();
    let f = loop {
        assert!(start.elapsed() < DEADLINE);
        tx.flush().unwrap();
        if let Recv::Frame(f) = rx.try_recv().unwrap() {
            break f;
        }
    };
    assert_eq!(first_mismatch(&f.payload, &big), None);
    assert_eq!(f.fds.len(), 1);
    drop(f);
    assert!(!read_end_open(&mut w));
    assert!(matches!(rx.try_recv().unwrap(), Recv::WouldBlock));
}

#[test]
fn fds_inside_a_frame_fail_at_once_and_are_closed() {
    let (raw, b) = socket::socketpair().unwrap();
    let mut rx = Channel::new(b, true);
    let ((r1, mut w1), (r2, mut w2)) = (probe_pipe(), probe_pipe());
    // A frame announcing 1 fd gets it on its first byte: fine...
    let mut first = raw_header(Kind::User, 1, 1 << 20);
    first.extend_from_slice(&[1; 10]);
    raw_send(&raw, &first, &[r1.as_fd()]);
    assert!(matches!(rx.try_recv().unwrap(), Recv::WouldBlock));
    // ...then 2 more on its 27th byte: an error now, not at the frame's end.
    raw_send(&raw, &[2; 10], &[r2.as_fd(), r2.as_fd()]);
    drop((r1, r2));
    let e = rx.try_recv().unwrap_err();
    assert_eq!(
        wire_error(&e),
        WireError::FdCountMismatch {
            announced: 0,
            received: 2
        }
    );
    assert!(e.to_string().contains("first byte"), "{e}");
    // All three are closed, the frame's own fd too.
    assert!(!read_end_open(&mut w1));
    assert!(!read_end_open(&mut w2));
    assert!(rx
        .try_recv()
        .unwrap_err()
        .to_string()
        .contains("already failed"));
}

#[test]
fn more_fds_than_announced_fail_at_once() {
    let (raw, b) = socket::socketpair().unwrap();
    let mut rx = Channel::new(b, true);
    let (r, mut w) = probe_pipe();
    let mut bytes = raw_header(Kind::User, 1, 1 << 20);
    bytes.push(0);
    raw_send(&raw, &bytes, &[r.as_fd(), r.as_fd(), r.as_fd()]);
    drop(r);
    let e = rx.try_recv().unwrap_err();
    assert_eq!(
        wire_error(&e),
        WireError::FdCountMismatch {
            announced: 1,
            received: 3
        }
    );
    assert!(!read_end_open(&mut w));
}

/// The fd flood of issue 9: a header, then 1 byte per sendmsg with 253 fds.
/// The receiver takes the first batch, fails, and reads no further: the
/// other batches stay in the socket, so it never holds more than 253.
#[test]
fn fd_flood_is_cut_at_the_first_batch() {
    ensure_nofile(4096);
    let (raw, b) = socket::socketpair().unwrap();
    let mut rx = Channel::new(b, true);
    raw_send(&raw, &raw_header(Kind::User, 0, DEFAULT_MAX_PAYLOAD), &[]);
    // One distinct pipe per batch, 253 times over.
    let mut writers = Vec::new();
    for _ in 0..20 {
        let (r, w) = probe_pipe();
        raw_send(&raw, b"x", &vec![r.as_fd(); MAX_FDS]);
        writers.push(w);
    }
    let e = rx.try_recv().unwrap_err();
    assert_eq!(
        wire_error(&e),
        WireError::FdCountMismatch {
            announced: 0,
            received: MAX_FDS
        }
    );
    assert!(!read_end_open(&mut writers[0]), "the first batch is closed");
    for (i, w) in writers.iter_mut().enumerate().skip(1) {
        assert!(read_end_open(w), "batch {i} was read: the receiver went on");
    }
    drop(rx);
    drop(raw);
    for w in &mut writers {
        assert!(!read_end_open(w));
    }
}

/// A frame the same read brought in ahead of a bad fd batch is delivered
/// first; then the error.
#[test]
fn frames_before_a_bad_fd_batch_are_delivered_first() {
    let (raw, b) = socket::socketpair().unwrap();
    let mut rx = Channel::new(b, true);
    raw_send(&raw, &raw_header(Kind::Ack, 0, 0), &[]);
    let (r, mut w) = probe_pipe();
    let mut bad = raw_header(Kind::User, 0, 100);
    bad.push(7);
    raw_send(&raw, &bad, &[r.as_fd()]);
    drop(r);
    match rx.try_recv().unwrap() {
        Recv::Frame(f) => assert_eq!((f.header.kind, f.fds.len()), (Kind::Ack, 0)),
        other => panic!("{other:?}"),
    }
    assert!(
        !read_end_open(&mut w),
        "closed before the error is returned"
    );
    let e = rx.try_recv().unwrap_err();
    assert!(matches!(
        wire_error(&e),
        WireError::FdCountMismatch { announced: 0, .. }
    ));
}

fn vm_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

const HEADERS: usize = 16;

/// In a process of its own, so that RSS means something: 16 channels get a
/// header announcing 16 MiB and nothing more. Reports its RSS growth; then
/// one frame is completed in 64 KiB steps and must arrive intact.
fn child_header_rss(mut ch: Channel) {
    let before = vm_rss_kb();
    let mut pairs = Vec::new();
    for _ in 0..HEADERS {
        let (raw, b) = socket::socketpair().unwrap();
        let mut rx = Channel::new(b, true);
        raw_send(&raw, &raw_header(Kind::User, 0, DEFAULT_MAX_PAYLOAD), &[]);
        assert!(matches!(rx.try_recv().unwrap(), Recv::WouldBlock));
        pairs.push((raw, rx));
    }
    let grew = vm_rss_kb().saturating_sub(before);
    let (raw, rx) = &mut pairs[0];
    let payload = pattern(DEFAULT_MAX_PAYLOAD as usize, 3);
    // 64 KiB at a time, which the socket takes without a reader; each
    // try_recv reads all there is.
    for chunk in payload.chunks(64 * 1024) {
        raw_send(raw, chunk, &[]);
        match rx.try_recv().unwrap() {
            Recv::WouldBlock => {}
            Recv::Frame(f) => {
                assert_eq!(f.payload.len(), payload.len());
                assert_eq!(first_mismatch(&f.payload, &payload), None);
                ch.send(Kind::Ack, 0, 0, format!("grew {grew}").as_bytes(), &[])
                    .unwrap();
                assert!(ch.recv().unwrap().is_none());
                return;
            }
            Recv::Eof => panic!("EOF"),
        }
    }
    panic!("the frame never completed");
}

#[test]
fn a_header_alone_commits_no_payload_buffer() {
    let (ours, theirs) = socket::socketpair().unwrap();
    let mut child = Child::spawn("header_rss", theirs.as_fd());
    drop(theirs);
    let mut ch = Channel::new(with_timeouts(ours), false);
    let report = ch.recv().unwrap().expect("the child's report");
    let text = String::from_utf8(report.payload).unwrap();
    let grew: u64 = text.strip_prefix("grew ").unwrap().parse().unwrap();
    eprintln!("{HEADERS} headers of 16 MiB: RSS grew {grew} kB");
    // Committing each announced payload would be 16 x 16 MiB = 256 MiB.
    assert!(grew < 4 * 1024, "{HEADERS} headers grew RSS by {grew} kB");
    drop(ch);
    assert_eq!(child.wait(), ExitStatus::Code(0));
}
