//! How a build ended: the exact status and why.

use std::time::Duration;

use crate::reaper::ChildStatus;

/// Why a build ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndCause {
    /// The main process exited on its own.
    Completed,
    /// Someone cancelled it (a client, or the daemon shutting down).
    Cancelled,
    /// Its timeout expired.
    TimedOut,
}

/// The end of a build, delivered after its output and after its directory is gone.
#[derive(Debug, Clone)]
pub struct BuildOutcome {
    /// The main process's status as `wait` reported it. `None` only if the reaper went
    /// away before reporting it (the daemon is shutting down hard).
    pub status: Option<ChildStatus>,
    pub cause: EndCause,
    /// From spawn until cleanup finished.
    pub duration: Duration,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    /// Processes of the build's group still alive when the main process had exited, that
    /// tether then terminated.
    pub leftovers_killed: bool,
    /// What could not be cleaned up, if anything (logged by the caller).
    pub cleanup_error: Option<String>,
}
