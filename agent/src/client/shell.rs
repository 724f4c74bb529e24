//! `tether shell`: a shell (or ARGV) in the daemon's container, in a terminal the daemon
//! allocates, driven from this one.
//!
//! When stdin is a terminal (and `--no-tty` is not given), the daemon opens a pty of the
//! same size, this client puts its own terminal in raw mode ([`super::terminal`]) and
//! forwards every byte typed as it comes, sends the size again on every SIGWINCH, and
//! writes whatever the remote terminal prints. Otherwise the shell gets pipes, so
//! scripts can feed it (`echo 'ls' | tether shell`), and stdin's end closes its stdin.
//!
//! The exit code is the shell's (128+N when signal N ended it); 125 when tether failed
//! (the connection was lost: the daemon hangs the shell up). SIGTERM and SIGHUP to
//! this client hang the shell up and wait for it to end. No reconnecting: a shell's
//! terminal does not survive its connection.

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use anyhow::{anyhow, bail};
use tether_protocol::{self as wire, BuildId, ClientMessage, DaemonMessage, ErrorKind};
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::{sleep_until, Instant};

use super::connect::{connect, Connection};
use super::exit;
use super::follow::start_stdin_reader;
use super::terminal::{window_size, RawTerminal};
use crate::cli::ShellArgs;
use crate::wire::Inbound;

/// After asking for a hang-up, how long to wait for the shell's exit before giving up.
const HANG_UP_WAIT: Duration = Duration::from_secs(10);

fn bytes(b: &[u8]) -> wire::Bytes {
    wire::Bytes::from(b.to_vec())
}

pub async fn shell(args: ShellArgs) -> anyhow::Result<i32> {
    let stdin = std::io::stdin();
    let tty = !args.no_tty && stdin.is_terminal();
    let size = if tty {
        Some(window_size(stdin.as_fd()).unwrap_or(wire::WindowSize { rows: 24, cols: 80 }))
    } else {
        None
    };
    let mut env = Vec::new();
    if tty {
        if let Some(term) = std::env::var_os("TERM") {
            env.push(wire::EnvVar {
                name: bytes(b"TERM"),
                value: bytes(term.as_bytes()),
            });
        }
    }
    let spec = wire::ShellSpec {
        build: args.build.clone().map(BuildId),
        argv: (!args.argv.is_empty()).then(|| args.argv.iter().map(|a: &OsString| bytes(a.as_bytes())).collect()),
        shell: args.shell.as_ref().map(|s| bytes(s.as_os_str().as_bytes())),
        env,
        tty: size,
    };
    let mut conn = connect(&args.connect).await?;
    let result = run(&mut conn, spec, tty, &args).await;
    conn.close().await;
    result
}

async fn run(conn: &mut Connection, spec: wire::ShellSpec, tty: bool, args: &ShellArgs) -> anyhow::Result<i32> {
    conn.writer
        .send(&ClientMessage::OpenShell { req: shell_req(), spec })
        .await?;
    // Opened (or refused) before the terminal changes, so errors print as usual.
    loop {
        match conn.inbound.recv().await {
            Some(Inbound::Message(DaemonMessage::ShellOpened {
                pid, program, build, ..
            })) => {
                tracing::debug!(pid, program = %String::from_utf8_lossy(&program), ?build, "shell opened");
                break;
            }
            Some(Inbound::Message(DaemonMessage::Error(e))) if e.req == Some(shell_req()) => {
                eprintln!("tether: {}", e.message);
                return Ok(exit::for_error(e.kind));
            }
            Some(Inbound::Message(DaemonMessage::Ping { nonce })) => {
                conn.writer.send(&ClientMessage::Pong { nonce }).await?;
            }
            Some(Inbound::Eof(_) | Inbound::Failed(_)) | None => bail!("the connection closed before the shell opened"),
            Some(_) => {}
        }
    }
    let raw = if tty {
        Some(
            RawTerminal::enter(std::io::stdin().as_fd())
                .map_err(|e| anyhow!("cannot put the terminal in raw mode: {e}"))?,
        )
    } else {
        None
    };
    let result = relay(conn, tty, args).await;
    drop(raw);
    result
}

