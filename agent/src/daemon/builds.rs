//! The daemon's builds: start, stdin, cancel, follow, and their records after they end.
//!
//! Each build has a forwarder task that moves its executor events into its [`Feed`]
//! (which serves every session following it, live or from the spool) and, when it takes
//! stdin, a pump task that writes client stdin into its pipe and acknowledges it. A
//! build outlives the session that started it. Once it ends, its record (output spool
//! and status) stays here until its retention period passes ([`Builds::expire`]).
//!
//! A run that waits for readiness gates, fetches or uploads is *preparing* first: its
//! directory exists, its command has not started, and a task of its own carries out
//! the preparation ([`super::prepare`]). Preparations are listed apart from builds:
//! they have no output and no process yet. A run that asks for a hold after its
//! command (`hold_after_ms`, for downloads) is *held* until a release: its entry is
//! still running (the control releases it), and its feed has told followers `Held`.
//! A run that fails with `hold_on_failure_ms` is held the same way, for a person.
//! A run with `hold_before_ms` stays preparing after its preparation, *held before*
//! its command, until a release starts it (or the hold runs out, which starts it too).
//!
//! Every build, preparing or running or held, has a [`ShellPlace`]: where a
//! `tether shell --build` into it runs (its cwd and environment) and the attachments
//! the executor hangs such shells up through before the build's directory goes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tether_executor::interactive::Attachments;
use tether_executor::{Build, BuildControl, BuildEvent, Executor, Prepared, StartError};
use tether_protocol::{self as wire, BuildId, DaemonMessage, ErrorKind, ErrorReport, RequestId};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::convert;
use super::follow::{Feed, Mode};
use super::input::{self, InputCmd};
use super::outbox::Outbox;
use super::prepare::{self, Plan, PrepContext};
use super::upload::{self, UploadRoute};

struct Running {
    control: BuildControl,
    stdin: Option<StdinRoute>,
    /// The build's private work dir (for downloads).
    work_root: std::path::PathBuf,
    /// Set while the build is held: its status, cause and the hold's end.
    held: Option<(wire::ExitStatus, wire::EndCause, u64)>,
    place: ShellPlace,
}

/// Where a shell opened into a build runs, and how it is tied to the build's life.
#[derive(Clone)]
pub struct ShellPlace {
    /// The build's cwd, or its work dir while `workdir` is still to be made.
    pub cwd: std::path::PathBuf,
    /// A build that has not started: the `--workdir` inside `cwd` that its command will
    /// run in (made when a shell opens there first).
    pub workdir: Option<std::path::PathBuf>,
    pub env: Arc<[(std::ffi::OsString, std::ffi::OsString)]>,
    pub attachments: Attachments,
    /// The build's user and limits: its shells run with them too.
    pub confine: tether_executor::confine::Confinement,
    /// The build's secrets: masked in its shells' output as in its own.
    pub secrets: tether_executor::mask::Secrets,
}

/// Where a build's stdin pieces go.
struct StdinRoute {
    tx: mpsc::UnboundedSender<InputCmd>,
    /// Bytes queued and not yet written to the pipe (the window).
    pending: Arc<AtomicU64>,
    /// The stream position the next piece must start at.
    next: u64,
}

/// A run whose command has not started yet.
struct Preparing {
    summary: wire::BuildSummary,
    command: wire::CommandSpec,
    /// Stops the preparation (a cancel, a retried run taking over, shutdown).
    stop: CancellationToken,
    /// Cancelled once the preparation is over and its directory handled.
    done: CancellationToken,
    /// Cancelled by a release of a build held before its command.
    release: CancellationToken,
    place: ShellPlace,
}

struct Finished {
    exited: wire::Exited,
    finished_at_ms: u64,
    expires: Instant,
    expires_at_ms: u64,
}

struct Entry {
    summary: wire::BuildSummary,
    /// The session that started the build, or last ran it again by its id: the one
    /// client whose `CloseOutput` is heeded. Followers (`attach`, `logs`) never change
    /// a build.
    owner: u64,
    /// What was asked to run, for idempotent starts.
    command: wire::CommandSpec,
    shell: Option<wire::Bytes>,
    feed: Arc<Feed>,
    running: Option<Running>,
    finished: Option<Finished>,
}

