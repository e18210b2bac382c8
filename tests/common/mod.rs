//! Shared helpers for the integration tests that drive
//! `examples/cluster_probe` (its top doc comment is the probe's contract).
//! Used by `tests/cluster_core.rs` and `tests/listening.rs`: keep this API
//! stable; add to it, do not change it.
//!
//! # API
//!
//! - [`DEADLINE`] (10 s): the default bound of every wait. Nothing here
//!   waits without a deadline.
//! - [`probe_path()`]: the probe binary, `target/<profile>/examples/cluster_probe`,
//!   found from `current_exe()`. `cargo test --test X` does not build
//!   examples, so the first call runs `$CARGO build --example cluster_probe`
//!   (once per test process). `SYNCLUSTER_PROBE=/path` overrides both.
//! - [`Probe`]: one running probe (a primary) with piped stdin/stdout/stderr.
//!   - [`Probe::start()`], [`Probe::start_with(|cmd| ...)`](Probe::start_with)
//!     to set env or cwd on the `Command` first.
//!   - [`Probe::cmd(line)`](Probe::cmd): writes one command line.
//!   - [`Probe::expect(m, timeout) -> String`](Probe::expect): the oldest
//!     not yet consumed line matching `m`. Lines that do not match are
//!     skipped but not lost: they stay pending for later `expect`s (so the
//!     order of unrelated lines does not matter), and every line is in the
//!     log printed when an expectation fails (timeout or EOF: panic). To
//!     check an order, compare positions in [`Probe::log`]. `m` is a
//!     [`Matcher`]: a `&str` or `String` is a prefix, [`pred`] wraps a
//!     closure, [`exact`] a whole line.
//!   - [`Probe::expect_all(&[m..], timeout) -> Vec<String>`](Probe::expect_all):
//!     one line per matcher, in any order; returned in matcher order.
//!   - [`Probe::expect_none(m, for)`](Probe::expect_none): no line matching
//!     `m` is pending or arrives during `for`.
//!   - [`Probe::expect_line`] (exact) and [`Probe::expect_prefix`], and
//!     [`Probe::spawn`] (= `start`): the names the first users had.
//!   - [`Probe::ask(line, prefix) -> String`](Probe::ask): `cmd` + `expect`
//!     with [`DEADLINE`].
//!   - shortcuts: [`Probe::fork`], [`Probe::fork_online`], [`Probe::fds`],
//!     [`Probe::workers`], [`Probe::worker_pids`].
//!   - [`Probe::log()`](Probe::log) (every line received, matched or not,
//!     in order; stderr lines as `stderr: ...`, commands sent as `> ...`),
//!     [`Probe::count(m)`](Probe::count), [`Probe::position(m)`](Probe::position).
//!   - [`Probe::fail(msg)`](Probe::fail): panic with `msg` and the log.
//!   - [`Probe::pid()`](Probe::pid), [`Probe::kill()`](Probe::kill) (SIGKILL
//!     and reap the probe only), [`Probe::close_stdin()`](Probe::close_stdin),
//!     [`Probe::wait_exit(timeout)`](Probe::wait_exit).
//!   - `Drop`: SIGKILLs the probe and every worker (its children found in
//!     `/proc`, plus every pid a `pids` answer named that still runs the
//!     probe binary) and reaps the probe.
//! - Hostile workers: [`worker_py`] (`tests/hostile/worker.py`, which
//!   writes frames by hand), [`fork_hostile`] (fork it as a worker).
//! - Processes: [`count_fds`], [`is_alive`] (exists and not a zombie),
//!   [`is_alive_as`] (and started then), [`start_time`], [`cpu_ms`],
//!   [`children_of`], [`until`], [`wait_until`], [`output_within`],
//!   [`try_output_within`], [`kill`] (send a signal to a pid).
//!   `tests/support/hello.rs` uses these too.
//! - Sockets: [`tcp_line`] (connect, read one line), [`http_get`].

#![allow(dead_code)]

use std::collections::{BTreeSet, VecDeque};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

/// The default bound of every wait.
pub const DEADLINE: Duration = Duration::from_secs(10);

const SIGKILL: i32 = 9;

// ------------------------------------------------------------ the binary

/// The probe binary. See the module docs.
pub fn probe_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(p) = std::env::var_os("SYNCLUSTER_PROBE") {
            return PathBuf::from(p);
        }
        // .../target/<profile>/deps/<test>-<hash> -> .../target/<profile>/examples/cluster_probe
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in target/<profile>/deps");
        let path = profile_dir.join("examples").join("cluster_probe");
        build_probe(profile_dir);
        assert!(
            path.exists(),
            "{} is missing: run `cargo build --example cluster_probe`",
            path.display()
        );
        path
    })
    .clone()
}

