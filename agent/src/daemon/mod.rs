//! `tether serve`: the daemon.
//!
//! It keeps the container alive, reads framed sessions from its stdin and from clients
//! of its Unix socket (`--socket`), runs builds through the executor, keeps their
//! records for `--retain`, and writes each connection's frames through a single writer. Its own logs go to stderr only: at start-up fd 1 is duplicated for the
//! frame writer and then pointed at stderr, and fd 0 at /dev/null, so nothing stray (a
//! library's print, a panic message) can reach the protocol stream.

pub mod builds;
pub mod connection;
pub mod convert;
pub mod download;
pub mod follow;
pub mod input;
pub mod outbox;
pub mod prepare;
pub mod session;
pub mod shells;
pub mod socket;
pub mod tty;
pub mod upload;

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tether_executor::{Executor, ExecutorConfig};
use tether_protocol::{self as wire, ClientMessage};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::wire::{read_blocking, Sink};
use builds::Builds;

/// How the daemon runs (from `tether serve`'s flags).
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub state_dir: Option<PathBuf>,
    pub exit_on_eof: bool,
    pub grace: Duration,
    /// Also serve on this Unix socket.
    pub socket: Option<PathBuf>,
    pub allow_uids: Vec<u32>,
    pub allow_gids: Vec<u32>,
    /// How long finished builds' records are kept.
    pub retain: Duration,
    pub quota_build: u64,
    pub quota_total: u64,
    /// Ping interval, and how long a silent client's session lives.
    pub heartbeat: Duration,
    pub heartbeat_timeout: Duration,
    /// Readiness gates every build waits for (`--wait-for`), and how long at most.
    pub wait_for: Vec<String>,
    pub wait_timeout: Duration,
    /// Caps on one archive (upload, fetched archive) and on a fetched body.
    pub unpack: tether_executor::transfer::UnpackLimits,
    /// Most builds not finished at once (`None`: no limit); past it a Run gets `Busy`.
    pub max_builds: Option<usize>,
    /// Most socket connections served at once; past it a connection gets `Busy`.
    pub max_sessions: usize,
}

/// State shared by every session.
pub struct Daemon {
    pub builds: Arc<Builds>,
    /// Why the daemon is stopping, once it is: every session's client is told
    /// (`ShuttingDown`) before its builds are cancelled.
    pub shutdown: tokio::sync::watch::Sender<Option<String>>,
    pub version: String,
    pub limits: wire::Limits,
    pub heartbeat: Duration,
    pub heartbeat_timeout: Duration,
}

/// Inbound items buffered between the stdin reader thread and the session loop.
const INBOUND_QUEUE: usize = 64;

