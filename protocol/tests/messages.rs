//! Message round trips through the whole pipe (encode_frame, FrameDecoder, decode), the
//! exact bytes of the payload encoding (PROTOCOL.md relies on them), decode and encode
//! errors, and the handshake checks.

use serde::{de::DeserializeOwned, Serialize};
use tether_protocol::frame::frame_bytes;
use tether_protocol::*;

fn b(s: &[u8]) -> Bytes {
    Bytes::from(s.to_vec())
}

fn build(s: &str) -> BuildId {
    BuildId(s.into())
}

/// Wire tag of a client message; exhaustive, so a new variant must be added here.
fn client_tag(m: &ClientMessage) -> u8 {
    match m {
        ClientMessage::Hello(_) => 0,
        ClientMessage::Ping { .. } => 1,
        ClientMessage::Pong { .. } => 2,
        ClientMessage::Run { .. } => 3,
        ClientMessage::Stdin { .. } => 4,
        ClientMessage::CloseStdin { .. } => 5,
        ClientMessage::Cancel { .. } => 6,
        ClientMessage::CloseOutput { .. } => 7,
        ClientMessage::List { .. } => 8,
        ClientMessage::Attach { .. } => 9,
        ClientMessage::Upload { .. } => 10,
        ClientMessage::UploadEnd { .. } => 11,
        ClientMessage::Download { .. } => 12,
        ClientMessage::Release { .. } => 13,
        ClientMessage::OpenShell { .. } => 14,
        ClientMessage::ShellInput { .. } => 15,
        ClientMessage::ShellInputEnd { .. } => 16,
        ClientMessage::ShellResize { .. } => 17,
        ClientMessage::ShellHangUp { .. } => 18,
        ClientMessage::Goodbye => 19,
        ClientMessage::Sub { .. } => 20,
        ClientMessage::SubEnd { .. } => 21,
    }
}

/// Wire tag of a daemon message; exhaustive, so a new variant must be added here.
fn daemon_tag(m: &DaemonMessage) -> u8 {
    match m {
        DaemonMessage::Welcome(_) => 0,
        DaemonMessage::Error(_) => 1,
        DaemonMessage::Ping { .. } => 2,
        DaemonMessage::Pong { .. } => 3,
        DaemonMessage::Started(_) => 4,
        DaemonMessage::Output { .. } => 5,
        DaemonMessage::Exited(_) => 6,
        DaemonMessage::StdinAck { .. } => 7,
        DaemonMessage::Ack { .. } => 8,
        DaemonMessage::Builds { .. } => 9,
        DaemonMessage::Attached { .. } => 10,
        DaemonMessage::Gap { .. } => 11,
        DaemonMessage::LogEnd { .. } => 12,
        DaemonMessage::UploadAck { .. } => 13,
        DaemonMessage::Held { .. } => 14,
        DaemonMessage::DownloadData { .. } => 15,
        DaemonMessage::DownloadEnd { .. } => 16,
        DaemonMessage::Preparing { .. } => 17,
        DaemonMessage::ShellOpened { .. } => 18,
        DaemonMessage::ShellOutput { .. } => 19,
        DaemonMessage::ShellInputAck { .. } => 20,
        DaemonMessage::ShellExited { .. } => 21,
        DaemonMessage::HeldBefore { .. } => 22,
        DaemonMessage::ShuttingDown { .. } => 23,
        DaemonMessage::Channel(_) => 24,
        DaemonMessage::Sub { .. } => 25,
        DaemonMessage::SubEnd { .. } => 26,
    }
}

const CLIENT_TAGS: u8 = 22;
const DAEMON_TAGS: u8 = 27;

fn all_error_kinds() -> Vec<ErrorKind> {
    use ErrorKind::*;
    let kinds = vec![
        VersionMismatch,
        Protocol,
        BadRequest,
        UnknownBuild,
        CommandNotFound,
        NotExecutable,
        Internal,
        NoSession,
        PermissionDenied,
        Transfer,
        NotReady,
        Cancelled,
        Busy,
    ];
    // Exhaustive: a new kind must be added to the list above.
    for k in &kinds {
        match k {
            VersionMismatch | Protocol | BadRequest | UnknownBuild | CommandNotFound | NotExecutable | Internal
            | NoSession | PermissionDenied | Transfer | NotReady | Cancelled | Busy => {}
        }
    }
    kinds
}

fn run_spec(command: CommandSpec) -> RunSpec {
    RunSpec {
        command,
        env: vec![],
        workdir: None,
        timeout_ms: None,
        grace_ms: None,
        stdin: false,
        name: None,
        id: None,
        uploads: vec![],
        fetches: vec![],
        wait_for: vec![],
        wait_timeout_ms: None,
        hold_after_ms: None,
        hold_on_failure_ms: None,
        hold_before_ms: None,
        secrets: Vec::new(),
        user: None,
        limits: Default::default(),
    }
}

