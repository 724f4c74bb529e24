//! Framing: the preamble, the frame header, and a decoder that finds its way back.
//!
//! A frame is `MAGIC (4) | payload length u32 LE (4) | CRC32C u32 LE (4) | payload`, the
//! CRC covering the first eight header bytes and the payload. [`FrameDecoder`] is a
//! sans-I/O state machine in the style of mini-redis' "check, then parse": bytes go in
//! through [`FrameDecoder::read_buf`]/[`FrameDecoder::commit`] (or [`FrameDecoder::feed`]),
//! [`Decoded`] items come out of [`FrameDecoder::decode`], and `None` means "give me more
//! bytes". It never allocates what a length field claims: the buffer is sized once for the
//! largest legal frame.
//!
//! Damage (a bad magic, an impossible length, a failed checksum) is reported once per
//! episode as [`Decoded::Corrupt`]; the decoder then drops one byte and scans forward for
//! the next magic or preamble, re-examining bytes it had already buffered, so frames that
//! followed a damaged one are found even when the damaged header claimed to swallow them.

use crate::{MAX_PAYLOAD, PREAMBLE};

/// First four bytes of every frame. The first byte is not ASCII, so shell noise rarely
/// starts a candidate frame, and differs from the preamble's first byte.
pub const MAGIC: [u8; 4] = [0xF4, b'T', b'H', b'R'];

/// Bytes before a frame's payload: magic, length, checksum.
pub const FRAME_HEADER_LEN: usize = 12;

/// Smallest free space [`FrameDecoder::read_buf`] hands out.
const READ_CHUNK: usize = 64 * 1024;

/// What kind of damage the decoder found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corruption {
    /// A byte that starts neither a frame nor a preamble where one of them must start.
    BadMagic,
    /// A header whose length field exceeds the maximum payload.
    ImpossibleLength(u32),
    /// A frame whose CRC32C does not match its contents.
    Checksum,
}

impl std::fmt::Display for Corruption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Corruption::BadMagic => write!(f, "bytes that are not a frame"),
            Corruption::ImpossibleLength(n) => {
                write!(f, "frame length {n} exceeds the maximum of {MAX_PAYLOAD}")
            }
            Corruption::Checksum => write!(f, "frame checksum mismatch"),
        }
    }
}

/// One item out of the decoder.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A complete preamble: the peer starts a (new) session.
    Preamble,
    /// The payload of a frame whose checksum matched.
    Frame(&'a [u8]),
    /// The stream is damaged; the decoder is scanning for the next frame or preamble.
    /// Reported once per episode: further damage before the next good item is silent.
    Corrupt(Corruption),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing trustworthy seen yet: skip everything up to a preamble (banners, motd).
    AwaitPreamble,
    /// At a frame boundary: a frame or a preamble must start here.
    Framed,
    /// After damage: scan for the next magic or preamble.
    Resync,
}

/// How a stream ended, from the decoder's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndOfStream {
    /// At a frame boundary (or before any preamble): nothing was cut off.
    Clean,
    /// In the middle of a frame or preamble: this many bytes were left over.
    Truncated(usize),
}

