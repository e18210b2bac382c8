//! `syncluster`: runs any program as a cluster, with its sockets passed the
//! systemd way (README.md, "The command").
//!
//! ```text
//! syncluster [--workers N] [--listen [NAME=]ADDR]... [--policy shared|reuseport]
//!            [--user U] [--group G] [--pid-file F] [--graceful-timeout S]
//!            [--ready-after MS] -- PROGRAM [ARGS...]
//! ```
//!
//! The primary binds every `--listen` address (or adopts the sockets of
//! systemd's socket activation), then runs N copies of PROGRAM, each with
//! the sockets at fd 3, 4, ... and `LISTEN_FDS`, `LISTEN_PID`,
//! `LISTEN_FDNAMES`, `SYNCLUSTER_WORKER_ID` and a `NOTIFY_SOCKET` of its
//! own. Signals: TERM/INT graceful stop, QUIT immediate, HUP rolling
//! restart, USR2 binary upgrade, TTIN/TTOU one worker more/fewer, USR1
//! forwarded.
//!
//! Exit status: 0 after a stop, 1 when the startup fails (an address that
//! cannot be bound, a worker that ends before it is ready), 2 for bad
//! usage, 126/127 when PROGRAM cannot be run / is not found.

#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use syncluster::primary::{Event, Plain};
use syncluster::supervisor::{Config, Notice, Supervisor, MAX_WORKERS};
use syncluster::{Policy, Primary, Settings};

const USAGE: &str = "\
usage: syncluster [--workers N] [--listen [NAME=]ADDR]... [--policy shared|reuseport]
                  [--user U] [--group G] [--pid-file F] [--graceful-timeout S]
                  [--ready-after MS] -- PROGRAM [ARGS...]

