//! Unit tests of the frame decoder: framing, junk, every kind of damage, resync, takeover.

use super::*;
use crate::{decode, encode_frame, BuildId, ClientMessage, Hello, PROTOCOL_VERSION, SYNC_PAD_LEN};

/// An owned [`Decoded`], so that events can be collected and compared.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    Preamble,
    Frame(Vec<u8>),
    Corrupt(Corruption),
}

/// Decodes until the decoder wants more bytes.
fn drain(dec: &mut FrameDecoder, out: &mut Vec<Ev>) {
    while let Some(item) = dec.decode() {
        out.push(match item {
            Decoded::Preamble => Ev::Preamble,
            Decoded::Frame(p) => Ev::Frame(p.to_vec()),
            Decoded::Corrupt(c) => Ev::Corrupt(c),
        });
    }
}

/// Feeds all of `data` (decoding whenever the buffer is full) and decodes what it can.
fn push(dec: &mut FrameDecoder, mut data: &[u8], out: &mut Vec<Ev>) {
    drain(dec, out);
    while !data.is_empty() {
        let n = dec.feed(data);
        assert!(n > 0, "decoder refused bytes after being drained");
        data = &data[n..];
        drain(dec, out);
    }
}

/// Feeds `data` in pieces of `chunk` bytes.
fn push_chunked(dec: &mut FrameDecoder, data: &[u8], chunk: usize, out: &mut Vec<Ev>) {
    for piece in data.chunks(chunk) {
        push(dec, piece, out);
    }
}

fn events(data: &[u8]) -> Vec<Ev> {
    let mut dec = FrameDecoder::new();
    let mut out = Vec::new();
    push(&mut dec, data, &mut out);
    out
}

fn frame_of(msg: &ClientMessage) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(msg, &mut out).unwrap();
    out
}

fn payload_of(frame: &[u8]) -> Vec<u8> {
    frame[FRAME_HEADER_LEN..].to_vec()
}

fn hello(version: &str) -> ClientMessage {
    ClientMessage::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        client_version: version.into(),
        capabilities: vec![],
    })
}

fn ping(nonce: u64) -> ClientMessage {
    ClientMessage::Ping { nonce }
}

fn stdin_msg(data: Vec<u8>) -> ClientMessage {
    ClientMessage::Stdin {
        build: BuildId("b1".into()),
        offset: 0,
        data: data.into(),
    }
}

/// A preamble followed by the frames of `msgs`; returns the stream and the payloads.
fn session(msgs: &[ClientMessage]) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut stream = PREAMBLE.to_vec();
    let mut payloads = Vec::new();
    for m in msgs {
        let f = frame_of(m);
        payloads.push(payload_of(&f));
        stream.extend_from_slice(&f);
    }
    (stream, payloads)
}

fn expected(payloads: &[Vec<u8>]) -> Vec<Ev> {
    let mut v = vec![Ev::Preamble];
    v.extend(payloads.iter().cloned().map(Ev::Frame));
    v
}

fn frames(evs: &[Ev]) -> Vec<Vec<u8>> {
    evs.iter()
        .filter_map(|e| match e {
            Ev::Frame(p) => Some(p.clone()),
            _ => None,
        })
        .collect()
}

fn corrupts(evs: &[Ev]) -> Vec<Corruption> {
    evs.iter()
        .filter_map(|e| match e {
            Ev::Corrupt(c) => Some(*c),
            _ => None,
        })
        .collect()
}

fn mixed_messages() -> Vec<ClientMessage> {
    vec![
        hello("0.1.0"),
        ping(1),
        ping(u64::MAX),
        stdin_msg(vec![]),
        stdin_msg(b"<===[TETHER]===>\n\xF4THR".to_vec()),
        stdin_msg((0..=255u8).cycle().take(5000).collect()),
        ClientMessage::CloseStdin {
            build: BuildId("b1".into()),
        },
    ]
}

/// A fixed pseudo-random byte generator (xorshift), so tests need no extra crates.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn byte(&mut self) -> u8 {
        (self.next() >> 24) as u8
    }
}

