//! Listening through the primary, with real processes and real clients
//! (ports of Node's test-cluster-listening-port, -disconnect,
//! -net-listen-ipv6only-false, -http-pipe, -bind-twice, -eaddrinuse,
//! -bind-privileged-port, -worker-handle-close, -server-restart-rr, and a
//! few that go beyond Node: connections lost when a worker dies, fd counts
//! over many connections, round-robin fairness, rejection by every worker).
//!
//! Every scenario drives `examples/cluster_probe` through the `Probe` of
//! `tests/common`; dropping the probe kills the whole process tree, so a
//! failed assertion leaves nothing behind. Scenarios that apply to both
//! policies run once in round robin and once in shared mode.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{probe_path, Probe};

/// How long one line of the probe may take to show up.
const STEP: Duration = Duration::from_secs(10);
/// Connect and read timeout of a client.
const CLIENT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Helpers over the probe
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pol {
    Rr,
    Shared,
}

impl Pol {
    fn name(self) -> &'static str {
        match self {
            Pol::Rr => "rr",
            Pol::Shared => "shared",
        }
    }
}

/// A probe with the policy set.
fn start(pol: Pol) -> Probe {
    let mut p = Probe::spawn();
    set(&mut p, &format!("policy {}", pol.name()));
    p
}

/// `set ...` and its `ok set`.
fn set(p: &mut Probe, what: &str) {
    p.cmd(&format!("set {what}"));
    p.expect_line("ok set", STEP);
}

/// `fork KEY=VALUE ...` → the new worker's id.
fn fork(p: &mut Probe, env: &str) -> u32 {
    p.fork(env)
}

/// Forks a listening worker and waits for its primary-side `listening`
/// event and its own `listening:` message (one per address); returns the
/// id and the addresses in the order of the events.
fn fork_listening(p: &mut Probe, env: &str, listeners: usize) -> (u32, Vec<String>) {
    fork_in_mode(p, "listen", env, listeners)
}

/// [`fork_listening`] with another `PROBE_MODE`.
fn fork_in_mode(p: &mut Probe, mode: &str, env: &str, listeners: usize) -> (u32, Vec<String>) {
    let id = fork(p, &format!("PROBE_MODE={mode} {env}"));
    let mut addrs = Vec::new();
    for _ in 0..listeners {
        addrs.push(listening_event(p, id));
    }
    for _ in 0..listeners {
        let m = message(p, id, "listening:");
        assert!(
            addrs.contains(&m),
            "worker {id} says it listens on {m}, the primary said {addrs:?}"
        );
    }
    (id, addrs)
}

/// Waits for `listening <id> <addr>` and returns the address.
fn listening_event(p: &mut Probe, id: u32) -> String {
    let line = p.expect_prefix(&format!("listening {id} "), STEP);
    line[format!("listening {id} ").len()..].trim().to_string()
}

/// Waits for `message <id> <prefix>...` and returns the text after the
/// prefix (the `fds=<n>` suffix removed).
fn message(p: &mut Probe, id: u32, prefix: &str) -> String {
    let head = format!("message {id} {prefix}");
    let line = p.expect_prefix(&head, STEP);
    let text = &line[head.len()..];
    let text = match text.rfind(" fds=") {
        Some(i) => &text[..i],
        None => text,
    };
    text.to_string()
}

/// Waits for `exit <id> ...` and returns the rest of the line.
fn exit_of(p: &mut Probe, id: u32) -> String {
    let head = format!("exit {id} ");
    let line = p.expect_prefix(&head, STEP);
    line[head.len()..].to_string()
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Info {
    id: u32,
    state: String,
    ead: bool,
    inflight: usize,
}

/// The `workers` answer, parsed.
fn workers(p: &mut Probe) -> Vec<Info> {
    let line = p.workers();
    line.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            let f: Vec<&str> = s.trim().split(':').collect();
            assert_eq!(f.len(), 4, "bad workers entry {s:?} in {line:?}");
            Info {
                id: f[0].parse().unwrap(),
                state: f[1].to_string(),
                ead: f[2] == "true",
                inflight: f[3].parse().unwrap(),
            }
        })
        .collect()
}

