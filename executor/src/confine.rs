//! What confines a build's processes beyond its process group: the user they run as and
//! their resource limits.
//!
//! Both are applied in the child between `fork` and `exec` (`apply_in_child`,
//! called by [`crate::spawn`]), in this order: every resource limit (soft and hard, while
//! the child still has the privileges to raise a hard limit), then the supplementary
//! groups are cleared, then the gid is set, then the uid (after `setuid` the child could
//! no longer change its groups). A root daemon's build without a user keeps running as
//! root.
//!
//! [`Confinement::check`] refuses, before anything is created, what the child would fail
//! at or what would silently not hold: a user switch by a daemon that cannot switch users,
//! an `nproc` limit on a build running as root (the kernel does not count root's
//! processes against it), a limit above the daemon's own hard limit when the daemon
//! cannot raise it.

use std::io;

/// The user and group a build runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    /// `uid` with the group given, or else its primary group in `/etc/passwd`, or else
    /// a group of the same number.
    pub fn new(uid: u32, gid: Option<u32>) -> RunAs {
        let gid = gid.or_else(|| primary_gid(uid)).unwrap_or(uid);
        RunAs { uid, gid }
    }
}

/// Resource limits; `None` keeps the daemon's. `u64::MAX` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// `RLIMIT_NOFILE`: open file descriptors per process.
    pub nofile: Option<u64>,
    /// `RLIMIT_NPROC`: processes and threads of the real uid, counted system-wide.
    pub nproc: Option<u64>,
    /// `RLIMIT_CPU`: CPU seconds per process (SIGXCPU, then SIGKILL at the hard limit).
    pub cpu_s: Option<u64>,
    /// `RLIMIT_FSIZE`: the largest file a process may write (SIGXFSZ beyond).
    pub fsize: Option<u64>,
    /// `RLIMIT_AS`: address space per process.
    pub address_space: Option<u64>,
}

/// A resource and the value both its limits are set to, ready for `setrlimit`.
type Rlimit = (libc::__rlimit_resource_t, u64);

impl Limits {
    /// The set limits with their names as `tether run --limit` spells them.
    pub fn entries(&self) -> Vec<(&'static str, libc::__rlimit_resource_t, u64)> {
        [
            ("nofile", libc::RLIMIT_NOFILE, self.nofile),
            ("nproc", libc::RLIMIT_NPROC, self.nproc),
            ("cpu", libc::RLIMIT_CPU, self.cpu_s),
            ("fsize", libc::RLIMIT_FSIZE, self.fsize),
            ("as", libc::RLIMIT_AS, self.address_space),
        ]
        .into_iter()
        .filter_map(|(name, res, v)| v.map(|v| (name, res, v)))
        .collect()
    }

    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }
}

/// The user and limits of a build (or of a shell opened in it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Confinement {
    /// `None`: the daemon's own user.
    pub user: Option<RunAs>,
    pub limits: Limits,
}

/// Why a confinement cannot be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfineError {
    #[error("cannot run a build as uid {uid}: the daemon runs as uid {euid}, and only a daemon running as root can switch users")]
    NotRoot { uid: u32, euid: u32 },
    #[error("cannot run a build as uid {uid}: the daemon lacks the {cap} capability (the container drops it)")]
    MissingCapability { uid: u32, cap: &'static str },
    #[error("an nproc limit does not hold for a build running as root (the kernel does not count root's processes); run it as another user (--user UID)")]
    NprocForRoot,
    #[error("limit {name}={value} is above the daemon's own hard limit of {hard}, which only root can raise")]
    AboveHardLimit { name: &'static str, value: u64, hard: u64 },
}

/// Capability bits in `/proc/self/status`'s `CapEff`.
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;

impl Confinement {
    /// Whether nothing is to be applied (the spawn then needs no `fork`).
    pub fn is_none(&self) -> bool {
        self.user.is_none() && self.limits.is_empty()
    }

    /// Refuses what would fail in the child or silently not hold (see the module doc).
    pub fn check(&self) -> Result<(), ConfineError> {
        let euid = nix::unistd::geteuid().as_raw();
        if let Some(user) = self.user {
            if euid != 0 {
                return Err(ConfineError::NotRoot { uid: user.uid, euid });
            }
            let caps = effective_capabilities();
            for (bit, cap) in [(CAP_SETUID, "CAP_SETUID"), (CAP_SETGID, "CAP_SETGID")] {
                if caps.is_some_and(|c| c & (1 << bit) == 0) {
                    return Err(ConfineError::MissingCapability { uid: user.uid, cap });
                }
            }
        }
        let runs_as_root = self.user.map_or(euid, |u| u.uid) == 0;
        if self.limits.nproc.is_some() && runs_as_root {
            return Err(ConfineError::NprocForRoot);
        }
        if euid != 0 {
            for (name, resource, value) in self.limits.entries() {
                if let Ok((_, hard)) = getrlimit(resource) {
                    if hard != libc::RLIM_INFINITY && value > hard {
                        return Err(ConfineError::AboveHardLimit { name, value, hard });
                    }
                }
            }
        }
        Ok(())
    }

    /// What the child applies, computed before the `fork` (nothing is allocated after).
    pub(crate) fn for_child(&self) -> ChildConfinement {
        let mut limits = [(0, 0); 5];
        let entries = self.limits.entries();
        for (slot, (_, resource, value)) in limits.iter_mut().zip(&entries) {
            *slot = (*resource, *value);
        }
        ChildConfinement {
            limits,
            count: entries.len(),
            user: self.user,
        }
    }
}

/// A [`Confinement`] in the form the child applies without allocating.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChildConfinement {
    limits: [Rlimit; 5],
    count: usize,
    user: Option<RunAs>,
}

