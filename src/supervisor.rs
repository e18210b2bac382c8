//! A ready-made operations policy on top of [`Primary`]: what nginx,
//! gunicorn and unicorn users expect from a master process.
//!
//! The stop signals follow **gunicorn** by default (and unicorn: TERM and
//! INT are the graceful stop, QUIT the immediate one). nginx uses them the
//! other way round (QUIT graceful, TERM and INT fast);
//! [`Config::stop_signals`] = [`StopSignals::Nginx`] takes that convention.
//!
//! | signal | effect |
//! |---|---|
//! | SIGTERM, SIGINT (nginx: SIGQUIT) | graceful stop: stop accepting, workers finish what they hold, then exit; still busy after the graceful timeout (30 s) → SIGKILL, reported |
//! | SIGQUIT (nginx: SIGTERM, SIGINT) | immediate stop: SIGKILL every worker |
//! | SIGHUP | zero-downtime rolling restart, one worker at a time: fork the replacement, wait until it listens everywhere the old one did, only then retire the old one; a replacement that fails stops the reload and keeps the old workers |
//! | SIGUSR1 | reopen logs: [`Notice::ReopenLogs`] for the program, and SIGUSR1 to every worker ([`Config::forward_usr1`]), as nginx |
//! | SIGUSR2 | binary upgrade: start the program again (the file now at its path) with every listening socket; once all its workers listen it takes over and this primary drains its workers and ends ([`Notice::Upgraded`]); if it fails, this primary goes on ([`Notice::UpgradeFailed`]) |
//! | SIGTTIN / SIGTTOU | one worker more / fewer (never below 1) |
//!
//! # Binary upgrade
//!
//! On SIGUSR2 (or [`Supervisor::upgrade`]), [`Primary::upgrade`] starts the
//! new program; the pid file, if any, is renamed `FILE.oldbin` first, as
//! nginx does, and the new primary writes `FILE`. The new primary's
//! supervisor confirms once its whole first generation listens; the old one
//! then stops accepting (connections waiting in the kernel backlog are the
//! new primary's to accept; those it accepted already go to its own
//! workers), lets its workers finish, removes `FILE.oldbin` and
//! [`Supervisor::next_event`] ends, as after a graceful stop. If the new
//! program fails to start, exits, or is not ready within
//! [`Config::upgrade_timeout`], it is killed, the pid file is put back, and
//! nothing else changes. One upgrade at a time: SIGUSR2 during one is
//! refused ([`Notice::UpgradeRefused`]).
//!
//! # systemd
//!
//! With `NOTIFY_SOCKET` set, the supervisor speaks `sd_notify` (only the
//! primary: workers never see the variable): `READY=1` once the first
//! generation listens; `RELOADING=1` with `MONOTONIC_USEC` at SIGHUP and
//! `READY=1` when the reload ends, done or failed (`Type=notify-reload`);
//! `STOPPING=1` at a stop; `STATUS=` lines (workers, reloads);
//! `MAINPID=` when a binary upgrade hands over (then this primary says
//! nothing more; a new primary says nothing until it took over);
//! `WATCHDOG=1` every half `WATCHDOG_USEC`, from the loop's own deadlines,
//! so a stuck loop stops the pings.
//!
//! An unexpected death is respawned with exponential backoff (100 ms, ×2,
//! up to 30 s by default); the backoff resets once a worker has stayed up
//! for the stable time. A crash loop is reported, never a busy fork loop.
//!
//! Startup fails fast instead: a worker of the first generation that ends
//! before it listened (its port is taken, say) is no transient fault, so the
//! supervisor stops every worker and [`Supervisor::next_event`] returns the
//! error. A worker count the machine cannot hold is refused up front, by
//! [`Supervisor::start`] and by SIGTTIN.
//! With a hang timeout, a worker that holds connections longer than that
//! without coming back for the next one is killed and replaced; taking the
//! next connection from its pipe is the heartbeat, so a blocking
//! single-threaded worker needs no heartbeat thread.
//!
//! # Worker recycling
//!
//! As gunicorn's `max_requests`, without its 5xx: a worker that served
//! [`Config::max_requests`] plus a random `0..=`[`Config::max_requests_jitter`]
//! (drawn per worker at its fork, so workers do not recycle together), or
//! whose resident memory is above [`Config::max_memory`] (its `VmRSS`,
//! read from `/proc` every second), is replaced as in a rolling reload:
//! [`Notice::Recycling`], the replacement is forked and listens first,
//! then the old worker stops receiving connections and is disconnected
//! gracefully ([`Notice::Recycled`]). One worker at a time (the next waits
//! until the old one exited), never before the first generation is ready,
//! nor during a reload, an upgrade or a stop. Requests are what the
//! primary counts ([`Primary::set_max_requests`]): connections taken, or
//! requests once the worker reports them
//! ([`Worker::note_requests`](crate::Worker::note_requests)). A
//! replacement that fails is reported ([`Notice::RecycleFailed`]); the old
//! worker serves on and is tried again after a backoff.
//!
//! Users of the raw [`Primary::next_event`] API can build all of this
//! themselves; the supervisor is only a policy.

