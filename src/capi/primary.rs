//! `sc_primary_*`: the primary's settings, workers and events.

use std::ffi::{OsStr, OsString};
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::raw::{c_char, c_int, c_void};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::ptr;

use super::event::{deliver, sc_event, Fill};
use super::{
    c_bytes, c_fds, c_os, c_ptrs, c_str, c_utf8, call, call_void, errno, handle, invalid,
    ms_rounded_up, put, take_handle, timeout_ms, unconst, Handle, MAGIC_PRIMARY,
};
use crate::primary::{ListenRules, Settings, State, TcpRule};
use crate::supervisor::Supervisor;
use crate::{Policy, Primary, Signal};

pub(crate) const SC_POLICY_RR: c_int = 1;
pub(crate) const SC_POLICY_SHARED: c_int = 2;

const SC_LISTEN_DEFAULT: c_int = 0;
const SC_LISTEN_NOTHING: c_int = 1;
const SC_LISTEN_ANY: c_int = 2;
const SC_LISTEN_UNPRIVILEGED: c_int = 3;

/// `sc_primary`: a primary, or, during `sc_supervisor_run`, the supervisor
/// that runs it.
#[derive(Debug)]
pub struct ScPrimary {
    magic: u64,
    pub(crate) mode: Mode,
}

/// What an `sc_primary` holds.
// One per handle, boxed already: the size difference is moot.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Mode {
    /// The program drives the primary.
    Plain(Primary),
    /// `sc_supervisor_run` drives it: events are the supervisor's.
    Supervised(Supervisor),
    /// Handed to a supervisor that failed to start.
    Gone,
}

impl Handle for ScPrimary {
    const MAGIC: u64 = MAGIC_PRIMARY;
    const NAME: &'static str = "sc_primary";
    fn magic(&self) -> u64 {
        self.magic
    }
}

impl Drop for ScPrimary {
    fn drop(&mut self) {
        self.magic = 0;
    }
}

impl ScPrimary {
    /// A new handle, for C.
    pub(crate) fn boxed(p: Primary) -> *mut ScPrimary {
        Box::into_raw(Box::new(ScPrimary {
            magic: MAGIC_PRIMARY,
            mode: Mode::Plain(p),
        }))
    }

    /// The primary, under a supervisor or not.
    pub(crate) fn primary(&mut self) -> io::Result<&mut Primary> {
        match &mut self.mode {
            Mode::Plain(p) => Ok(p),
            Mode::Supervised(s) => Ok(s.primary()),
            Mode::Gone => Err(invalid("sc_primary was handed to a supervisor")),
        }
    }

    /// The primary, unless a supervisor takes its events.
    fn events(&mut self) -> io::Result<&mut Primary> {
        match &mut self.mode {
            Mode::Plain(p) => Ok(p),
            _ => Err(errno(
                libc::EBUSY,
                "a supervisor runs this primary: its callback gets the events",
            )),
        }
    }

    /// Changes the settings, keeping the change only if they stay valid.
    fn settle(
        &mut self,
        change: impl FnOnce(&mut Settings) -> io::Result<()>,
    ) -> io::Result<c_int> {
        let p = self.primary()?;
        let mut s = p.settings().clone();
        change(&mut s)?;
        s.validate()?;
        *p.settings_mut() = s;
        Ok(0)
    }
}

/// The handle behind `p` with its settings changed by `change`.
///
/// # Safety
///
/// `p` is NULL or a live `sc_primary`.
unsafe fn set(
    name: &str,
    p: *mut ScPrimary,
    change: impl FnOnce(&mut Settings) -> io::Result<()>,
) -> c_int {
    // SAFETY: forwarded from the caller.
    call(name, || unsafe { handle(p) }?.settle(change))
}

