//! Build output spools: every build's output on disk, replayable from any position.
//!
//! Why: a client may disconnect while its build runs and reattach later, and it then
//! wants the output from exactly where it left off; and a finished build's log must
//! stay readable for a retention period. Holding all that in memory is unbounded, so
//! every chunk of output is appended to the build's *spool* on disk as it arrives, and
//! readers replay it from a byte position.
//!
//! **Position space.** Positions are build-wide: position `P` is the `P`-th byte of the
//! build's output, counting stdout and stderr together in the order their chunks
//! arrived. [`SpoolWriter::append`] assigns them; [`SpoolReader::read`] takes them.
//!
//! **Layout.**
//! ```text
//! <records_root>/                 the SpoolSet's root, 0700
//!   status.log                    0600: one line per finished build,
//!                                 {"build":"<id>","status":<the caller's JSON>}
//!   <id>/                         one per build that wrote output, 0700
//!     seg-00000000000000000000    segment files, 0600, named by the position of their
//!     seg-00000000000000065612    first byte (20 decimal digits)
//! ```
//! A segment file is a sequence of records, `kind: u8` (0 = stdout, 1 = stderr),
//! `len: u32` little-endian, then `len` bytes of output (the writer splits chunks into
//! records of at most 1 MiB). The first record of `seg-N` holds position `N`, and the
//! records of a segment hold consecutive positions. A new segment is started once the
//! current one has reached the segment size (a quarter of the build quota, within
//! 64 KiB..64 MiB) and after a failed write. Segments are not fsynced (the page cache is
//! enough: a spool does not outlive its daemon's state dir). A build's status is one
//! line appended to `status.log` with a single `write(2)` on an `O_APPEND` file, so
//! it lands whole or not at all and never interleaves with another build's line.
//! Nothing is fsynced: the records matter while their daemon lives, and a crash of the
//! machine ends the daemon and its builds too. (A status file per build, made with a
//! directory, a temporary file and a rename, was measured: those metadata operations
//! tripled the latency of short builds on ext4. An fsync per build cost a millisecond.)
//!
//! **Quotas and gaps.** Disk use is bounded by a per-build quota and a total quota over
//! all spools of a [`SpoolSet`]. What a quota forces out is dropped a whole segment at a
//! time, oldest first, and becomes a *gap*: readers get [`SpoolItem::Gap`] with
//! [`GapReason::Quota`] for everything below [`Spool::start`] (the start of the oldest
//! segment kept, so failed ranges right before it are part of that gap). Past the total
//! quota the output of finished builds goes first (the earliest finished first), then
//! the oldest segments of the writing build itself; other running builds are never
//! touched. A failed write (ENOSPC, EIO, ...) never stops the build either: its
//! positions become a [`GapReason::WriteFailed`] gap, the segment it went to is closed
//! (truncated back to its last committed batch), and the next batch starts a new
//! segment. Nothing is ever lost silently: every position below [`Spool::end`] is data
//! or inside a gap.
//!
//! **Finding positions.** Each segment keeps in memory a sparse index of
//! `(position, file offset)` pairs at record starts, one at the first record start
//! after every 256 KiB of output, so a read seeks close to its position and scans only
//! a few record headers. Readers use `pread` and read only committed bytes, which are
//! never rewritten; the single writer appends each batch with one write and then
//! commits it under the spool's lock.
//!
//! **Locks.** A [`SpoolSet`] has one lock (its list of spools), each spool one (its
//! state). The set's lock may be taken before a spool's, never the other way round.

use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::build::Stream;

/// Bytes of a record header: kind, then length.
const HEADER_LEN: u64 = 5;
/// Largest record the writer makes; longer chunks are split. Far below the format's
/// `u32::MAX`, so that a reader never needs to skip a huge record to find a position.
const MAX_RECORD_DATA: usize = 1 << 20;
const _: () = assert!(MAX_RECORD_DATA <= u32::MAX as usize);
/// Most output between two index entries of a segment (plus one record).
const INDEX_EVERY: u64 = 256 * 1024;
/// Bounds of the segment size.
const MIN_SEGMENT_BYTES: u64 = 64 * 1024;
const MAX_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// How much a reader reads from a segment at once when scanning headers.
const READ_BLOCK: usize = 64 * 1024;
/// Batch buffer capacity the writer keeps between appends.
const KEEP_BUFFER: usize = 4 * 1024 * 1024;
/// Names in a spool's directory.
const SEGMENT_PREFIX: &str = "seg-";
/// The set's status log, in its root: one line per finished build.
const STATUS_LOG: &str = "status.log";

/// Disk limits for spools.
#[derive(Debug, Clone, Copy)]
pub struct SpoolLimits {
    /// Most bytes (segment files, headers included) one build's spool keeps; older segments are dropped past it.
    pub build_quota: u64,
    /// Most bytes all spools of a SpoolSet keep together.
    pub total_quota: u64,
}

impl SpoolLimits {
    /// The size at which a writer starts a new segment: small enough that the build
    /// quota holds several, so dropping one frees only part of the log.
    fn segment_bytes(&self) -> u64 {
        (self.build_quota / 4).clamp(MIN_SEGMENT_BYTES, MAX_SEGMENT_BYTES)
    }
}

/// Why a range of output is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapReason {
    /// Dropped to keep within a disk quota, or the spool was removed.
    Quota,
    /// Never written: writing it to disk failed.
    WriteFailed,
}

/// What a reader gets, in position order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpoolItem {
    /// Output of one stream; `position` is that of `data[0]`.
    Data {
        stream: Stream,
        position: u64,
        data: Vec<u8>,
    },
    /// Positions `from..to` are gone.
    Gap { from: u64, to: u64, reason: GapReason },
}

fn stream_kind(stream: Stream) -> u8 {
    match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

fn kind_stream(kind: u8) -> Option<Stream> {
    match kind {
        0 => Some(Stream::Stdout),
        1 => Some(Stream::Stderr),
        _ => None,
    }
}

/// `dir/seg-<start>`, the start as 20 decimal digits so that names sort by position.
fn segment_path(dir: &Path, start: u64) -> PathBuf {
    dir.join(format!("{SEGMENT_PREFIX}{start:020}"))
}

/// Adds what was being done and to which path to an error, keeping its kind.
fn with_path<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> io::Error + 'a {
    move |e| io::Error::new(e.kind(), format!("cannot {op} {}: {e}", path.display()))
}

fn corrupt(path: &Path, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("corrupt spool segment {}: {what}", path.display()),
    )
}

/// Refuses ids that are not a single plain path component.
fn check_id(id: &str) -> io::Result<()> {
    if id.is_empty() || id == "." || id == ".." || id.contains('/') || id.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid spool id {id:?}"),
        ));
    }
    Ok(())
}

/// Removes segment files (already dropped from the state); a failure is only logged.
fn delete_segments(dir: &Path, starts: &[u64]) {
    for &start in starts {
        let path = segment_path(dir, start);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot delete a spool segment"),
        }
    }
}

/// Makes the spool's directory (0700) if it is not made yet; the caller holds the
/// spool's lock (`state`).
fn ensure_dir(dir: &Path, state: &mut State) -> io::Result<()> {
    if state.dir_made {
        return Ok(());
    }
    match DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        // Only ever ours (the records root is private to the daemon): reuse it.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        Err(e) => return Err(with_path("create", dir)(e)),
    }
    // Whatever the umask made of it.
    fs::set_permissions(dir, Permissions::from_mode(0o700)).map_err(with_path("chmod", dir))?;
    state.dir_made = true;
    Ok(())
}

/// One line of the status log: `{"build":"<id>","status":<status>}`.
fn status_line(id: &str, status: &str) -> String {
    let mut escaped = String::with_capacity(id.len());
    for c in id.chars() {
        match c {
            '"' => escaped.push_str("\\\""),
            '\\' => escaped.push_str("\\\\"),
            c if (c as u32) < 0x20 => escaped.push_str(&format!("\\u{:04x}", c as u32)),
            c => escaped.push(c),
        }
    }
    format!("{{\"build\":\"{escaped}\",\"status\":{}}}\n", status.trim_end())
}