#![forbid(unsafe_code)]

mod recycle;

pub use self::recycle::RecycleReason;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::primary::{Event, ExitStatus, Primary, State, Stdio};
use crate::signal::Signal;
use crate::sys::limits;
use crate::systemd::{self, Notifier};

/// The most workers a [`Supervisor`] runs, whatever the limits allow: far
/// more than any machine has cores.
pub const MAX_WORKERS: usize = 4096;

/// fds the primary holds besides its workers': stdio, epoll, signalfd,
/// listeners, and the pipe and socketpair of a fork in progress.
const FDS_RESERVE: u64 = 16;

/// Which stop signal is graceful.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StopSignals {
    /// gunicorn's and unicorn's: SIGTERM and SIGINT stop gracefully,
    /// SIGQUIT at once (the default).
    #[default]
    Gunicorn,
    /// nginx's: SIGQUIT stops gracefully, SIGTERM and SIGINT at once.
    Nginx,
}

/// Timings and sizes of a [`Supervisor`]. Start from `Config::default()`
/// and assign fields (it is `#[non_exhaustive]`: new fields come with
/// defaults).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// Workers to keep running.
    pub workers: usize,
    /// How long a graceful stop waits before SIGKILL (default 30 s).
    pub graceful_timeout: Duration,
    /// First respawn delay after a rapid death (default 100 ms).
    pub backoff_initial: Duration,
    /// Largest respawn delay (default 30 s).
    pub backoff_max: Duration,
    /// Uptime after which a death counts as isolated and the backoff resets (default 10 s).
    pub stable_after: Duration,
    /// How long a reload waits for a replacement to listen (default 30 s).
    pub reload_timeout: Duration,
    /// Kill workers that hold connections this long without taking the next one (default off).
    pub hang_timeout: Option<Duration>,
    /// Which stop signal is graceful (default: gunicorn's convention).
    pub stop_signals: StopSignals,
    /// How long a binary upgrade waits for the new primary to be ready (default 30 s).
    pub upgrade_timeout: Duration,
    /// The program a binary upgrade runs; `None` (the default): the file now
    /// at the path this program was started from.
    pub upgrade_exec: Option<PathBuf>,
    /// Write this primary's pid here at start (and remove it at the end);
    /// a binary upgrade renames it `FILE.oldbin` meanwhile (default none).
    pub pid_file: Option<PathBuf>,
    /// Send SIGUSR1 on to every worker (default true, as nginx). A worker
    /// that does not handle SIGUSR1 dies of it: turn this off for such
    /// workers.
    pub forward_usr1: bool,
    /// Recycle a worker once it served this many requests (gunicorn's
    /// `max_requests`; see "Worker recycling" in the module docs). Default
    /// none.
    pub max_requests: Option<u64>,
    /// Each worker's limit is `max_requests` plus a random `0..=` this,
    /// drawn at its fork (gunicorn's `max_requests_jitter`; default 0).
    pub max_requests_jitter: u64,
    /// Recycle a worker whose resident memory (`VmRSS`) is above this many
    /// bytes, checked every second (default none).
    pub max_memory: Option<u64>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            workers: 1,
            graceful_timeout: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            stable_after: Duration::from_secs(10),
            reload_timeout: Duration::from_secs(30),
            hang_timeout: None,
            stop_signals: StopSignals::Gunicorn,
            upgrade_timeout: crate::primary::DEFAULT_UPGRADE_TIMEOUT,
            upgrade_exec: None,
            pid_file: None,
            forward_usr1: true,
            max_requests: None,
            max_requests_jitter: 0,
            max_memory: None,
        }
    }
}

