//! The C API from C, with real compilers: `include/syncluster.h`,
//! `libsyncluster.a` and `libsyncluster.so` (this profile's, as `cargo
//! build --lib` leaves them), the examples of `examples/c/` and the test
//! program `tests/c/capi_test.c`, compiled with `cc -Wall -Wextra -Werror`
//! into `target/<profile>/capi/` (rebuilt only when a source or the library
//! changed), then run against real clients; the test program also runs
//! under valgrind.
//!
//! Needs gcc, g++, binutils (nm, readelf), pkg-config, libuv's headers and
//! valgrind; a missing one fails the test with the `apt-get install` line
//! that brings it.
//!
//! Valgrind runs with `--trace-children=yes`: the workers are exec'd copies
//! of the test program, and their side of the API (events, accept,
//! messages with fds) is checked too; `/bin/sh` and `sleep`, which the
//! basics fork, are skipped. A worker with a leak exits 1, which the primary
//! sees and fails on.

#[path = "support/hello.rs"]
mod hello;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use hello::*;

const PACKAGES: &str = "apt-get install -y gcc g++ binutils pkg-config libuv1-dev valgrind";
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The exact answer of examples/common/http.rs to a `Connection: close` GET.
const HELLO_CLOSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n\
Connection: close\r\n\r\nhello world\n";
const HELLO_KEEP: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n\
Connection: keep-alive\r\n\r\nhello world\n";

/// What the tests run, built once per test process.
struct Built {
    /// target/<profile>
    lib_dir: PathBuf,
    /// target/<profile>/capi
    out: PathBuf,
}

impl Built {
    fn bin(&self, name: &str) -> PathBuf {
        self.out.join(name)
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}; install the tools: {PACKAGES}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Compiles unless `out` is newer than every input.
fn compile(compiler: &str, out: &Path, inputs: &[&Path], args: &[String]) {
    let fresh = mtime(out).is_some_and(|o| inputs.iter().all(|i| mtime(i).is_some_and(|t| t < o)));
    if fresh {
        return;
    }
    run(Command::new(compiler).args(args).arg("-o").arg(out));
}

fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let missing: Vec<&str> = [
            ("cc", "gcc"),
            ("c++", "g++"),
            ("pkg-config", "pkg-config"),
            ("valgrind", "valgrind"),
            ("nm", "binutils"),
            ("readelf", "binutils"),
        ]
        .into_iter()
        .filter(|(tool, _)| Command::new(tool).arg("--version").output().is_err())
        .map(|(_, pkg)| pkg)
        .collect();
        assert!(
            missing.is_empty(),
            "the C API tests need {missing:?}: {PACKAGES}"
        );
        let uv = Command::new("pkg-config")
            .args(["--exists", "libuv"])
            .status();
        assert!(
            uv.is_ok_and(|s| s.success()),
            "the C API tests need libuv's headers (libuv1-dev): {PACKAGES}"
        );
        // .../target/<profile>/deps/capi-<hash> -> .../target/<profile>
        let exe = std::env::current_exe().expect("current_exe");
        let lib_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>")
            .to_path_buf();
        let mut cargo = Command::new(env!("CARGO"));
        cargo.args(["build", "--quiet", "--lib", "--manifest-path"]);
        cargo.arg(format!("{ROOT}/Cargo.toml"));
        if lib_dir.ends_with("release") {
            cargo.arg("--release");
        }
        run(&mut cargo);
        let out = lib_dir.join("capi");
        std::fs::create_dir_all(&out).unwrap();

        // The pkg-config file, as scripts/build_c.sh writes it.
        let template = std::fs::read_to_string(format!("{ROOT}/syncluster.pc.in")).unwrap();
        let pc = template
            .replace("@PREFIX@", ROOT)
            .replace("@INCLUDEDIR@", &format!("{ROOT}/include"))
            .replace("@LIBDIR@", lib_dir.to_str().unwrap())
            .replace("@VERSION@", env!("CARGO_PKG_VERSION"));
        let pc_path = out.join("syncluster.pc");
        if std::fs::read_to_string(&pc_path).ok().as_deref() != Some(pc.as_str()) {
            std::fs::write(&pc_path, pc).unwrap();
        }
        let pkg = |args: &[&str]| -> Vec<String> {
            let text = run(Command::new("pkg-config")
                .env("PKG_CONFIG_PATH", &out)
                .args(args));
            text.split_whitespace().map(String::from).collect()
        };
        let private = pkg(&["--libs-only-l", "--static", "syncluster"])
            .into_iter()
            .filter(|l| l != "-lsyncluster")
            .collect::<Vec<_>>();
        let uv_cflags = pkg(&["--cflags", "libuv"]);
        let uv_libs = pkg(&["--libs", "libuv"]);

