//! One connection (a byte stream both ways) and the sessions that follow each other on
//! it: the reader loop and the single writer.
//!
//! The daemon's stdin can carry many sessions one after another (`kubectl attach` gives
//! no EOF between clients); each preamble and Hello starts a new one. The writer owns
//! the stream's output: it writes a preamble at start and whenever a session starts, then
//! that session's queues, control before data, batching frames into large writes. When a
//! new session starts, the old session's queues are dropped: their senders see the
//! session gone, and nothing of the old session follows the new preamble.
//!
//! Heartbeats: the reader pings the session's client every heartbeat interval, and a
//! client that sent nothing at all for the heartbeat timeout is gone: on a socket the
//! connection is closed; on stdin the session ends (its subscriptions with it) and the
//! stream waits for the next client's preamble. Builds are never touched.
//!
//! # The stdin stream is one channel for many clients
//!
//! Under `kubectl attach` every client sees all the daemon writes, and every client's
//! bytes land in the one stdin: two clients writing at once would cut each other's
//! frames. So on stdin one session at a time *holds* the stream, and everyone can see
//! which: the daemon announces it ([`DaemonMessage::Channel`], each preceded by a
//! preamble so that a client that just attached finds it) when a session starts or
//! ends and every [`BEACON`] while one is held. A client that finds the stream held
//! writes nothing and waits (PROTOCOL.md, "The stdin stream"); one that writes a Hello
//! anyway while a greeted session holds the stream is refused (the `Channel` names it)
//! unless it asks to take the stream over. A holder that is done says `Goodbye`, and the
//! stream is free at once; one that died is dropped at the heartbeat timeout. While no
//! session holds the stream, the daemon writes nothing to it: no heartbeats, no output,
//! nothing for a container log to keep.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tether_protocol::{self as wire, ClientMessage, DaemonMessage, ErrorKind, PREAMBLE};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};

use super::outbox::{outbox, OutboxRx};
use super::session::Session;
use super::Daemon;
use crate::wire::{push_frame, Inbound, Sink};

/// Frames are gathered into writes of about this size when many are queued.
const BATCH_BYTES: usize = 256 * 1024;

/// How often the daemon says who holds its stdin stream while a session holds it. A
/// client that attached reads this long, and a little more, before it concludes that
/// the stream is free (PROTOCOL.md, "The stdin stream").
pub const BEACON: Duration = Duration::from_millis(wire::CHANNEL_BEACON_MS);