/// One segment file, as far as committed.
#[derive(Debug)]
struct Segment {
    /// Position of its first byte (its name).
    start: u64,
    /// Position after its last committed byte.
    end: u64,
    /// Committed file size.
    size: u64,
    /// `(position, file offset)` of some record starts, ascending; the first is
    /// `(start, 0)`.
    index: Vec<(u64, u64)>,
}

impl Segment {
    /// The index entry at or before `pos`.
    fn entry(&self, pos: u64) -> (u64, u64) {
        let i = self.index.partition_point(|&(p, _)| p <= pos);
        i.checked_sub(1)
            .and_then(|i| self.index.get(i).copied())
            .unwrap_or((self.start, 0))
    }
}

/// A spool's state, behind its lock.
///
/// Invariant: every position in `start..end` is in exactly one segment or one
/// `failed` range; segments and ranges are ascending and do not overlap.
#[derive(Debug, Default)]
struct State {
    segments: VecDeque<Segment>,
    /// Positions that could not be written, adjacent ranges merged.
    failed: Vec<(u64, u64)>,
    /// Everything below was dropped (quota or removal).
    start: u64,
    end: u64,
    /// Sum of the segments' committed sizes.
    disk_bytes: u64,
    /// Order in which the spool finished among the set's spools.
    finished: Option<u64>,
    status: Option<String>,
    removed: bool,
    /// Whether the spool's directory was made: lazily, by the writer, when it first
    /// has output to store, so that starting a build costs no directory operation here.
    dir_made: bool,
}

/// Where a position is, from a reader's point of view.
enum Span {
    /// Dropped up to the given position.
    Dropped(u64),
    /// A failed write up to the given position.
    Failed(u64),
    /// In a segment.
    Segment(SegmentView),
}

/// What a reader needs of a segment, copied out of the state.
struct SegmentView {
    start: u64,
    end: u64,
    size: u64,
    /// Index entry at or before the position looked up.
    entry: (u64, u64),
}

impl State {
    fn span_at(&self, pos: u64) -> Span {
        if pos < self.start {
            return Span::Dropped(self.start);
        }
        let i = self.segments.partition_point(|s| s.end <= pos);
        let next = match self.segments.get(i) {
            Some(seg) if seg.start <= pos => {
                return Span::Segment(SegmentView {
                    start: seg.start,
                    end: seg.end,
                    size: seg.size,
                    entry: seg.entry(pos),
                })
            }
            Some(seg) => seg.start,
            None => self.end,
        };
        let k = self.failed.partition_point(|&(_, to)| to <= pos);
        match self.failed.get(k) {
            Some(&(from, to)) if from <= pos => Span::Failed(to),
            // Not reached while the invariant holds; the gap up to the next segment is
            // the honest answer anyway.
            _ => Span::Failed(next),
        }
    }

    fn has_segment(&self, start: u64) -> bool {
        self.segments.iter().any(|s| s.start == start)
    }

    /// Adds `from..to` to the failed ranges, merging it with an adjacent last one.
    fn add_failed(&mut self, from: u64, to: u64) {
        match self.failed.last_mut() {
            Some(last) if last.1 == from => last.1 = to,
            _ => self.failed.push((from, to)),
        }
    }

    /// Drops the oldest segment; returns its start (for deleting its file).
    fn drop_front(&mut self, used: &AtomicU64) -> Option<u64> {
        let seg = self.segments.pop_front()?;
        self.disk_bytes -= seg.size;
        used.fetch_sub(seg.size, Ordering::Relaxed);
        self.start = self.segments.front().map_or(self.end, |s| s.start);
        let start = self.start;
        self.failed.retain(|&(_, to)| to > start);
        Some(seg.start)
    }

    /// Drops every segment; returns their starts.
    fn drop_all(&mut self, used: &AtomicU64) -> Vec<u64> {
        let mut starts = Vec::with_capacity(self.segments.len());
        while let Some(start) = self.drop_front(used) {
            starts.push(start);
        }
        self.start = self.end;
        self.failed.clear();
        starts
    }

    /// Accounts positions up to `end` that are not kept (the spool was removed).
    fn skip_to(&mut self, end: u64) {
        self.end = end;
        self.start = end;
    }
}

/// One spool's shared part: what readers, the writer and the set all see.
struct Shared {
    id: String,
    dir: PathBuf,
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// All spools of one daemon: their directory and the total quota. One per executor.
pub struct SpoolSet {
    root: PathBuf,
    limits: SpoolLimits,
    /// Sum of the spools' `disk_bytes`, changed under the spool's lock.
    used: AtomicU64,
    /// Hands out finish orders.
    finish_order: AtomicU64,
    /// Spools not removed, in creation order.
    spools: Mutex<Vec<Arc<Shared>>>,
    /// `status.log`, opened at the first status.
    status_log: Mutex<Option<File>>,
}

impl fmt::Debug for SpoolSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpoolSet")
            .field("root", &self.root)
            .field("limits", &self.limits)
            .field("used", &self.used())
            .finish_non_exhaustive()
    }
}

impl SpoolSet {
    /// Creates `root` (0700) if missing.
    pub fn new(root: PathBuf, limits: SpoolLimits) -> io::Result<Arc<SpoolSet>> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(with_path("create", &root))?;
        Ok(Arc::new(SpoolSet {
            root,
            limits,
            used: AtomicU64::new(0),
            finish_order: AtomicU64::new(0),
            spools: Mutex::new(Vec::new()),
            status_log: Mutex::new(None),
        }))
    }

    /// Appends one line to `status.log` with one write (see the module doc).
    fn append_status(&self, line: &str) -> io::Result<()> {
        let mut log = self.status_log.lock().unwrap_or_else(|e| e.into_inner());
        if log.is_none() {
            let path = self.root.join(STATUS_LOG);
            let file = OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(&path)
                .map_err(with_path("open", &path))?;
            *log = Some(file);
        }
        let Some(file) = log.as_mut() else {
            return Ok(());
        };
        let written = file.write(line.as_bytes())?;
        if written != line.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("status.log: {written} of {} bytes written", line.len()),
            ));
        }
        Ok(())
    }

    /// A new spool in `root/<id>`; fails with AlreadyExists if that directory exists,
    /// and with InvalidInput if `id` is empty, `.`, `..`, or holds `/` or NUL.
    pub fn create(self: &Arc<Self>, id: &str) -> io::Result<(Spool, SpoolWriter)> {
        check_id(id)?;
        let dir = self.root.join(id);
        let taken = self.lock_spools().iter().any(|s| s.id == id) || fs::symlink_metadata(&dir).is_ok();
        if taken {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists", dir.display()),
            ));
        }
        let shared = Arc::new(Shared {
            id: id.to_owned(),
            dir,
            state: Mutex::new(State::default()),
        });
        self.lock_spools().push(Arc::clone(&shared));
        let spool = Spool {
            set: Arc::clone(self),
            shared: Arc::clone(&shared),
        };
        let writer = SpoolWriter {
            set: Arc::clone(self),
            shared,
            segment_bytes: self.limits.segment_bytes(),
            current: None,
            end: 0,
            buf: Vec::new(),
            records: Vec::new(),
            failing: false,
            failed: Vec::new(),
            done: false,
            #[cfg(test)]
            fail_next: None,
        };
        Ok((spool, writer))
    }

    /// Bytes on disk of all spools (segment files).
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn limits(&self) -> SpoolLimits {
        self.limits
    }

    fn lock_spools(&self) -> MutexGuard<'_, Vec<Arc<Shared>>> {
        self.spools.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops the output of finished spools, the earliest finished first, until the
    /// set is within the total quota or no finished spool has output left. Called
    /// with the set's lock held (`spools`).
    fn evict_finished(&self, spools: &[Arc<Shared>]) {
        let quota = self.limits.total_quota;
        let mut finished: Vec<(u64, &Arc<Shared>)> = spools
            .iter()
            .filter_map(|s| {
                let state = s.lock();
                state.finished.filter(|_| state.disk_bytes > 0).map(|order| (order, s))
            })
            .collect();
        finished.sort_by_key(|&(order, _)| order);
        for (_, shared) in finished {
            if self.used() <= quota {
                break;
            }
            let starts = shared.lock().drop_all(&self.used);
            tracing::info!(spool = %shared.id, "dropped the output of a finished build to keep within the spool quota");
            delete_segments(&shared.dir, &starts);
        }
    }
}

