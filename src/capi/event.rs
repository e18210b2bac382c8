//! `sc_event`: a tagged struct the caller allocates and the library fills.
//!
//! What an event owns (its text, bytes, fd arrays and fds) lives in a
//! [`Held`] box that `internal_` points to; the public pointers are views
//! into it. Clearing closes every fd whose slot still holds the number
//! the library put there (the caller takes one by setting its slot to
//! -1), then frees the box.

use std::ffi::{c_void, CString};
use std::io;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::os::raw::{c_char, c_int};
use std::ptr;

use super::{invalid, to_cstring};
use crate::primary::{Event as PrimaryEvent, ExitStatus};
use crate::supervisor::Notice;
use crate::worker::{Event as WorkerEvent, Stream};

// sc_event_kind
pub(crate) const SC_EVENT_NONE: c_int = 0;
const SC_EVENT_FORK: c_int = 1;
const SC_EVENT_ONLINE: c_int = 2;
const SC_EVENT_LISTENING: c_int = 3;
pub(crate) const SC_EVENT_MESSAGE: c_int = 4;
const SC_EVENT_DISCONNECT: c_int = 5;
const SC_EVENT_EXIT: c_int = 6;
const SC_EVENT_SIGNAL: c_int = 7;
const SC_EVENT_ERROR: c_int = 8;
const SC_EVENT_HUNG: c_int = 9;
const SC_EVENT_CONNECTION: c_int = 20;
const SC_EVENT_READY: c_int = 40;
const SC_EVENT_RESPAWNING: c_int = 41;
const SC_EVENT_RESPAWNED: c_int = 42;
const SC_EVENT_CRASH_LOOP: c_int = 43;
const SC_EVENT_RELOADING: c_int = 44;
const SC_EVENT_REPLACED: c_int = 45;
const SC_EVENT_RELOADED: c_int = 46;
const SC_EVENT_RELOAD_FAILED: c_int = 47;
const SC_EVENT_SCALED: c_int = 48;
const SC_EVENT_SCALE_REFUSED: c_int = 49;
const SC_EVENT_STOPPING: c_int = 50;
const SC_EVENT_FORCE_KILLED: c_int = 51;
const SC_EVENT_OTHER: c_int = 1000;

/// `struct sc_event` of the header, field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct sc_event {
    pub(crate) size: usize,
    pub(crate) internal: *mut c_void,
    pub(crate) kind: c_int,
    pub(crate) id: u32,
    pub(crate) exit_code: c_int,
    pub(crate) term_signal: c_int,
    pub(crate) after_disconnect: c_int,
    pub(crate) signal: c_int,
    pub(crate) error: c_int,
    pub(crate) graceful: c_int,
    pub(crate) fd: c_int,
    pub(crate) listener: u32,
    pub(crate) new_id: u32,
    pub(crate) count: u32,
    pub(crate) delay_ms: u64,
    pub(crate) text: *const c_char,
    pub(crate) data: *const u8,
    pub(crate) len: usize,
    pub(crate) fds: *mut c_int,
    pub(crate) nfds: usize,
    pub(crate) ids: *const u32,
    pub(crate) nids: usize,
}

/// The size of the first version of `sc_event`: the least a caller may pass.
const V1_SIZE: usize = std::mem::size_of::<sc_event>();

impl sc_event {
    /// `SC_EVENT_INIT`.
    pub(crate) const EMPTY: sc_event = sc_event {
        size: std::mem::size_of::<sc_event>(),
        internal: ptr::null_mut(),
        kind: SC_EVENT_NONE,
        id: 0,
        exit_code: 0,
        term_signal: 0,
        after_disconnect: 0,
        signal: 0,
        error: 0,
        graceful: 0,
        fd: -1,
        listener: 0,
        new_id: 0,
        count: 0,
        delay_ms: 0,
        text: ptr::null(),
        data: ptr::null(),
        len: 0,
        fds: ptr::null_mut(),
        nfds: 0,
        ids: ptr::null(),
        nids: 0,
    };
}

/// What an event owns.
#[derive(Debug)]
struct Held {
    text: Option<CString>,
    data: Vec<u8>,
    /// What `sc_event.fds` points to; the caller may set slots to -1.
    fds: Vec<c_int>,
    /// The numbers put in `fds`, to tell a taken slot.
    orig_fds: Vec<c_int>,
    ids: Vec<u32>,
    /// The fd put in `sc_event.fd`, or -1.
    conn: c_int,
}