/// Polls `workers` until `ok` holds, for at most `within`.
fn wait_workers(p: &mut Probe, within: Duration, ok: impl Fn(&[Info]) -> bool) -> Vec<Info> {
    let end = Instant::now() + within;
    loop {
        let w = workers(p);
        if ok(&w) {
            return w;
        }
        if Instant::now() >= end {
            p.fail(&format!("workers never got there: {w:?}"));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The primary's open fd count.
fn fds(p: &mut Probe) -> usize {
    p.fds()
}

/// The primary's listening addresses.
fn addresses(p: &mut Probe) -> Vec<String> {
    p.cmd("addresses");
    let line = p.expect_prefix("addresses", STEP);
    line["addresses".len()..]
        .trim()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// `send <id> echo <word>` answered by `echo:<word>`: the worker is alive
/// and its loop runs.
fn assert_echo(p: &mut Probe, id: u32, word: &str) {
    p.cmd(&format!("send {id} echo {word}"));
    p.expect_line("ok send", STEP);
    assert_eq!(message(p, id, "echo:"), word);
}

/// `disconnect_all`, then every listed worker's exit; returns the exit
/// lines by id.
fn disconnect_all(p: &mut Probe, ids: &[u32]) -> BTreeMap<u32, String> {
    p.cmd("disconnect_all 5000");
    p.expect_line("ok disconnect_all", STEP);
    ids.iter().map(|&id| (id, exit_of(p, id))).collect()
}

// ---------------------------------------------------------------------------
// Helpers over clients
// ---------------------------------------------------------------------------

fn sockaddr(addr: &str) -> SocketAddr {
    addr.parse()
        .unwrap_or_else(|_| panic!("not a TCP address: {addr:?}"))
}

fn port_of(addr: &str) -> u16 {
    sockaddr(addr).port()
}

/// Connects, reads to EOF; the answer as text.
fn ask(addr: SocketAddr) -> io::Result<String> {
    read_answer(TcpStream::connect_timeout(&addr, CLIENT)?)
}

/// Reads a connected client to EOF.
fn read_answer(mut s: TcpStream) -> io::Result<String> {
    s.set_read_timeout(Some(CLIENT))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Connects now and reads the answer in a thread: the connection is in the
/// listen backlog, in order, when this returns.
fn ask_later(addr: SocketAddr) -> thread::JoinHandle<io::Result<String>> {
    let s = TcpStream::connect_timeout(&addr, CLIENT)
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    thread::spawn(move || read_answer(s))
}

/// The worker id of a `worker <id>\n` answer.
fn worker_of(answer: &str) -> Option<u32> {
    answer.strip_prefix("worker ")?.trim_end().parse().ok()
}

/// Connects and expects a `worker <id>` answer; returns the id.
fn answered(addr: SocketAddr) -> u32 {
    let a = ask(addr).unwrap_or_else(|e| panic!("connection to {addr}: {e}"));
    worker_of(&a).unwrap_or_else(|| panic!("{addr} answered {a:?}, not `worker <id>`"))
}

/// Connects and reads the first line only: the connection stays open.
fn hold_line(addr: SocketAddr) -> (TcpStream, String) {
    let s = TcpStream::connect_timeout(&addr, CLIENT)
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    let line = read_line(&s).unwrap_or_else(|e| panic!("line from {addr}: {e}"));
    (s, line)
}

/// Reads up to a newline (or EOF), within the stream's read timeout
/// (`CLIENT` unless set).
fn read_line(mut s: &TcpStream) -> io::Result<String> {
    if s.read_timeout()?.is_none() {
        s.set_read_timeout(Some(CLIENT))?;
    }
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b)? == 1 {
        out.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// `send <id> open` → (`worker.open_connections()`, each listener's count).
fn open_of(p: &mut Probe, id: u32) -> String {
    p.cmd(&format!("send {id} open"));
    p.expect_line("ok send", STEP);
    message(p, id, "open:")
}

/// Asserts that nothing listens on `addr` any more.
fn assert_refused(addr: SocketAddr) {
    match TcpStream::connect_timeout(&addr, CLIENT) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
        Err(e) => panic!("connect to {addr}: {e}, expected ConnectionRefused"),
        Ok(mut s) => {
            s.set_read_timeout(Some(CLIENT)).unwrap();
            let mut out = String::new();
            let r = s.read_to_string(&mut out);
            panic!("{addr} still accepts connections after close ({r:?}, {out:?})");
        }
    }
}

/// `n` sequential connections from each of `threads` threads; the answers
/// counted by worker id (failures under `None`).
fn hammer(addr: SocketAddr, threads: usize, n: usize) -> BTreeMap<Option<u32>, usize> {
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            thread::spawn(move || {
                let mut counts: BTreeMap<Option<u32>, usize> = BTreeMap::new();
                for _ in 0..n {
                    let who = ask(addr).ok().as_deref().and_then(worker_of);
                    *counts.entry(who).or_default() += 1;
                }
                counts
            })
        })
        .collect();
    let mut all = BTreeMap::new();
    for h in handles {
        for (k, v) in h.join().unwrap() {
            *all.entry(k).or_default() += v;
        }
    }
    all
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "syncluster-listening-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ipv6_available() -> bool {
    TcpListener::bind("[::1]:0").is_ok()
}

/// The effective uid of this process, from /proc/self/status.
fn uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .expect("Uid line in /proc/self/status")
}

macro_rules! both_policies {
    ($scenario:ident: $rr:ident, $shared:ident) => {
        #[test]
        fn $rr() {
            $scenario(Pol::Rr);
        }
        #[test]
        fn $shared() {
            $scenario(Pol::Shared);
        }
    };
}

// ---------------------------------------------------------------------------
// test-cluster-listening-port
// ---------------------------------------------------------------------------

/// Port 0 is one real port shared by the workers: both `listening` events
/// name the same non-zero port, and a connection to it is answered.
fn listening_port(pol: Pol) {
    let mut p = start(pol);
    let (a, addr_a) = fork_listening(&mut p, "PROBE_ADDR=127.0.0.1:0", 1);
    let (b, addr_b) = fork_listening(&mut p, "PROBE_ADDR=127.0.0.1:0", 1);
    assert_eq!(addr_a, addr_b, "workers {a} and {b} got different ports");
    let addr = sockaddr(&addr_a[0]);
    assert_ne!(addr.port(), 0, "port 0 was not resolved");
    assert_eq!(addresses(&mut p), addr_a, "the primary has one handle");
    let who = answered(addr);
    assert!(who == a || who == b, "answered by unknown worker {who}");
}

both_policies!(listening_port: listening_port_is_shared_and_real_rr, listening_port_is_shared_and_real_shared);

// ---------------------------------------------------------------------------
// test-cluster-disconnect
// ---------------------------------------------------------------------------

/// 8 workers × 2 listeners on port 0 give exactly two ports; both answer;
/// `disconnect_all` ends every worker and closes both ports. Twice.
fn disconnect(pol: Pol) {
    let mut p = start(pol);
    for round in 0..2 {
        let mut ids = Vec::new();
        let mut ports = BTreeSet::new();
        for _ in 0..8 {
            let id = fork(
                &mut p,
                "PROBE_MODE=listen PROBE_ADDR=127.0.0.1:0,127.0.0.1:0",
            );
            ids.push(id);
        }
        for &id in &ids {
            for _ in 0..2 {
                ports.insert(listening_event(&mut p, id));
            }
        }
        assert_eq!(ports.len(), 2, "round {round}: ports {ports:?}");
        let mut listed = addresses(&mut p);
        listed.sort();
        assert_eq!(listed, ports.iter().cloned().collect::<Vec<_>>());
        for a in &ports {
            let who = answered(sockaddr(a));
            assert!(ids.contains(&who), "round {round}: {a} answered by {who}");
        }
        let exits = disconnect_all(&mut p, &ids);
        for (id, e) in &exits {
            assert_eq!(e, "code=0 ead=true", "round {round}: worker {id}");
        }
        for a in &ports {
            assert_refused(sockaddr(a));
        }
        assert_eq!(addresses(&mut p), Vec::<String>::new());
        assert_eq!(workers(&mut p), vec![], "round {round}");
    }
}

/// Round robin: connections the primary holds (in flight, queued, or still
/// in the kernel backlog) when `disconnect_all` comes are all served before
/// the workers exit; only then do the ports refuse.
#[test]
fn disconnect_all_serves_the_connections_already_made_rr() {
    const CLIENTS: usize = 12;
    let mut p = start(Pol::Rr);
    // Per worker: one taken, one in flight; two queued in the primary; the
    // other six wait in the kernel backlog.
    set(&mut p, "window 1");
    set(&mut p, "queue 2");
    let (a, addrs) = fork_listening(&mut p, "PROBE_ADDR=127.0.0.1:0 PROBE_SLOW_MS=100", 1);
    let (b, _) = fork_listening(&mut p, "PROBE_ADDR=127.0.0.1:0 PROBE_SLOW_MS=100", 1);
    let addr = sockaddr(&addrs[0]);
    let clients: Vec<_> = (0..CLIENTS).map(|_| ask_later(addr)).collect();
    wait_workers(&mut p, STEP, |w| w.iter().all(|i| i.inflight == 1));
    let exits = disconnect_all(&mut p, &[a, b]);
    assert_eq!(exits[&a], "code=0 ead=true");
    assert_eq!(exits[&b], "code=0 ead=true");
    let mut by: BTreeMap<Option<u32>, usize> = BTreeMap::new();
    for c in clients {
        let who = c.join().unwrap().ok().as_deref().and_then(worker_of);
        *by.entry(who).or_default() += 1;
    }
    assert_eq!(by.get(&None), None, "lost at disconnect_all: {by:?}");
    let served: usize = [a, b]
        .iter()
        .map(|&id| message(&mut p, id, "served:").parse::<usize>().unwrap())
        .sum();
    assert_eq!(served, CLIENTS);
    assert_refused(addr);
}

both_policies!(disconnect: disconnect_all_closes_every_port_twice_rr, disconnect_all_closes_every_port_twice_shared);

// ---------------------------------------------------------------------------
// test-cluster-net-listen-ipv6only-false
// ---------------------------------------------------------------------------

/// `[::]:0` is dual-stack: three workers share one port and an IPv4 client
/// reaches it.
fn ipv6only_false(pol: Pol) {
    if !ipv6_available() {
        eprintln!("skipped: no IPv6 here");
        return;
    }
    let mut p = start(pol);
    let mut ports = BTreeSet::new();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (id, a) = fork_listening(&mut p, "PROBE_ADDR=[::]:0", 1);
        ids.push(id);
        ports.insert(port_of(&a[0]));
    }
    assert_eq!(ports.len(), 1, "three workers, ports {ports:?}");
    let port = *ports.iter().next().unwrap();
    assert_ne!(port, 0);
    let v4 = answered(SocketAddr::from(([127, 0, 0, 1], port)));
    assert!(ids.contains(&v4));
    let v6 = answered(SocketAddr::from(([0u16, 0, 0, 0, 0, 0, 0, 1], port)));
    assert!(ids.contains(&v6));
}

both_policies!(ipv6only_false: ipv6_any_address_also_accepts_ipv4_rr, ipv6_any_address_also_accepts_ipv4_shared);

// ---------------------------------------------------------------------------
// test-cluster-http-pipe
// ---------------------------------------------------------------------------

/// A Unix socket path: the worker listens on it, a client gets its id, and
/// the socket file is gone after `disconnect_all`.
fn http_pipe(pol: Pol) {
    let dir = TempDir::new(&format!("pipe-{}", pol.name()));
    let sock = dir.path().join("cluster.sock");
    let mut p = start(pol);
    let (id, addrs) = fork_listening(&mut p, &format!("PROBE_ADDR={}", sock.display()), 1);
    assert_eq!(addrs, vec![sock.display().to_string()]);
    assert!(sock.exists(), "{} was not created", sock.display());
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(CLIENT)).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert_eq!(out, format!("worker {id}\n"));
    drop(s);
    let exits = disconnect_all(&mut p, &[id]);
    assert_eq!(exits[&id], "code=0 ead=true");
    assert!(
        !sock.exists(),
        "{} is still there after disconnect_all",
        sock.display()
    );
}

