//! Process lifetimes seen from the worker (issue 9 §5): a worker knows its
//! primary by the pid its channel's `SO_PEERCRED` gave, not by "parent is
//! not 1"; `role()` decides once per process; `SYNCLUSTER_WORKER_PID` keeps
//! inherited variables from making a worker's child a worker; a shared
//! listener under `EMFILE` rests instead of spinning; a worker notices its
//! primary's death by channel EOF and by `PR_SET_PDEATHSIG`.
//!
//! Some tests wrap the probe in another program: `unshare` (util-linux) to
//! make the primary pid 1 of a new pid namespace, `perl` to put a
//! subreaper above the primary. Tests run as root; a missing tool fails the
//! test with a message saying so.

mod common;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    children_of, exact, is_alive, output_within, probe_path, tcp_line, wait_until, Probe, DEADLINE,
};

const SIGKILL: i32 = 9;

fn kill9(pid: i32) {
    let _ = common::kill(pid, SIGKILL);
}

// ------------------------------------------------------------ a wrapped probe

/// The probe started under a wrapper program (`unshare`, `perl`), so the
/// primary is the wrapper's child. A small cousin of `common::Probe`, which
/// can only start the probe itself.
struct Wrapped {
    wrapper: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    pending: VecDeque<String>,
    log: Vec<String>,
    /// The primary's pid as this process sees it.
    primary: i32,
    /// Every worker pid seen, to kill on drop.
    workers: Vec<i32>,
}

impl Wrapped {
    /// Spawns `program args... <probe>`; `what` says, when the program is
    /// missing, which package to install.
    fn start(program: &str, args: &[&str], what: &str) -> Wrapped {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .arg(probe_path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut wrapper = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                panic!("`{program}` is missing ({what}): this test needs it, install it")
            }
            Err(e) => panic!("spawn {program}: {e}"),
        };
        let (tx, lines) = mpsc::channel();
        let out = wrapper.stdout.take().expect("piped stdout");
        let err = wrapper.stderr.take().expect("piped stderr");
        let tx2 = tx.clone();
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx2.send(format!("stderr: {line}")).is_err() {
                    break;
                }
            }
        });
        let mut w = Wrapped {
            stdin: wrapper.stdin.take(),
            wrapper,
            lines,
            pending: VecDeque::new(),
            log: Vec::new(),
            primary: 0,
            workers: Vec::new(),
        };
        let wpid = w.wrapper.id() as i32;
        let mut kids = Vec::new();
        if !wait_until(DEADLINE, || {
            kids = children_of(wpid);
            kids.len() == 1 && is_probe(kids[0])
        }) {
            w.drain_for(Duration::from_millis(200));
            w.fail(&format!(
                "{program} did not start the probe (children {kids:?})"
            ));
        }
        w.primary = kids[0];
        w
    }

    fn cmd(&mut self, line: &str) {
        self.log.push(format!("> {line}"));
        let stdin = self.stdin.as_mut().expect("stdin open");
        if writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .is_err()
        {
            self.fail(&format!("cannot write {line:?}: the probe is gone"));
        }
    }

    /// The oldest unconsumed line starting with `prefix`.
    fn expect(&mut self, prefix: &str) -> String {
        if let Some(i) = self.pending.iter().position(|l| l.starts_with(prefix)) {
            return self.pending.remove(i).unwrap_or_default();
        }
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                    self.pending.push_back(line);
                }
                Err(_) => self.fail(&format!("no line starting with {prefix:?}")),
            }
        }
    }

    fn drain_for(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while let Ok(line) = self
            .lines
            .recv_timeout(end.saturating_duration_since(Instant::now()))
        {
            self.log.push(line);
        }
    }

    fn fail(&self, msg: &str) -> ! {
        panic!("{msg}\n--- log ---\n{}\n--- end ---", self.log.join("\n"));
    }

    /// Forks a worker, waits for it online; its id.
    fn fork_online(&mut self, env: &str) -> u32 {
        self.cmd(&format!("fork {env}"));
        let line = self.expect("forked ");
        let id: u32 = line["forked ".len()..].parse().expect("forked <id>");
        self.expect(&format!("online {id}"));
        self.workers = children_of(self.primary);
        id
    }
}

