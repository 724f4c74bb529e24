//! One build's lifecycle: spawn in a new session, stream output, stop, drain, clean up.
//!
//! The supervisor task owns the build from spawn to its [`BuildOutcome`]:
//!
//! 1. The main process runs; the supervisor waits for its status (from the reaper), the
//!    timeout, or a cancel. Cancel and timeout send SIGTERM to the whole process group
//!    and SIGKILL after the grace period (at once for a forced cancel).
//! 2. After the main process exits, output is drained until both pipes reach EOF or
//!    [`DRAIN_WAIT`] passes (a background grandchild may hold them open).
//! 3. Processes still in the group are leftovers of the build: they get SIGTERM, then
//!    SIGKILL after the grace period. No process of the build survives it.
//! 4. The pipes are read until EOF, or until they stay silent for [`DRAIN_WAIT`] (a
//!    process that escaped the group may hold them forever).
//! 5. With [`BuildSpec::hold_after`], the build is *held*: [`BuildEvent::Held`] reports
//!    its status (after every output chunk) while its directory stays, so a client can
//!    take files out of it, until [`BuildControl::release`], a cancel, or the hold's
//!    time runs out. A release may replace the status the build finishes with.
//!    [`BuildSpec::hold_on_failure`] holds the same way, but only a build that failed
//!    (a status other than exit 0, or a timeout) and was not cancelled: a user who
//!    stopped a build does not want it kept. When both apply, the longer hold wins.
//! 6. Interactive shells attached to the build ([`Build::attachments`], `tether shell
//!    --build`) run in its directory, in sessions of their own that steps 1 and 3 do not
//!    reach: each still alive is hung up (SIGHUP, SIGKILL after its grace period) and
//!    waited for, so no process works in a directory being removed. Then the private
//!    directory is removed, and [`BuildEvent::Finished`] is sent: the last event, after
//!    every output chunk. Once the hang-up began no shell can attach any more; a
//!    [`crate::Prepared`] that is dropped instead of started kills its shells at once.
//!
//! Output goes through the build's *spooler*, a thread of its own: the pipe readers hand
//! it chunks, it appends them to the build's [`Spool`] (assigning each its build-wide
//! position), and only then passes them on as events. So every position an event names
//! is already readable from the spool: a consumer that drops events (a client that fell
//! behind) can always continue from the spool. The spooler writes the final status to
//! the spool before passing [`BuildEvent::Finished`] on. Disk writes happen on that
//! thread (one of the runtime's blocking pool, held for the build's life), never on the
//! runtime thread that reads the pipes.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep, sleep_until};

use crate::attach::Attachments;
use crate::confine::Confinement;
use crate::mask::{Masker, Secrets};
use crate::reaper::{ChildStatus, Reaper};
use crate::spawn::{SpawnError, SpawnRequest};
use crate::spool::{Spool, SpoolSet, SpoolWriter};
use crate::statedir::BuildDir;
use crate::status::{BuildOutcome, EndCause};

/// How long silent pipes are waited for once the main process has exited.
pub const DRAIN_WAIT: Duration = Duration::from_millis(100);

/// Events buffered between the pipe readers and the consumer. When the consumer falls
/// behind, the readers stop reading and the build blocks on its full pipe.
const EVENT_QUEUE: usize = 16;

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandSpec {
    /// Executed directly, `argv[0]` looked up in the build's PATH.
    Argv(Vec<OsString>),
    /// Run as `SHELL -c SCRIPT`; `shell: None` finds one ([`crate::shell::find_shell`]).
    Script { script: OsString, shell: Option<PathBuf> },
}

/// How long a reader holds back output that could be the start of a secret while the
/// build writes nothing more ([`crate::mask`]): long enough for the rest of a write split
/// across reads to arrive, short enough not to be noticed on a prompt without a newline.
pub const MASK_DELAY: Duration = Duration::from_millis(50);

/// Largest batch of output the spooler writes at once.
const SPOOL_BATCH: usize = 1024 * 1024;

