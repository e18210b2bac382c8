//! The primary against hostile workers (issue 9 §1, §3, §4, §5, primary
//! side). The liars are `tests/hostile/claims.py`, a worker that speaks the
//! channel protocol by hand (its docs list the modes), or the probe's own
//! worker under another uid. The honest worker is the probe's `listen`
//! mode; every test checks it keeps serving, with no failed request.
//!
//! Tests that need a worker under uid 65534 (nobody) need root; they say
//! so on stderr and pass without checking anything when not run as root.
//! Tests that need Python look for `/usr/bin/python3` the same way.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::common::{children_of, exact, is_alive, pred, probe_path, tcp_line, Probe, DEADLINE};

const NOBODY: u32 = 65534;
const CLIENT: Duration = Duration::from_secs(5);
/// The primary's RSS may not pass this in any test (it starts near 3 MB).
const MAX_RSS_KB: usize = 32 * 1024;

// ---------------------------------------------------------------- helpers

fn python() -> Option<&'static str> {
    let p = "/usr/bin/python3";
    crate::common::require_tool(p).then_some(p)
}

fn is_root() -> bool {
    crate::common::require_root(&format!("to run workers as uid {NOBODY}"))
}

/// A fresh 0755 directory under /tmp with `claims.py` in it (0644), so that
/// a worker running as nobody can read the script. Removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "syncluster-hostile-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let script = dir.join("claims.py");
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hostile/claims.py"),
            &script,
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
        Scratch(dir)
    }

    fn script(&self) -> String {
        self.0.join("claims.py").display().to_string()
    }

    /// A directory `name` in it owned by nobody (0755).
    fn nobody_dir(&self, name: &str) -> PathBuf {
        let d = self.0.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let st = Command::new("chown")
            .arg(format!("{NOBODY}:{NOBODY}"))
            .arg(&d)
            .status()
            .unwrap();
        assert!(st.success(), "chown {}", d.display());
        d
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn set(p: &mut Probe, what: &str) {
    p.ask(&format!("set {what}"), "ok set");
}

/// Forks an honest probe worker listening on 127.0.0.1:0; its id and address.
fn honest(p: &mut Probe) -> (u32, String) {
    set(p, &format!("exec {}", probe_path().display()));
    set(p, "args");
    let id = p.fork("PROBE_MODE=listen PROBE_ADDR=127.0.0.1:0");
    let line = p.expect(format!("listening {id} "), DEADLINE);
    (id, line[format!("listening {id} ").len()..].to_string())
}

/// Forks `claims.py <mode...>` as a worker.
fn hostile(p: &mut Probe, scratch: &Scratch, mode: &str) -> u32 {
    let py = python().expect("checked by the caller");
    set(p, &format!("exec {py}"));
    set(p, &format!("args {} {mode}", scratch.script()));
    p.fork_online("")
}

/// `n` clients in a row, each answered by a worker.
fn serves(p: &Probe, addr: &str, n: usize) {
    for i in 0..n {
        match tcp_line(addr, CLIENT) {
            Ok(l) if l.starts_with("worker ") => {}
            other => p.fail(&format!("request {i} to {addr}: {other:?}")),
        }
    }
}

fn rss_kb(p: &mut Probe) -> usize {
    let line = p.ask("rss", "rss ");
    line["rss ".len()..].trim().parse().expect("rss <kB>")
}

fn proc_rss_kb(pid: i32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn addresses(p: &mut Probe) -> Vec<String> {
    let line = p.ask("addresses", "addresses ");
    line["addresses ".len()..]
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// The primary's fds went back to `base` (5 s at most) and its RSS is
/// under [`MAX_RSS_KB`].
fn bounded(p: &mut Probe, base: usize) {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let n = p.fds();
        if n <= base {
            break;
        }
        if Instant::now() >= end {
            p.fail(&format!("primary holds {n} fds, {base} before"));
        }
        thread::sleep(Duration::from_millis(50));
    }
    let rss = rss_kb(p);
    assert!(rss < MAX_RSS_KB, "primary RSS {rss} kB");
}

/// `id` is reported with `why` in its error, and killed.
fn reported_and_killed(p: &mut Probe, id: u32, why: &str) {
    let why = why.to_string();
    p.expect(
        pred(format!("error {id} ... {why}"), move |l: &str| {
            l.starts_with(&format!("error {id} ")) && l.contains(&why)
        }),
        DEADLINE,
    );
    p.expect(exact(format!("exit {id} signal=9 ead=false")), DEADLINE);
}

/// `id` was neither reported nor killed, and still answers.
fn not_punished(p: &mut Probe, id: u32) {
    p.expect_none(format!("error {id} "), Duration::from_millis(300));
    let w = p.workers();
    assert!(
        w.split(',').any(|e| e.starts_with(&format!("{id}:"))
            && !e.contains(":dead:")
            && !e.contains(":disconnected:")),
        "worker {id} is gone: {w}"
    );
}

// ------------------------------------------------- §1 privilege boundary

/// A worker running as nobody asks for 127.0.0.1:99: `PermissionDenied`
/// reaches its `listen()` naming the address; it is not killed, nothing
/// is bound, and its next listen on port 0 works.
#[test]
fn unprivileged_worker_cannot_make_the_primary_bind_a_privileged_port() {
    if !is_root() {
        return;
    }
    let mut p = Probe::start();
    set(&mut p, &format!("uid {NOBODY}"));
    set(&mut p, &format!("gid {NOBODY}"));
    let base = p.fds();
    let id = p.fork("PROBE_MODE=listen PROBE_ADDR=127.0.0.1:99,127.0.0.1:0");
    let err = p.expect(format!("message {id} listen-error:127.0.0.1:99:"), DEADLINE);
    assert!(err.contains(":PermissionDenied:"), "{err}");
    assert!(err.contains("127.0.0.1:99: permission denied"), "{err}");
    let ok = p.expect(format!("message {id} listening:127.0.0.1:"), DEADLINE);
    let addr = ok
        .split("listening:")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    assert!(!addresses(&mut p).iter().any(|a| a.ends_with(":99")));
    not_punished(&mut p, id);
    serves(&p, addr, 20);
    // Its channel, pidfd, listener and the two ends of its pipe.
    bounded(&mut p, base + 5);
}

/// A worker running as nobody asks for Unix sockets in /root and /etc:
/// denied, and no file is created; the default allows no Unix directory
/// under a privilege drop.
#[test]
fn unprivileged_worker_cannot_make_the_primary_bind_in_root_directories() {
    if !is_root() {
        return;
    }
    let tag = format!("syncluster-{}-{}", std::process::id(), line!());
    let paths = [
        format!("/root/{tag}.sock"),
        format!("/etc/{tag}.sock"),
        format!("/tmp/{tag}.sock"),
    ];
    let mut p = Probe::start();
    set(&mut p, &format!("uid {NOBODY}"));
    set(&mut p, &format!("gid {NOBODY}"));
    let base = p.fds();
    let id = p.fork(&format!(
        "PROBE_MODE=listen PROBE_ADDR={},127.0.0.1:0",
        paths.join(",")
    ));
    for path in &paths {
        let err = p.expect(format!("message {id} listen-error:{path}:"), DEADLINE);
        assert!(err.contains(":PermissionDenied:"), "{err}");
        assert!(!Path::new(path).exists(), "{path} was created");
    }
    let ok = p.expect(format!("message {id} listening:127.0.0.1:"), DEADLINE);
    let addr = ok.split("listening:").nth(1).unwrap().to_string();
    not_punished(&mut p, id);
    serves(&p, addr.split(' ').next().unwrap(), 10);
    bounded(&mut p, base + 5);
}

/// Explicit rules allow exactly what they list, with or without a
/// privilege drop: one TCP address on port 0, one Unix directory (not a
/// symlink in it that leads out).
#[test]
fn listen_rules_allow_only_what_they_list() {
    let s = Scratch::new();
    let ok_dir = s.0.join("ok");
    let out_dir = s.0.join("out");
    std::fs::create_dir_all(&ok_dir).unwrap();
    std::fs::create_dir_all(&out_dir).unwrap();
    std::os::unix::fs::symlink(&out_dir, ok_dir.join("link")).unwrap();
    let mut p = Probe::start();
    set(
        &mut p,
        &format!("listen tcp:127.0.0.1:0-0 unix:{}", ok_dir.display()),
    );
    let base = p.fds();
    let good_sock = ok_dir.join("a.sock").display().to_string();
    let denied = [
        "127.0.0.2:0".to_string(),
        ":0".to_string(),
        "127.0.0.1:8".to_string(),
        out_dir.join("b.sock").display().to_string(),
        ok_dir.join("link/c.sock").display().to_string(),
    ];
    let id = p.fork(&format!(
        "PROBE_MODE=listen PROBE_ADDR=127.0.0.1:0,{good_sock},{}",
        denied.join(",")
    ));
    for addr in &denied {
        let err = p.expect(format!("message {id} listen-error:{addr}:"), DEADLINE);
        assert!(err.contains(":PermissionDenied:"), "{err}");
    }
    assert!(!out_dir.join("b.sock").exists());
    assert!(!out_dir.join("c.sock").exists());
    let tcp = p.expect(format!("message {id} listening:127.0.0.1:"), DEADLINE);
    p.expect(format!("message {id} listening:{good_sock}"), DEADLINE);
    assert!(Path::new(&good_sock).exists());
    let unix = std::os::unix::net::UnixStream::connect(&good_sock).unwrap();
    unix.set_read_timeout(Some(CLIENT)).unwrap();
    let mut line = String::new();
    BufReader::new(unix).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), format!("worker {id}"));
    not_punished(&mut p, id);
    serves(
        &p,
        tcp.split("listening:")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap(),
        10,
    );
    // Its channel, pidfd, two listeners and their pipes (two ends each),
    // and the Unix one's directory.
    bounded(&mut p, base + 9);
}