/// `cargo test --test X` builds no example: build (or just check) it now.
/// If that build fails (someone is mid-edit in `src/`) and a probe binary
/// exists, the existing one is used, with a warning.
fn build_probe(profile_dir: &Path) {
    let Some(cargo) = std::env::var_os("CARGO") else {
        return; // Not run by cargo: trust what is there.
    };
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "--example", "cluster_probe"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null());
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let out = output_within(cmd, Duration::from_secs(600));
    if !out.status.success() {
        let msg = format!(
            "cargo build --example cluster_probe failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let existing = profile_dir.join("examples").join("cluster_probe");
        assert!(existing.exists(), "{msg}");
        eprintln!("warning: using the existing {}: {msg}", existing.display());
    }
}

// ------------------------------------------------------------ matchers

/// What [`Probe::expect`] looks for in a line.
pub trait Matcher {
    /// True when `line` is the one awaited.
    fn matches(&self, line: &str) -> bool;
    /// For failure messages.
    fn describe(&self) -> String;
}

/// A prefix.
impl Matcher for str {
    fn matches(&self, line: &str) -> bool {
        line.starts_with(self)
    }
    fn describe(&self) -> String {
        format!("a line starting with {self:?}")
    }
}

/// A prefix.
impl Matcher for String {
    fn matches(&self, line: &str) -> bool {
        line.starts_with(self.as_str())
    }
    fn describe(&self) -> String {
        self.as_str().describe()
    }
}

