//! Cutting a tar stream into message-sized pieces while hashing it: the sending end of
//! every transfer (client uploads, daemon downloads) writes through a [`Chunker`].

use std::io::{self, Write};

use sha2::{Digest as _, Sha256};
use tether_protocol::{self as wire, Digest};

/// A `Write` that hands `send` pieces of exactly [`wire::MAX_CHUNK`] bytes (the last
/// one shorter), counting and hashing everything it passes on.
pub struct Chunker<F> {
    buf: Vec<u8>,
    hasher: Sha256,
    bytes: u64,
    send: F,
}

impl<F: FnMut(Vec<u8>) -> io::Result<()>> Chunker<F> {
    pub fn new(send: F) -> Chunker<F> {
        Chunker {
            buf: Vec::with_capacity(wire::MAX_CHUNK),
            hasher: Sha256::new(),
            bytes: 0,
            send,
        }
    }

    /// Sends what is left; returns the byte count and SHA-256 of the whole stream.
    pub fn finish(mut self) -> io::Result<(u64, Digest)> {
        self.pass_on()?;
        Ok((self.bytes, self.hasher.finalize().into()))
    }

    fn pass_on(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(wire::MAX_CHUNK));
        self.hasher.update(&data);
        self.bytes += data.len() as u64;
        (self.send)(data)
    }
}

impl<F: FnMut(Vec<u8>) -> io::Result<()>> Write for Chunker<F> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(wire::MAX_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == wire::MAX_CHUNK {
            self.pass_on()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Pieces go out full (fewer, larger frames); `finish` sends the rest.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_pieces_then_the_rest_with_the_stream_digest() {
        let mut pieces = Vec::new();
        let mut c = Chunker::new(|p: Vec<u8>| {
            pieces.push(p.len());
            Ok(())
        });
        let data = vec![5u8; wire::MAX_CHUNK * 2 + 10];
        c.write_all(&data[..100]).unwrap();
        c.write_all(&data[100..]).unwrap();
        let (bytes, digest) = c.finish().unwrap();
        assert_eq!(pieces, [wire::MAX_CHUNK, wire::MAX_CHUNK, 10]);
        assert_eq!(bytes, data.len() as u64);
        assert_eq!(digest, <[u8; 32]>::from(Sha256::digest(&data)));
    }
}
