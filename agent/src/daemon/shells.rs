//! A session's shells (`tether shell`): open, input, resize, hang-up, and their output.
//!
//! A shell belongs to the session that opened it and is named by that session's
//! `OpenShell` request id. Unlike a build, it is not spooled and has no life of its own:
//! when the session ends (the connection dropped, the client took the stream over, the
//! heartbeat timed out) every shell it opened is hung up, as a terminal whose line
//! dropped hangs up its session. The executor then ends every process of the shell's
//! session (SIGHUP and SIGCONT, SIGKILL after [`SHELL_GRACE`]).
//!
//! Each shell has two tasks: an input pump ([`super::input`]) that writes the client's
//! bytes to the terminal (or stdin pipe) and acknowledges them (the stdin window, as for
//! builds), and
//! a forwarder that sends its output on the session's *data* queue, waiting when the
//! queue is full: a client that stops reading stops the shell at its next write, as a
//! real terminal that is not read does. `ShellExited` goes on the same queue, after the
//! last output.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tether_executor::build::MASK_DELAY;
use tether_executor::interactive::{ShellControl, ShellEvent, ShellSpec};
use tether_executor::mask::{Masker, Secrets};
use tether_executor::pty::WindowSize;
use tether_executor::Stream;
use tether_protocol::{self as wire, DaemonMessage, ErrorKind, ErrorReport, RequestId};
use tokio::sync::mpsc;

use super::builds::Builds;
use super::convert;
use super::input::{self, InputCmd};
use super::outbox::Outbox;

/// Between SIGHUP and SIGKILL when a shell is hung up. Interactive shells and the jobs
/// they run end at SIGHUP at once; this bounds the ones that ignore it.
pub const SHELL_GRACE: Duration = Duration::from_secs(3);

/// One open shell, from the session's side.
struct Route {
    tx: mpsc::UnboundedSender<InputCmd>,
    /// Input bytes queued and not yet written (the window).
    pending: Arc<AtomicU64>,
    /// The stream position the next input piece must start at.
    next: u64,
    control: ShellControl,
    /// Set by the forwarder once `ShellExited` was queued.
    done: Arc<AtomicBool>,
}

/// The shells of one session. Dropping it hangs every one of them up.
#[derive(Default)]
pub struct Shells {
    routes: HashMap<RequestId, Route>,
}

fn error(req: RequestId, kind: ErrorKind, message: impl Into<String>) -> ErrorReport {
    ErrorReport {
        req: Some(req),
        build: None,
        kind,
        message: message.into(),
    }
}

fn os(b: &wire::Bytes) -> OsString {
    OsString::from_vec(b.to_vec())
}

