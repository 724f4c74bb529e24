//! Removal of a build's private directory tree.
//!
//! Why this exists: every build runs in a private directory, and that
//! directory must be gone after the build whatever the build left in it.
//! `std::fs::remove_dir_all` is not enough for that: a build can leave
//! read-only files and directories (`chmod -R a-w`, mode `0500` or `0000`
//! directories, which even their owner cannot list or empty without changing
//! their mode first), symlinks that point out of the tree, FIFOs and sockets,
//! trees deeper than any recursion should go, and mount points (a bind or
//! tmpfs mount that a runtime forgot to unmount), and it can still be renaming
//! things while we clean up.
//!
//! [`remove_tree`] therefore:
//! - works only through directory file descriptors (`openat`, `fstatat`,
//!   `unlinkat`), never through path strings joined from the top, so that a
//!   concurrent rename cannot redirect it out of the tree;
//! - never follows a symlink: every directory is opened with
//!   `O_NOFOLLOW | O_DIRECTORY`, every entry is examined with
//!   `AT_SYMLINK_NOFOLLOW`, and symlinks are unlinked, never traversed;
//! - gives a directory mode `0700` (on its own descriptor, or without
//!   following symlinks) before listing and emptying it;
//! - never crosses into another mount: a directory on another device (or, where
//!   the kernel reports mount ids, in another mount, which catches bind mounts
//!   of the same file system) is neither entered nor removed, and is listed in
//!   [`RemoveReport::skipped_mounts`]; its ancestors then stay too, which is
//!   reported, not an error;
//! - walks with an explicit stack instead of recursion, so depth cannot
//!   overflow the thread's stack.
//!
//! File descriptors: the walk holds one descriptor per directory level it is
//! inside, but at most [`MAX_OPEN_DIRS`] of them (plus one for the parent of the
//! top). Deeper than that, the descriptors of the outer levels are closed and
//! re-opened through `..` on the way back up; each re-opened directory is
//! checked against the device and inode recorded when it was first opened, and
//! the removal stops with [`CleanupError::Moved`] if the tree was moved
//! meanwhile.
//!
//! Linux only (`O_PATH`, `statx`).

use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{open, openat, AtFlags, OFlag};
use nix::sys::stat::{fchmod, fchmodat, fstat, fstatat, FchmodatFlags, FileStat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};

/// How many directory levels keep their descriptor open at once during
/// [`remove_tree`]; deeper levels are re-opened through `..` when needed.
pub const MAX_OPEN_DIRS: usize = 64;

/// How many times a directory is listed again when removing it fails because
/// something new appeared in it (a process still writing), before giving up.
const MAX_RELISTS: u8 = 3;

/// What [`remove_tree`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RemoveReport {
    /// Entries unlinked: files, symlinks, special files and directories,
    /// including the top directory itself.
    pub removed_entries: u64,
    /// Mount points found inside the tree and left alone (neither entered nor
    /// removed). When this is not empty, these paths and their ancestors up to
    /// the top still exist.
    pub skipped_mounts: Vec<PathBuf>,
}

impl RemoveReport {
    /// True when the whole tree is gone (nothing was left for a mount point).
    pub fn is_complete(&self) -> bool {
        self.skipped_mounts.is_empty()
    }
}

/// Why [`remove_tree`] could not remove a tree.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    /// The path has no final component to remove (`/`, `.`, `..`, or a path
    /// ending in `..`), or contains a NUL byte.
    #[error("refusing to remove {}: not a removable path", path.display())]
    InvalidPath {
        /// The path given.
        path: PathBuf,
    },
    /// A file-system operation failed. When several failed, this is the first
    /// one; the walk went on and removed what it could.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// What was being done (`"stat"`, `"open"`, `"unlink"`, ...).
        op: &'static str,
        /// The path it was done to (built for this message only).
        path: PathBuf,
        /// The error from the system.
        #[source]
        source: std::io::Error,
    },
    /// A directory was moved or replaced while being removed, so going back
    /// up through `..` would have left the tree; the removal stopped there.
    #[error("{} was moved or replaced during removal; stopped", path.display())]
    Moved {
        /// The directory that could not be found again.
        path: PathBuf,
    },
}