/// Everything the executor needs to start a build.
#[derive(Debug, Clone)]
pub struct BuildSpec {
    /// The build's id, when the caller chose one (it must be a valid file name and
    /// unique among the executor's spools); otherwise the directory name is used.
    pub id: Option<String>,
    /// Used in the build's directory name (sanitized) and generated id; defaults to "build".
    pub name: Option<String>,
    pub command: CommandSpec,
    /// Set on top of the executor's base environment.
    pub env: Vec<(OsString, OsString)>,
    /// Where to run: a relative directory inside the work dir (created if missing), or
    /// an absolute, shared one ([`crate::workdir`]).
    pub workdir: Option<PathBuf>,
    pub timeout: Option<Duration>,
    /// Between SIGTERM and SIGKILL; `None` for the executor's default.
    pub grace: Option<Duration>,
    /// Give the build a stdin pipe ([`Build::stdin`]) instead of /dev/null.
    pub stdin: bool,
    /// Keep the directory after the command ended, for at most this long, until
    /// [`BuildControl::release`] (see the module doc, step 5).
    pub hold_after: Option<Duration>,
    /// Like `hold_after`, but only when the build failed: its status is not exit 0, or
    /// it timed out; never when it was cancelled.
    pub hold_on_failure: Option<Duration>,
    /// Masked in the build's output before it is spooled or sent ([`crate::mask`]).
    pub secrets: Secrets,
    /// The user the build (and shells opened in it) run as, and their resource limits
    /// ([`crate::confine`]); the private directory is given to that user before the
    /// command starts. The caller checks it ([`Confinement::check`]) first.
    pub confine: Confinement,
}

/// Which output stream a chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A block of output; `offset` is the build-wide position of its first byte (both
/// streams share one position space, in the order the chunks were read; see
/// [`crate::spool`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    pub stream: Stream,
    pub offset: u64,
    pub data: Vec<u8>,
}

/// What a build reports, in order: output chunks, at most one `Held` (only with
/// [`BuildSpec::hold_after`]), then exactly one `Finished`.
#[derive(Debug, Clone)]
pub enum BuildEvent {
    Output(OutputChunk),
    /// Output at positions `[from, to)` could not be written to the spool (the disk is
    /// full, say): it is lost, for every consumer alike, and the spool shows the same gap.
    Gap {
        from: u64,
        to: u64,
    },
    Held(Held),
    Finished(BuildOutcome),
}

/// A build whose command ended and whose directory is kept until it is released.
#[derive(Debug, Clone, Copy)]
pub struct Held {
    /// The main process's status (`None` as in [`BuildOutcome::status`]).
    pub status: Option<ChildStatus>,
    pub cause: EndCause,
    /// How long the hold lasts at most.
    pub hold: Duration,
}

/// What a [`BuildControl`] asks the supervisor.
#[derive(Debug, Clone, Copy)]
enum Control {
    Cancel { force: bool },
    Release(Option<ChildStatus>),
}

/// Why a build could not start. Nothing is left behind when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("command not found: {program}")]
    NotFound { program: String },
    #[error("cannot execute {program}: {source}")]
    NotExecutable { program: String, source: io::Error },
    #[error("no shell found (tried sh on PATH, {})", crate::shell::FALLBACK_SHELLS.join(", "))]
    NoShell,
    #[error("empty command")]
    EmptyCommand,
    #[error("an argument or environment variable contains a NUL byte")]
    Nul,
    #[error("bad workdir {path:?}: {reason}")]
    BadWorkdir { path: PathBuf, reason: String },
    #[error("cannot create the build directory: {0}")]
    BuildDir(String),
    #[error("cannot give the build directory to uid {uid}: {source}")]
    GiveDir { uid: u32, source: io::Error },
    #[error("build id {0:?} is already in use")]
    IdInUse(String),
    #[error("cannot create the build's output spool: {0}")]
    Spool(io::Error),
    #[error("cannot start the build: {0}")]
    Io(#[from] io::Error),
}

/// Stops a build. Cheap to clone; outlives the build harmlessly.
#[derive(Clone, Debug)]
pub struct BuildControl {
    tx: mpsc::UnboundedSender<Control>,
    /// One per stream (stdout, stderr): set to stop reading that pipe.
    close: std::sync::Arc<[watch::Sender<bool>; 2]>,
}

impl BuildControl {
    /// SIGTERM to the group, SIGKILL after the grace period; `force`: SIGKILL now.
    pub fn cancel(&self, force: bool) {
        // A send error means the build already finished.
        let _ = self.tx.send(Control::Cancel { force });
    }

    /// Ends a hold ([`BuildEvent::Held`]): the directory is removed and the build
    /// finishes with `status`, or with its own when `None`. Ignored unless held; a
    /// cancel ends a hold too.
    pub fn release(&self, status: Option<ChildStatus>) {
        let _ = self.tx.send(Control::Release(status));
    }

    /// Stops reading one of the build's output streams and closes tether's end of its
    /// pipe, so the build's next write there fails with EPIPE (SIGPIPE by default), as in
    /// a local pipeline whose reader went away (`tether run -- yes | head -1`).
    pub fn close_output(&self, stream: Stream) {
        let _ = self.close[stream_index(stream)].send(true);
    }
}

fn stream_index(stream: Stream) -> usize {
    match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

/// The write end of a build's stdin. Dropping it closes the build's stdin.
#[derive(Debug)]
pub struct BuildStdin {
    pipe: pipe::Sender,
}

impl BuildStdin {
    /// Writes all of `data`; fails with `BrokenPipe` once the build closed its stdin.
    pub async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.pipe.write_all(data).await
    }
}

