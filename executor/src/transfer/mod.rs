//! Directory uploads and downloads as tar streams: [`pack`] and [`unpack`].
//!
//! Why this exists: a client sends a build its sources as a tar stream and gets
//! its outputs back the same way. The stream comes from outside the daemon and
//! is unpacked into a build's private directory, so every archive is treated as
//! hostile. The `tar` crate is used only to *parse* the stream; files are
//! created here, because `Entry::unpack` resolves paths as strings and follows
//! symlinks that the same archive planted a few entries earlier.
//!
//! [`unpack`] therefore:
//! - refuses (with an error naming the entry, before writing anything for it)
//!   absolute paths, `..` components, device nodes, FIFOs and every other
//!   special entry, symlinks whose target is absolute or may resolve outside
//!   the destination, and hard links to anything but a regular file unpacked
//!   earlier from the same archive;
//! - never follows a symlink while creating anything: every parent directory
//!   of an entry is opened component by component with
//!   `openat(O_NOFOLLOW | O_DIRECTORY)` from a descriptor of the destination,
//!   and files are created with `O_CREAT | O_EXCL | O_NOFOLLOW`, so a symlink
//!   in the way (`a -> .`, then `a/b`) is refused as
//!   [`UnpackError::ThroughSymlink`] instead of being written through;
//! - counts entries and regular file bytes against [`UnpackLimits`] before
//!   writing them, and reads the stream once, never buffering it whole;
//! - reads the extension headers (GNU long names, PAX records) itself, each
//!   refused before it is read when it is larger than [`MAX_NAME_LEN`] or
//!   [`MAX_PAX_LEN`] (see the `headers` module: the `tar` crate would buffer
//!   them whole);
//! - applies permission bits only (`mode & 0o777`: setuid, setgid and sticky
//!   are dropped) and modification times, never ownership: everything belongs
//!   to the running user. Directory modes and times are applied last, children
//!   before parents, so that a read-only directory in the archive can still be
//!   filled and its time is not changed by its own children.
//!
//! Symlink targets are checked lexically against the link's own directory
//! (which is a real directory: it was opened without following symlinks). A
//! `..` that comes after a normal component (`a/../b`) is refused too, because
//! `a` may itself be a symlink (`a -> .`), which would make the target end up
//! one level higher than its spelling says. With that rule, every symlink the
//! archive creates points inside the destination, provided the destination
//! contained no symlinks pointing out of it before.
//!
//! [`pack`] writes a file or the *contents* of a directory (entries named
//! relative to the directory, no entry for the directory itself), does not
//! follow symlinks, skips special files with a warning, and skips entries
//! matching exclude globs (see [`pack`] for the glob syntax).
//!
//! Linux/Unix only (`openat` and friends).

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use std::cell::Cell;
use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, File, Metadata};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use nix::errno::Errno;
use nix::fcntl::{open, openat, AtFlags, OFlag};
use nix::sys::stat::{fchmod, fstatat, futimens, mkdirat, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{linkat, symlinkat, unlinkat, UnlinkatFlags};
use tar::{EntryType, Header, HeaderMode};

mod headers;

use headers::{Extension, Extensions, Names};
pub use headers::{MAX_NAME_LEN, MAX_PAX_LEN};

/// Most characters of an entry name or link target an error shows; the rest is
/// summarised as its length, so that a hostile name cannot flood a log or outgrow a
/// reply.
pub const SHOWN_NAME_LEN: usize = 200;

/// Default cap on the sum of regular file sizes one archive may unpack: 8 GiB.
pub const DEFAULT_MAX_BYTES: u64 = 8 << 30;
/// Default cap on the number of entries (of every kind) one archive may hold.
pub const DEFAULT_MAX_ENTRIES: u64 = 1_000_000;

/// Caps on what one archive may unpack.
#[derive(Debug, Clone, Copy)]
pub struct UnpackLimits {
    /// Most bytes of regular file data (the sum of the declared sizes).
    pub max_bytes: u64,
    /// Most entries: files, directories, links (extension headers such as
    /// GNU long names and pax records are not counted).
    pub max_entries: u64,
}

impl Default for UnpackLimits {
    /// [`DEFAULT_MAX_BYTES`] (8 GiB) and [`DEFAULT_MAX_ENTRIES`] (1,000,000).
    fn default() -> Self {
        UnpackLimits {
            max_bytes: DEFAULT_MAX_BYTES,
            max_entries: DEFAULT_MAX_ENTRIES,
        }
    }
}

/// What [`unpack`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UnpackReport {
    /// Entries unpacked (files, directories, symlinks, hard links).
    pub entries: u64,
    /// Bytes of regular file data written.
    pub bytes: u64,
}

/// Why [`unpack`] refused or failed an archive. Entry names are shown lossily
/// (non-UTF-8 bytes replaced) and cut at [`SHOWN_NAME_LEN`] characters.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The destination directory could not be opened.
    #[error("cannot open destination {}: {source}", path.display())]
    Dest { path: PathBuf, source: io::Error },
    /// An entry name starts with `/`.
    #[error("entry {entry:?} has an absolute path")]
    AbsolutePath { entry: String },
    /// An entry name has a `..` component.
    #[error("entry {entry:?} has a '..' component")]
    ParentComponent { entry: String },
    /// A symlink or hard link target is absolute, escapes (or may escape) the
    /// destination, or (hard links) does not name a regular file unpacked
    /// earlier from the same archive.
    #[error("link {entry:?} points to {target:?}, outside the destination or not an earlier file of the archive")]
    LinkOutside { entry: String, target: String },
    /// Creating the entry would go through a symlink (a parent component of
    /// the entry, or the entry itself for a directory, is a symlink).
    #[error("entry {entry:?} would be written through a symlink")]
    ThroughSymlink { entry: String },
    /// Device nodes, FIFOs, sparse files and every other non-regular kind.
    #[error("entry {entry:?} is a {kind}, which is not allowed")]
    Special { entry: String, kind: String },
    /// The archive holds more regular file data than allowed.
    #[error("archive holds more than {limit} bytes of file data (at entry {entry:?})")]
    TooLarge { entry: String, limit: u64 },
    /// The archive holds more entries than allowed.
    #[error("archive holds more than {limit} entries (at entry {entry:?})")]
    TooManyEntries { entry: String, limit: u64 },
    /// An extension header, or the entry name or link target it gives, is larger
    /// than allowed ([`MAX_NAME_LEN`], [`MAX_PAX_LEN`]).
    #[error("archive has a {what} of {size} bytes, more than the limit of {limit} (it starts {start:?})")]
    HeaderTooLarge {
        what: &'static str,
        size: u64,
        limit: u64,
        start: String,
    },
    /// The stream ended early: in a header, or in an entry's data (whose
    /// declared size was larger than what followed).
    #[error("archive is truncated (after or at entry {entry:?})")]
    Truncated { entry: String },
    /// A header is malformed (bad checksum, bad number, bad extension), or
    /// reading the stream failed.
    #[error("archive is corrupt (after or at entry {entry:?}): {reason}")]
    Corrupt { entry: String, reason: String },
    /// Creating the entry failed (including a name already taken by something
    /// that may not be replaced, such as a directory).
    #[error("cannot unpack entry {entry:?}: {source}")]
    Io { entry: String, source: io::Error },
}

/// What [`pack`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PackReport {
    /// Entries written (files, directories, symlinks).
    pub entries: u64,
    /// Bytes of regular file data written.
    pub bytes: u64,
    /// Entries (with their subtrees, for directories) left out because they
    /// matched an exclude pattern.
    pub excluded: u64,
    /// Special files (devices, FIFOs, sockets) skipped.
    pub skipped_special: u64,
}

