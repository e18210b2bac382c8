//! Signals as a type: a number checked once, when it is made, instead of a
//! raw `i32` that fails only when it is sent.

#![forbid(unsafe_code)]

use std::fmt;
use std::io;

use crate::sys::{process, signal as sys};

/// A signal number the kernel accepts (1 to 64, the glibc-reserved 32 and 33
/// excepted), such as the primary reports as `Event::Signal` or sends to a
/// worker with `Primary::kill`.
///
/// ```
/// use syncluster::Signal;
///
/// assert_eq!(Signal::TERM.to_string(), "SIGTERM");
/// assert_eq!(Signal::from_raw(15).unwrap(), Signal::TERM);
/// assert!(Signal::from_raw(0).is_err());
/// assert_eq!("SIGHUP".parse::<Signal>().unwrap(), Signal::HUP);
/// assert_eq!("hup".parse::<Signal>().unwrap(), Signal::HUP);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Signal(i32);

impl Signal {
    /// `SIGHUP`: a rolling reload, for the supervisor.
    pub const HUP: Signal = Signal(sys::SIGHUP);
    /// `SIGINT`: Ctrl-C.
    pub const INT: Signal = Signal(sys::SIGINT);
    /// `SIGQUIT`.
    pub const QUIT: Signal = Signal(sys::SIGQUIT);
    /// `SIGKILL`: cannot be caught.
    pub const KILL: Signal = Signal(sys::SIGKILL);
    /// `SIGUSR1`.
    pub const USR1: Signal = Signal(sys::SIGUSR1);
    /// `SIGUSR2`.
    pub const USR2: Signal = Signal(sys::SIGUSR2);
    /// `SIGTERM`: the polite stop `kill`, systemd and Docker send.
    pub const TERM: Signal = Signal(sys::SIGTERM);
    /// `SIGCHLD`.
    pub const CHLD: Signal = Signal(sys::SIGCHLD);
    /// `SIGTTIN`: one worker more, for the supervisor.
    pub const TTIN: Signal = Signal(sys::SIGTTIN);
    /// `SIGTTOU`: one worker fewer, for the supervisor.
    pub const TTOU: Signal = Signal(sys::SIGTTOU);

    /// Checks a raw signal number: `InvalidInput` unless the kernel would
    /// take it (1 to 64, but not 32 and 33, which glibc keeps for itself).
    pub fn from_raw(n: i32) -> io::Result<Signal> {
        if (1..=64).contains(&n) && n != 32 && n != 33 {
            Ok(Signal(n))
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{n} is not a signal number (1 to 64, but not 32 or 33)"),
            ))
        }
    }

    /// A number the kernel reported (`waitpid`, signalfd): valid by origin.
    pub(crate) fn from_kernel(n: i32) -> Signal {
        Signal(n)
    }

    /// The raw number, for `kill(2)` and C.
    pub fn as_raw(self) -> i32 {
        self.0
    }

    /// Its name, such as `"SIGTERM"` (`"SIGRT"` for a real-time signal).
    pub fn name(self) -> &'static str {
        process::signal_name(self.0)
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Signal {
    type Err = io::Error;

    /// Takes a name with or without `SIG`, any case (`TERM`, `sigterm`),
    /// or a number (`15`).
    fn from_str(s: &str) -> io::Result<Signal> {
        if let Ok(n) = s.parse::<i32>() {
            return Signal::from_raw(n);
        }
        let up = s.to_ascii_uppercase();
        let name = up.strip_prefix("SIG").unwrap_or(&up);
        (1..=31)
            .filter_map(|n| Signal::from_raw(n).ok())
            .find(|sig| &sig.name()[3..] == name)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{s:?} is not a signal name"),
                )
            })
    }
}

impl TryFrom<i32> for Signal {
    type Error = io::Error;
    fn try_from(n: i32) -> io::Result<Signal> {
        Signal::from_raw(n)
    }
}

impl From<Signal> for i32 {
    fn from(s: Signal) -> i32 {
        s.0
    }
}
