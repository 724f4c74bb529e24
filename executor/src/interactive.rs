//! Interactive shells (or any argv) run for a user, in a pseudo-terminal or with pipes.
//!
//! When the user's stdin is a terminal the shell gets a new pty ([`crate::pty`]): it runs
//! as the leader of a new session whose controlling terminal is the pty's slave, so it
//! prompts, edits lines, runs jobs in process groups of their own and turns `^C` into
//! SIGINT for the foreground job, all in the kernel's terminal driver. Otherwise (input
//! from a file or a pipe) stdin, stdout and stderr are plain pipes, as for a build.
//!
//! Keystroke latency matters more than throughput here: every read is forwarded the
//! moment it returns (no batching, no polling), and typed input is written to the master
//! at once. Output is *not* read ahead of a slow consumer: the event queue is bounded and
//! the reader stops reading while it is full, so the shell blocks on its terminal, as it
//! would on a real one whose user pressed `^S`.
//!
//! The lifecycle, one supervisor task per shell:
//!
//! 1. The main process runs until it exits. [`ShellControl::hang_up`] (the client's
//!    connection dropped, the build the shell lives in ends, [`Shell::events`] was
//!    dropped) does what a terminal's hang-up does: SIGHUP and SIGCONT (so stopped jobs
//!    see the SIGHUP) to the shell's process group, then to every other process of its
//!    session; SIGKILL to whatever is left after [`ShellSpec::grace`].
//! 2. After the main process exited, output is read until EOF (EIO on a pty: every
//!    process closed the slave) or until it stays silent for [`DRAIN_WAIT`].
//! 3. Every process still in the session (found through `/proc`, see [`crate::procs`]:
//!    background jobs have process groups of their own, so no `killpg` reaches them all)
//!    gets SIGHUP and SIGCONT, then SIGKILL after the grace period, and is waited for.
//! 4. The rest of the output is read (until EOF or [`DRAIN_WAIT`] of silence), then
//!    [`ShellEvent::Exited`] is sent: the last event. No process of the session runs any
//!    more when it arrives.
//!
//! What escapes: a process that calls `setsid` itself (a daemonizing program) leaves the
//! session and is not found; it survives the shell, as it would survive a logout.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, Instant};

/// Shells attach to builds through these (re-exported here, where shells are started).
pub use crate::attach::Attachments;
use crate::attach::KILL_WAIT;
use crate::build::{StartError, Stream, DRAIN_WAIT};
use crate::confine::Confinement;
use crate::procs;
use crate::pty::{self, AsyncMaster, WindowSize};
use crate::reaper::{ChildStatus, Reaper};
use crate::spawn::SpawnRequest;

/// Events buffered between the output readers and the consumer (see the module doc on
/// back-pressure).
const EVENT_QUEUE: usize = 16;

/// What to run, and how.
#[derive(Debug, Clone)]
pub struct ShellSpec {
    /// `None`: the shell found as builds find theirs ([`crate::shell::find_shell`] with
    /// the env's PATH and the executor's fallback shells), run with no arguments
    /// (interactive because its stdin is a tty). `Some(argv)`: that argv, `argv[0]`
    /// resolved in the env's PATH.
    pub argv: Option<Vec<OsString>>,
    /// Used instead of finding a shell when `argv` is `None`.
    pub shell: Option<PathBuf>,
    /// The complete environment (the caller composes it).
    pub env: Vec<(OsString, OsString)>,
    /// Must be an existing directory.
    pub cwd: PathBuf,
    /// `Some`: run in a new pty of that size; `None`: stdin, stdout and stderr are pipes.
    pub tty: Option<WindowSize>,
    /// Between SIGHUP and SIGKILL when the shell is hung up or leaves processes behind.
    pub grace: Duration,
    /// The user and limits it runs with (a shell in a build gets the build's).
    pub confine: Confinement,
}

/// A running shell.
#[derive(Debug)]
pub struct Shell {
    pub pid: u32,
    /// What was executed: the resolved path of `argv[0]`, or the shell found.
    pub program: PathBuf,
    pub input: ShellInput,
    /// Output in order, then exactly one [`ShellEvent::Exited`], last. Dropping it hangs
    /// the shell up: nobody would see what it does.
    pub events: mpsc::Receiver<ShellEvent>,
    pub control: ShellControl,
}

/// What a shell reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShellEvent {
    /// Output as it was read; everything a pty's processes write is `Stream::Stdout`.
    Output { stream: Stream, data: Vec<u8> },
    /// The main process's status, after every process of the session is gone and the
    /// output is drained.
    Exited(ChildStatus),
}