/// The Unix socket file tests: a probe with an honest worker, and the liar
/// forked as nobody with `unix:<w>` allowed.
struct UnixLiar {
    p: Probe,
    id: u32,
    victim: PathBuf,
    honest_addr: String,
    /// The primary's fds before the liar.
    base: usize,
}

/// Sets up the directories of the Unix socket file tests and forks the
/// liar; see [`UnixLiar`].
fn unix_liar(s: &Scratch, mode: &str) -> UnixLiar {
    let w = s.nobody_dir("w");
    s.nobody_dir("w/sub");
    let victim = s.0.join("victim");
    std::fs::create_dir_all(&victim).unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(victim.join("x.sock"), b"secret").unwrap();
    std::fs::set_permissions(
        victim.join("x.sock"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let mut p = Probe::start();
    let (_, addr) = honest(&mut p);
    let base = p.fds();
    set(&mut p, &format!("uid {NOBODY}"));
    set(&mut p, &format!("gid {NOBODY}"));
    set(&mut p, &format!("listen unix:{}", w.display()));
    let args = match mode {
        "swap" => format!("swap {} {}", w.display(), victim.display()),
        _ => format!("replace {}", w.join("sub/x.sock").display()),
    };
    let id = hostile(&mut p, s, &args);
    UnixLiar {
        p,
        id,
        victim,
        honest_addr: addr,
        base,
    }
}

/// The audit's attack: a worker swaps a directory of its socket's path for
/// a symlink to a root-only directory, then closes the handle. The
/// primary removes its socket where it really is, and the root-owned
/// file the symlink names stays.
#[test]
fn a_swapped_directory_does_not_make_the_primary_delete_what_the_symlink_names() {
    if !is_root() || python().is_none() {
        return;
    }
    let s = Scratch::new();
    let UnixLiar {
        mut p,
        id,
        victim,
        honest_addr,
        base,
    } = unix_liar(&s, "swap");
    p.expect(exact(format!("message {id} swapped fds=0")), DEADLINE);
    assert_eq!(std::fs::read(victim.join("x.sock")).unwrap(), b"secret");
    let moved = s.0.join("w/sub2/x.sock");
    assert!(
        common_wait(|| !moved.exists()),
        "the primary left its own socket {}",
        moved.display()
    );
    not_punished(&mut p, id);
    serves(&p, &honest_addr, 20);
    bounded(&mut p, base + 2); // the liar's channel and pidfd
}

/// A worker replaces the primary's socket file with a plain file and
/// closes the handle: the plain file stays.
#[test]
fn a_replaced_socket_file_is_not_removed() {
    if !is_root() || python().is_none() {
        return;
    }
    let s = Scratch::new();
    let UnixLiar {
        mut p,
        id,
        honest_addr,
        base,
        ..
    } = unix_liar(&s, "replace");
    p.expect(exact(format!("message {id} replaced fds=0")), DEADLINE);
    let path = s.0.join("w/sub/x.sock");
    // The Close came before the message: the primary has acted on it.
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "not the primary's",
        "the primary removed a file that was not its socket"
    );
    not_punished(&mut p, id);
    serves(&p, &honest_addr, 20);
    bounded(&mut p, base + 2); // the liar's channel and pidfd
}

/// The primary's Unix socket files go when it exits.
#[test]
fn socket_files_are_removed_when_the_primary_exits() {
    let s = Scratch::new();
    let path = s.0.join("exit.sock");
    let mut p = Probe::start();
    let id = p.fork(&format!("PROBE_MODE=listen PROBE_ADDR={}", path.display()));
    p.expect(format!("listening {id} "), DEADLINE);
    assert!(path.exists());
    p.close_stdin();
    assert!(p.wait_exit(DEADLINE).is_some_and(|st| st.success()));
    assert!(!path.exists(), "{} outlived the primary", path.display());
}

fn common_wait(cond: impl FnMut() -> bool) -> bool {
    crate::common::wait_until(DEADLINE, cond)
}

// ----------------------------------------------------------- §3 bounded

/// A worker floods 64-byte user messages for 3 s. The primary reads it in
/// slices: the honest worker's clients are all served and none waits long,
/// the program's commands are answered, and the primary's memory stays
/// flat.
#[test]
fn a_flooding_worker_does_not_hold_the_loop_or_grow_the_primary() {
    if python().is_none() {
        return;
    }
    let s = Scratch::new();
    let mut p = Probe::start();
    let (_, addr) = honest(&mut p);
    let base = p.fds();
    let rss_before = rss_kb(&mut p);
    let id = hostile(&mut p, &s, "flood 3");
    let started = Instant::now();
    let mut worst = Duration::ZERO;
    let mut served = 0;
    let mut rss_during = 0;
    // The primary's RSS from /proc: asking the probe would mean reading
    // through the flood's lines.
    let pid = p.pid();
    while started.elapsed() < Duration::from_millis(2500) {
        let t = Instant::now();
        match tcp_line(&addr, CLIENT) {
            Ok(l) if l.starts_with("worker ") => served += 1,
            other => p.fail(&format!("request {served} during the flood: {other:?}")),
        }
        worst = worst.max(t.elapsed());
        rss_during = rss_during.max(proc_rss_kb(pid));
    }
    p.expect(format!("message {id} flood-done "), Duration::from_secs(30));
    let rss_after = rss_kb(&mut p);
    eprintln!(
        "flood: {served} requests served, worst {worst:?}; primary RSS {rss_before} kB \
         before, {rss_during} kB during, {rss_after} kB after"
    );
    assert!(served >= 20, "only {served} requests in 2.5 s");
    assert!(
        worst < Duration::from_millis(500),
        "a request waited {worst:?}"
    );
    assert!(rss_during < MAX_RSS_KB && rss_after < MAX_RSS_KB);
    not_punished(&mut p, id);
    bounded(&mut p, base + 2); // its channel and pidfd
}

/// A worker asks for 200 listening handles (index 1..200 of 127.0.0.1:0,
/// none the honest worker's):
/// it gets 64, then EMFILE naming the cap; the primary holds no more
/// sockets than that; the worker is not killed.
#[test]
fn a_worker_holds_at_most_max_worker_handles() {
    if python().is_none() {
        return;
    }
    let s = Scratch::new();
    let mut p = Probe::start();
    let (_, addr) = honest(&mut p);
    let base = p.fds();
    let id = hostile(&mut p, &s, "query-flood 200");
    let line = p.expect(format!("message {id} flood "), DEADLINE);
    assert!(line.contains("ok=64 err=136 errno=24 "), "{line}");
    assert!(
        line.contains("already holds 64 listening handles"),
        "{line}"
    );
    assert_eq!(addresses(&mut p).len(), 1 + 64);
    let held = p.fds();
    // Per handle: its socket and the two ends of the worker's pipe.
    assert!(held <= base + 2 + 3 * 64, "{held} fds, {base} before");
    not_punished(&mut p, id);
    serves(&p, &addr, 20);
    // Disconnected first, so that its 64 sockets are not kept for a
    // replacement (a crash keeps them for `orphan_linger`).
    p.ask(&format!("disconnect {id}"), "ok disconnect");
    p.ask(&format!("kill {id} 9"), "ok kill");
    p.expect(exact(format!("exit {id} signal=9 ead=true")), DEADLINE);
    bounded(&mut p, base);
}

/// The lowest fd number the process does not use (where its next fd goes).
fn lowest_free_fd(pid: i32) -> u64 {
    let used: std::collections::BTreeSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|n| !used.contains(n)).unwrap()
}