/// Frees the primary (not while a supervisor runs it).
///
/// # Safety
///
/// `primary` is NULL or a live `sc_primary`, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn sc_primary_free(primary: *mut ScPrimary) {
    call_void("sc_primary_free", || {
        // SAFETY: the caller's promise.
        if let Ok(h) = unsafe { handle(primary) } {
            // Inside sc_supervisor_run's callback the supervisor owns it.
            if matches!(h.mode, Mode::Supervised(_)) {
                return;
            }
        }
        // SAFETY: the caller's promise; not supervised (checked above).
        drop(unsafe { take_handle(primary) });
    });
}

/// # Safety
///
/// `primary` is NULL or a live `sc_primary`; `path` NULL or a C string.
#[no_mangle]
pub unsafe extern "C" fn sc_primary_set_exec(
    primary: *mut ScPrimary,
    path: *const c_char,
) -> c_int {
    // SAFETY: the caller's promise.
    unsafe {
        set("sc_primary_set_exec", primary, |s| {
            s.exec = match path.is_null() {
                true => None,
                false => Some(PathBuf::from(c_os(path, "path")?)),
            };
            Ok(())
        })
    }
}

/// # Safety
///
/// `primary` is NULL or a live `sc_primary`; `args` NULL or `n` C strings.
#[no_mangle]
pub unsafe extern "C" fn sc_primary_set_args(
    primary: *mut ScPrimary,
    args: *const *const c_char,
    n: usize,
) -> c_int {
    // SAFETY: the caller's promise.
    unsafe {
        set("sc_primary_set_args", primary, |s| {
            if args.is_null() {
                if n != 0 {
                    return Err(invalid(format!("args is NULL but n is {n}")));
                }
                s.args = None;
                return Ok(());
            }
            let mut v = Vec::with_capacity(n);
            for (i, &arg) in c_ptrs(args, n, "args")?.iter().enumerate() {
                v.push(c_os(arg, &format!("args[{i}]"))?.to_os_string());
            }
            s.args = Some(v);
            Ok(())
        })
    }
}

/// # Safety
///
/// `primary` is NULL or a live `sc_primary`; `name` and `value` NULL or C strings.
#[no_mangle]
pub unsafe extern "C" fn sc_primary_set_env(
    primary: *mut ScPrimary,
    name: *const c_char,
    value: *const c_char,
) -> c_int {
    // SAFETY: the caller's promise.
    unsafe {
        set("sc_primary_set_env", primary, |s| {
            let name = env_name(c_os(name, "name")?)?;
            s.env.retain(|(k, _)| *k != name);
            if !value.is_null() {
                s.env.push((name, c_os(value, "value")?.to_os_string()));
            }
            Ok(())
        })
    }
}

/// A variable name as `execve` can carry it.
fn env_name(name: &OsStr) -> io::Result<OsString> {
    if name.is_empty() || name.as_bytes().contains(&b'=') {
        return Err(invalid(format!(
            "environment variable name {:?}: must be non-empty, without '='",
            name
        )));
    }
    Ok(name.to_os_string())
}

/// # Safety
///
/// `primary` is NULL or a live `sc_primary`; `dir` NULL or a C string.
#[no_mangle]
pub unsafe extern "C" fn sc_primary_set_cwd(primary: *mut ScPrimary, dir: *const c_char) -> c_int {
    // SAFETY: the caller's promise.
    unsafe {
        set("sc_primary_set_cwd", primary, |s| {
            s.cwd = match dir.is_null() {
                true => None,
                false => Some(PathBuf::from(c_os(dir, "dir")?)),
            };
            Ok(())
        })
    }
}

/// # Safety
///
/// `primary` is NULL or a live `sc_primary`.
#[no_mangle]
pub unsafe extern "C" fn sc_primary_set_ids(primary: *mut ScPrimary, uid: u32, gid: u32) -> c_int {
    // SAFETY: the caller's promise.
    unsafe {
        set("sc_primary_set_ids", primary, |s| {
            (s.uid, s.gid, s.groups) = (Some(uid), Some(gid), Vec::new());
            Ok(())
        })
    }
}

