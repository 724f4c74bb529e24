//! A session's outgoing queues: control (replies, pongs, acks) and data (output, exits).
//!
//! Two queues so that a build flooding output never delays a pong or a reply: the
//! connection's writer always empties the control queue first. Everything about one
//! build goes through the data queue, which keeps `Output` before `Exited`.
//!
//! The data queue is bounded in messages (each at most one chunk): it is all the memory
//! a client that stops reading can hold in the daemon. Whoever feeds it either never
//! waits ([`Outbox::try_data`], the live path of a build) or waits on a thread of its
//! own ([`Outbox::blocking_data`], a follower catching up from the spool).

use tether_protocol::DaemonMessage;
use tokio::sync::mpsc;

const CONTROL_QUEUE: usize = 256;
const DATA_QUEUE: usize = 64;

/// Why [`Outbox::try_data`] did not queue a message.
#[derive(Debug)]
pub enum Full {
    /// The client is behind; the message was not queued.
    Behind,
    /// The session is gone.
    Gone,
}

/// The sending side, cloned into every task that talks to the session's client.
#[derive(Clone, Debug)]
pub struct Outbox {
    control: mpsc::Sender<DaemonMessage>,
    data: mpsc::Sender<DaemonMessage>,
}

/// The receiving side, owned by the connection's writer.
#[derive(Debug)]
pub struct OutboxRx {
    pub control: mpsc::Receiver<DaemonMessage>,
    pub data: mpsc::Receiver<DaemonMessage>,
}

/// A new pair of queues.
pub fn outbox() -> (Outbox, OutboxRx) {
    let (ctx, crx) = mpsc::channel(CONTROL_QUEUE);
    let (dtx, drx) = mpsc::channel(DATA_QUEUE);
    (
        Outbox {
            control: ctx,
            data: dtx,
        },
        OutboxRx {
            control: crx,
            data: drx,
        },
    )
}

impl Outbox {
    /// Queues a control message; false once the session is gone.
    pub async fn control(&self, msg: DaemonMessage) -> bool {
        self.control.send(msg).await.is_ok()
    }

    /// Queues a control message unless the queue is full (heartbeats: a client that is
    /// that far behind gains nothing from another ping); false once the session is gone.
    pub fn try_control(&self, msg: DaemonMessage) -> bool {
        !matches!(self.control.try_send(msg), Err(mpsc::error::TrySendError::Closed(_)))
    }

    /// Queues a control message, blocking this thread while the queue is full; false
    /// once the session is gone. Only for threads outside the runtime.
    pub fn blocking_control(&self, msg: DaemonMessage) -> bool {
        self.control.blocking_send(msg).is_ok()
    }

    /// Queues a data message if there is room now.
    pub fn try_data(&self, msg: DaemonMessage) -> Result<(), Full> {
        self.data.try_send(msg).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Full::Behind,
            mpsc::error::TrySendError::Closed(_) => Full::Gone,
        })
    }

    /// Queues a data message, waiting while the client is behind; false once the
    /// session is gone (a shell's output: the shell waits, as on a terminal not read).
    pub async fn data(&self, msg: DaemonMessage) -> bool {
        self.data.send(msg).await.is_ok()
    }

    /// Queues a data message, blocking this thread while the client is behind; false
    /// once the session is gone. Only for threads outside the runtime.
    pub fn blocking_data(&self, msg: DaemonMessage) -> bool {
        self.data.blocking_send(msg).is_ok()
    }
}
