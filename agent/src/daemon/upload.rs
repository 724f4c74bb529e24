//! Uploads: the tar streams a client sends into a preparing build's work dir.
//!
//! A `Run` whose spec lists uploads is followed by `Upload` pieces and one `UploadEnd`
//! per upload, in index order. The session hands the pieces to an [`UploadRoute`] (it
//! never waits: the client keeps at most the upload window unacknowledged, and more is
//! a protocol error); a thread of the blocking pool reads them through an
//! [`UploadFeed`], unpacking each stream with the hostile-archive rules of
//! `tether_executor::transfer::unpack` while it hashes and counts what arrived. At
//! `UploadEnd` it compares the client's byte count and SHA-256 with its own: a mismatch
//! fails the build's preparation, so its command never starts. Nothing is buffered
//! beyond the window, and no upload touches the disk outside the build's work dir.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sha2::{Digest as _, Sha256};
use tether_executor::transfer::{create_dirs_inside, relative_inside, unpack, InsideError, UnpackLimits};
use tether_protocol::{DaemonMessage, Digest, RequestId};
use tokio::sync::mpsc;

use super::outbox::Outbox;
use tether_executor::fetch::hex;

/// One item of a run's upload stream.
#[derive(Debug)]
pub enum UploadItem {
    Data(Vec<u8>),
    End {
        bytes: u64,
        sha256: Digest,
    },
    /// The preparation failed elsewhere: stop reading.
    Abort,
}

/// Acknowledge at least every this many bytes (and whenever the queue runs empty).
const ACK_EVERY: u64 = 1024 * 1024;

/// The session's end of a run's uploads.
#[derive(Debug)]
pub struct UploadRoute {
    tx: mpsc::UnboundedSender<UploadItem>,
    /// Bytes sent to the feed and not yet read from it.
    pending: Arc<AtomicU64>,
    window: u64,
    /// The upload that pieces must belong to now.
    next: u32,
    count: u32,
}

/// Why a piece was refused; the upload is over then.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("upload {got} arrived while upload {want} of the run was expected (uploads go in order)")]
    OutOfOrder { got: u32, want: u32 },
    #[error("more than the upload window ({window} bytes) was sent unacknowledged")]
    Window { window: u64 },
    #[error("an upload piece of {len} bytes is larger than {} bytes", tether_protocol::MAX_CHUNK)]
    TooLarge { len: usize },
    /// The preparation ended (failed or was cancelled); its error was reported.
    #[error("the build's preparation has ended")]
    Closed,
}

impl UploadRoute {
    /// Passes a piece of upload `index` on.
    pub fn data(&mut self, index: u32, data: Vec<u8>) -> Result<(), RouteError> {
        self.check(index)?;
        if data.len() > tether_protocol::MAX_CHUNK {
            return Err(RouteError::TooLarge { len: data.len() });
        }
        let len = data.len() as u64;
        if self.pending.fetch_add(len, Ordering::SeqCst) + len > self.window {
            return Err(RouteError::Window { window: self.window });
        }
        self.tx.send(UploadItem::Data(data)).map_err(|_| RouteError::Closed)
    }

    /// Ends upload `index`; returns true when it was the run's last.
    pub fn end(&mut self, index: u32, bytes: u64, sha256: Digest) -> Result<bool, RouteError> {
        self.check(index)?;
        self.tx
            .send(UploadItem::End { bytes, sha256 })
            .map_err(|_| RouteError::Closed)?;
        self.next += 1;
        Ok(self.next >= self.count)
    }

    fn check(&self, index: u32) -> Result<(), RouteError> {
        if index != self.next || index >= self.count {
            return Err(RouteError::OutOfOrder {
                got: index,
                want: self.next,
            });
        }
        Ok(())
    }
}

/// The preparation's end of a run's uploads.
#[derive(Debug)]
pub struct UploadFeed {
    rx: mpsc::UnboundedReceiver<UploadItem>,
    pending: Arc<AtomicU64>,
}

/// A route for `count` uploads with `window` bytes in flight, its feed, and a sender
/// that aborts the feed.
pub fn channel(count: u32, window: u64) -> (UploadRoute, UploadFeed, Aborter) {
    let (tx, rx) = mpsc::unbounded_channel();
    let pending = Arc::new(AtomicU64::new(0));
    // Weak: once the session drops its route, the feed must see the channel close.
    let aborter = Aborter(tx.downgrade());
    (
        UploadRoute {
            tx,
            pending: Arc::clone(&pending),
            window,
            next: 0,
            count,
        },
        UploadFeed { rx, pending },
        aborter,
    )
}

/// Stops a feed's reader at its next read (if the route still exists; otherwise the
/// reader sees the stream end anyway).
#[derive(Debug, Clone)]
pub struct Aborter(mpsc::WeakUnboundedSender<UploadItem>);

