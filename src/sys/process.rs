//! Child processes: `pipe2`, a fork/exec that allocates nothing in the child,
//! `waitpid` decoding, `kill`, and `PR_SET_PDEATHSIG` (≈ libuv's
//! `src/unix/process.c`).
//!
//! Everything the child needs between `fork` and `execve` is built by the
//! parent first ([`SpawnPlan`], plus fixed-size stack arrays in [`spawn`]),
//! because after `fork` in a multi-threaded process only async-signal-safe
//! calls are allowed: another thread may have held the allocator's lock.
//! User and group names are resolved before too ([`super::user`]).

use std::error::Error;
use std::ffi::{CString, OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr;

use libc::c_char;

use super::{cvt, cvt_r};

/// Most fds one [`spawn`] can map into the child: enough for a binary
/// upgrade to pass every listening socket of a primary and its readiness
/// pipe. The plan lives in fixed arrays on the parent's stack, copied
/// before `fork`, so the child allocates nothing.
pub const MAX_FD_MAPPINGS: usize = 128;

/// Mapped targets must be below this. The child parks its temporary
/// duplicates just above the highest target (not at a fixed 256, which a
/// process under `ulimit -n 64` could not reach), so a temporary can never
/// be a target.
const TMP_FD_BASE: RawFd = 256;

/// `CLOSE_RANGE_CLOEXEC` from `<linux/close_range.h>` (Linux 5.11); older
/// `libc` releases do not export it.
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 4;

/// Highest fd (exclusive) the `F_SETFD` fallback visits when the kernel has
/// no `close_range(CLOSE_RANGE_CLOEXEC)`.
const FALLBACK_FD_LIMIT: RawFd = 1024;

/// Creates a pipe with `pipe2(O_CLOEXEC)`; returns (read end, write end).
///
/// Both ends are close-on-exec from birth. Does not retry `EINTR` (`pipe2`
/// never blocks).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds: [RawFd; 2] = [-1; 2];
    // SAFETY: `fds` is a valid, writable array of two c_ints, as pipe2 expects.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so fds[0] is open and owned by nobody else.
    let read_end = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: likewise for fds[1].
    let write_end = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    Ok((read_end, write_end))
}

