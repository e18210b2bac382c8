//! Node parity (issue 10 §2), each with real processes: UDP through the
//! primary (test-cluster-dgram-1), listen options (-net-listen-backlog,
//! -net-listen-ipv6only-*, -net-reuseport, -listen-pipe-readable-writable,
//! test-listen-fd-cluster, `exclusive`), Unix socket paths as Node resolves
//! them (-net-listen-relative-path), extra fds (-fork-stdio), closing the
//! channel (-worker-forced-exit) and `is_connected`/`is_dead`
//! (-worker-isconnected, -worker-isdead).
//!
//! Every scenario drives `examples/cluster_probe` through `tests/common`'s
//! `Probe`; dropping it kills the whole process tree.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{exact, pred, Probe, DEADLINE};

/// Connect and read timeout of a client.
const CLIENT: Duration = Duration::from_secs(10);

// ------------------------------------------------------------ helpers

/// `set ...` and its `ok set`.
fn set(p: &mut Probe, what: &str) {
    p.cmd(&format!("set {what}"));
    p.expect_line("ok set", DEADLINE);
}

/// Waits for `message <id> <prefix>...`; the text after the prefix, the
/// `fds=<n>` suffix removed.
fn message(p: &mut Probe, id: u32, prefix: &str) -> String {
    let head = format!("message {id} {prefix}");
    let line = p.expect(head.as_str(), DEADLINE);
    let text = &line[head.len()..];
    text.rsplit_once(" fds=")
        .map_or(text, |(t, _)| t)
        .to_string()
}

/// Waits for `listening <id> <addr>`; the address.
fn listening_event(p: &mut Probe, id: u32) -> String {
    let head = format!("listening {id} ");
    let line = p.expect(head.as_str(), DEADLINE);
    line[head.len()..].to_string()
}

/// Waits for `exit <id> ...`; the rest of the line.
fn exit_of(p: &mut Probe, id: u32) -> String {
    let head = format!("exit {id} ");
    let line = p.expect(head.as_str(), DEADLINE);
    line[head.len()..].to_string()
}

