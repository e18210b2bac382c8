//! The C boundary: `include/syncluster.h` over the crate's public API.
//!
//! Opaque handles ([`ScPrimary`], [`ScWorker`], [`ScListener`], and
//! `ScSupervisor` during `sc_supervisor_run`), 0 or a negative errno,
//! nothing unwinding across: every entry point runs its body through
//! [`call`], which catches panics, turns an `io::Error` into `-errno` and
//! keeps its text for `sc_last_error_message()`.
//!
//! This module is the crate's second unsafe island (with `sys`): raw
//! pointers from C are checked here (NULL, alignment, lengths, the handle's
//! magic number) before anything is dereferenced, and every `unsafe` block
//! says why it is sound. The header is the contract; this file and the
//! header change together.
//!
//! | file | holds |
//! |---|---|
//! | `mod.rs` | errors, the panic guard, pointer and string checks, version, role |
//! | `event.rs` | `sc_event`: filling it from Rust events, clearing it |
//! | `primary.rs` | `sc_primary_*` |
//! | `worker.rs` | `sc_worker_*`, `sc_listener_*` |
//! | `supervisor.rs` | `sc_supervisor_*` |

// Names follow the C header (`sc_event`, `sc_role`...).
#![allow(non_camel_case_types)]
// Each unsafe operation in its own block, with its own SAFETY comment.
#![deny(unsafe_op_in_unsafe_fn)]

mod event;
mod primary;
mod supervisor;
mod worker;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::BorrowedFd;
use std::os::raw::{c_char, c_int, c_uint};
use std::os::unix::ffi::OsStrExt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Mutex;
use std::time::Duration;

pub use self::primary::ScPrimary;
pub use self::worker::ScWorker;

/// `SC_ROLE_PRIMARY`.
const SC_ROLE_PRIMARY: c_int = 1;
/// `SC_ROLE_WORKER`.
const SC_ROLE_WORKER: c_int = 2;

/// The most fds one message carries (the kernel's `SCM_MAX_FD`).
const MAX_FDS: usize = 253;

// ------------------------------------------------------------- errors

/// The errno for an `io::Error`. `raw_os_error` is `None` for errors that
/// carry their errno inside (a fork's failing step, a bind error naming
/// the address): then the errno of an `io::Error` in the source chain,
/// else the `(os error N)` std printed into the text, else one for the
/// kind.
fn errno_of(e: &io::Error) -> c_int {
    if let Some(n) = e.raw_os_error() {
        return n;
    }
    if let Some(Errno(n, _)) = e.get_ref().and_then(|i| i.downcast_ref::<Errno>()) {
        return *n;
    }
    let mut src: Option<&(dyn std::error::Error + 'static)> =
        e.get_ref().map(|i| i as &(dyn std::error::Error + 'static));
    while let Some(s) = src {
        if let Some(n) = s
            .downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error)
        {
            return n;
        }
        src = s.source();
    }
    let text = e.to_string();
    if let Some(n) = text.rfind("(os error ").and_then(|at| {
        let rest = &text[at + "(os error ".len()..];
        rest[..rest.find(')')?].parse::<c_int>().ok()
    }) {
        if n > 0 {
            return n;
        }
    }
    kind_errno(e.kind())
}

/// The errno most like an `ErrorKind` (the kinds stable since Rust 1.70).
fn kind_errno(kind: io::ErrorKind) -> c_int {
    use io::ErrorKind as K;
    match kind {
        K::NotFound => libc::ENOENT,
        K::PermissionDenied => libc::EACCES,
        K::ConnectionRefused => libc::ECONNREFUSED,
        K::ConnectionReset => libc::ECONNRESET,
        K::ConnectionAborted => libc::ECONNABORTED,
        K::NotConnected => libc::ENOTCONN,
        K::AddrInUse => libc::EADDRINUSE,
        K::AddrNotAvailable => libc::EADDRNOTAVAIL,
        K::BrokenPipe => libc::EPIPE,
        K::AlreadyExists => libc::EEXIST,
        K::WouldBlock => libc::EAGAIN,
        K::InvalidInput => libc::EINVAL,
        K::InvalidData => libc::EPROTO,
        K::TimedOut => libc::ETIMEDOUT,
        K::Interrupted => libc::EINTR,
        K::Unsupported => libc::EOPNOTSUPP,
        K::OutOfMemory => libc::ENOMEM,
        _ => libc::EIO,
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Keeps `text` for `sc_last_error_message()` in this thread.
fn set_last_error(text: String) {
    let c = to_cstring(text);
    // During thread teardown the slot may be gone: the text is then lost.
    let _ = LAST_ERROR.try_with(|l| *l.borrow_mut() = c);
}

/// A C string of `s`, with any NUL shown as `\0` rather than cut.
fn to_cstring(s: String) -> CString {
    CString::new(s).unwrap_or_else(|e| {
        let fixed = String::from_utf8_lossy(&e.into_vec()).replace('\0', "\\0");
        CString::new(fixed).unwrap_or_default()
    })
}

/// An error with a given errno and text, for the cases no `ErrorKind`
/// names (`EBUSY`, `EBADF`).
#[derive(Debug)]
struct Errno(c_int, String);

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.1)
    }
}

impl std::error::Error for Errno {}

/// An error that C sees as `-errno`, with `text` as its message.
fn errno(errno: c_int, text: impl Into<String>) -> io::Error {
    io::Error::new(
        io::Error::from_raw_os_error(errno).kind(),
        Errno(errno, text.into()),
    )
}

/// An `InvalidInput` error (-EINVAL) saying what was wrong.
fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what.into())
}