fn invalid_input(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Everything `execve` needs, converted to C strings before `fork` so the
/// child allocates nothing.
///
/// `program` is used as given: `execve` does not search `PATH`.
pub struct SpawnPlan {
    program: CString,
    // Owned storage; the pointer arrays below point into these heap buffers,
    // which do not move when the Vec or the plan moves.
    argv: Vec<CString>,
    env: Vec<CString>,
    // NULL-terminated `char *const[]` arrays for execve.
    argv_ptrs: Vec<*const c_char>,
    envp_ptrs: Vec<*const c_char>,
    cwd: Option<CString>,
    uid: Option<libc::uid_t>,
    gid: Option<libc::gid_t>,
    groups: Option<Box<[libc::gid_t]>>,
    pdeathsig: Option<i32>,
    /// Entries whose value the child fills in with its own pid.
    pid_env: Vec<PidSlot>,
}

// SAFETY: the raw pointers only point into buffers the plan owns (its
// `CString`s and the `PidSlot`s); the parent never writes through them after
// building them, and only a forked child, in its own copy of memory, writes
// a pid slot. Sharing or sending the plan is as safe as sharing its strings.
unsafe impl Send for SpawnPlan {}
// SAFETY: see the `Send` impl; `&SpawnPlan` gives no way to mutate anything.
unsafe impl Sync for SpawnPlan {}

impl SpawnPlan {
    /// Builds a plan to run `program` with the full `argv` (including
    /// `argv[0]`) and exactly the environment `env`.
    ///
    /// Defaults: inherit the cwd, uid and gid; parent-death signal `SIGTERM`.
    /// Returns `InvalidInput` (naming the culprit) if `argv` is empty, if any
    /// string contains a NUL byte, or if an env key is empty or contains `=`.
    pub fn new(
        program: &Path,
        argv: &[OsString],
        env: &[(OsString, OsString)],
    ) -> io::Result<SpawnPlan> {
        let program = CString::new(program.as_os_str().as_bytes())
            .map_err(|_| invalid_input("spawn: program path contains a NUL byte".into()))?;
        if argv.is_empty() {
            return Err(invalid_input(
                "spawn: argv is empty (argv[0] is required)".into(),
            ));
        }
        let argv = argv
            .iter()
            .enumerate()
            .map(|(i, arg)| {
                CString::new(arg.as_bytes())
                    .map_err(|_| invalid_input(format!("spawn: argv[{i}] contains a NUL byte")))
            })
            .collect::<io::Result<Vec<_>>>()?;
        let env = env
            .iter()
            .enumerate()
            .map(|(i, (key, value))| env_entry(i, key, value))
            .collect::<io::Result<Vec<_>>>()?;
        let argv_ptrs = null_terminated(&argv);
        let envp_ptrs = null_terminated(&env);
        Ok(SpawnPlan {
            program,
            argv,
            env,
            argv_ptrs,
            envp_ptrs,
            cwd: None,
            uid: None,
            gid: None,
            groups: None,
            pdeathsig: Some(libc::SIGTERM),
            pid_env: Vec::new(),
        })
    }

    /// Makes the child `chdir(dir)` before exec. `InvalidInput` if `dir`
    /// contains a NUL byte.
    pub fn cwd(&mut self, dir: &Path) -> io::Result<()> {
        let dir = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| invalid_input("spawn: cwd contains a NUL byte".into()))?;
        self.cwd = Some(dir);
        Ok(())
    }

    /// Makes the child `setuid(uid)`, last of the credential changes. A uid
    /// needs a [`gid`](SpawnPlan::gid) too: [`spawn`] refuses a uid alone,
    /// which would leave the child in the parent's group (root's, typically).
    pub fn uid(&mut self, uid: u32) {
        self.uid = Some(uid);
    }

    /// Makes the child `setgid(gid)`, after `setgroups` and before `setuid`.
    pub fn gid(&mut self, gid: u32) {
        self.gid = Some(gid);
    }

    /// Makes the child `setgroups(groups)` before `setgid`. Without this
    /// call, a plan with a uid or gid drops every supplementary group
    /// (`setgroups(0, NULL)`), and one without inherits the parent's.
    pub fn groups(&mut self, groups: &[u32]) {
        self.groups = Some(groups.into());
    }

    /// Adds the environment entry `key=<the child's own pid>` (systemd's
    /// `LISTEN_PID` needs that), replacing any `key` given to
    /// [`SpawnPlan::new`].
    ///
    /// The entry is allocated here, with room for any pid; the child writes
    /// the digits into its own copy after `fork`, so the plan serves any
    /// number of spawns. `InvalidInput` if `key` is empty or contains `=` or
    /// a NUL byte.
    pub fn env_child_pid(&mut self, key: impl AsRef<OsStr>) -> io::Result<()> {
        let key = key.as_ref();
        // Validates the key the way `new` does.
        let probe = env_entry(self.env.len(), &key.to_owned(), &OsString::new())?;
        let mut prefix = probe.into_bytes(); // "KEY="
        self.env.retain(|kv| !kv.as_bytes().starts_with(&prefix));
        self.pid_env
            .retain(|slot| !slot.bytes().starts_with(&prefix));
        let value_at = prefix.len();
        prefix.resize(value_at + PID_DIGITS + 1, 0);
        self.pid_env
            .push(PidSlot::new(prefix.into_boxed_slice(), value_at));
        self.envp_ptrs = self
            .env
            .iter()
            .map(|s| s.as_ptr())
            .chain(self.pid_env.iter().map(|slot| slot.ptr.cast_const().cast()))
            .chain(std::iter::once(ptr::null()))
            .collect();
        Ok(())
    }

    /// Signal the child gets when its parent dies (`PR_SET_PDEATHSIG`), or
    /// `None` for no such signal. Default `Some(SIGTERM)`.
    ///
    /// Linux ties this to the *thread* that forked: if that thread exits
    /// while the rest of the parent lives on, the child still gets the signal.
    pub fn pdeathsig(&mut self, sig: Option<i32>) {
        self.pdeathsig = sig;
    }
}

impl fmt::Debug for SpawnPlan {
    // Env values may hold secrets, so only the keys are shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let env_keys: Vec<_> = self
            .env
            .iter()
            .map(|kv| {
                let bytes = kv.as_bytes();
                let key = bytes.split(|&b| b == b'=').next().unwrap_or(bytes);
                String::from_utf8_lossy(key).into_owned()
            })
            .collect();
        f.debug_struct("SpawnPlan")
            .field("program", &self.program)
            .field("argv", &self.argv)
            .field("env_keys", &env_keys)
            .field("cwd", &self.cwd)
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .field("groups", &self.groups)
            .field("pdeathsig", &self.pdeathsig)
            .field("pid_env", &self.pid_env)
            .finish()
    }
}

/// Decimal digits of the largest pid (`i32::MAX`).
const PID_DIGITS: usize = 10;

/// One `KEY=<pid>` environment entry: `KEY=` and room for the digits and
/// a NUL, on the heap, written only by a forked child.
struct PidSlot {
    /// From `Box::into_raw`; freed in `Drop`. Raw so that a child may write
    /// its copy while the plan is borrowed shared.
    ptr: *mut u8,
    len: usize,
    value_at: usize,
}

impl PidSlot {
    fn new(buf: Box<[u8]>, value_at: usize) -> PidSlot {
        let len = buf.len();
        let ptr = Box::into_raw(buf).cast::<u8>();
        PidSlot { ptr, len, value_at }
    }

    /// The entry as the parent sees it: `KEY=` and NULs.
    fn bytes(&self) -> &[u8] {
        // SAFETY: ptr/len describe the live allocation made in `new`, which
        // the parent never writes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Writes `pid` and a NUL after `KEY=`. For the forked child only:
    /// no allocation, no panic.
    fn write_pid(&self, pid: i32) {
        let mut digits = [0u8; PID_DIGITS];
        let mut n = pid.unsigned_abs();
        let mut first = PID_DIGITS;
        for slot in digits.iter_mut().rev() {
            *slot = b'0' + (n % 10) as u8;
            first -= 1;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        // SAFETY: ptr/len describe the allocation made in `new`; this child
        // is single-threaded and holds no other reference into it.
        let buf = unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) };
        let value = buf.iter_mut().skip(self.value_at);
        let digits = digits.iter().skip(first).chain(std::iter::once(&0));
        for (dst, src) in value.zip(digits) {
            *dst = *src;
        }
    }
}