/// Runs the daemon until stdin ends (with `exit_on_eof`) or SIGTERM/SIGINT.
pub async fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    if opts.heartbeat_timeout <= opts.heartbeat {
        anyhow::bail!(
            "--heartbeat-timeout ({:?}) must be longer than --heartbeat ({:?}): a client pings once per interval",
            opts.heartbeat_timeout,
            opts.heartbeat
        );
    }
    let access = socket::Access {
        own_uid: nix::unistd::geteuid().as_raw(),
        allow_uids: opts.allow_uids.clone(),
        allow_gids: opts.allow_gids.clone(),
    };
    // Bound first: a second daemon on a live socket fails before touching any state.
    let listener = opts
        .socket
        .as_deref()
        .map(|path| socket::bind(path, access.reach()))
        .transpose()?;
    let (frames_in, frames_out) = take_stdio().context("cannot set up stdin/stdout")?;
    // Before the first byte is read or written; restored when `_raw` drops at exit.
    let _raw = tty::RawTty::enter(&frames_in);
    become_subreaper();
    ignore_stray_signals();
    // When stdout is a pipe (runc, a spawning client), a larger one carries output with
    // fewer wake-ups; on a tty or socket this is refused and harmless.
    tether_executor::enlarge_pipe(&frames_out);

    let mut config = ExecutorConfig::new();
    if let Some(dir) = &opts.state_dir {
        config.state_root = dir.clone();
    }
    config.default_grace = opts.grace;
    config.chunk_size = wire::MAX_CHUNK;
    config.spool = tether_executor::spool::SpoolLimits {
        build_quota: opts.quota_build,
        total_quota: opts.quota_total,
    };
    let gates = opts
        .wait_for
        .iter()
        .map(|g| tether_executor::gate::Gate::parse(g))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("--wait-for: {e}"))?;
    let fetch_limits = tether_executor::fetch::FetchLimits {
        max_bytes: opts.unpack.max_bytes,
        unpack: opts.unpack,
        ..Default::default()
    };
    let (executor, swept) = Executor::new(config).context("cannot start the executor")?;
    for dir in &swept.removed_instances {
        tracing::info!(dir = %dir.display(), "removed the state of a daemon that died");
    }
    for e in &swept.errors {
        tracing::warn!(error = %e, "sweeping old state");
    }
    let state = executor.state().instance_dir().to_path_buf();
    tracing::info!(state = %state.display(), pid = std::process::id(), "tether serve started");
    // Off the start-up path: paging out takes milliseconds, and the pages it drops that
    // the first session needs fault back in; a client waiting for Welcome pays neither.
    tokio::spawn(async {
        tokio::time::sleep(PAGEOUT_DELAY).await;
        let _ = tokio::task::spawn_blocking(release_startup_pages).await;
    });

    let daemon = Arc::new(Daemon {
        builds: Builds::new(
            executor.clone(),
            prepare::PrepContext::new(fetch_limits, gates, opts.wait_timeout, opts.unpack)?,
            u64::from(wire::DEFAULT_STDIN_WINDOW),
            u64::from(wire::DEFAULT_UPLOAD_WINDOW),
            opts.retain,
            opts.max_builds,
        ),
        shutdown: tokio::sync::watch::Sender::new(None),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        limits: wire::Limits {
            max_payload: wire::MAX_PAYLOAD as u32,
            max_chunk: wire::MAX_CHUNK as u32,
            stdin_window: wire::DEFAULT_STDIN_WINDOW,
            heartbeat_ms: opts.heartbeat.as_millis().clamp(1, u32::MAX as u128) as u32,
            upload_window: wire::DEFAULT_UPLOAD_WINDOW,
        },
        heartbeat: opts.heartbeat.max(Duration::from_millis(1)),
        heartbeat_timeout: opts.heartbeat_timeout,
    });
    let expiry = tokio::spawn(expire_records(Arc::clone(&daemon.builds), opts.retain));
    let trimmer = tokio::spawn(give_back_memory(Arc::clone(&daemon.builds)));

    let (tx, rx) = mpsc::channel::<crate::wire::Inbound<ClientMessage>>(INBOUND_QUEUE);
    std::thread::Builder::new()
        .name("stdin-reader".into())
        .spawn(move || read_blocking(std::fs::File::from(frames_in), tx))
        .context("cannot start the stdin reader")?;
    let sink = Sink::thread(frames_out, "stdout-writer").context("cannot start the stdout writer")?;
    let mut stdio = connection::Connection::spawn(Arc::clone(&daemon), rx, sink, connection::Transport::Stdio);
    let (stop_sockets, sockets_stopped) = tokio::sync::watch::channel(false);
    let socket_task = match (listener, &opts.socket) {
        (Some(listener), Some(path)) => {
            tracing::info!(socket = %path.display(), "serving on a Unix socket too");
            Some(tokio::spawn(socket::serve(
                listener,
                path.clone(),
                Arc::clone(&daemon),
                access,
                opts.max_sessions,
                sockets_stopped,
            )))
        }
        _ => None,
    };

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut sigquit = signal(SignalKind::quit())?;
    let mut input_open = true;
    let reason = loop {
        tokio::select! {
            _ = &mut stdio.reader, if input_open => {
                input_open = false;
                if opts.exit_on_eof {
                    break "its stdin closed (--exit-on-eof)";
                }
                tracing::info!("stdin closed; serving on until a signal (--exit-on-eof ends here instead)");
            }
            _ = sigterm.recv() => break "received SIGTERM (as when its pod is deleted)",
            _ = sigint.recv() => break "received SIGINT",
            // Only SIGTERM and SIGINT end the daemon (and the end of stdin with
            // --exit-on-eof). A hang-up of whatever started it is not a reason to cancel
            // builds; a client that went away is handled by the protocol.
            _ = sighup.recv() => tracing::info!("SIGHUP ignored (SIGTERM or SIGINT stop the daemon)"),
            _ = sigquit.recv() => tracing::info!("SIGQUIT ignored (SIGTERM or SIGINT stop the daemon)"),
        }
    };
    tracing::info!(reason, "shutting down: cancelling builds");
    daemon.shutdown.send_replace(Some(reason.to_owned()));
    expiry.abort();
    trimmer.abort();
    daemon.builds.shutdown().await;
    let _ = stop_sockets.send(true);
    if let Some(task) = socket_task {
        let _ = task.await;
    }
    stdio.finish(Duration::from_secs(2)).await;
    drop(daemon);
    match executor.remove_state() {
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot remove the daemon's state dir"),
    }
    tracing::info!("tether serve stopped");
    Ok(())
}