/// A path that already exists (a stale socket, or any file) is
/// "address in use", as in Node, and the primary leaves the file alone.
fn pipe_path_exists(pol: Pol) {
    let dir = TempDir::new(&format!("pipe-exists-{}", pol.name()));
    let sock = dir.path().join("stale.sock");
    std::fs::write(&sock, b"not ours").unwrap();
    let mut p = start(pol);
    let id = fork(
        &mut p,
        &format!("PROBE_MODE=listen PROBE_ADDR={}", sock.display()),
    );
    let err = message(&mut p, id, "listen-error:");
    let (_kind, msg) = listen_error(&err, &sock.display().to_string());
    assert!(msg.contains("(os error 98)"), "{msg:?}");
    assert_echo(&mut p, id, "goes-on");
    assert_eq!(std::fs::read(&sock).unwrap(), b"not ours");
}

both_policies!(pipe_path_exists: unix_socket_path_that_exists_is_addr_in_use_rr, unix_socket_path_that_exists_is_addr_in_use_shared);

both_policies!(http_pipe: unix_socket_path_is_served_and_removed_rr, unix_socket_path_is_served_and_removed_shared);

// ---------------------------------------------------------------------------
// test-cluster-eaddrinuse / test-cluster-bind-twice / test-cluster-bind-privileged-port
// ---------------------------------------------------------------------------

/// Splits a `listen-error:` text into the `io::ErrorKind` name and the
/// message, after checking that it is about `addr` and that the message
/// names the address.
fn listen_error(text: &str, addr: &str) -> (String, String) {
    let rest = text
        .strip_prefix(&format!("{addr}:"))
        .unwrap_or_else(|| panic!("listen error {text:?} is not about {addr}"));
    let (kind, msg) = rest
        .split_once(':')
        .unwrap_or_else(|| panic!("listen error {text:?} has no kind"));
    assert!(
        msg.contains(addr),
        "listen error message {msg:?} does not name {addr}"
    );
    (kind.to_string(), msg.to_string())
}