impl Drop for Held {
    /// Closes what was not taken: the fds are the event's until then.
    fn drop(&mut self) {
        if self.conn >= 0 {
            // SAFETY: the library made this fd and nobody took it (a taken
            // one is set to -1 first); closed once, here.
            drop(unsafe { OwnedFd::from_raw_fd(self.conn) });
        }
        for (&now, &orig) in self.fds.iter().zip(&self.orig_fds) {
            if now == orig && orig >= 0 {
                // SAFETY: the library made this fd and the event owns it
                // (the caller did not take it); closed once, here.
                drop(unsafe { OwnedFd::from_raw_fd(orig) });
            }
        }
    }
}

/// An event being built: its fields, and what it will own.
#[derive(Debug)]
pub(crate) struct Fill {
    ev: sc_event,
    held: Held,
}

impl Fill {
    fn new(kind: c_int, id: u32) -> Fill {
        Fill {
            ev: sc_event {
                kind,
                id,
                ..sc_event::EMPTY
            },
            held: Held {
                text: None,
                data: Vec::new(),
                fds: Vec::new(),
                orig_fds: Vec::new(),
                ids: Vec::new(),
                conn: -1,
            },
        }
    }

    fn text(mut self, s: String) -> Fill {
        self.held.text = Some(to_cstring(s));
        self
    }

    fn error(mut self, e: &io::Error) -> Fill {
        self.ev.error = -super::errno_of(e);
        self.text(e.to_string())
    }

    fn message(mut self, bytes: Vec<u8>, fds: Vec<OwnedFd>) -> Fill {
        self.held.data = bytes;
        self.held.fds = fds.into_iter().map(IntoRawFd::into_raw_fd).collect();
        self.held.orig_fds = self.held.fds.clone();
        self
    }

    fn conn(mut self, fd: OwnedFd) -> Fill {
        self.held.conn = fd.into_raw_fd();
        self
    }

    /// A primary's event.
    pub(crate) fn primary(ev: PrimaryEvent) -> Fill {
        match ev {
            PrimaryEvent::Fork(id) => Fill::new(SC_EVENT_FORK, id),
            PrimaryEvent::Online(id) => Fill::new(SC_EVENT_ONLINE, id),
            PrimaryEvent::Listening { id, address } => {
                Fill::new(SC_EVENT_LISTENING, id).text(address.to_string())
            }
            PrimaryEvent::Message { id, bytes, fds } => {
                Fill::new(SC_EVENT_MESSAGE, id).message(bytes, fds)
            }
            PrimaryEvent::Disconnect(id) => Fill::new(SC_EVENT_DISCONNECT, id),
            PrimaryEvent::Exit {
                id,
                status,
                exited_after_disconnect,
            } => {
                let mut f = Fill::new(SC_EVENT_EXIT, id);
                f.ev.after_disconnect = c_int::from(exited_after_disconnect);
                #[allow(unreachable_patterns)] // ExitStatus may grow
                match status {
                    ExitStatus::Code(c) => f.ev.exit_code = c,
                    ExitStatus::Signal(s) => {
                        f.ev.exit_code = -1;
                        f.ev.term_signal = s.as_raw();
                    }
                    other => {
                        return Fill::other(&other).text(format!("worker {id} ended: {other}"))
                    }
                }
                f
            }
            PrimaryEvent::Signal(s) => {
                let mut f = Fill::new(SC_EVENT_SIGNAL, 0);
                f.ev.signal = s.as_raw();
                f
            }
            PrimaryEvent::Error { id, error } => Fill::new(SC_EVENT_ERROR, id).error(&error),
            PrimaryEvent::Hung(id) => Fill::new(SC_EVENT_HUNG, id),
            // Registered fds are not offered to C; later kinds come here.
            other => Fill::other(&other),
        }
    }

    /// A worker's event.
    pub(crate) fn worker(ev: WorkerEvent) -> io::Result<Fill> {
        Ok(match ev {
            WorkerEvent::Connection { listener, stream } => {
                let mut f = Fill::new(SC_EVENT_CONNECTION, 0).conn(stream_fd(stream)?);
                f.ev.listener = u32::try_from(listener).unwrap_or(u32::MAX);
                f
            }
            WorkerEvent::Message { bytes, fds } => Fill::message_from_primary(bytes, fds),
            WorkerEvent::Disconnect => Fill::new(SC_EVENT_DISCONNECT, 0),
            other => Fill::other(&other),
        })
    }