/// A running build.
#[derive(Debug)]
pub struct Build {
    pub id: String,
    pub pid: u32,
    /// The shell running the script, for script commands.
    pub shell: Option<PathBuf>,
    /// The build's cwd: its private work dir, or `workdir` inside it.
    pub work_dir: PathBuf,
    /// The build's private work dir itself.
    pub work_root: PathBuf,
    pub stdin: Option<BuildStdin>,
    pub events: mpsc::Receiver<BuildEvent>,
    pub control: BuildControl,
    /// The build's output on disk, readable from any position while the build runs and
    /// after it finished (until removed).
    pub spool: Spool,
    /// The exact environment the build's process got (the executor's base, the spec's
    /// variables, tether's own), for shells opened in the build.
    pub env: Arc<[(OsString, OsString)]>,
    /// Interactive shells running in the build's directory; hung up before it is removed.
    pub attachments: Attachments,
    /// The spec's confinement and secrets, for shells opened in the build: they run as
    /// its command does, and their output is masked as its output is.
    pub confine: Confinement,
    pub secrets: Secrets,
}

/// What the executor hands [`spawn`] beyond the spec.
pub(crate) struct Launch<'a> {
    pub reaper: &'a Reaper,
    pub spools: &'a std::sync::Arc<SpoolSet>,
    pub dir: BuildDir,
    pub id: String,
    /// The build's complete environment ([`build_env`]).
    pub env: Arc<[(OsString, OsString)]>,
    /// Its [`crate::hunt::COOKIE_VAR`] value.
    pub cookie: OsString,
    pub attachments: Attachments,
    pub fallback_shells: &'a [PathBuf],
    pub default_grace: Duration,
    pub chunk_size: usize,
}

/// Starts the build; on error the directory and the spool are removed again.
pub(crate) fn spawn(spec: BuildSpec, launch: Launch<'_>) -> Result<Build, StartError> {
    let result = start_spooler(&launch).and_then(|spooler| {
        let ready = prepare_and_spawn(&spec, &launch);
        match ready {
            Ok(ready) => Ok((spooler, ready)),
            Err(e) => {
                spooler.spool.remove();
                Err(e)
            }
        }
    });
    match result {
        Ok((spooler, ready)) => Ok(supervise(spec, launch, spooler, ready)),
        Err(e) => {
            // Shells opened in the prepared build's directory go with it.
            launch.attachments.kill_all();
            if let Err(ce) = launch.dir.remove() {
                tracing::warn!(error = %ce, "cannot remove the directory of a build that failed to start");
            }
            Err(e)
        }
    }
}

/// What the pipe readers and the supervisor hand the spooler.
enum SpoolCmd {
    Chunk(Stream, Vec<u8>),
    Held(Held),
    Finish(BuildOutcome),
}

struct Spooler {
    spool: Spool,
    tx: mpsc::Sender<SpoolCmd>,
    events: mpsc::Receiver<BuildEvent>,
}

/// Creates the build's spool and starts its spooler thread.
fn start_spooler(launch: &Launch<'_>) -> Result<Spooler, StartError> {
    let (spool, writer) = launch.spools.create(&launch.id).map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists => StartError::IdInUse(launch.id.clone()),
        _ => StartError::Spool(e),
    })?;
    let (tx, rx) = mpsc::channel(EVENT_QUEUE);
    let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
    // On the runtime's blocking pool: its threads are reused from build to build, so a
    // build's start costs no thread creation (nor a new malloc arena per thread).
    tokio::task::spawn_blocking(move || run_spooler(writer, rx, events_tx));
    Ok(Spooler { spool, tx, events })
}