impl CleanupError {
    /// The path the error is about.
    pub fn path(&self) -> &Path {
        match self {
            CleanupError::InvalidPath { path } | CleanupError::Io { path, .. } | CleanupError::Moved { path } => path,
        }
    }
}

/// Removes `path` and everything under it, without following symlinks and
/// without crossing into other mounts.
///
/// - A `path` that does not exist is not an error: nothing to do.
/// - A `path` that is a symlink (or any non-directory) is unlinked; the target
///   of a symlink is never touched. Only the final component is treated that
///   way: the parent directories named in `path` are resolved as usual.
/// - Read-only directories (`0500`, `0000`, ...) are given mode `0700` first,
///   which works when we own them (or are privileged).
/// - Mount points inside the tree are left alone and listed in the report; the
///   directories containing them then stay too, and the result is still `Ok`.
///
/// On failure the walk goes on removing what it can and returns the first
/// error. See the module documentation for the descriptor cost of deep trees.
pub fn remove_tree(path: &Path) -> Result<RemoveReport, CleanupError> {
    let invalid = || CleanupError::InvalidPath {
        path: path.to_path_buf(),
    };
    let name = path.file_name().ok_or_else(invalid)?;
    let name = CString::new(name.as_bytes()).map_err(|_| invalid())?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let parent_fd = match open(
        parent,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(RemoveReport::default()),
        Err(e) => return Err(io_err("open", parent.to_path_buf(), e)),
    };
    let st = match fstatat(&parent_fd, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::ENOENT) => return Ok(RemoveReport::default()),
        Err(e) => return Err(io_err("stat", path.to_path_buf(), e)),
    };
    let mut report = RemoveReport::default();
    if !is_dir(&st) {
        return match unlinkat(&parent_fd, name.as_c_str(), UnlinkatFlags::NoRemoveDir) {
            Ok(()) => {
                report.removed_entries = 1;
                Ok(report)
            }
            Err(Errno::ENOENT) => Ok(report),
            Err(Errno::EBUSY) => {
                report.skipped_mounts.push(path.to_path_buf());
                Ok(report)
            }
            Err(e) => Err(io_err("unlink", path.to_path_buf(), e)),
        };
    }

    let pinned = match pin(parent_fd.as_fd(), &name) {
        Ok(p) => p,
        Err(Errno::ENOENT) => return Ok(report),
        Err(e) => return Err(io_err("open", path.to_path_buf(), e)),
    };
    let root = match open_pinned(parent_fd.as_fd(), &name, &pinned) {
        Ok(dir) => dir,
        Err(OpenError::Errno(e)) => return Err(io_err("open", path.to_path_buf(), e)),
        Err(OpenError::Replaced) => {
            return Err(CleanupError::Moved {
                path: path.to_path_buf(),
            })
        }
    };
    let mut walk = Walk {
        top: path,
        root_dev: pinned.ident.dev,
        root_mnt: pinned.mnt,
        stack: Vec::new(),
        report,
        first_error: None,
        further_errors: 0,
    };
    walk.enter(name, root, pinned.ident);
    walk.run(parent_fd.as_fd())?;
    match walk.first_error {
        None => Ok(walk.report),
        Some(e) => {
            if walk.further_errors > 0 {
                tracing::warn!(
                    path = %path.display(),
                    further_errors = walk.further_errors,
                    "more errors while removing tree after: {e}"
                );
            }
            Err(e)
        }
    }
}

/// Device and inode: what identifies a directory when it is opened again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ident {
    dev: u64,
    ino: u64,
}

impl Ident {
    fn of(st: &FileStat) -> Ident {
        Ident {
            dev: st.st_dev,
            ino: st.st_ino,
        }
    }
}