/// A port held by a std listener in the test: the worker's listen fails,
/// naming the address, and the worker goes on. Returns (kind, message).
fn eaddrinuse(pol: Pol) -> (String, String) {
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let mut p = start(pol);
    let id = fork(&mut p, &format!("PROBE_MODE=listen PROBE_ADDR={addr}"));
    let err = message(&mut p, id, "listen-error:");
    let (kind, msg) = listen_error(&err, &addr);
    assert!(
        msg.contains("Address already in use (os error 98)"),
        "{msg:?}"
    );
    assert_echo(&mut p, id, "still-here");
    let w = workers(&mut p);
    assert_eq!(w.len(), 1);
    assert_eq!(w[0].state, "online", "a failed listen is not listening");
    assert_eq!(addresses(&mut p), Vec::<String>::new(), "no handle is left");
    // The holder still owns the port.
    let c = TcpStream::connect_timeout(&held.local_addr().unwrap(), CLIENT).unwrap();
    let (s, _) = held.accept().unwrap();
    drop((c, s));
    (kind, msg)
}

fn eaddrinuse_named(pol: Pol) {
    eaddrinuse(pol);
}

both_policies!(eaddrinuse_named: port_in_use_is_a_named_error_and_the_worker_goes_on_rr, port_in_use_is_a_named_error_and_the_worker_goes_on_shared);

fn eaddrinuse_kind(pol: Pol) {
    let (kind, msg) = eaddrinuse(pol);
    assert_eq!(kind, "AddrInUse", "{msg}");
}

#[test]
fn listen_error_keeps_its_kind_addr_in_use_rr() {
    eaddrinuse_kind(Pol::Rr);
}

#[test]
fn listen_error_keeps_its_kind_addr_in_use_shared() {
    eaddrinuse_kind(Pol::Shared);
}

/// Two clusters on one port: the second one's worker gets "address in
/// use", the first goes on serving.
fn bind_twice(pol: Pol) {
    let mut first = start(pol);
    let (a, addrs) = fork_listening(&mut first, "PROBE_ADDR=127.0.0.1:0", 1);
    let addr = addrs[0].clone();
    let mut second = start(pol);
    let b = fork(&mut second, &format!("PROBE_MODE=listen PROBE_ADDR={addr}"));
    let err = message(&mut second, b, "listen-error:");
    let (_kind, msg) = listen_error(&err, &addr);
    assert!(
        msg.contains("Address already in use (os error 98)"),
        "{msg:?}"
    );
    assert_echo(&mut second, b, "second");
    assert_eq!(answered(sockaddr(&addr)), a);
}

both_policies!(bind_twice: second_cluster_on_the_same_port_gets_addr_in_use_rr, second_cluster_on_the_same_port_gets_addr_in_use_shared);

/// True when every directory above `path` and `path` itself can be
/// searched/executed by anyone (so an unprivileged uid can exec it).
fn world_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.ancestors().all(|p| {
        p.as_os_str().is_empty()
            || std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o001 != 0)
    })
}

/// `127.0.0.1:42` without privileges: the primary's bind fails with
/// EACCES, named, and the worker goes on. As root, the probe runs as
/// `nobody` (uid and gid 65534, no supplementary groups). `None` when it
/// cannot run here.
fn privileged_port(pol: Pol) -> Option<(String, String)> {
    let start_port = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(1024);
    if start_port <= 42 {
        eprintln!("skipped: ip_unprivileged_port_start is {start_port}");
        return None;
    }
    let mut p = if uid() == 0 {
        if !world_executable(&probe_path()) {
            eprintln!(
                "skipped: root, and nobody may not run {}",
                probe_path().display()
            );
            return None;
        }
        Probe::start_with(|c| {
            use std::os::unix::process::CommandExt;
            // std drops the supplementary groups too when root sets a uid.
            c.uid(65534).gid(65534).current_dir("/");
        })
    } else {
        Probe::spawn()
    };
    set(&mut p, &format!("policy {}", pol.name()));
    let id = fork(&mut p, "PROBE_MODE=listen PROBE_ADDR=127.0.0.1:42");
    let err = message(&mut p, id, "listen-error:");
    let (kind, msg) = listen_error(&err, "127.0.0.1:42");
    assert!(msg.contains("Permission denied (os error 13)"), "{msg:?}");
    assert_echo(&mut p, id, "unprivileged");
    assert_eq!(addresses(&mut p), Vec::<String>::new(), "no handle is left");
    Some((kind, msg))
}

fn privileged_named(pol: Pol) {
    privileged_port(pol);
}

both_policies!(privileged_named: privileged_port_is_permission_denied_rr, privileged_port_is_permission_denied_shared);

#[test]
fn listen_error_keeps_its_kind_permission_denied() {
    if let Some((kind, msg)) = privileged_port(Pol::Rr) {
        assert_eq!(kind, "PermissionDenied", "{msg}");
    }
}

// ---------------------------------------------------------------------------
// test-cluster-worker-handle-close
// ---------------------------------------------------------------------------

/// One worker closes its listener; the other serves every later connection.
fn handle_close(pol: Pol) {
    let mut p = start(pol);
    let (a, addrs) = fork_listening(&mut p, "PROBE_ADDR=127.0.0.1:0", 1);
    let (b, _) = fork_listening(&mut p, "PROBE_ADDR=127.0.0.1:0", 1);
    let addr = sockaddr(&addrs[0]);
    p.cmd(&format!("send {a} close"));
    p.expect_line("ok send", STEP);
    message(&mut p, a, "closed");
    for i in 0..20 {
        assert_eq!(answered(addr), b, "connection {i} after worker {a} closed");
    }
    assert_echo(&mut p, a, "closed-but-alive");
}

both_policies!(handle_close: closed_listener_leaves_the_other_worker_serving_rr, closed_listener_leaves_the_other_worker_serving_shared);

