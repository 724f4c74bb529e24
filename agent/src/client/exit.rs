//! Exit statuses of client commands, following `docker run` and `timeout`:
//! the build's own code; 128+N when signal N killed it; 124 when its timeout expired;
//! 125 when tether itself failed; 126 when the command cannot be invoked; 127 when it
//! was not found.

use tether_protocol::{EndCause, ErrorKind, ExitStatus, Exited};

pub const TIMED_OUT: i32 = 124;
pub const TETHER_FAILED: i32 = 125;
pub const NOT_EXECUTABLE: i32 = 126;
pub const NOT_FOUND: i32 = 127;

/// The exit code for a finished build.
pub fn for_exited(e: &Exited) -> i32 {
    for_end(&e.status, e.cause)
}

/// The exit code for a build that ended with `status` for `cause`: 124 after its
/// timeout; after the daemon's shutdown never 0 (the build did not get to finish: a
/// status 0 from a build that handled the SIGTERM is reported as 143, 128 + SIGTERM).
pub fn for_end(status: &ExitStatus, cause: EndCause) -> i32 {
    match (cause, status) {
        (EndCause::TimedOut, _) => TIMED_OUT,
        (EndCause::Shutdown, ExitStatus::Code(0)) => 128 + libc::SIGTERM,
        _ => for_status(status),
    }
}

/// The exit code for a process status: its code, or 128+N for signal N.
pub fn for_status(status: &ExitStatus) -> i32 {
    match *status {
        ExitStatus::Code(code) => code,
        ExitStatus::Signal { signal, .. } => 128 + signal,
    }
}

/// The exit code for a build that could not start or a failed request.
pub fn for_error(kind: ErrorKind) -> i32 {
    match kind {
        ErrorKind::CommandNotFound => NOT_FOUND,
        ErrorKind::NotExecutable => NOT_EXECUTABLE,
        _ => TETHER_FAILED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_protocol::BuildId;

    fn exited(status: ExitStatus, cause: EndCause) -> Exited {
        Exited {
            build: BuildId("b".into()),
            status,
            cause,
            duration_ms: 0,
            stdout_bytes: 0,
            stderr_bytes: 0,
        }
    }

    #[test]
    fn conventions() {
        assert_eq!(for_exited(&exited(ExitStatus::Code(3), EndCause::Completed)), 3);
        let killed = ExitStatus::Signal {
            signal: 9,
            core_dumped: false,
        };
        assert_eq!(for_exited(&exited(killed, EndCause::Cancelled)), 137);
        assert_eq!(for_exited(&exited(killed, EndCause::TimedOut)), 124);
        assert_eq!(for_exited(&exited(ExitStatus::Code(0), EndCause::Shutdown)), 143);
        assert_eq!(for_exited(&exited(ExitStatus::Code(2), EndCause::Shutdown)), 2);
        let termed = ExitStatus::Signal {
            signal: 15,
            core_dumped: false,
        };
        assert_eq!(for_exited(&exited(termed, EndCause::Shutdown)), 143);
        assert_eq!(for_error(ErrorKind::CommandNotFound), 127);
        assert_eq!(for_error(ErrorKind::NotExecutable), 126);
        assert_eq!(for_error(ErrorKind::Internal), 125);
    }
}