impl<T: Matcher + ?Sized> Matcher for &T {
    fn matches(&self, line: &str) -> bool {
        (**self).matches(line)
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

/// A predicate with a description; see [`pred`].
pub struct Pred<F> {
    desc: String,
    f: F,
}

impl<F: Fn(&str) -> bool> Matcher for Pred<F> {
    fn matches(&self, line: &str) -> bool {
        (self.f)(line)
    }
    fn describe(&self) -> String {
        self.desc.clone()
    }
}

/// A line for which `f` is true; `desc` names it in failure messages.
pub fn pred<F: Fn(&str) -> bool>(desc: impl Into<String>, f: F) -> Pred<F> {
    Pred {
        desc: desc.into(),
        f,
    }
}

/// Exactly this line.
pub fn exact(want: impl Into<String>) -> Pred<impl Fn(&str) -> bool> {
    let want: String = want.into();
    let desc = format!("exactly {want:?}");
    pred(desc, move |l: &str| l == want)
}

// ------------------------------------------------------------ the probe

/// One running probe; see the module docs.
pub struct Probe {
    child: Child,
    pid: i32,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Lines received and not yet consumed by an `expect`.
    pending: VecDeque<String>,
    log: Vec<String>,
    /// Worker pids learnt from `pids` answers, to kill on drop.
    known: BTreeSet<i32>,
    reaped: bool,
}

impl Probe {
    /// Starts the probe in the test's cwd and environment.
    pub fn start() -> Probe {
        Probe::start_with(|_| {})
    }

    /// The same as [`Probe::start`].
    pub fn spawn() -> Probe {
        Probe::start()
    }

    /// Starts the probe after `configure` set env, cwd... on its `Command`
    /// (stdin, stdout and stderr are piped by this function).
    pub fn start_with(configure: impl FnOnce(&mut Command)) -> Probe {
        let mut cmd = Command::new(probe_path());
        configure(&mut cmd);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn cluster_probe");
        let pid = child.id() as i32;
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        let tx2 = tx.clone();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Workers inherit the probe's stderr: their messages land here too.
        thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if tx2.send(format!("stderr: {line}")).is_err() {
                    break;
                }
            }
        });
        Probe {
            stdin: child.stdin.take(),
            child,
            pid,
            lines,
            pending: VecDeque::new(),
            log: Vec::new(),
            known: BTreeSet::new(),
            reaped: false,
        }
    }

    /// The probe's (the primary's) pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Every line received so far, matched or not, in order, with the
    /// commands sent as `> <command>`.
    pub fn log(&self) -> &[String] {
        &self.log
    }

    /// How many lines of the log match `m`.
    pub fn count(&self, m: impl Matcher) -> usize {
        self.log.iter().filter(|l| m.matches(l)).count()
    }

    /// Index in the log of the first line matching `m`.
    pub fn position(&self, m: impl Matcher) -> Option<usize> {
        self.log.iter().position(|l| m.matches(l))
    }

    /// Writes one command line (a newline is added). Several commands in
    /// one call (`"a\nb"`) reach the probe in one write.
    pub fn cmd(&mut self, line: &str) {
        for l in line.lines() {
            self.log.push(format!("> {l}"));
        }
        let stdin = self.stdin.as_mut().expect("stdin was closed");
        if let Err(e) = stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
        {
            self.fail(&format!("writing {line:?} to the probe: {e}"));
        }
    }

    /// Closes the probe's stdin (it then kills its workers and exits 0).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits up to `timeout` for the probe to exit; `None` if it did not.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                self.reaped = true;
                return Some(st);
            }
            if Instant::now() >= end {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILLs the probe itself (not its workers) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reaped = true;
    }

    /// The next new line; `Err(true)` on timeout, `Err(false)` at EOF.
    fn next_line(&mut self, end: Instant) -> Result<String, bool> {
        let left = end.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(line) => {
                if let Some(list) = line.strip_prefix("pids ") {
                    self.known
                        .extend(parse_pids(list).into_iter().map(|(_, p)| p));
                }
                self.log.push(line.clone());
                Ok(line)
            }
            Err(RecvTimeoutError::Timeout) => Err(true),
            Err(RecvTimeoutError::Disconnected) => Err(false),
        }
    }

    fn take_pending(&mut self, m: &impl Matcher) -> Option<String> {
        let i = self.pending.iter().position(|l| m.matches(l))?;
        self.pending.remove(i)
    }

    /// The oldest unconsumed line matching `m`; the others stay pending.
    /// Panics with the log after `timeout` or at EOF.
    pub fn expect(&mut self, m: impl Matcher, timeout: Duration) -> String {
        if let Some(line) = self.take_pending(&m) {
            return line;
        }
        let end = Instant::now() + timeout;
        loop {
            match self.next_line(end) {
                Ok(line) if m.matches(&line) => return line,
                Ok(line) => self.pending.push_back(line),
                Err(timed_out) => self.fail(&format!(
                    "{} waiting {timeout:?} for {}",
                    if timed_out { "timed out" } else { "EOF" },
                    m.describe()
                )),
            }
        }
    }

    /// `expect(exact(line), timeout)`.
    pub fn expect_line(&mut self, line: &str, timeout: Duration) -> String {
        self.expect(exact(line), timeout)
    }

    /// `expect(prefix, timeout)`.
    pub fn expect_prefix(&mut self, prefix: &str, timeout: Duration) -> String {
        self.expect(prefix, timeout)
    }

    /// One line for each matcher, in any order (a line goes to the first
    /// unsatisfied matcher it matches); returned in matcher order.
    pub fn expect_all<M: Matcher>(&mut self, ms: &[M], timeout: Duration) -> Vec<String> {
        let mut got: Vec<Option<String>> = ms.iter().map(|m| self.take_pending(m)).collect();
        let end = Instant::now() + timeout;
        while got.iter().any(Option::is_none) {
            match self.next_line(end) {
                Ok(line) => {
                    match (0..ms.len()).find(|&i| got[i].is_none() && ms[i].matches(&line)) {
                        Some(i) => got[i] = Some(line),
                        None => self.pending.push_back(line),
                    }
                }
                Err(timed_out) => {
                    let missing: Vec<String> = (0..ms.len())
                        .filter(|&i| got[i].is_none())
                        .map(|i| ms[i].describe())
                        .collect();
                    self.fail(&format!(
                        "{} waiting {timeout:?} for all of: {}",
                        if timed_out { "timed out" } else { "EOF" },
                        missing.join("; ")
                    ))
                }
            }
        }
        got.into_iter().map(Option::unwrap).collect()
    }

    /// Panics if a line matching `m` is pending or arrives within `period`.
    pub fn expect_none(&mut self, m: impl Matcher, period: Duration) {
        if let Some(line) = self.take_pending(&m) {
            self.fail(&format!("unexpected line {line:?} ({})", m.describe()));
        }
        let end = Instant::now() + period;
        loop {
            match self.next_line(end) {
                Ok(line) if m.matches(&line) => {
                    self.fail(&format!("unexpected line {line:?} ({})", m.describe()))
                }
                Ok(line) => self.pending.push_back(line),
                Err(_) => return,
            }
        }
    }

    /// `cmd(line)` then `expect(prefix, DEADLINE)`.
    pub fn ask(&mut self, line: &str, prefix: &str) -> String {
        self.cmd(line);
        self.expect(prefix, DEADLINE)
    }

    /// `fork <env>`: the new worker's id. Panics on `err fork`.
    pub fn fork(&mut self, env: &str) -> u32 {
        self.cmd(format!("fork {env}").trim_end());
        let line = self.expect(
            pred("forked or err fork", |l: &str| {
                l.starts_with("forked ") || l.starts_with("err fork")
            }),
            DEADLINE,
        );
        match line.strip_prefix("forked ").map(str::parse) {
            Some(Ok(id)) => id,
            _ => self.fail(&format!("fork {env:?} failed: {line}")),
        }
    }

    /// [`Probe::fork`], then waits for its `online <id>`.
    pub fn fork_online(&mut self, env: &str) -> u32 {
        let id = self.fork(env);
        self.expect(exact(format!("online {id}")), DEADLINE);
        id
    }

    /// The primary's open fd count (`fds`).
    pub fn fds(&mut self) -> usize {
        let line = self.ask("fds", "fds ");
        line["fds ".len()..].parse().expect("fds <n>")
    }

    /// The `workers` answer without its `workers ` prefix.
    pub fn workers(&mut self) -> String {
        let line = self.ask("workers", "workers ");
        line["workers ".len()..].to_string()
    }

    /// (id, pid) of every live worker (`pids`).
    pub fn worker_pids(&mut self) -> Vec<(u32, i32)> {
        let line = self.ask("pids", "pids ");
        parse_pids(&line["pids ".len()..])
    }

    /// Panics with `msg` and the whole log.
    pub fn fail(&self, msg: &str) -> ! {
        let mut text = format!("probe {}: {msg}\n--- probe log ---\n", self.pid);
        for l in &self.log {
            text.push_str(l);
            text.push('\n');
        }
        text.push_str("--- end ---");
        panic!("{text}");
    }
}