#[test]
fn preamble_and_frames() {
    let (stream, payloads) = session(&mixed_messages());
    assert_eq!(events(&stream), expected(&payloads));
    for p in &payloads {
        let _: ClientMessage = decode(p).unwrap();
    }
}

#[test]
fn empty_payload_is_a_frame() {
    let mut stream = PREAMBLE.to_vec();
    stream.extend_from_slice(&frame_bytes(&[]));
    assert_eq!(events(&stream), vec![Ev::Preamble, Ev::Frame(vec![])]);
}

#[test]
fn byte_at_a_time() {
    let mut msgs = mixed_messages();
    msgs.push(stdin_msg(vec![0xF4; 100_000]));
    msgs.push(ping(7));
    let (stream, payloads) = session(&msgs);
    let mut dec = FrameDecoder::new();
    let mut out = Vec::new();
    push_chunked(&mut dec, &stream, 1, &mut out);
    assert_eq!(out, expected(&payloads));
    assert_eq!(dec.end_of_stream(), EndOfStream::Clean);
    assert_eq!(dec.skipped(), 0);
}

#[test]
fn every_split_point() {
    let (stream, payloads) = session(&mixed_messages());
    let want = expected(&payloads);
    for split in 0..=stream.len() {
        let mut dec = FrameDecoder::new();
        let mut out = Vec::new();
        push(&mut dec, &stream[..split], &mut out);
        push(&mut dec, &stream[split..], &mut out);
        assert_eq!(out, want, "split at {split}");
    }
}

#[test]
fn every_pair_of_split_points_around_one_frame() {
    let (stream, payloads) = session(&[ping(300), hello("0.1.0"), ping(1)]);
    let want = expected(&payloads);
    for a in 0..=stream.len() {
        for b in a..=stream.len() {
            let mut dec = FrameDecoder::new();
            let mut out = Vec::new();
            push(&mut dec, &stream[..a], &mut out);
            push(&mut dec, &stream[a..b], &mut out);
            push(&mut dec, &stream[b..], &mut out);
            assert_eq!(out, want, "splits at {a} and {b}");
        }
    }
}

#[test]
fn read_buf_and_commit() {
    let (stream, payloads) = session(&mixed_messages());
    let mut dec = FrameDecoder::new();
    let mut out = Vec::new();
    for piece in stream.chunks(777) {
        let spare = dec.read_buf();
        assert!(spare.len() >= 64 * 1024);
        spare[..piece.len()].copy_from_slice(piece);
        dec.commit(piece.len());
        drain(&mut dec, &mut out);
    }
    assert_eq!(out, expected(&payloads));
}

#[test]
fn junk_before_preamble_is_silent() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let random: Vec<u8> = std::iter::repeat_with(|| rng.byte())
        .filter(|&b| b != PREAMBLE[0] && b != MAGIC[0])
        .take(10_000)
        .collect();
    let junks: Vec<Vec<u8>> = vec![
        b"Welcome to Ubuntu 24.04 LTS (GNU/Linux 6.8.0 x86_64)\r\n\r\n$ ".to_vec(),
        b"If you don't see a command prompt, try pressing enter.\n".to_vec(),
        b"\x1b[?2004h/ # \x1b[6n".to_vec(),
        b"<===[TET".to_vec(),
        b"<===[TETHER]===".to_vec(),
        b"<===[TETHER]===>\r".to_vec(),
        b"<<<===[TETHER]==<".to_vec(),
        b"<===[tether]===>\n".to_vec(),
        // A whole frame before the preamble is junk too.
        frame_of(&ping(1)),
        random.clone(),
    ];
    let (session_bytes, payloads) = session(&mixed_messages());
    let mut all_junk = Vec::new();
    for junk in &junks {
        all_junk.extend_from_slice(junk);
        let mut stream = junk.clone();
        stream.extend_from_slice(&session_bytes);
        for chunk in [1, 3, 4096, usize::MAX] {
            let mut dec = FrameDecoder::new();
            let mut out = Vec::new();
            push_chunked(&mut dec, &stream, chunk.min(stream.len()), &mut out);
            assert_eq!(out, expected(&payloads), "junk {junk:?}, chunk {chunk}");
            assert_eq!(dec.skipped(), junk.len() as u64);
            assert_eq!(dec.end_of_stream(), EndOfStream::Clean);
        }
    }
    let mut stream = all_junk.clone();
    stream.extend_from_slice(&session_bytes);
    assert_eq!(events(&stream), expected(&payloads));

    // Junk alone: nothing comes out, the decoder is not synced and the end is clean.
    let mut dec = FrameDecoder::new();
    let mut out = Vec::new();
    push_chunked(&mut dec, &all_junk, 1, &mut out);
    assert!(out.is_empty());
    assert!(!dec.synced());
    assert_eq!(dec.end_of_stream(), EndOfStream::Clean);
}

