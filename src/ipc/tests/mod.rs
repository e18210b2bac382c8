//! Tests of the channel with real processes and real fds (moved in from
//! `tests/`, where they could only reach `ipc` while it was public).

mod channel;
mod fd_hygiene;
