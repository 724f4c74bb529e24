//! The daemon's running builds: start, stdin, cancel, and forwarding of their events.
//!
//! Each build has a forwarder task that moves its executor events to the session that
//! started it, and (when it takes stdin) a pump task that writes client stdin into its
//! pipe and acknowledges it. A build outlives its session: when the session is gone,
//! the forwarder keeps draining (and, for now, drops) its output so the build never
//! blocks on a client that left.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use tether_executor::{BuildControl, BuildEvent, BuildStdin, Executor, StartError};
use tether_protocol::{self as wire, BuildId, DaemonMessage, ErrorKind, ErrorReport, RequestId};
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use super::convert;
use super::outbox::Outbox;

enum StdinCmd {
    Data(Vec<u8>),
    Close,
}

struct Entry {
    control: BuildControl,
    stdin: Option<(mpsc::UnboundedSender<StdinCmd>, Arc<AtomicU64>)>,
    summary: wire::BuildSummary,
}

/// All builds of this daemon.
pub struct Builds {
    executor: Executor,
    entries: Mutex<HashMap<BuildId, Entry>>,
    tasks: TaskTracker,
    accepting: AtomicBool,
    stdin_window: u64,
}

fn error(req: Option<RequestId>, build: Option<BuildId>, kind: ErrorKind, message: impl Into<String>) -> ErrorReport {
    ErrorReport {
        req,
        build,
        kind,
        message: message.into(),
    }
}

