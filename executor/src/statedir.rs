//! The daemon's state directory and the private build directories in it.
//!
//! Why: several tether daemons may share one state dir (tests, or a client
//! that spawns its own daemon for each run), and a daemon that died leaves its
//! build directories behind. So each daemon owns an *instance* directory,
//! `root/instances/<pid>-<random>/`, whose `lock` file it holds locked
//! (`flock`, exclusive) for its whole life; the lock goes away with the
//! process however it ends. A starting daemon sweeps the instance dirs whose
//! lock nobody holds: their daemon is gone, and so is anyone who could still
//! use them. Build dirs live in `<instance>/builds/`.
//!
//! Layout:
//! ```text
//! root/                      0711, ours, not a symlink
//!   instances/               0711
//!     <pid>-<random>/        0711, one per live (or dead, not yet swept) daemon
//!       lock                 held locked by the daemon
//!       builds/              0711
//!         <id>.<random>/     0700, one per build: work/ and tmp/ inside
//!       records/             0700, the builds' output spools and status log
//!                            (see `crate::spool`)
//! ```
//!
//! The directories down to `builds/` are *searchable* by everyone (0711) and listable
//! by nobody else: a build that runs as another user (`--user`) must reach its own
//! directory, which it owns, but cannot list `builds/` to find another build's, whose
//! directory is 0700 and owned by someone else anyway. Every other entry is 0700 or 0600.
//!
//! The lock file is created and locked under a temporary name and only then
//! renamed to `lock`, so a sweeping daemon never sees an unlocked `lock` of a
//! daemon that is still starting. An instance dir without `lock` is that
//! window (or a daemon that died in it): it is swept only once it is older
//! than [`ORPHAN_AGE`].

use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::cleanup::{remove_tree, CleanupError, RemoveReport};

/// Subdirectory of the root holding one directory per daemon instance.
const INSTANCES: &str = "instances";
/// The lock file in an instance directory.
const LOCK_FILE: &str = "lock";
/// The name the lock file is created and locked under before being renamed.
const LOCK_FILE_NEW: &str = ".lock.new";
/// Subdirectory of an instance directory holding the build dirs.
const BUILDS: &str = "builds";
/// The mode of the directories above the build dirs: search for all, list for the owner.
const SEARCHABLE: u32 = 0o711;
/// Longest sanitized build name, in bytes.
const MAX_NAME_LEN: usize = 64;

/// How old an instance dir without a lock file must be before a sweep removes
/// it: younger ones may belong to a daemon starting right now.
pub const ORPHAN_AGE: Duration = Duration::from_secs(60);

/// Why the state dir or a build dir could not be set up or removed.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    /// The state dir (or a directory in it) is a symlink: refused, so that
    /// nobody can redirect our files elsewhere.
    #[error("{} is a symlink; refusing to use it as a state directory", path.display())]
    Symlink {
        /// The offending path.
        path: PathBuf,
    },
    /// The state dir (or a directory in it) exists and is not a directory.
    #[error("{} is not a directory", path.display())]
    NotADirectory {
        /// The offending path.
        path: PathBuf,
    },
    /// The state dir (or a directory in it) belongs to another user.
    #[error("{} is owned by uid {owner}, not by us (uid {expected}); refusing to use it", path.display())]
    WrongOwner {
        /// The offending path.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Our effective uid.
        expected: u32,
    },
    /// A file-system operation failed.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The error from the system.
        #[source]
        source: io::Error,
    },
    /// Removing a directory tree failed.
    #[error(transparent)]
    Cleanup(#[from] CleanupError),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateDirError + 'a {
    move |source| StateDirError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// What the sweep at [`StateDir::open`] did. Never fatal: the caller logs it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    /// Instance dirs of dead daemons that were removed completely.
    pub removed_instances: Vec<PathBuf>,
    /// What went wrong (including instance dirs left in place because they
    /// contain mount points), one message each.
    pub errors: Vec<String>,
}