Runs N copies of PROGRAM, each with the listening sockets at fd 3, 4, ... and
LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES (systemd's socket activation),
SYNCLUSTER_WORKER_ID and a NOTIFY_SOCKET of its own.

  --workers N           workers to run (default: the number of CPUs)
  --listen [NAME=]ADDR  bind ADDR before any worker starts: host:port, [v6]:port
                        or a Unix socket path; NAME goes to LISTEN_FDNAMES.
                        Repeatable. Under socket activation the passed sockets
                        are adopted (and ADDR, or fd:NAME, matches them)
  --policy P            shared (default): one socket, the kernel hands each
                        connection to whichever worker accepts first;
                        reuseport: one SO_REUSEPORT socket per worker (TCP)
  --user U, --group G   run the workers as user U (and group G)
  --pid-file F          write the primary's pid to F
  --graceful-timeout S  seconds a stop waits for workers after SIGTERM before
                        SIGKILL (default 30)
  --ready-after MS      count a worker ready once it has run MS milliseconds,
                        even without READY=1 on its NOTIFY_SOCKET

Signals: TERM, INT graceful stop; QUIT immediate stop; HUP rolling restart;
USR2 binary upgrade of syncluster itself; TTIN, TTOU one worker more, fewer;
USR1 forwarded to the workers.
";

/// What the command line asks for.
#[derive(Debug)]
struct Args {
    workers: Option<usize>,
    listen: Vec<(Option<String>, String)>,
    reuse_port: bool,
    user: Option<String>,
    group: Option<String>,
    pid_file: Option<PathBuf>,
    graceful_timeout: Option<Duration>,
    ready_after: Option<Duration>,
    program: OsString,
    args: Vec<OsString>,
}

/// Why the command stopped early, and its exit status.
struct Fail {
    code: u8,
    msg: String,
}

fn usage(msg: impl Into<String>) -> Fail {
    Fail {
        code: 2,
        msg: msg.into(),
    }
}

fn startup(msg: impl std::fmt::Display) -> Fail {
    Fail {
        code: 1,
        msg: msg.to_string(),
    }
}

// A line on stderr, in one write(2): workers share that stderr, and a
// line written piecemeal would be cut by theirs. A closed stderr is no
// reason to die.
fn log(line: std::fmt::Arguments<'_>) {
    let line = format!("syncluster: {line}\n");
    let _ = io::stderr().write_all(line.as_bytes());
}

fn parse(mut argv: impl Iterator<Item = OsString>) -> Result<Args, Fail> {
    let mut a = Args {
        workers: None,
        listen: Vec::new(),
        reuse_port: false,
        user: None,
        group: None,
        pid_file: None,
        graceful_timeout: None,
        ready_after: None,
        program: OsString::new(),
        args: Vec::new(),
    };
    loop {
        let Some(arg) = argv.next() else {
            return Err(usage("no PROGRAM: put it after --"));
        };
        if arg == "--" {
            break;
        }
        let Some(text) = arg.to_str() else {
            return Err(usage(format!("unknown option {arg:?}")));
        };
        if text == "-h" || text == "--help" {
            return Err(Fail {
                code: 0,
                msg: String::new(),
            });
        }
        let (opt, inline) = match text.split_once('=') {
            Some((o, v)) if o.starts_with("--") => (o, Some(v.to_string())),
            _ => (text, None),
        };
        let known = [
            "--workers",
            "--listen",
            "--policy",
            "--user",
            "--group",
            "--pid-file",
            "--graceful-timeout",
            "--ready-after",
        ];
        if !known.contains(&opt) {
            return Err(usage(if opt.starts_with('-') {
                format!("unknown option {opt}")
            } else {
                format!("{opt}: PROGRAM goes after --")
            }));
        }
        let value = match inline {
            Some(v) => v,
            None => argv
                .next()
                .and_then(|v| v.into_string().ok())
                .ok_or_else(|| usage(format!("{opt} needs a value")))?,
        };
        let bad = |what: &str| usage(format!("{opt} {value:?}: expected {what}"));
        match opt {
            "--workers" => {
                let n: usize = value.parse().map_err(|_| bad("a number"))?;
                if n == 0 || n > MAX_WORKERS {
                    return Err(bad(&format!("1 to {MAX_WORKERS}")));
                }
                a.workers = Some(n);
            }
            "--listen" => a.listen.push(split_listen(&value).map_err(usage)?),
            "--policy" => {
                a.reuse_port = match value.as_str() {
                    "shared" => false,
                    "reuseport" => true,
                    _ => return Err(bad("shared or reuseport")),
                }
            }
            "--user" => a.user = Some(value),
            "--group" => a.group = Some(value),
            "--pid-file" => a.pid_file = Some(PathBuf::from(value)),
            "--graceful-timeout" => {
                let s: f64 = value.parse().map_err(|_| bad("seconds"))?;
                if !(0.0..=1e9).contains(&s) {
                    return Err(bad("seconds, 0 or more"));
                }
                a.graceful_timeout = Some(Duration::from_secs_f64(s));
            }
            "--ready-after" => {
                let ms: u64 = value.parse().map_err(|_| bad("milliseconds"))?;
                a.ready_after = Some(Duration::from_millis(ms));
            }
            _ => unreachable!("checked against `known`"),
        }
    }
    a.program = argv.next().ok_or_else(|| usage("no PROGRAM after --"))?;
    if a.program.is_empty() {
        return Err(usage("PROGRAM is empty"));
    }
    a.args = argv.collect();
    if a.group.is_some() && a.user.is_none() {
        return Err(usage("--group needs --user"));
    }
    Ok(a)
}

/// `[NAME=]ADDR`: a NAME is what comes before a `=` when it holds no `/`,
/// `:` or `[` (an address or a path does).
fn split_listen(value: &str) -> Result<(Option<String>, String), String> {
    let (name, addr) = match value.split_once('=') {
        Some((n, a)) if !n.contains(['/', ':', '[']) => (Some(n.to_string()), a.to_string()),
        _ => (None, value.to_string()),
    };
    if addr.is_empty() {
        return Err(format!("--listen {value:?}: no address"));
    }
    if let Some(n) = &name {
        if n.is_empty() || n.len() > 255 || !n.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(format!(
                "--listen {value:?}: a name is 1 to 255 printable ASCII characters, no ':'"
            ));
        }
    }
    Ok((name, addr))
}

