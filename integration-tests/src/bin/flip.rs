//! `flip [--min-payload N] [--fix-crc] [--log FILE] -- CMD ARGS...`: a `--via` wrapper
//! that damages one byte in transit.
//!
//! It spawns CMD (stderr inherited) and relays its own stdin to CMD's stdin and CMD's
//! stdout to its own stdout, byte for byte and without delay, except that it follows the
//! client-to-daemon stream (stdin to CMD) as the protocol frames it and, in the first
//! frame whose payload has at least N bytes (default 4096), flips the lowest bit of the
//! payload's middle byte. With `--fix-crc` it then reseals the frame (a fresh CRC32C), so
//! the frame arrives intact and only its contents are wrong (for checks above the
//! framing, such as a sha256 of uploaded data); without it the frame's checksum no longer
//! matches (for the frame layer). It says so on stderr and, with `--log`, in FILE (a
//! client does not pass a `--via` command's stderr on)
//! (`flip: flipped byte K of a P-byte frame payload`), flips at most once per run,
//! passes EOF on (closes CMD's stdin when its stdin ends) and exits with CMD's exit code
//! (128 + the signal when CMD was killed).
//!
//! Before the flip, bytes are forwarded as soon as they are known not to belong to a
//! frame header still being read or to the frame about to be damaged (held until it is
//! whole); after the flip, and always in the daemon-to-client direction, bytes go
//! straight through.

use std::io::{Read, Write};
use std::process::{Command, ExitCode, Stdio};

use tether_protocol::frame::{frame_crc, seal_frame};
use tether_protocol::{FRAME_HEADER_LEN, MAGIC, MAX_PAYLOAD, PREAMBLE};

const USAGE: &str = "usage: flip [--min-payload N] [--fix-crc] [--log FILE] -- CMD ARGS...";

/// Where `--log` writes (besides stderr).
static LOG: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Says `msg` on stderr and in the `--log` file.
fn say(msg: &str) {
    eprintln!("{msg}");
    if let Some(path) = LOG.get() {
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{msg}");
        }
    }
}

/// Where the flipper is in the stream it follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Looking for a preamble (before the first one) or, after damage, for a preamble or
    /// a magic; `held` holds a partial match.
    Scan { accept_magic: bool },
    /// At a frame boundary: `held` holds the start of a frame header or preamble.
    Boundary,
    /// Inside the payload of a frame too small to flip: this many bytes remain.
    Skip { left: usize },
    /// Inside the frame to flip: `held` holds it so far; it is this long in all.
    Candidate { total: usize },
    /// Flipped: everything passes through.
    Done,
}

/// The byte-stream core of `flip`: feed it what the client sent, forward what it returns.
#[derive(Debug)]
pub struct Flipper {
    min_payload: usize,
    fix_crc: bool,
    state: State,
    held: Vec<u8>,
    flipped: Option<(usize, usize)>,
}

impl Flipper {
    /// A flipper for the first frame with a payload of at least `min_payload` bytes (and
    /// at least one), resealing it with `fix_crc`.
    pub fn new(min_payload: usize, fix_crc: bool) -> Flipper {
        Flipper {
            min_payload: min_payload.max(1),
            fix_crc,
            state: State::Scan { accept_magic: false },
            held: Vec::new(),
            flipped: None,
        }
    }

    /// `(byte index in the payload, payload length)` of the flip, once it happened.
    pub fn flipped(&self) -> Option<(usize, usize)> {
        self.flipped
    }