/// Round robin: a connection in flight to a worker that closes its listener
/// goes to the other worker, not lost.
fn handle_close_in_flight(window: usize) {
    let mut p = start(Pol::Rr);
    set(&mut p, &format!("window {window}"));
    // Worker a is slow: it sleeps 3 s on its first connection, so the next one
    // handed to it stays in flight.
    let (a, addrs) = fork_listening(&mut p, "PROBE_ADDR=127.0.0.1:0 PROBE_SLOW_MS=3000", 1);
    let (b, _) = fork_listening(&mut p, "PROBE_ADDR=127.0.0.1:0", 1);
    let addr = sockaddr(&addrs[0]);
    // First connection: to a (first in turn), which sleeps on it.
    let t0 = Instant::now();
    let first = ask_later(addr);
    // Second: b answers at once, which shows the first went to a.
    assert_eq!(answered(addr), b);
    // Once a has taken the first (and sleeps on it), a has room again even
    // with a window of 1.
    wait_workers(&mut p, STEP, |w| {
        w.iter().any(|i| i.id == a && i.inflight == 0)
    });
    // Third: a's turn; it stays in flight while a sleeps.
    let third = ask_later(addr);
    let w = wait_workers(&mut p, STEP, |w| {
        w.iter().any(|i| i.id == a && i.inflight == 1)
    });
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "too slow to set up the race ({:?}, {w:?})",
        t0.elapsed()
    );
    p.cmd(&format!("send {a} close"));
    p.expect_line("ok send", STEP);
    message(&mut p, a, "closed");
    let third = third.join().unwrap().expect("the in-flight connection");
    assert_eq!(
        worker_of(&third),
        Some(b),
        "the connection in flight to {a} was not re-routed to {b}: {third:?}"
    );
    let first = first.join().unwrap().expect("the first connection");
    assert_eq!(worker_of(&first), Some(a), "{first:?}");
    for _ in 0..5 {
        assert_eq!(answered(addr), b);
    }
    wait_workers(&mut p, STEP, |w| w.iter().all(|i| i.inflight == 0));
}

#[test]
fn connection_in_flight_to_a_closing_worker_is_rerouted_window_4() {
    handle_close_in_flight(4);
}

#[test]
fn connection_in_flight_to_a_closing_worker_is_rerouted_window_1() {
    handle_close_in_flight(1);
}

// ---------------------------------------------------------------------------
// test-cluster-server-restart-rr
// ---------------------------------------------------------------------------

/// `close` then `relisten`: alone on its port, the worker gets a new port
/// (the handle died with the last listener) and serves it; next to another
/// worker, it gets the same handle and port back and serves again.
fn server_restart(pol: Pol) {
    let mut p = start(pol);
    // Alone.
    let (a, addrs) = fork_listening(&mut p, "PROBE_ADDR=127.0.0.1:0", 1);
    let old = sockaddr(&addrs[0]);
    assert_eq!(answered(old), a);
    p.cmd(&format!("send {a} close"));
    p.expect_line("ok send", STEP);
    message(&mut p, a, "closed");
    assert_eq!(addresses(&mut p), Vec::<String>::new());
    assert_refused(old);
    p.cmd(&format!("send {a} relisten"));
    p.expect_line("ok send", STEP);
    let new = listening_event(&mut p, a);
    assert_eq!(message(&mut p, a, "listening:"), new);
    assert_eq!(answered(sockaddr(&new)), a);

    // Next to another worker: the handle stays, so does the port.
    let (b, addrs_b) = fork_listening(&mut p, "PROBE_ADDR=127.0.0.1:0", 1);
    assert_eq!(addrs_b, vec![new.clone()]);
    p.cmd(&format!("send {a} close"));
    p.expect_line("ok send", STEP);
    message(&mut p, a, "closed");
    let addr = sockaddr(&new);
    assert_eq!(answered(addr), b);
    p.cmd(&format!("send {a} relisten"));
    p.expect_line("ok send", STEP);
    assert_eq!(listening_event(&mut p, a), new, "same handle, same port");
    assert_eq!(message(&mut p, a, "listening:"), new);
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        seen.insert(answered(addr));
        if seen.len() == 2 {
            break;
        }
    }
    if pol == Pol::Rr {
        assert_eq!(
            seen,
            BTreeSet::from([a, b]),
            "round robin includes the worker again"
        );
    }
}

both_policies!(server_restart: close_then_relisten_serves_again_rr, close_then_relisten_serves_again_shared);

// ---------------------------------------------------------------------------
// Beyond Node: a worker killed with connections queued and in flight
// ---------------------------------------------------------------------------

/// Three slow workers; 20 concurrent clients pile up in the workers'
/// windows and the primary's queue; one worker is SIGKILLed. Only the
/// connection it was sleeping on may be lost.
fn killed_worker(pol: Pol, window: usize) {
    const CLIENTS: usize = 20;
    let mut p = start(pol);
    set(&mut p, &format!("window {window}"));
    let mut ids = Vec::new();
    let mut addr = None;
    for _ in 0..3 {
        let (id, a) = fork_listening(&mut p, "PROBE_ADDR=127.0.0.1:0 PROBE_SLOW_MS=200", 1);
        ids.push(id);
        addr = Some(sockaddr(&a[0]));
    }
    let addr = addr.unwrap();
    let victim = ids[0];
    let connected = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let connected = connected.clone();
            thread::spawn(move || -> Result<String, String> {
                let mut s = TcpStream::connect_timeout(&addr, CLIENT).map_err(|e| e.to_string())?;
                connected.fetch_add(1, Ordering::SeqCst);
                s.set_read_timeout(Some(Duration::from_secs(20)))
                    .map_err(|e| e.to_string())?;
                let mut out = String::new();
                match s.read_to_string(&mut out) {
                    Ok(_) => Ok(out),
                    Err(e) => Err(format!("{e} after {out:?}")),
                }
            })
        })
        .collect();
    let end = Instant::now() + STEP;
    while connected.load(Ordering::SeqCst) < CLIENTS {
        assert!(Instant::now() < end, "clients could not connect");
        thread::sleep(Duration::from_millis(5));
    }
    let before = if pol == Pol::Rr {
        // Wait until the victim holds connections in flight.
        wait_workers(&mut p, STEP, |w| {
            w.iter()
                .any(|i| i.id == victim && i.inflight >= window.min(2))
        })
    } else {
        thread::sleep(Duration::from_millis(100));
        workers(&mut p)
    };
    p.cmd(&format!("kill {victim} 9"));
    p.expect_line("ok kill", STEP);
    let e = exit_of(&mut p, victim);
    assert!(e.starts_with("signal=9 "), "{e}");
    let mut by: BTreeMap<u32, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    for c in clients {
        match c.join().unwrap() {
            Ok(out) => match worker_of(&out) {
                Some(w) => *by.entry(w).or_default() += 1,
                None => failures.push(format!("answer {out:?}")),
            },
            Err(e) => failures.push(e),
        }
    }
    let report = format!(
        "{} window {window}: {CLIENTS} clients, answered by worker {by:?}, \
         failed {} {failures:?}; workers at the kill: {before:?}",
        pol.name(),
        failures.len()
    );
    eprintln!("{report}");
    assert!(failures.len() <= 1, "{report}");
    assert_eq!(
        by.values().sum::<usize>() + failures.len(),
        CLIENTS,
        "{report}"
    );
    let after = wait_workers(&mut p, STEP, |w| w.iter().all(|i| i.inflight == 0));
    assert_eq!(after.len(), 2, "{after:?}");
    p.expect_none("error ", Duration::from_millis(50));
}