/// Runs an entry point's body: its `Ok` value, or `-errno` with the error's
/// text kept for `sc_last_error_message()`. A panic is caught (it must not
/// unwind into C) and reported as `-ENOTRECOVERABLE`.
fn call(name: &str, body: impl FnOnce() -> io::Result<c_int>) -> c_int {
    match panic::catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => {
            set_last_error(format!("{name}: {e}"));
            -errno_of(&e)
        }
        Err(payload) => {
            let why = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            set_last_error(format!(
                "{name}: internal error in syncluster (please report it): {why}"
            ));
            -libc::ENOTRECOVERABLE
        }
    }
}

/// [`call`] for entry points that return nothing (the `*_free` functions).
fn call_void(name: &str, body: impl FnOnce()) {
    call(name, || {
        body();
        Ok(0)
    });
}

// --------------------------------------------------- pointers from C

/// Handle magic numbers: a freed handle or one of another type is caught
/// (most of the time) instead of being used.
pub(crate) const MAGIC_PRIMARY: u64 = 0x7363_5f70_7269_6d61; // "sc_prima"
pub(crate) const MAGIC_WORKER: u64 = 0x7363_5f77_6f72_6b65; // "sc_worke"
pub(crate) const MAGIC_LISTENER: u64 = 0x7363_5f6c_6973_7465; // "sc_liste"
pub(crate) const MAGIC_SUPERVISOR: u64 = 0x7363_5f73_7570_6572; // "sc_super"

/// A handle type: a Rust value behind an opaque C pointer, with a magic
/// number first.
pub(crate) trait Handle: Sized {
    /// Its magic number.
    const MAGIC: u64;
    /// The C type's name, for messages.
    const NAME: &'static str;
    /// The magic number it holds (0 once freed).
    fn magic(&self) -> u64;
}

/// The handle behind `p`: `-EINVAL` for NULL, a misaligned pointer or one
/// that does not hold a live handle of this type.
///
/// # Safety
///
/// `p` is NULL or points to memory readable as a `T` (a handle this module
/// made and has not freed, as the header requires); no other reference to
/// it is alive for `'a`.
unsafe fn handle<'a, T: Handle>(p: *mut T) -> io::Result<&'a mut T> {
    if p.is_null() {
        return Err(invalid(format!("{} is NULL", T::NAME)));
    }
    if (p as usize) % std::mem::align_of::<T>() != 0 {
        return Err(invalid(format!("{} {p:p} is misaligned", T::NAME)));
    }
    // SAFETY: not NULL and aligned; the caller promises it points to a
    // handle of ours. The magic check catches a freed or foreign one.
    let h = unsafe { &mut *p };
    if h.magic() != T::MAGIC {
        return Err(invalid(format!(
            "{} {p:p} is not a live {} (freed, or another type)",
            T::NAME,
            T::NAME
        )));
    }
    Ok(h)
}

/// A `const` handle pointer as [`handle`] takes it. Every handle is made
/// mutable (`Box::into_raw`); C's `const` only says the call does not
/// change what the caller can see.
fn unconst<T>(p: *const T) -> *mut T {
    p as *mut T
}

/// Takes ownership of a handle back for freeing: `None` for NULL or a
/// pointer that holds no live handle of this type (ignored, as `free(NULL)`).
///
/// # Safety
///
/// As [`handle`], and `p` came from `Box::into_raw` and is not used again.
unsafe fn take_handle<T: Handle>(p: *mut T) -> Option<Box<T>> {
    // SAFETY: the caller's promise, as for `handle`.
    unsafe { handle(p) }.ok()?;
    // SAFETY: made by Box::into_raw (every handle is) and live (checked).
    Some(unsafe { Box::from_raw(p) })
}