        let header = PathBuf::from(format!("{ROOT}/include/syncluster.h"));
        let common = PathBuf::from(format!("{ROOT}/examples/c/common.h"));
        let static_lib = lib_dir.join("libsyncluster.a");
        let shared_lib = lib_dir.join("libsyncluster.so");
        let s = |x: &Path| x.to_str().unwrap().to_string();
        let warn = |std: &str| -> Vec<String> {
            [std, "-g", "-Wall", "-Wextra", "-Werror", "-I"]
                .iter()
                .map(|a| a.to_string())
                .chain([format!("{ROOT}/include")])
                .collect()
        };

        // The header alone, twice (include guard), as C99 and as C++.
        let tu = out.join("header_only.c");
        let body = "#include \"syncluster.h\"\n#include \"syncluster.h\"\n\
            int main(void) { sc_event e = SC_EVENT_INIT; sc_worker_info i = SC_WORKER_INFO_INIT;\n\
            sc_supervisor_config c = SC_SUPERVISOR_CONFIG_INIT; (void)i; (void)c;\n\
            sc_event_clear(&e); return syncluster_version() == SYNCLUSTER_VERSION ? 0 : 1; }\n";
        let tu_cc = out.join("header_only.cc");
        for f in [&tu, &tu_cc] {
            if std::fs::read_to_string(f).ok().as_deref() != Some(body) {
                std::fs::write(f, body).unwrap();
            }
        }
        let mut args = warn("-std=c99");
        args.extend(["-pedantic".into(), s(&tu), s(&static_lib)]);
        args.extend(private.iter().cloned());
        compile(
            "cc",
            &out.join("header_c99"),
            &[&tu, &header, &static_lib],
            &args,
        );
        let mut args = warn("-std=c++11");
        args.extend(["-pedantic".into(), s(&tu_cc), s(&static_lib)]);
        args.extend(private.iter().cloned());
        compile(
            "c++",
            &out.join("header_cxx"),
            &[&tu_cc, &header, &static_lib],
            &args,
        );

        // The test program, static and shared (through pkg-config).
        let test_c = PathBuf::from(format!("{ROOT}/tests/c/capi_test.c"));
        let mut args = warn("-std=c99");
        args.extend([s(&test_c), s(&static_lib)]);
        args.extend(private.iter().cloned());
        compile(
            "cc",
            &out.join("capi_test"),
            &[&test_c, &header, &static_lib],
            &args,
        );
        let mut args = warn("-std=c99");
        args.push(s(&test_c));
        args.extend(pkg(&["--cflags", "--libs", "syncluster"]));
        args.push(format!("-Wl,-rpath,{}", lib_dir.display()));
        compile(
            "cc",
            &out.join("capi_test_shared"),
            &[&test_c, &header, &shared_lib],
            &args,
        );

        // The examples, as scripts/build_c.sh builds them.
        let hello_c = PathBuf::from(format!("{ROOT}/examples/c/hello.c"));
        let mut args = warn("-std=c99");
        args.extend(["-O2".into(), s(&hello_c), s(&static_lib)]);
        args.extend(private.iter().cloned());
        compile(
            "cc",
            &out.join("hello"),
            &[&hello_c, &common, &header, &static_lib],
            &args,
        );
        let uv_c = PathBuf::from(format!("{ROOT}/examples/c/uv_worker.c"));
        let mut args = warn("-std=c99");
        args.push("-O2".into());
        args.extend(uv_cflags);
        args.extend([s(&uv_c), s(&static_lib)]);
        args.extend(uv_libs);
        args.extend(private.iter().cloned());
        compile(
            "cc",
            &out.join("uv_worker"),
            &[&uv_c, &common, &header, &static_lib],
            &args,
        );
        let readme_c = PathBuf::from(format!("{ROOT}/examples/c/readme.c"));
        let mut args = warn("-std=c99");
        args.extend([s(&readme_c), s(&static_lib)]);
        args.extend(private.iter().cloned());
        compile(
            "cc",
            &out.join("readme"),
            &[&readme_c, &header, &static_lib],
            &args,
        );
        Built { lib_dir, out }
    })
}