fn client_messages() -> Vec<ClientMessage> {
    vec![
        ClientMessage::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            client_version: "0.1.0".into(),
            capabilities: vec![],
        }),
        ClientMessage::Hello(Hello {
            protocol: u32::MAX,
            client_version: "9.9.9-ünïcode".into(),
            capabilities: vec!["a".into(), "b".repeat(300)],
        }),
        ClientMessage::Ping { nonce: 0 },
        ClientMessage::Ping { nonce: u64::MAX },
        ClientMessage::Pong { nonce: 251 },
        ClientMessage::Run {
            req: 1,
            spec: Box::new(run_spec(CommandSpec::Argv(vec![b(b"echo"), b(b"hi")]))),
            follow: true,
        },
        ClientMessage::Run {
            req: 1 << 40,
            spec: Box::new(RunSpec {
                command: CommandSpec::Argv(vec![b(b"\xff\xfe not utf-8"), b(b"")]),
                env: vec![
                    EnvVar {
                        name: b(b"PATH"),
                        value: b(b"/usr/bin:/bin"),
                    },
                    EnvVar {
                        name: b(b"EMPTY"),
                        value: b(b""),
                    },
                ],
                workdir: Some(b(b"src/\x80")),
                timeout_ms: Some(60_000),
                grace_ms: Some(0),
                stdin: true,
                name: Some("unit tests".into()),
                id: Some("unit-tests.42".into()),
                uploads: vec![UploadSpec { dest: b(b".") }, UploadSpec { dest: b(b"src/\xff") }],
                fetches: vec![
                    FetchSpec {
                        url: "https://example.com/ctx.tar.gz".into(),
                        sha256: Some([0xAB; 32]),
                        dest: b(b"ctx"),
                    },
                    FetchSpec {
                        url: "http://127.0.0.1:8080/file".into(),
                        sha256: None,
                        dest: b(b""),
                    },
                ],
                wait_for: vec!["http://localhost:5000/v2/".into(), "tcp://db:5432".into()],
                wait_timeout_ms: Some(120_000),
                hold_after_ms: Some(600_000),
                hold_on_failure_ms: Some(1_800_000),
                hold_before_ms: Some(u64::MAX),
                secrets: Vec::new(),
                user: None,
                limits: Default::default(),
            }),
            follow: false,
        },
        ClientMessage::Run {
            req: 2,
            spec: Box::new(run_spec(CommandSpec::Script {
                script: b(b"set -e\nmake -j8 test\n"),
                shell: None,
            })),
            follow: true,
        },
        ClientMessage::Run {
            req: 3,
            spec: Box::new(run_spec(CommandSpec::Script {
                script: b(b""),
                shell: Some(b(b"/bin/bash")),
            })),
            follow: false,
        },
        ClientMessage::Stdin {
            build: build("b-1"),
            offset: 0,
            data: b(b""),
        },
        ClientMessage::Stdin {
            build: build("b-1"),
            offset: u64::MAX - 1,
            data: Bytes::from(vec![0xF4; MAX_CHUNK]),
        },
        ClientMessage::CloseStdin { build: build("b-1") },
        ClientMessage::Cancel {
            req: 9,
            build: build("b-1"),
            force: false,
        },
        ClientMessage::Cancel {
            req: 10,
            build: build(""),
            force: true,
        },
        ClientMessage::CloseOutput {
            build: build("b-1"),
            stream: OutputStream::Stderr,
        },
        ClientMessage::List { req: 11, all: false },
        ClientMessage::List { req: 12, all: true },
        ClientMessage::Attach {
            req: 13,
            build: build("b-1"),
            from: 0,
            follow: true,
        },
        ClientMessage::Attach {
            req: 14,
            build: build("b-1"),
            from: u64::MAX,
            follow: false,
        },
        ClientMessage::Upload {
            req: 1,
            index: 0,
            data: Bytes::from(vec![0; MAX_CHUNK]),
        },
        ClientMessage::Upload {
            req: 1,
            index: u32::MAX,
            data: b(b""),
        },
        ClientMessage::UploadEnd {
            req: 1,
            index: 1,
            bytes: 10_240,
            sha256: [7; 32],
        },
        ClientMessage::Download {
            req: 15,
            build: build("b-1"),
            path: b(b"out/\x80report.xml"),
        },
        ClientMessage::Release {
            req: 16,
            build: build("b-1"),
            status: None,
        },
        ClientMessage::Release {
            req: 17,
            build: build("b-1"),
            status: Some(ExitStatus::Code(0)),
        },
        ClientMessage::Run {
            req: 18,
            spec: Box::new(RunSpec {
                hold_on_failure_ms: Some(0),
                hold_before_ms: Some(3_600_000),
                secrets: Vec::new(),
                user: None,
                limits: Default::default(),
                ..run_spec(CommandSpec::Argv(vec![b(b"make")]))
            }),
            follow: true,
        },
        ClientMessage::Run {
            req: 21,
            spec: Box::new(RunSpec {
                user: Some(RunAs { uid: 65_534, gid: None }),
                limits: ResourceLimits {
                    nofile: Some(1024),
                    nproc: Some(0),
                    cpu_s: None,
                    fsize: Some(u32::MAX as u64 + 1),
                    address_space: Some(u64::MAX),
                },
                ..run_spec(CommandSpec::Argv(vec![b(b"make")]))
            }),
            follow: true,
        },
        ClientMessage::Run {
            req: 22,
            spec: Box::new(RunSpec {
                user: Some(RunAs {
                    uid: u32::MAX,
                    gid: Some(u32::MAX),
                }),
                ..run_spec(CommandSpec::Argv(vec![b(b"make")]))
            }),
            follow: false,
        },
        ClientMessage::OpenShell {
            req: 19,
            spec: ShellSpec {
                build: Some(build("b-1")),
                argv: None,
                shell: None,
                env: vec![EnvVar {
                    name: b(b"TERM"),
                    value: b(b"xterm-256color"),
                }],
                tty: Some(WindowSize { rows: 24, cols: 80 }),
            },
        },
        ClientMessage::OpenShell {
            req: u64::MAX,
            spec: ShellSpec {
                build: None,
                argv: Some(vec![b(b"cat"), b(b"\xff-not-utf-8"), b(b"")]),
                shell: Some(b(b"/bin/bash")),
                env: vec![],
                tty: None,
            },
        },
        ClientMessage::OpenShell {
            req: 20,
            spec: ShellSpec {
                build: Some(build("")),
                argv: Some(vec![]),
                shell: None,
                env: vec![],
                tty: Some(WindowSize {
                    rows: u16::MAX,
                    cols: 0,
                }),
            },
        },
        ClientMessage::ShellInput {
            shell: 19,
            offset: 0,
            data: b(b"ls\r"),
        },
        ClientMessage::ShellInput {
            shell: 19,
            offset: u64::MAX - 1,
            data: Bytes::from(vec![0x3c; MAX_CHUNK]),
        },
        ClientMessage::ShellInputEnd { shell: 19 },
        ClientMessage::ShellResize {
            shell: 19,
            size: WindowSize { rows: 50, cols: 300 },
        },
        ClientMessage::ShellHangUp { shell: 19 },
        ClientMessage::Goodbye,
        ClientMessage::Hello(Hello::new("0.1.0", 0x0123_4567_89ab_cdef, true)),
        ClientMessage::Sub {
            sub: 7,
            message: b(&[2, 9]),
        },
        ClientMessage::SubEnd { sub: u32::MAX },
    ]
}

fn daemon_messages() -> Vec<DaemonMessage> {
    let mut v = vec![
        DaemonMessage::Welcome(Welcome {
            protocol: PROTOCOL_VERSION,
            daemon_version: "0.1.0".into(),
            capabilities: vec![],
            limits: Limits {
                max_payload: MAX_PAYLOAD as u32,
                max_chunk: MAX_CHUNK as u32,
                stdin_window: DEFAULT_STDIN_WINDOW,
                heartbeat_ms: 10_000,
                upload_window: DEFAULT_UPLOAD_WINDOW,
            },
            builds: vec![],
            session: 0,
        }),
        DaemonMessage::Welcome(Welcome {
            protocol: 2,
            daemon_version: "0.2.0".into(),
            capabilities: vec!["x".into()],
            limits: Limits {
                max_payload: 0,
                max_chunk: u32::MAX,
                stdin_window: 1,
                heartbeat_ms: u32::MAX,
                upload_window: 0,
            },
            builds: vec![
                BuildSummary {
                    build: build("b-1"),
                    command: "make test".into(),
                    pid: 4242,
                    started_at_ms: 1_700_000_000_000,
                    output_end: 12,
                    state: BuildState::Running,
                },
                BuildSummary {
                    build: build("b-2"),
                    command: String::new(),
                    pid: 1,
                    started_at_ms: 0,
                    output_end: u64::MAX,
                    state: BuildState::Finished {
                        status: ExitStatus::Signal {
                            signal: 15,
                            core_dumped: false,
                        },
                        cause: EndCause::Cancelled,
                        duration_ms: 0,
                        finished_at_ms: 1,
                        expires_at_ms: u64::MAX,
                    },
                },
            ],
            session: 0,
        }),
        DaemonMessage::Ping { nonce: 65_536 },
        DaemonMessage::Pong { nonce: 65_535 },
        DaemonMessage::Started(Started {
            req: 1,
            build: build("b-1"),
            pid: 77,
            shell: None,
            existing: false,
        }),
        DaemonMessage::Started(Started {
            req: 2,
            build: build("b-2"),
            pid: u32::MAX,
            shell: Some(b(b"/bin/sh")),
            existing: true,
        }),
        DaemonMessage::Output {
            build: build("b-1"),
            stream: OutputStream::Stdout,
            offset: 0,
            data: b(b"hi\n"),
        },
        DaemonMessage::Output {
            build: build("b-1"),
            stream: OutputStream::Stderr,
            offset: u32::MAX as u64 + 1,
            data: Bytes::from(vec![b'<'; MAX_CHUNK]),
        },
        DaemonMessage::StdinAck {
            build: build("b-1"),
            consumed: 1 << 20,
        },
        DaemonMessage::Ack { req: 0 },
        DaemonMessage::Builds { req: 4, builds: vec![] },
        DaemonMessage::Builds {
            req: 5,
            builds: vec![BuildSummary {
                build: build("b-1"),
                command: "make all".into(),
                pid: 42,
                started_at_ms: 1_700_000_000_000,
                output_end: 0,
                state: BuildState::Finished {
                    status: ExitStatus::Code(2),
                    cause: EndCause::Completed,
                    duration_ms: 17,
                    finished_at_ms: 1_700_000_000_017,
                    expires_at_ms: 1_700_003_600_017,
                },
            }],
        },
        DaemonMessage::Attached {
            req: 6,
            build: BuildSummary {
                build: build("b-1"),
                command: "make all".into(),
                pid: 42,
                started_at_ms: 1,
                output_end: 1 << 33,
                state: BuildState::Running,
            },
        },
        DaemonMessage::Gap {
            build: build("b-1"),
            from: 0,
            to: 1 << 33,
            reason: GapReason::Quota,
        },
        DaemonMessage::Gap {
            build: build("b-1"),
            from: 5,
            to: 6,
            reason: GapReason::WriteFailed,
        },
        DaemonMessage::LogEnd {
            req: 7,
            build: build("b-1"),
            position: 1 << 33,
        },
        DaemonMessage::UploadAck {
            req: 1,
            consumed: 1 << 30,
        },
        DaemonMessage::Held {
            build: build("b-1"),
            status: ExitStatus::Code(2),
            cause: EndCause::TimedOut,
            until_ms: 1_700_000_600_000,
        },
        DaemonMessage::DownloadData {
            req: 15,
            data: Bytes::from(vec![0x55; MAX_CHUNK]),
        },
        DaemonMessage::DownloadEnd {
            req: 15,
            bytes: 0,
            sha256: [0xE3; 32],
        },
        DaemonMessage::Preparing {
            req: 1,
            build: build("b-3"),
        },
        DaemonMessage::Builds {
            req: 3,
            builds: vec![
                BuildSummary {
                    build: build("p"),
                    command: "kaniko".into(),
                    pid: 0,
                    started_at_ms: 5,
                    output_end: 0,
                    state: BuildState::Preparing,
                },
                BuildSummary {
                    build: build("h"),
                    command: "make".into(),
                    pid: 3,
                    started_at_ms: 5,
                    output_end: 9,
                    state: BuildState::Held {
                        status: ExitStatus::Code(1),
                        cause: EndCause::Completed,
                        until_ms: 77,
                    },
                },
                BuildSummary {
                    build: build("hb"),
                    command: "make".into(),
                    pid: 0,
                    started_at_ms: 5,
                    output_end: 0,
                    state: BuildState::HeldBefore {
                        until_ms: 1_700_000_600_000,
                    },
                },
            ],
        },
        DaemonMessage::ShellOpened {
            req: 19,
            pid: 4243,
            program: b(b"/bin/bash"),
            build: Some(build("b-1")),
        },
        DaemonMessage::ShellOpened {
            req: u64::MAX,
            pid: u32::MAX,
            program: b(b"\xffcat"),
            build: None,
        },
        DaemonMessage::ShellOutput {
            shell: 19,
            stream: OutputStream::Stdout,
            data: b(b"\x1b[1mroot@b-1\x1b[0m:/work# "),
        },
        DaemonMessage::ShellOutput {
            shell: u64::MAX,
            stream: OutputStream::Stderr,
            data: Bytes::from(vec![0xF4; MAX_CHUNK]),
        },
        DaemonMessage::ShellInputAck {
            shell: 19,
            consumed: 1 << 20,
        },
        DaemonMessage::ShellExited {
            shell: 19,
            status: ExitStatus::Code(0),
        },
        DaemonMessage::ShellExited {
            shell: 20,
            status: ExitStatus::Signal {
                signal: 1,
                core_dumped: false,
            },
        },
        DaemonMessage::HeldBefore {
            build: build("b-4"),
            until_ms: 1_700_000_600_000,
        },
        DaemonMessage::HeldBefore {
            build: build("b-4"),
            until_ms: 0,
        },
        DaemonMessage::Channel(ChannelState {
            holder: Some(Holder {
                session: u64::MAX,
                client: "tether 0.1.0".into(),
                since_ms: 1_700_000_000_000,
            }),
            refused: Some(7),
        }),
        DaemonMessage::Channel(ChannelState {
            holder: None,
            refused: None,
        }),
        DaemonMessage::Sub {
            sub: 1,
            message: b(&[3, 4]),
        },
        DaemonMessage::SubEnd { sub: 0 },
        DaemonMessage::ShuttingDown {
            reason: "received SIGTERM".into(),
        },
    ];
    let statuses = [
        ExitStatus::Code(0),
        ExitStatus::Code(-1),
        ExitStatus::Code(i32::MIN),
        ExitStatus::Code(i32::MAX),
        ExitStatus::Signal {
            signal: 9,
            core_dumped: false,
        },
        ExitStatus::Signal {
            signal: 11,
            core_dumped: true,
        },
    ];
    let causes = [
        EndCause::Completed,
        EndCause::Cancelled,
        EndCause::TimedOut,
        EndCause::Released,
        EndCause::Shutdown,
    ];
    for (i, status) in statuses.into_iter().enumerate() {
        v.push(DaemonMessage::Exited(Exited {
            build: build("b-1"),
            status,
            cause: causes[i % causes.len()],
            duration_ms: 1234,
            stdout_bytes: 3,
            stderr_bytes: u64::MAX,
        }));
    }
    for (i, kind) in all_error_kinds().into_iter().enumerate() {
        v.push(DaemonMessage::Error(ErrorReport {
            req: (i % 2 == 0).then_some(i as u64),
            build: (i % 3 == 0).then(|| build("b-3")),
            kind,
            message: format!("error number {i}"),
        }));
    }
    v
}

