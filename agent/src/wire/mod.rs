//! Moving frames over byte streams: the transport-independent half of every connection.
//!
//! Inbound, a reader (a thread for blocking fds such as the daemon's stdin, a task for
//! async streams) runs a [`tether_protocol::FrameDecoder`] and sends [`Inbound`] items over a bounded
//! channel, so a slow consumer slows the reader rather than growing memory. Outbound,
//! frames are encoded into buffers and handed to a [`Sink`].

pub mod inbound;
pub mod sink;

pub use inbound::{read_async, read_blocking, Inbound};
pub use sink::Sink;

use tether_protocol::{encode_frame, EncodeError};

/// Encodes one message as a frame appended to `buf`, logging (not panicking on) the
/// impossible case of a message too large to frame.
pub fn push_frame<T: serde::Serialize + std::fmt::Debug>(buf: &mut Vec<u8>, msg: &T) -> Result<(), EncodeError> {
    encode_frame(msg, buf).inspect_err(|e| tracing::error!(error = %e, "cannot encode a message"))
}
