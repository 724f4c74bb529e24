//! Reaching a daemon: spawn one (`tether serve --exit-on-eof`, the default), or run a
//! `--via` command (`kubectl attach -i`, `ssh host tether serve`, `runc run`) and speak
//! over its stdin/stdout; then the handshake.
//!
//! The spawned process gets its own process group, so a Ctrl-C at the terminal reaches
//! only this client, which then cancels the build through the protocol instead of
//! losing its connection.
//!
//! Through `--via`, the stream is usually a daemon's stdin shared with other clients
//! (`kubectl attach`: everyone sees all the daemon writes, everyone's bytes land in its
//! one stdin). So the client first listens: while another session holds the stream the
//! daemon says so every half second, and the client writes nothing until it is free (or
//! `--takeover`). Then it sends [`tether_protocol::SYNC_PAD_LEN`] zero bytes (the stream
//! may be one that an earlier client abandoned in the middle of a frame), its preamble
//! and a Hello with its session nonce, and takes for its own only what follows the
//! Welcome that echoes that nonce. When it sees the stream pass to another session, it
//! stops writing at once and reports the connection lost: nothing another session
//! receives is ever taken for its own. It says `Goodbye` when done, which frees the
//! stream for the next client at once. The `--via` command's stderr is not passed on (it
//! carries the daemon's log, shared by every attached client); its last lines are shown
//! only when the command fails before a session began.

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tether_protocol::{
    self as wire, check_welcome, ClientMessage, DaemonMessage, Hello, Welcome, PREAMBLE, SYNC_PAD_LEN,
};
use tokio::io::{AsyncBufReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::cli::ConnectArgs;
use crate::wire::{push_frame, read_async, Inbound};

/// How long the daemon may take to answer Hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a daemon we spawned may take to exit after we closed its stdin (it removes
/// its state on the way out).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a `--via` command may take. Many never exit on their own when their stdin
/// closes (`kubectl attach -i` or `runc run` to a daemon that keeps its container
/// alive), so this is short, and then its whole process group is ended.
const VIA_CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// The client's version, sent in Hello.
pub const CLIENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// How long a client reads a `--via` stream before it concludes that nobody holds it:
/// a little more than two of the daemon's announcements.
const OBSERVE: Duration = Duration::from_millis(wire::CHANNEL_BEACON_MS * 2 + 200);

/// Clients that find a shared stream free at the same moment (several were waiting for
/// it) would all write at once; each first listens a random moment up to this long, and
/// stands back if another's session starts meanwhile.
const TAKE_TURN: Duration = Duration::from_millis(400);

/// How long a Hello on a shared stream waits for its Welcome before it is sent again
/// (another client's bytes may have cut it).
const HELLO_WAIT: Duration = Duration::from_secs(3);

/// How long a client leaving at a signal gives its `--via` command to pass its Goodbye
/// on and exit, before it ends the command's process group.
const LEAVE_GRACE: Duration = Duration::from_millis(200);

/// Lines of a `--via` command's stderr kept for an error message.
const STDERR_LINES: usize = 8;

/// This client's session nonce: one per process, so that after a lost connection the
/// client recognises the session the daemon still thinks it holds as its own.
pub fn session_nonce() -> u64 {
    static NONCE: OnceLock<u64> = OnceLock::new();
    *NONCE.get_or_init(crate::ids::random_u64)
}

/// An open session with a daemon.
pub struct Connection {
    pub inbound: mpsc::Receiver<Inbound<DaemonMessage>>,
    pub writer: FrameWriter,
    pub welcome: Welcome,
    /// Sends our heartbeats; ended with the connection.
    pinger: Option<tokio::task::JoinHandle<()>>,
    /// The spawned daemon or `--via` command; `None` on a socket.
    child: Option<Spawned>,
    /// Whether `child` is a `--via` command (see [`VIA_CLOSE_TIMEOUT`]).
    via: bool,
    what: String,
}

type Stream = Box<dyn AsyncWrite + Send + Unpin>;

/// Sends frames to the daemon. Cheap to clone: the heartbeat task shares it, so that a
/// client busy writing its own output (or blocked on it) still shows it is alive.
#[derive(Clone)]
pub struct FrameWriter {
    stdin: Arc<tokio::sync::Mutex<Stream>>,
    /// Cleared when the stream passed to another session: from then on nothing is
    /// written (our bytes would cut the new holder's frames).
    open: Arc<AtomicBool>,
}

impl FrameWriter {
    fn new(stdin: Stream) -> FrameWriter {
        FrameWriter {
            stdin: Arc::new(tokio::sync::Mutex::new(stdin)),
            open: Arc::new(AtomicBool::new(true)),
        }
    }

    pub async fn send(&self, msg: &ClientMessage) -> anyhow::Result<()> {
        let mut buf = Vec::new();
        push_frame(&mut buf, msg)?;
        self.send_raw(&buf)
            .await
            .context("the connection to the daemon was lost")
    }

    async fn send_raw(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut stdin = self.stdin.lock().await;
        if !self.open.load(Ordering::SeqCst) {
            return Err(std::io::Error::other(
                "the daemon's stdin stream passed to another client",
            ));
        }
        stdin.write_all(bytes).await?;
        stdin.flush().await
    }

    async fn shutdown(&self) {
        let _ = self.stdin.lock().await.shutdown().await;
    }
}

/// Pings the daemon every `every` until the connection fails.
async fn heartbeat(writer: FrameWriter, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut nonce = 0u64;
    loop {
        tick.tick().await;
        nonce += 1;
        if writer.send(&ClientMessage::Ping { nonce }).await.is_err() {
            return;
        }
    }
}

/// Opens a session with an existing daemon: `--via` or `--socket` (or `TETHER_SOCKET`)
/// must say which; a private daemon would have nothing to show.
pub async fn connect_existing(args: &ConnectArgs) -> anyhow::Result<Connection> {
    connect_existing_args(args)?;
    connect(args).await
}

/// Checks that the arguments name an existing daemon.
pub fn connect_existing_args(args: &ConnectArgs) -> anyhow::Result<()> {
    if args.via.is_none() && args.socket.is_none() {
        bail!("say which daemon: --via CMD, --socket PATH or TETHER_SOCKET");
    }
    Ok(())
}

/// Opens a session as the arguments say.
pub async fn connect(args: &ConnectArgs) -> anyhow::Result<Connection> {
    if let Some(path) = &args.socket {
        let stream = UnixStream::connect(path)
            .await
            .with_context(|| format!("cannot connect to the daemon's socket {}", path.display()))?;
        let (read, write) = stream.into_split();
        let (tx, inbound) = mpsc::channel(64);
        tokio::spawn(read_async::<DaemonMessage>(read, tx));
        let what = format!("the daemon on {}", path.display());
        return handshake(inbound, Box::new(write), None, what, false).await;
    }
    let (mut cmd, what, via) = match &args.via {
        Some(via) => {
            let mut cmd = Command::new("sh");
            cmd.arg("-c").arg(via);
            (cmd, format!("--via command {via:?}"), true)
        }
        None => {
            let exe = std::env::current_exe().context("cannot find the tether binary to start a daemon")?;
            let mut cmd = Command::new(exe);
            let level = match args.verbose {
                0 => "warn",
                1 => "info",
                _ => "debug",
            };
            cmd.args(["serve", "--exit-on-eof", "--log-level", level]);
            (cmd, "tether serve".to_owned(), false)
        }
    };
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(if via { Stdio::piped() } else { Stdio::inherit() })
        .process_group(0);
    let mut child = Spawned(cmd.spawn().with_context(|| format!("cannot start {what}"))?);
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        bail!("{what} has no stdio pipes");
    };
    let said = ViaStderr::default();
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(said.clone().collect(stderr));
    }
    let (tx, inbound) = mpsc::channel(64);
    tokio::spawn(read_async::<DaemonMessage>(stdout, tx));
    if !via {
        return handshake(inbound, Box::new(stdin), Some(child), what, false).await;
    }
    shared_handshake(inbound, Box::new(stdin), child, what, args, said).await
}