/// The primary's listening addresses.
fn addresses(p: &mut Probe) -> Vec<String> {
    let line = p.ask("addresses", "addresses");
    line["addresses".len()..]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// A `yes/no` answer of the probe: `<word> <id> <bool>`.
fn ask_bool(p: &mut Probe, word: &str, id: u32) -> bool {
    let line = p.ask(&format!("{word} {id}"), &format!("{word} {id} "));
    match line.rsplit(' ').next() {
        Some("true") => true,
        Some("false") => false,
        _ => p.fail(&format!("bad answer {line:?}")),
    }
}

/// Reads `s` to EOF within `CLIENT`.
fn read_all(mut s: impl Read) -> io::Result<String> {
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Connects to `addr` and returns the worker id its `worker <id>` names.
fn answered(addr: SocketAddr) -> u32 {
    let s = TcpStream::connect_timeout(&addr, CLIENT)
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_read_timeout(Some(CLIENT)).unwrap();
    let a = read_all(s).unwrap_or_else(|e| panic!("answer from {addr}: {e}"));
    worker_of(&a).unwrap_or_else(|| panic!("{addr} answered {a:?}"))
}

fn worker_of(answer: &str) -> Option<u32> {
    answer.strip_prefix("worker ")?.trim_end().parse().ok()
}

/// A port nothing listens on now (bound to 0 and released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p =
            std::env::temp_dir().join(format!("syncluster-parity-{}-{name}", std::process::id()));
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

// ------------------------------------------------------------ 1. UDP

/// test-cluster-dgram-1: four workers bind UDP port 0 through the primary
/// and get one shared socket; 40 datagrams sent to it are each received
/// exactly once, ten per worker (each drops its socket after ten, and the
/// others read on from the shared receive queue). UDP is shared even when
/// the policy is round robin, as in Node.
#[test]
fn udp_datagrams_to_a_shared_socket_reach_exactly_one_worker_each() {
    let mut p = Probe::start();
    set(&mut p, "policy rr");
    let mut ids = Vec::new();
    let mut ports = BTreeSet::new();
    for _ in 0..4 {
        let id = p.fork("PROBE_MODE=udp PROBE_ADDR=127.0.0.1:0 PROBE_UDP_MAX=10");
        let addr = message(&mut p, id, "udp:");
        assert_eq!(listening_event(&mut p, id), format!("udp:{addr}"));
        ports.insert(addr.parse::<SocketAddr>().unwrap().port());
        ids.push(id);
    }
    assert_eq!(
        ports.len(),
        1,
        "the workers got different sockets: {ports:?}"
    );
    let port = *ports.iter().next().unwrap();
    assert_eq!(addresses(&mut p), vec![format!("udp:127.0.0.1:{port}")]);

    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..40 {
        client
            .send_to(format!("d{i}").as_bytes(), ("127.0.0.1", port))
            .unwrap();
    }
    let mut by_worker: BTreeMap<u32, usize> = BTreeMap::new();
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..40 {
        let line = p.expect(
            pred("a dgram message", |l: &str| l.contains(" dgram:d")),
            DEADLINE,
        );
        let mut f = line.split(' ');
        let id: u32 = f.nth(1).unwrap().parse().unwrap();
        let payload = f.next().unwrap().trim_start_matches("dgram:").to_string();
        if let Some(first) = seen.insert(payload.clone(), id) {
            p.fail(&format!("{payload} reached workers {first} and {id}"));
        }
        *by_worker.entry(id).or_default() += 1;
    }
    let want: BTreeSet<String> = (0..40).map(|i| format!("d{i}")).collect();
    assert_eq!(seen.keys().cloned().collect::<BTreeSet<_>>(), want);
    for &id in &ids {
        assert_eq!(message(&mut p, id, "udp-done:"), "10");
        assert_eq!(by_worker.get(&id), Some(&10), "{by_worker:?}");
    }
    p.expect_none(" dgram:", Duration::from_millis(200));
}

/// A path is not a UDP address: `InvalidInput`, and the worker is told why.
#[test]
fn udp_bind_of_a_path_is_invalid_input() {
    let mut p = Probe::start();
    let id = p.fork("PROBE_MODE=udp PROBE_ADDR=/tmp/x.sock");
    let err = message(&mut p, id, "udp-error:");
    assert!(err.starts_with("InvalidInput:"), "{err}");
    assert!(err.contains("not a UDP address"), "{err}");
}

// ------------------------------------------------------------ 2. listen options

/// test-cluster-net-listen-backlog: the worker's backlog is the one the
/// primary's socket listens with (`ss` shows a listener's backlog as its
/// Send-Q).
#[test]
fn listen_backlog_reaches_the_primary_socket() {
    let mut p = Probe::start();
    let id = p.fork("PROBE_MODE=listen PROBE_ADDR=127.0.0.1:0 PROBE_BACKLOG=127");
    let addr = listening_event(&mut p, id);
    let port = addr.parse::<SocketAddr>().unwrap().port();
    let out = Command::new("ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output()
        .expect("`ss` (iproute2) is needed to read a listener's backlog");
    let text = String::from_utf8_lossy(&out.stdout);
    let send_q: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    assert_eq!(send_q, vec!["127"], "ss said {text:?}");
}

/// test-cluster-net-listen-ipv6only-rr/-none and -ipv6only-false: with
/// `ipv6_only` on `[::]`, two workers share one port and `0.0.0.0` on that
/// port stays free; without it the socket is dual-stack (IPv4 connects).
#[test]
fn ipv6_only_workers_share_one_port_and_leave_ipv4_free() {
    if TcpListener::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 here: skipped");
        return;
    }
    for policy in ["rr", "shared"] {
        let mut p = Probe::start();
        set(&mut p, &format!("policy {policy}"));
        let env = "PROBE_MODE=listen PROBE_ADDR=[::]:0 PROBE_LISTEN_OPTS=ipv6only";
        let a = p.fork(env);
        let first = listening_event(&mut p, a);
        let b = p.fork(env);
        assert_eq!(listening_event(&mut p, b), first, "{policy}");
        let port = first.parse::<SocketAddr>().unwrap().port();
        let v4 = TcpListener::bind(("0.0.0.0", port));
        assert!(v4.is_ok(), "{policy}: 0.0.0.0:{port} taken: {v4:?}");
        let who = answered(format!("[::1]:{port}").parse().unwrap());
        assert!(who == a || who == b, "{policy}: {who}");
        drop(v4);

        // Dual-stack by default: an IPv4 client reaches `[::]`.
        let c = p.fork("PROBE_MODE=listen PROBE_ADDR=[::]:0");
        let dual = listening_event(&mut p, c);
        let port = dual.parse::<SocketAddr>().unwrap().port();
        assert_eq!(answered(format!("127.0.0.1:{port}").parse().unwrap()), c);
    }
}

/// Options that do not fit the address are `InvalidInput`, before the
/// primary is asked.
#[test]
fn listen_options_that_do_not_fit_are_invalid_input() {
    let mut p = Probe::start();
    for (addr, opts) in [
        ("127.0.0.1:0", "ipv6only"),
        ("127.0.0.1:0", "readable"),
        ("/tmp/x.sock", "reuseport"),
        ("127.0.0.1:0", "fd=3"),
    ] {
        let id = p.fork(&format!(
            "PROBE_MODE=listen PROBE_ADDR={addr} PROBE_LISTEN_OPTS={opts}"
        ));
        let err = message(&mut p, id, &format!("listen-error:{addr}:"));
        assert!(err.starts_with("InvalidInput:"), "{opts}: {err}");
    }
    assert!(addresses(&mut p).is_empty());
}

/// `exclusive`: the worker binds its own socket; the primary has no handle
/// and reports no `listening`, another worker's exclusive listen on that
/// port is `AddrInUse`, and connections reach the first worker.
#[test]
fn exclusive_listener_is_bound_by_the_worker_itself() {
    let mut p = Probe::start();
    let a = p.fork("PROBE_MODE=listen PROBE_ADDR=127.0.0.1:0 PROBE_LISTEN_OPTS=exclusive");
    let addr = message(&mut p, a, "listening:");
    let b = p.fork(&format!(
        "PROBE_MODE=listen PROBE_ADDR={addr} PROBE_LISTEN_OPTS=exclusive"
    ));
    let err = message(&mut p, b, &format!("listen-error:{addr}:"));
    assert!(err.starts_with("AddrInUse:"), "{err}");
    for _ in 0..3 {
        assert_eq!(answered(addr.parse().unwrap()), a);
    }
    assert!(addresses(&mut p).is_empty());
    p.expect_none("listening ", Duration::from_millis(100));
}

/// test-cluster-net-reuseport: with `reuse_port` each worker binds its own
/// socket on one port (two in the same worker too); the primary is never
/// asked, and the kernel spreads connections over both workers.
#[test]
fn reuse_port_workers_bind_one_port_themselves() {
    let port = free_port();
    let env = format!(
        "PROBE_MODE=listen PROBE_ADDR=127.0.0.1:{port},127.0.0.1:{port} \
         PROBE_LISTEN_OPTS=reuseport"
    );
    let mut p = Probe::start();
    let a = p.fork(&env);
    let b = p.fork(&env);
    for id in [a, b, a, b] {
        assert_eq!(
            message(&mut p, id, "listening:"),
            format!("127.0.0.1:{port}")
        );
    }
    assert!(addresses(&mut p).is_empty());
    p.expect_none("listening ", Duration::from_millis(100));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut seen = BTreeSet::new();
    for _ in 0..64 {
        seen.insert(answered(addr));
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen, BTreeSet::from([a, b]));
}

/// The `Umask:` of a process, from /proc.
fn umask_of(pid: i32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let v = status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .expect("Umask line");
    u32::from_str_radix(v.trim(), 8).unwrap()
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// test-cluster-listen-pipe-readable-writable: `readable_all` and
/// `writable_all` add `0o444` and `0o222` to the socket file's mode, set
/// by the primary (or by the worker, `exclusive`); without them the mode
/// is what the umask leaves.
#[test]
fn unix_socket_mode_follows_readable_all_and_writable_all() {
    let dir = TempDir::new("mode");
    let mut p = Probe::start();
    let base = 0o777 & !umask_of(p.pid());
    for (name, opts, want) in [
        ("plain.sock", "", base),
        ("read.sock", "readable", base | 0o444),
        ("write.sock", "writable", base | 0o222),
        ("both.sock", "readable,writable", 0o777),
        ("own.sock", "exclusive,readable,writable", 0o777),
    ] {
        let path = dir.path().join(name);
        let id = p.fork(&format!(
            "PROBE_MODE=listen PROBE_ADDR={} PROBE_LISTEN_OPTS={opts}",
            path.display()
        ));
        assert_eq!(
            message(&mut p, id, "listening:"),
            path.display().to_string()
        );
        assert_eq!(mode_of(&path), want, "{name} ({opts})");
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(CLIENT)).unwrap();
        assert_eq!(read_all(&mut s).unwrap(), format!("worker {id}\n"));
    }
}

/// test-listen-fd-cluster: a socket the primary offered (`listen_fd`) is
/// listened on by number, in both policies, TCP and Unix; a number the
/// primary did not offer is `NotFound`.
#[test]
fn listen_fd_serves_a_socket_the_primary_offered() {
    let dir = TempDir::new("listenfd");
    for policy in ["rr", "shared"] {
        let mut p = Probe::start();
        set(&mut p, &format!("policy {policy}"));
        let line = p.ask("listenfd 127.0.0.1:0", "listenfd ");
        let (n, addr) = line["listenfd ".len()..].split_once(' ').unwrap();
        let (n, addr) = (n.to_string(), addr.to_string());
        let a = p.fork(&format!(
            "PROBE_MODE=listen PROBE_ADDR= PROBE_LISTEN_OPTS=fd={n}"
        ));
        assert_eq!(listening_event(&mut p, a), addr);
        assert_eq!(message(&mut p, a, "listening:"), addr);
        assert_eq!(answered(addr.parse().unwrap()), a, "{policy}");

        let path = dir.path().join(format!("{policy}.sock"));
        let line = p.ask(&format!("listenfd {}", path.display()), "listenfd ");
        let n2 = line.split(' ').nth(1).unwrap().to_string();
        let b = p.fork(&format!(
            "PROBE_MODE=listen PROBE_ADDR= PROBE_LISTEN_OPTS=fd={n2}"
        ));
        assert_eq!(listening_event(&mut p, b), path.display().to_string());
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(CLIENT)).unwrap();
        assert_eq!(read_all(&mut s).unwrap(), format!("worker {b}\n"));

        let c = p.fork("PROBE_MODE=listen PROBE_ADDR= PROBE_LISTEN_OPTS=fd=0");
        let err = message(&mut p, c, "listen-error::");
        assert!(err.starts_with("NotFound:"), "{err}");
        assert!(err.contains("listen_fd"), "{err}");
        // Offered sockets outlive their handles: after every worker left,
        // a new one listens on the same socket again.
        p.cmd(&format!("disconnect {a}"));
        assert_eq!(exit_of(&mut p, a), "code=0 ead=true");
        let d = p.fork(&format!(
            "PROBE_MODE=listen PROBE_ADDR= PROBE_LISTEN_OPTS=fd={n}"
        ));
        assert_eq!(listening_event(&mut p, d), addr);
        assert_eq!(answered(addr.parse().unwrap()), d, "{policy}");
    }
}

// ------------------------------------------------------------ 3. Unix socket paths

/// test-cluster-net-listen-relative-path: a worker whose cwd is deep
/// listens on a bare relative name whose absolute form is longer than a
/// `sockaddr_un` holds; the primary binds it through the directory, the
/// file is where the worker's cwd says, a second spelling of the same file
/// joins the same handle, and the file is removed once they disconnect.
#[test]
fn relative_unix_path_resolves_in_the_worker_cwd_past_sun_path() {
    let dir = TempDir::new("relative");
    let mut deep = dir.path().to_path_buf();
    while deep.as_os_str().len() < 120 {
        deep.push("a-fairly-long-directory-name");
    }
    std::fs::create_dir_all(deep.join("sub")).unwrap();
    let sock = deep.join("s.sock");
    assert!(sock.as_os_str().len() > 108);

    let mut p = Probe::start();
    set(&mut p, &format!("cwd {}", deep.display()));
    let a = p.fork("PROBE_MODE=listen PROBE_ADDR=s.sock");
    assert_eq!(listening_event(&mut p, a), sock.display().to_string());
    assert!(sock.exists(), "{} is missing", sock.display());
    let b = p.fork("PROBE_MODE=listen PROBE_ADDR=./sub//../s.sock");
    assert_eq!(listening_event(&mut p, b), sock.display().to_string());
    assert_eq!(addresses(&mut p), vec![sock.display().to_string()]);

    // Too long to connect to by name: through the directory, as bound.
    let held = std::fs::File::open(&deep).unwrap();
    let via = format!("/proc/self/fd/{}/s.sock", held.as_raw_fd());
    let mut who = BTreeSet::new();
    for _ in 0..4 {
        let mut s = UnixStream::connect(&via).unwrap();
        s.set_read_timeout(Some(CLIENT)).unwrap();
        who.insert(read_all(&mut s).unwrap());
    }
    assert_eq!(
        who,
        BTreeSet::from([format!("worker {a}\n"), format!("worker {b}\n")])
    );
    p.cmd("disconnect_all 5000");
    assert_eq!(exit_of(&mut p, a), "code=0 ead=true");
    assert_eq!(exit_of(&mut p, b), "code=0 ead=true");
    assert!(!sock.exists(), "{} was not removed", sock.display());
}

/// A path whose file name alone is too long to bind even through its
/// directory is `InvalidInput` with a message saying so, not `Other`.
#[test]
fn unix_path_too_long_to_bind_is_invalid_input() {
    let path = format!("/tmp/{}", "x".repeat(200));
    let mut p = Probe::start();
    let id = p.fork(&format!("PROBE_MODE=listen PROBE_ADDR={path}"));
    let err = message(&mut p, id, &format!("listen-error:{path}:"));
    assert!(err.starts_with("InvalidInput:"), "{err}");
    assert!(err.contains("sockaddr_un"), "{err}");
    assert!(!Path::new(&path).exists());
}

// ------------------------------------------------------------ 4. extra fds

/// test-cluster-fork-stdio: a socketpair end mapped at fd 4 of the worker;
/// the worker writes to it and the primary reads, the primary writes and
/// the worker echoes. An fd not mapped is `NotFound`; fd 3 cannot be
/// mapped; the worker still exits 0 on disconnect.
#[test]
fn extra_fd_carries_bytes_both_ways_between_primary_and_worker() {
    let mut p = Probe::start();
    p.cmd("mapfd 3");
    let line = p.expect("err mapfd", DEADLINE);
    assert!(line.contains("InvalidInput"), "{line}");
    p.cmd("mapfd 4");
    p.expect_line("ok mapfd", DEADLINE);
    let id = p.fork_online("");
    p.cmd(&format!("send {id} fdwrite 4 hello from the worker"));
    assert_eq!(message(&mut p, id, "fdwrite:"), "ok");
    assert_eq!(
        p.ask("fdread 4", "fdread 4 "),
        "fdread 4 hello from the worker"
    );

    p.cmd("fdwrite 4 ping");
    p.expect_line("ok fdwrite", DEADLINE);
    p.cmd(&format!("send {id} fdecho 4"));
    assert_eq!(message(&mut p, id, "fdecho:"), "ping");
    assert_eq!(p.ask("fdread 4", "fdread 4 "), "fdread 4 echo:ping");

    p.cmd(&format!("send {id} fdwrite 5 nowhere"));
    let err = message(&mut p, id, "fdwrite:err:");
    assert!(err.starts_with("NotFound:"), "{err}");
    p.cmd(&format!("disconnect {id}"));
    assert_eq!(exit_of(&mut p, id), "code=0 ead=true");
}

// ------------------------------------------------------------ 5. closing the channel

/// test-cluster-worker-forced-exit (b): the primary closes a worker's
/// channel without asking it to disconnect: `Disconnect` at once, the
/// worker sees EOF and exits 0 by itself (not killed), and it was not a
/// requested disconnect. Its listening handle closes with it.
#[test]
fn close_channel_lets_the_worker_leave_by_itself() {
    let mut p = Probe::start();
    let id = p.fork("PROBE_MODE=listen PROBE_ADDR=127.0.0.1:0");
    let addr = listening_event(&mut p, id);
    assert_eq!(answered(addr.parse().unwrap()), id);
    assert!(ask_bool(&mut p, "isconnected", id));
    p.cmd(&format!("closechannel {id}"));
    p.expect_line("ok closechannel", DEADLINE);
    assert!(!ask_bool(&mut p, "isconnected", id));
    p.expect(exact(format!("disconnect {id}")), DEADLINE);
    assert_eq!(exit_of(&mut p, id), "code=0 ead=false");
    p.cmd(&format!("closechannel {id}"));
    p.expect("err closechannel", DEADLINE);
    assert!(addresses(&mut p).is_empty());
    assert!(TcpStream::connect_timeout(&addr.parse().unwrap(), CLIENT).is_err());
}

// ------------------------------------------------------------ 6. is_connected / is_dead

/// test-cluster-worker-isconnected / -isdead: connected and not dead right
/// after fork; not connected as soon as a disconnect is asked for; dead
/// once it exited (after its `Exit` too); an id never issued is neither.
#[test]
fn is_connected_and_is_dead_follow_the_worker() {
    let mut p = Probe::start();
    for never in [0, 7] {
        assert!(!ask_bool(&mut p, "isconnected", never));
        assert!(!ask_bool(&mut p, "isdead", never));
    }
    let id = p.fork("");
    assert!(ask_bool(&mut p, "isconnected", id));
    assert!(!ask_bool(&mut p, "isdead", id));
    p.expect(exact(format!("online {id}")), DEADLINE);
    p.cmd(&format!("disconnect {id}"));
    p.expect_line("ok disconnect", DEADLINE);
    assert!(!ask_bool(&mut p, "isconnected", id));
    assert_eq!(exit_of(&mut p, id), "code=0 ead=true");
    assert!(ask_bool(&mut p, "isdead", id));
    assert!(!ask_bool(&mut p, "isconnected", id));

    // Killed: dead, and was never asked to disconnect.
    let k = p.fork_online("");
    p.cmd(&format!("kill {k} 9"));
    assert_eq!(exit_of(&mut p, k), "signal=9 ead=false");
    assert!(ask_bool(&mut p, "isdead", k));
    assert!(!ask_bool(&mut p, "isdead", k + 1));
}
