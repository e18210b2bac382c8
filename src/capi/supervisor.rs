//! `sc_supervisor_*`: the nginx-like master, run to the end by one call
//! that reports through a callback.
//!
//! The supervisor lives inside the `sc_primary` handle while it runs
//! ([`Mode::Supervised`]), so that the callback may use that handle for
//! messages, kills and the worker list. No Rust reference is held across
//! the callback: each call re-derives what it needs from the raw pointer.

use std::ffi::c_void;
use std::io;
use std::os::raw::c_int;
use std::ptr;
use std::time::Duration;

use super::event::{clear, sc_event, Fill};
use super::primary::{Mode, ScPrimary};
use super::{call, errno, handle, invalid, unconst, Handle, MAGIC_SUPERVISOR};
use crate::supervisor::{Config, Supervisor};

/// `struct sc_supervisor_config` of the header.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct sc_supervisor_config {
    pub(crate) size: usize,
    pub(crate) workers: u32,
    pub(crate) graceful_timeout_ms: u32,
    pub(crate) backoff_initial_ms: u32,
    pub(crate) backoff_max_ms: u32,
    pub(crate) stable_after_ms: u32,
    pub(crate) reload_timeout_ms: u32,
    pub(crate) hang_timeout_ms: u32,
}

/// `sc_notice_cb`.
pub type NoticeCb = unsafe extern "C" fn(*mut ScSupervisor, *mut sc_event, *mut c_void);

/// `sc_supervisor`: what the callback gets; valid during `sc_supervisor_run`.
#[derive(Debug)]
pub struct ScSupervisor {
    magic: u64,
    primary: *mut ScPrimary,
}

impl Handle for ScSupervisor {
    const MAGIC: u64 = MAGIC_SUPERVISOR;
    const NAME: &'static str = "sc_supervisor";
    fn magic(&self) -> u64 {
        self.magic
    }
}

impl Drop for ScSupervisor {
    fn drop(&mut self) {
        self.magic = 0;
    }
}

/// The supervisor a callback's handle runs.
///
/// # Safety
///
/// `s` is NULL or the live `sc_supervisor` of a running
/// `sc_supervisor_run`, whose primary is alive.
unsafe fn supervisor<'a>(s: *const ScSupervisor) -> io::Result<&'a mut Supervisor> {
    // SAFETY: the caller's promise.
    let s = unsafe { handle(unconst(s)) }?;
    // SAFETY: the run that made `s` keeps its primary alive until it returns.
    match &mut unsafe { handle(s.primary) }?.mode {
        Mode::Supervised(sup) => Ok(sup),
        _ => Err(invalid("sc_supervisor: its run has ended")),
    }
}

/// The `Config` for a C config (0: the default).
fn config_of(c: &sc_supervisor_config) -> Config {
    let mut cfg = Config::default();
    let ms = |v: u32| Duration::from_millis(u64::from(v));
    if c.workers > 0 {
        cfg.workers = c.workers as usize;
    }
    if c.graceful_timeout_ms > 0 {
        cfg.graceful_timeout = ms(c.graceful_timeout_ms);
    }
    if c.backoff_initial_ms > 0 {
        cfg.backoff_initial = ms(c.backoff_initial_ms);
    }
    if c.backoff_max_ms > 0 {
        cfg.backoff_max = ms(c.backoff_max_ms);
    }
    if c.stable_after_ms > 0 {
        cfg.stable_after = ms(c.stable_after_ms);
    }
    if c.reload_timeout_ms > 0 {
        cfg.reload_timeout = ms(c.reload_timeout_ms);
    }
    if c.hang_timeout_ms > 0 {
        cfg.hang_timeout = Some(ms(c.hang_timeout_ms));
    }
    cfg
}

/// Frees the primary handle when the run ends, however it ends.
struct Owned(*mut ScPrimary);

impl Drop for Owned {
    fn drop(&mut self) {
        // SAFETY: a live handle made by Box::into_raw (checked when the run
        // began); the run owns it and nothing uses it after this.
        drop(unsafe { Box::from_raw(self.0) });
    }
}