#[test]
fn worker_killed_with_connections_queued_and_in_flight_loses_none_rr_window_4() {
    killed_worker(Pol::Rr, 4);
}

#[test]
fn worker_killed_with_connections_queued_and_in_flight_loses_none_rr_window_1() {
    killed_worker(Pol::Rr, 1);
}

#[test]
fn worker_killed_with_connections_queued_and_in_flight_loses_none_shared() {
    killed_worker(Pol::Shared, 4);
}

// ---------------------------------------------------------------------------
// Beyond Node: fd count and fairness over many connections
// ---------------------------------------------------------------------------

#[test]
fn twenty_thousand_rr_connections_leave_primary_fd_count_unchanged() {
    const THREADS: usize = 4;
    const TOTAL: usize = 20_000;
    let mut p = start(Pol::Rr);
    let (a, addrs) = fork_listening(&mut p, "PROBE_ADDR=127.0.0.1:0", 1);
    let (b, _) = fork_listening(&mut p, "PROBE_ADDR=127.0.0.1:0", 1);
    let addr = sockaddr(&addrs[0]);
    let warm = hammer(addr, THREADS, 50);
    assert_eq!(warm.get(&None), None, "warm-up failures: {warm:?}");
    wait_workers(&mut p, STEP, |w| w.iter().all(|i| i.inflight == 0));
    let before = fds(&mut p);
    let t0 = Instant::now();
    let counts = hammer(addr, THREADS, TOTAL / THREADS);
    let took = t0.elapsed();
    wait_workers(&mut p, STEP, |w| w.iter().all(|i| i.inflight == 0));
    let after = fds(&mut p);
    eprintln!("{TOTAL} connections in {took:?}: {counts:?}; primary fds {before} -> {after}");
    assert_eq!(counts.get(&None), None, "failed connections: {counts:?}");
    assert_eq!(
        counts.get(&Some(a)).copied().unwrap_or(0) + counts.get(&Some(b)).copied().unwrap_or(0),
        TOTAL,
        "{counts:?}"
    );
    assert_eq!(after, before, "the primary's fd count moved");
}

#[test]
fn rr_is_fair_over_ten_thousand_sequential_connections() {
    const TOTAL: usize = 10_000;
    let mut p = start(Pol::Rr);
    let mut ids = Vec::new();
    let mut addr = None;
    for _ in 0..4 {
        let (id, a) = fork_listening(&mut p, "PROBE_ADDR=127.0.0.1:0", 1);
        ids.push(id);
        addr = Some(sockaddr(&a[0]));
    }
    let counts = hammer(addr.unwrap(), 1, TOTAL);
    eprintln!("rr fairness over {TOTAL} sequential connections: {counts:?}");
    assert_eq!(counts.get(&None), None, "failed connections: {counts:?}");
    let per: Vec<usize> = ids
        .iter()
        .map(|id| counts.get(&Some(*id)).copied().unwrap_or(0))
        .collect();
    assert_eq!(per.iter().sum::<usize>(), TOTAL, "{counts:?}");
    let (min, max) = (*per.iter().min().unwrap(), *per.iter().max().unwrap());
    assert!(
        max as f64 <= 1.05 * min as f64,
        "busiest {max} > 1.05 × idlest {min}: {counts:?}"
    );
}

// ---------------------------------------------------------------------------
// Beyond Node: connections every worker rejects
// ---------------------------------------------------------------------------

/// Writes a wrapper that runs the probe with `RLIMIT_NOFILE` at 6: fds 0-2,
/// the channel (3), the worker's epoll (4) and its listener's pipe (5) fill
/// it, so the worker has no fd free to take a connection into, reads none
/// (it would be lost in transit: `MSG_CTRUNC`) and refuses them. Returns
/// the wrapper's path.
fn fd_starved_wrapper(dir: &TempDir) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let probe = probe_path();
    let wrap = dir.path().join("starved.sh");
    std::fs::write(
        &wrap,
        format!(
            "#!/bin/sh\nulimit -n 6\nexec '{}' \"$@\"\n",
            probe.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrap, std::fs::Permissions::from_mode(0o755)).unwrap();
    wrap
}

/// Both workers are out of fds, so both reject every connection: the
/// primary closes each one once (the client sees EOF at once, no
/// ping-pong), holds nothing afterwards, and both workers go on.
#[test]
fn every_worker_rejecting_closes_the_connection_once() {
    let dir = TempDir::new("reject-all");
    let wrap = fd_starved_wrapper(&dir);
    let mut p = start(Pol::Rr);
    set(&mut p, &format!("exec {}", wrap.display()));
    let (a, addrs) = fork_listening(&mut p, "PROBE_ADDR=127.0.0.1:0", 1);
    let (b, _) = fork_listening(&mut p, "PROBE_ADDR=127.0.0.1:0", 1);
    let addr = sockaddr(&addrs[0]);
    let before = fds(&mut p);
    for i in 0..10 {
        let t0 = Instant::now();
        let out = ask(addr).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(
            out, "",
            "connection {i} was served while every worker rejects"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "connection {i} took {:?} to be closed",
            t0.elapsed()
        );
    }
    wait_workers(&mut p, STEP, |w| {
        w.len() == 2 && w.iter().all(|i| i.inflight == 0)
    });
    assert_eq!(fds(&mut p), before, "the primary kept rejected connections");
    p.expect_none("error ", Duration::from_millis(50));
    assert_echo(&mut p, a, "alive-a");
    assert_echo(&mut p, b, "alive-b");
    let exits = disconnect_all(&mut p, &[a, b]);
    assert_eq!(exits[&a], "code=0 ead=true");
    assert_eq!(exits[&b], "code=0 ead=true");
    assert_eq!(message(&mut p, a, "served:"), "0");
    assert_eq!(message(&mut p, b, "served:"), "0");
}

