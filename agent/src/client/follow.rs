//! Following one build over a connection that may break: the shared loop of `run`,
//! `attach` and `logs`.
//!
//! The client remembers the build-wide position after the last byte it printed. When
//! the stream breaks or the daemon goes silent past the heartbeat timeout, and
//! reconnecting is on, it connects again (backoff from 100 ms doubling to 5 s, with
//! jitter) and asks for the build from that position: nothing is printed twice, nothing
//! is missed, and the exit code is the build's. `--reconnect-timeout` counts from the
//! first failure until a connection makes progress again (the daemon answers for the
//! build), so a daemon that accepts connections and drops them at once cannot keep the
//! client for longer. A `run` whose build had not been confirmed yet sends its `Run`
//! again with the same id, which the daemon answers by following the build if it was
//! started after all: a retry never runs a build twice.
//!
//! SIGINT, SIGTERM and SIGHUP end the client within a second in every state. A `run`
//! whose build started asks the daemon to cancel it first (a second Ctrl-C forces) and
//! waits for its end at most [`LEAVE_WAIT`]; `attach` and `logs` only watch, and leave
//! at once.

use std::io::Read;
use std::os::fd::AsFd;
use std::time::Duration;

use anyhow::anyhow;
use tether_protocol::{self as wire, BuildId, ClientMessage, DaemonMessage, ErrorKind, RunSpec};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};

use super::backoff::Backoff;
use super::connect::{clock, connect, Connection};
use super::exit;
use super::output::Output;
use super::reqs::req;
use super::signals::{self, Signals, LEAVE_WAIT};
use super::transfer::{self, Download, Progress as Bar, Receiving, UpItem, Upload};
use crate::cli::ConnectArgs;
use crate::wire::Inbound;

/// Request id offsets ([`super::reqs`]): the run, attach or logs request itself.
const MAIN: u32 = 1;
const CANCEL: u32 = 2;
const RELEASE: u32 = 3;
/// Download `i` of a run is request `DOWNLOAD + i`.
const DOWNLOAD: u32 = 100;

/// What the loop is for.
// One per client process: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Goal {
    /// Start a build (or follow the one with the spec's id) and follow it.
    Run {
        spec: RunSpec,
        /// Print the id once started and return at once.
        detach: bool,
        /// Forward our stdin.
        stdin: bool,
        transfers: Transfers,
    },
    /// Follow a build from `from` (`None`: its current end).
    Attach { build: BuildId, from: Option<u64> },
    /// Print a build's output so far.
    Logs { build: BuildId },
}

/// A run's uploads and downloads.
pub struct Transfers {
    pub uploads: Vec<Upload>,
    pub excludes: Vec<String>,
    pub downloads: Vec<Download>,
    pub limits: tether_executor::transfer::UnpackLimits,
    /// Show progress bars.
    pub progress: bool,
}

/// Why following stopped without an exit code.
enum Stop {
    /// The connection broke or went silent: worth reconnecting.
    Lost(anyhow::Error),
    /// Anything else: tether's failure.
    Fatal(anyhow::Error),
}

impl From<anyhow::Error> for Stop {
    fn from(e: anyhow::Error) -> Stop {
        Stop::Lost(e)
    }
}

/// State that survives reconnections.
struct Progress {
    build: Option<BuildId>,
    /// Cancels asked for: 0 none, 1 graceful, 2 forced.
    cancels: u8,
    /// Whether the position is known (attach from the end learns it from the first
    /// reply).
    positioned: bool,
    /// The build while it prepares (before `Started`), for cancelling it.
    preparing: Option<BuildId>,
    /// Downloads completed (successfully or not).
    downloads_done: usize,
    /// A transfer failed: the run exits 125 whatever the build's status.
    transfer_failed: bool,
    /// The build failed and is held for a person (`--hold-on-failure`): no release
    /// after the downloads; the hold's end (a release, its expiry) ends the run.
    debug_hold: bool,
    /// The daemon answered for the build on this connection (it works again: a later
    /// loss starts a new `--reconnect-timeout`).
    advanced: bool,
    /// A signal asked the client to leave: which, and when it leaves at the latest.
    leaving: Option<(i32, Instant)>,
    /// The request that opened this connection's session (the `Run`, `Attach`) was
    /// answered.
    answered: bool,
}

