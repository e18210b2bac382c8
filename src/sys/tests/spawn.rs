//! `sys::process` with real children: fork/exec, fd mapping, exit-status
//! decoding. Every child is waited for with a 10 s deadline.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::sys::process::{self, ChildError, ExitStatus, SpawnPlan, Stage};
use crate::sys::tests::in_own_process;

const DEADLINE: Duration = Duration::from_secs(10);

fn args(argv: &[&str]) -> Vec<OsString> {
    argv.iter().map(OsString::from).collect()
}

fn env(vars: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
    vars.iter()
        .map(|(k, v)| (OsString::from(k), OsString::from(v)))
        .collect()
}

fn plan(program: &str, argv: &[&str]) -> SpawnPlan {
    SpawnPlan::new(
        Path::new(program),
        &args(argv),
        &env(&[("PATH", "/usr/bin:/bin")]),
    )
    .unwrap()
}

/// Waits for `pid` for at most 10 s; kills and reaps it on timeout.
fn wait_deadline(pid: i32) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = process::wait_pid_nohang(pid).unwrap() {
            return status;
        }
        if start.elapsed() > DEADLINE {
            let _ = process::kill(pid, libc::SIGKILL);
            let _ = process::wait_pid(pid);
            panic!("child {pid} did not exit within {DEADLINE:?}");
        }
        sleep(Duration::from_millis(10));
    }
}

/// Runs `plan` with stdin and stderr on /dev/null and stdout on a pipe;
/// returns the exit status and what the child wrote.
fn run_capture(plan: &SpawnPlan) -> (ExitStatus, String) {
    let null = File::open("/dev/null").unwrap();
    let (read_end, write_end) = process::pipe().unwrap();
    let pid = process::spawn(
        plan,
        &[(null.as_fd(), 0), (write_end.as_fd(), 1), (null.as_fd(), 2)],
    )
    .unwrap();
    drop(write_end);
    let status = wait_deadline(pid);
    // Outputs are far below the pipe buffer, so reading after exit is safe.
    let mut out = String::new();
    File::from(read_end).read_to_string(&mut out).unwrap();
    (status, out)
}

/// The stage and errno of a failure in the child, and the message.
fn child_error(err: &io::Error) -> (Stage, i32, String) {
    let c = ChildError::of(err).unwrap_or_else(|| panic!("not a ChildError: {err:?}"));
    (c.stage(), c.errno(), err.to_string())
}

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("syncluster-spawn-{}-{name}", std::process::id()))
}

#[test]
fn spawn_of_missing_program_returns_enoent() {
    let err = process::spawn(&plan("/nonexistent/x", &["x"]), &[]).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound);
    let (stage, errno, msg) = child_error(&err);
    assert_eq!((stage, errno), (Stage::Exec, libc::ENOENT));
    assert!(
        msg.starts_with("exec /nonexistent/x: No such file or directory"),
        "{msg}"
    );
}

