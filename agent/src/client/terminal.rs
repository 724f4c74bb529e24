//! The user's terminal while `tether shell` runs: raw mode and its size.
//!
//! In raw mode every byte the user types reaches the remote terminal as it is: Ctrl-C
//! is the byte 0x03, which the remote pty turns into SIGINT for the shell's foreground
//! job, so it never interrupts this client (or the daemon, or other builds). The
//! settings from before are put back when [`RawTerminal`] drops, which every exit path
//! of the client goes through: the shell's exit, an error, a lost connection, a signal
//! (SIGTERM, SIGHUP, handled as a hang-up), and a panic (unwinding). Only SIGKILL
//! skips it, as it does for every program.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg, Termios};
use tether_protocol::WindowSize;

/// A terminal in raw mode; its previous settings are restored on drop.
pub struct RawTerminal {
    fd: OwnedFd,
    saved: Termios,
}

impl RawTerminal {
    /// Switches the terminal `fd` to raw mode.
    pub fn enter(fd: BorrowedFd<'_>) -> io::Result<RawTerminal> {
        let saved = tcgetattr(fd)?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        // TCSADRAIN: what was already written is shown with the old settings.
        tcsetattr(fd, SetArg::TCSADRAIN, &raw)?;
        Ok(RawTerminal {
            fd: fd.try_clone_to_owned()?,
            saved,
        })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Err(e) = tcsetattr(&self.fd, SetArg::TCSADRAIN, &self.saved) {
            eprintln!("tether: cannot restore the terminal's settings ({e}); `stty sane` fixes it");
        }
    }
}

/// The size of the terminal `fd`, if it is one and knows its size.
pub fn window_size(fd: impl AsFd) -> Option<WindowSize> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into the struct we own.
    let rc = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some(WindowSize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}
