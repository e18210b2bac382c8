//! Files by directory fd: `open(O_PATH)`, `fstat`, `fstatat`, `unlinkat`.
//! The primary keeps the directory of each Unix socket it binds open, so
//! that it later removes that very socket and nothing a worker swapped in.

use std::ffi::{CString, OsStr};
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::{cvt, cvt_r};

/// What `stat(2)` says of a file, reduced to what identifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
    /// `st_mode` (type and permission bits).
    pub mode: u32,
    /// `st_uid`.
    pub uid: u32,
}

impl Stat {
    /// `S_ISSOCK(st_mode)`.
    pub fn is_socket(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFSOCK
    }

    /// `S_ISDIR(st_mode)`.
    pub fn is_dir(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }

    /// Same `st_dev` and `st_ino`: the same file.
    pub fn same_file(&self, other: &Stat) -> bool {
        self.dev == other.dev && self.ino == other.ino
    }

    fn from(st: &libc::stat) -> Stat {
        Stat {
            dev: st.st_dev,
            ino: st.st_ino,
            mode: st.st_mode,
            uid: st.st_uid,
        }
    }
}

fn cstr(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "path {:?} holds a NUL byte",
                bytes.escape_ascii().to_string()
            ),
        )
    })
}

/// `open(path, O_PATH | O_DIRECTORY | O_CLOEXEC)`: a handle on a directory
/// that reads nothing and can only name files relative to it. Symlinks in
/// `path` are followed, as `bind(2)` would. Retries `EINTR`.
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let c = cstr(path.as_os_str().as_bytes())?;
    // SAFETY: c is a NUL-terminated string that outlives the call.
    let fd = cvt_r(|| unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: fd was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `openat(dir, "..", O_PATH | O_DIRECTORY | O_CLOEXEC)`: the directory
/// above `dir` (`dir` itself at the root). Retries `EINTR`.
pub fn open_parent(dir: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: dir is open and the name a NUL-terminated literal.
    let fd = cvt_r(|| unsafe {
        libc::openat(
            dir.as_raw_fd(),
            b"..\0".as_ptr().cast(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: fd was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `openat(dir, name, O_PATH | O_NOFOLLOW | O_CLOEXEC)`: a handle on the
/// entry `name` of `dir` itself (a symlink is not followed: the handle is
/// the symlink). `name` must be one path component. Retries `EINTR`.
pub fn open_path_nofollow(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    let c = one_name(name)?;
    // SAFETY: dir is open and c a NUL-terminated string that outlives the call.
    let fd = cvt_r(|| unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: fd was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fstat(2)` of an open fd (an `O_PATH` one too). Never `EINTR`.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    // SAFETY: stat is plain old data; fstat fills it.
    let mut st: libc::stat = unsafe { mem::zeroed() };
    // SAFETY: st is writable; fd is borrowed and open.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(Stat::from(&st))
}

/// `stat(2)` of a path, following symlinks. Never `EINTR`.
pub fn stat(path: &Path) -> io::Result<Stat> {
    let c = cstr(path.as_os_str().as_bytes())?;
    // SAFETY: stat is plain old data; stat fills it.
    let mut st: libc::stat = unsafe { mem::zeroed() };
    // SAFETY: c is NUL-terminated, st writable.
    cvt(unsafe { libc::stat(c.as_ptr(), &mut st) })?;
    Ok(Stat::from(&st))
}

fn one_name(name: &OsStr) -> io::Result<CString> {
    let b = name.as_bytes();
    if b.is_empty() || b.contains(&b'/') || b == b"." || b == b".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{:?} is not a single file name",
                b.escape_ascii().to_string()
            ),
        ));
    }
    cstr(b)
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`: the file `name` in `dir`
/// itself, a symlink not followed. `name` must be one path component.
/// Never `EINTR`.
pub fn fstatat_nofollow(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Stat> {
    let c = one_name(name)?;
    // SAFETY: stat is plain old data; fstatat fills it.
    let mut st: libc::stat = unsafe { mem::zeroed() };
    // SAFETY: dir is open, c NUL-terminated, st writable.
    cvt(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            c.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(Stat::from(&st))
}

/// `unlinkat(dir, name, 0)`: removes the entry `name` of `dir` (never a
/// directory; a symlink itself, not its target). `name` must be one path
/// component. Never `EINTR`.
pub fn unlinkat(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let c = one_name(name)?;
    // SAFETY: dir is open, c NUL-terminated.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn unlinkat_removes_the_entry_and_not_what_a_symlink_names() {
        let dir = std::env::temp_dir().join(format!("syncluster-fs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("target"), b"keep").unwrap();
        std::os::unix::fs::symlink(dir.join("target"), dir.join("link")).unwrap();
        let d = open_dir(&dir).unwrap();
        assert!(fstat(d.as_fd()).unwrap().is_dir());
        let link = fstatat_nofollow(d.as_fd(), OsStr::new("link")).unwrap();
        let target = fstatat_nofollow(d.as_fd(), OsStr::new("target")).unwrap();
        assert!(!link.same_file(&target));
        assert!(!target.is_socket());
        unlinkat(d.as_fd(), OsStr::new("link")).unwrap();
        assert!(dir.join("target").exists());
        assert!(unlinkat(d.as_fd(), OsStr::new("../x")).is_err());
        assert!(stat(&dir.join("target")).unwrap().same_file(&target));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