/// # Safety
///
/// `primary` is NULL or a live `sc_primary`; `user` and `group` NULL or C strings.
#[no_mangle]
pub unsafe extern "C" fn sc_primary_set_user(
    primary: *mut ScPrimary,
    user: *const c_char,
    group: *const c_char,
) -> c_int {
    // SAFETY: the caller's promise.
    unsafe {
        set("sc_primary_set_user", primary, |s| {
            let user = c_utf8(user, "user")?;
            let group = match group.is_null() {
                true => None,
                false => Some(c_utf8(group, "group")?),
            };
            s.set_user(user, group)
        })
    }
}

/// # Safety
///
/// `primary` is NULL or a live `sc_primary`.
#[no_mangle]
pub unsafe extern "C" fn sc_primary_clear_user(primary: *mut ScPrimary) -> c_int {
    // SAFETY: the caller's promise.
    unsafe {
        set("sc_primary_clear_user", primary, |s| {
            (s.uid, s.gid, s.groups) = (None, None, Vec::new());
            Ok(())
        })
    }
}

/// The policy for an `sc_policy` value.
pub(crate) fn policy_of(policy: c_int) -> io::Result<Policy> {
    match policy {
        SC_POLICY_RR => Ok(Policy::RoundRobin),
        SC_POLICY_SHARED => Ok(Policy::Shared),
        other => Err(invalid(format!(
            "policy {other}: expected SC_POLICY_RR (1) or SC_POLICY_SHARED (2)"
        ))),
    }
}

/// The `sc_policy` value of a policy.
pub(crate) fn policy_value(policy: Policy) -> io::Result<c_int> {
    match policy {
        Policy::RoundRobin => Ok(SC_POLICY_RR),
        Policy::Shared => Ok(SC_POLICY_SHARED),
        #[allow(unreachable_patterns)] // Policy grows (least-loaded, reuseport)
        other => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("policy {other} has no C constant in this version"),
        )),
    }
}

/// # Safety
///
/// `primary` is NULL or a live `sc_primary`.
#[no_mangle]
pub unsafe extern "C" fn sc_primary_set_policy(primary: *mut ScPrimary, policy: c_int) -> c_int {
    // SAFETY: the caller's promise.
    unsafe {
        set("sc_primary_set_policy", primary, |s| {
            s.policy = policy_of(policy)?;
            Ok(())
        })
    }
}

/// # Safety
///
/// `primary` is NULL or a live `sc_primary`.
#[no_mangle]
pub unsafe extern "C" fn sc_primary_policy(primary: *const ScPrimary) -> c_int {
    call("sc_primary_policy", || {
        // SAFETY: the caller's promise.
        let p = unsafe { handle(unconst(primary)) }?.primary()?;
        policy_value(p.settings().policy)
    })
}

/// # Safety
///
/// `primary` is NULL or a live `sc_primary`.
#[no_mangle]
pub unsafe extern "C" fn sc_primary_set_window(primary: *mut ScPrimary, window: usize) -> c_int {
    // SAFETY: the caller's promise.
    unsafe {
        set("sc_primary_set_window", primary, |s| {
            s.window = window;
            Ok(())
        })
    }
}

/// # Safety
///
/// `primary` is NULL or a live `sc_primary`.
#[no_mangle]
pub unsafe extern "C" fn sc_primary_set_backlog(primary: *mut ScPrimary, backlog: u32) -> c_int {
    // SAFETY: the caller's promise.
    unsafe {
        set("sc_primary_set_backlog", primary, |s| {
            s.backlog = backlog;
            Ok(())
        })
    }
}

/// # Safety
///
/// `primary` is NULL or a live `sc_primary`.
#[no_mangle]
pub unsafe extern "C" fn sc_primary_listen_rules(primary: *mut ScPrimary, preset: c_int) -> c_int {
    // SAFETY: the caller's promise.
    unsafe {
        set("sc_primary_listen_rules", primary, |s| {
            s.listen_rules = match preset {
                SC_LISTEN_DEFAULT => None,
                SC_LISTEN_NOTHING => Some(ListenRules::default()),
                SC_LISTEN_ANY => Some(ListenRules::any()),
                SC_LISTEN_UNPRIVILEGED => Some(ListenRules::unprivileged()),
                other => {
                    return Err(invalid(format!(
                        "preset {other}: expected an sc_listen_preset (0 to 3)"
                    )))
                }
            };
            Ok(())
        })
    }
}

