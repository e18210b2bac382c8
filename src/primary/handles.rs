//! Query-server and the listening handles: a worker asks for an address,
//! the primary binds it once per key and routes the worker to it
//! (≈ the `queryServer` half of Node's primary.js).

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use super::event_loop::TOKEN_HANDLE;
use super::policy::ListenRules;
use super::round_robin::Conn;
use super::shared::{self, Address, Named, UnixFile};
use super::workers::Pipe;
use super::Primary;
use crate::ipc::wire::Kind;
use crate::protocol::{self, Endpoint, Policy, Query, QueryFlags};
use crate::sys::{self, epoll};

// errno values a refused query carries to the worker's `listen()`.
const ENOENT: i32 = 2;
const EACCES: i32 = 13;
const EMFILE: i32 = 24;
const ECONNABORTED: i32 = 103;

/// A handle query-server gave a worker, until the worker closes it.
#[derive(Debug)]
pub(super) struct Grant {
    pub hid: u32,
    /// Answered and not yet reported listening: one `Listening` per answer.
    pub listening_owed: bool,
}

/// Why a query gets an error reply instead of a handle. It is not a
/// protocol error: the worker's `listen()` returns it and the worker goes on.
fn refused(errno: i32, kind: io::ErrorKind, text: String) -> io::Error {
    io::Error::new(
        kind,
        Named {
            errno: Some(errno),
            text,
        },
    )
}

/// One listening socket, shared by every worker whose key matches.
#[derive(Debug)]
pub(super) struct Handle {
    pub key: String,
    pub fd: OwnedFd,
    pub address: Address,
    pub policy: Policy,
    /// The socket file of a Unix handle, held for its `Drop`, which
    /// removes the file.
    #[allow(dead_code)]
    pub unix: Option<UnixFile>,
    /// Workers routed to, in the order they joined.
    pub workers: Vec<u32>,
    pub cursor: usize,
    pub queue: VecDeque<Conn>,
    /// Registered for readability in epoll.
    pub polling: bool,
    /// After `EMFILE`, accept again no sooner than this.
    pub paused_until: Option<Instant>,
    /// Its last worker died unexpectedly: kept open (not accepting) until
    /// this time for a replacement to listen on the same socket.
    pub orphaned_until: Option<Instant>,
    /// The program's own: bound by [`Primary::listen`] or inherited
    /// (socket activation, a binary upgrade). Workers that match it get it;
    /// it stays open when its last worker leaves.
    pub pinned: bool,
    /// The name it was inherited under (`fd:NAME` in a worker's `listen`).
    pub name: Option<String>,
}

impl Handle {
    pub fn add_worker(&mut self, id: u32) {
        if !self.workers.contains(&id) {
            self.workers.push(id);
        }
    }

    pub fn remove_worker(&mut self, id: u32) -> bool {
        let before = self.workers.len();
        if let Some(pos) = self.workers.iter().position(|&w| w == id) {
            self.workers.remove(pos);
            if self.cursor > pos {
                self.cursor -= 1;
            }
        }
        before != self.workers.len()
    }
}

