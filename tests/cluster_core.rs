//! The cluster core with real processes: ports of Node's test-cluster-basic,
//! -worker-death, -worker-kill, -worker-disconnect, -message, -fork-env,
//! -cwd, -primary-kill, -invalid-message, -disconnect-with-no-workers and
//! -kill-disconnect, plus what Node does not check: fd and zombie hygiene
//! over many forks, frames pending at death, malformed environments.
//!
//! Every scenario drives `examples/cluster_probe` (its doc comment is the
//! command/event contract) through `tests/common`'s `Probe`. Every wait is
//! bounded (10 s by default) and dropping a probe SIGKILLs it and its
//! workers, so a failure leaves no process behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    children_of, count_fds, exact, fork_hostile, is_alive, kill, output_within, pred, probe_path,
    wait_until, Probe, DEADLINE,
};

const T: Duration = DEADLINE;
/// How long to watch for a duplicate event once the real one arrived.
const QUIET: Duration = Duration::from_millis(300);

/// A fresh directory under cargo's per-test tmpdir.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("cluster_core-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.canonicalize().unwrap()
}

/// Index of the first log line that is exactly `line`; panics if none.
fn pos(p: &Probe, line: &str) -> usize {
    p.position(exact(line))
        .unwrap_or_else(|| p.fail(&format!("{line:?} is not in the log")))
}

/// Checks, after a quiet period, that `disconnect <id>` and `exit <id> ...`
/// were each reported exactly once, the disconnect first (counted in the
/// log, whether or not a test consumed them).
fn reported_once(p: &mut Probe, id: u32) {
    // Let a duplicate show up if there is one.
    p.expect_none(pred("nothing", |_: &str| false), QUIET);
    assert_eq!(
        p.count(exact(format!("disconnect {id}"))),
        1,
        "{:?}",
        p.log()
    );
    assert_eq!(p.count(format!("exit {id} ")), 1, "{:?}", p.log());
    let d = pos(p, &format!("disconnect {id}"));
    let e = p.position(format!("exit {id} ")).unwrap();
    assert!(d < e, "disconnect after exit: {:?}", p.log());
}

// ------------------------------------------------------------ Node ports

/// test-cluster-basic: fork → online → listening → disconnect → exit, the
/// states none → online → listening as `workers` shows them, id 1, and a
/// worker that has exited (state dead) is no longer listed.
#[test]
fn basic_event_order_and_states() {
    let mut p = Probe::start();
    // One write: the primary answers `workers` before its loop turns
    // again, so the worker cannot have said Online yet.
    p.cmd("fork PROBE_MODE=listen PROBE_ADDR=127.0.0.1:0\nworkers");
    assert_eq!(p.expect("forked ", T), "forked 1");
    assert_eq!(p.expect("workers ", T), "workers 1:none:false:0");
    p.expect_line("fork 1", T);
    p.expect_line("online 1", T);
    let listening = p.expect("listening 1 ", T);
    let addr = listening["listening 1 ".len()..].to_string();
    p.expect_line(&format!("message 1 listening:{addr} fds=0"), T);
    assert_eq!(p.workers(), "1:listening:false:0");
    assert_eq!(
        p.ask("addresses", "addresses "),
        format!("addresses {addr}")
    );
    assert_eq!(common::tcp_line(&addr, T).unwrap(), "worker 1");

    p.cmd("disconnect 1\nworkers");
    p.expect_line("ok disconnect", T);
    assert_eq!(p.expect("workers ", T), "workers 1:listening:true:0");
    p.expect_line("message 1 served:1 fds=0", T);
    p.expect_line("exit 1 code=0 ead=true", T);
    reported_once(&mut p, 1);
    let order: Vec<usize> = ["fork 1", "online 1", &listening, "disconnect 1"]
        .iter()
        .map(|l| pos(&p, l))
        .chain([pos(&p, "exit 1 code=0 ead=true")])
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{:?}", p.log());
    // Dead: gone from the list, and the listening handle is closed.
    assert_eq!(p.workers(), "");
    assert_eq!(p.ask("addresses", "addresses "), "addresses ");
}

