//! Where encoded frames (or a client's build output) go.
//!
//! The fds tether writes to (the daemon's stdout, the client's stdout and stderr) may be
//! shared with other processes: a terminal, a file, a pipe that a shell also holds.
//! Making such an fd non-blocking would change it for everyone holding it, so a [`Sink`]
//! picks one of three ways:
//!
//! * a pipe is reopened through `/proc/self/fd/N`, which gives tether a private open file
//!   description of the same pipe, made non-blocking and written asynchronously: no
//!   thread hand-off per write, the fastest path for streaming;
//! * otherwise, where blocking is harmless (the client: /dev/null, a file, a terminal),
//!   writes are made directly;
//! * otherwise (the daemon's stdout on a socket or terminal) a dedicated thread does the
//!   blocking writes, so the daemon's tasks never block.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::thread::JoinHandle;

use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

/// Buffers in flight to a thread sink before `write` waits.
const THREAD_QUEUE: usize = 4;

/// How to write when the fd is not a pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// A writer thread (never blocks the caller's runtime).
    Thread,
    /// Blocking writes in place (for a client, where nothing else needs the thread).
    Direct,
}

/// A destination for byte buffers.
pub enum Sink {
    Pipe(pipe::Sender),
    Direct(File),
    Thread {
        tx: mpsc::Sender<Vec<u8>>,
        thread: JoinHandle<std::io::Result<()>>,
    },
}

impl Sink {
    /// The best sink for `fd` (see the module doc).
    pub fn for_fd(fd: OwnedFd, name: &str, fallback: Fallback) -> std::io::Result<Sink> {
        if let Some(pipe) = reopen_pipe(&fd) {
            return Ok(Sink::Pipe(pipe));
        }
        match fallback {
            Fallback::Direct => Ok(Sink::Direct(File::from(fd))),
            Fallback::Thread => Sink::thread(fd, name),
        }
    }

    /// A sink writing to `fd` from its own thread.
    pub fn thread(fd: OwnedFd, name: &str) -> std::io::Result<Sink> {
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(THREAD_QUEUE);
        let mut file = File::from(fd);
        let thread = std::thread::Builder::new().name(name.into()).spawn(move || {
            while let Some(buf) = rx.blocking_recv() {
                file.write_all(&buf)?;
            }
            Ok(())
        })?;
        Ok(Sink::Thread { tx, thread })
    }

    /// Writes all of `buf` and leaves it empty (keeping its capacity where the write
    /// happens in place, so a caller's buffer is reused). An error means the
    /// destination is gone for good.
    pub async fn write(&mut self, buf: &mut Vec<u8>) -> std::io::Result<()> {
        let result = match self {
            Sink::Pipe(p) => p.write_all(buf).await,
            Sink::Direct(f) => f.write_all(buf),
            Sink::Thread { tx, .. } => tx
                .send(std::mem::take(buf))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "writer thread ended")),
        };
        buf.clear();
        result
    }

    /// Closes the sink and waits until everything was written.
    pub async fn close(self) -> std::io::Result<()> {
        match self {
            Sink::Pipe(_) | Sink::Direct(_) => Ok(()),
            Sink::Thread { tx, thread } => {
                drop(tx);
                tokio::task::spawn_blocking(move || thread.join())
                    .await
                    .map_err(std::io::Error::other)?
                    .map_err(|_| std::io::Error::other("writer thread panicked"))?
            }
        }
    }
}

/// A private, non-blocking write description of `fd` if it is a pipe.
fn reopen_pipe(fd: &OwnedFd) -> Option<pipe::Sender> {
    let file = File::from(fd.try_clone().ok()?);
    if !file.metadata().ok()?.file_type().is_fifo() {
        return None;
    }
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let mut options = std::fs::OpenOptions::new();
    options.write(true).custom_flags(libc::O_NONBLOCK);
    let reopened = options.open(path).ok()?;
    pipe::Sender::from_file(reopened).ok()
}