/// The spooler thread: appends batches of chunks, then forwards them as events.
fn run_spooler(mut writer: SpoolWriter, mut rx: mpsc::Receiver<SpoolCmd>, events: mpsc::Sender<BuildEvent>) {
    let mut batch: Vec<(Stream, Vec<u8>)> = Vec::new();
    let mut finish = None;
    // A consumer that went away stops receiving; the build is spooled all the same.
    let mut consumer = true;
    while finish.is_none() {
        let Some(first) = rx.blocking_recv() else { break };
        let mut bytes = 0;
        let mut next = Some(first);
        let mut held = None;
        while let Some(cmd) = next.take() {
            match cmd {
                SpoolCmd::Chunk(stream, data) => {
                    bytes += data.len();
                    batch.push((stream, data));
                }
                SpoolCmd::Held(h) => {
                    held = Some(h);
                    break;
                }
                SpoolCmd::Finish(outcome) => {
                    finish = Some(outcome);
                    break;
                }
            }
            if bytes < SPOOL_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            let refs: Vec<(Stream, &[u8])> = batch.iter().map(|(s, d)| (*s, d.as_slice())).collect();
            let mut offset = writer.append(&refs);
            // What the spool could not take is a gap for the consumer too: every reader,
            // live or later, sees the same. A failed range covers whole chunks.
            let failed = writer.take_failed();
            let mut out = Vec::with_capacity(batch.len());
            for (stream, data) in batch.drain(..) {
                let len = data.len() as u64;
                if failed.iter().any(|&(from, to)| from <= offset && offset < to) {
                    match out.last_mut() {
                        Some(BuildEvent::Gap { to, .. }) if *to == offset => *to = offset + len,
                        _ => out.push(BuildEvent::Gap {
                            from: offset,
                            to: offset + len,
                        }),
                    }
                } else {
                    out.push(BuildEvent::Output(OutputChunk { stream, offset, data }));
                }
                offset += len;
            }
            for ev in out {
                if consumer && events.blocking_send(ev).is_err() {
                    consumer = false;
                }
            }
        }
        if let Some(h) = held {
            if consumer && events.blocking_send(BuildEvent::Held(h)).is_err() {
                consumer = false;
            }
        }
    }
    let Some(outcome) = finish else {
        // The build's tasks went away without a result (the runtime shut down).
        return;
    };
    if let Err(e) = writer.finish(&outcome.status_json()) {
        tracing::warn!(error = %e, "cannot write the build's status file");
    }
    if consumer {
        let _ = events.blocking_send(BuildEvent::Finished(outcome));
    }
}

struct Spawned {
    pid: u32,
    shell: Option<PathBuf>,
    cwd: PathBuf,
    status: oneshot::Receiver<ChildStatus>,
    stdin: Option<OwnedFd>,
    stdout: OwnedFd,
    stderr: OwnedFd,
    started: Instant,
}

fn prepare_and_spawn(spec: &BuildSpec, launch: &Launch<'_>) -> Result<Spawned, StartError> {
    let cwd = crate::workdir::resolve(&launch.dir.work, spec.workdir.as_deref())?;
    if let Some(user) = spec.confine.user {
        crate::owner::give_tree(&launch.dir.root, user).map_err(|e| StartError::GiveDir {
            uid: user.uid,
            source: e,
        })?;
    }
    let env = &launch.env;
    let path_var = env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.clone());

    let (program, args, shell): (OsString, Vec<OsString>, Option<PathBuf>) = match &spec.command {
        CommandSpec::Argv(argv) => {
            let (first, rest) = argv.split_first().ok_or(StartError::EmptyCommand)?;
            if first.is_empty() {
                return Err(StartError::EmptyCommand);
            }
            (first.clone(), rest.to_vec(), None)
        }
        CommandSpec::Script { script, shell } => {
            let shell = match shell {
                Some(s) => s.clone(),
                None => {
                    let fallbacks: Vec<&Path> = launch.fallback_shells.iter().map(|p| p.as_path()).collect();
                    crate::shell::find_shell(path_var.as_deref(), &fallbacks).ok_or(StartError::NoShell)?
                }
            };
            (
                shell.clone().into_os_string(),
                vec!["-c".into(), script.clone()],
                Some(shell),
            )
        }
    };

    let (out_r, out_w) = crate::spawn::pipe()?;
    let (err_r, err_w) = crate::spawn::pipe()?;
    let (stdin_r, stdin_w) = if spec.stdin {
        let (r, w) = crate::spawn::pipe()?;
        (Some(r), Some(w))
    } else {
        (None, None)
    };
    let mut argv = Vec::with_capacity(args.len() + 1);
    argv.push(program.clone());
    argv.extend(args);
    let request = SpawnRequest {
        program: &program,
        argv: &argv,
        env,
        cwd: &cwd,
        stdin: stdin_r.as_ref().map(|fd| fd.as_raw_fd()),
        stdout: out_w.as_raw_fd(),
        stderr: err_w.as_raw_fd(),
        tty: None,
        confine: Some(&spec.confine),
    };
    let started = Instant::now();
    let (pid, status) = launch
        .reaper
        .spawn_with(|| crate::spawn::spawn(&request))
        .map_err(|e| start_error(&program, e))?;
    // The child holds its own copies now; ours of its ends must go, or EOF never comes.
    drop((out_w, err_w, stdin_r));
    enlarge_pipe(&out_r);
    enlarge_pipe(&err_r);
    Ok(Spawned {
        pid: pid as u32,
        shell,
        cwd,
        status,
        stdin: stdin_w,
        stdout: out_r,
        stderr: err_r,
        started,
    })
}

/// What a failed spawn of `program` means for the caller.
pub(crate) fn start_error(program: &std::ffi::OsStr, e: SpawnError) -> StartError {
    let program = program.to_string_lossy().into_owned();
    match e {
        SpawnError::NotFound => StartError::NotFound { program },
        SpawnError::NotExecutable(source) => StartError::NotExecutable { program, source },
        SpawnError::Nul => StartError::Nul,
        SpawnError::Other(e) => StartError::Io(e),
    }
}

