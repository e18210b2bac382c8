//! Payloads of the internal frames (≈ the `NODE_CLUSTER` acts of Node's
//! cluster), shared by `primary` and `worker`. Pure encode/decode.
//!
//! | kind | seq | payload | fds |
//! |---|---|---|---|
//! | Online | 0 | empty | 0 |
//! | QueryServer | request id | [`Query`] (endpoint, index, backlog, [`QueryFlags`]) | 0 |
//! | QueryReply | request id | ok: handle u32, policy u8, address; err: errno i32, message | shared: the socket; rr, least-loaded: the pipe; reuseport: both |
//! | Listening | handle | empty | 0 |
//! | ConnReply | handle | flag [`LOAD`]: the worker's open connections u32 (a load report: back in its loop, or a [`FULL`] record read); flag [`REJECTED`]: give back what is unread in the handle's pipe. No ids: a worker takes a connection by reading it | 0 |
//! | Close | handle | empty | 0 |
//! | Disconnect | 0 | empty | 0 |
//! | ExitedAfterDisconnect | request id | empty (answered by Ack) | 0 |
//! | Count | how many more | empty; flag [`REQUESTS`]: requests served, else connections taken from shared sockets | 0 |
//! | User | 0 | user bytes | any |
//!
//! Connections do not travel on the channel. Each (worker, handle) that
//! hands over has a pipe: a Unix stream the primary writes [`RECORD`]-byte
//! records to (connection id u32, flags u32, the connection's fd on the
//! first byte) and the worker reads one record at a time. Reading a record
//! is taking the connection: there is no acknowledgement. The primary
//! keeps a copy of the worker's end, so `FIONREAD` on it counts what is
//! not taken yet, and on the worker's death or close it reads back what
//! was never taken and hands it to another worker.

#![forbid(unsafe_code)]

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

/// ConnReply flag: the ids were rejected (re-route them), not accepted.
pub const REJECTED: u8 = 1;
/// ConnReply flag: the payload starts with the worker's count of open
/// connections (u32), before the ids. With no ids it is a load report.
pub const LOAD: u8 = 2;
/// Bytes of one pipe record: connection id u32, flags u32 (little endian).
pub const RECORD: usize = 8;
/// Record flag: this connection filled the worker's window; taking it,
/// the worker sends a load report, so a primary with connections waiting
/// refills the window at once.
pub const FULL: u32 = 1;
/// Record flag: no connection; look at the channel (a worker blocked
/// reading its pipe is woken for a Disconnect).
pub const WAKE: u32 = 2;

/// Encodes a pipe record.
pub fn encode_record(id: u32, flags: u32) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[..4].copy_from_slice(&id.to_le_bytes());
    r[4..].copy_from_slice(&flags.to_le_bytes());
    r
}

/// Decodes a pipe record: (connection id, flags).
pub fn decode_record(r: &[u8; RECORD]) -> (u32, u32) {
    (
        u32::from_le_bytes([r[0], r[1], r[2], r[3]]),
        u32::from_le_bytes([r[4], r[5], r[6], r[7]]),
    )
}

/// Every flag a ConnReply may carry.
pub const REPLY_FLAGS: u8 = REJECTED | LOAD;
/// QueryReply flag: the payload is an error.
pub const ERROR: u8 = 1;
/// Count flag: the count is of requests the program served
/// (`Worker::note_requests`), not of connections taken.
pub const REQUESTS: u8 = 1;

/// Options of a [`Query`], one bit each (Node's `serverQuery` fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct QueryFlags(u8);

impl QueryFlags {
    /// A UDP socket (Node's `dgram`, always shared), not a TCP listener.
    pub const UDP: QueryFlags = QueryFlags(1);
    /// `IPV6_V6ONLY` on an IPv6 socket (Node's `ipv6Only`).
    pub const IPV6_ONLY: QueryFlags = QueryFlags(2);
    /// Unix socket file readable by all (Node's `readableAll`).
    pub const READABLE_ALL: QueryFlags = QueryFlags(4);
    /// Unix socket file writable by all (Node's `writableAll`).
    pub const WRITABLE_ALL: QueryFlags = QueryFlags(8);
    /// `TCP_DEFER_ACCEPT` on the listening socket (nginx's `deferred`); not
    /// part of the key: the primary sets it on the socket when asked.
    pub const DEFER_ACCEPT: QueryFlags = QueryFlags(16);
    const ALL: u8 = 31;