fn prlimit_nofile(pid: i32, n: u64) {
    let st = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={n}:"))
        .status()
        .expect("prlimit");
    assert!(st.success());
}

/// Shared mode: the primary runs out of fds while it passes the listening
/// socket to a second worker. That worker's `listen()` gets EMFILE and it
/// is not killed; once fds are back, it listens and serves.
#[test]
fn emfile_in_the_primary_fails_the_query_not_the_worker() {
    if !crate::common::require_tool("prlimit") {
        return;
    }
    let mut p = Probe::start();
    set(&mut p, "policy shared");
    let (_, addr) = honest(&mut p);
    // The same key as the honest worker's: it joins that handle, and
    // the primary must dup the socket to pass it.
    let b = p.fork_online("PROBE_MODE=idle PROBE_ADDR=127.0.0.1:0");
    let base = p.fds();
    let pid = p.pid();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let soft: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    prlimit_nofile(pid, lowest_free_fd(pid));
    p.ask(&format!("send {b} relisten"), "ok send");
    let err = p.expect(format!("message {b} listen-error:"), DEADLINE);
    prlimit_nofile(pid, soft);
    assert!(err.contains("Too many open files"), "{err}");
    not_punished(&mut p, b);
    p.ask(&format!("send {b} relisten"), "ok send");
    p.expect(format!("message {b} listening:"), DEADLINE);
    serves(&p, &addr, 20);
    bounded(&mut p, base);
}