impl Drop for PidSlot {
    fn drop(&mut self) {
        let slice = ptr::slice_from_raw_parts_mut(self.ptr, self.len);
        // SAFETY: the pointer came from Box::into_raw of a boxed slice of
        // exactly `len` bytes, and is freed only here.
        drop(unsafe { Box::from_raw(slice) });
    }
}

impl fmt::Debug for PidSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = self.bytes().get(..self.value_at.saturating_sub(1));
        write!(
            f,
            "{}=<pid>",
            String::from_utf8_lossy(key.unwrap_or_default())
        )
    }
}

fn env_entry(i: usize, key: &OsString, value: &OsString) -> io::Result<CString> {
    let key = key.as_bytes();
    let name = String::from_utf8_lossy(key);
    if key.is_empty() {
        return Err(invalid_input(format!(
            "spawn: env variable #{i} has an empty name"
        )));
    }
    if key.contains(&b'=') {
        return Err(invalid_input(format!(
            "spawn: env variable #{i} name {name:?} contains '='"
        )));
    }
    let mut entry = Vec::with_capacity(key.len() + 1 + value.len());
    entry.extend_from_slice(key);
    entry.push(b'=');
    entry.extend_from_slice(value.as_bytes());
    CString::new(entry).map_err(|_| {
        invalid_input(format!(
            "spawn: env variable #{i} ({name:?}) contains a NUL byte"
        ))
    })
}

fn null_terminated(strings: &[CString]) -> Vec<*const c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(ptr::null()))
        .collect()
}

/// The fd plan, copied into plain stack arrays before `fork`.
struct FdPlan {
    /// (source fd in the parent, target fd in the child).
    map: [(RawFd, RawFd); MAX_FD_MAPPINGS],
    len: usize,
    /// Lowest fd number above every target: where duplicates are parked.
    park: RawFd,
    /// Inclusive ranges of fds >= 3 that must become close-on-exec: the gaps
    /// between the sorted targets and everything above the highest one.
    gaps: [(libc::c_uint, libc::c_uint); MAX_FD_MAPPINGS + 1],
    gaps_len: usize,
    /// `is_target[fd]` for fd < TMP_FD_BASE (the fallback loop uses it).
    is_target: [bool; TMP_FD_BASE as usize],
}

