//! Sockets the primary inherits (systemd's socket activation, a previous
//! primary's binary upgrade) and the binary upgrade itself, on both sides:
//! the old primary that starts the new program, and the new one that says
//! when it is ready.
//!
//! # The upgrade, step by step
//!
//! 1. [`Primary::upgrade`] (the old primary) execs the program again: the
//!    file now at the path it was started from (read from `/proc/self/exe`
//!    at startup, so a new build put there since is what runs), with the
//!    same arguments and environment. Each listening socket is mapped to fd
//!    3, 4, ... and named in `SYNCLUSTER_UPGRADE_FDS`; the write end of a
//!    readiness pipe (tableflip's) is the next fd, named by
//!    `SYNCLUSTER_UPGRADE_READY`; `SYNCLUSTER_UPGRADE_PID` holds the new
//!    process's own pid (as systemd's `LISTEN_PID`). Every other fd stays
//!    close-on-exec. The new program gets no parent-death signal: it
//!    outlives the old one.
//! 2. The new primary's [`Primary::new`] adopts those sockets (same
//!    addresses, nothing bound anew) and forks its workers. Once they all
//!    listen, [`Primary::confirm_upgrade`] writes one byte on the pipe.
//! 3. The old primary reports [`Event::UpgradeReady`]; the program then
//!    calls [`Primary::retire`]: stop accepting (what waits in the kernel
//!    backlog is the new primary's to accept), hand what it accepted
//!    already to its workers, let them finish, exit.
//! 4. If the new program exits, closes the pipe without the byte, or is not
//!    ready within the timeout, the old primary kills it, reaps it and
//!    reports [`Event::UpgradeFailed`]; it never stopped serving.
//!
//! A Unix socket's file stays where it is: the old primary leaves it to the
//! new one, and a primary never removes the file of a socket it inherited
//! (it cannot tell that the file is still the one its socket was bound to),
//! so it remains after the last primary ends, as systemd's do.
//!
//! `SYNCLUSTER_UPGRADE_FDS` is a space-separated list of `FD=KEY=NAME`:
//! the fd number, the handle key workers match (`127.0.0.1:8000:4:0`), and
//! the systemd name if any; `%`, `=`, space and bytes outside printable
//! ASCII are written `%XX`.

#![forbid(unsafe_code)]

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::event_loop::TOKEN_UPGRADE;
use super::shared::Address;
use super::workers::ExitStatus;
use super::{Event, Primary};
use crate::protocol::Endpoint;
use crate::signal::Signal;
use crate::sys::{self, epoll, pidfd, process, signal, socket};
use crate::systemd;

/// The listening sockets a binary upgrade passes: `FD=KEY=NAME ...`.
pub const ENV_UPGRADE_FDS: &str = "SYNCLUSTER_UPGRADE_FDS";
/// The fd of the readiness pipe's write end in the new primary.
pub const ENV_UPGRADE_READY: &str = "SYNCLUSTER_UPGRADE_READY";
/// The pid the two above are meant for: the new primary's own.
pub const ENV_UPGRADE_PID: &str = "SYNCLUSTER_UPGRADE_PID";

/// Variables of an upgrade, for the new primary alone.
pub(crate) const UPGRADE_VARS: [&str; 3] = [ENV_UPGRADE_FDS, ENV_UPGRADE_READY, ENV_UPGRADE_PID];

/// How long [`Primary::upgrade`] gives the new program by default.
pub const DEFAULT_UPGRADE_TIMEOUT: Duration = Duration::from_secs(30);

/// `S_IFMT` and `S_IFIFO` of `st_mode`.
const S_IFMT: u32 = 0o170_000;
const S_IFIFO: u32 = 0o010_000;
/// `ENOTSOCK`, `ECHILD`.
const ENOTSOCK: i32 = 88;
const ECHILD: i32 = 10;

// Inherited fds are taken over once per process: a second `Primary::new`
// must not own them twice.
static TAKEN: AtomicBool = AtomicBool::new(false);

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// The upgrade state of a primary, on both sides.
#[derive(Debug, Default)]
pub(super) struct Deploy {
    /// The path the program was started from, read at startup.
    exe: Option<PathBuf>,
    /// New side: the readiness pipe's write end, until confirmed.
    ready: Option<File>,
    /// New side: the pid of the primary that started this one.
    upgraded_from: Option<i32>,
    /// Old side: the upgrade in progress.
    pending: Option<Pending>,
}