/// The `disconnected` state: a worker whose channel closed while its
/// process lives on. The probe cannot do that, so `/bin/sh` runs a script
/// that closes fd 3 (the channel) and sleeps. (The script is read by sh,
/// not exec'd, so no ETXTBSY race with other tests' forks.)
#[test]
fn disconnected_state_while_the_process_lives() {
    let dir = scratch_dir("disconnected");
    let script = dir.join("close-channel.sh");
    std::fs::write(&script, "exec 3>&-\nexec sleep 30\n").unwrap();
    let mut p = Probe::start();
    p.ask("set exec /bin/sh", "ok set");
    p.ask(&format!("set args {}", script.display()), "ok set");
    let id = p.fork("");
    p.expect_line(&format!("disconnect {id}"), T);
    // It never sent a frame, so it never was online.
    assert!(p.position(exact(format!("online {id}"))).is_none());
    assert_eq!(p.workers(), format!("{id}:disconnected:false:0"));
    p.ask(&format!("kill {id} 9"), "ok kill");
    p.expect_line(&format!("exit {id} signal=9 ead=false"), T);
    reported_once(&mut p, id);
    assert_eq!(p.workers(), "");
}

/// test-cluster-worker-death: the exit code is reported, whether the worker
/// exits on its own right after role() or when asked by a message.
#[test]
fn worker_death_reports_exit_code() {
    let mut p = Probe::start();
    let id = p.fork("PROBE_MODE=exit42");
    p.expect_line(&format!("online {id}"), T);
    p.expect_line(&format!("exit {id} code=42 ead=false"), T);
    reported_once(&mut p, id);

    let id = p.fork_online("");
    p.ask(&format!("send {id} exit 42"), "ok send");
    p.expect_line(&format!("exit {id} code=42 ead=false"), T);
    reported_once(&mut p, id);
    assert_eq!(p.workers(), "");
}

/// test-cluster-worker-kill: SIGKILL is reported as signal 9, not after a
/// disconnect, with exactly one disconnect and one exit.
#[test]
fn worker_kill_reports_signal() {
    let mut p = Probe::start();
    let id = p.fork_online("");
    let other = p.fork_online("");
    p.ask(&format!("kill {id} 9"), "ok kill");
    p.expect_line(&format!("exit {id} signal=9 ead=false"), T);
    reported_once(&mut p, id);
    // The other worker is untouched.
    assert_eq!(p.workers(), format!("{other}:online:false:0"));
    // A dead worker cannot be signalled.
    p.cmd(&format!("kill {id} 9"));
    assert!(p.expect("err kill ", T).contains("not connected"));
}

/// test-cluster-worker-disconnect: `disconnect <id>` from the primary: the
/// worker gets Event::Disconnect, exits, and exit reports ead=true with the
/// worker's own exit code.
#[test]
fn primary_disconnect_reports_exited_after_disconnect() {
    let mut p = Probe::start();
    let a = p.fork_online("");
    let b = p.fork_online("PROBE_DISCONNECT_CODE=42");
    p.cmd(&format!("disconnect {a}\nworkers"));
    p.expect_line("ok disconnect", T);
    let workers = p.expect("workers ", T);
    assert!(
        workers.contains(&format!("{a}:online:true:0")),
        "ead must be set at once: {workers}"
    );
    p.expect_line(&format!("message {a} served:0 fds=0"), T);
    p.expect_line(&format!("exit {a} code=0 ead=true"), T);
    reported_once(&mut p, a);

    p.ask(&format!("disconnect {b}"), "ok disconnect");
    p.expect_line(&format!("exit {b} code=42 ead=true"), T);
    reported_once(&mut p, b);
    // Disconnecting a worker that is gone is an error, not a crash.
    p.cmd(&format!("disconnect {a}"));
    p.expect("err disconnect ", T);
}

