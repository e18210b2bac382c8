//! Unit tests of the C boundary's plumbing. The C programs that use the
//! whole API are run by `tests/capi.rs`.

use super::event::{sc_event, sc_event_clear, Fill};
use super::primary::sc_worker_info;
use super::supervisor::sc_supervisor_config;
use super::*;
use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;

/// Offsets of named fields, as `offsetof` would print them.
macro_rules! offsets {
    ($ty:ty { $($field:ident),* $(,)? }) => {{
        let v = MaybeUninit::<$ty>::uninit();
        let base = v.as_ptr() as usize;
        let mut out = vec![(
            stringify!($ty).to_string(),
            std::mem::size_of::<$ty>(),
        )];
        $(
            // SAFETY: addr_of! on a field of an uninitialised value reads
            // nothing; it only computes the address.
            let at = unsafe { std::ptr::addr_of!((*v.as_ptr()).$field) } as usize;
            out.push((format!("{}.{}", stringify!($ty), stringify!($field)), at - base));
        )*
        out
    }};
}

fn rust_layout() -> Vec<(String, usize)> {
    let mut all = offsets!(sc_event {
        size,
        internal,
        kind,
        id,
        exit_code,
        term_signal,
        after_disconnect,
        signal,
        error,
        graceful,
        fd,
        listener,
        new_id,
        count,
        delay_ms,
        text,
        data,
        len,
        fds,
        nfds,
        ids,
        nids
    });
    all.extend(offsets!(sc_worker_info {
        size,
        id,
        pid,
        state,
        after_disconnect,
        in_flight
    }));
    all.extend(offsets!(sc_supervisor_config {
        size,
        workers,
        graceful_timeout_ms,
        backoff_initial_ms,
        backoff_max_ms,
        stable_after_ms,
        reload_timeout_ms,
        hang_timeout_ms
    }));
    all
}