/// # Safety
///
/// `primary` is NULL or a live `sc_primary`; `host` NULL or a C string.
#[no_mangle]
pub unsafe extern "C" fn sc_primary_listen_allow_tcp(
    primary: *mut ScPrimary,
    host: *const c_char,
    first: u16,
    last: u16,
) -> c_int {
    // SAFETY: the caller's promise.
    unsafe {
        set("sc_primary_listen_allow_tcp", primary, |s| {
            let host = match host.is_null() {
                true => None,
                false => {
                    let h = c_utf8(host, "host")?;
                    Some(h.parse::<IpAddr>().map_err(|_| {
                        invalid(format!("host {h:?}: expected an IP address (or NULL)"))
                    })?)
                }
            };
            if first > last {
                return Err(invalid(format!(
                    "ports {first}..{last}: first is above last"
                )));
            }
            s.listen_rules
                .get_or_insert_with(ListenRules::default)
                .tcp
                .push(TcpRule::new(host, first..=last));
            Ok(())
        })
    }
}

/// # Safety
///
/// `primary` is NULL or a live `sc_primary`; `dir` NULL or a C string.
#[no_mangle]
pub unsafe extern "C" fn sc_primary_listen_allow_unix_dir(
    primary: *mut ScPrimary,
    dir: *const c_char,
) -> c_int {
    // SAFETY: the caller's promise.
    unsafe {
        set("sc_primary_listen_allow_unix_dir", primary, |s| {
            let dir = PathBuf::from(c_os(dir, "dir")?);
            s.listen_rules
                .get_or_insert_with(ListenRules::default)
                .unix_dirs
                .push(dir);
            Ok(())
        })
    }
}

/// # Safety
///
/// `primary` is NULL or a live `sc_primary`; `id` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sc_primary_fork(primary: *mut ScPrimary, id: *mut u32) -> c_int {
    // SAFETY: the caller's promise.
    unsafe { sc_primary_fork_env(primary, ptr::null(), 0, id) }
}

/// # Safety
///
/// `primary` is NULL or a live `sc_primary`; `env` NULL or `n` C strings;
/// `id` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sc_primary_fork_env(
    primary: *mut ScPrimary,
    env: *const *const c_char,
    n: usize,
    id: *mut u32,
) -> c_int {
    call("sc_primary_fork", || {
        // SAFETY: the caller's promise.
        let p = unsafe { handle(primary) }?.primary()?;
        let mut vars: Vec<(OsString, OsString)> = Vec::with_capacity(n);
        // SAFETY: the caller's promise: NULL or n pointers at env.
        for (i, &ptr) in unsafe { c_ptrs(env, n, "env") }?.iter().enumerate() {
            {
                // SAFETY: each a C string by the caller's promise.
                let entry = unsafe { c_str(ptr, &format!("env[{i}]")) }?;
                let bytes = entry.to_bytes();
                let eq = bytes
                    .iter()
                    .position(|&b| b == b'=')
                    .ok_or_else(|| invalid(format!("env[{i}] {entry:?}: expected NAME=VALUE")))?;
                let name = env_name(OsStr::from_bytes(&bytes[..eq]))?;
                vars.push((name, OsStr::from_bytes(&bytes[eq + 1..]).to_os_string()));
            }
        }
        let new = p.fork_with_env(&vars)?;
        if !id.is_null() {
            // SAFETY: not NULL; writable by the caller's promise.
            unsafe { put(id, new, "id") }?;
        }
        Ok(0)
    })
}

