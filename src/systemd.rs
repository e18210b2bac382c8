//! systemd's protocols, spoken directly: nothing is linked. Socket
//! activation (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`: fds from 3 on)
//! and `sd_notify` (a datagram of `KEY=VALUE` lines to `NOTIFY_SOCKET`).
//! Only the primary speaks them; the variables never reach a worker.

#![forbid(unsafe_code)]

use std::ffi::OsStr;
use std::io;
use std::os::fd::OwnedFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use crate::sys;

/// Variables of systemd's that belong to the primary alone: they are not
/// passed on to workers (sidekiq #5829: a worker's `STOPPING=1` stops the
/// whole unit).
pub(crate) const PRIMARY_ONLY: [&str; 6] = [
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// The first fd socket activation passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// More than this many passed fds is taken for a malformed variable.
const MAX_LISTEN_FDS: usize = 1024;

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// A socket passed by socket activation, with its `FileDescriptorName=`.
#[derive(Debug)]
pub(crate) struct Activated {
    pub fd: OwnedFd,
    pub name: Option<String>,
}

/// Reads the socket-activation variables as `sd_listen_fds(3)` does: `None`
/// when they are absent or meant for another pid (`LISTEN_PID`), else the
/// number of fds and their names. A malformed value is `InvalidInput`
/// naming it.
pub(crate) fn parse_listen(
    pid: u32,
    listen_pid: Option<&OsStr>,
    listen_fds: Option<&OsStr>,
    names: Option<&OsStr>,
) -> io::Result<Option<Vec<Option<String>>>> {
    let (Some(lp), Some(lf)) = (listen_pid, listen_fds) else {
        return Ok(None);
    };
    let lp_s = lp.to_string_lossy();
    let for_pid: u32 = lp_s
        .parse()
        .map_err(|_| invalid(format!("LISTEN_PID={lp_s:?}: not a pid")))?;
    if for_pid != pid {
        return Ok(None);
    }
    let lf_s = lf.to_string_lossy();
    let n: usize = lf_s
        .parse()
        .ok()
        .filter(|&n| n <= MAX_LISTEN_FDS)
        .ok_or_else(|| {
            invalid(format!(
                "LISTEN_FDS={lf_s:?}: not a count from 0 to {MAX_LISTEN_FDS}"
            ))
        })?;
    let mut out: Vec<Option<String>> = vec![None; n];
    if let Some(names) = names {
        let names = names.to_string_lossy();
        let list: Vec<&str> = names.split(':').collect();
        if list.len() != n {
            return Err(invalid(format!(
                "LISTEN_FDNAMES={names:?}: {} names for LISTEN_FDS={n}",
                list.len()
            )));
        }
        for (slot, name) in out.iter_mut().zip(list) {
            *slot = (!name.is_empty()).then(|| name.to_string());
        }
    }
    Ok(Some(out))
}

/// Takes over the sockets systemd passed to this process, if any; they
/// become close-on-exec. The variables stay as they are: the primary keeps
/// them out of its workers' environment instead of mutating its own.
pub(crate) fn listen_fds() -> io::Result<Vec<Activated>> {
    let var = std::env::var_os;
    let Some(names) = parse_listen(
        std::process::id(),
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
    )?
    else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(names.len());
    for (i, name) in names.into_iter().enumerate() {
        let raw = LISTEN_FDS_START + i as i32;
        let fd = sys::fd::adopt_inherited(raw)
            .map_err(|e| io::Error::new(e.kind(), format!("LISTEN_FDS: fd {raw}: {e}")))?;
        out.push(Activated { fd, name });
    }
    Ok(out)
}

/// A connection to the service manager's notification socket.
#[derive(Debug)]
pub(crate) struct Notifier {
    sock: UnixDatagram,
    to: SocketAddr,
}

impl Notifier {
    /// From `NOTIFY_SOCKET`; `None` when it is unset or empty.
    pub fn from_env() -> io::Result<Option<Notifier>> {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(v) if !v.is_empty() => Notifier::new(&v).map(Some),
            _ => Ok(None),
        }
    }

    /// To a socket path, or an abstract name when it starts with `@`.
    pub fn new(target: &OsStr) -> io::Result<Notifier> {
        let bytes = target.as_bytes();
        let to = match bytes.strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name),
            None => SocketAddr::from_pathname(target),
        }
        .map_err(|e| invalid(format!("NOTIFY_SOCKET={target:?}: {e}")))?;
        Ok(Notifier {
            sock: UnixDatagram::unbound()?,
            to,
        })
    }

    /// Sends `KEY=VALUE` lines in one datagram (`sd_notify`).
    pub fn notify(&self, state: &str) -> io::Result<()> {
        self.sock.send_to_addr(state.as_bytes(), &self.to)?;
        Ok(())
    }

    /// `RELOADING=1` with the `MONOTONIC_USEC=` that `Type=notify-reload`
    /// requires.
    pub fn reloading(&self) -> io::Result<()> {
        let now = sys::time::monotonic_usec()?;
        self.notify(&format!("RELOADING=1\nMONOTONIC_USEC={now}"))
    }
}

/// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, when it is set
/// for this pid (`WATCHDOG_PID` absent or equal). A malformed value is
/// `InvalidInput` naming it.
pub(crate) fn watchdog_interval(
    pid: u32,
    usec: Option<&OsStr>,
    for_pid: Option<&OsStr>,
) -> io::Result<Option<Duration>> {
    let Some(usec) = usec else { return Ok(None) };
    if let Some(p) = for_pid {
        let p_s = p.to_string_lossy();
        let p: u32 = p_s
            .parse()
            .map_err(|_| invalid(format!("WATCHDOG_PID={p_s:?}: not a pid")))?;
        if p != pid {
            return Ok(None);
        }
    }
    let u_s = usec.to_string_lossy();
    let us: u64 = u_s
        .parse()
        .ok()
        .filter(|&u| u > 0)
        .ok_or_else(|| invalid(format!("WATCHDOG_USEC={u_s:?}: not a positive number")))?;
    Ok(Some(Duration::from_micros(us / 2)))
}

/// [`watchdog_interval`] from this process's environment.
pub(crate) fn watchdog_from_env() -> io::Result<Option<Duration>> {
    watchdog_interval(
        std::process::id(),
        std::env::var_os("WATCHDOG_USEC").as_deref(),
        std::env::var_os("WATCHDOG_PID").as_deref(),
    )
}

/// True for a variable the primary keeps to itself: systemd's, and those
/// of a binary upgrade (`SYNCLUSTER_UPGRADE_*`).
pub(crate) fn is_primary_only(key: &OsStr) -> bool {
    PRIMARY_ONLY
        .iter()
        .chain(&crate::primary::UPGRADE_VARS)
        .any(|k| OsStr::new(k) == key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    fn os(s: &str) -> Option<&OsStr> {
        Some(OsStr::new(s))
    }

    #[test]
    fn listen_vars_for_another_pid_or_absent_are_not_ours() {
        assert_eq!(parse_listen(10, None, os("2"), None).unwrap(), None);
        assert_eq!(parse_listen(10, os("11"), os("2"), None).unwrap(), None);
        assert_eq!(
            parse_listen(10, os("10"), os("2"), None).unwrap(),
            Some(vec![None, None])
        );
    }

    #[test]
    fn listen_names_pair_with_fds_and_empty_means_unnamed() {
        assert_eq!(
            parse_listen(7, os("7"), os("3"), os("http::admin")).unwrap(),
            Some(vec![Some("http".into()), None, Some("admin".into())])
        );
    }

    #[test]
    fn malformed_listen_vars_name_themselves() {
        for (lp, lf, names, want) in [
            ("x", "1", None, "LISTEN_PID"),
            ("7", "-1", None, "LISTEN_FDS"),
            ("7", "99999", None, "LISTEN_FDS"),
            ("7", "2", Some("a"), "LISTEN_FDNAMES"),
        ] {
            let e = parse_listen(7, os(lp), os(lf), names.map(OsStr::new)).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
            assert!(e.to_string().contains(want), "{e}");
        }
    }

    #[test]
    fn watchdog_is_half_the_period_and_only_for_this_pid() {
        assert_eq!(
            watchdog_interval(5, os("2000000"), None).unwrap(),
            Some(Duration::from_secs(1))
        );
        assert_eq!(watchdog_interval(5, os("2000000"), os("6")).unwrap(), None);
        assert_eq!(
            watchdog_interval(5, os("2000000"), os("5")).unwrap(),
            Some(Duration::from_secs(1))
        );
        assert_eq!(watchdog_interval(5, None, None).unwrap(), None);
        assert!(watchdog_interval(5, os("0"), None).is_err());
        assert!(watchdog_interval(5, os("1"), os("x")).is_err());
    }

    #[test]
    fn notify_reaches_a_path_and_an_abstract_socket() {
        let dir = std::env::temp_dir().join(format!("sc-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = Notifier::new(path.as_os_str()).unwrap();
        n.notify("READY=1").unwrap();
        let mut buf = [0u8; 256];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1");
        n.reloading().unwrap();
        let len = rx.recv(&mut buf).unwrap();
        let msg = std::str::from_utf8(&buf[..len]).unwrap();
        let usec: u64 = msg
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .unwrap()
            .parse()
            .unwrap();
        assert!(usec > 0);
        std::fs::remove_dir_all(&dir).unwrap();

        let name = format!("sc-notify-abstract-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = Notifier::new(OsStr::new(&format!("@{name}"))).unwrap();
        n.notify("STOPPING=1").unwrap();
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STOPPING=1");
    }

    #[test]
    fn primary_only_variables_are_known() {
        assert!(is_primary_only(OsStr::new("NOTIFY_SOCKET")));
        assert!(is_primary_only(OsStr::new("LISTEN_FDS")));
        assert!(is_primary_only(OsStr::new("SYNCLUSTER_UPGRADE_FDS")));
        assert!(!is_primary_only(OsStr::new("PATH")));
    }
}
