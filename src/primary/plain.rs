//! Plain programs as workers: any program that takes its listening sockets
//! the way systemd passes them, with no channel and no syncluster code.
//!
//! With [`Settings::plain`](super::Settings::plain) set, [`Primary::fork`]
//! runs [`Settings::exec`](super::Settings::exec) (`argv[0]` is that path;
//! [`Settings::args`](super::Settings::args) `None` means no arguments)
//! with:
//!
//! - the program's own sockets ([`Primary::listen`], and those this process
//!   inherited from systemd or an upgrade), in that order, at fd 3, 4, ...,
//!   blocking, as systemd passes them;
//! - `LISTEN_FDS` (their count), `LISTEN_PID` (the worker's own pid,
//!   written by the child after `fork`), `LISTEN_FDNAMES` (their names,
//!   `unknown` where unnamed; see [`Primary::name_listener`]): what
//!   `sd_listen_fds(3)` reads;
//! - `SYNCLUSTER_WORKER_ID`: its id (without `SYNCLUSTER_CHANNEL_FD` it
//!   does not make the program a syncluster worker);
//! - `NOTIFY_SOCKET=@syncluster-<primary pid>-<id>`: a datagram socket of
//!   its own, owned by the primary.
//!
//! The primary's own `NOTIFY_SOCKET`, `WATCHDOG_*`, `LISTEN_*` and the
//! upgrade's variables never reach the program.
//!
//! **Readiness.** A datagram holding the line `READY=1`, sent to that socket
//! by the worker's own process (checked with `SO_PASSCRED`: systemd's
//! `NotifyAccess=main`), makes the worker ready: [`Event::Online`], then one
//! [`Event::Listening`] per socket it was given, which is what the
//! [`Supervisor`](crate::supervisor::Supervisor) waits for (a rolling
//! restart retires an old worker only once its replacement is ready). With
//! [`Plain::ready_after`], a worker is also ready once it has run that
//! long, for programs that cannot send a datagram (Node). Every other line
//! (`STATUS=`, `STOPPING=1`, `MAINPID=`, `WATCHDOG=1`, ...) is ignored:
//! it never reaches the service manager, which only the primary speaks to.
//!
//! **Hostile input.** Each worker has its own socket, so one that floods
//! fills only its own queue (the kernel bounds it); each turn reads at most
//! [`DATAGRAMS_PER_TURN`] datagrams of at most 4 KiB from one worker
//! (systemd's limit too), closes any fds attached, and drops datagrams from
//! any other process.
//!
//! **Stop and exit.** [`Primary::disconnect`] sends `SIGTERM` (once); with a
//! timeout, `SIGKILL` follows. A plain worker has no channel: exits are
//! seen by pidfd (and `SIGCHLD`), and no [`Event::Disconnect`] comes before
//! its [`Event::Exit`].
//!
//! **One socket per worker slot** ([`Plain::reuse_port`]): each worker gets
//! its own `SO_REUSEPORT` socket for each of the program's TCP sockets, all
//! bound to the same address, and the kernel spreads the connections among
//! them. The primary keeps every slot's socket, so:
//!
//! - a worker that dies loses nothing queued: its slot waits (up to
//!   [`Settings::orphan_linger`](super::Settings::orphan_linger)) for the
//!   next [`Primary::fork`], which takes it with its queue;
//! - a rolling restart loses nothing: [`Primary::fork_replacing`] gives the
//!   replacement the old worker's slot, which both accept on until the old
//!   one leaves;
//! - a binary upgrade passes every slot's socket; the new primary's workers
//!   take the same slots;
//! - a worker retired for good (scaling down) leaves a slot nobody takes:
//!   it is closed when that worker exits, and what waits in its queue moves
//!   to another socket of the group where `net.ipv4.tcp_migrate_req` is 1
//!   (Linux 5.14), or is reset where it is 0. Slot 0 is the program's own
//!   socket: when it is the one retired, the highest slot in use takes its
//!   place.
//!
//! The program's sockets must have `SO_REUSEPORT` for this: those of
//! [`Primary::listen`] do when `reuse_port` is set first; an inherited one
//! (systemd's `ReusePort=yes`) must have it, else the fork fails naming it.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::event_loop::TOKEN_NOTIFY;
use super::shared::{self, Address, BindOptions};
use super::workers::{Slot, State};
use super::{Event, Primary, Stdio};
use crate::env::ENV_WORKER_ID;
use crate::protocol::{Endpoint, Policy};
use crate::signal::Signal;
use crate::sys::{self, epoll, msg, process, signal, socket};

