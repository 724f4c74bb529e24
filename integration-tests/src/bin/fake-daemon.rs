//! `fake-daemon --archive FILE [--sha256 HEX | --wrong-sha256] [--exit-code N] [--split N]`:
//! a scripted stand-in for `tether serve`, for end-to-end tests that feed the real
//! `tether` client what a real daemon never sends (hostile download archives, wrong
//! digests). Use it as `tether run --via 'fake-daemon --archive FILE'`.
//!
//! It speaks the real protocol on stdin (client to daemon) and stdout (daemon to client)
//! and logs what it does on stderr. No command runs: every `Run` is answered with
//! `Started`, one line of output (`fake build ran\n`) and `Held` with `--exit-code`
//! (default 0). Every `Download`, whatever its build and path, is answered with the
//! bytes of FILE (read once at start) in `DownloadData` pieces of at most `MAX_CHUNK`
//! bytes (or `--split` bytes), then `DownloadEnd` with FILE's length and its SHA-256, or
//! the digest given with `--sha256`, or the real one with its first byte flipped with
//! `--wrong-sha256`. A `Release` is acknowledged and the build exits with the released
//! (or held) status. Builds it never saw are treated as held (a reconnecting client
//! spawns a fresh fake-daemon that must still answer its `Attach`). `Hello`, `Ping` and
//! `Attach` are answered as the real daemon answers them; anything else is logged and
//! ignored. It sends no heartbeats. It exits 0 at the end of stdin, and when the client
//! stops reading (EPIPE on stdout). With `--drop-on-run` it ends the connection instead
//! of answering a `Run`: a daemon a client reaches but never gets anything from.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest as _, Sha256};
use tether_protocol::{
    check_hello, decode, encode_frame, BuildId, BuildState, BuildSummary, Bytes, ChannelState, ClientMessage,
    DaemonMessage, Decoded, Digest, EndCause, ErrorKind, ErrorReport, ExitStatus, Exited, FrameDecoder, Limits,
    OutputStream, Started, Welcome, DEFAULT_STDIN_WINDOW, DEFAULT_UPLOAD_WINDOW, MAX_CHUNK, MAX_PAYLOAD, PREAMBLE,
    PROTOCOL_VERSION,
};

const USAGE: &str =
    "usage: fake-daemon --archive FILE [--sha256 HEX | --wrong-sha256] [--exit-code N] [--split N] [--drop-on-run]";

/// The whole output of every fake build (on stdout, at position 0).
const OUTPUT: &[u8] = b"fake build ran\n";
/// The pid every fake build reports.
const PID: u32 = 4242;
/// How long a build is held, and a finished one retained, in milliseconds.
const HOLD_MS: u64 = 600_000;
/// Largest `--split`: beyond `MAX_CHUNK` (to try a client's limit), as long as the
/// `DownloadData` still fits in a frame.
const MAX_SPLIT: usize = MAX_PAYLOAD - 32;

/// What the fake answers, fixed by its arguments.
#[derive(Debug, Clone)]
struct Script {
    archive: Vec<u8>,
    sha256: Digest,
    split: usize,
    exit_code: i32,
    /// End the connection at a `Run` instead of answering it.
    drop_on_run: bool,
}

/// The fake daemon: its script and the builds released so far.
#[derive(Debug)]
struct Fake {
    script: Script,
    started_at_ms: u64,
    released: HashMap<BuildId, ExitStatus>,
}

impl Fake {
    fn new(script: Script, now_ms: u64) -> Fake {
        Fake {
            script,
            started_at_ms: now_ms,
            released: HashMap::new(),
        }
    }

    fn held_status(&self) -> ExitStatus {
        ExitStatus::Code(self.script.exit_code)
    }

    fn held(&self, build: &BuildId, now_ms: u64) -> DaemonMessage {
        DaemonMessage::Held {
            build: build.clone(),
            status: self.held_status(),
            cause: EndCause::Completed,
            until_ms: now_ms + HOLD_MS,
        }
    }

