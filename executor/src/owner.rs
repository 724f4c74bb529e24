//! Handing a build's private directory to the user the build runs as
//! ([`crate::confine::RunAs`]).
//!
//! The daemon creates the directory and writes uploads and fetches into it as itself
//! (root), so before the build's command or a shell runs as another user, every entry is
//! given to that user. A shell of the build may already be running as that user and be
//! replacing directories by symlinks while this runs, so the walk never follows a path:
//! each directory is opened relative to its parent's descriptor with `O_NOFOLLOW`, and
//! each entry is changed with `fchownat(AT_SYMLINK_NOFOLLOW)` relative to its directory's
//! descriptor (a symlink gets the new owner itself; what it points to is never touched).
//! Entries on another file system (a mount inside the tree) are neither changed nor
//! entered.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;

use nix::dir::{Dir, OwningIter, Type};
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{fstat, Mode};
use nix::unistd::{fchownat, Gid, Uid};

use crate::confine::RunAs;

/// Deepest directory level the walk enters; one descriptor is open per level.
pub const MAX_DEPTH: usize = 512;

/// Gives `root` and everything below it to `user`. Returns how many entries changed owner.
pub fn give_tree(root: &Path, user: RunAs) -> io::Result<u64> {
    let uid = Some(Uid::from_raw(user.uid));
    let gid = Some(Gid::from_raw(user.gid));
    let top = Dir::open(
        root,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
        Mode::empty(),
    )?;
    let dev = fstat(top.as_fd())?.st_dev;
    nix::unistd::fchown(top.as_fd(), uid, gid)?;
    let mut changed = 1;
    // Owning iterators: a borrowing one rewinds its directory when dropped.
    let mut stack: Vec<OwningIter> = vec![top.into_iter()];
    while let Some(dir) = stack.last_mut() {
        // The next entry of the innermost directory, or None when it is done.
        let next = loop {
            match dir.next() {
                None => break None,
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(entry)) => {
                    let name = entry.file_name();
                    if name == c"." || name == c".." {
                        continue;
                    }
                    break Some((name.to_owned(), entry.file_type()));
                }
            }
        };
        let Some((name, kind)) = next else {
            stack.pop();
            continue;
        };
        // SAFETY: the descriptor belongs to `dir`, on the stack until this entry is done.
        let dir_fd = unsafe { BorrowedFd::borrow_raw(dir.as_raw_fd()) };
        let st = nix::sys::stat::fstatat(dir_fd, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)?;
        if st.st_dev != dev {
            continue;
        }
        fchownat(dir_fd, name.as_c_str(), uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW)?;
        changed += 1;
        let is_dir = match kind {
            Some(Type::Directory) => true,
            Some(_) => false,
            None => st.st_mode & libc::S_IFMT == libc::S_IFDIR,
        };
        if is_dir {
            if stack.len() >= MAX_DEPTH {
                return Err(io::Error::other(format!(
                    "the directory tree is deeper than {MAX_DEPTH} levels"
                )));
            }
            let child = open_child(dir_fd, &name)?;
            stack.push(child.into_iter());
        }
    }
    Ok(changed)
}

fn open_child(parent: BorrowedFd<'_>, name: &CStr) -> io::Result<Dir> {
    Ok(Dir::openat(
        parent,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
        Mode::empty(),
    )?)
}

/// Checks that `user` can reach `path`: every directory above it must be searchable by
/// that user (the bit for others, or for its owner or group when they are the user's). A
/// state dir under a private directory (mode 0700 and owned by root) would otherwise let
/// the build start in its directory (entered before the switch) but fail on every path
/// through it, `$TMPDIR` included.
pub fn check_reachable(path: &Path, user: RunAs) -> Result<(), String> {
    match first_closed(path.ancestors().skip(1), user) {
        None => Ok(()),
        Some(closed) => Err(format!(
            "{closed}: put the state dir (--state-dir) where other users may pass"
        )),
    }
}

/// Checks that `user` can enter `path` itself: it and every directory above it are
/// searchable by that user (a shared workdir, see [`crate::workdir`]).
pub fn check_enterable(path: &Path, user: RunAs) -> Result<(), String> {
    match first_closed(path.ancestors(), user) {
        None => Ok(()),
        Some(closed) => Err(closed),
    }
}

/// The first of `dirs` that `user` may not search, described; `None` when all are open.
fn first_closed<'a>(dirs: impl Iterator<Item = &'a Path>, user: RunAs) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    for dir in dirs {
        let Ok(meta) = std::fs::metadata(dir) else { continue };
        let mode = meta.mode();
        let searchable = mode & 0o001 != 0
            || (meta.uid() == user.uid && mode & 0o100 != 0)
            || (meta.gid() == user.gid && mode & 0o010 != 0);
        if !searchable {
            return Some(format!(
                "{} (mode {:04o}, owner {}) is not searchable by uid {}",
                dir.display(),
                mode & 0o7777,
                meta.uid(),
                user.uid
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn gives_every_entry_and_never_follows_a_symlink() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to change owners");
            return;
        }
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, "x").unwrap();
        let t = tempfile::tempdir().unwrap();
        let deep = t.path().join("a/b/c");
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(deep.join("f"), "y").unwrap();
        std::os::unix::fs::symlink(&victim, t.path().join("a/link")).unwrap();
        std::os::unix::fs::symlink(outside.path(), t.path().join("a/dirlink")).unwrap();
        let user = RunAs { uid: 4242, gid: 4343 };
        let n = give_tree(t.path(), user).unwrap();
        // top, a, b, c, f, link, dirlink
        assert_eq!(n, 7);
        for p in ["", "a", "a/b", "a/b/c", "a/b/c/f", "a/link", "a/dirlink"] {
            let m = std::fs::symlink_metadata(t.path().join(p)).unwrap();
            assert_eq!((m.uid(), m.gid()), (4242, 4343), "{p}");
        }
        let v = std::fs::metadata(&victim).unwrap();
        assert_eq!(v.uid(), 0, "the symlink's target was changed");
        assert_eq!(std::fs::metadata(outside.path()).unwrap().uid(), 0);
    }

    #[test]
    fn a_private_parent_makes_a_dir_unreachable() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let inner = t.path().join("private/state/build");
        std::fs::create_dir_all(&inner).unwrap();
        let user = RunAs { uid: 4242, gid: 4343 };
        std::fs::set_permissions(t.path().join("private"), std::fs::Permissions::from_mode(0o711)).unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(check_reachable(&inner, user), Ok(()));
        std::fs::set_permissions(t.path().join("private"), std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = check_reachable(&inner, user).unwrap_err();
        assert!(e.contains("private") && e.contains("0700") && e.contains("4242"), "{e}");
    }

    #[test]
    fn a_symlink_as_the_top_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let link = t.path().join("l");
        std::os::unix::fs::symlink(t.path(), &link).unwrap();
        let user = RunAs { uid: 1, gid: 1 };
        assert!(give_tree(&link, user).is_err());
    }
}
