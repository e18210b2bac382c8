//! `sc_worker_*` and `sc_listener_*`: a worker's side of the cluster.

use std::io;
use std::os::fd::AsRawFd;
use std::os::raw::{c_char, c_int, c_void};

use super::event::{deliver, into_raw_conn, sc_event, Fill};
use super::{
    c_bytes, c_fds, c_utf8, call, call_void, handle, invalid, ms_rounded_up, put, take_handle,
    timeout_ms, unconst, Handle, MAGIC_LISTENER, MAGIC_WORKER,
};
use crate::worker::ListenOptions;
use crate::{Listener, Worker};

/// `sc_worker`.
#[derive(Debug)]
pub struct ScWorker {
    magic: u64,
    worker: Worker,
}

/// `sc_listener`.
#[derive(Debug)]
pub struct ScListener {
    magic: u64,
    listener: Listener,
}

impl Handle for ScWorker {
    const MAGIC: u64 = MAGIC_WORKER;
    const NAME: &'static str = "sc_worker";
    fn magic(&self) -> u64 {
        self.magic
    }
}

impl Handle for ScListener {
    const MAGIC: u64 = MAGIC_LISTENER;
    const NAME: &'static str = "sc_listener";
    fn magic(&self) -> u64 {
        self.magic
    }
}

impl Drop for ScWorker {
    fn drop(&mut self) {
        self.magic = 0;
    }
}

impl Drop for ScListener {
    fn drop(&mut self) {
        self.magic = 0;
    }
}

impl ScWorker {
    /// A new handle, for C.
    pub(crate) fn boxed(worker: Worker) -> *mut ScWorker {
        Box::into_raw(Box::new(ScWorker {
            magic: MAGIC_WORKER,
            worker,
        }))
    }
}

/// The worker behind a handle.
///
/// # Safety
///
/// `w` is NULL or a live `sc_worker`.
unsafe fn worker<'a>(w: *const ScWorker) -> io::Result<&'a Worker> {
    // SAFETY: forwarded from the caller.
    Ok(&unsafe { handle(unconst(w)) }?.worker)
}

/// The listener behind a handle.
///
/// # Safety
///
/// `l` is NULL or a live `sc_listener`.
unsafe fn listener<'a>(l: *const ScListener) -> io::Result<&'a Listener> {
    // SAFETY: forwarded from the caller.
    Ok(&unsafe { handle(unconst(l)) }?.listener)
}

/// # Safety
///
/// `worker` is NULL or a live `sc_worker`, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn sc_worker_free(worker: *mut ScWorker) {
    // SAFETY: the caller's promise.
    call_void("sc_worker_free", || drop(unsafe { take_handle(worker) }));
}

/// 0 for NULL.
///
/// # Safety
///
/// `w` is NULL or a live `sc_worker`.
#[no_mangle]
pub unsafe extern "C" fn sc_worker_id(w: *const ScWorker) -> u32 {
    // SAFETY: the caller's promise.
    let id = call("sc_worker_id", || Ok(unsafe { worker(w) }?.id() as c_int));
    u32::try_from(id).unwrap_or(0)
}

/// # Safety
///
/// `w` is NULL or a live `sc_worker`.
#[no_mangle]
pub unsafe extern "C" fn sc_worker_leave_stop_signals_to_primary(w: *mut ScWorker) -> c_int {
    call("sc_worker_leave_stop_signals_to_primary", || {
        // SAFETY: the caller's promise.
        unsafe { worker(w) }?.leave_stop_signals_to_primary()?;
        Ok(0)
    })
}

/// `SC_OPT_DEFER_ACCEPT`: `ListenOptions::defer_accept`.
const OPT_DEFER_ACCEPT: u32 = 1;
/// `SC_OPT_NONBLOCKING_CONNECTIONS`: `ListenOptions::nonblocking_connections`.
const OPT_NONBLOCKING_CONNECTIONS: u32 = 2;

/// # Safety
///
/// `w` is NULL or a live `sc_worker`; `addr` NULL or a C string; `out`
/// NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sc_worker_listen(
    w: *mut ScWorker,
    addr: *const c_char,
    backlog: c_int,
    out: *mut *mut ScListener,
) -> c_int {
    // SAFETY: the caller's promise, passed on.
    unsafe { listen_with("sc_worker_listen", w, addr, backlog, 0, out) }
}