impl Primary {
    // A query-server frame. Only a payload that does not decode, or a
    // reply that cannot be sent, is the worker's fault (`Err`: protocol
    // error); every refusal, and every failure of the primary's own
    // (EMFILE...), is an error reply and the worker goes on.
    pub(super) fn on_query(&mut self, id: u32, seq: u32, payload: &[u8]) -> io::Result<()> {
        let q = Query::decode(payload)?;
        let (hid, shared_fd, fresh) = match self.serve_query(id, &q) {
            Ok(v) => v,
            Err(e) => {
                let body = protocol::encode_reply_err(shared::errno_of(&e), &e);
                return self.send_frame(id, Kind::QueryReply, protocol::ERROR, seq, &body, &[]);
            }
        };
        let h = &self.handles[&hid];
        let body = protocol::encode_reply_ok(hid, h.policy, &h.address.to_string());
        let pipe = match self.pipe_for(id, hid) {
            Ok(p) => p,
            Err(e) => {
                if fresh {
                    self.ungrant(id, hid);
                }
                let e = shared::named_error(e, &self.handles[&hid].address.to_string());
                let body = protocol::encode_reply_err(shared::errno_of(&e), &e);
                return self.send_frame(id, Kind::QueryReply, protocol::ERROR, seq, &body, &[]);
            }
        };
        // The shared socket first, the pipe last.
        let fds: Vec<_> = shared_fd
            .iter()
            .chain(pipe.iter())
            .map(|fd| fd.as_fd())
            .collect();
        match self.send_frame(id, Kind::QueryReply, 0, seq, &body, &fds) {
            Ok(()) => {}
            // No fd left to queue the sockets with: our problem.
            Err(e) if !fds.is_empty() && matches!(e.raw_os_error(), Some(23 | 24 | 12)) => {
                drop(fds);
                if fresh {
                    self.ungrant(id, hid);
                }
                let e = shared::named_error(e, &self.handles[&hid].address.to_string());
                let body = protocol::encode_reply_err(shared::errno_of(&e), &e);
                return self.send_frame(id, Kind::QueryReply, protocol::ERROR, seq, &body, &[]);
            }
            Err(e) => return Err(e),
        }
        if self.handles[&hid].policy.hands_over() {
            self.distribute(hid, false);
        }
        Ok(())
    }

    // Finds or binds the handle for `q` and routes worker `id` to it: the
    // handle, a dup of its socket in shared mode, and whether the worker
    // did not hold it before. `Err` is the error the worker's `listen()` gets.
    fn serve_query(&mut self, id: u32, q: &Query) -> io::Result<(u32, Option<OwnedFd>, bool)> {
        let what = q.endpoint.describe();
        let slot = self.workers.get(&id).ok_or_else(|| Self::gone(id))?;
        if slot.exited_after_disconnect {
            return Err(refused(
                ECONNABORTED,
                io::ErrorKind::ConnectionAborted,
                format!("listen on {what}: worker {id} is disconnecting; nothing is bound for it"),
            ));
        }
        let default_rules;
        let rules = match &self.settings.listen_rules {
            Some(r) => r,
            None if slot.unprivileged => {
                default_rules = ListenRules::unprivileged();
                &default_rules
            }
            None => {
                default_rules = ListenRules::any();
                &default_rules
            }
        };
        let denied = || {
            refused(
                EACCES,
                io::ErrorKind::PermissionDenied,
                format!(
                    "listen on {what}: permission denied: workers may not listen there \
                     (Settings::listen_rules)"
                ),
            )
        };
        let key = format!("{}:{}", q.key(), q.index);
        // The program's own sockets are offered whatever the rules: it
        // bound (or inherited) them for its workers.
        let prebound = self.find_prebound(&key, &q.endpoint, q.index);
        let dir = match &q.endpoint {
            _ if prebound.is_some() => None,
            Endpoint::Tcp(host, port) => {
                if !rules.allows_tcp(*host, *port) {
                    return Err(denied());
                }
                None
            }
            Endpoint::Unix(path) => {
                let (parent, _) =
                    shared::split_unix_path(path).map_err(|e| shared::named_error(e, &what))?;
                match rules
                    .open_unix_dir(&parent)
                    .map_err(|e| shared::named_error(e, &what))?
                {
                    Some(dir) => Some(dir),
                    None => return Err(denied()),
                }
            }
            // Offered by the program itself (`Primary::listen_fd`).
            Endpoint::Fd(_) => None,
            Endpoint::Name(_) => {
                return Err(refused(
                    ENOENT,
                    io::ErrorKind::NotFound,
                    format!("listen on {what}: no socket was inherited under that name"),
                ))
            }
        };
        if let Some(hid) = prebound {
            self.fit_policy(hid);
        }
        let slot = self.workers.get(&id).ok_or_else(|| Self::gone(id))?;
        let existing = prebound.or_else(|| self.keys.get(&key).copied());
        let held = existing.filter(|hid| slot.grants.iter().any(|g| g.hid == *hid));
        let cap = self.settings.max_worker_handles;
        if held.is_none() && slot.grants.len() >= cap {
            return Err(refused(
                EMFILE,
                io::ErrorKind::Other,
                format!(
                    "listen on {what}: worker {id} already holds {cap} listening handles \
                     (Settings::max_worker_handles)"
                ),
            ));
        }
        let hid = match existing {
            Some(hid) => hid,
            None => {
                let backlog = if q.backlog == 0 {
                    self.settings.backlog
                } else {
                    q.backlog
                };
                let backlog = backlog.min(i32::MAX as u32) as i32;
                let (fd, address, unix, policy) = self.make_socket(q, dir, backlog)?;
                self.add_handle(key, fd, address, unix, policy)
                    .map_err(|e| shared::named_error(e, &what))?
            }
        };
        if q.flags.contains(QueryFlags::DEFER_ACCEPT) {
            // A listening socket takes it at any time, so a socket made
            // before (pre-bound, or by another worker) gets it too.
            let fd = self.handles[&hid].fd.as_fd();
            if let Err(e) = sys::socket::set_defer_accept(fd, shared::DEFER_ACCEPT_SECS) {
                if existing.is_none() {
                    self.close_handle(hid);
                }
                return Err(shared::named_error(e, &what));
            }
        }
        let shared_fd = if self.handles[&hid].policy.worker_accepts() {
            match self.worker_socket(hid, id, q) {
                Ok(fd) => Some(fd),
                Err(e) => {
                    if existing.is_none() {
                        self.close_handle(hid);
                    }
                    return Err(shared::named_error(e, &what));
                }
            }
        } else {
            None
        };
        let h = self
            .handles
            .get_mut(&hid)
            .expect("handle just found or made");
        h.add_worker(id);
        h.orphaned_until = None;
        let slot = self.workers.get_mut(&id).expect("checked above");
        if !slot.handles.contains(&hid) {
            slot.handles.push(hid);
        }
        let fresh = match slot.grants.iter_mut().find(|g| g.hid == hid) {
            Some(g) => {
                g.listening_owed = true;
                false
            }
            None => {
                slot.grants.push(Grant {
                    hid,
                    listening_owed: true,
                });
                true
            }
        };
        Ok((hid, shared_fd, fresh))
    }