/// A session's upload in progress.
struct Uploading {
    rx: mpsc::Receiver<UpItem>,
    sent: u64,
    acked: u64,
    window: u64,
    bar: Bar,
}

/// Per-session transfer state (a reconnect starts transfers over).
#[derive(Default)]
struct Xfer {
    up: Option<Uploading>,
    down: Option<(u64, Receiving)>,
}

/// Follows as `goal` says; returns the exit code.
pub async fn follow(goal: Goal, connect_args: &ConnectArgs, out: &mut Output) -> anyhow::Result<i32> {
    let stdin = matches!(goal, Goal::Run { stdin: true, .. });
    // Stdin already handed to a build cannot be replayed exactly: no reconnecting then.
    let reconnect = connect_args.reconnects() && !stdin;
    let mut progress = Progress {
        build: match &goal {
            Goal::Run { .. } => None,
            Goal::Attach { build, .. } | Goal::Logs { build } => Some(build.clone()),
        },
        cancels: 0,
        positioned: !matches!(goal, Goal::Attach { from: None, .. }),
        preparing: None,
        downloads_done: 0,
        transfer_failed: false,
        debug_hold: false,
        advanced: false,
        leaving: None,
        answered: false,
    };
    if let Goal::Attach { from: Some(from), .. } = goal {
        out.seek(from);
    }
    let mut signals = Signals::new()?;
    let mut conn = tokio::select! {
        conn = connect(connect_args) => conn?,
        sig = signals.recv() => return Ok(leave_unconnected(sig, &goal, &progress)),
    };
    // Since when the client has been trying to get a working connection back.
    let mut lost_since: Option<Instant> = None;
    let mut backoff = Backoff::default();
    loop {
        progress.advanced = false;
        let result = session(&mut conn, &goal, &mut progress, out, connect_args, &mut signals).await;
        match result {
            Ok(code) if progress.leaving.is_some() => {
                conn.leave().await;
                return Ok(code);
            }
            Ok(code) => {
                conn.close().await;
                return Ok(code);
            }
            Err(Stop::Lost(e)) if reconnect => {
                tracing::warn!("{}: {e:#}; reconnecting", conn.describe());
                conn.close().await;
                if progress.advanced {
                    lost_since = None;
                    backoff.reset();
                }
                let deadline = *lost_since.get_or_insert_with(Instant::now) + connect_args.reconnect_timeout;
                conn = tokio::select! {
                    conn = reconnect_with_backoff(connect_args, e, deadline, &mut backoff) => conn?,
                    sig = signals.recv() => return Ok(leave_unconnected(sig, &goal, &progress)),
                    _ = sleep_until(progress.leaving.map_or_else(far_future, |(_, at)| at)), if progress.leaving.is_some() => {
                        let sig = progress.leaving.map_or(libc::SIGTERM, |(sig, _)| sig);
                        return Ok(leave_unconnected(sig, &goal, &progress));
                    }
                };
            }
            Err(Stop::Lost(e) | Stop::Fatal(e)) => {
                conn.close().await;
                return Err(e);
            }
        }
    }
}

/// A signal while there is no connection: nothing can be asked of the daemon. Says what
/// is left behind; returns the exit code.
fn leave_unconnected(sig: i32, goal: &Goal, progress: &Progress) -> i32 {
    match (goal, progress.build.as_ref().or(progress.preparing.as_ref())) {
        (Goal::Run { .. }, Some(build)) => eprintln!(
            "tether: {} while not connected to the daemon; build {build} may still be running \
             (`tether cancel {build}` stops it, `tether attach {build}` follows it)",
            signals::name(sig)
        ),
        _ => eprintln!("tether: {}; leaving", signals::name(sig)),
    }
    signals::exit_code(sig)
}