/// An upgrade in progress, seen from the old primary.
#[derive(Debug)]
struct Pending {
    pid: i32,
    /// The readiness pipe's read end (non-blocking, in the epoll set).
    ready: File,
    /// Readable once the new program exited (in the epoll set).
    pidfd: Option<OwnedFd>,
    deadline: Instant,
    timeout: Duration,
    /// It was killed for this reason; its exit is awaited.
    failing: Option<String>,
}

/// A socket taken over at startup.
#[derive(Debug)]
struct Inherited {
    fd: OwnedFd,
    address: Address,
    key: Option<String>,
    name: Option<String>,
}

/// `%XX` for `%`, `=`, space and bytes outside printable ASCII.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x21..=0x7e).contains(&b) && b != b'%' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn unescape(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hi = (bytes.next()? as char).to_digit(16)?;
            let lo = (bytes.next()? as char).to_digit(16)?;
            out.push((hi * 16 + lo) as u8);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

/// One `FD=KEY=NAME` entry.
fn encode_entry(fd: RawFd, key: &str, name: Option<&str>) -> String {
    format!("{fd}={}={}", escape(key), escape(name.unwrap_or_default()))
}

/// One entry of `SYNCLUSTER_UPGRADE_FDS`: fd, key, name.
type Entry = (RawFd, Option<String>, Option<String>);

/// Parses `SYNCLUSTER_UPGRADE_FDS`: (fd, key, name) per entry, fds from 3
/// on, each once. Anything else is `InvalidInput` naming the variable.
fn parse_fds(v: &str) -> io::Result<Vec<Entry>> {
    let bad = |why: &str| invalid(format!("{ENV_UPGRADE_FDS}={v:?}: {why}"));
    let mut out: Vec<Entry> = Vec::new();
    for entry in v.split(' ').filter(|e| !e.is_empty()) {
        let mut parts = entry.split('=');
        let (Some(fd), Some(key), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("an entry is not FD=KEY=NAME"));
        };
        let fd: RawFd = fd
            .parse()
            .ok()
            .filter(|&fd| fd >= 3)
            .ok_or_else(|| bad("an fd is not a number from 3 on"))?;
        if out.iter().any(|(f, _, _)| *f == fd) {
            return Err(bad("an fd is listed twice"));
        }
        let key = unescape(key).ok_or_else(|| bad("a key is badly escaped"))?;
        let name = unescape(name).ok_or_else(|| bad("a name is badly escaped"))?;
        out.push((
            fd,
            (!key.is_empty()).then_some(key),
            (!name.is_empty()).then_some(name),
        ));
    }
    Ok(out)
}

/// Checks that `fd` is a listening stream socket and gives its address;
/// the error starts with `what`. Makes it non-blocking, as the primary's
/// own listeners are (the primary polls it).
fn check_listener(fd: OwnedFd, what: &str) -> io::Result<(OwnedFd, Address)> {
    let bad = |why: String| invalid(format!("{what}: {why}"));
    let ty = socket::socket_type(fd.as_fd()).map_err(|e| match e.raw_os_error() {
        Some(ENOTSOCK) => bad("not a socket; only listening stream sockets can be adopted".into()),
        _ => bad(e.to_string()),
    })?;
    if ty != 1 {
        return Err(bad(format!(
            "not a stream socket (SO_TYPE {ty}); only listening stream sockets can be adopted"
        )));
    }
    if !socket::is_listening(fd.as_fd()).map_err(|e| bad(e.to_string()))? {
        return Err(bad("a stream socket that is not listening".into()));
    }
    let (fd, address) = match socket::domain(fd.as_fd()).map_err(|e| bad(e.to_string()))? {
        socket::AF_INET | socket::AF_INET6 => {
            let a = socket::local_addr(fd.as_fd()).map_err(|e| bad(e.to_string()))?;
            (fd, Address::Tcp(a))
        }
        socket::AF_UNIX => {
            let l = UnixListener::from(fd);
            let a = l.local_addr().map_err(|e| bad(e.to_string()))?;
            let address = if let Some(p) = a.as_pathname() {
                Address::Unix(p.to_owned())
            } else if let Some(n) = a.as_abstract_name() {
                Address::Unix(PathBuf::from(format!("@{}", String::from_utf8_lossy(n))))
            } else {
                return Err(bad("an unnamed Unix socket".into()));
            };
            (OwnedFd::from(l), address)
        }
        d => return Err(bad(format!("address family {d} is neither IP nor Unix"))),
    };
    sys::fd::set_nonblocking(fd.as_fd(), true).map_err(|e| bad(e.to_string()))?;
    Ok((fd, address))
}