#[test]
fn preamble_mid_stream_starts_a_new_session_silently() {
    let (mut stream, mut payloads) = session(&[hello("0.1.0"), ping(1)]);
    let (second, p2) = session(&[hello("0.2.0")]);
    stream.extend_from_slice(&second);
    payloads.extend(p2);
    let out = events(&stream);
    assert_eq!(
        out,
        vec![
            Ev::Preamble,
            Ev::Frame(payloads[0].clone()),
            Ev::Frame(payloads[1].clone()),
            Ev::Preamble,
            Ev::Frame(payloads[2].clone()),
        ]
    );
    // A repeated preamble is fine too.
    let mut stream = PREAMBLE.repeat(3);
    stream.extend_from_slice(&frame_of(&ping(2)));
    let out = events(&stream);
    assert_eq!(out.len(), 4);
    assert!(corrupts(&out).is_empty());
}

#[test]
fn bad_magic() {
    let good = frame_of(&ping(5));
    let cases: Vec<Vec<u8>> = vec![
        b"hello\n".to_vec(),
        b"X".to_vec(),
        vec![0],
        vec![0xF4, b'T', b'H', b'X'],
        vec![0xF5, b'T', b'H', b'R', 0, 0, 0, 0, 0, 0, 0, 0],
        b"<===[TETHER]==>\n".to_vec(),
        b"<nope".to_vec(),
        b"If you don't see a command prompt, try pressing enter.\n".to_vec(),
    ];
    for junk in cases {
        let mut stream = PREAMBLE.to_vec();
        stream.extend_from_slice(&good);
        stream.extend_from_slice(&junk);
        stream.extend_from_slice(&good);
        for chunk in [1, usize::MAX] {
            let mut dec = FrameDecoder::new();
            let mut out = Vec::new();
            push_chunked(&mut dec, &stream, chunk.min(stream.len()), &mut out);
            assert_eq!(
                out,
                vec![
                    Ev::Preamble,
                    Ev::Frame(payload_of(&good)),
                    Ev::Corrupt(Corruption::BadMagic),
                    Ev::Frame(payload_of(&good)),
                ],
                "junk {junk:?}"
            );
            assert_eq!(dec.skipped(), junk.len() as u64);
        }
    }
}

