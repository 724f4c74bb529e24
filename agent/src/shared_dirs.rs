//! Directories tether is told to use on a volume other containers share: the directory
//! of `serve --socket`, the one `serve --publish-client` copies the client into, and
//! `tether install DIR`.
//!
//! A pod's workspace volume starts empty, and the agent pod runs with
//! `restartPolicy: Never`: a daemon that exited because `/home/jenkins/agent/.tether`
//! did not exist yet would take the whole agent down. So the missing directories of
//! such a path are created, each with the group and mode of its [`Reach`]: the admitted
//! users can pass through and run what is there, nobody else gets more. A directory that
//! already exists is used as it is: it belongs to whoever made it, and tether changes
//! nothing it did not create.
//!
//! Group and mode are set through a descriptor of the new directory opened with
//! `O_NOFOLLOW`, never through its path: on a volume others may write to, the path could
//! be a symlink by the time the daemon changes it.

use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

/// Who must reach a directory, as a group and a mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reach {
    /// The directory's group, when the admitted users are a group's members.
    pub group: Option<u32>,
    pub mode: u32,
}

impl Reach {
    /// Everyone may list and enter it (`tether install`): mode 0755.
    pub const PUBLIC: Reach = Reach {
        group: None,
        mode: 0o755,
    };

    /// For the daemon's socket and published client: the daemon's own uid, plus the
    /// peers the socket admits (`--allow-uid`, `--allow-gid`). The first allowed group
    /// owns the directory and may list and enter it (0750), the way fsGroup works in a
    /// pod; allowed uids other than the daemon's, or more groups, can only be let pass
    /// as "others" (search without listing: 0701, or 0751 with a group). Who may talk
    /// to the daemon is still decided by the socket's peer credentials.
    pub fn admitted(own_uid: u32, allow_uids: &[u32], allow_gids: &[u32]) -> Reach {
        let group = allow_gids.first().copied();
        let mut mode = 0o700;
        if group.is_some() {
            mode |= 0o050;
        }
        if allow_uids.iter().any(|&u| u != own_uid) || allow_gids.len() > 1 {
            mode |= 0o001;
        }
        Reach { group, mode }
    }
}

/// Creates the missing directories of `dir` as `reach` says, leaving those that exist
/// as they are; returns the ones it created, outermost first.
pub fn ensure(dir: &Path, reach: Reach) -> io::Result<Vec<PathBuf>> {
    let mut created = Vec::new();
    let mut path = PathBuf::new();
    for component in dir.components() {
        path.push(component);
        match std::fs::symlink_metadata(&path) {
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(with_path(e, &path, "cannot inspect")),
        }
        match nix::unistd::mkdir(&path, Mode::S_IRWXU) {
            Ok(()) => {}
            // Another daemon of the pod made it at the same moment: it is theirs.
            Err(Errno::EEXIST) => continue,
            Err(e) => return Err(with_path(e.into(), &path, "cannot create")),
        }
        set_reach(&path, reach).map_err(|e| with_path(e, &path, "cannot set the group and mode of"))?;
        created.push(path.clone());
    }
    Ok(created)
}

/// Gives the directory just made its group and mode, through a descriptor. When the
/// group cannot be set (a daemon not running as root, outside that group), the admitted
/// users are let pass as others instead, and that is logged.
fn set_reach(path: &Path, reach: Reach) -> io::Result<()> {
    let fd = nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut mode = reach.mode;
    if let Some(gid) = reach.group {
        if let Err(e) = nix::unistd::fchown(fd.as_fd(), None, Some(nix::unistd::Gid::from_raw(gid))) {
            tracing::warn!(
                dir = %path.display(),
                gid,
                error = %e,
                "cannot give the directory to the allowed group; letting everyone pass through it instead"
            );
            mode = (mode & !0o070) | 0o001;
        }
    }
    nix::sys::stat::fchmod(fd.as_fd(), Mode::from_bits_truncate(mode))?;
    Ok(())
}

fn with_path(e: io::Error, path: &Path, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn reach_follows_the_admitted_peers() {
        assert_eq!(
            Reach::admitted(0, &[], &[]),
            Reach {
                group: None,
                mode: 0o700
            }
        );
        assert_eq!(
            Reach::admitted(0, &[0], &[]),
            Reach {
                group: None,
                mode: 0o700
            }
        );
        assert_eq!(
            Reach::admitted(0, &[], &[1000]),
            Reach {
                group: Some(1000),
                mode: 0o750
            }
        );
        assert_eq!(
            Reach::admitted(0, &[1000], &[]),
            Reach {
                group: None,
                mode: 0o701
            }
        );
        assert_eq!(
            Reach::admitted(0, &[1000], &[1000, 2000]),
            Reach {
                group: Some(1000),
                mode: 0o751
            }
        );
    }

    #[test]
    fn missing_dirs_are_created_and_existing_ones_left_alone() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let own_gid = nix::unistd::getegid().as_raw();
        let reach = Reach {
            group: Some(own_gid),
            mode: 0o750,
        };
        let target = t.path().join("a/b/c");
        let created = ensure(&target, reach).unwrap();
        assert_eq!(created, vec![t.path().join("a"), t.path().join("a/b"), target.clone()]);
        for dir in &created {
            let m = std::fs::metadata(dir).unwrap();
            assert_eq!(m.mode() & 0o7777, 0o750, "{}", dir.display());
            assert_eq!(m.gid(), own_gid);
        }
        // The parent that existed kept its mode; nothing is created twice.
        assert_eq!(std::fs::metadata(t.path()).unwrap().mode() & 0o7777, 0o777);
        assert!(ensure(&target, reach).unwrap().is_empty());
    }

    #[test]
    fn a_symlink_in_place_of_a_missing_dir_is_not_followed_for_changes() {
        let t = tempfile::tempdir().unwrap();
        let victim = t.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::os::unix::fs::symlink(&victim, t.path().join("link")).unwrap();
        // An existing path (even a symlink) is used as it is: never changed.
        assert!(ensure(&t.path().join("link"), Reach::PUBLIC).unwrap().is_empty());
        // A file where a directory must be: a clear error naming it.
        std::fs::write(t.path().join("file"), "x").unwrap();
        let e = ensure(&t.path().join("file/sub"), Reach::PUBLIC).unwrap_err();
        assert!(e.to_string().contains("file/sub"), "{e}");
    }
}
