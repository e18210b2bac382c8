//! fd hygiene: malformed input on a channel is an error that leaks no fd,
//! and every fd `sys` creates is close-on-exec.
//!
//! These tests compare `/proc/self/fd` before and after, so they must not
//! overlap with anything else that opens fds: each runs alone in a process
//! of its own ([`in_own_process`]).

use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::ipc::channel::{Channel, Recv};
use crate::ipc::wire::{Header, Kind, WireError, DEFAULT_MAX_PAYLOAD, HEADER_LEN};
use crate::sys::epoll::Epoll;
use crate::sys::fd;
use crate::sys::msg;
use crate::sys::process;
use crate::sys::signal;
use crate::sys::socket;
use crate::sys::tests::in_own_process;

const DEADLINE: Duration = Duration::from_secs(10);
/// `EAFNOSUPPORT` on Linux: no IPv6 in this kernel or namespace.
const EAFNOSUPPORT: i32 = 97;

/// The fd numbers open in this process, without the directory's own fd.
fn open_fds() -> Vec<String> {
    let own_dir = format!("/proc/{}/fd", process::getpid());
    let mut fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let target = std::fs::read_link(e.path()).ok()?;
            (target.as_os_str() != own_dir.as_str()).then(|| {
                format!(
                    "{} -> {}",
                    e.file_name().to_string_lossy(),
                    target.display()
                )
            })
        })
        .collect();
    fds.sort_unstable();
    fds
}

/// Runs `scenario` and checks that it left exactly the fds it found.
fn leaks_nothing(name: &str, scenario: impl FnOnce()) {
    let before = open_fds();
    scenario();
    let after = open_fds();
    assert_eq!(before, after, "{name}: fds leaked or closed");
}

fn with_timeouts(fd: OwnedFd) -> OwnedFd {
    let s = UnixStream::from(fd);
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.set_write_timeout(Some(DEADLINE)).unwrap();
    OwnedFd::from(s)
}

/// A raw sender end and a blocking channel on the other end.
fn raw_pair() -> (OwnedFd, Channel) {
    let (raw, theirs) = socket::socketpair().unwrap();
    (raw, Channel::new(with_timeouts(theirs), false))
}

fn header(kind: Kind, nfds: u16, len: u32) -> [u8; HEADER_LEN] {
    Header {
        kind,
        flags: 0,
        nfds,
        seq: 0,
        len,
    }
    .encode()
}

/// `n` pipes: (read ends to send, write ends kept to see if they are closed).
fn pipes(n: usize) -> (Vec<OwnedFd>, Vec<File>) {
    (0..n)
        .map(|_| {
            let (r, w) = process::pipe().unwrap();
            (r, File::from(w))
        })
        .unzip()
}

fn borrow_all(fds: &[OwnedFd]) -> Vec<BorrowedFd<'_>> {
    fds.iter().map(|f| f.as_fd()).collect()
}

/// Sends `bytes` with fresh pipe read ends attached and drops our copies
/// of them; returns the write ends.
fn send_raw(raw: &OwnedFd, bytes: &[u8], nfds: usize) -> Vec<File> {
    let (readers, writers) = pipes(nfds);
    let n = msg::send(
        raw.as_fd(),
        &[IoSlice::new(bytes)],
        &borrow_all(&readers),
        false,
    )
    .unwrap();
    assert_eq!(n, bytes.len());
    writers
}

/// Every read end is closed everywhere: writing gives `EPIPE`.
fn assert_readers_closed(writers: &mut [File], what: &str) {
    for (i, w) in writers.iter_mut().enumerate() {
        let err = w
            .write_all(b"x")
            .expect_err("the read end is still open somewhere");
        assert_eq!(
            err.kind(),
            io::ErrorKind::BrokenPipe,
            "{what}: fd {i}: {err}"
        );
    }
}

fn wire_error(e: &io::Error) -> WireError {
    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    e.get_ref()
        .and_then(|i| i.downcast_ref::<WireError>())
        .cloned()
        .unwrap_or_else(|| panic!("not a WireError: {e:?}"))
}

/// After a protocol error the channel stays failed, and says so.
fn assert_stays_failed(ch: &mut Channel) {
    let e = ch
        .recv()
        .expect_err("a failed channel must not deliver frames");
    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    assert!(e.to_string().contains("already failed"), "{e}");
    assert!(ch.try_recv().is_err());
}