/// What [`Supervisor::next_event`] reports: the primary's own events, plus
/// what the supervisor did about them.
#[derive(Debug)]
#[non_exhaustive]
pub enum Notice {
    /// An event of the primary, passed through.
    Cluster(Event),
    /// Every worker of the first generation listens (workers that never
    /// listen never make it Ready).
    Ready,
    /// A worker died unexpectedly; a replacement is forked after `delay`.
    Respawning {
        /// The dead worker.
        id: u32,
        /// Wait before the fork.
        delay: Duration,
        /// Deaths in a row without a stable uptime in between.
        failures: u32,
    },
    /// A replacement was forked.
    Respawned {
        /// The new worker.
        id: u32,
    },
    /// Workers keep dying young: the backoff is at its limit.
    CrashLoop {
        /// Deaths in a row.
        failures: u32,
    },
    /// SIGHUP: a rolling restart began.
    Reloading,
    /// One old worker was replaced.
    Replaced {
        /// The retired worker.
        old: u32,
        /// Its replacement, already listening.
        new: u32,
    },
    /// The rolling restart finished.
    Reloaded,
    /// A replacement failed; the reload stopped and old workers stay.
    ReloadFailed(String),
    /// SIGTTIN/SIGTTOU changed the target.
    Scaled {
        /// The new number of workers.
        workers: usize,
    },
    /// SIGTTIN asked for a worker the machine cannot hold (see
    /// [`Supervisor::start`]) or its fork failed; the target is unchanged.
    ScaleRefused(io::Error),
    /// A stop began (`graceful` false: SIGQUIT).
    Stopping {
        /// Graceful or immediate.
        graceful: bool,
    },
    /// The graceful timeout passed; these workers were killed.
    ForceKilled(Vec<u32>),
    /// SIGUSR1: reopen log files (the workers got SIGUSR1 too, unless
    /// [`Config::forward_usr1`] is off).
    ReopenLogs,
    /// SIGUSR2: a binary upgrade began; this is the new primary.
    Upgrading {
        /// The new primary's pid.
        pid: i32,
    },
    /// The new primary is ready and took over: this primary stopped
    /// accepting and is letting its workers finish; then `next_event`
    /// ends.
    Upgraded {
        /// The new primary's pid.
        pid: i32,
    },
    /// The binary upgrade failed (the new program could not start, exited,
    /// or was not ready in time, and was killed); this primary serves on.
    UpgradeFailed(String),
    /// SIGUSR2 came while an upgrade was in progress (or during a stop): no
    /// second one was started.
    UpgradeRefused(String),
    /// A worker is being recycled ([`Config::max_requests`] or
    /// [`Config::max_memory`]): its replacement was forked.
    Recycling {
        /// The worker to retire.
        id: u32,
        /// Why.
        reason: RecycleReason,
    },
    /// The replacement listens; the recycled worker stopped receiving
    /// connections and is disconnecting gracefully.
    Recycled {
        /// The recycled worker.
        old: u32,
        /// Its replacement.
        new: u32,
    },
    /// A recycle's replacement could not be forked, died before it
    /// listened or did not listen in time (it was killed); the old worker
    /// serves on and is tried again after a backoff.
    RecycleFailed(String),
}

/// The pid file: written at start, `.oldbin` during an upgrade.
#[derive(Debug)]
struct PidFile {
    path: PathBuf,
    oldbin: PathBuf,
    pid: i32,
    /// Renamed to `oldbin` for an upgrade in progress or done.
    moved: bool,
}

impl PidFile {
    fn write(path: &Path) -> io::Result<PidFile> {
        let pid = crate::sys::process::getpid();
        let named = |e: io::Error, what: &str| {
            io::Error::new(
                e.kind(),
                format!("pid file {}: {what}: {e}", path.display()),
            )
        };
        // Whole or not at all: a reader never sees half a pid.
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{pid}.tmp"));
        std::fs::write(&tmp, format!("{pid}\n")).map_err(|e| named(e, "write"))?;
        if let Err(e) = std::fs::rename(&tmp, path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(named(e, "rename"));
        }
        let mut oldbin = path.as_os_str().to_owned();
        oldbin.push(".oldbin");
        Ok(PidFile {
            path: path.to_owned(),
            oldbin: oldbin.into(),
            pid,
            moved: false,
        })
    }

    fn holds_us(&self, path: &Path) -> bool {
        std::fs::read_to_string(path).is_ok_and(|s| s.trim() == self.pid.to_string())
    }

    /// FILE → FILE.oldbin, for the new primary to write FILE.
    fn move_to_oldbin(&mut self) -> io::Result<()> {
        if self.holds_us(&self.path) {
            std::fs::rename(&self.path, &self.oldbin).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("pid file {} to .oldbin: {e}", self.path.display()),
                )
            })?;
            self.moved = true;
        }
        Ok(())
    }

    /// FILE.oldbin → FILE, over what the failed new primary wrote.
    fn restore(&mut self) {
        if self.moved && self.holds_us(&self.oldbin) {
            let _ = std::fs::rename(&self.oldbin, &self.path);
        }
        self.moved = false;
    }

    /// At the end: our file, wherever it is, and only if it is still ours.
    fn remove(&self) {
        let ours = if self.moved { &self.oldbin } else { &self.path };
        if self.holds_us(ours) {
            let _ = std::fs::remove_file(ours);
        }
    }
}

#[derive(Debug)]
struct Member {
    born: Instant,
    listens: usize,
    /// Forked by `start`: its death before it listens fails the startup.
    first: bool,
}

#[derive(Debug)]
struct Reload {
    pending: Vec<u32>,
    current: Option<(u32, u32, Instant)>,
}