/// # Safety
///
/// `primary` is NULL or a live `sc_primary`; `ev` NULL or an initialised event.
#[no_mangle]
pub unsafe extern "C" fn sc_primary_next_event(
    primary: *mut ScPrimary,
    timeout: c_int,
    ev: *mut sc_event,
) -> c_int {
    call("sc_primary_next_event", || {
        // SAFETY: the caller's promise.
        let p = unsafe { handle(primary) }?.events()?;
        // SAFETY: the caller's promise.
        unsafe {
            deliver(ev, || {
                Ok(p.next_event_timeout(timeout_ms(timeout))?
                    .map(Fill::primary))
            })
        }
    })
}

/// # Safety
///
/// `primary` is NULL or a live `sc_primary`; `ev` NULL or an initialised event.
#[no_mangle]
pub unsafe extern "C" fn sc_primary_try_next_event(
    primary: *mut ScPrimary,
    ev: *mut sc_event,
) -> c_int {
    call("sc_primary_try_next_event", || {
        // SAFETY: the caller's promise.
        let p = unsafe { handle(primary) }?.events()?;
        // SAFETY: the caller's promise.
        unsafe { deliver(ev, || Ok(p.try_next_event()?.map(Fill::primary))) }
    })
}

/// # Safety
///
/// `primary` is NULL or a live `sc_primary`.
#[no_mangle]
pub unsafe extern "C" fn sc_primary_fd(primary: *const ScPrimary) -> c_int {
    call("sc_primary_fd", || {
        // SAFETY: the caller's promise.
        Ok(unsafe { handle(unconst(primary)) }?.primary()?.as_raw_fd())
    })
}

/// # Safety
///
/// `primary` is NULL or a live `sc_primary`.
#[no_mangle]
pub unsafe extern "C" fn sc_primary_poll_timeout(primary: *const ScPrimary) -> c_int {
    call("sc_primary_poll_timeout", || {
        // SAFETY: the caller's promise.
        let p = unsafe { handle(unconst(primary)) }?.primary()?;
        Ok(ms_rounded_up(p.poll_timeout()))
    })
}

/// # Safety
///
/// `primary` is NULL or a live `sc_primary`; `data` NULL or `len` bytes;
/// `fds` NULL or `nfds` ints.
#[no_mangle]
pub unsafe extern "C" fn sc_primary_send(
    primary: *mut ScPrimary,
    id: u32,
    data: *const c_void,
    len: usize,
    fds: *const c_int,
    nfds: usize,
) -> c_int {
    call("sc_primary_send", || {
        // SAFETY: the caller's promise.
        let p = unsafe { handle(primary) }?.primary()?;
        // SAFETY: the caller's promise.
        let (bytes, fds) = unsafe { (c_bytes(data, len, "data")?, c_fds(fds, nfds, "fds")?) };
        p.send(id, bytes, &fds)?;
        Ok(0)
    })
}

/// # Safety
///
/// `primary` is NULL or a live `sc_primary`.
#[no_mangle]
pub unsafe extern "C" fn sc_primary_kill(primary: *mut ScPrimary, id: u32, sig: c_int) -> c_int {
    call("sc_primary_kill", || {
        // SAFETY: the caller's promise.
        let p = unsafe { handle(primary) }?.primary()?;
        p.kill(id, Signal::from_raw(sig)?)?;
        Ok(0)
    })
}

/// # Safety
///
/// `primary` is NULL or a live `sc_primary`.
#[no_mangle]
pub unsafe extern "C" fn sc_primary_disconnect(
    primary: *mut ScPrimary,
    id: u32,
    timeout: c_int,
) -> c_int {
    call("sc_primary_disconnect", || {
        // SAFETY: the caller's promise.
        let p = unsafe { handle(primary) }?.primary()?;
        p.disconnect(id, timeout_ms(timeout))?;
        Ok(0)
    })
}

/// # Safety
///
/// `primary` is NULL or a live `sc_primary`.
#[no_mangle]
pub unsafe extern "C" fn sc_primary_disconnect_all(
    primary: *mut ScPrimary,
    timeout: c_int,
) -> c_int {
    call("sc_primary_disconnect_all", || {
        // SAFETY: the caller's promise.
        let p = unsafe { handle(primary) }?.primary()?;
        p.disconnect_all(timeout_ms(timeout))?;
        Ok(0)
    })
}