#[test]
fn spawn_of_non_executable_returns_eacces() {
    let path = temp_path("not-executable");
    std::fs::write(&path, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let plan = SpawnPlan::new(&path, &args(&["x"]), &[]).unwrap();
    let result = process::spawn(&plan, &[]);
    let _ = std::fs::remove_file(&path);
    let err = result.unwrap_err();
    assert_eq!(child_error(&err).1, libc::EACCES, "{err}");
}

#[test]
fn exec_error_is_reported_even_when_targets_cover_low_fds() {
    // The parent's error pipe usually lands on a low fd; mapping 3..=10 makes
    // a collision with it likely. Exec failure must still come back.
    let null = File::open("/dev/null").unwrap();
    let fds: Vec<(BorrowedFd<'_>, RawFd)> = (3..=10).map(|t| (null.as_fd(), t)).collect();
    let err = process::spawn(&plan("/nonexistent/x", &["x"]), &fds).unwrap_err();
    assert_eq!(child_error(&err).1, libc::ENOENT, "{err}");
}

#[test]
fn bad_fd_maps_are_invalid_input() {
    let null = File::open("/dev/null").unwrap();
    let fd = null.as_fd();
    let p = plan("/bin/true", &["true"]);
    let too_many: Vec<(BorrowedFd<'_>, RawFd)> = (3..)
        .take(process::MAX_FD_MAPPINGS + 1)
        .map(|t| (fd, t))
        .collect();
    for bad in [
        &[(fd, -1)][..],
        &[(fd, 256)],
        &[(fd, 4), (fd, 4)],
        &too_many,
    ] {
        let err = process::spawn(&p, bad).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
    }
}

#[test]
fn spawned_child_sees_only_stdio_and_mapped_fds() {
    let (ours, theirs) = UnixStream::pair().unwrap();
    // Extra fds in the parent that must not reach the child.
    let _extra: Vec<File> = (0..3).map(|_| File::open("/dev/null").unwrap()).collect();
    let (_pipe_r, _pipe_w) = process::pipe().unwrap();
    let null = File::open("/dev/null").unwrap();
    let pid = process::spawn(
        &plan("/bin/ls", &["ls", "-1", "/proc/self/fd"]),
        &[
            (null.as_fd(), 0),
            (theirs.as_fd(), 1),
            (null.as_fd(), 2),
            (theirs.as_fd(), 3),
        ],
    )
    .unwrap();
    drop(theirs);
    assert_eq!(wait_deadline(pid), ExitStatus::Code(0));

    ours.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut out = String::new();
    (&ours).read_to_string(&mut out).unwrap();
    let mut fds: Vec<i32> = out.lines().map(|l| l.parse().unwrap()).collect();
    fds.sort_unstable();
    // ls opens /proc/self/fd itself: allow one extra fd, the highest.
    if fds.len() == 5 {
        assert!(fds[4] > 3, "{fds:?}");
        fds.pop();
    }
    assert_eq!(fds, [0, 1, 2, 3]);
}

#[test]
fn overlapping_mappings_do_not_clobber_each_other() {
    // Alone: other tests of this binary may hold hundreds of fds meanwhile.
    if !in_own_process(
        module_path!(),
        "overlapping_mappings_do_not_clobber_each_other",
    ) {
        return;
    }
    // Swap two fds: a goes to b's number and b to a's, so a naive dup2 in
    // order would overwrite b before copying it.
    use std::os::fd::AsRawFd;
    let (a_ours, a_theirs) = UnixStream::pair().unwrap();
    let (b_ours, b_theirs) = UnixStream::pair().unwrap();
    let (a_num, b_num) = (a_theirs.as_raw_fd(), b_theirs.as_raw_fd());
    assert!(
        a_num < 64 && b_num < 64,
        "test process has too many fds open"
    );
    let script = format!("echo a >&{b_num}; echo b >&{a_num}");
    let pid = process::spawn(
        &plan("/bin/sh", &["sh", "-c", &script]),
        &[(a_theirs.as_fd(), b_num), (b_theirs.as_fd(), a_num)],
    )
    .unwrap();
    drop((a_theirs, b_theirs));
    assert_eq!(wait_deadline(pid), ExitStatus::Code(0));
    for (stream, want) in [(a_ours, "a\n"), (b_ours, "b\n")] {
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut out = String::new();
        (&stream).read_to_string(&mut out).unwrap();
        assert_eq!(out, want);
    }
}

#[test]
fn exit_code_and_signal_are_decoded() {
    let pid = process::spawn(&plan("/bin/sh", &["sh", "-c", "exit 42"]), &[]).unwrap();
    assert_eq!(wait_deadline(pid), ExitStatus::Code(42));
    let pid = process::spawn(&plan("/bin/sh", &["sh", "-c", "kill -9 $$"]), &[]).unwrap();
    assert_eq!(wait_deadline(pid), ExitStatus::Signal(libc::SIGKILL));
}

#[test]
fn kill_and_blocking_wait_work() {
    let pid = process::spawn(&plan("/bin/sleep", &["sleep", "30"]), &[]).unwrap();
    assert_eq!(process::wait_pid_nohang(pid).unwrap(), None);
    process::kill(pid, libc::SIGTERM).unwrap();
    assert_eq!(
        process::wait_pid(pid).unwrap(),
        ExitStatus::Signal(libc::SIGTERM)
    );
    // Reaped: it is no longer our child.
    let err = process::wait_pid_nohang(pid).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ECHILD));
}

#[test]
fn env_cwd_and_args_reach_the_child() {
    let mut plan = SpawnPlan::new(
        Path::new("/bin/sh"),
        &args(&["sh", "-c", "echo $FOO; pwd; echo $0"]),
        &env(&[("FOO", "bar")]),
    )
    .unwrap();
    plan.cwd(Path::new("/tmp")).unwrap();
    let (status, out) = run_capture(&plan);
    assert_eq!(status, ExitStatus::Code(0));
    assert_eq!(out, "bar\n/tmp\nsh\n");
}

#[test]
fn missing_cwd_is_reported_as_chdir() {
    let mut plan = plan("/bin/true", &["true"]);
    plan.cwd(Path::new("/nonexistent/dir")).unwrap();
    let err = process::spawn(&plan, &[]).unwrap_err();
    let (stage, errno, msg) = child_error(&err);
    assert_eq!((stage, errno), (Stage::Chdir, libc::ENOENT));
    assert!(
        msg.starts_with("chdir /nonexistent/dir: No such file or directory"),
        "{msg}"
    );
}

#[test]
fn bad_strings_are_invalid_input() {
    let sh = Path::new("/bin/sh");
    type Case<'a> = (&'a Path, Vec<OsString>, Vec<(OsString, OsString)>);
    let cases: [Case<'_>; 6] = [
        (sh, args(&["sh", "a\0b"]), vec![]),
        (sh, args(&["sh"]), env(&[("A=B", "x")])),
        (sh, args(&["sh"]), env(&[("", "x")])),
        (sh, args(&["sh"]), env(&[("A", "x\0y")])),
        (Path::new("/bin/s\0h"), args(&["sh"]), vec![]),
        (sh, vec![], vec![]),
    ];
    for (program, argv, env) in &cases {
        let err = SpawnPlan::new(program, argv, env).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{argv:?} {env:?}");
    }
    let err = SpawnPlan::new(sh, &args(&["sh", "ok", "a\0b"]), &[]).unwrap_err();
    assert!(err.to_string().contains("argv[2]"), "{err}");
    let err = SpawnPlan::new(sh, &args(&["sh"]), &env(&[("OK", "1"), ("A=B", "x")])).unwrap_err();
    assert!(err.to_string().contains("A=B"), "{err}");
    let mut plan = SpawnPlan::new(sh, &args(&["sh"]), &[]).unwrap();
    let err = plan.cwd(Path::new("/t\0mp")).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
}

