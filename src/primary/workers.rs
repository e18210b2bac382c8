//! The worker table and its states: forking, sending, killing,
//! disconnecting and reaping workers (≈ Node's primary.js `fork`,
//! `worker.send`, `worker.kill`, `disconnect`).

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::event_loop::{Budget, TOKEN_PIDFD, TOKEN_WORKER};
use super::handles::Grant;
use super::{Event, Primary, Stdio};
use crate::env::{ENV_CHANNEL_FD, ENV_FDS, ENV_WORKER_ID, ENV_WORKER_PID};
use crate::ipc::channel::{Channel, QueueFull};
use crate::ipc::wire::Kind;
use crate::signal::Signal;
use crate::sys::{self, epoll, pidfd, process, signal};

/// The fd number the channel has in every worker.
const CHANNEL_FD: i32 = 3;

/// A worker's state, as Node names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum State {
    /// Forked; no frame yet.
    None,
    /// Its first frame arrived.
    Online,
    /// At least one listener is up.
    Listening,
    /// Its channel is closed.
    Disconnected,
    /// Its process ended. [`Primary::workers`] no longer lists a worker
    /// once its `Exit` event is out, so this is seen only in between.
    Dead,
}

impl std::fmt::Display for State {
    /// Node's `worker.state` names: `none`, `online`, `listening`,
    /// `disconnected`, `dead`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::None => "none",
            State::Online => "online",
            State::Listening => "listening",
            State::Disconnected => "disconnected",
            State::Dead => "dead",
        })
    }
}

/// How a worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// A signal ended it.
    Signal(Signal),
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(s) => write!(f, "signal {s} ({})", s.as_raw()),
        }
    }
}

/// A worker as [`Primary::workers`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerInfo {
    /// Worker id, 1, 2, 3, ... never reused.
    pub id: u32,
    /// Its process id.
    pub pid: i32,
    /// Its state.
    pub state: State,
    /// True once a disconnect was asked for, by either side.
    pub exited_after_disconnect: bool,
    /// Connections handed to it and not yet accepted.
    pub in_flight: usize,
    /// Connections it took: read from its pipe (round robin) or reported by the
    /// worker, in batches (shared).
    pub taken: u64,
    /// Requests it reported served
    /// ([`Worker::note_requests`](crate::Worker::note_requests)); `None`
    /// if it never did.
    pub requests: Option<u64>,
}

/// A connection written to a worker's pipe and, as far as the primary
/// last looked, not read yet. The primary closed its copy: the fd is in
/// the pipe, and comes back from it if the worker never takes it.
#[derive(Debug)]
pub(super) struct InFlight {
    pub(super) handle: u32,
    pub(super) id: u32,
    pub(super) rejected_by: Vec<u32>,
    /// When it was written: the worker took it no earlier.
    pub(super) sent: Instant,
}

/// The pipe connections of one handle reach one worker through (see
/// `protocol`): the primary writes at `ours` and keeps `theirs`, the
/// worker's end, to count what is unread and to read it back.
#[derive(Debug)]
pub(super) struct Pipe {
    pub(super) hid: u32,
    pub(super) ours: OwnedFd,
    pub(super) theirs: OwnedFd,
    /// Wake records written (see `wake_pipes`): at most one.
    pub(super) wakes: usize,
}

/// One row of the worker table.
#[derive(Debug)]
pub(super) struct Slot {
    pub(super) pid: i32,
    pub(super) state: State,
    pub(super) channel: Option<Channel>,
    pub(super) want_write: bool,
    pub(super) exited_after_disconnect: bool,
    pub(super) exit: Option<ExitStatus>,
    pub(super) in_flight: VecDeque<InFlight>,
    pub(super) pipes: Vec<Pipe>,
    /// Handles it said it refuses connections of (at its cap, or out of
    /// fds), until it says it takes them again.
    pub(super) refusing: Vec<u32>,
    pub(super) handles: Vec<u32>,
    pub(super) kill_at: Option<Instant>,
    /// When the worker last took a connection, or got its first one.
    pub(super) progress: Instant,
    pub(super) stdout: Option<OwnedFd>,
    pub(super) stderr: Option<OwnedFd>,
    /// Handles query-server gave it and it has not closed (the primary may
    /// have stopped routing some of them to it).
    pub(super) grants: Vec<Grant>,
    /// Readable once it exited; `None` where `pidfd_open` is missing.
    pub(super) pidfd: Option<OwnedFd>,
    /// Forked with `uid` or `gid` set: unprivileged listen rules by default.
    pub(super) unprivileged: bool,
    /// What it served, for `max_requests`.
    pub(super) served: super::served::Served,
    /// Its open connections as it last reported them (least-loaded).
    pub(super) load: super::least_loaded::Load,
}