/// What the reader tells the writer.
enum WriterCmd {
    /// A new session: a preamble, then its queues.
    Start(OutboxRx),
    /// The session ended: its queues are dropped.
    End,
    /// A message for whoever reads the stream, outside any session: a preamble, then it.
    Broadcast(DaemonMessage),
}

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
        let (switch_tx, switch_rx) = mpsc::channel(4);
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
    switch_tx: mpsc::Sender<WriterCmd>,
    transport: Transport,
) {
    let stdio = transport == Transport::Stdio;
    let mut session: Option<Session> = None;
    // A preamble came while a greeted session held the stdin stream: the Hello that
    // follows decides whether a new session starts (a takeover) or is refused.
    let mut pending = false;
    let mut heard = Instant::now();
    let mut ping = tokio::time::interval_at(Instant::now() + daemon.heartbeat, daemon.heartbeat);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut beacon = tokio::time::interval_at(Instant::now() + BEACON, BEACON);
    beacon.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut nonce = 0u64;
    let mut shutdown = daemon.shutdown.subscribe();
    let mut told_shutdown = false;
    // A daemon whose stdin is a fresh stream (a `--via` command that started it: `ssh
    // host tether serve`, `runc run`) says at once that nobody holds it, so its first
    // client need not wait to find out.
    if stdio && switch_tx.send(channel(None, None)).await.is_err() {
        return;
    }
    loop {
        let deadline = if session.is_some() {
            heard + daemon.heartbeat_timeout
        } else {
            never()
        };
        let holding = stdio && session.as_ref().is_some_and(|s| s.holder().is_some());
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
            _ = beacon.tick(), if holding => {
                let holder = session.as_ref().and_then(|s| s.holder().cloned());
                if switch_tx.send(channel(holder, None)).await.is_err() {
                    break;
                }
                continue;
            }
            _ = sleep_until(deadline) => {
                let old = session.take().map(|s| s.id);
                tracing::warn!(session = ?old, silent = ?daemon.heartbeat_timeout, "client sent nothing within the heartbeat timeout; dropping its session");
                match transport {
                    Transport::Socket => break,
                    Transport::Stdio => {
                        pending = false;
                        if switch_tx.send(WriterCmd::End).await.is_err()
                            || switch_tx.send(channel(None, None)).await.is_err()
                        {
                            break;
                        }
                        continue;
                    }
                }
            }
        };
        heard = Instant::now();
        match item {
            Inbound::Preamble if stdio && session.as_ref().is_some_and(|s| s.holder().is_some()) => {
                pending = true;
            }
            Inbound::Preamble => {
                if !start_session(&daemon, &mut session, &switch_tx, &mut ping).await {
                    break;
                }
            }
            Inbound::Message(ClientMessage::Hello(hello)) if pending => {
                pending = false;
                let holder = session.as_ref().and_then(|s| s.holder().cloned());
                if hello.takeover() || holder.is_none() {
                    if let Some(h) = &holder {
                        tracing::info!(
                            holder = format!("{:016x}", h.session),
                            by = format!("{:016x}", hello.session().unwrap_or(0)),
                            "the stdin stream is taken over"
                        );
                    }
                    if !start_session(&daemon, &mut session, &switch_tx, &mut ping).await {
                        break;
                    }
                    if let Some(s) = &mut session {
                        s.handle(ClientMessage::Hello(hello)).await;
                    }
                } else {
                    tracing::info!(
                        holder = ?holder.as_ref().map(|h| format!("{:016x}", h.session)),
                        refused = format!("{:016x}", hello.session().unwrap_or(0)),
                        "a client's Hello refused: another session holds the stdin stream"
                    );
                    if switch_tx.send(channel(holder, hello.session())).await.is_err() {
                        break;
                    }
                }
            }
            Inbound::Message(ClientMessage::Goodbye) => {
                if let Some(old) = session.take() {
                    tracing::debug!(session = old.id, "client said goodbye");
                }
                pending = false;
                if !stdio {
                    break;
                }
                if switch_tx.send(WriterCmd::End).await.is_err() || switch_tx.send(channel(None, None)).await.is_err() {
                    break;
                }
            }
            // Frames after a pending preamble belong to the holder until the Hello:
            // a client's first message after its preamble is its Hello.
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

/// A fresh session id (for logs; sub-sessions draw from the same counter).
pub fn next_session_id() -> u64 {
    NEXT_SESSION.fetch_add(1, Ordering::Relaxed)
}

/// A `Channel` announcement for the writer.
fn channel(holder: Option<wire::Holder>, refused: Option<u64>) -> WriterCmd {
    WriterCmd::Broadcast(DaemonMessage::Channel(wire::ChannelState { holder, refused }))
}

/// Starts a new session on the stream, ending the one before; false once the writer is
/// gone.
async fn start_session(
    daemon: &Arc<Daemon>,
    session: &mut Option<Session>,
    switch_tx: &mpsc::Sender<WriterCmd>,
    ping: &mut tokio::time::Interval,
) -> bool {
    let (out, rx) = outbox();
    let id = next_session_id();
    if let Some(old) = session.replace(Session::new(id, Arc::clone(daemon), out)) {
        tracing::info!(
            old = old.id,
            new = id,
            "new session on the same stream; the old one ends"
        );
    }
    ping.reset();
    switch_tx.send(WriterCmd::Start(rx)).await.is_ok()
}

enum Next {
    Stop,
    /// `None`: the reader is gone.
    Cmd(Option<WriterCmd>),
    Message(Option<DaemonMessage>),
}

async fn write_loop(mut sink: Sink, mut cmds: mpsc::Receiver<WriterCmd>, mut stop: oneshot::Receiver<()>) {
    let mut broken = false;
    let mut current: Option<OutboxRx> = None;
    let mut cmds_open = true;
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
        if stopping || (!cmds_open && current.is_none()) {
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
                cmd = cmds.recv(), if cmds_open => Next::Cmd(cmd),
                Some(msg) = recv(control) => Next::Message(Some(msg)),
                msg = recv(data) => Next::Message(msg),
            }
        };
        match next {
            Next::Stop => stopping = true,
            Next::Cmd(Some(WriterCmd::Start(rx))) => {
                current = Some(rx);
                buf.extend_from_slice(PREAMBLE);
                continue;
            }
            Next::Cmd(Some(WriterCmd::End)) => {
                current = None;
                continue;
            }
            Next::Cmd(Some(WriterCmd::Broadcast(msg))) => {
                buf.extend_from_slice(PREAMBLE);
                push(&mut buf, &msg);
                continue;
            }
            Next::Cmd(None) => cmds_open = false,
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