impl FdPlan {
    fn new(fds: &[(BorrowedFd<'_>, RawFd)]) -> io::Result<FdPlan> {
        if fds.len() > MAX_FD_MAPPINGS {
            return Err(invalid_input(format!(
                "spawn: {} fd mappings given, at most {MAX_FD_MAPPINGS} allowed",
                fds.len()
            )));
        }
        let mut plan = FdPlan {
            map: [(-1, -1); MAX_FD_MAPPINGS],
            park: 3,
            len: 0,
            gaps: [(0, 0); MAX_FD_MAPPINGS + 1],
            gaps_len: 0,
            is_target: [false; TMP_FD_BASE as usize],
        };
        for (slot, (src, target)) in plan.map.iter_mut().zip(fds) {
            let seen = usize::try_from(*target)
                .ok()
                .and_then(|t| plan.is_target.get_mut(t))
                .ok_or_else(|| {
                    invalid_input(format!(
                        "spawn: target fd {target} is outside 0..{TMP_FD_BASE}"
                    ))
                })?;
            if *seen {
                return Err(invalid_input(format!(
                    "spawn: target fd {target} is mapped twice"
                )));
            }
            *seen = true;
            *slot = (src.as_raw_fd(), *target);
            plan.len += 1;
            plan.park = plan.park.max(*target + 1);
        }
        // Walk the targets in ascending order (is_target is indexed by fd).
        let is_target = plan.is_target;
        let mut next: libc::c_uint = 3;
        for (fd, _) in is_target.iter().enumerate().skip(3).filter(|(_, t)| **t) {
            let fd = fd as libc::c_uint; // < TMP_FD_BASE
            if fd > next {
                plan.push_gap(next, fd - 1);
            }
            next = fd + 1;
        }
        plan.push_gap(next, libc::c_uint::MAX);
        Ok(plan)
    }

    fn push_gap(&mut self, first: libc::c_uint, last: libc::c_uint) {
        // At most MAX_FD_MAPPINGS targets make at most one gap more, so
        // the slot always exists.
        if let Some(slot) = self.gaps.get_mut(self.gaps_len) {
            *slot = (first, last);
            self.gaps_len += 1;
        }
    }
}

/// Forks and execs `plan`, mapping each `(parent fd, child fd number)` of
/// `fds` into the child; returns the child's pid once `execve` succeeded.
///
/// Only fds 0, 1, 2 (inherited untouched unless mapped) and the mapped
/// targets survive exec; everything else is made close-on-exec in the child.
/// A source may be mapped to several targets. `InvalidInput` if there are
/// more than [`MAX_FD_MAPPINGS`] entries, or a target is repeated or outside
/// `0..256`.
///
/// `InvalidInput` too for a plan with a uid and no gid.
///
/// C calls, parent: `pipe2(O_CLOEXEC)`, `fcntl(F_DUPFD_CLOEXEC)`,
/// `pthread_sigmask`, `getpid`, `fork`, `read` (EINTR retried), and
/// `waitpid` (EINTR retried) to reap a child that failed. Child, in this
/// order: `signal`, `fcntl`, `dup2` (EINTR retried), `close`,
/// `close_range(CLOSE_RANGE_CLOEXEC)`, `chdir`, `setgroups`, `setgid`,
/// `setuid`, then `prctl(PR_SET_PDEATHSIG)` and `getppid` (after the
/// credential change, which clears the death signal), `getpid`,
/// `sigprocmask`, `execve`, and on failure `write` (EINTR retried) +
/// `_exit(127)`.
///
/// A failure in the child comes back, with the child already reaped, as an
/// `io::Error` of the errno's kind holding a [`ChildError`] that names the
/// step: `"setuid(65534): Operation not permitted (os error 1)"`,
/// `"chdir /nope: ..."`, `"exec /bin/x: ..."`.
pub fn spawn(plan: &SpawnPlan, fds: &[(BorrowedFd<'_>, RawFd)]) -> io::Result<i32> {
    if let (Some(uid), None) = (plan.uid, plan.gid) {
        return Err(invalid_input(format!(
            "spawn: uid {uid} without a gid (the child would keep the parent's group)"
        )));
    }
    let fd_plan = FdPlan::new(fds)?;

    let (err_read, err_write) = pipe()?;
    // If the write end's number is a target, the child's dup2 would close it
    // and an exec failure would look like success: park it above all targets.
    let err_write = match usize::try_from(err_write.as_raw_fd()) {
        Ok(n) if fd_plan.is_target.get(n).copied().unwrap_or(false) => {
            dup_above_targets(err_write, fd_plan.park)?
        }
        _ => err_write,
    };

    // Block every signal so no handler of ours runs in the child before it
    // resets the dispositions; the child unblocks everything before exec.
    // SAFETY: all-zero bytes are a valid sigset_t; sigfillset fills it.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `all` is a valid sigset_t we own.
    unsafe { libc::sigfillset(&mut all) };
    // SAFETY: all-zero bytes are a valid sigset_t; pthread_sigmask overwrites it.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers refer to valid sigset_t values on our stack.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }

    let parent_pid = getpid();
    // SAFETY: the child branch below only makes async-signal-safe calls on
    // memory prepared before the fork, and always ends in execve or _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        child_after_fork(plan, &fd_plan, err_write.as_raw_fd(), parent_pid);
    }
    let fork_err = io::Error::last_os_error();

    // SAFETY: `old` holds the mask saved above; a null old-set pointer is allowed.
    // It cannot fail with a valid `how` and set, so the result is ignored.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, ptr::null_mut()) };
    if pid == -1 {
        return Err(fork_err);
    }

    // Only the child may hold a write end now, so EOF means exec closed it.
    drop(err_write);
    let mut buf = [0u8; 8];
    let mut got = 0;
    let mut pipe = File::from(err_read);
    while let Some(rest) = buf.get_mut(got..) {
        if rest.is_empty() {
            break;
        }
        match pipe.read(rest) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // Cannot tell whether exec worked; don't leave an unknown child.
                let _ = kill(pid, libc::SIGKILL);
                let _ = wait_pid(pid);
                return Err(e);
            }
        }
    }
    match got {
        0 => Ok(pid),
        _ => {
            // The child reported a failure and called _exit(127): reap it.
            let _ = wait_pid(pid);
            match buf.get(..got).and_then(decode_report) {
                Some((stage, errno)) => Err(ChildError::new(plan, stage, errno).into()),
                None => Err(io::Error::new(
                    io::ErrorKind::Other,
                    "spawn: short read on the child's error pipe",
                )),
            }
        }
    }
}

/// Duplicates `fd` to the lowest free number >= `base` (above every target) with
/// `fcntl(F_DUPFD_CLOEXEC)`, closing the original.
fn dup_above_targets(fd: OwnedFd, base: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: `fd` is open and ours; F_DUPFD_CLOEXEC only creates a new fd.
    let moved = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, base) })?;
    // SAFETY: fcntl just returned this new fd; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(moved) })
}

/// The step of [`spawn`] that failed in the child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
#[repr(u32)]
pub enum Stage {
    /// Moving the mapped fds into place, or marking the rest close-on-exec.
    Fds,
    /// `chdir` to the plan's cwd.
    Chdir,
    /// `setgroups`.
    Setgroups,
    /// `setgid`.
    Setgid,
    /// `setuid`.
    Setuid,
    /// `prctl(PR_SET_PDEATHSIG)`.
    Pdeathsig,
    /// `sigprocmask`, unblocking every signal.
    Sigmask,
    /// `execve` itself.
    Exec,
}

/// Every stage, indexed by its code (`stage as u32`).
const STAGES: [Stage; 8] = [
    Stage::Fds,
    Stage::Chdir,
    Stage::Setgroups,
    Stage::Setgid,
    Stage::Setuid,
    Stage::Pdeathsig,
    Stage::Sigmask,
    Stage::Exec,
];