/// Runs a program to its end (60 s at most); its stdout, asserting exit 0.
fn run_ok(cmd: Command) -> String {
    let out = hello::common::output_within(cmd, Duration::from_secs(60));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "{}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}

/// One valgrind run at a time: two at once on 2 cores starve each other.
static VALGRIND: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn valgrind(b: &Built, mode: &str) -> Command {
    let mut cmd = Command::new("valgrind");
    cmd.args([
        "-q",
        "--leak-check=full",
        "--error-exitcode=1",
        "--errors-for-leak-kinds=definite,possible",
        "--trace-children=yes",
        "--trace-children-skip=*/sh,*/dash,*/bash,*/sleep",
        "--child-silent-after-fork=yes",
    ]);
    cmd.arg(b.bin("capi_test")).arg(mode);
    cmd
}

fn capi_test(b: &Built, exe: &str, mode: &str) -> Command {
    let mut cmd = Command::new(b.bin(exe));
    cmd.arg(mode);
    cmd
}

// -------------------------------------------------------------- the header

#[test]
fn header_compiles_as_c99_and_cxx_and_matches_the_crate_version() {
    let b = built();
    for exe in ["header_c99", "header_cxx"] {
        run_ok(Command::new(b.bin(exe)));
    }
    let header = std::fs::read_to_string(format!("{ROOT}/include/syncluster.h")).unwrap();
    let want = format!(
        "#define SYNCLUSTER_VERSION_STRING \"{}\"",
        env!("CARGO_PKG_VERSION")
    );
    assert!(
        header.contains(&want),
        "the header's version is not the crate's: {want}"
    );
}

#[test]
fn every_function_the_header_names_is_exported_and_nothing_else() {
    let b = built();
    let header = std::fs::read_to_string(format!("{ROOT}/include/syncluster.h")).unwrap();
    let mut named: Vec<&str> = header
        .match_indices('(')
        .filter_map(|(i, _)| {
            let start = header[..i]
                .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(0, |s| s + 1);
            let name = &header[start..i];
            (name.starts_with("sc_") || name.starts_with("syncluster_")).then_some(name)
        })
        .filter(|n| !n.ends_with("_cb"))
        .collect();
    named.sort_unstable();
    named.dedup();
    let nm = run(Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(b.lib_dir.join("libsyncluster.so")));
    let mut exported: Vec<&str> = nm
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    exported.sort_unstable();
    assert_eq!(
        named, exported,
        "header (left) and libsyncluster.so (right) differ"
    );
    assert!(exported.len() > 50, "{exported:?}");
}

// ----------------------------------------------------------- the C program

#[test]
fn c_basics_errors_settings_fork_failures_and_exit_statuses() {
    let b = built();
    let out = run_ok(capi_test(b, "capi_test", "basics"));
    assert_eq!(out.trim(), "ok basics");
}

#[test]
fn c_messages_carry_fds_both_ways_untaken_fds_are_closed_and_unix_sockets_listen() {
    let b = built();
    let out = run_ok(capi_test(b, "capi_test", "fds"));
    assert_eq!(out.trim(), "ok fds");
}

#[test]
fn c_supervisor_callback_uses_the_primary_refuses_its_events_and_stops() {
    let b = built();
    let out = run_ok(capi_test(b, "capi_test", "supervisor"));
    assert_eq!(out.trim(), "ok supervisor");
}

#[test]
fn shared_library_links_through_pkg_config() {
    let b = built();
    let readelf = run(Command::new("readelf")
        .arg("-d")
        .arg(b.bin("capi_test_shared")));
    assert!(readelf.contains("[libsyncluster.so]"), "{readelf}");
    let out = run_ok(capi_test(b, "capi_test_shared", "basics"));
    assert_eq!(out.trim(), "ok basics");
}

/// Writes a request on each of `n` connections, then reads every answer.
fn concurrent_gets(port: u16, n: usize, req: &[u8]) -> Vec<String> {
    let mut conns: Vec<TcpStream> = (0..n).map(|_| connect(port)).collect();
    for c in &mut conns {
        c.write_all(req).unwrap();
    }
    conns
        .iter_mut()
        .map(|c| {
            let mut out = Vec::new();
            c.read_to_end(&mut out)
                .expect("an answer before the read timeout");
            String::from_utf8_lossy(&out).into_owned()
        })
        .collect()
}

/// The C cluster: worker 1 never accepts, so the primary kills it while a
/// connection is in flight to it; worker 2 must serve every connection.
fn requeue_and_stop(cmd: Command, start: Duration) {
    let mut c = Hello::spawn_within(cmd, start);
    let answers = concurrent_gets(c.port, 4, b"GET / HTTP/1.0\r\n\r\n");
    for a in &answers {
        assert!(a.ends_with("\r\n\r\nworker 2\n"), "{answers:?}");
    }
    let killed = c.line(start).expect("a line after the answers");
    assert!(killed.starts_with("killing 1 with "), "{killed}");
    assert_eq!(
        c.line(start).as_deref(),
        Some("exit 1 code -1 signal 9 after 0")
    );
    let rest = c.stop();
    assert_eq!(
        rest,
        [
            "stopping",
            "message 2 served 4",
            "exit 2 code 0 signal 0 after 1",
            "done"
        ],
        "stderr:\n{}",
        c.stderr()
    );
}

#[test]
fn c_worker_death_requeues_the_connection_in_flight_then_stops_gracefully() {
    let b = built();
    requeue_and_stop(capi_test(b, "capi_test", "cluster"), START);
}

// ------------------------------------------------------------- valgrind

#[test]
fn c_api_under_valgrind_has_no_leak_and_no_invalid_access() {
    let _one = VALGRIND.lock().unwrap_or_else(|e| e.into_inner());
    let b = built();
    for mode in ["basics", "fds", "supervisor"] {
        let out = run_ok(valgrind(b, mode));
        assert_eq!(out.trim(), format!("ok {mode}"));
    }
}

#[test]
fn c_cluster_under_valgrind_has_no_leak_and_no_invalid_access() {
    let _one = VALGRIND.lock().unwrap_or_else(|e| e.into_inner());
    let b = built();
    // Valgrind runs every process about 20 times slower; on 2 busy cores
    // the cluster may take a while to listen.
    requeue_and_stop(valgrind(b, "cluster"), Duration::from_secs(90));
}

// ------------------------------------------------------------- hello.c

fn get_close(port: u16) -> Vec<u8> {
    let mut s = connect(port);
    s.write_all(GET_CLOSE).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    out
}

#[test]
fn c_hello_round_robins_real_connections_with_the_rust_hello_bytes_and_stops_on_sigterm() {
    let b = built();
    for policy in ["rr", "shared"] {
        let mut h = Hello::spawn({
            let mut cmd = Command::new(b.bin("hello"));
            cmd.args(["--workers", "2", "--port", "0", "--policy", policy]);
            cmd
        });
        assert_eq!(
            h.listening,
            format!(
                "listening on http://127.0.0.1:{} (2 workers, {policy})",
                h.port
            )
        );
        for _ in 0..20 {
            assert_eq!(get_close(h.port), HELLO_CLOSE);
        }
        // Keep-alive and pipelining on one connection; HEAD has no body.
        let mut s = connect(h.port);
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\nHEAD / HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let mut buf = Vec::new();
        assert_hello(&read_response(&mut s, &mut buf, false));
        let head = read_response(&mut s, &mut buf, true);
        assert_eq!(head.header("connection"), Some("keep-alive"));
        drop(s);
        let rest = h.stop();
        assert_eq!(rest.len(), 1, "{rest:?}");
        let counts: Vec<u64> = rest[0]
            .strip_prefix("served {")
            .and_then(|r| r.strip_suffix('}'))
            .unwrap_or_else(|| panic!("{rest:?}"))
            .split(',')
            .map(|kv| kv.split_once(':').unwrap().1.parse().unwrap())
            .collect();
        assert_eq!(counts.iter().sum::<u64>(), 21, "{rest:?}");
        if policy == "rr" {
            // Round robin: both workers served, in turn.
            assert!(
                counts.len() == 2 && counts.iter().all(|&n| n >= 9),
                "{rest:?}"
            );
        }
    }
}

#[test]
fn c_hello_supervisor_replaces_a_killed_worker_and_bad_flags_exit_2() {
    let b = built();
    let mut h = Hello::spawn({
        let mut cmd = Command::new(b.bin("hello"));
        cmd.args(["--workers", "2", "--port", "0"]);
        cmd
    });
    let victim = h.worker_with_id(1);
    signal(victim, "KILL");
    h.wait_stderr("worker 1 died (signal SIGKILL (9))", 1);
    h.wait_stderr("worker 1: forking a replacement", 1);
    h.worker_with_id(3);
    for _ in 0..4 {
        assert_eq!(get_close(h.port), HELLO_CLOSE);
    }
    let rest = h.stop();
    assert!(
        rest[0].starts_with("served {") && rest[0].contains("\"3\":"),
        "{rest:?}"
    );

    let out = Command::new(b.bin("hello"))
        .arg("--workers=zero")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--workers \"zero\"") && err.contains("usage:"),
        "{err}"
    );
}

