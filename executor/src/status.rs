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
    /// It was held ([`crate::BuildSpec::hold_after`], `hold_on_failure`) and a release
    /// chose the status it finishes with (not its own).
    Released,
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

impl EndCause {
    /// The name used in status files and logs.
    pub fn name(self) -> &'static str {
        match self {
            EndCause::Completed => "completed",
            EndCause::Cancelled => "cancelled",
            EndCause::TimedOut => "timed_out",
            EndCause::Released => "released",
        }
    }
}

impl BuildOutcome {
    /// The status file's content (one JSON object; see [`crate::spool`]), written
    /// atomically to the build's spool when it ends.
    pub fn status_json(&self) -> String {
        let status = match self.status {
            Some(ChildStatus::Exited(code)) => format!("{{\"code\":{code}}}"),
            Some(ChildStatus::Signaled { signal, core_dumped }) => {
                format!("{{\"signal\":{signal},\"core_dumped\":{core_dumped}}}")
            }
            None => "null".to_owned(),
        };
        let finished_at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        format!(
            "{{\"status\":{status},\"cause\":\"{}\",\"duration_ms\":{},\"finished_at_ms\":{finished_at_ms},\"stdout_bytes\":{},\"stderr_bytes\":{},\"leftovers_killed\":{}}}\n",
            self.cause.name(),
            self.duration.as_millis(),
            self.stdout_bytes,
            self.stderr_bytes,
            self.leftovers_killed,
        )
    }
}