    fn exited(build: &BuildId, status: ExitStatus) -> DaemonMessage {
        DaemonMessage::Exited(Exited {
            build: build.clone(),
            status,
            cause: EndCause::Completed,
            duration_ms: 1,
            stdout_bytes: OUTPUT.len() as u64,
            stderr_bytes: 0,
        })
    }

    /// The fake build's output from position `from` (none at or past its end).
    fn output(build: &BuildId, from: u64) -> Vec<DaemonMessage> {
        let from = from.min(OUTPUT.len() as u64);
        if from == OUTPUT.len() as u64 {
            return Vec::new();
        }
        vec![DaemonMessage::Output {
            build: build.clone(),
            stream: OutputStream::Stdout,
            offset: from,
            data: Bytes::from(&OUTPUT[from as usize..]),
        }]
    }

    /// The answer to one client message, at `now_ms` (milliseconds since the epoch).
    fn respond(&mut self, msg: ClientMessage, now_ms: u64) -> Vec<DaemonMessage> {
        match msg {
            ClientMessage::Hello(hello) => match check_hello(&hello, "fake") {
                Ok(()) => vec![DaemonMessage::Welcome(Welcome {
                    protocol: PROTOCOL_VERSION,
                    daemon_version: "fake".into(),
                    capabilities: Vec::new(),
                    limits: Limits {
                        max_payload: MAX_PAYLOAD as u32,
                        max_chunk: MAX_CHUNK as u32,
                        stdin_window: DEFAULT_STDIN_WINDOW,
                        heartbeat_ms: 10_000,
                        upload_window: DEFAULT_UPLOAD_WINDOW,
                    },
                    builds: Vec::new(),
                    session: hello.session().unwrap_or(0),
                })],
                Err(mismatch) => vec![error(None, None, ErrorKind::VersionMismatch, mismatch.to_string())],
            },
            ClientMessage::Ping { nonce } => vec![DaemonMessage::Pong { nonce }],
            ClientMessage::Pong { .. } => Vec::new(),
            ClientMessage::Run { req, spec, follow } => {
                let build = BuildId(spec.id.unwrap_or_else(|| "fake-1".into()));
                self.released.remove(&build);
                let mut out = vec![DaemonMessage::Started(Started {
                    req,
                    build: build.clone(),
                    pid: PID,
                    shell: None,
                    existing: false,
                })];
                // `run --detach` gets only `Started`, as from the real daemon.
                if follow {
                    out.extend(Self::output(&build, 0));
                    out.push(self.held(&build, now_ms));
                }
                out
            }
            ClientMessage::Download { req, build, path } => {
                log(&format!(
                    "download {req} of {:?} from {build}: {} bytes in pieces of {}",
                    path.escape_ascii().to_string(),
                    self.script.archive.len(),
                    self.script.split
                ));
                let mut out: Vec<DaemonMessage> = self
                    .script
                    .archive
                    .chunks(self.script.split)
                    .map(|piece| DaemonMessage::DownloadData {
                        req,
                        data: Bytes::from(piece),
                    })
                    .collect();
                out.push(DaemonMessage::DownloadEnd {
                    req,
                    bytes: self.script.archive.len() as u64,
                    sha256: self.script.sha256,
                });
                out
            }
            ClientMessage::Release { req, build, status } => {
                let status = status.unwrap_or(self.held_status());
                self.released.insert(build.clone(), status);
                vec![DaemonMessage::Ack { req }, Self::exited(&build, status)]
            }
            ClientMessage::Attach {
                req,
                build,
                from,
                follow,
            } => self.attach(req, build, from, follow, now_ms),
            other => {
                log(&format!("ignored: {other:?}"));
                Vec::new()
            }
        }
    }