/// Supervises a [`Primary`]. See the module docs.
#[derive(Debug)]
pub struct Supervisor {
    primary: Primary,
    config: Config,
    members: BTreeMap<u32, Member>,
    respawn_at: Vec<Instant>,
    failures: u32,
    reload: Option<Reload>,
    stopping: Option<Instant>,
    ready: bool,
    target_listens: usize,
    out: std::collections::VecDeque<Notice>,
    /// Why the startup failed; `next_event` returns it once every worker
    /// is gone.
    failed: Option<io::Error>,
    /// `NOTIFY_SOCKET`, when set.
    notifier: Option<Notifier>,
    /// Half of `WATCHDOG_USEC`, and when the next `WATCHDOG=1` is due.
    watchdog: Option<(Duration, Instant)>,
    /// Rolling reloads done.
    reloads: u32,
    /// Handed over to this new primary by a binary upgrade.
    successor: Option<i32>,
    pid_file: Option<PidFile>,
    recycle: recycle::Recycler,
}

impl Supervisor {
    /// Takes over a primary and forks `config.workers` workers.
    ///
    /// A count the machine cannot hold is an `InvalidInput` error naming the
    /// count and the limit, before any fork: above [`MAX_WORKERS`], at or
    /// above `RLIMIT_NPROC` (the primary is a process too), or more than the
    /// primary's `RLIMIT_NOFILE` leaves room for (its channel to each worker,
    /// their stdout and stderr pipes when piped, and a connection in flight).
    /// If a fork fails, the workers already forked are killed and reaped.
    ///
    /// With [`Config::pid_file`], the pid file is written first; an error
    /// writing it fails the start. A malformed `NOTIFY_SOCKET`,
    /// `WATCHDOG_USEC` or `WATCHDOG_PID` is an `InvalidInput` error naming it.
    ///
    /// ```no_run
    /// use syncluster::supervisor::{Config, Notice, Supervisor};
    /// use syncluster::Role;
    ///
    /// # fn main() -> std::io::Result<()> {
    /// match syncluster::role()? {
    ///     Role::Primary(mut primary) => {
    ///         primary.listen("127.0.0.1:8080")?; // fails here, before any fork
    ///         let mut config = Config::default();
    ///         config.workers = 4;
    ///         let mut sup = Supervisor::start(primary, config)?;
    ///         // TERM/INT stop gracefully, HUP reloads, USR2 upgrades...
    ///         while let Some(notice) = sup.next_event()? {
    ///             if let Notice::Ready = notice {
    ///                 eprintln!("all workers listen");
    ///             }
    ///         }
    ///     }
    ///     Role::Worker(worker) => {
    ///         let listener = worker.listen("127.0.0.1:8080")?; // the pre-bound socket
    ///         for stream in listener.incoming() {
    ///             drop(stream?);
    ///         }
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn start(mut primary: Primary, config: Config) -> io::Result<Supervisor> {
        let workers = config.workers.max(1);
        check_capacity(workers, primary.settings().stdio)?;
        primary.set_hang_timeout(config.hang_timeout);
        let notifier = Notifier::from_env()?;
        let watchdog = systemd::watchdog_from_env()?
            .filter(|_| notifier.is_some())
            .map(|every| (every, Instant::now() + every));
        let pid_file = config.pid_file.as_deref().map(PidFile::write).transpose()?;
        let mut s = Supervisor {
            primary,
            config,
            members: BTreeMap::new(),
            respawn_at: Vec::new(),
            failures: 0,
            reload: None,
            stopping: None,
            ready: false,
            target_listens: 0,
            out: Default::default(),
            failed: None,
            notifier,
            watchdog,
            reloads: 0,
            successor: None,
            pid_file,
            recycle: recycle::Recycler::new(),
        };
        for _ in 0..workers {
            if let Err(e) = s.fork_member(true) {
                s.kill_and_reap();
                return Err(e);
            }
        }
        Ok(s)
    }

