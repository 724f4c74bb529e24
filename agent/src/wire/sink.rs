//! Where encoded frames (or a client's build output) go.
//!
//! A [`Sink`] is a dedicated thread doing blocking writes to a file descriptor (the
//! daemon's stdout, the client's stdout and stderr). A thread, because these fds may be
//! shared with other processes (a terminal, a file): making them non-blocking would
//! change them for everyone holding them.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::thread::JoinHandle;

use tokio::sync::mpsc;

/// Buffers in flight to a thread sink before `write` waits.
const THREAD_QUEUE: usize = 4;

/// A destination for byte buffers.
pub struct Sink {
    tx: mpsc::Sender<Vec<u8>>,
    thread: JoinHandle<std::io::Result<()>>,
}

impl Sink {
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
        Ok(Sink { tx, thread })
    }

    /// Writes all of `buf`. An error means the destination is gone for good.
    pub async fn write(&mut self, buf: Vec<u8>) -> std::io::Result<()> {
        self.tx
            .send(buf)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "writer thread ended"))
    }

    /// Closes the sink and waits until everything was written.
    pub async fn close(self) -> std::io::Result<()> {
        let Sink { tx, thread } = self;
        drop(tx);
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .map_err(std::io::Error::other)?
            .map_err(|_| std::io::Error::other("writer thread panicked"))?
    }
}
