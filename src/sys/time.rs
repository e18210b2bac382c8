//! Clocks whose raw values other programs read (std's `Instant` hides its).

use std::io;
use std::mem;

use super::cvt;

/// `clock_gettime(CLOCK_MONOTONIC)` in microseconds: what systemd's
/// `MONOTONIC_USEC=` wants. Never fails on Linux; an error is returned
/// rather than assumed away.
pub fn monotonic_usec() -> io::Result<u64> {
    // SAFETY: timespec is plain old data; all-zero is a valid value.
    let mut ts: libc::timespec = unsafe { mem::zeroed() };
    // SAFETY: ts is a valid, writable timespec.
    cvt(unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) })?;
    Ok(ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000)
}