// --------------------------------------------- §4 claims a worker may not make

/// A worker closes a handle it was never given (the honest worker's, left
/// orphaned by a crash): reported, killed, and the orphan stays for the
/// honest worker's replacement.
#[test]
fn closing_a_handle_never_given_is_a_protocol_error() {
    if python().is_none() {
        return;
    }
    let s = Scratch::new();
    let mut p = Probe::start();
    let (a, addr) = honest(&mut p);
    let base = p.fds();
    p.ask(&format!("kill {a} 9"), "ok kill");
    p.expect(exact(format!("exit {a} signal=9 ead=false")), DEADLINE);
    let id = hostile(&mut p, &s, "close-foreign 1");
    reported_and_killed(&mut p, id, "closing handle 1, which it was not given");
    assert_eq!(addresses(&mut p), vec![addr.clone()]);
    let (_, again) = honest(&mut p);
    assert_eq!(again, addr, "the replacement got another socket");
    serves(&p, &addr, 20);
    bounded(&mut p, base);
}

/// A worker abuses the pipe connections reach it through: it cannot write
/// into it (EPIPE: the primary's end is shut for reading), and when it
/// tears a record (reads 3 of its 8 bytes, taking that connection) and
/// exits, the primary reads back every whole fd behind the tear and the
/// honest worker serves them: only the connection it took goes unanswered.
#[test]
fn a_worker_that_tears_its_pipe_loses_only_what_it_took() {
    if python().is_none() {
        return;
    }
    let s = Scratch::new();
    let mut p = Probe::start();
    let (a, addr) = honest(&mut p);
    let base = p.fds();
    let id = hostile(&mut p, &s, "pipe-abuse");
    p.expect(format!("listening {id} "), DEADLINE);
    // Six at once: in turn, three of them reach the hostile worker's pipe.
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let addr = addr.clone();
            thread::spawn(move || tcp_line(&addr, CLIENT))
        })
        .collect();
    let said = p.expect(format!("message {id} pipe-abuse "), DEADLINE);
    assert!(said.contains("write:EPIPE"), "{said}");
    assert!(said.contains("torn:1"), "{said}");
    p.expect(format!("exit {id} "), DEADLINE);
    let mut answered = 0;
    let mut unanswered = 0;
    for c in clients {
        match c.join().unwrap() {
            Ok(l) => {
                assert_eq!(l, format!("worker {a}"));
                answered += 1;
            }
            Err(_) => unanswered += 1,
        }
    }
    assert_eq!((answered, unanswered), (5, 1), "{:?}", p.log());
    p.expect_none("error ", Duration::from_millis(50));
    serves(&p, &addr, 10);
    bounded(&mut p, base);
}

