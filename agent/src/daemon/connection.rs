//! One connection (a byte stream both ways) and the sessions that follow each other on
//! it: the reader loop and the single writer.
//!
//! The daemon's stdin can carry many sessions one after another (`kubectl attach` gives
//! no EOF between clients); each preamble starts a new one. The writer owns the stream's
//! output: it writes a preamble at start and whenever a session starts, then that
//! session's queues, control before data, batching frames into large writes. When a new
//! session starts, the old session's queues are dropped: their senders see the session
//! gone, and nothing of the old session follows the new preamble.
//!
//! Heartbeats: the reader pings the session's client every heartbeat interval, and a
//! client that sent nothing at all for the heartbeat timeout is gone: on a socket the
//! connection is closed; on stdin the session ends (its subscriptions with it) and the
//! stream waits for the next client's preamble. Builds are never touched.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tether_protocol::{ClientMessage, DaemonMessage, ErrorKind, PREAMBLE};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};

use super::outbox::{outbox, OutboxRx};
use super::session::Session;
use super::Daemon;
use crate::wire::{push_frame, Inbound, Sink};

/// Frames are gathered into writes of about this size when many are queued.
const BATCH_BYTES: usize = 256 * 1024;

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// What kind of stream a connection is, for what a silent client costs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The daemon's stdin/stdout: one stream for the daemon's life, sessions follow
    /// each other on it.
    Stdio,
    /// One socket connection: its session is the whole connection.
    Socket,
}

/// A running connection: its session loop and its writer.
pub struct Connection {
    /// Ends when the input stream ends or fails.
    pub reader: JoinHandle<()>,
    writer: JoinHandle<()>,
    stop: oneshot::Sender<()>,
}

impl Connection {
    /// Starts serving sessions from `inbound`, writing to `sink`.
    pub fn spawn(
        daemon: Arc<Daemon>,
        inbound: mpsc::Receiver<Inbound<ClientMessage>>,
        sink: Sink,
        transport: Transport,
    ) -> Connection {
        let (switch_tx, switch_rx) = mpsc::channel(1);
        let (stop, stop_rx) = oneshot::channel();
        let writer = tokio::spawn(write_loop(sink, switch_rx, stop_rx));
        let reader = tokio::spawn(read_loop(daemon, inbound, switch_tx, transport));
        Connection { reader, writer, stop }
    }

    /// Stops reading, writes what is queued now, closes the stream and waits for that
    /// (at most `bound`: a peer that stopped reading cannot hold the daemon).
    pub async fn finish(self, bound: std::time::Duration) {
        self.reader.abort();
        let _ = self.stop.send(());
        if tokio::time::timeout(bound, self.writer).await.is_err() {
            tracing::warn!("output stream did not drain in time");
        }
    }
}

/// Far enough away to mean "never" for a timer.
fn never() -> Instant {
    Instant::now() + Duration::from_secs(86400 * 365)
}

async fn read_loop(
    daemon: Arc<Daemon>,
    mut inbound: mpsc::Receiver<Inbound<ClientMessage>>,
    switch_tx: mpsc::Sender<Option<OutboxRx>>,
    transport: Transport,
) {
    let mut session: Option<Session> = None;
    let mut heard = Instant::now();
    let mut ping = tokio::time::interval_at(Instant::now() + daemon.heartbeat, daemon.heartbeat);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut nonce = 0u64;
    let mut shutdown = daemon.shutdown.subscribe();
    let mut told_shutdown = false;
    loop {
        let deadline = if session.is_some() {
            heard + daemon.heartbeat_timeout
        } else {
            never()
        };
        let item = tokio::select! {
            item = inbound.recv() => match item {
                Some(item) => item,
                None => break,
            },
            Ok(()) = shutdown.changed(), if !told_shutdown => {
                let reason = shutdown.borrow_and_update().clone();
                if let (Some(reason), Some(s)) = (reason, &session) {
                    told_shutdown = true;
                    s.shutting_down(reason);
                }
                continue;
            }
            _ = ping.tick(), if session.is_some() => {
                if let Some(s) = &session {
                    nonce += 1;
                    s.ping(nonce);
                }
                continue;
            }
            _ = sleep_until(deadline) => {
                let old = session.take().map(|s| s.id);
                tracing::warn!(session = ?old, silent = ?daemon.heartbeat_timeout, "client sent nothing within the heartbeat timeout; dropping its session");
                match transport {
                    Transport::Socket => break,
                    Transport::Stdio => {
                        if switch_tx.send(None).await.is_err() {
                            break;
                        }
                        continue;
                    }
                }
            }
        };
        heard = Instant::now();
        match item {
            Inbound::Preamble => {
                let (out, rx) = outbox();
                let id = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
                if let Some(old) = session.replace(Session::new(id, Arc::clone(&daemon), out)) {
                    tracing::info!(
                        old = old.id,
                        new = id,
                        "new session on the same stream; the old one ends"
                    );
                }
                if switch_tx.send(Some(rx)).await.is_err() {
                    break;
                }
                ping.reset();
            }
            Inbound::Message(msg) => match &mut session {
                Some(s) => s.handle(msg).await,
                // The decoder yields frames only after a preamble.
                None => tracing::warn!("message before any preamble ignored"),
            },
            Inbound::Corrupt(c) => {
                tracing::warn!(corruption = %c, "damaged input; resynchronising");
                if let Some(s) = &session {
                    let message = format!("damaged input ({c}); skipping to the next frame");
                    s.error(None, None, ErrorKind::Protocol, message).await;
                }
            }
            Inbound::Undecodable(e) => {
                tracing::warn!(error = %e, "undecodable frame skipped");
                if let Some(s) = &session {
                    s.error(None, None, ErrorKind::Protocol, format!("frame skipped: {e}"))
                        .await;
                }
            }
            Inbound::Eof(end) => {
                tracing::info!(?end, "input stream ended");
                break;
            }
            Inbound::Failed(e) => {
                tracing::warn!(error = %e, "reading the input stream failed");
                break;
            }
        }
    }
}