/// Read side of one build's spool; cheap to clone, shared between threads (Send + Sync).
#[derive(Clone)]
pub struct Spool {
    set: Arc<SpoolSet>,
    shared: Arc<Shared>,
}

impl fmt::Debug for Spool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spool")
            .field("id", &self.shared.id)
            .finish_non_exhaustive()
    }
}

impl Spool {
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// Position after the last committed byte: every position below it is readable or inside a gap.
    pub fn end(&self) -> u64 {
        self.shared.lock().end
    }

    /// The first position not dropped by a quota (everything below is a Quota gap);
    /// equals end() when everything was dropped.
    pub fn start(&self) -> u64 {
        self.shared.lock().start
    }

    /// Whether the writer finished (status written or writer dropped).
    pub fn finished(&self) -> bool {
        self.shared.lock().finished.is_some()
    }

    /// Bytes on disk (segment files).
    pub fn disk_bytes(&self) -> u64 {
        self.shared.lock().disk_bytes
    }

    /// A reader (holds its own file handle; independent of other readers).
    pub fn reader(&self) -> SpoolReader {
        SpoolReader {
            shared: Arc::clone(&self.shared),
            open: None,
        }
    }

    /// The status text written by `SpoolWriter::finish`, if any (kept in memory too).
    pub fn status(&self) -> Option<String> {
        self.shared.lock().status.clone()
    }

    /// Deletes the spool's directory and everything in it, and stops counting it in
    /// the set. Idempotent. Afterwards start() == end() and reads give one Quota gap;
    /// a writer still appending only advances end().
    pub fn remove(&self) {
        {
            let mut spools = self.set.lock_spools();
            spools.retain(|s| !Arc::ptr_eq(s, &self.shared));
            let mut state = self.shared.lock();
            if state.removed {
                return;
            }
            state.removed = true;
            // The files go with the directory below.
            state.drop_all(&self.set.used);
        }
        match fs::remove_dir_all(&self.shared.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(spool = %self.shared.id, error = %e, "cannot remove a spool's directory")
            }
        }
    }
}

/// The segment the writer appends to.
#[derive(Debug)]
struct OpenSegment {
    file: File,
    start: u64,
    /// Committed size: where the next batch goes.
    size: u64,
}

/// Why a batch was not written.
enum WriteError {
    /// The spool was removed: nothing is kept any more.
    Removed,
    Io(io::Error),
}

/// The single writer of a spool. Not Clone. Used from one (blocking) thread.
/// Dropping it without [`SpoolWriter::finish`] marks the spool finished too (no status).
pub struct SpoolWriter {
    set: Arc<SpoolSet>,
    shared: Arc<Shared>,
    segment_bytes: u64,
    current: Option<OpenSegment>,
    /// Position after the last appended byte (committed or failed).
    end: u64,
    /// The batch being written: its records, headers included.
    buf: Vec<u8>,
    /// `(position, offset in buf)` of each record of the batch.
    records: Vec<(u64, u64)>,
    /// In a write-failure episode (warned already).
    failing: bool,
    /// Ranges that failed since the last [`SpoolWriter::take_failed`].
    failed: Vec<(u64, u64)>,
    /// Finished: nothing left for Drop to do.
    done: bool,
    /// Test hook: the next batch writes this many bytes, then fails with ENOSPC.
    #[cfg(test)]
    fail_next: Option<usize>,
}

impl fmt::Debug for SpoolWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpoolWriter")
            .field("id", &self.shared.id)
            .field("end", &self.end)
            .finish_non_exhaustive()
    }
}

impl SpoolWriter {
    /// Appends chunks in order and commits them: when this returns, readers can read
    /// them. Returns the position of the first byte of the first chunk (the chunks get
    /// consecutive positions). Empty chunks are skipped.
    ///
    /// Never fails: a write error is logged (once per episode of failures) and the
    /// batch's positions become a WriteFailed gap; the segment is abandoned and the
    /// next batch starts a new one. Then enforces the build quota and the total quota.
    pub fn append(&mut self, chunks: &[(Stream, &[u8])]) -> u64 {
        let first = self.end;
        // In batches of at most a segment's size, so that a large batch does not make
        // one segment (which quotas never drop while it is current) larger than that.
        let mut rest = chunks;
        // A failure injected for "the next write" fails every batch of this append.
        #[cfg(test)]
        let fail = self.fail_next;
        while !rest.is_empty() {
            #[cfg(test)]
            if self.fail_next.is_none() && rest.len() < chunks.len() {
                self.fail_next = fail;
            }
            let mut take = 0;
            let mut bytes = 0u64;
            for &(_, data) in rest {
                if take > 0 && bytes + data.len() as u64 > self.segment_bytes {
                    break;
                }
                bytes += data.len() as u64;
                take += 1;
            }
            self.append_batch(&rest[..take]);
            rest = &rest[take..];
        }
        first
    }

