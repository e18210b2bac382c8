//! Creating the socket for a handle (≈ Node's shared_handle.js, which
//! binds for `SCHED_NONE`; round robin binds the same way): TCP listeners,
//! Unix socket listeners and UDP sockets. A worker that listens with
//! `exclusive` or `reuse_port` binds its own socket with the same code.

#![forbid(unsafe_code)]

use std::ffi::{OsStr, OsString};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::protocol::Endpoint;
use crate::sys::{fs, socket};

/// Where a handle listens, with port 0 resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Address {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket path (absolute; it may be longer than a `sockaddr_un`
    /// holds, when the socket was bound through its directory).
    Unix(PathBuf),
    /// A UDP address (`Worker::bind_udp`). Displayed as `udp:<address>`.
    Udp(SocketAddr),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp(a) => write!(f, "{a}"),
            Address::Unix(p) => write!(f, "{}", p.display()),
            Address::Udp(a) => write!(f, "udp:{a}"),
        }
    }
}

/// How to make a socket, besides where.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct BindOptions {
    /// `listen(2)` backlog (TCP and Unix).
    pub backlog: i32,
    /// A UDP socket instead of a TCP listener.
    pub udp: bool,
    /// `IPV6_V6ONLY` on: `[::]` takes no IPv4 traffic.
    pub ipv6_only: bool,
    /// `SO_REUSEPORT` on (a worker's own socket).
    pub reuse_port: bool,
    /// `TCP_DEFER_ACCEPT` on a TCP listener.
    pub defer_accept: bool,
    /// Permission bits added to a Unix socket file's mode after bind
    /// (`0o444` readable by all, `0o222` writable by all), as libuv's
    /// `uv_pipe_chmod`.
    pub add_mode: u32,
}

/// How long a connection with no data may wait under `TCP_DEFER_ACCEPT`
/// before `accept` returns it anyway (the kernel rounds to its SYN-ACK
/// retransmissions).
pub(crate) const DEFER_ACCEPT_SECS: i32 = 5;

fn inet_socket(addr: SocketAddr, v6only: Option<bool>, opts: &BindOptions) -> io::Result<OwnedFd> {
    let fd = if opts.udp {
        socket::udp_socket(&addr)?
    } else {
        let fd = socket::tcp_socket(&addr)?;
        socket::set_reuseaddr(fd.as_fd(), true)?;
        fd
    };
    if opts.reuse_port {
        socket::set_reuseport(fd.as_fd(), true)?;
    }
    if let (SocketAddr::V6(_), Some(only)) = (addr, v6only) {
        socket::set_ipv6_only(fd.as_fd(), only)?;
    }
    socket::bind(fd.as_fd(), &addr)?;
    if !opts.udp {
        if opts.defer_accept {
            socket::set_defer_accept(fd.as_fd(), DEFER_ACCEPT_SECS)?;
        }
        socket::listen(fd.as_fd(), opts.backlog)?;
    }
    Ok(fd)
}

/// A bind error that names the address and keeps the errno, so the
/// worker's `listen()` gets the same `ErrorKind` (`AddrInUse`, ...).
#[derive(Debug)]
pub(crate) struct Named {
    pub errno: Option<i32>,
    pub text: String,
}