    /// Answers `Attach` as the real daemon does for a held (or, once released, finished)
    /// build: `Attached`, the output from `from`, then `Held` when following, `LogEnd`
    /// when not, or `Exited` once released.
    fn attach(&self, req: u64, build: BuildId, from: u64, follow: bool, now_ms: u64) -> Vec<DaemonMessage> {
        let end = OUTPUT.len() as u64;
        if from != u64::MAX && from > end {
            let message = format!("position {from} is past the end of {build}'s output ({end} bytes so far)");
            return vec![error(Some(req), Some(build), ErrorKind::BadRequest, message)];
        }
        let released = self.released.get(&build).copied();
        let state = match released {
            Some(status) => BuildState::Finished {
                status,
                cause: EndCause::Completed,
                duration_ms: 1,
                finished_at_ms: now_ms,
                expires_at_ms: now_ms + HOLD_MS,
            },
            None => BuildState::Held {
                status: self.held_status(),
                cause: EndCause::Completed,
                until_ms: now_ms + HOLD_MS,
            },
        };
        let summary = BuildSummary {
            build: build.clone(),
            command: "fake".into(),
            pid: PID,
            started_at_ms: self.started_at_ms,
            output_end: end,
            state,
        };
        let mut out = vec![DaemonMessage::Attached { req, build: summary }];
        out.extend(Self::output(&build, from));
        out.push(match (released, follow) {
            (Some(status), _) => Self::exited(&build, status),
            (None, true) => self.held(&build, now_ms),
            (None, false) => DaemonMessage::LogEnd {
                req,
                build,
                position: end,
            },
        });
        out
    }
}

fn error(req: Option<u64>, build: Option<BuildId>, kind: ErrorKind, message: String) -> DaemonMessage {
    DaemonMessage::Error(ErrorReport {
        req,
        build,
        kind,
        message,
    })
}