impl Entry {
    fn summary(&self) -> wire::BuildSummary {
        let mut s = self.summary.clone();
        s.output_end = self.feed.end();
        if let Some((status, cause, until_ms)) = self.running.as_ref().and_then(|r| r.held) {
            s.state = wire::BuildState::Held {
                status,
                cause,
                until_ms,
            };
        }
        if let Some(f) = &self.finished {
            s.state = wire::BuildState::Finished {
                status: f.exited.status,
                cause: f.exited.cause,
                duration_ms: f.exited.duration_ms,
                finished_at_ms: f.finished_at_ms,
                expires_at_ms: f.expires_at_ms,
            };
        }
        s
    }
}

/// All builds of this daemon, running and retained.
pub struct Builds {
    executor: Executor,
    entries: Mutex<HashMap<BuildId, Entry>>,
    preparing: Mutex<HashMap<BuildId, Preparing>>,
    prep: Arc<PrepContext>,
    tasks: TaskTracker,
    accepting: AtomicBool,
    stdin_window: u64,
    upload_window: u64,
    retain: Duration,
    /// One permit per build not finished (`--max-builds`); `None`: no limit. A build's
    /// permit goes with it from task to task and is freed when it finishes.
    slots: Option<(Arc<Semaphore>, usize)>,
    /// Cancelled at shutdown: every shell is hung up.
    stopping: CancellationToken,
    /// Notified whenever a build finished (see `super::give_back_memory`).
    pub ended: tokio::sync::Notify,
}

/// A build's place under `--max-builds`, freed when dropped.
type Slot = Option<OwnedSemaphorePermit>;

fn error(req: Option<RequestId>, build: Option<BuildId>, kind: ErrorKind, message: impl Into<String>) -> ErrorReport {
    ErrorReport {
        req,
        build,
        kind,
        message: message.into(),
    }
}

/// A run naming an id that another command's build has.
fn taken(req: RequestId, id: &BuildId, command: &str) -> ErrorReport {
    error(
        Some(req),
        Some(id.clone()),
        ErrorKind::BadRequest,
        format!("build id {id} is taken by another command ({command:?}); choose another id"),
    )
}

fn not_taking_stdin(build: &BuildId) -> ErrorReport {
    error(
        None,
        Some(build.clone()),
        ErrorKind::BadRequest,
        "the build was not started with stdin, or has finished",
    )
}