/// A worker says it listens on a handle it did not query, or twice for one
/// query: reported and killed, no Listening event counted for it.
#[test]
fn listening_for_a_handle_not_queried_is_a_protocol_error() {
    if python().is_none() {
        return;
    }
    let s = Scratch::new();
    let mut p = Probe::start();
    let (_, addr) = honest(&mut p);
    let base = p.fds();
    let id = hostile(&mut p, &s, "listening-foreign 1");
    reported_and_killed(&mut p, id, "listening on handle 1, which it was not given");
    let twice = hostile(&mut p, &s, "listening-twice");
    reported_and_killed(&mut p, twice, "listening on handle 2 again");
    assert_eq!(p.count(format!("listening {id} ")), 0);
    assert_eq!(p.count(format!("listening {twice} ")), 1);
    serves(&p, &addr, 20);
    // The socket of handle 2 stays for a replacement (`orphan_linger`).
    bounded(&mut p, base + 1);
}

/// A worker asked to disconnect queries a new address: refused with
/// ECONNABORTED, nothing bound, and it is not punished for the race.
#[test]
fn queries_from_a_disconnecting_worker_bind_nothing() {
    if python().is_none() {
        return;
    }
    let s = Scratch::new();
    let mut p = Probe::start();
    let (_, addr) = honest(&mut p);
    let base = p.fds();
    let id = hostile(&mut p, &s, "query-after-disconnect");
    p.expect(exact(format!("message {id} waiting fds=0")), DEADLINE);
    p.ask(&format!("disconnect {id}"), "ok disconnect");
    p.expect(
        exact(format!("message {id} after-disconnect err=103 fds=0")),
        DEADLINE,
    );
    assert_eq!(addresses(&mut p), vec![addr.clone()]);
    p.expect_none(format!("error {id} "), Duration::from_millis(300));
    serves(&p, &addr, 20);
    p.ask(&format!("kill {id} 9"), "ok kill");
    p.expect(exact(format!("exit {id} signal=9 ead=true")), DEADLINE);
    bounded(&mut p, base);
}