/// Connects again after each of `backoff`'s pauses, until `deadline`.
async fn reconnect_with_backoff(
    args: &ConnectArgs,
    why: anyhow::Error,
    deadline: Instant,
    backoff: &mut Backoff,
) -> anyhow::Result<Connection> {
    let mut last = why;
    let give_up = |last: &anyhow::Error| {
        anyhow!(
            "lost the connection to the daemon and could not get it back within {}: {last:#}",
            humantime::format_duration(args.reconnect_timeout)
        )
    };
    loop {
        let wait = backoff.next_pause();
        if Instant::now() + wait > deadline {
            return Err(give_up(&last));
        }
        tokio::time::sleep(wait).await;
        match tokio::time::timeout_at(deadline, connect(args)).await {
            Ok(Ok(conn)) => {
                tracing::info!("reconnected");
                return Ok(conn);
            }
            Ok(Err(e)) => {
                tracing::debug!("reconnecting failed: {e:#}");
                last = e;
            }
            Err(_) => return Err(give_up(&last)),
        }
    }
}

/// Stdin forwarding state.
struct StdinFwd {
    rx: mpsc::Receiver<Option<Vec<u8>>>,
    sent: u64,
    acked: u64,
    window: u64,
    open: bool,
}

pub fn start_stdin_reader(chunk: usize) -> anyhow::Result<mpsc::Receiver<Option<Vec<u8>>>> {
    let fd = std::io::stdin().as_fd().try_clone_to_owned()?;
    let (tx, rx) = mpsc::channel(2);
    std::thread::Builder::new().name("stdin".into()).spawn(move || {
        let mut file = std::fs::File::from(fd);
        let mut buf = vec![0u8; chunk];
        loop {
            let item = match file.read(&mut buf) {
                Ok(0) | Err(_) => None,
                Ok(n) => Some(buf[..n].to_vec()),
            };
            let end = item.is_none();
            if tx.blocking_send(item).is_err() || end {
                return;
            }
        }
    })?;
    Ok(rx)
}

async fn recv_stdin(stdin: &mut Option<StdinFwd>) -> Option<Vec<u8>> {
    match stdin {
        Some(s) => s.rx.recv().await.flatten(),
        None => std::future::pending().await,
    }
}

/// Opens the request on this connection (first time or after a reconnect).
async fn open(conn: &Connection, goal: &Goal, progress: &Progress, out: &Output) -> Result<(), Stop> {
    let msg = match (goal, &progress.build) {
        (Goal::Run { spec, detach, .. }, None) => ClientMessage::Run {
            req: req(MAIN),
            spec: Box::new(spec.clone()),
            follow: !detach,
        },
        (Goal::Logs { .. }, Some(build)) => ClientMessage::Attach {
            req: req(MAIN),
            build: build.clone(),
            from: out.position(),
            follow: false,
        },
        (_, Some(build)) => ClientMessage::Attach {
            req: req(MAIN),
            build: build.clone(),
            from: if progress.positioned { out.position() } else { u64::MAX },
            follow: true,
        },
        (_, None) => return Err(Stop::Fatal(anyhow!("no build to follow"))),
    };
    conn.writer.send(&msg).await?;
    Ok(())
}