/// Encodes all messages after a preamble, feeds the stream through a decoder in pieces
/// of `chunk` bytes and decodes every frame.
fn through_the_pipe<T: Serialize + DeserializeOwned>(msgs: &[T], chunk: usize) -> Vec<T> {
    let mut stream = PREAMBLE.to_vec();
    for m in msgs {
        encode_frame(m, &mut stream).unwrap();
    }
    let mut dec = FrameDecoder::new();
    let mut got = Vec::new();
    let mut preambles = 0;
    for mut piece in stream.chunks(chunk) {
        while !piece.is_empty() {
            let n = dec.feed(piece);
            piece = &piece[n..];
            while let Some(item) = dec.decode() {
                match item {
                    Decoded::Preamble => preambles += 1,
                    Decoded::Frame(p) => got.push(decode(p).unwrap()),
                    Decoded::Corrupt(c) => panic!("corrupt: {c}"),
                }
            }
        }
    }
    assert_eq!(preambles, 1);
    assert_eq!(dec.end_of_stream(), EndOfStream::Clean);
    got
}

#[test]
fn every_client_message_round_trips() {
    let msgs = client_messages();
    let tags: std::collections::BTreeSet<u8> = msgs.iter().map(client_tag).collect();
    assert_eq!(tags, (0..CLIENT_TAGS).collect());
    for chunk in [1, 7, 100_000] {
        assert_eq!(through_the_pipe(&msgs, chunk), msgs);
    }
    for m in &msgs {
        let mut f = Vec::new();
        encode_frame(m, &mut f).unwrap();
        assert_eq!(f[FRAME_HEADER_LEN], client_tag(m), "{m:?}");
    }
}

#[test]
fn every_daemon_message_round_trips() {
    let msgs = daemon_messages();
    let tags: std::collections::BTreeSet<u8> = msgs.iter().map(daemon_tag).collect();
    assert_eq!(tags, (0..DAEMON_TAGS).collect());
    for chunk in [1, 7, 100_000] {
        assert_eq!(through_the_pipe(&msgs, chunk), msgs);
    }
    for m in &msgs {
        let mut f = Vec::new();
        encode_frame(m, &mut f).unwrap();
        assert_eq!(f[FRAME_HEADER_LEN], daemon_tag(m), "{m:?}");
    }
}

/// The payload of `msg` (frame minus header).
fn payload<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut f = Vec::new();
    encode_frame(msg, &mut f).unwrap();
    assert_eq!(
        u32::from_le_bytes(f[4..8].try_into().unwrap()) as usize,
        f.len() - FRAME_HEADER_LEN
    );
    f.split_off(FRAME_HEADER_LEN)
}

#[test]
fn example_frames_of_protocol_md() {
    // The two frames dumped in PROTOCOL.md, "Example": keep them in sync.
    let hello = ClientMessage::Hello(Hello::new("0.1.0", 0x0123_4567_89ab_cdef, false));
    let mut f = Vec::new();
    encode_frame(&hello, &mut f).unwrap();
    let mut want = vec![
        0xf4, 0x54, 0x48, 0x52, 0x22, 0x00, 0x00, 0x00, 0x30, 0x5b, 0x16, 0x93, 0x00, 0x09, 0x05,
    ];
    want.extend_from_slice(b"0.1.0");
    want.extend_from_slice(&[0x01, 0x18]);
    want.extend_from_slice(b"session=0123456789abcdef");
    assert_eq!(f, want);
    assert_eq!(
        tether_protocol::frame::frame_crc(&f[..8], &f[FRAME_HEADER_LEN..]),
        0x9316_5b30
    );
    let run = ClientMessage::Run {
        req: 1,
        spec: Box::new(run_spec(CommandSpec::Argv(vec![b(b"echo"), b(b"hi")]))),
        follow: true,
    };
    let mut f = Vec::new();
    encode_frame(&run, &mut f).unwrap();
    // 12 empty RunSpec fields from env to hold_after_ms, then hold_on_failure_ms and
    // hold_before_ms (None) and secrets (empty), then user (None) and the 5 limits
    // (None), then follow.
    assert_eq!(
        f,
        [
            0xf4, 0x54, 0x48, 0x52, 0x22, 0x00, 0x00, 0x00, 0xed, 0x87, 0x3f, 0x2e, 0x03, 0x01, 0x00, 0x02, 0x04, b'e',
            b'c', b'h', b'o', 0x02, b'h', b'i', 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01
        ]
    );
    // CRC32C check value of the standard algorithm, and the CRC of the Run frame.
    assert_eq!(tether_protocol::frame::frame_crc(b"1234", b"56789"), 0xE306_9283);
    assert_eq!(
        tether_protocol::frame::frame_crc(&f[..8], &f[FRAME_HEADER_LEN..]),
        0x2e3f_87ed
    );
    // The RunSpec of `RunSpec::new` is the one above.
    assert_eq!(
        RunSpec::new(CommandSpec::argv(["echo", "hi"])),
        run_spec(CommandSpec::Argv(vec![b(b"echo"), b(b"hi")]))
    );
}