/// Where the user's input goes: the pty's master (a dup of it) or the stdin pipe.
#[derive(Debug)]
pub struct ShellInput {
    /// `None` once closed.
    inner: Option<Input>,
}

#[derive(Debug)]
enum Input {
    Pty(AsyncMaster),
    Pipe(pipe::Sender),
}

impl ShellInput {
    /// Writes all of `data`; waits while the terminal's input queue (or the pipe) is full.
    /// Fails once the shell's side is gone (EIO on a pty, EPIPE on a pipe) or after
    /// [`ShellInput::close`].
    pub async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match &mut self.inner {
            Some(Input::Pty(master)) => pty::write_all(master, data).await,
            Some(Input::Pipe(pipe)) => pipe.write_all(data).await,
            None => Err(io::Error::new(io::ErrorKind::BrokenPipe, "the shell's input is closed")),
        }
    }

    /// The end of the input. On pipes this closes the shell's stdin (it reads EOF). A
    /// terminal has no end of input: a program reads EOF only when the user types `^D`
    /// (the terminal's EOF character) at the start of a line, which is data, sent with
    /// [`ShellInput::write_all`] like any keystroke. So on a pty `close` sends nothing;
    /// it only drops this copy of the master, and later writes fail.
    pub fn close(&mut self) {
        self.inner = None;
    }
}

/// Resizes or hangs up a shell. Cheap to clone; outlives the shell harmlessly.
#[derive(Clone, Debug)]
pub struct ShellControl {
    tx: mpsc::UnboundedSender<Control>,
    /// The pty's master, while the output reader holds it; `None` with pipes.
    master: Option<Weak<AsyncFd<OwnedFd>>>,
    /// Becomes true once no process of the shell's session runs any more.
    gone: watch::Receiver<bool>,
    sid: i32,
    grace: Duration,
}

#[derive(Debug, Clone, Copy)]
enum Control {
    HangUp,
}

impl ShellControl {
    /// Sets the terminal's size (the shell's foreground job gets SIGWINCH). A no-op with
    /// pipes and once the shell's output ended. (TIOCSWINSZ on an open master does not
    /// fail; should it, the shell keeps its old size, which is logged.)
    pub fn resize(&self, size: WindowSize) {
        if let Some(master) = self.master.as_ref().and_then(Weak::upgrade) {
            if let Err(e) = pty::set_window_size(master.get_ref().as_fd(), size) {
                tracing::warn!(sid = self.sid, error = %e, ?size, "cannot resize a shell's terminal");
            }
        }
    }

    /// Hangs the shell up: SIGHUP and SIGCONT to every process of its session now,
    /// SIGKILL after the grace period to whatever is left (module doc, step 1). The
    /// shell's events continue up to [`ShellEvent::Exited`] as usual.
    pub fn hang_up(&self) {
        // A send error means the shell already ended.
        let _ = self.tx.send(Control::HangUp);
    }

    /// Resolves once no process of the shell's session runs any more (before the rest
    /// of the output and [`ShellEvent::Exited`] are delivered).
    pub async fn gone(&self) {
        // A supervisor that went away (its runtime shut down) waits for nothing either.
        let _ = self.gone.clone().wait_for(|gone| *gone).await;
    }

    pub(crate) fn is_gone(&self) -> bool {
        *self.gone.borrow() || self.gone.has_changed().is_err()
    }

    /// The shell's session id: its main process's pid.
    pub(crate) fn sid(&self) -> i32 {
        self.sid
    }

    pub(crate) fn grace(&self) -> Duration {
        self.grace
    }
}

/// What the executor hands [`start`] beyond the spec.
pub(crate) struct ShellLaunch<'a> {
    pub reaper: &'a Reaper,
    pub fallback_shells: &'a [PathBuf],
    pub chunk_size: usize,
}

/// The output side of the shell, registered with the runtime before the spawn.
enum Outputs {
    Pty(AsyncMaster),
    Pipes {
        stdout: pipe::Receiver,
        stderr: pipe::Receiver,
    },
}