fn fd_flags(fd: &OwnedFd) -> u32 {
    use std::os::fd::AsRawFd;
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).unwrap();
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .expect("fdinfo has a flags: line");
    u32::from_str_radix(flags.trim(), 8).unwrap()
}

#[test]
fn pipe_fds_are_close_on_exec() {
    const O_CLOEXEC: u32 = 0o2000000;
    let (r, w) = process::pipe().unwrap();
    assert_ne!(fd_flags(&r) & O_CLOEXEC, 0);
    assert_ne!(fd_flags(&w) & O_CLOEXEC, 0);
}

/// Parses a `SigBlk:`/`SigIgn:` line of /proc/PID/status (hex mask).
fn sig_mask(status: &str, field: &str) -> u64 {
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in {status:?}"));
    u64::from_str_radix(line.trim(), 16).unwrap()
}

#[test]
fn blocked_signals_are_not_inherited() {
    // spawn blocks every signal around fork; the child must unblock them all.
    // It must also reset ignored signals: the Rust runtime ignores SIGPIPE.
    let (status, out) = run_capture(&plan(
        "/bin/sh",
        &[
            "sh",
            "-c",
            "exec grep -E '^Sig(Blk|Ign):' /proc/self/status",
        ],
    ));
    assert_eq!(status, ExitStatus::Code(0));
    assert_eq!(sig_mask(&out, "SigBlk:"), 0, "{out}");
    // Only signals 1..=31 (bits 0..=30): glibc will not let signal() touch its
    // internal 32 and 33, which may be ignored already in this test process.
    assert_eq!(sig_mask(&out, "SigIgn:") & 0x7fff_ffff, 0, "{out}");
}