/// One worker out of fds rejects everything: each connection it rejects is
/// handed to the other worker, which serves all of them.
#[test]
fn connections_one_worker_rejects_are_served_by_the_other() {
    let dir = TempDir::new("reject-one");
    let wrap = fd_starved_wrapper(&dir);
    let mut p = start(Pol::Rr);
    let (good, addrs) = fork_listening(&mut p, "PROBE_ADDR=127.0.0.1:0", 1);
    set(&mut p, &format!("exec {}", wrap.display()));
    let (starved, _) = fork_listening(&mut p, "PROBE_ADDR=127.0.0.1:0", 1);
    let addr = sockaddr(&addrs[0]);
    for i in 0..20 {
        assert_eq!(answered(addr), good, "connection {i}");
    }
    let w = wait_workers(&mut p, STEP, |w| w.iter().all(|i| i.inflight == 0));
    assert!(w.iter().any(|i| i.id == starved), "{w:?}");
    assert_echo(&mut p, starved, "alive");
    let exits = disconnect_all(&mut p, &[good, starved]);
    assert_eq!(exits[&starved], "code=0 ead=true");
    assert_eq!(message(&mut p, good, "served:"), "20");
    assert_eq!(message(&mut p, starved, "served:"), "0");
}

// ---------------------------------------------------------------------------
// Node's server.maxConnections (test-net-server-drop-connection, in a cluster)
// ---------------------------------------------------------------------------

/// Worker a (cap 1) holds one connection open: every new connection goes to
/// worker b and is served, a's open count stays 1; once a drops its
/// connection, its count is 0 again.
fn max_connections(pol: Pol) {
    let mut p = start(pol);
    let capped = "PROBE_ADDR=127.0.0.1:0 PROBE_MAX_CONN=1 PROBE_HOLD=1";
    let (a, addrs) = fork_listening(&mut p, capped, 1);
    let addr = sockaddr(&addrs[0]);
    // Alone, a takes the first connection, and holds it.
    let (_held, line) = hold_line(addr);
    assert_eq!(worker_of(&line), Some(a), "{line:?}");
    let (b, _) = fork_listening(&mut p, "PROBE_ADDR=127.0.0.1:0", 1);
    assert_eq!(open_of(&mut p, a), "1:1");
    for i in 0..20 {
        assert_eq!(answered(addr), b, "connection {i} while {a} is at its cap");
    }
    assert_eq!(open_of(&mut p, a), "1:1");
    assert_eq!(open_of(&mut p, b), "0:0", "b closes what it serves");
    p.cmd(&format!("send {a} release"));
    p.expect_line("ok send", STEP);
    assert_eq!(message(&mut p, a, "released:"), "1");
    assert_eq!(open_of(&mut p, a), "0:0");
    wait_workers(&mut p, STEP, |w| w.iter().all(|i| i.inflight == 0));
    p.expect_none("error ", Duration::from_millis(50));
    let exits = disconnect_all(&mut p, &[a, b]);
    assert_eq!(exits[&a], "code=0 ead=true");
    assert_eq!(exits[&b], "code=0 ead=true");
    assert_eq!(message(&mut p, a, "served:"), "1");
    assert_eq!(message(&mut p, b, "served:"), "20");
}

both_policies!(max_connections: connections_go_to_the_worker_below_its_cap_rr, connections_go_to_the_worker_below_its_cap_shared);

/// Both workers at their cap (1, each holding a connection). Round robin:
/// a new connection is rejected by both and closed once, at once, not
/// hung. Shared: it waits in the backlog, unanswered, until a worker drops
/// a connection; then that worker serves it. Either way, once a frees its
/// slot, a serves the next one.
fn every_worker_at_its_cap(pol: Pol) {
    let mut p = start(pol);
    let capped = "PROBE_ADDR=127.0.0.1:0 PROBE_MAX_CONN=1 PROBE_HOLD=1";
    let (a, addrs) = fork_listening(&mut p, capped, 1);
    let addr = sockaddr(&addrs[0]);
    let (_held_a, line) = hold_line(addr);
    assert_eq!(worker_of(&line), Some(a), "{line:?}");
    let (b, _) = fork_listening(&mut p, capped, 1);
    let (_held_b, line) = hold_line(addr);
    assert_eq!(worker_of(&line), Some(b), "{line:?}: a is at its cap");
    let waiting = match pol {
        Pol::Rr => {
            for i in 0..5 {
                let t0 = Instant::now();
                let out = ask(addr).unwrap_or_else(|e| panic!("connection {i}: {e}"));
                assert_eq!(
                    out, "",
                    "connection {i} served while every worker is at its cap"
                );
                assert!(
                    t0.elapsed() < Duration::from_secs(2),
                    "connection {i} took {:?} to be closed",
                    t0.elapsed()
                );
            }
            wait_workers(&mut p, STEP, |w| w.iter().all(|i| i.inflight == 0));
            None
        }
        Pol::Shared => {
            let s = TcpStream::connect_timeout(&addr, CLIENT).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut buf = [0u8; 16];
            match (&s).read(&mut buf) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                other => panic!("a connection past every cap was not left waiting: {other:?}"),
            }
            s.set_read_timeout(Some(CLIENT)).unwrap();
            Some(s)
        }
    };
    p.cmd(&format!("send {a} release"));
    p.expect_line("ok send", STEP);
    assert_eq!(message(&mut p, a, "released:"), "1");
    let (_held_again, line) = match waiting {
        // The waiting one, woken by the slot a freed.
        Some(s) => {
            let line = read_line(&s).unwrap();
            (s, line)
        }
        None => hold_line(addr),
    };
    assert_eq!(worker_of(&line), Some(a), "{line:?}: only a has room");
    p.expect_none("error ", Duration::from_millis(50));
    assert_echo(&mut p, a, "alive-a");
    assert_echo(&mut p, b, "alive-b");
    let exits = disconnect_all(&mut p, &[a, b]);
    assert_eq!(exits[&a], "code=0 ead=true");
    assert_eq!(exits[&b], "code=0 ead=true");
}