    /// The position ranges `[from, to)` that [`SpoolWriter::append`] could not write
    /// since the last call (adjacent ones merged): readers get a WriteFailed gap there.
    /// A failed batch is never split: each range covers whole chunks.
    pub fn take_failed(&mut self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.failed)
    }

    fn append_batch(&mut self, chunks: &[(Stream, &[u8])]) -> u64 {
        let first = self.end;
        let len = self.encode(chunks);
        if len == 0 {
            return first;
        }
        match self.write_batch(first) {
            Ok((start, offset)) => self.commit(first, len, start, offset),
            Err(WriteError::Removed) => self.shared.lock().skip_to(first + len),
            Err(WriteError::Io(e)) => self.fail(first, len, &e),
        }
        self.end = first + len;
        if self.buf.capacity() > KEEP_BUFFER {
            self.buf = Vec::new();
        }
        self.enforce_build_quota();
        self.enforce_total_quota();
        first
    }

    /// Appends `status` (one line of JSON) to the set's `status.log` and marks the spool
    /// finished. Errors are returned, but the spool is marked finished anyway (with the
    /// status kept in memory). Nothing is written if the spool was removed.
    pub fn finish(mut self, status: &str) -> io::Result<()> {
        self.done = true;
        self.current = None;
        // Under the lock, so that `Spool::remove` cannot run in between and leave a
        // status file in a directory it is removing.
        let mut state = self.shared.lock();
        let result = if state.removed {
            Ok(())
        } else {
            self.set.append_status(&status_line(&self.shared.id, status))
        };
        state.status = Some(status.to_owned());
        state.finished = Some(self.set.finish_order.fetch_add(1, Ordering::Relaxed));
        result
    }

    /// Encodes the non-empty chunks as records into `buf`; returns their data length.
    fn encode(&mut self, chunks: &[(Stream, &[u8])]) -> u64 {
        self.buf.clear();
        self.records.clear();
        let mut pos = self.end;
        for &(stream, data) in chunks {
            for piece in data.chunks(MAX_RECORD_DATA) {
                self.records.push((pos, self.buf.len() as u64));
                self.buf.push(stream_kind(stream));
                // At most MAX_RECORD_DATA, which fits (asserted above).
                self.buf.extend_from_slice(&(piece.len() as u32).to_le_bytes());
                self.buf.extend_from_slice(piece);
                pos += piece.len() as u64;
            }
        }
        pos - self.end
    }

    /// Writes `buf` to the current segment (a new one if there is none or it is full).
    /// Returns the segment's start and the offset the batch went to.
    fn write_batch(&mut self, first: u64) -> Result<(u64, u64), WriteError> {
        let segment = match self.current.take() {
            Some(segment) if segment.size < self.segment_bytes => segment,
            _ => self.open_segment(first)?,
        };
        match self.write_records(&segment.file, segment.size) {
            Ok(()) => {
                let placed = (segment.start, segment.size);
                self.current = Some(OpenSegment {
                    size: segment.size + self.buf.len() as u64,
                    ..segment
                });
                Ok(placed)
            }
            Err(e) => {
                self.abandon(segment);
                Err(WriteError::Io(e))
            }
        }
    }

    fn write_records(&mut self, file: &File, offset: u64) -> io::Result<()> {
        #[cfg(test)]
        if let Some(n) = self.fail_next.take() {
            let n = n.min(self.buf.len());
            file.write_all_at(&self.buf[..n], offset)?;
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        file.write_all_at(&self.buf, offset)
    }

    /// Creates segment `seg-<first>`. Under the spool's lock, so that no file appears
    /// in a directory `Spool::remove` is removing.
    fn open_segment(&self, first: u64) -> Result<OpenSegment, WriteError> {
        let mut state = self.shared.lock();
        if state.removed {
            return Err(WriteError::Removed);
        }
        ensure_dir(&self.shared.dir, &mut state).map_err(WriteError::Io)?;
        let path = segment_path(&self.shared.dir, first);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| WriteError::Io(with_path("create", &path)(e)))?;
        drop(state);
        Ok(OpenSegment {
            file,
            start: first,
            size: 0,
        })
    }

    /// Closes a segment a write failed on: cuts what the failed write left (a partial
    /// record) or deletes it if nothing was committed to it (then no reader knows it).
    fn abandon(&self, segment: OpenSegment) {
        let path = segment_path(&self.shared.dir, segment.start);
        let cleaned = if segment.size == 0 {
            drop(segment.file);
            fs::remove_file(&path)
        } else {
            segment.file.set_len(segment.size)
        };
        if let Err(e) = cleaned {
            tracing::debug!(path = %path.display(), error = %e, "cannot clean up after a failed spool write");
        }
    }

    /// Makes a written batch visible to readers.
    fn commit(&mut self, first: u64, len: u64, start: u64, offset: u64) {
        let mut state = self.shared.lock();
        if state.removed {
            state.skip_to(first + len);
            drop(state);
            self.current = None;
            return;
        }
        if state.segments.back().map(|s| s.start) != Some(start) {
            state.segments.push_back(Segment {
                start,
                end: start,
                size: 0,
                index: Vec::new(),
            });
        }
        let bytes = self.buf.len() as u64;
        if let Some(seg) = state.segments.back_mut() {
            for &(pos, at) in &self.records {
                if seg.index.last().is_none_or(|&(p, _)| pos - p >= INDEX_EVERY) {
                    seg.index.push((pos, offset + at));
                }
            }
            seg.end = first + len;
            seg.size = offset + bytes;
        }
        state.end = first + len;
        state.disk_bytes += bytes;
        self.set.used.fetch_add(bytes, Ordering::Relaxed);
        drop(state);
        if self.failing {
            self.failing = false;
            tracing::info!(spool = %self.shared.id, position = first, "writing build output to the spool works again");
        }
    }

    /// Records a failed batch as a gap.
    fn fail(&mut self, first: u64, len: u64, error: &io::Error) {
        let mut state = self.shared.lock();
        if state.removed {
            state.skip_to(first + len);
            return;
        }
        state.end = first + len;
        state.add_failed(first, first + len);
        drop(state);
        match self.failed.last_mut() {
            Some((_, to)) if *to == first => *to = first + len,
            _ => self.failed.push((first, first + len)),
        }
        if !self.failing {
            self.failing = true;
            tracing::warn!(
                spool = %self.shared.id,
                position = first,
                error = %error,
                "cannot write build output to the spool; it is lost until writing works again"
            );
        }
    }

    /// Drops the oldest segments (never the last) while over the build quota.
    fn enforce_build_quota(&self) {
        let quota = self.set.limits.build_quota;
        let mut state = self.shared.lock();
        let mut dropped = Vec::new();
        while state.disk_bytes > quota && state.segments.len() > 1 {
            dropped.extend(state.drop_front(&self.set.used));
        }
        drop(state);
        delete_segments(&self.shared.dir, &dropped);
    }

    /// While the set is over its total quota: drops finished spools' output, then
    /// this spool's oldest segments (never the last).
    fn enforce_total_quota(&self) {
        let quota = self.set.limits.total_quota;
        if self.set.used() <= quota {
            return;
        }
        let spools = self.set.lock_spools();
        self.set.evict_finished(&spools);
        let mut state = self.shared.lock();
        let mut dropped = Vec::new();
        while self.set.used() > quota && state.segments.len() > 1 {
            dropped.extend(state.drop_front(&self.set.used));
        }
        drop(state);
        drop(spools);
        delete_segments(&self.shared.dir, &dropped);
    }
}

impl Drop for SpoolWriter {
    fn drop(&mut self) {
        if !self.done {
            let order = self.set.finish_order.fetch_add(1, Ordering::Relaxed);
            self.shared.lock().finished = Some(order);
        }
    }
}

/// Reads a spool from any position. Holds at most one segment file open (the last one
/// it read), so a segment dropped while a reader idles frees its disk space only when
/// the reader next reads or is dropped.
pub struct SpoolReader {
    shared: Arc<Shared>,
    /// The last segment read: its start and file.
    open: Option<(u64, File)>,
}

impl fmt::Debug for SpoolReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpoolReader")
            .field("id", &self.shared.id)
            .finish_non_exhaustive()
    }
}

impl SpoolReader {
    /// Items covering positions `[from, min(limit, end()))`, in order, stopping once
    /// `max_bytes` bytes of data were returned (at least one item if the range is not
    /// empty; `max_bytes` 0 counts as 1). The first item starts exactly at `from`, the
    /// last ends at or before `limit`. Positions below start() come out as one Quota
    /// gap, failed writes as WriteFailed gaps; adjacent data of the same stream comes
    /// out as one item. Returns an empty Vec when from >= min(limit, end()).
    pub fn read(&mut self, from: u64, limit: u64, max_bytes: usize) -> io::Result<Vec<SpoolItem>> {
        let stop = limit.min(self.shared.lock().end);
        let mut items = Vec::new();
        let mut pos = from;
        let mut budget = max_bytes.max(1) as u64;
        while pos < stop && budget > 0 {
            let span = self.shared.lock().span_at(pos);
            pos = match span {
                Span::Dropped(to) => push_gap(&mut items, pos, to.min(stop), GapReason::Quota),
                Span::Failed(to) => push_gap(&mut items, pos, to.min(stop), GapReason::WriteFailed),
                Span::Segment(seg) => self.read_segment(&seg, pos, stop, &mut budget, &mut items)?,
            };
        }
        Ok(items)
    }