    /// No option.
    pub const fn empty() -> QueryFlags {
        QueryFlags(0)
    }

    /// The bits, as they travel.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// The flags of `bits`; `None` if an unknown bit is set.
    pub const fn from_bits(bits: u8) -> Option<QueryFlags> {
        if bits & !Self::ALL != 0 {
            None
        } else {
            Some(QueryFlags(bits))
        }
    }

    /// True when every bit of `other` is set.
    pub const fn contains(self, other: QueryFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// `self` with `other`'s bits set too.
    pub const fn with(self, other: QueryFlags) -> QueryFlags {
        QueryFlags(self.0 | other.0)
    }
}

/// How connections reach workers. Spelled `rr`, `shared`, `least-loaded`
/// and `reuseport` (Node's `none` is read as `shared` too, everywhere a
/// policy is read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Policy {
    /// The primary accepts and hands each connection over (Node's `SCHED_RR`).
    RoundRobin,
    /// Workers accept on a shared listening socket (Node's `SCHED_NONE`).
    Shared,
    /// The primary accepts and hands each connection to the worker holding
    /// the fewest connections (open, plus handed over and not yet taken)
    /// that has room in its window; ties go round robin, and with more than
    /// four workers two random ones are compared (power of two choices).
    /// The primary sees a worker take connections in its pipe, and workers
    /// report their open count back in their loop with nothing to do after
    /// taking a connection or closing some, in a small report (at most one a
    /// millisecond: no frame per request under load). A worker that sits on
    /// a connection (blocked on a slow request) gets at most one more; then
    /// connections wait in the primary for the first worker that can take
    /// them.
    LeastLoaded,
    /// One `SO_REUSEPORT` socket per worker slot: each worker accepts on
    /// its own and the kernel spreads connections among them, so the
    /// primary spends nothing per connection. The primary keeps a copy of
    /// every slot's socket: a worker that dies loses no queued connection
    /// (its replacement takes the same socket, or after 250 ms the primary
    /// hands the queue to the others), and the socket of a worker that
    /// leaves is served by the primary in round robin until another worker
    /// takes the slot (or closed, where `net.ipv4.tcp_migrate_req` is 1,
    /// the kernel then moving its queue): after a scale down, or a rolling
    /// reload (which starts each new worker before the old one leaves),
    /// one slot's share goes through the primary until the next worker
    /// comes. TCP only: a Unix socket, an offered fd (`Primary::listen_fd`)
    /// and UDP are shared.
    ReusePort,
}

impl Policy {
    /// Reads `rr` (or `round-robin`), `shared` (or `none`), `least-loaded`
    /// and `reuseport` (or `reuse-port`).
    pub fn parse(s: &str) -> Option<Policy> {
        match s {
            "rr" | "round-robin" => Some(Policy::RoundRobin),
            "none" | "shared" => Some(Policy::Shared),
            "least-loaded" => Some(Policy::LeastLoaded),
            "reuseport" | "reuse-port" => Some(Policy::ReusePort),
            _ => None,
        }
    }

    /// `rr`, `shared`, `least-loaded` or `reuseport`.
    pub fn name(self) -> &'static str {
        match self {
            Policy::RoundRobin => "rr",
            Policy::Shared => "shared",
            Policy::LeastLoaded => "least-loaded",
            Policy::ReusePort => "reuseport",
        }
    }

    /// The spellings [`Policy::parse`] reads, for error messages.
    pub(crate) const EXPECTED: &'static str = "rr, shared (none), least-loaded or reuseport";

    /// The primary accepts on the handle's socket and hands connections over.
    pub(crate) fn primary_accepts(self) -> bool {
        matches!(self, Policy::RoundRobin | Policy::LeastLoaded)
    }

    /// Connections may reach a worker through its pipe (reuseport: those
    /// the primary takes from a slot no worker serves).
    pub(crate) fn hands_over(self) -> bool {
        !matches!(self, Policy::Shared)
    }

    /// The query reply carries a listening socket the worker accepts on.
    pub(crate) fn worker_accepts(self) -> bool {
        matches!(self, Policy::Shared | Policy::ReusePort)
    }

    fn to_wire(self) -> u8 {
        match self {
            Policy::RoundRobin => 0,
            Policy::Shared => 1,
            Policy::LeastLoaded => 2,
            Policy::ReusePort => 3,
        }
    }

    fn from_wire(b: u8) -> Option<Policy> {
        Some(match b {
            0 => Policy::RoundRobin,
            1 => Policy::Shared,
            2 => Policy::LeastLoaded,
            3 => Policy::ReusePort,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Policy {
    type Err = io::Error;

    /// [`Policy::parse`], with an `InvalidInput` error naming the value.
    fn from_str(s: &str) -> io::Result<Policy> {
        Policy::parse(s).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("policy {s:?}: expected {}", Policy::EXPECTED),
            )
        })
    }
}

