//! Reaching a daemon: spawn one (`tether serve --exit-on-eof`, the default), or run a
//! `--via` command (`kubectl attach -i`, `ssh host tether serve`, `runc run`) and speak
//! over its stdin/stdout; then the handshake.
//!
//! The spawned process gets its own process group, so a Ctrl-C at the terminal reaches
//! only this client, which then cancels the build through the protocol instead of
//! losing its connection. Through `--via`, the client first sends
//! [`tether_protocol::SYNC_PAD_LEN`] zero bytes: the stream may be one that an earlier
//! client abandoned in the middle of a frame (PROTOCOL.md, "Takeover").

use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tether_protocol::{
    self as wire, check_welcome, ClientMessage, DaemonMessage, Hello, Welcome, PREAMBLE, SYNC_PAD_LEN,
};
use tokio::io::{AsyncWrite, AsyncWriteExt};
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

/// An open session with a daemon.
pub struct Connection {
    pub inbound: mpsc::Receiver<Inbound<DaemonMessage>>,
    pub writer: FrameWriter,
    pub welcome: Welcome,
    /// Sends our heartbeats; ended with the connection.
    pinger: Option<tokio::task::JoinHandle<()>>,
    /// The spawned daemon or `--via` command; `None` on a socket.
    child: Option<Child>,
    /// Whether `child` is a `--via` command (see [`VIA_CLOSE_TIMEOUT`]).
    via: bool,
    what: String,
}

type Stream = Box<dyn AsyncWrite + Send + Unpin>;

/// Sends frames to the daemon. Cheap to clone: the heartbeat task shares it, so that a
/// client busy writing its own output (or blocked on it) still shows it is alive.
#[derive(Clone)]
pub struct FrameWriter {
    stdin: std::sync::Arc<tokio::sync::Mutex<Stream>>,
}

impl FrameWriter {
    fn new(stdin: Stream) -> FrameWriter {
        FrameWriter {
            stdin: std::sync::Arc::new(tokio::sync::Mutex::new(stdin)),
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
        .stderr(Stdio::inherit())
        .process_group(0);
    let mut child = cmd.spawn().with_context(|| format!("cannot start {what}"))?;
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        bail!("{what} has no stdio pipes");
    };
    let (tx, inbound) = mpsc::channel(64);
    tokio::spawn(read_async::<DaemonMessage>(stdout, tx));
    handshake(inbound, Box::new(stdin), Some(child), what, via).await
}

/// Opens the session: preamble and Hello, then waits for Welcome. A `via` stream may be
/// one an earlier client abandoned, so it starts with the takeover pad.
async fn handshake(
    inbound: mpsc::Receiver<Inbound<DaemonMessage>>,
    stdin: Box<dyn AsyncWrite + Send + Unpin>,
    child: Option<Child>,
    what: String,
    via: bool,
) -> anyhow::Result<Connection> {
    let writer = FrameWriter::new(stdin);
    let mut opening = if via { vec![0u8; SYNC_PAD_LEN] } else { Vec::new() };
    opening.extend_from_slice(PREAMBLE);
    push_frame(
        &mut opening,
        &ClientMessage::Hello(Hello {
            protocol: wire::PROTOCOL_VERSION,
            client_version: CLIENT_VERSION.to_owned(),
            capabilities: Vec::new(),
        }),
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