/// What the child writes on its error pipe: the stage code, then the errno,
/// native-endian, 8 bytes in one `write`. No allocation, no panic.
fn encode_report(stage: Stage, errno: i32) -> [u8; 8] {
    let mut out = [0u8; 8];
    let bytes = (stage as u32).to_ne_bytes().into_iter();
    for (dst, src) in out.iter_mut().zip(bytes.chain(errno.to_ne_bytes())) {
        *dst = src;
    }
    out
}

/// The parent's side of [`encode_report`]; `None` unless `buf` is a whole
/// report with a known stage.
fn decode_report(buf: &[u8]) -> Option<(Stage, i32)> {
    let (code, errno) = match buf {
        [a, b, c, d, e, f, g, h] => ([*a, *b, *c, *d], [*e, *f, *g, *h]),
        _ => return None,
    };
    let stage = STAGES.get(usize::try_from(u32::from_ne_bytes(code)).ok()?)?;
    Some((*stage, i32::from_ne_bytes(errno)))
}

/// A failure in the forked child of [`spawn`]: which step, and its errno.
///
/// `spawn` returns it inside an `io::Error` of the errno's kind, whose
/// message names the step and its argument (see [`ChildError::of`]).
#[derive(Debug, Clone)]
pub struct ChildError {
    stage: Stage,
    errno: i32,
    what: String,
}

impl ChildError {
    fn new(plan: &SpawnPlan, stage: Stage, errno: i32) -> ChildError {
        let lossy = |c: Option<&CString>| {
            c.map(|c| String::from_utf8_lossy(c.as_bytes()).into_owned())
                .unwrap_or_default()
        };
        let opt = |n: Option<u32>| n.map(|n| n.to_string()).unwrap_or_default();
        let what = match stage {
            Stage::Fds => "setting up the child's fds".to_string(),
            Stage::Chdir => format!("chdir {}", lossy(plan.cwd.as_ref())),
            Stage::Setgroups => match plan.groups.as_deref().unwrap_or_default() {
                list if list.len() <= 16 => format!("setgroups({list:?})"),
                list => format!("setgroups({} groups)", list.len()),
            },
            Stage::Setgid => format!("setgid({})", opt(plan.gid)),
            Stage::Setuid => format!("setuid({})", opt(plan.uid)),
            Stage::Pdeathsig => format!(
                "prctl(PR_SET_PDEATHSIG, {})",
                plan.pdeathsig.unwrap_or_default()
            ),
            Stage::Sigmask => "sigprocmask".to_string(),
            Stage::Exec => format!("exec {}", lossy(Some(&plan.program))),
        };
        ChildError { stage, errno, what }
    }

    /// The step that failed.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// The errno it failed with.
    pub fn errno(&self) -> i32 {
        self.errno
    }

    /// The `ChildError` inside an error [`spawn`] returned, if it is one.
    pub fn of(e: &io::Error) -> Option<&ChildError> {
        e.get_ref()?.downcast_ref()
    }
}

impl fmt::Display for ChildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let os = io::Error::from_raw_os_error(self.errno);
        write!(f, "{}: {os}", self.what)
    }
}

impl Error for ChildError {}

impl From<ChildError> for io::Error {
    fn from(e: ChildError) -> io::Error {
        io::Error::new(io::Error::from_raw_os_error(e.errno).kind(), e)
    }
}

/// The calling thread's errno. Async-signal-safe.
fn errno() -> i32 {
    // SAFETY: __errno_location always returns a valid pointer to this
    // thread's errno.
    unsafe { *libc::__errno_location() }
}

/// Reports `err` at `stage` to the parent through the error pipe and exits.
/// Runs in the forked child: async-signal-safe calls only.
fn child_fail(err_fd: RawFd, stage: Stage, err: i32) -> ! {
    let bytes = encode_report(stage, err);
    loop {
        // SAFETY: `bytes` is a valid 8-byte buffer; a bad fd only yields EBADF.
        let n = unsafe { libc::write(err_fd, bytes.as_ptr().cast(), bytes.len()) };
        // 8 bytes < PIPE_BUF, so a pipe write is all-or-nothing.
        if n != -1 || errno() != libc::EINTR {
            break;
        }
    }
    // SAFETY: _exit is async-signal-safe and skips atexit handlers and
    // stdio flushing, which belong to the parent.
    unsafe { libc::_exit(127) }
}