fn log(what: &str) {
    eprintln!("fake-daemon: {what}");
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A one-line description of an outgoing message (never the data itself).
fn describe(msg: &DaemonMessage) -> String {
    match msg {
        DaemonMessage::DownloadData { req, data } => format!("DownloadData {{ req: {req}, {} bytes }}", data.len()),
        DaemonMessage::DownloadEnd { req, bytes, sha256 } => {
            let hex: String = sha256.iter().map(|b| format!("{b:02x}")).collect();
            format!("DownloadEnd {{ req: {req}, bytes: {bytes}, sha256: {hex} }}")
        }
        DaemonMessage::Welcome(_) => "Welcome".into(),
        other => format!("{other:?}"),
    }
}

/// Appends `msg` as a frame to `out`.
fn push(out: &mut Vec<u8>, msg: &DaemonMessage) {
    if !matches!(msg, DaemonMessage::DownloadData { .. } | DaemonMessage::Pong { .. }) {
        log(&format!("-> {}", describe(msg)));
    }
    if let Err(e) = encode_frame(msg, out) {
        log(&format!("cannot encode {}: {e}", describe(msg)));
    }
}

/// Serves one stream: `input` from the client, `output` to it, until `input` ends.
fn serve(fake: &mut Fake, mut input: impl Read, mut output: impl Write) -> io::Result<()> {
    // As a daemon starting on its stdin: nobody holds the stream yet.
    let mut opening = PREAMBLE.to_vec();
    push(
        &mut opening,
        &DaemonMessage::Channel(ChannelState {
            holder: None,
            refused: None,
        }),
    );
    output.write_all(&opening)?;
    output.flush()?;
    let mut decoder = FrameDecoder::new();
    let mut out = Vec::new();
    loop {
        let n = match input.read(decoder.read_buf()) {
            Ok(0) => {
                log(&format!("end of input ({:?})", decoder.end_of_stream()));
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        decoder.commit(n);
        while let Some(item) = decoder.decode() {
            match item {
                Decoded::Preamble => {
                    // A new session: the daemon's preamble goes before its answers.
                    log("<- preamble (new session)");
                    out.extend_from_slice(PREAMBLE);
                }
                Decoded::Frame(payload) => match decode::<ClientMessage>(payload) {
                    Ok(msg) => {
                        if !matches!(msg, ClientMessage::Ping { .. } | ClientMessage::Pong { .. }) {
                            log(&format!("<- {msg:?}"));
                        }
                        if fake.script.drop_on_run && matches!(msg, ClientMessage::Run { .. }) {
                            log("dropping the connection at a Run (--drop-on-run)");
                            output.write_all(&out)?;
                            return output.flush();
                        }
                        for reply in fake.respond(msg, now_ms()) {
                            push(&mut out, &reply);
                        }
                    }
                    Err(e) => {
                        log(&format!("undecodable frame skipped: {e}"));
                        push(
                            &mut out,
                            &error(None, None, ErrorKind::Protocol, format!("frame skipped: {e}")),
                        );
                    }
                },
                Decoded::Corrupt(c) => {
                    log(&format!("damaged input: {c}"));
                    let message = format!("damaged input ({c}); skipping to the next frame");
                    push(&mut out, &error(None, None, ErrorKind::Protocol, message));
                }
            }
        }
        if !out.is_empty() {
            output.write_all(&out)?;
            output.flush()?;
            out.clear();
        }
    }
}

fn parse_hex_digest(hex: &str) -> Result<Digest, String> {
    let bad = || format!("--sha256 {hex}: not 64 hex digits");
    if hex.len() != 64 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let mut digest = [0u8; 32];
    for (i, b) in digest.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(digest)
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Script, String> {
    let mut args = args.into_iter();
    let mut archive = None;
    let mut sha256 = None;
    let mut wrong = false;
    let mut exit_code = 0;
    let mut split = MAX_CHUNK;
    let mut drop_on_run = false;
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--archive" => archive = Some(value()?),
            "--sha256" => sha256 = Some(parse_hex_digest(&value()?)?),
            "--wrong-sha256" => wrong = true,
            "--exit-code" => {
                let v = value()?;
                exit_code = v.parse().map_err(|e| format!("--exit-code {v}: {e}"))?;
            }
            "--split" => {
                let v = value()?;
                split = v.parse().map_err(|e| format!("--split {v}: {e}"))?;
                if !(1..=MAX_SPLIT).contains(&split) {
                    return Err(format!("--split {v}: must be 1 to {MAX_SPLIT}"));
                }
            }
            "--drop-on-run" => drop_on_run = true,
            "-h" | "--help" => return Err(String::new()),
            s => return Err(format!("unexpected argument {s}")),
        }
    }
    let archive = archive.ok_or("--archive FILE is required")?;
    if wrong && sha256.is_some() {
        return Err("--sha256 and --wrong-sha256 exclude each other".into());
    }
    let data = std::fs::read(&archive).map_err(|e| format!("cannot read {archive}: {e}"))?;
    let sha256 = sha256.unwrap_or_else(|| {
        let mut real: Digest = Sha256::digest(&data).into();
        if wrong {
            real[0] ^= 0xff;
        }
        real
    });
    Ok(Script {
        archive: data,
        sha256,
        split,
        exit_code,
        drop_on_run,
    })
}

fn main() -> ExitCode {
    let script = match parse_args(std::env::args().skip(1)) {
        Ok(s) => s,
        Err(e) => {
            if !e.is_empty() {
                log(&e);
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut fake = Fake::new(script, now_ms());
    match serve(&mut fake, io::stdin().lock(), io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
            log("the client went away (stdout closed)");
            ExitCode::SUCCESS
        }
        Err(e) => {
            log(&format!("i/o error: {e}"));
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_protocol::{CommandSpec, Hello, RunSpec};

    const NOW: u64 = 1_000_000;

    fn script(archive: &[u8], split: usize) -> Script {
        Script {
            archive: archive.to_vec(),
            sha256: Sha256::digest(archive).into(),
            split,
            exit_code: 3,
            drop_on_run: false,
        }
    }

    fn hello(protocol: u32) -> ClientMessage {
        ClientMessage::Hello(Hello {
            protocol,
            client_version: "test".into(),
            capabilities: Vec::new(),
        })
    }

    fn run(id: Option<&str>, follow: bool) -> ClientMessage {
        let mut spec = RunSpec::new(CommandSpec::argv(["make"]));
        spec.id = id.map(String::from);
        ClientMessage::Run {
            req: 1,
            spec: Box::new(spec),
            follow,
        }
    }

    fn b(id: &str) -> BuildId {
        BuildId(id.into())
    }

    #[test]
    fn hello_ping_and_version_mismatch() {
        let mut f = Fake::new(script(b"", MAX_CHUNK), NOW);
        let [DaemonMessage::Welcome(w)] = &f.respond(hello(PROTOCOL_VERSION), NOW)[..] else {
            panic!("expected one Welcome")
        };
        assert_eq!(w.protocol, PROTOCOL_VERSION);
        assert_eq!(w.daemon_version, "fake");
        assert_eq!(w.limits.max_chunk as usize, MAX_CHUNK);
        assert_eq!(w.limits.upload_window, DEFAULT_UPLOAD_WINDOW);
        assert!(w.builds.is_empty());
        let out = f.respond(hello(PROTOCOL_VERSION - 1), NOW);
        assert!(matches!(&out[..], [DaemonMessage::Error(e)] if e.kind == ErrorKind::VersionMismatch));
        assert_eq!(
            f.respond(ClientMessage::Ping { nonce: 7 }, NOW),
            [DaemonMessage::Pong { nonce: 7 }]
        );
        assert!(f.respond(ClientMessage::Pong { nonce: 7 }, NOW).is_empty());
        assert!(f.respond(ClientMessage::List { req: 2, all: true }, NOW).is_empty());
    }

    #[test]
    fn run_is_started_output_held() {
        let mut f = Fake::new(script(b"", MAX_CHUNK), NOW);
        let out = f.respond(run(None, true), NOW);
        assert_eq!(
            out,
            [
                DaemonMessage::Started(Started {
                    req: 1,
                    build: b("fake-1"),
                    pid: 4242,
                    shell: None,
                    existing: false,
                }),
                DaemonMessage::Output {
                    build: b("fake-1"),
                    stream: OutputStream::Stdout,
                    offset: 0,
                    data: Bytes::from(&b"fake build ran\n"[..]),
                },
                DaemonMessage::Held {
                    build: b("fake-1"),
                    status: ExitStatus::Code(3),
                    cause: EndCause::Completed,
                    until_ms: NOW + 600_000,
                },
            ]
        );
        let out = f.respond(run(Some("mine"), false), NOW);
        assert!(matches!(&out[..], [DaemonMessage::Started(s)] if s.build == b("mine")));
    }

    #[test]
    fn download_is_split_and_ends_with_the_digest() {
        let archive: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let mut f = Fake::new(script(&archive, 4096), NOW);
        let download = ClientMessage::Download {
            req: 5,
            build: b("fake-1"),
            path: Bytes::from(&b"out"[..]),
        };
        let out = f.respond(download.clone(), NOW);
        let mut got = Vec::new();
        for m in &out[..out.len() - 1] {
            let DaemonMessage::DownloadData { req: 5, data } = m else {
                panic!("expected DownloadData, got {m:?}")
            };
            assert!(data.len() <= 4096);
            got.extend_from_slice(data);
        }
        assert_eq!(out.len(), 4);
        assert_eq!(got, archive);
        let real: Digest = Sha256::digest(&archive).into();
        assert_eq!(
            out.last(),
            Some(&DaemonMessage::DownloadEnd {
                req: 5,
                bytes: 10_000,
                sha256: real
            })
        );

        // An empty archive: no data, just the end.
        let mut f = Fake::new(script(b"", MAX_CHUNK), NOW);
        assert!(matches!(
            &f.respond(download, NOW)[..],
            [DaemonMessage::DownloadEnd { req: 5, bytes: 0, .. }]
        ));
    }

    #[test]
    fn release_acks_and_exits_with_its_status_or_the_held_one() {
        let mut f = Fake::new(script(b"", MAX_CHUNK), NOW);
        let release = |status| ClientMessage::Release {
            req: 9,
            build: b("x"),
            status,
        };
        let out = f.respond(release(None), NOW);
        assert_eq!(out[0], DaemonMessage::Ack { req: 9 });
        assert!(matches!(&out[1], DaemonMessage::Exited(e)
            if e.build == b("x") && e.status == ExitStatus::Code(3) && e.stdout_bytes == 15 && e.stderr_bytes == 0));
        let killed = ExitStatus::Signal {
            signal: 9,
            core_dumped: false,
        };
        let out = f.respond(release(Some(killed)), NOW);
        assert!(matches!(&out[1], DaemonMessage::Exited(e) if e.status == killed));
    }

    #[test]
    fn attach_to_a_held_build_then_a_released_one() {
        let mut f = Fake::new(script(b"", MAX_CHUNK), NOW - 5);
        let attach = |from, follow| ClientMessage::Attach {
            req: 2,
            build: b("old"),
            from,
            follow,
        };
        let out = f.respond(attach(5, true), NOW);
        let [DaemonMessage::Attached { req: 2, build: s }, DaemonMessage::Output { offset: 5, data, .. }, DaemonMessage::Held { .. }] =
            &out[..]
        else {
            panic!("unexpected {out:?}")
        };
        assert_eq!((s.pid, s.output_end, s.started_at_ms), (4242, 15, NOW - 5));
        assert!(matches!(
            s.state,
            BuildState::Held {
                status: ExitStatus::Code(3),
                ..
            }
        ));
        assert_eq!(&data[..], b"build ran\n");

        // At the end: no output. Not following: LogEnd, as from the real daemon.
        let out = f.respond(attach(u64::MAX, false), NOW);
        assert!(matches!(
            &out[..],
            [
                DaemonMessage::Attached { .. },
                DaemonMessage::LogEnd {
                    req: 2,
                    position: 15,
                    ..
                }
            ]
        ));
        let out = f.respond(attach(16, true), NOW);
        assert!(matches!(&out[..], [DaemonMessage::Error(e)] if e.kind == ErrorKind::BadRequest));

        f.respond(
            ClientMessage::Release {
                req: 3,
                build: b("old"),
                status: None,
            },
            NOW,
        );
        let out = f.respond(attach(0, false), NOW);
        assert!(
            matches!(&out[..], [DaemonMessage::Attached { build: s, .. }, DaemonMessage::Output { offset: 0, .. }, DaemonMessage::Exited(_)]
            if matches!(s.state, BuildState::Finished { .. }))
        );
    }

    /// Everything the fake wrote, decoded.
    fn read_back(bytes: &[u8]) -> (usize, Vec<DaemonMessage>) {
        let mut dec = FrameDecoder::new();
        let (mut preambles, mut msgs) = (0, Vec::new());
        for piece in bytes.chunks(32 * 1024) {
            assert_eq!(dec.feed(piece), piece.len());
            while let Some(item) = dec.decode() {
                match item {
                    Decoded::Preamble => preambles += 1,
                    Decoded::Frame(p) => msgs.push(decode(p).expect("a valid message")),
                    Decoded::Corrupt(c) => panic!("the fake wrote damage: {c}"),
                }
            }
        }
        (preambles, msgs)
    }

    #[test]
    fn serves_a_stream_end_to_end() {
        let archive = vec![b'a'; 3 * MAX_CHUNK + 1];
        let mut f = Fake::new(script(&archive, MAX_CHUNK), NOW);
        let mut input = b"login banner\n".to_vec();
        input.extend_from_slice(PREAMBLE);
        for m in [
            hello(PROTOCOL_VERSION),
            run(None, true),
            ClientMessage::Download {
                req: 2,
                build: b("fake-1"),
                path: Bytes::from(&b"."[..]),
            },
            ClientMessage::Release {
                req: 3,
                build: b("fake-1"),
                status: None,
            },
        ] {
            encode_frame(&m, &mut input).unwrap();
        }
        input.extend_from_slice(&[0xF4, 0, 0]); // damage, then a takeover
        input.extend_from_slice(PREAMBLE);
        encode_frame(&ClientMessage::Ping { nonce: 1 }, &mut input).unwrap();

        let mut output = Vec::new();
        serve(&mut f, &input[..], &mut output).unwrap();
        assert!(output.starts_with(PREAMBLE));
        let (preambles, mut msgs) = read_back(&output);
        // Its own (with the free stream's announcement), then one per client session.
        assert_eq!(preambles, 3);
        assert!(matches!(
            msgs.remove(0),
            DaemonMessage::Channel(ChannelState { holder: None, .. })
        ));
        let tags: Vec<&str> = msgs
            .iter()
            .map(|m| match m {
                DaemonMessage::Welcome(_) => "Welcome",
                DaemonMessage::Started(_) => "Started",
                DaemonMessage::Output { .. } => "Output",
                DaemonMessage::Held { .. } => "Held",
                DaemonMessage::DownloadData { .. } => "Data",
                DaemonMessage::DownloadEnd { .. } => "End",
                DaemonMessage::Ack { .. } => "Ack",
                DaemonMessage::Exited(_) => "Exited",
                DaemonMessage::Error(_) => "Error",
                DaemonMessage::Pong { .. } => "Pong",
                _ => "other",
            })
            .collect();
        assert_eq!(
            tags,
            [
                "Welcome", "Started", "Output", "Held", "Data", "Data", "Data", "Data", "End", "Ack", "Exited",
                "Error", "Pong"
            ]
        );
        let got: Vec<u8> = msgs
            .iter()
            .filter_map(|m| match m {
                DaemonMessage::DownloadData { data, .. } => Some(data.to_vec()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(got, archive);
    }

    /// A writer whose reader is gone.
    struct Closed;

    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_stdout_is_broken_pipe() {
        let mut f = Fake::new(script(b"", MAX_CHUNK), NOW);
        let err = serve(&mut f, &b""[..], Closed).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn arguments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tar");
        std::fs::write(&path, b"abc").unwrap();
        let file = path.to_str().unwrap().to_owned();
        let args = |extra: &[&str]| {
            let mut v = vec!["--archive".to_owned(), file.clone()];
            v.extend(extra.iter().map(|s| s.to_string()));
            parse_args(v)
        };
        let real: Digest = Sha256::digest(b"abc").into();
        let s = args(&[]).unwrap();
        assert_eq!(
            (s.sha256, s.split, s.exit_code, &s.archive[..]),
            (real, MAX_CHUNK, 0, &b"abc"[..])
        );
        let s = args(&["--wrong-sha256", "--exit-code", "7", "--split", "1"]).unwrap();
        assert_eq!(s.sha256[0], real[0] ^ 0xff);
        assert_eq!(s.sha256[1..], real[1..]);
        assert_eq!((s.split, s.exit_code), (1, 7));
        let hex = "00".repeat(31) + "Ff";
        assert_eq!(args(&["--sha256", &hex]).unwrap().sha256[31], 0xff);
        for bad in [
            &["--sha256", "abc"][..],
            &["--sha256", &"zz".repeat(32)],
            &["--sha256", &"+f".repeat(32)],
            &["--sha256", &hex, "--wrong-sha256"],
            &["--split", "0"],
            &["--exit-code"],
            &["--bogus"],
        ] {
            assert!(args(bad).is_err(), "{bad:?}");
        }
        assert!(parse_args(Vec::<String>::new()).is_err());
        assert!(parse_args(["--archive".to_owned(), "/nonexistent/x".to_owned()]).is_err());
    }
}