fn unknown(req: Option<RequestId>, build: &BuildId) -> ErrorReport {
    error(
        req,
        Some(build.clone()),
        ErrorKind::UnknownBuild,
        format!("no build {build} (never started here, or its record expired)"),
    )
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Builds {
    pub fn new(
        executor: Executor,
        prep: Arc<PrepContext>,
        stdin_window: u64,
        upload_window: u64,
        retain: Duration,
        max_builds: Option<usize>,
    ) -> Arc<Builds> {
        Arc::new(Builds {
            executor,
            entries: Mutex::new(HashMap::new()),
            preparing: Mutex::new(HashMap::new()),
            prep,
            tasks: TaskTracker::new(),
            accepting: AtomicBool::new(true),
            stdin_window,
            upload_window,
            retain,
            slots: max_builds.map(|n| (Arc::new(Semaphore::new(n)), n)),
            stopping: CancellationToken::new(),
            ended: tokio::sync::Notify::new(),
        })
    }

    /// The executor builds (and shells) run through.
    pub fn executor(&self) -> &Executor {
        &self.executor
    }

    /// Runs `task` as part of the daemon's work: shutdown waits for it.
    pub fn spawn_task(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(task);
    }

    /// Cancelled when the daemon shuts down.
    pub fn stopping(&self) -> CancellationToken {
        self.stopping.clone()
    }

    /// Where a shell into `build` runs: a running or held build, or one still preparing
    /// (its work dir exists; its command's environment is known).
    pub fn shell_place(&self, req: RequestId, build: &BuildId) -> Result<ShellPlace, ErrorReport> {
        if let Some(entry) = self.lock().get(build) {
            return match &entry.running {
                Some(running) => Ok(running.place.clone()),
                None => Err(error(
                    Some(req),
                    Some(build.clone()),
                    ErrorKind::BadRequest,
                    format!(
                        "build {build} has finished and its directory is gone (run --hold-on-failure keeps a failed one)"
                    ),
                )),
            };
        }
        match self.lock_preparing().get(build) {
            Some(p) => Ok(p.place.clone()),
            None => Err(unknown(Some(req), build)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<BuildId, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_preparing(&self) -> MutexGuard<'_, HashMap<BuildId, Preparing>> {
        self.preparing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a build (or, when `spec.id` names one that exists, follows that one), and
    /// queues `Started` on `out` before any of its output. With `follow`, the session
    /// gets the build's output and exit. A run that prepares first (gates, fetches,
    /// uploads) is answered by `Preparing` and carried on by a task of its own; when it
    /// has uploads, the returned route takes the session's `Upload` pieces.
    pub async fn start(
        self: &Arc<Self>,
        session: u64,
        req: RequestId,
        spec: &wire::RunSpec,
        follow: bool,
        out: Outbox,
    ) -> Result<Option<UploadRoute>, ErrorReport> {
        if let Some(id) = &spec.id {
            if !wire::valid_build_id(id) {
                return Err(error(
                    Some(req),
                    None,
                    ErrorKind::BadRequest,
                    format!(
                        "invalid build id {id:?}: use 1 to {} letters, digits, '.', '_' or '-', not starting with '.' or '-'",
                        wire::MAX_BUILD_ID_LEN
                    ),
                ));
            }
            let id = BuildId(id.clone());
            self.take_over_preparation(req, &id, spec).await?;
            if let Some((started, feed)) = self.existing(session, req, &id, spec)? {
                // Started first, then the output from position 0 (§14's order).
                out.control(DaemonMessage::Started(started)).await;
                if follow {
                    let _ = feed.subscribe(out, 0, Mode::Follow);
                }
                return Ok(None);
            }
        }
        if !self.accepting.load(Ordering::SeqCst) {
            return Err(error(
                Some(req),
                None,
                ErrorKind::Internal,
                "the daemon is shutting down",
            ));
        }
        let mut build_spec =
            convert::build_spec(spec).map_err(|e| error(Some(req), None, ErrorKind::BadRequest, e.to_string()))?;
        build_spec
            .confine
            .check()
            .map_err(|e| error(Some(req), None, ErrorKind::BadRequest, e.to_string()))?;
        let slot = self.take_slot(req)?;
        if build_spec.id.is_none() {
            build_spec.id = Some(self.fresh_id(spec.name.as_deref()));
        }
        // The daemon's own readiness gates hold every build until they opened once.
        if spec.prepares() || !self.prep.daemon_gates.borrow().open {
            return self.prepare(session, req, spec, build_spec, follow, out, slot).await;
        }
        let build = self.executor.start(build_spec).map_err(|e| start_error(req, e))?;
        self.register(session, req, spec, build, follow, out, slot).await;
        Ok(None)
    }

    /// A place for one more build under `--max-builds`, or a `Busy` error.
    fn take_slot(&self, req: RequestId) -> Result<Slot, ErrorReport> {
        let Some((slots, max)) = &self.slots else {
            return Ok(None);
        };
        match Arc::clone(slots).try_acquire_owned() {
            Ok(permit) => Ok(Some(permit)),
            Err(_) => {
                tracing::warn!(max_builds = max, "run refused: at --max-builds");
                Err(error(
                    Some(req),
                    None,
                    ErrorKind::Busy,
                    format!(
                        "this tether daemon already has {max} builds (--max-builds); try again when one has finished"
                    ),
                ))
            }
        }
    }

    /// A retried run (same id) of a build still preparing for an earlier session: that
    /// preparation is stopped and this run starts over (its uploads come again).
    async fn take_over_preparation(
        &self,
        req: RequestId,
        id: &BuildId,
        spec: &wire::RunSpec,
    ) -> Result<(), ErrorReport> {
        let done = {
            let preparing = self.lock_preparing();
            let Some(p) = preparing.get(id) else { return Ok(()) };
            if p.command != spec.command {
                return Err(taken(req, id, &p.summary.command));
            }
            tracing::info!(build = %id, "run of a build id that is still preparing: starting its preparation over");
            p.stop.cancel();
            p.done.clone()
        };
        done.cancelled().await;
        Ok(())
    }

    /// Creates the build's directory and starts its preparation.
    #[allow(clippy::too_many_arguments)]
    async fn prepare(
        self: &Arc<Self>,
        session: u64,
        req: RequestId,
        spec: &wire::RunSpec,
        build_spec: tether_executor::BuildSpec,
        follow: bool,
        out: Outbox,
        slot: Slot,
    ) -> Result<Option<UploadRoute>, ErrorReport> {
        let mut plan = Plan::of(spec, req)?;
        let build_spec_workdir = build_spec.workdir.clone();
        let prepared = self.executor.prepare(build_spec).map_err(|e| start_error(req, e))?;
        let id = BuildId(prepared.id().to_owned());
        let route = if spec.uploads.is_empty() {
            None
        } else {
            let (route, feed, aborter) = upload::channel(spec.uploads.len() as u32, self.upload_window);
            let dests = spec.uploads.iter().map(|u| convert::path(&u.dest)).collect();
            plan.uploads = Some((feed, aborter, dests));
            Some(route)
        };
        let stop = CancellationToken::new();
        let done = CancellationToken::new();
        let release = CancellationToken::new();
        let place = ShellPlace {
            cwd: prepared.work_dir().to_path_buf(),
            workdir: build_spec_workdir,
            env: prepared.env().into(),
            attachments: prepared.attachments(),
            confine: prepared.confine(),
            secrets: prepared.secrets(),
        };
        self.lock_preparing().insert(
            id.clone(),
            Preparing {
                summary: wire::BuildSummary {
                    build: id.clone(),
                    command: convert::describe(spec),
                    pid: 0,
                    started_at_ms: now_ms(),
                    output_end: 0,
                    state: wire::BuildState::Preparing,
                },
                command: spec.command.clone(),
                stop: stop.clone(),
                done: done.clone(),
                release: release.clone(),
                place,
            },
        );
        tracing::info!(build = %id, "build preparing");
        out.control(DaemonMessage::Preparing { req, build: id.clone() }).await;
        let builds = Arc::clone(self);
        let spec = spec.clone();
        self.tasks.spawn(async move {
            let hold_before = spec.hold_before_ms.map(Duration::from_millis);
            let result = tokio::select! {
                r = async {
                    prepare::run(&builds.prep, &prepared, plan, req, &out).await?;
                    if let Some(hold) = hold_before {
                        // Shells opened during the hold run as the build's user.
                        prepared.give_to_user().map_err(|e| start_error(req, e))?;
                        builds.hold_before(&id, hold, &release, &out).await;
                    }
                    Ok(())
                } => r,
                _ = stop.cancelled() => Err(error(
                    Some(req),
                    Some(id.clone()),
                    ErrorKind::Cancelled,
                    format!("build {id} was cancelled before its command started"),
                )),
            };
            builds
                .prepared(session, req, id.clone(), &spec, prepared, result, follow, out, slot)
                .await;
            if stop.is_cancelled() {
                // A cancel that came after the preparation succeeded, before the build
                // was entered as running: it is the build's now.
                let _ = builds.cancel(0, &id, false);
            }
            done.cancel();
        });
        Ok(route)
    }

    /// Holds a prepared build before its command: tells the run's session, lists it as
    /// held, and returns on a release or when the hold runs out (a cancel ends the
    /// preparation around this).
    async fn hold_before(&self, id: &BuildId, hold: Duration, release: &CancellationToken, out: &Outbox) {
        let until_ms = now_ms().saturating_add(hold.as_millis() as u64);
        if let Some(p) = self.lock_preparing().get_mut(id) {
            p.summary.state = wire::BuildState::HeldBefore { until_ms };
        }
        tracing::info!(build = %id, ?hold, "build held before its command");
        out.control(DaemonMessage::HeldBefore {
            build: id.clone(),
            until_ms,
        })
        .await;
        tokio::select! {
            _ = release.cancelled() => tracing::info!(build = %id, "build released; starting its command"),
            _ = tokio::time::sleep(hold) => tracing::info!(build = %id, "hold before the command ran out; starting it"),
        }
        if let Some(p) = self.lock_preparing().get_mut(id) {
            p.summary.state = wire::BuildState::Preparing;
        }
    }

    /// The end of a preparation: the command starts, or the directory goes.
    #[allow(clippy::too_many_arguments)]
    async fn prepared(
        self: &Arc<Self>,
        session: u64,
        req: RequestId,
        id: BuildId,
        spec: &wire::RunSpec,
        prepared: Prepared,
        result: Result<(), ErrorReport>,
        follow: bool,
        out: Outbox,
        slot: Slot,
    ) {
        let result = match result {
            Ok(()) if !self.accepting.load(Ordering::SeqCst) => Err(error(
                Some(req),
                None,
                ErrorKind::Internal,
                "the daemon is shutting down",
            )),
            other => other,
        };
        let started = match result {
            // A failed start removes the directory itself.
            Ok(()) => prepared.start().map_err(|e| start_error(req, e)),
            Err(e) => {
                // The directory may hold a large upload: removed off the runtime thread,
                // and before the client hears of the failure.
                let _ = tokio::task::spawn_blocking(move || prepared.discard()).await;
                Err(e)
            }
        };
        match started {
            Ok(build) => {
                self.register(session, req, spec, build, follow, out, slot).await;
                self.lock_preparing().remove(&id);
            }
            Err(mut e) => {
                e.build = Some(id.clone());
                tracing::info!(build = %id, error = %e.message, "build not started");
                self.lock_preparing().remove(&id);
                out.control(DaemonMessage::Error(e)).await;
            }
        }
    }

    /// Enters a started build and queues its `Started` (then its output, when followed).
    #[allow(clippy::too_many_arguments)]
    async fn register(
        self: &Arc<Self>,
        session: u64,
        req: RequestId,
        spec: &wire::RunSpec,
        mut build: Build,
        follow: bool,
        out: Outbox,
        slot: Slot,
    ) {
        let id = BuildId(build.id.clone());
        tracing::info!(build = %id, pid = build.pid, shell = ?build.shell, "build started");
        let stdin = build.stdin.take().map(|pipe| {
            let (tx, rx) = mpsc::unbounded_channel();
            let pending = Arc::new(AtomicU64::new(0));
            let build = id.clone();
            let ack = move |consumed| DaemonMessage::StdinAck {
                build: build.clone(),
                consumed,
            };
            let what = format!("stdin of build {id}");
            self.tasks
                .spawn(input::pump(what, pipe, rx, Arc::clone(&pending), ack, out.clone()));
            StdinRoute { tx, pending, next: 0 }
        });
        let feed = Feed::new(id.clone(), build.spool.clone());
        let shell = build.shell.as_deref().map(convert::path_bytes);
        let entry = Entry {
            owner: session,
            summary: wire::BuildSummary {
                build: id.clone(),
                command: convert::describe(spec),
                pid: build.pid,
                started_at_ms: now_ms(),
                output_end: 0,
                state: wire::BuildState::Running,
            },
            command: spec.command.clone(),
            shell: shell.clone(),
            feed: Arc::clone(&feed),
            running: Some(Running {
                control: build.control.clone(),
                stdin,
                work_root: build.work_root.clone(),
                held: None,
                place: ShellPlace {
                    cwd: build.work_dir.clone(),
                    workdir: None,
                    env: Arc::clone(&build.env),
                    attachments: build.attachments.clone(),
                    confine: build.confine,
                    secrets: build.secrets.clone(),
                },
            }),
            finished: None,
        };
        self.lock().insert(id.clone(), entry);
        let started = wire::Started {
            req,
            build: id.clone(),
            pid: build.pid,
            shell,
            existing: false,
        };
        out.control(DaemonMessage::Started(started)).await;
        if follow {
            // At position 0 of a build whose output has not been published: live.
            let _ = feed.subscribe(out, 0, Mode::Follow);
        }
        self.tasks
            .spawn(forward(Arc::clone(self), id, build.events, feed, slot));
    }

    /// A Run naming an existing build: its `Started` and feed, to follow it instead.
    fn existing(
        &self,
        session: u64,
        req: RequestId,
        id: &BuildId,
        spec: &wire::RunSpec,
    ) -> Result<Option<(wire::Started, Arc<Feed>)>, ErrorReport> {
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(id) else {
            return Ok(None);
        };
        if entry.command != spec.command {
            return Err(taken(req, id, &entry.summary.command));
        }
        // The run's client came back (a reconnect, a retried step): its own again.
        entry.owner = session;
        tracing::info!(build = %id, "run of an existing build id: following it instead of starting it again");
        let started = wire::Started {
            req,
            build: id.clone(),
            pid: entry.summary.pid,
            shell: entry.shell.clone(),
            existing: true,
        };
        Ok(Some((started, Arc::clone(&entry.feed))))
    }

    /// An id for a build whose client chose none: valid as a client-chosen id too (so it
    /// can be named in `run --id` and on command lines) and not in use.
    fn fresh_id(&self, name: Option<&str>) -> String {
        let entries = self.lock();
        loop {
            let id = wire::build_id_from(name, &crate::ids::random_suffix());
            if !entries.contains_key(&BuildId(id.clone())) {
                return id;
            }
        }
    }

    /// Follows a build from `from` (`u64::MAX`: its current end), or sends its output
    /// so far (`follow` false). The `Attached` reply is queued before any output.
    pub async fn attach(
        &self,
        req: RequestId,
        build: &BuildId,
        from: u64,
        follow: bool,
        out: Outbox,
    ) -> Result<(), ErrorReport> {
        let (summary, feed) = {
            let entries = self.lock();
            let entry = entries.get(build).ok_or_else(|| unknown(Some(req), build))?;
            (entry.summary(), Arc::clone(&entry.feed))
        };
        let end = feed.end();
        if from != u64::MAX && from > end {
            return Err(error(
                Some(req),
                Some(build.clone()),
                ErrorKind::BadRequest,
                format!("position {from} is past the end of {build}'s output ({end} bytes so far)"),
            ));
        }
        out.control(DaemonMessage::Attached { req, build: summary }).await;
        let mode = if follow { Mode::Follow } else { Mode::Snapshot { req } };
        feed.subscribe(out, from, mode).map_err(|e| {
            error(
                Some(req),
                Some(build.clone()),
                ErrorKind::BadRequest,
                format!(
                    "position {from} is past the end of {build}'s output ({} bytes so far)",
                    e.end
                ),
            )
        })
    }

    /// Queues stdin bytes for a build, within its window. A piece that does not start
    /// where the previous one ended means input was lost in transit: the build is
    /// cancelled (it must not run on incomplete input) and the client told.
    pub fn stdin(&self, build: &BuildId, offset: u64, data: Vec<u8>) -> Result<(), ErrorReport> {
        let mut entries = self.lock();
        let entry = entries.get_mut(build).ok_or_else(|| unknown(None, build))?;
        let Some(running) = entry.running.as_mut() else {
            return Err(not_taking_stdin(build));
        };
        let Some(route) = running.stdin.as_mut() else {
            return Err(not_taking_stdin(build));
        };
        if offset != route.next {
            tracing::warn!(build = %build, expected = route.next, got = offset, "stdin lost in transit; cancelling the build");
            let message = format!(
                "stdin bytes {}..{offset} of build {build} were lost in transit (a damaged frame); the build is cancelled",
                route.next
            );
            running.stdin = None;
            running.control.cancel(true);
            return Err(error(None, Some(build.clone()), ErrorKind::Protocol, message));
        }
        let len = data.len() as u64;
        if route.pending.fetch_add(len, Ordering::SeqCst) + len > self.stdin_window {
            route.pending.fetch_sub(len, Ordering::SeqCst);
            return Err(error(
                None,
                Some(build.clone()),
                ErrorKind::BadRequest,
                "stdin window exceeded; data dropped",
            ));
        }
        route.next += len;
        // A closed pump means the build is finishing; the data has nowhere to go.
        let _ = route.tx.send(InputCmd::Data(data));
        Ok(())
    }

    /// Closes a build's stdin after the data queued so far.
    pub fn close_stdin(&self, build: &BuildId) -> Result<(), ErrorReport> {
        let entries = self.lock();
        let entry = entries.get(build).ok_or_else(|| unknown(None, build))?;
        if let Some(route) = entry.running.as_ref().and_then(|r| r.stdin.as_ref()) {
            let _ = route.tx.send(InputCmd::End);
        }
        Ok(())
    }

    /// Stops reading one output stream of a build and closes tether's end of its pipe,
    /// when `session` is the build's owner (the client that ran it); a follower's
    /// request is ignored: watching a build never changes it.
    pub fn close_output(&self, session: u64, build: &BuildId, stream: wire::OutputStream) -> Result<(), ErrorReport> {
        let entries = self.lock();
        let entry = entries.get(build).ok_or_else(|| unknown(None, build))?;
        if entry.owner != session {
            tracing::info!(build = %build, ?stream, "a follower closed its output; the build's pipe stays open");
            return Ok(());
        }
        if let Some(running) = &entry.running {
            tracing::info!(build = %build, ?stream, "client closed its output; closing the build's pipe");
            running.control.close_output(convert::stream_from_wire(stream));
        }
        Ok(())
    }

    /// Ends a held build's hold, with `status` or its own.
    pub fn release(
        &self,
        req: RequestId,
        build: &BuildId,
        status: Option<wire::ExitStatus>,
    ) -> Result<(), ErrorReport> {
        let entries = self.lock();
        let Some(entry) = entries.get(build) else {
            drop(entries);
            return self.release_before(req, build, status);
        };
        match &entry.running {
            Some(running) if running.held.is_some() => {
                tracing::info!(build = %build, ?status, "releasing held build");
                running.control.release(status.map(convert::child_status));
                Ok(())
            }
            _ => Err(error(
                Some(req),
                Some(build.clone()),
                ErrorKind::BadRequest,
                format!("build {build} is not held"),
            )),
        }
    }

    /// Releases a build held before its command: starts it.
    fn release_before(
        &self,
        req: RequestId,
        build: &BuildId,
        status: Option<wire::ExitStatus>,
    ) -> Result<(), ErrorReport> {
        let preparing = self.lock_preparing();
        let p = preparing.get(build).ok_or_else(|| unknown(Some(req), build))?;
        let bad = |message: String| Err(error(Some(req), Some(build.clone()), ErrorKind::BadRequest, message));
        if !matches!(p.summary.state, wire::BuildState::HeldBefore { .. }) {
            return Err(error(
                Some(req),
                Some(build.clone()),
                ErrorKind::UnknownBuild,
                format!("build {build} is not held: it is still preparing"),
            ));
        }
        if status.is_some() {
            return bad(format!(
                "build {build} is held before its command started: `tether release {build}` starts it, \
                 `tether cancel {build}` ends it without running it"
            ));
        }
        tracing::info!(build = %build, "releasing build held before its command");
        p.release.cancel();
        Ok(())
    }

    /// Sends `path` of a running or held build's work dir as download `req`.
    pub fn download(&self, req: RequestId, build: &BuildId, path: wire::Bytes, out: Outbox) -> Result<(), ErrorReport> {
        let entries = self.lock();
        let Some(entry) = entries.get(build) else {
            let message = if self.lock_preparing().contains_key(build) {
                format!("build {build} has not started yet")
            } else {
                return Err(unknown(Some(req), build));
            };
            return Err(error(Some(req), Some(build.clone()), ErrorKind::BadRequest, message));
        };
        let Some(running) = &entry.running else {
            return Err(error(
                Some(req),
                Some(build.clone()),
                ErrorKind::BadRequest,
                format!("build {build} has finished and its directory is gone (run --download holds it for downloads)"),
            ));
        };
        super::download::start(req, build.clone(), running.work_root.clone(), path, out);
        Ok(())
    }

    /// Cancels one running build (or one still preparing).
    pub fn cancel(&self, req: RequestId, build: &BuildId, force: bool) -> Result<(), ErrorReport> {
        {
            let entries = self.lock();
            if let Some(entry) = entries.get(build) {
                return match &entry.running {
                    Some(running) => {
                        tracing::info!(build = %build, force, "cancelling build");
                        running.control.cancel(force);
                        Ok(())
                    }
                    None => Err(error(
                        Some(req),
                        Some(build.clone()),
                        ErrorKind::BadRequest,
                        format!("build {build} has already finished"),
                    )),
                };
            }
        }
        match self.lock_preparing().get(build) {
            Some(p) => {
                tracing::info!(build = %build, "cancelling a build before its command started");
                p.stop.cancel();
                Ok(())
            }
            None => Err(unknown(Some(req), build)),
        }
    }

    /// The builds, running ones only unless `all`, oldest first.
    pub fn summaries(&self, all: bool) -> Vec<wire::BuildSummary> {
        let mut list: Vec<_> = self
            .lock()
            .values()
            .filter(|e| all || e.running.is_some())
            .map(Entry::summary)
            .collect();
        list.extend(self.lock_preparing().values().map(|p| p.summary.clone()));
        list.sort_by(|a, b| (a.started_at_ms, &a.build).cmp(&(b.started_at_ms, &b.build)));
        list
    }

    /// Whether any build is preparing, running or held.
    pub fn busy(&self) -> bool {
        !self.lock_preparing().is_empty() || self.lock().values().any(|e| e.running.is_some())
    }

    /// Drops the records of builds whose retention period passed; returns how many.
    pub fn expire(&self, now: Instant) -> usize {
        let mut entries = self.lock();
        let expired: Vec<BuildId> = entries
            .iter()
            .filter(|(_, e)| e.finished.as_ref().is_some_and(|f| f.expires <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            if let Some(entry) = entries.remove(id) {
                entry.feed.spool().remove();
                tracing::info!(build = %id, "build record expired; output and status removed");
            }
        }
        expired.len()
    }

    /// Refuses new builds, cancels the running ones (grace period applies) and waits
    /// until every one of them finished and was reported.
    pub async fn shutdown(&self) {
        self.accepting.store(false, Ordering::SeqCst);
        self.stopping.cancel();
        for p in self.lock_preparing().values() {
            p.stop.cancel();
        }
        for entry in self.lock().values() {
            if let Some(running) = &entry.running {
                running.control.cancel(false);
            }
        }
        self.tasks.close();
        self.tasks.wait().await;
    }

    fn held(&self, build: &BuildId, held: (wire::ExitStatus, wire::EndCause, u64)) {
        if let Some(running) = self.lock().get_mut(build).and_then(|e| e.running.as_mut()) {
            running.held = Some(held);
        }
    }

    fn finished(&self, build: &BuildId, exited: &wire::Exited) {
        let mut entries = self.lock();
        if let Some(entry) = entries.get_mut(build) {
            let finished_at_ms = now_ms();
            entry.running = None;
            entry.finished = Some(Finished {
                exited: exited.clone(),
                finished_at_ms,
                expires: Instant::now() + self.retain,
                expires_at_ms: finished_at_ms.saturating_add(self.retain.as_millis() as u64),
            });
        }
        drop(entries);
        self.ended.notify_one();
    }
}

pub fn start_error(req: RequestId, e: StartError) -> ErrorReport {
    let kind = match &e {
        StartError::NotFound { .. } => ErrorKind::CommandNotFound,
        StartError::NotExecutable { .. } => ErrorKind::NotExecutable,
        StartError::NoShell => ErrorKind::CommandNotFound,
        StartError::EmptyCommand | StartError::Nul | StartError::BadWorkdir { .. } | StartError::IdInUse(_) => {
            ErrorKind::BadRequest
        }
        StartError::BuildDir(_) | StartError::GiveDir { .. } | StartError::Spool(_) | StartError::Io(_) => {
            ErrorKind::Internal
        }
    };
    error(Some(req), None, kind, e.to_string())
}

/// Moves a build's events into its feed until it finished; then its slot is freed.
async fn forward(
    builds: Arc<Builds>,
    id: BuildId,
    mut events: mpsc::Receiver<BuildEvent>,
    feed: Arc<Feed>,
    _slot: Slot,
) {
    while let Some(event) = events.recv().await {
        match event {
            BuildEvent::Output(chunk) => feed.publish(chunk),
            BuildEvent::Gap { from, to } => {
                tracing::warn!(build = %id, from, to, "output lost: it could not be written to the spool");
                feed.publish_gap(from, to);
            }
            BuildEvent::Held(h) => {
                let status = convert::exit_status(h.status);
                let cause = convert::end_cause(h.cause);
                let until_ms = now_ms().saturating_add(h.hold.as_millis() as u64);
                tracing::info!(build = %id, ?status, ?cause, hold = ?h.hold, "build held");
                builds.held(&id, (status, cause, until_ms));
                feed.hold(DaemonMessage::Held {
                    build: id.clone(),
                    status,
                    cause,
                    until_ms,
                });
            }
            BuildEvent::Finished(outcome) => {
                let mut exited = convert::exited(id.clone(), &outcome);
                if exited.cause == wire::EndCause::Cancelled && builds.stopping.is_cancelled() {
                    exited.cause = wire::EndCause::Shutdown;
                }
                tracing::info!(build = %id, status = ?exited.status, cause = ?exited.cause, duration_ms = exited.duration_ms, "build finished");
                builds.finished(&id, &exited);
                feed.finish(exited);
                return;
            }
        }
    }
}