    /// Takes the next bytes of the stream; returns the bytes to forward now.
    pub fn feed(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len() + self.held.len());
        self.process(data, &mut out);
        out
    }

    /// The end of the stream: whatever is still held (an incomplete header or frame).
    pub fn finish(&mut self) -> Vec<u8> {
        self.state = State::Done;
        std::mem::take(&mut self.held)
    }

    fn process(&mut self, mut data: &[u8], out: &mut Vec<u8>) {
        while !data.is_empty() {
            match self.state {
                State::Done => {
                    out.extend_from_slice(data);
                    return;
                }
                State::Skip { left } => {
                    let n = left.min(data.len());
                    out.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    self.state = if n == left {
                        State::Boundary
                    } else {
                        State::Skip { left: left - n }
                    };
                }
                State::Candidate { total } => {
                    let n = (total - self.held.len()).min(data.len());
                    self.held.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    if self.held.len() == total {
                        self.complete_candidate(out);
                    }
                }
                State::Scan { accept_magic } => {
                    let b = data[0];
                    data = &data[1..];
                    self.held.push(b);
                    let preamble = PREAMBLE.starts_with(&self.held);
                    let magic = accept_magic && MAGIC.starts_with(&self.held);
                    if preamble && self.held.len() == PREAMBLE.len() {
                        out.append(&mut self.held);
                        self.state = State::Boundary;
                    } else if magic && self.held.len() == MAGIC.len() {
                        // Read the rest of the header as at a boundary.
                        self.state = State::Boundary;
                    } else if !preamble && !magic {
                        self.mismatch(out);
                    }
                }
                State::Boundary => {
                    let b = data[0];
                    data = &data[1..];
                    self.held.push(b);
                    self.at_boundary(out);
                }
            }
        }
    }

    /// A byte was added to `held` at a frame boundary: decide what it starts.
    fn at_boundary(&mut self, out: &mut Vec<u8>) {
        let h = &self.held;
        if h[0] == PREAMBLE[0] {
            if !PREAMBLE.starts_with(h) {
                self.mismatch(out);
            } else if h.len() == PREAMBLE.len() {
                // A new session: still at a frame boundary.
                out.append(&mut self.held);
            }
            return;
        }
        let n = h.len().min(MAGIC.len());
        if h[..n] != MAGIC[..n] {
            self.mismatch(out);
            return;
        }
        if h.len() < FRAME_HEADER_LEN {
            return;
        }
        let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
        if len > MAX_PAYLOAD {
            self.mismatch(out);
        } else if len >= self.min_payload {
            self.state = State::Candidate {
                total: FRAME_HEADER_LEN + len,
            };
            if len == 0 {
                self.complete_candidate(out);
            }
        } else {
            out.append(&mut self.held);
            self.state = if len == 0 {
                State::Boundary
            } else {
                State::Skip { left: len }
            };
        }
    }

    /// `held` is a whole frame to flip: flip it (if its checksum is good) and send it.
    fn complete_candidate(&mut self, out: &mut Vec<u8>) {
        let frame = &mut self.held;
        let want = u32::from_le_bytes([frame[8], frame[9], frame[10], frame[11]]);
        if frame_crc(&frame[..8], &frame[FRAME_HEADER_LEN..]) != want {
            // Already damaged: not ours to judge; resynchronize as a reader would.
            self.mismatch(out);
            return;
        }
        let len = frame.len() - FRAME_HEADER_LEN;
        let k = len / 2;
        frame[FRAME_HEADER_LEN + k] ^= 0x01;
        if self.fix_crc {
            seal_frame(frame);
        }
        out.append(frame);
        self.flipped = Some((k, len));
        self.state = State::Done;
    }

    /// `held` does not start what it seemed to: forward its first byte and scan the rest
    /// again for a preamble or magic (as the protocol's reader does after damage).
    fn mismatch(&mut self, out: &mut Vec<u8>) {
        let held = std::mem::take(&mut self.held);
        out.push(held[0]);
        // Before the first preamble, frames do not count (the reader skips them).
        let accept_magic = self.state != State::Scan { accept_magic: false };
        self.state = State::Scan { accept_magic };
        self.process(&held[1..], out);
    }
}