    // A dup of the worker's end of its pipe for `hid`, made at its first
    // grant of a handle that hands over (`None` for one that does not).
    // The primary's end is shut for reading: the worker cannot write into it.
    fn pipe_for(&mut self, id: u32, hid: u32) -> io::Result<Option<OwnedFd>> {
        if !self.handles[&hid].policy.hands_over() {
            return Ok(None);
        }
        let slot = self.workers.get_mut(&id).ok_or_else(|| Self::gone(id))?;
        if let Some(p) = slot.pipes.iter().find(|p| p.hid == hid) {
            return sys::fd::dup(p.theirs.as_fd()).map(Some);
        }
        let (ours, theirs) = sys::socket::socketpair()?;
        sys::socket::shutdown_read(ours.as_fd())?;
        let dup = sys::fd::dup(theirs.as_fd())?;
        slot.pipes.push(Pipe {
            hid,
            ours,
            theirs,
            wakes: 0,
        });
        Ok(Some(dup))
    }

    // Undoes what `serve_query` did for a reply that could not be sent.
    fn ungrant(&mut self, id: u32, hid: u32) {
        if let Some(s) = self.workers.get_mut(&id) {
            s.grants.retain(|g| g.hid != hid);
            s.handles.retain(|&h| h != hid);
            s.pipes.retain(|p| p.hid != hid);
        }
        self.leave_handle(id, hid);
    }