/// PROGRAM as `execvp` would find it: a path when it has a `/`, else the
/// first executable file of that name in `PATH`.
fn resolve(program: &OsString) -> Result<PathBuf, Fail> {
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.as_bytes().contains(&b'/') {
        let p = PathBuf::from(program);
        return match std::fs::metadata(&p) {
            Err(e) => Err(Fail {
                code: 127,
                msg: format!("{}: {e}", p.display()),
            }),
            Ok(_) if !executable(&p) => Err(Fail {
                code: 126,
                msg: format!("{}: not an executable file", p.display()),
            }),
            Ok(_) => Ok(p),
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
        .ok_or_else(|| Fail {
            code: 127,
            msg: format!("{}: not found in PATH", Path::new(program).display()),
        })
}

fn run(args: Args) -> Result<(), Fail> {
    let exec = resolve(&args.program)?;
    let mut settings = Settings::default();
    settings.exec = Some(exec.clone());
    settings.args = Some(args.args.clone());
    settings.policy = Policy::Shared;
    let mut plain = Plain::default();
    plain.ready_after = args.ready_after;
    plain.reuse_port = args.reuse_port;
    settings.plain = Some(plain);
    if let Some(user) = &args.user {
        settings
            .set_user(user, args.group.as_deref())
            .map_err(startup)?;
    }
    // Adopts what systemd (or the primary this one upgrades) passed.
    let mut primary = Primary::new(settings).map_err(startup)?;
    for (name, addr) in &args.listen {
        let address = primary.listen(addr).map_err(startup)?;
        if let Some(name) = name {
            primary.name_listener(&address, name).map_err(startup)?;
        }
    }
    let sockets = primary.listening_addresses();
    if sockets.is_empty() {
        return Err(usage(
            "nothing to listen on: give --listen ADDR, or run under socket activation",
        ));
    }
    let workers = args.workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let list: Vec<String> = sockets.iter().map(|a| a.to_string()).collect();
    log(format_args!(
        "pid {} listening on {}; {workers} workers of {} ({})",
        std::process::id(),
        list.join(", "),
        exec.display(),
        if args.reuse_port {
            "reuseport"
        } else {
            "shared"
        },
    ));
    let mut config = Config::default();
    config.workers = workers;
    config.pid_file = args.pid_file.clone();
    if let Some(t) = args.graceful_timeout {
        config.graceful_timeout = t;
    }
    let mut sup = Supervisor::start(primary, config).map_err(startup)?;
    loop {
        match sup.next_event() {
            Ok(Some(n)) => report(&mut sup, n),
            Ok(None) => return Ok(()),
            Err(e) => return Err(startup(e)),
        }
    }
}

fn report(sup: &mut Supervisor, n: Notice) {
    match n {
        Notice::Cluster(Event::Fork(id)) => {
            let pid = sup.primary().pid(id).unwrap_or(0);
            log(format_args!("worker {id} started, pid {pid}"));
        }
        Notice::Cluster(Event::Exit {
            id,
            status,
            exited_after_disconnect,
        }) => {
            let how = if exited_after_disconnect {
                "ended"
            } else {
                "died"
            };
            log(format_args!("worker {id} {how}: {status}"));
        }
        Notice::Cluster(Event::Error { id, error }) if id != 0 => {
            log(format_args!("worker {id}: {error}"))
        }
        Notice::Cluster(Event::Error { error, .. }) => log(format_args!("error: {error}")),
        Notice::Cluster(Event::Signal(s)) => log(format_args!("{s}")),
        Notice::Cluster(_) => {}
        Notice::Ready => log(format_args!("ready: {} workers", sup.target())),
        Notice::Respawning { id, delay, .. } => {
            log(format_args!("respawning worker {id} in {delay:?}"))
        }
        Notice::Respawned { .. } => {}
        Notice::CrashLoop { failures } => log(format_args!(
            "workers keep dying ({failures} in a row): respawns are at the longest backoff"
        )),
        Notice::Reloading => log(format_args!("reloading")),
        Notice::Replaced { old, new } => log(format_args!(
            "worker {new} is ready and replaces worker {old}"
        )),
        Notice::Reloaded => log(format_args!("reloaded")),
        Notice::ReloadFailed(why) => log(format_args!("reload failed: {why}")),
        Notice::Scaled { workers } => log(format_args!("now {workers} workers")),
        Notice::ScaleRefused(e) => log(format_args!("no worker more: {e}")),
        Notice::Stopping { graceful } => log(format_args!(
            "stopping{}",
            if graceful { "" } else { " now" }
        )),
        Notice::ForceKilled(ids) => log(format_args!(
            "workers {ids:?} were still running after the graceful timeout: killed"
        )),
        Notice::ReopenLogs => log(format_args!("SIGUSR1 forwarded to the workers")),
        Notice::Upgrading { pid } => log(format_args!("upgrading: new primary pid {pid}")),
        Notice::Upgraded { pid } => log(format_args!(
            "pid {pid} took over; this primary lets its workers finish"
        )),
        Notice::UpgradeFailed(why) => log(format_args!("upgrade failed: {why}")),
        Notice::UpgradeRefused(why) => log(format_args!("upgrade refused: {why}")),
        _ => {}
    }
}

fn main() -> ExitCode {
    let result = parse(std::env::args_os().skip(1)).and_then(run);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail { code: 0, .. }) => {
            let _ = io::stdout().write_all(USAGE.as_bytes());
            ExitCode::SUCCESS
        }
        Err(Fail { code: 2, msg }) => {
            let _ = io::stderr().write_all(format!("syncluster: {msg}\n{USAGE}").as_bytes());
            ExitCode::from(2)
        }
        Err(Fail { code, msg }) => {
            log(format_args!("{msg}"));
            ExitCode::from(code)
        }
    }
}