/// fds attached to a control frame (Listening): a protocol error, and the
/// fd is closed, not kept.
#[test]
fn control_frames_with_fds_are_protocol_errors_and_leak_no_fd() {
    if python().is_none() {
        return;
    }
    let s = Scratch::new();
    let mut p = Probe::start();
    let (_, addr) = honest(&mut p);
    let base = p.fds();
    let id = hostile(&mut p, &s, "fd-on-control");
    reported_and_killed(&mut p, id, "Listening frame came with 1 fds");
    serves(&p, &addr, 20);
    // Its own handle's socket stays for a replacement (`orphan_linger`).
    bounded(&mut p, base + 1);
}

// ------------------------------------------------------ §5 process lifetimes

/// A thread started before `Primary::new` has the signals unblocked and
/// takes SIGCHLD: every worker exit is still reported (through its pidfd)
/// and no zombie is left.
#[test]
fn worker_exits_are_seen_when_another_thread_takes_sigchld() {
    let mut p = Probe::start_with(|c| {
        c.env("PROBE_THREAD_FIRST", "1");
    });
    let base = p.fds();
    let ids: Vec<u32> = (0..5).map(|_| p.fork_online("")).collect();
    for id in &ids {
        p.ask(&format!("kill {id} 9"), "ok kill");
    }
    let want: Vec<_> = ids
        .iter()
        .map(|id| exact(format!("exit {id} signal=9 ead=false")))
        .collect();
    p.expect_all(&want, DEADLINE);
    assert_eq!(p.ask("zombies", "zombies "), "zombies 0");
    bounded(&mut p, base);
}