    // `policy`: the settings', but UDP sockets are always shared.
    pub(super) fn add_handle(
        &mut self,
        key: String,
        fd: OwnedFd,
        address: Address,
        unix: Option<UnixFile>,
        policy: Policy,
    ) -> io::Result<u32> {
        let hid = self.next_handle;
        let polling = policy.primary_accepts();
        if polling {
            self.epoll
                .add(fd.as_fd(), epoll::READABLE, TOKEN_HANDLE | hid as u64)?;
        }
        self.next_handle += 1;
        self.keys.insert(key.clone(), hid);
        self.handles.insert(
            hid,
            Handle {
                key,
                fd,
                address,
                policy,
                unix,
                workers: Vec::new(),
                cursor: 0,
                queue: VecDeque::new(),
                polling,
                paused_until: None,
                orphaned_until: None,
                pinned: false,
                name: None,
            },
        );
        Ok(hid)
    }

    // Stops routing `hid` to worker `id`; the last worker out closes it
    // (as Node does), otherwise its queue goes to the others.
    pub(super) fn leave_handle(&mut self, id: u32, hid: u32) {
        self.reuseport_release(hid, id, false);
        let Some(h) = self.handles.get_mut(&hid) else {
            return;
        };
        h.remove_worker(id);
        if !h.workers.is_empty() {
            self.distribute(hid, false);
        } else if h.pinned {
            // The program's: quiet until a worker comes back; the kernel
            // backlog holds new connections meanwhile.
            self.set_polling(hid, false);
        } else {
            self.close_handle(hid);
        }
    }

    // A crash: like `leave_handle`, but the last worker out leaves the
    // socket open, quiet, for its replacement.
    pub(super) fn orphan_or_leave(&mut self, id: u32, hid: u32) {
        let linger = self.settings.orphan_linger;
        self.reuseport_release(hid, id, true);
        let Some(h) = self.handles.get_mut(&hid) else {
            return;
        };
        h.remove_worker(id);
        if !h.workers.is_empty() {
            self.distribute(hid, false);
            return;
        }
        if h.pinned {
            self.set_polling(hid, false);
            return;
        }
        // Bounded: a worker that crashes again and again holding many
        // handles does not make the primary keep them all.
        let orphans = self
            .handles
            .values()
            .filter(|h| h.orphaned_until.is_some())
            .count();
        let h = self.handles.get_mut(&hid).expect("found above");
        if linger.is_zero() || orphans >= self.settings.max_worker_handles {
            self.close_handle(hid);
        } else {
            h.orphaned_until = Some(Instant::now() + linger);
            self.set_polling(hid, false);
        }
    }

    pub(super) fn close_handle(&mut self, hid: u32) {
        self.reuseport_close(hid);
        let Some(h) = self.handles.remove(&hid) else {
            return;
        };
        self.keys.remove(&h.key);
        if h.polling {
            let _ = self.epoll.delete(h.fd.as_fd());
        }
        for w in &h.workers {
            if let Some(s) = self.workers.get_mut(w) {
                s.handles.retain(|&x| x != hid);
            }
        }
        // Its Unix socket file, if still ours, and its queued connections
        // (Node closes them too) go with `h`.
    }

    pub(super) fn set_polling(&mut self, hid: u32, on: bool) {
        let Some(h) = self.handles.get_mut(&hid) else {
            return;
        };
        if h.policy == Policy::ReusePort {
            return self.reuseport_set_polling(hid, on);
        }
        if h.polling == on || !h.policy.primary_accepts() {
            return;
        }
        let res = if on {
            self.epoll
                .add(h.fd.as_fd(), epoll::READABLE, TOKEN_HANDLE | hid as u64)
        } else {
            self.epoll.delete(h.fd.as_fd())
        };
        if res.is_ok() {
            h.polling = on;
        }
    }
}