    // SIGKILL every worker and wait (bounded) until they are reaped.
    fn kill_and_reap(&mut self) {
        for w in self.primary.workers() {
            let _ = self.primary.kill(w.id, Signal::KILL);
        }
        let until = Instant::now() + Duration::from_secs(5);
        while !self.primary.workers().is_empty() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() || self.primary.next_event_timeout(Some(left)).is_err() {
                break;
            }
        }
    }

    /// The primary, for messages, `workers()` and the rest.
    pub fn primary(&mut self) -> &mut Primary {
        &mut self.primary
    }

    /// Workers the supervisor keeps running now.
    pub fn target(&self) -> usize {
        self.config.workers
    }

    fn fork(&mut self) -> io::Result<u32> {
        self.fork_member(false)
    }

    fn fork_member(&mut self, first: bool) -> io::Result<u32> {
        let id = self.primary.fork()?;
        self.members.insert(
            id,
            Member {
                born: Instant::now(),
                listens: 0,
                first,
            },
        );
        Ok(id)
    }

    /// Begins a graceful stop, as SIGTERM does (SIGQUIT with
    /// [`StopSignals::Nginx`]). An upgrade in progress is abandoned: the new
    /// primary is killed.
    pub fn stop(&mut self) -> io::Result<()> {
        if self.stopping.is_some() {
            return Ok(());
        }
        self.stopping = Some(Instant::now() + self.config.graceful_timeout);
        self.respawn_at.clear();
        self.reload = None;
        self.abandon_upgrade();
        self.notify("STOPPING=1");
        self.out.push_back(Notice::Stopping { graceful: true });
        self.primary.disconnect_all(None)
    }

    fn stop_now(&mut self) {
        self.stopping = Some(Instant::now());
        self.respawn_at.clear();
        self.reload = None;
        self.abandon_upgrade();
        self.notify("STOPPING=1");
        self.out.push_back(Notice::Stopping { graceful: false });
        for w in self.primary.workers() {
            let _ = self.primary.kill(w.id, Signal::KILL);
        }
    }

    // A stop during an upgrade: the new primary goes, the pid file comes back.
    fn abandon_upgrade(&mut self) {
        if let Some(pid) = self.primary.cancel_upgrade() {
            if let Some(f) = self.pid_file.as_mut() {
                f.restore();
            }
            self.out.push_back(Notice::UpgradeFailed(format!(
                "new primary (pid {pid}) killed: this primary is stopping"
            )));
        }
    }

    // One sd_notify datagram, while this primary is the one systemd hears:
    // not before a new primary took over, not after this one handed over.
    fn notify(&self, state: &str) {
        if self.successor.is_some() || self.primary.is_upgrade_pending_confirmation() {
            return;
        }
        if let Some(n) = &self.notifier {
            let _ = n.notify(state);
        }
    }

    fn status(&self) -> String {
        let live = self
            .primary
            .workers()
            .iter()
            .filter(|w| !w.exited_after_disconnect && w.state != State::Disconnected)
            .count();
        format!("STATUS={live} workers, {} reloads", self.reloads)
    }

    /// Begins a rolling restart, as SIGHUP does. Ignored during a stop, a
    /// reload or an upgrade.
    pub fn reload(&mut self) {
        if self.stopping.is_some() || self.reload.is_some() || self.primary.upgrade_pid().is_some()
        {
            return;
        }
        if self.successor.is_none() && !self.primary.is_upgrade_pending_confirmation() {
            if let Some(n) = &self.notifier {
                let _ = n.reloading();
            }
        }
        self.recycle_yield_to_reload();
        let pending: Vec<u32> = self
            .primary
            .workers()
            .into_iter()
            .filter(|w| !w.exited_after_disconnect && w.state != State::Disconnected)
            .map(|w| w.id)
            .collect();
        self.out.push_back(Notice::Reloading);
        self.reload = Some(Reload {
            pending,
            current: None,
        });
        self.step_reload();
    }

    fn step_reload(&mut self) {
        let Some(r) = self.reload.as_mut() else {
            return;
        };
        if r.current.is_some() {
            return;
        }
        let Some(old) = r.pending.pop() else {
            self.reload = None;
            self.reloads += 1;
            self.notify(&format!("READY=1\n{}", self.status()));
            self.out.push_back(Notice::Reloaded);
            return;
        };
        match self.primary.fork_replacing(old) {
            Ok(new) => {
                self.members.insert(
                    new,
                    Member {
                        born: Instant::now(),
                        listens: 0,
                        first: false,
                    },
                );
                let until = Instant::now() + self.config.reload_timeout;
                if let Some(r) = self.reload.as_mut() {
                    r.current = Some((old, new, until));
                }
            }
            Err(e) => self.fail_reload(format!("fork of a replacement for worker {old}: {e}")),
        }
    }

    fn fail_reload(&mut self, why: String) {
        if let Some(Reload {
            current: Some((_, new, _)),
            ..
        }) = self.reload.take()
        {
            if self.primary.pid(new).is_some() {
                let _ = self.primary.kill(new, Signal::KILL);
            }
        }
        self.notify(&format!("READY=1\n{}", self.status()));
        self.out.push_back(Notice::ReloadFailed(why));
    }

    /// Begins a binary upgrade, as SIGUSR2 does (see the module docs).
    /// Refused, with [`Notice::UpgradeRefused`], during a stop, while an
    /// upgrade is in progress, and in a new primary not yet ready itself.
    pub fn upgrade(&mut self) {
        let refused = if let Some(pid) = self.successor {
            Some(format!("this primary handed over to pid {pid} already"))
        } else if self.stopping.is_some() {
            Some("this primary is stopping".to_string())
        } else if let Some(pid) = self.primary.upgrade_pid() {
            Some(format!("an upgrade is in progress (new primary pid {pid})"))
        } else if self.primary.is_upgrade_pending_confirmation() {
            Some("this primary is itself an upgrade that is not ready yet".to_string())
        } else {
            None
        };
        if let Some(why) = refused {
            self.out.push_back(Notice::UpgradeRefused(why));
            return;
        }
        if let Some(Err(e)) = self.pid_file.as_mut().map(PidFile::move_to_oldbin) {
            self.out.push_back(Notice::UpgradeFailed(e.to_string()));
            return;
        }
        let exec = self.config.upgrade_exec.clone();
        match self
            .primary
            .upgrade(exec.as_deref(), self.config.upgrade_timeout)
        {
            Ok(pid) => self.out.push_back(Notice::Upgrading { pid }),
            Err(e) => {
                if let Some(f) = self.pid_file.as_mut() {
                    f.restore();
                }
                self.out.push_back(Notice::UpgradeFailed(e.to_string()));
            }
        }
    }

    // The new primary is ready: hand over and drain, as a graceful stop
    // that leaves the sockets open.
    fn hand_over(&mut self, pid: i32) {
        self.notify(&format!("MAINPID={pid}"));
        self.successor = Some(pid);
        self.watchdog = None;
        self.stopping = Some(Instant::now() + self.config.graceful_timeout);
        self.respawn_at.clear();
        self.reload = None;
        self.primary.retire(None);
        self.out.push_back(Notice::Upgraded { pid });
    }

    fn reopen_logs(&mut self) {
        if self.config.forward_usr1 {
            for w in self.primary.workers() {
                let _ = self.primary.kill(w.id, Signal::USR1);
            }
        }
        self.out.push_back(Notice::ReopenLogs);
    }

    // Retires the old worker once its replacement listens where it did.
    fn check_reload(&mut self) {
        let Some(Reload {
            current: Some((old, new, _)),
            ..
        }) = self.reload
        else {
            return;
        };
        let want = self
            .members
            .get(&old)
            .map_or(0, |m| m.listens)
            .max(self.target_listens);
        let have = self.members.get(&new).map_or(0, |m| m.listens);
        let online = self
            .primary
            .workers()
            .iter()
            .any(|w| w.id == new && matches!(w.state, State::Online | State::Listening));
        if (want == 0 && online) || (want > 0 && have >= want) {
            let _ = self
                .primary
                .disconnect(old, Some(self.config.graceful_timeout));
            if let Some(r) = self.reload.as_mut() {
                r.current = None;
            }
            self.out.push_back(Notice::Replaced { old, new });
            self.step_reload();
        }
    }

    fn scale(&mut self, up: bool) -> io::Result<()> {
        if self.stopping.is_some() {
            return Ok(());
        }
        if up {
            let more = self.config.workers + 1;
            let forked =
                check_capacity(more, self.primary.settings().stdio).and_then(|()| self.fork());
            if let Err(e) = forked {
                self.out.push_back(Notice::ScaleRefused(e));
                return Ok(());
            }
            self.config.workers = more;
        } else if self.config.workers > 1 {
            self.config.workers -= 1;
            if !self.respawn_at.is_empty() {
                self.respawn_at.pop();
            } else if let Some(w) = self
                .primary
                .workers()
                .into_iter()
                .rev()
                .find(|w| !w.exited_after_disconnect)
            {
                self.primary
                    .disconnect(w.id, Some(self.config.graceful_timeout))?;
            }
        }
        self.out.push_back(Notice::Scaled {
            workers: self.config.workers,
        });
        Ok(())
    }

    fn on_exit(&mut self, id: u32, status: ExitStatus, after_disconnect: bool) {
        let member = self.members.remove(&id);
        if self.stopping.is_some() {
            return;
        }
        if !after_disconnect && member.as_ref().is_some_and(|m| m.first && m.listens == 0) {
            return self.fail_start(format!(
                "worker {id} ended with {status} before it listened: startup failed"
            ));
        }
        if let Some(Reload {
            current: Some((_, new, _)),
            ..
        }) = self.reload
        {
            if new == id {
                self.fail_reload(format!("replacement worker {id} died before it listened"));
                return;
            }
        }
        if self.recycle_exit(id, after_disconnect) {
            return;
        }
        if after_disconnect {
            return;
        }
        let lived = member.map_or(Duration::ZERO, |m| m.born.elapsed());
        if lived >= self.config.stable_after {
            self.failures = 0;
        }
        let delay = if self.failures == 0 {
            Duration::ZERO
        } else {
            let factor = 1u32 << (self.failures - 1).min(20);
            (self.config.backoff_initial * factor).min(self.config.backoff_max)
        };
        self.failures += 1;
        if delay >= self.config.backoff_max {
            self.out.push_back(Notice::CrashLoop {
                failures: self.failures,
            });
        }
        self.respawn_at.push(Instant::now() + delay);
        self.out.push_back(Notice::Respawning {
            id,
            delay,
            failures: self.failures,
        });
    }

    // A first-generation worker could not start: stop them all, now.
    fn fail_start(&mut self, why: String) {
        self.failed = Some(io::Error::new(io::ErrorKind::Other, why));
        self.stopping = Some(Instant::now() + self.config.graceful_timeout);
        self.respawn_at.clear();
        self.reload = None;
        self.abandon_upgrade();
        self.notify("STOPPING=1");
        // Exits then report `exited_after_disconnect`: expected, not deaths.
        let _ = self.primary.disconnect_all(Some(Duration::ZERO));
    }

    fn on_timers(&mut self) -> io::Result<()> {
        let now = Instant::now();
        if let Some((every, due)) = self.watchdog {
            if due <= now {
                self.notify("WATCHDOG=1");
                self.watchdog = Some((every, now + every));
            }
        }
        let due = self.respawn_at.iter().filter(|&&t| t <= now).count();
        self.respawn_at.retain(|&t| t > now);
        for _ in 0..due {
            match self.fork() {
                Ok(id) => self.out.push_back(Notice::Respawned { id }),
                Err(e) => {
                    // Exec failing is a death too: back off and try again.
                    self.failures += 1;
                    let factor = 1u32 << (self.failures - 1).min(20);
                    let delay = (self.config.backoff_initial * factor).min(self.config.backoff_max);
                    self.respawn_at.push(now + delay);
                    self.out
                        .push_back(Notice::Cluster(Event::Error { id: 0, error: e }));
                }
            }
        }
        if let Some(Reload {
            current: Some((_, new, until)),
            ..
        }) = self.reload
        {
            if until <= now {
                self.fail_reload(format!("replacement worker {new} did not listen in time"));
            }
        }
        if let Some(t) = self.stopping {
            if t <= now {
                let left: Vec<u32> = self.primary.workers().iter().map(|w| w.id).collect();
                if !left.is_empty() {
                    for &id in &left {
                        let _ = self.primary.kill(id, Signal::KILL);
                    }
                    self.out.push_back(Notice::ForceKilled(left));
                }
                self.stopping = Some(now + Duration::from_secs(3600));
            }
        }
        Ok(())
    }

    fn next_deadline(&self) -> Option<Instant> {
        let reload = self.reload.as_ref().and_then(|r| r.current.map(|c| c.2));
        self.respawn_at
            .iter()
            .copied()
            .chain(reload)
            .chain(self.stopping)
            .chain(self.watchdog.map(|w| w.1))
            .chain(self.recycle_deadline())
            .min()
    }

    /// Runs the loop until there is something to report. `Ok(None)` once a
    /// stop has finished (every worker exited).
    ///
    /// `Err` when the startup failed: a worker of the first generation ended
    /// before it listened (the error names it and how it ended). The other
    /// workers are then killed at once; their exits are reported first, and
    /// the `Err` comes once none is left (then `Ok(None)`).
    pub fn next_event(&mut self) -> io::Result<Option<Notice>> {
        loop {
            if let Some(n) = self.out.pop_front() {
                return Ok(Some(n));
            }
            if self.stopping.is_some() && self.primary.workers().is_empty() {
                if let Some(f) = self.pid_file.take() {
                    f.remove();
                }
                return self.failed.take().map_or(Ok(None), Err);
            }
            self.recycle_turn();
            if !self.out.is_empty() {
                continue;
            }
            let wait = self
                .next_deadline()
                .map(|d| d.saturating_duration_since(Instant::now()));
            let wait = wait.or(Some(Duration::from_secs(3600)));
            let ev = self.primary.next_event_timeout(wait)?;
            self.on_timers()?;
            let Some(ev) = ev else { continue };
            // Report the primary's event first, then what was done about it.
            let action = match &ev {
                Event::Signal(s) => Some(*s),
                _ => None,
            };
            let listening = match &ev {
                Event::Listening { id, .. } => Some(*id),
                _ => None,
            };
            let exit = match &ev {
                Event::Exit {
                    id,
                    status,
                    exited_after_disconnect,
                } => Some((*id, *status, *exited_after_disconnect)),
                _ => None,
            };
            let online = matches!(ev, Event::Online(_));
            let upgrade = match &ev {
                Event::UpgradeReady { pid } => Some(Ok(*pid)),
                Event::UpgradeFailed { reason, .. } => Some(Err(reason.clone())),
                _ => None,
            };
            self.recycle_observe(&ev);
            self.out.push_back(Notice::Cluster(ev));
            let nginx = self.config.stop_signals == StopSignals::Nginx;
            match action {
                Some(Signal::TERM | Signal::INT) if !nginx => self.stop()?,
                Some(Signal::QUIT) if nginx => self.stop()?,
                Some(Signal::QUIT | Signal::TERM | Signal::INT) => self.stop_now(),
                Some(Signal::HUP) => self.reload(),
                Some(Signal::TTIN) => self.scale(true)?,
                Some(Signal::TTOU) => self.scale(false)?,
                Some(Signal::USR1) => self.reopen_logs(),
                Some(Signal::USR2) => self.upgrade(),
                _ => {}
            }
            match upgrade {
                Some(Ok(pid)) => self.hand_over(pid),
                Some(Err(reason)) => {
                    if let Some(f) = self.pid_file.as_mut() {
                        f.restore();
                    }
                    self.out.push_back(Notice::UpgradeFailed(reason));
                }
                None => {}
            }
            if let Some(id) = listening {
                if let Some(m) = self.members.get_mut(&id) {
                    m.listens += 1;
                    self.target_listens = self.target_listens.max(m.listens);
                }
                self.check_ready();
                self.check_reload();
            }
            if online {
                self.check_reload();
            }
            if let Some((id, status, ead)) = exit {
                self.on_exit(id, status, ead);
            }
        }
    }

    fn check_ready(&mut self) {
        if self.ready {
            return;
        }
        let listening = self
            .members
            .values()
            .filter(|m| m.listens >= self.target_listens.max(1))
            .count();
        if listening >= self.config.workers {
            self.ready = true;
            self.out.push_back(Notice::Ready);
            // A new primary of an upgrade takes over now; a fresh one is
            // ready for systemd.
            if let Some(old) = self.primary.upgraded_from() {
                if let Err(e) = self.primary.confirm_upgrade() {
                    self.out.push_back(Notice::Cluster(Event::Error {
                        id: 0,
                        error: io::Error::new(
                            e.kind(),
                            format!(
                                "telling the old primary (pid {old}) that this one is ready: {e}"
                            ),
                        ),
                    }));
                }
                // Nothing for systemd yet: the old primary's MAINPID= comes
                // first, and a message before it would be from a stranger.
            } else {
                self.notify(&format!("READY=1\n{}", self.status()));
            }
        }
    }
}

