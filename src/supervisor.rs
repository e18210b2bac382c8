//! A ready-made operations policy on top of [`Primary`]: what nginx,
//! gunicorn and unicorn users expect from a master process.
//!
//! | signal | effect |
//! |---|---|
//! | SIGTERM, SIGINT | graceful stop: stop accepting, workers finish what they hold, then exit; still busy after the graceful timeout (30 s) → SIGKILL, reported |
//! | SIGQUIT | immediate stop: SIGKILL every worker |
//! | SIGHUP | zero-downtime rolling restart, one worker at a time: fork the replacement, wait until it listens everywhere the old one did, only then retire the old one; a replacement that fails stops the reload and keeps the old workers |
//! | SIGTTIN / SIGTTOU | one worker more / fewer (never below 1) |
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
//! without coming back for the next one is killed and replaced; the accept
//! acknowledgements are the heartbeat, so a blocking single-threaded worker
//! needs no heartbeat thread.
//!
//! Users of the raw [`Primary::next_event`] API can build all of this
//! themselves; the supervisor is only a policy.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io;
use std::time::{Duration, Instant};

use crate::primary::{Event, ExitStatus, Primary, State, Stdio};
use crate::signal::Signal;
use crate::sys::limits;

/// The most workers a [`Supervisor`] runs, whatever the limits allow: far
/// more than any machine has cores.
pub const MAX_WORKERS: usize = 4096;

/// fds the primary holds besides its workers': stdio, epoll, signalfd,
/// listeners, and the pipe and socketpair of a fork in progress.
const FDS_RESERVE: u64 = 16;

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
    /// All initial workers listen (or are online, if they do not listen).
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
    pub fn start(mut primary: Primary, config: Config) -> io::Result<Supervisor> {
        let workers = config.workers.max(1);
        check_capacity(workers, primary.settings().stdio)?;
        primary.set_hang_timeout(config.hang_timeout);
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

    /// Begins a graceful stop, as SIGTERM does.
    pub fn stop(&mut self) -> io::Result<()> {
        if self.stopping.is_some() {
            return Ok(());
        }
        self.stopping = Some(Instant::now() + self.config.graceful_timeout);
        self.respawn_at.clear();
        self.reload = None;
        self.out.push_back(Notice::Stopping { graceful: true });
        self.primary.disconnect_all(None)
    }

    fn stop_now(&mut self) {
        self.stopping = Some(Instant::now());
        self.respawn_at.clear();
        self.reload = None;
        self.out.push_back(Notice::Stopping { graceful: false });
        for w in self.primary.workers() {
            let _ = self.primary.kill(w.id, Signal::KILL);
        }
    }

    /// Begins a rolling restart, as SIGHUP does.
    pub fn reload(&mut self) {
        if self.stopping.is_some() || self.reload.is_some() {
            return;
        }
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
            self.out.push_back(Notice::Reloaded);
            return;
        };
        match self.primary.fork() {
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
        self.out.push_back(Notice::ReloadFailed(why));
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
        // Exits then report `exited_after_disconnect`: expected, not deaths.
        let _ = self.primary.disconnect_all(Some(Duration::ZERO));
    }

    fn on_timers(&mut self) -> io::Result<()> {
        let now = Instant::now();
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
                return self.failed.take().map_or(Ok(None), Err);
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
            self.out.push_back(Notice::Cluster(ev));
            match action {
                Some(Signal::TERM | Signal::INT) => self.stop()?,
                Some(Signal::QUIT) => self.stop_now(),
                Some(Signal::HUP) => self.reload(),
                Some(Signal::TTIN) => self.scale(true)?,
                Some(Signal::TTOU) => self.scale(false)?,
                _ => {}
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