/// Why [`pack`] failed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// Reading `path` or writing its entry to the output failed (a file that
    /// shrank while being read is reported here too).
    #[error("cannot archive {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// An exclude pattern is not a valid glob.
    #[error("bad exclude pattern {pattern:?}: {reason}")]
    BadPattern { pattern: String, reason: String },
}

// ---------------------------------------------------------------------------
// unpack
// ---------------------------------------------------------------------------

/// Unpacks a tar stream into `dest` (an existing directory), reading it once,
/// never buffering it whole. See the module doc for what is refused.
///
/// On error, entries unpacked before the failing one stay in `dest` (and may
/// lack their final directory modes and times); nothing is written outside it.
pub fn unpack(archive: impl Read, dest: &Path, limits: UnpackLimits) -> Result<UnpackReport, UnpackError> {
    let root = open(
        dest,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| UnpackError::Dest {
        path: dest.to_path_buf(),
        source: e.into(),
    })?;
    let eof = Rc::new(Cell::new(false));
    let mut tar = tar::Archive::new(EofTracker {
        inner: archive,
        eof: Rc::clone(&eof),
    });
    let mut state = Unpacker {
        root,
        limits,
        report: UnpackReport::default(),
        files: HashSet::new(),
        dirs: Vec::new(),
    };
    let mut last = String::from("<archive start>");
    // Raw: extension headers come as entries, read here within bounds.
    let entries = tar.entries().map_err(|e| stream_error(&e, &eof, &last))?.raw(true);
    let mut extensions = Extensions::default();
    for entry in entries {
        let mut entry = entry.map_err(|e| stream_error(&e, &eof, &last))?;
        let kind = entry.header().entry_type();
        let size = entry.size();
        if let Some(ext) = Extension::of(kind) {
            extensions.read(ext, &mut entry, size)?;
            continue;
        }
        let link = entry.header().link_name_bytes();
        let names = extensions.take(&entry.header().path_bytes(), link.as_deref(), size)?;
        last = shown(&names.path);
        state.entry(&mut entry, names, &eof)?;
    }
    if extensions.pending() {
        return Err(UnpackError::Truncated { entry: last });
    }
    state.finish_dirs()?;
    Ok(state.report)
}

/// Wraps the archive reader to remember whether it reached end of stream, so
/// that errors from the tar parser can be told apart: truncation or corruption.
struct EofTracker<R> {
    inner: R,
    eof: Rc<Cell<bool>>,
}

impl<R: Read> Read for EofTracker<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.eof.set(true);
        }
        Ok(n)
    }
}

fn stream_error(e: &io::Error, eof: &Cell<bool>, entry: &str) -> UnpackError {
    if eof.get() || e.kind() == io::ErrorKind::UnexpectedEof {
        UnpackError::Truncated {
            entry: entry.to_owned(),
        }
    } else {
        UnpackError::Corrupt {
            entry: entry.to_owned(),
            reason: e.to_string(),
        }
    }
}

/// `bytes` as an error shows a name: lossily, and past [`SHOWN_NAME_LEN`]
/// characters cut, with the whole length said.
fn shown(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    match text.char_indices().nth(SHOWN_NAME_LEN) {
        Some((cut, _)) => format!("{}... ({} bytes)", &text[..cut], bytes.len()),
        None => text.into_owned(),
    }
}

/// A directory created or reused by the archive, whose mode and time are
/// applied at the end.
struct PendingDir {
    components: Vec<Vec<u8>>,
    mode: u32,
    mtime: u64,
}

struct Unpacker {
    root: OwnedFd,
    limits: UnpackLimits,
    report: UnpackReport,
    /// Regular files unpacked so far (normalized paths), the only valid hard
    /// link targets.
    files: HashSet<Vec<u8>>,
    dirs: Vec<PendingDir>,
}

/// One entry's name split into normal components.
struct EntryName {
    shown: String,
    components: Vec<Vec<u8>>,
}

impl EntryName {
    fn joined(&self) -> Vec<u8> {
        self.components.join(&b'/')
    }

    fn io(&self, e: impl Into<io::Error>) -> UnpackError {
        UnpackError::Io {
            entry: self.shown.clone(),
            source: e.into(),
        }
    }
}

/// Splits an entry path into normal components, refusing absolute paths and
/// `..`. Empty and `.` components are dropped.
fn split_entry_path(raw: &[u8]) -> Result<EntryName, UnpackError> {
    let shown = shown(raw);
    if raw.first() == Some(&b'/') {
        return Err(UnpackError::AbsolutePath { entry: shown });
    }
    let mut components = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(UnpackError::ParentComponent { entry: shown }),
            c => components.push(c.to_vec()),
        }
    }
    Ok(EntryName { shown, components })
}

/// Checks a symlink target of the link `name`: relative, and (lexically, from
/// the link's directory) inside the root, with no `..` after a normal component.
fn check_symlink_target(name: &EntryName, target: &[u8]) -> Result<(), UnpackError> {
    let outside = || UnpackError::LinkOutside {
        entry: name.shown.clone(),
        target: shown(target),
    };
    if target.is_empty() || target.first() == Some(&b'/') {
        return Err(outside());
    }
    let mut depth = name.components.len().saturating_sub(1);
    let mut descended = false;
    for c in target.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                if descended || depth == 0 {
                    return Err(outside());
                }
                depth -= 1;
            }
            _ => descended = true,
        }
    }
    Ok(())
}

fn entry_kind_name(kind: EntryType) -> String {
    match kind {
        EntryType::Char => "character device".into(),
        EntryType::Block => "block device".into(),
        EntryType::Fifo => "fifo".into(),
        EntryType::GNUSparse => "sparse file".into(),
        other => format!("entry of type {:?}", other),
    }
}