impl Primary {
    /// Listens on `addr` in the primary, before any worker needs it, so
    /// that a bad address or a port in use is an error now, at startup,
    /// rather than a worker that fails to listen (and is respawned). The
    /// socket has the settings' backlog, and their policy as it is when the
    /// first worker joins it.
    ///
    /// `addr` is what a worker's `listen` takes. A socket this process
    /// inherited (socket activation, a binary upgrade) that matches it is
    /// taken instead of a new bind: same key, same address (for a port other
    /// than 0), or `fd:NAME`. A `fd:NAME` nothing was inherited under is
    /// `NotFound`. Errors name the address.
    ///
    /// Workers that later `listen` on the same address get this socket:
    /// the same `host:port` (or path), or the same `host:0` for a port-0
    /// socket (the port the kernel chose, shared as Node shares the k-th
    /// `listen(0)` of every worker; a worker's port 0 never means an
    /// inherited socket of some other port). Only a worker's first listen
    /// on an address matches (Node's index 0). [`Settings::listen_rules`]
    /// do not apply to these sockets: the program offers them.
    ///
    /// The socket belongs to the program: it stays open when its last worker
    /// leaves (connections wait in the kernel backlog for the next one),
    /// and closes only with [`Primary::close_listener`],
    /// [`Primary::disconnect_all`] or the `Primary`'s drop. Listening twice
    /// on one address returns the same socket.
    ///
    /// [`Settings::listen_rules`]: super::Settings::listen_rules
    pub fn listen(&mut self, addr: &str) -> io::Result<Address> {
        let endpoint = Endpoint::parse(addr)?;
        let key = format!("{}:0", endpoint.key());
        // A socket a worker made on this key becomes the program's too.
        let found = self
            .find_prebound(&key, &endpoint, 0)
            .or_else(|| self.keys.get(&key).copied());
        let hid = match found {
            Some(hid) => hid,
            None => {
                let backlog = self.settings.backlog.min(i32::MAX as u32) as i32;
                let opts = shared::BindOptions {
                    backlog,
                    reuse_port: self.settings.plain.as_ref().is_some_and(|p| p.reuse_port),
                    ..Default::default()
                };
                let (fd, address, unix) = shared::bind(&endpoint, None, &opts)?;
                let what = address.to_string();
                let policy = self.settings.policy;
                self.add_handle(key, fd, address, unix, policy)
                    .map_err(|e| shared::named_error(e, &what))?
            }
        };
        self.pin(hid);
        self.fit_policy(hid);
        Ok(self.handles[&hid].address.clone())
    }

    // A program's socket nobody uses yet takes the policy the settings
    // have now: one adopted in `new` got the policy of that moment.
    fn fit_policy(&mut self, hid: u32) {
        let want = self.settings.policy;
        let Some(h) = self.handles.get_mut(&hid) else {
            return;
        };
        if h.pinned && h.policy != want && h.workers.is_empty() && h.queue.is_empty() {
            self.set_polling(hid, false);
            if let Some(h) = self.handles.get_mut(&hid) {
                h.policy = want;
            }
        }
    }

    /// Closes a socket of [`Primary::listen`] (or an inherited one): the
    /// workers that were given it stop getting connections from it;
    /// connections the primary accepted and did not hand out yet are
    /// closed. `NotFound` when no open socket has this address.
    pub fn close_listener(&mut self, address: &Address) -> io::Result<()> {
        let hid = self
            .handles
            .iter()
            .find(|(_, h)| &h.address == address)
            .map(|(&hid, _)| hid)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("close of {address}: no listening socket has that address"),
                )
            })?;
        self.close_handle(hid);
        Ok(())
    }

    // Marks a handle as the program's: no accepting until a worker joins.
    pub(super) fn pin(&mut self, hid: u32) {
        let Some(h) = self.handles.get_mut(&hid) else {
            return;
        };
        h.pinned = true;
        h.orphaned_until = None;
        if h.workers.is_empty() {
            self.set_polling(hid, false);
        }
    }

    // The program's socket that a listen on `endpoint` (its `index`-th on
    // that endpoint, under `key`) gets, if any.
    pub(super) fn find_prebound(&self, key: &str, endpoint: &Endpoint, index: u32) -> Option<u32> {
        if let Some(&hid) = self.keys.get(key) {
            if self.handles.get(&hid).is_some_and(|h| h.pinned) {
                return Some(hid);
            }
        }
        if index != 0 {
            return None;
        }
        self.handles
            .iter()
            .filter(|(_, h)| h.pinned)
            .find(|(_, h)| match (endpoint, &h.address) {
                (Endpoint::Name(n), _) => h.name.as_deref() == Some(n.as_str()),
                (Endpoint::Tcp(_, 0), _) => false,
                (Endpoint::Tcp(Some(ip), port), Address::Tcp(a)) => {
                    *a == std::net::SocketAddr::new(*ip, *port)
                }
                (Endpoint::Tcp(None, port), Address::Tcp(a)) => {
                    a.ip().is_unspecified() && a.port() == *port
                }
                (Endpoint::Unix(p), Address::Unix(q)) => p == q,
                _ => false,
            })
            .map(|(&hid, _)| hid)
    }
}