/// The spawned daemon or `--via` command, leader of its own process group. Dropped while
/// it still runs (the client left in the middle of a handshake, at a signal), its whole
/// group gets SIGTERM: nothing it started outlives the client.
struct Spawned(Child);

impl std::ops::Deref for Spawned {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Spawned {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let (Ok(None), Some(pid)) = (self.0.try_wait(), self.0.id()) {
            let group = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGTERM);
        }
    }
}

/// The last lines a `--via` command wrote to its stderr, for an error message. Lines of
/// a tether daemon's log (a daemon's stderr reaches every client attached to it) are
/// left out: they are not this client's.
#[derive(Clone, Default)]
struct ViaStderr(Arc<Mutex<std::collections::VecDeque<String>>>);

impl ViaStderr {
    async fn collect(self, stderr: tokio::process::ChildStderr) {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::debug!(line = %line.chars().take(200).collect::<String>(), "--via stderr");
            if is_daemon_log_line(&line) || line.trim().is_empty() {
                continue;
            }
            let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if kept.len() == STDERR_LINES {
                kept.pop_front();
            }
            kept.push_back(line.chars().take(200).collect());
        }
    }

    /// `": LINE | LINE"`, or nothing.
    fn said(&self) -> String {
        let kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if kept.is_empty() {
            String::new()
        } else {
            format!("; it said: {}", kept.iter().cloned().collect::<Vec<_>>().join(" | "))
        }
    }
}