/// # Safety
///
/// `primary` is NULL or a live `sc_primary`; `ids` NULL or `cap` writable u32s.
#[no_mangle]
pub unsafe extern "C" fn sc_primary_worker_ids(
    primary: *const ScPrimary,
    ids: *mut u32,
    cap: usize,
) -> c_int {
    call("sc_primary_worker_ids", || {
        // SAFETY: the caller's promise.
        let p = unsafe { handle(unconst(primary)) }?.primary()?;
        if ids.is_null() && cap > 0 {
            return Err(invalid(format!("ids is NULL but cap is {cap}")));
        }
        let all = p.workers();
        for (i, w) in all.iter().take(cap).enumerate() {
            // SAFETY: i < cap slots, writable by the caller's promise.
            unsafe { ids.add(i).write(w.id) };
        }
        c_int::try_from(all.len()).map_err(|_| invalid("too many workers to count in an int"))
    })
}

/// `struct sc_worker_info` of the header.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct sc_worker_info {
    pub(crate) size: usize,
    pub(crate) id: u32,
    pub(crate) pid: i32,
    pub(crate) state: c_int,
    pub(crate) after_disconnect: c_int,
    pub(crate) in_flight: usize,
}

/// # Safety
///
/// `primary` is NULL or a live `sc_primary`; `info` NULL or an
/// `sc_worker_info` with its `size` set.
#[no_mangle]
pub unsafe extern "C" fn sc_primary_worker_info(
    primary: *const ScPrimary,
    id: u32,
    info: *mut sc_worker_info,
) -> c_int {
    call("sc_primary_worker_info", || {
        // SAFETY: the caller's promise.
        let p = unsafe { handle(unconst(primary)) }?.primary()?;
        if info.is_null() || (info as usize) % std::mem::align_of::<sc_worker_info>() != 0 {
            return Err(invalid("info is NULL or misaligned"));
        }
        // SAFETY: not NULL, aligned; its first field readable by the promise.
        let size = unsafe { ptr::addr_of!((*info).size).read() };
        let ours = std::mem::size_of::<sc_worker_info>();
        if size < ours {
            return Err(invalid(format!(
                "info->size is {size}, expected at least {ours}: initialise it with SC_WORKER_INFO_INIT"
            )));
        }
        let w = p
            .workers()
            .into_iter()
            .find(|w| w.id == id)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no worker {id}")))?;
        #[allow(unreachable_patterns)] // State may grow
        let state = match w.state {
            State::None => 0,
            State::Online => 1,
            State::Listening => 2,
            State::Disconnected => 3,
            State::Dead => 4,
            _ => -1,
        };
        let out = sc_worker_info {
            size,
            id: w.id,
            pid: w.pid,
            state,
            after_disconnect: c_int::from(w.exited_after_disconnect),
            in_flight: w.in_flight,
        };
        // SAFETY: size ≥ ours: the whole struct is writable.
        unsafe { info.write(out) };
        Ok(0)
    })
}

/// "rr" or "shared", static; NULL otherwise.
#[no_mangle]
pub extern "C" fn sc_policy_name(policy: c_int) -> *const c_char {
    std::panic::catch_unwind(|| match policy {
        SC_POLICY_RR => b"rr\0".as_ptr().cast(),
        SC_POLICY_SHARED => b"shared\0".as_ptr().cast(),
        _ => ptr::null(),
    })
    .unwrap_or(ptr::null())
}

/// The `sc_policy` for a name, or -EINVAL.
///
/// # Safety
///
/// `name` is NULL or a C string.
#[no_mangle]
pub unsafe extern "C" fn sc_policy_parse(name: *const c_char) -> c_int {
    call("sc_policy_parse", || {
        // SAFETY: the caller's promise.
        let name = unsafe { c_utf8(name, "name") }?;
        let policy = Policy::parse(name)
            .ok_or_else(|| invalid(format!("policy {name:?}: expected rr or shared (none)")))?;
        policy_value(policy)
    })
}