impl Drop for Wrapped {
    fn drop(&mut self) {
        let mut victims = children_of(self.primary);
        victims.extend(&self.workers);
        kill9(self.primary);
        for pid in victims {
            if is_alive(pid) && is_probe(pid) {
                kill9(pid);
            }
        }
        let _ = self.wrapper.kill();
        let _ = self.wrapper.wait();
    }
}

fn is_probe(pid: i32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok() == Some(probe_path())
}

/// The pid `pid` has in its own (innermost) pid namespace.
fn inner_pid(pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
}

// ------------------------------------------------------------ pid 1

/// A primary that is pid 1 (a container without an init): its workers,
/// which hand the stop signals to it (and so check that it is still their
/// parent), come online, listen and serve; `kill -9` of the primary still
/// takes them down.
#[test]
fn primary_as_pid_1_of_a_pid_namespace_runs_workers_that_serve() {
    let mut w = Wrapped::start(
        "unshare",
        &["--pid", "--fork", "--mount-proc"],
        "util-linux",
    );
    assert_eq!(
        inner_pid(w.primary),
        Some(1),
        "the primary is not pid 1 in its namespace"
    );
    let env = "PROBE_MODE=listen PROBE_ADDR=127.0.0.1:0 PROBE_STOP_SIGNALS=primary";
    let a = w.fork_online(env);
    let b = w.fork_online(env);
    let mut addrs = Vec::new();
    for id in [a, b] {
        let line = w.expect(&format!("message {id} listening:"));
        let addr = line
            .split_whitespace()
            .nth(2)
            .and_then(|t| t.strip_prefix("listening:"))
            .expect("listening:<addr>")
            .to_string();
        addrs.push(addr);
    }
    assert_eq!(addrs[0], addrs[1], "both workers share one port");
    let mut served = Vec::new();
    for _ in 0..6 {
        match tcp_line(&addrs[0], DEADLINE) {
            Ok(l) => served.push(l),
            Err(e) => w.fail(&format!("connect {}: {e}", addrs[0])),
        }
    }
    assert!(
        served
            .iter()
            .all(|l| *l == format!("worker {a}") || *l == format!("worker {b}")),
        "{served:?}"
    );
    // Still alive and listening: nobody took pid 1 for a dead primary.
    w.cmd("workers");
    let workers = w.expect("workers ");
    assert_eq!(
        workers,
        format!("workers {a}:listening:false:0,{b}:listening:false:0"),
    );
    let pids = children_of(w.primary);
    assert_eq!(pids.len(), 2, "{pids:?}");
    kill9(w.primary);
    if !wait_until(DEADLINE, || pids.iter().all(|&p| !is_alive(p))) {
        w.fail(&format!("workers {pids:?} outlived their primary"));
    }
}

// ------------------------------------------------------------ primary death

/// `kill -9` of the primary ends every worker: by the parent-death signal
/// the spawn sets (SIGTERM), by the SIGKILL `leave_stop_signals_to_primary`
/// sets, and, with no death signal at all, by the channel's EOF.
#[test]
fn primary_kill_9_ends_workers_by_death_signal_and_by_channel_eof() {
    let mut p = Probe::start();
    let plain = p.fork_online("");
    let stop = p.fork_online("PROBE_STOP_SIGNALS=primary");
    let eof = p.fork_online("PROBE_NO_PDEATHSIG=1 PROBE_MODE=listen");
    p.expect(format!("message {eof} listening:"), DEADLINE);
    let pids = p.worker_pids();
    assert_eq!(pids.len(), 3, "{pids:?}");
    // Alive and answering before the primary goes.
    for id in [plain, stop, eof] {
        p.ask(&format!("send {id} echo hi"), "ok send");
        p.expect(exact(format!("message {id} echo:hi fds=0")), DEADLINE);
    }
    p.kill();
    for (id, pid) in pids {
        if !wait_until(DEADLINE, || !is_alive(pid)) {
            p.fail(&format!("worker {id} (pid {pid}) outlived its primary"));
        }
    }
}