impl Shells {
    /// Opens shell `req` as `spec` says; `ShellOpened` is queued before any output.
    pub async fn open(
        &mut self,
        builds: &Arc<Builds>,
        req: RequestId,
        spec: wire::ShellSpec,
        out: Outbox,
    ) -> Result<(), ErrorReport> {
        self.routes.retain(|_, r| !r.done.load(Ordering::SeqCst));
        if self.routes.contains_key(&req) {
            return Err(error(
                req,
                ErrorKind::BadRequest,
                format!("shell {req} is already open in this session"),
            ));
        }
        let place = match &spec.build {
            Some(id) => Some(builds.shell_place(req, id)?),
            None => None,
        };
        let (cwd, base_env) = match &place {
            Some(p) => {
                let cwd = tether_executor::workdir::resolve(&p.cwd, p.workdir.as_deref()).map_err(|e| {
                    let mut report = super::builds::start_error(req, e);
                    report.build = spec.build.clone();
                    report
                })?;
                (cwd, p.env.to_vec())
            }
            None => (
                std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
                std::env::vars_os().collect(),
            ),
        };
        let mut env: Vec<(OsString, OsString)> = base_env;
        for var in &spec.env {
            let (k, v) = (os(&var.name), os(&var.value));
            env.retain(|(ek, _)| *ek != k);
            env.push((k, v));
        }
        let exec_spec = ShellSpec {
            argv: spec.argv.as_ref().map(|a| a.iter().map(os).collect()),
            shell: spec.shell.as_ref().map(|s| PathBuf::from(os(s))),
            env,
            cwd,
            tty: spec.tty.map(|s| WindowSize {
                rows: s.rows,
                cols: s.cols,
            }),
            grace: SHELL_GRACE,
            confine: place.as_ref().map(|p| p.confine).unwrap_or_default(),
        };
        let shell = builds
            .executor()
            .shell(exec_spec, place.as_ref().map(|p| &p.attachments))
            .map_err(|e| {
                let mut report = super::builds::start_error(req, e);
                report.build = spec.build.clone();
                report
            })?;
        tracing::info!(shell = req, pid = shell.pid, program = %shell.program.display(), build = ?spec.build, tty = spec.tty.is_some(), "shell opened");
        out.control(DaemonMessage::ShellOpened {
            req,
            pid: shell.pid,
            program: convert::path_bytes(&shell.program),
            build: spec.build.clone(),
        })
        .await;
        let (tx, rx) = mpsc::unbounded_channel();
        let pending = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let ack = move |consumed| DaemonMessage::ShellInputAck { shell: req, consumed };
        builds.spawn_task(input::pump(
            format!("shell {req}"),
            shell.input,
            rx,
            Arc::clone(&pending),
            ack,
            out.clone(),
        ));
        let secrets = place.map(|p| p.secrets).unwrap_or_default();
        builds.spawn_task(forward(
            req,
            shell.events,
            shell.control.clone(),
            out,
            builds.stopping(),
            Arc::clone(&done),
            secrets,
        ));
        self.routes.insert(
            req,
            Route {
                tx,
                pending,
                next: 0,
                control: shell.control,
                done,
            },
        );
        Ok(())
    }

    fn route(&mut self, shell: RequestId) -> Result<&mut Route, ErrorReport> {
        self.routes.get_mut(&shell).ok_or_else(|| {
            error(
                shell,
                ErrorKind::BadRequest,
                format!("no shell {shell} in this session (it ended, or was never opened)"),
            )
        })
    }

    /// Queues input for a shell within the window. A piece that does not start where the
    /// previous one ended means input was lost: the shell is hung up rather than fed
    /// keystrokes with a hole in them.
    pub fn input(&mut self, shell: RequestId, offset: u64, data: Vec<u8>, window: u64) -> Result<(), ErrorReport> {
        let route = self.route(shell)?;
        if offset != route.next {
            tracing::warn!(
                shell,
                expected = route.next,
                got = offset,
                "shell input lost in transit; hanging up"
            );
            route.control.hang_up();
            return Err(error(
                shell,
                ErrorKind::Protocol,
                format!(
                    "input bytes {}..{offset} of shell {shell} were lost in transit (a damaged frame); the shell is hung up",
                    route.next
                ),
            ));
        }
        let len = data.len() as u64;
        if route.pending.fetch_add(len, Ordering::SeqCst) + len > window {
            route.pending.fetch_sub(len, Ordering::SeqCst);
            return Err(error(
                shell,
                ErrorKind::BadRequest,
                "shell input window exceeded; data dropped",
            ));
        }
        route.next += len;
        let _ = route.tx.send(InputCmd::Data(data));
        Ok(())
    }

    /// Closes the shell's stdin pipe after the input queued so far (no-op on a terminal).
    pub fn input_end(&mut self, shell: RequestId) -> Result<(), ErrorReport> {
        let route = self.route(shell)?;
        let _ = route.tx.send(InputCmd::End);
        Ok(())
    }

    pub fn resize(&mut self, shell: RequestId, size: wire::WindowSize) -> Result<(), ErrorReport> {
        let route = self.route(shell)?;
        route.control.resize(WindowSize {
            rows: size.rows,
            cols: size.cols,
        });
        Ok(())
    }