/// This daemon's state: the shared root and its own locked instance dir.
///
/// Dropping it releases the lock and leaves the instance dir in place (as a
/// crash would); the next daemon to start sweeps it. Call
/// [`StateDir::remove`] at clean shutdown instead.
#[derive(Debug)]
pub struct StateDir {
    root: PathBuf,
    instance_dir: PathBuf,
    _lock: File,
}

/// A build's private directory, `builds/<name>.<random>/`, with `work/` and
/// `tmp/` in it, all mode 0700. Not removed on drop: call
/// [`BuildDir::remove`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildDir {
    /// The build's directory.
    pub root: PathBuf,
    /// `root/work`: the build's working directory.
    pub work: PathBuf,
    /// `root/tmp`: the build's temporary directory.
    pub tmp: PathBuf,
}

impl BuildDir {
    /// Removes the dir if the build left its work and tmp dirs empty: three `rmdir`s,
    /// cheap enough to do in place. Returns false (having removed what it could) when
    /// anything is left, and the caller then runs [`BuildDir::remove`].
    pub fn remove_if_empty(&self) -> bool {
        [&self.work, &self.tmp, &self.root]
            .into_iter()
            .all(|dir| std::fs::remove_dir(dir).is_ok())
    }

    /// Removes the whole build dir, whatever the build left in it (read-only
    /// entries, symlinks, ...), with [`remove_tree`]. Mount points inside are
    /// left alone and listed in the report.
    pub fn remove(&self) -> Result<RemoveReport, StateDirError> {
        Ok(remove_tree(&self.root)?)
    }
}

/// The default state dir: `$TMPDIR/tether-<euid>` (`/tmp/tether-<euid>`).
pub fn default_root() -> PathBuf {
    std::env::temp_dir().join(format!("tether-{}", nix::unistd::geteuid()))
}

impl StateDir {
    /// Opens the state dir at `root` for this daemon.
    ///
    /// Creates `root` (mode 0700, with missing parents) or opens it, refusing
    /// a root that is a symlink, not a directory, or owned by another uid
    /// (and setting its mode to 0700 if it is ours). Then sweeps the instance
    /// dirs of dead daemons, and creates this daemon's instance dir
    /// `root/instances/<pid>-<random>/` (0700) holding a `lock` file locked
    /// for as long as the returned `StateDir` lives, and `builds/` in it.
    /// Returns what the sweep did.
    pub fn open(root: &Path) -> Result<(StateDir, SweepReport), StateDirError> {
        ensure_private_dir(root, true, SEARCHABLE)?;
        let instances = root.join(INSTANCES);
        ensure_private_dir(&instances, false, SEARCHABLE)?;
        let report = sweep(&instances);
        let (instance_dir, lock) = create_instance(&instances)?;
        Ok((
            StateDir {
                root: root.to_path_buf(),
                instance_dir,
                _lock: lock,
            },
            report,
        ))
    }

    /// The state dir shared by all daemons.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// This daemon's instance dir.
    pub fn instance_dir(&self) -> &Path {
        &self.instance_dir
    }

    /// Where this daemon's build dirs are: `instance_dir/builds`.
    pub fn builds_dir(&self) -> PathBuf {
        self.instance_dir.join(BUILDS)
    }

    /// Creates a new private build dir `builds/<name>.<random>/` with `work/`
    /// and `tmp/` in it, all mode 0700. Unique even for concurrent calls with
    /// the same name (created with `mkdir`, which fails rather than reuse).
    ///
    /// `name` is only a readable hint: characters other than
    /// `[A-Za-z0-9._-]` become `_`, it is cut to 64 bytes, an empty name
    /// becomes `build`, and `.` and `..` become `_` and `__`.
    pub fn create_build_dir(&self, name: &str) -> Result<BuildDir, StateDirError> {
        let builds = self.builds_dir();
        let prefix = format!("{}.", sanitize_name(name));
        let dir = tempfile::Builder::new()
            .prefix(&prefix)
            .rand_bytes(10)
            .tempdir_in(&builds)
            .map_err(io_err("create a build dir in", &builds))?;
        // Until `keep`, dropping `dir` (on error) removes it again.
        set_private(dir.path())?;
        let work = dir.path().join("work");
        let tmp = dir.path().join("tmp");
        create_private_dir(&work)?;
        create_private_dir(&tmp)?;
        let root = dir.keep();
        Ok(BuildDir {
            work: root.join("work"),
            tmp: root.join("tmp"),
            root,
        })
    }