/// A worker whose primary died before it armed its own death signal finds
/// out from its parent pid: here the orphan goes to a subreaper, not to
/// pid 1, which the old "parent is 1" check could not see.
#[test]
fn worker_orphaned_to_a_subreaper_knows_its_primary_is_gone() {
    // Perl makes itself a subreaper (PR_SET_CHILD_SUBREAPER = 36), runs the
    // probe as its child and reaps whatever it is given.
    let script = r#"require "syscall.ph";
        syscall(&SYS_prctl, 36, 1, 0, 0, 0) == 0 or die "prctl: $!";
        my $pid = fork() // die "fork: $!";
        if ($pid == 0) { exec @ARGV or die "exec: $!"; }
        1 while wait() != -1;"#;
    let mut w = Wrapped::start("perl", &["-e", script], "perl");
    let subreaper = w.wrapper.id() as i32;
    // No death signal, and a pause to outlive the primary before the check.
    let id = w.fork_online("PROBE_NO_PDEATHSIG=1 PROBE_PAUSE_MS=1500 PROBE_STOP_SIGNALS=primary");
    let worker = *w.workers.first().expect("one worker");
    let primary = w.primary;
    kill9(primary);
    let line = w.expect("stderr: error: the primary");
    assert!(
        line.contains(&format!("(pid {primary}) is gone"))
            && line.ends_with(&format!("our parent is now pid {subreaper}")),
        "worker {id}: {line}"
    );
    if !wait_until(DEADLINE, || !is_alive(worker)) {
        w.fail(&format!("worker {id} (pid {worker}) lives on"));
    }
}

// ------------------------------------------------------------ role() once

/// A second `role()` is an `AlreadyExists` error naming what the first one
/// returned, in a worker and in the primary; the read-only helpers agree.
#[test]
fn second_role_call_is_already_exists_naming_the_first_decision() {
    let mut p = Probe::start();
    let id = p.fork_online("");
    p.ask(&format!("send {id} role"), "ok send");
    let line = p.expect(format!("message {id} role:"), DEADLINE);
    assert!(
        line.starts_with(&format!("message {id} role:err:AlreadyExists:"))
            && line.contains(&format!("returned Worker {id}")),
        "{line}"
    );
    p.ask(&format!("send {id} whoami"), "ok send");
    p.expect(
        exact(format!(
            "message {id} whoami:primary=false worker=true id={id} fds=0"
        )),
        DEADLINE,
    );
    // The worker is still a worker, online and answering.
    p.ask(&format!("send {id} echo still"), "ok send");
    p.expect(exact(format!("message {id} echo:still fds=0")), DEADLINE);

    let line = p.ask("role", "err role");
    assert!(
        line.starts_with("err role AlreadyExists:") && line.contains("returned Primary"),
        "{line}"
    );
    p.cmd("whoami");
    p.expect(exact("whoami primary=true worker=false id=none"), DEADLINE);
    // No second primary took the signals or forked anything.
    assert_eq!(p.workers(), format!("{id}:online:false:0"));
}

// ------------------------------------------------------------ SYNCLUSTER_WORKER_PID