struct Args {
    min_payload: usize,
    fix_crc: bool,
    cmd: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let mut min_payload = 4096;
    let mut fix_crc = false;
    let mut cmd = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--" => {
                cmd.extend(args.by_ref());
                break;
            }
            "--fix-crc" => fix_crc = true,
            "--log" => {
                let v = args.next().ok_or("--log needs a file")?;
                let _ = LOG.set(v.into());
            }
            "--min-payload" => {
                let v = args.next().ok_or("--min-payload needs a value")?;
                min_payload = v.parse().map_err(|e| format!("--min-payload {v}: {e}"))?;
            }
            "-h" | "--help" => return Err(String::new()),
            s if s.starts_with('-') => return Err(format!("unknown option {s}")),
            _ => {
                cmd.push(a);
                cmd.extend(args.by_ref());
                break;
            }
        }
    }
    if cmd.is_empty() {
        return Err("no command given".into());
    }
    Ok(Args {
        min_payload,
        fix_crc,
        cmd,
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("flip: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut child = match Command::new(&args.cmd[0])
        .args(&args.cmd[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            say(&format!("flip: cannot run {}: {e}", args.cmd[0]));
            return ExitCode::from(127);
        }
    };
    let mut to_child = child.stdin.take().expect("stdin is piped");
    let mut from_child = child.stdout.take().expect("stdout is piped");

    // Client to daemon, through the flipper. Not joined: when CMD is done the process
    // exits, even if our stdin stays open.
    let mut flipper = Flipper::new(args.min_payload, args.fix_crc);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 64 * 1024];
        let mut reported = false;
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let out = flipper.feed(&buf[..n]);
            if !reported {
                if let Some((k, p)) = flipper.flipped() {
                    say(&format!("flip: flipped byte {k} of a {p}-byte frame payload"));
                    reported = true;
                }
            }
            if to_child.write_all(&out).is_err() {
                return;
            }
        }
        let _ = to_child.write_all(&flipper.finish());
        // Dropping `to_child` closes CMD's stdin.
    });

    // Daemon to client, straight through.
    {
        let mut stdout = std::io::stdout().lock();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from_child.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if stdout.write_all(&buf[..n]).and_then(|()| stdout.flush()).is_err() {
                break;
            }
        }
    }
    drop(from_child);
    let status = match child.wait() {
        Ok(s) => s,
        Err(e) => {
            say(&format!("flip: waiting for {}: {e}", args.cmd[0]));
            return ExitCode::from(1);
        }
    };
    use std::os::unix::process::ExitStatusExt;
    let code = status.code().or_else(|| status.signal().map(|s| 128 + s)).unwrap_or(1);
    ExitCode::from(code as u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_protocol::{decode, encode_frame, BuildId, Bytes, ClientMessage, Corruption, Decoded, FrameDecoder};

    fn stdin_msg(len: usize, seed: u8) -> ClientMessage {
        let data: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        ClientMessage::Stdin {
            build: BuildId("b1".into()),
            offset: 0,
            data: Bytes::from(data),
        }
    }

    /// A session: preamble, a Ping, a small Stdin, two big Stdins, a Ping.
    fn session() -> (Vec<u8>, Vec<ClientMessage>) {
        let msgs = vec![
            ClientMessage::Ping { nonce: 1 },
            stdin_msg(100, 1),
            stdin_msg(10_000, 2),
            stdin_msg(20_000, 3),
            ClientMessage::Ping { nonce: 2 },
        ];
        let mut bytes = b"motd junk\n".to_vec();
        bytes.extend_from_slice(PREAMBLE);
        for m in &msgs {
            encode_frame(m, &mut bytes).unwrap();
        }
        (bytes, msgs)
    }

    /// Feeds `input` in pieces of `step` bytes; returns the output and checks that every
    /// byte went out once the input ended.
    fn run(f: &mut Flipper, input: &[u8], step: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in input.chunks(step) {
            out.extend(f.feed(piece));
        }
        out.extend(f.finish());
        assert_eq!(out.len(), input.len());
        out
    }

    enum Item {
        Preamble,
        Msg(ClientMessage),
        Corrupt(Corruption),
    }

    fn decode_all(bytes: &[u8]) -> Vec<Item> {
        let mut dec = FrameDecoder::new();
        let mut items = Vec::new();
        for piece in bytes.chunks(50_000) {
            assert_eq!(dec.feed(piece), piece.len());
            while let Some(d) = dec.decode() {
                items.push(match d {
                    Decoded::Preamble => Item::Preamble,
                    Decoded::Frame(p) => Item::Msg(decode(p).expect("a valid message")),
                    Decoded::Corrupt(c) => Item::Corrupt(c),
                });
            }
        }
        items
    }

    fn payload_len(m: &ClientMessage) -> usize {
        let mut v = Vec::new();
        encode_frame(m, &mut v).unwrap();
        v.len() - FRAME_HEADER_LEN
    }

    #[test]
    fn without_fix_crc_the_frame_is_rejected() {
        let (input, msgs) = session();
        for step in [1, 7, 4096, input.len()] {
            let mut f = Flipper::new(4096, false);
            let out = run(&mut f, &input, step);
            let p = payload_len(&msgs[2]);
            assert_eq!(f.flipped(), Some((p / 2, p)), "step {step}");
            let diff: Vec<usize> = (0..input.len()).filter(|&i| input[i] != out[i]).collect();
            assert_eq!(diff.len(), 1, "step {step}");
            assert_eq!((input[diff[0]] ^ out[diff[0]]).count_ones(), 1);

            let items = decode_all(&out);
            assert!(matches!(items[0], Item::Preamble));
            assert!(matches!(&items[1], Item::Msg(m) if *m == msgs[0]));
            assert!(matches!(&items[2], Item::Msg(m) if *m == msgs[1]));
            assert!(matches!(items[3], Item::Corrupt(Corruption::Checksum)), "step {step}");
            // The reader finds its way back; the later frames are untouched (not flipped).
            assert!(matches!(&items[4], Item::Msg(m) if *m == msgs[3]));
            assert!(matches!(&items[5], Item::Msg(m) if *m == msgs[4]));
            assert_eq!(items.len(), 6);
        }
    }

    #[test]
    fn with_fix_crc_the_frame_decodes_to_other_content() {
        let (input, msgs) = session();
        for step in [1, 13, 65536] {
            let mut f = Flipper::new(4096, true);
            let out = run(&mut f, &input, step);
            let items = decode_all(&out);
            assert_eq!(items.len(), 6);
            assert!(matches!(&items[2], Item::Msg(m) if *m == msgs[1]));
            match &items[3] {
                Item::Msg(m) => {
                    assert_ne!(*m, msgs[2], "the content must differ");
                    let (ClientMessage::Stdin { data: got, .. }, ClientMessage::Stdin { data: want, .. }) =
                        (m, &msgs[2])
                    else {
                        panic!("not a Stdin")
                    };
                    assert_eq!(got.len(), want.len());
                }
                _ => panic!("the resealed frame must decode (step {step})"),
            }
            assert!(matches!(&items[4], Item::Msg(m) if *m == msgs[3]));
        }
    }

    #[test]
    fn min_payload_picks_the_frame_and_small_frames_pass_at_once() {
        let (input, msgs) = session();
        let mut f = Flipper::new(15_000, false);
        let out = run(&mut f, &input, 3);
        let p = payload_len(&msgs[3]);
        assert_eq!(f.flipped(), Some((p / 2, p)));
        let items = decode_all(&out);
        assert!(matches!(&items[3], Item::Msg(m) if *m == msgs[2]));
        assert!(matches!(items[4], Item::Corrupt(Corruption::Checksum)));

        // Nothing big enough: the stream is unchanged, and a whole small frame is
        // forwarded as soon as it is complete (nothing held back).
        let mut f = Flipper::new(1 << 20, false);
        let head = PREAMBLE.len() + 10;
        let frames_end = input.len();
        let mut out = f.feed(&input[..head]);
        out.extend(f.feed(&input[head..frames_end]));
        assert_eq!(out, input);
        assert_eq!(f.flipped(), None);
    }

    #[test]
    fn holds_only_an_incomplete_header_or_the_candidate() {
        let mut f = Flipper::new(4096, false);
        let mut out = f.feed(b"junk");
        out.extend(f.feed(PREAMBLE));
        assert_eq!(out, [b"junk".as_slice(), PREAMBLE].concat());

        let mut small = Vec::new();
        encode_frame(&ClientMessage::Ping { nonce: 9 }, &mut small).unwrap();
        assert!(f.feed(&small[..5]).is_empty(), "a header in progress is held");
        assert_eq!(
            f.feed(&small[5..]),
            small,
            "a small frame goes out once its header is whole"
        );

        // A new session (preamble) at a frame boundary before the flip.
        assert_eq!(f.feed(PREAMBLE), PREAMBLE);

        let mut big = Vec::new();
        encode_frame(&stdin_msg(5000, 4), &mut big).unwrap();
        assert!(f.feed(&big[..100]).is_empty(), "the candidate is held until whole");
        assert!(f.feed(&big[100..big.len() - 1]).is_empty());
        let sent = f.feed(&big[big.len() - 1..]);
        assert_eq!(sent.len(), big.len());
        assert_ne!(sent, big);
        assert!(f.flipped().is_some());

        // After the flip everything passes at once, even half a header, a preamble and
        // another big frame (only one flip per run).
        assert_eq!(f.feed(&small[..3]), small[..3]);
        assert_eq!(f.feed(PREAMBLE), PREAMBLE);
        assert_eq!(f.feed(&big), big);
        assert!(f.finish().is_empty());
    }

    #[test]
    fn frames_before_the_first_preamble_are_not_touched() {
        let mut big = Vec::new();
        encode_frame(&stdin_msg(5000, 5), &mut big).unwrap();
        let mut f = Flipper::new(4096, false);
        let mut input = vec![0u8; 1000]; // a takeover's zero pad
        input.extend_from_slice(&big);
        input.extend_from_slice(&PREAMBLE[..6]);
        let out = f.feed(&input);
        assert_eq!(out, input[..input.len() - 6], "only a preamble's start is held");
        assert_eq!(f.flipped(), None);
        assert_eq!(f.feed(&PREAMBLE[6..]), PREAMBLE);
        assert!(f.feed(&big[..big.len() - 1]).is_empty());
        assert!(f.flipped().is_none(), "the frame is not whole yet");
        assert_eq!(f.feed(&big[big.len() - 1..]).len(), big.len());
        assert!(f.flipped().is_some());
    }
}