/// test-cluster-message: messages both ways, with and without fds.
#[test]
fn messages_both_ways_with_and_without_fds() {
    let mut p = Probe::start();
    let id = p.fork_online("");
    p.ask(&format!("send {id} echo hello  world"), "ok send");
    p.expect_line(&format!("message {id} echo:hello  world fds=0"), T);
    // primary → worker with an fd: the worker reads the pipe to EOF.
    p.ask(&format!("sendfd {id} take this"), "ok sendfd");
    p.expect_line(&format!("message {id} fdread:fdtext fds=0"), T);
    // worker → primary with an fd.
    p.ask(&format!("send {id} givefd"), "ok send");
    p.expect_line(&format!("message {id} givefd fds=1"), T);
    // Order is kept, and a message bigger than a socket buffer gets through.
    let mut batch = String::new();
    for i in 0..50 {
        batch.push_str(&format!("send {id} echo {i}\n"));
    }
    p.cmd(batch.trim_end());
    for i in 0..50 {
        p.expect_line(&format!("message {id} echo:{i} fds=0"), T);
    }
    let firsts: Vec<usize> = (0..50)
        .map(|i| pos(&p, &format!("message {id} echo:{i} fds=0")))
        .collect();
    assert!(firsts.windows(2).all(|w| w[0] < w[1]), "out of order");
    let big = "x".repeat(300_000);
    p.ask(&format!("send {id} echo {big}"), "ok send");
    p.expect_line(&format!("message {id} echo:{big} fds=0"), T);
    // A message to a worker that does not exist.
    p.cmd("send 99 echo nobody");
    p.expect("err send ", T);
    // The fds that came with `givefd` were closed by the primary: its count
    // is stable across more of them.
    let before = p.fds();
    for _ in 0..20 {
        p.ask(&format!("send {id} givefd"), "ok send");
        p.expect_line(&format!("message {id} givefd fds=1"), T);
    }
    assert_eq!(p.fds(), before);
}

/// test-cluster-fork-env: the fork's env reaches the worker and overrides
/// the primary's; the cluster's own variables do not reach user code.
#[test]
fn fork_env_reaches_the_worker_and_marks_it_with_its_own_pid() {
    let mut p = Probe::start_with(|c| {
        c.env("FOO", "from-primary").env("ONLY_PRIMARY", "yes");
        // systemd speaks to the primary alone (sidekiq #5829).
        c.env("NOTIFY_SOCKET", "/nonexistent/notify")
            .env("WATCHDOG_USEC", "1");
    });
    let a = p.fork_online("FOO=bar EXTRA=1");
    let b = p.fork_online("");
    for (id, name, want) in [
        (a, "FOO", "bar"),
        (a, "EXTRA", "1"),
        (a, "ONLY_PRIMARY", "yes"),
        (b, "FOO", "from-primary"),
        (b, "EXTRA", "<unset>"),
        // role() reads the environment and never changes it (a worker's
        // children ignore these by SYNCLUSTER_WORKER_PID, tests/worker_lifetime.rs).
        (a, "SYNCLUSTER_WORKER_ID", &a.to_string()),
        (a, "SYNCLUSTER_CHANNEL_FD", "3"),
        (b, "SYNCLUSTER_WORKER_ID", &b.to_string()),
        (a, "NOTIFY_SOCKET", "<unset>"),
        (a, "WATCHDOG_USEC", "<unset>"),
    ] {
        p.ask(&format!("send {id} env {name}"), "ok send");
        p.expect_line(&format!("message {id} env:{want} fds=0"), T);
    }
    // SYNCLUSTER_WORKER_PID is the worker's own pid, written by the child
    // after fork: a grandchild that inherits it is not a worker.
    for (id, pid) in p.worker_pids() {
        p.ask(&format!("send {id} env SYNCLUSTER_WORKER_PID"), "ok send");
        p.expect_line(&format!("message {id} env:{pid} fds=0"), T);
    }
    p.cmd("fork NOEQUALS");
    p.expect("err fork ", T);
}

