//! Payloads of the internal frames (≈ the `NODE_CLUSTER` acts of Node's
//! cluster), shared by `primary` and `worker`. Pure encode/decode.
//!
//! | kind | seq | payload | fds |
//! |---|---|---|---|
//! | Online | 0 | empty | 0 |
//! | QueryServer | request id | [`Query`] | 0 |
//! | QueryReply | request id | ok: handle u32, policy u8, address; err: errno i32, message | shared: 1 |
//! | Listening | handle | empty | 0 |
//! | NewConn | handle | one u32 connection id per fd | n |
//! | ConnReply | handle | u32 connection ids; flag [`REJECTED`] | 0 |
//! | Close | handle | empty | 0 |
//! | Disconnect | 0 | empty | 0 |
//! | ExitedAfterDisconnect | request id | empty (answered by Ack) | 0 |
//! | User | 0 | user bytes | any |

#![forbid(unsafe_code)]

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

/// ConnReply flag: the ids were rejected (re-route them), not accepted.
pub const REJECTED: u8 = 1;
/// QueryReply flag: the payload is an error.
pub const ERROR: u8 = 1;

/// How connections reach workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// The primary accepts and hands each connection over (Node's `SCHED_RR`).
    RoundRobin,
    /// Workers accept on a shared listening socket (Node's `SCHED_NONE`).
    Shared,
}

impl Policy {
    /// Reads `rr`, `none` or `shared`.
    pub fn parse(s: &str) -> Option<Policy> {
        match s {
            "rr" => Some(Policy::RoundRobin),
            "none" | "shared" => Some(Policy::Shared),
            _ => None,
        }
    }

    /// `rr` or `shared`.
    pub fn name(self) -> &'static str {
        match self {
            Policy::RoundRobin => "rr",
            Policy::Shared => "shared",
        }
    }
}

/// Where a worker wants to listen.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A TCP port; `None` host means `::` with a fallback to `0.0.0.0`.
    Tcp(Option<IpAddr>, u16),
    /// A Unix socket path, absolute.
    Unix(PathBuf),
    /// `fd:NAME`: the socket the primary inherited under this name
    /// (systemd's `FileDescriptorName=`, kept across a binary upgrade). It
    /// is never bound: a name nothing was inherited under is an error.
    Name(String),
}

/// The longest fd name systemd accepts (`FileDescriptorName=`).
pub const MAX_FD_NAME: usize = 255;

/// A valid fd name, as systemd's `fdname_is_valid`: 1 to 255 printable
/// ASCII characters, no `:` (the separator of `LISTEN_FDNAMES`).
pub fn valid_fd_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_FD_NAME
        && name
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b':')
}

impl Endpoint {
    /// Parses `"host:port"`, `"[v6]:port"`, `"port"`, `":port"`,
    /// `"fd:NAME"` (an inherited socket by name) or a path (anything else
    /// with a `/`). A relative path is taken from the current directory, as
    /// Node resolves it in the worker.
    pub fn parse(s: &str) -> io::Result<Endpoint> {
        let bad = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad listen address {s:?}: {why}"),
            )
        };
        if let Some(name) = s.strip_prefix("fd:") {
            if !valid_fd_name(name) {
                return Err(bad(
                    "an fd name is 1 to 255 printable ASCII characters without ':'",
                ));
            }
            return Ok(Endpoint::Name(name.to_string()));
        }
        if s.contains('/') {
            let p = PathBuf::from(s);
            let p = if p.is_absolute() {
                p
            } else {
                std::env::current_dir()?.join(p)
            };
            return Ok(Endpoint::Unix(p));
        }
        if let Ok(port) = s.parse::<u16>() {
            return Ok(Endpoint::Tcp(None, port));
        }
        if let Some(port) = s.strip_prefix(':') {
            let port = port
                .parse::<u16>()
                .map_err(|_| bad("port is not 0..65535"))?;
            return Ok(Endpoint::Tcp(None, port));
        }
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(Endpoint::Tcp(Some(sa.ip()), sa.port()));
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| bad("expected host:port, a port or a path"))?;
        let port = port
            .parse::<u16>()
            .map_err(|_| bad("port is not 0..65535"))?;
        let ip = match host {
            "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
            "" | "*" => return Ok(Endpoint::Tcp(None, port)),
            h => h
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .map_err(|_| bad("host is not an IP address or localhost"))?,
        };
        Ok(Endpoint::Tcp(Some(ip), port))
    }

    /// Node's handle key prefix: `address:port:family`.
    pub fn key(&self) -> String {
        match self {
            Endpoint::Tcp(Some(IpAddr::V4(ip)), port) => format!("{ip}:{port}:4"),
            Endpoint::Tcp(Some(IpAddr::V6(ip)), port) => format!("{ip}:{port}:6"),
            Endpoint::Tcp(None, port) => format!(":{port}:"),
            Endpoint::Unix(p) => format!("{}:-1:unix", p.display()),
            Endpoint::Name(n) => format!("fdname:{n}"),
        }
    }

    /// The any-address to bind first when no host was given.
    pub fn unspecified_v6(port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)
    }
}