impl Unpacker {
    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        names: Names,
        eof: &Cell<bool>,
    ) -> Result<(), UnpackError> {
        let kind = entry.header().entry_type();
        let name = split_entry_path(&names.path)?;
        if !matches!(
            kind,
            EntryType::Regular | EntryType::Continuous | EntryType::Directory | EntryType::Symlink | EntryType::Link
        ) {
            return Err(UnpackError::Special {
                entry: name.shown,
                kind: entry_kind_name(kind),
            });
        }
        self.report.entries += 1;
        if self.report.entries > self.limits.max_entries {
            return Err(UnpackError::TooManyEntries {
                entry: name.shown,
                limit: self.limits.max_entries,
            });
        }
        let header = entry.header();
        let mode = header.mode().map_err(|e| corrupt(&name, &e))? & 0o777;
        let mtime = header.mtime().map_err(|e| corrupt(&name, &e))?;
        if name.components.is_empty() {
            // The archive root itself (`./`): nothing to create; its mode and
            // time are not applied to `dest`, which is not ours to change.
            return match kind {
                EntryType::Directory => Ok(()),
                _ => Err(name.io(io::Error::new(io::ErrorKind::InvalidInput, "entry has an empty name"))),
            };
        }
        match kind {
            EntryType::Directory => self.directory(name, mode, mtime),
            EntryType::Symlink => self.symlink(&name, &names.link.unwrap_or_default(), mtime),
            EntryType::Link => self.hard_link(&name, &names.link.unwrap_or_default()),
            _ => self.regular(entry, &name, mode, mtime, eof),
        }
    }

    /// Opens the parent directory of `name` by walking its components from
    /// the root without following symlinks, creating missing ones (0755).
    fn open_parent(&self, name: &EntryName) -> Result<OwnedFd, UnpackError> {
        let parents = &name.components[..name.components.len() - 1];
        self.walk(name, parents, true)
    }

    fn walk(&self, name: &EntryName, components: &[Vec<u8>], create: bool) -> Result<OwnedFd, UnpackError> {
        let mut dir = open_dir_at(&self.root, b".").map_err(|e| name.io(e))?;
        for c in components {
            dir = match open_dir_at(&dir, c) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) if create => {
                    match mkdirat(&dir, OsStr::from_bytes(c), Mode::from_bits_truncate(0o755)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(name.io(e)),
                    }
                    open_dir_at(&dir, c).map_err(|e| self.walk_error(name, &dir, c, e))?
                }
                Err(e) => return Err(self.walk_error(name, &dir, c, e)),
            };
        }
        Ok(dir)
    }

    /// Turns a failed `openat(O_NOFOLLOW | O_DIRECTORY)` into an error:
    /// ThroughSymlink if the component is a symlink.
    fn walk_error(&self, name: &EntryName, dir: &OwnedFd, component: &[u8], e: Errno) -> UnpackError {
        if is_symlink_at(dir, component) {
            UnpackError::ThroughSymlink {
                entry: name.shown.clone(),
            }
        } else {
            name.io(e)
        }
    }

    fn directory(&mut self, name: EntryName, mode: u32, mtime: u64) -> Result<(), UnpackError> {
        let parent = self.open_parent(&name)?;
        let last = last_component(&name);
        match mkdirat(&parent, OsStr::from_bytes(last), Mode::from_bits_truncate(0o755)) {
            Ok(()) => {}
            Err(Errno::EEXIST) => {
                // Reuse an existing directory; refuse a symlink in its place.
                open_dir_at(&parent, last).map_err(|e| self.walk_error(&name, &parent, last, e))?;
            }
            Err(e) => return Err(name.io(e)),
        }
        self.dirs.push(PendingDir {
            components: name.components,
            mode,
            mtime,
        });
        Ok(())
    }

    fn symlink(&mut self, name: &EntryName, target: &[u8], mtime: u64) -> Result<(), UnpackError> {
        check_symlink_target(name, target)?;
        let parent = self.open_parent(name)?;
        let last = last_component(name);
        self.clear_name(name, &parent, last)?;
        symlinkat(OsStr::from_bytes(target), &parent, OsStr::from_bytes(last)).map_err(|e| name.io(e))?;
        let t = time_spec(mtime);
        utimensat(
            &parent,
            OsStr::from_bytes(last),
            &t,
            &t,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| name.io(e))
    }

    fn hard_link(&mut self, name: &EntryName, target: &[u8]) -> Result<(), UnpackError> {
        let outside = || UnpackError::LinkOutside {
            entry: name.shown.clone(),
            target: shown(target),
        };
        let target_name = match split_entry_path(target) {
            Ok(t) if !t.components.is_empty() && self.files.contains(&t.joined()) => t,
            _ => return Err(outside()),
        };
        let target_parent = self.walk(name, &target_name.components[..target_name.components.len() - 1], false)?;
        let target_last = last_component(&target_name);
        // The name was a regular file when unpacked; check it still is.
        let st = fstatat(
            &target_parent,
            OsStr::from_bytes(target_last),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| name.io(e))?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            return Err(outside());
        }
        let parent = self.open_parent(name)?;
        let last = last_component(name);
        self.clear_name(name, &parent, last)?;
        linkat(
            &target_parent,
            OsStr::from_bytes(target_last),
            &parent,
            OsStr::from_bytes(last),
            AtFlags::empty(),
        )
        .map_err(|e| name.io(e))?;
        self.files.insert(name.joined());
        Ok(())
    }

    fn regular<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        name: &EntryName,
        mode: u32,
        mtime: u64,
        eof: &Cell<bool>,
    ) -> Result<(), UnpackError> {
        let size = entry.size();
        let total = self.report.bytes.saturating_add(size);
        if total > self.limits.max_bytes {
            return Err(UnpackError::TooLarge {
                entry: name.shown.clone(),
                limit: self.limits.max_bytes,
            });
        }
        let parent = self.open_parent(name)?;
        let last = last_component(name);
        self.clear_name(name, &parent, last)?;
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd =
            openat(&parent, OsStr::from_bytes(last), flags, Mode::from_bits_truncate(0o600)).map_err(|e| name.io(e))?;
        let mut file = File::from(fd);
        copy_exact(entry, &mut file, size, name, eof)?;
        fchmod(file.as_fd(), Mode::from_bits_truncate(mode)).map_err(|e| name.io(e))?;
        let t = time_spec(mtime);
        futimens(file.as_fd(), &t, &t).map_err(|e| name.io(e))?;
        self.report.bytes = total;
        self.files.insert(name.joined());
        Ok(())
    }

    /// Makes room for a new file or link named `last` in `parent`: an existing
    /// regular file or symlink is unlinked (unlinking never follows), anything
    /// else (a directory) is an error.
    fn clear_name(&mut self, name: &EntryName, parent: &OwnedFd, last: &[u8]) -> Result<(), UnpackError> {
        let st = match fstatat(parent, OsStr::from_bytes(last), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(name.io(e)),
        };
        let fmt = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        if fmt != SFlag::S_IFREG && fmt != SFlag::S_IFLNK {
            return Err(name.io(Errno::EEXIST));
        }
        unlinkat(parent, OsStr::from_bytes(last), UnlinkatFlags::NoRemoveDir).map_err(|e| name.io(e))?;
        self.files.remove(&name.joined());
        Ok(())
    }

    /// Applies the modes and times of the archive's directories, deepest
    /// first, walking to each again without following symlinks.
    fn finish_dirs(&mut self) -> Result<(), UnpackError> {
        let mut dirs = std::mem::take(&mut self.dirs);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components.len()));
        for d in dirs {
            let name = EntryName {
                shown: shown(&d.components.join(&b'/')),
                components: d.components,
            };
            let parent = self.walk(&name, &name.components[..name.components.len() - 1], false)?;
            let last = last_component(&name);
            let fd = open_dir_at(&parent, last).map_err(|e| self.walk_error(&name, &parent, last, e))?;
            fchmod(&fd, Mode::from_bits_truncate(d.mode)).map_err(|e| name.io(e))?;
            let t = time_spec(d.mtime);
            futimens(&fd, &t, &t).map_err(|e| name.io(e))?;
        }
        Ok(())
    }
}

fn corrupt(name: &EntryName, e: &io::Error) -> UnpackError {
    UnpackError::Corrupt {
        entry: name.shown.clone(),
        reason: e.to_string(),
    }
}

fn last_component(name: &EntryName) -> &[u8] {
    name.components.last().map(Vec::as_slice).unwrap_or(b".")
}

fn open_dir_at(dir: &OwnedFd, component: &[u8]) -> Result<OwnedFd, Errno> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    openat(dir, OsStr::from_bytes(component), flags, Mode::empty())
}

fn is_symlink_at(dir: &OwnedFd, component: &[u8]) -> bool {
    fstatat(dir, OsStr::from_bytes(component), AtFlags::AT_SYMLINK_NOFOLLOW)
        .map(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK)
        .unwrap_or(false)
}

fn time_spec(mtime: u64) -> TimeSpec {
    TimeSpec::new(i64::try_from(mtime).unwrap_or(i64::MAX), 0)
}