#[test]
fn pdeathsig_is_applied_and_pids_are_ours() {
    assert_eq!(process::getpid() as u32, std::process::id());
    assert!(process::getppid() > 0);
    // /proc does not show the parent-death signal; check that None works
    // and that a bad signal number comes back as prctl's EINVAL.
    let mut plan = plan("/bin/true", &["true"]);
    plan.pdeathsig(None);
    let pid = process::spawn(&plan, &[]).unwrap();
    assert_eq!(wait_deadline(pid), ExitStatus::Code(0));
    let mut bad = self::plan("/bin/true", &["true"]);
    bad.pdeathsig(Some(1000));
    let err = process::spawn(&bad, &[]).unwrap_err();
    let (stage, errno, msg) = child_error(&err);
    assert_eq!((stage, errno), (Stage::Pdeathsig, libc::EINVAL));
    assert!(msg.starts_with("prctl(PR_SET_PDEATHSIG, 1000): "), "{msg}");
}

fn am_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        == Some("0")
}

/// The `Uid:`, `Gid:` and `Groups:` lines of the child's /proc/self/status,
/// each as its space-separated words.
fn ids_of(mut plan: SpawnPlan) -> [String; 3] {
    plan.cwd(Path::new("/")).unwrap();
    let (status, out) = run_capture(&plan);
    assert_eq!(status, ExitStatus::Code(0), "{out}");
    ["Uid:", "Gid:", "Groups:"].map(|field| {
        let line = out.lines().find_map(|l| l.strip_prefix(field));
        let words: Vec<&str> = line.expect(field).split_whitespace().collect();
        words.join(" ")
    })
}

fn id_plan() -> SpawnPlan {
    plan(
        "/bin/grep",
        &["grep", "-E", "^(Uid|Gid|Groups):", "/proc/self/status"],
    )
}

#[test]
fn uid_gid_and_groups_are_what_the_plan_says() {
    if !am_root() {
        eprintln!("skipped: not root");
        return;
    }
    let mut p = id_plan();
    p.uid(65534);
    p.gid(100);
    p.groups(&[65534, 4000000, 100]);
    assert_eq!(
        ids_of(p),
        [
            "65534 65534 65534 65534",
            "100 100 100 100",
            "100 65534 4000000"
        ]
    );
    // A uid and gid without a group list: every supplementary group goes.
    let mut p = id_plan();
    p.uid(65534);
    p.gid(65534);
    assert_eq!(ids_of(p)[2], "");
    // A group list alone applies too (uid and gid are inherited).
    let mut p = id_plan();
    p.groups(&[7]);
    assert_eq!(ids_of(p)[2], "7");
}

#[test]
fn uid_without_gid_is_refused_before_fork() {
    let mut p = plan("/bin/true", &["true"]);
    p.uid(65534);
    let err = process::spawn(&p, &[]).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("uid 65534 without a gid"), "{err}");
    assert!(ChildError::of(&err).is_none(), "no child was forked");
}