#[test]
fn the_header_structs_have_the_rust_layout_field_for_field() {
    let layout = rust_layout();
    // The C side prints the same names with sizeof/offsetof.
    let mut c = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include \"syncluster.h\"\nint main(void) {\n",
    );
    for (name, _) in &layout {
        let line = match name.split_once('.') {
            None => format!("printf(\"{name} %zu\\n\", sizeof({name}));\n"),
            // The Rust field `internal` is the header's `internal_`.
            Some((ty, "internal")) => {
                format!("printf(\"{name} %zu\\n\", offsetof({ty}, internal_));\n")
            }
            Some((ty, f)) => format!("printf(\"{name} %zu\\n\", offsetof({ty}, {f}));\n"),
        };
        c.push_str(&line);
    }
    c.push_str("return 0; }\n");
    let dir = std::env::temp_dir().join(format!("syncluster-layout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("layout.c");
    let exe = dir.join("layout");
    std::fs::write(&src, c).unwrap();
    let include = concat!(env!("CARGO_MANIFEST_DIR"), "/include");
    let cc = Command::new("cc")
        .args([
            "-std=c99", "-Wall", "-Wextra", "-Werror", "-I", include, "-o",
        ])
        .arg(&exe)
        .arg(&src)
        .output()
        .expect("cc is needed to check the header's layout: apt-get install -y gcc");
    assert!(
        cc.status.success(),
        "{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let out = Command::new(&exe).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let printed = String::from_utf8(out.stdout).unwrap();
    let want: String = layout.iter().map(|(n, v)| format!("{n} {v}\n")).collect();
    assert_eq!(printed, want, "C (left) and Rust (right) disagree");
}

#[test]
fn errno_comes_from_the_os_error_the_source_or_the_kind() {
    assert_eq!(
        errno_of(&io::Error::from_raw_os_error(libc::EADDRINUSE)),
        libc::EADDRINUSE
    );
    // A fork's step error carries its errno in its text, not in raw_os_error.
    let child = io::Error::new(
        io::ErrorKind::Other,
        "exec /nope: Exec format error (os error 8)".to_string(),
    );
    assert_eq!(errno_of(&child), libc::ENOEXEC);
    let wrapped = io::Error::new(
        io::ErrorKind::Other,
        io::Error::from_raw_os_error(libc::EMFILE),
    );
    assert_eq!(errno_of(&wrapped), libc::EMFILE);
    assert_eq!(
        errno_of(&io::Error::new(io::ErrorKind::NotFound, "x")),
        libc::ENOENT
    );
    assert_eq!(
        errno_of(&io::Error::new(io::ErrorKind::InvalidData, "x")),
        libc::EPROTO
    );
    assert_eq!(errno_of(&errno(libc::EBUSY, "busy")), libc::EBUSY);
}

#[test]
fn call_turns_errors_and_panics_into_negative_errnos_with_a_message() {
    assert_eq!(call("t", || Ok(7)), 7);
    assert_eq!(call("t", || Err(invalid("bad thing"))), -libc::EINVAL);
    // SAFETY: the library's own pointer to a NUL-terminated string.
    let msg = unsafe { CStr::from_ptr(sc_last_error_message()) };
    assert_eq!(msg.to_str().unwrap(), "t: bad thing");
    let r = call("boom", || panic!("on purpose"));
    assert_eq!(r, -libc::ENOTRECOVERABLE);
    // SAFETY: as above.
    let msg = unsafe { CStr::from_ptr(sc_last_error_message()) };
    assert!(msg.to_str().unwrap().contains("on purpose"), "{msg:?}");
}

#[test]
fn strerror_is_static_and_has_no_os_error_suffix() {
    // SAFETY: static NUL-terminated strings.
    let (a, b, z) = unsafe {
        (
            CStr::from_ptr(sc_strerror(-libc::EINVAL)),
            CStr::from_ptr(sc_strerror(libc::EINVAL)),
            CStr::from_ptr(sc_strerror(0)),
        )
    };
    assert_eq!(a.to_str().unwrap(), "Invalid argument");
    assert_eq!(a.as_ptr(), b.as_ptr(), "one string per errno");
    assert_eq!(z.to_str().unwrap(), "Success");
    // SAFETY: as above.
    let huge = unsafe { CStr::from_ptr(sc_strerror(i32::MIN)) };
    assert_eq!(huge.to_str().unwrap(), "Success");
}

fn is_open(fd: c_int) -> bool {
    // SAFETY: F_GETFD only reads flags.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

#[test]
fn clearing_an_event_closes_the_fds_not_taken_and_keeps_the_taken_ones() {
    let fd = |f: std::fs::File| OwnedFd::from(f);
    let a = fd(std::fs::File::open("/dev/null").unwrap());
    let b = fd(std::fs::File::open("/dev/null").unwrap());
    let (ra, rb) = (a.as_raw_fd(), b.as_raw_fd());
    let mut ev = sc_event::EMPTY;
    // SAFETY: `ev` is initialised; install and clear are its only users.
    unsafe { Fill::message_from_primary(b"hi".to_vec(), vec![a, b]).install(&mut ev) };
    assert_eq!(ev.kind, event::SC_EVENT_MESSAGE);
    assert_eq!(ev.nfds, 2);
    // SAFETY: fds points to nfds ints the event owns; data to len bytes.
    let (fds, data) = unsafe {
        (
            std::slice::from_raw_parts_mut(ev.fds, ev.nfds),
            std::slice::from_raw_parts(ev.data, ev.len),
        )
    };
    assert_eq!(data, b"hi");
    assert_eq!(fds, &[ra, rb]);
    fds[1] = -1; // taken
                 // SAFETY: filled by install above.
    unsafe { sc_event_clear(&mut ev) };
    assert!(!is_open(ra), "the fd not taken is closed");
    assert!(is_open(rb), "the taken fd stays open");
    // SAFETY: rb is ours now.
    drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(rb) });
    assert_eq!(ev.kind, event::SC_EVENT_NONE);
    assert!(ev.internal.is_null() && ev.fds.is_null() && ev.fd == -1);
    // Clearing twice is harmless.
    // SAFETY: an empty event.
    unsafe { sc_event_clear(&mut ev) };
}

#[test]
fn a_short_event_size_is_refused_before_anything_is_written() {
    let mut ev = sc_event {
        size: 8,
        ..sc_event::EMPTY
    };
    // SAFETY: a valid event whose size field says less than the struct.
    let r = call("t", || unsafe { event::deliver(&mut ev, || Ok(None)) });
    assert_eq!(r, -libc::EINVAL);
    assert_eq!(ev.size, 8);
}