/// Copies exactly `size` bytes of entry data into `file`; fewer means the
/// archive was truncated or the declared size lied.
fn copy_exact(
    entry: &mut impl Read,
    file: &mut File,
    size: u64,
    name: &EntryName,
    eof: &Cell<bool>,
) -> Result<(), UnpackError> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = size;
    while left > 0 {
        let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        let n = match entry.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(UnpackError::Truncated {
                    entry: name.shown.clone(),
                })
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(stream_error(&e, eof, &name.shown)),
        };
        file.write_all(&buf[..n]).map_err(|e| name.io(e))?;
        left -= n as u64;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// pack
// ---------------------------------------------------------------------------

/// Why a directory inside a root could not be reached ([`create_dirs_inside`]). Names
/// are shown relative to the root, quoted.
#[derive(Debug, thiserror::Error)]
pub enum InsideError {
    #[error("{0} is a dangling symlink")]
    Dangling(String),
    #[error("{0} leads outside the work dir (through a symlink)")]
    Outside(String),
    #[error("{0} is not a directory")]
    NotADirectory(String),
    #[error("cannot create {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// Opens, creating what is missing, the directories `components` under `root` (a
/// canonical path), one at a time, checking that each resolves inside `root` before
/// going further: a symlink planted in a build's work dir can never make tether create
/// a directory outside it. Returns the canonical path of the last one (`root` for none).
pub fn create_dirs_inside(root: &Path, components: &[impl AsRef<OsStr>]) -> Result<PathBuf, InsideError> {
    let mut dir = root.to_owned();
    for c in components {
        let c = c.as_ref();
        let next = dir.join(c);
        match fs::create_dir(&next) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(InsideError::Io { path: next, source }),
        }
        dir = resolve_inside(root, &next)?;
        if !dir.is_dir() {
            return Err(InsideError::NotADirectory(format!("{:?}", shown(c.as_bytes()))));
        }
    }
    Ok(dir)
}

/// The canonical path of `path`, which must resolve inside `root` (canonical).
pub fn resolve_inside(root: &Path, path: &Path) -> Result<PathBuf, InsideError> {
    let shown = || format!("{:?}", path.strip_prefix(root).unwrap_or(path).as_os_str());
    let canonical = fs::canonicalize(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => InsideError::Dangling(shown()),
        _ => InsideError::Io {
            path: path.to_owned(),
            source,
        },
    })?;
    if !canonical.starts_with(root) {
        return Err(InsideError::Outside(shown()));
    }
    Ok(canonical)
}

/// Whether a transfer path names a directory's *contents* rather than the thing itself:
/// `.`, empty, or ending in `/.` (as `cp -r DIR/. dest/` copies DIR's contents).
pub fn names_contents(raw: &[u8]) -> bool {
    raw.is_empty() || raw == b"." || raw.ends_with(b"/.")
}

/// `path` as a relative path of normal components (`.` components dropped, so `.` and
/// the empty path are the empty path), refused when absolute or holding `..`: the
/// check for a client-given path inside a build's work dir, before any symlink in it
/// is looked at.
pub fn relative_inside(path: &Path) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::Normal(n) => out.push(n),
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => return Err(format!("{} has a '..' component", path.display())),
            std::path::Component::RootDir | std::path::Component::Prefix(_) => {
                return Err(format!("{} is not a relative path", path.display()))
            }
        }
    }
    Ok(out)
}

/// Writes `src` (a file or a directory) as a tar stream into `out`.
///
/// A file `src` becomes one entry named by its file name. A directory `src`
/// is archived as its *contents* at the archive root: `src/a/b` becomes entry
/// `a/b`, and there is no entry for `src` itself. Entries are written in
/// name order (parents before children), with their mode, mtime and
/// ownership; symlinks are stored as symlinks (never followed); hard links
/// are not detected (each name is stored as a file); special files (devices,
/// FIFOs, sockets) are skipped with a `tracing` warning.
///
/// `excludes` are glob patterns matched against each entry's path relative to
/// `src` (`/`-separated), with globset's syntax: `*` and `?` never match `/`,
/// a whole component `**` matches any number of components (zero included),
/// `[...]` and `{a,b}` as usual. A pattern without `/` is matched against the
/// entry's last component at any depth (`*.o`); a pattern with `/` against the
/// whole relative path (`target/**`, which also matches `target` itself). An
/// excluded directory is skipped with its whole subtree.
pub fn pack(src: &Path, excludes: &[String], out: impl Write) -> Result<PackReport, PackError> {
    pack_as(src, None, excludes, out)
}

/// [`pack`], with the entries of a directory `src` under `name` (an entry for the
/// directory itself first, then `name/a/b` for `src/a/b`), as `cp -r src dest/`
/// would place them; a file `src` becomes one entry named `name`. `None` is [`pack`].
pub fn pack_as(src: &Path, name: Option<&Path>, excludes: &[String], out: impl Write) -> Result<PackReport, PackError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PackError::Io { path, source }
    };
    let excludes = exclude_set(excludes)?;
    let meta = fs::symlink_metadata(src).map_err(io_err(src))?;
    let mut packer = Packer {
        builder: tar::Builder::new(out),
        excludes,
        report: PackReport::default(),
        prefix: PathBuf::new(),
    };
    packer.builder.follow_symlinks(false);
    if meta.is_dir() {
        if let Some(name) = name {
            packer.one(src, name, &meta)?;
            packer.prefix = name.to_path_buf();
        }
        packer.tree(src)?;
    } else {
        let name = name
            .map(Path::to_path_buf)
            .or_else(|| src.file_name().map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("file"));
        packer.one(src, &name, &meta)?;
    }
    packer.builder.finish().map_err(io_err(src))?;
    Ok(packer.report)
}

struct Packer<W: Write> {
    builder: tar::Builder<W>,
    excludes: GlobSet,
    report: PackReport,
    /// Put in front of every entry name of [`Packer::tree`] (empty: none).
    prefix: PathBuf,
}

impl<W: Write> Packer<W> {
    /// Archives the contents of directory `top`, depth first with an explicit
    /// stack, in name order.
    fn tree(&mut self, top: &Path) -> Result<(), PackError> {
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let dir = top.join(&rel);
            let mut names = read_names(&dir)?;
            names.sort();
            // Pushed in reverse so that they are popped in name order.
            let mut subdirs = Vec::new();
            for n in names {
                let rel_child = rel.join(&n);
                if self.excluded(&rel_child) {
                    self.report.excluded += 1;
                    continue;
                }
                let path = top.join(&rel_child);
                let meta = fs::symlink_metadata(&path).map_err(|source| PackError::Io {
                    path: path.clone(),
                    source,
                })?;
                self.one(&path, &self.prefix.join(&rel_child), &meta)?;
                if meta.is_dir() {
                    subdirs.push(rel_child);
                }
            }
            stack.extend(subdirs.into_iter().rev());
        }
        Ok(())
    }

    fn excluded(&self, rel: &Path) -> bool {
        self.excludes.is_match(rel)
    }

    /// Appends one entry for `path`, named `name`.
    fn one(&mut self, path: &Path, name: &Path, meta: &Metadata) -> Result<(), PackError> {
        let err = |source| PackError::Io {
            path: path.to_path_buf(),
            source,
        };
        let ft = meta.file_type();
        let mut header = Header::new_gnu();
        header.set_metadata_in_mode(meta, HeaderMode::Complete);
        if ft.is_file() {
            let file = File::open(path).map_err(err)?;
            let size = meta.len();
            header.set_size(size);
            let reader = ExactReader {
                inner: file.take(size),
                left: size,
            };
            self.builder.append_data(&mut header, name, reader).map_err(err)?;
            self.report.bytes += size;
        } else if ft.is_dir() {
            header.set_size(0);
            self.builder.append_data(&mut header, name, io::empty()).map_err(err)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(path).map_err(err)?;
            header.set_size(0);
            self.builder.append_link(&mut header, name, &target).map_err(err)?;
        } else {
            let kind = special_kind(&ft);
            tracing::warn!(path = %path.display(), kind, "skipping special file while packing");
            self.report.skipped_special += 1;
            return Ok(());
        }
        self.report.entries += 1;
        Ok(())
    }
}

