//! Pseudo-terminals for interactive shells.
//!
//! A shell behaves as a shell (prompt, line editing, job control, `^C`) only when its
//! stdin is a terminal, so the daemon gives it the slave side of a new pty and relays
//! the master side to the user's terminal.
//!
//! The parent opens the master only. The slave is opened by the child itself, during
//! `posix_spawn`, after it became a session leader: a session leader that opens a terminal
//! without `O_NOCTTY` acquires it as its controlling terminal (see
//! [`crate::spawn::SpawnRequest::tty`]). The parent must not keep the slave open: reading
//! the master fails with EIO once every process closed the slave, and that EIO is how
//! the end of the shell's output is seen; a slave fd in the daemon would postpone it
//! forever.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use nix::fcntl::OFlag;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// A terminal's size in character cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

/// A new pty: its master, and the path the child opens as its terminal.
#[derive(Debug)]
pub struct Pty {
    /// Close-on-exec: no child inherits it.
    pub master: OwnedFd,
    /// `/dev/pts/N`, unlocked and ready to be opened.
    pub slave_path: PathBuf,
}

/// Opens a new pty of the given size.
pub fn open_pty(size: WindowSize) -> io::Result<Pty> {
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    nix::pty::grantpt(&master)?;
    nix::pty::unlockpt(&master)?;
    let slave_path = PathBuf::from(nix::pty::ptsname_r(&master)?);
    let master = OwnedFd::from(master);
    set_window_size(master.as_fd(), size)?;
    Ok(Pty { master, slave_path })
}

/// Sets the terminal's size; the kernel sends SIGWINCH to its foreground process group.
pub fn set_window_size(master: BorrowedFd<'_>, size: WindowSize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize through the pointer, which outlives the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The size a terminal has now.
pub fn window_size(fd: BorrowedFd<'_>) -> io::Result<WindowSize> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize through the pointer, which outlives the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(WindowSize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

/// A pty master registered with the async runtime (non-blocking).
pub(crate) type AsyncMaster = Arc<AsyncFd<OwnedFd>>;

/// Makes `fd` (a master or a dup of one) non-blocking and registers it for `interest`.
/// Dups share the open file description, so O_NONBLOCK is set on all of them.
pub(crate) fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncMaster> {
    let flags = OFlag::from_bits_retain(nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)?);
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    // SAFETY: an OwnedFd is a valid open fd that stays open, unchanged, until dropped
    // (and the AsyncFd drops it only after deregistering).
    let registered = unsafe { AsyncFd::register_with_interest(fd, interest) };
    Ok(Arc::new(registered.map_err(io::Error::from)?))
}

/// Reads what the terminal's processes wrote. EIO, which a master reports once every
/// process closed the slave, is the end of the output: returned as `Ok(0)`.
pub(crate) async fn read(master: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut guard = master.readable().await?;
        match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), buf).map_err(io::Error::from)) {
            Ok(Ok(n)) => return Ok(n),
            Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
            Ok(Err(e)) => return Err(e),
            // Not readable after all: readiness was cleared, wait again.
            Err(_would_block) => continue,
        }
    }
}

/// Writes all of `data` as typed input; waits while the terminal's input queue is full.
pub(crate) async fn write_all(master: &AsyncFd<OwnedFd>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let mut guard = master.writable().await?;
        match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from)) {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    #[test]
    fn a_new_pty_has_the_size_it_was_opened_with_and_can_be_resized() {
        let size = WindowSize { rows: 33, cols: 101 };
        let pty = open_pty(size).unwrap();
        assert!(pty.slave_path.starts_with("/dev/pts"), "{:?}", pty.slave_path);
        assert_eq!(window_size(pty.master.as_fd()).unwrap(), size);
        let bigger = WindowSize { rows: 50, cols: 132 };
        set_window_size(pty.master.as_fd(), bigger).unwrap();
        // The slave sees what the master set.
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&pty.slave_path)
            .unwrap();
        assert_eq!(window_size(slave.as_fd()).unwrap(), bigger);
    }

    #[test]
    fn the_master_is_close_on_exec() {
        let pty = open_pty(WindowSize { rows: 24, cols: 80 }).unwrap();
        let flags = nix::fcntl::fcntl(&pty.master, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
    }
}