/// The forked child: async-signal-safe calls only, no allocation, no panics.
fn child_after_fork(plan: &SpawnPlan, fds: &FdPlan, err_fd: RawFd, parent_pid: i32) -> ! {
    // a. Default dispositions, so no parent handler can run once signals are
    //    unblocked (and SIG_IGN, e.g. Rust's SIGPIPE, is not inherited).
    //    glibc refuses its internal 32 and 33 with EINVAL; an inherited
    //    SIG_IGN on those survives, as it does with posix_spawn.
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: signal() is async-signal-safe; invalid or reserved numbers
        // just fail with EINVAL, which is ignored on purpose.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }

    // b. Park every source above all targets first, so overlapping mappings
    //    (3->4 and 4->3) cannot clobber each other.
    let mut tmp: [RawFd; MAX_FD_MAPPINGS] = [-1; MAX_FD_MAPPINGS];
    for (slot, (src, _)) in tmp.iter_mut().zip(fds.map.iter().take(fds.len)) {
        // SAFETY: F_DUPFD_CLOEXEC only creates a new fd; a bad src is EBADF.
        let fd = unsafe { libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, fds.park) };
        if fd == -1 {
            child_fail(err_fd, Stage::Fds, errno());
        }
        *slot = fd;
    }
    for (tmp_fd, (_, target)) in tmp.iter().zip(fds.map.iter().take(fds.len)) {
        // tmp >= park > target, so dup2 always clears FD_CLOEXEC on the target.
        loop {
            // SAFETY: dup2 on fds of this (single-threaded) child; the
            // target is replaced atomically.
            if unsafe { libc::dup2(*tmp_fd, *target) } != -1 {
                break;
            }
            let e = errno();
            if e != libc::EINTR {
                child_fail(err_fd, Stage::Fds, e);
            }
        }
    }
    for tmp_fd in tmp.iter().take(fds.len) {
        // SAFETY: closing our own temporary duplicate; errors are harmless
        // (it is close-on-exec anyway).
        unsafe { libc::close(*tmp_fd) };
    }

    // c. Everything >= 3 that is not a target becomes close-on-exec. The
    //    error pipe stays open until exec: it was close-on-exec already.
    for (first, last) in fds.gaps.iter().take(fds.gaps_len) {
        // SAFETY: close_range only changes fd flags; the arguments are plain
        // integers with first <= last.
        let rc =
            unsafe { libc::syscall(libc::SYS_close_range, *first, *last, CLOSE_RANGE_CLOEXEC) };
        if rc == -1 {
            let e = errno();
            if e == libc::ENOSYS || e == libc::EINVAL {
                cloexec_fallback(fds, err_fd);
                break;
            }
            child_fail(err_fd, Stage::Fds, e);
        }
    }

    // d. Working directory and credentials (groups, then gid, then uid:
    //    after setuid we may no longer be allowed to change the others).
    if let Some(dir) = &plan.cwd {
        // SAFETY: dir is a NUL-terminated string owned by the plan.
        if unsafe { libc::chdir(dir.as_ptr()) } == -1 {
            child_fail(err_fd, Stage::Chdir, errno());
        }
    }
    let groups: Option<&[libc::gid_t]> = match &plan.groups {
        Some(list) => Some(list),
        None if plan.uid.is_some() || plan.gid.is_some() => Some(&[]),
        None => None,
    };
    if let Some(list) = groups {
        // SAFETY: the pointer and length describe a slice owned by the plan
        // (a zero length with a dangling pointer is never read).
        if unsafe { libc::setgroups(list.len(), list.as_ptr()) } == -1 {
            child_fail(err_fd, Stage::Setgroups, errno());
        }
    }
    if let Some(gid) = plan.gid {
        // SAFETY: setgid takes a plain integer.
        if unsafe { libc::setgid(gid) } == -1 {
            child_fail(err_fd, Stage::Setgid, errno());
        }
    }
    if let Some(uid) = plan.uid {
        // SAFETY: setuid takes a plain integer.
        if unsafe { libc::setuid(uid) } == -1 {
            child_fail(err_fd, Stage::Setuid, errno());
        }
    }

    // e. Parent-death signal, only now: a change of uid or gid clears it.
    //    Then close the race with a parent that died before prctl: we have
    //    been reparented already.
    if let Some(sig) = plan.pdeathsig {
        // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number; a bad one
        // yields EINVAL.
        let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong) };
        if rc == -1 {
            child_fail(err_fd, Stage::Pdeathsig, errno());
        }
        // SAFETY: getppid is async-signal-safe and cannot fail.
        if unsafe { libc::getppid() } != parent_pid {
            // SAFETY: _exit is async-signal-safe; nobody is left to tell.
            unsafe { libc::_exit(1) };
        }
    }

    // f. Our own pid into the entries that want it (our copy of the plan).
    if !plan.pid_env.is_empty() {
        // SAFETY: getpid is async-signal-safe and cannot fail.
        let pid = unsafe { libc::getpid() };
        for slot in &plan.pid_env {
            slot.write_pid(pid);
        }
    }

    // g. Start the program with nothing blocked, whatever the parent's
    //    thread had blocked (e.g. for a signalfd) and what spawn added.
    // SAFETY: all-zero bytes are a valid sigset_t; sigemptyset sets it.
    let mut empty: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `empty` is a valid sigset_t on our stack.
    unsafe { libc::sigemptyset(&mut empty) };
    // SAFETY: `empty` is valid; a null old-set pointer is allowed.
    if unsafe { libc::sigprocmask(libc::SIG_SETMASK, &empty, ptr::null_mut()) } == -1 {
        child_fail(err_fd, Stage::Sigmask, errno());
    }

    // h. Only returns on failure.
    // SAFETY: program and both NULL-terminated arrays point into CStrings
    // owned by `plan`, which outlives this call.
    unsafe {
        libc::execve(
            plan.program.as_ptr(),
            plan.argv_ptrs.as_ptr(),
            plan.envp_ptrs.as_ptr(),
        )
    };
    child_fail(err_fd, Stage::Exec, errno())
}