#[test]
fn garbled_header_is_an_error_and_leaks_nothing() {
    if !in_own_process(
        module_path!(),
        "garbled_header_is_an_error_and_leaks_nothing",
    ) {
        return;
    }
    let good = header(Kind::User, 2, 4);
    let corruptions: [(&str, usize, u8, WireError, &str); 4] = [
        ("bad magic", 0, 0x00, WireError::BadMagic(0x5300), "magic"),
        ("unknown kind", 2, 200, WireError::UnknownKind(200), "kind"),
        ("kind zero", 2, 0, WireError::UnknownKind(0), "kind"),
        ("reserved", 7, 0x01, WireError::Reserved(0x0100), "reserved"),
    ];
    for (name, at, byte, want, word) in corruptions {
        leaks_nothing(name, || {
            let (raw, mut ch) = raw_pair();
            let mut bytes = good.to_vec();
            bytes[at] = byte;
            bytes.extend_from_slice(b"body");
            let mut writers = send_raw(&raw, &bytes, 2);
            // A valid frame behind it must not be delivered either.
            drop(send_raw(&raw, &header(Kind::Ack, 0, 0), 0));
            let e = ch.recv().expect_err(name);
            assert_eq!(wire_error(&e), want, "{name}");
            assert!(e.to_string().contains(word), "{name}: {e}");
            assert_readers_closed(&mut writers, name);
            assert_stays_failed(&mut ch);
        });
    }

    // The same through try_recv on a non-blocking channel.
    leaks_nothing("try_recv", || {
        let (raw, theirs) = socket::socketpair().unwrap();
        let mut ch = Channel::new(theirs, true);
        let mut bytes = header(Kind::User, 1, 0);
        bytes[1] = 0xFF;
        let mut writers = send_raw(&raw, &bytes, 1);
        let e = ch.try_recv().expect_err("bad magic");
        assert_eq!(wire_error(&e), WireError::BadMagic(0xFF43));
        assert_readers_closed(&mut writers, "try_recv");
        assert_stays_failed(&mut ch);
    });

    // A header cut short by EOF.
    leaks_nothing("truncated at EOF", || {
        let (raw, mut ch) = raw_pair();
        let mut writers = send_raw(&raw, &header(Kind::User, 1, 0)[..10], 1);
        drop(raw);
        let e = ch.recv().expect_err("truncated");
        assert_eq!(
            wire_error(&e),
            WireError::Truncated {
                have: 10,
                need: HEADER_LEN
            }
        );
        assert_readers_closed(&mut writers, "truncated at EOF");
    });
}

#[test]
fn frame_announcing_more_fds_than_sent_is_an_error_and_leaks_nothing() {
    if !in_own_process(
        module_path!(),
        "frame_announcing_more_fds_than_sent_is_an_error_and_leaks_nothing",
    ) {
        return;
    }
    for (announced, attached) in [(2u16, 1usize), (1, 0), (253, 252)] {
        let name = format!("{announced} announced, {attached} attached");
        leaks_nothing(&name, || {
            let (raw, mut ch) = raw_pair();
            let mut bytes = header(Kind::NewConn, announced, 3).to_vec();
            bytes.extend_from_slice(b"abc");
            let mut writers = send_raw(&raw, &bytes, attached);
            let e = ch.recv().expect_err(&name);
            assert_eq!(
                wire_error(&e),
                WireError::FdCountMismatch {
                    announced,
                    received: attached
                },
                "{name}"
            );
            assert!(e.to_string().contains("fds"), "{e}");
            assert_readers_closed(&mut writers, &name);
            assert_stays_failed(&mut ch);
        });
    }
}

