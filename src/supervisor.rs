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

use crate::primary::{Event, Primary, State};
use crate::sys::signal;

/// Timings and sizes of a [`Supervisor`].
#[derive(Debug, Clone)]
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
}

impl Supervisor {
    /// Takes over a primary and forks `config.workers` workers.
    pub fn start(mut primary: Primary, config: Config) -> io::Result<Supervisor> {
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
        };
        for _ in 0..s.config.workers.max(1) {
            s.fork()?;
        }
        Ok(s)
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
        let id = self.primary.fork()?;
        self.members.insert(
            id,
            Member {
                born: Instant::now(),
                listens: 0,
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
            let _ = self.primary.kill(w.id, signal::SIGKILL);
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
                let _ = self.primary.kill(new, signal::SIGKILL);
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
            self.config.workers += 1;
            self.fork()?;
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

    fn on_exit(&mut self, id: u32, after_disconnect: bool) {
        let member = self.members.remove(&id);
        if self.stopping.is_some() {
            return;
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
                    self.out.push_back(Notice::Cluster(Event::Error(0, e)));
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
                        let _ = self.primary.kill(id, signal::SIGKILL);
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
    pub fn next_event(&mut self) -> io::Result<Option<Notice>> {
        loop {
            if let Some(n) = self.out.pop_front() {
                return Ok(Some(n));
            }
            if self.stopping.is_some() && self.primary.workers().is_empty() {
                return Ok(None);
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
                Event::Listening(id, _) => Some(*id),
                _ => None,
            };
            let exit = match &ev {
                Event::Exit(id, _, ead) => Some((*id, *ead)),
                _ => None,
            };
            let online = matches!(ev, Event::Online(_));
            self.out.push_back(Notice::Cluster(ev));
            match action {
                Some(s) if s == signal::SIGTERM || s == signal::SIGINT => self.stop()?,
                Some(s) if s == signal::SIGQUIT => self.stop_now(),
                Some(s) if s == signal::SIGHUP => self.reload(),
                Some(s) if s == signal::SIGTTIN => self.scale(true)?,
                Some(s) if s == signal::SIGTTOU => self.scale(false)?,
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
            if let Some((id, ead)) = exit {
                self.on_exit(id, ead);
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
