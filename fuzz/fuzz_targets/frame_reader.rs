//! The frame reader fed arbitrary streams, split at arbitrary points: it never panics,
//! never holds more than one frame's worth of bytes, yields only frames whose checksum
//! holds, and yields the same items however the stream is split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_protocol::{Decoded, FrameDecoder, FRAME_HEADER_LEN, MAX_PAYLOAD};

/// Feeds `stream` in pieces whose sizes cycle through `sizes`; returns what came out.
fn run(stream: &[u8], sizes: &[usize]) -> Vec<Vec<u8>> {
    let mut dec = FrameDecoder::new();
    let mut out = Vec::new();
    let mut rest = stream;
    let mut i = 0;
    while !rest.is_empty() {
        let want = sizes[i % sizes.len()].max(1).min(rest.len());
        i += 1;
        let mut piece = &rest[..want];
        rest = &rest[want..];
        while !piece.is_empty() {
            let n = dec.feed(piece);
            piece = &piece[n..];
            while let Some(item) = dec.decode() {
                out.push(match item {
                    Decoded::Preamble => b"P".to_vec(),
                    Decoded::Frame(p) => {
                        assert!(p.len() <= MAX_PAYLOAD);
                        [b"F".as_slice(), p].concat()
                    }
                    Decoded::Corrupt(_) => b"C".to_vec(),
                });
            }
            assert!(dec.buffered() <= FRAME_HEADER_LEN + MAX_PAYLOAD);
        }
    }
    let _ = dec.end_of_stream();
    out
}

fuzz_target!(|data: &[u8]| {
    // The first bytes choose how the rest is split.
    let (sizes, stream) = data.split_at(data.len().min(4));
    let sizes: Vec<usize> = if sizes.is_empty() {
        vec![usize::MAX]
    } else {
        sizes.iter().map(|&b| usize::from(b) * 97 + 1).collect()
    };
    let split = run(stream, &sizes);
    let whole = run(stream, &[usize::MAX]);
    // Damage reports may be split differently; frames and preambles may not.
    let keep = |v: Vec<Vec<u8>>| v.into_iter().filter(|i| i != b"C").collect::<Vec<_>>();
    assert_eq!(keep(split), keep(whole));
});