#[test]
fn fds_with_a_frame_that_announces_none_are_closed() {
    if !in_own_process(
        module_path!(),
        "fds_with_a_frame_that_announces_none_are_closed",
    ) {
        return;
    }
    // The sender stays connected and sends nothing more: the error must not
    // wait for a next frame or EOF, and the fds must be closed right away.
    leaks_nothing("alone", || {
        let (raw, mut ch) = raw_pair();
        let mut bytes = header(Kind::User, 0, 2).to_vec();
        bytes.extend_from_slice(b"hi");
        let mut writers = send_raw(&raw, &bytes, 2);
        let e = ch.recv().expect_err("fds nobody announced");
        assert_eq!(
            wire_error(&e),
            WireError::FdCountMismatch {
                announced: 0,
                received: 2
            }
        );
        assert_readers_closed(&mut writers, "alone");
        assert_stays_failed(&mut ch);
        drop(raw);
    });

    // Followed by a valid frame.
    leaks_nothing("then a frame", || {
        let (raw, mut ch) = raw_pair();
        let mut writers = send_raw(&raw, &header(Kind::User, 0, 0), 3);
        drop(send_raw(&raw, &header(Kind::Ack, 0, 0), 0));
        let e = ch.recv().expect_err("fds nobody announced");
        assert!(matches!(
            wire_error(&e),
            WireError::FdCountMismatch { announced: 0, .. }
        ));
        assert_readers_closed(&mut writers, "then a frame");
    });

    // Followed by EOF.
    leaks_nothing("then EOF", || {
        let (raw, mut ch) = raw_pair();
        let mut writers = send_raw(&raw, &header(Kind::User, 0, 0), 1);
        drop(raw);
        let e = ch.recv().expect_err("fds nobody announced");
        assert!(matches!(
            wire_error(&e),
            WireError::FdCountMismatch { announced: 0, .. }
        ));
        assert_readers_closed(&mut writers, "then EOF");
    });

    // fds alone, on bytes that are only part of a header.
    leaks_nothing("inside a header", || {
        let (raw, mut ch) = raw_pair();
        let h = header(Kind::User, 0, 0);
        drop(send_raw(&raw, &h[..8], 0));
        let mut writers = send_raw(&raw, &h[8..], 1);
        let e = ch.recv().expect_err("fds nobody announced");
        assert!(matches!(
            wire_error(&e),
            WireError::FdCountMismatch { announced: 0, .. }
        ));
        assert_readers_closed(&mut writers, "inside a header");
    });
}

#[test]
fn oversized_payload_is_an_error_and_is_not_allocated() {
    if !in_own_process(
        module_path!(),
        "oversized_payload_is_an_error_and_is_not_allocated",
    ) {
        return;
    }
    leaks_nothing("over a set cap", || {
        let (raw, mut ch) = raw_pair();
        ch.set_max_payload(100);
        // Exactly the cap is fine.
        let mut ok = header(Kind::User, 0, 100).to_vec();
        ok.extend_from_slice(&[7; 100]);
        drop(send_raw(&raw, &ok, 0));
        assert_eq!(ch.recv().unwrap().unwrap().payload, [7; 100]);
        let mut bytes = header(Kind::User, 1, 101).to_vec();
        bytes.extend_from_slice(&[0; 101]);
        let mut writers = send_raw(&raw, &bytes, 1);
        let e = ch.recv().expect_err("over the cap");
        assert_eq!(wire_error(&e), WireError::TooLarge { len: 101, max: 100 });
        assert!(e.to_string().contains("cap"), "{e}");
        assert_readers_closed(&mut writers, "over a set cap");
        assert_stays_failed(&mut ch);
    });

    // A header announcing ~4 GiB with no payload behind it: the error comes
    // at once from the header alone. Waiting for (or allocating) the payload
    // would block until the 10 s socket timeout instead.
    leaks_nothing("4 GiB announced", || {
        let (raw, mut ch) = raw_pair();
        let mut writers = send_raw(&raw, &header(Kind::User, 1, u32::MAX - 1), 1);
        let start = Instant::now();
        let e = ch.recv().expect_err("over the default cap");
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(
            wire_error(&e),
            WireError::TooLarge {
                len: u32::MAX - 1,
                max: DEFAULT_MAX_PAYLOAD
            }
        );
        assert_readers_closed(&mut writers, "4 GiB announced");
        drop(raw);
    });
}

fn assert_cloexec(what: &str, fd: BorrowedFd<'_>) {
    assert!(fd::is_cloexec(fd).unwrap(), "{what} is not close-on-exec");
}

