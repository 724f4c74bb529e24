//! `tether relay --via CMD --listen PATH`: one long-lived process that holds the single
//! stream to a daemon (typically `kubectl attach -i` to its stdin) and serves any number
//! of local clients on a Unix socket, as Jenkins remoting multiplexes a build's channels
//! over one agent connection.
//!
//! Each local client is a full session of its own (run, attach, logs, ps, cancel,
//! shells, uploads, downloads, holds), carried through the relay's one session on the
//! daemon as a *sub-session* (PROTOCOL.md, "Relays"): the relay wraps each frame a local
//! client writes into `Sub { sub, message }`, and writes the payload of each `Sub` the
//! daemon sends for that client back to it as a frame. It reads no message of its
//! clients': they speak to the daemon as they would over its socket
//! (`tether run --socket PATH`). So parallel steps share one attach stream, and a step
//! costs a local socket connection instead of a `kubectl attach` of its own.
//!
//! When the stream to the daemon breaks (an API server restart), the relay closes every
//! local connection and connects again with backoff; its clients reconnect to it (their
//! own `--reconnect`) and resume every build from the last byte they printed: nothing
//! lost, nothing repeated. A local client that does not read what the relay has for it
//! ([`LOCAL_QUEUE`] messages) is disconnected the same way, rather than holding up the
//! others. SIGINT or SIGTERM end the relay (the daemon is told `Goodbye`, and its stdin
//! stream is free for the next client).
//!
//! The socket is the relay user's alone (mode 0600, peer uid checked).

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use tether_protocol::{self as wire, ClientMessage, DaemonMessage, Decoded, FrameDecoder, PREAMBLE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};

use super::backoff::Backoff;
use super::connect::{connect, Connection, FrameWriter};
use super::signals::{self, Signals};
use crate::cli::RelayArgs;
use crate::wire::Inbound;

/// Messages queued for one local client before it counts as not reading.
pub const LOCAL_QUEUE: usize = 256;

/// Why serving one upstream connection ended.
enum End {
    Signal(i32),
    Lost(anyhow::Error),
}

pub async fn relay(args: RelayArgs) -> anyhow::Result<i32> {
    if args.connect.via.is_none() && args.connect.socket.is_none() {
        bail!("say which daemon to relay: --via CMD (e.g. 'kubectl attach -i POD -c CTR') or --socket PATH");
    }
    let mut signals = Signals::new()?;
    let mut backoff = Backoff::default();
    let mut next_sub: u32 = 1;
    // Bound once the daemon was first reached: a socket that exists is a relay that
    // works (later, while it reconnects, its clients wait in the listen queue).
    let mut listener: Option<UnixListener> = None;
    loop {
        let conn = tokio::select! {
            conn = connect(&args.connect) => conn,
            sig = signals.recv() => return Ok(signals::exit_code(sig)),
        };
        let mut conn = match conn {
            Ok(conn) => conn,
            Err(e) => {
                let wait = backoff.next_pause();
                tracing::warn!("cannot reach the daemon: {e:#}; trying again in {wait:?}");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue,
                    sig = signals.recv() => return Ok(signals::exit_code(sig)),
                }
            }
        };
        backoff.reset();
        let listening = match &listener {
            Some(l) => l,
            None => match listen(&args.listen) {
                Ok(l) => listener.insert(l),
                Err(e) => {
                    conn.leave().await;
                    return Err(e);
                }
            },
        };
        tracing::info!(listen = %args.listen.display(), "relaying {}", conn.describe());
        match serve(&mut conn, listening, &mut signals, &mut next_sub, &args).await {
            End::Signal(sig) => {
                conn.leave().await;
                let _ = std::fs::remove_file(&args.listen);
                return Ok(signals::exit_code(sig));
            }
            End::Lost(e) => {
                tracing::warn!("{}: {e:#}; its clients reconnect once it is back", conn.describe());
                conn.close().await;
            }
        }
    }
}

/// Binds the relay's socket, replacing a stale one; only this user may use it.
fn listen(path: &Path) -> anyhow::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            bail!("{} exists and is not a socket", path.display());
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("a relay (or daemon) already listens on {}", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    Ok(listener)
}

