//! A session's outgoing queues: control (replies, pongs, acks) and data (output, exits).
//!
//! Two queues so that a build flooding output never delays a pong or a reply: the
//! connection's writer always empties the control queue first. Everything about one
//! build goes through the data queue, which keeps `Output` before `Exited`.

use tether_protocol::DaemonMessage;
use tokio::sync::mpsc;

const CONTROL_QUEUE: usize = 256;
const DATA_QUEUE: usize = 64;

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

    /// Queues a data message, waiting while the client is behind; false once the
    /// session is gone.
    pub async fn data(&self, msg: DaemonMessage) -> bool {
        self.data.send(msg).await.is_ok()
    }
}
