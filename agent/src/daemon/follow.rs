//! Followers of a build's output: live from memory while they keep up, from the spool
//! when they fall behind, and never a reason for the build to wait.
//!
//! Each build has one [`Feed`]. Its forwarder ([`Feed::publish`]) gets every chunk after
//! the spooler wrote it to disk, and offers it to the *live* followers without waiting:
//! a follower whose session queue has room gets it at once; one whose queue is full
//! leaves the live list and continues on a *catch-up* thread that reads the spool from
//! its position, waits for queue room (that wait is the client's backpressure, and it
//! holds no memory beyond the session's bounded queue), and rejoins the live list once
//! it reached the published end. So:
//!
//! * the build is paced only by the disk, never by a client;
//! * the daemon's memory per follower is bounded by its session's data queue;
//! * a follower sees every position exactly once, in order: the catch-up thread and
//!   the forwarder hand a follower over under the feed's lock, at the published end.
//!
//! Attaching later (`tether attach`, `tether logs`, a reconnecting client) is the same
//! catch-up from a position. Positions the spool no longer holds (a quota dropped them)
//! are sent as one [`DaemonMessage::Gap`] instead of bytes.

use std::sync::{Arc, Mutex, MutexGuard};

use tether_executor::spool::{GapReason, Spool, SpoolItem};
use tether_executor::OutputChunk;
use tether_protocol::{self as wire, BuildId, DaemonMessage, RequestId};

use super::convert;
use super::outbox::{Full, Outbox};

/// Spool bytes a catch-up thread reads at once: one message's worth, so that what the
/// spool returns moves into the message without another copy.
const READ_BATCH: usize = wire::MAX_CHUNK;

/// What a follower wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Everything from its position on, then `Exited`.
    Follow,
    /// Output up to the end at the time of the request, then `Exited` if the build had
    /// finished by then, or `LogEnd`.
    Snapshot { req: RequestId },
}

struct Follower {
    out: Outbox,
    /// The next position this follower is to be sent.
    pos: u64,
    /// Whether it was sent the build's `Held`.
    told_held: bool,
}

#[derive(Default)]
struct State {
    live: Vec<Follower>,
    /// Positions below this were published (spooled and offered to live followers).
    end: u64,
    /// Set once every chunk was published and the build is held (until it exits).
    held: Option<DaemonMessage>,
    /// Set once every chunk was published.
    exited: Option<wire::Exited>,
}

/// One build's output, for its followers.
pub struct Feed {
    build: BuildId,
    spool: Spool,
    state: Mutex<State>,
}

/// A request to follow from a position past the end.
#[derive(Debug)]
pub struct PastEnd {
    pub end: u64,
}

