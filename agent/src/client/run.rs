//! `tether run`: start one build, stream its output, exit with its status.

use std::ffi::OsString;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;

use anyhow::Context;
use tether_protocol::{self as wire, BuildId, ClientMessage, DaemonMessage, ErrorKind, RunSpec};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use super::connect::{connect, Connection};
use super::exit;
use super::output::Output;
use crate::cli::RunArgs;
use crate::wire::Inbound;

const RUN_REQ: u64 = 1;
const CANCEL_REQ: u64 = 2;

fn bytes(b: &[u8]) -> wire::Bytes {
    wire::Bytes::from(b.to_vec())
}

fn spec(args: &RunArgs) -> RunSpec {
    let command = match &args.sh {
        Some(script) => wire::CommandSpec::Script {
            script: bytes(script.as_bytes()),
            shell: args.shell.as_ref().map(|s| bytes(s.as_os_str().as_bytes())),
        },
        None => wire::CommandSpec::Argv(args.argv.iter().map(|a: &OsString| bytes(a.as_bytes())).collect()),
    };
    RunSpec {
        command,
        env: args
            .env
            .iter()
            .map(|(k, v)| wire::EnvVar {
                name: bytes(k.as_bytes()),
                value: bytes(v.as_bytes()),
            })
            .collect(),
        workdir: args.workdir.as_ref().map(|w| bytes(w.as_os_str().as_bytes())),
        // As with timeout(1), a zero duration disables the timeout.
        timeout_ms: args.timeout.filter(|t| !t.is_zero()).map(|t| t.as_millis() as u64),
        grace_ms: args.grace.map(|t| t.as_millis() as u64),
        stdin: args.interactive,
        name: args.name.clone(),
    }
}

/// Runs the build; returns the exit code. Errors are tether's own failures (125).
pub async fn run(args: RunArgs) -> anyhow::Result<i32> {
    let mut out = Output::new(args.json).context("cannot set up output")?;
    let mut conn = connect(&args.connect).await?;
    conn.writer
        .send(&ClientMessage::Run {
            req: RUN_REQ,
            spec: spec(&args),
        })
        .await?;
    let result = follow(&mut conn, &mut out, &args).await;
    let close = out.close().await;
    conn.close().await;
    let code = result?;
    if let Err(e) = close {
        // Our own stdout went away (e.g. `| head`): the build's status still stands.
        tracing::debug!(error = %e, "writing output failed");
    }
    Ok(code)
}

/// Stdin forwarding state.
struct StdinFwd {
    rx: mpsc::Receiver<Option<Vec<u8>>>,
    sent: u64,
    acked: u64,
    window: u64,
    open: bool,
}