/// test-cluster-cwd: `set cwd` applies to later forks; the default is the
/// primary's cwd.
#[test]
fn cwd_default_and_set() {
    let dir = scratch_dir("cwd");
    let mut p = Probe::start_with(|c| {
        c.current_dir(&dir);
    });
    let a = p.fork_online("");
    p.ask(&format!("send {a} cwd"), "ok send");
    p.expect_line(&format!("message {a} cwd:{} fds=0", dir.display()), T);
    p.ask("set cwd /tmp", "ok set");
    let b = p.fork_online("");
    p.ask(&format!("send {b} cwd"), "ok send");
    p.expect_line(&format!("message {b} cwd:/tmp fds=0"), T);
    // A cwd that does not exist fails the fork, not the primary.
    p.ask("set cwd /nonexistent-dir", "ok set");
    p.cmd("fork");
    let e = p.expect("err fork ", T);
    assert!(e.contains("No such file"), "{e}");
    assert_eq!(
        p.workers(),
        format!("{a}:online:false:0,{b}:online:false:0")
    );
}

/// `set args`: the worker's argv after argv[0]; by default the primary's.
#[test]
fn args_default_and_set() {
    let mut p = Probe::start_with(|c| {
        c.args(["one", "two"]);
    });
    let a = p.fork_online("");
    p.ask(&format!("send {a} argv"), "ok send");
    p.expect_line(&format!("message {a} argv:one two fds=0"), T);
    p.ask("set args x y z", "ok set");
    let b = p.fork_online("");
    p.ask(&format!("send {b} argv"), "ok send");
    p.expect_line(&format!("message {b} argv:x y z fds=0"), T);
}

/// test-cluster-primary-kill: when the primary is SIGKILLed, its workers
/// go too, within 2 s: an idle one (it sees the channel close) and one
/// blocked in a sleep that reads nothing (only the parent-death signal
/// reaches it).
#[test]
fn primary_sigkill_takes_the_workers_down() {
    let mut p = Probe::start();
    let idle = p.fork_online("");
    let deaf = p.fork_online("");
    p.ask(&format!("send {deaf} sleep 60000"), "ok send");
    p.expect_line(&format!("message {deaf} sleeping:60000 fds=0"), T);
    let pids = p.worker_pids();
    assert_eq!(pids.iter().map(|w| w.0).collect::<Vec<_>>(), [idle, deaf]);
    for &(_, pid) in &pids {
        assert!(is_alive(pid));
    }
    p.kill();
    let start = Instant::now();
    let gone = wait_until(Duration::from_secs(2), || {
        pids.iter().all(|&(_, pid)| !is_alive(pid))
    });
    assert!(
        gone,
        "workers {pids:?} still alive {:?} after the primary died",
        start.elapsed()
    );
}

/// test-cluster-primary-kill, the soft way: `exit` (the primary returns
/// without touching workers) also takes them down.
#[test]
fn primary_exit_takes_the_workers_down() {
    let mut p = Probe::start();
    p.fork_online("");
    let pids = p.worker_pids();
    p.cmd("exit");
    assert!(p.wait_exit(T).is_some_and(|s| s.success()));
    assert!(wait_until(Duration::from_secs(2), || {
        pids.iter().all(|&(_, pid)| !is_alive(pid))
    }));
}

/// Probe contract: EOF on stdin kills the workers and exits 0.
#[test]
fn stdin_eof_kills_workers_and_exits_0() {
    let mut p = Probe::start();
    let a = p.fork_online("");
    let pids = p.worker_pids();
    p.close_stdin();
    p.expect_line(&format!("exit {a} signal=9 ead=false"), T);
    assert!(p.wait_exit(T).is_some_and(|s| s.success()));
    assert!(pids.iter().all(|&(_, pid)| !is_alive(pid)));
}

/// The primary blocks SIGTERM and SIGINT and reports them as events, with
/// and without workers; the workers are untouched.
#[test]
fn sigterm_to_the_primary_is_an_event() {
    let mut p = Probe::start();
    p.fds(); // Up and answering: the signals are blocked by now.
    kill(p.pid(), 15).unwrap();
    p.expect_line("signal 15", T);
    p.fork_online("");
    kill(p.pid(), 2).unwrap();
    p.expect_line("signal 2", T);
    assert_eq!(p.workers(), "1:online:false:0");
}