impl std::fmt::Display for Named {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for Named {}

/// `e` with the address in its text (`listen on <what>: <e>`), its errno kept.
pub(crate) fn named_error(e: io::Error, what: &str) -> io::Error {
    let errno = e.raw_os_error();
    io::Error::new(
        e.kind(),
        Named {
            errno,
            text: format!("listen on {what}: {e}"),
        },
    )
}

/// The errno behind an error, also through a [`Named`] wrapper.
pub(crate) fn errno_of(e: &io::Error) -> Option<i32> {
    e.raw_os_error().or_else(|| {
        e.get_ref()
            .and_then(|i| i.downcast_ref::<Named>())
            .and_then(|n| n.errno)
    })
}

/// Binds (and listens on, but for UDP) `endpoint`; the error names the
/// address. No host means `[::]` in dual-stack mode, falling back to
/// `0.0.0.0` where IPv6 is missing (with `ipv6_only`: `[::]` alone). A
/// Unix socket is bound in `dir`, the directory of its path, opened
/// beforehand (see [`UnixFile`]); a path that already exists gives
/// `EADDRINUSE`, as in Node. A path longer than a `sockaddr_un` holds is
/// bound through that directory (`/proc/self/fd/N/name`) when that fits;
/// otherwise it is `InvalidInput`.
pub(crate) fn bind(
    endpoint: &Endpoint,
    dir: Option<OwnedFd>,
    opts: &BindOptions,
) -> io::Result<(OwnedFd, Address, Option<UnixFile>)> {
    let inet = |fd: &OwnedFd, what: &str| {
        let real = socket::local_addr(fd.as_fd()).map_err(|e| named_error(e, what))?;
        Ok::<_, io::Error>(if opts.udp {
            Address::Udp(real)
        } else {
            Address::Tcp(real)
        })
    };
    match endpoint {
        Endpoint::Tcp(Some(ip), port) => {
            let addr = SocketAddr::new(*ip, *port);
            let what = addr.to_string();
            let only = match ip {
                IpAddr::V4(_) if opts.ipv6_only => {
                    return Err(named_error(
                        io::Error::new(
                            io::ErrorKind::InvalidInput,
                            "ipv6_only needs an IPv6 address",
                        ),
                        &what,
                    ))
                }
                IpAddr::V6(_) if opts.ipv6_only => Some(true),
                IpAddr::V6(v6) if v6.is_unspecified() => Some(false),
                _ => None,
            };
            let fd = inet_socket(addr, only, opts).map_err(|e| named_error(e, &what))?;
            let address = inet(&fd, &what)?;
            Ok((fd, address, None))
        }
        Endpoint::Tcp(None, port) => {
            let v6 = Endpoint::unspecified_v6(*port);
            let fd = match inet_socket(v6, Some(opts.ipv6_only), opts) {
                Ok(fd) => fd,
                Err(e) if !opts.ipv6_only && matches!(e.raw_os_error(), Some(97 | 99)) => {
                    // EAFNOSUPPORT / EADDRNOTAVAIL: no IPv6 here.
                    let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), *port);
                    inet_socket(v4, None, opts).map_err(|e| named_error(e, &v4.to_string()))?
                }
                Err(e) => return Err(named_error(e, &v6.to_string())),
            };
            let address = inet(&fd, &v6.to_string())?;
            Ok((fd, address, None))
        }
        // Only inherited sockets have names; `Primary::listen` and the
        // worker queries look those up before they bind.
        Endpoint::Name(n) => Err(io::Error::new(
            io::ErrorKind::NotFound,
            Named {
                errno: Some(2), // ENOENT
                text: format!("listen on fd:{n}: no socket was inherited under that name"),
            },
        )),
        Endpoint::Unix(path) => {
            let what = path.display().to_string();
            let fail = |e| named_error(e, &what);
            if opts.udp || opts.reuse_port || opts.ipv6_only {
                return Err(fail(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "UDP, reuse_port and ipv6_only do not apply to a Unix socket path",
                )));
            }
            let (parent, name) = split_unix_path(path).map_err(fail)?;
            let dir = match dir {
                Some(d) => d,
                None => fs::open_dir(&parent).map_err(fail)?,
            };
            let fd = socket::unix_socket().map_err(fail)?;
            bind_unix_in(fd.as_fd(), path, &dir, &name).map_err(fail)?;
            let file = UnixFile::record(dir, &parent, name).map_err(fail)?;
            // On error `file` drops here and removes the socket file.
            if opts.add_mode != 0 {
                file.add_mode(opts.add_mode).map_err(fail)?;
            }
            socket::listen(fd.as_fd(), opts.backlog).map_err(fail)?;
            Ok((fd, Address::Unix(path.clone()), Some(file)))
        }
        Endpoint::Fd(n) => Err(named_error(
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "a socket of the program's own is not bound here",
            ),
            &format!("fd {n}"),
        )),
    }
}

// Binds `fd` to `path` (whose directory `dir` is, and last component
// `name`): by the path itself when it fits in a `sockaddr_un`, else through
// the directory fd (Node PR #16749 binds a long path relative to the cwd;
// the directory fd works from any cwd).
fn bind_unix_in(
    fd: std::os::fd::BorrowedFd<'_>,
    path: &Path,
    dir: &OwnedFd,
    name: &OsStr,
) -> io::Result<()> {
    let max = socket::SUN_PATH_LEN - 1;
    let len = path.as_os_str().len();
    if len <= max {
        return socket::bind_unix(fd, path);
    }
    let mut via = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    via.extend_from_slice(name.as_bytes());
    if via.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "the Unix socket path is {len} bytes, more than the {max} a sockaddr_un \
                 holds, and its file name ({} bytes) is too long to bind through its \
                 directory ({} bytes)",
                name.len(),
                via.len()
            ),
        ));
    }
    socket::bind_unix(fd, Path::new(&OsString::from_vec(via)))
}