/// Datagrams read from one worker's notification socket per loop turn; the
/// rest wait for the next turn (the socket stays readable).
pub const DATAGRAMS_PER_TURN: usize = 16;

/// The longest notification read; the rest of a longer one is dropped.
const NOTIFY_MAX: usize = 4096;

/// Marks the key of a slot's socket: `<program socket's key>#slot<k>`.
const SLOT_MARK: &str = "#slot";

/// How the primary runs plain programs as workers (see the module docs).
/// Start from `Plain::default()` and assign fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Plain {
    /// Also count a worker ready once it has run this long, without its
    /// `READY=1` (whichever comes first). `None` (the default): only
    /// `READY=1` makes it ready.
    pub ready_after: Option<Duration>,
    /// One `SO_REUSEPORT` socket per worker slot instead of one socket
    /// shared by every worker (TCP only).
    pub reuse_port: bool,
}

/// The plain workers of a primary.
#[derive(Debug, Default)]
pub(super) struct PlainState {
    workers: BTreeMap<u32, PlainWorker>,
    /// Sockets made blocking already (once, before their first worker:
    /// the flag is shared by every process holding them).
    prepared: BTreeSet<u32>,
    /// Reuse-port slots whose worker died, kept for a replacement until then.
    vacant: BTreeMap<usize, Instant>,
}

#[derive(Debug)]
struct PlainWorker {
    notify: UnixDatagram,
    pid: i32,
    ready: bool,
    /// `Plain::ready_after` from its start.
    ready_at: Option<Instant>,
    slot: Option<usize>,
    /// SIGTERM sent.
    termed: bool,
    addresses: Vec<Address>,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// True when a notification holds the line `READY=1`.
fn says_ready(datagram: &[u8]) -> bool {
    datagram.split(|&b| b == b'\n').any(|l| l == b"READY=1")
}

/// systemd's rule for `FileDescriptorName=`: 1 to 255 printable ASCII
/// characters, no `:`.
fn check_name(name: &str) -> io::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b':');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "socket name {name:?}: expected 1 to 255 printable ASCII characters, no ':' \
             (systemd's FileDescriptorName=)"
        )))
    }
}