impl Feed {
    pub fn new(build: BuildId, spool: Spool) -> Arc<Feed> {
        Arc::new(Feed {
            build,
            spool,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The published end: the build's output size so far.
    pub fn end(&self) -> u64 {
        self.lock().end
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// Adds a follower from `from` (`u64::MAX`: from the current end).
    pub fn subscribe(self: &Arc<Self>, out: Outbox, from: u64, mode: Mode) -> Result<(), PastEnd> {
        let mut state = self.lock();
        let from = if from == u64::MAX { state.end } else { from };
        if from > state.end {
            return Err(PastEnd { end: state.end });
        }
        let follower = Follower {
            out,
            pos: from,
            told_held: false,
        };
        if mode == Mode::Follow && from == state.end && state.exited.is_none() && state.held.is_none() {
            state.live.push(follower);
            return Ok(());
        }
        let limit = state.end;
        drop(state);
        self.catch_up(follower, mode, limit);
        Ok(())
    }

    /// Offers a spooled chunk to the live followers; never waits.
    pub fn publish(self: &Arc<Self>, chunk: OutputChunk) {
        let mut state = self.lock();
        let end = chunk.offset + chunk.data.len() as u64;
        state.end = end;
        let mut data = Some(chunk.data);
        let stream = convert::stream(chunk.stream);
        let message = |i: usize, count: usize, f: &Follower| {
            if f.pos >= end {
                return None;
            }
            // Live followers are at the previous end, which is where this chunk starts.
            let skip = f.pos.saturating_sub(chunk.offset) as usize;
            let bytes = if i + 1 == count {
                data.take().unwrap_or_default()
            } else {
                data.clone().unwrap_or_default()
            };
            let bytes = if skip > 0 {
                bytes[skip.min(bytes.len())..].to_vec()
            } else {
                bytes
            };
            Some(DaemonMessage::Output {
                build: self.build.clone(),
                stream,
                offset: f.pos,
                data: wire::Bytes::from(bytes),
            })
        };
        self.offer(state, message, |f| f.pos = end, true);
    }

    /// Positions `[from, to)` that the spool could not take: live followers get one
    /// `Gap` (WriteFailed), as a follower reading the spool later would.
    pub fn publish_gap(self: &Arc<Self>, from: u64, to: u64) {
        let mut state = self.lock();
        state.end = to;
        let message = |_: usize, _: usize, f: &Follower| {
            (f.pos < to).then(|| DaemonMessage::Gap {
                build: self.build.clone(),
                from: f.pos.max(from),
                to,
                reason: wire::GapReason::WriteFailed,
            })
        };
        self.offer(state, message, |f| f.pos = to, true);
    }

    /// The build is held: every chunk was published. Live followers get `Held` (on a
    /// catch-up thread when their queue is full) and stay for `Exited`.
    pub fn hold(self: &Arc<Self>, held: DaemonMessage) {
        let mut state = self.lock();
        state.held = Some(held.clone());
        self.offer(state, |_, _, _| Some(held.clone()), |f| f.told_held = true, true);
    }

    /// The build is over: every chunk was published. Live followers get `Exited` (on a
    /// catch-up thread when their queue is full) and are done.
    pub fn finish(self: &Arc<Self>, exited: wire::Exited) {
        let mut state = self.lock();
        state.exited = Some(exited.clone());
        let msg = DaemonMessage::Exited(exited);
        self.offer(state, |_, _, _| Some(msg.clone()), |_| {}, false);
    }

    /// Offers each live follower the message `message(i, count, follower)` makes for it
    /// (`None`: nothing to send, it stays live), without waiting; `sent` updates one that
    /// took it, which stays live if `stay`. One whose queue is full continues on a
    /// catch-up thread from the published end; one whose session is gone is dropped.
    fn offer(
        self: &Arc<Self>,
        mut state: MutexGuard<'_, State>,
        mut message: impl FnMut(usize, usize, &Follower) -> Option<DaemonMessage>,
        sent: impl Fn(&mut Follower),
        stay: bool,
    ) {
        let end = state.end;
        let live = std::mem::take(&mut state.live);
        let count = live.len();
        let mut keep = Vec::with_capacity(count);
        let mut behind = Vec::new();
        for (i, mut f) in live.into_iter().enumerate() {
            let Some(msg) = message(i, count, &f) else {
                keep.push(f);
                continue;
            };
            match f.out.try_data(msg) {
                Ok(()) => {
                    sent(&mut f);
                    if stay {
                        keep.push(f);
                    }
                }
                Err(Full::Behind) => behind.push(f),
                Err(Full::Gone) => {}
            }
        }
        state.live = keep;
        drop(state);
        for f in behind {
            self.catch_up(f, Mode::Follow, end);
        }
    }

    /// Continues `f` on a thread of its own, reading the spool from `f.pos`.
    fn catch_up(self: &Arc<Self>, f: Follower, mode: Mode, limit: u64) {
        let feed = Arc::clone(self);
        let out = f.out.clone();
        let spawned = std::thread::Builder::new()
            .name("catch-up".into())
            .spawn(move || feed.run_catch_up(f, mode, limit));
        if let Err(e) = spawned {
            tracing::error!(build = %self.build, error = %e, "cannot start a catch-up thread; the follower is dropped");
            out.try_control(DaemonMessage::Error(wire::ErrorReport {
                req: None,
                build: Some(self.build.clone()),
                kind: wire::ErrorKind::Internal,
                message: format!("the daemon cannot send more output of {}: {e}", self.build),
            }));
        }
    }

    fn run_catch_up(self: Arc<Self>, mut f: Follower, mode: Mode, snapshot_end: u64) {
        let mut reader = self.spool.reader();
        loop {
            let limit = {
                let mut state = self.lock();
                let target = match mode {
                    Mode::Follow => state.end,
                    Mode::Snapshot { .. } => snapshot_end,
                };
                if f.pos >= target {
                    let last = match (&state.exited, mode) {
                        (Some(exited), _) if f.pos >= state.end => DaemonMessage::Exited(exited.clone()),
                        (_, Mode::Snapshot { req }) => DaemonMessage::LogEnd {
                            req,
                            build: self.build.clone(),
                            position: f.pos,
                        },
                        (_, Mode::Follow) => match &state.held {
                            Some(held) if !f.told_held => {
                                // Told outside the lock; then the state is looked at again.
                                let held = held.clone();
                                drop(state);
                                f.told_held = true;
                                if !f.out.blocking_data(held) {
                                    return;
                                }
                                continue;
                            }
                            _ => {
                                // At the published end of a running build: live from here.
                                state.live.push(f);
                                return;
                            }
                        },
                    };
                    drop(state);
                    f.out.blocking_data(last);
                    return;
                }
                target
            };
            let items = match reader.read(f.pos, limit, READ_BATCH) {
                Ok(items) => items,
                Err(e) => {
                    tracing::warn!(build = %self.build, error = %e, "cannot read the build's spool");
                    vec![SpoolItem::Gap {
                        from: f.pos,
                        to: limit,
                        reason: GapReason::WriteFailed,
                    }]
                }
            };
            if items.is_empty() {
                // The spool holds less than was published: it was removed (retention).
                let gap = SpoolItem::Gap {
                    from: f.pos,
                    to: limit,
                    reason: GapReason::Quota,
                };
                if !self.send_item(&mut f, gap) {
                    return;
                }
                continue;
            }
            for item in items {
                if !self.send_item(&mut f, item) {
                    return;
                }
            }
        }
    }

    /// Sends one spool item (in frames of at most one chunk); false once the session
    /// is gone.
    fn send_item(&self, f: &mut Follower, item: SpoolItem) -> bool {
        match item {
            SpoolItem::Data { stream, position, data } => {
                let end = position + data.len() as u64;
                // At most READ_BATCH = MAX_CHUNK bytes: one message, no copy.
                let msg = DaemonMessage::Output {
                    build: self.build.clone(),
                    stream: convert::stream(stream),
                    offset: position,
                    data: wire::Bytes::from(data),
                };
                f.pos = end;
                f.out.blocking_data(msg)
            }
            SpoolItem::Gap { from, to, reason } => {
                let msg = DaemonMessage::Gap {
                    build: self.build.clone(),
                    from,
                    to,
                    reason: match reason {
                        GapReason::Quota => wire::GapReason::Quota,
                        GapReason::WriteFailed => wire::GapReason::WriteFailed,
                    },
                };
                f.pos = to;
                f.out.blocking_data(msg)
            }
        }
    }
}