/// A directory pinned with `O_PATH` (needs no permission on it), examined
/// before anything is done to it.
struct Pinned {
    fd: OwnedFd,
    ident: Ident,
    mnt: Option<u64>,
    mode: u32,
}

/// One directory level of the walk.
struct Frame {
    /// Its name in its parent (for the top: the final component of the path).
    name: CString,
    /// Its descriptor; `None` while closed to bound the descriptors held
    /// (never for the innermost level).
    dir: Option<Dir>,
    ident: Ident,
    /// Entries listed and not yet handled.
    pending: Vec<CString>,
    relists: u8,
    /// Something in it stays (a mount point, an error): do not try to remove it.
    blocked: bool,
}

enum OpenError {
    Errno(Errno),
    /// Opened something else than the pinned directory.
    Replaced,
}

struct Walk<'a> {
    top: &'a Path,
    root_dev: u64,
    root_mnt: Option<u64>,
    stack: Vec<Frame>,
    report: RemoveReport,
    first_error: Option<CleanupError>,
    further_errors: u64,
}

impl Walk<'_> {
    /// Path of the innermost level, plus `leaf` if given; for messages only.
    fn path_of(&self, leaf: Option<&CStr>) -> PathBuf {
        let mut p = self.top.to_path_buf();
        for frame in self.stack.iter().skip(1) {
            p.push(OsStr::from_bytes(frame.name.to_bytes()));
        }
        if let Some(leaf) = leaf {
            p.push(OsStr::from_bytes(leaf.to_bytes()));
        }
        p
    }

    /// Records an error about `leaf` in the innermost level, which then stays.
    fn fail(&mut self, op: &'static str, leaf: Option<&CStr>, e: Errno) {
        let path = self.path_of(leaf);
        tracing::debug!(path = %path.display(), "cannot {op}: {e}");
        if self.first_error.is_none() {
            self.first_error = Some(io_err(op, path, e));
        } else {
            self.further_errors += 1;
        }
        self.block_innermost();
    }

    fn skip_mount(&mut self, leaf: &CStr) {
        let path = self.path_of(Some(leaf));
        tracing::debug!(path = %path.display(), "leaving mount point in place");
        self.report.skipped_mounts.push(path);
        self.block_innermost();
    }

    fn block_innermost(&mut self) {
        if let Some(frame) = self.stack.last_mut() {
            frame.blocked = true;
        }
    }

    /// Lists `dir` and makes it the innermost level.
    fn enter(&mut self, name: CString, mut dir: Dir, ident: Ident) {
        let pending = match list(&mut dir) {
            Ok(p) => p,
            Err(e) => {
                // It cannot be emptied, so neither it nor its parent can go.
                self.fail("read directory", Some(&name), e);
                return;
            }
        };
        self.stack.push(Frame {
            name,
            dir: Some(dir),
            ident,
            pending,
            relists: 0,
            blocked: false,
        });
        let len = self.stack.len();
        if len > MAX_OPEN_DIRS {
            self.stack[len - 1 - MAX_OPEN_DIRS].dir = None;
        }
    }

    fn run(&mut self, top_parent: BorrowedFd<'_>) -> Result<(), CleanupError> {
        loop {
            let Some(frame) = self.stack.last_mut() else {
                return Ok(());
            };
            if let Some(name) = frame.pending.pop() {
                self.entry(name);
                continue;
            }
            // Everything listed in the innermost level has been handled.
            let Some(mut frame) = self.stack.pop() else {
                return Ok(());
            };
            if frame.blocked {
                self.block_innermost();
                continue;
            }
            let Some(dir) = frame.dir.as_ref() else {
                // The innermost level is always open; be defensive anyway.
                return Err(self.moved(&frame.name));
            };
            self.reopen_innermost(dir, &frame.name)?;
            let parent_fd = match self.stack.last() {
                None => top_parent,
                Some(parent) => match parent.dir.as_ref() {
                    Some(d) => d.as_fd(),
                    None => return Err(self.moved(&frame.name)),
                },
            };
            match unlinkat(parent_fd, frame.name.as_c_str(), UnlinkatFlags::RemoveDir) {
                Ok(()) => self.report.removed_entries += 1,
                Err(Errno::ENOENT) => {}
                Err(Errno::ENOTEMPTY | Errno::EEXIST) if frame.relists < MAX_RELISTS => {
                    // Something appeared in it meanwhile: list it again.
                    frame.relists += 1;
                    let listed = match frame.dir.as_mut() {
                        Some(d) => list(d),
                        None => Err(Errno::EBADF),
                    };
                    match listed {
                        Ok(pending) => {
                            frame.pending = pending;
                            self.stack.push(frame);
                        }
                        Err(e) => self.fail("read directory", Some(&frame.name), e),
                    }
                }
                Err(Errno::EBUSY) => self.skip_mount(&frame.name),
                Err(e) => self.fail("remove directory", Some(&frame.name), e),
            }
        }
    }

    /// Makes sure the innermost level (the parent of `child`) has an open
    /// descriptor, re-opening it through `child/..` if it was closed.
    fn reopen_innermost(&mut self, child: &Dir, child_name: &CStr) -> Result<(), CleanupError> {
        let Some(parent) = self.stack.last() else {
            return Ok(());
        };
        if parent.dir.is_some() {
            return Ok(());
        }
        let expected = parent.ident;
        let reopened = openat(
            child,
            c"..",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .and_then(|fd| {
            let st = fstat(&fd)?;
            Ok((fd, Ident::of(&st)))
        });
        let fd = match reopened {
            Ok((fd, ident)) if ident == expected => fd,
            Ok(_) | Err(Errno::ENOENT) => return Err(self.moved(child_name)),
            Err(e) => return Err(io_err("reopen", self.path_of(None), e)),
        };
        let dir = Dir::from_fd(fd).map_err(|e| io_err("reopen", self.path_of(None), e))?;
        if let Some(parent) = self.stack.last_mut() {
            parent.dir = Some(dir);
        }
        Ok(())
    }

    fn moved(&self, child_name: &CStr) -> CleanupError {
        CleanupError::Moved {
            path: self.path_of(Some(child_name)),
        }
    }

    /// Handles one entry of the innermost level.
    fn entry(&mut self, name: CString) {
        let Some(parent) = self.stack.last().and_then(|f| f.dir.as_ref()) else {
            self.fail("open", None, Errno::EBADF);
            return;
        };
        let st = match fstatat(parent, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::ENOENT) => return,
            Err(e) => return self.fail("stat", Some(&name), e),
        };
        if st.st_dev != self.root_dev {
            // A mount point (a directory, or a file bind-mounted over a file).
            return self.skip_mount(&name);
        }
        if !is_dir(&st) {
            return self.unlink_file(&name);
        }
        let pinned = match pin(parent.as_fd(), &name) {
            Ok(p) => p,
            Err(Errno::ENOENT) => return,
            // Replaced by a symlink or a file since the stat.
            Err(Errno::ELOOP | Errno::ENOTDIR) => return self.unlink_file(&name),
            Err(e) => return self.fail("open", Some(&name), e),
        };
        let other_mount = match (self.root_mnt, pinned.mnt) {
            (Some(root), Some(this)) => root != this,
            _ => false,
        };
        if pinned.ident.dev != self.root_dev || other_mount {
            return self.skip_mount(&name);
        }
        match open_pinned(parent.as_fd(), &name, &pinned) {
            Ok(dir) => self.enter(name, dir, pinned.ident),
            Err(OpenError::Errno(e)) => self.fail("open", Some(&name), e),
            Err(OpenError::Replaced) => self.fail("open", Some(&name), Errno::ESTALE),
        }
    }

    fn unlink_file(&mut self, name: &CStr) {
        let Some(parent) = self.stack.last().and_then(|f| f.dir.as_ref()) else {
            return self.fail("unlink", Some(name), Errno::EBADF);
        };
        match unlinkat(parent, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) => self.report.removed_entries += 1,
            Err(Errno::ENOENT) => {}
            Err(Errno::EBUSY) => self.skip_mount(name),
            Err(e) => self.fail("unlink", Some(name), e),
        }
    }
}