/// A NUL-terminated string from C, as bytes; `what` names it in errors.
///
/// # Safety
///
/// `p` is NULL or points to a NUL-terminated string alive for `'a`.
unsafe fn c_str<'a>(p: *const c_char, what: &str) -> io::Result<&'a CStr> {
    if p.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: not NULL; NUL-terminated and alive by the caller's promise.
    Ok(unsafe { CStr::from_ptr(p) })
}

/// [`c_str`] as an `OsStr` (any bytes but NUL).
///
/// # Safety
///
/// As [`c_str`].
unsafe fn c_os<'a>(p: *const c_char, what: &str) -> io::Result<&'a OsStr> {
    // SAFETY: forwarded.
    Ok(OsStr::from_bytes(unsafe { c_str(p, what) }?.to_bytes()))
}

/// [`c_str`] as UTF-8 text.
///
/// # Safety
///
/// As [`c_str`].
unsafe fn c_utf8<'a>(p: *const c_char, what: &str) -> io::Result<&'a str> {
    // SAFETY: forwarded.
    unsafe { c_str(p, what) }?
        .to_str()
        .map_err(|_| invalid(format!("{what} is not UTF-8")))
}

/// `len` bytes at `p` (NULL allowed when `len` is 0).
///
/// # Safety
///
/// `p` is NULL or points to `len` readable bytes alive for `'a`.
unsafe fn c_bytes<'a>(p: *const std::ffi::c_void, len: usize, what: &str) -> io::Result<&'a [u8]> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(invalid(format!("{what} is NULL but its length is {len}")));
    }
    if len > isize::MAX as usize {
        return Err(invalid(format!("{what}: length {len} is too large")));
    }
    // SAFETY: not NULL, len fits an isize; readable by the caller's promise.
    Ok(unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) })
}

/// `n` C string pointers at `p` (NULL allowed when `n` is 0).
///
/// # Safety
///
/// `p` is NULL or points to `n` readable pointers alive for `'a`.
unsafe fn c_ptrs<'a>(
    p: *const *const c_char,
    n: usize,
    what: &str,
) -> io::Result<&'a [*const c_char]> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(invalid(format!("{what} is NULL but its length is {n}")));
    }
    if n > isize::MAX as usize / std::mem::size_of::<*const c_char>() {
        return Err(invalid(format!("{what}: length {n} is too large")));
    }
    // SAFETY: not NULL, the byte size fits an isize; readable by the
    // caller's promise.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// `n` fds at `p` the caller lends for the call: `-EINVAL` for a NULL array
/// or more than 253, `-EBADF` for one that is negative or not open.
///
/// # Safety
///
/// `p` is NULL or points to `n` readable `int`s; the fds stay open during
/// the call (the caller owns them and is inside it).
unsafe fn c_fds<'a>(p: *const c_int, n: usize, what: &str) -> io::Result<Vec<BorrowedFd<'a>>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    if n > MAX_FDS {
        return Err(invalid(format!(
            "{what}: {n} fds, at most {MAX_FDS} per message"
        )));
    }
    if p.is_null() {
        return Err(invalid(format!("{what} is NULL but nfds is {n}")));
    }
    // SAFETY: not NULL, n ≤ 253 ints readable by the caller's promise.
    let raw = unsafe { std::slice::from_raw_parts(p, n) };
    raw.iter()
        .map(|&fd| {
            // SAFETY: F_GETFD reads the fd's flags and changes nothing; any
            // int is a valid argument.
            if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
                return Err(errno(libc::EBADF, format!("{what}: fd {fd} is not open")));
            }
            // SAFETY: open (checked just now), and the caller keeps it open
            // for the call.
            Ok(unsafe { BorrowedFd::borrow_raw(fd) })
        })
        .collect()
}

/// Writes `v` to the out-pointer `p`: `-EINVAL` if it is NULL.
///
/// # Safety
///
/// `p` is NULL or valid for writing a `T`.
unsafe fn put<T>(p: *mut T, v: T, what: &str) -> io::Result<()> {
    if p.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: not NULL; writable by the caller's promise. `write` drops
    // nothing (the target may be uninitialised).
    unsafe { p.write(v) };
    Ok(())
}

/// A timeout in milliseconds: negative is none (wait as long as it takes).
fn timeout_ms(ms: c_int) -> Option<Duration> {
    u64::try_from(ms).ok().map(Duration::from_millis)
}

