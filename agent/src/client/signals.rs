//! The signals that end a client: SIGINT (Ctrl-C), SIGTERM (Jenkins' Abort, a pod's
//! deletion) and SIGHUP (a closed terminal). Listened to once for the client's whole
//! life, so that one arriving in any state (connecting, waiting for a daemon's stdin
//! stream, reconnecting, following) is seen.

use tokio::signal::unix::{signal, Signal, SignalKind};

/// How long a client that was asked to leave waits for what it started to end (a
/// cancelled build's `Exited`) before it leaves anyway: within a second in all.
pub const LEAVE_WAIT: std::time::Duration = std::time::Duration::from_millis(600);

pub struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Signals {
    pub fn new() -> std::io::Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// The next signal's number.
    pub async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.int.recv() => libc::SIGINT,
            _ = self.term.recv() => libc::SIGTERM,
            _ = self.hup.recv() => libc::SIGHUP,
        }
    }
}

/// The exit code of a client that a signal ended: 128 + its number, as a shell reports
/// a process the signal killed.
pub fn exit_code(sig: i32) -> i32 {
    128 + sig
}

/// The signal's name for messages.
pub fn name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}