/// A line of a tether daemon's log: `2026-12-06T03:21:09.123456Z  INFO ...`.
fn is_daemon_log_line(line: &str) -> bool {
    let mut words = line.split_whitespace();
    let (Some(time), Some(level)) = (words.next(), words.next()) else {
        return false;
    };
    time.len() > 20
        && time.as_bytes()[4] == b'-'
        && time.ends_with('Z')
        && matches!(level, "TRACE" | "DEBUG" | "INFO" | "WARN" | "ERROR")
}

/// How the client found a shared stream before writing to it.
enum Found {
    /// Nobody holds it: the daemon said so (`announced`), or said nothing for
    /// [`OBSERVE`].
    Free { announced: bool },
    /// The daemon still thinks our own earlier session (a connection that broke) holds
    /// it, or the client takes it over (`--takeover`).
    OursStill,
}

/// Opens a session on a stream other clients may share: waits until nobody holds it,
/// then the handshake; refused or beaten to it, it waits again.
async fn shared_handshake(
    mut inbound: mpsc::Receiver<Inbound<DaemonMessage>>,
    stdin: Box<dyn AsyncWrite + Send + Unpin>,
    child: Spawned,
    what: String,
    args: &ConnectArgs,
    said: ViaStderr,
) -> anyhow::Result<Connection> {
    let nonce = session_nonce();
    let writer = FrameWriter::new(stdin);
    let mut conn = Connection {
        inbound: mpsc::channel(1).1,
        writer,
        welcome: placeholder_welcome(),
        pinger: None,
        child: Some(child),
        via: true,
        what,
    };
    let deadline = tokio::time::Instant::now() + args.wait_channel;
    // The daemon must answer something within this long (it may still be starting).
    let answer_by = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let result: anyhow::Result<Welcome> = async {
        loop {
            let found = if args.takeover {
                Found::OursStill
            } else {
                wait_until_free(&mut inbound, nonce, deadline, &conn.what, &said).await?
            };
            // Completing a frame an earlier client may have left half-written only when
            // nobody said the stream was free: after a Goodbye it ends at a frame, and a
            // short opening goes into the stream in one piece, never inside another's.
            let mut opening = match found {
                Found::Free { announced: true } => Vec::new(),
                _ => vec![0u8; SYNC_PAD_LEN],
            };
            opening.extend_from_slice(PREAMBLE);
            push_frame(
                &mut opening,
                &ClientMessage::Hello(Hello::new(CLIENT_VERSION, nonce, matches!(found, Found::OursStill))),
            )?;
            // A command that died at once closed its stdin; the answer below says why.
            let _ = conn.writer.send_raw(&opening).await;
            match tokio::time::timeout(HELLO_WAIT, await_own_welcome(&mut inbound, nonce, &conn.what, &said)).await {
                Ok(Ok(Some(welcome))) => return Ok(welcome),
                // Refused, or another client's Hello got there first: wait again.
                Ok(Ok(None)) => continue,
                Ok(Err(e)) => return Err(e),
                // Our Hello may have been cut by another client's bytes: again.
                Err(_) if tokio::time::Instant::now() < answer_by => continue,
                Err(_) => bail!(
                    "no answer from {} within {:?}{}",
                    conn.what,
                    HANDSHAKE_TIMEOUT,
                    said.said()
                ),
            }
        }
    }
    .await;
    match result {
        Ok(welcome) => {
            let (tx, filtered) = mpsc::channel(64);
            tokio::spawn(own_session(inbound, tx, nonce, conn.writer.open.clone()));
            conn.inbound = filtered;
            let every = Duration::from_millis(u64::from(welcome.limits.heartbeat_ms.max(100)));
            conn.welcome = welcome;
            conn.pinger = Some(tokio::spawn(heartbeat(conn.writer.clone(), every)));
            Ok(conn)
        }
        Err(e) => {
            conn.abort().await;
            Err(e)
        }
    }
}