    /// Removes this daemon's whole instance dir (at clean shutdown), with
    /// [`remove_tree`], then releases the lock. Mount points inside are left
    /// alone and listed in the report.
    pub fn remove(self) -> Result<RemoveReport, StateDirError> {
        // The lock is held until the tree is gone, so that no starting daemon
        // sweeps it at the same time; it is released when `self` drops.
        self.remove_in_place()
    }

    /// Removes the instance dir while keeping the lock held, for owners that share
    /// the `StateDir` (the executor) and remove it as their last act.
    pub fn remove_in_place(&self) -> Result<RemoveReport, StateDirError> {
        Ok(remove_tree(&self.instance_dir)?)
    }
}

/// Replaces characters other than `[A-Za-z0-9._-]` by `_`, cuts to
/// [`MAX_NAME_LEN`] bytes, and never returns an empty name, `.` or `..`.
fn sanitize_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    // Only ASCII is left, so any byte length is a char boundary.
    out.truncate(MAX_NAME_LEN);
    match out.as_str() {
        "" => "build".to_owned(),
        "." => "_".to_owned(),
        ".." => "__".to_owned(),
        _ => out,
    }
}

/// Makes sure `path` is a directory of ours with `mode`, creating it (and
/// its missing parents if `parents`) if need be. Checks are made on the
/// opened directory (opened without following a symlink), so they are about
/// the directory that is really there.
fn ensure_private_dir(path: &Path, parents: bool, mode: u32) -> Result<(), StateDirError> {
    match fs::symlink_metadata(path) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let created = DirBuilder::new().recursive(parents).mode(mode).create(path);
            match created {
                Ok(()) => {}
                // Created meanwhile by another daemon: checked below.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err("create", path)(e)),
            }
        }
        Err(e) => return Err(io_err("stat", path)(e)),
    }
    let meta = fs::symlink_metadata(path).map_err(io_err("stat", path))?;
    if meta.file_type().is_symlink() {
        return Err(StateDirError::Symlink {
            path: path.to_path_buf(),
        });
    }
    if !meta.is_dir() {
        return Err(StateDirError::NotADirectory {
            path: path.to_path_buf(),
        });
    }
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => StateDirError::Symlink {
                path: path.to_path_buf(),
            },
            Some(libc::ENOTDIR) => StateDirError::NotADirectory {
                path: path.to_path_buf(),
            },
            _ => io_err("open", path)(e),
        })?;
    let meta = dir.metadata().map_err(io_err("stat", path))?;
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid {
        return Err(StateDirError::WrongOwner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            expected: euid,
        });
    }
    if meta.mode() & 0o7777 != mode {
        dir.set_permissions(Permissions::from_mode(mode))
            .map_err(io_err("chmod", path))?;
    }
    Ok(())
}

/// Creates directory `path` with mode 0700 (whatever the umask).
fn create_private_dir(path: &Path) -> Result<(), StateDirError> {
    DirBuilder::new()
        .mode(0o700)
        .create(path)
        .map_err(io_err("create", path))?;
    set_private(path)
}

fn set_private(path: &Path) -> Result<(), StateDirError> {
    set_mode(path, 0o700)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), StateDirError> {
    fs::set_permissions(path, Permissions::from_mode(mode)).map_err(io_err("chmod", path))
}