#[test]
fn one_report_per_episode() {
    let good = frame_of(&ping(9));
    // Long junk full of false starts: magic prefixes, partial preambles, false headers.
    let mut junk = Vec::new();
    for i in 0..200u32 {
        junk.extend_from_slice(b"garbage ");
        junk.extend_from_slice(&MAGIC[..(i % 4) as usize]);
        junk.extend_from_slice(&PREAMBLE[..(i % 16) as usize]);
        // A false header claiming a small length and a wrong checksum.
        junk.extend_from_slice(&MAGIC);
        junk.extend_from_slice(&(i % 40).to_le_bytes());
        junk.extend_from_slice(&[0xAA; 4]);
        // An impossible length.
        junk.extend_from_slice(&MAGIC);
        junk.extend_from_slice(&u32::MAX.to_le_bytes());
    }
    junk.extend_from_slice(&[0u8; 100]);
    let mut stream = PREAMBLE.to_vec();
    stream.extend_from_slice(&junk);
    stream.extend_from_slice(&good);
    stream.extend_from_slice(&junk);
    stream.extend_from_slice(&good);
    stream.extend_from_slice(&good);
    for chunk in [1, 5, usize::MAX] {
        let mut dec = FrameDecoder::new();
        let mut out = Vec::new();
        push_chunked(&mut dec, &stream, chunk.min(stream.len()), &mut out);
        assert_eq!(
            out,
            vec![
                Ev::Preamble,
                Ev::Corrupt(Corruption::BadMagic),
                Ev::Frame(payload_of(&good)),
                Ev::Corrupt(Corruption::BadMagic),
                Ev::Frame(payload_of(&good)),
                Ev::Frame(payload_of(&good)),
            ],
            "chunk {chunk}"
        );
        assert_eq!(dec.skipped(), 2 * junk.len() as u64);
    }
}

fn header(len: u32) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&[0; 4]);
    h
}

#[test]
fn impossible_length_is_reported_at_once_without_allocating() {
    let good = frame_of(&ping(3));
    for len in [MAX_PAYLOAD as u32 + 1, 0x0100_0000, u32::MAX] {
        let mut dec = FrameDecoder::new();
        let (ptr, cap, size) = (dec.buf.as_ptr(), dec.buf.capacity(), dec.buf.len());
        let mut out = Vec::new();
        let mut stream = PREAMBLE.to_vec();
        stream.extend_from_slice(&header(len));
        // Reported from the header alone: no payload bytes are awaited.
        push(&mut dec, &stream, &mut out);
        assert_eq!(out, vec![Ev::Preamble, Ev::Corrupt(Corruption::ImpossibleLength(len))]);
        push(&mut dec, &good, &mut out);
        assert_eq!(out.last(), Some(&Ev::Frame(payload_of(&good))));
        assert_eq!((dec.buf.as_ptr(), dec.buf.capacity(), dec.buf.len()), (ptr, cap, size));
    }
}

#[test]
fn smaller_limit_is_enforced() {
    let mut dec = FrameDecoder::with_max_payload(100);
    let mut out = Vec::new();
    let mut stream = PREAMBLE.to_vec();
    stream.extend_from_slice(&frame_bytes(&[7; 100]));
    stream.extend_from_slice(&frame_bytes(&[7; 101]));
    stream.extend_from_slice(&frame_bytes(&[8; 3]));
    push(&mut dec, &stream, &mut out);
    assert_eq!(
        out,
        vec![
            Ev::Preamble,
            Ev::Frame(vec![7; 100]),
            Ev::Corrupt(Corruption::ImpossibleLength(101)),
            Ev::Frame(vec![8; 3]),
        ]
    );
    // The limit never exceeds MAX_PAYLOAD.
    assert_eq!(FrameDecoder::with_max_payload(usize::MAX).max_payload, MAX_PAYLOAD);
}

#[test]
fn largest_frame_fits_and_the_buffer_never_grows() {
    let mut dec = FrameDecoder::new();
    let (ptr, cap, size) = (dec.buf.as_ptr(), dec.buf.capacity(), dec.buf.len());
    let big = frame_bytes(&vec![0x5A; MAX_PAYLOAD]);
    let mut stream = PREAMBLE.to_vec();
    for _ in 0..3 {
        stream.extend_from_slice(&big);
        stream.extend_from_slice(&frame_of(&ping(1)));
    }
    // A header claiming the maximum that never completes its payload.
    stream.extend_from_slice(&header(MAX_PAYLOAD as u32));
    stream.extend_from_slice(&[1; 1000]);
    let mut out = Vec::new();
    for chunk in [1, 4097, 65536, usize::MAX] {
        let mut d = FrameDecoder::new();
        out.clear();
        for piece in stream.chunks(chunk.min(stream.len())) {
            push(&mut d, piece, &mut out);
            assert_eq!(d.buf.len(), size);
        }
        assert_eq!(frames(&out).len(), 6, "chunk {chunk}");
        assert_eq!(frames(&out)[0].len(), MAX_PAYLOAD);
        assert!(corrupts(&out).is_empty());
        assert_eq!(d.end_of_stream(), EndOfStream::Truncated(FRAME_HEADER_LEN + 1000));
    }
    push(&mut dec, &stream, &mut out);
    assert_eq!((dec.buf.as_ptr(), dec.buf.capacity(), dec.buf.len()), (ptr, cap, size));
}