both_policies!(every_worker_at_its_cap: connection_past_every_cap_is_closed_once_rr, connection_past_every_cap_waits_for_a_free_slot_shared);

// ---------------------------------------------------------------------------
// A worker inside a foreign loop
// ---------------------------------------------------------------------------

/// The probe's `foreign` mode polls `worker.as_fd()` with `poll(2)` and
/// drains `try_next_event()`: the fd becomes readable for connections and
/// for messages, so everything is served and answered, and the disconnect
/// arrives the same way.
fn foreign_loop(pol: Pol) {
    let mut p = start(pol);
    let (w, addrs) = fork_in_mode(&mut p, "foreign", "PROBE_ADDR=127.0.0.1:0", 1);
    let addr = sockaddr(&addrs[0]);
    for i in 0..5 {
        assert_eq!(answered(addr), w, "connection {i}");
        assert_echo(&mut p, w, &format!("polled-{i}"));
    }
    let exits = disconnect_all(&mut p, &[w]);
    assert_eq!(exits[&w], "code=0 ead=true");
    assert_eq!(message(&mut p, w, "served:"), "5");
}

both_policies!(foreign_loop: worker_fd_drives_a_foreign_poll_loop_rr, worker_fd_drives_a_foreign_poll_loop_shared);

/// Shared, in a foreign loop: a listener at its cap is out of the worker's
/// epoll, and a stream dropped on another thread while the loop waits in
/// `poll(2)` makes the worker's fd readable again, so the connection
/// waiting in the backlog is served.
#[test]
fn worker_fd_wakes_when_a_capped_listener_frees_a_slot_shared() {
    let mut p = start(Pol::Shared);
    let env = "PROBE_ADDR=127.0.0.1:0 PROBE_MAX_CONN=1 PROBE_HOLD=1";
    let (w, addrs) = fork_in_mode(&mut p, "foreign", env, 1);
    let addr = sockaddr(&addrs[0]);
    let (_held, line) = hold_line(addr);
    assert_eq!(worker_of(&line), Some(w), "{line:?}");
    let s = TcpStream::connect_timeout(&addr, CLIENT).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(read_line(&s).is_err(), "served past the cap");
    s.set_read_timeout(Some(CLIENT)).unwrap();
    p.cmd(&format!("send {w} release-later 200"));
    p.expect_line("ok send", STEP);
    assert_eq!(message(&mut p, w, "releasing:"), "1");
    assert_eq!(worker_of(&read_line(&s).unwrap()), Some(w));
    assert_eq!(open_of(&mut p, w), "1:1");
}

/// The probe's `foreign-accept` mode: one listener in non-blocking mode,
/// `poll(2)` on `listener.as_fd()`, `accept()` until `WouldBlock`. Each
/// connection is served, `accept` names the client's address as the peer,
/// and the disconnect ends the loop with `ConnectionAborted`.
fn foreign_accept(pol: Pol) {
    let mut p = start(pol);
    let (w, addrs) = fork_in_mode(&mut p, "foreign-accept", "PROBE_ADDR=127.0.0.1:0", 1);
    let addr = sockaddr(&addrs[0]);
    for i in 0..3 {
        let s = TcpStream::connect_timeout(&addr, CLIENT).unwrap();
        let me = s.local_addr().unwrap().to_string();
        assert_eq!(
            worker_of(&read_answer(s).unwrap()),
            Some(w),
            "connection {i}"
        );
        assert_eq!(message(&mut p, w, "peer:"), me, "connection {i}");
    }
    let exits = disconnect_all(&mut p, &[w]);
    assert_eq!(exits[&w], "code=0 ead=true");
    assert_eq!(message(&mut p, w, "served:"), "3");
}

both_policies!(foreign_accept: nonblocking_accept_in_a_foreign_loop_names_the_peer_rr, nonblocking_accept_in_a_foreign_loop_names_the_peer_shared);

// ---------------------------------------------------------------------------
// Worker-initiated disconnect
// ---------------------------------------------------------------------------

/// Round robin: connections handed to a worker that it has not taken when
/// it calls `disconnect()` go back at once (rejected), and the other worker
/// serves them while the first one still lives (it sleeps 8 s after the
/// call, with its channel closed).
#[test]
fn worker_disconnect_hands_back_connections_not_taken_rr() {
    let mut p = start(Pol::Rr);
    set(&mut p, "window 4");
    let (a, addrs) = fork_listening(&mut p, "PROBE_ADDR=127.0.0.1:0", 1);
    let addr = sockaddr(&addrs[0]);
    // a is deaf for 1.5 s: the connections handed to it wait in its channel,
    // with the disconnect request behind them.
    p.cmd(&format!("send {a} sleep 1500"));
    p.expect_line("ok send", STEP);
    message(&mut p, a, "sleeping:");
    let clients: Vec<_> = (0..3).map(|_| ask_later(addr)).collect();
    wait_workers(&mut p, STEP, |w| {
        w.iter().any(|i| i.id == a && i.inflight == 3)
    });
    let (b, _) = fork_listening(&mut p, "PROBE_ADDR=127.0.0.1:0", 1);
    p.cmd(&format!("send {a} disconnect 8000"));
    p.expect_line("ok send", STEP);
    message(&mut p, a, "slept:");
    let t0 = Instant::now();
    for (i, c) in clients.into_iter().enumerate() {
        let out = c
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("client {i}: {e}"));
        assert_eq!(worker_of(&out), Some(b), "client {i}: {out:?}");
    }
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "handed back only after {:?}",
        t0.elapsed()
    );
    p.expect_line(&format!("disconnect {a}"), STEP);
    assert!(p.position(format!("exit {a} ")).is_none(), "{:?}", p.log());
    assert_eq!(answered(addr), b);
    assert_eq!(exit_of(&mut p, a), "code=0 ead=true");
}
