//! Readers that turn a byte stream into [`Inbound`] items.

use std::io::Read;

use serde::de::DeserializeOwned;
use tether_protocol::frame::EndOfStream;
use tether_protocol::{decode, Corruption, Decoded, FrameDecoder};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;

/// One item read from a peer.
#[derive(Debug)]
pub enum Inbound<M> {
    /// The peer (re)started a session.
    Preamble,
    /// A decoded message.
    Message(M),
    /// The stream was damaged (once per episode); the reader resynchronises.
    Corrupt(Corruption),
    /// A frame arrived intact but holds no message this side knows.
    Undecodable(String),
    /// The stream ended; `Truncated` if it ended inside a frame.
    Eof(EndOfStream),
    /// Reading failed.
    Failed(std::io::Error),
}

/// Decodes everything buffered in `dec`, sending items to `tx`. Returns false once the
/// receiver is gone.
fn drain<M: DeserializeOwned>(dec: &mut FrameDecoder, mut send: impl FnMut(Inbound<M>) -> bool) -> bool {
    while let Some(item) = dec.decode() {
        let inbound = match item {
            Decoded::Preamble => Inbound::Preamble,
            Decoded::Frame(payload) => match decode::<M>(payload) {
                Ok(msg) => Inbound::Message(msg),
                Err(e) => Inbound::Undecodable(e.to_string()),
            },
            Decoded::Corrupt(c) => Inbound::Corrupt(c),
        };
        if !send(inbound) {
            return false;
        }
    }
    true
}

/// Reads a blocking stream (the daemon's stdin) on the calling thread until EOF, an
/// error, or the receiver going away. Run it on a dedicated thread: a blocking read
/// cannot be cancelled, and a read that lost a race would swallow bytes.
pub fn read_blocking<M: DeserializeOwned>(mut src: impl Read, tx: mpsc::Sender<Inbound<M>>) {
    let mut dec = FrameDecoder::new();
    loop {
        let n = match src.read(dec.read_buf()) {
            Ok(0) => {
                let _ = tx.blocking_send(Inbound::Eof(dec.end_of_stream()));
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = tx.blocking_send(Inbound::Failed(e));
                return;
            }
        };
        dec.commit(n);
        if !drain(&mut dec, |item| tx.blocking_send(item).is_ok()) {
            return;
        }
    }
}

/// Reads an async stream (a child's stdout, a socket) until EOF, an error, or the
/// receiver going away.
pub async fn read_async<M: DeserializeOwned>(mut src: impl AsyncRead + Unpin, tx: mpsc::Sender<Inbound<M>>) {
    let mut dec = FrameDecoder::new();
    loop {
        let n = match src.read(dec.read_buf()).await {
            Ok(0) => {
                let _ = tx.send(Inbound::Eof(dec.end_of_stream())).await;
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = tx.send(Inbound::Failed(e)).await;
                return;
            }
        };
        dec.commit(n);
        // Items are collected first: the decoder's borrow cannot live across an await.
        let mut items = Vec::new();
        drain(&mut dec, |item| {
            items.push(item);
            true
        });
        for item in items {
            if tx.send(item).await.is_err() {
                return;
            }
        }
    }
}