/// test-cluster-invalid-message: a worker that breaks the channel protocol
/// (`tests/hostile/worker.py`, which writes its frames by hand) is reported
/// (`error`), killed (signal 9) and forgotten (one disconnect, one exit),
/// its fds are closed, and the other workers go on.
#[test]
fn protocol_breakers_are_killed_and_leak_nothing() {
    let mut p = Probe::start();
    let good = p.fork_online("");
    for (mode, why) in [
        ("garbage", "bad frame magic"),
        ("oversize", "exceeds the 16777216-byte cap"),
        ("badfds", "announced 2 fds but 1 were received"),
        ("badkind", "may not send NewConn"),
    ] {
        let before = p.fds();
        let id = fork_hostile(&mut p, mode);
        let err = p.expect(format!("error {id} "), T);
        assert!(err.contains(why), "{mode}: {err}");
        p.expect_line(&format!("exit {id} signal=9 ead=false"), T);
        reported_once(&mut p, id);
        p.ask(&format!("send {good} echo after {mode}"), "ok send");
        p.expect_line(&format!("message {good} echo:after {mode} fds=0"), T);
        assert_eq!(p.fds(), before, "{mode}: the primary's fd count changed");
    }
    assert_eq!(p.workers(), format!("{good}:online:false:0"));
}

/// test-cluster-disconnect-with-no-workers.
#[test]
fn disconnect_all_with_no_workers() {
    let mut p = Probe::start();
    p.ask("disconnect_all", "ok disconnect_all");
    p.ask("disconnect_all 100", "ok disconnect_all");
    assert_eq!(p.workers(), "");
    p.fds();
    // And with some: every one exits with ead=true.
    let a = p.fork_online("");
    let b = p.fork_online("PROBE_MODE=listen");
    p.expect(format!("listening {b} "), T);
    p.ask("disconnect_all", "ok disconnect_all");
    p.expect_all(
        &[
            exact(format!("exit {a} code=0 ead=true")),
            exact(format!("exit {b} code=0 ead=true")),
        ],
        T,
    );
    assert_eq!(p.workers(), "");
    assert_eq!(p.ask("addresses", "addresses "), "addresses ");
}

/// LIBRARY BUG (src/primary/mod.rs, `on_frame`, `Kind::Listening`): a
/// worker's `Listening` frame for a handle the primary closed meanwhile
/// (here by `disconnect_all`, between its QueryReply and the worker's
/// Listening) is treated as a protocol violation: `error`, SIGKILL. It is a
/// plain race — `cluster.disconnect()` during start-up — and the worker did
/// nothing wrong. Seen first with a real `listen` worker forked just before
/// `disconnect_all`; made deterministic here by the Python hostile worker
/// (`late-listening` mode), which writes the frames itself and waits for a
/// flag file between the query and `Listening`.
#[test]
fn listening_for_a_handle_closed_meanwhile_is_not_a_protocol_error() {
    let dir = scratch_dir("late-listening");
    let flag = dir.join("go");
    let mut p = Probe::start();
    let id = fork_hostile(&mut p, &format!("late-listening {}", flag.display()));
    // The query was served: handle 1 exists.
    assert!(wait_until(T, || p.ask("addresses", "addresses ") != "addresses "));
    // It is closed before the worker says Listening.
    p.ask("disconnect_all", "ok disconnect_all");
    assert_eq!(p.ask("addresses", "addresses "), "addresses ");
    std::fs::write(&flag, "").unwrap();
    p.expect_none(format!("error {id} "), Duration::from_millis(500));
    assert_eq!(p.workers(), format!("{id}:online:true:0"));
}