/// Step d on kernels without `CLOSE_RANGE_CLOEXEC`: mark fds 3..1024 that are
/// not targets close-on-exec one by one.
fn cloexec_fallback(fds: &FdPlan, err_fd: RawFd) {
    for fd in 3..FALLBACK_FD_LIMIT {
        let is_target = usize::try_from(fd)
            .ok()
            .and_then(|i| fds.is_target.get(i))
            .copied()
            .unwrap_or(false);
        if is_target {
            continue;
        }
        // SAFETY: F_SETFD only changes the flags of `fd`; unused numbers
        // yield EBADF.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } == -1 {
            let e = errno();
            if e != libc::EBADF {
                child_fail(err_fd, Stage::Fds, e);
            }
        }
    }
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// Exited normally with this code (`WEXITSTATUS`).
    Code(i32),
    /// Killed by this signal (`WTERMSIG`).
    Signal(i32),
}

fn decode(status: libc::c_int) -> Option<ExitStatus> {
    if libc::WIFEXITED(status) {
        Some(ExitStatus::Code(libc::WEXITSTATUS(status)))
    } else if libc::WIFSIGNALED(status) {
        Some(ExitStatus::Signal(libc::WTERMSIG(status)))
    } else {
        // Stopped/continued: not reported without WUNTRACED/WCONTINUED.
        None
    }
}

fn check_pid(pid: i32) -> io::Result<()> {
    if pid <= 0 {
        // 0 and negatives mean process groups (or everything) to waitpid/kill.
        return Err(invalid_input(format!("pid {pid} is not a single process")));
    }
    Ok(())
}

/// Reaps any one exited child without blocking: `waitpid(-1, WNOHANG)`.
///
/// `Ok(None)` when no child has changed state or there are no children at
/// all (`ECHILD`). Retries `EINTR`.
pub fn wait_any_nohang() -> io::Result<Option<(i32, ExitStatus)>> {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a valid, writable c_int.
        match cvt_r(|| unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) }) {
            Ok(0) => return Ok(None),
            Ok(pid) => {
                if let Some(st) = decode(status) {
                    return Ok(Some((pid, st)));
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

/// Reaps child `pid` if it has exited, without blocking:
/// `waitpid(pid, WNOHANG)`. `Ok(None)` while it still runs.
///
/// Retries `EINTR`. `ECHILD` (not our child, or already reaped) is an error;
/// `pid <= 0` is `InvalidInput`.
pub fn wait_pid_nohang(pid: i32) -> io::Result<Option<ExitStatus>> {
    check_pid(pid)?;
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a valid, writable c_int.
        match cvt_r(|| unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) })? {
            0 => return Ok(None),
            _ => {
                if let Some(st) = decode(status) {
                    return Ok(Some(st));
                }
            }
        }
    }
}

/// Blocks until child `pid` exits and reaps it: `waitpid(pid, 0)`.
///
/// Retries `EINTR`. `pid <= 0` is `InvalidInput`.
pub fn wait_pid(pid: i32) -> io::Result<ExitStatus> {
    check_pid(pid)?;
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a valid, writable c_int.
        cvt_r(|| unsafe { libc::waitpid(pid, &mut status, 0) })?;
        if let Some(st) = decode(status) {
            return Ok(st);
        }
    }
}

/// Sends `sig` to process `pid`: `kill(pid, sig)`. `sig` 0 only checks that
/// the process exists.
///
/// Does not retry (`kill` cannot fail with `EINTR`). `ESRCH` is returned as an
/// error. `pid <= 0` (process groups, or every process) is `InvalidInput`.
pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
    check_pid(pid)?;
    // SAFETY: kill takes plain integers; pid > 0 names a single process.
    cvt(unsafe { libc::kill(pid, sig) })?;
    Ok(())
}

/// The calling process's pid: `getpid()`. Cannot fail.
pub fn getpid() -> i32 {
    // SAFETY: getpid has no preconditions and cannot fail.
    unsafe { libc::getpid() }
}

/// The parent's pid: `getppid()` (the reaper's once the parent died). Cannot
/// fail.
pub fn getppid() -> i32 {
    // SAFETY: getppid has no preconditions and cannot fail.
    unsafe { libc::getppid() }
}

/// Asks for `sig` when the parent dies: `prctl(PR_SET_PDEATHSIG, sig)` for
/// the calling process. Does not retry (cannot `EINTR`).
///
/// Linux ties it to the parent *thread* that forked us; it is cleared by a
/// fork and kept across exec (except for set-uid programs).
pub fn set_pdeathsig(sig: i32) -> io::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number; a bad one is EINVAL.
    cvt(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong) })?;
    Ok(())
}