fn io_err(op: &'static str, path: PathBuf, e: Errno) -> CleanupError {
    CleanupError::Io {
        op,
        path,
        source: std::io::Error::from(e),
    }
}

fn is_dir(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFDIR
}

/// Pins directory `name` in `parent` without following a symlink and without
/// needing any permission on it.
fn pin(parent: BorrowedFd<'_>, name: &CStr) -> Result<Pinned, Errno> {
    let fd = openat(
        parent,
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let st = fstat(&fd)?;
    let mnt = mount_id(fd.as_fd());
    Ok(Pinned {
        ident: Ident::of(&st),
        mnt,
        mode: st.st_mode,
        fd,
    })
}

/// Opens the pinned directory `name` of `parent` for listing, and gives it
/// mode 0700 so that it can be listed and emptied.
fn open_pinned(parent: BorrowedFd<'_>, name: &CStr, pinned: &Pinned) -> Result<Dir, OpenError> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let fd = match openat(&pinned.fd, c".", flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::EACCES) => {
            // Not even listable (0000, 0300, ...): change its mode without
            // following symlinks, then open it again and check it is the same
            // directory.
            fchmodat(parent, name, Mode::S_IRWXU, FchmodatFlags::NoFollowSymlink).map_err(OpenError::Errno)?;
            let fd = openat(parent, name, flags | OFlag::O_NOFOLLOW, Mode::empty()).map_err(OpenError::Errno)?;
            let st = fstat(&fd).map_err(OpenError::Errno)?;
            if Ident::of(&st) != pinned.ident {
                return Err(OpenError::Replaced);
            }
            fd
        }
        Err(e) => return Err(OpenError::Errno(e)),
    };
    if pinned.mode & 0o700 != 0o700 {
        // Best effort: if it fails (not ours), the unlinks inside will fail
        // and say so.
        if let Err(e) = fchmod(&fd, Mode::S_IRWXU) {
            tracing::debug!("cannot chmod directory before removal: {e}");
        }
    }
    Dir::from_fd(fd).map_err(OpenError::Errno)
}