/// Serves local clients through `conn` until it breaks or a signal comes.
async fn serve(
    conn: &mut Connection,
    listener: &UnixListener,
    signals: &mut Signals,
    next_sub: &mut u32,
    args: &RelayArgs,
) -> End {
    let mut locals: HashMap<u32, mpsc::Sender<wire::Bytes>> = HashMap::new();
    let (ended_tx, mut ended) = mpsc::unbounded_channel::<u32>();
    let own_uid = nix::unistd::geteuid().as_raw();
    let silence = args
        .connect
        .heartbeat_timeout
        .max(Duration::from_millis(u64::from(conn.welcome.limits.heartbeat_ms)) * 3);
    let mut heard = Instant::now();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                match stream.peer_cred() {
                    Ok(c) if c.uid() == own_uid => {}
                    _ => {
                        tracing::warn!("a local client of another user was refused");
                        continue;
                    }
                }
                let sub = *next_sub;
                *next_sub = next_sub.wrapping_add(1).max(1);
                let (tx, rx) = mpsc::channel(LOCAL_QUEUE);
                locals.insert(sub, tx);
                tracing::debug!(sub, "local client");
                tokio::spawn(local(sub, stream, rx, conn.writer.clone(), ended_tx.clone()));
            }
            item = conn.inbound.recv() => {
                heard = Instant::now();
                match item {
                    Some(Inbound::Message(DaemonMessage::Sub { sub, message })) => {
                        let full = match locals.get(&sub) {
                            Some(tx) => tx.try_send(message).is_err(),
                            None => false,
                        };
                        if full {
                            tracing::warn!(sub, "a local client does not read what is sent to it; disconnected (it reconnects)");
                            locals.remove(&sub);
                            if let Err(e) = conn.writer.send(&ClientMessage::SubEnd { sub }).await {
                                return End::Lost(e);
                            }
                        }
                    }
                    Some(Inbound::Message(DaemonMessage::SubEnd { sub })) => {
                        locals.remove(&sub);
                    }
                    Some(Inbound::Message(DaemonMessage::Ping { nonce })) => {
                        if let Err(e) = conn.writer.send(&ClientMessage::Pong { nonce }).await {
                            return End::Lost(e);
                        }
                    }
                    Some(Inbound::Message(DaemonMessage::ShuttingDown { reason })) => {
                        tracing::warn!("the daemon is shutting down: {reason}");
                    }
                    Some(Inbound::Message(_) | Inbound::Preamble | Inbound::Corrupt(_) | Inbound::Undecodable(_)) => {}
                    Some(Inbound::Failed(e)) => return End::Lost(e.into()),
                    None | Some(Inbound::Eof(_)) => return End::Lost(anyhow::anyhow!("the connection closed")),
                }
            }
            Some(sub) = ended.recv() => {
                if locals.remove(&sub).is_some() {
                    if let Err(e) = conn.writer.send(&ClientMessage::SubEnd { sub }).await {
                        return End::Lost(e);
                    }
                }
            }
            sig = signals.recv() => return End::Signal(sig),
            _ = sleep_until(heard + silence) => {
                if conn.inbound.is_empty() {
                    return End::Lost(anyhow::anyhow!("the daemon sent nothing for {}", humantime::format_duration(silence)));
                }
                heard = Instant::now();
            }
        }
    }
}

/// One local client: its frames go up wrapped in `Sub`, what comes for it goes down as
/// frames; either side ending ends it (and the relay tells the daemon).
async fn local(
    sub: u32,
    stream: UnixStream,
    mut rx: mpsc::Receiver<wire::Bytes>,
    upstream: FrameWriter,
    ended: mpsc::UnboundedSender<u32>,
) {
    let (mut read, mut write) = stream.into_split();
    let up = async {
        let mut dec = FrameDecoder::new();
        loop {
            let n = match read.read(dec.read_buf()).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            dec.commit(n);
            let mut payloads = Vec::new();
            while let Some(item) = dec.decode() {
                match item {
                    Decoded::Frame(p) if p.len() <= wire::MAX_SUB_PAYLOAD => payloads.push(p.to_vec()),
                    Decoded::Frame(p) => {
                        tracing::warn!(
                            sub,
                            len = p.len(),
                            "a local client's frame is too large to relay; disconnected"
                        );
                        return;
                    }
                    // Its own preamble; damage is the daemon's to report, not ours.
                    Decoded::Preamble | Decoded::Corrupt(_) => {}
                }
            }
            for message in payloads {
                let msg = ClientMessage::Sub {
                    sub,
                    message: wire::Bytes::from(message),
                };
                if upstream.send(&msg).await.is_err() {
                    return;
                }
            }
        }
    };
    let down = async {
        // The relay answers for the daemon: its preamble first.
        if write.write_all(PREAMBLE).await.is_err() {
            return;
        }
        while let Some(message) = rx.recv().await {
            let frame = tether_protocol::frame::frame_bytes(&message);
            if write.write_all(&frame).await.is_err() {
                return;
            }
        }
        let _ = write.shutdown().await;
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
    let _ = ended.send(sub);
}
