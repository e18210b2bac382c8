//! Users and groups: `getpwnam_r`, `getpwuid_r`, `getgrnam_r`,
//! `getgrouplist`, and [`Credentials::lookup`], which turns a user (and
//! optional group) name into the ids a worker runs under.
//!
//! These go through NSS (files, LDAP, ...), may block and allocate: call
//! them before `fork`, never in the child. The reentrant variants are used,
//! and their buffers grow on `ERANGE`.

use std::ffi::{CStr, CString};
use std::io;
use std::mem::MaybeUninit;
use std::ptr;

/// Largest buffer a lookup grows to before it gives up (`ERANGE` beyond).
const MAX_BUF: usize = 1 << 20;

/// Most supplementary groups `getgrouplist` may report (Linux `NGROUPS_MAX`).
const MAX_GROUPS: usize = 65536;

/// The fields of a passwd entry a worker needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passwd {
    /// `pw_name`.
    pub name: CString,
    /// `pw_uid`.
    pub uid: u32,
    /// `pw_gid`: the user's primary group.
    pub gid: u32,
}

fn invalid_input(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn c_name(what: &str, name: &str) -> io::Result<CString> {
    if name.is_empty() {
        return Err(invalid_input(format!("{what} name is empty")));
    }
    CString::new(name).map_err(|_| invalid_input(format!("{what} {name:?} contains a NUL byte")))
}

/// True for the return codes POSIX allows for "no such entry"
/// (getpwnam_r(3): 0 with a null result, or ENOENT, ESRCH, EBADF, EPERM).
fn not_found(rc: i32) -> bool {
    matches!(rc, libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM)
}

/// Runs a `get*_r` call with a buffer that starts at `sysconf(hint)` (or
/// 1 KiB) and doubles on `ERANGE` up to 1 MiB. `call` returns the C call's
/// result code and whether it found an entry. Retries `EINTR`.
fn with_buffer<T>(
    hint: libc::c_int,
    mut call: impl FnMut(&mut [u8]) -> (i32, Option<T>),
) -> io::Result<Option<T>> {
    // SAFETY: sysconf only reads a configuration value.
    let start = unsafe { libc::sysconf(hint) };
    let mut len = usize::try_from(start).unwrap_or(0).clamp(1024, MAX_BUF);
    loop {
        let mut buf = vec![0u8; len];
        match call(&mut buf) {
            (0, found) => return Ok(found),
            (libc::EINTR, _) => {}
            (libc::ERANGE, _) if len < MAX_BUF => len *= 2,
            (rc, _) if not_found(rc) => return Ok(None),
            (rc, _) => return Err(io::Error::from_raw_os_error(rc)),
        }
    }
}

/// Looks a user up by name: `getpwnam_r`. `Ok(None)` if there is no such
/// user. Retries `EINTR`; grows its buffer on `ERANGE`.
pub fn getpwnam(name: &CStr) -> io::Result<Option<Passwd>> {
    with_buffer(libc::_SC_GETPW_R_SIZE_MAX, |buf| {
        let mut pw = MaybeUninit::<libc::passwd>::uninit();
        let mut result: *mut libc::passwd = ptr::null_mut();
        // SAFETY: name is NUL-terminated; pw, buf (with its true length)
        // and result are valid for writes for the duration of the call.
        let rc = unsafe {
            libc::getpwnam_r(
                name.as_ptr(),
                pw.as_mut_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        (rc, passwd_from(result))
    })
}

/// Looks a user up by uid: `getpwuid_r`. `Ok(None)` if no entry has that
/// uid. Retries `EINTR`; grows its buffer on `ERANGE`.
pub fn getpwuid(uid: u32) -> io::Result<Option<Passwd>> {
    with_buffer(libc::_SC_GETPW_R_SIZE_MAX, |buf| {
        let mut pw = MaybeUninit::<libc::passwd>::uninit();
        let mut result: *mut libc::passwd = ptr::null_mut();
        // SAFETY: pw, buf (with its true length) and result are valid for
        // writes for the duration of the call.
        let rc = unsafe {
            libc::getpwuid_r(
                uid,
                pw.as_mut_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        (rc, passwd_from(result))
    })
}

/// Copies what we need out of a `getpw*_r` result before its buffer goes.
fn passwd_from(result: *mut libc::passwd) -> Option<Passwd> {
    if result.is_null() {
        return None;
    }
    // SAFETY: a non-null result points to the struct the call filled in,
    // whose strings live in the buffer that is still borrowed here.
    let pw = unsafe { &*result };
    let name = if pw.pw_name.is_null() {
        CString::default()
    } else {
        // SAFETY: pw_name is a NUL-terminated string inside the buffer.
        unsafe { CStr::from_ptr(pw.pw_name) }.to_owned()
    };
    Some(Passwd {
        name,
        uid: pw.pw_uid,
        gid: pw.pw_gid,
    })
}

/// Looks a group up by name: `getgrnam_r`; returns its gid. `Ok(None)` if
/// there is no such group. Retries `EINTR`; grows its buffer on `ERANGE`.
pub fn getgrnam(name: &CStr) -> io::Result<Option<u32>> {
    with_buffer(libc::_SC_GETGR_R_SIZE_MAX, |buf| {
        let mut gr = MaybeUninit::<libc::group>::uninit();
        let mut result: *mut libc::group = ptr::null_mut();
        // SAFETY: name is NUL-terminated; gr, buf (with its true length)
        // and result are valid for writes for the duration of the call.
        let rc = unsafe {
            libc::getgrnam_r(
                name.as_ptr(),
                gr.as_mut_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        // SAFETY: a non-null result points to the struct just filled in.
        let gid = (!result.is_null()).then(|| unsafe { (*result).gr_gid });
        (rc, gid)
    })
}

/// The groups `user` belongs to, `group` (normally the user's primary
/// group) always included: `getgrouplist`. The list grows to what the call
/// asks for. Does not retry (`getgrouplist` reports no `EINTR`).
pub fn getgrouplist(user: &CStr, group: u32) -> io::Result<Vec<u32>> {
    let mut len: usize = 32;
    loop {
        let mut groups: Vec<libc::gid_t> = vec![0; len];
        let mut n = libc::c_int::try_from(len).unwrap_or(libc::c_int::MAX);
        // SAFETY: user is NUL-terminated; groups has room for n entries and
        // n is a valid, writable c_int.
        let rc = unsafe { libc::getgrouplist(user.as_ptr(), group, groups.as_mut_ptr(), &mut n) };
        let wanted = usize::try_from(n).unwrap_or(0);
        if rc != -1 {
            groups.truncate(wanted.min(len));
            return Ok(groups);
        }
        // -1: the list was too small and n now says how many there are.
        if wanted <= len || wanted > MAX_GROUPS {
            return Err(io::Error::new(
                io::ErrorKind::Other,
                format!("getgrouplist: {wanted} groups for a list of {len}"),
            ));
        }
        len = wanted;
    }
}

/// The ids a worker runs under: what `setgroups`, `setgid` and `setuid`
/// get in the child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user id.
    pub uid: u32,
    /// The group id.
    pub gid: u32,
    /// Supplementary groups (`gid` among them, as `initgroups` does).
    pub groups: Vec<u32>,
}

impl Credentials {
    /// Resolves `user` and `group` the way `systemd`'s `User=`/`Group=` do.
    ///
    /// `user` is a name, or a decimal uid that has a passwd entry. `group`
    /// is a name or a decimal gid (a number needs no entry); `None` takes
    /// the user's primary group from the passwd entry. The supplementary
    /// groups are `getgrouplist(user, gid)`: every group that lists the
    /// user as a member, plus `gid`.
    ///
    /// A user or group that does not exist is `InvalidInput` naming it; so
    /// is an empty name or one with a NUL byte.
    pub fn lookup(user: &str, group: Option<&str>) -> io::Result<Credentials> {
        let pw = if let Ok(uid) = user.parse::<u32>() {
            getpwuid(uid)?
                .ok_or_else(|| invalid_input(format!("user {uid}: no passwd entry has that uid")))?
        } else {
            getpwnam(&c_name("user", user)?)?
                .ok_or_else(|| invalid_input(format!("user {user:?} does not exist")))?
        };
        let gid = match group {
            None => pw.gid,
            Some(g) => match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => getgrnam(&c_name("group", g)?)?
                    .ok_or_else(|| invalid_input(format!("group {g:?} does not exist")))?,
            },
        };
        let groups = getgrouplist(&pw.name, gid)?;
        Ok(Credentials {
            uid: pw.uid,
            gid,
            groups,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cs(s: &str) -> CString {
        CString::new(s).unwrap()
    }

    #[test]
    fn root_is_found_by_name_and_uid() {
        let by_name = getpwnam(&cs("root")).unwrap().expect("root exists");
        assert_eq!((by_name.uid, by_name.gid), (0, 0));
        assert_eq!(getpwuid(0).unwrap(), Some(by_name));
        assert_eq!(getgrnam(&cs("root")).unwrap(), Some(0));
    }

    #[test]
    fn missing_names_are_none() {
        assert_eq!(getpwnam(&cs("syncluster-no-such-user")).unwrap(), None);
        assert_eq!(getgrnam(&cs("syncluster-no-such-group")).unwrap(), None);
    }

    #[test]
    fn group_list_holds_the_given_group() {
        let groups = getgrouplist(&cs("root"), 12345).unwrap();
        assert!(groups.contains(&12345), "{groups:?}");
    }

    #[test]
    fn lookup_names_what_is_missing() {
        let e = Credentials::lookup("syncluster-no-such-user", None).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("syncluster-no-such-user"), "{e}");
        let e = Credentials::lookup("root", Some("syncluster-no-such-group")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("syncluster-no-such-group"), "{e}");
        for bad in ["", "a\0b"] {
            let e = Credentials::lookup(bad, None).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
    }

    #[test]
    fn buffers_grow_on_erange_up_to_a_limit() {
        let mut sizes = Vec::new();
        let found = with_buffer(libc::_SC_GETPW_R_SIZE_MAX, |buf| {
            sizes.push(buf.len());
            match buf.len() {
                n if n < 8192 => (libc::ERANGE, None),
                n => (0, Some(n)),
            }
        });
        // The start is sysconf's hint (1 KiB at least), doubled until 8 KiB.
        assert!(found.unwrap().is_some_and(|n| n >= 8192), "{sizes:?}");
        assert!(sizes.windows(2).all(|w| w[1] == 2 * w[0]), "{sizes:?}");
        let e = with_buffer::<()>(libc::_SC_GETPW_R_SIZE_MAX, |_| (libc::ERANGE, None));
        assert_eq!(e.unwrap_err().raw_os_error(), Some(libc::ERANGE));
    }

    #[test]
    fn numeric_group_needs_no_entry() {
        let c = Credentials::lookup("root", Some("4000000")).unwrap();
        assert_eq!((c.uid, c.gid), (0, 4_000_000));
        assert!(c.groups.contains(&4_000_000), "{:?}", c.groups);
    }
}
