//! Creating the listening socket for a handle (≈ Node's shared_handle.js,
//! which binds for `SCHED_NONE`; round robin binds the same way).

#![forbid(unsafe_code)]

use std::ffi::{OsStr, OsString};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::protocol::Endpoint;
use crate::sys::{fs, socket};

/// Where a handle listens, with port 0 resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp(a) => write!(f, "{a}"),
            Address::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

fn tcp_listener(addr: SocketAddr, v6only: Option<bool>, backlog: i32) -> io::Result<OwnedFd> {
    let fd = socket::tcp_socket(&addr)?;
    socket::set_reuseaddr(fd.as_fd(), true)?;
    if let (SocketAddr::V6(_), Some(only)) = (addr, v6only) {
        socket::set_ipv6_only(fd.as_fd(), only)?;
    }
    socket::bind(fd.as_fd(), &addr)?;
    socket::listen(fd.as_fd(), backlog)?;
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

/// Binds and listens on `endpoint`; the error names the address. No host
/// means `[::]` in dual-stack mode, falling back to `0.0.0.0` where IPv6 is
/// missing. A Unix socket is bound in `dir`, the directory of its path,
/// opened beforehand (see [`UnixFile`]); a path that already exists gives
/// `EADDRINUSE`, as in Node.
pub(super) fn bind(
    endpoint: &Endpoint,
    dir: Option<OwnedFd>,
    backlog: i32,
) -> io::Result<(OwnedFd, Address, Option<UnixFile>)> {
    match endpoint {
        Endpoint::Tcp(Some(ip), port) => {
            let addr = SocketAddr::new(*ip, *port);
            let only = matches!(ip, IpAddr::V6(v6) if v6.is_unspecified()).then_some(false);
            let fd =
                tcp_listener(addr, only, backlog).map_err(|e| named_error(e, &addr.to_string()))?;
            let real =
                socket::local_addr(fd.as_fd()).map_err(|e| named_error(e, &addr.to_string()))?;
            Ok((fd, Address::Tcp(real), None))
        }
        Endpoint::Tcp(None, port) => {
            let v6 = Endpoint::unspecified_v6(*port);
            let fd = match tcp_listener(v6, Some(false), backlog) {
                Ok(fd) => fd,
                Err(e) if matches!(e.raw_os_error(), Some(97 | 99)) => {
                    // EAFNOSUPPORT / EADDRNOTAVAIL: no IPv6 here.
                    let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), *port);
                    tcp_listener(v4, None, backlog).map_err(|e| named_error(e, &v4.to_string()))?
                }
                Err(e) => return Err(named_error(e, &v6.to_string())),
            };
            let real =
                socket::local_addr(fd.as_fd()).map_err(|e| named_error(e, &v6.to_string()))?;
            Ok((fd, Address::Tcp(real), None))
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
            let (parent, name) = split_unix_path(path).map_err(|e| named_error(e, &what))?;
            let dir = match dir {
                Some(d) => d,
                None => fs::open_dir(&parent).map_err(|e| named_error(e, &what))?,
            };
            let fd = socket::unix_socket().map_err(|e| named_error(e, &what))?;
            socket::bind_unix(fd.as_fd(), path).map_err(|e| named_error(e, &what))?;
            let file = UnixFile::record(dir, &parent, name).map_err(|e| named_error(e, &what))?;
            // On error `file` drops here and removes the socket file.
            socket::listen(fd.as_fd(), backlog).map_err(|e| named_error(e, &what))?;
            Ok((fd, Address::Unix(path.clone()), Some(file)))
        }
    }
}

/// Splits a Unix socket path into its directory and its last component,
/// exactly as `bind(2)` reads it: the last component must be a plain name
/// (not empty, `.` or `..`).
pub(super) fn split_unix_path(path: &Path) -> io::Result<(PathBuf, OsString)> {
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
pub(super) struct UnixFile {
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

    /// Removes the file if its directory entry is still the socket bound:
    /// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)` gives the same device and
    /// inode, then `unlinkat(dir, name)`. `Ok(false)` when it is gone or
    /// is another file now.
    pub(super) fn remove(&self) -> io::Result<bool> {
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
        let (_fd, _, file) = bind(&ep, None, 8).unwrap();
        assert!(path.exists());
        drop(file);
        assert!(!path.exists());
        // Replaced by a plain file: kept.
        let (_fd, _, file) = bind(&ep, None, 8).unwrap();
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
        let (_fd, _, file) = bind(&ep, None, 8).unwrap();
        std::fs::rename(base.join("d"), base.join("moved")).unwrap();
        std::os::unix::fs::symlink(base.join("victim"), base.join("d")).unwrap();
        drop(file);
        assert_eq!(
            std::fs::read(base.join("victim/s.sock")).unwrap(),
            b"victim"
        );
        assert!(!base.join("moved/s.sock").exists());
        // An existing path is EADDRINUSE, and the file stays.
        let e = bind(&Endpoint::Unix(base.join("victim/s.sock")), None, 8).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert!(base.join("victim/s.sock").exists());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
