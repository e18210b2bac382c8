//! The only module that calls `libc` or writes `unsafe` (≈ libuv's `src/unix`).
//!
//! Thin, one-to-one wrappers: `BorrowedFd`/`impl AsFd` in, `OwnedFd` or std
//! types out. Every fd is created close-on-exec atomically. Each wrapper's doc
//! names the C call and says whether it retries `EINTR`.

use std::io;

pub mod epoll;
pub mod fd;
pub mod fs;
pub mod inherit;
pub mod limits;
pub mod msg;
pub mod pidfd;
pub mod poll;
pub mod process;
pub mod signal;
pub mod socket;
pub mod time;
pub mod user;

#[cfg(test)]
pub(crate) mod tests;

/// Values a syscall returns to say "failed, see errno".
pub trait IsMinusOne: Copy {
    /// True for the failure sentinel `-1`.
    fn is_minus_one(self) -> bool;
}

macro_rules! impl_is_minus_one {
    ($($t:ident)*) => ($(impl IsMinusOne for $t {
        fn is_minus_one(self) -> bool { self == -1 }
    })*)
}
impl_is_minus_one! { i8 i16 i32 i64 isize }

/// Maps `-1` to `io::Error::last_os_error()` (std's `cvt`). Never retries.
pub fn cvt<T: IsMinusOne>(t: T) -> io::Result<T> {
    if t.is_minus_one() {
        Err(io::Error::last_os_error())
    } else {
        Ok(t)
    }
}

/// Like [`cvt`], but calls `f` again while it fails with `EINTR` (std's `cvt_r`).
pub fn cvt_r<T: IsMinusOne>(mut f: impl FnMut() -> T) -> io::Result<T> {
    loop {
        match cvt(f()) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}