/// The environment a build's process gets: the executor's `base`, the spec's variables
/// on top, then tether's own (which win: the private tmp dir is the point). Computed
/// once per build ([`crate::Prepared::env`], [`Build::env`]) so that shells opened in
/// the build see exactly what its command saw.
pub(crate) fn build_env(
    base: &[(OsString, OsString)],
    spec_env: &[(OsString, OsString)],
    id: &str,
    tmp: &Path,
    cookie: &std::ffi::OsStr,
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = base.to_vec();
    let tmp = tmp.as_os_str().to_os_string();
    let own = [
        ("TETHER_BUILD_ID", OsString::from(id)),
        (crate::hunt::COOKIE_VAR, cookie.to_os_string()),
        ("TMPDIR", tmp.clone()),
        ("TMP", tmp.clone()),
        ("TEMP", tmp),
    ];
    for (k, v) in spec_env
        .iter()
        .cloned()
        .chain(own.into_iter().map(|(k, v)| (OsString::from(k), v)))
    {
        env.retain(|(ek, _)| *ek != k);
        env.push((k, v));
    }
    env
}

/// Bytes a build's output pipes hold before the build blocks (Linux's default is 64 KiB;
/// larger pipes mean fewer wake-ups per byte when output streams fast).
pub const PIPE_SIZE: i32 = 1024 * 1024;

/// Best effort: enlarges a pipe to [`PIPE_SIZE`]. Refused above the system's
/// `pipe-max-size` or the user's pipe quota, which is fine: the pipe works as it is.
pub fn enlarge_pipe(fd: &impl std::os::fd::AsFd) {
    if let Err(e) = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE)) {
        tracing::debug!(error = %e, "cannot enlarge a pipe");
    }
}

fn supervise(spec: BuildSpec, launch: Launch<'_>, spooler: Spooler, s: Spawned) -> Build {
    let Spooler {
        spool,
        tx: events_tx,
        events: events_rx,
    } = spooler;
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let (finishing_tx, finishing_rx) = watch::channel(false);
    let (close_out, close_out_rx) = watch::channel(false);
    let (close_err, close_err_rx) = watch::channel(false);

    let stdin = s.stdin.and_then(|fd| match pipe::Sender::from_owned_fd(fd) {
        Ok(pipe) => Some(BuildStdin { pipe }),
        Err(e) => {
            tracing::error!(error = %e, "cannot set up the build's stdin pipe");
            None
        }
    });
    let readers = [
        (Stream::Stdout, s.stdout, close_out_rx),
        (Stream::Stderr, s.stderr, close_err_rx),
    ]
    .map(|(stream, fd, close)| {
        let tx = events_tx.clone();
        let finishing = finishing_rx.clone();
        let chunk = launch.chunk_size;
        let masker = (!spec.secrets.is_empty()).then(|| Masker::new(spec.secrets.clone()));
        tokio::spawn(async move {
            match pipe::Receiver::from_owned_fd(fd) {
                Ok(rx) => read_stream(stream, rx, tx, finishing, close, chunk, masker).await,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the build's output pipe");
                    0
                }
            }
        })
    });

    let build = Build {
        id: launch.id.clone(),
        pid: s.pid,
        shell: s.shell,
        work_dir: s.cwd,
        work_root: launch.dir.work.clone(),
        stdin,
        events: events_rx,
        control: BuildControl {
            tx: control_tx,
            close: std::sync::Arc::new([close_out, close_err]),
        },
        spool,
        env: Arc::clone(&launch.env),
        attachments: launch.attachments.clone(),
        confine: spec.confine,
        secrets: spec.secrets.clone(),
    };
    let ctx = Supervisor {
        pgid: Pid::from_raw(s.pid as i32),
        grace: spec.grace.unwrap_or(launch.default_grace),
        timeout: spec.timeout,
        hold_after: spec.hold_after,
        hold_on_failure: spec.hold_on_failure,
        attachments: launch.attachments,
        reaper: launch.reaper.clone(),
        dir: launch.dir,
        id: launch.id,
        cookie: launch.cookie,
        started: s.started,
    };
    tokio::spawn(ctx.run(s.status, control_rx, finishing_tx, readers, events_tx));
    build
}

struct Supervisor {
    pgid: Pid,
    grace: Duration,
    timeout: Option<Duration>,
    hold_after: Option<Duration>,
    hold_on_failure: Option<Duration>,
    attachments: Attachments,
    reaper: Reaper,
    dir: BuildDir,
    id: String,
    /// The value of [`crate::hunt::COOKIE_VAR`] in the build's environment.
    cookie: OsString,
    started: Instant,
}