/// The name of signal `sig` for messages: `"SIGTERM"`, `"SIGKILL"`, ...;
/// `"SIGRT"` for a real-time signal (32..=64), `"SIG?"` for anything else.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSTKFLT => "SIGSTKFLT",
        libc::SIGCHLD => "SIGCHLD",
        libc::SIGCONT => "SIGCONT",
        libc::SIGSTOP => "SIGSTOP",
        libc::SIGTSTP => "SIGTSTP",
        libc::SIGTTIN => "SIGTTIN",
        libc::SIGTTOU => "SIGTTOU",
        libc::SIGURG => "SIGURG",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGVTALRM => "SIGVTALRM",
        libc::SIGPROF => "SIGPROF",
        libc::SIGWINCH => "SIGWINCH",
        libc::SIGIO => "SIGIO",
        libc::SIGPWR => "SIGPWR",
        libc::SIGSYS => "SIGSYS",
        32..=64 => "SIGRT",
        _ => "SIG?",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn gaps(targets: &[RawFd]) -> Vec<(libc::c_uint, libc::c_uint)> {
        let null = File::open("/dev/null").unwrap();
        let fds: Vec<_> = targets.iter().map(|&t| (null.as_fd(), t)).collect();
        let plan = FdPlan::new(&fds).unwrap();
        plan.gaps[..plan.gaps_len].to_vec()
    }

    #[test]
    fn gaps_skip_stdio_and_targets() {
        let max = libc::c_uint::MAX;
        assert_eq!(gaps(&[]), [(3, max)]);
        assert_eq!(gaps(&[1, 2]), [(3, max)]);
        assert_eq!(gaps(&[3]), [(4, max)]);
        assert_eq!(gaps(&[5, 3, 1]), [(4, 4), (6, max)]);
        assert_eq!(gaps(&[63, 10]), [(3, 9), (11, 62), (64, max)]);
    }

    #[test]
    fn fd_plan_rejects_bad_targets() {
        let null = File::open("/dev/null").unwrap();
        let fd = null.as_fd();
        for bad in [
            vec![(fd, -1)],
            vec![(fd, 256)],
            vec![(fd, 3), (fd, 3)],
            vec![(fd, 0); 9],
            (3..3 + MAX_FD_MAPPINGS as RawFd + 1)
                .map(|t| (fd, t))
                .collect(),
        ] {
            let err = FdPlan::new(&bad).err().unwrap();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
    }

    #[test]
    fn non_cloexec_fd_does_not_reach_the_child() {
        let null = File::open("/dev/null").unwrap();
        // SAFETY: F_DUPFD (without CLOEXEC, on purpose) only creates a new fd,
        // which we own right away.
        let leaky = cvt(unsafe { libc::fcntl(null.as_raw_fd(), libc::F_DUPFD, 200) }).unwrap();
        // SAFETY: fcntl just returned this fd; nobody else owns it.
        let leaky = unsafe { OwnedFd::from_raw_fd(leaky) };
        let script = format!(
            "[ -e /proc/self/fd/{} ] && exit 1; exit 0",
            leaky.as_raw_fd()
        );
        let argv = ["sh", "-c", &script].map(OsString::from);
        let plan = SpawnPlan::new(Path::new("/bin/sh"), &argv, &[]).unwrap();
        let pid = spawn(&plan, &[]).unwrap();
        drop(leaky);
        assert_eq!(wait_pid(pid).unwrap(), ExitStatus::Code(0));
    }

    #[test]
    fn debug_hides_env_values() {
        let env = [(OsString::from("KEY"), OsString::from("secret"))];
        let plan = SpawnPlan::new(Path::new("/bin/true"), &["true".into()], &env).unwrap();
        let s = format!("{plan:?}");
        assert!(s.contains("KEY") && !s.contains("secret"), "{s}");
    }

    #[test]
    fn error_reports_round_trip() {
        for (code, stage) in STAGES.iter().enumerate() {
            assert_eq!(*stage as usize, code);
            let report = encode_report(*stage, libc::EPERM);
            assert_eq!(decode_report(&report), Some((*stage, libc::EPERM)));
            assert_eq!(decode_report(&report[..7]), None);
        }
        let mut unknown = encode_report(Stage::Exec, 1);
        unknown[..4].copy_from_slice(&99u32.to_ne_bytes());
        assert_eq!(decode_report(&unknown), None);
    }

    #[test]
    fn pid_slots_hold_any_pid() {
        let slot = PidSlot::new(b"K=\0\0\0\0\0\0\0\0\0\0\0".to_vec().into_boxed_slice(), 2);
        for pid in [1, 42, 4_194_304, i32::MAX] {
            slot.write_pid(pid);
            let text = std::ffi::CStr::from_bytes_until_nul(slot.bytes()).unwrap();
            assert_eq!(text.to_str().unwrap(), format!("K={pid}"));
        }
        assert_eq!(format!("{slot:?}"), "K=<pid>");
    }

    #[test]
    fn signal_names() {
        assert_eq!(signal_name(libc::SIGKILL), "SIGKILL");
        assert_eq!(signal_name(libc::SIGTERM), "SIGTERM");
        assert_eq!(signal_name(40), "SIGRT");
        assert_eq!(signal_name(0), "SIG?");
        assert_eq!(signal_name(-3), "SIG?");
    }

    #[test]
    fn bad_pids_are_invalid_input() {
        for pid in [0, -1] {
            assert_eq!(
                kill(pid, 0).unwrap_err().kind(),
                io::ErrorKind::InvalidInput
            );
            assert_eq!(
                wait_pid(pid).unwrap_err().kind(),
                io::ErrorKind::InvalidInput
            );
            let err = wait_pid_nohang(pid).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        }
    }
}