/// Reads a shared stream, writing nothing, until nobody holds it: no announcement for
/// [`OBSERVE`], or one that says so; then a random moment more (up to [`TAKE_TURN`]) in
/// which no other session may start.
async fn wait_until_free(
    inbound: &mut mpsc::Receiver<Inbound<DaemonMessage>>,
    nonce: u64,
    deadline: tokio::time::Instant,
    what: &str,
    said: &ViaStderr,
) -> anyhow::Result<Found> {
    let mut quiet_until = tokio::time::Instant::now() + OBSERVE;
    // Set once the stream looks free: the turn ends then, unless someone starts.
    let mut turn: Option<(tokio::time::Instant, bool)> = None;
    let mut told = false;
    loop {
        let wake = match turn {
            Some((at, _)) => at,
            None => quiet_until,
        };
        let item = tokio::select! {
            item = inbound.recv() => item,
            _ = tokio::time::sleep_until(wake) => match turn {
                Some((_, announced)) => return Ok(Found::Free { announced }),
                None => {
                    turn = Some((tokio::time::Instant::now() + random_below(TAKE_TURN), false));
                    continue;
                }
            },
            _ = tokio::time::sleep_until(deadline) => bail!(
                "another client held the daemon's stdin stream for longer than --wait-channel; \
                 --takeover takes it (for a holder known to be dead), and a private channel \
                 (`--via 'kubectl exec -i POD -c CTR -- tether dial-stdio --socket PATH'`) needs no waiting"
            ),
        };
        let holder = match item {
            Some(Inbound::Message(DaemonMessage::Channel(state))) => match state.holder {
                None => {
                    if turn.is_none() {
                        turn = Some((tokio::time::Instant::now() + random_below(TAKE_TURN), true));
                    }
                    continue;
                }
                Some(h) if h.session == nonce => return Ok(Found::OursStill),
                Some(h) => Some(h),
            },
            // Another session started: it holds the stream now.
            Some(Inbound::Message(DaemonMessage::Welcome(w))) if w.session != nonce => None,
            Some(Inbound::Message(_) | Inbound::Preamble | Inbound::Corrupt(_) | Inbound::Undecodable(_)) => continue,
            None | Some(Inbound::Eof(_) | Inbound::Failed(_)) => {
                bail!("{what} ended before the daemon answered{}", said.said())
            }
        };
        turn = None;
        quiet_until = tokio::time::Instant::now() + OBSERVE;
        if let (Some(h), false) = (holder, told) {
            told = true;
            eprintln!(
                "tether: the daemon's stdin stream is held by another client ({}, session {:016x}) since {}; \
                 waiting for it (--takeover takes it now)",
                h.client,
                h.session,
                clock(h.since_ms)
            );
        }
    }
}

/// A random duration below `limit`.
fn random_below(limit: Duration) -> Duration {
    Duration::from_nanos(crate::ids::random_u64() % (limit.as_nanos().max(1) as u64))
}

/// `HH:MM:SS UTC` of a time in milliseconds since the epoch.
pub fn clock(ms: u64) -> String {
    let secs = ms / 1000 % 86400;
    format!("{:02}:{:02}:{:02} UTC", secs / 3600, secs / 60 % 60, secs % 60)
}

/// Waits for the Welcome that echoes `nonce`; `None` when this Hello was refused or
/// another client's session started instead (the caller waits for the stream again).
async fn await_own_welcome(
    inbound: &mut mpsc::Receiver<Inbound<DaemonMessage>>,
    nonce: u64,
    what: &str,
    said: &ViaStderr,
) -> anyhow::Result<Option<Welcome>> {
    loop {
        match inbound.recv().await {
            Some(Inbound::Message(DaemonMessage::Welcome(w))) if w.session == nonce => {
                check_welcome(&w, CLIENT_VERSION)?;
                tracing::debug!(daemon = %w.daemon_version, running = w.builds.len(), "connected");
                return Ok(Some(w));
            }
            Some(Inbound::Message(DaemonMessage::Welcome(_))) => return Ok(None),
            Some(Inbound::Message(DaemonMessage::Channel(state))) if state.refused == Some(nonce) => return Ok(None),
            // Only a version mismatch is sure to answer a Hello: any other error on a
            // shared stream may be another session's.
            Some(Inbound::Message(DaemonMessage::Error(e))) if e.kind == wire::ErrorKind::VersionMismatch => {
                bail!("{}", e.message)
            }
            Some(_) => {}
            None => bail!("{what} ended before the daemon answered{}", said.said()),
        }
    }
}

