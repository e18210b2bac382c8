//! Frames and fds over a socketpair; nothing here knows about clusters.

#![forbid(unsafe_code)]

pub mod channel;
pub mod wire;

#[cfg(test)]
mod tests;