impl ChildConfinement {
    /// Applies the limits, then drops to the user. Runs in the forked child: only
    /// async-signal-safe calls (plain system calls) and no allocation.
    pub(crate) fn apply_in_child(&self) -> io::Result<()> {
        for &(resource, value) in &self.limits[..self.count] {
            let lim = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            // SAFETY: setrlimit reads the struct it is given.
            if unsafe { libc::setrlimit(resource, &lim) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        if let Some(user) = self.user {
            // SAFETY: plain system calls; setgroups with a count of 0 reads nothing.
            unsafe {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(user.gid) != 0
                    || libc::setuid(user.uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
        }
        Ok(())
    }
}

fn getrlimit(resource: libc::__rlimit_resource_t) -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    if unsafe { libc::getrlimit(resource, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// The effective capability set, or `None` when `/proc` does not tell.
fn effective_capabilities() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_cap_eff(&status)
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(line.trim(), 16).ok()
}

/// The primary gid of `uid` in `/etc/passwd` (read directly: a static binary has no NSS).
pub fn primary_gid(uid: u32) -> Option<u32> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd_gid(&passwd, uid)
}

fn passwd_gid(passwd: &str, uid: u32) -> Option<u32> {
    passwd.lines().find_map(|line| {
        // name:password:uid:gid:gecos:home:shell
        let mut fields = line.split(':');
        let (_, _, u, g) = (fields.next()?, fields.next()?, fields.next()?, fields.next()?);
        (u.parse::<u32>().ok()? == uid).then(|| g.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primary_group_comes_from_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\n# comment\nbad line\nnobody:x:65534:65533::/:/bin/false\n";
        assert_eq!(passwd_gid(passwd, 0), Some(0));
        assert_eq!(passwd_gid(passwd, 65534), Some(65533));
        assert_eq!(passwd_gid(passwd, 1000), None);
    }

    #[test]
    fn effective_capabilities_parse() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t00000000000000c0\n";
        assert_eq!(parse_cap_eff(status), Some(0xc0));
        assert_eq!(parse_cap_eff("Name:\tx\n"), None);
    }

    #[test]
    fn nproc_is_refused_for_a_build_running_as_root() {
        let limits = Limits {
            nproc: Some(10),
            ..Limits::default()
        };
        let root = Confinement {
            user: Some(RunAs { uid: 0, gid: 0 }),
            limits,
        };
        assert_eq!(root.check(), Err(ConfineError::NprocForRoot));
        if nix::unistd::geteuid().is_root() {
            let own = Confinement { user: None, limits };
            assert_eq!(own.check(), Err(ConfineError::NprocForRoot));
        }
    }

    #[test]
    fn a_user_switch_needs_root() {
        let c = Confinement {
            user: Some(RunAs { uid: 12345, gid: 12345 }),
            limits: Limits::default(),
        };
        let euid = nix::unistd::geteuid().as_raw();
        if euid == 0 {
            // As root (with the capabilities) the check passes; without, it names them.
            assert!(matches!(
                c.check(),
                Ok(()) | Err(ConfineError::MissingCapability { .. })
            ));
        } else {
            assert_eq!(c.check(), Err(ConfineError::NotRoot { uid: 12345, euid }));
        }
    }

    #[test]
    fn entries_list_only_what_is_set_in_a_fixed_order() {
        let l = Limits {
            address_space: Some(1),
            nofile: Some(2),
            ..Limits::default()
        };
        let names: Vec<_> = l.entries().iter().map(|e| (e.0, e.2)).collect();
        assert_eq!(names, [("nofile", 2), ("as", 1)]);
        let child = Confinement { user: None, limits: l }.for_child();
        assert_eq!(child.count, 2);
    }
}