impl Aborter {
    pub fn abort(&self) {
        if let Some(tx) = self.0.upgrade() {
            let _ = tx.send(UploadItem::Abort);
        }
    }
}

/// Why an upload failed; the message names the upload.
#[derive(Debug, thiserror::Error)]
#[error("upload {index} (into {dest}): {reason}")]
pub struct UploadError {
    pub index: usize,
    pub dest: String,
    pub reason: String,
}

/// Receives every upload of a run into its destination inside `work` (a blocking call:
/// run it on the blocking pool). `dests` are relative directories, one per upload.
pub fn receive_all(
    feed: UploadFeed,
    work: &Path,
    dests: &[PathBuf],
    limits: UnpackLimits,
    req: RequestId,
    out: &Outbox,
) -> Result<(), UploadError> {
    let mut reader = FeedReader {
        feed,
        piece: Vec::new(),
        at: 0,
        hasher: Sha256::new(),
        bytes: 0,
        consumed: 0,
        acked: 0,
        end: None,
        req,
        out,
    };
    for (index, rel) in dests.iter().enumerate() {
        let fail = |reason: String| UploadError {
            index,
            dest: rel.display().to_string(),
            reason,
        };
        let dest = destination(work, rel).map_err(fail)?;
        let result = unpack(&mut reader, &dest, limits);
        // The stream may go on past the archive's end marker (padding): all of it counts.
        let drained = io::copy(&mut reader, &mut io::sink());
        match reader.end.take() {
            Some((bytes, sha256)) => {
                let got: Digest = std::mem::take(&mut reader.hasher).finalize().into();
                let received = std::mem::take(&mut reader.bytes);
                if (bytes, sha256) != (received, got) {
                    return Err(fail(format!(
                        "sha256 mismatch: the client sent {bytes} bytes with sha256 {}, the daemon received {received} bytes with sha256 {}",
                        hex(&sha256),
                        hex(&got)
                    )));
                }
                result.map_err(|e| fail(e.to_string()))?;
            }
            None => {
                // Aborted, or the client went away mid-stream.
                let why = match drained {
                    Err(e) => e.to_string(),
                    Ok(_) => "the upload stream ended early".into(),
                };
                return Err(fail(match result {
                    Err(e) => format!("{e} ({why})"),
                    Ok(_) => why,
                }));
            }
        }
    }
    reader.ack();
    Ok(())
}

/// `work/rel`, created, refused when `rel` is absolute, has `..`, or leads outside
/// `work` through a symlink.
fn destination(work: &Path, rel: &Path) -> Result<PathBuf, String> {
    let rel = relative_inside(rel).map_err(|e| format!("bad destination: {e}"))?;
    let real_work = work.canonicalize().map_err(|e| e.to_string())?;
    let components: Vec<_> = rel.components().collect();
    create_dirs_inside(&real_work, &components).map_err(|e| match e {
        InsideError::Outside(_) => "the destination leads outside the build's work dir".into(),
        other => format!("cannot create the destination: {other}"),
    })
}

/// The feed as one `Read` per upload: EOF at that upload's `End`.
struct FeedReader<'a> {
    feed: UploadFeed,
    piece: Vec<u8>,
    at: usize,
    hasher: Sha256,
    bytes: u64,
    consumed: u64,
    acked: u64,
    end: Option<(u64, Digest)>,
    req: RequestId,
    out: &'a Outbox,
}

impl FeedReader<'_> {
    fn ack(&mut self) {
        if self.consumed > self.acked {
            self.acked = self.consumed;
            self.out.blocking_control(DaemonMessage::UploadAck {
                req: self.req,
                consumed: self.consumed,
            });
        }
    }
}

impl Read for FeedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at >= self.piece.len() {
            if self.end.is_some() {
                return Ok(0);
            }
            if self.feed.rx.is_empty() || self.consumed - self.acked >= ACK_EVERY {
                self.ack();
            }
            match self.feed.rx.blocking_recv() {
                Some(UploadItem::Data(data)) => {
                    let len = data.len() as u64;
                    self.feed.pending.fetch_sub(len, Ordering::SeqCst);
                    self.consumed += len;
                    self.bytes += len;
                    self.hasher.update(&data);
                    self.piece = data;
                    self.at = 0;
                }
                Some(UploadItem::End { bytes, sha256 }) => {
                    self.end = Some((bytes, sha256));
                    return Ok(0);
                }
                Some(UploadItem::Abort) => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the preparation was stopped",
                    ))
                }
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the client's session ended during the upload",
                    ))
                }
            }
        }
        let n = buf.len().min(self.piece.len() - self.at);
        buf[..n].copy_from_slice(&self.piece[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}