    /// Reads from segment `seg` starting at `pos` (in it), up to `stop` and the budget.
    /// Returns the position reached; `pos` itself if the segment was dropped meanwhile.
    fn read_segment(
        &mut self,
        seg: &SegmentView,
        pos: u64,
        stop: u64,
        budget: &mut u64,
        items: &mut Vec<SpoolItem>,
    ) -> io::Result<u64> {
        let path = segment_path(&self.shared.dir, seg.start);
        let file = match self.open.take() {
            Some((start, file)) if start == seg.start => file,
            _ => match File::open(&path) {
                Ok(file) => file,
                // Dropped since the state was looked at: the next look says so.
                Err(e) if e.kind() == io::ErrorKind::NotFound && !self.shared.lock().has_segment(seg.start) => {
                    return Ok(pos)
                }
                Err(e) => return Err(with_path("open", &path)(e)),
            },
        };
        let (_, file) = self.open.insert((seg.start, file));
        let mut blocks = Blocks {
            file,
            path: &path,
            size: seg.size,
            off: 0,
            data: Vec::new(),
        };
        let stop = stop.min(seg.end);
        let mut pos = pos;
        let (mut p, mut off) = seg.entry;
        while p < stop && *budget > 0 {
            let header = blocks.get(off, HEADER_LEN as usize)?;
            let stream = kind_stream(header[0]).ok_or_else(|| corrupt(&path, "unknown record kind"))?;
            let len = u64::from(u32::from_le_bytes([header[1], header[2], header[3], header[4]]));
            let rec_end = p + len;
            if rec_end > seg.end || off + HEADER_LEN + len > seg.size {
                return Err(corrupt(&path, "record past the committed end"));
            }
            if rec_end > pos {
                let skip = pos.max(p) - p;
                let take = (rec_end.min(stop) - p - skip).min(*budget);
                let data = blocks.get(off + HEADER_LEN + skip, take as usize)?;
                push_data(items, stream, p + skip, data);
                *budget -= take;
                pos = p + skip + take;
                if pos < rec_end {
                    break;
                }
            }
            p = rec_end;
            off += HEADER_LEN + len;
        }
        Ok(pos)
    }
}

/// Reads a segment file in blocks, so that scanning many small records costs few reads.
struct Blocks<'a> {
    file: &'a File,
    path: &'a Path,
    /// Committed size: nothing past it is read.
    size: u64,
    /// File offset of `data`.
    off: u64,
    data: Vec<u8>,
}

impl Blocks<'_> {
    /// Bytes `off..off + len` of the file.
    fn get(&mut self, off: u64, len: usize) -> io::Result<&[u8]> {
        let end = off + len as u64;
        if end > self.size {
            return Err(corrupt(self.path, "record past the committed end"));
        }
        if off < self.off || end > self.off + self.data.len() as u64 {
            // Within the committed size, which is far below usize::MAX here.
            let n = (len.max(READ_BLOCK) as u64).min(self.size - off) as usize;
            self.data.resize(n, 0);
            self.file
                .read_exact_at(&mut self.data, off)
                .map_err(with_path("read", self.path))?;
            self.off = off;
        }
        let at = (off - self.off) as usize;
        Ok(&self.data[at..at + len])
    }
}

/// Appends data, merged into the last item if that is the same stream right before it.
fn push_data(items: &mut Vec<SpoolItem>, stream: Stream, position: u64, data: &[u8]) {
    if let Some(SpoolItem::Data {
        stream: last_stream,
        position: last_position,
        data: last,
    }) = items.last_mut()
    {
        if *last_stream == stream && *last_position + last.len() as u64 == position {
            last.extend_from_slice(data);
            return;
        }
    }
    items.push(SpoolItem::Data {
        stream,
        position,
        data: data.to_vec(),
    });
}