impl Supervisor {
    async fn run(
        self,
        mut status_rx: oneshot::Receiver<ChildStatus>,
        mut control: mpsc::UnboundedReceiver<Control>,
        finishing: watch::Sender<bool>,
        readers: [tokio::task::JoinHandle<u64>; 2],
        events: mpsc::Sender<SpoolCmd>,
    ) {
        let timeout_at = self.timeout.map(|t| tokio::time::Instant::from_std(self.started) + t);
        let mut cause = EndCause::Completed;
        let mut kill_at: Option<tokio::time::Instant> = None;
        let mut control_open = true;

        // 1. Until the main process exits.
        let status = loop {
            tokio::select! {
                st = &mut status_rx => break st.ok(),
                _ = sleep_until_opt(timeout_at), if kill_at.is_none() && cause == EndCause::Completed => {
                    cause = EndCause::TimedOut;
                    kill_at = Some(self.terminate(false));
                }
                msg = control.recv(), if control_open => match msg {
                    Some(Control::Cancel { force }) => {
                        if cause == EndCause::Completed {
                            cause = EndCause::Cancelled;
                        }
                        if force || kill_at.is_none() {
                            kill_at = Some(self.terminate(force));
                        }
                    }
                    // Nothing to release while the command runs.
                    Some(Control::Release(_)) => {}
                    None => control_open = false,
                },
                _ = sleep_until_opt(kill_at) => {
                    self.signal_group(Signal::SIGKILL);
                    kill_at = Some(far_future());
                }
            }
        };
        if status.is_none() {
            tracing::error!(build = %self.id, "the reaper went away before the build's status arrived");
        }

        // 2. Give the pipes a moment to reach EOF on their own.
        let [out_reader, err_reader] = readers;
        let both = async {
            let (a, b) = tokio::join!(out_reader, err_reader);
            (a.unwrap_or(0), b.unwrap_or(0))
        };
        tokio::pin!(both);
        let mut counts = tokio::select! {
            c = &mut both => Some(c),
            _ = sleep(DRAIN_WAIT) => None,
        };

        // 3. Whatever is left of the group is ended, and so is whatever left the group
        //    (but not the shells attached to the build: a held build keeps them).
        let mut leftovers_killed = self.end_leftovers(kill_at, &mut control).await;
        leftovers_killed |= self.hunt_escapees(self.attachments.sids()).await > 0;

        // 4. Drain the rest; readers now stop after DRAIN_WAIT of silence.
        let _ = finishing.send(true);
        let (stdout_bytes, stderr_bytes) = match counts.take() {
            Some(c) => c,
            None => both.await,
        };

        // 5. Hold the directory for whoever wants files out of it.
        let mut status = status;
        if let Some(hold) = hold_for(self.hold_after, self.hold_on_failure, status, cause) {
            let _ = events.send(SpoolCmd::Held(Held { status, cause, hold })).await;
            if let Some(released) = hold_until_released(hold, &mut control).await {
                status = Some(released);
                cause = EndCause::Released;
            }
        }

        // 6. End the shells working in the directory and whatever escaped meanwhile,
        //    remove the directory, then report.
        self.attachments.hang_up_all().await;
        leftovers_killed |= self.hunt_escapees(Vec::new()).await > 0;
        let dir = self.dir;
        let cleanup_error = if dir.remove_if_empty() {
            None
        } else {
            match tokio::task::spawn_blocking(move || dir.remove()).await {
                Ok(Ok(report)) if report.skipped_mounts.is_empty() => None,
                Ok(Ok(report)) => Some(format!("mount points left in place: {:?}", report.skipped_mounts)),
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(format!("cleanup task failed: {e}")),
            }
        };
        if let Some(e) = &cleanup_error {
            tracing::warn!(build = %self.id, error = %e, "build directory not fully removed");
        }
        let outcome = BuildOutcome {
            status,
            cause,
            duration: self.started.elapsed(),
            stdout_bytes,
            stderr_bytes,
            leftovers_killed,
            cleanup_error,
        };
        // The spooler writes the status and passes the outcome on after every chunk.
        let _ = events.send(SpoolCmd::Finish(outcome)).await;
    }

    /// SIGTERM (or SIGKILL when forced) to the group; returns when SIGKILL is due.
    fn terminate(&self, force: bool) -> tokio::time::Instant {
        if force {
            self.signal_group(Signal::SIGKILL);
            far_future()
        } else {
            self.signal_group(Signal::SIGTERM);
            tokio::time::Instant::now() + self.grace
        }
    }

    fn signal_group(&self, sig: Signal) -> bool {
        match killpg(self.pgid, sig) {
            Ok(()) => true,
            Err(Errno::ESRCH) => false,
            Err(e) => {
                tracing::warn!(build = %self.id, error = %e, signal = ?sig, "cannot signal the build's process group");
                false
            }
        }
    }