async fn session(
    conn: &mut Connection,
    goal: &Goal,
    progress: &mut Progress,
    out: &mut Output,
    args: &ConnectArgs,
    signals: &mut Signals,
) -> Result<i32, Stop> {
    progress.answered = false;
    open(conn, goal, progress, out).await?;
    let cancels_on_signal = matches!(goal, Goal::Run { .. });
    if cancels_on_signal {
        if let (Some(b), c @ 1..) = (&progress.build, progress.cancels) {
            send_cancel(conn, b, c > 1).await?;
        }
    }
    let mut stdin: Option<StdinFwd> = None;
    let mut xfer = Xfer::default();
    let mut heard = Instant::now();
    // A daemon that pings rarely (`serve --heartbeat 2m`) is not silent between pings:
    // wait for at least three of its intervals.
    let silence = args
        .heartbeat_timeout
        .max(Duration::from_millis(u64::from(conn.welcome.limits.heartbeat_ms)) * 3);
    loop {
        let can_send_stdin = stdin.as_ref().is_some_and(|s| s.open && s.sent - s.acked < s.window);
        let can_upload = xfer
            .up
            .as_ref()
            .is_some_and(|u| u.sent.saturating_sub(u.acked) < u.window);
        let signalled = tokio::select! {
            item = conn.inbound.recv() => {
                heard = Instant::now();
                let msg = match item {
                    Some(Inbound::Message(m)) => m,
                    Some(Inbound::Preamble) => continue,
                    Some(Inbound::Corrupt(c)) => {
                        tracing::warn!(corruption = %c, "damaged data from the daemon skipped");
                        continue;
                    }
                    Some(Inbound::Undecodable(e)) => {
                        tracing::warn!(error = %e, "undecodable frame from the daemon skipped");
                        continue;
                    }
                    Some(Inbound::Failed(e)) => return Err(Stop::Lost(anyhow!("{e}"))),
                    None | Some(Inbound::Eof(_)) => {
                        return Err(Stop::Lost(anyhow!("the connection closed before the build finished")));
                    }
                };
                if let Some(code) = on_message(conn, goal, progress, out, &mut stdin, &mut xfer, msg, args).await? {
                    return Ok(code);
                }
                continue;
            }
            item = recv_upload(&mut xfer.up), if can_upload => {
                if let Some(code) = on_upload(conn, progress, &mut xfer, item).await? {
                    return Ok(code);
                }
                continue;
            }
            chunk = recv_stdin(&mut stdin), if can_send_stdin => {
                let (Some(s), Some(b)) = (&mut stdin, &progress.build) else { continue };
                match chunk {
                    Some(data) => {
                        let offset = s.sent;
                        s.sent += data.len() as u64;
                        conn.writer.send(&ClientMessage::Stdin { build: b.clone(), offset, data: wire::Bytes::from(data) }).await?;
                    }
                    None => {
                        s.open = false;
                        conn.writer.send(&ClientMessage::CloseStdin { build: b.clone() }).await?;
                    }
                }
                continue;
            }
            _ = sleep_until(heard + silence) => {
                if !conn.inbound.is_empty() {
                    // We were the slow side (blocked on our own output): not silence.
                    heard = Instant::now();
                    continue;
                }
                return Err(Stop::Lost(anyhow!(
                    "the daemon sent nothing for {}",
                    humantime::format_duration(silence)
                )));
            }
            sig = signals.recv() => sig,
            _ = sleep_until(progress.leaving.map_or_else(far_future, |(_, at)| at)), if progress.leaving.is_some() => {
                let sig = progress.leaving.map_or(libc::SIGTERM, |(sig, _)| sig);
                if let Some(b) = progress.build.as_ref().or(progress.preparing.as_ref()) {
                    eprintln!(
                        "tether: {}: build {b} is being cancelled (SIGTERM, then SIGKILL after its grace period); \
                         not waiting for its end (`tether attach {b}` follows it)",
                        signals::name(sig)
                    );
                }
                return Ok(signals::exit_code(sig));
            }
        };
        if !cancels_on_signal {
            // attach and logs only watch: a signal ends them, never the build.
            return Ok(signals::exit_code(signalled));
        }
        // A second Ctrl-C forces; SIGTERM/SIGHUP ask for a graceful cancel.
        progress.cancels = if signalled == libc::SIGINT {
            (progress.cancels + 1).min(2)
        } else {
            progress.cancels.max(1)
        };
        if progress.leaving.is_none() {
            progress.leaving = Some((signalled, Instant::now() + LEAVE_WAIT));
        }
        match progress.build.as_ref().or(progress.preparing.as_ref()) {
            Some(b) => send_cancel(conn, b, progress.cancels > 1).await?,
            // Nothing started yet that we know of: nothing to wait for.
            None => {
                eprintln!("tether: {}; leaving before the build started", signals::name(signalled));
                return Ok(signals::exit_code(signalled));
            }
        }
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86400 * 365)
}