/// Good frames whose total length exceeds what any damaged header can claim, so that a
/// frame whose length field was damaged always completes (and fails its checksum) while
/// they are still arriving.
fn followers() -> Vec<ClientMessage> {
    let mut v = vec![ping(10), hello("0.1.0")];
    for i in 0..3u8 {
        v.push(stdin_msg(vec![b'a' + i; crate::MAX_CHUNK]));
        v.push(ping(11 + i as u64));
    }
    v
}

#[test]
fn any_bit_flip_loses_exactly_that_frame() {
    let victim = frame_of(&ClientMessage::Cancel {
        req: 300,
        build: BuildId("build-7".into()),
        force: true,
    });
    let before = frame_of(&ping(1));
    let follow: Vec<Vec<u8>> = followers().iter().map(frame_of).collect();
    assert!(follow.iter().map(Vec::len).sum::<usize>() > SYNC_PAD_LEN);
    let mut want = vec![Ev::Preamble, Ev::Frame(payload_of(&before))];
    let mut tail = Vec::new();
    for f in &follow {
        tail.extend_from_slice(f);
    }
    for bit in 0..victim.len() * 8 {
        let mut bad = victim.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        let mut stream = PREAMBLE.to_vec();
        stream.extend_from_slice(&before);
        stream.extend_from_slice(&bad);
        stream.extend_from_slice(&tail);
        let out = events(&stream);
        let kind = match bit / 8 {
            0..=3 => Corruption::BadMagic,
            4..=7 => {
                let len = u32::from_le_bytes(bad[4..8].try_into().unwrap());
                if len as usize > MAX_PAYLOAD {
                    Corruption::ImpossibleLength(len)
                } else {
                    Corruption::Checksum
                }
            }
            _ => Corruption::Checksum,
        };
        want.truncate(2);
        want.push(Ev::Corrupt(kind));
        want.extend(follow.iter().map(|f| Ev::Frame(payload_of(f))));
        assert_eq!(out, want, "bit {bit} flipped");
    }
}

#[test]
fn grown_length_swallows_followers_then_they_are_rescanned() {
    // The victim's length grows by 64 KiB: the decoder waits for the claimed bytes, which
    // are the following frames; the checksum fails and those bytes are scanned again.
    let mut bad = frame_of(&ping(1));
    bad[6] ^= 0x01;
    let follow: Vec<Vec<u8>> = followers().iter().map(frame_of).collect();
    let mut stream = PREAMBLE.to_vec();
    stream.extend_from_slice(&bad);
    let mut dec = FrameDecoder::new();
    let mut out = Vec::new();
    push(&mut dec, &stream, &mut out);
    // The first two followers vanish into the claimed length...
    push(&mut dec, &follow[0], &mut out);
    push(&mut dec, &follow[1], &mut out);
    assert_eq!(out, vec![Ev::Preamble]);
    // ...and come back once the claim is complete and its checksum fails.
    for f in &follow[2..] {
        push(&mut dec, f, &mut out);
    }
    let mut want = vec![Ev::Preamble, Ev::Corrupt(Corruption::Checksum)];
    want.extend(follow.iter().map(|f| Ev::Frame(payload_of(f))));
    assert_eq!(out, want);
}

#[test]
fn damaged_frame_at_the_end_is_truncated() {
    let mut bad = frame_of(&ping(1));
    bad[6] ^= 0x01;
    let mut stream = PREAMBLE.to_vec();
    stream.extend_from_slice(&bad);
    let mut dec = FrameDecoder::new();
    let mut out = Vec::new();
    push(&mut dec, &stream, &mut out);
    assert_eq!(out, vec![Ev::Preamble]);
    assert_eq!(dec.end_of_stream(), EndOfStream::Truncated(bad.len()));
}

