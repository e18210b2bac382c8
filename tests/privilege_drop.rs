//! Workers under another user: the drop really drops. Real processes, as
//! root (each test that needs root fails otherwise, or skips with
//! `SYNCLUSTER_TESTS_ALLOW_SKIP` set).
//! `nobody` (65534) and `nogroup` (65534) exist on Debian; `users` (100)
//! is only used as a gid number.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{exact, is_alive, output_within, probe_path, wait_until, Probe, DEADLINE as T};
use syncluster::primary::Settings;

const NOBODY: u32 = 65534;

/// The value of `field` (`"Uid:"`, `"Groups:"`) in /proc/<pid>/status, trimmed.
fn status_field(pid: i32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// Real, effective, saved and fs ids all equal to `id`, as /proc shows them.
fn all_four(id: u32) -> String {
    format!("{id}\t{id}\t{id}\t{id}")
}

/// The probe binary where `nobody` can exec it: the build output if every
/// directory above it is traversable by others, else a copy in a fresh
/// 0755 directory (removed on drop).
struct RunnableExe {
    path: PathBuf,
    dir: Option<PathBuf>,
}

impl RunnableExe {
    fn new(tag: &str) -> RunnableExe {
        let built = probe_path();
        let others_x = |p: &Path| {
            p.as_os_str().is_empty()
                || std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o001 != 0)
        };
        if built.ancestors().all(others_x) {
            return RunnableExe {
                path: built,
                dir: None,
            };
        }
        let dir =
            std::env::temp_dir().join(format!("syncluster-privdrop-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.join("cluster_probe");
        std::fs::copy(&built, &path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        RunnableExe {
            path,
            dir: Some(dir),
        }
    }
}

impl Drop for RunnableExe {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// SIGKILLs these pids on drop (workers outlive a `kill -9`ed probe, so
/// the probe's own cleanup cannot find them).
struct KillOnDrop(Vec<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &pid in &self.0 {
            if is_alive(pid) {
                let _ = common::kill(pid, 9);
            }
        }
    }
}

/// A root probe in `/` that execs `exe` for its workers.
fn probe_for(exe: &RunnableExe) -> Probe {
    let mut p = Probe::start_with(|c| {
        c.current_dir("/");
    });
    p.ask(&format!("set exec {}", exe.path.display()), "ok set");
    p
}

fn pid_of(p: &mut Probe, id: u32) -> i32 {
    let pids = p.worker_pids();
    match pids.iter().find(|(i, _)| *i == id) {
        Some(&(_, pid)) => pid,
        None => p.fail(&format!("worker {id} not in {pids:?}")),
    }
}

/// A worker that is deaf to its channel (blocked in `sleep`), so only the
/// parent-death signal can end it when the primary dies.
fn deaf_worker(p: &mut Probe) -> (u32, i32) {
    let id = p.fork_online("");
    let pid = pid_of(p, id);
    p.ask(&format!("send {id} sleep 30000"), "ok send");
    p.expect(exact(format!("message {id} sleeping:30000 fds=0")), T);
    (id, pid)
}

#[test]
fn worker_with_a_uid_dies_when_its_primary_is_killed() {
    if !common::require_root("to drop privileges") {
        return;
    }
    let exe = RunnableExe::new("pdeath");
    let mut p = probe_for(&exe);
    p.ask(&format!("set uid {NOBODY}"), "ok set");
    p.ask(&format!("set gid {NOBODY}"), "ok set");
    let (_, pid) = deaf_worker(&mut p);
    let _guard = KillOnDrop(vec![pid]);
    assert_eq!(status_field(pid, "Uid:"), all_four(NOBODY));
    p.kill();
    assert!(
        wait_until(Duration::from_secs(5), || !is_alive(pid)),
        "worker {pid} (uid {NOBODY}) outlived its SIGKILLed primary: ppid {}",
        status_field(pid, "PPid:")
    );
}

#[test]
fn uid_without_gid_fails_the_fork_and_both_drop_every_group() {
    if !common::require_root("to drop privileges") {
        return;
    }
    let exe = RunnableExe::new("uidonly");
    let mut p = probe_for(&exe);
    p.ask(&format!("set uid {NOBODY}"), "ok set");
    p.cmd("fork");
    let e = p.expect("err fork ", T);
    assert!(e.contains("uid 65534 without a gid"), "{e}");
    assert_eq!(p.workers(), "", "no worker is left of the failed fork");
    // Numbers only: no passwd lookup, so no supplementary group either.
    p.ask("set gid 100", "ok set");
    let id = p.fork_online("");
    let pid = pid_of(&mut p, id);
    assert_eq!(status_field(pid, "Uid:"), all_four(NOBODY));
    assert_eq!(status_field(pid, "Gid:"), all_four(100));
    assert_eq!(status_field(pid, "Groups:"), "");
}

/// `id -G user` (or `id -g user`) as sorted numbers: the groups as a tool
/// other than ours resolves them.
fn id_groups(flag: &str, user: &str) -> Vec<u32> {
    let out = output_within(
        {
            let mut c = Command::new("id");
            c.args([flag, user]);
            c
        },
        T,
    );
    assert!(out.status.success(), "id {flag} {user}: {out:?}");
    let mut ids: Vec<u32> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|g| g.parse().unwrap())
        .collect();
    ids.sort_unstable();
    ids
}

fn words(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
}

/// A user listed as a member of some group in /etc/group (so with a
/// supplementary group besides its primary one), if the host has one.
fn user_with_supplementary_groups() -> Option<String> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups
        .lines()
        .filter_map(|l| l.rsplit(':').next())
        .flat_map(|members| members.split(','))
        .find(|m| !m.is_empty() && id_groups_opt(m).is_some_and(|g| g.len() > 1))
        .map(str::to_string)
}

fn id_groups_opt(user: &str) -> Option<Vec<u32>> {
    let out = Command::new("id").args(["-G", user]).output().ok()?;
    out.status.success().then(|| id_groups("-G", user))
}

/// Forks one worker with `set user <spec>` and returns its (Uid, Gid,
/// Groups) lines, the Groups line as space-separated numbers.
fn ids_with_user(p: &mut Probe, spec: &str) -> (String, String, String) {
    p.ask(&format!("set user {spec}"), "ok set");
    let id = p.fork_online("");
    let pid = pid_of(p, id);
    let groups = status_field(pid, "Groups:");
    let groups = groups.split_whitespace().collect::<Vec<_>>().join(" ");
    (status_field(pid, "Uid:"), status_field(pid, "Gid:"), groups)
}

#[test]
fn set_user_takes_the_passwd_group_and_the_group_list() {
    if !common::require_root("to drop privileges") {
        return;
    }
    let exe = RunnableExe::new("names");
    let mut p = probe_for(&exe);
    let nobody = all_four(NOBODY);
    let nobody_groups = words(&id_groups("-G", "nobody"));
    let primary = id_groups("-g", "nobody")[0];
    // By name and by number, the primary group comes from the passwd entry.
    for spec in ["nobody", "65534"] {
        assert_eq!(
            ids_with_user(&mut p, spec),
            (nobody.clone(), all_four(primary), nobody_groups.clone()),
            "set user {spec}"
        );
    }
    // A group by name, and a gid with no group entry: it replaces the
    // primary group in the list too (nogroup does not list nobody).
    assert_eq!(
        ids_with_user(&mut p, "nobody nogroup"),
        (nobody.clone(), all_four(65534), "65534".to_string())
    );
    assert_eq!(
        ids_with_user(&mut p, "nobody 4000000"),
        (nobody, all_four(4_000_000), "4000000".to_string())
    );
    // A user with a supplementary group gets it (postgres in ssl-cert on a
    // Debian with PostgreSQL, for one).
    match user_with_supplementary_groups() {
        Some(user) => {
            let want = words(&id_groups("-G", &user));
            let (_, _, groups) = ids_with_user(&mut p, &user);
            assert_eq!(groups, want, "set user {user}");
        }
        None => eprintln!("partly skipped: no user here has a supplementary group"),
    }
}

#[test]
fn unknown_user_or_group_is_invalid_input_naming_it() {
    let mut s = Settings::default();
    for (user, group, named) in [
        ("syncluster-no-such-user", None, "syncluster-no-such-user"),
        (
            "nobody",
            Some("syncluster-no-such-group"),
            "syncluster-no-such-group",
        ),
        ("3999999", None, "3999999"),
        ("", None, "user name is empty"),
    ] {
        let e = s.set_user(user, group).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
        assert!(e.to_string().contains(named), "{e}");
    }
    assert_eq!((s.uid, s.gid, s.groups.len()), (None, None, 0), "unchanged");
    // Through the probe: the setting fails, nothing is forked.
    let mut p = Probe::start();
    p.cmd("set user syncluster-no-such-user");
    let e = p.expect("err set ", T);
    assert!(
        e.contains("user \"syncluster-no-such-user\" does not exist"),
        "{e}"
    );
}

#[test]
fn bad_cwd_fails_the_fork_as_chdir() {
    let mut p = Probe::start();
    p.ask("set cwd /nope", "ok set");
    p.cmd("fork");
    let e = p.expect("err fork ", T);
    assert!(
        e.contains("fork of worker 1: chdir /nope: No such file or directory"),
        "{e}"
    );
    assert_eq!(p.workers(), "");
}

#[test]
fn setgid_and_setuid_failures_fail_the_fork_naming_the_call() {
    if !common::require_root("to drop privileges") {
        return;
    }
    // Root may take any id but (uid_t)-1, which the kernel refuses.
    let mut p = Probe::start();
    for (uid, gid, want) in [
        (NOBODY, u32::MAX, "setgid(4294967295): Invalid argument"),
        (u32::MAX, NOBODY, "setuid(4294967295): Invalid argument"),
    ] {
        p.ask(&format!("set uid {uid}"), "ok set");
        p.ask(&format!("set gid {gid}"), "ok set");
        p.cmd("fork");
        let e = p.expect("err fork ", T);
        assert!(e.contains(&format!("fork of worker 1: {want}")), "{e}");
    }
    assert_eq!(p.workers(), "");
    assert_eq!(p.ask("zombies", "zombies "), "zombies 0");
}

/// Runs `cmd` (the probe, maybe under a wrapper) with `script` on stdin;
/// the probe ends at EOF. Returns its stdout.
fn run_script(mut cmd: Command, script: &str) -> String {
    let (read_end, mut write_end) = std::os::unix::net::UnixStream::pair().unwrap();
    std::io::Write::write_all(&mut write_end, script.as_bytes()).unwrap();
    drop(write_end);
    cmd.stdin(std::os::fd::OwnedFd::from(read_end))
        .current_dir("/");
    let out = output_within(cmd, T);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{out:?}");
    stdout
}

fn setpriv_works() -> bool {
    Command::new("setpriv")
        .args(["--bounding-set=-setuid", "true"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn missing_privileges_are_named_as_eperm_of_the_call() {
    if !common::require_root("to drop privileges")
        || !common::require(setpriv_works(), "a working `setpriv`")
    {
        return;
    }
    let exe = RunnableExe::new("eperm");
    let script = format!("set exec {}\nset user nobody\nfork\n", exe.path.display());
    // Without CAP_SETUID, groups and gid still change, setuid fails.
    let mut c = Command::new("setpriv");
    c.arg("--bounding-set=-setuid").arg("--").arg(&exe.path);
    let out = run_script(c, &script);
    assert!(
        out.contains("err fork fork of worker 1: setuid(65534): Operation not permitted"),
        "{out}"
    );
    // Without CAP_SETGID, setgroups is the first to fail.
    let mut c = Command::new("setpriv");
    c.arg("--bounding-set=-setgid").arg("--").arg(&exe.path);
    let out = run_script(c, &script);
    assert!(
        out.contains("err fork fork of worker 1: setgroups([65534]): Operation not permitted"),
        "{out}"
    );
    // A primary that is nobody already cannot drop to nobody either: it has
    // no right to setgroups at all.
    let mut c = Command::new(&exe.path);
    std::os::unix::process::CommandExt::uid(&mut c, NOBODY);
    std::os::unix::process::CommandExt::gid(&mut c, NOBODY);
    let out = run_script(c, &script);
    assert!(
        out.contains("err fork fork of worker 1: setgroups([65534]): Operation not permitted"),
        "{out}"
    );
}
