//! The interactive shells that live in a build (`tether shell --build ID`).
//!
//! Such a shell runs in the build's directory, with its environment, but in a session of
//! its own: the build's supervisor, which signals the build's process group, never
//! reaches it. So the build keeps a list of them, [`Attachments`], and before it removes
//! its directory hangs up every one still alive and waits until each is gone (see
//! [`crate::build`], step 6). A [`crate::Prepared`] build that is dropped kills its
//! shells at once, synchronously, before removing its directory.
//!
//! Once the build began to end them the list is *closed*: a shell that tried to attach
//! afterwards would outlive the hang-up and work in a directory being removed, so it is
//! refused. Starting a shell holds the list's lock across the spawn, so a shell is either
//! started and listed before the list closes, or refused.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::build::StartError;
use crate::interactive::{Shell, ShellControl};

/// How long processes are waited for after SIGKILL before giving up on them (a process
/// stuck in uninterruptible sleep, on a dead NFS server say).
pub(crate) const KILL_WAIT: Duration = Duration::from_secs(5);

/// The shells attached to one build. Cheap to clone: clones share the list.
#[derive(Clone, Debug, Default)]
pub struct Attachments {
    inner: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    /// No shell may attach any more: the build is ending its shells.
    closed: bool,
    shells: Vec<ShellControl>,
}

impl Attachments {
    /// An empty list, open for shells.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the list inconsistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many attached shells still have processes.
    pub fn live(&self) -> usize {
        self.lock().shells.iter().filter(|s| !s.is_gone()).count()
    }

    /// The session ids of the attached shells that still have processes.
    pub(crate) fn sids(&self) -> Vec<i32> {
        self.lock()
            .shells
            .iter()
            .filter(|s| !s.is_gone())
            .map(|s| s.sid())
            .collect()
    }

    /// Whether the build began ending its shells (no shell can attach any more).
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Runs `start` and lists the shell it started, unless the list is closed. The lock
    /// is held across `start`, so the list cannot close between the check and the spawn.
    pub(crate) fn attach(
        &self,
        cwd: &std::path::Path,
        start: impl FnOnce() -> Result<Shell, StartError>,
    ) -> Result<Shell, StartError> {
        let mut state = self.lock();
        if state.closed {
            return Err(StartError::BadWorkdir {
                path: cwd.to_path_buf(),
                reason: "the build this shell would run in has ended".into(),
            });
        }
        let shell = start()?;
        state.shells.retain(|s| !s.is_gone());
        state.shells.push(shell.control.clone());
        Ok(shell)
    }

    /// Closes the list, takes its shells.
    fn close(&self) -> Vec<ShellControl> {
        let mut state = self.lock();
        state.closed = true;
        std::mem::take(&mut state.shells)
    }

    /// Closes the list, hangs up every listed shell still alive and waits until each is
    /// gone: its own supervisor sends SIGKILL after its grace period. Should that not
    /// happen within the grace period and [`KILL_WAIT`] (its runtime is shutting down),
    /// its session is killed from here.
    pub(crate) async fn hang_up_all(&self) {
        let shells = self.close();
        let alive: Vec<ShellControl> = shells.into_iter().filter(|s| !s.is_gone()).collect();
        for shell in &alive {
            shell.hang_up();
        }
        for shell in alive {
            if tokio::time::timeout(shell.grace() + KILL_WAIT, shell.gone())
                .await
                .is_ok()
            {
                continue;
            }
            tracing::warn!(
                sid = shell.sid(),
                "an attached shell outlived its hang-up; killing its session"
            );
            crate::procs::signal_session(shell.sid(), Signal::SIGKILL);
            if tokio::time::timeout(KILL_WAIT, shell.gone()).await.is_err() {
                tracing::error!(sid = shell.sid(), "processes of an attached shell survive SIGKILL");
            }
        }
    }

    /// Closes the list and SIGKILLs every listed shell's session, waiting (blocking, at
    /// most [`KILL_WAIT`] per shell) until no process of it runs. For synchronous
    /// callers that are about to remove the directory the shells work in.
    pub(crate) fn kill_all(&self) {
        for shell in self.close() {
            if shell.is_gone() {
                continue;
            }
            shell.hang_up();
            if !crate::procs::kill_session_blocking(shell.sid(), KILL_WAIT) {
                tracing::error!(sid = shell.sid(), "processes of an attached shell survive SIGKILL");
            }
        }
    }
}