fn parse_pids(list: &str) -> Vec<(u32, i32)> {
    list.split(',')
        .filter_map(|e| {
            let (id, pid) = e.split_once(':')?;
            Some((id.parse().ok()?, pid.parse().ok()?))
        })
        .collect()
}

impl Drop for Probe {
    fn drop(&mut self) {
        // Children first: once the probe is dead they are reparented.
        let mut victims: BTreeSet<i32> = children_of(self.pid).into_iter().collect();
        let _ = self.child.kill();
        if !self.reaped {
            let _ = self.child.wait();
        }
        let probe = probe_path();
        for &pid in &self.known {
            // Only if that pid still runs the probe binary (pids get reused).
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
            if exe.as_deref() == Some(probe.as_path()) {
                victims.insert(pid);
            }
        }
        for pid in victims {
            if is_alive(pid) {
                let _ = kill(pid, SIGKILL);
            }
        }
    }
}

// ------------------------------------------------------------ hostile workers

/// The hostile worker script, which writes the channel's frames by hand.
pub fn worker_py() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/hostile/worker.py")
}

/// Forks `python3 worker.py <mode_args>` as a worker, waits for its
/// `online`, and sets exec and args back to the probe's, so that later
/// forks are probe workers again. Returns the worker id.
pub fn fork_hostile(p: &mut Probe, mode_args: &str) -> u32 {
    p.ask("set exec /usr/bin/env", "ok set");
    p.ask(
        &format!("set args python3 {} {mode_args}", worker_py().display()),
        "ok set",
    );
    let id = p.fork("");
    p.ask(&format!("set exec {}", probe_path().display()), "ok set");
    p.ask("set args", "ok set");
    p.expect(exact(format!("online {id}")), DEADLINE);
    id
}

// ------------------------------------------------------------ processes

/// Sends signal `sig` to `pid` with kill(1) (the crate's syscalls are
/// private, and tests write no `unsafe`).
pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::Other,
            format!("kill -{sig} {pid}: {status}"),
        ))
    }
}