/// Creates this daemon's instance dir in `instances` and its locked `lock`
/// file; returns the dir and the lock.
fn create_instance(instances: &Path) -> Result<(PathBuf, File), StateDirError> {
    let prefix = format!("{}-", std::process::id());
    let dir = tempfile::Builder::new()
        .prefix(&prefix)
        .rand_bytes(12)
        .tempdir_in(instances)
        .map_err(io_err("create an instance dir in", instances))?;
    // Until `keep`, dropping `dir` (on error) removes it again.
    set_mode(dir.path(), SEARCHABLE)?;
    let new_lock = dir.path().join(LOCK_FILE_NEW);
    let mut lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&new_lock)
        .map_err(io_err("create", &new_lock))?;
    match try_lock_exclusive(&lock) {
        Ok(Locked::Yes) => {}
        Ok(Locked::HeldElsewhere) => {
            return Err(StateDirError::Io {
                op: "lock",
                path: new_lock,
                source: io::Error::from(io::ErrorKind::WouldBlock),
            })
        }
        Err(e) => return Err(io_err("lock", &new_lock)(e)),
    }
    // For whoever looks: which process holds it.
    writeln!(lock, "{}", std::process::id()).map_err(io_err("write", &new_lock))?;
    // Visible as `lock` only once locked (the lock belongs to the open file,
    // not to the name).
    let lock_path = dir.path().join(LOCK_FILE);
    fs::rename(&new_lock, &lock_path).map_err(io_err("rename", &new_lock))?;
    let builds = dir.path().join(BUILDS);
    create_private_dir(&builds)?;
    set_mode(&builds, SEARCHABLE)?;
    Ok((dir.keep(), lock))
}

/// Result of [`try_lock_exclusive`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Locked {
    /// We hold the lock now.
    Yes,
    /// Someone else holds it.
    HeldElsewhere,
}

/// Takes an exclusive `flock` on `file` without waiting.
///
/// This is what `File::try_lock` does on Linux; it is called directly because
/// the workspace's MSRV (1.85) predates `File::try_lock` (1.89). `flock` locks
/// belong to the open file description: two opens of the same file conflict
/// even within one process, and the lock goes away when the last descriptor
/// of it is closed, i.e. when the process ends however it ends. `File` opens
/// with `O_CLOEXEC`, so build processes do not inherit it.
fn try_lock_exclusive(file: &File) -> io::Result<Locked> {
    // SAFETY: flock has no memory-safety preconditions; the descriptor is
    // open for the duration of the call since `file` is borrowed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(Locked::Yes);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(Locked::HeldElsewhere)
    } else {
        Err(e)
    }
}

/// Removes the instance dirs in `instances` whose daemon is gone. Errors are
/// collected into the report, never fatal.
fn sweep(instances: &Path) -> SweepReport {
    let mut report = SweepReport::default();
    let entries = match fs::read_dir(instances) {
        Ok(entries) => entries,
        Err(e) => {
            report.errors.push(format!("cannot list {}: {e}", instances.display()));
            return report;
        }
    };
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                report.errors.push(format!("cannot list {}: {e}", instances.display()));
                break;
            }
        };
        let path = entry.path();
        // Not following symlinks: anything but a real directory is not an
        // instance dir, and is left alone.
        match entry.file_type() {
            Ok(t) if t.is_dir() => {}
            Ok(_) => continue,
            Err(e) => {
                report.errors.push(format!("cannot stat {}: {e}", path.display()));
                continue;
            }
        }
        sweep_one(&path, &mut report);
    }
    report
}