// ------------------------------------------------------------- readme.c

#[test]
fn the_readme_c_example_is_in_the_docs_and_serves_until_sigterm() {
    let b = built();
    let doc = std::fs::read_to_string(format!("{ROOT}/README.md")).unwrap();
    let example = std::fs::read_to_string(format!("{ROOT}/examples/c/readme.c")).unwrap();
    assert!(
        doc.contains(&format!("```c\n{example}```")),
        "README.md's From C section must hold examples/c/readme.c verbatim"
    );
    let mut cmd = Command::new(b.bin("readme"));
    cmd.arg("127.0.0.1:0");
    let mut r = Hello::launch(cmd);
    let mut listens: Vec<String> = (0..2).filter_map(|_| r.line(START)).collect();
    listens.sort();
    assert_eq!(listens.len(), 2, "stderr: {}", r.stderr());
    let addr = listens[0].rsplit(' ').next().unwrap().to_string();
    assert_eq!(listens[0], format!("worker 1 listens on {addr}"));
    assert_eq!(listens[1], format!("worker 2 listens on {addr}"));
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(IO)).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        assert!(text.starts_with("hello from worker "), "{text}");
        seen.insert(text);
    }
    assert_eq!(seen.len(), 2, "round robin: {seen:?}");
    r.signal("TERM");
    let status = r.wait_exit(EXIT).expect("exit after SIGTERM");
    assert!(status.success(), "{status:?}; stderr: {}", r.stderr());
    let mut exits = r.lines(Duration::from_secs(2));
    exits.sort();
    assert_eq!(exits, ["worker 1 exited with 0", "worker 2 exited with 0"]);
}