    /// A message a worker received.
    pub(crate) fn message_from_primary(bytes: Vec<u8>, fds: Vec<OwnedFd>) -> Fill {
        Fill::new(SC_EVENT_MESSAGE, 0).message(bytes, fds)
    }

    /// A supervisor's notice.
    #[allow(unreachable_patterns)] // Notice grows (upgrades, sd_notify)
    pub(crate) fn notice(n: Notice) -> Fill {
        match n {
            Notice::Cluster(ev) => Fill::primary(ev),
            Notice::Ready => Fill::new(SC_EVENT_READY, 0),
            Notice::Respawning {
                id,
                delay,
                failures,
            } => {
                let mut f = Fill::new(SC_EVENT_RESPAWNING, id);
                f.ev.delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
                f.ev.count = failures;
                f
            }
            Notice::Respawned { id } => Fill::new(SC_EVENT_RESPAWNED, id),
            Notice::CrashLoop { failures } => {
                let mut f = Fill::new(SC_EVENT_CRASH_LOOP, 0);
                f.ev.count = failures;
                f
            }
            Notice::Reloading => Fill::new(SC_EVENT_RELOADING, 0),
            Notice::Replaced { old, new } => {
                let mut f = Fill::new(SC_EVENT_REPLACED, old);
                f.ev.new_id = new;
                f
            }
            Notice::Reloaded => Fill::new(SC_EVENT_RELOADED, 0),
            Notice::ReloadFailed(why) => Fill::new(SC_EVENT_RELOAD_FAILED, 0).text(why),
            Notice::Scaled { workers } => {
                let mut f = Fill::new(SC_EVENT_SCALED, 0);
                f.ev.count = u32::try_from(workers).unwrap_or(u32::MAX);
                f
            }
            Notice::ScaleRefused(e) => Fill::new(SC_EVENT_SCALE_REFUSED, 0).error(&e),
            Notice::Stopping { graceful } => {
                let mut f = Fill::new(SC_EVENT_STOPPING, 0);
                f.ev.graceful = c_int::from(graceful);
                f
            }
            Notice::ForceKilled(ids) => {
                let mut f = Fill::new(SC_EVENT_FORCE_KILLED, 0);
                f.held.ids = ids;
                f
            }
            other => Fill::other(&other),
        }
    }

    /// Something this version names no kind for: its debug text.
    fn other(what: &dyn std::fmt::Debug) -> Fill {
        Fill::new(SC_EVENT_OTHER, 0).text(format!("{what:?}"))
    }

    /// Writes the event into the caller's struct (already cleared), with
    /// its pointers into a boxed [`Held`] that `internal_` owns.
    ///
    /// # Safety
    ///
    /// `dst` passed [`check`] and is valid for writing its `size` bytes.
    pub(crate) unsafe fn install(self, dst: *mut sc_event) {
        let Fill { mut ev, held } = self;
        let owns = held.text.is_some()
            || !held.data.is_empty()
            || !held.fds.is_empty()
            || !held.ids.is_empty()
            || held.conn >= 0;
        if owns {
            let mut held = Box::new(held);
            ev.text = held.text.as_ref().map_or(ptr::null(), |t| t.as_ptr());
            if !held.data.is_empty() {
                ev.data = held.data.as_ptr();
                ev.len = held.data.len();
            }
            if !held.fds.is_empty() {
                ev.fds = held.fds.as_mut_ptr();
                ev.nfds = held.fds.len();
            }
            if !held.ids.is_empty() {
                ev.ids = held.ids.as_ptr();
                ev.nids = held.ids.len();
            }
            ev.fd = held.conn;
            // The heap buffers of the Vecs and the CString do not move when
            // the box is turned into a raw pointer.
            ev.internal = Box::into_raw(held).cast();
        }
        // SAFETY: `dst` passed `check`: readable and writable for `size`
        // bytes, size ≥ V1_SIZE; nothing is dropped by `read`/`write`.
        unsafe {
            ev.size = ptr::addr_of!((*dst).size).read();
            write_prefix(dst, &ev);
        }
    }
}

/// Copies the fields of `ev` that fit the caller's `size` (all of them for
/// a caller built against this version or a later one).
///
/// # Safety
///
/// `dst` is valid for writing `(*dst).size` bytes, at least [`V1_SIZE`].
unsafe fn write_prefix(dst: *mut sc_event, ev: &sc_event) {
    // SAFETY: the caller's promise; V1_SIZE is all of `ev`.
    unsafe {
        let n = ptr::addr_of!((*dst).size).read().min(V1_SIZE);
        ptr::copy_nonoverlapping((ev as *const sc_event).cast::<u8>(), dst.cast::<u8>(), n);
    }
}