/// # Safety
///
/// As [`sc_worker_listen`].
#[no_mangle]
pub unsafe extern "C" fn sc_worker_listen_with(
    w: *mut ScWorker,
    addr: *const c_char,
    backlog: c_int,
    flags: u32,
    out: *mut *mut ScListener,
) -> c_int {
    // SAFETY: the caller's promise, passed on.
    unsafe { listen_with("sc_worker_listen_with", w, addr, backlog, flags, out) }
}

/// # Safety
///
/// As [`sc_worker_listen`].
unsafe fn listen_with(
    name: &'static str,
    w: *mut ScWorker,
    addr: *const c_char,
    backlog: c_int,
    flags: u32,
    out: *mut *mut ScListener,
) -> c_int {
    call(name, || {
        // SAFETY: the caller's promise.
        let w = unsafe { worker(w) }?;
        // SAFETY: the caller's promise.
        let addr = unsafe { c_utf8(addr, "addr") }?;
        if out.is_null() {
            return Err(invalid("listener is NULL"));
        }
        let backlog = u32::try_from(backlog)
            .map_err(|_| invalid(format!("backlog {backlog}: expected 0 or more")))?;
        if flags & !(OPT_DEFER_ACCEPT | OPT_NONBLOCKING_CONNECTIONS) != 0 {
            return Err(invalid(format!("flags {flags:#x}: unknown SC_OPT_* bits")));
        }
        let opts = ListenOptions::new()
            .backlog(backlog)
            .defer_accept(flags & OPT_DEFER_ACCEPT != 0)
            .nonblocking_connections(flags & OPT_NONBLOCKING_CONNECTIONS != 0);
        let listener = w.listen_with(addr, &opts)?;
        let boxed = Box::into_raw(Box::new(ScListener {
            magic: MAGIC_LISTENER,
            listener,
        }));
        // SAFETY: checked not NULL; writable by the caller's promise.
        unsafe { put(out, boxed, "listener") }?;
        Ok(0)
    })
}

/// # Safety
///
/// `w` is NULL or a live `sc_worker`; `ev` NULL or an initialised event.
#[no_mangle]
pub unsafe extern "C" fn sc_worker_next_event(
    w: *mut ScWorker,
    timeout: c_int,
    ev: *mut sc_event,
) -> c_int {
    call("sc_worker_next_event", || {
        // SAFETY: the caller's promise.
        let w = unsafe { worker(w) }?;
        // SAFETY: the caller's promise.
        unsafe {
            deliver(ev, || {
                w.next_event_timeout(timeout_ms(timeout))?
                    .map(Fill::worker)
                    .transpose()
            })
        }
    })
}

/// # Safety
///
/// `w` is NULL or a live `sc_worker`; `ev` NULL or an initialised event.
#[no_mangle]
pub unsafe extern "C" fn sc_worker_try_next_event(w: *mut ScWorker, ev: *mut sc_event) -> c_int {
    call("sc_worker_try_next_event", || {
        // SAFETY: the caller's promise.
        let w = unsafe { worker(w) }?;
        // SAFETY: the caller's promise.
        unsafe { deliver(ev, || w.try_next_event()?.map(Fill::worker).transpose()) }
    })
}

/// # Safety
///
/// `w` is NULL or a live `sc_worker`.
#[no_mangle]
pub unsafe extern "C" fn sc_worker_fd(w: *const ScWorker) -> c_int {
    // SAFETY: the caller's promise.
    call("sc_worker_fd", || Ok(unsafe { worker(w) }?.as_raw_fd()))
}

/// # Safety
///
/// `w` is NULL or a live `sc_worker`.
#[no_mangle]
pub unsafe extern "C" fn sc_worker_poll_timeout(w: *const ScWorker) -> c_int {
    call("sc_worker_poll_timeout", || {
        // SAFETY: the caller's promise.
        Ok(ms_rounded_up(unsafe { worker(w) }?.poll_timeout()))
    })
}