#[cfg(test)]
mod tests {
    use super::super::Settings;
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    #[test]
    fn a_prebound_socket_is_found_by_key_address_or_name_and_stays() {
        let mut p = Primary::new(Settings::default()).unwrap();
        let addr = p.listen("127.0.0.1:0").unwrap();
        let Address::Tcp(sa) = addr.clone() else {
            panic!("{addr:?}")
        };
        assert_ne!(sa.port(), 0);
        // Listening again is the same socket; a busy port is refused, named.
        assert_eq!(p.listen("127.0.0.1:0").unwrap(), addr);
        assert_eq!(p.listen(&sa.to_string()).unwrap(), addr);
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = held.local_addr().unwrap().to_string();
        let e = p.listen(&busy).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert!(e.to_string().contains(&format!("listen on {busy}")), "{e}");
        let hid = p.keys["127.0.0.1:0:4:0"];
        // A worker's port 0 on that host: the key. Its real port: the
        // address. Another host, a second listen, an unknown name: no.
        let find = |p: &Primary, ep: Endpoint, index: u32| {
            let key = format!("{}:{index}", ep.key());
            p.find_prebound(&key, &ep, index)
        };
        assert_eq!(find(&p, Endpoint::Tcp(Some(LOCAL), 0), 0), Some(hid));
        assert_eq!(
            find(&p, Endpoint::Tcp(Some(LOCAL), sa.port()), 0),
            Some(hid)
        );
        assert_eq!(find(&p, Endpoint::Tcp(Some(LOCAL), sa.port()), 1), None);
        assert_eq!(find(&p, Endpoint::Tcp(None, sa.port()), 0), None);
        assert_eq!(find(&p, Endpoint::Name("web".into()), 0), None);
        p.handles.get_mut(&hid).unwrap().name = Some("web".into());
        assert_eq!(find(&p, Endpoint::Name("web".into()), 0), Some(hid));
        // Its last worker leaving does not close it; the program does.
        p.leave_handle(7, hid);
        p.orphan_or_leave(7, hid);
        assert!(p.handles.contains_key(&hid));
        assert!(!p.handles[&hid].polling);
        p.close_listener(&addr).unwrap();
        assert!(p.handles.is_empty());
        assert_eq!(
            p.close_listener(&addr).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        let e = p.listen("fd:nope").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("fd:nope"), "{e}");
    }

    #[test]
    fn an_unused_prebound_socket_takes_the_policy_of_the_settings() {
        let mut p = Primary::new(Settings::default()).unwrap();
        p.listen("127.0.0.1:0").unwrap();
        let hid = p.keys["127.0.0.1:0:4:0"];
        assert_eq!(p.handles[&hid].policy, Policy::RoundRobin);
        p.settings_mut().policy = Policy::Shared;
        p.listen("127.0.0.1:0").unwrap();
        assert_eq!(p.handles[&hid].policy, Policy::Shared);
        assert!(!p.handles[&hid].polling);
    }
}
