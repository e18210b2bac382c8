//! Hostile workers against a real primary: `examples/cluster_probe` runs
//! the primary, `tests/hostile/worker.py` (channel floods) or
//! `tests/hostile/claims.py` (lies and privilege grabs) the misbehaving
//! worker, one MODE per misbehaviour, and a probe worker in
//! `PROBE_MODE=listen` is the honest one beside it.
//!
//! Each test asserts three things: the primary's fds and RSS stay under a
//! stated bound ([`Sampler`] reads `/proc/<primary>` every millisecond), the
//! hostile worker is reported (`error <id> ...`) and killed (signal 9), and
//! the honest worker serves every client during and after the attack
//! ([`Clients`]).
//!
//! One module per family of misbehaviour; add yours next to `channel`.
//! Helpers: [`fork_hostile`] (in `tests/common`), [`honest_worker`],
//! [`Sampler`], [`Clients`], [`rss_kb`].

mod common;

#[path = "hostile_worker/channel.rs"]
mod channel;
#[path = "hostile_worker/primary.rs"]
mod primary;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::{count_fds, fork_hostile, tcp_line, Probe, DEADLINE};

/// Forks a probe worker listening on 127.0.0.1:0; returns its id and address.
pub fn honest_worker(p: &mut Probe) -> (u32, String) {
    let id = p.fork_online("PROBE_MODE=listen PROBE_ADDR=127.0.0.1:0");
    let line = p.expect(format!("listening {id} "), DEADLINE);
    let addr = line.rsplit(' ').next().expect("an address").to_string();
    (id, addr)
}

/// `VmRSS` of `pid` in kB, 0 if it is gone.
pub fn rss_kb(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Samples a process's fd count and RSS every millisecond in a thread,
/// keeping the peaks.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(usize, u64)>>,
}

impl Sampler {
    /// Starts sampling `pid`.
    pub fn start(pid: i32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let (mut fds, mut rss) = (0, 0);
            while !flag.load(Ordering::Relaxed) {
                fds = fds.max(open_fds(pid));
                rss = rss.max(rss_kb(pid));
                thread::sleep(Duration::from_millis(1));
            }
            (fds, rss)
        });
        Sampler {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops; returns the peak fd count and the peak RSS in kB.
    pub fn stop(mut self) -> (usize, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("sampler")
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Clients of the honest worker in a loop (one `tcp_line` at a time, 5 s
/// each at most), counting answers and failures.
pub struct Clients {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(usize, Vec<String>)>>,
}

impl Clients {
    /// Starts the loop against `addr`; every answer must start with `want`.
    pub fn start(addr: &str, want: &str) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (addr, want) = (addr.to_string(), want.to_string());
        let thread = thread::spawn(move || {
            let (mut ok, mut failed) = (0, Vec::new());
            let end = Instant::now() + Duration::from_secs(60);
            while !flag.load(Ordering::Relaxed) && Instant::now() < end {
                match tcp_line(&addr, Duration::from_secs(5)) {
                    Ok(line) if line.starts_with(&want) => ok += 1,
                    Ok(line) => failed.push(format!("answer {line:?}")),
                    Err(e) => failed.push(e.to_string()),
                }
                thread::sleep(Duration::from_millis(2));
            }
            (ok, failed)
        });
        Clients {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops; panics unless every request got its answer and at least
    /// `min` did. Returns how many did.
    pub fn stop(mut self, min: usize) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        let (ok, failed) = self
            .thread
            .take()
            .expect("running")
            .join()
            .expect("clients");
        assert!(
            failed.is_empty(),
            "{} failed requests: {failed:?}",
            failed.len()
        );
        assert!(ok >= min, "only {ok} requests served, want {min}");
        ok
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Waits until the primary's fd count is `want` (a closed channel's fds go
/// with its worker's exit); returns the last count seen.
pub fn settle_fds(p: &Probe, want: usize) -> usize {
    let mut last = 0;
    common::wait_until(DEADLINE, || {
        last = count_fds(p.pid());
        last == want
    });
    last
}
