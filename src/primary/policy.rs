//! Where workers may listen: the privilege boundary of query-server.
//!
//! The primary binds what a worker names, so a worker running under a
//! lower uid must not make it bind where the worker itself could not.
//! [`Settings::listen_rules`](super::Settings::listen_rules) says where
//! workers may listen; a request outside the rules is answered `EACCES`
//! (the worker's `listen()` returns `ErrorKind::PermissionDenied` naming
//! the address) and the worker goes on: a denied request is not a protocol
//! error.

#![forbid(unsafe_code)]

use std::io;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::sys::fs;

/// TCP addresses and ports a worker may listen on.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TcpRule {
    /// The address; `None` allows every address, the any address too. A
    /// request with no host (the any address, `::` or `0.0.0.0`) matches
    /// `None` or an unspecified address.
    pub host: Option<IpAddr>,
    /// The ports. Port 0 (an ephemeral port the kernel picks) is allowed
    /// only where the range holds 0.
    pub ports: RangeInclusive<u16>,
}

/// Where workers may listen (see the module docs). Empty lists allow
/// nothing: start from `ListenRules::default()` (nothing),
/// [`ListenRules::unprivileged`] or [`ListenRules::any`], and push rules.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ListenRules {
    /// TCP: a request matching any rule is allowed.
    pub tcp: Vec<TcpRule>,
    /// Unix sockets: a path is allowed when its directory is one of these
    /// or below one of them. Directories are compared by device and inode
    /// after resolving symlinks, so a symlink a worker plants in the path
    /// leads outside and is denied. `/` allows every path.
    pub unix_dirs: Vec<PathBuf>,
}

impl TcpRule {
    /// Allows `ports` on `host` (`None`: every address).
    pub fn new(host: Option<IpAddr>, ports: RangeInclusive<u16>) -> TcpRule {
        TcpRule { host, ports }
    }
}

impl ListenRules {
    /// Everything: any TCP address and port, any Unix path (Node's rule).
    pub fn any() -> ListenRules {
        ListenRules {
            tcp: vec![TcpRule {
                host: None,
                ports: 0..=u16::MAX,
            }],
            unix_dirs: vec![PathBuf::from("/")],
        }
    }

    /// What a worker under another uid could bind by itself: TCP ports
    /// from 1024 up and port 0, on any address; no Unix path (list the
    /// directories the program means workers to use).
    pub fn unprivileged() -> ListenRules {
        ListenRules {
            tcp: vec![
                TcpRule {
                    host: None,
                    ports: 0..=0,
                },
                TcpRule {
                    host: None,
                    ports: 1024..=u16::MAX,
                },
            ],
            unix_dirs: Vec::new(),
        }
    }

    /// True when TCP `host` (`None`: the any address) and `port` match a rule.
    pub fn allows_tcp(&self, host: Option<IpAddr>, port: u16) -> bool {
        self.tcp.iter().any(|r| {
            let host_ok = match (r.host, host) {
                (None, _) => true,
                (Some(want), Some(got)) => want == got,
                (Some(want), None) => want.is_unspecified(),
            };
            host_ok && r.ports.contains(&port)
        })
    }

    /// Opens `dir` (the directory of a requested Unix socket) and checks it
    /// is one of [`ListenRules::unix_dirs`] or below one, walking up by
    /// `..` from the opened directory itself. Returns the open directory
    /// (the socket is then bound in it), or `None` when it is not allowed.
    /// An error opening `dir` is returned as is when every path is
    /// allowed (so the worker sees `ENOENT` as it would binding itself),
    /// and as `None` otherwise (a denied worker learns nothing about the
    /// file system).
    pub(super) fn open_unix_dir(&self, dir: &Path) -> io::Result<Option<OwnedFd>> {
        let allowed: Vec<fs::Stat> = self
            .unix_dirs
            .iter()
            .filter_map(|d| fs::stat(d).ok())
            .filter(fs::Stat::is_dir)
            .collect();
        let root = fs::stat(Path::new("/"))?;
        let everything = allowed.iter().any(|a| a.same_file(&root));
        let fd = match fs::open_dir(dir) {
            Ok(fd) => fd,
            Err(e) if everything => return Err(e),
            Err(_) => return Ok(None),
        };
        if everything {
            return Ok(Some(fd));
        }
        let mut cur = fs::fstat(fd.as_fd())?;
        let mut up: Option<OwnedFd> = None;
        // Deep enough for any path that fits in sun_path (108 bytes).
        for _ in 0..128 {
            if allowed.iter().any(|a| a.same_file(&cur)) {
                return Ok(Some(fd));
            }
            let next = fs::open_parent(up.as_ref().map_or(fd.as_fd(), |u| u.as_fd()))?;
            let st = fs::fstat(next.as_fd())?;
            if st.same_file(&cur) {
                return Ok(None); // The root.
            }
            cur = st;
            up = Some(next);
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_rules_match_host_and_port() {
        let un = ListenRules::unprivileged();
        assert!(un.allows_tcp(None, 0));
        assert!(un.allows_tcp(Some("127.0.0.1".parse().unwrap()), 8080));
        assert!(!un.allows_tcp(Some("127.0.0.1".parse().unwrap()), 99));
        assert!(!un.allows_tcp(None, 1023));
        let one = ListenRules {
            tcp: vec![TcpRule {
                host: Some("127.0.0.1".parse().unwrap()),
                ports: 0..=0,
            }],
            unix_dirs: Vec::new(),
        };
        assert!(one.allows_tcp(Some("127.0.0.1".parse().unwrap()), 0));
        assert!(!one.allows_tcp(Some("127.0.0.2".parse().unwrap()), 0));
        assert!(!one.allows_tcp(None, 0));
        assert!(!one.allows_tcp(Some("127.0.0.1".parse().unwrap()), 1));
        let anyv4 = ListenRules {
            tcp: vec![TcpRule {
                host: Some("0.0.0.0".parse().unwrap()),
                ports: 0..=0,
            }],
            unix_dirs: Vec::new(),
        };
        assert!(anyv4.allows_tcp(None, 0));
        assert!(ListenRules::any().allows_tcp(None, 1));
        assert!(!ListenRules::default().allows_tcp(None, 0));
    }

    #[test]
    fn unix_dirs_match_by_inode_and_below() {
        let base = std::env::temp_dir().join(format!("syncluster-policy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("ok/sub")).unwrap();
        std::fs::create_dir_all(base.join("other")).unwrap();
        std::os::unix::fs::symlink(base.join("other"), base.join("ok/link")).unwrap();
        let rules = ListenRules {
            tcp: Vec::new(),
            unix_dirs: vec![base.join("ok")],
        };
        assert!(rules.open_unix_dir(&base.join("ok")).unwrap().is_some());
        assert!(rules.open_unix_dir(&base.join("ok/sub")).unwrap().is_some());
        assert!(rules
            .open_unix_dir(&base.join("ok/link"))
            .unwrap()
            .is_none());
        assert!(rules.open_unix_dir(&base.join("other")).unwrap().is_none());
        assert!(rules
            .open_unix_dir(&base.join("ok/../other"))
            .unwrap()
            .is_none());
        assert!(rules
            .open_unix_dir(&base.join("missing"))
            .unwrap()
            .is_none());
        assert!(ListenRules::any()
            .open_unix_dir(&base.join("missing"))
            .is_err());
        assert!(ListenRules::any()
            .open_unix_dir(&base.join("other"))
            .unwrap()
            .is_some());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