#[test]
fn every_fd_sys_creates_is_close_on_exec() {
    if !in_own_process(module_path!(), "every_fd_sys_creates_is_close_on_exec") {
        return;
    }
    leaks_nothing("cloexec", || {
        let (a, b) = socket::socketpair().unwrap();
        assert_cloexec("socketpair end 0", a.as_fd());
        assert_cloexec("socketpair end 1", b.as_fd());

        let v4: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let listener = socket::tcp_socket(&v4).unwrap();
        assert_cloexec("tcp_socket v4", listener.as_fd());
        match socket::tcp_socket(&"[::1]:0".parse().unwrap()) {
            Ok(v6) => assert_cloexec("tcp_socket v6", v6.as_fd()),
            Err(e) if e.raw_os_error() == Some(EAFNOSUPPORT) => {
                eprintln!("no IPv6 here, tcp_socket v6 skipped: {e}");
            }
            Err(e) => panic!("tcp_socket v6: {e}"),
        }
        assert_cloexec("unix_socket", socket::unix_socket().unwrap().as_fd());

        // accept of a real connection, both blocking and non-blocking.
        socket::bind(listener.as_fd(), &v4).unwrap();
        socket::listen(listener.as_fd(), 4).unwrap();
        let addr = socket::local_addr(listener.as_fd()).unwrap();
        let _c1 = TcpStream::connect(addr).unwrap();
        let _c2 = TcpStream::connect(addr).unwrap();
        fd::set_nonblocking(listener.as_fd(), false).unwrap();
        let s1 = socket::accept(listener.as_fd(), false).unwrap();
        assert_cloexec("accept", s1.as_fd());
        let s2 = socket::accept(listener.as_fd(), true).unwrap();
        assert_cloexec("accept nonblocking", s2.as_fd());
        assert!(fd::is_nonblocking(s2.as_fd()).unwrap());

        let ep = Epoll::new().unwrap();
        assert_cloexec("epoll", ep.as_fd());
        let sfd = signal::signalfd(&[signal::SIGUSR2]).unwrap();
        assert_cloexec("signalfd", sfd.as_fd());
        let (r, w) = process::pipe().unwrap();
        assert_cloexec("pipe read end", r.as_fd());
        assert_cloexec("pipe write end", w.as_fd());
        assert_cloexec("/dev/null", fd::open_dev_null().unwrap().as_fd());

        // dup and receiving set the flag even when the source lacks it.
        fd::set_cloexec(w.as_fd(), false).unwrap();
        assert!(!fd::is_cloexec(w.as_fd()).unwrap());
        assert_cloexec("dup", fd::dup(w.as_fd()).unwrap().as_fd());

        msg::send(a.as_fd(), &[IoSlice::new(b"x")], &[w.as_fd()], false).unwrap();
        let mut buf = [0u8; 1];
        let mut got = Vec::new();
        assert_eq!(msg::recv(b.as_fd(), &mut buf, &mut got, false).unwrap(), 1);
        assert_eq!(got.len(), 1);
        assert_cloexec("fd from msg::recv", got[0].as_fd());
        // It is the same pipe.
        File::from(got.pop().unwrap())
            .write_all(b"via recv")
            .unwrap();

        let mut tx = Channel::new(a, false);
        let mut rx = Channel::new(with_timeouts(b), false);
        tx.send(Kind::User, 0, 0, b"fd", &[w.as_fd()]).unwrap();
        let frame = rx.recv().unwrap().unwrap();
        assert_eq!(frame.fds.len(), 1);
        assert_cloexec("fd from Channel::recv", frame.fds[0].as_fd());
        drop(frame);

        // Non-blocking send that must queue: its dup'd fds too.
        let (qa, qb) = socket::socketpair().unwrap();
        let mut q = Channel::new(qa, true);
        let big = vec![0u8; 64 * 1024];
        while !q.wants_write() {
            q.send(Kind::User, 0, 0, &big, &[]).unwrap();
        }
        q.send(Kind::User, 0, 0, b"queued", &[w.as_fd()]).unwrap();
        let mut rq = Channel::new(qb, true);
        let start = Instant::now();
        let fds = loop {
            assert!(start.elapsed() < DEADLINE, "queued frame never arrived");
            q.flush().unwrap();
            match rq.try_recv().unwrap() {
                Recv::Frame(f) if f.payload == b"queued" => break f.fds,
                Recv::Frame(f) => assert!(f.fds.is_empty()),
                Recv::WouldBlock => {}
                Recv::Eof => panic!("EOF"),
            }
        };
        assert_eq!(fds.len(), 1);
        assert_cloexec("fd queued by a non-blocking send", fds[0].as_fd());
        drop(fds);

        // adopt_inherited sets the flag again.
        let d = fd::dup(w.as_fd()).unwrap();
        fd::set_cloexec(d.as_fd(), false).unwrap();
        let adopted = fd::adopt_inherited(d.into_raw_fd()).unwrap();
        assert_cloexec("adopt_inherited", adopted.as_fd());
        drop(adopted);

        drop(w);
        let mut text = String::new();
        File::from(r).read_to_string(&mut text).unwrap();
        assert_eq!(text, "via recv");
    });
}