/// Splits a Unix socket path into its directory and its last component,
/// exactly as `bind(2)` reads it: the last component must be a plain name
/// (not empty, `.` or `..`).
pub(crate) fn split_unix_path(path: &Path) -> io::Result<(PathBuf, OsString)> {
    let bytes = path.as_os_str().as_bytes();
    let (dir, name) = match bytes.iter().rposition(|&b| b == b'/') {
        Some(0) => (&b"/"[..], &bytes[1..]),
        Some(i) => (&bytes[..i], &bytes[i + 1..]),
        None => (&b"."[..], bytes),
    };
    if name.is_empty() || name == b"." || name == b".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a Unix socket path must end in a file name",
        ));
    }
    Ok((
        PathBuf::from(OsStr::from_bytes(dir)),
        OsStr::from_bytes(name).to_owned(),
    ))
}

/// A Unix socket file the primary created, known by its directory (kept
/// open, close-on-exec) and its device and inode. It is removed only while
/// that directory entry is still this very socket: a worker that swaps a
/// directory of the path for a symlink, or the socket for another file,
/// makes the primary remove nothing of what it put there. Dropping it
/// removes the file (when a handle closes, and when the primary is dropped).
///
/// Left open: a directory of the path swapped out and back between the
/// `bind` and the check that follows it (the socket is then refused, but
/// its file stays wherever bind put it), and a rename between `fstatat`
/// and `unlinkat`. Both need write access to a directory the program
/// allowed.
#[derive(Debug)]
pub(crate) struct UnixFile {
    dir: OwnedFd,
    name: OsString,
    file: fs::Stat,
    /// False once handed to a successor (a binary upgrade): never removed.
    ours: bool,
}