    /// Ends the processes still in the group after the main process exited: SIGTERM,
    /// SIGKILL when `kill_at` (or the grace period) passes. Returns whether any existed.
    async fn end_leftovers(
        &self,
        kill_at: Option<tokio::time::Instant>,
        control: &mut mpsc::UnboundedReceiver<Control>,
    ) -> bool {
        if !self.group_alive() {
            return false;
        }
        let mut kill_at = kill_at.unwrap_or_else(|| self.terminate(false));
        // A group member that was SIGTERMed before is signalled again: it may be a new one.
        self.signal_group(Signal::SIGTERM);
        let mut reaped = self.reaper.reaped();
        let mut killed = false;
        while self.group_alive() {
            tokio::select! {
                _ = reaped.changed() => {}
                // Processes re-parented to another reaper do not show up in `reaped`.
                _ = sleep(Duration::from_millis(20)) => {}
                Some(Control::Cancel { force: true }) = control.recv() => kill_at = tokio::time::Instant::now(),
                _ = sleep_until(kill_at), if !killed => {
                    self.signal_group(Signal::SIGKILL);
                    killed = true;
                }
            }
            if killed && tokio::time::Instant::now() > kill_at + Duration::from_secs(5) {
                tracing::error!(build = %self.id, "processes of the build survive SIGKILL");
                break;
            }
        }
        true
    }

    /// Kills the build's processes that left its group ([`crate::hunt`]), sparing the
    /// sessions in `spare`; returns how many. Scans `/proc` only when it can find any.
    async fn hunt_escapees(&self, spare: Vec<i32>) -> usize {
        if !crate::hunt::needed(&self.reaper) {
            return 0;
        }
        let cookie = self.cookie.clone();
        let killed = tokio::task::spawn_blocking(move || crate::hunt::kill_carriers(&cookie, &spare))
            .await
            .unwrap_or(0);
        if killed > 0 {
            tracing::info!(build = %self.id, killed, "killed processes that escaped the build's process group");
        }
        killed
    }

    fn group_alive(&self) -> bool {
        // Signal 0 checks existence; zombies count until reaped.
        matches!(killpg(self.pgid, None), Ok(()) | Err(Errno::EPERM))
    }
}

/// Reads one output pipe until EOF (or until told to stop), masking secrets when
/// `masker` is set, and hands the chunks to the spooler. Returns the bytes handed on
/// (after masking: what the spool and the clients see).
async fn read_stream(
    stream: Stream,
    mut rx: pipe::Receiver,
    tx: mpsc::Sender<SpoolCmd>,
    mut finishing: watch::Receiver<bool>,
    mut close: watch::Receiver<bool>,
    chunk: usize,
    mut masker: Option<Masker>,
) -> u64 {
    let mut offset = 0u64;
    let mut buf = Vec::with_capacity(chunk);
    let mut close_open = true;
    loop {
        buf.clear();
        let holding = masker.as_ref().is_some_and(|m| m.pending() > 0);
        if *close.borrow_and_update() {
            // Dropping `rx` closes our end: the build's next write gets EPIPE.
            break;
        }
        let read = if *finishing.borrow() {
            match tokio::time::timeout(DRAIN_WAIT, rx.read_buf(&mut buf)).await {
                Ok(r) => r,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                r = rx.read_buf(&mut buf) => r,
                changed = close.changed(), if close_open => {
                    // Every BuildControl is gone: nobody can close the stream any more.
                    close_open = changed.is_ok();
                    continue;
                }
                changed = finishing.changed() => {
                    if changed.is_err() {
                        break; // the supervisor is gone: nobody will drain the rest
                    }
                    continue;
                }
                () = tokio::time::sleep(MASK_DELAY), if holding => {
                    // Quiet for the delay: what is held back is let out (never a
                    // whole secret; see crate::mask).
                    offset += flush_masker(masker.as_mut(), stream, &tx).await;
                    continue;
                }
            }
        };
        let n = match read {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, ?stream, "reading build output failed");
                break;
            }
        };
        // Large reads hand over the buffer; small ones are copied so that a queue of
        // short lines does not pin a full chunk each.
        let data = match masker.as_mut() {
            Some(m) => {
                let mut masked = Vec::with_capacity(n + m.pending());
                m.push(&buf[..n], &mut masked);
                masked
            }
            None if n >= chunk / 2 => std::mem::replace(&mut buf, Vec::with_capacity(chunk)),
            None => buf[..n].to_vec(),
        };
        offset += data.len() as u64;
        if data.is_empty() {
            continue;
        }
        if tx.send(SpoolCmd::Chunk(stream, data)).await.is_err() {
            // The spooler is gone (it never stops before the supervisor tells it to, so
            // this is a runtime shutting down): keep draining so the build never blocks.
            continue;
        }
    }
    offset + flush_masker(masker.as_mut(), stream, &tx).await
}