/// # Safety
///
/// `w` is NULL or a live `sc_worker`; `data` NULL or `len` bytes; `fds`
/// NULL or `nfds` ints.
#[no_mangle]
pub unsafe extern "C" fn sc_worker_send(
    w: *mut ScWorker,
    data: *const c_void,
    len: usize,
    fds: *const c_int,
    nfds: usize,
) -> c_int {
    call("sc_worker_send", || {
        // SAFETY: the caller's promise.
        let w = unsafe { worker(w) }?;
        // SAFETY: the caller's promise.
        let (bytes, fds) = unsafe { (c_bytes(data, len, "data")?, c_fds(fds, nfds, "fds")?) };
        w.send(bytes, &fds)?;
        Ok(0)
    })
}

/// # Safety
///
/// `w` is NULL or a live `sc_worker`; `ev` NULL or an initialised event.
#[no_mangle]
pub unsafe extern "C" fn sc_worker_recv(w: *mut ScWorker, ev: *mut sc_event) -> c_int {
    call("sc_worker_recv", || {
        // SAFETY: the caller's promise.
        let w = unsafe { worker(w) }?;
        // SAFETY: the caller's promise.
        unsafe {
            deliver(ev, || {
                Ok(w.recv()?
                    .map(|(bytes, fds)| Fill::message_from_primary(bytes, fds)))
            })
        }
    })
}

/// # Safety
///
/// `w` is NULL or a live `sc_worker`.
#[no_mangle]
pub unsafe extern "C" fn sc_worker_disconnect(w: *mut ScWorker) -> c_int {
    call("sc_worker_disconnect", || {
        // SAFETY: the caller's promise.
        unsafe { worker(w) }?.disconnect()?;
        Ok(0)
    })
}

/// # Safety
///
/// `w` is NULL or a live `sc_worker`.
#[no_mangle]
pub unsafe extern "C" fn sc_worker_is_disconnecting(w: *const ScWorker) -> c_int {
    call("sc_worker_is_disconnecting", || {
        // SAFETY: the caller's promise.
        Ok(c_int::from(unsafe { worker(w) }?.is_disconnecting()))
    })
}

/// # Safety
///
/// `l` is NULL or a live `sc_listener`, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn sc_listener_close(l: *mut ScListener) {
    // SAFETY: the caller's promise.
    call_void("sc_listener_close", || drop(unsafe { take_handle(l) }));
}

/// # Safety
///
/// `l` is NULL or a live `sc_listener`.
#[no_mangle]
pub unsafe extern "C" fn sc_listener_id(l: *const ScListener) -> u32 {
    // SAFETY: the caller's promise.
    let id = call("sc_listener_id", || {
        c_int::try_from(unsafe { listener(l) }?.id()).map_err(|_| invalid("listener id too large"))
    });
    u32::try_from(id).unwrap_or(0)
}

/// # Safety
///
/// `l` is NULL or a live `sc_listener`; `fd` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sc_listener_accept(l: *mut ScListener, fd: *mut c_int) -> c_int {
    call("sc_listener_accept", || {
        // SAFETY: the caller's promise.
        let l = unsafe { listener(l) }?;
        if fd.is_null() {
            return Err(invalid("fd is NULL"));
        }
        // `incoming` rather than `accept`: no getpeername per connection
        // (the caller has the fd to ask). It ends once disconnecting.
        let stream = l.incoming().next().unwrap_or_else(|| {
            Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the worker is disconnecting: no more connections",
            ))
        })?;
        let raw = into_raw_conn(stream)?;
        // SAFETY: checked not NULL; writable by the caller's promise.
        unsafe { put(fd, raw, "fd") }?;
        Ok(0)
    })
}

/// # Safety
///
/// `l` is NULL or a live `sc_listener`.
#[no_mangle]
pub unsafe extern "C" fn sc_listener_set_nonblocking(
    l: *mut ScListener,
    nonblocking: c_int,
) -> c_int {
    call("sc_listener_set_nonblocking", || {
        // SAFETY: the caller's promise.
        unsafe { listener(l) }?.set_nonblocking(nonblocking != 0)?;
        Ok(0)
    })
}