impl Drop for Supervisor {
    /// Kills a new primary whose upgrade is still in progress (it would
    /// otherwise run on beside nobody) and removes the pid file if it is
    /// still this primary's.
    fn drop(&mut self) {
        if self.primary.cancel_upgrade().is_some() {
            if let Some(f) = self.pid_file.as_mut() {
                f.restore();
            }
        }
        if let Some(f) = self.pid_file.take() {
            f.remove();
        }
    }
}

/// fds the primary holds per worker at most: its channel, its stdout and
/// stderr pipes when piped, and a connection in flight to it.
fn fds_per_worker(stdio: Stdio) -> u64 {
    match stdio {
        Stdio::Inherit => 2,
        Stdio::Pipe => 4,
    }
}

/// `InvalidInput`, naming the count and the limit, unless this process can
/// hold `workers` workers.
fn check_capacity(workers: usize, stdio: Stdio) -> io::Result<()> {
    let nproc = limits::nproc()?.soft;
    let nofile = limits::nofile()?.soft;
    check_capacity_within(workers, stdio, nproc, nofile)
}

/// [`check_capacity`] against given soft limits (`None`: unlimited).
fn check_capacity_within(
    workers: usize,
    stdio: Stdio,
    nproc: Option<u64>,
    nofile: Option<u64>,
) -> io::Result<()> {
    let refuse = |why: String| {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cannot run {workers} workers: {why}"),
        ))
    };
    let n = workers as u64;
    // The primary is one of this user's processes too.
    if let Some(max) = nproc.filter(|&max| n >= max) {
        return refuse(format!(
            "RLIMIT_NPROC allows this user {max} processes, the primary included"
        ));
    }
    let need = FDS_RESERVE + n * fds_per_worker(stdio);
    if let Some(max) = nofile.filter(|&max| need > max) {
        return refuse(format!(
            "the primary needs about {need} fds for them and RLIMIT_NOFILE is {max} \
             (raise it with ulimit -n)"
        ));
    }
    if workers > MAX_WORKERS {
        return refuse(format!("the most a supervisor runs is {MAX_WORKERS}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(workers: usize, stdio: Stdio, nproc: Option<u64>, nofile: Option<u64>) -> String {
        let e = check_capacity_within(workers, stdio, nproc, nofile).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        e.to_string()
    }

    #[test]
    fn worker_counts_beyond_the_limits_are_refused_naming_count_and_limit() {
        check_capacity(1, Stdio::Inherit).expect("one worker fits anywhere");
        check_capacity_within(MAX_WORKERS, Stdio::Pipe, None, None).expect("the cap itself");
        assert_eq!(
            refusal(4097, Stdio::Inherit, None, None),
            "cannot run 4097 workers: the most a supervisor runs is 4096"
        );
        let msg = refusal(100, Stdio::Inherit, Some(100), None);
        assert!(msg.starts_with("cannot run 100 workers: RLIMIT_NPROC allows this user 100 "));
        check_capacity_within(99, Stdio::Inherit, Some(100), None).expect("99 + the primary");
        // 16 + 2 per worker with inherited stdio, 16 + 4 with pipes.
        check_capacity_within(4, Stdio::Inherit, None, Some(24)).expect("24 fds hold 4");
        let msg = refusal(5, Stdio::Inherit, None, Some(24));
        assert!(
            msg.contains("about 26 fds") && msg.contains("RLIMIT_NOFILE is 24"),
            "{msg}"
        );
        let msg = refusal(4, Stdio::Pipe, None, Some(24));
        assert!(msg.contains("about 32 fds"), "{msg}");
    }
}