/// The fields of `/proc/<pid>/stat` after the command name: 0 state,
/// 11 utime, 12 stime, 19 start time.
fn stat(pid: i32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parens.
    let rest = s.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// True if `pid` exists and is not a zombie (or dead).
pub fn is_alive(pid: i32) -> bool {
    is_alive_as(pid, None)
}

/// [`is_alive`], and if `started` is given, still the process that
/// started then ([`start_time`]), not another one with its pid.
pub fn is_alive_as(pid: i32, started: Option<u64>) -> bool {
    match stat(pid) {
        Some(f) if f[0] != "Z" && f[0] != "X" => {
            started.is_none() || f.get(19).and_then(|s| s.parse().ok()) == started
        }
        _ => false,
    }
}

/// When `pid` started, in clock ticks since boot.
pub fn start_time(pid: i32) -> Option<u64> {
    stat(pid)?.get(19)?.parse().ok()
}

/// The CPU time (user + system) `pid` used, in ms.
pub fn cpu_ms(pid: i32) -> Option<u64> {
    static TCK: OnceLock<u64> = OnceLock::new();
    let tck = *TCK.get_or_init(|| {
        let out = Command::new("getconf").arg("CLK_TCK").output().ok();
        out.and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100)
    });
    let f = stat(pid)?;
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks * 1000 / tck)
}

/// The number of open fds of `pid` (`/proc/<pid>/fd` entries).
pub fn count_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
}

/// Children of `pid` (zombies included), sorted, from the `children` file
/// of each of its threads.
pub fn children_of(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut kids = Vec::new();
    for task in tasks.flatten() {
        if let Ok(s) = std::fs::read_to_string(task.path().join("children")) {
            kids.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
    }
    kids.sort_unstable();
    kids.dedup();
    kids
}

/// Polls `f` every 10 ms until it gives `Some` or `timeout` passes.
pub fn until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `cond` every 10 ms until it holds (`true`) or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    until(timeout, || cond().then_some(())).is_some()
}

/// Runs `cmd` (stdout and stderr piped, stdin as set or inherited) for at
/// most `timeout`; SIGKILLs it and panics past that.
pub fn output_within(mut cmd: Command, timeout: Duration) -> Output {
    try_output_within(&mut cmd, timeout).unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))
}

/// [`output_within`], with the error if `cmd` cannot be spawned.
pub fn try_output_within(cmd: &mut Command, timeout: Duration) -> io::Result<Output> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    let drain = |r: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut v);
            }
            v
        })
    };
    let out = drain(child.stdout.take().map(|s| Box::new(s) as _));
    let err = drain(child.stderr.take().map(|s| Box::new(s) as _));
    let end = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} still ran after {timeout:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

// ------------------------------------------------------------ sockets

fn connect(addr: &str, timeout: Duration) -> io::Result<TcpStream> {
    let sa: SocketAddr = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address"))?;
    let s = TcpStream::connect_timeout(&sa, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

/// Connects to `addr` and reads one line (without its newline), all within
/// about `timeout` for each step. What the probe's workers answer:
/// `worker <id>`. EOF before any byte is `UnexpectedEof`.
pub fn tcp_line(addr: &str, timeout: Duration) -> io::Result<String> {
    let s = connect(addr, timeout)?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    if line.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed without a line",
        ));
    }
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

/// Sends `GET <path> HTTP/1.0` and returns everything read until EOF
/// (a reset after some bytes still returns those bytes).
pub fn http_get(addr: &str, path: &str, timeout: Duration) -> io::Result<String> {
    let mut s = connect(addr, timeout)?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut buf = Vec::new();
    match s.read_to_end(&mut buf) {
        Ok(_) => {}
        Err(e) if !buf.is_empty() && e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => return Err(e),
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Set to skip, loudly, the tests that need root or a tool the project's
/// `.ci/run` installs, on a machine that lacks them. Unset (CI), a missing
/// requirement fails the test: a test that passes without checking
/// anything would hide a broken setup.
pub const ALLOW_SKIP: &str = "SYNCLUSTER_TESTS_ALLOW_SKIP";

/// True when `have`; otherwise a skip (with [`ALLOW_SKIP`] set) or a
/// failure naming what is missing.
pub fn require(have: bool, what: &str) -> bool {
    if have {
        return true;
    }
    if std::env::var_os(ALLOW_SKIP).is_some() {
        eprintln!("skipped ({ALLOW_SKIP} is set): needs {what}");
        return false;
    }
    panic!("this test needs {what} (.ci/run provides it; set {ALLOW_SKIP}=1 to skip instead)");
}

/// [`require`] root: workers under another uid, namespaces, privileged ports.
pub fn require_root(why: &str) -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false);
    require(root, &format!("root ({why})"))
}

/// [`require`] a program on the PATH (or at an absolute path).
pub fn require_tool(name: &str) -> bool {
    let found = if name.starts_with('/') {
        std::path::Path::new(name).exists()
    } else {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
    };
    require(found, &format!("`{name}`"))
}