// ---------------------------------------------------------- uv_worker.c

#[test]
fn uv_worker_serves_many_connections_at_once_in_one_libuv_worker() {
    let b = built();
    let mut h = Hello::spawn({
        let mut cmd = Command::new(b.bin("uv_worker"));
        cmd.args(["--workers", "1", "--port", "0"]);
        cmd
    });
    assert!(h.listening.ends_with("(1 workers, rr)"), "{}", h.listening);
    // 40 keep-alive connections open at once on one worker, two requests
    // each, the second written only once every first one was answered: a
    // worker serving one connection at a time would never answer them.
    let mut conns: Vec<(TcpStream, Vec<u8>)> =
        (0..40).map(|_| (connect(h.port), Vec::new())).collect();
    for round in 0..2 {
        for (c, _) in &mut conns {
            c.write_all(GET).unwrap();
        }
        for (c, buf) in &mut conns {
            let r = read_response(c, buf, false);
            assert_hello(&r);
            assert_eq!(r.header("connection"), Some("keep-alive"), "round {round}");
        }
    }
    // The raw bytes are the Rust hello's.
    let mut s = connect(h.port);
    s.write_all(GET).unwrap();
    let mut buf = vec![0; HELLO_KEEP.len()];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(buf, HELLO_KEEP);
    assert_eq!(get_close(h.port), HELLO_CLOSE);
    // The 40 idle keep-alive connections do not hold up a graceful stop.
    let rest = h.stop();
    drop(conns);
    assert_eq!(rest, ["served {\"1\":42}"]);
}