/// A probe that is PID 1 of a new pid namespace (`unshare --pid --fork`),
/// driven by hand (the `Probe` harness spawns the probe itself).
struct Init {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Init {
    fn start() -> Option<Init> {
        let mut child = Command::new("unshare")
            .args(["--pid", "--fork", "--kill-child"])
            .arg(probe_path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Some(Init {
            child,
            lines,
            log: Vec::new(),
        })
    }

    fn ask(&mut self, cmd: &str, prefix: &str) -> String {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{cmd}").unwrap();
        stdin.flush().unwrap();
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.log.push(l.clone());
                    if l.starts_with(prefix) {
                        return l;
                    }
                }
                Err(_) => panic!("no {prefix:?} after {cmd:?}; log: {:#?}", self.log),
            }
        }
    }

    /// The probe's pid as this test sees it (unshare's child).
    fn probe_pid(&self) -> Option<i32> {
        children_of(self.child.id() as i32).first().copied()
    }
}

impl Drop for Init {
    fn drop(&mut self) {
        // --kill-child: the probe (PID 1 there) and with it the namespace go.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// As PID 1 the primary reaps orphans that are not its workers: a shell
/// leaves a `sleep` behind, reparented to the primary; once it ends, no
/// zombie stays. Workers are still reported.
#[test]
fn pid1_primary_reaps_orphans_that_are_not_workers() {
    if !is_root() {
        return;
    }
    if !crate::common::require_tool("unshare") {
        return;
    }
    let mut init = Init::start().expect("unshare --pid --fork starts the probe");
    assert!(
        init.ask("workers", "").starts_with("workers"),
        "unshare --pid failed: {:?}",
        init.log
    );
    let s = Scratch::new();
    let script = s.0.join("orphan.sh");
    std::fs::write(&script, "sleep 0.3 &\nsleep 0.3 &\nexit 0\n").unwrap();
    let id: u32 = init.ask("fork", "forked ")["forked ".len()..]
        .parse()
        .unwrap();
    init.ask(&format!("child /bin/sh {}", script.display()), "child ");
    let probe = init.probe_pid().expect("the probe runs under unshare");
    // The shell and its two orphans are the primary's children for a while.
    let zombies = || {
        children_of(probe)
            .into_iter()
            .filter(|&c| !is_alive(c) && Path::new(&format!("/proc/{c}")).exists())
            .count()
    };
    thread::sleep(Duration::from_millis(800));
    assert!(
        crate::common::wait_until(Duration::from_secs(3), || zombies() == 0),
        "zombies left under the PID 1 primary: {:?}",
        children_of(probe)
    );
    init.ask(&format!("kill {id} 9"), "ok kill");
    init.ask("", &format!("exit {id} signal=9"));
}