/// LIBRARY BUG (src/primary/mod.rs, `reap`): the primary reaps with
/// `waitpid(-1, WNOHANG)` and drops the status of any child that is not a
/// worker, so a primary that runs a program of its own (a `Command` it
/// spawned, a log compressor, a health check) loses its exit status:
/// `try_wait`/`wait` then fail with ECHILD. Node's cluster only ever waits
/// for its workers' pids.
#[test]
fn the_primary_does_not_reap_children_that_are_not_workers() {
    let mut p = Probe::start();
    p.ask("child /bin/false", "child ");
    // A worker makes the primary's loop turn while the child's SIGCHLD is
    // pending.
    let id = p.fork_online("");
    p.ask(&format!("send {id} echo turn"), "ok send");
    p.expect_line(&format!("message {id} echo:turn fds=0"), T);
    p.cmd("waitchild");
    let answer = p.expect(
        pred("waitchild answer", |l: &str| l.contains("waitchild")),
        T,
    );
    assert_eq!(answer, "waitchild code=1");
}

/// test-cluster-kill-disconnect (worker side): `worker.disconnect()` tells
/// the primary first, so its exit has ead=true.
#[test]
fn worker_initiated_disconnect_reports_ead() {
    let mut p = Probe::start();
    let id = p.fork_online("");
    p.ask(&format!("send {id} disconnect"), "ok send");
    p.expect_line(&format!("exit {id} code=0 ead=true"), T);
    reported_once(&mut p, id);
}

/// As Node's worker does after the primary's ack, `worker.disconnect()`
/// closes the channel: the primary reports `disconnect <id>` (state
/// disconnected) while the worker process still lives (it sleeps 3 s after
/// the call), and the exit, ead=true, comes only later.
#[test]
fn worker_disconnect_closes_the_channel_while_the_process_lives() {
    let mut p = Probe::start();
    let id = p.fork_online("");
    let pid = p.worker_pids()[0].1;
    p.ask(&format!("send {id} disconnect 3000"), "ok send");
    let t0 = Instant::now();
    p.expect_line(&format!("disconnect {id}"), T);
    assert!(
        is_alive(pid),
        "worker {id} exited before the primary saw its disconnect"
    );
    assert!(
        p.position(format!("exit {id} ")).is_none(),
        "exit before disconnect: {:?}",
        p.log()
    );
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "the disconnect took {:?}: the primary waited for the process to end",
        t0.elapsed()
    );
    assert_eq!(p.workers(), format!("{id}:disconnected:true:0"));
    p.expect_line(&format!("exit {id} code=0 ead=true"), T);
    reported_once(&mut p, id);
}

/// A missing program: the fork fails with ENOENT, and leaves no fd, no
/// worker and no zombie behind; fixing the setting makes forks work again.
#[test]
fn exec_of_a_missing_program_fails_the_fork() {
    let mut p = Probe::start();
    let before = p.fds();
    p.ask("set exec /nonexistent", "ok set");
    p.cmd("fork");
    let e = p.expect("err fork ", T);
    assert!(e.contains("No such file"), "{e}");
    assert_eq!(p.fds(), before);
    assert_eq!(p.workers(), "");
    assert_eq!(p.ask("zombies", "zombies "), "zombies 0");
    assert!(children_of(p.pid()).is_empty());
    p.ask(&format!("set exec {}", probe_path().display()), "ok set");
    p.fork_online("");
}