/// Drops finished builds' records once their retention period passed: checked at a
/// tenth of the period (between 100 ms and 30 s), so a record lives at most that much
/// longer than asked.
async fn expire_records(builds: Arc<Builds>, retain: Duration) {
    let every = (retain / 10).clamp(Duration::from_millis(100), Duration::from_secs(30));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        builds.expire(std::time::Instant::now());
    }
}

/// How long the daemon must have had no build before it gives freed memory back.
const IDLE_TRIM_DELAY: Duration = Duration::from_secs(1);

/// Gives the memory that builds' buffers used back to the system once the daemon has
/// had no build for [`IDLE_TRIM_DELAY`]. A streaming build's queues hold megabytes;
/// freed, glibc keeps them (the trim threshold is raised for throughput, see
/// `main::tune_malloc`, and a heap fragmented by many concurrent builds cannot shrink
/// from the top), so a daemon that served 64 builds at once would otherwise idle at
/// their peak. `malloc_trim` returns every free page, also in the middle of the heap.
/// Waiting a moment keeps it off the path of builds that follow each other closely.
async fn give_back_memory(builds: Arc<Builds>) {
    loop {
        builds.ended.notified().await;
        tokio::time::sleep(IDLE_TRIM_DELAY).await;
        if builds.busy() {
            continue;
        }
        let _ = tokio::task::spawn_blocking(|| {
            #[cfg(target_env = "gnu")]
            // SAFETY: malloc_trim only returns free memory to the system.
            unsafe {
                libc::malloc_trim(0);
            }
        })
        .await;
        tracing::debug!("no build left: freed memory given back");
    }
}

/// Takes fds 0 and 1 for the protocol and points them at /dev/null and stderr.
fn take_stdio() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let stdin = std::io::stdin().as_fd().try_clone_to_owned()?;
    let stdout = std::io::stdout().as_fd().try_clone_to_owned()?;
    let null = std::fs::File::open("/dev/null")?;
    nix::unistd::dup2_stdin(&null)?;
    nix::unistd::dup2_stdout(std::io::stderr().as_fd())?;
    Ok((stdin, stdout))
}

/// Signals whose default action would kill or stop the daemon without its clean
/// shutdown are ignored. As PID 1 the kernel already drops every signal without a
/// handler; as an ordinary process (under tini, `ssh host tether serve`, a test) a stray
/// SIGUSR1 or a SIGTSTP from a terminal must not kill it or freeze every build's client.
/// SIGHUP and SIGQUIT are caught and logged in `serve`. Builds get all signals back at
/// their default (see `tether_executor::spawn`).
fn ignore_stray_signals() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    for sig in [
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGALRM,
        Signal::SIGTSTP,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
    ] {
        // SAFETY: SIG_IGN installs no handler code; nothing else in the daemon sets
        // these dispositions.
        if let Err(e) = unsafe { signal(sig, SigHandler::SigIgn) } {
            tracing::warn!(error = %e, signal = ?sig, "cannot ignore a signal");
        }
    }
}

/// How long after start-up the pages it touched are given back.
const PAGEOUT_DELAY: Duration = Duration::from_millis(100);

/// Gives back the pages of the binary that start-up touched (argument parsing, logging
/// set-up, the state dir sweep): the daemon idles for hours as a container's PID 1, and
/// the kernel maps file pages around every fault, so most of the code and read-only
/// data read once at start-up would otherwise stay resident. `MADV_PAGEOUT` on the
/// binary's read-only mappings (never on writable ones) drops them; whatever serving
/// needs comes back on first use from the page cache. Best effort: older kernels
/// refuse it, which changes nothing else.
fn release_startup_pages() {
    let Ok(exe) = std::fs::read_link("/proc/self/exe") else {
        return;
    };
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return;
    };
    for line in maps.lines() {
        // start-end perms offset dev inode path
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let path = fields.nth(3);
        if path != exe.to_str() || perms.contains('w') {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (usize::from_str_radix(start, 16), usize::from_str_radix(end, 16)) else {
            continue;
        };
        // SAFETY: the range is a read-only file mapping of our own binary, as the kernel
        // listed it; MADV_PAGEOUT only unmaps clean pages, which fault back in unchanged.
        let r = unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_PAGEOUT) };
        if r != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "cannot release start-up pages");
            return;
        }
    }
}

/// Orphans of builds re-parent to the daemon (as they would to PID 1), so the reaper
/// collects them and a build's process group can be watched until it is empty.
fn become_subreaper() {
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!(error = %e, "cannot become a child subreaper; orphans go to init");
    }
}
