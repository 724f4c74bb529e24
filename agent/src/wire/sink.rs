//! Where encoded frames (or a client's build output) go.
//!
//! The fds tether writes to (the daemon's stdout, the client's stdout and stderr) may be
//! shared with other processes: a terminal, a file, a pipe a shell also holds. Making
//! such an fd non-blocking would change it for everyone holding it, so writes stay
//! blocking, in one of two ways:
//!
//! * [`Sink::thread`] (the daemon): a dedicated thread does the blocking writes, so the
//!   daemon's runtime never blocks, and writing overlaps with reading the builds' pipes
//!   on another core. Emptied buffers travel back to be reused, so streaming does not
//!   allocate a fresh batch buffer per write.
//! * [`Sink::direct`] (the client): blocking writes in place; the client has nothing else
//!   to do while its stdout is busy.
//!
//! A socket belongs to tether alone, so a connection's write half is an async writer
//! ([`Sink::Async`]).

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Buffers in flight to a thread sink before `write` waits.
const THREAD_QUEUE: usize = 4;

/// A destination for byte buffers.
pub enum Sink {
    Async(Box<dyn AsyncWrite + Send + Unpin>),
    Direct(File),
    Thread {
        tx: mpsc::Sender<Vec<u8>>,
        /// Buffers the thread has written, for reuse.
        recycled: std_mpsc::Receiver<Vec<u8>>,
        thread: JoinHandle<std::io::Result<()>>,
    },
}

impl Sink {
    /// Blocking writes in place.
    pub fn direct(fd: OwnedFd) -> Sink {
        Sink::Direct(File::from(fd))
    }

    /// A sink writing to `fd` from its own thread.
    pub fn thread(fd: OwnedFd, name: &str) -> std::io::Result<Sink> {
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(THREAD_QUEUE);
        let (give_back, recycled) = std_mpsc::channel();
        let mut file = File::from(fd);
        let thread = std::thread::Builder::new().name(name.into()).spawn(move || {
            while let Some(mut buf) = rx.blocking_recv() {
                file.write_all(&buf)?;
                buf.clear();
                // The receiving side may be gone at shutdown; the buffer is then freed.
                let _ = give_back.send(buf);
            }
            Ok(())
        })?;
        Ok(Sink::Thread { tx, recycled, thread })
    }

    /// Writes all of `buf` and leaves it empty (with capacity to reuse). An error means
    /// the destination is gone for good.
    pub async fn write(&mut self, buf: &mut Vec<u8>) -> std::io::Result<()> {
        match self {
            Sink::Async(w) => {
                let result = w.write_all(buf).await;
                buf.clear();
                result
            }
            Sink::Direct(f) => {
                let result = f.write_all(buf);
                buf.clear();
                result
            }
            Sink::Thread { tx, recycled, .. } => {
                let spare = recycled.try_recv().unwrap_or_default();
                let full = std::mem::replace(buf, spare);
                tx.send(full)
                    .await
                    .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "writer thread ended"))
            }
        }
    }

    /// Closes the sink and waits until everything was written.
    pub async fn close(self) -> std::io::Result<()> {
        match self {
            Sink::Async(mut w) => w.shutdown().await,
            Sink::Direct(_) => Ok(()),
            Sink::Thread { tx, thread, .. } => {
                drop(tx);
                tokio::task::spawn_blocking(move || thread.join())
                    .await
                    .map_err(std::io::Error::other)?
                    .map_err(|_| std::io::Error::other("writer thread panicked"))?
            }
        }
    }
}