#[test]
fn end_of_stream() {
    let f = frame_of(&hello("0.1.0"));
    let cases: Vec<(Vec<u8>, EndOfStream)> = vec![
        (vec![], EndOfStream::Clean),
        (b"banner\n<===[TET".to_vec(), EndOfStream::Clean),
        (PREAMBLE.to_vec(), EndOfStream::Clean),
        ([PREAMBLE, &f[..]].concat(), EndOfStream::Clean),
        ([PREAMBLE, &f[..1]].concat(), EndOfStream::Truncated(1)),
        ([PREAMBLE, &f[..11]].concat(), EndOfStream::Truncated(11)),
        ([PREAMBLE, &f[..12]].concat(), EndOfStream::Truncated(12)),
        (
            [PREAMBLE, &f[..f.len() - 1]].concat(),
            EndOfStream::Truncated(f.len() - 1),
        ),
        ([PREAMBLE, &f[..], &PREAMBLE[..5]].concat(), EndOfStream::Truncated(5)),
        ([PREAMBLE, &f[..], &f[..], &f[..7]].concat(), EndOfStream::Truncated(7)),
    ];
    for (stream, want) in cases {
        let mut dec = FrameDecoder::new();
        let mut out = Vec::new();
        push_chunked(&mut dec, &stream, 1.max(stream.len()), &mut out);
        assert_eq!(dec.end_of_stream(), want, "stream {stream:?}");
        let mut dec = FrameDecoder::new();
        push_chunked(&mut dec, &stream, 1, &mut out);
        assert_eq!(dec.end_of_stream(), want, "stream {stream:?} byte by byte");
    }
    assert!(!FrameDecoder::new().synced());
    assert!(FrameDecoder::framed().synced());
}

#[test]
fn framed_decoder_needs_no_preamble() {
    let mut dec = FrameDecoder::framed();
    let mut out = Vec::new();
    let f = frame_of(&ping(4));
    push(&mut dec, &f, &mut out);
    assert_eq!(out, vec![Ev::Frame(payload_of(&f))]);
}

/// Runs the takeover scenario: a first client's session ends with `abandoned` (a prefix
/// of a frame), the next client sends the sync pad, the preamble and its Hello. Checks
/// that the decoder yields a Preamble followed by exactly the new client's frames, and
/// never a frame nobody sent.
fn takeover(abandoned: &[u8], whole: &[u8]) {
    let before = frame_of(&ping(1));
    let hello2 = frame_of(&hello("0.2.0"));
    let after = frame_of(&ping(2));
    let mut stream = PREAMBLE.to_vec();
    stream.extend_from_slice(&before);
    stream.extend_from_slice(abandoned);
    stream.extend(std::iter::repeat_n(0u8, SYNC_PAD_LEN));
    stream.extend_from_slice(PREAMBLE);
    stream.extend_from_slice(&hello2);
    stream.extend_from_slice(&after);

    let mut dec = FrameDecoder::new();
    let (ptr, cap) = (dec.buf.as_ptr(), dec.buf.capacity());
    let mut out = Vec::new();
    push_chunked(&mut dec, &stream, 64 * 1024, &mut out);
    let k = abandoned.len();
    assert_eq!(&out[..2], &[Ev::Preamble, Ev::Frame(payload_of(&before))]);
    let last = out.iter().rposition(|e| *e == Ev::Preamble).unwrap();
    assert!(last >= 2, "offset {k}: no second preamble in {out:?}");
    assert_eq!(
        &out[last..],
        &[
            Ev::Preamble,
            Ev::Frame(payload_of(&hello2)),
            Ev::Frame(payload_of(&after))
        ],
        "offset {k}"
    );
    // Between the sessions: only damage reports, or the abandoned frame when it was
    // in fact complete.
    let middle = &out[2..last];
    let mut expect_middle = Vec::new();
    if k == whole.len() {
        expect_middle.push(Ev::Frame(payload_of(whole)));
        expect_middle.push(Ev::Corrupt(Corruption::BadMagic));
    } else if k > 0 {
        expect_middle.push(Ev::Corrupt(middle_kind(middle)));
    } else {
        expect_middle.push(Ev::Corrupt(Corruption::BadMagic));
    }
    assert_eq!(middle, &expect_middle[..], "offset {k}");
    assert_eq!(dec.end_of_stream(), EndOfStream::Clean);
    assert_eq!((dec.buf.as_ptr(), dec.buf.capacity()), (ptr, cap));
}