/// The path of the running program, as `/proc/self/exe` names it now.
fn exe_path() -> Option<PathBuf> {
    let p = std::fs::read_link("/proc/self/exe").ok()?;
    // Replaced already: the path is where the new file is.
    match p.as_os_str().as_bytes().strip_suffix(b" (deleted)") {
        Some(b) => Some(PathBuf::from(OsStr::from_bytes(b))),
        None => Some(p),
    }
}

/// The handle key a worker's first listen on `address` uses.
fn address_key(address: &Address) -> String {
    let ep = match address {
        Address::Tcp(a) => Endpoint::Tcp(Some(a.ip()), a.port()),
        Address::Unix(p) => Endpoint::Unix(p.clone()),
        Address::Udp(a) => return format!("{}:udp:0", Endpoint::Tcp(Some(a.ip()), a.port()).key()),
    };
    format!("{}:0", ep.key())
}

impl Deploy {
    /// Takes over what this process inherited (once per process): the
    /// sockets and readiness pipe of a binary upgrade meant for this pid,
    /// and systemd's sockets (`LISTEN_PID`). Malformed variables, and fds
    /// that are not listening stream sockets, are `InvalidInput` naming
    /// the variable and the fd.
    fn take_inherited(&mut self) -> io::Result<Vec<Inherited>> {
        self.exe = exe_path();
        if TAKEN.swap(true, Ordering::AcqRel) {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        if let Some(pid) = std::env::var_os(ENV_UPGRADE_PID) {
            let s = pid.to_string_lossy();
            let pid: i32 = s
                .parse()
                .map_err(|_| invalid(format!("{ENV_UPGRADE_PID}={s:?}: not a pid")))?;
            if pid == process::getpid() {
                self.take_upgrade(&mut out)?;
            }
        }
        for a in systemd::listen_fds()? {
            let raw = sys::fd::raw(&a.fd);
            let what = match &a.name {
                Some(n) => format!("LISTEN_FDS: fd {raw} (named {n})"),
                None => format!("LISTEN_FDS: fd {raw}"),
            };
            let (fd, address) = check_listener(a.fd, &what)?;
            out.push(Inherited {
                fd,
                address,
                key: None,
                name: a.name,
            });
        }
        Ok(out)
    }

    fn take_upgrade(&mut self, out: &mut Vec<Inherited>) -> io::Result<()> {
        let var =
            |k: &str| std::env::var(k).map_err(|_| invalid(format!("{k} is missing or not UTF-8")));
        let ready = var(ENV_UPGRADE_READY)?;
        let raw: RawFd = ready.parse().ok().filter(|&fd| fd >= 3).ok_or_else(|| {
            invalid(format!(
                "{ENV_UPGRADE_READY}={ready:?}: not an fd from 3 on"
            ))
        })?;
        let entries = parse_fds(&var(ENV_UPGRADE_FDS)?)?;
        if entries.iter().any(|(fd, _, _)| *fd == raw) {
            return Err(invalid(format!(
                "{ENV_UPGRADE_READY}={raw} is also in {ENV_UPGRADE_FDS}"
            )));
        }
        let pipe = sys::fd::adopt_inherited(raw)
            .map_err(|e| invalid(format!("{ENV_UPGRADE_READY}: fd {raw}: {e}")))?;
        let st = sys::fs::fstat(pipe.as_fd())?;
        if st.mode & S_IFMT != S_IFIFO {
            return Err(invalid(format!(
                "{ENV_UPGRADE_READY}: fd {raw} is not a pipe"
            )));
        }
        for (raw, key, name) in entries {
            let what = format!("{ENV_UPGRADE_FDS}: fd {raw}");
            let fd = sys::fd::adopt_inherited(raw).map_err(|e| invalid(format!("{what}: {e}")))?;
            let (fd, address) = check_listener(fd, &what)?;
            out.push(Inherited {
                fd,
                address,
                key,
                name,
            });
        }
        self.ready = Some(File::from(pipe));
        self.upgraded_from = Some(process::getppid());
        Ok(())
    }
}

impl Primary {
    // At `new`: the inherited sockets become the program's handles.
    pub(super) fn adopt_inherited(&mut self) -> io::Result<()> {
        for i in self.deploy.take_inherited()? {
            let raw = sys::fd::raw(&i.fd);
            let mut key = i.key.unwrap_or_else(|| address_key(&i.address));
            if self.keys.contains_key(&key) {
                key = format!("{key}#fd{raw}");
            }
            let what = i.address.to_string();
            let policy = self.settings.policy;
            let hid = self
                .add_handle(key, i.fd, i.address, None, policy)
                .map_err(|e| {
                    io::Error::new(e.kind(), format!("adopting fd {raw} ({what}): {e}"))
                })?;
            if let Some(h) = self.handles.get_mut(&hid) {
                h.name = i.name;
            }
            self.pin(hid);
        }
        Ok(())
    }