#[test]
fn each_credential_step_names_itself_on_failure() {
    if !am_root() {
        eprintln!("skipped: not root");
        return;
    }
    // Root may set any id but (uid_t)-1, which the kernel refuses (EINVAL).
    const BAD: u32 = u32::MAX;
    let mut groups = plan("/bin/true", &["true"]);
    groups.uid(65534);
    groups.gid(65534);
    groups.groups(&[65534, BAD]);
    let mut gid = plan("/bin/true", &["true"]);
    gid.uid(65534);
    gid.gid(BAD);
    let mut uid = plan("/bin/true", &["true"]);
    uid.uid(BAD);
    uid.gid(65534);
    for (plan, stage, what) in [
        (groups, Stage::Setgroups, "setgroups([65534, 4294967295]): "),
        (gid, Stage::Setgid, "setgid(4294967295): "),
        (uid, Stage::Setuid, "setuid(4294967295): "),
    ] {
        let err = process::spawn(&plan, &[]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
        let (got, errno, msg) = child_error(&err);
        assert_eq!((got, errno), (stage, libc::EINVAL), "{msg}");
        assert!(msg.starts_with(what), "{msg}");
        assert!(msg.ends_with("Invalid argument (os error 22)"), "{msg}");
    }
}

#[test]
fn env_child_pid_holds_each_childs_own_pid() {
    let mut plan = SpawnPlan::new(
        Path::new("/bin/sh"),
        &args(&["sh", "-c", "echo \"$LISTEN_PID $$ $OTHER $WORKER_PID\""]),
        &env(&[("LISTEN_PID", "stale"), ("OTHER", "kept")]),
    )
    .unwrap();
    plan.env_child_pid("LISTEN_PID").unwrap();
    plan.env_child_pid("WORKER_PID").unwrap();
    // One plan, several children: each sees its own pid, never a neighbour's.
    let mut pids = Vec::new();
    for _ in 0..3 {
        let null = File::open("/dev/null").unwrap();
        let (read_end, write_end) = process::pipe().unwrap();
        let pid = process::spawn(&plan, &[(null.as_fd(), 0), (write_end.as_fd(), 1)]).unwrap();
        drop(write_end);
        assert_eq!(wait_deadline(pid), ExitStatus::Code(0));
        let mut out = String::new();
        File::from(read_end).read_to_string(&mut out).unwrap();
        assert_eq!(out, format!("{pid} {pid} kept {pid}\n"));
        pids.push(pid);
    }
    pids.dedup();
    assert_eq!(pids.len(), 3, "{pids:?}");
}

#[test]
fn env_child_pid_appears_once_in_environ() {
    let mut plan = SpawnPlan::new(
        Path::new("/bin/sleep"),
        &args(&["sleep", "10"]),
        &env(&[("A", "1"), ("LISTEN_PID", "stale")]),
    )
    .unwrap();
    plan.env_child_pid("LISTEN_PID").unwrap();
    plan.env_child_pid("LISTEN_PID").unwrap();
    let pid = process::spawn(&plan, &[]).unwrap();
    // Exec is done once spawn returns, so environ is the new program's.
    let environ = std::fs::read(format!("/proc/{pid}/environ"));
    process::kill(pid, libc::SIGKILL).unwrap();
    assert_eq!(wait_deadline(pid), ExitStatus::Signal(libc::SIGKILL));
    let environ = environ.unwrap();
    let entries: Vec<&[u8]> = environ
        .split(|&b| b == 0)
        .filter(|e| !e.is_empty())
        .collect();
    let want = format!("LISTEN_PID={pid}");
    assert_eq!(entries, [&b"A=1"[..], want.as_bytes()]);
}

#[test]
fn env_child_pid_rejects_bad_keys() {
    let mut plan = plan("/bin/true", &["true"]);
    for bad in ["", "A=B", "A\0B"] {
        let err = plan.env_child_pid(bad).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
    }
    assert!(!format!("{plan:?}").contains("A=B"));
}