fn special_kind(ft: &fs::FileType) -> &'static str {
    if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else {
        "unknown"
    }
}

fn read_names(dir: &Path) -> Result<Vec<std::ffi::OsString>, PackError> {
    let err = |source| PackError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut names = Vec::new();
    for e in fs::read_dir(dir).map_err(err)? {
        names.push(e.map_err(err)?.file_name());
    }
    Ok(names)
}

/// Yields exactly `left` bytes of a file, failing if it shrank meanwhile
/// (a tar entry must hold as many bytes as its header declares).
struct ExactReader {
    inner: io::Take<File>,
    left: u64,
}

impl Read for ExactReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while being archived",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// The exclude patterns as one set (see [`pack`]): a pattern without `/` matches at any
/// depth (`**/` is put in front), and `dir/**` matches `dir` itself too.
fn exclude_set(patterns: &[String]) -> Result<GlobSet, PackError> {
    let mut set = GlobSetBuilder::new();
    for p in patterns {
        let mut forms = Vec::new();
        if p.contains('/') {
            let anchored = p.trim_start_matches('/');
            forms.push(anchored.to_owned());
            if let Some(dir) = anchored.strip_suffix("/**") {
                forms.push(dir.to_owned());
            }
        } else {
            forms.push(format!("**/{p}"));
        }
        for form in forms {
            let glob = GlobBuilder::new(&form)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| PackError::BadPattern {
                    pattern: p.clone(),
                    reason: e.kind().to_string(),
                })?;
            set.add(glob);
        }
    }
    set.build().map_err(|e| PackError::BadPattern {
        pattern: patterns.join(" "),
        reason: e.kind().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::ffi::OsString;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::time::{Duration, SystemTime};

    /// A temp dir holding `dest/` (where archives go) and `outside/keep`
    /// (a sentinel that must never change).
    struct Scene {
        tmp: tempfile::TempDir,
    }

    impl Scene {
        fn new() -> Scene {
            let tmp = tempfile::tempdir().unwrap();
            fs::create_dir(tmp.path().join("dest")).unwrap();
            fs::create_dir(tmp.path().join("outside")).unwrap();
            fs::write(tmp.path().join("outside/keep"), b"sentinel").unwrap();
            Scene { tmp }
        }

        fn dest(&self) -> PathBuf {
            self.tmp.path().join("dest")
        }

        fn outside(&self) -> PathBuf {
            self.tmp.path().join("outside")
        }

        fn unpack(&self, archive: &[u8]) -> Result<UnpackReport, UnpackError> {
            self.unpack_limited(archive, UnpackLimits::default())
        }

        fn unpack_limited(&self, archive: &[u8], limits: UnpackLimits) -> Result<UnpackReport, UnpackError> {
            unpack(archive, &self.dest(), limits)
        }

        /// Nothing new next to `dest`, nothing changed in `outside`.
        fn assert_outside_untouched(&self) {
            let mut top: Vec<OsString> = fs::read_dir(self.tmp.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            top.sort();
            assert_eq!(top, vec![OsString::from("dest"), OsString::from("outside")]);
            let inside: Vec<OsString> = fs::read_dir(self.outside())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(inside, vec![OsString::from("keep")]);
            let keep = self.outside().join("keep");
            assert!(fs::symlink_metadata(&keep).unwrap().file_type().is_file());
            assert_eq!(fs::read(keep).unwrap(), b"sentinel");
        }
    }

    /// One raw entry: a GNU header with the given bytes written straight into
    /// the name and link name fields (so `..` and absolute names get through),
    /// followed by `data` padded to a block. `size` is the declared size.
    fn raw_entry(name: &[u8], kind: EntryType, link: &[u8], data: &[u8], size: u64) -> Vec<u8> {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_mtime(1_000_000);
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
        out
    }

    fn file(name: &[u8], data: &[u8]) -> Vec<u8> {
        raw_entry(name, EntryType::Regular, b"", data, data.len() as u64)
    }

    fn symlink(name: &[u8], target: &[u8]) -> Vec<u8> {
        raw_entry(name, EntryType::Symlink, target, b"", 0)
    }

    fn hardlink(name: &[u8], target: &[u8]) -> Vec<u8> {
        raw_entry(name, EntryType::Link, target, b"", 0)
    }

    fn archive(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut out = entries.concat();
        out.extend_from_slice(&[0u8; 1024]);
        out
    }

    /// A GNU long name (or long link target) entry holding `name` and its NUL.
    fn long(kind: EntryType, name: &[u8]) -> Vec<u8> {
        let mut data = name.to_vec();
        data.push(0);
        raw_entry(b"././@LongLink", kind, b"", &data, data.len() as u64)
    }

    /// A PAX record set (`x` header) holding `records`.
    fn pax(records: &[(&str, &[u8])]) -> Vec<u8> {
        let mut data = Vec::new();
        for (key, value) in records {
            // "LEN KEY=VALUE\n", where LEN counts the whole record, itself included.
            let body = [format!(" {key}=").as_bytes(), value, b"\n"].concat();
            let mut len = body.len() + 1;
            while len.to_string().len() + body.len() != len {
                len += 1;
            }
            data.extend_from_slice(len.to_string().as_bytes());
            data.extend_from_slice(&body);
        }
        raw_entry(b"PaxHeaders/x", EntryType::XHeader, b"", &data, data.len() as u64)
    }

    /// Counts the bytes read through it.
    struct Counted<R> {
        inner: R,
        read: Rc<Cell<u64>>,
    }

    impl<R: Read> Read for Counted<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.read.set(self.read.get() + n as u64);
            Ok(n)
        }
    }

    #[test]
    fn long_names_and_pax_records_name_entries_and_link_targets() {
        let s = Scene::new();
        let deep = |tag: &str| format!("{}/{}", "d".repeat(150), tag.repeat(150)).into_bytes();
        let a = archive(&[
            long(EntryType::GNULongName, &deep("a")),
            file(b"short-a", b"one"),
            pax(&[("path", &deep("b")), ("mtime", b"1000000.5")]),
            file(b"short-b", b"two"),
            long(EntryType::GNULongLink, &deep("a")),
            raw_entry(b"to-a", EntryType::Symlink, b"wrong", b"", 0),
            pax(&[("linkpath", &deep("b"))]),
            raw_entry(b"to-b", EntryType::Symlink, b"wrong", b"", 0),
        ]);
        let report = s.unpack(&a).unwrap();
        assert_eq!(report.entries, 4);
        let at = |name: &[u8]| s.dest().join(OsStr::from_bytes(name));
        assert_eq!(fs::read(at(&deep("a"))).unwrap(), b"one");
        assert_eq!(fs::read(at(&deep("b"))).unwrap(), b"two");
        assert_eq!(fs::read_link(at(b"to-a")).unwrap().as_os_str().as_bytes(), deep("a"));
        assert_eq!(fs::read_link(at(b"to-b")).unwrap().as_os_str().as_bytes(), deep("b"));
        assert!(!at(b"short-a").exists() && !at(b"short-b").exists());
    }

    #[test]
    fn extension_headers_over_their_limits_are_refused_before_their_data_is_read() {
        let huge = 256u64 << 20;
        for (kind, what, limit) in [
            (EntryType::GNULongName, "GNU long name", MAX_NAME_LEN + 1),
            (EntryType::GNULongLink, "GNU long link target", MAX_NAME_LEN + 1),
            (EntryType::XHeader, "PAX header", MAX_PAX_LEN),
            (EntryType::XGlobalHeader, "global PAX header", MAX_PAX_LEN),
        ] {
            for declared in [limit + 1, huge] {
                let s = Scene::new();
                let read = Rc::new(Cell::new(0));
                let header = raw_entry(b"././@LongLink", kind, b"", b"", declared);
                let stream = Counted {
                    inner: io::Cursor::new(header).chain(io::repeat(b'n').take(declared)),
                    read: Rc::clone(&read),
                };
                let err = unpack(stream, &s.dest(), UnpackLimits::default()).unwrap_err();
                match &err {
                    UnpackError::HeaderTooLarge {
                        what: w,
                        size,
                        limit: l,
                        start,
                    } => {
                        assert_eq!((*w, *size, *l), (what, declared, limit));
                        assert_eq!(start.as_str(), "n".repeat(SHOWN_NAME_LEN));
                    }
                    other => panic!("{what}: {other:?}"),
                }
                // The header block and the few bytes shown: never the data.
                assert!(read.get() <= 512 + 64 * 1024, "{what}: read {} bytes", read.get());
            }
        }
    }

    #[test]
    fn names_and_link_targets_longer_than_path_max_are_refused() {
        let long_name = vec![b'x'; MAX_NAME_LEN as usize + 1];
        for (a, what) in [
            (archive(&[pax(&[("path", &long_name)]), file(b"f", b"x")]), "entry name"),
            (
                archive(&[
                    pax(&[("linkpath", &long_name)]),
                    raw_entry(b"l", EntryType::Symlink, b"", b"", 0),
                ]),
                "link target",
            ),
            (
                archive(&[
                    long(EntryType::GNULongName, &[&long_name[..], b"x"].concat()),
                    file(b"f", b"x"),
                ]),
                "GNU long name",
            ),
        ] {
            let s = Scene::new();
            match s.unpack(&a).unwrap_err() {
                UnpackError::HeaderTooLarge { what: w, .. } => assert_eq!(w, what),
                other => panic!("{what}: {other:?}"),
            }
        }
        // Exactly PATH_MAX bytes is a name the archive may give (the kernel then says
        // whether it can create it).
        let s = Scene::new();
        let at_limit = [&b"d/"[..], &vec![b'x'; MAX_NAME_LEN as usize - 2]].concat();
        let err = s
            .unpack(&archive(&[long(EntryType::GNULongName, &at_limit), file(b"f", b"x")]))
            .unwrap_err();
        assert!(matches!(err, UnpackError::Io { .. }), "{err:?}");
    }

    #[test]
    fn a_pax_size_that_differs_from_the_header_is_refused() {
        let s = Scene::new();
        let err = s
            .unpack(&archive(&[pax(&[("size", b"5")]), file(b"f", b"abc")]))
            .unwrap_err();
        match err {
            UnpackError::Corrupt { entry, reason } => {
                assert_eq!(entry, "f");
                assert!(reason.contains("PAX size record (5)"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let s = Scene::new();
        s.unpack(&archive(&[pax(&[("size", b"3")]), file(b"f", b"abc")]))
            .unwrap();
        assert_eq!(fs::read(s.dest().join("f")).unwrap(), b"abc");
    }

    #[test]
    fn two_long_names_for_one_entry_and_one_for_no_entry_are_refused() {
        let s = Scene::new();
        let err = s
            .unpack(&archive(&[
                long(EntryType::GNULongName, b"a"),
                long(EntryType::GNULongName, b"b"),
                file(b"f", b"x"),
            ]))
            .unwrap_err();
        assert!(
            matches!(&err, UnpackError::Corrupt { reason, .. } if reason.contains("two GNU long names")),
            "{err:?}"
        );
        let s = Scene::new();
        let err = s
            .unpack(&archive(&[file(b"f", b"x"), long(EntryType::GNULongName, b"a")]))
            .unwrap_err();
        assert!(matches!(err, UnpackError::Truncated { .. }), "{err:?}");
    }

    #[test]
    fn errors_show_a_long_name_cut_with_its_length() {
        let s = Scene::new();
        let name = [&vec![b'a'; 3000][..], b"/../evil"].concat();
        let err = s
            .unpack(&archive(&[long(EntryType::GNULongName, &name), file(b"f", b"x")]))
            .unwrap_err();
        match err {
            UnpackError::ParentComponent { entry } => {
                assert_eq!(entry, format!("{}... (3008 bytes)", "a".repeat(SHOWN_NAME_LEN)));
            }
            other => panic!("{other:?}"),
        }
        s.assert_outside_untouched();
    }

    #[test]
    fn refuses_absolute_path() {
        let s = Scene::new();
        let target = s.outside().join("x");
        let err = s
            .unpack(&archive(&[file(target.as_os_str().as_bytes(), b"pwned")]))
            .unwrap_err();
        assert!(matches!(err, UnpackError::AbsolutePath { .. }), "{err:?}");
        s.assert_outside_untouched();
    }

    #[test]
    fn refuses_parent_components() {
        for name in [&b"../x"[..], b"a/../../x", b"a/../../outside/keep"] {
            let s = Scene::new();
            let err = s.unpack(&archive(&[file(name, b"pwned")])).unwrap_err();
            match &err {
                UnpackError::ParentComponent { entry } => assert_eq!(entry.as_bytes(), name),
                other => panic!("{other:?}"),
            }
            s.assert_outside_untouched();
        }
    }

    #[test]
    fn refuses_absolute_symlink_and_writing_through_it() {
        let s = Scene::new();
        let target = s.outside();
        let a = archive(&[
            symlink(b"evil", target.as_os_str().as_bytes()),
            file(b"evil/keep", b"pwned"),
        ]);
        let err = s.unpack(&a).unwrap_err();
        assert!(
            matches!(err, UnpackError::LinkOutside { ref entry, .. } if entry == "evil"),
            "{err:?}"
        );
        s.assert_outside_untouched();

        let s = Scene::new();
        let err = s
            .unpack(&archive(&[symlink(b"evil", b"/etc"), file(b"evil/passwd", b"pwned")]))
            .unwrap_err();
        assert!(
            matches!(err, UnpackError::LinkOutside { ref target, .. } if target == "/etc"),
            "{err:?}"
        );
        s.assert_outside_untouched();
    }

    #[test]
    fn refuses_symlink_up() {
        for target in [&b".."[..], b"../outside", b"a/../..", b"sub/../x", b"./../dest/x"] {
            let s = Scene::new();
            let err = s
                .unpack(&archive(&[symlink(b"up", target), file(b"up/x", b"pwned")]))
                .unwrap_err();
            assert!(
                matches!(err, UnpackError::LinkOutside { ref entry, .. } if entry == "up"),
                "{target:?}: {err:?}"
            );
            s.assert_outside_untouched();
        }
        // `dot -> .` is fine by itself, but `dot/..` through it would be
        // the parent of dest: refused as "may escape".
        let s = Scene::new();
        let err = s
            .unpack(&archive(&[symlink(b"dot", b"."), symlink(b"esc", b"dot/..")]))
            .unwrap_err();
        assert!(
            matches!(err, UnpackError::LinkOutside { ref entry, .. } if entry == "esc"),
            "{err:?}"
        );
        s.assert_outside_untouched();
    }

    #[test]
    fn refuses_writing_through_planted_symlink() {
        let s = Scene::new();
        let err = s
            .unpack(&archive(&[symlink(b"dot", b"."), file(b"dot/dot/file", b"x")]))
            .unwrap_err();
        assert!(
            matches!(err, UnpackError::ThroughSymlink { ref entry } if entry == "dot/dot/file"),
            "{err:?}"
        );
        assert!(!s.dest().join("file").exists());
        s.assert_outside_untouched();

        // A symlink to a subdirectory, then a directory and a file through it.
        let s = Scene::new();
        fs::create_dir(s.dest().join("sub")).unwrap();
        let a = archive(&[
            symlink(b"s", b"sub"),
            raw_entry(b"s/d/", EntryType::Directory, b"", b"", 0),
        ]);
        let err = s.unpack(&a).unwrap_err();
        assert!(matches!(err, UnpackError::ThroughSymlink { .. }), "{err:?}");
        assert!(!s.dest().join("sub/d").exists());

        // A directory entry whose name is an earlier symlink.
        let s = Scene::new();
        let a = archive(&[symlink(b"s", b"."), raw_entry(b"s/", EntryType::Directory, b"", b"", 0)]);
        let err = s.unpack(&a).unwrap_err();
        assert!(matches!(err, UnpackError::ThroughSymlink { .. }), "{err:?}");
    }

    #[test]
    fn refuses_bad_hard_links() {
        let s = Scene::new();
        let err = s.unpack(&archive(&[hardlink(b"pw", b"/etc/passwd")])).unwrap_err();
        assert!(
            matches!(err, UnpackError::LinkOutside { ref target, .. } if target == "/etc/passwd"),
            "{err:?}"
        );
        s.assert_outside_untouched();

        let s = Scene::new();
        let err = s.unpack(&archive(&[hardlink(b"k", b"../outside/keep")])).unwrap_err();
        assert!(matches!(err, UnpackError::LinkOutside { .. }), "{err:?}");
        s.assert_outside_untouched();

        // A name that exists in dest but was not unpacked from this archive.
        let s = Scene::new();
        fs::write(s.dest().join("present"), b"x").unwrap();
        let err = s.unpack(&archive(&[hardlink(b"h", b"present")])).unwrap_err();
        assert!(matches!(err, UnpackError::LinkOutside { .. }), "{err:?}");
        let err = s.unpack(&archive(&[hardlink(b"h", b"missing")])).unwrap_err();
        assert!(matches!(err, UnpackError::LinkOutside { .. }), "{err:?}");

        // A link to a symlink of the archive is not a link to a regular file.
        let s = Scene::new();
        let err = s
            .unpack(&archive(&[symlink(b"l", b"x"), hardlink(b"h", b"l")]))
            .unwrap_err();
        assert!(matches!(err, UnpackError::LinkOutside { .. }), "{err:?}");
        s.assert_outside_untouched();
    }

    #[test]
    fn hard_link_to_earlier_file() {
        let s = Scene::new();
        let a = archive(&[file(b"d/f", b"data"), hardlink(b"g", b"./d/f")]);
        let report = s.unpack(&a).unwrap();
        assert_eq!(report, UnpackReport { entries: 2, bytes: 4 });
        let f = fs::metadata(s.dest().join("d/f")).unwrap();
        let g = fs::metadata(s.dest().join("g")).unwrap();
        assert_eq!(f.ino(), g.ino());
    }

    #[test]
    fn refuses_special_entries() {
        for (kind, shown) in [
            (EntryType::Char, "character device"),
            (EntryType::Block, "block device"),
            (EntryType::Fifo, "fifo"),
        ] {
            let s = Scene::new();
            let err = s.unpack(&archive(&[raw_entry(b"dev", kind, b"", b"", 0)])).unwrap_err();
            assert!(
                matches!(err, UnpackError::Special { ref entry, ref kind } if entry == "dev" && kind == shown),
                "{err:?}"
            );
            assert!(fs::symlink_metadata(s.dest().join("dev")).is_err());
            s.assert_outside_untouched();
        }
    }

    #[test]
    fn refuses_truncated_archives() {
        let s = Scene::new();
        let full = archive(&[file(b"a", &[7u8; 2000])]);
        let err = s.unpack(&full[..512 + 1000]).unwrap_err();
        assert!(
            matches!(err, UnpackError::Truncated { ref entry } if entry == "a"),
            "{err:?}"
        );
        s.assert_outside_untouched();

        // Cut in the middle of the second header.
        let s = Scene::new();
        let full = archive(&[file(b"a", b"x"), file(b"b", b"y")]);
        let err = s.unpack(&full[..1024 + 100]).unwrap_err();
        assert!(matches!(err, UnpackError::Truncated { .. }), "{err:?}");
    }

    #[test]
    fn refuses_declared_size_larger_than_data() {
        let s = Scene::new();
        let a = archive(&[raw_entry(b"liar", EntryType::Regular, b"", &[1u8; 100], 5000)]);
        let err = s.unpack(&a).unwrap_err();
        assert!(
            matches!(err, UnpackError::Truncated { ref entry } if entry == "liar"),
            "{err:?}"
        );
        s.assert_outside_untouched();
    }

    #[test]
    fn refuses_bad_checksum() {
        let s = Scene::new();
        let mut a = archive(&[file(b"a", b"x")]);
        a[0] = b'b';
        let err = s.unpack(&a).unwrap_err();
        assert!(matches!(err, UnpackError::Corrupt { .. }), "{err:?}");
    }

    #[test]
    fn enforces_limits() {
        let s = Scene::new();
        let limits = UnpackLimits {
            max_bytes: 10,
            max_entries: 100,
        };
        let err = s
            .unpack_limited(&archive(&[file(b"a", b"12345"), file(b"b", b"123456")]), limits)
            .unwrap_err();
        assert!(
            matches!(err, UnpackError::TooLarge { ref entry, limit: 10 } if entry == "b"),
            "{err:?}"
        );
        assert!(!s.dest().join("b").exists());
        s.assert_outside_untouched();

        let s = Scene::new();
        let limits = UnpackLimits {
            max_bytes: 100,
            max_entries: 2,
        };
        let a = archive(&[file(b"a", b"1"), file(b"b", b"2"), file(b"c", b"3")]);
        let err = s.unpack_limited(&a, limits).unwrap_err();
        assert!(
            matches!(err, UnpackError::TooManyEntries { ref entry, limit: 2 } if entry == "c"),
            "{err:?}"
        );
        assert!(!s.dest().join("c").exists());
        s.assert_outside_untouched();
    }

    #[test]
    fn replaces_earlier_file_but_not_directory() {
        let s = Scene::new();
        let report = s.unpack(&archive(&[file(b"a", b"one"), file(b"a", b"two")])).unwrap();
        assert_eq!(report.entries, 2);
        assert_eq!(fs::read(s.dest().join("a")).unwrap(), b"two");
        let err = s
            .unpack(&archive(&[
                raw_entry(b"d/", EntryType::Directory, b"", b"", 0),
                file(b"d", b"x"),
            ]))
            .unwrap_err();
        assert!(
            matches!(err, UnpackError::Io { ref entry, .. } if entry == "d"),
            "{err:?}"
        );
    }

    fn set_mtime(path: &Path, secs: u64) {
        let t = TimeSpec::new(secs as i64, 0);
        utimensat(nix::fcntl::AT_FDCWD, path, &t, &t, UtimensatFlags::NoFollowSymlink).unwrap();
    }

    /// Everything under `root`: relative path -> (kind, mode & 0o7777, mtime, contents or link target).
    fn snapshot(root: &Path) -> BTreeMap<PathBuf, (char, u32, i64, Vec<u8>)> {
        let mut out = BTreeMap::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            for e in fs::read_dir(root.join(&rel)).unwrap() {
                let rel = rel.join(e.unwrap().file_name());
                let path = root.join(&rel);
                let meta = fs::symlink_metadata(&path).unwrap();
                let (kind, content) = if meta.is_dir() {
                    stack.push(rel.clone());
                    ('d', Vec::new())
                } else if meta.file_type().is_symlink() {
                    ('l', fs::read_link(&path).unwrap().into_os_string().into_vec())
                } else {
                    ('f', fs::read(&path).unwrap())
                };
                let mode = if kind == 'l' { 0 } else { meta.mode() & 0o7777 };
                out.insert(rel, (kind, mode, meta.mtime(), content));
            }
        }
        out
    }

    use std::os::unix::ffi::OsStringExt;

    #[test]
    fn round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("a/b")).unwrap();
        fs::create_dir(src.join("empty")).unwrap();
        fs::create_dir(src.join("private")).unwrap();
        fs::write(src.join("a/b/c.txt"), b"hello").unwrap();
        fs::write(src.join("run.sh"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(src.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(src.join("suid"), b"s").unwrap();
        fs::set_permissions(src.join("suid"), fs::Permissions::from_mode(0o4755)).unwrap();
        let odd = OsStr::from_bytes(b"caf\xe9");
        fs::write(src.join("a").join(odd), b"non-utf8").unwrap();
        std::os::unix::fs::symlink("b/c.txt", src.join("a/link")).unwrap();
        fs::write(src.join("private/secret"), b"p").unwrap();
        fs::set_permissions(src.join("private"), fs::Permissions::from_mode(0o700)).unwrap();
        set_mtime(&src.join("a/b/c.txt"), 1_000_000);
        set_mtime(&src.join("a/link"), 2_000_000);
        set_mtime(&src.join("a/b"), 3_000_000);
        set_mtime(&src.join("empty"), 4_000_000);
        assert_eq!(fs::metadata(src.join("suid")).unwrap().mode() & 0o4000, 0o4000);

        let mut tar_bytes = Vec::new();
        let packed = pack(&src, &[], &mut tar_bytes).unwrap();
        assert_eq!(packed.entries, 10);
        assert_eq!(packed.bytes, 5 + 10 + 1 + 8 + 1);

        let dest = tmp.path().join("dest");
        fs::create_dir(&dest).unwrap();
        let report = unpack(&tar_bytes[..], &dest, UnpackLimits::default()).unwrap();
        assert_eq!(
            report,
            UnpackReport {
                entries: 10,
                bytes: packed.bytes
            }
        );

        let mut expected = snapshot(&src);
        let suid = expected.get_mut(Path::new("suid")).unwrap();
        suid.1 &= 0o777;
        assert_eq!(snapshot(&dest), expected);
        assert_eq!(fs::metadata(dest.join("suid")).unwrap().mode() & 0o7777, 0o755);
        assert_eq!(fs::metadata(dest.join("a/b/c.txt")).unwrap().mtime(), 1_000_000);
        assert_eq!(fs::symlink_metadata(dest.join("a/link")).unwrap().mtime(), 2_000_000);
        assert_eq!(fs::metadata(dest.join("a/b")).unwrap().mtime(), 3_000_000);
        assert_eq!(fs::read(dest.join("a").join(odd)).unwrap(), b"non-utf8");
    }

    #[test]
    fn pack_as_names_the_tree_like_cp_into_a_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("reports");
        fs::create_dir_all(src.join("unit/empty")).unwrap();
        fs::write(src.join("unit/a.xml"), b"<a/>").unwrap();
        fs::set_permissions(&src, fs::Permissions::from_mode(0o750)).unwrap();
        set_mtime(&src, 5_000_000);
        let mut tar_bytes = Vec::new();
        let packed = pack_as(&src, Some(Path::new("reports")), &["*.tmp".into()], &mut tar_bytes).unwrap();
        assert_eq!(packed.entries, 4, "the directory itself, unit, unit/empty, unit/a.xml");
        let dest = tmp.path().join("dest");
        fs::create_dir(&dest).unwrap();
        unpack(&tar_bytes[..], &dest, UnpackLimits::default()).unwrap();
        assert_eq!(snapshot(&dest.join("reports")), snapshot(&src));
        let top = fs::metadata(dest.join("reports")).unwrap();
        assert_eq!((top.mode() & 0o777, top.mtime()), (0o750, 5_000_000));

        // A file is one entry under the given name.
        let mut one = Vec::new();
        pack_as(&src.join("unit/a.xml"), Some(Path::new("b.xml")), &[], &mut one).unwrap();
        unpack(&one[..], &dest, UnpackLimits::default()).unwrap();
        assert_eq!(fs::read(dest.join("b.xml")).unwrap(), b"<a/>");
    }

    #[test]
    fn pack_single_file_and_mtime() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("one.txt");
        fs::write(&f, b"1").unwrap();
        let old = SystemTime::UNIX_EPOCH + Duration::from_secs(86_400);
        File::options().write(true).open(&f).unwrap().set_modified(old).unwrap();
        let mut out = Vec::new();
        assert_eq!(pack(&f, &[], &mut out).unwrap().entries, 1);
        let dest = tmp.path().join("dest");
        fs::create_dir(&dest).unwrap();
        unpack(&out[..], &dest, UnpackLimits::default()).unwrap();
        assert_eq!(fs::metadata(dest.join("one.txt")).unwrap().modified().unwrap(), old);
    }

    #[test]
    fn pack_excludes() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path();
        fs::create_dir_all(src.join("target/debug")).unwrap();
        fs::create_dir_all(src.join("sub/target")).unwrap();
        fs::write(src.join("target/debug/x"), b"x").unwrap();
        fs::write(src.join("a.o"), b"o").unwrap();
        fs::write(src.join("sub/b.o"), b"o").unwrap();
        fs::write(src.join("sub/keep.c"), b"c").unwrap();
        fs::write(src.join("sub/target/t"), b"t").unwrap();
        fs::write(src.join("keep.c"), b"c").unwrap();
        let excludes = vec!["target/**".to_owned(), "*.o".to_owned()];
        let mut out = Vec::new();
        let report = pack(src, &excludes, &mut out).unwrap();
        assert_eq!(report.excluded, 3);
        let mut names: Vec<String> = tar::Archive::new(&out[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["keep.c", "sub", "sub/keep.c", "sub/target", "sub/target/t"]);
    }

    #[test]
    fn glob_matching() {
        let m = |p: &str, s: &str| exclude_set(&[p.to_owned()]).unwrap().is_match(s);
        assert!(m("*.o", "a.o") && m("*.o", "x/y/a.o") && !m("*.o", "a.oo"));
        assert!(m("target/**", "target") && m("target/**", "target/a/b") && !m("target/**", "x/target/a"));
        assert!(m("**/target", "x/y/target") && m("**/target", "target"));
        assert!(m("a/*/c", "a/b/c") && !m("a/*/c", "a/b/d/c") && m("a/**/c", "a/b/d/c"));
        assert!(m("fil?", "file") && !m("fil?", "fil"));
        assert!(m("*.{o,a}", "x/lib.a") && m("[ab].c", "b.c"));
        assert!(matches!(
            exclude_set(&["a[".to_owned()]),
            Err(PackError::BadPattern { .. })
        ));
    }

    #[test]
    fn pack_skips_special_files() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("f"), b"1").unwrap();
        nix::unistd::mkfifo(&tmp.path().join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        let mut out = Vec::new();
        let report = pack(tmp.path(), &[], &mut out).unwrap();
        assert_eq!((report.entries, report.skipped_special), (1, 1));
    }
}