/// Sans-I/O decoder of a tether byte stream.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    state: State,
    /// True between a reported corruption and the next good item.
    in_episode: bool,
    max_payload: usize,
    skipped: u64,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// A decoder that waits for a preamble and accepts payloads up to [`MAX_PAYLOAD`].
    pub fn new() -> Self {
        Self::with_max_payload(MAX_PAYLOAD)
    }

    /// A decoder with a smaller payload limit (tests use it to reach edge cases cheaply).
    pub fn with_max_payload(max_payload: usize) -> Self {
        let max_payload = max_payload.min(MAX_PAYLOAD);
        FrameDecoder {
            // Zeroed once: calloc'd pages cost no memory until a large frame touches them.
            buf: vec![0; FRAME_HEADER_LEN + max_payload + READ_CHUNK],
            start: 0,
            end: 0,
            state: State::AwaitPreamble,
            in_episode: false,
            max_payload,
            skipped: 0,
        }
    }

    /// A decoder that already saw the preamble (for peers that skip it, e.g. in tests).
    pub fn framed() -> Self {
        let mut d = Self::new();
        d.state = State::Framed;
        d
    }

    /// Free space to read into; at least 64 KiB. Call [`commit`](Self::commit) with the
    /// number of bytes written.
    pub fn read_buf(&mut self) -> &mut [u8] {
        if self.buf.len() - self.end < READ_CHUNK {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }

    /// Marks `n` bytes of the last [`read_buf`](Self::read_buf) as filled.
    pub fn commit(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Copies as much of `data` as fits and returns how many bytes were taken (like a
    /// `write`); decode until `None` before feeding the rest.
    pub fn feed(&mut self, data: &[u8]) -> usize {
        let spare = self.read_buf();
        let n = spare.len().min(data.len());
        spare[..n].copy_from_slice(&data[..n]);
        self.commit(n);
        n
    }

    fn drop_front(&mut self, n: usize) {
        let n = n.min(self.end - self.start);
        self.start += n;
        self.skipped += n as u64;
        if self.state == State::Framed {
            self.state = State::Resync;
        }
    }

    /// Bytes buffered and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Total bytes skipped so far: junk before the preamble and damage.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// True once a preamble has been seen.
    pub fn synced(&self) -> bool {
        self.state != State::AwaitPreamble
    }

    /// Classifies the end of the stream: call when the underlying reader hit EOF.
    pub fn end_of_stream(&self) -> EndOfStream {
        match self.state {
            State::AwaitPreamble => EndOfStream::Clean,
            _ if self.buffered() == 0 => EndOfStream::Clean,
            _ => EndOfStream::Truncated(self.buffered()),
        }
    }

    /// Decodes the next item, or returns `None` when more bytes are needed.
    pub fn decode(&mut self) -> Option<Decoded<'_>> {
        loop {
            match self.state {
                State::AwaitPreamble | State::Resync => {
                    let accept_magic = self.state == State::Resync;
                    match self.scan(accept_magic) {
                        Scan::NeedMore => return None,
                        Scan::Preamble => {
                            self.start += PREAMBLE.len();
                            self.state = State::Framed;
                            self.in_episode = false;
                            return Some(Decoded::Preamble);
                        }
                        // Try the candidate frame; its failure stays in this episode.
                        Scan::Magic => self.state = State::Framed,
                    }
                }
                State::Framed => match self.try_frame() {
                    Step::NeedMore => return None,
                    Step::Preamble => {
                        self.start += PREAMBLE.len();
                        self.in_episode = false;
                        return Some(Decoded::Preamble);
                    }
                    Step::Frame(len) => {
                        let payload = self.start + FRAME_HEADER_LEN;
                        self.start = payload + len;
                        self.in_episode = false;
                        return Some(Decoded::Frame(&self.buf[payload..payload + len]));
                    }
                    Step::Corrupt(c) => {
                        self.drop_front(1);
                        self.state = State::Resync;
                        if !self.in_episode {
                            self.in_episode = true;
                            return Some(Decoded::Corrupt(c));
                        }
                    }
                },
            }
        }
    }

    /// Skips to the next preamble (or magic, when `accept_magic`) candidate.
    fn scan(&mut self, accept_magic: bool) -> Scan {
        let avail = &self.buf[self.start..self.end];
        let mut i = 0;
        while i < avail.len() {
            let b = avail[i];
            if b == PREAMBLE[0] || (accept_magic && b == MAGIC[0]) {
                let rest = &avail[i..];
                let pattern: &[u8] = if b == PREAMBLE[0] { PREAMBLE } else { &MAGIC };
                let n = rest.len().min(pattern.len());
                if rest[..n] == pattern[..n] {
                    self.start += i;
                    self.skipped += i as u64;
                    if n < pattern.len() {
                        return Scan::NeedMore;
                    }
                    return if b == PREAMBLE[0] { Scan::Preamble } else { Scan::Magic };
                }
            }
            i += 1;
        }
        self.skipped += avail.len() as u64;
        self.start = self.end;
        Scan::NeedMore
    }

    /// At a frame boundary: what starts here?
    fn try_frame(&self) -> Step {
        let avail = &self.buf[self.start..self.end];
        let Some(&first) = avail.first() else {
            return Step::NeedMore;
        };
        if first == PREAMBLE[0] {
            let n = avail.len().min(PREAMBLE.len());
            return if avail[..n] != PREAMBLE[..n] {
                Step::Corrupt(Corruption::BadMagic)
            } else if n < PREAMBLE.len() {
                Step::NeedMore
            } else {
                Step::Preamble
            };
        }
        let n = avail.len().min(MAGIC.len());
        if avail[..n] != MAGIC[..n] {
            return Step::Corrupt(Corruption::BadMagic);
        }
        if avail.len() < FRAME_HEADER_LEN {
            return Step::NeedMore;
        }
        let len = u32::from_le_bytes([avail[4], avail[5], avail[6], avail[7]]);
        if len as usize > self.max_payload {
            return Step::Corrupt(Corruption::ImpossibleLength(len));
        }
        let total = FRAME_HEADER_LEN + len as usize;
        if avail.len() < total {
            return Step::NeedMore;
        }
        let want = u32::from_le_bytes([avail[8], avail[9], avail[10], avail[11]]);
        if frame_crc(&avail[..8], &avail[FRAME_HEADER_LEN..total]) != want {
            return Step::Corrupt(Corruption::Checksum);
        }
        Step::Frame(len as usize)
    }
}

enum Scan {
    NeedMore,
    Preamble,
    Magic,
}

enum Step {
    NeedMore,
    Preamble,
    Frame(usize),
    Corrupt(Corruption),
}

/// CRC32C (Castagnoli) over the first eight header bytes, then the payload.
pub fn frame_crc(header8: &[u8], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(header8), payload)
}

/// Writes a frame header for `payload` into the first [`FRAME_HEADER_LEN`] bytes of
/// `frame`, whose remainder must be the payload.
pub fn seal_frame(frame: &mut [u8]) {
    let len = (frame.len() - FRAME_HEADER_LEN) as u32;
    frame[..4].copy_from_slice(&MAGIC);
    frame[4..8].copy_from_slice(&len.to_le_bytes());
    let crc = frame_crc(&frame[..8], &frame[FRAME_HEADER_LEN..]);
    frame[8..12].copy_from_slice(&crc.to_le_bytes());
}

/// A whole frame around `payload` (tests and tools; the hot path uses
/// [`crate::encode_frame`]).
pub fn frame_bytes(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0; FRAME_HEADER_LEN];
    f.extend_from_slice(payload);
    seal_frame(&mut f);
    f
}

#[cfg(test)]
mod tests;