/// Where a worker wants to listen.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A TCP port; `None` host means `::` with a fallback to `0.0.0.0`.
    Tcp(Option<IpAddr>, u16),
    /// A Unix socket path, absolute and normalized.
    Unix(PathBuf),
    /// A socket the program gave the primary with `Primary::listen_fd`,
    /// named by its fd number in the primary (Node's `listen({fd})`).
    Fd(i32),
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
    /// Parses `"host:port"`, `"[v6]:port"`, `"port"`, `":port"`, `"fd:NAME"`
    /// (a socket the primary inherited under that name) or a Unix socket
    /// path, as Node's `listen` reads a string: anything with a `/`
    /// is a path, so is a word with no `:` that is not a number (`s.sock`,
    /// `localhost`). A relative path is resolved against the current
    /// directory and normalized as Node's `path.resolve` does (`.`, `..`
    /// and repeated slashes, without looking at the file system), so two
    /// spellings of one file share one handle.
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
        if s.is_empty() {
            return Err(bad("empty"));
        }
        if s.contains('/') {
            return Ok(Endpoint::Unix(resolve_path(s)?));
        }
        if s.bytes().all(|b| b.is_ascii_digit()) {
            let port = s.parse::<u16>().map_err(|_| bad("port is not 0..65535"))?;
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
        let Some((host, port)) = s.rsplit_once(':') else {
            // A bare name: a Unix socket in the current directory.
            return Ok(Endpoint::Unix(resolve_path(s)?));
        };
        let port = port.parse::<u16>().map_err(|_| {
            bad("port is not 0..65535 (a Unix socket path with a ':' needs a '/': ./a:b)")
        })?;
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
            Endpoint::Fd(n) => format!("fd:{n}"),
            Endpoint::Name(n) => format!("fdname:{n}"),
        }
    }

    /// How error messages name it: `127.0.0.1:80`, `port 80`, a path, `fd 5`.
    pub fn describe(&self) -> String {
        match self {
            Endpoint::Tcp(Some(ip), port) => SocketAddr::new(*ip, *port).to_string(),
            Endpoint::Tcp(None, port) => format!("port {port}"),
            Endpoint::Unix(p) => p.display().to_string(),
            Endpoint::Fd(n) => format!("fd {n} of the primary"),
            Endpoint::Name(n) => format!("fd:{n}"),
        }
    }

    /// The any-address to bind first when no host was given.
    pub fn unspecified_v6(port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)
    }
}

/// Resolves `s` against the current directory and normalizes it as Node's
/// `path.resolve` does: lexically, `.` dropped, `..` taking off the
/// component before it (never above `/`), repeated and trailing slashes
/// dropped.
pub fn resolve_path(s: &str) -> io::Result<PathBuf> {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut full: Vec<u8> = Vec::new();
    if !s.starts_with('/') {
        let cwd = std::env::current_dir().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("relative Unix socket path {s:?}: no current directory: {e}"),
            )
        })?;
        full.extend_from_slice(cwd.as_os_str().as_bytes());
        full.push(b'/');
    }
    full.extend_from_slice(s.as_bytes());
    let mut parts: Vec<&[u8]> = Vec::new();
    for part in full.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    let mut out = Vec::with_capacity(full.len());
    for p in &parts {
        out.push(b'/');
        out.extend_from_slice(p);
    }
    if out.is_empty() {
        out.push(b'/');
    }
    Ok(PathBuf::from(std::ffi::OsString::from_vec(out)))
}