fn start_stdin_reader(chunk: usize) -> anyhow::Result<mpsc::Receiver<Option<Vec<u8>>>> {
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

async fn follow(conn: &mut Connection, out: &mut Output, args: &RunArgs) -> anyhow::Result<i32> {
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut build: Option<BuildId> = None;
    // Cancels asked for before the build started: 0 none, 1 graceful, 2 forced.
    let mut cancels = 0u8;
    let mut stdin: Option<StdinFwd> = None;

    loop {
        let can_send_stdin = stdin.as_ref().is_some_and(|s| s.open && s.sent - s.acked < s.window);
        tokio::select! {
            item = conn.inbound.recv() => {
                let Some(item) = item else {
                    anyhow::bail!("{} closed the connection before the build finished", conn.describe());
                };
                let msg = match item {
                    Inbound::Message(m) => m,
                    Inbound::Preamble => continue,
                    Inbound::Corrupt(c) => {
                        tracing::warn!(corruption = %c, "damaged data from the daemon skipped");
                        continue;
                    }
                    Inbound::Undecodable(e) => {
                        tracing::warn!(error = %e, "undecodable frame from the daemon skipped");
                        continue;
                    }
                    Inbound::Eof(_) | Inbound::Failed(_) => {
                        anyhow::bail!("{} closed the connection before the build finished", conn.describe());
                    }
                };
                match msg {
                    DaemonMessage::Started(s) if s.req == RUN_REQ => {
                        tracing::debug!(build = %s.build, pid = s.pid, "started");
                        if let Err(e) = out.started(&s).await {
                            tracing::debug!(error = %e, "stdout closed");
                        }
                        build = Some(s.build.clone());
                        if cancels > 0 {
                            send_cancel(conn, &s.build, cancels > 1).await?;
                        }
                        if args.interactive {
                            stdin = Some(StdinFwd {
                                rx: start_stdin_reader(conn.welcome.limits.max_chunk.max(1) as usize)?,
                                sent: 0,
                                acked: 0,
                                window: u64::from(conn.welcome.limits.stdin_window.max(1)),
                                open: true,
                            });
                        }
                    }
                    DaemonMessage::Output { build: b, stream, offset, data } if Some(&b) == build.as_ref() => {
                        for closed in out.chunk(&b.0, stream, offset, data.into_vec()).await {
                            conn.writer.send(&ClientMessage::CloseOutput { build: b.clone(), stream: closed }).await?;
                        }
                    }
                    DaemonMessage::Exited(e) if Some(&e.build) == build.as_ref() => {
                        let code = exit::for_exited(&e);
                        if let Err(e) = out.exited(&e, code).await {
                            tracing::debug!(error = %e, "stdout closed");
                        }
                        return Ok(code);
                    }
                    DaemonMessage::StdinAck { build: b, consumed } if Some(&b) == build.as_ref() => {
                        if let Some(s) = &mut stdin {
                            s.acked = consumed;
                        }
                    }
                    DaemonMessage::Error(e) if e.req == Some(RUN_REQ) => {
                        let code = exit::for_error(e.kind);
                        if let Err(err) = out.error(&format!("{:?}", e.kind), &e.message).await {
                            tracing::debug!(error = %err, "stdout closed");
                        }
                        eprintln!("tether: {}", e.message);
                        return Ok(code);
                    }
                    DaemonMessage::Error(e) if e.kind == ErrorKind::Protocol => {
                        tracing::warn!("daemon: {}", e.message);
                    }
                    DaemonMessage::Error(e) => tracing::debug!(?e, "daemon error"),
                    DaemonMessage::Ping { nonce } => conn.writer.send(&ClientMessage::Pong { nonce }).await?,
                    other => tracing::trace!(?other, "ignored"),
                }
            }
            chunk = recv_stdin(&mut stdin), if can_send_stdin => {
                let (Some(s), Some(b)) = (&mut stdin, &build) else { continue };
                match chunk {
                    Some(data) => {
                        s.sent += data.len() as u64;
                        conn.writer.send(&ClientMessage::Stdin { build: b.clone(), data: wire::Bytes::from(data) }).await?;
                    }
                    None => {
                        s.open = false;
                        conn.writer.send(&ClientMessage::CloseStdin { build: b.clone() }).await?;
                    }
                }
            }
            _ = sigint.recv() => {
                cancels = (cancels + 1).min(2);
                if let Some(b) = &build {
                    send_cancel(conn, b, cancels > 1).await?;
                }
            }
            _ = sigterm.recv() => {
                cancels = cancels.max(1);
                if let Some(b) = &build {
                    send_cancel(conn, b, cancels > 1).await?;
                }
            }
            _ = sighup.recv() => {
                cancels = cancels.max(1);
                if let Some(b) = &build {
                    send_cancel(conn, b, cancels > 1).await?;
                }
            }
        }
    }
}

async fn recv_stdin(stdin: &mut Option<StdinFwd>) -> Option<Vec<u8>> {
    match stdin {
        Some(s) => s.rx.recv().await.flatten(),
        None => std::future::pending().await,
    }
}

async fn send_cancel(conn: &mut Connection, build: &BuildId, force: bool) -> anyhow::Result<()> {
    tracing::info!(%build, force, "cancelling");
    conn.writer
        .send(&ClientMessage::Cancel {
            req: CANCEL_REQ,
            build: build.clone(),
            force,
        })
        .await
}