/// A deadline as milliseconds rounded up, -1 for none.
fn ms_rounded_up(d: Option<Duration>) -> c_int {
    match d {
        None => -1,
        Some(d) => {
            let ms = (d.as_nanos() + 999_999) / 1_000_000;
            c_int::try_from(ms).unwrap_or(c_int::MAX)
        }
    }
}

// ------------------------------------------------- version and errors

/// Parses a decimal number at compile time (the version parts).
const fn parse_u32(s: &str) -> u32 {
    let b = s.as_bytes();
    let mut i = 0;
    let mut n = 0;
    while i < b.len() {
        n = n * 10 + (b[i] - b'0') as u32;
        i += 1;
    }
    n
}

const VERSION: c_uint = parse_u32(env!("CARGO_PKG_VERSION_MAJOR")) << 16
    | parse_u32(env!("CARGO_PKG_VERSION_MINOR")) << 8
    | parse_u32(env!("CARGO_PKG_VERSION_PATCH"));

/// `SYNCLUSTER_VERSION` of this library.
#[no_mangle]
pub extern "C" fn syncluster_version() -> c_uint {
    // Every entry point catches unwinding, even one that cannot panic.
    panic::catch_unwind(|| VERSION).unwrap_or(0)
}

/// `SYNCLUSTER_VERSION_STRING` of this library, static.
#[no_mangle]
pub extern "C" fn syncluster_version_string() -> *const c_char {
    const VERSION_STRING: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    panic::catch_unwind(|| VERSION_STRING.as_ptr().cast()).unwrap_or(VERSION_STRING.as_ptr().cast())
}

/// Descriptions made by `sc_strerror`, one per errno, kept for the life of
/// the process (at most 4096 of them).
static STRERROR: Mutex<BTreeMap<c_int, &'static CStr>> = Mutex::new(BTreeMap::new());

/// A static description of an errno, negative or not.
#[no_mangle]
pub extern "C" fn sc_strerror(err: c_int) -> *const c_char {
    const SUCCESS: &[u8] = b"Success\0";
    const UNKNOWN: &[u8] = b"Unknown error\0";
    let text = panic::catch_unwind(|| -> *const c_char {
        let n = err.checked_abs().unwrap_or(0);
        if n == 0 {
            return SUCCESS.as_ptr().cast();
        }
        if n > 4095 {
            return UNKNOWN.as_ptr().cast();
        }
        let mut map = STRERROR.lock().unwrap_or_else(|e| e.into_inner());
        let text: &'static CStr = map.entry(n).or_insert_with(|| {
            let text = io::Error::from_raw_os_error(n).to_string();
            // std adds " (os error N)"; the C convention is the text alone.
            let text = match text.rfind(" (os error ") {
                Some(at) => text[..at].to_string(),
                None => text,
            };
            Box::leak(to_cstring(text).into_boxed_c_str())
        });
        text.as_ptr()
    });
    text.unwrap_or(UNKNOWN.as_ptr().cast())
}

/// The last failure's message in this thread, or "".
#[no_mangle]
pub extern "C" fn sc_last_error_message() -> *const c_char {
    const EMPTY: &[u8] = b"\0";
    // The pointer stays valid until the slot is replaced: by the next
    // failure in this thread, which the header says ends its validity.
    panic::catch_unwind(|| {
        LAST_ERROR
            .try_with(|l| l.borrow().as_ptr())
            .unwrap_or(EMPTY.as_ptr().cast())
    })
    .unwrap_or(EMPTY.as_ptr().cast())
}

// ---------------------------------------------------------------- role

/// Decides this process's role and hands out its handle.
///
/// # Safety
///
/// `primary` and `worker` are NULL or valid for writing a pointer.
#[no_mangle]
pub unsafe extern "C" fn sc_role(
    primary: *mut *mut ScPrimary,
    worker: *mut *mut ScWorker,
) -> c_int {
    call("sc_role", || {
        if primary.is_null() || worker.is_null() {
            return Err(invalid(
                "primary and worker must point to handles to fill in",
            ));
        }
        // SAFETY: both checked not NULL; writable by the caller's promise.
        unsafe {
            put(primary, std::ptr::null_mut(), "primary")?;
            put(worker, std::ptr::null_mut(), "worker")?;
        }
        match crate::role()? {
            crate::Role::Primary(p) => {
                // SAFETY: as above.
                unsafe { put(primary, ScPrimary::boxed(p), "primary") }?;
                Ok(SC_ROLE_PRIMARY)
            }
            crate::Role::Worker(w) => {
                // SAFETY: as above.
                unsafe { put(worker, ScWorker::boxed(w), "worker") }?;
                Ok(SC_ROLE_WORKER)
            }
        }
    })
}

#[cfg(test)]
mod tests;