/// The QueryServer payload: which endpoint, its per-worker index, backlog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Where to listen.
    pub endpoint: Endpoint,
    /// The k-th listen of this worker on the same endpoint (Node's index).
    pub index: u32,
    /// `listen(2)` backlog; 0 means the primary's default.
    pub backlog: u32,
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> io::Result<&'a [u8]> {
    if buf.len() < n {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "internal message payload too short",
        ));
    }
    let (head, tail) = buf.split_at(n);
    *buf = tail;
    Ok(head)
}

fn take_u32(buf: &mut &[u8]) -> io::Result<u32> {
    let b = take(buf, 4)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

impl Query {
    /// Encodes: tag u8 (0 ip, 1 any, 2 unix, 4 name), index u32, backlog
    /// u32, port u16, text.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32);
        let (tag, port, text) = match &self.endpoint {
            Endpoint::Tcp(Some(ip), port) => (0u8, *port, ip.to_string().into_bytes()),
            Endpoint::Tcp(None, port) => (1u8, *port, Vec::new()),
            Endpoint::Unix(p) => {
                use std::os::unix::ffi::OsStrExt;
                (2u8, 0, p.as_os_str().as_bytes().to_vec())
            }
            Endpoint::Name(n) => (4u8, 0, n.clone().into_bytes()),
        };
        out.push(tag);
        out.extend_from_slice(&self.index.to_le_bytes());
        out.extend_from_slice(&self.backlog.to_le_bytes());
        out.extend_from_slice(&port.to_le_bytes());
        out.extend_from_slice(&text);
        out
    }

    /// Decodes what [`Query::encode`] wrote; anything else is `InvalidData`.
    pub fn decode(mut buf: &[u8]) -> io::Result<Query> {
        let bad = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad query-server payload: {why}"),
            )
        };
        let tag = take(&mut buf, 1)?[0];
        let index = take_u32(&mut buf)?;
        let backlog = take_u32(&mut buf)?;
        let p = take(&mut buf, 2)?;
        let port = u16::from_le_bytes([p[0], p[1]]);
        let endpoint = match tag {
            0 => {
                let s = std::str::from_utf8(buf).map_err(|_| bad("address is not UTF-8"))?;
                Endpoint::Tcp(
                    Some(s.parse().map_err(|_| bad("address is not an IP"))?),
                    port,
                )
            }
            1 => Endpoint::Tcp(None, port),
            2 => {
                use std::os::unix::ffi::OsStrExt;
                if buf.is_empty() || buf.contains(&0) {
                    return Err(bad("empty path or NUL in path"));
                }
                if buf[0] != b'/' {
                    // The worker resolves a relative path in its own cwd.
                    return Err(bad("path is not absolute"));
                }
                Endpoint::Unix(PathBuf::from(std::ffi::OsStr::from_bytes(buf)))
            }
            4 => {
                let s = std::str::from_utf8(buf).map_err(|_| bad("fd name is not UTF-8"))?;
                if !valid_fd_name(s) {
                    return Err(bad("not a valid fd name"));
                }
                Endpoint::Name(s.to_string())
            }
            _ => return Err(bad("unknown endpoint tag")),
        };
        Ok(Query {
            endpoint,
            index,
            backlog,
        })
    }
}

/// Encodes a successful QueryReply: handle id, policy, bound address text.
pub fn encode_reply_ok(handle: u32, policy: Policy, address: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + address.len());
    out.extend_from_slice(&handle.to_le_bytes());
    out.push(match policy {
        Policy::RoundRobin => 0,
        Policy::Shared => 1,
    });
    out.extend_from_slice(address.as_bytes());
    out
}