/// The QueryServer payload: which endpoint, its per-worker index, backlog
/// and options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Where to listen.
    pub endpoint: Endpoint,
    /// The k-th listen of this worker on the same endpoint (Node's index).
    pub index: u32,
    /// `listen(2)` backlog; 0 means the primary's default.
    pub backlog: u32,
    /// UDP, `IPV6_V6ONLY`, the Unix socket file's mode.
    pub flags: QueryFlags,
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
    /// Node's handle key without the index: the endpoint's, plus what makes
    /// another socket (UDP, `IPV6_V6ONLY`). The file mode is not part of it:
    /// whoever binds first sets it.
    pub fn key(&self) -> String {
        let mut key = self.endpoint.key();
        if self.flags.contains(QueryFlags::UDP) {
            key.push_str(":udp");
        }
        if self.flags.contains(QueryFlags::IPV6_ONLY) {
            key.push_str(":v6only");
        }
        key
    }

    /// Encodes: tag u8 (low 3 bits: 0 ip, 1 any, 2 unix, 3 fd, 4 name; high
    /// 5 bits: the flags), index u32, backlog u32, port u16, text (the
    /// address, the path, or the fd as u32). Without flags the tag is the
    /// endpoint kind alone.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32);
        let (tag, port, text) = match &self.endpoint {
            Endpoint::Tcp(Some(ip), port) => (0u8, *port, ip.to_string().into_bytes()),
            Endpoint::Tcp(None, port) => (1u8, *port, Vec::new()),
            Endpoint::Unix(p) => {
                use std::os::unix::ffi::OsStrExt;
                (2u8, 0, p.as_os_str().as_bytes().to_vec())
            }
            Endpoint::Fd(n) => (3u8, 0, n.to_le_bytes().to_vec()),
            Endpoint::Name(n) => (4u8, 0, n.clone().into_bytes()),
        };
        out.push(tag | self.flags.bits() << 3);
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
        let flags = QueryFlags::from_bits(tag >> 3).ok_or_else(|| bad("unknown flags"))?;
        let tag = tag & 0x07;
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
            3 => {
                let n = take_u32(&mut buf)? as i32;
                if n < 0 || !buf.is_empty() {
                    return Err(bad("bad fd number"));
                }
                Endpoint::Fd(n)
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
        let udp = flags.contains(QueryFlags::UDP);
        let mode =
            flags.contains(QueryFlags::READABLE_ALL) || flags.contains(QueryFlags::WRITABLE_ALL);
        let v6only = flags.contains(QueryFlags::IPV6_ONLY);
        if flags.contains(QueryFlags::DEFER_ACCEPT)
            && (udp || !matches!(endpoint, Endpoint::Tcp(..)))
        {
            return Err(bad(
                "TCP_DEFER_ACCEPT asked for a socket that is not a TCP address",
            ));
        }
        match &endpoint {
            Endpoint::Unix(_) if udp || v6only => {
                return Err(bad("UDP or IPV6_V6ONLY asked for a Unix socket"))
            }
            Endpoint::Tcp(..) | Endpoint::Fd(_) | Endpoint::Name(_) if mode => {
                return Err(bad("a file mode asked for a socket that has no file"))
            }
            Endpoint::Fd(_) | Endpoint::Name(_) if udp || v6only => {
                return Err(bad("UDP or IPV6_V6ONLY asked for the program's own socket"))
            }
            Endpoint::Tcp(Some(IpAddr::V4(_)), _) if v6only => {
                return Err(bad("IPV6_V6ONLY asked for an IPv4 address"))
            }
            _ => {}
        }
        Ok(Query {
            endpoint,
            index,
            backlog,
            flags,
        })
    }
}

/// Encodes a successful QueryReply: handle id, policy, bound address text.
pub fn encode_reply_ok(handle: u32, policy: Policy, address: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + address.len());
    out.extend_from_slice(&handle.to_le_bytes());
    out.push(policy.to_wire());
    out.extend_from_slice(address.as_bytes());
    out
}

/// Decodes a successful QueryReply.
pub fn decode_reply_ok(mut buf: &[u8]) -> io::Result<(u32, Policy, String)> {
    let handle = take_u32(&mut buf)?;
    let policy = Policy::from_wire(take(&mut buf, 1)?[0])
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad policy in query reply"))?;
    Ok((handle, policy, String::from_utf8_lossy(buf).into_owned()))
}