/// A worker holds exactly: 0, 1, 2 (the primary's stdio), 3 (its channel),
/// 4 (its epoll fd, made by `role()` after exec) and, while `fdlist` runs,
/// 5 (the /proc/self/fd directory it reads). Nothing of the primary's
/// leaks: not its signalfd, epoll, stdin duplicate, other workers'
/// channels, nor a listening socket.
#[test]
fn worker_holds_only_stdio_channel_and_epoll() {
    let mut p = Probe::start();
    let l = p.fork_online("PROBE_MODE=listen");
    p.expect(format!("listening {l} "), T);
    let a = p.fork_online("");
    let b = p.fork_online("");
    for id in [a, b] {
        p.ask(&format!("send {id} fdlist"), "ok send");
        p.expect_line(&format!("message {id} fdlist:0,1,2,3,4,5 fds=0"), T);
    }
    // The same seen from outside, without the directory fd.
    let pid_b = p.worker_pids()[2].1;
    let link = |pid: i32, fd: u32| {
        std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
            .map(|t| t.display().to_string())
            .unwrap_or_default()
    };
    let mut fds: Vec<u32> = std::fs::read_dir(format!("/proc/{pid_b}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    assert_eq!(fds, [0, 1, 2, 3, 4]);
    for fd in 0..3 {
        assert_eq!(
            link(pid_b, fd),
            link(p.pid(), fd),
            "fd {fd} is not the primary's"
        );
    }
    assert!(link(pid_b, 3).starts_with("socket:"), "{}", link(pid_b, 3));
    assert_eq!(link(pid_b, 4), "anon_inode:[eventpoll]");
}

/// `disconnect <id> 200` to a worker that does not listen (blocked in a
/// 5 s sleep): SIGKILL after the timeout, and the exit still says ead=true.
#[test]
fn disconnect_timeout_kills_a_deaf_worker() {
    let mut p = Probe::start();
    let id = p.fork_online("");
    p.ask(&format!("send {id} sleep 5000"), "ok send");
    p.expect_line(&format!("message {id} sleeping:5000 fds=0"), T);
    let start = Instant::now();
    p.ask(&format!("disconnect {id} 200"), "ok disconnect");
    p.expect_line(&format!("exit {id} signal=9 ead=true"), T);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(190) && took < Duration::from_secs(3),
        "killed after {took:?}"
    );
    assert_eq!(p.count(format!("message {id} slept:")), 0);
    reported_once(&mut p, id);
}

// ------------------------------------------------------------ beyond Node

/// 100 fork/exit cycles leave the primary's fd count unchanged.
#[test]
fn hundred_fork_exit_cycles_leave_primary_fd_count_unchanged() {
    let mut p = Probe::start();
    let before = p.fds();
    let outside = count_fds(p.pid());
    for _ in 0..100 {
        let id = p.fork("PROBE_MODE=exit42");
        p.expect_line(&format!("exit {id} code=42 ead=false"), T);
    }
    assert_eq!(p.fds(), before);
    assert_eq!(count_fds(p.pid()), outside);
    assert_eq!(p.workers(), "");
    assert_eq!(p.ask("zombies", "zombies "), "zombies 0");
    assert_eq!(p.count("exit "), 100);
    assert_eq!(p.count("disconnect "), 100);
}

/// However workers end, none stays a zombie.
#[test]
fn no_zombie_is_left_behind() {
    let mut p = Probe::start();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(p.fork("PROBE_MODE=exit42"));
    }
    let killed = p.fork_online("");
    let disconnected = p.fork_online("");
    let quitter = p.fork_online("");
    p.cmd(&format!(
        "kill {killed} 9\ndisconnect {disconnected}\nsend {quitter} exit 7"
    ));
    let mut want: Vec<String> = ids
        .iter()
        .map(|id| format!("exit {id} code=42 ead=false"))
        .collect();
    want.push(format!("exit {killed} signal=9 ead=false"));
    want.push(format!("exit {disconnected} code=0 ead=true"));
    want.push(format!("exit {quitter} code=7 ead=false"));
    let want: Vec<_> = want.into_iter().map(exact).collect();
    p.expect_all(&want, T);
    assert_eq!(p.ask("zombies", "zombies "), "zombies 0");
    assert!(
        children_of(p.pid()).is_empty(),
        "{:?}",
        children_of(p.pid())
    );
}

/// A worker that writes N messages and exits at once: all N arrive, in
/// order, before exactly one disconnect and one exit with code 3.
#[test]
fn disconnect_and_exit_are_both_reported_when_worker_dies_with_frames_pending() {
    const N: usize = 500;
    let mut p = Probe::start();
    let id = p.fork_online("");
    p.ask(&format!("send {id} burst {N}"), "ok send");
    p.expect_line(&format!("exit {id} code=3 ead=false"), T);
    reported_once(&mut p, id);
    let at: Vec<usize> = (0..N)
        .map(|i| pos(&p, &format!("message {id} burst:{i} fds=0")))
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "burst out of order");
    assert!(at[N - 1] < pos(&p, &format!("disconnect {id}")));
    assert_eq!(p.count(format!("message {id} burst:")), N);
}

