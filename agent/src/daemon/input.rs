//! The input pump shared by a build's stdin and a shell's terminal or stdin pipe.
//!
//! The session loop never waits on a child's input: it queues each client piece (within
//! the stdin window, checked there) for a pump task, which writes it and then
//! acknowledges the total written, so the client may send more. When the child stops
//! reading for good (closed its stdin, exited), later pieces are acknowledged and dropped,
//! as a pipe's writer with SIGPIPE ignored would see, so a client never waits for an
//! acknowledgement that cannot come.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tether_executor::interactive::ShellInput;
use tether_executor::BuildStdin;
use tether_protocol::DaemonMessage;
use tokio::sync::mpsc;

use super::outbox::Outbox;

/// What the session queues for a pump.
pub enum InputCmd {
    Data(Vec<u8>),
    /// The end of the input (`CloseStdin`, `ShellInputEnd`).
    End,
}

/// Where a pump writes.
pub trait InputSink: Send + 'static {
    fn write_all<'a>(&'a mut self, data: &'a [u8]) -> impl Future<Output = io::Result<()>> + Send + 'a;
    /// Ends the input. Returns whether the pump stops: a pipe is closed by dropping it,
    /// a terminal has no end of input and keeps taking keystrokes.
    fn end(&mut self) -> bool;
}

impl InputSink for BuildStdin {
    fn write_all<'a>(&'a mut self, data: &'a [u8]) -> impl Future<Output = io::Result<()>> + Send + 'a {
        BuildStdin::write_all(self, data)
    }

    fn end(&mut self) -> bool {
        true
    }
}

impl InputSink for ShellInput {
    fn write_all<'a>(&'a mut self, data: &'a [u8]) -> impl Future<Output = io::Result<()>> + Send + 'a {
        ShellInput::write_all(self, data)
    }

    fn end(&mut self) -> bool {
        self.close();
        false
    }
}

/// Writes queued pieces to `sink`, lowering `pending` and queueing `ack(total written)`
/// after each; `what` names the input in logs.
pub async fn pump(
    what: String,
    mut sink: impl InputSink,
    mut rx: mpsc::UnboundedReceiver<InputCmd>,
    pending: Arc<AtomicU64>,
    ack: impl Fn(u64) -> DaemonMessage + Send + 'static,
    out: Outbox,
) {
    let mut consumed = 0u64;
    let mut broken = false;
    while let Some(cmd) = rx.recv().await {
        let data = match cmd {
            InputCmd::Data(data) => data,
            InputCmd::End if sink.end() => break,
            InputCmd::End => continue,
        };
        if !broken {
            if let Err(e) = sink.write_all(&data).await {
                tracing::debug!(input = %what, error = %e, "input closed by its reader");
                broken = true;
            }
        }
        let len = data.len() as u64;
        consumed += len;
        pending.fetch_sub(len, Ordering::SeqCst);
        out.control(ack(consumed)).await;
    }
}