/// Passes on what belongs to session `nonce`, and ends the connection (with a reason)
/// when the stream passes to another session, closing `open` first.
async fn own_session(
    mut raw: mpsc::Receiver<Inbound<DaemonMessage>>,
    tx: mpsc::Sender<Inbound<DaemonMessage>>,
    nonce: u64,
    open: Arc<AtomicBool>,
) {
    while let Some(item) = raw.recv().await {
        let lost = match &item {
            Inbound::Message(DaemonMessage::Welcome(w)) if w.session != nonce => Some(format!(
                "another client (session {:016x}) took over the daemon's stdin stream",
                w.session
            )),
            Inbound::Message(DaemonMessage::Channel(state)) => match &state.holder {
                Some(h) if h.session == nonce => continue,
                Some(h) => Some(format!(
                    "another client ({}, session {:016x}) took over the daemon's stdin stream",
                    h.client, h.session
                )),
                None => Some("the daemon ended this session on its stdin stream".to_owned()),
            },
            Inbound::Preamble => continue,
            _ => None,
        };
        if let Some(why) = lost {
            open.store(false, Ordering::SeqCst);
            tracing::debug!("{why}");
            let _ = tx.send(Inbound::Failed(std::io::Error::other(why))).await;
            return;
        }
        if tx.send(item).await.is_err() {
            return;
        }
    }
}

/// Opens the session: preamble and Hello, then waits for Welcome. A `via` stream may be
/// one an earlier client abandoned, so it starts with the takeover pad.
async fn handshake(
    inbound: mpsc::Receiver<Inbound<DaemonMessage>>,
    stdin: Box<dyn AsyncWrite + Send + Unpin>,
    child: Option<Spawned>,
    what: String,
    via: bool,
) -> anyhow::Result<Connection> {
    let writer = FrameWriter::new(stdin);
    let mut opening = if via { vec![0u8; SYNC_PAD_LEN] } else { Vec::new() };
    opening.extend_from_slice(PREAMBLE);
    push_frame(
        &mut opening,
        &ClientMessage::Hello(Hello::new(CLIENT_VERSION, session_nonce(), false)),
    )?;
    // A daemon that died at once closes its stdin; the handshake below says why.
    let _ = writer.send_raw(&opening).await;

    let mut conn = Connection {
        inbound,
        writer,
        welcome: placeholder_welcome(),
        pinger: None,
        child,
        via,
        what,
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.await_welcome()).await {
        Ok(Ok(welcome)) => {
            let every = Duration::from_millis(u64::from(welcome.limits.heartbeat_ms.max(100)));
            conn.welcome = welcome;
            conn.pinger = Some(tokio::spawn(heartbeat(conn.writer.clone(), every)));
            Ok(conn)
        }
        Ok(Err(e)) => {
            conn.abort().await;
            Err(e)
        }
        Err(_) => {
            conn.abort().await;
            Err(anyhow!("no answer from {} within {:?}", conn.what, HANDSHAKE_TIMEOUT))
        }
    }
}

fn placeholder_welcome() -> Welcome {
    Welcome {
        protocol: 0,
        daemon_version: String::new(),
        capabilities: Vec::new(),
        limits: wire::Limits {
            max_payload: 0,
            max_chunk: 0,
            stdin_window: 0,
            heartbeat_ms: 0,
            upload_window: 0,
        },
        builds: Vec::new(),
        session: 0,
    }
}

impl Connection {
    async fn await_welcome(&mut self) -> anyhow::Result<Welcome> {
        loop {
            let Some(item) = self.inbound.recv().await else {
                bail!("{} closed the connection", self.what);
            };
            match item {
                Inbound::Message(DaemonMessage::Welcome(w)) => {
                    check_welcome(&w, CLIENT_VERSION)?;
                    tracing::debug!(daemon = %w.daemon_version, running = w.builds.len(), "connected");
                    return Ok(w);
                }
                // A damage report that belongs to the stream's previous session (an
                // abandoned frame can hold a preamble, §9) is not an answer to us.
                Inbound::Message(DaemonMessage::Error(e)) if e.kind != wire::ErrorKind::Protocol => {
                    bail!("{}", e.message)
                }
                // Replies to an earlier client on a taken-over stream, pad complaints.
                Inbound::Message(_) | Inbound::Preamble | Inbound::Corrupt(_) | Inbound::Undecodable(_) => {}
                Inbound::Eof(_) | Inbound::Failed(_) => {
                    let Some(child) = &mut self.child else {
                        bail!("{} closed the connection before answering", self.what);
                    };
                    let status = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
                    match status {
                        Ok(Ok(st)) => bail!("{} ended before the daemon answered ({st})", self.what),
                        _ => bail!("{} closed its output before the daemon answered", self.what),
                    }
                }
            }
        }
    }