fn sweep_one(path: &Path, report: &mut SweepReport) {
    let lock_path = path.join(LOCK_FILE);
    let opened = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&lock_path);
    match opened {
        Ok(lock) => match try_lock_exclusive(&lock) {
            Ok(Locked::Yes) => {
                // Its daemon is gone. Hold the lock while removing, so that
                // another sweeping daemon leaves it to us.
                remove_instance(path, report);
                drop(lock);
            }
            Ok(Locked::HeldElsewhere) => {} // alive
            Err(e) => report.errors.push(format!("cannot lock {}: {e}", lock_path.display())),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // A daemon between mkdir and lock, or one that died there.
            let age = fs::symlink_metadata(path)
                .and_then(|m| m.modified())
                .map(|mtime| SystemTime::now().duration_since(mtime).unwrap_or_default());
            match age {
                Ok(age) if age > ORPHAN_AGE => remove_instance(path, report),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => report.errors.push(format!("cannot stat {}: {e}", path.display())),
            }
        }
        Err(e) => report.errors.push(format!("cannot open {}: {e}", lock_path.display())),
    }
}

fn remove_instance(path: &Path, report: &mut SweepReport) {
    match remove_tree(path) {
        Ok(removed) if removed.is_complete() => report.removed_instances.push(path.to_path_buf()),
        Ok(removed) => {
            let mounts: Vec<String> = removed.skipped_mounts.iter().map(|p| p.display().to_string()).collect();
            report.errors.push(format!(
                "{} left in place: it contains mount points: {}",
                path.display(),
                mounts.join(", ")
            ));
        }
        Err(e) => report.errors.push(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, Permissions::from_mode(mode)).unwrap();
    }

    /// An instance dir made by hand, as a dead daemon leaves it.
    fn fake_instance(root: &Path, name: &str, with_lock: bool) -> PathBuf {
        let dir = root.join(INSTANCES).join(name);
        fs::create_dir_all(dir.join("builds/b.1/work/sub")).unwrap();
        fs::write(dir.join("builds/b.1/work/sub/file"), b"x").unwrap();
        chmod(&dir.join("builds/b.1/work/sub"), 0o500);
        if with_lock {
            fs::write(dir.join(LOCK_FILE), b"1\n").unwrap();
        }
        dir
    }

    #[test]
    fn creates_layout_with_private_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("a/b/state");
        let (state, report) = StateDir::open(&root).unwrap();
        assert_eq!(report, SweepReport::default());
        assert_eq!(state.root(), root);
        assert_eq!(state.instance_dir().parent().unwrap(), root.join(INSTANCES));
        let name = state.instance_dir().file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with(&format!("{}-", std::process::id())), "{name}");
        assert_eq!(state.builds_dir(), state.instance_dir().join("builds"));
        for dir in [
            root.clone(),
            root.join(INSTANCES),
            state.instance_dir().to_path_buf(),
            state.builds_dir(),
            // Missing parents too: a build running as another user passes through them.
            tmp.path().join("a/b"),
        ] {
            assert_eq!(mode(&dir), 0o711, "searchable, not listable: {}", dir.display());
        }
        assert_eq!(mode(&state.instance_dir().join(LOCK_FILE)), 0o600);
        assert!(state.instance_dir().join(LOCK_FILE).is_file());
        assert!(!state.instance_dir().join(LOCK_FILE_NEW).exists());

        let instance = state.instance_dir().to_path_buf();
        let removed = state.remove().unwrap();
        assert!(removed.is_complete());
        assert!(!instance.exists());
        assert!(root.join(INSTANCES).is_dir());
    }

    #[test]
    fn two_daemons_coexist_and_neither_sweeps_the_other() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("state");
        let (a, report_a) = StateDir::open(&root).unwrap();
        let (b, report_b) = StateDir::open(&root).unwrap();
        assert_eq!(report_a, SweepReport::default());
        assert_eq!(report_b, SweepReport::default());
        assert_ne!(a.instance_dir(), b.instance_dir());
        let build_a = a.create_build_dir("x").unwrap();
        let (c, report_c) = StateDir::open(&root).unwrap();
        assert_eq!(report_c, SweepReport::default());
        assert!(a.instance_dir().is_dir());
        assert!(b.instance_dir().is_dir());
        assert!(build_a.work.is_dir());
        for s in [a, b, c] {
            s.remove().unwrap();
        }
    }

    #[test]
    fn dead_daemon_is_swept() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("state");
        let (a, _) = StateDir::open(&root).unwrap();
        let build = a.create_build_dir("job").unwrap();
        fs::write(build.work.join("out"), b"x").unwrap();
        chmod(&build.work, 0o500);
        let dead = a.instance_dir().to_path_buf();
        // Dropping releases the lock and leaves the dir, as a crash would.
        drop(a);
        assert!(dead.is_dir());

        let by_hand = fake_instance(&root, "1-byhand", true);
        let (b, report) = StateDir::open(&root).unwrap();
        let mut removed = report.removed_instances.clone();
        removed.sort();
        let mut expected = vec![dead.clone(), by_hand.clone()];
        expected.sort();
        assert_eq!(removed, expected);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert!(!dead.exists());
        assert!(!by_hand.exists());
        assert!(b.instance_dir().is_dir());
        b.remove().unwrap();
    }

    #[test]
    fn instance_with_held_lock_is_not_swept() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("state");
        fs::create_dir_all(root.join(INSTANCES)).unwrap();
        let alive = fake_instance(&root, "2-alive", true);
        let held = File::open(alive.join(LOCK_FILE)).unwrap();
        assert_eq!(try_lock_exclusive(&held).unwrap(), Locked::Yes);
        let (s, report) = StateDir::open(&root).unwrap();
        assert_eq!(report, SweepReport::default());
        assert!(alive.join("builds/b.1/work/sub/file").exists());
        drop(held);
        s.remove().unwrap();
        // TempDir's own cleanup cannot empty a read-only dir when not root.
        remove_tree(tmp.path()).unwrap();
    }

    #[test]
    fn lockless_instance_swept_only_when_old() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("state");
        let young = fake_instance(&root, "3-young", false);
        let old = fake_instance(&root, "4-old", false);
        let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
        File::open(&old).unwrap().set_modified(an_hour_ago).unwrap();
        // Not an instance dir: left alone.
        fs::write(root.join(INSTANCES).join("stray-file"), b"x").unwrap();

        let (s, report) = StateDir::open(&root).unwrap();
        assert_eq!(report.removed_instances, vec![old.clone()]);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert!(!old.exists());
        assert!(young.is_dir());
        assert!(root.join(INSTANCES).join("stray-file").exists());
        s.remove().unwrap();
        remove_tree(tmp.path()).unwrap();
    }

    #[test]
    fn concurrent_build_dirs_with_same_name_differ() {
        let tmp = tempfile::tempdir().unwrap();
        let (state, _) = StateDir::open(&tmp.path().join("state")).unwrap();
        let (one, two) = std::thread::scope(|s| {
            let one = s.spawn(|| state.create_build_dir("same"));
            let two = s.spawn(|| state.create_build_dir("same"));
            (one.join().unwrap().unwrap(), two.join().unwrap().unwrap())
        });
        assert_ne!(one.root, two.root);
        for build in [&one, &two] {
            assert_eq!(build.root.parent().unwrap(), state.builds_dir());
            let name = build.root.file_name().unwrap().to_str().unwrap();
            assert!(name.starts_with("same."), "{name}");
            assert_eq!(build.work, build.root.join("work"));
            assert_eq!(build.tmp, build.root.join("tmp"));
            for dir in [&build.root, &build.work, &build.tmp] {
                assert_eq!(mode(dir), 0o700, "{}", dir.display());
            }
        }
        state.remove().unwrap();
    }

    #[test]
    fn names_are_sanitized() {
        assert_eq!(sanitize_name("a/b"), "a_b");
        assert_eq!(sanitize_name("../../etc"), ".._.._etc");
        assert_eq!(sanitize_name(".."), "__");
        assert_eq!(sanitize_name("."), "_");
        assert_eq!(sanitize_name(""), "build");
        assert_eq!(sanitize_name("héllo wörld"), "h_llo_w_rld");
        assert_eq!(sanitize_name("ok-1.2_x"), "ok-1.2_x");
        assert_eq!(sanitize_name(&"x".repeat(200)).len(), MAX_NAME_LEN);
        assert_eq!(sanitize_name(&"é".repeat(200)), "_".repeat(MAX_NAME_LEN));

        let tmp = tempfile::tempdir().unwrap();
        let (state, _) = StateDir::open(&tmp.path().join("state")).unwrap();
        for name in ["../../escape", "..", "/", "a/b/c", ""] {
            let build = state.create_build_dir(name).unwrap();
            assert_eq!(build.root.parent().unwrap(), state.builds_dir(), "{name}");
            assert!(build.work.is_dir());
        }
        assert!(!tmp.path().join("escape").exists());
        state.remove().unwrap();
    }

    #[test]
    fn symlink_root_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        fs::create_dir(&real).unwrap();
        let link = tmp.path().join("link");
        symlink(&real, &link).unwrap();
        assert!(matches!(StateDir::open(&link), Err(StateDirError::Symlink { .. })));
        let dangling = tmp.path().join("dangling");
        symlink(tmp.path().join("nowhere"), &dangling).unwrap();
        assert!(matches!(StateDir::open(&dangling), Err(StateDirError::Symlink { .. })));
        assert!(!tmp.path().join("nowhere").exists());
        assert_eq!(fs::read_dir(&real).unwrap().count(), 0);

        let file = tmp.path().join("file");
        fs::write(&file, b"x").unwrap();
        assert!(matches!(
            StateDir::open(&file),
            Err(StateDirError::NotADirectory { .. })
        ));

        // A symlinked `instances` is refused too.
        let root = tmp.path().join("state");
        fs::create_dir(&root).unwrap();
        symlink(&real, root.join(INSTANCES)).unwrap();
        assert!(matches!(StateDir::open(&root), Err(StateDirError::Symlink { .. })));
    }

    #[test]
    fn root_mode_is_fixed() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("state");
        fs::create_dir(&root).unwrap();
        chmod(&root, 0o755);
        let (state, _) = StateDir::open(&root).unwrap();
        assert_eq!(mode(&root), 0o711);
        state.remove().unwrap();
    }

    #[test]
    fn root_of_another_user_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: needs root to give a directory to another uid");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("state");
        fs::create_dir(&root).unwrap();
        std::os::unix::fs::chown(&root, Some(65534), Some(65534)).unwrap();
        match StateDir::open(&root) {
            Err(StateDirError::WrongOwner { owner, .. }) => assert_eq!(owner, 65534),
            other => panic!("expected WrongOwner, got {other:?}"),
        }
    }

    #[test]
    fn build_dir_remove_removes_read_only_contents() {
        let tmp = tempfile::tempdir().unwrap();
        let (state, _) = StateDir::open(&tmp.path().join("state")).unwrap();
        let build = state.create_build_dir("ro").unwrap();
        fs::create_dir_all(build.work.join("a/b")).unwrap();
        fs::write(build.work.join("a/b/f"), b"x").unwrap();
        fs::write(build.tmp.join("g"), b"x").unwrap();
        chmod(&build.work.join("a/b/f"), 0o400);
        chmod(&build.work.join("a/b"), 0o000);
        chmod(&build.work.join("a"), 0o500);
        chmod(&build.tmp, 0o500);
        chmod(&build.root, 0o500);
        let report = build.remove().unwrap();
        assert!(report.is_complete());
        assert!(!build.root.exists());
        assert!(state.builds_dir().is_dir());
        state.remove().unwrap();
    }

    #[test]
    fn default_root_is_per_user() {
        let root = default_root();
        assert_eq!(root.parent().unwrap(), std::env::temp_dir());
        assert_eq!(
            root.file_name().unwrap().to_str().unwrap(),
            format!("tether-{}", nix::unistd::geteuid())
        );
    }
}