fn middle_kind(middle: &[Ev]) -> Corruption {
    match middle.first() {
        Some(Ev::Corrupt(c)) => *c,
        other => panic!("expected one damage report, got {other:?}"),
    }
}

#[test]
fn takeover_at_every_offset_of_a_2000_byte_frame() {
    // The payload holds traps: false magics with headers claiming the maximum length
    // (one at the very start, one in the middle), false small frames and partial
    // preambles.
    let mut data = Vec::new();
    let trap = |data: &mut Vec<u8>, len: u32| {
        data.extend_from_slice(&MAGIC);
        data.extend_from_slice(&len.to_le_bytes());
        data.extend_from_slice(&[0xEE; 4]);
    };
    trap(&mut data, MAX_PAYLOAD as u32);
    for i in 0..40u32 {
        data.extend_from_slice(&PREAMBLE[..(i % 16) as usize]);
        data.extend_from_slice(b"output ");
        trap(&mut data, i);
        if i == 20 {
            trap(&mut data, MAX_PAYLOAD as u32);
        }
    }
    data.resize(1992, b'.');
    let whole = frame_of(&stdin_msg(data));
    assert_eq!(whole.len() - FRAME_HEADER_LEN, 2000);
    for k in 0..=whole.len() {
        takeover(&whole[..k], &whole);
    }
}

#[test]
fn takeover_of_a_frame_claiming_max_payload() {
    let whole = frame_bytes(&vec![0xF4; MAX_PAYLOAD]);
    let mut offsets: Vec<usize> = (0..=40).collect();
    offsets.extend((40..whole.len()).step_by(4099));
    offsets.extend(whole.len() - 40..=whole.len());
    offsets.extend([MAX_PAYLOAD / 2, whole.len() - SYNC_PAD_LEN / 2]);
    for k in offsets {
        takeover(&whole[..k], &whole);
    }
    // Abandoned in the middle of a preamble, too.
    for k in 1..PREAMBLE.len() {
        takeover(&PREAMBLE[..k], &[0xFF; 1000]);
    }
}

#[test]
fn takeover_before_any_preamble() {
    // The daemon never saw a complete preamble: the first client died inside it.
    let hello2 = frame_of(&hello("0.2.0"));
    for k in 0..PREAMBLE.len() {
        let mut stream = PREAMBLE[..k].to_vec();
        stream.extend(std::iter::repeat_n(0u8, SYNC_PAD_LEN));
        stream.extend_from_slice(PREAMBLE);
        stream.extend_from_slice(&hello2);
        assert_eq!(
            events(&stream),
            vec![Ev::Preamble, Ev::Frame(payload_of(&hello2))],
            "offset {k}"
        );
    }
}

#[test]
fn zero_bytes_never_make_a_frame() {
    // The pad is never mistaken for a frame: a header completed by zeros fails its
    // checksum (this pins the constant the takeover argument relies on).
    assert_ne!(frame_crc(&[0xF4, b'T', b'H', b'R', 0, 0, 0, 0], &[]), 0);
    for k in 4..FRAME_HEADER_LEN {
        let mut stream = PREAMBLE.to_vec();
        stream.extend_from_slice(&frame_of(&ping(1))[..k]);
        stream.extend_from_slice(&[0; 64]);
        let out = events(&stream);
        assert_eq!(frames(&out).len(), 0, "cut at {k}");
    }
}