/// Moves bytes both ways until the shell exits.
async fn relay(conn: &mut Connection, tty: bool, args: &ShellArgs) -> anyhow::Result<i32> {
    let limits = conn.welcome.limits;
    let mut input = start_stdin_reader(limits.max_chunk.max(1) as usize)?;
    let window = u64::from(limits.stdin_window.max(1));
    let (mut sent, mut acked, mut input_open) = (0u64, 0u64, true);
    let mut winch = signal(SignalKind::window_change())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let silence = args
        .connect
        .heartbeat_timeout
        .max(Duration::from_millis(u64::from(limits.heartbeat_ms)) * 3);
    let mut heard = Instant::now();
    let mut hung_up: Option<Instant> = None;
    let mut stdout = std::io::stdout().lock();
    loop {
        let can_send = input_open && sent - acked < window;
        let give_up = hung_up.map(|at| at + HANG_UP_WAIT);
        tokio::select! {
            item = conn.inbound.recv() => {
                heard = Instant::now();
                let msg = match item {
                    Some(Inbound::Message(m)) => m,
                    Some(Inbound::Eof(_) | Inbound::Failed(_)) | None => {
                        bail!("the connection to the daemon was lost; the shell is hung up");
                    }
                    Some(_) => continue,
                };
                match msg {
                    DaemonMessage::ShellOutput { shell, stream, data } if shell == shell_req() => {
                        let written = match stream {
                            wire::OutputStream::Stdout => stdout.write_all(&data).and_then(|()| stdout.flush()),
                            wire::OutputStream::Stderr => std::io::stderr().write_all(&data),
                        };
                        if let Err(e) = written {
                            tracing::debug!(error = %e, "cannot write the shell's output; hanging up");
                            hang_up(conn, &mut hung_up).await?;
                        }
                    }
                    DaemonMessage::ShellInputAck { shell, consumed } if shell == shell_req() => acked = consumed,
                    DaemonMessage::ShellExited { shell, status } if shell == shell_req() => return Ok(exit::for_status(&status)),
                    DaemonMessage::Ping { nonce } => conn.writer.send(&ClientMessage::Pong { nonce }).await?,
                    DaemonMessage::Error(e) if e.req == Some(shell_req()) || e.kind == ErrorKind::Protocol => {
                        tracing::warn!("daemon: {}", e.message);
                    }
                    DaemonMessage::ShuttingDown { reason } => {
                        // On a raw terminal a line feed does not return the carriage.
                        let end = if tty { "\r\n" } else { "\n" };
                        eprint!("{end}tether: the daemon is shutting down ({reason}); the shell will be hung up{end}");
                    }
                    other => tracing::trace!(?other, "ignored"),
                }
            }
            chunk = input.recv(), if can_send => match chunk.flatten() {
                Some(data) => {
                    let offset = sent;
                    sent += data.len() as u64;
                    conn.writer
                        .send(&ClientMessage::ShellInput { shell: shell_req(), offset, data: wire::Bytes::from(data) })
                        .await?;
                }
                None => {
                    input_open = false;
                    // A terminal has no end of input but the ^D typed into it.
                    if !tty {
                        conn.writer.send(&ClientMessage::ShellInputEnd { shell: shell_req() }).await?;
                    }
                }
            },
            _ = winch.recv(), if tty => {
                if let Some(size) = window_size(std::io::stdin().as_fd()) {
                    conn.writer.send(&ClientMessage::ShellResize { shell: shell_req(), size }).await?;
                }
            }
            _ = sigterm.recv() => hang_up(conn, &mut hung_up).await?,
            _ = sighup.recv() => hang_up(conn, &mut hung_up).await?,
            // With a terminal in raw mode Ctrl-C is a byte; this is a `kill -INT`, or
            // Ctrl-C on the terminal of a piped shell.
            _ = sigint.recv() => hang_up(conn, &mut hung_up).await?,
            _ = sleep_until(give_up.unwrap_or_else(far_future)), if give_up.is_some() => {
                bail!("the shell did not end within {} of its hang-up", humantime::format_duration(HANG_UP_WAIT));
            }
            _ = sleep_until(heard + silence) => {
                if conn.inbound.is_empty() {
                    bail!("the daemon sent nothing for {}; giving up the shell", humantime::format_duration(silence));
                }
                heard = Instant::now();
            }
        }
    }
}

async fn hang_up(conn: &Connection, hung_up: &mut Option<Instant>) -> anyhow::Result<()> {
    if hung_up.is_none() {
        *hung_up = Some(Instant::now());
        conn.writer
            .send(&ClientMessage::ShellHangUp { shell: shell_req() })
            .await?;
    }
    Ok(())
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86400 * 365)
}

/// The shell's name in every message about it: its `OpenShell` request id.
fn shell_req() -> u64 {
    super::reqs::req(1)
}
