//! The one encode/decode pair for payloads. bincode 2.0.1 is frozen upstream; keeping it
//! behind these two functions means the payload format can be swapped in one place.

use serde::{de::DeserializeOwned, Serialize};

use crate::frame::{seal_frame, FRAME_HEADER_LEN};
use crate::MAX_PAYLOAD;

/// bincode's decode limit. bincode counts in-memory sizes, not wire bytes: every integer
/// counts its full width (a `u64` or a length counts 8 bytes even when its varint is one
/// byte), a byte string or string counts its length. So a payload of `n` bytes counts at
/// most `8 * n`, and this limit lets every payload that fits in a frame decode, while a
/// lying length inside a payload still cannot make the decoder allocate more than 1 MiB.
const DECODE_LIMIT: usize = 8 * MAX_PAYLOAD;

/// bincode's standard configuration (little endian, variable-length integers) with a
/// decode limit (see [`DECODE_LIMIT`]).
fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

/// Encoding failed.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("message of {0} bytes exceeds the maximum payload of {MAX_PAYLOAD} bytes")]
    TooLarge(usize),
    #[error("cannot encode message: {0}")]
    Encode(#[from] bincode::error::EncodeError),
}

/// Decoding a (checksummed) payload failed: the frame was intact but its contents are
/// not a message this side knows, for example a newer peer's new variant.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("undecodable payload: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("payload has {0} trailing bytes after the message")]
    Trailing(usize),
}

/// Appends one whole frame holding `msg` to `out`. On error `out` is left as it was.
pub fn encode_frame<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let start = out.len();
    out.resize(start + FRAME_HEADER_LEN, 0);
    if let Err(e) = bincode::serde::encode_into_std_write(msg, out, config()) {
        out.truncate(start);
        return Err(e.into());
    }
    let len = out.len() - start - FRAME_HEADER_LEN;
    if len > MAX_PAYLOAD {
        out.truncate(start);
        return Err(EncodeError::TooLarge(len));
    }
    seal_frame(&mut out[start..]);
    Ok(())
}

/// Decodes a payload that must hold exactly one message.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, DecodeError> {
    // The borrowing decoder lets byte strings copy straight out of the payload.
    let (msg, used) = bincode::serde::borrow_decode_from_slice(payload, config())?;
    if used != payload.len() {
        return Err(DecodeError::Trailing(payload.len() - used));
    }
    Ok(msg)
}