/// Appends a gap (merged into the last item if that is an adjacent gap of the same
/// reason); returns its end.
fn push_gap(items: &mut Vec<SpoolItem>, from: u64, to: u64, reason: GapReason) -> u64 {
    if let Some(SpoolItem::Gap {
        to: last_to,
        reason: last_reason,
        ..
    }) = items.last_mut()
    {
        if *last_to == from && *last_reason == reason {
            *last_to = to;
            return to;
        }
    }
    items.push(SpoolItem::Gap { from, to, reason });
    to
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const OUT: Stream = Stream::Stdout;
    const ERR: Stream = Stream::Stderr;
    const BIG: u64 = u64::MAX;

    fn set_in(root: &Path, build_quota: u64, total_quota: u64) -> Arc<SpoolSet> {
        SpoolSet::new(
            root.join("records"),
            SpoolLimits {
                build_quota,
                total_quota,
            },
        )
        .unwrap()
    }

    /// A spool whose segments are `segment_bytes` long, in a set without quotas.
    fn spool(root: &Path, segment_bytes: u64) -> (Arc<SpoolSet>, Spool, SpoolWriter) {
        let set = set_in(root, BIG, BIG);
        let (spool, mut writer) = set.create("b").unwrap();
        writer.segment_bytes = segment_bytes;
        (set, spool, writer)
    }

    fn read_all(spool: &Spool, from: u64) -> Vec<SpoolItem> {
        spool.reader().read(from, BIG, usize::MAX).unwrap()
    }

    fn data(stream: Stream, position: u64, bytes: &[u8]) -> SpoolItem {
        SpoolItem::Data {
            stream,
            position,
            data: bytes.to_vec(),
        }
    }

    fn gap(from: u64, to: u64, reason: GapReason) -> SpoolItem {
        SpoolItem::Gap { from, to, reason }
    }

    /// Bytes 0..n of a recognizable pattern, starting at `seed`.
    fn pattern(seed: u64, n: usize) -> Vec<u8> {
        (0..n as u64).map(|i| ((seed + i) % 251) as u8).collect()
    }

    fn segment_files(spool: &Spool) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&spool.shared.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with(SEGMENT_PREFIX))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn round_trip_interleaved_streams() {
        let tmp = tempfile::tempdir().unwrap();
        let (set, spool, mut w) = spool(tmp.path(), 1 << 20);
        assert_eq!(spool.id(), "b");
        assert_eq!(
            w.append(&[(OUT, b"hello "), (ERR, b"oops\n"), (OUT, b""), (OUT, b"world\n")]),
            0
        );
        assert_eq!(w.append(&[(ERR, b"")]), 17);
        assert_eq!(w.append(&[]), 17);
        assert_eq!(w.append(&[(ERR, b"e2"), (ERR, b"e3")]), 17);
        assert_eq!(spool.end(), 21);
        assert_eq!(spool.start(), 0);
        assert!(!spool.finished());
        assert_eq!(
            read_all(&spool, 0),
            vec![
                data(OUT, 0, b"hello "),
                data(ERR, 6, b"oops\n"),
                data(OUT, 11, b"world\n"),
                data(ERR, 17, b"e2e3"),
            ]
        );
        // The layout and the record format.
        let dir = tmp.path().join("records/b");
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o7777, 0o700);
        assert_eq!(segment_files(&spool), ["seg-00000000000000000000"]);
        let seg = dir.join("seg-00000000000000000000");
        assert_eq!(fs::metadata(&seg).unwrap().mode() & 0o7777, 0o600);
        let mut expected = Vec::new();
        for (kind, bytes) in [
            (0u8, &b"hello "[..]),
            (1, b"oops\n"),
            (0, b"world\n"),
            (1, b"e2"),
            (1, b"e3"),
        ] {
            expected.push(kind);
            expected.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            expected.extend_from_slice(bytes);
        }
        assert_eq!(fs::read(&seg).unwrap(), expected);
        assert_eq!(spool.disk_bytes(), expected.len() as u64);
        assert_eq!(set.used(), expected.len() as u64);
        // Nothing past the end.
        assert_eq!(spool.reader().read(21, BIG, 10).unwrap(), vec![]);
        assert_eq!(spool.reader().read(30, BIG, 10).unwrap(), vec![]);
    }

    #[test]
    fn reads_from_inside_records_and_across_segments() {
        let tmp = tempfile::tempdir().unwrap();
        let (_set, spool, mut w) = spool(tmp.path(), 100);
        let mut model = Vec::new();
        for i in 0..20u64 {
            let stream = if i % 3 == 0 { ERR } else { OUT };
            let bytes = pattern(i * 7, 40);
            assert_eq!(w.append(&[(stream, &bytes)]), i * 40);
            model.extend(bytes.iter().map(|&b| (stream, b)));
        }
        // 45 bytes a record: a new segment every third batch.
        let files = segment_files(&spool);
        assert_eq!(files.len(), 7);
        assert_eq!(files[1], "seg-00000000000000000120");
        let mut reader = spool.reader();
        for from in [0, 1, 57, 119, 120, 121, 239, 799] {
            let items = reader.read(from, BIG, usize::MAX).unwrap();
            assert_eq!(flatten(&items, from), model[from as usize..], "from {from}");
            match &items[0] {
                SpoolItem::Data { position, .. } => assert_eq!(*position, from),
                other => panic!("{other:?}"),
            }
        }
        // Same-stream neighbours merge, across records and segments.
        let items = reader.read(100, 250, usize::MAX).unwrap();
        assert_eq!(
            items,
            vec![
                data(OUT, 100, &pattern(14 + 20, 20)),
                data(ERR, 120, &pattern(21, 40)),
                data(OUT, 160, &[pattern(28, 40), pattern(35, 40)].concat()),
                data(ERR, 240, &pattern(42, 10)),
            ]
        );
    }

    /// The bytes of `items` (which must be contiguous from `from`, data only).
    fn flatten(items: &[SpoolItem], from: u64) -> Vec<(Stream, u8)> {
        let mut out = Vec::new();
        let mut pos = from;
        for item in items {
            match item {
                SpoolItem::Data { stream, position, data } => {
                    assert_eq!(*position, pos);
                    out.extend(data.iter().map(|&b| (*stream, b)));
                    pos += data.len() as u64;
                }
                SpoolItem::Gap { .. } => panic!("unexpected {item:?}"),
            }
        }
        out
    }

    #[test]
    fn limit_and_max_bytes_are_respected() {
        let tmp = tempfile::tempdir().unwrap();
        let (_set, spool, mut w) = spool(tmp.path(), 64);
        let bytes = pattern(0, 30);
        for i in 0..10 {
            w.append(&[(if i % 2 == 0 { OUT } else { ERR }, &bytes)]);
        }
        let mut r = spool.reader();
        assert_eq!(r.read(5, 17, usize::MAX).unwrap(), vec![data(OUT, 5, &bytes[5..17])]);
        assert_eq!(
            r.read(25, 65, usize::MAX).unwrap(),
            vec![
                data(OUT, 25, &bytes[25..]),
                data(ERR, 30, &bytes),
                data(OUT, 60, &bytes[..5])
            ]
        );
        assert_eq!(r.read(25, 25, usize::MAX).unwrap(), vec![]);
        assert_eq!(r.read(26, 25, usize::MAX).unwrap(), vec![]);
        assert_eq!(r.read(7, BIG, 4).unwrap(), vec![data(OUT, 7, &bytes[7..11])]);
        assert_eq!(
            r.read(28, BIG, 35).unwrap(),
            vec![
                data(OUT, 28, &bytes[28..]),
                data(ERR, 30, &bytes),
                data(OUT, 60, &bytes[..3])
            ]
        );
        // 0 still gives something.
        assert_eq!(r.read(299, BIG, 0).unwrap(), vec![data(ERR, 299, &bytes[29..])]);
        assert_eq!(r.read(300, BIG, 0).unwrap(), vec![]);
    }

    #[test]
    fn large_chunks_are_split_and_indexed() {
        let tmp = tempfile::tempdir().unwrap();
        let (_set, spool, mut w) = spool(tmp.path(), 1 << 30);
        let big = pattern(3, 2 * MAX_RECORD_DATA + 1000);
        let small: Vec<Vec<u8>> = (0..3000).map(|i| pattern(i, 100)).collect();
        let mut chunks: Vec<(Stream, &[u8])> = vec![(OUT, &big)];
        chunks.extend(small.iter().map(|s| (ERR, s.as_slice())));
        assert_eq!(w.append(&chunks), 0);
        let mut model: Vec<u8> = big.clone();
        model.extend(small.concat());
        {
            let state = spool.shared.lock();
            let seg = &state.segments[0];
            // The big chunk's three records, then entries every 256 KiB of small ones.
            assert_eq!(
                seg.index[..3],
                [(0, 0), (1 << 20, (1 << 20) + 5), (2 << 20, (2 << 20) + 10)]
            );
            assert!(seg.index.len() >= 3 + 300_000 / INDEX_EVERY as usize);
            for pair in seg.index.windows(2) {
                assert!(pair[1].0 - pair[0].0 <= INDEX_EVERY + MAX_RECORD_DATA as u64);
            }
        }
        let mut r = spool.reader();
        for from in [
            0,
            1,
            (1 << 20) - 1,
            1 << 20,
            (2 << 20) + 999,
            (2 << 20) + 1000,
            (2 << 20) + 123_457,
        ] {
            let items = r.read(from, from + 5000, 3000).unwrap();
            let got: Vec<u8> = flatten(&items, from).into_iter().map(|(_, b)| b).collect();
            assert_eq!(got, model[from as usize..from as usize + 3000], "from {from}");
        }
    }

    #[test]
    fn build_quota_drops_oldest_segments() {
        let tmp = tempfile::tempdir().unwrap();
        let set = set_in(tmp.path(), 1000, BIG);
        let (spool, mut w) = set.create("b").unwrap();
        w.segment_bytes = 200;
        let mut r = spool.reader();
        w.append(&[(OUT, &pattern(0, 95))]);
        // The reader keeps the first segment open.
        assert_eq!(r.read(0, BIG, 10).unwrap(), vec![data(OUT, 0, &pattern(0, 10))]);
        for i in 1..50u64 {
            w.append(&[(if i % 2 == 0 { OUT } else { ERR }, &pattern(i * 95, 95))]);
        }
        assert_eq!(spool.end(), 50 * 95);
        assert!(spool.disk_bytes() <= 1000, "{}", spool.disk_bytes());
        assert_eq!(set.used(), spool.disk_bytes());
        let start = spool.start();
        // Two 100-byte records a segment.
        assert!(start > 0 && start % 190 == 0, "{start}");
        let files = segment_files(&spool);
        assert_eq!(files[0], format!("seg-{start:020}"));
        assert_eq!(files.len() as u64, (50 * 95 - start).div_ceil(190));
        // Dropped between two reads: a gap, not an error.
        let items = r.read(10, BIG, usize::MAX).unwrap();
        assert_eq!(items[0], gap(10, start, GapReason::Quota));
        match &items[1] {
            SpoolItem::Data { position, data, .. } => {
                assert_eq!(*position, start);
                assert_eq!(data[..], pattern(start, 95)[..]);
            }
            other => panic!("{other:?}"),
        }
        let last = items.last().unwrap();
        assert!(matches!(last, SpoolItem::Data { position, data, .. } if position + data.len() as u64 == 50 * 95));
        // A gap that does not reach start, and a gap alone.
        assert_eq!(r.read(0, 7, 1).unwrap(), vec![gap(0, 7, GapReason::Quota)]);
        assert_eq!(
            r.read(start - 1, start + 1, 1).unwrap(),
            vec![
                gap(start - 1, start, GapReason::Quota),
                data(OUT, start, &pattern(start, 1))
            ]
        );
    }

    #[test]
    fn total_quota_evicts_finished_spools_first_then_own_head() {
        let tmp = tempfile::tempdir().unwrap();
        let set = set_in(tmp.path(), BIG, 400 * 1024);
        // Segments of 64 KiB, rolled over after 4 chunks (80 KiB).
        let create = |id: &str| {
            let (spool, mut w) = set.create(id).unwrap();
            w.segment_bytes = 64 * 1024;
            (spool, w)
        };
        let chunk = pattern(0, 20 * 1024);
        let fill = |w: &mut SpoolWriter, n: usize| {
            for _ in 0..n {
                w.append(&[(OUT, &chunk)]);
            }
        };
        let (a, mut wa) = create("a");
        let (b, mut wb) = create("b");
        let (c, mut wc) = create("c");
        fill(&mut wa, 4);
        fill(&mut wb, 4);
        fill(&mut wc, 4);
        let per = a.disk_bytes();
        assert_eq!(set.used(), 3 * per);
        // b finishes first, then a; c keeps running.
        wb.finish("b done").unwrap();
        drop(wa);
        assert!(a.finished() && b.finished() && !c.finished());
        let (d, mut wd) = create("d");
        fill(&mut wd, 4);
        assert_eq!(set.used(), 4 * per);
        assert!(set.used() <= 400 * 1024);
        // Over the quota: b goes, whole.
        fill(&mut wd, 4);
        assert_eq!(b.start(), b.end());
        assert_eq!(b.disk_bytes(), 0);
        assert_eq!(b.status().as_deref(), Some("b done"));
        assert_eq!(segment_files(&b), Vec::<String>::new());
        assert!(fs::read_to_string(tmp.path().join("records").join(STATUS_LOG))
            .unwrap()
            .contains("{\"build\":\"b\",\"status\":b done}\n"));
        assert_eq!(
            b.reader().read(5, BIG, 100).unwrap(),
            vec![gap(5, 4 * 20 * 1024, GapReason::Quota)]
        );
        assert_eq!(a.start(), 0);
        assert!(set.used() <= 400 * 1024);
        // Then a.
        fill(&mut wd, 4);
        assert_eq!(a.start(), a.end());
        assert_eq!(c.start(), 0);
        // Then d's own oldest segments, never c's.
        fill(&mut wd, 10);
        assert_eq!(d.start(), 8 * 20 * 1024);
        assert_eq!(c.start(), 0);
        assert_eq!(c.disk_bytes(), per);
        assert!(set.used() <= 400 * 1024, "{}", set.used());
        assert_eq!(set.used(), c.disk_bytes() + d.disk_bytes());
        let items = d.reader().read(0, BIG, usize::MAX).unwrap();
        assert_eq!(items[0], gap(0, d.start(), GapReason::Quota));
        // Running builds alone over the quota: e keeps its current segment, and the
        // other running builds are left alone.
        let d_start = d.start();
        let (e, mut we) = set.create("e").unwrap();
        we.segment_bytes = 1 << 30;
        fill(&mut we, 25);
        assert!(set.used() > 400 * 1024);
        assert_eq!(e.start(), 0);
        assert_eq!(
            e.reader().read(0, BIG, usize::MAX).unwrap(),
            vec![data(OUT, 0, &chunk.repeat(25))]
        );
        assert_eq!((c.start(), d.start()), (0, d_start));
        drop(wc);
        drop(wd);
    }

    #[test]
    fn finish_writes_status_atomically() {
        let tmp = tempfile::tempdir().unwrap();
        let (_set, spool, mut w) = spool(tmp.path(), 1 << 20);
        w.append(&[(OUT, b"x")]);
        assert_eq!(spool.status(), None);
        w.finish("{\"exit\":0}").unwrap();
        assert!(spool.finished());
        assert_eq!(spool.status().as_deref(), Some("{\"exit\":0}"));
        let log = tmp.path().join("records").join(STATUS_LOG);
        assert_eq!(
            fs::read_to_string(&log).unwrap(),
            "{\"build\":\"b\",\"status\":{\"exit\":0}}\n"
        );
        assert_eq!(fs::metadata(&log).unwrap().mode() & 0o7777, 0o600);
        assert_eq!(read_all(&spool, 0), vec![data(OUT, 0, b"x")]);

        // Dropped without finish: finished, no status.
        let set = set_in(&tmp.path().join("other"), BIG, BIG);
        let (spool, w) = set.create("c").unwrap();
        drop(w);
        assert!(spool.finished());
        assert_eq!(spool.status(), None);
        assert!(!tmp.path().join("other/records").join(STATUS_LOG).exists());

        // A failed status write is returned and the spool is finished anyway.
        let (spool, w) = set.create("d").unwrap();
        fs::create_dir_all(tmp.path().join("other/records").join(STATUS_LOG)).unwrap();
        assert!(w.finish("s").is_err());
        assert!(spool.finished());
        assert_eq!(spool.status().as_deref(), Some("s"));

        // Ids are escaped in the log.
        let set = set_in(&tmp.path().join("third"), BIG, BIG);
        let (_spool, w) = set.create("a\"b\\c").unwrap();
        w.finish("1").unwrap();
        let text = fs::read_to_string(tmp.path().join("third/records").join(STATUS_LOG)).unwrap();
        assert_eq!(text, "{\"build\":\"a\\\"b\\\\c\",\"status\":1}\n");
    }

    #[test]
    fn remove_is_idempotent_and_leaves_a_gap() {
        let tmp = tempfile::tempdir().unwrap();
        let (set, spool, mut w) = spool(tmp.path(), 100);
        for _ in 0..5 {
            w.append(&[(OUT, &pattern(0, 60))]);
        }
        let mut r = spool.reader();
        assert_eq!(r.read(0, 10, 10).unwrap(), vec![data(OUT, 0, &pattern(0, 10))]);
        spool.remove();
        spool.remove();
        assert!(!tmp.path().join("records/b").exists());
        assert_eq!(set.used(), 0);
        assert_eq!(spool.disk_bytes(), 0);
        assert_eq!((spool.start(), spool.end()), (300, 300));
        assert_eq!(r.read(10, BIG, 1).unwrap(), vec![gap(10, 300, GapReason::Quota)]);
        assert_eq!(r.read(10, 20, 1).unwrap(), vec![gap(10, 20, GapReason::Quota)]);
        // The writer goes on counting positions, storing nothing.
        assert_eq!(w.append(&[(ERR, b"late")]), 300);
        assert_eq!((spool.start(), spool.end()), (304, 304));
        assert!(!tmp.path().join("records/b").exists());
        w.finish("s").unwrap();
        assert!(!tmp.path().join("records/b").exists());
        spool.remove();
        // The id is free again.
        let (again, _w) = set.create("b").unwrap();
        assert_eq!(again.end(), 0);
    }

    #[test]
    fn a_large_batch_is_split_so_the_build_quota_holds() {
        let tmp = tempfile::tempdir().unwrap();
        let set = set_in(tmp.path(), 256 * 1024, BIG);
        let (spool, mut w) = set.create("b").unwrap();
        assert_eq!(w.segment_bytes, 64 * 1024);
        // One batch of 1 MiB (what a busy spooler hands over at once).
        let chunk = pattern(0, 64 * 1024);
        let batch: Vec<(Stream, &[u8])> = (0..16).map(|_| (OUT, chunk.as_slice())).collect();
        assert_eq!(w.append(&batch), 0);
        assert_eq!(spool.end(), 1 << 20);
        assert!(
            spool.disk_bytes() <= 256 * 1024 + 2 * (64 * 1024 + 5),
            "kept {} bytes",
            spool.disk_bytes()
        );
        assert!(spool.start() >= (1 << 20) - 384 * 1024);
    }

    #[test]
    fn create_refuses_bad_and_taken_ids() {
        let tmp = tempfile::tempdir().unwrap();
        let set = set_in(tmp.path(), BIG, BIG);
        assert_eq!(fs::metadata(tmp.path().join("records")).unwrap().mode() & 0o7777, 0o700);
        for id in ["", ".", "..", "a/b", "/", "a\0b"] {
            let err = set.create(id).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{id:?}");
        }
        let (_s, mut w) = set.create("x").unwrap();
        assert_eq!(set.create("x").unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        // The directory is made once there is something to store.
        assert!(!tmp.path().join("records/x").exists());
        w.append(&[(OUT, b"x")]);
        assert!(tmp.path().join("records/x").is_dir());
        // An existing root is fine.
        let again = SpoolSet::new(tmp.path().join("records"), set.limits()).unwrap();
        assert_eq!(again.create("x").unwrap_err().kind(), io::ErrorKind::AlreadyExists);
    }

    #[test]
    fn failed_writes_become_gaps() {
        let tmp = tempfile::tempdir().unwrap();
        let (set, spool, mut w) = spool(tmp.path(), 1 << 20);
        // A failure on a fresh segment leaves no file.
        w.fail_next = Some(3);
        assert_eq!(w.append(&[(OUT, b"lost")]), 0);
        assert_eq!(segment_files(&spool), Vec::<String>::new());
        assert_eq!(w.append(&[(OUT, b"abc"), (ERR, b"def")]), 4);
        // A partial write into a segment with committed data.
        w.fail_next = Some(7);
        assert_eq!(w.append(&[(OUT, b"0123456789")]), 10);
        // Two failures in a row make one gap.
        w.fail_next = Some(0);
        assert_eq!(w.append(&[(ERR, b"zz")]), 20);
        assert_eq!(w.append(&[(ERR, b"ok")]), 22);
        assert_eq!(spool.end(), 24);
        // The writer tells its caller the same ranges, once.
        assert_eq!(w.take_failed(), vec![(0, 4), (10, 22)]);
        assert!(w.take_failed().is_empty());
        assert_eq!(
            read_all(&spool, 0),
            vec![
                gap(0, 4, GapReason::WriteFailed),
                data(OUT, 4, b"abc"),
                data(ERR, 7, b"def"),
                gap(10, 22, GapReason::WriteFailed),
                data(ERR, 22, b"ok"),
            ]
        );
        assert_eq!(
            spool.reader().read(12, 23, 100).unwrap(),
            vec![gap(12, 22, GapReason::WriteFailed), data(ERR, 22, b"o")]
        );
        // The abandoned segment was cut back to its committed batch; the next one is new.
        assert_eq!(
            segment_files(&spool),
            ["seg-00000000000000000004", "seg-00000000000000000022"]
        );
        let dir = tmp.path().join("records/b");
        assert_eq!(fs::metadata(dir.join("seg-00000000000000000004")).unwrap().len(), 16);
        assert_eq!(spool.disk_bytes(), 16 + 7);
        assert_eq!(set.used(), 16 + 7);
        assert!(!w.failing);
    }

    /// A fixed-seed xorshift generator: deterministic tests without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// What a position holds in the model.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Cell {
        Data(Stream, u8),
        Failed,
    }

    /// Checks one read against the model.
    fn check_read(r: &mut SpoolReader, model: &[Cell], start: u64, from: u64, limit: u64, max_bytes: usize) {
        let items = r.read(from, limit, max_bytes).unwrap();
        let stop = limit.min(model.len() as u64);
        if from >= stop {
            assert!(items.is_empty(), "{items:?}");
            return;
        }
        assert!(!items.is_empty());
        let mut pos = from;
        let mut got = 0;
        let mut last_stream = None;
        for item in &items {
            match item {
                SpoolItem::Data { stream, position, data } => {
                    assert_eq!(*position, pos);
                    assert!(!data.is_empty());
                    for (i, &b) in data.iter().enumerate() {
                        assert_eq!(
                            model[pos as usize + i],
                            Cell::Data(*stream, b),
                            "at {}",
                            pos as usize + i
                        );
                    }
                    assert!(pos >= start);
                    // Merged: no two adjacent data items of one stream.
                    assert_ne!(last_stream, Some(*stream));
                    last_stream = Some(*stream);
                    pos += data.len() as u64;
                    got += data.len();
                }
                SpoolItem::Gap { from: f, to, reason } => {
                    assert_eq!(*f, pos);
                    assert!(to > f);
                    match reason {
                        GapReason::Quota => assert!(*to <= start.max(*f)),
                        GapReason::WriteFailed => {
                            assert!(*f >= start);
                            assert!(model[*f as usize..*to as usize].iter().all(|c| *c == Cell::Failed));
                        }
                    }
                    last_stream = None;
                    pos = *to;
                }
            }
        }
        assert!(pos <= stop);
        assert!(got <= max_bytes.max(1));
        if pos < stop {
            assert_eq!(got, max_bytes.max(1), "stopped early at {pos} of {stop}");
        }
    }

    #[test]
    fn random_appends_and_reads_match_a_model() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..4 {
            let tmp = tempfile::tempdir().unwrap();
            let quota = [BIG, 20_000, 8_000, 3_000][round];
            let set = set_in(tmp.path(), quota, BIG);
            let (spool, mut w) = set.create("b").unwrap();
            w.segment_bytes = 500 + rng.below(2000);
            let mut model: Vec<Cell> = Vec::new();
            let mut readers: Vec<SpoolReader> = (0..3).map(|_| spool.reader()).collect();
            for _ in 0..150 {
                let n = rng.below(5) as usize;
                let chunks: Vec<(Stream, Vec<u8>)> = (0..n)
                    .map(|_| {
                        let stream = if rng.below(2) == 0 { OUT } else { ERR };
                        let len = match rng.below(10) {
                            0 => 0,
                            1 => rng.below(3000),
                            _ => rng.below(200),
                        };
                        (stream, (0..len).map(|_| rng.next() as u8).collect())
                    })
                    .collect();
                let fail = rng.below(15) == 0;
                let total: usize = chunks.iter().map(|(_, d)| d.len()).sum();
                if fail {
                    w.fail_next = Some(rng.below(total as u64 + 10) as usize);
                }
                let refs: Vec<(Stream, &[u8])> = chunks.iter().map(|(s, d)| (*s, d.as_slice())).collect();
                assert_eq!(w.append(&refs), model.len() as u64);
                if total == 0 {
                    // Nothing written: the injected failure waits for the next batch.
                    w.fail_next = None;
                }
                for (stream, d) in &chunks {
                    model.extend(
                        d.iter()
                            .map(|&b| if fail { Cell::Failed } else { Cell::Data(*stream, b) }),
                    );
                }
                assert_eq!(spool.end(), model.len() as u64);
                assert!(spool.disk_bytes() <= quota.max(w.segment_bytes + 20_000));
                for _ in 0..3 {
                    let len = model.len() as u64 + 1;
                    let from = rng.below(len + 5);
                    let limit = match rng.below(3) {
                        0 => BIG,
                        _ => from + rng.below(len),
                    };
                    let max_bytes = rng.below(4000) as usize;
                    let r = &mut readers[rng.below(3) as usize];
                    check_read(r, &model, spool.start(), from, limit, max_bytes);
                }
            }
            // Everything, in pieces, from 0.
            let mut r = spool.reader();
            let mut pos = 0;
            while pos < spool.end() {
                let items = r.read(pos, BIG, 777).unwrap();
                check_read(&mut spool.reader(), &model, spool.start(), pos, BIG, 777);
                pos = match items.last().unwrap() {
                    SpoolItem::Data { position, data, .. } => position + data.len() as u64,
                    SpoolItem::Gap { to, .. } => *to,
                };
            }
            if quota != BIG {
                assert!(spool.start() > 0);
            }
            assert_eq!(set.used(), spool.disk_bytes());
        }
    }

    #[test]
    fn readers_on_other_threads_see_committed_output() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Spool>();
        assert_send_sync::<Arc<SpoolSet>>();
        fn assert_send<T: Send>() {}
        assert_send::<SpoolWriter>();
        assert_send::<SpoolReader>();

        let tmp = tempfile::tempdir().unwrap();
        let (_set, spool, mut w) = spool(tmp.path(), 4096);
        let expected: Vec<u8> = (0..2000u64).flat_map(|i| pattern(i, (i % 50) as usize)).collect();
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..2000u64 {
                    w.append(&[(OUT, &pattern(i, (i % 50) as usize))]);
                }
                w.finish("done").unwrap();
            });
            for _ in 0..2 {
                s.spawn(|| {
                    let mut r = spool.reader();
                    let mut got = Vec::new();
                    loop {
                        let finished = spool.finished();
                        for item in r.read(got.len() as u64, BIG, 1000).unwrap() {
                            match item {
                                SpoolItem::Data { position, data, .. } => {
                                    assert_eq!(position, got.len() as u64);
                                    got.extend(data);
                                }
                                other => panic!("{other:?}"),
                            }
                        }
                        assert!(got.len() as u64 <= spool.end());
                        if finished && got.len() as u64 == spool.end() {
                            break;
                        }
                        std::thread::yield_now();
                    }
                    assert_eq!(got, expected);
                });
            }
        });
    }
}