/// Starts the shell and its supervisor; on error nothing is left running.
pub(crate) fn start(spec: ShellSpec, launch: ShellLaunch<'_>) -> Result<Shell, StartError> {
    if !spec.cwd.is_dir() {
        return Err(StartError::BadWorkdir {
            path: spec.cwd.clone(),
            reason: "not an existing directory".into(),
        });
    }
    let path_var = spec.env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_os_str());
    let (program, argv) = match &spec.argv {
        Some(argv) => {
            let first = argv.first().filter(|a| !a.is_empty()).ok_or(StartError::EmptyCommand)?;
            let program = crate::spawn::resolve(first, path_var).map_err(|e| crate::build::start_error(first, e))?;
            (program, argv.clone())
        }
        None => {
            let shell = match &spec.shell {
                Some(shell) => crate::spawn::resolve(shell.as_os_str(), path_var)
                    .map_err(|e| crate::build::start_error(shell.as_os_str(), e))?,
                None => {
                    let fallbacks: Vec<&Path> = launch.fallback_shells.iter().map(|p| p.as_path()).collect();
                    crate::shell::find_shell(path_var, &fallbacks).ok_or(StartError::NoShell)?
                }
            };
            (shell.clone(), vec![shell.into_os_string()])
        }
    };

    // Everything that can fail is set up before the spawn, so a failure leaves no process.
    let (outputs, input, slave, child_fds) = match spec.tty {
        Some(size) => {
            let pty = pty::open_pty(size)?;
            let input = pty::register(pty.master.try_clone()?, Interest::WRITABLE)?;
            let master = pty::register(pty.master, Interest::READABLE)?;
            (Outputs::Pty(master), Input::Pty(input), Some(pty.slave_path), None)
        }
        None => {
            let (in_r, in_w) = crate::spawn::pipe()?;
            let (out_r, out_w) = crate::spawn::pipe()?;
            let (err_r, err_w) = crate::spawn::pipe()?;
            let outputs = Outputs::Pipes {
                stdout: pipe::Receiver::from_owned_fd(out_r)?,
                stderr: pipe::Receiver::from_owned_fd(err_r)?,
            };
            (
                outputs,
                Input::Pipe(pipe::Sender::from_owned_fd(in_w)?),
                None,
                Some([in_r, out_w, err_w]),
            )
        }
    };
    let (stdin, stdout, stderr) = match &child_fds {
        Some([i, o, e]) => (Some(i.as_raw_fd()), o.as_raw_fd(), e.as_raw_fd()),
        // Not used: the child opens the slave as all three.
        None => (None, -1, -1),
    };
    let request = SpawnRequest {
        program: program.as_os_str(),
        argv: &argv,
        env: &spec.env,
        cwd: &spec.cwd,
        stdin,
        stdout,
        stderr,
        tty: slave.as_deref(),
        confine: Some(&spec.confine),
    };
    let (pid, status) = launch
        .reaper
        .spawn_with(|| crate::spawn::spawn(&request))
        .map_err(|e| crate::build::start_error(program.as_os_str(), e))?;
    // The child holds its own copies now; ours of its ends must go, or EOF never comes.
    drop(child_fds);

    let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
    let (finishing_tx, finishing) = watch::channel(false);
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let (gone_tx, gone) = watch::channel(false);
    let chunk = launch.chunk_size;
    let (readers, master) = match outputs {
        Outputs::Pty(master) => {
            let weak = std::sync::Arc::downgrade(&master);
            let reader = tokio::spawn(read_output(
                Stream::Stdout,
                Source::Pty(master),
                events_tx.clone(),
                finishing.clone(),
                chunk,
            ));
            (vec![reader], Some(weak))
        }
        Outputs::Pipes { stdout, stderr } => {
            let readers = [(Stream::Stdout, stdout), (Stream::Stderr, stderr)]
                .into_iter()
                .map(|(stream, rx)| {
                    tokio::spawn(read_output(
                        stream,
                        Source::Pipe(rx),
                        events_tx.clone(),
                        finishing.clone(),
                        chunk,
                    ))
                })
                .collect();
            (readers, None)
        }
    };
    let supervisor = Supervisor {
        sid: pid,
        grace: spec.grace,
        reaper: launch.reaper.clone(),
    };
    tokio::spawn(supervisor.run(status, control_rx, finishing_tx, readers, events_tx, gone_tx));
    Ok(Shell {
        pid: pid as u32,
        program,
        input: ShellInput { inner: Some(input) },
        events,
        control: ShellControl {
            tx: control_tx,
            master,
            gone,
            sid: pid,
            grace: spec.grace,
        },
    })
}

/// One output stream: the pty's master, or a pipe.
enum Source {
    Pty(AsyncMaster),
    Pipe(pipe::Receiver),
}

impl Source {
    /// Reads what is there; `Ok(0)` at the end (EIO on a pty, EOF on a pipe).
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Source::Pty(master) => pty::read(master, buf).await,
            Source::Pipe(rx) => rx.read(buf).await,
        }
    }
}