    /// Sends `msg` and waits for the reply to request `req` (an `Error` with that `req`
    /// becomes an error), skipping anything else.
    pub async fn request(&mut self, msg: &ClientMessage, req: wire::RequestId) -> anyhow::Result<DaemonMessage> {
        self.writer.send(msg).await?;
        loop {
            let Some(item) = self.inbound.recv().await else {
                bail!("{} closed the connection", self.what);
            };
            match item {
                Inbound::Message(DaemonMessage::Error(e)) if e.req == Some(req) => bail!("{}", e.message),
                Inbound::Message(m @ (DaemonMessage::Builds { .. } | DaemonMessage::Ack { .. })) => return Ok(m),
                Inbound::Message(DaemonMessage::Ping { nonce }) => {
                    self.writer.send(&ClientMessage::Pong { nonce }).await?
                }
                Inbound::Eof(_) | Inbound::Failed(_) => bail!("{} closed the connection", self.what),
                _ => {}
            }
        }
    }

    /// A short description of what we are connected through.
    pub fn describe(&self) -> &str {
        &self.what
    }

    /// Ends the session: closes the daemon's stdin (or the socket) and waits for the
    /// spawned process, if any (bounded); a `--via` command still running then is ended
    /// with its whole process group (SIGTERM, then SIGKILL), so nothing it started
    /// (`sh -c` runs `runc`/`kubectl` as a child) is left behind.
    pub async fn close(self) {
        let Connection {
            writer,
            child,
            what,
            via,
            pinger,
            ..
        } = self;
        if let Some(p) = pinger {
            p.abort();
            let _ = p.await;
        }
        // Frees a shared stream for the next client at once (ignored when it passed to
        // another client already: nothing is written then).
        let _ = writer.send(&ClientMessage::Goodbye).await;
        writer.shutdown().await;
        drop(writer);
        let Some(mut child) = child else { return };
        let limit = if via { VIA_CLOSE_TIMEOUT } else { CLOSE_TIMEOUT };
        match tokio::time::timeout(limit, child.wait()).await {
            Ok(Ok(st)) if !st.success() => tracing::debug!(%st, "{what} exited"),
            Ok(_) => {}
            Err(_) if via => {
                tracing::debug!("{what} still runs after its stdin closed; ending its process group");
                if let Some(pid) = child.id() {
                    let group = nix::unistd::Pid::from_raw(pid as i32);
                    let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGTERM);
                    if tokio::time::timeout(VIA_CLOSE_TIMEOUT, child.wait()).await.is_err() {
                        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
                    }
                }
                let _ = child.wait().await;
            }
            Err(_) => {
                tracing::warn!("{what} did not exit after its stdin closed; killing it");
                let _ = child.kill().await;
            }
        }
    }

    /// Ends the session without waiting for the spawned daemon or `--via` command (a
    /// client leaving at a signal): `Goodbye`, its stdin closed, then SIGTERM to its
    /// process group, which it ends on its own (a spawned daemon cancels its builds).
    pub async fn leave(self) {
        let Connection {
            writer, pinger, child, ..
        } = self;
        if let Some(p) = pinger {
            p.abort();
        }
        let goodbye = async {
            let _ = writer.send(&ClientMessage::Goodbye).await;
            writer.shutdown().await;
        };
        let _ = tokio::time::timeout(Duration::from_millis(100), goodbye).await;
        // A `--via` command (kubectl) passes the Goodbye on and exits once its stdin
        // closed: a moment for that, then `Spawned`'s drop signals the group.
        if let Some(mut child) = child {
            let _ = tokio::time::timeout(LEAVE_GRACE, child.wait()).await;
        }
    }

    async fn abort(&mut self) {
        if let Some(p) = self.pinger.take() {
            p.abort();
        }
        if let Some(child) = &mut self.child {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }
}
