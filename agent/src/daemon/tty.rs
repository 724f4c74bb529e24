//! stdin that is a terminal.
//!
//! Pod templates from the `cat` era say `tty: true`, which puts a pty line discipline
//! between the client and the daemon: canonical buffering, echo, 0x03 turned into
//! SIGINT, `\r` into `\n`, `\n` into `\r\n` on output. Frames survive none of that, so
//! when stdin is a terminal the daemon switches it to raw mode (`cfmakeraw`) before it
//! reads or writes a byte, logs once that `tty: false` with `stdin: true` is the
//! recommended setting, and restores the original settings when it exits.

use std::os::fd::{AsFd, OwnedFd};

use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg, Termios};

/// The terminal's settings before raw mode, restored on drop.
pub struct RawTty {
    fd: OwnedFd,
    saved: Termios,
}

impl RawTty {
    /// Puts `fd` in raw mode if it is a terminal; `None` (and nothing changed) otherwise.
    pub fn enter(fd: &impl AsFd) -> Option<RawTty> {
        let saved = tcgetattr(fd).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        if let Err(e) = tcsetattr(fd, SetArg::TCSANOW, &raw) {
            tracing::warn!(error = %e, "stdin is a terminal but cannot be switched to raw mode; frames may be mangled");
            return None;
        }
        tracing::warn!(
            "stdin is a terminal (tty: true); switched it to raw mode so frames pass unchanged. \
             Recommended in the pod template: tty: false with stdin: true"
        );
        let fd = fd.as_fd().try_clone_to_owned().ok()?;
        Some(RawTty { fd, saved })
    }
}

impl Drop for RawTty {
    fn drop(&mut self) {
        if let Err(e) = tcsetattr(&self.fd, SetArg::TCSANOW, &self.saved) {
            tracing::debug!(error = %e, "cannot restore the terminal's settings");
        }
    }
}