    pub fn hang_up(&mut self, shell: RequestId) -> Result<(), ErrorReport> {
        let route = self.route(shell)?;
        tracing::info!(shell, "client hung up its shell");
        route.control.hang_up();
        Ok(())
    }
}

impl Drop for Shells {
    fn drop(&mut self) {
        for (req, route) in &self.routes {
            if !route.done.load(Ordering::SeqCst) {
                tracing::info!(shell = req, "session ended; hanging up its shell");
                route.control.hang_up();
            }
        }
    }
}

/// Moves a shell's output and exit to the session, hanging the shell up when the daemon
/// shuts down or the session is gone.
async fn forward(
    shell: RequestId,
    mut events: mpsc::Receiver<ShellEvent>,
    control: ShellControl,
    out: Outbox,
    stopping: tokio_util::sync::CancellationToken,
    done: Arc<AtomicBool>,
    secrets: Secrets,
) {
    let mut sender = Sender {
        shell,
        out,
        connected: true,
        // A shell in a build sees the build's secrets: its output is masked as the
        // build's is (one masker per stream, with the same bounded hold-back).
        maskers: (!secrets.is_empty()).then(|| [Masker::new(secrets.clone()), Masker::new(secrets)]),
    };
    let mut hung_up = false;
    loop {
        let holding = sender.holding();
        let event = tokio::select! {
            ev = events.recv() => ev,
            _ = stopping.cancelled(), if !hung_up => {
                hung_up = true;
                control.hang_up();
                continue;
            }
            () = tokio::time::sleep(MASK_DELAY), if holding => {
                sender.flush().await;
                continue;
            }
        };
        match event {
            Some(ShellEvent::Output { stream, data }) => sender.output(stream, data).await,
            Some(ShellEvent::Exited(status)) => {
                sender.flush().await;
                let status = convert::exit_status(Some(status));
                tracing::info!(shell, ?status, "shell exited");
                if sender.connected {
                    sender.out.data(DaemonMessage::ShellExited { shell, status }).await;
                }
                break;
            }
            None => break,
        }
    }
    done.store(true, Ordering::SeqCst);
}

/// Sends a shell's output to its session, masked when the shell is in a build with
/// secrets.
struct Sender {
    shell: RequestId,
    out: Outbox,
    /// False once the session is gone (its drop hangs the shell up): output is drained.
    connected: bool,
    /// Stdout's and stderr's.
    maskers: Option<[Masker; 2]>,
}

impl Sender {
    fn holding(&self) -> bool {
        self.maskers.as_ref().is_some_and(|m| m.iter().any(|m| m.pending() > 0))
    }

    async fn output(&mut self, stream: Stream, data: Vec<u8>) {
        let data = match &mut self.maskers {
            Some(maskers) => {
                let mut masked = Vec::with_capacity(data.len());
                maskers[stream_index(stream)].push(&data, &mut masked);
                masked
            }
            None => data,
        };
        self.send(stream, data).await;
    }

    /// Lets out what the maskers hold back.
    async fn flush(&mut self) {
        let Some(maskers) = &mut self.maskers else { return };
        let mut flushed = Vec::new();
        for (stream, masker) in [Stream::Stdout, Stream::Stderr].into_iter().zip(maskers.iter_mut()) {
            let mut data = Vec::new();
            masker.flush(&mut data);
            flushed.push((stream, data));
        }
        for (stream, data) in flushed {
            self.send(stream, data).await;
        }
    }

    async fn send(&mut self, stream: Stream, data: Vec<u8>) {
        if !self.connected || data.is_empty() {
            return;
        }
        let msg = DaemonMessage::ShellOutput {
            shell: self.shell,
            stream: convert::stream(stream),
            data: wire::Bytes::from(data),
        };
        if !self.out.data(msg).await {
            self.connected = false;
        }
    }
}

fn stream_index(stream: Stream) -> usize {
    match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}