/// The fd of a connection handed to C: no longer counted open by its
/// listener, the caller's to close.
fn stream_fd(stream: Stream) -> io::Result<OwnedFd> {
    match stream.into_tcp() {
        Ok(tcp) => Ok(tcp.into()),
        Err(stream) => match stream.into_unix() {
            Ok(unix) => Ok(unix.into()),
            Err(_) => Err(invalid("a connection neither TCP nor Unix")),
        },
    }
}

/// A connection from `Listener::accept`, as a raw fd the caller owns.
pub(crate) fn into_raw_conn(stream: Stream) -> io::Result<c_int> {
    Ok(stream_fd(stream)?.into_raw_fd())
}

/// Checks an event pointer before use: not NULL, aligned, and `size` at
/// least this version's (`SC_EVENT_INIT` sets it).
///
/// # Safety
///
/// `ev` is NULL or points to an `sc_event` whose `size` field is readable.
pub(crate) unsafe fn check(ev: *mut sc_event) -> io::Result<()> {
    if ev.is_null() {
        return Err(invalid("ev is NULL"));
    }
    if (ev as usize) % std::mem::align_of::<sc_event>() != 0 {
        return Err(invalid(format!("ev {ev:p} is misaligned")));
    }
    // SAFETY: not NULL and aligned; its first field is readable by the
    // caller's promise.
    let size = unsafe { ptr::addr_of!((*ev).size).read() };
    if size < V1_SIZE {
        return Err(invalid(format!(
            "ev->size is {size}, expected at least {V1_SIZE}: initialise it with SC_EVENT_INIT"
        )));
    }
    Ok(())
}

/// Clears an event that passed [`check`]: closes the fds not taken, frees
/// what it holds, and writes an empty event.
///
/// # Safety
///
/// `ev` passed [`check`]; its `internal_` is NULL or was set by
/// [`Fill::install`] and not freed since (the header's rule: initialise
/// once, let the library clear).
pub(crate) unsafe fn clear(ev: *mut sc_event) {
    // SAFETY: checked by the caller; the fields read are within V1_SIZE.
    unsafe {
        let internal = ptr::addr_of!((*ev).internal).read();
        if !internal.is_null() {
            let mut held = Box::from_raw(internal.cast::<Held>());
            if ptr::addr_of!((*ev).fd).read() != held.conn {
                // Taken: the caller's now.
                held.conn = -1;
            }
            // Held's drop closes the fds not taken.
            drop(held);
        }
        let empty = sc_event {
            size: ptr::addr_of!((*ev).size).read(),
            ..sc_event::EMPTY
        };
        write_prefix(ev, &empty);
    }
}

/// Checks `ev`, clears what it held, and fills it from `make`: 1 with an
/// event, 0 when `make` has none.
///
/// # Safety
///
/// As [`check`] and [`clear`].
pub(crate) unsafe fn deliver(
    ev: *mut sc_event,
    make: impl FnOnce() -> io::Result<Option<Fill>>,
) -> io::Result<c_int> {
    // SAFETY: forwarded from the caller.
    unsafe {
        check(ev)?;
        clear(ev);
    }
    match make()? {
        Some(fill) => {
            // SAFETY: checked and cleared above.
            unsafe { fill.install(ev) };
            Ok(1)
        }
        None => Ok(0),
    }
}

/// Sets `*ev` to `SC_EVENT_INIT`.
///
/// # Safety
///
/// `ev` is NULL or valid for writing an `sc_event`.
#[no_mangle]
pub unsafe extern "C" fn sc_event_init(ev: *mut sc_event) {
    super::call_void("sc_event_init", || {
        if !ev.is_null() && (ev as usize) % std::mem::align_of::<sc_event>() == 0 {
            // SAFETY: not NULL, aligned, writable by the caller's promise.
            unsafe { ev.write(sc_event::EMPTY) };
        }
    });
}

/// Frees what the event holds, closing the fds not taken.
///
/// # Safety
///
/// `ev` is NULL or an event initialised with `SC_EVENT_INIT`.
#[no_mangle]
pub unsafe extern "C" fn sc_event_clear(ev: *mut sc_event) {
    super::call_void("sc_event_clear", || {
        // SAFETY: the caller's promise; a bad pointer or size is ignored.
        if unsafe { check(ev) }.is_ok() {
            // SAFETY: checked just now.
            unsafe { clear(ev) };
        }
    });
}