impl Primary {
    /// Names one of the program's sockets (bound by [`Primary::listen`] or
    /// inherited), as systemd's `FileDescriptorName=` does: plain workers
    /// see the name in `LISTEN_FDNAMES`, and a worker's `listen("fd:NAME")`
    /// finds the socket by it. `NotFound` when no socket of the program has
    /// `address`; `InvalidInput` for a name systemd would refuse (empty,
    /// over 255 bytes, not printable ASCII, or with a `:`).
    pub fn name_listener(&mut self, address: &Address, name: &str) -> io::Result<()> {
        check_name(name)?;
        let h = self
            .handles
            .values_mut()
            .find(|h| h.pinned && &h.address == address && !h.key.contains(SLOT_MARK))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "name of {address}: no listening socket of the program has that address"
                    ),
                )
            })?;
        h.name = Some(name.to_string());
        Ok(())
    }

    /// Forks a worker that is to take over from worker `old` (a rolling
    /// restart, a recycling): the same as [`Primary::fork`], except that a
    /// plain worker with [`Plain::reuse_port`] gets `old`'s sockets, so that
    /// what waits in their queues is served after `old` leaves.
    pub fn fork_replacing(&mut self, old: u32) -> io::Result<u32> {
        if self.settings.plain.is_some() {
            self.fork_plain(&[] as &[(&str, &str)], Some(old))
        } else {
            self.fork()
        }
    }

    // The program's own sockets, in the order workers get them: listening
    // stream sockets the program bound or inherited, not slot copies.
    fn program_sockets(&self) -> Vec<u32> {
        self.handles
            .iter()
            .filter(|(_, h)| {
                h.pinned && !h.key.contains(SLOT_MARK) && !matches!(h.address, Address::Udp(_))
            })
            .map(|(&hid, _)| hid)
            .collect()
    }

    pub(super) fn fork_plain<K: AsRef<OsStr>, V: AsRef<OsStr>>(
        &mut self,
        env: &[(K, V)],
        replacing: Option<u32>,
    ) -> io::Result<u32> {
        let id = self.next_id;
        self.settings.validate()?;
        let plain = self.settings.plain.clone().unwrap_or_default();
        let program = self.program_sockets();
        let slot = plain.reuse_port.then(|| self.pick_slot(replacing));
        let hids: Vec<u32> = match slot {
            None | Some(0) => program.clone(),
            Some(k) => program
                .iter()
                .map(|&h| self.slot_socket(h, k))
                .collect::<io::Result<_>>()?,
        };
        if plain.reuse_port {
            for &h in &program {
                self.check_reuseport(h)?;
            }
        }
        for &h in &hids {
            if self.plain.prepared.insert(h) {
                // systemd passes blocking sockets; ours are non-blocking.
                sys::fd::set_nonblocking(self.handles[&h].fd.as_fd(), false)?;
            }
        }
        let addresses: Vec<Address> = program
            .iter()
            .map(|h| self.handles[h].address.clone())
            .collect();
        let names: Vec<&str> = program
            .iter()
            .map(|h| self.handles[h].name.as_deref().unwrap_or("unknown"))
            .collect();
        let notify_name = format!("syncluster-{}-{id}", process::getpid());
        let notify = UnixDatagram::bind_addr(&UnixAddr::from_abstract_name(&notify_name)?)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("fork of worker {id}: notification socket @{notify_name}: {e}"),
                )
            })?;
        notify.set_nonblocking(true)?;
        socket::set_passcred(notify.as_fd(), true)?;

        let s = &self.settings;
        let exec = s
            .exec
            .clone()
            .unwrap_or_else(|| PathBuf::from("/proc/self/exe"));
        let mut argv: Vec<OsString> = vec![exec.clone().into()];
        argv.extend(s.args.iter().flatten().cloned());
        let vars = super::workers::worker_env(
            &s.env,
            env,
            &[
                (ENV_WORKER_ID, id.to_string()),
                ("LISTEN_FDS", hids.len().to_string()),
                ("LISTEN_FDNAMES", names.join(":")),
                ("NOTIFY_SOCKET", format!("@{notify_name}")),
            ],
        );
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
        plan.env_child_pid("LISTEN_PID")?;
        let pipes = match s.stdio {
            Stdio::Inherit => None,
            Stdio::Pipe => Some((process::pipe()?, process::pipe()?)),
        };
        let extra = s.extra_fds.clone();
        let mut map: Vec<(BorrowedFd<'_>, i32)> = hids
            .iter()
            .enumerate()
            .map(|(i, h)| (self.handles[h].fd.as_fd(), 3 + i as i32))
            .collect();
        if let Some(((_, out_w), (_, err_w))) = &pipes {
            map.push((out_w.as_fd(), 1));
            map.push((err_w.as_fd(), 2));
        }
        map.extend(extra.iter().map(|(fd, target)| (fd.as_fd(), *target)));
        let pid = process::spawn(&plan, &map)
            .map_err(|e| io::Error::new(e.kind(), format!("fork of worker {id}: {e}")))?;
        drop(map);
        let (stdout, stderr) = match pipes {
            Some(((out_r, _), (err_r, _))) => (Some(out_r), Some(err_r)),
            None => (None, None),
        };
        if let Err(e) = self
            .epoll
            .add(notify.as_fd(), epoll::READABLE, TOKEN_NOTIFY | id as u64)
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
                channel: None,
                want_write: false,
                exited_after_disconnect: false,
                exit: None,
                in_flight: Default::default(),
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
        if let Some(k) = slot {
            self.plain.vacant.remove(&k);
        }
        self.plain.workers.insert(
            id,
            PlainWorker {
                notify,
                pid,
                ready: false,
                ready_at: plain.ready_after.map(|d| Instant::now() + d),
                slot,
                termed: false,
                addresses,
            },
        );
        self.events.push_back(Event::Fork(id));
        Ok(id)
    }

    // The slot a new worker takes: `old`'s when it replaces a worker that
    // has one, else the lowest one no live, staying worker holds.
    fn pick_slot(&self, replacing: Option<u32>) -> usize {
        if let Some(k) = replacing
            .and_then(|old| self.plain.workers.get(&old))
            .and_then(|w| w.slot)
        {
            return k;
        }
        let taken: BTreeSet<usize> = self
            .plain
            .workers
            .iter()
            .filter(|(id, _)| self.is_staying(**id))
            .filter_map(|(_, w)| w.slot)
            .collect();
        (0..).find(|k| !taken.contains(k)).unwrap_or(0)
    }

    // Alive and not asked to leave.
    fn is_staying(&self, id: u32) -> bool {
        self.workers
            .get(&id)
            .is_some_and(|s| s.exit.is_none() && !s.exited_after_disconnect)
    }

    fn check_reuseport(&self, hid: u32) -> io::Result<()> {
        let h = &self.handles[&hid];
        if !matches!(h.address, Address::Tcp(_)) {
            return Err(invalid(format!(
                "reuse_port: {} is not a TCP socket; one socket per worker applies to TCP only",
                h.address
            )));
        }
        if !socket::reuseport(h.fd.as_fd())? {
            return Err(invalid(format!(
                "reuse_port: the socket on {} has no SO_REUSEPORT (an inherited socket \
                 needs ReusePort=yes in its .socket unit)",
                h.address
            )));
        }
        Ok(())
    }

    // Slot `k`'s copy of program socket `hid`: the one kept (or inherited
    // through an upgrade), else a new SO_REUSEPORT socket on its address.
    fn slot_socket(&mut self, hid: u32, k: usize) -> io::Result<u32> {
        self.check_reuseport(hid)?;
        let h = &self.handles[&hid];
        let key = format!("{}{SLOT_MARK}{k}", h.key);
        if let Some(&found) = self.keys.get(&key) {
            return Ok(found);
        }
        let Address::Tcp(a) = h.address else {
            unreachable!("checked by check_reuseport");
        };
        let opts = BindOptions {
            backlog: self.settings.backlog.min(i32::MAX as u32) as i32,
            reuse_port: true,
            ..Default::default()
        };
        let (fd, address, _) = shared::bind(&Endpoint::Tcp(Some(a.ip()), a.port()), None, &opts)?;
        let new = self
            .add_handle(key, fd, address, None, Policy::Shared)
            .map_err(|e| shared::named_error(e, &a.to_string()))?;
        self.pin(new);
        Ok(new)
    }

    // Every slot copy of the program's sockets for slot `k`.
    fn slot_handles(&self, k: usize) -> Vec<u32> {
        let suffix = format!("{SLOT_MARK}{k}");
        self.handles
            .iter()
            .filter(|(_, h)| h.key.ends_with(&suffix))
            .map(|(&hid, _)| hid)
            .collect()
    }

    // Slot `k` has no worker left and none is coming: close its sockets.
    // Slot 0's are the program's: the highest slot in use moves there.
    fn release_slot(&mut self, k: usize) {
        self.plain.vacant.remove(&k);
        if k > 0 {
            for hid in self.slot_handles(k) {
                self.close_handle(hid);
            }
            return;
        }
        let Some(j) = self
            .plain
            .workers
            .iter()
            .filter(|(id, _)| self.is_staying(**id))
            .filter_map(|(_, w)| w.slot)
            .filter(|&j| j > 0)
            .max()
        else {
            return;
        };
        for hid in self.program_sockets() {
            let key = format!("{}{SLOT_MARK}{j}", self.handles[&hid].key);
            let Some(&moved) = self.keys.get(&key) else {
                continue;
            };
            let Some(mut m) = self.handles.remove(&moved) else {
                continue;
            };
            if let Some(p) = self.handles.get_mut(&hid) {
                std::mem::swap(&mut p.fd, &mut m.fd);
            }
            // Slot j's handle now holds the old slot 0 socket: closed.
            self.handles.insert(moved, m);
            self.close_handle(moved);
        }
        for w in self.plain.workers.values_mut() {
            if w.slot == Some(j) {
                w.slot = Some(0);
            }
        }
        self.plain.vacant.remove(&j);
    }

    // Closes slot copies that no worker holds and none waits for (after an
    // upgrade, those of slots the old primary had beyond this one's).
    pub(super) fn sweep_slots(&mut self) {
        let held: BTreeSet<usize> = self
            .plain
            .workers
            .values()
            .filter_map(|w| w.slot)
            .chain(self.plain.vacant.keys().copied())
            .collect();
        let stale: Vec<u32> = self
            .handles
            .iter()
            .filter_map(|(&hid, h)| {
                let k: usize = h.key.rsplit_once(SLOT_MARK)?.1.parse().ok()?;
                (!held.contains(&k)).then_some(hid)
            })
            .collect();
        for hid in stale {
            self.close_handle(hid);
        }
    }

    // The notification socket of worker `id` is readable.
    pub(super) fn on_notify(&mut self, id: u32) {
        let mut buf = [0u8; NOTIFY_MAX];
        let mut ready = false;
        let Some(w) = self.plain.workers.get(&id) else {
            return;
        };
        for _ in 0..DATAGRAMS_PER_TURN {
            match msg::recv_cred(w.notify.as_fd(), &mut buf, true) {
                Ok(d) if d.pid == Some(w.pid) => {
                    ready |= says_ready(buf.get(..d.len).unwrap_or_default());
                }
                // Not from the worker itself: dropped.
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        if ready {
            self.mark_ready(id);
        }
    }

    fn mark_ready(&mut self, id: u32) {
        let Some(w) = self.plain.workers.get_mut(&id) else {
            return;
        };
        if w.ready {
            return;
        }
        w.ready = true;
        w.ready_at = None;
        let addresses = w.addresses.clone();
        let Some(slot) = self.workers.get_mut(&id).filter(|s| s.exit.is_none()) else {
            return;
        };
        if slot.state == State::None {
            self.events.push_back(Event::Online(id));
        }
        slot.state = State::Listening;
        for address in addresses {
            self.events.push_back(Event::Listening { id, address });
        }
    }

    pub(super) fn plain_deadline(&self) -> Option<Instant> {
        let ready = self
            .plain
            .workers
            .values()
            .filter(|w| !w.ready)
            .filter_map(|w| w.ready_at);
        ready.chain(self.plain.vacant.values().copied()).min()
    }

    pub(super) fn plain_timers(&mut self) {
        let now = Instant::now();
        let due: Vec<u32> = self
            .plain
            .workers
            .iter()
            .filter(|(_, w)| !w.ready && w.ready_at.is_some_and(|t| t <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            self.mark_ready(id);
        }
        let expired: Vec<usize> = self
            .plain
            .vacant
            .iter()
            .filter(|(_, &t)| t <= now)
            .map(|(&k, _)| k)
            .collect();
        for k in expired {
            self.release_slot(k);
        }
    }

    // `disconnect` of a worker without a channel: SIGTERM, once, for a
    // plain one.
    pub(super) fn disconnect_plain(&mut self, id: u32) -> io::Result<()> {
        let Some(w) = self.plain.workers.get_mut(&id) else {
            return Ok(());
        };
        if w.termed || self.workers.get(&id).is_some_and(|s| s.exit.is_some()) {
            return Ok(());
        }
        w.termed = true;
        process::kill(w.pid, Signal::TERM.as_raw())
    }

    // Worker `id` exited: its notification socket closes; a reuse-port
    // slot it leaves empty waits for a replacement (a death) or closes (a
    // retirement).
    pub(super) fn plain_exited(&mut self, id: u32) {
        let Some(w) = self.plain.workers.remove(&id) else {
            return;
        };
        let _ = self.epoll.delete(w.notify.as_fd());
        let Some(k) = w.slot else {
            return;
        };
        if self.plain.workers.values().any(|o| o.slot == Some(k)) {
            return;
        }
        let retired = self
            .workers
            .get(&id)
            .is_some_and(|s| s.exited_after_disconnect);
        if retired {
            self.release_slot(k);
        } else {
            let linger = self.settings.orphan_linger;
            self.plain.vacant.insert(k, Instant::now() + linger);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ExitStatus, Settings};
    use super::*;

    fn next(p: &mut Primary) -> Event {
        p.next_event_timeout(Some(Duration::from_secs(10)))
            .unwrap()
            .expect("an event within 10 s")
    }

    #[test]
    fn a_plain_worker_is_ready_after_its_time_and_disconnect_is_sigterm() {
        // Proves what it got, then waits for SIGTERM.
        let script = r#"[ "$LISTEN_PID" = $$ ] && [ "$LISTEN_FDS" = 2 ] && [ -S /proc/self/fd/4 ] || exit 3
            trap 'exit 7' TERM; while :; do sleep 0.02; done"#;
        let settings = Settings {
            policy: Policy::Shared,
            exec: Some("/bin/sh".into()),
            args: Some(vec!["-c".into(), script.into()]),
            plain: Some(Plain {
                ready_after: Some(Duration::from_millis(100)),
                ..Plain::default()
            }),
            ..Settings::default()
        };
        let mut p = Primary::new(settings).unwrap();
        let a = p.listen("127.0.0.1:0").unwrap();
        let b = p.listen("127.0.0.1:0").unwrap();
        assert_eq!(a, b, "one address, one socket");
        let b = p
            .listen("[::1]:0")
            .or_else(|_| p.listen("127.0.0.2:0"))
            .unwrap();
        let started = Instant::now();
        let id = p.fork().unwrap();
        assert!(matches!(next(&mut p), Event::Fork(i) if i == id));
        assert!(matches!(next(&mut p), Event::Online(i) if i == id));
        assert!(started.elapsed() >= Duration::from_millis(100));
        for want in [&a, &b] {
            match next(&mut p) {
                Event::Listening { id: i, address } => assert!(i == id && &address == want),
                e => panic!("{e:?}"),
            }
        }
        assert_eq!(p.workers()[0].state, State::Listening);
        p.disconnect(id, Some(Duration::from_secs(5))).unwrap();
        p.disconnect(id, None).unwrap(); // one SIGTERM, not two
        match next(&mut p) {
            Event::Exit {
                id: i,
                status,
                exited_after_disconnect,
            } => {
                assert_eq!(i, id);
                assert_eq!(status, ExitStatus::Code(7));
                assert!(exited_after_disconnect);
            }
            e => panic!("no Disconnect before a plain worker's Exit: {e:?}"),
        }
        assert!(p.plain.workers.is_empty(), "its notification socket closed");
    }

    #[test]
    fn plain_workers_need_the_shared_policy() {
        let settings = Settings {
            plain: Some(Plain::default()),
            ..Settings::default()
        };
        let e = Primary::new(settings).unwrap_err();
        assert!(e.to_string().contains("Policy::Shared"), "{e}");
    }

    #[test]
    fn only_a_ready_line_makes_a_worker_ready() {
        assert!(says_ready(b"READY=1"));
        assert!(says_ready(b"STATUS=up\nREADY=1\n"));
        assert!(!says_ready(b"READY=10"));
        assert!(!says_ready(b"XREADY=1"));
        assert!(!says_ready(b"STOPPING=1\nSTATUS=READY=1"));
        assert!(!says_ready(b""));
    }

    #[test]
    fn socket_names_follow_systemds_rule() {
        check_name("http").unwrap();
        check_name(&"a".repeat(255)).unwrap();
        for bad in ["", "a:b", "a b", "caf\u{e9}", &"a".repeat(256)] {
            let e = check_name(bad).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
    }
}