/// Decodes a successful QueryReply.
pub fn decode_reply_ok(mut buf: &[u8]) -> io::Result<(u32, Policy, String)> {
    let handle = take_u32(&mut buf)?;
    let policy = match take(&mut buf, 1)?[0] {
        0 => Policy::RoundRobin,
        1 => Policy::Shared,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad policy in query reply",
            ))
        }
    };
    Ok((handle, policy, String::from_utf8_lossy(buf).into_owned()))
}

/// Encodes a failed QueryReply: errno (0 if none) and the message.
pub fn encode_reply_err(errno: Option<i32>, e: &io::Error) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&errno.or(e.raw_os_error()).unwrap_or(0).to_le_bytes());
    out.extend_from_slice(e.to_string().as_bytes());
    out
}

/// Decodes a failed QueryReply back into an `io::Error` with the same errno
/// (so `kind()` is `AddrInUse`, `PermissionDenied`…) and the primary's text.
pub fn decode_reply_err(mut buf: &[u8]) -> io::Error {
    let errno = take_u32(&mut buf).map(|v| v as i32).unwrap_or(0);
    let text = String::from_utf8_lossy(buf).into_owned();
    if errno != 0 {
        let kind = io::Error::from_raw_os_error(errno).kind();
        io::Error::new(kind, text)
    } else {
        io::Error::new(io::ErrorKind::Other, text)
    }
}

/// Encodes a list of u32 ids (NewConn, ConnReply).
pub fn encode_ids(ids: &[u32], out: &mut Vec<u8>) {
    out.reserve(ids.len() * 4);
    for id in ids {
        out.extend_from_slice(&id.to_le_bytes());
    }
}

/// Decodes a list of u32 ids; a length that is not a multiple of 4 is `InvalidData`.
pub fn decode_ids(buf: &[u8]) -> io::Result<impl Iterator<Item = u32> + '_> {
    if buf.len() % 4 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "id list length is not a multiple of 4",
        ));
    }
    Ok(buf
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_like_node() {
        assert_eq!(Endpoint::parse("8000").unwrap(), Endpoint::Tcp(None, 8000));
        assert_eq!(Endpoint::parse(":0").unwrap(), Endpoint::Tcp(None, 0));
        assert_eq!(
            Endpoint::parse("127.0.0.1:80").unwrap(),
            Endpoint::Tcp(Some("127.0.0.1".parse().unwrap()), 80)
        );
        assert_eq!(
            Endpoint::parse("[::1]:9").unwrap(),
            Endpoint::Tcp(Some("::1".parse().unwrap()), 9)
        );
        assert_eq!(
            Endpoint::parse("localhost:1").unwrap(),
            Endpoint::Tcp(Some("127.0.0.1".parse().unwrap()), 1)
        );
        assert_eq!(
            Endpoint::parse("/tmp/x.sock").unwrap(),
            Endpoint::Unix("/tmp/x.sock".into())
        );
        assert_eq!(
            Endpoint::parse("fd:http").unwrap(),
            Endpoint::Name("http".into())
        );
        assert_eq!(
            Endpoint::parse("fd:a/b").unwrap(),
            Endpoint::Name("a/b".into())
        );
        for bad in [
            "",
            "host",
            "1.2.3.4:70000",
            "nope:1",
            "1.2.3.4:",
            "fd:",
            "fd:a:b",
            "fd:\u{7f}",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn query_round_trips_and_rejects_garbage() {
        for ep in [
            Endpoint::Tcp(None, 0),
            Endpoint::Tcp(Some("::1".parse().unwrap()), 443),
            Endpoint::Unix("/run/a.sock".into()),
            Endpoint::Name("web".into()),
        ] {
            let q = Query {
                endpoint: ep,
                index: 3,
                backlog: 511,
            };
            assert_eq!(Query::decode(&q.encode()).unwrap(), q);
        }
        assert!(Query::decode(&[]).is_err());
        assert!(Query::decode(&[9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(Query::decode(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, b'x']).is_err());
        assert!(Query::decode(&[2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, b'x']).is_err());
        assert!(Query::decode(&[4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(Query::decode(&[4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, b':']).is_err());
    }

    #[test]
    fn reply_error_keeps_errno_kind() {
        let e = io::Error::from_raw_os_error(98);
        let back = decode_reply_err(&encode_reply_err(None, &e));
        assert_eq!(back.kind(), io::ErrorKind::AddrInUse);
        assert!(decode_ids(&[1, 2, 3]).is_err());
    }
}