impl UnixFile {
    // Right after bind: `dir` must still be the directory `parent` names
    // (else bind went elsewhere and that file is not ours to know), and
    // `name` in it a socket.
    fn record(dir: OwnedFd, parent: &Path, name: OsString) -> io::Result<UnixFile> {
        let held = fs::fstat(dir.as_fd())?;
        let named = fs::stat(parent)?;
        if !held.same_file(&named) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                Named {
                    errno: Some(13), // EACCES
                    text: format!(
                        "{} was replaced while the primary bound in it",
                        parent.display()
                    ),
                },
            ));
        }
        let file = fs::fstatat_nofollow(dir.as_fd(), &name)?;
        if !file.is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                Named {
                    errno: Some(13), // EACCES
                    text: "the bound path is not a socket".to_string(),
                },
            ));
        }
        Ok(UnixFile {
            dir,
            name,
            file,
            ours: true,
        })
    }

    /// Adds permission `bits` to the socket file's mode (as libuv's
    /// `uv_pipe_chmod`), only while its directory entry is still the socket
    /// bound: `openat(dir, name, O_PATH | O_NOFOLLOW)`, `fstat` gives the
    /// same device and inode, then `chmod` of `/proc/self/fd/N`, which is
    /// that very inode whatever the directory holds by then (a symlink a
    /// worker swaps in is neither followed nor changed).
    pub(crate) fn add_mode(&self, bits: u32) -> io::Result<()> {
        let replaced = || {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                Named {
                    errno: Some(13), // EACCES
                    text: "the socket file was replaced before its mode was set".to_string(),
                },
            )
        };
        let fd =
            fs::open_path_nofollow(self.dir.as_fd(), &self.name).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => replaced(),
                _ => e,
            })?;
        let now = fs::fstat(fd.as_fd())?;
        if !now.is_socket() || !now.same_file(&self.file) {
            return Err(replaced());
        }
        let mode = now.mode & 0o7777;
        if mode & bits == bits {
            return Ok(());
        }
        let magic = format!("/proc/self/fd/{}", fd.as_raw_fd());
        std::fs::set_permissions(&magic, std::fs::Permissions::from_mode(mode | bits)).map_err(
            |e| {
                io::Error::new(
                    e.kind(),
                    format!("chmod of the socket file through {magic}: {e}"),
                )
            },
        )
    }

    /// Removes the file if its directory entry is still the socket bound:
    /// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)` gives the same device and
    /// inode, then `unlinkat(dir, name)`. `Ok(false)` when it is gone or
    /// is another file now.
    pub(crate) fn remove(&self) -> io::Result<bool> {
        match fs::fstatat_nofollow(self.dir.as_fd(), &self.name) {
            Ok(now) if now.is_socket() && now.same_file(&self.file) => {
                fs::unlinkat(self.dir.as_fd(), &self.name)?;
                Ok(true)
            }
            Ok(_) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl UnixFile {
    /// Leaves the file in place: the socket now belongs to a new primary
    /// (a binary upgrade), which serves on it.
    pub(super) fn disown(mut self) {
        self.ours = false;
    }
}

impl Drop for UnixFile {
    fn drop(&mut self) {
        if self.ours {
            let _ = self.remove();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(backlog: i32) -> BindOptions {
        BindOptions {
            backlog,
            ..BindOptions::default()
        }
    }

    #[test]
    fn unix_paths_split_as_bind_reads_them() {
        let ok = |p: &str, d: &str, n: &str| {
            let (dir, name) = split_unix_path(Path::new(p)).unwrap();
            assert_eq!(
                (dir.to_str().unwrap(), name.to_str().unwrap()),
                (d, n),
                "{p}"
            );
        };
        ok("/x.sock", "/", "x.sock");
        ok("/a/b/x.sock", "/a/b", "x.sock");
        ok("/a/../b/x", "/a/../b", "x");
        for bad in ["/a/", "/a/.", "/a/..", "/"] {
            assert!(split_unix_path(Path::new(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_unix_socket_file_is_removed_only_while_it_is_ours() {
        let base = std::env::temp_dir().join(format!("syncluster-shared-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("d")).unwrap();
        let path = base.join("d/s.sock");
        let ep = Endpoint::Unix(path.clone());
        // Dropped: removed.
        let (_fd, _, file) = bind(&ep, None, &opts(8)).unwrap();
        assert!(path.exists());
        drop(file);
        assert!(!path.exists());
        // Replaced by a plain file: kept.
        let (_fd, _, file) = bind(&ep, None, &opts(8)).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"not yours").unwrap();
        assert!(!file.as_ref().unwrap().remove().unwrap());
        drop(file);
        assert_eq!(std::fs::read(&path).unwrap(), b"not yours");
        std::fs::remove_file(&path).unwrap();
        // Its directory moved and a symlink put in its place: the socket
        // goes from where it really is, the symlink's target stays.
        std::fs::create_dir_all(base.join("victim")).unwrap();
        std::fs::write(base.join("victim/s.sock"), b"victim").unwrap();
        let (_fd, _, file) = bind(&ep, None, &opts(8)).unwrap();
        std::fs::rename(base.join("d"), base.join("moved")).unwrap();
        std::os::unix::fs::symlink(base.join("victim"), base.join("d")).unwrap();
        drop(file);
        assert_eq!(
            std::fs::read(base.join("victim/s.sock")).unwrap(),
            b"victim"
        );
        assert!(!base.join("moved/s.sock").exists());
        // An existing path is EADDRINUSE, and the file stays.
        let e = bind(&Endpoint::Unix(base.join("victim/s.sock")), None, &opts(8)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert!(base.join("victim/s.sock").exists());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_long_unix_path_binds_through_its_directory() {
        let base = std::env::temp_dir().join(format!("syncluster-long-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let mut deep = base.clone();
        while deep.as_os_str().len() < 120 {
            deep.push("dddddddddddddddddddd");
        }
        std::fs::create_dir_all(&deep).unwrap();
        let path = deep.join("s.sock");
        let (fd, address, file) = bind(&Endpoint::Unix(path.clone()), None, &opts(8)).unwrap();
        assert_eq!(address, Address::Unix(path.clone()));
        assert!(fs::stat(&path).unwrap().is_socket());
        assert!(socket::is_listening(fd.as_fd()).unwrap());
        drop(file);
        assert!(!path.exists());
        // A name too long even through the directory.
        let long = deep.join("n".repeat(100));
        let e = bind(&Endpoint::Unix(long), None, &opts(8)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("sockaddr_un"), "{e}");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn the_mode_is_set_only_on_the_socket_bound() {
        let base = std::env::temp_dir().join(format!("syncluster-mode-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let path = base.join("s.sock");
        let (_fd, _, file) = bind(&Endpoint::Unix(path.clone()), None, &opts(8)).unwrap();
        let file = file.unwrap();
        file.add_mode(0o666).unwrap();
        assert_eq!(fs::stat(&path).unwrap().mode & 0o666, 0o666);
        // Swapped for a symlink to a file of someone else's: refused, and
        // neither the link nor its target changes.
        let victim = base.join("victim");
        std::fs::write(&victim, b"x").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let e = file.add_mode(0o666).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(fs::stat(&victim).unwrap().mode & 0o777, 0o600);
        drop(file);
        assert!(path.symlink_metadata().is_ok(), "the symlink was removed");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