async fn recv_upload(up: &mut Option<Uploading>) -> Option<UpItem> {
    match up {
        Some(u) => u.rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Sends one piece of the uploads; `Some(code)` when packing failed.
async fn on_upload(
    conn: &Connection,
    progress: &mut Progress,
    xfer: &mut Xfer,
    item: Option<UpItem>,
) -> Result<Option<i32>, Stop> {
    let Some(up) = &mut xfer.up else { return Ok(None) };
    match item {
        Some(UpItem::Data(index, data)) => {
            up.sent += data.len() as u64;
            up.bar.add(data.len() as u64);
            let data = wire::Bytes::from(data);
            conn.writer
                .send(&ClientMessage::Upload {
                    req: req(MAIN),
                    index,
                    data,
                })
                .await?;
        }
        Some(UpItem::End { index, bytes, sha256 }) => {
            conn.writer
                .send(&ClientMessage::UploadEnd {
                    req: req(MAIN),
                    index,
                    bytes,
                    sha256,
                })
                .await?;
        }
        Some(UpItem::Failed(message)) => {
            up.bar.done();
            xfer.up = None;
            eprintln!("tether: {message}");
            // The build must not start without its files.
            if let Some(b) = &progress.preparing {
                send_cancel(conn, b, true).await?;
            }
            return Ok(Some(exit::TETHER_FAILED));
        }
        None => {
            up.bar.done();
            xfer.up = None;
        }
    }
    Ok(None)
}

/// One download is over (received or failed): on to the next, or the release.
async fn download_over(conn: &Connection, goal: &Goal, progress: &mut Progress, xfer: &mut Xfer) -> Result<(), Stop> {
    xfer.down = None;
    progress.downloads_done += 1;
    match progress.build.clone() {
        Some(b) => next_download(conn, goal, progress, xfer, &b).await,
        None => Ok(()),
    }
}

/// The next step once the build is held: the next download, or the release.
async fn next_download(
    conn: &Connection,
    goal: &Goal,
    progress: &mut Progress,
    xfer: &mut Xfer,
    build: &BuildId,
) -> Result<(), Stop> {
    let Goal::Run { transfers, .. } = goal else {
        return Ok(());
    };
    while let Some(d) = transfers.downloads.get(progress.downloads_done) {
        let bar = Bar::new(transfers.progress, &format!("download {}", d.path), None);
        match Receiving::start(d, transfers.limits, bar) {
            Ok(r) => {
                let req = req(DOWNLOAD + progress.downloads_done as u32);
                conn.writer
                    .send(&ClientMessage::Download {
                        req,
                        build: build.clone(),
                        path: transfer::path_bytes(&d.path),
                    })
                    .await?;
                xfer.down = Some((req, r));
                return Ok(());
            }
            Err(e) => {
                eprintln!("tether: download of {:?}: {e:#}", d.path);
                progress.transfer_failed = true;
                progress.downloads_done += 1;
            }
        }
    }
    if progress.debug_hold {
        return Ok(());
    }
    conn.writer
        .send(&ClientMessage::Release {
            req: req(RELEASE),
            build: build.clone(),
            status: None,
        })
        .await?;
    Ok(())
}

/// How a person reaches the daemon this client uses, for the hints it prints.
fn reach(args: &ConnectArgs) -> String {
    let quote = |s: &str| {
        let plain = !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/._-:=@,+".contains(&b));
        if plain {
            s.to_owned()
        } else {
            format!("'{}'", s.replace('\'', r"'\''"))
        }
    };
    match (&args.socket, &args.via) {
        (Some(path), _) => format!(" --socket {}", quote(&path.to_string_lossy())),
        (None, Some(via)) => format!(" --via {}", quote(via)),
        (None, None) => String::new(),
    }
}

/// Whether a held status is a failure `--hold-on-failure` holds for (not a cancel).
fn failed(status: &wire::ExitStatus, cause: wire::EndCause) -> bool {
    match cause {
        wire::EndCause::Cancelled | wire::EndCause::Shutdown => false,
        wire::EndCause::TimedOut => true,
        _ => *status != wire::ExitStatus::Code(0),
    }
}

/// Handles one message; `Some(code)` ends following.
#[allow(clippy::too_many_arguments)]
async fn on_message(
    conn: &mut Connection,
    goal: &Goal,
    progress: &mut Progress,
    out: &mut Output,
    stdin: &mut Option<StdinFwd>,
    xfer: &mut Xfer,
    msg: DaemonMessage,
    args: &ConnectArgs,
) -> Result<Option<i32>, Stop> {
    let ours = |b: &BuildId| progress.build.as_ref() == Some(b);
    if !matches!(
        msg,
        DaemonMessage::Ping { .. } | DaemonMessage::Pong { .. } | DaemonMessage::Channel(_) | DaemonMessage::Error(_)
    ) {
        progress.advanced = true;
    }
    let main = req(MAIN);
    if matches!(&msg, DaemonMessage::Started(wire::Started { req, .. })
        | DaemonMessage::Preparing { req, .. }
        | DaemonMessage::Attached { req, .. }
        | DaemonMessage::Error(wire::ErrorReport { req: Some(req), .. }) if *req == main)
    {
        progress.answered = true;
    }
    match msg {
        DaemonMessage::Preparing { req: r, build } if r == req(MAIN) => {
            tracing::debug!(%build, "preparing");
            progress.preparing = Some(build.clone());
            if let Goal::Run { transfers, .. } = goal {
                if progress.cancels > 0 {
                    send_cancel(conn, &build, progress.cancels > 1).await?;
                }
                if !transfers.uploads.is_empty() {
                    let total = transfers.progress.then(|| transfer::estimate(&transfers.uploads));
                    let rx = transfer::start_uploads(transfers.uploads.clone(), transfers.excludes.clone())
                        .map_err(Stop::Fatal)?;
                    xfer.up = Some(Uploading {
                        rx,
                        sent: 0,
                        acked: 0,
                        window: u64::from(conn.welcome.limits.upload_window.max(wire::MAX_CHUNK as u32)),
                        bar: Bar::new(transfers.progress, "upload", total),
                    });
                }
            }
        }
        DaemonMessage::HeldBefore { build, until_ms } if progress.preparing.as_ref() == Some(&build) => {
            let reach = reach(args);
            eprintln!(
                "tether: build {build} is held before its command until {} (then it starts on its own):\n\
                 tether:   tether shell{reach} --build {build}\n\
                 tether: start it with: tether release{reach} {build}",
                clock(until_ms),
            );
        }
        DaemonMessage::UploadAck { req: r, consumed } if r == req(MAIN) => {
            if let Some(up) = &mut xfer.up {
                up.acked = consumed;
            }
        }
        DaemonMessage::Held {
            build,
            status,
            cause,
            until_ms,
        } if ours(&build) => {
            tracing::debug!(%build, ?status, "held");
            if let Goal::Run { spec, .. } = goal {
                if spec.hold_on_failure_ms.is_some() && failed(&status, cause) && !progress.debug_hold {
                    progress.debug_hold = true;
                    let reach = reach(args);
                    eprintln!(
                        "tether: build {build} failed (exit {}) and is held until {} for a look inside:\n\
                         tether:   tether shell{reach} --build {build}\n\
                         tether: end the hold with: tether release{reach} {build} [--success | --failure | --exit-code N]",
                        exit::for_end(&status, cause),
                        clock(until_ms),
                    );
                }
            }
            if xfer.down.is_none() {
                next_download(conn, goal, progress, xfer, &build).await?;
            }
        }
        DaemonMessage::DownloadData { req, data } => {
            if let Some((r, recv)) = &mut xfer.down {
                if *r == req {
                    recv.data(data.into_vec()).await;
                }
            }
        }
        DaemonMessage::DownloadEnd { req, bytes, sha256 } if xfer.down.as_ref().is_some_and(|(r, _)| *r == req) => {
            if let Some((_, recv)) = xfer.down.take() {
                let path = recv.path.clone();
                match recv.end(bytes, sha256).await {
                    Ok(report) => {
                        tracing::info!(path, entries = report.entries, bytes = report.bytes, "downloaded");
                    }
                    Err(e) => {
                        eprintln!("tether: {e:#}");
                        progress.transfer_failed = true;
                    }
                }
            }
            download_over(conn, goal, progress, xfer).await?;
        }
        DaemonMessage::Error(e) if e.req.is_some() && e.req == xfer.down.as_ref().map(|(r, _)| *r) => {
            // The daemon could not send it (a missing path): said, and the build's own
            // status stands.
            eprintln!("tether: {}", e.message);
            download_over(conn, goal, progress, xfer).await?;
        }
        DaemonMessage::Ack { req: r } if r == req(RELEASE) => tracing::debug!("released"),
        DaemonMessage::Started(s) if s.req == req(MAIN) => {
            tracing::debug!(build = %s.build, pid = s.pid, existing = s.existing, "started");
            if s.existing {
                tracing::info!(build = %s.build, "a build with this id exists; following it from its start");
            }
            let first = progress.build.is_none();
            progress.build = Some(s.build.clone());
            if let Goal::Run { detach: true, .. } = goal {
                println!("{}", s.build);
                return Ok(Some(0));
            }
            if first {
                if let Err(e) = out.started(&s).await {
                    tracing::debug!(error = %e, "stdout closed");
                }
            }
            if progress.cancels > 0 {
                send_cancel(conn, &s.build, progress.cancels > 1).await?;
            }
            if let Goal::Run { stdin: true, .. } = goal {
                if stdin.is_none() && !s.existing {
                    *stdin = Some(StdinFwd {
                        rx: start_stdin_reader(conn.welcome.limits.max_chunk.max(1) as usize)
                            .map_err(|e| Stop::Fatal(e.context("cannot read stdin")))?,
                        sent: 0,
                        acked: 0,
                        window: u64::from(conn.welcome.limits.stdin_window.max(1)),
                        open: true,
                    });
                }
            }
        }
        DaemonMessage::Attached { req: r, build } if r == req(MAIN) => {
            tracing::debug!(build = %build.build, end = build.output_end, "attached");
            if !progress.positioned {
                out.seek(build.output_end);
            }
        }
        DaemonMessage::Output {
            build,
            stream,
            offset,
            data,
        } if ours(&build) => {
            if !progress.positioned {
                // Attached at the end: the first chunk says where that was.
                out.seek(offset);
                progress.positioned = true;
            }
            for closed in out.chunk(&build.0, stream, offset, data.into_vec()).await {
                // Only the client that ran the build may close its output (`run -- yes |
                // head -1`). A follower whose stdout closed (`attach ID | head -1`)
                // ends itself as a process in a pipeline would, by SIGPIPE, and leaves
                // the build alone.
                if !matches!(goal, Goal::Run { .. }) {
                    if closed == wire::OutputStream::Stdout {
                        tracing::debug!("our stdout closed; leaving the build alone");
                        return Ok(Some(128 + libc::SIGPIPE));
                    }
                    continue;
                }
                conn.writer
                    .send(&ClientMessage::CloseOutput {
                        build: build.clone(),
                        stream: closed,
                    })
                    .await?;
            }
        }
        DaemonMessage::Gap {
            build,
            from,
            to,
            reason,
        } if ours(&build) => {
            progress.positioned = true;
            let reason = match reason {
                wire::GapReason::Quota => "dropped by the daemon's output quota",
                wire::GapReason::WriteFailed => "the daemon could not write it to disk",
            };
            if let Err(e) = out.gap(&build.0, from, to, reason).await {
                tracing::debug!(error = %e, "stdout closed");
            }
        }
        DaemonMessage::Exited(e) if ours(&e.build) => {
            let end = e.stdout_bytes + e.stderr_bytes;
            if out.position() < end {
                tracing::warn!(build = %e.build, printed = out.position(), end, "the build's output ended before what was printed");
            }
            let code = if progress.transfer_failed {
                exit::TETHER_FAILED
            } else {
                exit::for_exited(&e)
            };
            if e.cause == wire::EndCause::Shutdown {
                eprintln!(
                    "tether: build {} did not finish: the daemon shut down and cancelled it (exit {code})",
                    e.build
                );
            }
            if let Err(e) = out.exited(&e, code).await {
                tracing::debug!(error = %e, "stdout closed");
            }
            return Ok(Some(code));
        }
        DaemonMessage::LogEnd { req: r, .. } if r == req(MAIN) => return Ok(Some(0)),
        DaemonMessage::StdinAck { build, consumed } if ours(&build) => {
            if let Some(s) = stdin {
                s.acked = consumed;
            }
        }
        DaemonMessage::Error(e) if e.req == Some(req(MAIN)) => {
            if e.kind == ErrorKind::UnknownBuild && progress.positioned && out.position() > 0 {
                return Err(Stop::Fatal(anyhow!(
                    "{} (the daemon may have restarted; the build's output so far was printed)",
                    e.message
                )));
            }
            let code = exit::for_error(e.kind);
            if let Err(err) = out.error(&format!("{:?}", e.kind), &e.message).await {
                tracing::debug!(error = %err, "stdout closed");
            }
            eprintln!("tether: {}", e.message);
            return Ok(Some(code));
        }
        DaemonMessage::Error(e) if e.kind == ErrorKind::Protocol && e.build.as_ref().is_some_and(ours) => {
            // Our build's input was damaged in transit: it is being cancelled.
            eprintln!("tether: {}", e.message);
            progress.transfer_failed = true;
        }
        DaemonMessage::Error(e) if e.kind == ErrorKind::Protocol => {
            // Damage on the way to the daemon (on a shared stream, another client's
            // bytes may cut ours): a request not answered yet may be the frame it lost,
            // so it goes again (a Run names its build: it never starts twice).
            tracing::debug!("daemon: {}", e.message);
            if !progress.answered {
                open(conn, goal, progress, out).await?;
            }
        }
        DaemonMessage::Error(e) => tracing::debug!(?e, "daemon error"),
        DaemonMessage::Ping { nonce } => conn.writer.send(&ClientMessage::Pong { nonce }).await?,
        DaemonMessage::ShuttingDown { reason } => {
            eprintln!("tether: the daemon is shutting down: {reason}");
        }
        other => tracing::trace!(?other, "ignored"),
    }
    Ok(None)
}

async fn send_cancel(conn: &Connection, build: &BuildId, force: bool) -> Result<(), Stop> {
    tracing::info!(%build, force, "cancelling");
    conn.writer
        .send(&ClientMessage::Cancel {
            req: req(CANCEL),
            build: build.clone(),
            force,
        })
        .await?;
    Ok(())
}