/// Forwards each read as an event as soon as it returns. Once `finishing` is set, stops
/// after [`DRAIN_WAIT`] of silence (a process that escaped the session may hold the
/// terminal or the pipe open forever).
async fn read_output(
    stream: Stream,
    mut source: Source,
    tx: mpsc::Sender<ShellEvent>,
    mut finishing: watch::Receiver<bool>,
    chunk: usize,
) {
    let mut buf = vec![0u8; chunk];
    let mut consumer = true;
    loop {
        let read = if *finishing.borrow() {
            match tokio::time::timeout(DRAIN_WAIT, source.read(&mut buf)).await {
                Ok(r) => r,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                r = source.read(&mut buf) => r,
                changed = finishing.changed() => {
                    if changed.is_err() {
                        break; // the supervisor is gone: nobody will drain the rest
                    }
                    continue;
                }
            }
        };
        let n = match read {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, ?stream, "reading a shell's output failed");
                break;
            }
        };
        let event = ShellEvent::Output {
            stream,
            data: buf[..n].to_vec(),
        };
        // The send waits while the queue is full: the back-pressure. A consumer that went
        // away gets nothing more, but the output is still drained so nothing blocks on it.
        if consumer && tx.send(event).await.is_err() {
            consumer = false;
        }
    }
}

struct Supervisor {
    /// The main process's pid, which is also its session id and process group id.
    sid: i32,
    grace: Duration,
    reaper: Reaper,
}

impl Supervisor {
    async fn run(
        self,
        mut status_rx: oneshot::Receiver<ChildStatus>,
        mut control: mpsc::UnboundedReceiver<Control>,
        finishing: watch::Sender<bool>,
        readers: Vec<JoinHandle<()>>,
        events: mpsc::Sender<ShellEvent>,
        gone: watch::Sender<bool>,
    ) {
        let mut kill_at: Option<Instant> = None;
        let mut killed = false;
        let mut control_open = true;
        let mut consumer = true;

        // 1. Until the main process exits.
        let status = loop {
            tokio::select! {
                st = &mut status_rx => break st,
                msg = control.recv(), if control_open => match msg {
                    Some(Control::HangUp) => {
                        kill_at.get_or_insert_with(|| self.hang_up());
                    }
                    None => control_open = false,
                },
                _ = events.closed(), if consumer => {
                    consumer = false;
                    kill_at.get_or_insert_with(|| self.hang_up());
                }
                _ = sleep_until_opt(kill_at), if !killed => {
                    self.kill();
                    killed = true;
                }
            }
        };
        let status = status.unwrap_or_else(|_| {
            // The reaper never drops a registered pid's sender; should it, the process
            // is gone (step 3 makes sure) and its status unknown.
            tracing::error!(pid = self.sid, "the reaper went away before the shell's status arrived");
            ChildStatus::Signaled {
                signal: libc::SIGKILL,
                core_dumped: false,
            }
        });

        // 2. Give the output a moment to reach its end on its own.
        let all_read = async {
            for reader in readers {
                let _ = reader.await;
            }
        };
        tokio::pin!(all_read);
        let drained = tokio::select! {
            _ = &mut all_read => true,
            _ = sleep(DRAIN_WAIT) => false,
        };

        // 3. Whatever is left of the session is ended.
        self.end_leftovers(kill_at, killed).await;
        let _ = gone.send(true);

        // 4. Drain the rest; the readers now stop after DRAIN_WAIT of silence.
        let _ = finishing.send(true);
        if !drained {
            all_read.await;
        }
        let _ = events.send(ShellEvent::Exited(status)).await;
    }

    /// What a terminal's hang-up does, to the whole session ([`procs::hang_up_session`]).
    /// Returns when SIGKILL is due.
    fn hang_up(&self) -> Instant {
        procs::hang_up_session(self.sid);
        Instant::now() + self.grace
    }

    fn kill(&self) {
        procs::signal_session(self.sid, Signal::SIGKILL);
    }

    /// Ends every process still running in the session after the main process exited:
    /// a hang-up, SIGKILL when `kill_at` (or the grace period) passes, at once when an
    /// earlier hang-up already `killed`; then waits until none runs.
    async fn end_leftovers(&self, kill_at: Option<Instant>, mut killed: bool) {
        if procs::live_session_members(self.sid).is_empty() {
            return;
        }
        // Signalled again even after an earlier hang-up: a member may be new.
        let hung_up = self.hang_up();
        let kill_at = kill_at.unwrap_or(hung_up);
        let mut reaped = self.reaper.reaped();
        loop {
            if killed {
                // A member may have forked just before it died.
                self.kill();
            }
            if procs::live_session_members(self.sid).is_empty() {
                return;
            }
            if killed && Instant::now() > kill_at + KILL_WAIT {
                tracing::error!(sid = self.sid, "processes of a shell's session survive SIGKILL");
                return;
            }
            tokio::select! {
                _ = reaped.changed() => {}
                // Processes re-parented to another reaper do not show up in `reaped`.
                _ = sleep(Duration::from_millis(20)) => {}
                _ = sleep_until(kill_at), if !killed => killed = true,
            }
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}