/// Runs the supervisor until it stops, reporting through `cb`.
///
/// # Safety
///
/// `primary` is NULL or a live `sc_primary`, not used after this returns;
/// `config` NULL or a config with its `size` set; `cb` NULL or a function
/// that does not unwind.
#[no_mangle]
pub unsafe extern "C" fn sc_supervisor_run(
    primary: *mut ScPrimary,
    config: *const sc_supervisor_config,
    cb: Option<NoticeCb>,
    user: *mut c_void,
) -> c_int {
    call("sc_supervisor_run", || {
        // SAFETY: the caller's promise.
        let h = unsafe { handle(primary) }?;
        if !matches!(h.mode, Mode::Plain(_)) {
            // Called from a callback of a run on this very primary.
            return Err(errno(libc::EBUSY, "a supervisor already runs this primary"));
        }
        let owned = Owned(primary);
        let cfg = if config.is_null() {
            Config::default()
        } else {
            if (config as usize) % std::mem::align_of::<sc_supervisor_config>() != 0 {
                return Err(invalid("config is misaligned"));
            }
            // SAFETY: not NULL, aligned; its first field readable by the promise.
            let size = unsafe { ptr::addr_of!((*config).size).read() };
            let ours = std::mem::size_of::<sc_supervisor_config>();
            if size < ours {
                return Err(invalid(format!(
                    "config->size is {size}, expected at least {ours}: \
                     initialise it with SC_SUPERVISOR_CONFIG_INIT"
                )));
            }
            // SAFETY: at least `ours` bytes readable (size says so).
            config_of(&unsafe { config.read() })
        };
        let Mode::Plain(p) = std::mem::replace(&mut h.mode, Mode::Gone) else {
            return Err(invalid("sc_primary is not a plain primary"));
        };
        h.mode = Mode::Supervised(Supervisor::start(p, cfg)?);
        let mut s = ScSupervisor {
            magic: MAGIC_SUPERVISOR,
            primary,
        };
        let mut ev = sc_event::EMPTY;
        let result = loop {
            // A fresh borrow per turn: the callback may use the handle.
            // SAFETY: `owned` keeps the handle alive until the loop ends.
            let next = match &mut unsafe { handle(owned.0) }?.mode {
                Mode::Supervised(sup) => sup.next_event(),
                _ => Err(invalid("the supervisor is gone")),
            };
            match next {
                Ok(Some(notice)) => {
                    // SAFETY: `ev` is ours, initialised and cleared.
                    unsafe { Fill::notice(notice).install(&mut ev) };
                    if let Some(cb) = cb {
                        // SAFETY: C's callback, with handles valid for the
                        // call; it must not unwind (the header says so).
                        unsafe { cb(&mut s, &mut ev, user) };
                    }
                    // SAFETY: `ev` was filled by install; the callback
                    // may only have set fd slots to -1.
                    unsafe { clear(&mut ev) };
                }
                Ok(None) => break Ok(0),
                Err(e) => break Err(e),
            }
        };
        drop(s);
        drop(owned);
        result
    })
}

/// # Safety
///
/// `s` is NULL or the handle a callback was given, during that callback.
#[no_mangle]
pub unsafe extern "C" fn sc_supervisor_stop(s: *mut ScSupervisor) -> c_int {
    call("sc_supervisor_stop", || {
        // SAFETY: the caller's promise.
        unsafe { supervisor(s) }?.stop()?;
        Ok(0)
    })
}

/// # Safety
///
/// `s` is NULL or the handle a callback was given, during that callback.
#[no_mangle]
pub unsafe extern "C" fn sc_supervisor_reload(s: *mut ScSupervisor) -> c_int {
    call("sc_supervisor_reload", || {
        // SAFETY: the caller's promise.
        unsafe { supervisor(s) }?.reload();
        Ok(0)
    })
}

/// # Safety
///
/// `s` is NULL or the handle a callback was given, during that callback.
#[no_mangle]
pub unsafe extern "C" fn sc_supervisor_target(s: *const ScSupervisor) -> c_int {
    call("sc_supervisor_target", || {
        // SAFETY: the caller's promise.
        let n = unsafe { supervisor(s) }?.target();
        c_int::try_from(n).map_err(|_| invalid("target too large for an int"))
    })
}

/// # Safety
///
/// `s` is NULL or the handle a callback was given, during that callback.
#[no_mangle]
pub unsafe extern "C" fn sc_supervisor_primary(s: *mut ScSupervisor) -> *mut ScPrimary {
    let mut out = ptr::null_mut();
    call("sc_supervisor_primary", || {
        // SAFETY: the caller's promise.
        out = unsafe { handle(s) }?.primary;
        Ok(0)
    });
    out
}