    /// Starts a binary upgrade (see the module docs): execs `exec`, or the
    /// path this program was started from, with the same arguments and
    /// environment, every listening socket and a readiness pipe. Returns the
    /// new primary's pid; [`Event::UpgradeReady`] or [`Event::UpgradeFailed`]
    /// follows, within `timeout` (the new program is killed then).
    ///
    /// `Err` and nothing running when it cannot start: an upgrade already in
    /// progress (`AlreadyExists`, naming its pid), more listening sockets
    /// than one spawn passes, an exec that fails (the error names the path),
    /// a primary that is PID 1 (`Unsupported`: its exit would end the
    /// container).
    ///
    /// The new program gets no parent-death signal. `LISTEN_*` are not
    /// passed on (the sockets travel in `SYNCLUSTER_UPGRADE_FDS`, with their
    /// names); `NOTIFY_SOCKET` is, and `WATCHDOG_PID` names the new pid when
    /// the watchdog was this primary's.
    pub fn upgrade(&mut self, exec: Option<&Path>, timeout: Duration) -> io::Result<i32> {
        if self.init {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "upgrade: this primary is PID 1, and its exit would end the container with \
                 the new primary; run it under an init (tini, docker --init)",
            ));
        }
        if let Some(p) = &self.deploy.pending {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "an upgrade is already in progress (new primary pid {})",
                    p.pid
                ),
            ));
        }
        let exe = exec
            .map(Path::to_path_buf)
            .or_else(|| self.deploy.exe.clone())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    "upgrade: the program's path is unknown (/proc/self/exe was unreadable at start)",
                )
            })?;
        // Listening sockets only: UDP sockets (`Worker::bind_udp`) are not
        // handed over; they close with the old primary (a known limit).
        let passing: Vec<&super::handles::Handle> = self
            .handles
            .values()
            .filter(|h| !matches!(h.address, Address::Udp(_)))
            .collect();
        let n = passing.len();
        if n + 1 > process::MAX_FD_MAPPINGS {
            return Err(invalid(format!(
                "upgrade: {n} listening sockets; one upgrade passes at most {}",
                process::MAX_FD_MAPPINGS - 1
            )));
        }
        let (ready_r, ready_w) = process::pipe()?;
        let mut map: Vec<(BorrowedFd<'_>, RawFd)> = Vec::with_capacity(n + 1);
        let mut entries = Vec::with_capacity(n);
        for (i, h) in passing.iter().enumerate() {
            let target = 3 + i as RawFd;
            map.push((h.fd.as_fd(), target));
            entries.push(encode_entry(target, &h.key, h.name.as_deref()));
        }
        let ready_fd = 3 + n as RawFd;
        map.push((ready_w.as_fd(), ready_fd));
        let watchdog = systemd::watchdog_from_env().ok().flatten().is_some();
        let passed = |k: &OsStr| {
            let k = k.to_str().unwrap_or_default();
            !(UPGRADE_VARS.contains(&k)
                || matches!(
                    k,
                    "LISTEN_PID" | "LISTEN_FDS" | "LISTEN_FDNAMES" | "WATCHDOG_PID"
                )
                || (k == "WATCHDOG_USEC" && !watchdog))
        };
        let mut vars: Vec<(OsString, OsString)> =
            std::env::vars_os().filter(|(k, _)| passed(k)).collect();
        vars.push((ENV_UPGRADE_FDS.into(), entries.join(" ").into()));
        vars.push((ENV_UPGRADE_READY.into(), ready_fd.to_string().into()));
        let mut argv: Vec<OsString> = std::env::args_os().collect();
        if argv.is_empty() {
            argv.push(exe.clone().into());
        }
        let mut plan = process::SpawnPlan::new(&exe, &argv, &vars)?;
        plan.pdeathsig(None);
        plan.env_child_pid(ENV_UPGRADE_PID)?;
        if watchdog {
            plan.env_child_pid("WATCHDOG_PID")?;
        }
        let pid = process::spawn(&plan, &map).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("upgrade: start of {}: {e}", exe.display()),
            )
        })?;
        drop(map);
        drop(ready_w);
        let ready = File::from(ready_r);
        let watched = sys::fd::set_nonblocking(ready.as_fd(), true).and_then(|()| {
            self.epoll
                .add(ready.as_fd(), epoll::READABLE, TOKEN_UPGRADE)
        });
        if let Err(e) = watched {
            let _ = process::kill(pid, signal::SIGKILL);
            let _ = process::wait_pid(pid);
            return Err(e);
        }
        let pidfd = pidfd::pidfd_open(pid).ok().filter(|fd| {
            self.epoll
                .add(fd.as_fd(), epoll::READABLE, TOKEN_UPGRADE | 1)
                .is_ok()
        });
        self.deploy.pending = Some(Pending {
            pid,
            ready,
            pidfd,
            deadline: Instant::now() + timeout,
            timeout,
            failing: None,
        });
        Ok(pid)
    }

    /// The new primary of the upgrade in progress, if one is.
    pub fn upgrade_pid(&self) -> Option<i32> {
        self.deploy.pending.as_ref().map(|p| p.pid)
    }

    /// Ends the upgrade in progress now: SIGKILL to the new program, which
    /// is reaped before this returns (no event follows). Its pid, if there
    /// was one.
    pub fn cancel_upgrade(&mut self) -> Option<i32> {
        let p = self.deploy.pending.take()?;
        let _ = process::kill(p.pid, signal::SIGKILL);
        let _ = process::wait_pid(p.pid);
        self.unwatch_upgrade(&p);
        Some(p.pid)
    }

    /// True when this primary was started by a binary upgrade and has not
    /// yet said it is ready ([`Primary::confirm_upgrade`]).
    pub fn is_upgrade_pending_confirmation(&self) -> bool {
        self.deploy.ready.is_some()
    }

    /// The pid of the primary that started this one by a binary upgrade.
    pub fn upgraded_from(&self) -> Option<i32> {
        self.deploy.upgraded_from
    }

    /// Tells the old primary that this one, started by a binary upgrade,
    /// is ready: call it once every worker listens (the supervisor does).
    /// The old primary then stops accepting and leaves. `Ok(false)` when
    /// this primary was not started by an upgrade, or confirmed already.
    /// An old primary that is gone is an error (`BrokenPipe`); this one
    /// serves anyway.
    pub fn confirm_upgrade(&mut self) -> io::Result<bool> {
        match self.deploy.ready.take() {
            Some(mut pipe) => {
                self.sweep_slots();
                pipe.write_all(&[1])?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Leaves the listening sockets to a successor (after
    /// [`Event::UpgradeReady`]): stops accepting without draining the
    /// kernel backlog (the successor accepts what waits there), hands the
    /// connections this primary accepted already to its workers (round
    /// robin), leaves Unix socket files in place, and disconnects every
    /// worker so that they finish what they hold and exit. With `timeout`,
    /// SIGKILL follows for a worker still alive then.
    pub fn retire(&mut self, timeout: Option<Duration>) {
        let hids: Vec<u32> = self.handles.keys().copied().collect();
        for hid in hids {
            self.distribute(hid, true);
            if let Some(file) = self.handles.get_mut(&hid).and_then(|h| h.unix.take()) {
                file.disown();
            }
            self.close_handle(hid);
        }
        let workers: Vec<u32> = self.workers.keys().copied().collect();
        for id in workers {
            let _ = self.disconnect(id, timeout);
        }
    }

    pub(super) fn upgrade_deadline(&self) -> Option<Instant> {
        self.deploy
            .pending
            .as_ref()
            .filter(|p| p.failing.is_none())
            .map(|p| p.deadline)
    }

    fn unwatch_upgrade(&mut self, p: &Pending) {
        let _ = self.epoll.delete(p.ready.as_fd());
        if let Some(fd) = &p.pidfd {
            let _ = self.epoll.delete(fd.as_fd());
        }
    }

    // After each turn, while an upgrade is in progress: has the new program
    // exited, said it is ready, or run out of time?
    pub(super) fn upgrade_turn(&mut self) {
        let Some(p) = self.deploy.pending.as_mut() else {
            return;
        };
        let pid = p.pid;
        let exit = match process::wait_pid_nohang(pid) {
            Ok(Some(st)) => Some(Some(st)),
            Ok(None) => None,
            // Reaped by someone else (PID 1 reaps every child).
            Err(e) if e.raw_os_error() == Some(ECHILD) => Some(None),
            Err(_) => None,
        };
        if let Some(status) = exit {
            let p = self.deploy.pending.take().expect("checked above");
            self.unwatch_upgrade(&p);
            let how = match status {
                Some(process::ExitStatus::Code(c)) => ExitStatus::Code(c).to_string(),
                Some(process::ExitStatus::Signal(s)) => {
                    ExitStatus::Signal(Signal::from_kernel(s)).to_string()
                }
                None => "an unknown status".to_string(),
            };
            let reason = match p.failing {
                Some(why) => format!("new primary (pid {pid}) {why}; it ended with {how}"),
                None => format!("new primary (pid {pid}) ended with {how} before it was ready"),
            };
            self.events.push_back(Event::UpgradeFailed { pid, reason });
            return;
        }
        if p.failing.is_some() {
            return;
        }
        let mut byte = [0u8; 1];
        let failing = match p.ready.read(&mut byte) {
            Ok(1) => {
                let p = self.deploy.pending.take().expect("checked above");
                self.unwatch_upgrade(&p);
                // Not reaped by us from now on: it outlives this primary.
                self.events.push_back(Event::UpgradeReady { pid });
                return;
            }
            Ok(_) => Some("closed its readiness pipe without saying it was ready".to_string()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
            Err(e) => Some(format!("could not be heard on its readiness pipe ({e})")),
        };
        let failing = failing.or_else(|| {
            (Instant::now() >= p.deadline).then(|| format!("was not ready within {:?}", p.timeout))
        });
        if let Some(why) = failing {
            let _ = process::kill(pid, signal::SIGKILL);
            let _ = self.epoll.delete(p.ready.as_fd());
            p.failing = Some(why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_fd_lists_round_trip_with_escapes() {
        let entries = [
            encode_entry(3, "127.0.0.1:0:4:0", None),
            encode_entry(4, "/tmp/a b=c%.sock:-1:unix:0", Some("web")),
            encode_entry(5, "", Some("ad min")),
        ];
        let v = entries.join(" ");
        assert!(!v.contains("a b"), "{v}");
        let parsed = parse_fds(&v).unwrap();
        assert_eq!(
            parsed,
            vec![
                (3, Some("127.0.0.1:0:4:0".into()), None),
                (
                    4,
                    Some("/tmp/a b=c%.sock:-1:unix:0".into()),
                    Some("web".into())
                ),
                (5, None, Some("ad min".into())),
            ]
        );
        assert_eq!(parse_fds("").unwrap(), vec![]);
    }

    #[test]
    fn malformed_upgrade_fd_lists_name_the_variable() {
        for bad in ["3", "3=a", "2=a=", "x=a=", "3=a= 3=b=", "3=%zz=", "3=a=b=c"] {
            let e = parse_fds(bad).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
            assert!(e.to_string().contains(ENV_UPGRADE_FDS), "{bad}: {e}");
        }
    }

    #[test]
    fn only_listening_stream_sockets_are_adopted() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let want = l.local_addr().unwrap();
        let (fd, addr) = check_listener(OwnedFd::from(l), "fd 3").unwrap();
        assert_eq!(addr, Address::Tcp(want));
        assert!(sys::fd::is_nonblocking(fd.as_fd()).unwrap());

        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let e = check_listener(OwnedFd::from(udp), "LISTEN_FDS: fd 4").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("LISTEN_FDS: fd 4: not a stream socket"),
            "{e}"
        );

        let file = File::open("/dev/null").unwrap();
        let e = check_listener(OwnedFd::from(file), "fd 5").unwrap_err();
        assert!(e.to_string().contains("fd 5: not a socket"), "{e}");

        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = check_listener(OwnedFd::from(a), "fd 6").unwrap_err();
        assert!(e.to_string().contains("not listening"), "{e}");
    }
}