#[test]
fn preamble_and_constants() {
    assert_eq!(PREAMBLE, b"<===[TETHER]===>\n");
    assert_eq!(PREAMBLE.len(), 17);
    assert_eq!(MAGIC, [0xF4, 0x54, 0x48, 0x52]);
    assert_eq!(FRAME_HEADER_LEN, 12);
    assert_eq!(MAX_PAYLOAD, 131_072);
    assert_eq!(MAX_CHUNK, 65_536);
    assert_eq!(SYNC_PAD_LEN, 131_084);
    assert_eq!(DEFAULT_STDIN_WINDOW, 262_144);
    assert_eq!(DEFAULT_UPLOAD_WINDOW, 8_388_608);
    assert_eq!(PROTOCOL_VERSION, 9);
}

#[test]
fn unsigned_varints() {
    let cases: &[(u64, &[u8])] = &[
        (0, &[0]),
        (1, &[1]),
        (250, &[250]),
        (251, &[251, 251, 0]),
        (0x1234, &[251, 0x34, 0x12]),
        (65_535, &[251, 0xff, 0xff]),
        (65_536, &[252, 0, 0, 1, 0]),
        (u32::MAX as u64, &[252, 0xff, 0xff, 0xff, 0xff]),
        (u32::MAX as u64 + 1, &[253, 0, 0, 0, 0, 1, 0, 0, 0]),
        (u64::MAX, &[253, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
    ];
    for &(n, want) in cases {
        // As a bare u64, and as the field of a message (after its tag).
        assert_eq!(payload(&n), want, "{n}");
        let mut msg = vec![1u8];
        msg.extend_from_slice(want);
        assert_eq!(payload(&ClientMessage::Ping { nonce: n }), msg, "{n}");
        assert_eq!(decode::<u64>(want).unwrap(), n);
        if let Ok(n32) = u32::try_from(n) {
            assert_eq!(payload(&n32), want, "{n} as u32");
        }
    }
    assert_eq!(payload(&1000u16), [251, 0xe8, 0x03]);
    assert_eq!(payload(&u128::MAX)[0], 254);
    assert_eq!(payload(&u128::MAX).len(), 17);
    // u8 is always one raw byte, never a varint.
    assert_eq!(payload(&255u8), [255]);
    assert_eq!(payload(&251u8), [251]);
    // A longer form than needed is accepted by bincode when decoding.
    assert_eq!(decode::<u64>(&[251, 5, 0]).unwrap(), 5);
    // A u32 field does not accept the u64 form.
    assert!(decode::<u32>(&[253, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
}

#[test]
fn signed_varints_are_zigzag() {
    let cases: &[(i32, &[u8])] = &[
        (0, &[0]),
        (-1, &[1]),
        (1, &[2]),
        (-2, &[3]),
        (125, &[250]),
        (-126, &[251, 251, 0]),
        (127, &[251, 254, 0]),
        (i32::MAX, &[252, 0xfe, 0xff, 0xff, 0xff]),
        (i32::MIN, &[252, 0xff, 0xff, 0xff, 0xff]),
    ];
    for &(n, want) in cases {
        assert_eq!(payload(&n), want, "{n}");
        assert_eq!(decode::<i32>(want).unwrap(), n);
    }
    // As inside Exited: ExitStatus::Code is tag 0 then the zigzag varint.
    assert_eq!(payload(&ExitStatus::Code(-1)), [0, 1]);
    assert_eq!(
        payload(&ExitStatus::Signal {
            signal: 9,
            core_dumped: true
        }),
        [1, 18, 1]
    );
}

#[test]
fn other_primitives() {
    assert_eq!(payload(&false), [0]);
    assert_eq!(payload(&true), [1]);
    assert!(decode::<bool>(&[2]).is_err());
    assert_eq!(payload(&String::from("hé")), [3, b'h', 0xc3, 0xa9]);
    assert!(decode::<String>(&[1, 0xff]).is_err());
    assert_eq!(payload(&b(b"\x00\xff")), [2, 0, 0xff]);
    assert_eq!(payload(&None::<u64>), [0]);
    assert_eq!(payload(&Some(300u64)), [1, 251, 0x2c, 0x01]);
    assert!(decode::<Option<u64>>(&[2, 0]).is_err());
    assert_eq!(payload(&vec![1u32, 2, 300]), [3, 1, 2, 251, 0x2c, 0x01]);
    // Bytes are a length and raw bytes; a Vec<u8> would be the same on the wire.
    let long = Bytes::from(vec![7u8; 300]);
    assert_eq!(payload(&long)[..3], [251, 0x2c, 0x01]);
    assert_eq!(payload(&long).len(), 303);
    // Newtype structs are their content; structs are their fields in order.
    assert_eq!(payload(&build("ab")), [2, b'a', b'b']);
    assert_eq!(
        payload(&Limits {
            max_payload: 1,
            max_chunk: 2,
            stdin_window: 3,
            heartbeat_ms: 4,
            upload_window: 5,
        }),
        [1, 2, 3, 4, 5]
    );
    // Unit variants are their index.
    assert_eq!(payload(&OutputStream::Stdout), [0]);
    assert_eq!(payload(&OutputStream::Stderr), [1]);
    assert_eq!(payload(&EndCause::Completed), [0]);
    assert_eq!(payload(&EndCause::Cancelled), [1]);
    assert_eq!(payload(&EndCause::TimedOut), [2]);
    assert_eq!(payload(&EndCause::Released), [3]);
    assert_eq!(payload(&EndCause::Shutdown), [4]);
}

#[test]
fn error_kind_tags() {
    for (i, kind) in all_error_kinds().into_iter().enumerate() {
        assert_eq!(payload(&kind), [i as u8], "{kind:?}");
    }
    assert_eq!(payload(&ErrorKind::VersionMismatch), [0]);
    assert_eq!(payload(&ErrorKind::Protocol), [1]);
    assert_eq!(payload(&ErrorKind::NoSession), [7]);
    assert_eq!(payload(&ErrorKind::PermissionDenied), [8]);
    assert_eq!(payload(&ErrorKind::Cancelled), [11]);
    assert_eq!(payload(&ErrorKind::Busy), [12]);
    assert!(decode::<ErrorKind>(&[13]).is_err());
}

#[test]
fn field_order_of_structs() {
    let e = DaemonMessage::Error(ErrorReport {
        req: Some(5),
        build: None,
        kind: ErrorKind::Protocol,
        message: "x".into(),
    });
    assert_eq!(payload(&e), [1, 1, 5, 0, 1, 1, b'x']);
    let o = DaemonMessage::Output {
        build: build("b"),
        stream: OutputStream::Stderr,
        offset: 300,
        data: b(b"ok"),
    };
    assert_eq!(payload(&o), [5, 1, b'b', 1, 251, 0x2c, 0x01, 2, b'o', b'k']);
    let c = ClientMessage::Cancel {
        req: 2,
        build: build("b"),
        force: true,
    };
    assert_eq!(payload(&c), [6, 2, 1, b'b', 1]);
    let s = DaemonMessage::Started(Started {
        req: 1,
        build: build("b"),
        pid: 1000,
        shell: Some(b(b"sh")),
        existing: true,
    });
    assert_eq!(payload(&s), [4, 1, 1, b'b', 251, 0xe8, 0x03, 1, 2, b's', b'h', 1]);
    let x = DaemonMessage::Exited(Exited {
        build: build("b"),
        status: ExitStatus::Code(2),
        cause: EndCause::TimedOut,
        duration_ms: 10,
        stdout_bytes: 0,
        stderr_bytes: 1,
    });
    assert_eq!(payload(&x), [6, 1, b'b', 0, 4, 2, 10, 0, 1]);
    let w = DaemonMessage::Welcome(Welcome {
        protocol: 1,
        daemon_version: "v".into(),
        capabilities: vec!["c".into()],
        limits: Limits {
            max_payload: 3,
            max_chunk: 2,
            stdin_window: 1,
            heartbeat_ms: 0,
            upload_window: 0,
        },
        builds: vec![BuildSummary {
            build: build("b"),
            command: "m".into(),
            pid: 9,
            started_at_ms: 8,
            output_end: 7,
            state: BuildState::Finished {
                status: ExitStatus::Code(1),
                cause: EndCause::Completed,
                duration_ms: 6,
                finished_at_ms: 5,
                expires_at_ms: 4,
            },
        }],
        session: 0,
    });
    // BuildState::Finished is tag 1; ExitStatus::Code(1) is tag 0 then zigzag 2.
    assert_eq!(
        payload(&w),
        [0, 1, 1, b'v', 1, 1, b'c', 3, 2, 1, 0, 0, 1, 1, b'b', 1, b'm', 9, 8, 7, 1, 0, 2, 0, 6, 5, 4, 0]
    );
    let a = ClientMessage::Attach {
        req: 3,
        build: build("b"),
        from: 300,
        follow: true,
    };
    assert_eq!(payload(&a), [9, 3, 1, b'b', 251, 0x2c, 0x01, 1]);
    let g = DaemonMessage::Gap {
        build: build("b"),
        from: 1,
        to: 2,
        reason: GapReason::WriteFailed,
    };
    assert_eq!(payload(&g), [11, 1, b'b', 1, 2, 1]);
    let r = ClientMessage::Run {
        req: 7,
        spec: Box::new(RunSpec {
            command: CommandSpec::Script {
                script: b(b"s"),
                shell: None,
            },
            env: vec![EnvVar {
                name: b(b"K"),
                value: b(b"V"),
            }],
            workdir: Some(b(b"w")),
            timeout_ms: Some(1),
            grace_ms: None,
            stdin: true,
            name: Some("n".into()),
            id: Some("i".into()),
            uploads: vec![UploadSpec { dest: b(b"d") }],
            fetches: vec![FetchSpec {
                url: "u".into(),
                sha256: Some([9; 32]),
                dest: b(b""),
            }],
            wait_for: vec!["g".into()],
            wait_timeout_ms: None,
            hold_after_ms: Some(3),
            hold_on_failure_ms: Some(300),
            hold_before_ms: None,
            secrets: vec![SecretVar {
                name: b(b"S"),
                value: b(b"vvvv"),
            }],
            user: Some(RunAs { uid: 1000, gid: None }),
            limits: ResourceLimits {
                nproc: Some(64),
                ..ResourceLimits::default()
            },
        }),
        follow: false,
    };
    let mut want = vec![
        3, 7, 1, 1, b's', 0, 1, 1, b'K', 1, b'V', 1, 1, b'w', 1, 1, 0, 1, 1, 1, b'n', 1, 1, b'i',
    ];
    // uploads: [dest "d"]; fetches: [url "u", Some(32 bytes of 9, no length), dest ""]
    want.extend([1, 1, b'd', 1, 1, b'u', 1]);
    want.extend([9; 32]);
    // (the fetch's dest ""), wait_for ["g"], wait_timeout_ms None, hold_after_ms Some(3),
    // hold_on_failure_ms Some(300) (251 then a u16), hold_before_ms None.
    want.extend([0, 1, 1, b'g', 0, 1, 3, 1, 251, 0x2c, 0x01, 0]);
    // secrets [("S", "vvvv")].
    want.extend([1, 1, b'S', 4, b'v', b'v', b'v', b'v']);
    // user Some(uid 1000 (251 then a u16), gid None); limits: only nproc Some(64); follow
    // false.
    want.extend([1, 251, 0xe8, 0x03, 0, 0, 1, 64, 0, 0, 0, 0]);
    assert_eq!(payload(&r), want);
    let u = ClientMessage::UploadEnd {
        req: 1,
        index: 2,
        bytes: 3,
        sha256: [4; 32],
    };
    let mut want = vec![11, 1, 2, 3];
    want.extend([4; 32]);
    assert_eq!(payload(&u), want);
    assert_eq!(
        payload(&ClientMessage::Stdin {
            build: build("b"),
            offset: 300,
            data: b(b"in")
        }),
        [4, 1, b'b', 251, 0x2c, 0x01, 2, b'i', b'n']
    );
    assert_eq!(payload(&ClientMessage::CloseStdin { build: build("b") }), [5, 1, b'b']);
    assert_eq!(
        payload(&DaemonMessage::StdinAck {
            build: build("b"),
            consumed: 2
        }),
        [7, 1, b'b', 2]
    );
    assert_eq!(payload(&DaemonMessage::Ack { req: 3 }), [8, 3]);
    assert_eq!(payload(&DaemonMessage::Ping { nonce: 4 }), [2, 4]);
    assert_eq!(payload(&DaemonMessage::Pong { nonce: 4 }), [3, 4]);
    assert_eq!(payload(&ClientMessage::Pong { nonce: 4 }), [2, 4]);
}

#[test]
fn shell_messages_bytes() {
    // OpenShell (client tag 14) with a build and a 24x80 terminal: req 5; spec.build
    // Some("b"); spec.argv None; spec.shell Some("sh"); spec.env [TERM=xterm]; spec.tty
    // Some(WindowSize { rows: 24, cols: 80 }), two u16 varints.
    let open = ClientMessage::OpenShell {
        req: 5,
        spec: ShellSpec {
            build: Some(build("b")),
            argv: None,
            shell: Some(b(b"sh")),
            env: vec![EnvVar {
                name: b(b"TERM"),
                value: b(b"xterm"),
            }],
            tty: Some(WindowSize { rows: 24, cols: 80 }),
        },
    };
    assert_eq!(
        payload(&open),
        [
            14, 5, 1, 1, b'b', 0, 1, 2, b's', b'h', 1, 4, b'T', b'E', b'R', b'M', 5, b'x', b't', b'e', b'r', b'm', 1,
            24, 80
        ]
    );
    // With pipes, no build, an argv.
    let open = ClientMessage::OpenShell {
        req: 6,
        spec: ShellSpec {
            build: None,
            argv: Some(vec![b(b"ls"), b(b"-l")]),
            shell: None,
            env: vec![],
            tty: None,
        },
    };
    assert_eq!(payload(&open), [14, 6, 0, 1, 2, 2, b'l', b's', 2, b'-', b'l', 0, 0, 0]);
    // ShellInput (tag 15): shell, offset 300 (251 then a u16), data.
    assert_eq!(
        payload(&ClientMessage::ShellInput {
            shell: 5,
            offset: 300,
            data: b(b"ls\r"),
        }),
        [15, 5, 251, 0x2c, 0x01, 3, b'l', b's', b'\r']
    );
    assert_eq!(payload(&ClientMessage::ShellInputEnd { shell: 6 }), [16, 6]);
    // ShellResize (tag 17): rows 50 fits one byte, cols 300 takes 251 and a u16.
    assert_eq!(
        payload(&ClientMessage::ShellResize {
            shell: 5,
            size: WindowSize { rows: 50, cols: 300 },
        }),
        [17, 5, 50, 251, 0x2c, 0x01]
    );
    assert_eq!(payload(&ClientMessage::ShellHangUp { shell: 5 }), [18, 5]);
    assert_eq!(payload(&ClientMessage::Goodbye), [19]);
    assert_eq!(payload(&WindowSize { rows: 24, cols: 80 }), [24, 80]);
    assert_eq!(
        payload(&WindowSize {
            rows: 1000,
            cols: u16::MAX
        }),
        [251, 0xe8, 0x03, 251, 0xff, 0xff]
    );

    // ShellOpened (daemon tag 18): req, pid 1000, program, build Some("b").
    assert_eq!(
        payload(&DaemonMessage::ShellOpened {
            req: 5,
            pid: 1000,
            program: b(b"/bin/sh"),
            build: Some(build("b")),
        }),
        [18, 5, 251, 0xe8, 0x03, 7, b'/', b'b', b'i', b'n', b'/', b's', b'h', 1, 1, b'b']
    );
    // ShellOutput (tag 19): shell, stream, data; no offset.
    assert_eq!(
        payload(&DaemonMessage::ShellOutput {
            shell: 5,
            stream: OutputStream::Stdout,
            data: b(b"ls\r\n"),
        }),
        [19, 5, 0, 4, b'l', b's', b'\r', b'\n']
    );
    assert_eq!(
        payload(&DaemonMessage::ShellOutput {
            shell: 6,
            stream: OutputStream::Stderr,
            data: b(b"e"),
        }),
        [19, 6, 1, 1, b'e']
    );
    assert_eq!(
        payload(&DaemonMessage::ShellInputAck { shell: 5, consumed: 3 }),
        [20, 5, 3]
    );
    // ShellExited (tag 21): shell, ExitStatus.
    assert_eq!(
        payload(&DaemonMessage::ShellExited {
            shell: 5,
            status: ExitStatus::Code(0),
        }),
        [21, 5, 0, 0]
    );
    // Hung up: Signal (tag 1), SIGHUP 1 zigzags to 2, no core.
    assert_eq!(
        payload(&DaemonMessage::ShellExited {
            shell: 6,
            status: ExitStatus::Signal {
                signal: 1,
                core_dumped: false
            },
        }),
        [21, 6, 1, 2, 0]
    );
}

/// The interactive session of PROTOCOL.md, "Shells": keep them in sync.
#[test]
fn shell_session_of_protocol_md() {
    let client: Vec<(ClientMessage, &[u8])> = vec![
        (
            ClientMessage::OpenShell {
                req: 7,
                spec: ShellSpec {
                    build: None,
                    argv: None,
                    shell: None,
                    env: vec![EnvVar {
                        name: b(b"TERM"),
                        value: b(b"xterm"),
                    }],
                    tty: Some(WindowSize { rows: 24, cols: 80 }),
                },
            },
            &[
                0x0e, 0x07, 0x00, 0x00, 0x00, 0x01, 0x04, 0x54, 0x45, 0x52, 0x4d, 0x05, 0x78, 0x74, 0x65, 0x72, 0x6d,
                0x01, 0x18, 0x50,
            ],
        ),
        (
            ClientMessage::ShellInput {
                shell: 7,
                offset: 0,
                data: b(b"e"),
            },
            &[0x0f, 0x07, 0x00, 0x01, 0x65],
        ),
        (
            ClientMessage::ShellResize {
                shell: 7,
                size: WindowSize { rows: 40, cols: 120 },
            },
            &[0x11, 0x07, 0x28, 0x78],
        ),
        (
            ClientMessage::ShellInput {
                shell: 7,
                offset: 1,
                data: b(b"xit\r"),
            },
            &[0x0f, 0x07, 0x01, 0x04, 0x78, 0x69, 0x74, 0x0d],
        ),
    ];
    let out = |data: &[u8]| DaemonMessage::ShellOutput {
        shell: 7,
        stream: OutputStream::Stdout,
        data: b(data),
    };
    let daemon: Vec<(DaemonMessage, &[u8])> = vec![
        (
            DaemonMessage::ShellOpened {
                req: 7,
                pid: 812,
                program: b(b"/bin/sh"),
                build: None,
            },
            &[
                0x12, 0x07, 0xfb, 0x2c, 0x03, 0x07, 0x2f, 0x62, 0x69, 0x6e, 0x2f, 0x73, 0x68, 0x00,
            ],
        ),
        (out(b"$ "), &[0x13, 0x07, 0x00, 0x02, 0x24, 0x20]),
        (out(b"e"), &[0x13, 0x07, 0x00, 0x01, 0x65]),
        (
            DaemonMessage::ShellInputAck { shell: 7, consumed: 1 },
            &[0x14, 0x07, 0x01],
        ),
        (out(b"xit\r\n"), &[0x13, 0x07, 0x00, 0x05, 0x78, 0x69, 0x74, 0x0d, 0x0a]),
        (
            DaemonMessage::ShellInputAck { shell: 7, consumed: 5 },
            &[0x14, 0x07, 0x05],
        ),
        (
            DaemonMessage::ShellExited {
                shell: 7,
                status: ExitStatus::Code(0),
            },
            &[0x15, 0x07, 0x00, 0x00],
        ),
    ];
    for (m, want) in &client {
        assert_eq!(payload(m), *want, "{m:?}");
        assert_eq!(decode::<ClientMessage>(want).unwrap(), *m);
    }
    for (m, want) in &daemon {
        assert_eq!(payload(m), *want, "{m:?}");
        assert_eq!(decode::<DaemonMessage>(want).unwrap(), *m);
    }
}

#[test]
fn breakpoint_bytes() {
    // HeldBefore (daemon tag 22): build "b", until_ms 1_700_000_000_000 = 0x18b_cfe5_6800,
    // more than a u32: 253 then 8 bytes little-endian.
    assert_eq!(
        payload(&DaemonMessage::HeldBefore {
            build: build("b"),
            until_ms: 1_700_000_000_000,
        }),
        [22, 1, b'b', 253, 0x00, 0x68, 0xe5, 0xcf, 0x8b, 0x01, 0x00, 0x00]
    );
    // BuildState::HeldBefore is tag 4, then until_ms.
    assert_eq!(payload(&BuildState::HeldBefore { until_ms: 77 }), [4, 77]);
    assert_eq!(
        payload(&DaemonMessage::Builds {
            req: 2,
            builds: vec![BuildSummary {
                build: build("p"),
                command: "m".into(),
                pid: 0,
                started_at_ms: 5,
                output_end: 0,
                state: BuildState::HeldBefore { until_ms: 77 },
            }],
        }),
        [9, 2, 1, 1, b'p', 1, b'm', 0, 5, 0, 4, 77]
    );
    // The two RunSpec fields of version 4 come after hold_after_ms: hold_on_failure_ms
    // None, hold_before_ms Some(600_000) = 0x927c0 (252 then a u32); then secrets, user
    // and limits.
    let run = ClientMessage::Run {
        req: 1,
        spec: Box::new(RunSpec {
            hold_before_ms: Some(600_000),
            secrets: Vec::new(),
            user: None,
            limits: Default::default(),
            ..run_spec(CommandSpec::Argv(vec![b(b"x")]))
        }),
        follow: true,
    };
    let mut want = vec![3, 1, 0, 1, 1, b'x'];
    want.extend([0; 12]); // env to hold_after_ms
    want.extend([0, 1, 252, 0xc0, 0x27, 0x09, 0x00, 0]); // .., secrets []
    want.extend([0; 6]); // user None, the 5 limits None
    want.push(1); // follow
    assert_eq!(payload(&run), want);
    let run = ClientMessage::Run {
        req: 1,
        spec: Box::new(RunSpec {
            hold_after_ms: Some(1),
            hold_on_failure_ms: Some(1_800_000),
            ..run_spec(CommandSpec::Argv(vec![b(b"x")]))
        }),
        follow: false,
    };
    // 1_800_000 = 0x1b7740.
    let mut want = vec![3, 1, 0, 1, 1, b'x'];
    want.extend([0; 11]); // env to wait_timeout_ms
    want.extend([1, 1, 1, 252, 0x40, 0x77, 0x1b, 0x00, 0, 0]); // .., secrets []
    want.extend([0; 6]); // user None, the 5 limits None
    want.push(0); // follow
    assert_eq!(payload(&run), want);
    // Release of a build held before its command: status None.
    assert_eq!(
        payload(&ClientMessage::Release {
            req: 5,
            build: build("b"),
            status: None,
        }),
        [13, 5, 1, b'b', 0]
    );
}

#[test]
fn run_as_and_resource_limits_bytes() {
    // RunAs: uid (u32 varint), then gid (Option<u32>).
    assert_eq!(payload(&RunAs { uid: 0, gid: Some(0) }), [0, 1, 0]);
    assert_eq!(payload(&RunAs { uid: 1000, gid: None }), [251, 0xe8, 0x03, 0]);
    assert_eq!(
        payload(&RunAs {
            uid: u32::MAX,
            gid: Some(65_534)
        }),
        [252, 0xff, 0xff, 0xff, 0xff, 1, 251, 0xfe, 0xff]
    );
    assert!(decode::<RunAs>(&[253, 0, 0, 0, 0, 1, 0, 0, 0, 0]).is_err());
    // ResourceLimits: five Option<u64>, nofile, nproc, cpu_s, fsize, address_space.
    assert_eq!(payload(&ResourceLimits::default()), [0; 5]);
    assert_eq!(
        payload(&ResourceLimits {
            address_space: Some(1),
            ..ResourceLimits::default()
        }),
        [0, 0, 0, 0, 1, 1]
    );
    // RunSpec::new runs as the daemon's user with the daemon's limits.
    let spec = RunSpec::new(CommandSpec::argv(["x"]));
    assert_eq!((spec.user, spec.limits), (None, ResourceLimits::default()));

    // A Run as root (uid 0, gid 0) with all five limits set. user and limits come last
    // in the RunSpec, after secrets.
    let run = ClientMessage::Run {
        req: 2,
        spec: Box::new(RunSpec {
            user: Some(RunAs { uid: 0, gid: Some(0) }),
            limits: ResourceLimits {
                nofile: Some(1024),
                nproc: Some(64),
                cpu_s: Some(300),
                fsize: Some(1 << 30),
                address_space: Some(u64::MAX),
            },
            ..run_spec(CommandSpec::Argv(vec![b(b"x")]))
        }),
        follow: true,
    };
    let mut want = vec![3, 2, 0, 1, 1, b'x'];
    want.extend([0; 15]); // env to secrets
    want.extend([1, 0, 1, 0]); // user Some(uid 0, gid Some(0))
    want.extend([1, 251, 0x00, 0x04]); // nofile Some(1024)
    want.extend([1, 64]); // nproc Some(64)
    want.extend([1, 251, 0x2c, 0x01]); // cpu_s Some(300)
    want.extend([1, 252, 0x00, 0x00, 0x00, 0x40]); // fsize Some(2^30)
    want.extend([1, 253, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]); // address_space Some(u64::MAX)
    want.push(1); // follow
    assert_eq!(payload(&run), want);
    assert_eq!(decode_framed::<ClientMessage>(&want).unwrap(), run);
}

#[test]
fn a_hold_before_the_command_prepares() {
    let mut spec = RunSpec::new(CommandSpec::argv(["true"]));
    assert!(!spec.prepares());
    spec.hold_on_failure_ms = Some(1);
    spec.hold_after_ms = Some(1);
    assert!(!spec.prepares());
    spec.hold_before_ms = Some(0);
    assert!(spec.prepares());
}

/// Runs a raw payload through a real frame and decoder, then decodes it.
fn decode_framed<T: DeserializeOwned>(p: &[u8]) -> Result<T, DecodeError> {
    let mut stream = PREAMBLE.to_vec();
    stream.extend_from_slice(&frame_bytes(p));
    let mut dec = FrameDecoder::new();
    assert_eq!(dec.feed(&stream), stream.len());
    assert_eq!(dec.decode(), Some(Decoded::Preamble));
    match dec.decode() {
        Some(Decoded::Frame(got)) => {
            assert_eq!(got, p);
            decode(got)
        }
        other => panic!("expected a frame, got {other:?}"),
    }
}

#[test]
fn trailing_bytes_are_an_error() {
    let mut p = payload(&ClientMessage::Ping { nonce: 1 });
    assert!(decode_framed::<ClientMessage>(&p).is_ok());
    p.push(0);
    assert!(matches!(
        decode_framed::<ClientMessage>(&p),
        Err(DecodeError::Trailing(1))
    ));
    let mut p = payload(&daemon_messages()[0]);
    p.extend_from_slice(b"xyz");
    let err = decode_framed::<DaemonMessage>(&p).unwrap_err();
    assert!(matches!(err, DecodeError::Trailing(3)), "{err:?}");
    assert!(err.to_string().contains("3 trailing bytes"), "{err}");
}

#[test]
fn undecodable_payloads_are_decode_errors() {
    // A Run of argv [] with every RunSpec field none or empty up to secrets, then `tail`
    // (user, limits, follow).
    let run_tail = |tail: &[u8]| {
        let mut p = vec![3, 1, 0, 0];
        p.extend([0; 15]); // env to secrets
        p.extend_from_slice(tail);
        p
    };
    assert_eq!(
        decode_framed::<ClientMessage>(&run_tail(&[0, 0, 0, 0, 0, 0, 1])).unwrap(),
        ClientMessage::Run {
            req: 1,
            spec: Box::new(run_spec(CommandSpec::Argv(vec![]))),
            follow: true,
        }
    );
    let mut bad_client: Vec<Vec<u8>> = vec![
        vec![],                                           // empty
        vec![CLIENT_TAGS],                                // unknown tag
        vec![250],                                        // unknown tag
        vec![251, 0, 1],                                  // unknown tag, u16 form
        vec![255],                                        // invalid varint marker
        vec![1],                                          // Ping without its nonce
        vec![1, 252, 0, 0],                               // nonce cut short
        vec![6, 1, 1, b'b', 2],                           // Cancel with force = 2
        vec![0, 1, 2, 0xff, 0xfe, 0],                     // Hello with invalid UTF-8
        vec![5, 252, 0, 0, 0, 0x10],                      // CloseStdin with a 256 MiB build id
        vec![4, 1, b'b', 0, 253, 0, 0, 0, 0, 0, 0, 0, 1], // Stdin claiming 2^56 bytes
        vec![3, 1, 2],                                    // Run with CommandSpec tag 2
        vec![3, 1, 0, 0, 0, 2],                           // Run with workdir Option tag 2
        vec![14, 1, 0, 0, 0, 0, 2],                       // OpenShell with tty Option tag 2
        vec![14, 1, 0, 0, 0, 0, 1, 24],                   // OpenShell with cols missing
        vec![15, 5, 0],                                   // ShellInput without data
        vec![17, 5, 252, 0, 0, 1, 0, 80],                 // ShellResize: rows in the u32 form
        vec![18],                                         // ShellHangUp without its shell
    ];
    // The fields of version 6 (`user`, `limits`) before `follow`.
    bad_client.extend([
        run_tail(&[2, 0, 0, 0, 0, 0, 1]),       // Run with user Option tag 2
        run_tail(&[1, 0, 2, 0, 0, 0, 0, 0, 1]), // Run with user.gid Option tag 2
        // user.uid in the u64 form
        run_tail(&[1, 253, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
        run_tail(&[0, 0, 0, 2, 0, 0, 1]), // Run with limits.cpu_s Option tag 2
        run_tail(&[0, 0, 0, 0, 0, 0]),    // Run without follow
        run_tail(&[1]),                   // a version 5 Run: follow after secrets
        run_tail(&[0]),                   // a version 5 Run with follow false
    ]);
    for p in bad_client {
        let r = decode_framed::<ClientMessage>(&p);
        assert!(matches!(r, Err(DecodeError::Decode(_))), "{p:?}: {r:?}");
    }
    let bad_daemon: Vec<Vec<u8>> = vec![
        vec![DAEMON_TAGS],
        vec![1, 0, 0, 13, 0],               // Error with ErrorKind 13
        vec![5, 1, b'b', 2, 0, 0],          // Output with OutputStream 2
        vec![6, 1, b'b', 2, 0, 0, 0, 0, 0], // Exited with ExitStatus 2
        vec![6, 1, b'b', 0, 0, 5, 0, 0, 0], // Exited with EndCause 5
        vec![9, 0, 1, 0, 0, 0, 0, 0, 5],    // Builds with BuildState 5
        vec![19, 5, 2, 0],                  // ShellOutput with OutputStream 2
        vec![21, 5, 2, 0],                  // ShellExited with ExitStatus 2
        vec![22, 1, b'b'],                  // HeldBefore without until_ms
        vec![23],                           // ShuttingDown without its reason
    ];
    for p in bad_daemon {
        let r = decode_framed::<DaemonMessage>(&p);
        assert!(matches!(r, Err(DecodeError::Decode(_))), "{p:?}: {r:?}");
    }
    // A client message is not a daemon message and vice versa, even when the tag exists.
    let p = payload(&ClientMessage::Cancel {
        req: 1,
        build: build("b"),
        force: true,
    });
    assert!(decode::<DaemonMessage>(&p).is_err());
}

#[test]
fn largest_message_fits_and_one_more_byte_does_not() {
    // Stdin payload: tag (1) + build id "b" (1 + 1) + offset 0 (1) + data length (5: 252
    // + u32) + data.
    let n = MAX_PAYLOAD - 9;
    let fits = ClientMessage::Stdin {
        build: build("b"),
        offset: 0,
        data: Bytes::from(vec![1; n]),
    };
    let mut out = b"keep".to_vec();
    encode_frame(&fits, &mut out).unwrap();
    assert_eq!(out.len(), 4 + FRAME_HEADER_LEN + MAX_PAYLOAD);
    assert_eq!(through_the_pipe(std::slice::from_ref(&fits), 4096), [fits]);

    let too_big = ClientMessage::Stdin {
        build: build("b"),
        offset: 0,
        data: Bytes::from(vec![1; n + 1]),
    };
    let mut out = b"keep".to_vec();
    let err = encode_frame(&too_big, &mut out).unwrap_err();
    assert!(
        matches!(err, EncodeError::TooLarge(x) if x == MAX_PAYLOAD + 1),
        "{err:?}"
    );
    assert_eq!(out, b"keep");
    assert!(err.to_string().contains(&MAX_PAYLOAD.to_string()));

    let huge = DaemonMessage::Output {
        build: build("b"),
        stream: OutputStream::Stdout,
        offset: 0,
        data: Bytes::from(vec![0; 3 * MAX_PAYLOAD]),
    };
    let mut out = vec![9; 100];
    assert!(matches!(encode_frame(&huge, &mut out), Err(EncodeError::TooLarge(_))));
    assert_eq!(out, vec![9; 100]);
}

#[test]
fn every_payload_that_fits_decodes() {
    // bincode's decode limit counts in-memory sizes (a length counts 8 bytes even when its
    // varint is 1 byte), so payloads of many small fields count up to 8 times their size.
    // All of them must decode as long as the payload fits in a frame.
    let run_with_env = |n: usize| ClientMessage::Run {
        req: u64::MAX,
        spec: Box::new(RunSpec {
            env: vec![
                EnvVar {
                    name: b(b""),
                    value: b(b""),
                };
                n
            ],
            name: Some("xyz".into()),
            ..run_spec(CommandSpec::Argv(vec![]))
        }),
        follow: true,
    };
    // 40 bytes of other fields (tag 1, req 9, command 2, env length 3, options and flag 4,
    // name 5, id 1, the preparation and hold fields 7, secrets 1, user 1, limits 5,
    // follow 1) and two bytes per variable.
    let run = run_with_env((MAX_PAYLOAD - 40) / 2);
    let p = payload(&run);
    assert_eq!(p.len(), MAX_PAYLOAD);
    assert_eq!(decode_framed::<ClientMessage>(&p).unwrap(), run);

    let mut welcome = welcome(PROTOCOL_VERSION, "0.1.0");
    welcome.builds = vec![
        BuildSummary {
            build: build(""),
            command: String::new(),
            pid: 0,
            started_at_ms: 0,
            output_end: 0,
            state: BuildState::Running,
        };
        20_000
    ];
    let w = DaemonMessage::Welcome(welcome);
    let p = payload(&w);
    assert!(p.len() <= MAX_PAYLOAD);
    assert_eq!(decode_framed::<DaemonMessage>(&p).unwrap(), w);

    // 31 bytes of other fields: tag, req, command tag, script length (252 + u32), shell,
    // env, three options, flag, name, id, the seven preparation and hold fields, secrets,
    // user, the five limits, follow.
    let script = ClientMessage::Run {
        req: 1,
        spec: Box::new(run_spec(CommandSpec::Script {
            script: Bytes::from(vec![b'#'; MAX_PAYLOAD - 31]),
            shell: None,
        })),
        follow: false,
    };
    let p = payload(&script);
    assert_eq!(p.len(), MAX_PAYLOAD);
    assert_eq!(decode_framed::<ClientMessage>(&p).unwrap(), script);
}

#[test]
fn a_lying_length_is_refused_before_allocating() {
    // Stdin (offset 0) whose data claims 2^40 bytes in a 13-byte payload.
    let p = [4, 1, b'b', 0, 253, 0, 0, 0, 0, 0, 1, 0, 0];
    let r = decode_framed::<ClientMessage>(&p);
    assert!(
        matches!(r, Err(DecodeError::Decode(bincode::error::DecodeError::LimitExceeded))),
        "{r:?}"
    );
}

#[test]
fn frames_append_to_the_output() {
    let mut out = Vec::new();
    let msgs = client_messages();
    for m in &msgs {
        encode_frame(m, &mut out).unwrap();
    }
    let mut dec = FrameDecoder::framed();
    let mut got = Vec::new();
    let mut rest = &out[..];
    while !rest.is_empty() {
        let n = dec.feed(rest);
        rest = &rest[n..];
        while let Some(Decoded::Frame(p)) = dec.decode() {
            got.push(decode::<ClientMessage>(p).unwrap());
        }
    }
    assert_eq!(got, msgs);
}

fn hello(protocol: u32, version: &str) -> Hello {
    Hello {
        protocol,
        client_version: version.into(),
        capabilities: vec![],
    }
}

fn welcome(protocol: u32, version: &str) -> Welcome {
    Welcome {
        protocol,
        daemon_version: version.into(),
        capabilities: vec![],
        limits: Limits {
            max_payload: MAX_PAYLOAD as u32,
            max_chunk: MAX_CHUNK as u32,
            stdin_window: DEFAULT_STDIN_WINDOW,
            heartbeat_ms: 10_000,
            upload_window: DEFAULT_UPLOAD_WINDOW,
        },
        builds: vec![],
        session: 0,
    }
}

#[test]
fn handshake_accepts_the_same_version() {
    assert_eq!(check_hello(&hello(PROTOCOL_VERSION, "0.9.0"), "0.1.0"), Ok(()));
    assert_eq!(check_welcome(&welcome(PROTOCOL_VERSION, "0.9.0"), "0.1.0"), Ok(()));
}

#[test]
fn handshake_mismatch_names_both_versions() {
    for peer in [0, PROTOCOL_VERSION + 1, 77] {
        let e = check_hello(&hello(peer, "0.9.0"), "0.1.0").unwrap_err();
        assert_eq!((e.own, e.peer, e.peer_role), (PROTOCOL_VERSION, peer, "client"));
        let msg = e.to_string();
        for part in [
            format!("protocol {peer}"),
            format!("protocol {PROTOCOL_VERSION}"),
            "client tether 0.9.0".to_string(),
            "tether 0.1.0".to_string(),
        ] {
            assert!(msg.contains(&part), "{msg:?} lacks {part:?}");
        }

        let e = check_welcome(&welcome(peer, "0.9.0"), "0.1.0").unwrap_err();
        assert_eq!((e.own, e.peer, e.peer_role), (PROTOCOL_VERSION, peer, "daemon"));
        let msg = e.to_string();
        for part in [
            format!("protocol {peer}"),
            format!("protocol {PROTOCOL_VERSION}"),
            "daemon tether 0.9.0".to_string(),
            "tether 0.1.0".to_string(),
        ] {
            assert!(msg.contains(&part), "{msg:?} lacks {part:?}");
        }
    }
}

#[test]
fn version_mismatch_travels_as_an_error_report() {
    let e = check_hello(&hello(PROTOCOL_VERSION + 1, "0.2.0"), "0.1.0").unwrap_err();
    let report = DaemonMessage::Error(ErrorReport {
        req: None,
        build: None,
        kind: ErrorKind::VersionMismatch,
        message: e.to_string(),
    });
    let p = payload(&report);
    assert_eq!(&p[..4], [1, 0, 0, 0]);
    assert_eq!(decode::<DaemonMessage>(&p).unwrap(), report);
}

#[test]
fn a_hello_carries_its_session_nonce_and_takeover_as_capabilities() {
    let h = Hello::new("0.9.0", 0x00ab_cdef_0123_4567, false);
    assert_eq!(h.protocol, PROTOCOL_VERSION);
    assert_eq!(h.capabilities, vec!["session=00abcdef01234567".to_owned()]);
    assert_eq!((h.session(), h.takeover()), (Some(0x00ab_cdef_0123_4567), false));
    let t = Hello::new("0.9.0", 1, true);
    assert_eq!((t.session(), t.takeover()), (Some(1), true));
    // Malformed or missing nonces are no nonce at all.
    for caps in [
        vec![],
        vec!["session=12".to_owned()],
        vec!["session=zzzzzzzzzzzzzzzz".to_owned()],
    ] {
        let h = Hello {
            protocol: PROTOCOL_VERSION,
            client_version: "x".into(),
            capabilities: caps,
        };
        assert_eq!(h.session(), None);
    }
}