impl Builds {
    pub fn new(executor: Executor, stdin_window: u64) -> Arc<Builds> {
        Arc::new(Builds {
            executor,
            entries: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            accepting: AtomicBool::new(true),
            stdin_window,
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<BuildId, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a build whose events go to `out`, and queues `Started` there before any of
    /// its output (the forwarder starts only after `Started` is queued).
    pub async fn start(self: &Arc<Self>, req: RequestId, spec: &wire::RunSpec, out: Outbox) -> Result<(), ErrorReport> {
        if !self.accepting.load(Ordering::SeqCst) {
            return Err(error(
                Some(req),
                None,
                ErrorKind::Internal,
                "the daemon is shutting down",
            ));
        }
        let mut build = self.executor.start(convert::build_spec(spec)).map_err(|e| {
            let kind = match &e {
                StartError::NotFound { .. } => ErrorKind::CommandNotFound,
                StartError::NotExecutable { .. } => ErrorKind::NotExecutable,
                StartError::NoShell => ErrorKind::CommandNotFound,
                StartError::EmptyCommand | StartError::Nul | StartError::BadWorkdir { .. } => ErrorKind::BadRequest,
                StartError::BuildDir(_) | StartError::Io(_) => ErrorKind::Internal,
            };
            error(Some(req), None, kind, e.to_string())
        })?;
        let id = BuildId(build.id.clone());
        tracing::info!(build = %id, pid = build.pid, shell = ?build.shell, "build started");
        let started_at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let stdin = build.stdin.take().map(|pipe| {
            let (tx, rx) = mpsc::unbounded_channel();
            let pending = Arc::new(AtomicU64::new(0));
            self.tasks
                .spawn(pump_stdin(id.clone(), pipe, rx, Arc::clone(&pending), out.clone()));
            (tx, pending)
        });
        let entry = Entry {
            control: build.control.clone(),
            stdin,
            summary: wire::BuildSummary {
                build: id.clone(),
                command: convert::describe(spec),
                pid: build.pid,
                started_at_ms,
            },
        };
        self.lock().insert(id.clone(), entry);
        let started = wire::Started {
            req,
            build: id.clone(),
            pid: build.pid,
            shell: build.shell.as_deref().map(convert::path_bytes),
        };
        out.control(DaemonMessage::Started(started)).await;
        self.tasks.spawn(forward(Arc::clone(self), id, build.events, out));
        Ok(())
    }

    /// Queues stdin bytes for a build, within its window.
    pub fn stdin(&self, build: &BuildId, data: Vec<u8>) -> Result<(), ErrorReport> {
        let entries = self.lock();
        let Some(entry) = entries.get(build) else {
            return Err(error(
                None,
                Some(build.clone()),
                ErrorKind::UnknownBuild,
                format!("no build {build}"),
            ));
        };
        let Some((tx, pending)) = &entry.stdin else {
            return Err(error(
                None,
                Some(build.clone()),
                ErrorKind::BadRequest,
                "the build was not started with stdin",
            ));
        };
        let len = data.len() as u64;
        if pending.fetch_add(len, Ordering::SeqCst) + len > self.stdin_window {
            pending.fetch_sub(len, Ordering::SeqCst);
            return Err(error(
                None,
                Some(build.clone()),
                ErrorKind::BadRequest,
                "stdin window exceeded; data dropped",
            ));
        }
        // A closed pump means the build is finishing; the data has nowhere to go.
        let _ = tx.send(StdinCmd::Data(data));
        Ok(())
    }

    /// Closes a build's stdin after the data queued so far.
    pub fn close_stdin(&self, build: &BuildId) -> Result<(), ErrorReport> {
        match self.lock().get(build) {
            Some(Entry {
                stdin: Some((tx, _)), ..
            }) => {
                let _ = tx.send(StdinCmd::Close);
                Ok(())
            }
            Some(_) => Ok(()),
            None => Err(error(
                None,
                Some(build.clone()),
                ErrorKind::UnknownBuild,
                format!("no build {build}"),
            )),
        }
    }

    /// Stops reading one output stream of a build and closes tether's end of its pipe.
    pub fn close_output(&self, build: &BuildId, stream: wire::OutputStream) -> Result<(), ErrorReport> {
        match self.lock().get(build) {
            Some(entry) => {
                tracing::info!(build = %build, ?stream, "client closed its output; closing the build's pipe");
                entry.control.close_output(convert::stream_from_wire(stream));
                Ok(())
            }
            None => Err(error(
                None,
                Some(build.clone()),
                ErrorKind::UnknownBuild,
                format!("no build {build}"),
            )),
        }
    }

    /// Cancels one build; false if there is no such build.
    pub fn cancel(&self, build: &BuildId, force: bool) -> bool {
        match self.lock().get(build) {
            Some(entry) => {
                tracing::info!(build = %build, force, "cancelling build");
                entry.control.cancel(force);
                true
            }
            None => false,
        }
    }

    /// The running builds, for `Welcome`.
    pub fn summaries(&self) -> Vec<wire::BuildSummary> {
        let mut list: Vec<_> = self.lock().values().map(|e| e.summary.clone()).collect();
        list.sort_by(|a, b| a.build.cmp(&b.build));
        list
    }

    /// Refuses new builds, cancels the running ones (grace period applies) and waits
    /// until every one of them finished and was reported.
    pub async fn shutdown(&self) {
        self.accepting.store(false, Ordering::SeqCst);
        for entry in self.lock().values() {
            entry.control.cancel(false);
        }
        self.tasks.close();
        self.tasks.wait().await;
    }

    fn remove(&self, build: &BuildId) {
        self.lock().remove(build);
    }
}

async fn forward(builds: Arc<Builds>, id: BuildId, mut events: mpsc::Receiver<BuildEvent>, out: Outbox) {
    let mut out = Some(out);
    while let Some(event) = events.recv().await {
        match event {
            BuildEvent::Output(chunk) => {
                let Some(o) = &out else { continue };
                let msg = DaemonMessage::Output {
                    build: id.clone(),
                    stream: convert::stream(chunk.stream),
                    offset: chunk.offset,
                    data: wire::Bytes::from(chunk.data),
                };
                if !o.data(msg).await {
                    tracing::debug!(build = %id, "session gone; output of this build is dropped");
                    out = None;
                }
            }
            BuildEvent::Finished(outcome) => {
                builds.remove(&id);
                let exited = convert::exited(id.clone(), &outcome);
                tracing::info!(build = %id, status = ?exited.status, cause = ?exited.cause, duration_ms = exited.duration_ms, "build finished");
                if let Some(o) = &out {
                    o.data(DaemonMessage::Exited(exited)).await;
                }
                return;
            }
        }
    }
}

async fn pump_stdin(
    id: BuildId,
    mut pipe: BuildStdin,
    mut rx: mpsc::UnboundedReceiver<StdinCmd>,
    pending: Arc<AtomicU64>,
    out: Outbox,
) {
    let mut consumed = 0u64;
    let mut broken = false;
    while let Some(cmd) = rx.recv().await {
        let data = match cmd {
            StdinCmd::Data(data) => data,
            StdinCmd::Close => break,
        };
        if !broken {
            if let Err(e) = pipe.write_all(&data).await {
                // The build closed its stdin: later data is acknowledged and dropped, as
                // a pipe's writer would see with SIGPIPE ignored.
                tracing::debug!(build = %id, error = %e, "build stdin closed");
                broken = true;
            }
        }
        let len = data.len() as u64;
        consumed += len;
        pending.fetch_sub(len, Ordering::SeqCst);
        out.control(DaemonMessage::StdinAck {
            build: id.clone(),
            consumed,
        })
        .await;
    }
}