/// Hands what `masker` holds back to the spooler; returns its length.
async fn flush_masker(masker: Option<&mut Masker>, stream: Stream, tx: &mpsc::Sender<SpoolCmd>) -> u64 {
    let Some(m) = masker else { return 0 };
    let mut data = Vec::new();
    m.flush(&mut data);
    let len = data.len() as u64;
    if len > 0 {
        // An error: the spooler is gone (a runtime shutting down); nothing to do.
        let _ = tx.send(SpoolCmd::Chunk(stream, data)).await;
    }
    len
}

/// How long a build that ended so is held: `hold_after` always, `hold_on_failure` when
/// it failed (not exit 0, or timed out) unless it was cancelled; the longer of the two.
fn hold_for(
    hold_after: Option<Duration>,
    hold_on_failure: Option<Duration>,
    status: Option<ChildStatus>,
    cause: EndCause,
) -> Option<Duration> {
    let failed = match cause {
        EndCause::Cancelled => false,
        EndCause::TimedOut => true,
        EndCause::Completed | EndCause::Released => status != Some(ChildStatus::Exited(0)),
    };
    hold_after.max(hold_on_failure.filter(|_| failed))
}

/// Waits for a release, a cancel or the end of the hold; returns the status a release
/// chose, if any.
async fn hold_until_released(hold: Duration, control: &mut mpsc::UnboundedReceiver<Control>) -> Option<ChildStatus> {
    let until = tokio::time::Instant::now() + hold;
    tokio::select! {
        msg = control.recv() => match msg {
            Some(Control::Release(status)) => status,
            Some(Control::Cancel { .. }) => None,
            // Nobody can release it any more: the hold runs out.
            None => {
                sleep_until(until).await;
                None
            }
        },
        _ = sleep_until(until) => None,
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86400 * 365)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_on_failure_only_for_failures_that_were_not_cancelled() {
        let s = Some(Duration::from_secs(60));
        let ok = Some(ChildStatus::Exited(0));
        let bad = Some(ChildStatus::Exited(3));
        let killed = Some(ChildStatus::Signaled {
            signal: 15,
            core_dumped: false,
        });
        assert_eq!(hold_for(None, s, ok, EndCause::Completed), None);
        assert_eq!(hold_for(None, s, bad, EndCause::Completed), s);
        assert_eq!(hold_for(None, s, killed, EndCause::Completed), s);
        assert_eq!(hold_for(None, s, killed, EndCause::TimedOut), s);
        // A build that exits 0 right as it times out still timed out.
        assert_eq!(hold_for(None, s, ok, EndCause::TimedOut), s);
        assert_eq!(hold_for(None, s, killed, EndCause::Cancelled), None);
        assert_eq!(hold_for(None, None, bad, EndCause::Completed), None);
    }

    #[test]
    fn the_longer_hold_wins_when_both_apply() {
        let short = Some(Duration::from_secs(1));
        let long = Some(Duration::from_secs(60));
        let bad = Some(ChildStatus::Exited(1));
        assert_eq!(hold_for(short, long, bad, EndCause::Completed), long);
        assert_eq!(hold_for(long, short, bad, EndCause::Completed), long);
        // hold_after alone applies to successes and cancels alike.
        assert_eq!(
            hold_for(short, long, Some(ChildStatus::Exited(0)), EndCause::Completed),
            short
        );
        assert_eq!(hold_for(short, long, bad, EndCause::Cancelled), short);
    }

    #[test]
    fn tethers_own_variables_win_over_the_specs_and_the_base() {
        let base = [("PATH".into(), "/bin".into()), ("TMPDIR".into(), "/tmp".into())];
        let spec = [
            ("PATH".into(), "/opt/bin".into()),
            ("TMP".into(), "/elsewhere".into()),
            ("TETHER_BUILD_COOKIE".into(), "chosen".into()),
        ];
        let env = build_env(&base, &spec, "b1", Path::new("/state/b1/tmp"), "c00k1e".as_ref());
        let get = |k: &str| env.iter().find(|(ek, _)| ek == k).map(|(_, v)| v.clone());
        assert_eq!(get("PATH"), Some("/opt/bin".into()));
        assert_eq!(get("TMPDIR"), Some("/state/b1/tmp".into()));
        assert_eq!(get("TMP"), Some("/state/b1/tmp".into()));
        assert_eq!(get("TETHER_BUILD_ID"), Some("b1".into()));
        assert_eq!(
            get("TETHER_BUILD_COOKIE"),
            Some("c00k1e".into()),
            "a build cannot choose its cookie"
        );
        assert_eq!(env.iter().filter(|(k, _)| k == "PATH").count(), 1);
    }
}