impl Primary {
    /// Forks a worker with the settings' environment (≈ `cluster.fork()`)
    /// and returns its id once exec succeeded; an exec failure (or a
    /// failed `chdir`/`setuid`...) is the `Err`, naming the step.
    ///
    /// ```no_run
    /// use syncluster::{primary::Event, Role};
    ///
    /// # fn main() -> std::io::Result<()> {
    /// if let Role::Primary(mut primary) = syncluster::role()? {
    ///     primary.settings_mut().window = 8;
    ///     let id = primary.fork()?;
    ///     while let Some(ev) = primary.next_event()? {
    ///         if let Event::Online(w) = ev {
    ///             assert_eq!(w, id);
    ///             break;
    ///         }
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn fork(&mut self) -> io::Result<u32> {
        self.fork_with_env(&[] as &[(&str, &str)])
    }

    /// Forks a worker with extra environment variables (≈ `cluster.fork(env)`).
    /// Returns its id once exec has succeeded; an exec failure is the `Err`.
    pub fn fork_with_env<K: AsRef<OsStr>, V: AsRef<OsStr>>(
        &mut self,
        env: &[(K, V)],
    ) -> io::Result<u32> {
        if self.settings.plain.is_some() {
            return self.fork_plain(env, None);
        }
        let id = self.next_id;
        let s = &self.settings;
        // `settings_mut` may have changed anything since the last fork.
        s.validate()?;
        let exec = s
            .exec
            .clone()
            .unwrap_or_else(|| PathBuf::from("/proc/self/exe"));
        let mut argv: Vec<OsString> = vec![std::env::args_os()
            .next()
            .unwrap_or_else(|| exec.clone().into())];
        match &s.args {
            Some(args) => argv.extend(args.iter().cloned()),
            None => argv.extend(std::env::args_os().skip(1)),
        }
        let extra = s.extra_fds.clone();
        for (i, (_, target)) in extra.iter().enumerate() {
            super::check_extra_fd(*target, &extra[..i])?;
        }
        let mut ours = vec![
            (ENV_WORKER_ID, id.to_string()),
            (ENV_CHANNEL_FD, CHANNEL_FD.to_string()),
        ];
        if !extra.is_empty() {
            let list: Vec<String> = extra.iter().map(|(_, t)| t.to_string()).collect();
            ours.push((ENV_FDS, list.join(",")));
        }
        let vars = worker_env(&s.env, env, &ours);
        let mut plan = process::SpawnPlan::new(&exec, &argv, &vars)?;
        if let Some(cwd) = &s.cwd {
            plan.cwd(cwd)?;
        }
        if let Some(gid) = s.gid {
            plan.gid(gid);
        }
        if let Some(uid) = s.uid {
            plan.uid(uid);
        }
        if s.uid.is_some() || s.gid.is_some() {
            plan.groups(&s.groups);
        }
        plan.env_child_pid(ENV_WORKER_PID)?;
        let (ours_end, theirs) = sys::socket::socketpair()?;
        let pipes = match s.stdio {
            Stdio::Inherit => None,
            Stdio::Pipe => Some((process::pipe()?, process::pipe()?)),
        };
        let mut map: Vec<(BorrowedFd<'_>, i32)> = vec![(theirs.as_fd(), CHANNEL_FD)];
        if let Some(((_, out_w), (_, err_w))) = &pipes {
            map.push((out_w.as_fd(), 1));
            map.push((err_w.as_fd(), 2));
        }
        map.extend(extra.iter().map(|(fd, target)| (fd.as_fd(), *target)));
        let pid = process::spawn(&plan, &map)
            .map_err(|e| io::Error::new(e.kind(), format!("fork of worker {id}: {e}")))?;
        drop(map);
        drop(theirs);
        let (stdout, stderr) = match pipes {
            Some(((out_r, _), (err_r, _))) => (Some(out_r), Some(err_r)),
            None => (None, None),
        };
        let channel = Channel::new(ours_end, true);
        if let Err(e) = self
            .epoll
            .add(channel.as_fd(), epoll::READABLE, TOKEN_WORKER | id as u64)
        {
            let _ = process::kill(pid, signal::SIGKILL);
            let _ = process::wait_pid(pid);
            return Err(e);
        }
        let unprivileged = self.settings.uid.is_some() || self.settings.gid.is_some();
        let pidfd = self.watch_exit(pid, id);
        self.next_id += 1;
        self.pids.insert(pid, id);
        self.workers.insert(
            id,
            Slot {
                pid,
                state: State::None,
                channel: Some(channel),
                want_write: false,
                exited_after_disconnect: false,
                exit: None,
                in_flight: VecDeque::new(),
                pipes: Vec::new(),
                refusing: Vec::new(),
                handles: Vec::new(),
                kill_at: None,
                progress: Instant::now(),
                stdout,
                stderr,
                grants: Vec::new(),
                pidfd,
                unprivileged,
                served: Default::default(),
                load: super::least_loaded::Load::new(),
            },
        );
        self.events.push_back(Event::Fork(id));
        Ok(id)
    }

    /// Sends a user message, with fds, to a worker. Buffered: never blocks
    /// on a slow worker. `Err(NotConnected)` once its channel is closed.
    /// `Err(InvalidInput)` for over 16 MiB (nothing sent). A worker that does
    /// not read, with 32 MiB or 512 fds queued for it, is reported and
    /// killed, and this returns that error (`OutOfMemory`).
    pub fn send(&mut self, id: u32, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        self.send_frame(id, Kind::User, 0, 0, bytes, fds)
    }

    pub(super) fn send_frame(
        &mut self,
        id: u32,
        kind: Kind,
        flags: u8,
        seq: u32,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<()> {
        let slot = self.workers.get_mut(&id).ok_or_else(|| Self::gone(id))?;
        let ch = slot.channel.as_mut().ok_or_else(|| Self::gone(id))?;
        // A worker that lets its queue fill is broken: report it and kill
        // it; the caller gets the same error.
        if let Err(e) = ch.send(kind, flags, seq, bytes, fds) {
            let Some(full) = e.get_ref().and_then(|i| i.downcast_ref::<QueueFull>()) else {
                return Err(e);
            };
            let msg = format!("worker {id} is not reading: {full}");
            let err = || io::Error::new(io::ErrorKind::OutOfMemory, msg.clone());
            self.events.push_back(Event::Error { id, error: err() });
            self.abort_worker(id);
            return Err(err());
        }
        if ch.wants_write() && !slot.want_write {
            slot.want_write = true;
            self.epoll.modify(
                ch.as_fd(),
                epoll::READABLE | epoll::WRITABLE,
                TOKEN_WORKER | id as u64,
            )?;
        }
        Ok(())
    }

    /// Sends `sig` to a worker (≈ `worker.process.kill`).
    /// `NotConnected` once it has exited.
    pub fn kill(&mut self, id: u32, sig: Signal) -> io::Result<()> {
        let slot = self.workers.get(&id).ok_or_else(|| Self::gone(id))?;
        if slot.exit.is_some() {
            return Err(Self::gone(id));
        }
        process::kill(slot.pid, sig.as_raw())
    }

    /// Graceful disconnect: stop routing to the worker, tell it to finish
    /// what it holds and exit. With `timeout`, SIGKILL follows if it is
    /// still alive then. Its exit reports `exited_after_disconnect`.
    pub fn disconnect(&mut self, id: u32, timeout: Option<Duration>) -> io::Result<()> {
        let slot = self.workers.get_mut(&id).ok_or_else(|| Self::gone(id))?;
        slot.exited_after_disconnect = true;
        if let Some(t) = timeout {
            slot.kill_at = Some(Instant::now() + t);
        }
        if slot.channel.is_none() {
            return self.disconnect_plain(id);
        }
        self.unroute(id);
        self.send_frame(id, Kind::Disconnect, 0, 0, &[], &[])?;
        // It serves what its pipes hold, then exits; a blocking read of a
        // pipe must see the request.
        self.wake_pipes(id);
        Ok(())
    }

    /// Stops accepting and disconnects every worker (≈ `cluster.disconnect`).
    /// Connections already in the kernel backlog are accepted and handed to
    /// the workers first, ahead of the disconnect request, so none is lost.
    pub fn disconnect_all(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let ids: Vec<u32> = self.handles.keys().copied().collect();
        for hid in ids {
            // Round robin: sweep the kernel backlog to the workers ahead of
            // their disconnect request. Shared: the workers drain it.
            if self
                .handles
                .get(&hid)
                .is_some_and(|h| h.policy.hands_over())
            {
                self.accept_ready(hid, true);
                self.distribute(hid, true);
            }
            self.close_handle(hid);
        }
        let workers: Vec<u32> = self.workers.keys().copied().collect();
        for id in workers {
            let _ = self.disconnect(id, timeout);
        }
        Ok(())
    }

    /// Stops routing new connections to a worker without disconnecting it
    /// (a rolling restart retires the old worker this way). Connections
    /// queued for it go to the others.
    pub fn unroute(&mut self, id: u32) {
        let Some(slot) = self.workers.get_mut(&id) else {
            return;
        };
        let hids = std::mem::take(&mut slot.handles);
        for hid in hids {
            self.leave_handle(id, hid);
        }
    }

    // A pidfd in the epoll set tells of the exit even when SIGCHLD goes to
    // another thread. None without pidfd_open: SIGCHLD alone then.
    pub(super) fn watch_exit(&self, pid: i32, id: u32) -> Option<OwnedFd> {
        let fd = pidfd::pidfd_open(pid).ok()?;
        self.epoll
            .add(fd.as_fd(), epoll::READABLE, TOKEN_PIDFD | id as u64)
            .ok()?;
        Some(fd)
    }

    // Stops watching a worker's pidfd (it exited, or it cannot be trusted
    // to stop being readable) and closes it.
    fn unwatch_exit(&mut self, id: u32) {
        if let Some(fd) = self.workers.get_mut(&id).and_then(|s| s.pidfd.take()) {
            let _ = self.epoll.delete(fd.as_fd());
        }
    }

    // Reaps only our workers, by pid: a child the program started itself
    // keeps its exit status for its own `wait`. As PID 1, every child.
    pub(super) fn reap(&mut self) {
        let pids: Vec<i32> = self.pids.keys().copied().collect();
        for pid in pids {
            if let Ok(Some(status)) = process::wait_pid_nohang(pid) {
                self.on_exit(pid, status);
            }
        }
        self.reap_orphans();
    }

    // The worker's pidfd is readable: it exited.
    pub(super) fn reap_worker(&mut self, id: u32) {
        let Some(pid) = self.workers.get(&id).map(|s| s.pid) else {
            return;
        };
        if !self.pids.contains_key(&pid) {
            self.unwatch_exit(id);
            return;
        }
        match process::wait_pid_nohang(pid) {
            Ok(Some(status)) => self.on_exit(pid, status),
            // Not reapable although readable (an old kernel reports the
            // leader thread's exit), or reaped by someone else: SIGCHLD
            // alone from now on, rather than a pidfd readable forever.
            Ok(None) | Err(_) => self.unwatch_exit(id),
        }
        self.reap_orphans();
    }

    // As PID 1 nobody else reaps what is reparented to us.
    fn reap_orphans(&mut self) {
        if !self.init {
            return;
        }
        while let Ok(Some((pid, status))) = process::wait_any_nohang() {
            if self.pids.contains_key(&pid) {
                self.on_exit(pid, status);
            }
        }
    }

    fn on_exit(&mut self, pid: i32, status: process::ExitStatus) {
        let Some(id) = self.pids.remove(&pid) else {
            return;
        };
        let status = match status {
            process::ExitStatus::Code(c) => ExitStatus::Code(c),
            process::ExitStatus::Signal(s) => ExitStatus::Signal(Signal::from_kernel(s)),
        };
        self.unwatch_exit(id);
        if let Some(s) = self.workers.get_mut(&id) {
            s.exit = Some(status);
        }
        // Frames it wrote before dying are still readable: deliver them,
        // then Disconnect, then Exit. Bounded: a child it left behind may
        // hold the channel and keep writing.
        self.read_worker(id, Budget::AT_EXIT);
        self.drop_channel(id);
        self.plain_exited(id);
        // The slot stays (state Dead) until this Exit is handed out.
        if let Some(s) = self.workers.get_mut(&id) {
            s.state = State::Dead;
            self.events.push_back(Event::Exit {
                id,
                status,
                exited_after_disconnect: s.exited_after_disconnect,
            });
        }
    }

    pub(super) fn protocol_error(&mut self, id: u32, e: io::Error) {
        // A send on the way closed its channel (`send_frame`, queue full)
        // and reported why already.
        if self.workers.get(&id).is_some_and(|s| s.channel.is_none()) {
            return;
        }
        self.events.push_back(Event::Error {
            id,
            error: io::Error::new(
                e.kind(),
                format!("worker {id} broke the channel protocol: {e}"),
            ),
        });
        self.abort_worker(id);
    }

    pub(super) fn abort_worker(&mut self, id: u32) {
        if let Some(s) = self.workers.get(&id) {
            if s.exit.is_none() {
                let _ = process::kill(s.pid, signal::SIGKILL);
            }
        }
        self.drop_channel(id);
    }

    // Closes a worker's channel once: re-queues what was in flight to it,
    // drops it from every handle, reports Disconnect.
    pub(super) fn drop_channel(&mut self, id: u32) {
        let Some(slot) = self.workers.get_mut(&id) else {
            return;
        };
        let Some(ch) = slot.channel.take() else {
            return;
        };
        let _ = self.epoll.delete(ch.as_fd());
        drop(ch);
        slot.state = State::Disconnected;
        let hids = std::mem::take(&mut slot.handles);
        // What it never read goes back to the front of its queues, oldest
        // first, for another worker. Closing the pipes then ends a read
        // the worker is blocked in.
        let requeued = self.take_back(id, None, false);
        if let Some(slot) = self.workers.get_mut(&id) {
            slot.pipes.clear();
        }
        for hid in requeued {
            if !hids.contains(&hid) {
                self.distribute(hid, false);
            }
        }
        let crashed = !self
            .workers
            .get(&id)
            .is_some_and(|s| s.exited_after_disconnect);
        for hid in hids {
            if crashed {
                self.orphan_or_leave(id, hid);
            } else {
                self.leave_handle(id, hid);
            }
        }
        self.events.push_back(Event::Disconnect(id));
    }
}

impl Primary {
    /// Closes a worker's channel without asking it to disconnect (≈
    /// Node's `worker.process.disconnect()`): the primary stops routing
    /// to it, hands what was in flight to it to the others, and reports
    /// `Disconnect`; its `Exit` reports `exited_after_disconnect: false`
    /// unless a disconnect was asked for before. The worker reads EOF:
    /// its loop reports its `Disconnect` (as when the primary dies) and
    /// it should finish what it holds and exit; nothing kills it.
    /// `NotConnected` for an unknown worker or a channel already closed.
    pub fn close_channel(&mut self, id: u32) -> io::Result<()> {
        let slot = self.workers.get(&id).ok_or_else(|| Self::gone(id))?;
        if slot.channel.is_none() {
            return Err(Self::gone(id));
        }
        let requeued: Vec<u32> = slot.pipes.iter().map(|p| p.hid).collect();
        // A deliberate close: its handles close with their last worker
        // now, instead of lingering as a crashed worker's would.
        self.unroute(id);
        self.drop_channel(id);
        // What was in flight to it went back to its handles' queues.
        for hid in requeued {
            self.distribute(hid, false);
        }
        Ok(())
    }

    /// True while the worker's channel is open and no disconnect was asked
    /// for, by either side (≈ Node's `worker.isConnected()`: false as
    /// soon as a disconnect is requested). False for an id never issued
    /// and once the worker is gone.
    pub fn is_connected(&self, id: u32) -> bool {
        self.workers
            .get(&id)
            .is_some_and(|s| s.channel.is_some() && !s.exited_after_disconnect && s.exit.is_none())
    }

    /// True once the worker's process has ended (≈ Node's
    /// `worker.isDead()`): its exit was reaped, whether or not its `Exit`
    /// event was handed out yet, and for every id issued before whose
    /// `Exit` was. False for a live worker and for an id never issued.
    pub fn is_dead(&self, id: u32) -> bool {
        match self.workers.get(&id) {
            Some(s) => s.exit.is_some(),
            None => id != 0 && id < self.next_id,
        }
    }
}

/// A worker's environment: the primary's, less the cluster's own variables
/// and systemd's (only the primary speaks to systemd), then the settings'
/// and the fork's additions, then `ours` (which win).
pub(super) fn worker_env<K: AsRef<OsStr>, V: AsRef<OsStr>>(
    settings_env: &[(OsString, OsString)],
    env: &[(K, V)],
    ours: &[(&str, String)],
) -> Vec<(OsString, OsString)> {
    let reserved = |k: &OsStr| {
        k == ENV_WORKER_ID
            || k == ENV_CHANNEL_FD
            || k == ENV_WORKER_PID
            || k == ENV_FDS
            || crate::systemd::is_primary_only(k)
    };
    let mut vars: Vec<(OsString, OsString)> =
        std::env::vars_os().filter(|(k, _)| !reserved(k)).collect();
    let mut set = |k: &OsStr, v: &OsStr| {
        if let Some(slot) = vars.iter_mut().find(|(key, _)| key == k) {
            slot.1 = v.to_owned();
        } else {
            vars.push((k.to_owned(), v.to_owned()));
        }
    };
    for (k, v) in settings_env {
        set(k, v);
    }
    for (k, v) in env {
        set(k.as_ref(), v.as_ref());
    }
    for (k, v) in ours {
        set(OsStr::new(k), OsStr::new(v));
    }
    vars
}