enum Next {
    Stop,
    /// `Some(Some(rx))`: a new session; `Some(None)`: the session ended; `None`: the
    /// reader is gone.
    Switch(Option<Option<OutboxRx>>),
    Message(Option<DaemonMessage>),
}

async fn write_loop(mut sink: Sink, mut switch: mpsc::Receiver<Option<OutboxRx>>, mut stop: oneshot::Receiver<()>) {
    let mut broken = false;
    let mut current: Option<OutboxRx> = None;
    let mut switch_open = true;
    let mut buf = PREAMBLE.to_vec();
    let mut stopping = false;
    loop {
        if !buf.is_empty() && !broken {
            if let Err(e) = sink.write(&mut buf).await {
                // Nobody reads any more. Keep consuming the queues so that builds and
                // sessions never block on a dead stream.
                tracing::info!(error = %e, "output stream closed");
                broken = true;
            }
        }
        buf.clear();
        if stopping || (!switch_open && current.is_none()) {
            break;
        }
        let next = {
            let (control, data) = match &mut current {
                Some(rx) => (Some(&mut rx.control), Some(&mut rx.data)),
                None => (None, None),
            };
            tokio::select! {
                biased;
                _ = &mut stop => Next::Stop,
                rx = switch.recv(), if switch_open => Next::Switch(rx),
                Some(msg) = recv(control) => Next::Message(Some(msg)),
                msg = recv(data) => Next::Message(msg),
            }
        };
        match next {
            Next::Stop => stopping = true,
            Next::Switch(Some(Some(rx))) => {
                current = Some(rx);
                buf.extend_from_slice(PREAMBLE);
                continue;
            }
            Next::Switch(Some(None)) => {
                current = None;
                continue;
            }
            Next::Switch(None) => switch_open = false,
            Next::Message(Some(msg)) => push(&mut buf, &msg),
            // Every sender of the data queue is gone: the session and its builds ended.
            Next::Message(None) => {
                if let Some(rx) = &mut current {
                    gather(rx, &mut buf, usize::MAX);
                }
                current = None;
                continue;
            }
        }
        if let Some(rx) = &mut current {
            gather(rx, &mut buf, if stopping { usize::MAX } else { BATCH_BYTES });
        }
    }
    if !broken {
        if let Err(e) = sink.close().await {
            tracing::debug!(error = %e, "closing the output stream");
        }
    }
}

async fn recv(rx: Option<&mut mpsc::Receiver<DaemonMessage>>) -> Option<DaemonMessage> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Appends whatever is queued (control first) until `limit` bytes are gathered.
fn gather(rx: &mut OutboxRx, buf: &mut Vec<u8>, limit: usize) {
    while buf.len() < limit {
        match rx.control.try_recv().or_else(|_| rx.data.try_recv()) {
            Ok(msg) => push(buf, &msg),
            Err(_) => break,
        }
    }
}

fn push(buf: &mut Vec<u8>, msg: &DaemonMessage) {
    // Every message the daemon builds fits a frame; an encoding failure is logged there.
    let _ = push_frame(buf, msg);
}