/// An errno whose `ErrorKind` is `kind`, for the kinds a refused query
/// carries without one (`InvalidInput`: a path too long, a bad option).
fn errno_of_kind(kind: io::ErrorKind) -> Option<i32> {
    match kind {
        io::ErrorKind::InvalidInput => Some(22),     // EINVAL
        io::ErrorKind::PermissionDenied => Some(13), // EACCES
        io::ErrorKind::NotFound => Some(2),          // ENOENT
        io::ErrorKind::AddrInUse => Some(98),        // EADDRINUSE
        _ => None,
    }
}

/// Encodes a failed QueryReply: errno (0 if none) and the message. An
/// error with no errno gets one for its kind where one fits, so that the
/// worker's `listen()` sees the same `ErrorKind`.
pub fn encode_reply_err(errno: Option<i32>, e: &io::Error) -> Vec<u8> {
    let mut out = Vec::new();
    let errno = errno
        .or(e.raw_os_error())
        .or_else(|| errno_of_kind(e.kind()))
        .unwrap_or(0);
    out.extend_from_slice(&errno.to_le_bytes());
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
pub fn decode_ids(buf: &[u8]) -> io::Result<impl ExactSizeIterator<Item = u32> + '_> {
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

/// Encodes a ConnReply payload: the open count (with [`LOAD`]), then the ids.
pub fn encode_conn_reply(load: Option<u32>, ids: &[u32], out: &mut Vec<u8>) {
    if let Some(n) = load {
        out.extend_from_slice(&n.to_le_bytes());
    }
    encode_ids(ids, out);
}

/// Decodes a ConnReply payload: the open count when `flags` has [`LOAD`],
/// and the ids. A short or ragged payload is `InvalidData`.
pub fn decode_conn_reply(
    flags: u8,
    mut buf: &[u8],
) -> io::Result<(Option<u32>, impl ExactSizeIterator<Item = u32> + '_)> {
    let load = if flags & LOAD != 0 {
        Some(take_u32(&mut buf)?)
    } else {
        None
    };
    Ok((load, decode_ids(buf)?))
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
        let cwd = std::env::current_dir().unwrap();
        // A bare word is a path in the current directory, as in Node.
        for word in ["s.sock", "host", "localhost"] {
            assert_eq!(
                Endpoint::parse(word).unwrap(),
                Endpoint::Unix(cwd.join(word)),
                "{word}"
            );
        }
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
            "fd:",
            "fd:a:b",
            "fd:\u{7f}",
            "70000",
            "1.2.3.4:70000",
            "nope:1",
            "1.2.3.4:",
            "a:b.sock",
        ] {
            let e = Endpoint::parse(bad).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
    }

    #[test]
    fn unix_paths_resolve_and_normalize_like_path_resolve() {
        let cwd = std::env::current_dir().unwrap();
        let ok = |s: &str, want: PathBuf| assert_eq!(resolve_path(s).unwrap(), want, "{s}");
        ok("/a//b/./c/../d.sock", "/a/b/d.sock".into());
        ok("/../../x", "/x".into());
        ok("/", "/".into());
        ok("./s.sock", cwd.join("s.sock"));
        ok("sub/../s.sock", cwd.join("s.sock"));
        ok("sub//s.sock/", cwd.join("sub/s.sock"));
        assert_eq!(
            Endpoint::parse("./x/../s.sock").unwrap(),
            Endpoint::parse("s.sock").unwrap()
        );
    }

    #[test]
    fn query_round_trips_and_rejects_garbage() {
        let udp = QueryFlags::UDP.with(QueryFlags::IPV6_ONLY);
        let mode = QueryFlags::READABLE_ALL.with(QueryFlags::WRITABLE_ALL);
        for (ep, flags) in [
            (Endpoint::Tcp(None, 0), QueryFlags::empty()),
            (Endpoint::Tcp(Some("::1".parse().unwrap()), 443), udp),
            (Endpoint::Unix("/run/a.sock".into()), mode),
            (Endpoint::Fd(7), QueryFlags::empty()),
            (Endpoint::Name("web".into()), QueryFlags::empty()),
        ] {
            let q = Query {
                endpoint: ep,
                index: 3,
                backlog: 511,
                flags,
            };
            assert_eq!(Query::decode(&q.encode()).unwrap(), q);
        }
        let head = |tag: u8, flags: u8| vec![tag | flags << 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(Query::decode(&[]).is_err());
        assert!(Query::decode(&head(7, 0)).is_err());
        assert!(Query::decode(&[head(0, 0), b"x".to_vec()].concat()).is_err());
        assert!(Query::decode(&[head(2, 0), b"x".to_vec()].concat()).is_err());
        // Unknown flags, and flags that do not fit the endpoint.
        assert!(Query::decode(&[head(2, 0), b"/x".to_vec()].concat()).is_ok());
        assert!(Query::decode(&[head(5, 0), b"/x".to_vec()].concat()).is_err());
        // A name must be a valid fd name.
        assert!(Query::decode(&head(4, 0)).is_err());
        assert!(Query::decode(&[head(4, 0), b":".to_vec()].concat()).is_err());
        assert!(Query::decode(&[head(2, 1), b"/x".to_vec()].concat()).is_err());
        assert!(Query::decode(&head(1, 4)).is_err());
        assert!(Query::decode(&head(1, 16)).is_ok());
        assert!(Query::decode(&[head(2, 16), b"/x".to_vec()].concat()).is_err());
        assert!(Query::decode(&head(1, 17)).is_err());
        assert!(Query::decode(&[head(0, 2), b"1.2.3.4".to_vec()].concat()).is_err());
        assert!(Query::decode(&[head(3, 0), vec![0xff; 4]].concat()).is_err());
        // UDP and v6-only make another handle key; the mode does not.
        let q = |flags| Query {
            endpoint: Endpoint::Tcp(None, 5),
            index: 0,
            backlog: 0,
            flags,
        };
        assert_ne!(q(QueryFlags::UDP).key(), q(QueryFlags::empty()).key());
        assert_ne!(q(QueryFlags::IPV6_ONLY).key(), q(QueryFlags::empty()).key());
        // A socket option set on the socket whenever asked, as the mode.
        assert_eq!(
            q(QueryFlags::DEFER_ACCEPT).key(),
            q(QueryFlags::empty()).key()
        );
    }

    #[test]
    fn reply_error_keeps_errno_kind() {
        let e = io::Error::from_raw_os_error(98);
        let back = decode_reply_err(&encode_reply_err(None, &e));
        assert_eq!(back.kind(), io::ErrorKind::AddrInUse);
        let e = io::Error::new(io::ErrorKind::InvalidInput, "path too long");
        let back = decode_reply_err(&encode_reply_err(None, &e));
        assert_eq!(back.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(back.to_string(), "path too long");
        assert!(decode_ids(&[1, 2, 3]).is_err());
    }

    #[test]
    fn conn_reply_carries_the_load_before_the_ids() {
        let mut out = Vec::new();
        encode_conn_reply(Some(7), &[1, 2], &mut out);
        let (load, ids) = decode_conn_reply(LOAD, &out).unwrap();
        assert_eq!((load, ids.collect::<Vec<_>>()), (Some(7), vec![1, 2]));
        // A load report: the count alone.
        let mut out = Vec::new();
        encode_conn_reply(Some(3), &[], &mut out);
        let (load, ids) = decode_conn_reply(LOAD, &out).unwrap();
        assert_eq!((load, ids.count()), (Some(3), 0));
        // Without the flag the same bytes are ids.
        let (load, ids) = decode_conn_reply(0, &out).unwrap();
        assert_eq!((load, ids.collect::<Vec<_>>()), (None, vec![3]));
        assert!(decode_conn_reply(LOAD, &[1, 0]).is_err());
        assert!(decode_conn_reply(LOAD, &[1, 0, 0, 0, 9]).is_err());
    }

    #[test]
    fn every_policy_round_trips_by_name_and_on_the_wire() {
        for p in [
            Policy::RoundRobin,
            Policy::Shared,
            Policy::LeastLoaded,
            Policy::ReusePort,
        ] {
            assert_eq!(Policy::parse(p.name()), Some(p));
            assert_eq!(p.name().parse::<Policy>().unwrap(), p);
            let (h, back, addr) = decode_reply_ok(&encode_reply_ok(9, p, "1.2.3.4:5")).unwrap();
            assert_eq!((h, back, addr.as_str()), (9, p, "1.2.3.4:5"));
        }
        assert_eq!(Policy::parse("none"), Some(Policy::Shared));
        let e = "fastest".parse::<Policy>().unwrap_err();
        assert!(e.to_string().contains("least-loaded or reuseport"), "{e}");
        assert!(decode_reply_ok(&[1, 0, 0, 0, 4]).is_err());
    }
}