/// Runs the probe through `sh -c script` with the cluster's variables of
/// this process removed and `env` added, `whoami` then EOF on stdin.
fn run_probe_sh(script: &str, env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(script).arg(probe_path());
    for k in [
        "SYNCLUSTER_WORKER_ID",
        "SYNCLUSTER_CHANNEL_FD",
        "SYNCLUSTER_WORKER_PID",
        "SYNCLUSTER_SCHED_POLICY",
    ] {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null());
    let out = output_within(cmd, DEADLINE);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const WORKER_VARS: [(&str, &str); 2] = [
    ("SYNCLUSTER_WORKER_ID", "1"),
    // Not open in the probe: adopting it would fail, naming the variable.
    ("SYNCLUSTER_CHANNEL_FD", "900"),
];

/// Variables meant for another pid (what a worker's child inherits) are
/// ignored: the process is a primary, and says so.
#[test]
fn worker_variables_for_another_pid_are_ignored() {
    let mut env = WORKER_VARS.to_vec();
    // Pid 1 is never the probe's own pid here.
    env.push(("SYNCLUSTER_WORKER_PID", "1"));
    let (code, stdout, stderr) = run_probe_sh(r#"printf 'whoami\n' | "$0""#, &env);
    assert_eq!(code, Some(0), "stdout {stdout:?} stderr {stderr:?}");
    assert_eq!(
        stdout.trim_end(),
        "whoami primary=true worker=false id=none",
        "stderr {stderr:?}"
    );
}

/// Variables meant for this pid make a worker (here one whose channel fd
/// is not open, so the error names the channel variable); absent, the
/// variables are accepted as before.
#[test]
fn worker_variables_for_this_pid_or_no_pid_make_a_worker() {
    for script in [r#"SYNCLUSTER_WORKER_PID=$$ exec "$0""#, r#"exec "$0""#] {
        let (code, stdout, stderr) = run_probe_sh(script, &WORKER_VARS);
        assert_eq!(code, Some(2), "{script}: {stdout:?} {stderr:?}");
        assert!(
            stderr.starts_with("error: SYNCLUSTER_CHANNEL_FD=\"900\""),
            "{script}: {stderr}"
        );
        assert!(stdout.is_empty(), "{script}: {stdout:?}");
    }
}

/// A malformed `SYNCLUSTER_WORKER_PID` is an `InvalidInput` error naming it,
/// with or without the other variables.
#[test]
fn malformed_worker_pid_is_a_clean_error_naming_it() {
    for bad in ["abc", "0", "-3", "", "12x", "99999999999"] {
        for with_vars in [true, false] {
            let mut env = if with_vars {
                WORKER_VARS.to_vec()
            } else {
                Vec::new()
            };
            env.push(("SYNCLUSTER_WORKER_PID", bad));
            let (code, stdout, stderr) = run_probe_sh(r#"exec "$0""#, &env);
            assert_eq!(code, Some(2), "{bad:?}: {stdout:?} {stderr:?}");
            assert!(
                stderr.starts_with(&format!("error: SYNCLUSTER_WORKER_PID={bad:?}")),
                "{bad:?}: {stderr}"
            );
            assert!(!stderr.contains("panicked"), "{bad:?}: {stderr}");
        }
    }
}

// ------------------------------------------------------------ EMFILE

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest = s.rsplit_once(')').expect("comm").1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the comm: state is field 3, utime 14, stime 15.
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

/// Clock ticks per second in /proc (USER_HZ: 100 on every Linux this
/// crate builds for); `getconf CLK_TCK` when it answers.
fn clk_tck() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// A shared-mode worker out of fds, with clients waiting, rests its
/// listener instead of spinning on it (level-triggered epoll), and serves
/// the waiting clients once fds are free again.
#[test]
fn shared_worker_out_of_fds_rests_then_recovers() {
    let mut p = Probe::start();
    p.ask("set policy shared", "ok set");
    let id = p.fork_online("PROBE_MODE=listen PROBE_ADDR=127.0.0.1:0");
    let line = p.expect(format!("message {id} listening:"), DEADLINE);
    let addr = line
        .split_whitespace()
        .nth(2)
        .and_then(|t| t.strip_prefix("listening:"))
        .expect("listening:<addr>")
        .to_string();
    let pid = p.worker_pids()[0].1;
    // Served before the pressure.
    assert_eq!(
        tcp_line(&addr, DEADLINE).expect("served"),
        format!("worker {id}")
    );
    p.ask(&format!("send {id} hogfds"), "ok send");
    p.expect(format!("message {id} hogged:"), DEADLINE);
    let mut clients: Vec<TcpStream> = (0..4)
        .map(|_| {
            let s = TcpStream::connect_timeout(&addr.parse().expect("addr"), DEADLINE)
                .expect("connect while the worker is out of fds");
            s.set_read_timeout(Some(DEADLINE)).expect("timeout");
            s
        })
        .collect();
    thread::sleep(Duration::from_millis(200));
    let before = cpu_ticks(pid);
    let t0 = Instant::now();
    thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(pid) - before;
    let percent = used * 100 * 1000 / (clk_tck() * t0.elapsed().as_millis() as u64);
    eprintln!("worker out of fds with 4 clients waiting: {percent}% CPU over 1 s");
    assert!(
        percent < 20,
        "the worker spins on its listener: {percent}% CPU"
    );
    // Still deaf to them: no fd to accept into.
    clients[0]
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    let r = clients[0].read(&mut buf);
    assert!(
        matches!(&r, Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
        "{r:?}"
    );
    clients[0]
        .set_read_timeout(Some(DEADLINE))
        .expect("timeout");
    p.ask(&format!("send {id} freefds"), "ok send");
    p.expect(format!("message {id} freed:"), DEADLINE);
    for c in &mut clients {
        let mut line = String::new();
        BufReader::new(c)
            .read_line(&mut line)
            .expect("served after fds were freed");
        assert_eq!(line.trim_end(), format!("worker {id}"));
    }
    assert_eq!(
        tcp_line(&addr, DEADLINE).expect("served"),
        format!("worker {id}")
    );
}
