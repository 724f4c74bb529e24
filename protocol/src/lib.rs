//! tether's wire protocol: what travels between a client and `tether serve`.
//!
//! The protocol runs over any bidirectional byte stream: the daemon's own stdin/stdout
//! (reached through `kubectl attach -i`, `ssh host tether serve`, `runc run`, or a plain
//! pipe) and Unix sockets. Such streams are dirty: shells print banners, Kubernetes prints
//! "If you don't see a command prompt...", and under `kubectl attach` one client may vanish
//! in the middle of a frame and the next one continue the same pipe. So the protocol is
//! built to find its way back:
//!
//! * each side opens with an ASCII [`PREAMBLE`] line, and a reader skips every byte
//!   before it ([`frame::FrameDecoder`]);
//! * every frame carries a magic, a length bounded by [`MAX_PAYLOAD`] and a CRC32C of the
//!   whole frame, so a reader detects damage, reports it once and scans forward for the
//!   next frame or preamble instead of giving up the stream;
//! * payloads are [`message`]s encoded with bincode 2 behind one encode/decode pair
//!   ([`codec`]), decoded with a size limit and checked to be consumed whole.
//!
//! This crate does no I/O and holds no policy: it defines bytes and types. PROTOCOL.md at
//! the repository root is the byte-exact specification of everything here.

pub mod bytes;
pub mod codec;
pub mod frame;
pub mod handshake;
pub mod message;

pub use codec::{decode, encode_frame, DecodeError, EncodeError};
pub use frame::{Corruption, Decoded, EndOfStream, FrameDecoder, FRAME_HEADER_LEN, MAGIC};
pub use handshake::{check_hello, check_welcome, VersionMismatch};
pub use message::*;

/// The ASCII line each side writes before its first frame, and a client writes again to
/// start a new session on a stream it takes over.
pub const PREAMBLE: &[u8] = b"<===[TETHER]===>\n";

/// The protocol version this crate speaks. Bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 9;

/// Largest payload a frame may carry. A header that claims more is corrupt; no reader
/// ever allocates more than this (plus the header) for one frame.
pub const MAX_PAYLOAD: usize = 128 * 1024;

/// Largest block of bulk data (output, stdin) put into one message. Leaves room below
/// [`MAX_PAYLOAD`] for the message's other fields.
pub const MAX_CHUNK: usize = 64 * 1024;

/// Largest message a sub-session carries ([`ClientMessage::Sub`],
/// [`DaemonMessage::Sub`]): its wrapping must still fit in a frame.
pub const MAX_SUB_PAYLOAD: usize = MAX_PAYLOAD - 16;

/// Bytes a client that takes over a stream sends before its preamble: enough to complete
/// any frame an earlier client left half-written, so that the daemon's reader is back at
/// a frame boundary by the time the preamble arrives (see PROTOCOL.md, "Takeover").
pub const SYNC_PAD_LEN: usize = MAX_PAYLOAD + FRAME_HEADER_LEN;

/// Default number of stdin bytes a client may have sent and not yet seen acknowledged.
pub const DEFAULT_STDIN_WINDOW: u32 = 256 * 1024;

/// Default number of upload bytes a client may have sent and not yet seen acknowledged.
pub const DEFAULT_UPLOAD_WINDOW: u32 = 8 * 1024 * 1024;

/// How often, at least, a daemon announces who holds its stdin stream while a session
/// holds it ([`DaemonMessage::Channel`]), in milliseconds: a client that has read the
/// stream for a little over twice this long without an announcement finds it free.
pub const CHANNEL_BEACON_MS: u64 = 500;

/// Longest build id a client may choose ([`RunSpec::id`]).
pub const MAX_BUILD_ID_LEN: usize = 64;

/// A valid build id made of `name` (made safe: other characters become `-`, leading `.`
/// and `-` dropped, at most 40 bytes; `run` when nothing is left) and `suffix` (which the
/// caller makes unique, e.g. random hex): `name-suffix`.
pub fn build_id_from(name: Option<&str>, suffix: &str) -> String {
    let stem: String = name
        .unwrap_or("run")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    let stem = stem.trim_start_matches(['.', '-']);
    let stem = if stem.is_empty() { "run" } else { stem };
    let suffix: String = suffix
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(MAX_BUILD_ID_LEN - stem.len() - 1)
        .collect();
    format!("{stem}-{suffix}")
}

/// Whether `id` is a build id a client may choose: 1 to [`MAX_BUILD_ID_LEN`] bytes of
/// ASCII letters, digits, `.`, `_` and `-`, not starting with `.` or `-` (so it is a
/// plain file name and never an option).
pub fn valid_build_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_BUILD_ID_LEN
        && !id.starts_with(['.', '-'])
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}