/// Runs the probe binary directly with `env` (plus the `SYNCLUSTER_*`
/// variables of this process removed) and checks that it fails cleanly:
/// exit 2, `error: ...` naming `var` on stderr, no panic.
fn fails_cleanly(mut cmd: Command, env: &[(&str, &str)], var: &str) {
    cmd.env_remove("SYNCLUSTER_WORKER_ID")
        .env_remove("SYNCLUSTER_CHANNEL_FD")
        .env_remove("SYNCLUSTER_SCHED_POLICY")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = output_within(cmd, T);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{env:?}: {stderr}");
    assert!(stderr.starts_with("error: "), "{env:?}: {stderr}");
    assert!(stderr.contains(var), "{env:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{env:?}: {stderr}");
    assert!(out.stdout.is_empty(), "{env:?}: stdout {:?}", out.stdout);
}

/// Malformed `SYNCLUSTER_*` variables: a clean error naming the variable.
#[test]
fn bad_environment_is_a_clean_error_naming_the_variable() {
    let probe = probe_path();
    for (env, var) in [
        (
            &[
                ("SYNCLUSTER_WORKER_ID", "abc"),
                ("SYNCLUSTER_CHANNEL_FD", "3"),
            ][..],
            "SYNCLUSTER_WORKER_ID",
        ),
        (
            &[
                ("SYNCLUSTER_WORKER_ID", "0"),
                ("SYNCLUSTER_CHANNEL_FD", "3"),
            ],
            "SYNCLUSTER_WORKER_ID",
        ),
        (&[("SYNCLUSTER_WORKER_ID", "1")], "SYNCLUSTER_CHANNEL_FD"),
        (&[("SYNCLUSTER_CHANNEL_FD", "3")], "SYNCLUSTER_WORKER_ID"),
        (
            &[
                ("SYNCLUSTER_WORKER_ID", "1"),
                ("SYNCLUSTER_CHANNEL_FD", "1"),
            ],
            "SYNCLUSTER_CHANNEL_FD",
        ),
        (
            &[
                ("SYNCLUSTER_WORKER_ID", "1"),
                ("SYNCLUSTER_CHANNEL_FD", "x"),
            ],
            "SYNCLUSTER_CHANNEL_FD",
        ),
        (
            // Not open (every fd of this test process is close-on-exec).
            &[
                ("SYNCLUSTER_WORKER_ID", "1"),
                ("SYNCLUSTER_CHANNEL_FD", "900"),
            ],
            "SYNCLUSTER_CHANNEL_FD",
        ),
        (
            &[("SYNCLUSTER_SCHED_POLICY", "bogus")],
            "SYNCLUSTER_SCHED_POLICY",
        ),
    ] {
        fails_cleanly(Command::new(&probe), env, var);
    }
}

/// fd 3 open on a regular file, not a socket: refused, naming the variable.
#[test]
fn channel_fd_on_a_regular_file_is_refused() {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(r#"exec 3<"$1"; exec "$0""#)
        .arg(probe_path())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"));
    fails_cleanly(
        cmd,
        &[
            ("SYNCLUSTER_WORKER_ID", "1"),
            ("SYNCLUSTER_CHANNEL_FD", "3"),
        ],
        "SYNCLUSTER_CHANNEL_FD",
    );
}

// ------------------------------------------------------------ figures

/// fork → online latency for 1 and 8 workers, median of 5 runs. A figure,
/// not a check: `cargo test --release --test cluster_core -- --ignored
/// --nocapture fork_to_online`.
#[test]
#[ignore]
fn fork_to_online_latency() {
    for n in [1usize, 8] {
        let mut runs = Vec::new();
        for _ in 0..5 {
            let mut p = Probe::start();
            p.fds(); // The probe is up and answering.
            let forks = vec!["fork"; n].join("\n");
            let want: Vec<_> = (1..=n).map(|i| exact(format!("online {i}"))).collect();
            let start = Instant::now();
            p.cmd(&forks);
            p.expect_all(&want, T);
            runs.push(start.elapsed());
        }
        runs.sort();
        println!(
            "fork -> online, {n} worker(s): median {:?} (runs {runs:?})",
            runs[2]
        );
    }
}