/// Lists a directory, without `.` and `..`.
fn list(dir: &mut Dir) -> Result<Vec<CString>, Errno> {
    let mut names = Vec::new();
    for entry in dir.iter() {
        let entry = entry?;
        let name = entry.file_name();
        if name != c"." && name != c".." {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

/// The id of the mount `fd` is in, where the kernel reports it (Linux 5.8+).
#[cfg(all(target_os = "linux", any(target_env = "gnu", target_env = "musl")))]
fn mount_id(fd: BorrowedFd<'_>) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let mut buf = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: the path is a valid NUL-terminated string, `buf` is a writable
    // `statx` buffer, and `fd` is an open descriptor for the whole call.
    let rc = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_MNT_ID,
            buf.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: statx succeeded and filled the buffer (which was zeroed anyway).
    let buf = unsafe { buf.assume_init() };
    (buf.stx_mask & libc::STATX_MNT_ID != 0).then_some(buf.stx_mnt_id)
}

#[cfg(not(all(target_os = "linux", any(target_env = "gnu", target_env = "musl"))))]
fn mount_id(_fd: BorrowedFd<'_>) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{symlink, PermissionsExt};
    use std::process::Command;

    fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn removes_read_only_files_and_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().join("build");
        fs::create_dir_all(top.join("a/b/c")).unwrap();
        fs::write(top.join("a/b/c/file"), b"x").unwrap();
        fs::write(top.join("a/ro-file"), b"x").unwrap();
        fs::create_dir_all(top.join("locked/inner")).unwrap();
        fs::write(top.join("locked/inner/file"), b"x").unwrap();
        chmod(&top.join("a/ro-file"), 0o400);
        chmod(&top.join("a/b/c/file"), 0o000);
        chmod(&top.join("a/b/c"), 0o500);
        chmod(&top.join("a/b"), 0o000);
        chmod(&top.join("locked/inner"), 0o000);
        chmod(&top.join("locked"), 0o500);
        chmod(&top, 0o500);

        let report = remove_tree(&top).unwrap();
        assert!(!top.exists());
        assert!(report.is_complete());
        // build, a, b, c, file, ro-file, locked, inner, file
        assert_eq!(report.removed_entries, 9);
    }

    #[test]
    fn symlink_to_outside_dir_is_unlinked_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir_all(outside.join("sub")).unwrap();
        fs::write(outside.join("canary"), b"alive").unwrap();
        fs::write(outside.join("sub/canary"), b"alive").unwrap();
        chmod(&outside.join("sub"), 0o500);

        let top = tmp.path().join("build");
        fs::create_dir_all(top.join("d")).unwrap();
        symlink(&outside, top.join("d/to-dir")).unwrap();
        symlink(outside.join("sub"), top.join("to-sub")).unwrap();
        symlink(outside.join("canary"), top.join("to-file")).unwrap();
        symlink(tmp.path().join("nowhere"), top.join("dangling")).unwrap();

        let report = remove_tree(&top).unwrap();
        assert!(!top.exists());
        assert_eq!(report.removed_entries, 6);
        assert_eq!(fs::read(outside.join("canary")).unwrap(), b"alive");
        assert_eq!(fs::read(outside.join("sub/canary")).unwrap(), b"alive");
        let mode = fs::metadata(outside.join("sub")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o500, "mode of a symlink target changed");
        // TempDir's own cleanup cannot empty a read-only dir when not root.
        remove_tree(tmp.path()).unwrap();
    }

    #[test]
    fn symlink_root_is_unlinked_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("target");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("canary"), b"alive").unwrap();
        let link = tmp.path().join("link");
        symlink(&target, &link).unwrap();

        let report = remove_tree(&link).unwrap();
        assert_eq!(report.removed_entries, 1);
        assert!(fs::symlink_metadata(&link).is_err());
        assert_eq!(fs::read(target.join("canary")).unwrap(), b"alive");

        // A root that is a plain file is unlinked too.
        let file = tmp.path().join("plain-file");
        fs::write(&file, b"x").unwrap();
        assert_eq!(remove_tree(&file).unwrap().removed_entries, 1);
        assert!(!file.exists());
    }

    #[test]
    fn missing_path_is_ok() {
        let tmp = tempfile::tempdir().unwrap();
        let report = remove_tree(&tmp.path().join("nope")).unwrap();
        assert_eq!(report, RemoveReport::default());
        let report = remove_tree(&tmp.path().join("no/such/parent")).unwrap();
        assert_eq!(report, RemoveReport::default());
    }

    #[test]
    fn refuses_paths_without_final_component() {
        for p in ["/", ".", "..", "/tmp/.."] {
            assert!(
                matches!(remove_tree(Path::new(p)), Err(CleanupError::InvalidPath { .. })),
                "{p}"
            );
        }
    }

    #[test]
    fn deep_tree_does_not_overflow() {
        const DEPTH: usize = 2_000;
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().join("deep");
        fs::create_dir(&top).unwrap();
        // Built through descriptors: the full path is far beyond PATH_MAX.
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let mut fd = open(&top, flags, Mode::empty()).unwrap();
        for i in 0..DEPTH {
            if i % 100 == 0 {
                let file = openat(
                    &fd,
                    c"f",
                    OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
                    Mode::S_IRUSR,
                )
                .unwrap();
                drop(file);
            }
            nix::sys::stat::mkdirat(&fd, c"d", Mode::S_IRWXU).unwrap();
            fd = openat(&fd, c"d", flags, Mode::empty()).unwrap();
        }
        // Make the innermost levels read-only too.
        fchmod(&fd, Mode::S_IRUSR | Mode::S_IXUSR).unwrap();
        drop(fd);

        // Run on a small stack: recursion would need far more than this.
        let top2 = top.clone();
        let report = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || remove_tree(&top2))
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        assert!(!top.exists());
        assert_eq!(report.removed_entries, (DEPTH + 1 + DEPTH / 100) as u64);
    }

    #[test]
    fn fifo_and_socket_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().join("build");
        fs::create_dir_all(top.join("sub")).unwrap();
        nix::unistd::mkfifo(&top.join("fifo"), Mode::S_IRUSR | Mode::S_IWUSR).unwrap();
        let listener = std::os::unix::net::UnixListener::bind(top.join("sub/sock")).unwrap();
        chmod(&top.join("sub"), 0o500);

        let report = remove_tree(&top).unwrap();
        drop(listener);
        assert!(!top.exists());
        assert_eq!(report.removed_entries, 4);
    }

    /// Unmounts on drop, so that a failing assertion leaves no mount behind.
    struct Mounted(PathBuf);

    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }

    fn try_mount(args: &[&str], at: &Path) -> Option<Mounted> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping mount test: not running as root");
            return None;
        }
        let out = Command::new("mount").args(args).arg(at).output();
        match out {
            Ok(out) if out.status.success() => Some(Mounted(at.to_path_buf())),
            Ok(out) => {
                eprintln!(
                    "skipping mount test: mount failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("skipping mount test: cannot run mount: {e}");
                None
            }
        }
    }

    #[test]
    fn tmpfs_mount_inside_is_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().join("build");
        let mnt = top.join("a/mnt");
        fs::create_dir_all(&mnt).unwrap();
        fs::write(top.join("a/other"), b"x").unwrap();
        fs::create_dir_all(top.join("b/c")).unwrap();
        let Some(guard) = try_mount(&["-t", "tmpfs", "tmpfs"], &mnt) else {
            return;
        };
        fs::write(mnt.join("survivor"), b"alive").unwrap();
        fs::create_dir(mnt.join("ro")).unwrap();
        chmod(&mnt.join("ro"), 0o000);
        chmod(&mnt, 0o000);

        let report = remove_tree(&top).unwrap();
        assert_eq!(report.skipped_mounts, vec![mnt.clone()]);
        assert!(!report.is_complete());
        // a/other, b/c, b were removed; build and a stay for the mount point.
        assert_eq!(report.removed_entries, 3);
        assert!(!top.join("b").exists());
        assert!(!top.join("a/other").exists());
        let mode = fs::metadata(&mnt).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o000, "mode inside the mount changed");
        chmod(&mnt, 0o755);
        assert_eq!(fs::read(mnt.join("survivor")).unwrap(), b"alive");

        drop(guard);
        assert!(!mnt.join("survivor").exists());
        let report = remove_tree(&top).unwrap();
        assert!(report.is_complete());
        assert!(!top.exists());
    }

    #[test]
    fn bind_mount_of_same_file_system_is_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("canary"), b"alive").unwrap();
        let top = tmp.path().join("build");
        let mnt = top.join("bound");
        fs::create_dir_all(&mnt).unwrap();
        let Some(guard) = try_mount(&["--bind", outside.to_str().unwrap()], &mnt) else {
            return;
        };

        let report = remove_tree(&top).unwrap();
        assert_eq!(report.skipped_mounts, vec![mnt.clone()]);
        assert_eq!(fs::read(outside.join("canary")).unwrap(), b"alive");

        drop(guard);
        remove_tree(&top).unwrap();
        assert!(!top.exists());
        assert_eq!(fs::read(outside.join("canary")).unwrap(), b"alive");
    }
}
